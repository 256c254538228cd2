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

/// A loss in two stages: backward from `loss` gives the head's gradients and
/// `leaf`'s; backward from `features` weighted by `leaf`'s gradient then gives
/// the body's. Together they are the gradients of one backward pass.
pub struct Staged<B: AutodiffBackend> {
    /// The body's output, tracked back to its parameters.
    ///
    /// # Shapes
    /// - `[batch, features]`
    pub features: Tensor<B, 2>,
    /// `features` detached and tracked anew: the head's input.
    pub leaf: Tensor<B, 2>,
    /// The batch's mean loss, computed by the head from `leaf`.
    pub loss: Tensor<B, 1>,
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

    /// Scalars at the end of the model's flat parameters that
    /// [`Task::staged_loss`] computes first (`None`, the default: the loss is
    /// one stage). The trainer sends their gradients to the other workers while
    /// it computes the rest, as DDP's buckets do.
    fn head_params(&self, _model: &Self::Model) -> Option<usize> {
        None
    }

    /// [`Task::loss`] in two stages, when [`Task::head_params`] says so: the
    /// loss over a detached copy of the model's features, and the features
    /// themselves. `Err(batch)` gives the batch back for [`Task::loss`].
    fn staged_loss(&self, _model: &Self::Model, batch: Self::Batch) -> Result<Staged<B>, Self::Batch> {
        Err(batch)
    }

    /// Which samples this worker holds when it lacks some (a machine without the
    /// dataset's files), as bits packed 16 to a float
    /// ([`hetero_data::held::HeldImages::presence_words`]); `None`, the default:
    /// it holds every one. Ids are training samples `0..train_len`, then test
    /// samples. Before each step and evaluation of [`crate::Trainer::run`] the
    /// trainer makes sure every worker holds its shard's samples and its part of
    /// the test set, sent by workers that hold them ([`Task::pack_samples`],
    /// [`Task::unpack_samples`]); a caller driving [`crate::Trainer::step`]
    /// itself gives every worker its samples.
    fn presence(&self) -> Option<Vec<f32>> {
        None
    }

    /// A bundle of samples `ids` for a worker that lacks them; the first id this
    /// worker cannot send.
    fn pack_samples(&self, ids: &[usize]) -> Result<Vec<u8>, usize> {
        Err(ids.first().copied().unwrap_or(0))
    }

    /// Takes in a bundle another worker packed; returns how many samples it held.
    fn unpack_samples(&mut self, _bundle: &[u8]) -> Result<usize, String> {
        Err("this task's samples cannot travel between workers".into())
    }
}

/// The task's model, initialised from `seed`.
///
/// burn backends keep one random generator per process: seeding it and drawing
/// the initial weights are two steps, and a second model built in between (another
/// trainer, the parameter-server role, a test running beside this one) would draw
/// from the same stream and give this worker different weights from its peers. A
/// process-wide lock makes seed-then-initialise one step. burn draws a module's
/// weights lazily, on first read, so they are drawn here, inside the lock.
pub fn seeded_model<B: AutodiffBackend, T: Task<B> + ?Sized>(task: &T, device: &B::Device, seed: u64) -> T::Model {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    B::seed(device, seed);
    let model = task.model(device);
    crate::params::materialize(&model);
    model
}
