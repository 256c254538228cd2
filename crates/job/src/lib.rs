//! Hetero job specs: the TOML file a user submits, parsed and validated before
//! anything runs.
//!
//! Validation is strict and specific: an unknown key, a value of the wrong type, a
//! value outside what is allowed — each is its own [`SpecError`] naming the key, the
//! value and what would be accepted. `docs/job-spec.md` documents every key; the
//! tests in [`spec`] hold one bad spec per error.
//!
//! It also holds the contract between a worker and the control plane, so that
//! neither links the other: [`worker_env`] (the environment an agent starts a
//! worker with, its role, its exit statuses) and [`events`] (the progress events
//! and run summary a worker prints), and [`cache_space`] (how the data cache an
//! agent gives its workers is marked and kept within its size).

pub mod cache_space;
pub mod error;
pub mod events;
mod section;
pub mod spec;
pub mod topology;
pub mod transformer;
pub mod worker_env;

pub use error::SpecError;

/// The checkpoint's file name in a job's output folder (next to `summary.json`).
pub const CHECKPOINT_FILE: &str = "checkpoint.bin";
/// The job's spec as JSON, written into its output folder when it starts, so a
/// checkpoint there can be read without the TOML it came from (`hetero export`).
pub const SPEC_FILE: &str = "spec.json";
pub use spec::{
    Backend, ClusterSpec, DATASET_KINDS, DatasetSpec, ExchangePrecision, InferenceSpec, JobSpec, ModelKind,
    NormalizeSpec, Optimizer, Policy, PreprocessSpec, SchedulingSpec, SplitKind, Strategy, TaskSpec, TrainingSpec,
};
pub use transformer::{DecoupleSpec, DistillSpec, SubBlockVariant, TransformerSpec};
pub use worker_env::{WorkerEnv, WorkerRole};
