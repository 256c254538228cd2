//! Data-parallel training over a [`Ring`], surviving the loss of workers.
//!
//! Every worker starts from rank 0's parameters (broadcast) and trains on its part of
//! each global batch, as an [`hetero_data::assign::Assignment`] says. Hetero owns the optimiser
//! ([`crate::optim`]), so the whole training state is flat vectors.
//!
//! Reading order:
//! - this file: one step, evaluation and the epoch loop;
//! - `build`: a worker of a ring, of a parameter server's group, or one joining;
//! - `options`: what to train, built from a job's spec in one place;
//! - `aggregate`: how the workers combine their work — one box per strategy
//!   (allreduce, local SGD, a group of a parameter server);
//! - `elastic`: when the ring breaks or lost workers come back, re-forming it and
//!   handing over the run; between epochs, following measured throughput;
//! - `run_state`: what the members of a ring agree on, and its one codec;
//! - `meter`: samples, compute and communication time, and the throttle that
//!   emulates a slower device.
//!
//! A weighted run sets its split from the throughput every worker measured a few
//! steps into its first epoch (compute scores are only the starting guess);
//! with `rebalance` the split follows measured throughput again, between epochs
//! and every [`elastic::PACE_STEPS`] steps within one, less often while the split
//! holds ([`elastic::next_pace`], [`Event::Rebalanced`]),
//! and shards can pass a fraction of their samples to the ring neighbour. When the
//! ring breaks, the trainer asks its [`Membership`] for a ring of the survivors, they
//! adopt the most advanced survivor's model, optimiser and position, share out the
//! lost workers' remaining samples, and go on ([`Event::Migrated`]). With a
//! parameter server, any loss (a worker, or the server itself) turns the run into
//! one allreduce ring of the surviving workers, from the latest global model.
//! Between epochs, lost workers whose node came back join the ring
//! ([`Trainer::joining`], [`Event::Rejoined`]): they receive the whole state and a
//! share of the work.

mod aggregate;
mod build;
mod elastic;
mod meter;
mod options;
mod run_state;
mod samples;

use std::time::Instant;

use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use hetero_comm::Ring;
use hetero_comm::liveness::Liveness;
use hetero_data::shard::{self, Split};

pub use self::build::ServerGroup;
pub use self::elastic::REBALANCE_DRIFT;
pub use self::meter::{Throttle, compute_threads};
pub use self::options::TrainOptions;

use self::aggregate::{Aggregate, Flat, Grads, Work};
use self::elastic::Boundary;
use self::meter::Meter;
use self::run_state::RunState;
use self::samples::Moved;
use crate::checkpoint::Checkpoint;
use crate::membership::{Membership, Regroup};
use crate::params;
use crate::report::{
    Coverage, EpochRecord, Event, LOSS_CURVE_POINTS, RunSummary, WorkerFigures, downsample, seconds_to_accuracy,
};
use crate::{Evaluation, Staged, Task, TrainError};

/// One worker's side of a data-parallel run.
pub struct Trainer<B: AutodiffBackend, T: Task<B>> {
    local: Local<B, T>,
    flat: Flat,
    aggregate: Box<dyn Aggregate>,
    /// `None` only while the ring re-forms.
    ring: Option<Ring>,
    membership: Box<dyn Membership>,
    /// This worker's current rank among all workers.
    rank: usize,
    /// How many rings this worker has formed since the first.
    generation: u64,
    options: TrainOptions,
    meter: Meter,
    run: RunState,
    /// A joining worker's ring, to adopt the others' state on at the start of `run`.
    pending: Option<Regroup>,
    /// Holds no state of the run yet (a joining worker before it adopted one).
    joining: bool,
    /// What samples travelled to members that lacked them.
    moved: Moved,
    /// The split may have handed members samples they lack: they fill before
    /// their next step or evaluation (see `samples`).
    samples_due: bool,
    /// Events raised inside a step or an evaluation, for the run to report.
    pending_events: Vec<Event>,
    /// This worker's samples and compute time after its first step, which warms
    /// up: throughput is measured from there.
    warmed: Option<(u64, std::time::Duration)>,
    /// The run's step count, and this worker's samples and compute time, where
    /// its pace window began (the epoch's start or the last check of the split
    /// within it).
    pace_mark: (u64, u64, std::time::Duration),
    /// Steps from `pace_mark` to the next check of the split ([`elastic::next_pace`]).
    pace_every: u64,
    /// Every member of this ring holds the whole dataset (learnt in a fill of
    /// the samples): later fills have nothing to do.
    all_hold_everything: bool,
}

