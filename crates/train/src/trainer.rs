//! Data-parallel training over a [`Ring`], surviving the loss of workers.
//!
//! Every worker starts from rank 0's parameters (broadcast) and trains on its part of
//! each global batch, as an [`Assignment`] says. Hetero owns the optimiser
//! ([`crate::optim`]), so the whole training state is flat vectors. Strategies:
//!
//! - **allreduce**: after each backward pass the ring sums the gradients, each
//!   pre-multiplied by `local_batch / global_batch`. The sum is exactly the gradient
//!   of the mean loss over the global batch, whatever the split, and every worker
//!   applies the same update — so a step on `n` workers equals a step on one machine
//!   with the whole batch, and the workers never drift apart. The batch's mean loss
//!   travels in the same allreduce (one extra float).
//! - **local-sgd**: each worker steps on its own gradients and the models are
//!   averaged (weighted by batch share) every `sync_every` steps and at the end of
//!   each epoch — one model-sized allreduce per `k` steps, for weak links.
//! - **parameter-server** and **hierarchical** ([`Topology::Server`]): the ring
//!   holds only this worker's resource group (one worker for `parameter-server`);
//!   the group sums its weighted gradients over it, its first member pushes the sum
//!   to the parameter server ([`crate::param_server`]) and passes the model it gets
//!   back around the group.
//!
//! Between epochs the split can follow measured throughput ([`Event::Rebalanced`])
//! and shards can pass a fraction of their samples to the ring neighbour. When the
//! ring breaks, the trainer asks its [`Membership`] for a ring of the survivors, they
//! adopt the most advanced survivor's model, optimiser and position, share out the
//! lost workers' remaining samples, and go on ([`Event::Migrated`]). With a
//! parameter server, any loss (a worker, or the server itself) turns the run into
//! one allreduce ring of the surviving workers, from the latest global model.
//! Between epochs, lost workers whose node came back join the ring
//! ([`Trainer::joining`], [`Event::Rejoined`]): they receive the whole state
//! ([`crate::sync`]) and a share of the work.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use hetero_comm::Ring;
use hetero_comm::liveness::Liveness;
use hetero_comm::server::ServerClient;
use hetero_data::assign::Assignment;
use hetero_data::shard::{self, Split};
use hetero_job::Strategy;

use crate::checkpoint::Checkpoint;
use crate::membership::{FixedMembership, Membership, Regroup};
use crate::optim::{FlatOptimizer, OptimizerConfig};
use crate::params;
use crate::report::{
    Coverage, EpochRecord, Event, LOSS_CURVE_POINTS, RunSummary, WorkerFigures, downsample, seconds_to_accuracy,
};
use crate::sync::{self, Reader, Words};
use crate::{Evaluation, Task, TrainError, seeded_model};

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
    /// (see [`Throttle`]).
    pub speed: f64,
    /// The optimiser.
    pub optimizer: OptimizerConfig,
    /// How workers combine their work (ring strategies: allreduce, local-sgd).
    pub strategy: Strategy,
    /// Share of each shard passed to the ring neighbour after every epoch.
    pub exchange_fraction: f64,
    /// Re-split between epochs when measured throughput drifts from the split.
    pub rebalance: bool,
    /// Where the lowest-ranked worker saves checkpoints (`None`: nowhere).
    pub checkpoint: Option<PathBuf>,
    /// Save a checkpoint every N epochs (and after the last; 0: never).
    pub checkpoint_every: usize,
    /// Start from this checkpoint.
    pub resume: Option<PathBuf>,
}

/// Relative drift of measured throughput from the split that triggers a rebalance.
pub const REBALANCE_DRIFT: f64 = 0.05;

/// Emulates a device `speed` times as fast as this machine: after each step's
/// compute the worker idles until the step has taken `1 / speed` times the work it
/// needed. The work is the process's CPU time spread over its threads (capped by
/// the wall time), so time spent waiting for a core that other workers on the same
/// machine hold is not stretched as if the device were slow at it; and it is a
/// running mean per sample, so a hiccup of the host (a page fault) delays the step
/// by its own length, as it would delay the slower device, instead of `1 / speed`
/// times its length.
#[derive(Debug, Clone)]
pub struct Throttle {
    speed: f64,
    threads: f64,
    per_sample: Option<f64>,
}

impl Throttle {
    /// A throttle to `speed` in (0, 1] for a worker computing on `threads` threads;
    /// other speeds never idle.
    pub fn new(speed: f64, threads: usize) -> Throttle {
        Throttle {
            speed,
            threads: threads.max(1) as f64,
            per_sample: None,
        }
    }

    /// How long to idle after a step that has taken `wall` so far and `cpu` of the
    /// process's CPU time for `samples` samples.
    pub fn delay(&mut self, wall: Duration, cpu: Duration, samples: usize) -> Duration {
        if !(self.speed > 0.0 && self.speed < 1.0) || samples == 0 {
            return Duration::ZERO;
        }
        let work = wall.as_secs_f64().min(cpu.as_secs_f64() / self.threads);
        let now = work / samples as f64;
        let typical = match self.per_sample {
            None => now,
            Some(mean) => 0.8 * mean + 0.2 * now,
        };
        self.per_sample = Some(typical);
        let target = typical * samples as f64 / self.speed;
        Duration::from_secs_f64((target - wall.as_secs_f64()).max(0.0))
    }
}

/// Threads a worker computes on: `RAYON_NUM_THREADS` (set by its agent), else the
/// machine's cores.
pub fn compute_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
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
            exchange_fraction: 0.0,
            rebalance: false,
            checkpoint: None,
            checkpoint_every: 1,
            resume: None,
        }
    }

    /// These options with `optimizer` at `learning_rate`.
    pub fn with_optimizer(mut self, kind: hetero_job::Optimizer, learning_rate: f64) -> Self {
        self.optimizer = OptimizerConfig { kind, learning_rate };
        self
    }

    fn split(&self, weights: &[f64], world: usize) -> Split {
        if weights.len() == world {
            Split::weighted(weights)
        } else {
            Split::even(world)
        }
    }
}

/// Where a run is: the state every worker must agree on after a failure.
struct Progress {
    epoch: usize,
    assignment: Assignment,
    history: Vec<EpochRecord>,
}

/// How this worker reaches the others. (One per worker, replaced only when the
/// ring re-forms: boxing its large variant would buy nothing.)
#[allow(clippy::large_enum_variant)]
pub enum Topology {
    /// The ring holds every worker.
    Ring,
    /// The ring holds this worker's group; the group's first member (`client` is
    /// `Some` there) speaks to the parameter server for the group.
    Server {
        /// The connection to the server (group leaders only).
        client: Option<ServerClient>,
        /// `None`: the server aggregates synchronously; `Some(s)`: asynchronously
        /// with staleness bound `s`.
        staleness: Option<usize>,
        /// This worker's rank among all workers.
        rank: usize,
        /// Number of workers.
        world: usize,
        /// The ranks (among all workers) of this worker's group, in ring order.
        group: Vec<usize>,
    },
}

/// One worker's side of a data-parallel run.
pub struct Trainer<B: AutodiffBackend, T: Task<B>> {
    task: T,
    model: Option<T::Model>,
    params: Vec<f32>,
    optimizer: FlatOptimizer,
    ring: Option<Ring>,
    topology: Topology,
    membership: Box<dyn Membership>,
    /// Original rank of each current worker, by current rank.
    members: Vec<usize>,
    /// This worker's current rank among all workers.
    rank: usize,
    generation: u64,
    device: B::Device,
    options: TrainOptions,
    local_steps: usize,
    throttle: Throttle,
    samples: u64,
    compute: Duration,
    comm: Duration,
    lost: Vec<usize>,
    rejoined: Vec<usize>,
    rebalances: usize,
    /// Steps taken (the same on every member of the ring).
    updates: u64,
    /// Workers the job started with.
    total_workers: usize,
    /// A joining worker's ring, to adopt the others' state on at the start of `run`.
    pending: Option<Regroup>,
    /// Holds no state of the run yet (a joining worker before it adopted one).
    joining: bool,
    /// Where a resumed run starts, and the epochs before it.
    resumed: Option<(usize, Vec<EpochRecord>)>,
}

impl<B: AutodiffBackend, T: Task<B>> Trainer<B, T> {
    /// Seeds burn, builds the model and adopts rank 0's parameters; `ring` holds
    /// every worker.
    pub fn new(task: T, device: B::Device, ring: Ring, options: TrainOptions) -> Result<Self, TrainError> {
        Self::with_topology(task, device, ring, Topology::Ring, options)
    }

