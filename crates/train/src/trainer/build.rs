//! Building a trainer: a worker of a ring, of a parameter server's group, or one
//! joining a run in progress — each agreeing on the starting model first.

use std::time::{Duration, Instant};

use burn::tensor::backend::AutodiffBackend;
use hetero_comm::Ring;
use hetero_comm::server::ServerClient;
use hetero_data::assign::Assignment;

use super::aggregate::{self, Aggregate, Flat, ThroughServer};
use super::meter::Meter;
use super::run_state::RunState;
use super::samples::Moved;
use super::{Local, TrainOptions, Trainer};
use crate::checkpoint::Checkpoint;
use crate::membership::{FixedMembership, Regroup};
use crate::optim::FlatOptimizer;
use crate::{Task, TrainError, params, seeded_model};

/// A worker of a parameter-server or hierarchical job: its ring holds its group,
/// whose first member speaks to the server for the group.
pub struct ServerGroup {
    /// The connection to the server (the group's first member only).
    pub client: Option<ServerClient>,
    /// `None`: the server aggregates synchronously; `Some(s)`: asynchronously with
    /// staleness bound `s`.
    pub staleness: Option<usize>,
    /// This worker's rank among all workers.
    pub rank: usize,
    /// Number of workers.
    pub world: usize,
    /// The ranks (among all workers) of this worker's group, in ring order.
    pub group: Vec<usize>,
}

impl<B: AutodiffBackend, T: Task<B>> Trainer<B, T> {
    /// Seeds burn, builds the model and adopts rank 0's parameters; `ring` holds
    /// every worker, which combine their work as `options.strategy` says (a ring
    /// strategy: allreduce or local-sgd).
    pub fn new(task: T, device: B::Device, ring: Ring, options: TrainOptions) -> Result<Self, TrainError> {
        let aggregate = aggregate::on_ring(options.strategy, options.precision, options.overlap)?;
        let (rank, world) = (ring.rank(), ring.world());
        Self::start(task, device, ring, aggregate, None, (rank, world), options)
    }

    /// Like [`Trainer::new`] for a worker of a parameter-server or hierarchical
    /// job; every worker starts from the server's model.
    pub fn with_server(
        task: T,
        device: B::Device,
        ring: Ring,
        server: ServerGroup,
        options: TrainOptions,
    ) -> Result<Self, TrainError> {
        if !options.strategy.uses_parameter_server() {
            return Err(TrainError::Config(format!(
                "strategy {} has no parameter server",
                options.strategy.name()
            )));
        }
        if server.group.len() != ring.world() {
            return Err(TrainError::Config(format!(
                "a group of {} workers on a ring of {}",
                server.group.len(),
                ring.world()
            )));
        }
        let ServerGroup {
            mut client,
            staleness,
            rank,
            world,
            group,
        } = server;
        let global = client.as_mut().map(|c| c.pull()).transpose()?;
        let aggregate = Box::new(ThroughServer {
            client,
            staleness,
            group,
        });
        Self::start(task, device, ring, aggregate, global, (rank, world), options)
    }

