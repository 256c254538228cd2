//! The runtime of one worker process, shared by the built-in `hetero worker` and by
//! every user program that holds its own [`hetero_train::Task`].
//!
//! A worker: reads who it is from the `HETERO_*` environment its agent set
//! ([`env`]), picks its compute device ([`backend`]), binds its data-plane listener,
//! finds its peers through the coordinator ([`rendezvous`]), forms the ring, trains,
//! and prints progress as `@hetero-event` lines that the agent forwards.
//!
//! A user's program is three lines:
//! ```text
//! fn main() -> std::process::ExitCode {
//!     hetero_worker::run(|ctx, _device| MyTask::new(ctx))
//! }
//! ```

pub mod backend;
pub mod builtin;
pub mod distill;
pub mod env;
pub mod fetch_data;
pub mod float_mode;
pub mod memory;
pub mod probe;
pub mod rendezvous;
pub mod travel;
pub mod watchdog;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::time::Duration;

use hetero_comm::server::{ServerClient, accept_clients};
use hetero_comm::{Ring, RingConfig};
use hetero_job::worker_env::{JOB_FATAL_EXIT, WorkerRole};
use hetero_job::{CHECKPOINT_FILE, SPEC_FILE, Strategy};
use hetero_train::checkpoint::Checkpoint;
use hetero_train::param_server::ServerOptions;
use hetero_train::{Event, OptimizerConfig, ServerGroup, Task, TaskContext, TrainOptions, Trainer};

pub use backend::{SystemBackend, SystemDevice};
pub use env::WorkerSetup;
pub use travel::Prepared;

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The environment is not a worker's environment.
    #[error("{0}")]
    Setup(String),
    /// Finding the peers failed.
    #[error("rendezvous: {0}")]
    Rendezvous(String),
    /// The data plane failed.
    #[error("data plane: {0}")]
    Comm(#[from] hetero_comm::CommError),
    /// Training failed.
    #[error("{0}")]
    Train(#[from] hetero_train::TrainError),
    /// The task could not be built.
    #[error("task: {0}")]
    Task(String),
}

/// Prints one progress event for the agent.
pub fn emit(event: &Event) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", event.to_line());
    let _ = out.flush();
}

/// Runs a worker whose task `make_task` builds; returns the process exit code.
pub fn run<T, F>(make_task: F) -> ExitCode
where
    T: Task<SystemBackend>,
    F: FnOnce(&TaskContext, &SystemDevice) -> Result<T, String>,
{
    match try_run(make_task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("worker failed: {e}");
            exit_code(&e)
        }
    }
}

/// The exit status of a worker that failed with `e`: [`JOB_FATAL_EXIT`] when no
/// other worker could get past it either (the job's output cannot be written),
/// so its agent fails the job instead of migrating its samples; 1 otherwise.
pub fn exit_code(e: &WorkerError) -> ExitCode {
    match e {
        WorkerError::Train(hetero_train::TrainError::Output(_)) => ExitCode::from(JOB_FATAL_EXIT),
        _ => ExitCode::FAILURE,
    }
}

/// [`run`], returning the error instead of an exit code.
pub fn try_run<T, F>(make_task: F) -> Result<(), WorkerError>
where
    T: Task<SystemBackend>,
    F: FnOnce(&TaskContext, &SystemDevice) -> Result<T, String>,
{
    try_run_prepared(|ctx, device| make_task(ctx, device).map(Prepared::Ready), None)
}

