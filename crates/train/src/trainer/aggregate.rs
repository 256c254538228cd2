//! How workers combine their work: one [`Aggregate`] per strategy.
//!
//! ## Design
//! A step is the same everywhere up to the point where this worker holds its
//! gradients; what happens next is the strategy, and nothing else in the trainer
//! knows which one runs. [`Allreduce`] sums weighted gradients over the ring and
//! every worker applies the same update; [`LocalSgd`] steps alone and averages the
//! models every `k` steps; [`ThroughServer`] sums over its group's ring and lets
//! the group's first member exchange the sum with the parameter server. When a
//! ring loses a member, a server's group cannot go on (the server waits for every
//! group), so its box hands back an allreduce box ([`Aggregate::on_loss`]) and
//! the trainer swaps one for the other — nothing else changes.

use std::ops::Range;

use hetero_comm::server::ServerClient;
use hetero_comm::{Precision, Ring};
use hetero_data::assign::Assignment;
use hetero_job::Strategy;

use super::meter::StepClock;
use crate::TrainError;
use crate::optim::FlatOptimizer;

/// The model as the workers exchange it: parameters and the optimiser's state,
/// flattened.
pub(crate) struct Flat {
    /// Every parameter, in the model's visiting order.
    pub params: Vec<f32>,
    /// The optimiser over them.
    pub optimizer: FlatOptimizer,
}

/// This worker's part of one step.
pub(crate) struct Work<'a> {
    /// Samples in this worker's batch (0: it contributes nothing).
    pub samples: usize,
    /// This worker's share of the batch the step averages over.
    pub weight: f32,
    /// Computes this worker's gradients, each multiplied by the scale given, and
    /// its batch's mean loss.
    pub gradients: Box<dyn FnOnce(f32) -> Grads<'a> + 'a>,
}

/// A worker's gradients: whole, or in two stages (the head's first, see
/// [`crate::Staged`]) so that the head's can travel while the rest are computed.
pub(crate) enum Grads<'a> {
    /// Every parameter's gradient, and the batch's mean loss.
    Whole(Vec<f32>, f32),
    /// The head's gradients in `first` (zeros outside `range`); `rest` computes
    /// the others (zeros inside `range`).
    Staged {
        first: Vec<f32>,
        range: Range<usize>,
        loss: f32,
        rest: Box<dyn FnOnce() -> Vec<f32> + 'a>,
    },
}

impl Grads<'_> {
    /// Every gradient at once, and the loss.
    fn whole(self) -> (Vec<f32>, f32) {
        match self {
            Grads::Whole(flat, loss) => (flat, loss),
            Grads::Staged {
                mut first,
                range,
                loss,
                rest,
            } => {
                let mut rest = rest();
                rest[range.clone()].copy_from_slice(&first[range.clone()]);
                std::mem::swap(&mut first, &mut rest);
                (first, loss)
            }
        }
    }
}

/// One strategy's way of turning every worker's gradients into the next model.
pub(crate) trait Aggregate: Send {
    /// One step: computes this worker's gradients through `work`, combines them
    /// with the others' over `ring` (inside `clock.communicate`, after
    /// `clock.idle`) and leaves the next model in `model`. Returns the step's
    /// loss (the global batch's, or with local SGD this worker's but at an
    /// average made at once).
    fn step(
        &mut self,
        ring: &mut Ring,
        model: &mut Flat,
        clock: &mut StepClock<'_>,
        work: Work<'_>,
    ) -> Result<f32, TrainError>;

    /// At the end of an epoch, after a step with share `weight` and loss `loss`:
    /// brings every worker to one agreed model when steps leave them apart, and
    /// returns the global loss it found then (`None`: they already agree).
    fn end_epoch(
        &mut self,
        _ring: &mut Ring,
        _model: &mut Flat,
        _weight: f32,
        _loss: f32,
    ) -> Result<Option<f32>, TrainError> {
        Ok(None)
    }

