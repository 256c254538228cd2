//! Which CPU backend trains a job fastest on this machine, measured.
//!
//! `auto` is resolved here when the embedded cluster starts (`hetero local`): every
//! CPU backend this build drives runs a few forward and backward passes of the
//! job's own model, on the job's data, at its per-worker batch size, and the one
//! with the most samples per second wins. A matmul's GFLOP/s would be a poor proxy:
//! a convolutional model spends its time in kernels a matmul never touches. Jobs
//! whose model Hetero cannot build itself (a `[task]` program, inference) are
//! ranked by matmul throughput instead.

use std::time::{Duration, Instant};

use hetero_job::{Backend, JobSpec, ModelKind};
use hetero_models::{CnnConfig, MlpConfig};
use hetero_train::image_task::ImageTask;
use hetero_train::text_task::TextTask;
use hetero_train::{Task, seeded_model};

use crate::backend::{compiled, device, measure_gflops};
use crate::{SystemBackend, SystemDevice};

/// How a backend was measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Measure {
    /// Training samples per second on the job's model.
    SamplesPerSecond(f64),
    /// Matmul GFLOP/s (the job's model is not one Hetero builds).
    Gflops(f64),
}

impl Measure {
    fn value(self) -> f64 {
        match self {
            Measure::SamplesPerSecond(v) | Measure::Gflops(v) => v,
        }
    }
}

impl std::fmt::Display for Measure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Measure::SamplesPerSecond(v) => write!(f, "{v:.0} samples/s"),
            Measure::Gflops(v) => write!(f, "{v:.0} GFLOP/s"),
        }
    }
}

/// Every CPU backend this build drives with its measure for `spec`, fastest first.
/// A backend whose measurement fails is left out (with the reason in the error
/// list), so one broken backend never stops the job. The job's data is read once.
pub fn rank_cpu_backends(spec: &JobSpec) -> (Vec<(Backend, Measure)>, Vec<String>) {
    let backends: Vec<Backend> = compiled().into_iter().filter(|b| !b.is_gpu()).collect();
    let batch = (spec.training.global_batch_size / spec.cluster.workers.max(1)).max(1);
    let builtin = spec.task.is_none() && spec.inference.is_none();
    let measured: Vec<(Backend, Result<Measure, String>)> = match spec.model {
        ModelKind::Cnn if builtin => each(&backends, image_task(spec, |d| CnnConfig::new().init(d)), batch),
        ModelKind::Mlp if builtin => each(&backends, image_task(spec, |d| MlpConfig::new().init(d)), batch),
        ModelKind::Transformer if builtin => {
            each(&backends, TextTask::from_spec(spec).map_err(|e| e.to_string()), batch)
        }
        _ => backends
            .iter()
            .map(|&b| (b, Ok(Measure::Gflops(measure_gflops(b) as f64))))
            .collect(),
    };
    let mut ranked = Vec::new();
    let mut errors = Vec::new();
    for (backend, m) in measured {
        match m {
            Ok(m) => ranked.push((backend, m)),
            Err(e) => errors.push(format!("{}: {e}", backend.name())),
        }
    }
    ranked.sort_by(|a, b| b.1.value().total_cmp(&a.1.value()));
    (ranked, errors)
}

/// `task`'s training rate on each of `backends` (or, for all, why there is none).
fn each<T: Task<SystemBackend>>(
    backends: &[Backend],
    task: Result<T, String>,
    batch: usize,
) -> Vec<(Backend, Result<Measure, String>)> {
    backends
        .iter()
        .map(|&b| {
            let rate = task.as_ref().map_err(Clone::clone).and_then(|task| {
                let (device, _) = device(b, 0)?;
                Ok(Measure::SamplesPerSecond(training_rate(task, &device, batch)))
            });
            (b, rate)
        })
        .collect()
}

/// One line for the user: which backend `auto` took, and why.
pub fn describe(ranked: &[(Backend, Measure)]) -> String {
    let each: Vec<String> = ranked.iter().map(|(b, m)| format!("{} {m}", b.name())).collect();
    match ranked.first() {
        Some((best, Measure::SamplesPerSecond(_))) => format!(
            "backend auto → {}: fastest on this job's model here ({})",
            best.name(),
            each.join(", ")
        ),
        Some((best, Measure::Gflops(_))) => {
            format!(
                "backend auto → {}: fastest matmul here ({})",
                best.name(),
                each.join(", ")
            )
        }
        None => "backend auto → flex".into(),
    }
}

fn image_task<M: burn::module::AutodiffModule<SystemBackend> + hetero_models::Classifier<SystemBackend>>(
    spec: &JobSpec,
    init: impl Fn(&SystemDevice) -> M + Send + 'static,
) -> Result<ImageTask<SystemBackend, M>, String> {
    ImageTask::from_spec(spec, init).map_err(|e| e.to_string())
}

/// Samples per second of forward and backward passes of `task`'s model on
/// `device`: one warm-up step, then at least three timed steps and up to a second.
fn training_rate<T: Task<SystemBackend>>(task: &T, device: &SystemDevice, batch: usize) -> f64 {
    let model = seeded_model(task, device, 0);
    let len = task.train_len().max(1);
    let step = |s: usize| {
        let indices: Vec<usize> = (0..batch).map(|i| (s * batch + i) % len).collect();
        let loss = task.loss(&model, task.train_batch(&indices, device));
        let _gradients = loss.backward();
    };
    step(0);
    let started = Instant::now();
    let mut steps = 0;
    while steps < 3 || (started.elapsed() < Duration::from_secs(1) && steps < 50) {
        step(steps + 1);
        steps += 1;
    }
    (steps * batch) as f64 / started.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(model: &str) -> JobSpec {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let text = std::fs::read_to_string(root.join("examples/fashion-mnist.toml")).unwrap();
        let text = text.replace("kind = \"cnn\"", &format!("kind = \"{model}\""));
        let mut spec = JobSpec::parse(&text).unwrap();
        spec.dataset.path = root.join("data/fashion-mnist-subset");
        spec
    }

    #[test]
    fn every_cpu_backend_is_measured_on_the_jobs_model_fastest_first() {
        let (ranked, errors) = rank_cpu_backends(&spec("mlp"));
        assert!(errors.is_empty(), "{errors:?}");
        let names: Vec<_> = ranked.iter().map(|(b, _)| *b).collect();
        assert!(
            names.contains(&Backend::Flex) && names.contains(&Backend::Ndarray),
            "{names:?}"
        );
        for (b, m) in &ranked {
            assert!(matches!(m, Measure::SamplesPerSecond(v) if *v > 0.0), "{b:?}: {m:?}");
        }
        assert!(
            ranked.windows(2).all(|w| w[0].1.value() >= w[1].1.value()),
            "{ranked:?}"
        );
        let line = describe(&ranked);
        assert!(
            line.starts_with(&format!(
                "backend auto → {}: fastest on this job's model",
                ranked[0].0.name()
            )),
            "{line}"
        );
    }

    #[test]
    fn a_job_whose_data_cannot_be_read_is_reported_per_backend() {
        let mut spec = spec("mlp");
        spec.dataset.path = std::path::PathBuf::from("/nonexistent/fashion");
        let (ranked, errors) = rank_cpu_backends(&spec);
        assert!(ranked.is_empty(), "{ranked:?}");
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("flex: ") && e.contains("/nonexistent/fashion")),
            "{errors:?}"
        );
    }
}