/// [`try_run`] for a task that a worker on a host without the dataset builds
/// from what another worker read (see [`travel`]): `facts_of` says what a task
/// built from the files tells the others (`None`: its tasks cannot describe
/// their data).
pub fn try_run_prepared<T, F>(make_task: F, facts_of: Option<fn(&T) -> Vec<u8>>) -> Result<(), WorkerError>
where
    T: Task<SystemBackend>,
    F: FnOnce(&TaskContext, &SystemDevice) -> Result<Prepared<T>, String>,
{
    memory::keep_freed_buffers();
    float_mode::flush_subnormals();
    let setup = WorkerSetup::from_env()?;
    end_with_the_agent();
    let chosen = backend::choose(setup.spec.cluster.backend, setup.backend.as_deref()).map_err(WorkerError::Setup)?;
    let (device, backend_name) = backend::device(chosen, setup.device_index).map_err(WorkerError::Setup)?;
    let ctx = TaskContext {
        spec: setup.spec.clone(),
        rank: setup.rank,
        world: setup.world,
    };
    let who = match setup.role {
        WorkerRole::ParameterServer => "parameter server".to_string(),
        WorkerRole::Joining => format!("rank {}/{} (rejoining)", setup.rank, setup.world),
        WorkerRole::Worker => format!("rank {}/{}", setup.rank, setup.world),
    };
    eprintln!(
        "{who} of {} on {backend_name} ({} thread(s))",
        setup.job_id,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into())
    );
    let prepared = make_task(&ctx, &device).map_err(WorkerError::Task)?;

    let listener = TcpListener::bind((setup.data_host.as_str(), 0))
        .map_err(|e| WorkerError::Setup(format!("cannot bind a data-plane port on {}: {e}", setup.data_host)))?;
    let address = listener.local_addr().map_err(|e| WorkerError::Setup(e.to_string()))?;
    let joining = setup.role == WorkerRole::Joining;
    let peers = if joining {
        vec![]
    } else {
        rendezvous::exchange(&setup, address)?
    };
    if setup.role == WorkerRole::ParameterServer {
        return serve_parameters(&setup, prepared.ready("parameter server")?, &device, listener);
    }

    let spec = &setup.spec;
    let mut options = TrainOptions::from_spec(spec);
    options.backend = backend_name.to_string();
    options.speed = setup.speed;
    options.weights = setup.weights.clone();
    options.checkpoint = Some(setup.output_dir.join(CHECKPOINT_FILE));
    if setup.rank == 0 {
        let dir = &setup.output_dir;
        std::fs::create_dir_all(dir)
            .and_then(|_| {
                std::fs::write(
                    dir.join(SPEC_FILE),
                    serde_json::to_string_pretty(spec).expect("a spec serialises"),
                )
            })
            .map_err(|e| WorkerError::Setup(format!("cannot write the spec into {}: {e}", dir.display())))?;
    }
    if let Some(path) = &options.resume {
        eprintln!("resuming from {}", path.display());
    }
    let unscored: Vec<usize> = (0..options.weights.len())
        .filter(|&r| !(options.weights[r].is_finite() && options.weights[r] > 0.0))
        .collect();
    if !unscored.is_empty() {
        eprintln!(
            "weighted split: rank(s) {unscored:?} have no compute score (no measured GFLOP/s nor an operator's \
             score), so the run starts from an even split; the first steps measure every worker on this job's \
             model and set the split"
        );
    } else if !options.weights.is_empty() {
        eprintln!(
            "weighted split: compute scores {:?} as the starting guess; the first steps measure every worker on \
             this job's model and set the split",
            options.weights
        );
    }
    match std::env::var(hetero_job::WorkerEnv::THROTTLE) {
        Ok(how) => eprintln!("slowed to emulate a slower device by {how}"),
        Err(_) if setup.speed < 1.0 => eprintln!(
            "speed cap {}: this worker idles to emulate a slower device",
            setup.speed
        ),
        Err(_) => {}
    }
    let membership = Box::new(rendezvous::CoordinatorMembership::new(
        setup.clone(),
        listener
            .try_clone()
            .map_err(|e| WorkerError::Setup(format!("cannot share the data-plane listener: {e}")))?,
    ));
    let mut trainer = if joining {
        let task = prepared.ready("worker rejoining a running job")?;
        let (regroup, generation) = rendezvous::join(&setup, &listener)?;
        Trainer::joining(task, device, regroup, generation, options)?
    } else if spec.training.strategy.uses_parameter_server() {
        let task = prepared.ready("worker of a parameter server's group")?;
        server_trainer(&setup, task, device, listener, &peers, options)?
    } else {
        let config = RingConfig::new(setup.rank, setup.world, setup.job_id.clone(), setup.token.clone());
        let mut ring = Ring::form(config, listener, &peers)?;
        eprintln!("ring formed: {} worker(s)", setup.world);
        let task = match prepared {
            Prepared::Ready(task) => {
                let describe = facts_of.map(|f| {
                    let task = &task;
                    move || f(task)
                });
                travel::exchange_facts(&mut ring, describe.as_ref().map(|d| d as &dyn Fn() -> Vec<u8>), false)?;
                task
            }
            Prepared::FromPeers(build) => {
                let facts = travel::exchange_facts(&mut ring, None, true)?.unwrap_or_default();
                build(&facts).map_err(|e| WorkerError::Task(format!("the dataset's facts from another worker: {e}")))?
            }
        };
        Trainer::new(task, device, ring, options)?
    }
    .with_membership(membership);
    // Epoch events are the same on every rank; one worker speaks for the job: the
    // first member of the ring that has been in it from the start (rank 0 until it
    // is lost; a rejoined worker never takes over, it joined a run in progress).
    let mut speaker = Speaker::new(setup.world);
    watchdog::arm(Duration::from_secs(spec.training.stall_after_secs));
    let summary = trainer.run(&mut |e| {
        speaker.follow(&e);
        if speaker.is(setup.rank) || matches!(e, Event::Step { .. }) {
            emit(&e)
        }
    })?;
    if speaker.is(setup.rank) {
        let dir = &setup.output_dir;
        let title = format!("{}: training loss ({} workers)", setup.spec.name, setup.world);
        // The coordinator keeps the summary even if the files below cannot be written.
        emit(&Event::Done {
            summary: Box::new(summary.clone()),
        });
        std::fs::create_dir_all(dir)
            .and_then(|_| {
                std::fs::write(
                    dir.join("summary.json"),
                    serde_json::to_string_pretty(&summary).expect("summary serialises"),
                )
            })
            .and_then(|_| {
                std::fs::write(
                    dir.join("loss.svg"),
                    hetero_train::report::loss_curve_svg(&summary.loss_curve, &title),
                )
            })
            .map_err(|e| {
                hetero_train::TrainError::Output(format!("cannot write results into {}: {e}", dir.display()))
            })?;
    }
    Ok(())
}

