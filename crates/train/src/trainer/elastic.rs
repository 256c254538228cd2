//! A run whose ring changes: survivors regroup after a loss, lost workers come
//! back between epochs, and the split follows measured throughput.
//!
//! ## Design
//! Every operation that talks over the ring runs inside [`Trainer::resilient`]:
//! when the ring breaks, the worker asks its [`crate::Membership`] for a ring of
//! whoever is left and retries. On any new ring every member adopts the state of
//! the one that got furthest ([`Trainer::adopt_ring`]) — a step can complete on
//! some workers and not on others, and a joiner holds nothing — so the members
//! agree again before anything else happens; then the lost workers' remaining
//! samples (or a share of everyone's, for joiners) are dealt out by the data
//! assignment, which keeps every sample visited exactly once per epoch.

use burn::tensor::backend::AutodiffBackend;
use hetero_data::shard::Split;

use super::Trainer;
use super::build::MEASURE_STEPS;
use super::run_state::Handover;
use crate::membership::Regroup;
use crate::optim::FlatOptimizer;
use crate::report::Event;
use crate::{Task, TrainError};

/// Relative drift of measured throughput from the split that triggers a rebalance.
pub const REBALANCE_DRIFT: f64 = 0.05;

/// Steps between two checks of the split within an epoch, with `rebalance`: each
/// compares the throughput every worker measured since the last one.
///
/// Why within the epoch: a device's speed drifts (other load, heat, a host's
/// neighbours), and a split that is off by a few percent makes every fast worker
/// wait for the slow one at every exchange until the epoch ends. Why this many:
/// each check moves a few floats (riding in the strategy's own exchange, see
/// [`super::aggregate::Rider`]), and the window must be long enough that a CPU
/// quota's 10 ms periods and the host's jitter average out.
pub const PACE_STEPS: u64 = 32;

/// The most steps between two checks: each check within an epoch that keeps
/// the split doubles the wait for the next, up to this, and one that moves it
/// starts again at [`PACE_STEPS`] (as does a re-formed ring).
///
/// Why back off: a balanced split gains nothing from a check, and a longer
/// window measures with less noise, so the split stops chasing the host's
/// jitter (on 1 / 0.5 / 0.25 devices a check every 32 steps moved a local batch
/// back and forth by one sample every few checks, each move re-sharing the
/// epoch's unvisited samples). A device that slows down for good is still
/// followed within this many steps.
pub const PACE_STEPS_MOST: u64 = 4 * PACE_STEPS;

/// The steps until the next check of the split after one made `every` steps
/// after the last: back to [`PACE_STEPS`] when it `moved` the split, else twice
/// as many, up to [`PACE_STEPS_MOST`].
pub(super) fn next_pace(every: u64, moved: bool) -> u64 {
    if moved {
        PACE_STEPS
    } else {
        (every * 2).clamp(PACE_STEPS, PACE_STEPS_MOST)
    }
}