/// The user's task, its model and the device it computes on.
struct Local<B: AutodiffBackend, T: Task<B>> {
    task: T,
    /// `None` only inside a step.
    model: Option<T::Model>,
    device: B::Device,
    /// Scalars at the end of the flat parameters that steps compute first
    /// ([`Task::head_params`]); `None`: one stage (or `TrainOptions::overlap`
    /// is off). The model's shape never changes, so this is asked once.
    head: Option<usize>,
}

impl<B: AutodiffBackend, T: Task<B>> Local<B, T> {
    fn model(&self) -> &T::Model {
        self.model.as_ref().expect("model is present between steps")
    }

    /// Gradients of the samples `indices`, each multiplied by `scale`, and the
    /// batch's mean loss: in two stages when the task's loss comes so
    /// ([`Task::staged_loss`]), for every worker alike, so that every worker
    /// runs the same collectives. An empty batch contributes `len` zeros.
    fn gradients(&mut self, indices: &[usize], scale: f32, len: usize) -> Grads<'_> {
        let Some(head) = self.head.filter(|&h| h > 0 && h < len) else {
            let (flat, loss) = self.whole_gradients(indices, scale, len);
            return Grads::Whole(flat, loss);
        };
        let range = len - head..len;
        if indices.is_empty() {
            return Grads::Staged {
                first: vec![0.0; len],
                range,
                loss: 0.0,
                rest: Box::new(move || vec![0.0; len]),
            };
        }
        let model = self.model.take().expect("model is present between steps");
        let batch = self.task.train_batch(indices, &self.device);
        let Staged { features, leaf, loss } = match self.task.staged_loss(&model, batch) {
            Ok(staged) => staged,
            Err(batch) => {
                // The task said its loss comes in two stages but gave one: the
                // gradients are whole, sent as two stages all the same, so that
                // this worker runs the collectives every other one runs.
                self.model = Some(model);
                let (flat, loss) = self.whole_gradients_of(batch, scale);
                return Grads::Staged {
                    first: flat.clone(),
                    range,
                    loss,
                    rest: Box::new(move || flat),
                };
            }
        };
        let grads = loss.backward();
        let leaf_grad = leaf.grad(&grads).expect("the head's input is tracked");
        let mut head_grads = GradientsParams::from_grads(grads, &model);
        let local_loss = loss.into_scalar().elem::<f32>();
        let (first, _) = params::take_grads::<B, _>(&model, &mut head_grads, scale);
        let slot = &mut self.model;
        Grads::Staged {
            first,
            range,
            loss: local_loss,
            rest: Box::new(move || {
                // The body's gradients: backward from its features, weighted by
                // the gradient the head's pass gave them.
                let weighted = (features * Tensor::from_inner(leaf_grad)).sum();
                let mut body_grads = GradientsParams::from_grads(weighted.backward(), &model);
                let (flat, _) = params::take_grads::<B, _>(&model, &mut body_grads, scale);
                *slot = Some(model);
                flat
            }),
        }
    }

    /// [`Local::gradients`] in one stage.
    fn whole_gradients(&mut self, indices: &[usize], scale: f32, len: usize) -> (Vec<f32>, f32) {
        if indices.is_empty() {
            return (vec![0.0; len], 0.0);
        }
        let batch = self.task.train_batch(indices, &self.device);
        self.whole_gradients_of(batch, scale)
    }

    /// Gradients of `batch`, each multiplied by `scale`, and its mean loss.
    fn whole_gradients_of(&mut self, batch: T::Batch, scale: f32) -> (Vec<f32>, f32) {
        let model = self.model.take().expect("model is present between steps");
        let loss = self.task.loss(&model, batch);
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        let local_loss = loss.into_scalar().elem::<f32>();
        let (flat, _) = params::take_grads::<B, _>(&model, &mut grads, scale);
        self.model = Some(model);
        (flat, local_loss)
    }

    /// Loads flat parameters into the model.
    fn load(&mut self, params: &[f32]) {
        let model = self.model.take().expect("model is present between steps");
        self.model = Some(params::load(model, params));
    }
}

impl<B: AutodiffBackend, T: Task<B>> Trainer<B, T> {
    /// Lets the run survive lost workers by regrouping through `membership`.
    pub fn with_membership(mut self, membership: Box<dyn Membership>) -> Self {
        self.membership = membership;
        self
    }

