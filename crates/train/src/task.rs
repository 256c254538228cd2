//! The contract between Hetero and training code.
//!
//! A [`Task`] is what a user already writes for one machine: build a model, turn
//! sample indices into a batch, compute a mean loss. Hetero owns everything around
//! it — which samples each worker sees, the gradient aggregation, the optimiser
//! (`training.optimizer` in the spec), evaluation across workers, progress and the
//! summary — so the same task trains on one worker or many without a change.

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use hetero_job::JobSpec;

/// What a task is told about the run it is part of.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// The validated job spec.
    pub spec: JobSpec,
    /// This worker's rank.
    pub rank: usize,
    /// Number of workers.
    pub world: usize,
}

/// Sums over a set of evaluated samples (summable across workers).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Evaluation {
    /// Sum of per-sample losses.
    pub loss_sum: f64,
    /// Correct predictions.
    pub correct: f64,
    /// Samples evaluated.
    pub count: f64,
}

/// Single-machine training code, run data-parallel by Hetero.
pub trait Task<B: AutodiffBackend> {
    /// The model being trained.
    type Model: AutodiffModule<B>;
    /// A batch ready for the model, on the device.
    type Batch;

    /// Samples in the training set.
    fn train_len(&self) -> usize;
    /// Samples in the test set (0 when there is none).
    fn test_len(&self) -> usize;
    /// A freshly initialised model (burn's RNG is seeded before this is called).
    fn model(&self, device: &B::Device) -> Self::Model;
    /// The training samples at `indices`.
    fn train_batch(&self, indices: &[usize], device: &B::Device) -> Self::Batch;
    /// The test samples at `indices`.
    fn test_batch(&self, indices: &[usize], device: &B::Device) -> Self::Batch;
    /// Mean loss over the batch (a one-element tensor).
    fn loss(&self, model: &Self::Model, batch: Self::Batch) -> Tensor<B, 1>;
    /// Summed loss and accuracy over the batch.
    fn evaluate(&self, model: &Self::Model, batch: Self::Batch) -> Evaluation;
}