/// Which worker speaks for the job: the first member of the ring that was in it
/// from the start.
struct Speaker {
    members: Vec<usize>,
    rejoined: Vec<usize>,
}

impl Speaker {
    fn new(world: usize) -> Self {
        Speaker {
            members: (0..world).collect(),
            rejoined: vec![],
        }
    }

    fn follow(&mut self, e: &Event) {
        match e {
            Event::Migrated { members, .. } if !members.is_empty() => self.members = members.clone(),
            Event::Rejoined { members, joined, .. } => {
                self.members = members.clone();
                self.rejoined.extend(joined);
            }
            _ => {}
        }
    }

    fn is(&self, rank: usize) -> bool {
        self.members.iter().find(|r| !self.rejoined.contains(r)) == Some(&rank)
    }
}

/// A worker ends with its agent: an agent killed outright cannot stop its workers,
/// so each watches its parent and exits when it is gone (the process was handed to
/// another parent). Without this, an orphan would train on in a ring the cluster
/// has already given up on.
pub fn end_with_the_agent() {
    #[cfg(unix)]
    {
        let parent = std::os::unix::process::parent_id();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(250));
                if std::os::unix::process::parent_id() != parent {
                    // The agent held the other end of stderr: `eprintln!` would
                    // panic on the broken pipe and leave the worker running.
                    use std::io::Write;
                    let _ = writeln!(
                        std::io::stderr(),
                        "the agent that started this worker is gone; stopping"
                    );
                    std::process::exit(3);
                }
            }
        });
    }
}

