//! Why training stopped.

/// A training run failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The data plane failed (a peer died, a wrong token, a corrupt frame).
    #[error("data plane: {0}")]
    Comm(#[from] hetero_comm::CommError),
    /// The data set could not be read.
    #[error("data: {0}")]
    Data(#[from] hetero_data::DataError),
    /// The job cannot run as configured.
    #[error("{0}")]
    Config(String),
    /// The job's output (a checkpoint, the run summary) cannot be written: the job
    /// cannot go on, whichever worker takes over (a full or read-only disk).
    #[error("output: {0}")]
    Output(String),
    /// The user's task reported an error.
    #[error("task: {0}")]
    Task(String),
}