    /// Sums `buf` over every worker of the job; every worker gets the totals.
    fn global_sum(&mut self, ring: &mut Ring, buf: &mut [f32]) -> Result<(), TrainError> {
        ring.allreduce_sum(buf)?;
        Ok(())
    }

    /// The batch the next step's gradient is averaged over.
    fn step_batch(&self, assignment: &Assignment) -> usize {
        assignment.next_global_batch()
    }

    /// Whether every worker's step loss is the global batch's (else the epoch's
    /// loss is the sum of the workers' weighted shares).
    fn losses_are_global(&self) -> bool {
        true
    }

    /// Whether this worker's optimiser state is the job's (not the server's).
    fn holds_optimizer(&self) -> bool {
        true
    }

    /// After any new ring formed (a loss, joiners), once every member adopted
    /// one state: forgets whatever it held that the members may no longer share.
    fn on_regroup(&mut self) {}

    /// After the ring lost a member: the aggregation the survivors go on with,
    /// when it is not this one.
    fn on_loss(&mut self) -> Option<Box<dyn Aggregate>> {
        None
    }

    /// At the end of the run: says goodbye to whatever it holds open.
    fn finish(&mut self) -> Result<(), TrainError> {
        Ok(())
    }

    /// Where floats ride in this aggregation's own exchanges (`None`: it has
    /// none every worker makes alike, and the trainer sums them itself).
    fn rider(&mut self) -> Option<&mut Rider> {
        None
    }

    /// Steps until floats given to [`Aggregate::rider`] now are summed (0: in
    /// this step's exchange) — the same on every member.
    fn steps_to_exchange(&self) -> usize {
        0
    }
}

/// Floats the trainer has summed over the workers in the next exchange a
/// strategy makes anyway — the rates of a check of the split — so that they
/// need no collective of their own: a collective is a barrier, where every
/// worker waits for the slowest to arrive (25–80 ms a check on 1 / 0.5 / 0.25
/// devices), while the strategy's own exchange is already waited for, or
/// hidden behind a step's compute.
///
/// Every member boards the same number of floats at the same exchange (the
/// trainer decides on step counts they agree on), so the sums arrive after the
/// same step everywhere.
#[derive(Debug, Default)]
pub(crate) struct Rider {
    /// Waiting for the next exchange.
    pub waiting: Option<Vec<f32>>,
    /// Boarded an exchange whose sums are not back yet.
    aboard: bool,
    /// Summed over the workers, for the trainer to take.
    pub arrived: Option<Vec<f32>>,
}

impl Rider {
    /// Whether floats handed over are not yet back in the trainer's hands
    /// (waiting, aboard, or arrived and not taken).
    pub fn travelling(&self) -> bool {
        self.waiting.is_some() || self.aboard || self.arrived.is_some()
    }

    /// Appends what waits to `buf`, an exchange's buffer; returns how many floats.
    fn board(&mut self, buf: &mut Vec<f32>) -> usize {
        let riders = self.waiting.take().unwrap_or_default();
        buf.extend(&riders);
        self.aboard |= !riders.is_empty();
        riders.len()
    }

    /// Takes the last `n` floats of the summed `buf` as what arrived.
    fn alight(&mut self, buf: &mut Vec<f32>, n: usize) {
        if n > 0 {
            self.arrived = Some(buf.split_off(buf.len() - n));
            self.aboard = false;
        }
    }
}

/// The aggregation a ring of every worker runs for `strategy`, exchanging at
/// `precision`; with `overlap`, local SGD's averages travel while the next
/// steps compute ([`LocalSgd`]).
pub(crate) fn on_ring(
    strategy: Strategy,
    precision: Precision,
    overlap: bool,
) -> Result<Box<dyn Aggregate>, TrainError> {
    match strategy {
        Strategy::Allreduce => Ok(Box::new(Allreduce {
            precision,
            rider: Rider::default(),
        })),
        Strategy::LocalSgd { sync_every } => Ok(Box::new(LocalSgd {
            every: sync_every.max(1),
            steps: 0,
            precision,
            anchor: None,
            overlap,
            away: None,
            rider: Rider::default(),
        })),
        Strategy::ParameterServer { .. } | Strategy::Hierarchical => Err(TrainError::Config(format!(
            "strategy {} needs a parameter server (Trainer::with_server)",
            strategy.name()
        ))),
    }
}

