//! One job's rendezvous: where its ranks listen, the ring's regroups after lost or
//! rejoining workers, and the last membership decision — kept in the job's record,
//! so a coordinator that restarts mid-rendezvous picks it up where it was.
//!
//! ## Design
//! The record is the shape torchelastic's rendezvous keeps: a generation, who has
//! arrived for it, who waits to be let in, and what was decided. It is plain data
//! the coordinator saves with the job whenever it changes (an arrival, a new
//! generation, an admission), and the methods here are the only ways it changes,
//! each saying whether it did — so a worker polling with what is already known
//! costs no store write. Everything the workers were told before a restart is
//! told again after it: the first formation's addresses, a regroup's members, an
//! admission for the same (generation, epoch).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A job's rendezvous record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rendezvous {
    /// The first formation: each rank's data-plane address once it has arrived
    /// (workers, then the parameter server if the job has one).
    #[serde(default)]
    pub slots: Vec<Option<String>>,
    /// The latest regroup.
    #[serde(default)]
    pub regroup: Regroup,
    /// Relaunched ranks waiting to be admitted at an epoch boundary: rank → address.
    #[serde(default)]
    pub waiting: BTreeMap<u32, String>,
    /// The last membership decision, repeated to every member that asks for the
    /// same (generation, epoch).
    #[serde(default)]
    pub admission: Option<Admission>,
}

/// A regroup after lost or rejoining workers: its generation and each arrived
/// member's address (original rank → address).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Regroup {
    /// The ring's generation (the first formation is 0).
    pub generation: u64,
    /// Members arrived for it.
    pub arrived: BTreeMap<u32, String>,
}

/// Ranks admitted into the ring after epoch `epoch` of generation `generation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Admission {
    /// The generation that decided.
    pub generation: u64,
    /// The epoch after which they join.
    pub epoch: u64,
    /// Who was admitted (possibly no one).
    pub ranks: Vec<u32>,
}

/// What a rendezvous call changed and what it can answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrival<T> {
    /// Whether the record changed (and must be saved).
    pub changed: bool,
    /// The answer, once everyone is there.
    pub ready: Option<T>,
}

impl Rendezvous {
    /// A first formation of `slots` ranks, nobody arrived.
    pub fn new(slots: usize) -> Rendezvous {
        Rendezvous {
            slots: vec![None; slots],
            ..Rendezvous::default()
        }
    }

    /// Rank `rank` of the first formation listens at `address`; every address, in
    /// rank order, once all have arrived. `None` for a rank outside the job.
    pub fn arrive(&mut self, rank: u32, address: &str) -> Option<Arrival<Vec<String>>> {
        let slot = self.slots.get_mut(rank as usize)?;
        let changed = slot.as_deref() != Some(address);
        *slot = Some(address.to_string());
        let ready = self
            .slots
            .iter()
            .all(Option::is_some)
            .then(|| self.slots.iter().flatten().cloned().collect());
        Some(Arrival { changed, ready })
    }

    /// Member `rank` arrives for regroup `generation` at `address`; once every one
    /// of `live` has, their (rank, address) in `live`'s order. A later generation
    /// starts a new regroup; an earlier one is over (`Err` names the current).
    pub fn arrive_regroup(
        &mut self,
        rank: u32,
        address: &str,
        generation: u64,
        live: &[u32],
    ) -> Result<Arrival<Vec<(u32, String)>>, u64> {
        let mut changed = false;
        if self.regroup.generation < generation {
            self.regroup = Regroup {
                generation,
                arrived: BTreeMap::new(),
            };
            changed = true;
        } else if self.regroup.generation > generation {
            return Err(self.regroup.generation);
        }
        if self.regroup.arrived.get(&rank).map(String::as_str) != Some(address) {
            self.regroup.arrived.insert(rank, address.to_string());
            changed = true;
        }
        Ok(Arrival {
            changed,
            ready: self.members_ready(live),
        })
    }

    /// An admitted rank asks for its ring: the members, once every one of `live`
    /// has arrived, if `rank` is among those admitted into the current regroup.
    pub fn admitted_ring(&self, rank: u32, live: &[u32]) -> Option<Vec<(u32, String)>> {
        if !self.regroup.arrived.contains_key(&rank) {
            return None;
        }
        self.members_ready(live)
    }

    fn members_ready(&self, live: &[u32]) -> Option<Vec<(u32, String)>> {
        let arrived = &self.regroup.arrived;
        live.iter().map(|r| arrived.get(r).map(|a| (*r, a.clone()))).collect()
    }

