//! Who is in the ring, and what happens when someone leaves it or comes back.
//!
//! The trainer never talks to the control plane. When the ring breaks mid-run (a
//! peer's process or node died), it asks its [`Membership`] for a new ring of the
//! survivors; between epochs it asks whether lost workers wait to rejoin, and if
//! so forms a ring with them. The worker runtime implements that through the
//! coordinator's rendezvous; tests and benchmarks use [`FixedMembership`], which
//! cannot regroup.

use hetero_comm::Ring;

use crate::TrainError;

/// A new ring after a failure.
pub struct Regroup {
    /// The ring of the survivors.
    pub ring: Ring,
    /// The original rank of each member, in new-rank order.
    pub members: Vec<usize>,
    /// Each member's share of the work (its compute score); empty for an even split.
    pub weights: Vec<f64>,
}

/// Forms new rings of the workers: the survivors, or the ring with joiners.
pub trait Membership {
    /// Called after the ring broke with `reason`, or to admit joiners; `generation`
    /// counts the rings formed so far (the first ring is generation 0). Returns the
    /// new ring.
    fn regroup(&mut self, generation: u64, reason: &str) -> Result<Regroup, TrainError>;

    /// Called by every member between epochs (after `epoch` epochs, in ring
    /// `generation`): whether lost workers wait to join, so that the members must
    /// regroup at `generation + 1`. Every member gets the same answer.
    fn joiners_waiting(&mut self, generation: u64, epoch: usize) -> Result<bool, TrainError> {
        let _ = (generation, epoch);
        Ok(false)
    }
}

/// A fixed set of workers: a broken ring ends the run.
pub struct FixedMembership;

impl Membership for FixedMembership {
    fn regroup(&mut self, _generation: u64, reason: &str) -> Result<Regroup, TrainError> {
        Err(TrainError::Config(format!(
            "a worker was lost ({reason}) and this run cannot regroup"
        )))
    }
}