/// The allreduce step: the sum of gradients each pre-multiplied by
/// `local_batch / global_batch` is exactly the gradient of the mean loss over the
/// global batch, whatever the split, so every worker applies the same update and a
/// step on `n` workers equals a step on one machine with the whole batch. The
/// batch's mean loss travels in the same allreduce (one extra float). At a
/// precision below f32 every worker applies the same rounded sum.
pub(crate) struct Allreduce {
    pub precision: Precision,
    /// Floats the trainer sums in the next step's exchange, after the loss slot.
    pub rider: Rider,
}

impl Work<'_> {
    /// This worker's gradients, each multiplied by its share, with its share of the
    /// batch's loss in one extra slot at the end — what a sum over the workers turns
    /// into the global batch's gradient and mean loss; then the throttle's idling.
    fn weighted(self, clock: &mut StepClock<'_>) -> Vec<f32> {
        let (mut flat, loss) = (self.gradients)(self.weight).whole();
        flat.push(loss * self.weight);
        clock.idle(self.samples);
        flat
    }
}

impl Aggregate for Allreduce {
    fn step(
        &mut self,
        ring: &mut Ring,
        model: &mut Flat,
        clock: &mut StepClock<'_>,
        work: Work<'_>,
    ) -> Result<f32, TrainError> {
        let Work {
            samples,
            weight,
            gradients,
        } = work;
        let (mut flat, riders) = match gradients(weight) {
            Grads::Staged {
                first,
                range,
                loss,
                rest,
            } => {
                let mut tail = vec![loss * weight];
                let riders = self.rider.board(&mut tail);
                let flat = overlapped(ring, self.precision, clock, samples, first, range, tail, rest)?;
                (flat, riders)
            }
            whole => {
                let (mut flat, loss) = whole.whole();
                flat.push(loss * weight);
                let riders = self.rider.board(&mut flat);
                clock.idle(samples);
                clock.communicate(|| ring.allreduce_sum_as(&mut flat, self.precision))?;
                (flat, riders)
            }
        };
        self.rider.alight(&mut flat, riders);
        let global_loss = flat.pop().expect("loss slot");
        model.optimizer.step(&mut model.params, &flat);
        Ok(global_loss)
    }

    fn on_regroup(&mut self) {
        self.rider = Rider::default();
    }

    fn rider(&mut self) -> Option<&mut Rider> {
        Some(&mut self.rider)
    }
}

/// The staged allreduce: the head's gradients (`range`, most of the bytes)
/// travel on a thread of their own while this one computes the rest; then the
/// rest and `tail` (the loss share and any riders) travel in a second, small
/// allreduce. Each scalar is summed once, as in one allreduce. Returns the
/// summed gradients followed by the summed `tail`.
///
/// Every member of the ring runs the same two collectives in the same order:
/// whether a step is staged depends on the model, never on a worker's batch.
#[allow(clippy::too_many_arguments)]
fn overlapped(
    ring: &mut Ring,
    precision: Precision,
    clock: &mut StepClock<'_>,
    samples: usize,
    first: Vec<f32>,
    range: Range<usize>,
    tail: Vec<f32>,
    rest: Box<dyn FnOnce() -> Vec<f32> + '_>,
) -> Result<Vec<f32>, TrainError> {
    let mut head = first[range.clone()].to_vec();
    drop(first);
    let (mut flat, sent) = std::thread::scope(|scope| {
        let exchange = scope.spawn(|| ring.allreduce_sum_as(&mut head, precision));
        let flat = rest();
        clock.idle(samples);
        let sent = clock.communicate(|| exchange.join());
        (flat, sent)
    });
    sent.map_err(|_| TrainError::Config("the thread exchanging gradients panicked".into()))??;
    flat[range.clone()].copy_from_slice(&head);
    let mut others: Vec<f32> = flat[..range.start].iter().chain(&flat[range.end..]).copied().collect();
    let gradients = others.len();
    others.extend(tail);
    clock.communicate(|| ring.allreduce_sum_as(&mut others, precision))?;
    let tail = others.split_off(gradients);
    flat[..range.start].copy_from_slice(&others[..range.start]);
    flat[range.end..].copy_from_slice(&others[range.start..]);
    flat.extend(tail);
    Ok(flat)
}