    /// Like [`Trainer::new`], reaching the others as `topology` says; with a
    /// parameter server, every worker starts from the server's model.
    pub fn with_topology(
        task: T,
        device: B::Device,
        mut ring: Ring,
        mut topology: Topology,
        options: TrainOptions,
    ) -> Result<Self, TrainError> {
        let world = match &topology {
            Topology::Ring => ring.world(),
            Topology::Server { world, group, .. } => {
                if group.len() != ring.world() {
                    return Err(TrainError::Config(format!(
                        "a group of {} workers on a ring of {}",
                        group.len(),
                        ring.world()
                    )));
                }
                *world
            }
        };
        if options.global_batch < world {
            return Err(TrainError::Config(format!(
                "global batch {} is smaller than the {world} workers",
                options.global_batch
            )));
        }
        let model = seeded_model(&task, &device, options.seed);
        let started = Instant::now();
        let mut flat = params::flatten(&model);
        if let Topology::Server { client: Some(c), .. } = &mut topology {
            let global = c.pull()?;
            if global.len() != flat.len() {
                return Err(TrainError::Config(format!(
                    "the parameter server holds {} parameters, this worker's model has {}",
                    global.len(),
                    flat.len()
                )));
            }
            flat = global;
        }
        // One worker has no one to agree with: its own initial model is the global
        // one (and reloading it would only cost time).
        let reload = ring.world() > 1 || matches!(topology, Topology::Server { .. });
        if ring.world() > 1 {
            ring.broadcast(&mut flat, 0)?;
        }
        let model = if reload { params::load(model, &flat) } else { model };
        let comm = started.elapsed();
        let mut optimizer = FlatOptimizer::new(options.optimizer, flat.len());
        let mut resumed = None;
        if let Some(path) = &options.resume {
            // Every worker reads the checkpoint itself, so a damaged one fails every
            // worker with the same message before any of them trains.
            let c = Checkpoint::load_for(path, flat.len())?;
            if matches!(topology, Topology::Ring) {
                flat = c.params;
                if let Some(state) = c.optimizer
                    && state.moment_1.len() == optimizer.state().moment_1.len()
                {
                    optimizer.restore(state).map_err(TrainError::Config)?;
                }
            }
            resumed = Some((c.epoch, c.history));
        }
        let model = if resumed.is_some() && matches!(topology, Topology::Ring) {
            params::load(model, &flat)
        } else {
            model
        };
        let throttle = Throttle::new(options.speed, compute_threads());
        let rank = match &topology {
            Topology::Ring => ring.rank(),
            Topology::Server { rank, .. } => *rank,
        };
        Ok(Trainer {
            task,
            model: Some(model),
            optimizer,
            throttle,
            params: flat,
            members: (0..world).collect(),
            rank,
            ring: Some(ring),
            topology,
            membership: Box::new(FixedMembership),
            generation: 0,
            device,
            options,
            local_steps: 0,
            samples: 0,
            compute: Duration::ZERO,
            comm,
            lost: vec![],
            rejoined: vec![],
            rebalances: 0,
            updates: 0,
            total_workers: world,
            pending: None,
            joining: false,
            resumed,
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
        mut options: TrainOptions,
    ) -> Result<Self, TrainError> {
        // A ring that admits joiners is an allreduce ring, whatever the job began as.
        if options.strategy.uses_parameter_server() {
            options.strategy = Strategy::Allreduce;
        }
        let model = seeded_model(&task, &device, options.seed);
        let params = params::flatten(&model);
        let optimizer = FlatOptimizer::new(options.optimizer, params.len());
        let throttle = Throttle::new(options.speed, compute_threads());
        let rank = regroup.ring.rank();
        Ok(Trainer {
            task,
            model: Some(model),
            params,
            optimizer,
            ring: None,
            topology: Topology::Ring,
            membership: Box::new(FixedMembership),
            members: regroup.members.clone(),
            rank,
            generation,
            device,
            options,
            local_steps: 0,
            throttle,
            samples: 0,
            compute: Duration::ZERO,
            comm: Duration::ZERO,
            lost: vec![],
            rejoined: vec![],
            rebalances: 0,
            updates: 0,
            total_workers: 0,
            pending: Some(regroup),
            joining: true,
            resumed: None,
        })
    }

    /// Sums `buf` over all workers (every worker gets the totals).
    fn global_sum(&mut self, buf: &mut [f32]) -> Result<(), TrainError> {
        self.ring().allreduce_sum(buf)?;
        if let Topology::Server { client, .. } = &mut self.topology {
            if let Some(c) = client {
                c.sum(buf)?;
            }
            self.ring().broadcast(buf, 0)?;
        }
        Ok(())
    }

    /// Number of workers.
    fn world(&self) -> usize {
        self.members.len()
    }

    /// Lets the run survive lost workers by regrouping through `membership`.
    pub fn with_membership(mut self, membership: Box<dyn Membership>) -> Self {
        self.membership = membership;
        self
    }

    fn ring(&mut self) -> &mut Ring {
        self.ring.as_mut().expect("a ring is present between regroups")
    }

    /// The model as it is now.
    pub fn model(&self) -> &T::Model {
        self.model.as_ref().expect("model is present between steps")
    }

    /// All parameters, flattened (identical on every worker after a synchronous step).
    pub fn parameters(&self) -> Vec<f32> {
        self.params.clone()
    }

    /// Local gradients of this worker's `indices`, each scaled by `scale`, and the
    /// batch's mean loss. An empty batch contributes zeros.
    fn local_gradients(&mut self, indices: &[usize], scale: f32) -> (Vec<f32>, f32) {
        if indices.is_empty() {
            return (vec![0.0; self.params.len()], 0.0);
        }
        let model = self.model.take().expect("model is present between steps");
        let batch = self.task.train_batch(indices, &self.device);
        let loss = self.task.loss(&model, batch);
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        let local_loss = loss.into_scalar().elem::<f32>();
        let (flat, _) = params::take_grads::<B, _>(&model, &mut grads, scale);
        self.model = Some(model);
        (flat, local_loss)
    }

    /// Loads the flat parameters into the model.
    fn load_params(&mut self) {
        let model = self.model.take().expect("model is present between steps");
        self.model = Some(params::load(model, &self.params));
    }

    /// One step on this worker's samples `indices`, part of a batch of `global`
    /// samples over which the gradient is averaged (the global batch; with an
    /// asynchronous parameter server, this worker's group's batch, since each push
    /// is a step of its own). Returns the batch's mean loss (with local-sgd between
    /// averages: the local batch's).
    pub fn step(&mut self, indices: &[usize], global: usize) -> Result<f32, TrainError> {
        let started = Instant::now();
        let cpu = cpu_time::ProcessTime::now();
        let weight = indices.len() as f32 / global.max(1) as f32;
        let mut comm = Duration::ZERO;
        let loss = match self.options.strategy {
            Strategy::LocalSgd { sync_every } => {
                let (grads, local_loss) = self.local_gradients(indices, 1.0);
                if !indices.is_empty() {
                    self.optimizer.step(&mut self.params, &grads);
                }
                self.local_steps += 1;
                std::thread::sleep(self.throttle.delay(started.elapsed(), cpu.elapsed(), indices.len()));
                if self.local_steps.is_multiple_of(sync_every) {
                    let reduce = Instant::now();
                    let global_loss = self.average_models(weight, local_loss * weight)?;
                    comm = reduce.elapsed();
                    global_loss
                } else {
                    self.load_params();
                    local_loss
                }
            }
            Strategy::ParameterServer { .. } | Strategy::Hierarchical => {
                let (mut flat, local_loss) = self.local_gradients(indices, weight);
                flat.push(local_loss * weight);
                std::thread::sleep(self.throttle.delay(started.elapsed(), cpu.elapsed(), indices.len()));
                let reduce = Instant::now();
                self.ring().allreduce_sum(&mut flat)?;
                if let Topology::Server { client: Some(c), .. } = &mut self.topology {
                    flat = c.push(&flat)?;
                }
                self.ring().broadcast(&mut flat, 0)?;
                comm = reduce.elapsed();
                let loss = flat.pop().expect("loss slot");
                if flat.len() != self.params.len() {
                    return Err(TrainError::Config(format!(
                        "the parameter server sent {} parameters for a model of {}",
                        flat.len(),
                        self.params.len()
                    )));
                }
                self.params = flat;
                self.load_params();
                loss
            }
            Strategy::Allreduce => {
                let (mut flat, local_loss) = self.local_gradients(indices, weight);
                flat.push(local_loss * weight);
                std::thread::sleep(self.throttle.delay(started.elapsed(), cpu.elapsed(), indices.len()));
                let reduce = Instant::now();
                self.ring().allreduce_sum(&mut flat)?;
                comm = reduce.elapsed();
                let global_loss = flat.pop().expect("loss slot");
                self.optimizer.step(&mut self.params, &flat);
                self.load_params();
                global_loss
            }
        };
        self.samples += indices.len() as u64;
        self.updates += 1;
        self.comm += comm;
        self.compute += started.elapsed() - comm;
        Ok(loss)
    }

    /// Replaces every worker's model by the average weighted by `weight` (this
    /// worker's share); returns the sum of `loss_share` over the workers.
    fn average_models(&mut self, weight: f32, loss_share: f32) -> Result<f32, TrainError> {
        let mut flat: Vec<f32> = self.params.iter().map(|p| p * weight).collect();
        flat.push(loss_share);
        self.ring().allreduce_sum(&mut flat)?;
        let loss = flat.pop().expect("loss slot");
        self.params = flat;
        self.load_params();
        Ok(loss)
    }

    /// Evaluates the test set, each worker a balanced part; every worker gets the
    /// totals, and `extra` (summed over workers) rides along.
    pub fn evaluate(&mut self) -> Result<Option<Evaluation>, TrainError> {
        self.evaluate_with(&mut [])
    }

    /// [`Trainer::evaluate`], summing `extra` over the workers in the same exchange.
    fn evaluate_with(&mut self, extra: &mut [f32]) -> Result<Option<Evaluation>, TrainError> {
        let len = self.task.test_len();
        let started = Instant::now();
        let (a, b) = shard::balanced(len, self.world(), self.rank);
        let mut sums = Evaluation::default();
        let step = self.options.eval_batch.max(1);
        for start in (a..b).step_by(step) {
            let indices: Vec<usize> = (start..(start + step).min(b)).collect();
            let batch = self.task.test_batch(&indices, &self.device);
            let e = self.task.evaluate(self.model(), batch);
            sums.loss_sum += e.loss_sum;
            sums.correct += e.correct;
            sums.count += e.count;
        }
        let mut buf = vec![sums.loss_sum as f32, sums.correct as f32, sums.count as f32];
        buf.extend_from_slice(extra);
        let computed = started.elapsed();
        self.global_sum(&mut buf)?;
        self.comm += started.elapsed() - computed;
        self.compute += computed;
        extra.copy_from_slice(&buf[3..]);
        Ok((len > 0).then(|| Evaluation {
            loss_sum: buf[0] as f64,
            correct: buf[1] as f64,
            count: buf[2] as f64,
        }))
    }

    /// Retries `op` after regrouping for as long as the ring breaks and survivors
    /// remain.
    fn resilient<R>(
        &mut self,
        progress: &mut Progress,
        on_event: &mut dyn FnMut(Event),
        mut op: impl FnMut(&mut Self, &mut Progress) -> Result<R, TrainError>,
    ) -> Result<R, TrainError> {
        loop {
            match op(self, progress) {
                Err(TrainError::Comm(e)) => {
                    let mut reason = e.to_string();
                    // A second loss while regrouping just means regrouping again.
                    while let Err(e) = self.recover(progress, &reason, on_event) {
                        match e {
                            TrainError::Comm(e) => reason = e.to_string(),
                            other => return Err(other),
                        }
                    }
                }
                other => return other,
            }
        }
    }

    /// After the ring broke: regroup with the survivors, adopt the most advanced
    /// survivor's state, and hand the lost workers' samples to the survivors. A
    /// parameter-server topology cannot lose a member (the server waits for every
    /// group): it becomes one allreduce ring of the surviving workers.
    fn recover(
        &mut self,
        progress: &mut Progress,
        reason: &str,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<(), TrainError> {
        let collapsed = matches!(self.topology, Topology::Server { .. });
        if let Topology::Server { client, .. } = &mut self.topology {
            // Leaving without a goodbye fails the server, which tells every other
            // group's leader; the server's optimiser state goes with it, so the ring
            // starts a fresh one from the latest global model.
            drop(client.take());
            self.topology = Topology::Ring;
            self.options.strategy = Strategy::Allreduce;
            self.optimizer = FlatOptimizer::new(self.options.optimizer, self.params.len());
        }
        // Closing our connections tells the neighbours at once.
        self.ring = None;
        self.generation += 1;
        let regroup = self.membership.regroup(self.generation, reason)?;
        for e in self.adopt_ring(regroup, progress, collapsed)? {
            on_event(e);
        }
        Ok(())
    }

    /// Between epochs: when lost workers wait to rejoin, forms the ring with them
    /// and hands them the state and a share of the work.
    fn admit_joiners(&mut self, progress: &mut Progress) -> Result<Vec<Event>, TrainError> {
        if !self.membership.joiners_waiting(self.generation, progress.epoch)? {
            return Ok(vec![]);
        }
        self.ring = None;
        self.generation += 1;
        let regroup = self.membership.regroup(self.generation, "lost workers rejoin")?;
        self.adopt_ring(regroup, progress, false)
    }

    /// Everything another worker needs to go on from this one's position.
    fn encode_state(&self, progress: &Progress) -> Vec<u8> {
        let mut w = Words::default();
        w.f32s(&self.params);
        w.f32s(&self.optimizer.to_flat());
        w.u64(self.updates);
        w.u64(progress.epoch as u64);
        w.usizes(&self.members);
        w.usizes(&self.lost);
        w.usizes(&self.rejoined);
        w.u64(self.rebalances as u64);
        w.u64(self.total_workers as u64);
        w.u64(self.resumed.as_ref().map_or(u64::MAX, |(e, _)| *e as u64));
        w.u64s(&progress.assignment.to_words());
        w.u64(progress.history.len() as u64);
        for h in &progress.history {
            w.u64(h.epoch as u64);
            w.f64(h.train_loss);
            w.f64(h.test_accuracy.unwrap_or(f64::NAN));
            w.f64(h.elapsed_secs);
            let c = h.coverage;
            w.usizes(&[c.samples, c.visited, c.distinct]);
        }
        w.into_bytes()
    }

    /// Takes over the state [`Trainer::encode_state`] wrote; returns the members of
    /// the ring it was written in.
    fn adopt_state(&mut self, state: &[u8], progress: &mut Progress) -> Result<Vec<usize>, TrainError> {
        let mut r = Reader::new(state);
        let params = r.f32s("the model")?;
        if params.len() != self.params.len() {
            return Err(TrainError::Config(format!(
                "the ring's model has {} parameters, this worker's {}: not the same model",
                params.len(),
                self.params.len()
            )));
        }
        let optimizer = r.f32s("the optimiser")?;
        if optimizer.len() != self.optimizer.flat_len() {
            return Err(TrainError::Config(format!(
                "the ring's optimiser state has {} values, this worker's {}: not the same optimiser",
                optimizer.len(),
                self.optimizer.flat_len()
            )));
        }
        self.params.copy_from_slice(&params);
        self.optimizer.load_flat(&optimizer);
        self.updates = r.u64("the step count")?;
        progress.epoch = r.u64("the epoch")? as usize;
        let members = r.usizes("the members")?;
        self.lost = r.usizes("the lost workers")?;
        self.rejoined = r.usizes("the rejoined workers")?;
        self.rebalances = r.u64("the rebalance count")? as usize;
        self.total_workers = r.u64("the worker count")? as usize;
        let resumed = r.u64("the resumed epoch")?;
        let assignment = Assignment::from_words(&r.u64s("the assignment")?)
            .map_err(|e| TrainError::Config(format!("the ring's data assignment: {e}")))?;
        if assignment.world() != members.len() {
            return Err(TrainError::Config(format!(
                "the ring's data assignment is for {} workers, its members {}",
                assignment.world(),
                members.len()
            )));
        }
        progress.assignment = assignment;
        let epochs = r.u64("the history's length")?;
        progress.history.clear();
        for _ in 0..epochs {
            let epoch = r.u64("an epoch")? as usize;
            let train_loss = r.f64("a training loss")?;
            let accuracy = r.f64("a test accuracy")?;
            progress.history.push(EpochRecord {
                epoch,
                train_loss,
                test_accuracy: (!accuracy.is_nan()).then_some(accuracy),
                elapsed_secs: r.f64("a time")?,
                coverage: match r.usizes("an epoch's coverage")?[..] {
                    [samples, visited, distinct] => Coverage {
                        samples,
                        visited,
                        distinct,
                    },
                    _ => return Err(TrainError::Config("an epoch's coverage is three counts".into())),
                },
            });
        }
        r.finish()?;
        if resumed != u64::MAX {
            let before = progress
                .history
                .iter()
                .filter(|h| (h.epoch as u64) < resumed)
                .cloned()
                .collect();
            self.resumed = Some((resumed as usize, before));
        }
        self.load_params();
        Ok(members)
    }

    /// On a new ring: every member adopts the state of the one that got furthest
    /// (a step can complete on some workers and not on others; a joiner holds
    /// nothing), then the work is shared out among the new members. `collapsed`:
    /// the ring replaces a parameter server's topology.
    fn adopt_ring(
        &mut self,
        regroup: Regroup,
        progress: &mut Progress,
        collapsed: bool,
    ) -> Result<Vec<Event>, TrainError> {
        let new_world = regroup.members.len();
        self.ring = Some(regroup.ring);
        self.rank = self.ring().rank();
        let mut steps = vec![0f32; new_world];
        steps[self.rank] = if self.joining { 0.0 } else { self.updates as f32 + 1.0 };
        self.ring().allreduce_sum(&mut steps)?;
        let owner = (0..new_world).fold(0, |best, r| if steps[r] > steps[best] { r } else { best });
        if steps[owner] == 0.0 {
            return Err(TrainError::Config(
                "a ring of joining workers only: no member holds the run's state".into(),
            ));
        }
        let mut state = if self.rank == owner {
            self.encode_state(progress)
        } else {
            Vec::new()
        };
        sync::broadcast(self.ring(), &mut state, owner)?;
        let old = self.adopt_state(&state, progress)?;
        self.joining = false;

        let lost_positions: Vec<usize> = (0..old.len()).filter(|&p| !regroup.members.contains(&old[p])).collect();
        let lost: Vec<usize> = lost_positions.iter().map(|&p| old[p]).collect();
        let joined_positions: Vec<usize> = (0..new_world).filter(|&p| !old.contains(&regroup.members[p])).collect();
        let joined: Vec<usize> = joined_positions.iter().map(|&p| regroup.members[p]).collect();
        let split = self.options.split(&regroup.weights, new_world);
        progress.assignment =
            progress
                .assignment
                .migrate(&lost_positions, &joined_positions, &split, self.options.global_batch);
        self.members = regroup.members;
        self.options.weights = regroup.weights;
        self.lost.extend(&lost);
        self.rejoined.extend(&joined);
        let shares = shares(progress.assignment.batches());
        let mut events = Vec::new();
        if !lost.is_empty() || collapsed {
            events.push(Event::Migrated {
                epoch: progress.epoch,
                step: self.updates,
                lost,
                workers: new_world,
                shares: shares.clone(),
                members: self.members.clone(),
                collapsed,
            });
        }
        if !joined.is_empty() {
            events.push(Event::Rejoined {
                epoch: progress.epoch,
                joined,
                workers: new_world,
                shares,
                members: self.members.clone(),
            });
        }
        Ok(events)
    }

    /// Between epochs: adjusts the split to the throughput each worker measured in
    /// the epoch when it drifted by more than [`REBALANCE_DRIFT`].
    fn rebalance(&mut self, progress: &mut Progress, rate: f64) -> Result<Option<Event>, TrainError> {
        let mut rates = vec![0f32; self.world()];
        rates[self.rank] = rate as f32;
        self.global_sum(&mut rates)?;
        let rates: Vec<f64> = rates.iter().map(|&r| r as f64).collect();
        let total: f64 = rates.iter().sum();
        if rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) || total <= 0.0 {
            return Ok(None);
        }
        let current = shares(progress.assignment.batches());
        let wanted: Vec<f64> = rates.iter().map(|r| r / total).collect();
        let drift = current
            .iter()
            .zip(&wanted)
            .map(|(c, w)| (w - c).abs() / c.max(1e-9))
            .fold(0.0, f64::max);
        if drift <= REBALANCE_DRIFT {
            return Ok(None);
        }
        let split = Split::weighted(&wanted);
        progress.assignment.rebalance(&split, self.options.global_batch);
        self.options.weights = wanted;
        self.rebalances += 1;
        Ok(Some(Event::Rebalanced {
            epoch: progress.epoch,
            shares: shares(progress.assignment.batches()),
        }))
    }

    /// Trains for the configured epochs, evaluating after each, reporting through
    /// `on_event`; returns the run's summary (the same on every worker).
    pub fn run(&mut self, on_event: &mut dyn FnMut(Event)) -> Result<RunSummary, TrainError> {
        let o = self.options.clone();
        let world = self.world();
        let len = self.task.train_len();
        let split = o.split(&o.weights, world);
        if len < o.global_batch {
            return Err(TrainError::Config(format!(
                "{len} training samples cannot fill one global batch of {} over {world} workers",
                o.global_batch
            )));
        }
        let (first_epoch, history) = self.resumed.clone().unwrap_or_default();
        let mut progress = Progress {
            epoch: first_epoch,
            assignment: Assignment::new(len, &split, o.global_batch, o.seed),
            history,
        };
        // A joining worker takes over the run's state from the ring it joined.
        let joined = self.resilient(&mut progress, on_event, |t, p| match t.pending.take() {
            Some(regroup) => t.adopt_ring(regroup, p, false),
            None => Ok(vec![]),
        })?;
        joined.into_iter().for_each(&mut *on_event);
        // A resumed (or joined) run's clock goes on from where the run stood.
        let earlier = progress.history.last().map_or(0.0, |h: &EpochRecord| h.elapsed_secs);
        let started = Instant::now();
        let mut last_event = Instant::now() - o.event_interval;
        let mut last_eval = None;
        let mut losses = Vec::new();
        while progress.epoch < o.epochs {
            let epoch = progress.epoch;
            progress.assignment.begin_epoch(o.seed, epoch);
            let steps = progress.assignment.steps_left();
            let mut loss_share = 0.0f64;
            let mut loss_sum = 0.0f64;
            let (epoch_samples, epoch_compute) = (self.samples, self.compute);
            // The rate shown is training speed: evaluation time stays out of it.
            let (mut window_start, mut window_samples) = (Instant::now(), 0usize);
            let mut step = 0;
            while !progress.assignment.epoch_done() {
                let (loss, local) = self.resilient(&mut progress, on_event, |t, p| {
                    let indices = p.assignment.next_batch(t.rank).to_vec();
                    let global = match &t.topology {
                        // Each asynchronous push is a step over its group's batch.
                        Topology::Server {
                            staleness: Some(_),
                            group,
                            ..
                        } => group.iter().map(|&r| p.assignment.next_batch(r).len()).sum(),
                        _ => p.assignment.next_global_batch(),
                    };
                    let last = p.assignment.steps_left() == 1;
                    let mut loss = t.step(&indices, global)?;
                    if last && matches!(t.options.strategy, Strategy::LocalSgd { .. }) {
                        // Every epoch ends on one agreed model.
                        let weight = indices.len() as f32 / global.max(1) as f32;
                        loss = t.average_models(weight, loss * weight)?;
                        t.local_steps = 0;
                    }
                    p.assignment.advance();
                    Ok((loss, indices.len()))
                })?;
                if !loss.is_finite() {
                    return Err(TrainError::Task(format!(
                        "loss became {loss} at epoch {epoch}, step {step}; lower training.learning_rate"
                    )));
                }
                loss_share += loss as f64 * local as f64 / o.global_batch as f64;
                loss_sum += loss as f64;
                losses.push(loss);
                window_samples += local;
                step += 1;
                // What a stalled-worker watchdog waits for (hetero_comm::liveness).
                Liveness::global().progressed();
                let done = progress.assignment.epoch_done();
                if last_event.elapsed() >= o.event_interval || done {
                    let rate = window_samples as f64 / window_start.elapsed().as_secs_f64().max(1e-9);
                    on_event(Event::Step {
                        epoch,
                        step: step - 1,
                        steps: steps.max(step),
                        loss,
                        samples_per_sec: rate,
                    });
                    last_event = Instant::now();
                    (window_start, window_samples) = (Instant::now(), 0);
                }
            }
            // The epoch's training loss: every worker's loss, weighted by its samples.
            let mut extra = [loss_share as f32, 0.0];
            let eval = self.resilient(&mut progress, on_event, |t, _| {
                let mut e = extra;
                let r = t.evaluate_with(&mut e)?;
                Ok((r, e))
            })?;
            let (eval, sums) = eval;
            extra = sums;
            Liveness::global().progressed();
            // With allreduce every worker already holds each step's global loss; with
            // local steps the workers' weighted shares add up to it.
            let train_loss = match o.strategy {
                Strategy::LocalSgd { .. } | Strategy::ParameterServer { staleness: 1.. } => extra[0] as f64,
                _ => loss_sum,
            } / step.max(1) as f64;
            let test_accuracy = eval.map(|e| e.correct / e.count.max(1.0));
            let test_loss = eval.map(|e| e.loss_sum / e.count.max(1.0));
            let elapsed_secs = earlier + started.elapsed().as_secs_f64();
            on_event(Event::Epoch {
                epoch,
                train_loss,
                test_accuracy,
                test_loss,
                elapsed_secs,
            });
            let (samples, visited, distinct) = progress.assignment.coverage();
            progress.history.push(EpochRecord {
                epoch,
                train_loss,
                test_accuracy,
                elapsed_secs,
                coverage: Coverage {
                    samples,
                    visited,
                    distinct,
                },
            });
            last_eval = eval;
            progress.epoch += 1;
            let due = o.checkpoint_every > 0
                && (progress.epoch.is_multiple_of(o.checkpoint_every) || progress.epoch == o.epochs);
            if let Some(path) = o.checkpoint.as_ref().filter(|_| due && self.rank == 0) {
                Checkpoint {
                    epoch: progress.epoch,
                    params: self.params.clone(),
                    // With a parameter server the optimiser lives there.
                    optimizer: matches!(self.topology, Topology::Ring).then(|| self.optimizer.state().clone()),
                    strategy: o.strategy.name().into(),
                    workers: self.world(),
                    history: progress.history.clone(),
                }
                .save(path)?;
                on_event(Event::Checkpointed {
                    epoch: progress.epoch,
                    path: path.display().to_string(),
                });
            }
            if progress.epoch < o.epochs {
                let rate =
                    (self.samples - epoch_samples) as f64 / (self.compute - epoch_compute).as_secs_f64().max(1e-9);
                if o.rebalance
                    && self.world() > 1
                    && let Some(e) = self.resilient(&mut progress, on_event, |t, p| t.rebalance(p, rate))?
                {
                    on_event(e);
                }
                let weights = shares(progress.assignment.batches());
                progress
                    .assignment
                    .exchange(o.exchange_fraction, &Split::weighted(&weights), o.seed, progress.epoch);
                let joined = self.resilient(&mut progress, on_event, |t, p| t.admit_joiners(p))?;
                joined.into_iter().for_each(&mut *on_event);
            }
        }
        let wall = started.elapsed().as_secs_f64();
        let per_worker = self.resilient(&mut progress, on_event, |t, _| t.gather_figures(wall))?;
        let total_samples: u64 = per_worker.iter().map(|w| w.samples).sum();
        if let Topology::Server { client, .. } = &mut self.topology
            && let Some(c) = client.take()
        {
            c.bye()?;
        }
        Ok(RunSummary {
            workers: self.total_workers,
            strategy: o.strategy.name().into(),
            lost_workers: self.lost.clone(),
            rejoined_workers: self.rejoined.clone(),
            rebalances: self.rebalances,
            resumed_at_epoch: self.resumed.as_ref().map(|(e, _)| *e),
            backend: o.backend.clone(),
            epochs: o.epochs,
            global_batch_size: o.global_batch,
            test_accuracy: last_eval.map(|e| e.correct / e.count.max(1.0)),
            test_loss: last_eval.map(|e| e.loss_sum / e.count.max(1.0)),
            first_epoch_loss: progress.history.first().map_or(f64::NAN, |h| h.train_loss),
            last_epoch_loss: progress.history.last().map_or(f64::NAN, |h| h.train_loss),
            samples_per_sec: total_samples as f64 / wall.max(1e-9),
            wall_secs: wall,
            seconds_to_accuracy: seconds_to_accuracy(&progress.history),
            history: progress.history,
            per_worker,
            loss_curve: downsample(&losses, LOSS_CURVE_POINTS),
        })
    }

    /// Every worker's figures, gathered by an allreduce of per-rank slots (by
    /// original rank; lost workers report nothing).
    fn gather_figures(&mut self, wall: f64) -> Result<Vec<WorkerFigures>, TrainError> {
        let slots_for = self.total_workers;
        let me = self.members[self.rank];
        let mut slots = vec![0f32; slots_for * 3];
        slots[me * 3] = self.samples as f32;
        slots[me * 3 + 1] = self.compute.as_secs_f32();
        slots[me * 3 + 2] = self.comm.as_secs_f32();
        self.global_sum(&mut slots)?;
        Ok((0..slots_for)
            .map(|r| WorkerFigures {
                rank: r,
                samples: slots[r * 3] as u64,
                compute_secs: slots[r * 3 + 1] as f64,
                comm_secs: slots[r * 3 + 2] as f64,
                samples_per_sec: slots[r * 3] as f64 / wall.max(1e-9),
            })
            .collect())
    }
}

/// Each worker's share of the global batch.
fn shares(batches: &[usize]) -> Vec<f64> {
    let total = batches.iter().sum::<usize>().max(1) as f64;
    batches.iter().map(|&b| b as f64 / total).collect()
}

/// Trains `task` on `device` over `ring` and returns the summary.
pub fn train<B: AutodiffBackend, T: Task<B>>(
    task: T,
    device: B::Device,
    ring: Ring,
    options: TrainOptions,
    on_event: &mut dyn FnMut(Event),
) -> Result<RunSummary, TrainError> {
    Trainer::new(task, device, ring, options)?.run(on_event)
}

#[cfg(test)]
mod tests {
    use std::thread;

    use burn::backend::{Autodiff, Flex};
    use hetero_data::ImageDataset;
    use hetero_job::Optimizer;
    use hetero_models::{CnnConfig, MlpConfig};
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::image_task::ImageTask;

    type B = Autodiff<Flex>;

    /// Random but learnable images: pixels `i` with `i % 10 == label` are bright.
    fn synthetic(n: usize, seed: u64) -> ImageDataset {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..10)).collect();
        let pixels = labels
            .iter()
            .flat_map(|&l| (0..784).map(move |i| if i % 10 == l as usize { 160u8 } else { 40 }))
            .map(|p| p.saturating_add(rng.random_range(0..60)))
            .collect();
        ImageDataset {
            pixels,
            labels,
            rows: 28,
            cols: 28,
        }
    }