    /// The model as it is now.
    pub fn model(&self) -> &T::Model {
        self.local.model()
    }

    /// All parameters, flattened (identical on every worker after a synchronous step).
    pub fn parameters(&self) -> Vec<f32> {
        self.flat.params.clone()
    }

    /// Number of workers.
    fn world(&self) -> usize {
        self.run.members.len()
    }

    fn ring(&mut self) -> &mut Ring {
        self.ring.as_mut().expect("a ring is present between regroups")
    }

    /// Sums `buf` over all workers (every worker gets the totals).
    fn global_sum(&mut self, buf: &mut [f32]) -> Result<(), TrainError> {
        let ring = self.ring.as_mut().expect("a ring is present between regroups");
        self.aggregate.global_sum(ring, buf)
    }

    /// One step on this worker's samples `indices`, part of a batch of `global`
    /// samples over which the gradient is averaged (the global batch; with an
    /// asynchronous parameter server, this worker's group's batch, since each push
    /// is a step of its own). Returns the batch's mean loss (with local-sgd, the
    /// local batch's but at an average made at once). With local-sgd and
    /// `overlap`, an average made after this step travels while the next
    /// `sync_every / 2` steps compute (at least one), and lands after them or
    /// when the epoch ends.
    pub fn step(&mut self, indices: &[usize], global: usize) -> Result<f32, TrainError> {
        let Trainer {
            local,
            flat,
            aggregate,
            ring,
            meter,
            ..
        } = self;
        let mut clock = meter.step();
        let len = flat.params.len();
        let work = Work {
            samples: indices.len(),
            weight: indices.len() as f32 / global.max(1) as f32,
            gradients: Box::new(|scale| local.gradients(indices, scale, len)),
        };
        let ring = ring.as_mut().expect("a ring is present between regroups");
        let loss = aggregate.step(ring, flat, &mut clock, work)?;
        local.load(&flat.params);
        clock.finish(indices.len());
        self.run.updates += 1;
        Ok(loss)
    }

    /// Evaluates the test set, each worker a part by its share of the training
    /// batch (so a slow device does not hold the others up); every worker gets
    /// the totals.
    pub fn evaluate(&mut self) -> Result<Option<Evaluation>, TrainError> {
        self.evaluate_with(&mut [])
    }

    /// The test samples `[start, end)` member `rank` evaluates (and, on a host
    /// without the dataset, must hold): its share of the training batch.
    fn test_part(&self, rank: usize) -> (usize, usize) {
        eval_part(self.local.task.test_len(), &self.run.shares(), self.world(), rank)
    }

    /// [`Trainer::evaluate`], summing `extra` over the workers in the same exchange.
    fn evaluate_with(&mut self, extra: &mut [f32]) -> Result<Option<Evaluation>, TrainError> {
        self.fill_if_due()?;
        let len = self.local.task.test_len();
        let started = Instant::now();
        let (a, b) = self.test_part(self.rank);
        let mut sums = Evaluation::default();
        let step = self.options.eval_batch.max(1);
        for start in (a..b).step_by(step) {
            let indices: Vec<usize> = (start..(start + step).min(b)).collect();
            let batch = self.local.task.test_batch(&indices, &self.local.device);
            let e = self.local.task.evaluate(self.local.model(), batch);
            sums.loss_sum += e.loss_sum;
            sums.correct += e.correct;
            sums.count += e.count;
        }
        let mut buf = vec![sums.loss_sum as f32, sums.correct as f32, sums.count as f32];
        buf.extend_from_slice(extra);
        let computed = started.elapsed();
        self.global_sum(&mut buf)?;
        self.meter.add(computed, started.elapsed() - computed);
        extra.copy_from_slice(&buf[3..]);
        Ok((len > 0).then(|| Evaluation {
            loss_sum: buf[0] as f64,
            correct: buf[1] as f64,
            count: buf[2] as f64,
        }))
    }

    /// Fills the members' samples when the split may have moved some (a
    /// collective: every member reaches it at the same point), reporting what
    /// moved through the events of the run.
    fn fill_if_due(&mut self) -> Result<(), TrainError> {
        if self.samples_due {
            if let Some(e) = self.fill_samples()? {
                self.pending_events.push(e);
            }
            self.samples_due = false;
        }
        Ok(())
    }

