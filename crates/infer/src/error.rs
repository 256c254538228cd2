//! The one error type of the inference crate: each variant says what was wrong and
//! where (the file, the tensor, the placement entry).

use std::path::PathBuf;

use hetero_comm::CommError;

/// What can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// A weights file cannot be read or is not what its format promises.
    #[error("{file}: {reason}")]
    Weights {
        /// The file.
        file: PathBuf,
        /// What is wrong, and where in the file.
        reason: String,
    },
    /// A tensor the model needs is missing or has the wrong shape.
    #[error("{file}: tensor {name}: {reason}")]
    Tensor {
        /// The weights file.
        file: PathBuf,
        /// The tensor's name in that file.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A tokenizer cannot be built, or does not fit the model.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A placement does not describe a runnable layout of this model.
    #[error("placement: {0}")]
    Placement(String),
    /// A profile or a plan does not fit the model or the devices.
    #[error("profile: {0}")]
    Profile(String),
    /// A request cannot be run (empty prompt, too long, …).
    #[error("request: {0}")]
    Request(String),
    /// The model's own configuration is unusable.
    #[error("model configuration: {0}")]
    Config(String),
    /// A quantized product was given shapes or bytes that do not fit.
    #[error("quantized kernels: {0}")]
    Kernel(#[from] hetero_kernels::KernelError),
    /// A peer of the mesh failed.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// Fetching a model failed.
    #[error("fetching {model}: {reason}")]
    Fetch {
        /// The model's name.
        model: String,
        /// What went wrong.
        reason: String,
    },
}

impl InferError {
    pub(crate) fn weights(file: &std::path::Path, reason: impl Into<String>) -> Self {
        InferError::Weights {
            file: file.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn tensor(file: &std::path::Path, name: &str, reason: impl Into<String>) -> Self {
        InferError::Tensor {
            file: file.to_path_buf(),
            name: name.to_string(),
            reason: reason.into(),
        }
    }
}