    fn ring_of(world: usize) -> Vec<Ring> {
        hetero_comm::ring::loopback(world, "t", "k").unwrap()
    }

    /// Every task starts from the same weights: burn's RNG is global, so threads
    /// initialising at once would otherwise draw interleaved numbers.
    fn cnn_task() -> ImageTask<B, hetero_models::Cnn<B>> {
        static INITIAL: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
        let initial = INITIAL.get_or_init(|| params::flatten(&CnnConfig::new().init::<B>(&Default::default())));
        ImageTask::new(synthetic(64, 1), synthetic(20, 2), move |d| {
            params::load(CnnConfig::new().init(d), initial)
        })
    }

    /// The batch-equivalence guarantee: two workers with B/2 each end where one
    /// worker with B ends, and stay identical to each other.
    #[test]
    fn two_half_batches_equal_one_full_batch() {
        for optimizer in [Optimizer::Sgd, Optimizer::Adam] {
            let batches: Vec<Vec<usize>> = (0..3).map(|s| (s * 8..s * 8 + 8).collect()).collect();
            let solo_ring = ring_of(1).pop().unwrap();
            let mut solo = Trainer::new(
                cnn_task(),
                Default::default(),
                solo_ring,
                TrainOptions::new(1, 8, 5).with_optimizer(optimizer, 1e-2),
            )
            .unwrap();
            for b in &batches {
                solo.step(b, 8).unwrap();
            }
            let expected = solo.parameters();

            let rings = ring_of(2);
            let results: Vec<Vec<f32>> = thread::scope(|s| {
                let handles: Vec<_> = rings
                    .into_iter()
                    .enumerate()
                    .map(|(rank, ring)| {
                        let batches = &batches;
                        s.spawn(move || {
                            let mut t = Trainer::new(
                                cnn_task(),
                                Default::default(),
                                ring,
                                TrainOptions::new(1, 8, 5).with_optimizer(optimizer, 1e-2),
                            )
                            .unwrap();
                            for b in batches {
                                t.step(&b[rank * 4..rank * 4 + 4], 8).unwrap();
                            }
                            t.parameters()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(results[0], results[1], "workers drifted apart ({optimizer:?})");
            let worst = expected
                .iter()
                .zip(&results[0])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{optimizer:?}: max parameter difference {worst}");
            let initial = params::flatten(&seeded_model(&cnn_task(), &Default::default(), 0));
            assert_ne!(expected, initial, "training moved the parameters");
        }
    }

    /// The same with unlike workers: local batches of 5 and 3 (a weighted split)
    /// still sum to exactly the gradient of the global batch of 8.
    #[test]
    fn unequal_local_batches_equal_one_full_batch() {
        let batch: Vec<usize> = (0..8).collect();
        let solo_ring = ring_of(1).pop().unwrap();
        let mut solo = Trainer::new(
            cnn_task(),
            Default::default(),
            solo_ring,
            TrainOptions::new(1, 8, 5).with_optimizer(Optimizer::Sgd, 1e-2),
        )
        .unwrap();
        solo.step(&batch, 8).unwrap();
        solo.step(&batch, 8).unwrap();
        let expected = solo.parameters();
        let parts = [&batch[..5], &batch[5..]];
        let results: Vec<Vec<f32>> = thread::scope(|s| {
            let handles: Vec<_> = ring_of(2)
                .into_iter()
                .zip(parts)
                .map(|(ring, part)| {
                    s.spawn(move || {
                        let options = TrainOptions::new(1, 8, 5).with_optimizer(Optimizer::Sgd, 1e-2);
                        let mut t = Trainer::new(cnn_task(), Default::default(), ring, options).unwrap();
                        t.step(part, 8).unwrap();
                        t.step(part, 8).unwrap();
                        t.parameters()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results[0], results[1]);
        let worst = expected
            .iter()
            .zip(&results[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "max parameter difference {worst}");
    }

    #[test]
    fn run_learns_and_reports() {
        let task = ImageTask::<B, _>::new(synthetic(400, 3), synthetic(100, 4), |d| {
            MlpConfig::new().with_hidden(32).init(d)
        });
        let mut events = Vec::new();
        let summary = train(
            task,
            Default::default(),
            ring_of(1).pop().unwrap(),
            TrainOptions::new(3, 40, 1).with_optimizer(Optimizer::Adam, 1e-2),
            &mut |e| events.push(e),
        )
        .unwrap();
        assert!(summary.last_epoch_loss < summary.first_epoch_loss * 0.5, "{summary:?}");
        assert!(summary.test_accuracy.unwrap() > 0.5, "{summary:?}");
        assert_eq!(summary.per_worker[0].samples, 3 * 10 * 40);
        assert_eq!(events.iter().filter(|e| matches!(e, Event::Epoch { .. })).count(), 3);
    }

    #[test]
    fn throttle_stretches_compute_to_the_speed_cap() {
        let ms = Duration::from_millis;
        let close = |d: Duration, secs: f64| (d.as_secs_f64() - secs).abs() < 1e-6;
        assert_eq!(Throttle::new(1.0, 1).delay(ms(100), ms(100), 10), Duration::ZERO);
        assert_eq!(Throttle::new(0.0, 1).delay(ms(100), ms(100), 10), Duration::ZERO);
        assert!(close(Throttle::new(0.5, 1).delay(ms(100), ms(100), 10), 0.1));
        let mut quarter = Throttle::new(0.25, 1);
        assert!(close(quarter.delay(ms(100), ms(100), 10), 0.3));
        // A 50 ms hiccup is not stretched fourfold: the typical work moves a fifth.
        assert!(close(quarter.delay(ms(150), ms(150), 10), 0.44 - 0.15));
        // Waiting for a core (wall > CPU time) is not work: 60 ms of CPU in 100 ms.
        let mut half = Throttle::new(0.5, 1);
        assert!(close(half.delay(ms(100), ms(60), 10), 0.02));
        // Two threads: CPU time counts half.
        assert!(close(Throttle::new(0.5, 2).delay(ms(100), ms(200), 10), 0.1));
    }

    #[test]
    fn too_small_a_dataset_is_a_clear_error() {
        let task = ImageTask::<B, _>::new(synthetic(10, 3), synthetic(0, 4), |d| {
            MlpConfig::new().with_hidden(4).init(d)
        });
        let err = train(
            task,
            Default::default(),
            ring_of(1).pop().unwrap(),
            TrainOptions::new(1, 64, 1),
            &mut |_| {},
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("cannot fill one global batch"), "{err}");
    }

    /// Local SGD that averages after every step is, for plain SGD, exactly the
    /// allreduce step: Σ s_w (p − lr·g_w) = p − lr·Σ s_w g_w.
    #[test]
    fn local_sgd_every_step_equals_allreduce_for_sgd() {
        let batch: Vec<usize> = (0..8).collect();
        let parts = [&batch[..5], &batch[5..]];
        let run = |strategy: Strategy| -> Vec<Vec<f32>> {
            thread::scope(|s| {
                let handles: Vec<_> = ring_of(2)
                    .into_iter()
                    .zip(parts)
                    .map(|(ring, part)| {
                        s.spawn(move || {
                            let mut options = TrainOptions::new(1, 8, 5).with_optimizer(Optimizer::Sgd, 1e-2);
                            options.strategy = strategy;
                            let mut t = Trainer::new(cnn_task(), Default::default(), ring, options).unwrap();
                            for _ in 0..3 {
                                t.step(part, 8).unwrap();
                            }
                            t.parameters()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            })
        };
        let allreduce = run(Strategy::Allreduce);
        let local = run(Strategy::LocalSgd { sync_every: 1 });
        let worst = allreduce[0]
            .iter()
            .zip(&local[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "max parameter difference {worst}");
        // Between averages the models differ; after one they agree again.
        let rare = run(Strategy::LocalSgd { sync_every: 2 });
        assert_ne!(rare[0], rare[1], "3 steps with sync_every 2 end between averages");
    }

    /// A task that records which samples it trained on, and dies (panics) at its
    /// `die_at`-th training batch when asked to.
    struct Recorded {
        inner: ImageTask<B, hetero_models::Mlp<B>>,
        seen: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
        die_at: Option<usize>,
        calls: std::cell::Cell<usize>,
    }

    impl Task<B> for Recorded {
        type Model = hetero_models::Mlp<B>;
        type Batch = crate::image_task::ImageBatch<B>;
        fn train_len(&self) -> usize {
            self.inner.train_len()
        }
        fn test_len(&self) -> usize {
            self.inner.test_len()
        }
        fn model(&self, device: &<B as burn::tensor::backend::BackendTypes>::Device) -> Self::Model {
            self.inner.model(device)
        }
        fn train_batch(
            &self,
            indices: &[usize],
            device: &<B as burn::tensor::backend::BackendTypes>::Device,
        ) -> Self::Batch {
            let n = self.calls.get();
            self.calls.set(n + 1);
            if Some(n) == self.die_at {
                panic!("worker killed on purpose (test)");
            }
            self.seen.lock().unwrap().extend_from_slice(indices);
            self.inner.train_batch(indices, device)
        }
        fn test_batch(
            &self,
            indices: &[usize],
            device: &<B as burn::tensor::backend::BackendTypes>::Device,
        ) -> Self::Batch {
            self.inner.test_batch(indices, device)
        }
        fn loss(&self, model: &Self::Model, batch: Self::Batch) -> Tensor<B, 1> {
            self.inner.loss(model, batch)
        }
        fn evaluate(&self, model: &Self::Model, batch: Self::Batch) -> Evaluation {
            self.inner.evaluate(model, batch)
        }
    }

    type Entries = std::sync::Arc<(
        std::sync::Mutex<Vec<(u64, usize, std::net::SocketAddr)>>,
        std::sync::Condvar,
    )>;

    /// Survivors find each other through a shared board, as they would through the
    /// coordinator's rendezvous: ring `generation` has `expect[generation - 1]`
    /// members. With `admit_from`, lost workers wait to rejoin from that generation
    /// on (the first member to ask at each boundary decides for all, as the
    /// coordinator does).
    struct Board {
        me: usize,
        expect: Vec<usize>,
        board: Entries,
        admit_from: Option<u64>,
        decisions: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<(u64, usize), bool>>>,
    }

    impl Board {
        fn new(me: usize, expect: &[usize], board: &Entries) -> Self {
            Board {
                me,
                expect: expect.to_vec(),
                board: board.clone(),
                admit_from: None,
                decisions: Default::default(),
            }
        }
    }

    impl Membership for Board {
        fn joiners_waiting(&mut self, generation: u64, epoch: usize) -> Result<bool, TrainError> {
            let admit = self.admit_from.is_some_and(|g| generation >= g);
            Ok(*self
                .decisions
                .lock()
                .unwrap()
                .entry((generation, epoch))
                .or_insert(admit))
        }

        fn regroup(&mut self, generation: u64, _reason: &str) -> Result<crate::Regroup, TrainError> {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let (lock, ready) = &*self.board;
            let mut entries = lock.lock().unwrap();
            entries.push((generation, self.me, listener.local_addr().unwrap()));
            ready.notify_all();
            let mut mine = loop {
                let mine: Vec<_> = entries.iter().filter(|e| e.0 == generation).copied().collect();
                if mine.len() == self.expect[(generation as usize - 1).min(self.expect.len() - 1)] {
                    break mine;
                }
                entries = ready.wait(entries).unwrap();
            };
            drop(entries);
            mine.sort_by_key(|e| e.1);
            let members: Vec<usize> = mine.iter().map(|e| e.1).collect();
            let addrs: Vec<_> = mine.iter().map(|e| e.2).collect();
            let rank = members.iter().position(|&m| m == self.me).unwrap();
            let config = hetero_comm::RingConfig::new(rank, members.len(), format!("t#{generation}"), "k");
            Ok(crate::Regroup {
                ring: Ring::form(config, listener, &addrs)?,
                members,
                weights: vec![],
            })
        }
    }

    /// Kill one of three workers mid-epoch: the other two re-form the ring, take over
    /// its samples and finish with the same model; nothing is lost, and only the one
    /// step that was cut short is computed twice.
    #[test]
    fn survivors_finish_when_a_worker_dies_mid_epoch() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let board = std::sync::Arc::new((std::sync::Mutex::new(Vec::new()), std::sync::Condvar::new()));
        let (len, global, epochs) = (240, 24, 2);
        let results: Vec<thread::Result<RunSummary>> = thread::scope(|s| {
            let handles: Vec<_> = ring_of(3)
                .into_iter()
                .enumerate()
                .map(|(rank, ring)| {
                    let (seen, board) = (seen.clone(), board.clone());
                    s.spawn(move || {
                        let task = Recorded {
                            inner: ImageTask::new(synthetic(len, 3), synthetic(30, 4), |d| {
                                MlpConfig::new().with_hidden(16).init(d)
                            }),
                            seen,
                            die_at: (rank == 2).then_some(4),
                            calls: std::cell::Cell::new(0),
                        };
                        let options = TrainOptions::new(epochs, global, 7).with_optimizer(Optimizer::Adam, 1e-2);
                        let mut t = Trainer::new(task, Default::default(), ring, options)
                            .unwrap()
                            .with_membership(Box::new(Board::new(rank, &[2], &board)));
                        let mut events = vec![];
                        let summary = t.run(&mut |e| events.push(e)).unwrap();
                        assert!(
                            events
                                .iter()
                                .any(|e| matches!(e, Event::Migrated { lost, workers: 2, .. } if lost == &[2]))
                        );
                        (summary, t.parameters())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().map(|(s, _)| s)).collect()
        });
        assert!(results[2].is_err(), "worker 2 died");
        let a = results[0].as_ref().unwrap();
        let b = results[1].as_ref().unwrap();
        assert_eq!(a.lost_workers, vec![2]);
        assert_eq!(a.test_accuracy, b.test_accuracy);
        assert_eq!(a.history.len(), epochs);
        let mut counts = vec![0usize; len];
        for &i in seen.lock().unwrap().iter() {
            counts[i] += 1;
        }
        assert!(
            counts.iter().all(|&c| c == epochs || c == epochs + 1),
            "every sample in every epoch"
        );
        let repeated = counts.iter().filter(|&&c| c > epochs).count();
        assert!(
            repeated <= global,
            "only the interrupted step repeats ({repeated} samples)"
        );
    }

    /// What a worker thread of a test run ends with: its summary, model and events.
    type Finished = (RunSummary, Vec<f32>, Vec<Event>);

    /// A run's losses and accuracies by epoch, without each worker's own clock.
    fn curve(history: &[EpochRecord]) -> Vec<(usize, f64, Option<f64>)> {
        history
            .iter()
            .map(|h| (h.epoch, h.train_loss, h.test_accuracy))
            .collect()
    }

    /// Counts how often each of `len` samples was trained on.
    fn visits(seen: &std::sync::Mutex<Vec<usize>>, len: usize) -> Vec<usize> {
        let mut counts = vec![0usize; len];
        for &i in seen.lock().unwrap().iter() {
            counts[i] += 1;
        }
        counts
    }

    fn recorded(len: usize, seen: &std::sync::Arc<std::sync::Mutex<Vec<usize>>>, die_at: Option<usize>) -> Recorded {
        Recorded {
            inner: ImageTask::new(synthetic(len, 3), synthetic(30, 4), |d| {
                MlpConfig::new().with_hidden(16).init(d)
            }),
            seen: seen.clone(),
            die_at,
            calls: std::cell::Cell::new(0),
        }
    }

    /// Rank 2 dies mid-epoch; its replacement joins at the next epoch boundary,
    /// receives the whole state and trains the remaining epochs with the others:
    /// all three end with the same model and summary, and no sample is lost.
    #[test]
    fn a_lost_worker_rejoins_at_the_next_epoch() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let board: Entries = Default::default();
        let decisions = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let (len, global, epochs) = (240, 24, 3);
        let options = || TrainOptions::new(epochs, global, 7).with_optimizer(Optimizer::Adam, 1e-2);
        let membership = |rank| {
            let mut b = Board::new(rank, &[2, 3], &board);
            b.admit_from = Some(1);
            b.decisions = decisions.clone();
            Box::new(b)
        };
        let results: Vec<thread::Result<Finished>> = thread::scope(|s| {
            let mut handles: Vec<_> = ring_of(3)
                .into_iter()
                .enumerate()
                .map(|(rank, ring)| {
                    let task = recorded(len, &seen, (rank == 2).then_some(4));
                    let membership = membership(rank);
                    s.spawn(move || {
                        let mut t = Trainer::new(task, Default::default(), ring, options())
                            .unwrap()
                            .with_membership(membership);
                        let mut events = vec![];
                        let summary = t.run(&mut |e| events.push(e)).unwrap();
                        (summary, t.parameters(), events)
                    })
                })
                .collect();
            // The replacement for rank 2: it waits on the board for generation 2.
            let task = recorded(len, &seen, None);
            let mut joiner_board = membership(2);
            handles.push(s.spawn(move || {
                let regroup = joiner_board.regroup(2, "joining").unwrap();
                let mut t = Trainer::joining(task, Default::default(), regroup, 2, options())
                    .unwrap()
                    .with_membership(joiner_board);
                let mut events = vec![];
                let summary = t.run(&mut |e| events.push(e)).unwrap();
                (summary, t.parameters(), events)
            }));
            handles.into_iter().map(|h| h.join()).collect()
        });
        assert!(results[2].is_err(), "the first rank 2 died");
        let (a, pa, events) = results[0].as_ref().unwrap();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Migrated { lost, .. } if lost == &[2]))
        );
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Rejoined { epoch: 1, joined, workers: 3, .. } if joined == &[2])),
            "{events:?}"
        );
        assert_eq!(a.lost_workers, vec![2]);
        assert_eq!(a.rejoined_workers, vec![2]);
        assert_eq!(a.workers, 3);
        assert_eq!(a.history.len(), epochs);
        for r in [1, 3] {
            let (b, pb, _) = results[r].as_ref().unwrap();
            assert_eq!(pa, pb, "worker {r} ends with the same model");
            assert_eq!(
                curve(&a.history),
                curve(&b.history),
                "worker {r} reports the same history"
            );
            assert_eq!(a.test_accuracy, b.test_accuracy);
        }
        let (joiner, _, _) = results[3].as_ref().unwrap();
        assert!(joiner.per_worker[2].samples > 0, "the joiner trained");
        let counts = visits(&seen, len);
        assert!(
            counts.iter().all(|&c| c == epochs || c == epochs + 1),
            "every sample in every epoch: {counts:?}"
        );
        assert!(counts.iter().filter(|&&c| c > epochs).count() <= global);
    }

    /// A worker of a synchronous parameter-server run dies mid-epoch: the server
    /// fails (it waits for every client), and the survivors go on as one allreduce
    /// ring from the latest global model, taking over the lost worker's samples.
    #[test]
    fn parameter_server_workers_go_on_as_a_ring_when_one_dies() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let board: Entries = Default::default();
        let (len, global, epochs) = (240, 24, 2);
        let initial = params::flatten(&MlpConfig::new().with_hidden(16).init::<B>(&Default::default()));
        let (addr, server) = parameter_server(3, initial, None);
        let results: Vec<thread::Result<Finished>> = thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    let task = recorded(len, &seen, (rank == 2).then_some(4));
                    let membership = Box::new(Board::new(rank, &[2], &board));
                    s.spawn(move || {
                        let client =
                            ServerClient::connect(addr, "t", "k", rank as u32, Duration::from_secs(20)).unwrap();
                        let topology = Topology::Server {
                            client: Some(client),
                            staleness: None,
                            rank,
                            world: 3,
                            group: vec![rank],
                        };
                        let mut options = TrainOptions::new(epochs, global, 7).with_optimizer(Optimizer::Sgd, 1e-2);
                        options.strategy = Strategy::ParameterServer { staleness: 0 };
                        let ring = ring_of(1).pop().unwrap();
                        let mut t = Trainer::with_topology(task, Default::default(), ring, topology, options)
                            .unwrap()
                            .with_membership(membership);
                        let mut events = vec![];
                        let summary = t.run(&mut |e| events.push(e)).unwrap();
                        (summary, t.parameters(), events)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join()).collect()
        });
        let failed = server.join().unwrap().unwrap_err().to_string();
        assert!(failed.contains("disconnected") || failed.contains("client"), "{failed}");
        assert!(results[2].is_err(), "worker 2 died");
        let (a, pa, events) = results[0].as_ref().unwrap();
        let (b, pb, _) = results[1].as_ref().unwrap();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Migrated { lost, collapsed: true, workers: 2, .. } if lost == &[2])),
            "{events:?}"
        );
        assert_eq!(pa, pb, "the survivors agree on the model");
        assert_eq!(a.lost_workers, vec![2]);
        // The survivors agree exactly on the model and on every epoch after the loss;
        // in the epoch the server was lost, the step in flight when it went may be
        // counted in one survivor's mean loss and not the other's (seen once in CI:
        // 2.25381 vs 2.25423), so that epoch's loss is compared within 0.1 %.
        let (ca, cb) = (curve(&a.history), curve(&b.history));
        assert_eq!(ca.len(), cb.len());
        for (x, y) in ca.iter().zip(&cb) {
            assert_eq!((x.0, x.2), (y.0, y.2), "{ca:?} vs {cb:?}");
            assert!((x.1 - y.1).abs() <= 1e-3 * y.1.abs(), "{ca:?} vs {cb:?}");
        }
        assert_eq!(ca.last(), cb.last(), "the last epoch is the same on both");
        assert!(a.last_epoch_loss < a.first_epoch_loss, "{a:?}");
        let counts = visits(&seen, len);
        assert!(
            counts.iter().all(|&c| c == epochs || c == epochs + 1),
            "every sample in every epoch: {counts:?}"
        );
    }

    /// Starts a parameter server for `clients` on loopback, with `initial` as the
    /// global model.
    fn parameter_server(
        clients: usize,
        initial: Vec<f32>,
        staleness: Option<usize>,
    ) -> (
        std::net::SocketAddr,
        thread::JoinHandle<Result<crate::param_server::ServerReport, TrainError>>,
    ) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = thread::spawn(move || {
            let channels = hetero_comm::server::accept_clients(&listener, clients, "t", "k", Duration::from_secs(20))?;
            let options = crate::param_server::ServerOptions {
                staleness,
                optimizer: OptimizerConfig {
                    kind: Optimizer::Sgd,
                    learning_rate: 1e-2,
                },
            };
            crate::param_server::serve(channels, initial, None, options)
        });
        (addr, handle)
    }

    /// The parameter server (one group per worker) and the hierarchical strategy
    /// (groups {0, 1} and {2}) take exactly the allreduce step.
    #[test]
    fn parameter_server_and_hierarchical_steps_equal_the_allreduce_step() {
        let batch: Vec<usize> = (0..9).collect();
        let parts = [&batch[..4], &batch[4..7], &batch[7..]];
        let initial = params::flatten(&seeded_model(&cnn_task(), &Default::default(), 0));
        let mut solo = Trainer::new(
            cnn_task(),
            Default::default(),
            ring_of(1).pop().unwrap(),
            TrainOptions::new(1, 9, 5).with_optimizer(Optimizer::Sgd, 1e-2),
        )
        .unwrap();
        for _ in 0..2 {
            solo.step(&batch, 9).unwrap();
        }
        let expected = solo.parameters();
        for (strategy, groups) in [
            (
                Strategy::ParameterServer { staleness: 0 },
                vec![vec![0], vec![1], vec![2]],
            ),
            (Strategy::Hierarchical, vec![vec![0, 1], vec![2]]),
        ] {
            let (addr, server) = parameter_server(groups.len(), initial.clone(), None);
            let results: Vec<Vec<f32>> = thread::scope(|s| {
                let mut handles = vec![];
                for group in &groups {
                    for (position, ring) in ring_of(group.len()).into_iter().enumerate() {
                        let (group, rank) = (group.clone(), group[position]);
                        handles.push(s.spawn(move || {
                            let client = (position == 0).then(|| {
                                ServerClient::connect(addr, "t", "k", rank as u32, Duration::from_secs(20)).unwrap()
                            });
                            let topology = Topology::Server {
                                client,
                                staleness: None,
                                rank,
                                world: 3,
                                group,
                            };
                            let mut options = TrainOptions::new(1, 9, 5).with_optimizer(Optimizer::Sgd, 1e-2);
                            options.strategy = strategy;
                            let mut t = Trainer::with_topology(cnn_task(), Default::default(), ring, topology, options)
                                .unwrap();
                            for _ in 0..2 {
                                t.step(parts[rank], 9).unwrap();
                            }
                            let result = t.parameters();
                            if let Topology::Server { client: Some(c), .. } = t.topology {
                                c.bye().unwrap();
                            }
                            result
                        }));
                    }
                }
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let report = server.join().unwrap().unwrap();
            assert_eq!(report.steps, 2, "{strategy:?}");
            for r in &results {
                let worst = expected.iter().zip(r).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-5, "{strategy:?}: max parameter difference {worst}");
            }
        }
    }

    /// Asynchronous parameter server: workers run whole epochs and the loss falls.
    #[test]
    fn asynchronous_parameter_server_trains() {
        let initial = params::flatten(&MlpConfig::new().with_hidden(16).init::<B>(&Default::default()));
        let (addr, server) = parameter_server(2, initial, Some(2));
        let summaries: Vec<RunSummary> = thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    s.spawn(move || {
                        let client =
                            ServerClient::connect(addr, "t", "k", rank as u32, Duration::from_secs(20)).unwrap();
                        let topology = Topology::Server {
                            client: Some(client),
                            staleness: Some(2),
                            rank,
                            world: 2,
                            group: vec![rank],
                        };
                        let task = ImageTask::<B, _>::new(synthetic(400, 3), synthetic(100, 4), |d| {
                            MlpConfig::new().with_hidden(16).init(d)
                        });
                        let mut options = TrainOptions::new(3, 40, 1).with_optimizer(Optimizer::Sgd, 1e-2);
                        options.strategy = Strategy::ParameterServer { staleness: 2 };
                        let ring = ring_of(1).pop().unwrap();
                        let mut t = Trainer::with_topology(task, Default::default(), ring, topology, options).unwrap();
                        t.run(&mut |_| {}).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let report = server.join().unwrap().unwrap();
        assert_eq!(report.pushes, 2 * 3 * 10, "every step of every worker was pushed");
        let s = &summaries[0];
        assert!(s.last_epoch_loss < s.first_epoch_loss, "{s:?}");
        assert_eq!(
            summaries[0].test_accuracy, summaries[1].test_accuracy,
            "evaluation is global"
        );
    }

    /// Stopping after a checkpoint and resuming from it ends exactly where an
    /// uninterrupted run ends: parameters, Adam's moments and the data order all
    /// carry over.
    #[test]
    fn resuming_from_a_checkpoint_continues_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.bin");
        let task = || {
            ImageTask::<B, _>::new(synthetic(200, 3), synthetic(50, 4), |d| {
                MlpConfig::new().with_hidden(16).init(d)
            })
        };
        let options = |epochs: usize| {
            let mut o = TrainOptions::new(epochs, 20, 9).with_optimizer(Optimizer::Adam, 1e-2);
            o.checkpoint = Some(path.clone());
            o
        };
        let mut straight = Trainer::new(task(), Default::default(), ring_of(1).pop().unwrap(), options(3)).unwrap();
        let whole = straight.run(&mut |_| {}).unwrap();
        let expected = straight.parameters();

        let mut first = Trainer::new(task(), Default::default(), ring_of(1).pop().unwrap(), options(2)).unwrap();
        let mut saved = vec![];
        first
            .run(&mut |e| {
                if let Event::Checkpointed { epoch, .. } = e {
                    saved.push(epoch)
                }
            })
            .unwrap();
        assert_eq!(saved, vec![1, 2]);
        let mut again = options(3);
        again.resume = Some(path.clone());
        let mut second = Trainer::new(task(), Default::default(), ring_of(1).pop().unwrap(), again).unwrap();
        let resumed = second.run(&mut |_| {}).unwrap();
        assert_eq!(second.parameters(), expected);
        assert_eq!(resumed.resumed_at_epoch, Some(2));
        assert_eq!(resumed.history.len(), 3);
        assert_eq!(resumed.test_accuracy, whole.test_accuracy);

        // A checkpoint of another model is refused with both sizes named.
        let mut wrong = TrainOptions::new(3, 20, 9);
        wrong.resume = Some(path.clone());
        let other = ImageTask::<B, _>::new(synthetic(200, 3), synthetic(50, 4), |d| {
            MlpConfig::new().with_hidden(8).init(d)
        });
        let err = Trainer::new(other, Default::default(), ring_of(1).pop().unwrap(), wrong)
            .err()
            .unwrap();
        assert!(err.to_string().contains("this job's model has"), "{err}");
    }
}