fn staleness(strategy: Strategy) -> Option<usize> {
    match strategy {
        Strategy::ParameterServer { staleness } if staleness > 0 => Some(staleness),
        _ => None,
    }
}

/// A worker of a parameter-server job: a ring over its group, and (for the group's
/// first member) a connection to the server, whose address is the last of `peers`.
fn server_trainer<T: Task<SystemBackend>>(
    setup: &WorkerSetup,
    task: T,
    device: SystemDevice,
    listener: TcpListener,
    peers: &[SocketAddr],
    options: TrainOptions,
) -> Result<Trainer<SystemBackend, T>, WorkerError> {
    let world = setup.world;
    if peers.len() != world + 1 {
        return Err(WorkerError::Rendezvous(format!(
            "{} addresses for {world} workers and their parameter server",
            peers.len()
        )));
    }
    let groups = hetero_job::topology::group_keys(setup.spec.training.strategy, &setup.groups, world);
    let mine = &groups[setup.rank];
    let group: Vec<usize> = (0..world).filter(|&r| &groups[r] == mine).collect();
    let position = group
        .iter()
        .position(|&r| r == setup.rank)
        .expect("a worker is in its own group");
    let group_peers: Vec<SocketAddr> = group.iter().map(|&r| peers[r]).collect();
    let session = format!("{}/{mine}", setup.job_id);
    let ring = Ring::form(
        RingConfig::new(position, group.len(), session, setup.token.clone()),
        listener,
        &group_peers,
    )?;
    let client = if position == 0 {
        let client = ServerClient::connect(
            peers[world],
            &setup.job_id,
            &setup.token,
            setup.rank as u32,
            Duration::from_secs(120),
        )?;
        eprintln!(
            "group {mine}: rank(s) {group:?} reduce together; rank {} leads it to the parameter server at {}",
            setup.rank, peers[world]
        );
        Some(client)
    } else {
        None
    };
    let server = ServerGroup {
        client,
        staleness: staleness(setup.spec.training.strategy),
        rank: setup.rank,
        world,
        group,
    };
    Ok(Trainer::with_server(task, device, ring, server, options)?)
}

/// The parameter-server role: the global model (initialised as every worker would
/// initialise it) and its optimiser, serving one client per aggregation group.
fn serve_parameters<T: Task<SystemBackend>>(
    setup: &WorkerSetup,
    task: T,
    device: &SystemDevice,
    listener: TcpListener,
) -> Result<(), WorkerError> {
    let spec = &setup.spec;
    let mut params = hetero_train::params::flatten(&hetero_train::seeded_model(&task, device, spec.training.seed));
    let mut state = None;
    if let Some(path) = &spec.training.resume_from {
        let c = Checkpoint::load_for(path, params.len())?;
        eprintln!("parameter server resumes from {} (epoch {})", path.display(), c.epoch);
        params = c.params;
        state = c
            .optimizer
            .filter(|o| o.moment_1.len() == params.len() || o.moment_1.is_empty());
    }
    let groups = hetero_job::topology::groups(spec.training.strategy, &setup.groups, setup.world);
    let staleness = staleness(spec.training.strategy);
    eprintln!(
        "parameter server for {} client(s), {} parameters, {}",
        groups.len(),
        params.len(),
        match staleness {
            None => "synchronous".to_string(),
            Some(s) => format!("asynchronous, staleness ≤ {s}"),
        }
    );
    let channels = accept_clients(
        &listener,
        groups.len(),
        &setup.job_id,
        &setup.token,
        Duration::from_secs(300),
    )?;
    let options = ServerOptions {
        staleness,
        optimizer: OptimizerConfig {
            kind: spec.training.optimizer,
            learning_rate: spec.training.learning_rate,
        },
    };
    let report = hetero_train::param_server::serve(channels, params, state, options)?;
    eprintln!(
        "parameter server done: {} optimiser steps from {} pushes (widest lead {})",
        report.steps, report.pushes, report.widest_gap
    );
    Ok(())
}