/// Local SGD: each worker steps on its own gradients, and the models are averaged
/// (weighted by batch share) every `every` steps and at the end of each epoch —
/// one model-sized allreduce per `every` steps, for weak links.
///
/// Below f32 the models themselves would lose too much (a weight rounded to 8
/// bits of mantissa moves more than many steps do), so what travels is each
/// model's change since the last average, the `anchor` every member holds
/// alike; the first average after the run starts or a ring re-forms, when the
/// members may hold different anchors or none, travels whole in f32.
///
/// With `overlap`, an average travels on a thread of its own (the ring's
/// links with it, see [`Ring::start_allreduce_sum_as`]) while the worker takes
/// the next steps, and lands after half the steps to the next average
/// ([`LocalSgd::landing`], at least one): each model becomes the average plus
/// the steps its worker took since sending it. A worker waits only for one that
/// is more than those steps behind, so the host's passing jitter costs no
/// waiting, where a one-step overlap let a few late steps keep every other
/// worker waiting. The price is those steps of staleness in what each worker
/// learns of the others. An epoch still ends on one agreed model: the average
/// away lands, and, unless it was made after the epoch's last step, one more is
/// made at once.
pub(crate) struct LocalSgd {
    every: usize,
    /// Steps since the epoch began.
    steps: usize,
    precision: Precision,
    /// The model the last average gave every member (kept only below f32).
    anchor: Option<Vec<f32>>,
    /// Send each average while the next steps compute ([`LocalSgd::landing`]).
    overlap: bool,
    /// With `overlap`: the average on its way.
    away: Option<Away>,
    /// Floats the trainer sums in the next average, after the loss slot.
    rider: Rider,
}

/// This worker's part of one average of the models.
struct Outgoing {
    /// Its weighted model, or weighted change since `anchor`, and its loss share
    /// in one extra slot at the end; the sum over the workers once exchanged.
    flat: Vec<f32>,
    precision: Precision,
    /// What the summed changes are added to (`None`: the models travel whole).
    anchor: Option<Vec<f32>>,
    /// Floats riding after the loss slot ([`Rider`]).
    riders: usize,
}

/// What landing an average on its way needs (the sum travels in the ring).
struct Away {
    /// The step of the epoch after which it lands.
    lands_after: usize,
    /// This worker's model as it was sent: the steps it took since are added
    /// to the average.
    sent: Vec<f32>,
    anchor: Option<Vec<f32>>,
    riders: usize,
}

impl LocalSgd {
    /// What this worker adds to an average of the models weighted by `weight`
    /// (its share), with `loss_share` summed alongside.
    fn outgoing(&mut self, model: &Flat, weight: f32, loss_share: f32) -> Outgoing {
        let anchor = self.anchor.take().filter(|_| self.precision != Precision::F32);
        let mut flat: Vec<f32> = match &anchor {
            Some(a) => model.params.iter().zip(a).map(|(p, a)| (p - a) * weight).collect(),
            None => model.params.iter().map(|p| p * weight).collect(),
        };
        flat.push(loss_share);
        let riders = self.rider.board(&mut flat);
        let precision = if anchor.is_some() {
            self.precision
        } else {
            Precision::F32
        };
        Outgoing {
            flat,
            precision,
            anchor,
            riders,
        }
    }

