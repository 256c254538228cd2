//! Data-parallel training on a ring of workers, and the [`Task`] trait through which
//! a user's ordinary single-machine training code runs distributed unchanged.
//!
//! Reading order:
//! - [`task`]: what Hetero needs from training code (model, data, loss, optimiser);
//! - [`image_task`]: the built-in image task (Fashion-MNIST, CSV or image folders with
//!   the classifiers of `hetero-models`);
//! - [`text_task`]: the built-in text task (a small transformer language model);
//! - [`params`]: flattening parameters and gradients into one buffer for collectives;
//! - [`optim`]: the optimiser, run by Hetero on flat buffers (so its state can be
//!   checkpointed, handed over and held by a parameter server);
//! - [`membership`]: how a run regroups when a worker is lost or comes back;
//! - [`checkpoint`]: the training state in one self-checking file;
//! - [`param_server`]: the parameter server's aggregation (synchronous or with
//!   bounded staleness);
//! - [`trainer`]: one data-parallel step and the epoch loop, with progress events;
//!   the strategies as aggregations, recovery and rejoining, the run's state;
//! - [`report`]: the events and the run summary a worker emits.
//!
//! **Invariant:** this crate never talks to the control plane; it sees only a
//! [`hetero_comm::Ring`] and reports through a callback.

pub mod checkpoint;
pub mod decoder_distill_task;
pub mod distill_task;
pub mod error;
pub mod image_task;
pub mod membership;
pub mod optim;
pub mod param_server;
pub mod params;
pub mod report;
pub mod task;
pub mod text_task;
pub mod trainer;

pub use error::TrainError;
pub use membership::{FixedMembership, Membership, Regroup};
pub use optim::{FlatOptimizer, OptimizerConfig, OptimizerState};
pub use report::{Coverage, Event, RunSummary, WorkerFigures};
pub use task::{Evaluation, Staged, Task, TaskContext, seeded_model};
pub use trainer::{ServerGroup, Throttle, TrainOptions, Trainer, compute_threads, train};