    /// Follows a check of the split within the epoch that found `rates`; the
    /// next check comes sooner if it moved the split ([`elastic::next_pace`]:
    /// every member sees the same sums, so backs off alike).
    fn follow_pace(&mut self, rates: &[f32]) -> Result<(), TrainError> {
        let moved = self.follow_rates(rates, Boundary::WithinEpoch)?;
        self.pace_every = elastic::next_pace(self.pace_every, moved.is_some());
        self.pending_events.extend(moved);
        Ok(())
    }

    /// This worker's training samples per second of compute since its first step
    /// (which warms up: allocations, caches); a worker that has taken only that
    /// step (one that just joined) counts it too.
    fn measured_rate(&self) -> f64 {
        let (samples, compute) = match self.warmed {
            Some((s, c)) if self.meter.samples > s => (s, c),
            _ => (0, std::time::Duration::ZERO),
        };
        (self.meter.samples - samples) as f64 / (self.meter.compute - compute).as_secs_f64().max(1e-9)
    }

    /// One step of the epoch from the assignment, ending the epoch on one agreed
    /// model; returns the step's loss and this worker's samples in it.
    ///
    /// It begins with what the members' agreed state says is due, in one order —
    /// the first measurement of a weighted run, then filling samples — so that
    /// after a ring re-formed mid-operation every member, retrying this step from
    /// the state it adopted, takes the same collectives.
    fn next_step(&mut self) -> Result<(f32, usize), TrainError> {
        let measuring = self.world() > 1
            && self.run.measure_at.is_some_and(|at| self.run.updates >= at)
            && !self.run.assignment.epoch_done();
        let arrived = self.aggregate.rider().and_then(|r| r.arrived.take());
        if measuring {
            // The first measurement decides the split at once (it starts from
            // mere scores): a collective of its own.
            let event = self.follow_throughput(self.measured_rate(), Boundary::WithinEpoch)?;
            self.pending_events.extend(event);
            self.pace_every = elastic::PACE_STEPS;
            self.mark_pace();
        } else if let Some(rates) = arrived {
            // A check's rates came back with the strategy's exchange, after the
            // same step on every member: each applies them before this one.
            self.follow_pace(&rates)?;
        } else if self.pace_due() {
            let mut rates = self.own_rate(self.window_rate());
            // Rates ride only when they come back with enough of the epoch left
            // to follow them (local SGD may average rarely); else they take a
            // collective of their own.
            let left_after = self
                .run
                .assignment
                .steps_left()
                .saturating_sub(self.aggregate.steps_to_exchange());
            let in_time = left_after > (elastic::PACE_STEPS / 2) as usize;
            match self.aggregate.rider().filter(|_| in_time) {
                Some(rider) => rider.waiting = Some(rates),
                None => {
                    self.global_sum(&mut rates)?;
                    self.follow_pace(&rates)?;
                }
            }
            self.mark_pace();
        }
        self.fill_if_due()?;
        let indices = self.run.assignment.next_batch(self.rank).to_vec();
        let global = self.aggregate.step_batch(&self.run.assignment);
        let last = self.run.assignment.steps_left() == 1;
        let mut loss = self.step(&indices, global)?;
        if last {
            let weight = indices.len() as f32 / global.max(1) as f32;
            let ring = self.ring.as_mut().expect("a ring is present between regroups");
            if let Some(agreed) = self.aggregate.end_epoch(ring, &mut self.flat, weight, loss)? {
                self.local.load(&self.flat.params);
                loss = agreed;
            }
        }
        self.run.assignment.advance();
        Ok((loss, indices.len()))
    }