    /// Makes `flat`, an exchanged sum of [`Outgoing::flat`] (changes since
    /// `anchor`, or whole models without one, then the loss shares and `riders`
    /// floats), every worker's model; returns the summed loss shares.
    fn arrived(&mut self, mut flat: Vec<f32>, anchor: Option<Vec<f32>>, riders: usize, model: &mut Flat) -> f32 {
        self.rider.alight(&mut flat, riders);
        let loss = flat.pop().expect("loss slot");
        if let Some(a) = anchor {
            // The shares sum to one, so the weighted changes added to the
            // anchor are the weighted average of the models.
            flat.iter_mut().zip(a).for_each(|(f, a)| *f += a);
        }
        if self.precision != Precision::F32 {
            self.anchor = Some(flat.clone());
        }
        model.params = flat;
        loss
    }

    /// Exchanges `out` and makes the sum every worker's model; returns the
    /// summed loss shares.
    fn send(&mut self, ring: &mut Ring, model: &mut Flat, mut out: Outgoing) -> Result<f32, TrainError> {
        ring.allreduce_sum_as(&mut out.flat, out.precision)?;
        Ok(self.arrived(out.flat, out.anchor, out.riders, model))
    }

    /// Steps an average travels before it lands (0: it is made at once): half
    /// the steps between two averages. Why half: on 1 / 0.5 / 0.25 devices one
    /// device's steps ran 20–40 % longer than the others' for a few averages in
    /// a row (the host's jitter), arriving 20–100 ms late, about 1–3 steps; half
    /// of 8 steps covers that and its transfer, and keeps the staleness in what
    /// a worker learns of the others at half the interval (a whole interval cost
    /// about 0.03 of training loss after 3 epochs of Fashion-MNIST).
    fn landing(&self) -> usize {
        if self.overlap { (self.every / 2).max(1) } else { 0 }
    }

    /// Starts exchanging `out` in the background; [`LocalSgd::land`] ends it.
    fn dispatch(&mut self, ring: &mut Ring, model: &Flat, out: Outgoing) -> Result<(), TrainError> {
        ring.start_allreduce_sum_as(out.flat, out.precision)?;
        self.away = Some(Away {
            lands_after: self.steps + self.landing(),
            sent: model.params.clone(),
            anchor: out.anchor,
            riders: out.riders,
        });
        Ok(())
    }

    /// Waits for the average on its way, if any, and makes it this worker's
    /// model plus the steps taken since it was sent; returns the summed loss
    /// shares it carried.
    fn land(&mut self, ring: &mut Ring, model: &mut Flat) -> Result<Option<f32>, TrainError> {
        let Some(Away {
            mut sent,
            lands_after: _,
            anchor,
            riders,
        }) = self.away.take()
        else {
            return Ok(None);
        };
        let flat = ring.finish_allreduce()?;
        // `sent` becomes the progress since sending.
        sent.iter_mut().zip(&model.params).for_each(|(s, p)| *s = p - *s);
        let loss = self.arrived(flat, anchor, riders, model);
        model.params.iter_mut().zip(&sent).for_each(|(p, d)| *p += d);
        Ok(Some(loss))
    }
}

impl Aggregate for LocalSgd {
    fn step(
        &mut self,
        ring: &mut Ring,
        model: &mut Flat,
        clock: &mut StepClock<'_>,
        work: Work<'_>,
    ) -> Result<f32, TrainError> {
        let Work {
            samples,
            weight,
            gradients,
        } = work;
        let (grads, loss) = gradients(1.0).whole();
        if samples > 0 {
            model.optimizer.step(&mut model.params, &grads);
        }
        self.steps += 1;
        clock.idle(samples);
        // An average on its way lands after the same step on every member, and
        // always before the next is made.
        if self.away.as_ref().is_some_and(|a| self.steps >= a.lands_after) {
            clock.communicate(|| self.land(ring, model))?;
        }
        if !self.steps.is_multiple_of(self.every) {
            return Ok(loss);
        }
        let out = self.outgoing(model, weight, loss * weight);
        if self.overlap {
            // This step's own loss stands for the average's, as between
            // averages (the epoch's losses are summed at its end).
            self.dispatch(ring, model, out)?;
            return Ok(loss);
        }
        clock.communicate(|| self.send(ring, model, out))
    }