    /// Builds the model, agrees on the starting parameters (the server's
    /// `global` model, else rank 0's) and, resuming, reads the checkpoint.
    fn start(
        task: T,
        device: B::Device,
        mut ring: Ring,
        aggregate: Box<dyn Aggregate>,
        global: Option<Vec<f32>>,
        (rank, world): (usize, usize),
        options: TrainOptions,
    ) -> Result<Self, TrainError> {
        if options.global_batch < world {
            return Err(TrainError::Config(format!(
                "global batch {} is smaller than the {world} workers",
                options.global_batch
            )));
        }
        let model = seeded_model(&task, &device, options.seed);
        let started = Instant::now();
        let mut flat = params::flatten(&model);
        // One worker has no one to agree with: its own initial model is the global
        // one (and reloading it would only cost time).
        let reload = ring.world() > 1 || global.is_some();
        if let Some(global) = global {
            if global.len() != flat.len() {
                return Err(TrainError::Config(format!(
                    "the parameter server holds {} parameters, this worker's model has {}",
                    global.len(),
                    flat.len()
                )));
            }
            flat = global;
        }
        if ring.world() > 1 {
            ring.broadcast(&mut flat, 0)?;
        }
        let mut model = if reload { params::load(model, &flat) } else { model };
        let comm = started.elapsed();
        let mut optimizer = FlatOptimizer::new(options.optimizer, flat.len());
        let mut run = RunState::start(task.train_len(), &options, world);
        if let Some(path) = &options.resume {
            // Every worker reads the checkpoint itself, so a damaged one fails every
            // worker with the same message before any of them trains.
            let c = Checkpoint::load_for(path, flat.len())?;
            // With a parameter server, the server resumes the model and its optimiser.
            if aggregate.holds_optimizer() {
                flat = c.params;
                if let Some(state) = c.optimizer
                    && state.moment_1.len() == optimizer.state().moment_1.len()
                {
                    optimizer.restore(state).map_err(TrainError::Config)?;
                }
                model = params::load(model, &flat);
            }
            run.epoch = c.epoch;
            run.history = c.history;
            run.resumed_at = Some(c.epoch);
        }
        let mut meter = Meter::new(options.speed);
        meter.add(Duration::ZERO, comm);
        Ok(Trainer {
            local: Local {
                head: task.head_params(&model).filter(|_| options.overlap),
                task,
                model: Some(model),
                device,
            },
            flat: Flat {
                params: flat,
                optimizer,
            },
            aggregate,
            ring: Some(ring),
            membership: Box::new(FixedMembership),
            rank,
            generation: 0,
            options,
            meter,
            moved: Moved::default(),
            samples_due: true,
            pending_events: vec![],
            warmed: None,
            pace_mark: Default::default(),
            pace_every: super::elastic::PACE_STEPS,
            all_hold_everything: false,
            run,
            pending: None,
            joining: false,
        })
    }

    /// A worker that joins a running job (a lost rank whose node came back) on
    /// `regroup`'s ring, formed at `generation`: at the start of [`Trainer::run`] it
    /// adopts the others' model, optimiser, position and history, then trains on.
    pub fn joining(
        task: T,
        device: B::Device,
        regroup: Regroup,
        generation: u64,
        options: TrainOptions,
    ) -> Result<Self, TrainError> {
        // A ring that admits joiners is an allreduce ring, whatever the job began as.
        let aggregate = if options.strategy.uses_parameter_server() {
            aggregate::on_ring(hetero_job::Strategy::Allreduce, hetero_comm::Precision::F32, false)?
        } else {
            aggregate::on_ring(options.strategy, options.precision, options.overlap)?
        };
        let model = seeded_model(&task, &device, options.seed);
        let params = params::flatten(&model);
        let optimizer = FlatOptimizer::new(options.optimizer, params.len());
        let mut run = RunState::start(task.train_len(), &options, regroup.members.len());
        run.members = regroup.members.clone();
        Ok(Trainer {
            local: Local {
                head: task.head_params(&model).filter(|_| options.overlap),
                task,
                model: Some(model),
                device,
            },
            flat: Flat { params, optimizer },
            aggregate,
            ring: None,
            membership: Box::new(FixedMembership),
            rank: regroup.ring.rank(),
            generation,
            meter: Meter::new(options.speed),
            moved: Moved::default(),
            samples_due: true,
            pending_events: vec![],
            warmed: None,
            pace_mark: Default::default(),
            pace_every: super::elastic::PACE_STEPS,
            all_hold_everything: false,
            options,
            run,
            pending: Some(regroup),
            joining: true,
        })
    }
}

/// The least and most steps after which a weighted run first measures its
/// workers' throughput: a fifth of the first epoch, within these bounds (an epoch
/// shorter than the least is measured at its end, when another epoch follows; a
/// run of one such epoch keeps its scores).
pub(super) const MEASURE_STEPS: (u64, u64) = (3, 8);

impl RunState {
    /// A run's state before its first step: `len` training samples split over
    /// `world` workers as `options` says.
    fn start(len: usize, options: &TrainOptions, world: usize) -> RunState {
        let split = options.split(&options.weights, world);
        // A few steps in (the first one warms up), but early in the epoch.
        let steps = split.steps_per_epoch(len, options.global_batch) as u64;
        let measure_at =
            (options.measure_split && world > 1).then_some((steps / 5).clamp(MEASURE_STEPS.0, MEASURE_STEPS.1));
        RunState {
            epoch: 0,
            updates: 0,
            assignment: Assignment::new(len, &split, options.global_batch, options.seed),
            history: vec![],
            members: (0..world).collect(),
            lost: vec![],
            rejoined: vec![],
            rebalances: 0,
            total_workers: world,
            resumed_at: None,
            measure_at,
        }
    }
}