    /// Trains for the configured epochs, evaluating after each, reporting through
    /// `on_event`; returns the run's summary (the same on every worker).
    pub fn run(&mut self, on_event: &mut dyn FnMut(Event)) -> Result<RunSummary, TrainError> {
        let o = self.options.clone();
        let len = self.local.task.train_len();
        if len < o.global_batch {
            return Err(TrainError::Config(format!(
                "{len} training samples cannot fill one global batch of {} over {} workers",
                o.global_batch,
                self.world()
            )));
        }
        // A joining worker takes over the run's state from the ring it joined.
        let joined = self.resilient(on_event, |t| match t.pending.take() {
            Some(regroup) => t.adopt_ring(regroup, false),
            None => Ok(vec![]),
        })?;
        joined.into_iter().for_each(&mut *on_event);
        // A resumed (or joined) run's clock goes on from where the run stood.
        let earlier = self.run.history.last().map_or(0.0, |h: &EpochRecord| h.elapsed_secs);
        let started = Instant::now();
        let mut last_event = Instant::now() - o.event_interval;
        let mut last_eval = None;
        let mut losses = Vec::new();
        while self.run.epoch < o.epochs {
            let epoch = self.run.epoch;
            self.run.assignment.begin_epoch(o.seed, epoch);
            self.samples_due = true;
            // Rates of a check that came back after the last epoch's last step
            // (or not at all) are of a split that is no more.
            if let Some(rider) = self.aggregate.rider() {
                *rider = Default::default();
            }
            self.mark_pace();
            let mut loss_share = 0.0f64;
            let mut loss_sum = 0.0f64;
            let (epoch_samples, epoch_compute) = (self.meter.samples, self.meter.compute);
            // The rate shown is training speed: evaluation time stays out of it.
            let (mut window_start, mut window_samples) = (Instant::now(), 0usize);
            let mut step = 0;
            while !self.run.assignment.epoch_done() {
                let (loss, local) = self.resilient(on_event, |t| t.next_step())?;
                std::mem::take(&mut self.pending_events)
                    .into_iter()
                    .for_each(&mut *on_event);
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
                self.warmed.get_or_insert((self.meter.samples, self.meter.compute));
                // Steps in the epoch (the first measurement of a weighted run may
                // re-share it).
                let steps = step + self.run.assignment.steps_left();
                // What a stalled-worker watchdog waits for (hetero_comm::liveness).
                Liveness::global().progressed();
                let done = self.run.assignment.epoch_done();
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
            // The epoch's training loss: every worker's loss, weighted by its samples,
            // summed in the evaluation's exchange.
            let extra = [loss_share as f32];
            let (eval, sums) = self.resilient(on_event, |t| {
                let mut e = extra;
                let r = t.evaluate_with(&mut e)?;
                Ok((r, e))
            })?;
            std::mem::take(&mut self.pending_events)
                .into_iter()
                .for_each(&mut *on_event);
            Liveness::global().progressed();
            // With allreduce every worker already holds each step's global loss; with
            // local steps the workers' weighted shares add up to it.
            let train_loss = if self.aggregate.losses_are_global() {
                loss_sum
            } else {
                sums[0] as f64
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
            let (samples, visited, distinct) = self.run.assignment.coverage();
            self.run.history.push(EpochRecord {
                epoch,
                train_loss,
                test_accuracy,
                elapsed_secs,
                coverage: Coverage {
                    samples,
                    visited,
                    distinct,
                },
                shares: self.run.shares(),
            });
            last_eval = eval;
            self.run.epoch += 1;
            self.save_checkpoint_if_due(on_event)?;
            if self.run.epoch < o.epochs {
                let rate = (self.meter.samples - epoch_samples) as f64
                    / (self.meter.compute - epoch_compute).as_secs_f64().max(1e-9);
                self.between_epochs(rate, on_event)?;
            }
        }
        let wall = started.elapsed().as_secs_f64();
        let per_worker = self.resilient(on_event, |t| t.gather_figures(wall))?;
        let total_samples: u64 = per_worker.iter().map(|w| w.samples).sum();
        self.aggregate.finish()?;
        let history = &self.run.history;
        Ok(RunSummary {
            workers: self.run.total_workers,
            strategy: o.strategy.name().into(),
            lost_workers: self.run.lost.clone(),
            rejoined_workers: self.run.rejoined.clone(),
            rebalances: self.run.rebalances,
            moved_samples: self.moved.samples,
            moved_bytes: self.moved.bytes,
            moved_secs: self.moved.secs,
            resumed_at_epoch: self.run.resumed_at,
            backend: o.backend.clone(),
            epochs: o.epochs,
            global_batch_size: o.global_batch,
            test_accuracy: last_eval.map(|e| e.correct / e.count.max(1.0)),
            test_loss: last_eval.map(|e| e.loss_sum / e.count.max(1.0)),
            first_epoch_loss: history.first().map_or(f64::NAN, |h| h.train_loss),
            last_epoch_loss: history.last().map_or(f64::NAN, |h| h.train_loss),
            samples_per_sec: total_samples as f64 / wall.max(1e-9),
            wall_secs: wall,
            seconds_to_accuracy: seconds_to_accuracy(history),
            history: history.clone(),
            per_worker,
            loss_curve: downsample(&losses, LOSS_CURVE_POINTS),
        })
    }

    /// Says goodbye to the parameter server, if this worker speaks to one (a run
    /// does so at its end; a caller driving [`Trainer::step`] itself calls this).
    pub fn finish(&mut self) -> Result<(), TrainError> {
        self.aggregate.finish()
    }

    /// After an epoch: the lowest-ranked worker saves a checkpoint when one is due.
    fn save_checkpoint_if_due(&mut self, on_event: &mut dyn FnMut(Event)) -> Result<(), TrainError> {
        let o = &self.options;
        let epoch = self.run.epoch;
        let due = o.checkpoint_every > 0 && (epoch.is_multiple_of(o.checkpoint_every) || epoch == o.epochs);
        let Some(path) = o.checkpoint.as_ref().filter(|_| due && self.rank == 0) else {
            return Ok(());
        };
        Checkpoint {
            epoch,
            params: self.flat.params.clone(),
            // With a parameter server the optimiser lives there.
            optimizer: self
                .aggregate
                .holds_optimizer()
                .then(|| self.flat.optimizer.state().clone()),
            strategy: o.strategy.name().into(),
            workers: self.world(),
            history: self.run.history.clone(),
        }
        .save(path)?;
        on_event(Event::Checkpointed {
            epoch,
            path: path.display().to_string(),
        });
        Ok(())
    }

    /// Between two epochs: follows measured throughput (`rate`, this worker's
    /// samples per second of compute over the epoch), passes samples to the
    /// neighbours and lets lost workers back in. The throughput is followed with
    /// `rebalance`; always when the first measurement of a weighted run is still
    /// due; and once after a weighted run's first epoch, whose whole-epoch
    /// figures settle a split that a few steps' measurement may have missed (a
    /// worker under a CPU quota can look fast for a few steps).
    fn between_epochs(&mut self, rate: f64, on_event: &mut dyn FnMut(Event)) -> Result<(), TrainError> {
        let o = self.options.clone();
        let first_epoch_ended = o.measure_split && self.run.epoch == 1;
        if (o.rebalance || self.run.measure_at.is_some() || first_epoch_ended)
            && self.world() > 1
            && let Some(e) = self.resilient(on_event, |t| t.follow_throughput(rate, Boundary::BetweenEpochs))?
        {
            on_event(e);
        }
        let split = Split::weighted(&self.run.shares());
        self.run
            .assignment
            .exchange(o.exchange_fraction, &split, o.seed, self.run.epoch);
        let joined = self.resilient(on_event, |t| t.admit_joiners())?;
        joined.into_iter().for_each(&mut *on_event);
        Ok(())
    }

    /// Every worker's figures, gathered by an allreduce of per-rank slots (by
    /// original rank; lost workers report nothing).
    fn gather_figures(&mut self, wall: f64) -> Result<Vec<WorkerFigures>, TrainError> {
        let me = self.run.members[self.rank];
        let mut slots = self.meter.slots(me, self.run.total_workers);
        self.global_sum(&mut slots)?;
        Ok(meter::figures(&slots, wall))
    }
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

/// The test samples `[start, end)` that worker `rank` of `world` evaluates: its
/// share of the training batch (`shares`, by rank) of the `len` samples, so every
/// worker evaluates for about as long as it steps; a balanced part when the shares
/// do not describe this ring.
fn eval_part(len: usize, shares: &[f64], world: usize, rank: usize) -> (usize, usize) {
    if shares.len() == world {
        Split::weighted(shares).shard_bounds(len, rank)
    } else {
        shard::balanced(len, world, rank)
    }
}

#[cfg(test)]
mod tests {
    use super::eval_part;

    #[test]
    fn a_slow_worker_evaluates_its_share_and_every_sample_once() {
        let shares = [0.5714, 0.2857, 0.1429];
        let parts: Vec<_> = (0..3).map(|r| eval_part(1000, &shares, 3, r)).collect();
        assert_eq!(parts[0].0, 0);
        assert_eq!(parts[2].1, 1000);
        assert!(parts.windows(2).all(|w| w[0].1 == w[1].0), "{parts:?}");
        let lens: Vec<usize> = parts.iter().map(|(a, b)| b - a).collect();
        assert!(lens[2] < 150 && lens[0] > 560, "{lens:?}");
        // Shares of another ring (a worker was just lost): balanced parts.
        assert_eq!(eval_part(10, &shares, 2, 1), (5, 10));
    }
}