    fn end_epoch(
        &mut self,
        ring: &mut Ring,
        model: &mut Flat,
        weight: f32,
        loss: f32,
    ) -> Result<Option<f32>, TrainError> {
        // The epoch's last step may just have made an average: once it lands
        // (overlapped, it is still away) the models agree.
        let averaged = self.steps.is_multiple_of(self.every);
        self.steps = 0;
        let landed = self.land(ring, model)?;
        if averaged {
            return Ok(landed);
        }
        let out = self.outgoing(model, weight, loss * weight);
        self.send(ring, model, out).map(Some)
    }

    fn on_regroup(&mut self) {
        // Every member now holds the adopted model: counting steps from here is
        // agreed, where each member's own count (one may have stepped on after a
        // collective that failed elsewhere) is not.
        self.steps = 0;
        self.anchor = None;
        self.away = None;
        self.rider = Rider::default();
    }

    fn rider(&mut self) -> Option<&mut Rider> {
        Some(&mut self.rider)
    }

    fn steps_to_exchange(&self) -> usize {
        // Riders board the next average made (at a step that is a multiple of
        // `every`); overlapped, it lands `landing()` steps later.
        self.every - self.steps % self.every - 1 + self.landing()
    }

    fn losses_are_global(&self) -> bool {
        false
    }
}

/// The parameter-server and hierarchical strategies: the ring holds this
/// worker's group (one worker for `parameter-server`); the group sums its
/// weighted gradients over it, its first member pushes the sum to the parameter
/// server and passes the model it gets back around the group.
pub(crate) struct ThroughServer {
    /// The connection to the server (group leaders only).
    pub client: Option<ServerClient>,
    /// `None`: the server aggregates synchronously; `Some(s)`: asynchronously with
    /// staleness bound `s`.
    pub staleness: Option<usize>,
    /// The ranks (among all workers) of this worker's group, in ring order.
    pub group: Vec<usize>,
}

impl Aggregate for ThroughServer {
    fn step(
        &mut self,
        ring: &mut Ring,
        model: &mut Flat,
        clock: &mut StepClock<'_>,
        work: Work<'_>,
    ) -> Result<f32, TrainError> {
        let mut flat = work.weighted(clock);
        let client = &mut self.client;
        clock.communicate(|| -> Result<(), TrainError> {
            ring.allreduce_sum(&mut flat)?;
            if let Some(c) = client {
                flat = c.push(&flat)?;
            }
            ring.broadcast(&mut flat, 0)?;
            Ok(())
        })?;
        let loss = flat.pop().expect("loss slot");
        if flat.len() != model.params.len() {
            return Err(TrainError::Config(format!(
                "the parameter server sent {} parameters for a model of {}",
                flat.len(),
                model.params.len()
            )));
        }
        model.params = flat;
        Ok(loss)
    }

    fn global_sum(&mut self, ring: &mut Ring, buf: &mut [f32]) -> Result<(), TrainError> {
        ring.allreduce_sum(buf)?;
        if let Some(c) = &mut self.client {
            c.sum(buf)?;
        }
        ring.broadcast(buf, 0)?;
        Ok(())
    }

    fn step_batch(&self, assignment: &Assignment) -> usize {
        match self.staleness {
            // Each asynchronous push is a step over its group's batch.
            Some(_) => self.group.iter().map(|&r| assignment.next_batch(r).len()).sum(),
            None => assignment.next_global_batch(),
        }
    }

    fn losses_are_global(&self) -> bool {
        self.staleness.is_none()
    }

    fn holds_optimizer(&self) -> bool {
        false
    }

    fn on_loss(&mut self) -> Option<Box<dyn Aggregate>> {
        // Leaving without a goodbye fails the server, which tells every other
        // group's leader; the server's optimiser state goes with it, so the ring
        // starts a fresh one from the latest global model.
        drop(self.client.take());
        Some(Box::new(Allreduce {
            precision: Precision::F32,
            rider: Rider::default(),
        }))
    }

    fn finish(&mut self) -> Result<(), TrainError> {
        if let Some(c) = self.client.take() {
            c.bye()?;
        }
        Ok(())
    }
}
