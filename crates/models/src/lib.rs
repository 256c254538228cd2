//! Built-in models Hetero can train without any user code.
//!
//! The image classifiers take `[batch, 1, 28, 28]` pixels (normalised) and return
//! `[batch, 10]` logits; [`lm`] is a small causal transformer language model and
//! [`decoupled_lm`] its decoupled form ([`decouple`]: seed 000's structure decoupling). They
//! are ordinary burn modules, generic over the backend, so the same code runs on
//! every device kind.

use burn::prelude::*;

pub mod bert;
pub mod checkpoint;
pub mod cnn;
pub mod decouple;
pub mod decoupled_bert;
pub mod decoupled_llama;
pub mod decoupled_lm;
pub mod fidelity;
pub mod grouped;
pub mod llama;
pub mod lm;
pub mod mlp;
pub mod sub_blocks;

pub use cnn::{Cnn, CnnConfig};
pub use decouple::{Decoupling, DecouplingError, LayerKind, ModelShape, Variant};
pub use decoupled_lm::{DecoupledLm, DecoupledLmConfig, LanguageModel, LanguageModelConfig};
pub use lm::{TinyLm, TinyLmConfig};
pub use mlp::{Mlp, MlpConfig};

/// An image classifier: the one thing the built-in training task needs of a model.
pub trait Classifier<B: Backend>: Module<B> {
    /// # Shapes
    /// - images: `[batch, 1, height, width]`
    /// - returns: `[batch, classes]` logits
    fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2>;

    /// The network's first part, images → features, when it splits into a body
    /// and a head with `forward(x) == head(body(x))` and the head's parameters
    /// last in visiting order. A trainer then exchanges the head's gradients
    /// while it computes the body's. `Err(images)`, the default: it does not
    /// split.
    ///
    /// # Shapes
    /// - images: `[batch, 1, height, width]`
    /// - returns: `[batch, features]`
    fn body(&self, images: Tensor<B, 4>) -> Result<Tensor<B, 2>, Tensor<B, 4>> {
        Err(images)
    }

    /// The network's last part, features → logits (only called when `body`
    /// splits).
    ///
    /// # Shapes
    /// - features: `[batch, features]`
    /// - returns: `[batch, classes]` logits
    fn head(&self, features: Tensor<B, 2>) -> Tensor<B, 2> {
        features
    }

    /// Scalars in the head's parameters: the last ones of the model's flat
    /// parameters (`None`: it does not split).
    fn head_params(&self) -> Option<usize> {
        None
    }
}