impl<B: AutodiffBackend, T: Task<B>> Trainer<B, T> {
    /// Retries `op` after regrouping for as long as the ring breaks and survivors
    /// remain.
    pub(super) fn resilient<R>(
        &mut self,
        on_event: &mut dyn FnMut(Event),
        mut op: impl FnMut(&mut Self) -> Result<R, TrainError>,
    ) -> Result<R, TrainError> {
        loop {
            match op(self) {
                Err(TrainError::Comm(e)) => {
                    let mut reason = e.to_string();
                    // A second loss while regrouping just means regrouping again.
                    while let Err(e) = self.recover(&reason, on_event) {
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
    /// survivor's state, and hand the lost workers' samples to the survivors. An
    /// aggregation that cannot lose a member (a parameter server's group) is
    /// replaced by an allreduce ring of the surviving workers, with a fresh
    /// optimiser (the server's went with it).
    fn recover(&mut self, reason: &str, on_event: &mut dyn FnMut(Event)) -> Result<(), TrainError> {
        let collapsed = match self.aggregate.on_loss() {
            Some(replacement) => {
                self.aggregate = replacement;
                self.flat.optimizer = FlatOptimizer::new(self.options.optimizer, self.flat.params.len());
                true
            }
            None => false,
        };
        // Closing our connections tells the neighbours at once.
        self.ring = None;
        self.generation += 1;
        let regroup = self.membership.regroup(self.generation, reason)?;
        for e in self.adopt_ring(regroup, collapsed)? {
            on_event(e);
        }
        Ok(())
    }

    /// Between epochs: when lost workers wait to rejoin, forms the ring with them
    /// and hands them the state and a share of the work.
    pub(super) fn admit_joiners(&mut self) -> Result<Vec<Event>, TrainError> {
        if !self.membership.joiners_waiting(self.generation, self.run.epoch)? {
            return Ok(vec![]);
        }
        self.ring = None;
        self.generation += 1;
        let regroup = self.membership.regroup(self.generation, "lost workers rejoin")?;
        self.adopt_ring(regroup, false)
    }

    /// Everything another worker needs to go on from this one's position.
    fn handover(&self) -> Handover {
        Handover {
            params: self.flat.params.clone(),
            optimizer: self.flat.optimizer.to_flat(),
            run: self.run.clone(),
        }
    }

    /// Takes over another worker's [`Trainer::handover`].
    fn adopt(&mut self, h: Handover) -> Result<(), TrainError> {
        if h.params.len() != self.flat.params.len() {
            return Err(TrainError::Config(format!(
                "the ring's model has {} parameters, this worker's {}: not the same model",
                h.params.len(),
                self.flat.params.len()
            )));
        }
        if h.optimizer.len() != self.flat.optimizer.flat_len() {
            return Err(TrainError::Config(format!(
                "the ring's optimiser state has {} values, this worker's {}: not the same optimiser",
                h.optimizer.len(),
                self.flat.optimizer.flat_len()
            )));
        }
        self.flat.params = h.params;
        self.flat.optimizer.load_flat(&h.optimizer);
        self.run = h.run;
        self.local.load(&self.flat.params);
        Ok(())
    }

    /// On a new ring: every member adopts the state of the one that got furthest,
    /// then the work is shared out among the new members. `collapsed`: the ring
    /// replaces a parameter server's topology.
    pub(super) fn adopt_ring(&mut self, regroup: Regroup, collapsed: bool) -> Result<Vec<Event>, TrainError> {
        let new_world = regroup.members.len();
        self.ring = Some(regroup.ring);
        self.rank = self.ring().rank();
        // Shards and test parts are dealt anew: members may lack samples now
        // (a joiner may hold none).
        self.samples_due = true;
        self.all_hold_everything = false;
        let mut steps = vec![0f32; new_world];
        steps[self.rank] = if self.joining {
            0.0
        } else {
            self.run.updates as f32 + 1.0
        };
        self.ring().allreduce_sum(&mut steps)?;
        let owner = (0..new_world).fold(0, |best, r| if steps[r] > steps[best] { r } else { best });
        if steps[owner] == 0.0 {
            return Err(TrainError::Config(
                "a ring of joining workers only: no member holds the run's state".into(),
            ));
        }
        let mut state = if self.rank == owner {
            self.handover().to_bytes()
        } else {
            Vec::new()
        };
        self.ring().broadcast_bytes(&mut state, owner)?;
        self.adopt(Handover::from_bytes(&state)?)?;
        self.aggregate.on_regroup();
        // Checks of the split count from here on every member alike (a joiner
        // has no window of its own, survivors may have backed off differently);
        // rates riding in an exchange the ring lost were dropped with it
        // (`on_regroup`).
        self.pace_every = PACE_STEPS;
        self.mark_pace();
        self.joining = false;

        let old_shares = self.run.shares();
        let old = std::mem::take(&mut self.run.members);
        let lost_positions: Vec<usize> = (0..old.len()).filter(|&p| !regroup.members.contains(&old[p])).collect();
        let lost: Vec<usize> = lost_positions.iter().map(|&p| old[p]).collect();
        let joined_positions: Vec<usize> = (0..new_world).filter(|&p| !old.contains(&regroup.members[p])).collect();
        let joined: Vec<usize> = joined_positions.iter().map(|&p| regroup.members[p]).collect();
        // A split the run already measured outlives the compute scores: survivors
        // keep their measured shares; with joiners (never measured) the scores
        // start the new ring, which measures itself again a few steps on.
        let measured = self.options.measure_split && self.run.measure_at.is_none();
        let weights: Vec<f64> = if measured && joined_positions.is_empty() {
            regroup
                .members
                .iter()
                .map(|m| old.iter().position(|o| o == m).map_or(0.0, |p| old_shares[p]))
                .collect()
        } else {
            if measured {
                self.run.measure_at = Some(self.run.updates + MEASURE_STEPS.0);
            }
            regroup.weights.clone()
        };
        let split = self.options.split(&weights, new_world);
        let run = &mut self.run;
        run.assignment = run
            .assignment
            .migrate(&lost_positions, &joined_positions, &split, self.options.global_batch);
        run.members = regroup.members;
        run.lost.extend(&lost);
        run.rejoined.extend(&joined);
        self.options.weights = weights;
        let shares = run.shares();
        let mut events = Vec::new();
        if !lost.is_empty() || collapsed {
            events.push(Event::Migrated {
                epoch: run.epoch,
                step: run.updates,
                lost,
                workers: new_world,
                shares: shares.clone(),
                members: run.members.clone(),
                collapsed,
            });
        }
        if !joined.is_empty() {
            events.push(Event::Rejoined {
                epoch: run.epoch,
                joined,
                workers: new_world,
                shares,
                members: run.members.clone(),
            });
        }
        Ok(events)
    }

    /// Whether the split is checked before this step: with `rebalance`,
    /// `pace_every` steps ([`next_pace`]) after the epoch began or the last
    /// check, once the last check's rates are back, on a ring of every worker
    /// (a parameter server's groups have rings of their own), once the first
    /// measurement is done and while enough of the epoch is left to gain from it
    /// (its last steps, where shards run out unevenly, would also mislead the
    /// measurement). Decided on step counts every member agrees on — the run's,
    /// and the run's at the window's start, which every member marks at the same
    /// step — because every member's rates must board the same exchange.
    pub(super) fn pace_due(&mut self) -> bool {
        let travelling = self.aggregate.rider().is_some_and(|r| r.travelling());
        self.options.rebalance
            && self.world() > 1
            && !self.options.strategy.uses_parameter_server()
            && self.run.measure_at.is_none()
            && !travelling
            && self.run.updates >= self.pace_mark.0 + self.pace_every
            && self.run.assignment.steps_left() > (PACE_STEPS / 2) as usize
    }

    /// This worker's training samples per second of compute since its pace
    /// window began (0 when it trained on none: the split then stays).
    pub(super) fn window_rate(&self) -> f64 {
        let (_, samples, compute) = self.pace_mark;
        (self.meter.samples - samples) as f64 / (self.meter.compute - compute).as_secs_f64().max(1e-9)
    }

    /// Starts a new pace window here.
    pub(super) fn mark_pace(&mut self) {
        self.pace_mark = (self.run.updates, self.meter.samples, self.meter.compute);
    }

    /// Adjusts the split to the throughput each worker measured (`rate` is this
    /// worker's training samples per second of compute) when it drifted from the
    /// split by more than [`REBALANCE_DRIFT`] — or, for the first measurement of a
    /// weighted run, by anything at all. `when` says whether an epoch is under way
    /// (its unvisited samples are re-shared) or about to begin.
    pub(super) fn follow_throughput(&mut self, rate: f64, when: Boundary) -> Result<Option<Event>, TrainError> {
        let mut rates = self.own_rate(rate);
        self.global_sum(&mut rates)?;
        self.follow_rates(&rates, when)
    }

    /// This worker's `rate` in its slot of a vector of every member's, zeros
    /// elsewhere: what a sum over the ring turns into every member's rate.
    pub(super) fn own_rate(&self, rate: f64) -> Vec<f32> {
        let mut rates = vec![0f32; self.world()];
        rates[self.rank] = rate as f32;
        rates
    }

    /// [`Trainer::follow_throughput`] once every member's rate is known (`rates`,
    /// by position on the ring, the same on every member).
    pub(super) fn follow_rates(&mut self, rates: &[f32], when: Boundary) -> Result<Option<Event>, TrainError> {
        let first = self.run.measure_at.take().is_some();
        let rates: Vec<f64> = rates.iter().map(|&r| r as f64).collect();
        if let Some(slow) = rates.iter().position(|r| !(r.is_finite() && *r > 0.0)) {
            return Ok(first.then(|| Event::SplitKept {
                epoch: self.run.epoch,
                why: format!(
                    "worker {} measured no throughput ({} samples/s), so the split stays {}",
                    self.run.members[slow],
                    rates[slow],
                    if self.options.weights.is_empty() {
                        "even"
                    } else {
                        "at the compute scores"
                    }
                ),
            }));
        }
        let total: f64 = rates.iter().sum();
        let current = self.run.shares();
        let wanted: Vec<f64> = rates.iter().map(|r| r / total).collect();
        let drift = current
            .iter()
            .zip(&wanted)
            .map(|(c, w)| (w - c).abs() / c.max(1e-9))
            .fold(0.0, f64::max);
        if drift <= REBALANCE_DRIFT && !first {
            return Ok(None);
        }
        let split = Split::weighted(&wanted);
        let global = self.options.global_batch;
        // Within an epoch only local batches decide who waits for whom: a drift
        // their rounding cannot follow changes nothing.
        if when == Boundary::WithinEpoch && !first && split.local_batches(global) == self.run.assignment.batches() {
            return Ok(None);
        }
        match when {
            Boundary::WithinEpoch => self.run.assignment = self.run.assignment.migrate(&[], &[], &split, global),
            Boundary::BetweenEpochs => self.run.assignment.rebalance(&split, global),
        }
        self.options.weights = wanted;
        self.run.rebalances += 1;
        self.samples_due = true;
        Ok(Some(Event::Rebalanced {
            epoch: self.run.epoch,
            shares: self.run.shares(),
            rates,
            within_epoch: when == Boundary::WithinEpoch,
        }))
    }
}

/// Where in the run the split changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Boundary {
    /// Some steps into an epoch: the samples not yet visited are re-shared.
    WithinEpoch,
    /// Before an epoch begins: whole shards are resized.
    BetweenEpochs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_that_keep_the_split_come_less_often_and_one_that_moves_it_restarts_them() {
        let kept = |n: usize| (0..n).fold(PACE_STEPS, |every, _| next_pace(every, false));
        assert_eq!([kept(0), kept(1), kept(2)], [32, 64, 128]);
        assert_eq!(
            kept(10),
            PACE_STEPS_MOST,
            "bounded, so a lasting slowdown is still followed"
        );
        assert_eq!(next_pace(kept(10), true), PACE_STEPS);
    }
}
