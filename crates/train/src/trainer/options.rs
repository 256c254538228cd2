//! How to train: the options a [`super::Trainer`] runs with, built from a job's
//! spec in one place ([`TrainOptions::from_spec`]).

use std::path::PathBuf;
use std::time::Duration;

use hetero_comm::Precision;
use hetero_data::shard::Split;
use hetero_job::{ExchangePrecision, JobSpec, Strategy};

use crate::optim::OptimizerConfig;

/// How to train.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Passes over the training set.
    pub epochs: usize,
    /// Samples per step over all workers.
    pub global_batch: usize,
    /// Seed for initialisation and data order.
    pub seed: u64,
    /// Samples per evaluation batch.
    pub eval_batch: usize,
    /// Name of the backend, for the summary.
    pub backend: String,
    /// Least time between two step events.
    pub event_interval: Duration,
    /// Each worker's share of the work (its compute score); empty: an even split.
    pub weights: Vec<f64>,
    /// Speed cap in (0, 1]: after computing, a worker idles so that its steps take
    /// `1 / speed` times as long — a documented knob to emulate a slower device
    /// (see `super::Throttle`).
    pub speed: f64,
    /// The optimiser.
    pub optimizer: OptimizerConfig,
    /// The strategy the job asked for, as the summary and checkpoints name it.
    /// The trainer turns it into its aggregation once, when it is built
    /// (`super::aggregate`); a parameter-server strategy needs
    /// `super::Trainer::with_server`.
    pub strategy: Strategy,
    /// How the floats of an allreduce or a local-SGD average travel.
    pub precision: Precision,
    /// Share of each shard passed to the ring neighbour after every epoch.
    pub exchange_fraction: f64,
    /// Re-split between epochs when measured throughput drifts from the split.
    pub rebalance: bool,
    /// Set the split from the throughput every worker measures in the first
    /// steps of the run, at its own local batch (a weighted job: compute scores
    /// are only the starting guess).
    pub measure_split: bool,
    /// Exchange while computing: with allreduce, the head's gradients while the
    /// body's are computed, when the task's loss comes in two stages
    /// ([`crate::Task::staged_loss`]); with local SGD, each average while the
    /// next `sync_every / 2` steps compute (at least one; as many steps of
    /// staleness).
    pub overlap: bool,
    /// Where the lowest-ranked worker saves checkpoints (`None`: nowhere).
    pub checkpoint: Option<PathBuf>,
    /// Save a checkpoint every N epochs (and after the last; 0: never).
    pub checkpoint_every: usize,
    /// Start from this checkpoint.
    pub resume: Option<PathBuf>,
}

impl TrainOptions {
    /// Options with Adam at 1e-3, allreduce, the usual evaluation batch and event rate.
    pub fn new(epochs: usize, global_batch: usize, seed: u64) -> Self {
        TrainOptions {
            epochs,
            global_batch,
            seed,
            eval_batch: 500,
            backend: "flex".into(),
            event_interval: Duration::from_millis(500),
            speed: 1.0,
            weights: vec![],
            optimizer: OptimizerConfig {
                kind: hetero_job::Optimizer::Adam,
                learning_rate: 1e-3,
            },
            strategy: Strategy::Allreduce,
            precision: Precision::F32,
            exchange_fraction: 0.0,
            rebalance: false,
            measure_split: false,
            overlap: true,
            checkpoint: None,
            checkpoint_every: 1,
            resume: None,
        }
    }

    /// Everything a job's spec says about training. What the spec cannot know
    /// (the backend's name, this worker's speed cap and share, where its output
    /// folder is) stays at its default for the caller to set.
    pub fn from_spec(spec: &JobSpec) -> Self {
        let t = &spec.training;
        let mut o =
            TrainOptions::new(t.epochs, t.global_batch_size, t.seed).with_optimizer(t.optimizer, t.learning_rate);
        o.strategy = t.strategy;
        o.precision = match t.exchange_precision {
            ExchangePrecision::F32 => Precision::F32,
            ExchangePrecision::Bf16 => Precision::Bf16,
        };
        o.exchange_fraction = spec.dataset.exchange_fraction;
        o.rebalance = spec.dataset.rebalance;
        o.measure_split = spec.dataset.split == hetero_job::SplitKind::Weighted;
        o.overlap = t.overlap;
        o.checkpoint_every = t.checkpoint_every;
        o.resume = t.resume_from.clone();
        o
    }

    /// These options with `optimizer` at `learning_rate`.
    pub fn with_optimizer(mut self, kind: hetero_job::Optimizer, learning_rate: f64) -> Self {
        self.optimizer = OptimizerConfig { kind, learning_rate };
        self
    }

    /// The split `weights` ask for over `world` workers (even when they are not
    /// one per worker).
    pub(crate) fn split(&self, weights: &[f64], world: usize) -> Split {
        if weights.len() == world {
            Split::weighted(weights)
        } else {
            Split::even(world)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_sets_every_training_option_it_names() {
        let spec = JobSpec::parse(
            r#"
name = "options"
[model]
kind = "mlp"
[dataset]
path = "data"
train_limit = 100
exchange_fraction = 0.2
rebalance = true
[training]
epochs = 3
global_batch_size = 24
optimizer = "sgd"
learning_rate = 0.05
seed = 11
strategy = "local-sgd"
sync_every = 3
checkpoint_every = 2
[cluster]
workers = 2
"#,
        )
        .unwrap();
        let o = TrainOptions::from_spec(&spec);
        assert_eq!(o.epochs, spec.training.epochs);
        assert_eq!(o.global_batch, spec.training.global_batch_size);
        assert_eq!(o.seed, spec.training.seed);
        assert_eq!(o.optimizer.kind, spec.training.optimizer);
        assert_eq!(o.optimizer.learning_rate, spec.training.learning_rate);
        assert_eq!(o.strategy, Strategy::LocalSgd { sync_every: 3 });
        assert_eq!(o.checkpoint_every, 2);
        assert_eq!(o.exchange_fraction, 0.2);
        assert!(o.rebalance);
    }
}