    /// A relaunched rank waits at `address` to be admitted. Whether that changed.
    pub fn wait(&mut self, rank: u32, address: &str) -> bool {
        self.waiting.insert(rank, address.to_string()).as_deref() != Some(address)
    }

    /// The decision already made for `(generation, epoch)`, if any.
    pub fn decided(&self, generation: u64, epoch: u64) -> Option<&[u32]> {
        self.admission
            .as_ref()
            .filter(|a| (a.generation, a.epoch) == (generation, epoch))
            .map(|a| a.ranks.as_slice())
    }

    /// Decides for `(generation, epoch)`: the waiting ranks that `still_joining`
    /// accepts are admitted into generation + 1, whose regroup starts with them
    /// arrived; the waiting list empties. Returns the admitted ranks.
    pub fn admit(&mut self, generation: u64, epoch: u64, still_joining: impl Fn(u32) -> bool) -> Vec<u32> {
        let waiting = std::mem::take(&mut self.waiting);
        let admitted: BTreeMap<u32, String> = waiting.into_iter().filter(|(r, _)| still_joining(*r)).collect();
        let ranks: Vec<u32> = admitted.keys().copied().collect();
        if !ranks.is_empty() {
            self.regroup = Regroup {
                generation: generation + 1,
                arrived: admitted,
            };
        }
        self.admission = Some(Admission {
            generation,
            epoch,
            ranks: ranks.clone(),
        });
        ranks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Through JSON, as the store keeps it.
    fn reloaded(r: &Rendezvous) -> Rendezvous {
        serde_json::from_str(&serde_json::to_string(r).unwrap()).unwrap()
    }

    #[test]
    fn a_formation_interrupted_by_a_restart_completes_from_the_saved_record() {
        let mut r = Rendezvous::new(3);
        assert!(r.arrive(0, "10.0.0.1:5000").unwrap().changed);
        assert!(r.arrive(2, "10.0.0.3:5000").unwrap().ready.is_none());
        // Polling again with the same address changes nothing (no store write).
        assert!(!r.arrive(0, "10.0.0.1:5000").unwrap().changed);
        let mut r = reloaded(&r);
        let done = r.arrive(1, "10.0.0.2:5000").unwrap();
        assert_eq!(
            done.ready.unwrap(),
            vec!["10.0.0.1:5000", "10.0.0.2:5000", "10.0.0.3:5000"]
        );
        // A rank told "ready" before the restart hears the same after it.
        let mut r = reloaded(&r);
        assert_eq!(r.arrive(2, "10.0.0.3:5000").unwrap().ready.unwrap().len(), 3);
        assert!(r.arrive(3, "10.0.0.4:5000").is_none(), "rank outside the job");
    }

    #[test]
    fn a_regroup_moves_to_later_generations_and_refuses_earlier_ones() {
        let mut r = Rendezvous::new(3);
        let live = [0, 2];
        assert!(r.arrive_regroup(0, "a", 1, &live).unwrap().ready.is_none());
        let r2 = r.arrive_regroup(2, "c", 1, &live).unwrap();
        assert_eq!(r2.ready.unwrap(), vec![(0, "a".to_string()), (2, "c".to_string())]);
        // Generation 2 starts afresh; generation 1 is over.
        assert!(r.arrive_regroup(2, "c2", 2, &[2]).unwrap().ready.is_some());
        assert_eq!(r.arrive_regroup(0, "a", 1, &live), Err(2));
    }

    #[test]
    fn an_admission_is_decided_once_and_repeated_after_a_restart() {
        let mut r = Rendezvous::new(2);
        assert!(r.wait(1, "b"));
        assert!(!r.wait(1, "b"));
        assert_eq!(r.decided(0, 3), None);
        assert_eq!(r.admit(0, 3, |_| true), vec![1]);
        let mut r = reloaded(&r);
        assert_eq!(r.decided(0, 3), Some(&[1][..]));
        // The admitted rank is already arrived in generation 1; the other member
        // arrives and both get the ring.
        assert!(r.admitted_ring(1, &[0, 1]).is_none());
        let ring = r.arrive_regroup(0, "a", 1, &[0, 1]).unwrap().ready.unwrap();
        assert_eq!(ring, vec![(0, "a".to_string()), (1, "b".to_string())]);
        assert_eq!(r.admitted_ring(1, &[0, 1]), Some(ring));
        // A rank no longer joining (lost again) is not admitted.
        r.wait(1, "b");
        assert_eq!(r.admit(1, 4, |_| false), Vec::<u32>::new());
    }
}
