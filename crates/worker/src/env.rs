//! Who this worker is, read from the environment its agent set.

use std::path::PathBuf;

use hetero_job::JobSpec;
use hetero_job::worker_env::{WorkerEnv, WorkerRole};

use crate::WorkerError;

/// Everything a worker is told at start.
#[derive(Debug, Clone)]
pub struct WorkerSetup {
    /// Coordinator address.
    pub coordinator: String,
    /// Cluster token.
    pub token: String,
    /// Job id (also the data-plane session).
    pub job_id: String,
    /// Rank.
    pub rank: usize,
    /// Ring size.
    pub world: usize,
    /// The job spec.
    pub spec: JobSpec,
    /// Where results go.
    pub output_dir: PathBuf,
    /// Host to bind the data plane on.
    pub data_host: String,
    /// Speed cap of the device, in (0, 1].
    pub speed: f64,
    /// The backend the agent's group runs, if it names one.
    pub backend: Option<String>,
    /// Which device of its group this worker owns (GPUs: one worker per device).
    pub device_index: usize,
    /// Every rank's share of the work (empty: an even split).
    pub weights: Vec<f64>,
    /// A worker of the ring, the job's parameter server (rank `world`), or a
    /// lost rank's replacement joining the running ring.
    pub role: WorkerRole,
    /// Every worker rank's resource group (`node/kind`; empty when not told).
    pub groups: Vec<String>,
}

fn var(name: &str) -> Result<String, WorkerError> {
    std::env::var(name).map_err(|_| {
        WorkerError::Setup(format!(
            "{name} is not set: workers are started by a Hetero agent (run a job with `hetero local` or `hetero submit`)"
        ))
    })
}

fn number(name: &str) -> Result<usize, WorkerError> {
    let v = var(name)?;
    v.parse()
        .map_err(|_| WorkerError::Setup(format!("{name}={v:?} is not a number")))
}

impl WorkerSetup {
    /// Reads the `HETERO_*` variables and the spec file they name.
    pub fn from_env() -> Result<WorkerSetup, WorkerError> {
        let spec_file = var(WorkerEnv::SPEC_FILE)?;
        let text = std::fs::read_to_string(&spec_file)
            .map_err(|e| WorkerError::Setup(format!("cannot read the job spec {spec_file}: {e}")))?;
        let spec = JobSpec::from_json(&text).map_err(|e| WorkerError::Setup(e.to_string()))?;
        let role = match std::env::var(WorkerEnv::ROLE) {
            Err(_) => WorkerRole::Worker,
            Ok(name) => {
                WorkerRole::from_name(&name).map_err(|e| WorkerError::Setup(format!("{}: {e}", WorkerEnv::ROLE)))?
            }
        };
        let setup = WorkerSetup {
            coordinator: var(WorkerEnv::COORDINATOR)?,
            token: var(WorkerEnv::TOKEN)?,
            job_id: var(WorkerEnv::JOB_ID)?,
            rank: number(WorkerEnv::RANK)?,
            world: number(WorkerEnv::WORLD)?,
            spec,
            output_dir: PathBuf::from(var(WorkerEnv::OUTPUT_DIR)?),
            data_host: std::env::var(WorkerEnv::DATA_HOST).unwrap_or_else(|_| "127.0.0.1".into()),
            backend: std::env::var(WorkerEnv::BACKEND).ok().filter(|b| !b.is_empty()),
            weights: match std::env::var(WorkerEnv::WEIGHTS) {
                Err(_) => vec![],
                Ok(v) => v
                    .split(',')
                    .map(|w| w.trim().parse::<f64>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| {
                        WorkerError::Setup(format!("{}={v:?} is not a list of numbers", WorkerEnv::WEIGHTS))
                    })?,
            },
            role,
            groups: std::env::var(WorkerEnv::GROUPS)
                .map(|g| g.split(',').map(str::to_string).collect())
                .unwrap_or_default(),
            device_index: match std::env::var(WorkerEnv::DEVICE_INDEX) {
                Err(_) => 0,
                Ok(_) => number(WorkerEnv::DEVICE_INDEX)?,
            },
            speed: match std::env::var(WorkerEnv::SPEED) {
                Err(_) => 1.0,
                Ok(v) => v.parse::<f64>().ok().filter(|s| *s > 0.0 && *s <= 1.0).ok_or_else(|| {
                    WorkerError::Setup(format!("{}={v:?} is not a speed in (0, 1]", WorkerEnv::SPEED))
                })?,
            },
        };
        if !setup.weights.is_empty() && setup.weights.len() != setup.world {
            return Err(WorkerError::Setup(format!(
                "{} weights for a ring of {}",
                setup.weights.len(),
                setup.world
            )));
        }
        if !setup.groups.is_empty() && setup.groups.len() != setup.world {
            return Err(WorkerError::Setup(format!(
                "{} groups for {} workers",
                setup.groups.len(),
                setup.world
            )));
        }
        if setup.rank >= setup.world + usize::from(setup.role == WorkerRole::ParameterServer) {
            return Err(WorkerError::Setup(format!(
                "rank {} outside a ring of {}",
                setup.rank, setup.world
            )));
        }
        Ok(setup)
    }
}
