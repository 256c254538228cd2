//! What a training run tells the world: progress events while it runs, and a
//! machine-readable summary at the end.

use serde::{Deserialize, Serialize};

/// Progress of a run, emitted by every worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A training step finished.
    Step {
        /// Epoch, from 0.
        epoch: usize,
        /// Step within the epoch, from 0.
        step: usize,
        /// Steps per epoch.
        steps: usize,
        /// Mean loss of the global batch.
        loss: f32,
        /// This worker's samples per second (recent).
        samples_per_sec: f64,
    },
    /// An epoch finished and was evaluated.
    Epoch {
        /// Epoch, from 0.
        epoch: usize,
        /// Mean training loss over the epoch.
        train_loss: f64,
        /// Test accuracy in [0, 1] (absent without a test set).
        test_accuracy: Option<f64>,
        /// Mean test loss.
        test_loss: Option<f64>,
        /// Seconds since training started.
        elapsed_secs: f64,
    },
    /// The run finished; only rank 0 carries the summary.
    Done {
        /// The summary.
        summary: Box<RunSummary>,
    },
}

/// One worker's share of the work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerFigures {
    /// Rank.
    pub rank: usize,
    /// Training samples processed.
    pub samples: u64,
    /// Seconds spent computing (forward, backward, optimiser, batching).
    pub compute_secs: f64,
    /// Seconds spent in collectives (includes waiting for slower workers).
    pub comm_secs: f64,
    /// Samples per second of wall time.
    pub samples_per_sec: f64,
}

/// The machine-readable result of a run (`summary.json` in the job's folder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Workers in the ring.
    pub workers: usize,
    /// Backend the workers ran on.
    pub backend: String,
    /// Epochs trained.
    pub epochs: usize,
    /// Global batch size.
    pub global_batch_size: usize,
    /// Test accuracy after the last epoch, in [0, 1].
    pub test_accuracy: Option<f64>,
    /// Mean test loss after the last epoch.
    pub test_loss: Option<f64>,
    /// Mean training loss of the first and the last epoch.
    pub first_epoch_loss: f64,
    /// Mean training loss of the last epoch.
    pub last_epoch_loss: f64,
    /// Training samples per second, all workers together.
    pub samples_per_sec: f64,
    /// Seconds from the first step to the end of the last evaluation.
    pub wall_secs: f64,
    /// Per-epoch history: (train loss, test accuracy, elapsed seconds).
    pub history: Vec<EpochRecord>,
    /// Each worker's figures.
    pub per_worker: Vec<WorkerFigures>,
}

/// One epoch in the summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch, from 0.
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Test accuracy.
    pub test_accuracy: Option<f64>,
    /// Seconds since training started.
    pub elapsed_secs: f64,
}
