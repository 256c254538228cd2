//! How a job's ranks find each other through the coordinator: the first formation,
//! regroups after lost workers, and admitting relaunched ranks between epochs.
//!
//! Each job's record holds one [`crate::rendezvous::Rendezvous`] (generation,
//! arrivals, who waits, the last admission — the shape torchelastic's rendezvous
//! keeps); the calls here read the job's tasks to know who should arrive and
//! change that record only through its methods, so what a restarted coordinator
//! reloads answers every rank as before.

use super::jobs::{Jobs, in_ring};
use super::{Ledger, Refusal};
use crate::alerts::Severity;
use crate::records::{JobState, TaskRole};
use crate::store::Store;

/// A rank arriving at its job's rendezvous.
pub(crate) struct Arriving {
    /// The job.
    pub job_id: String,
    /// Its rank (original numbering).
    pub rank: u32,
    /// Its data-plane address (`host:port`).
    pub address: String,
    /// The ring generation it arrives for (0: the first formation).
    pub generation: u64,
    /// A relaunched rank waiting to be let into the running ring.
    pub joining: bool,
}

/// What a rank arriving hears.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Answer {
    /// Everyone expected has arrived: the ring can form.
    pub ready: bool,
    /// The ring's generation.
    pub generation: u64,
    /// The members' original ranks, in ring order (when ready).
    pub members: Vec<u32>,
    /// Their addresses, in the same order.
    pub addresses: Vec<String>,
    /// Their shares of the work (weighted jobs only).
    pub weights: Vec<f32>,
}

impl Jobs {
    /// A rank arrives: for the first formation (generation 0), after lost workers
    /// (a later generation), or as a relaunched rank (`joining`).
    pub fn arrive(&mut self, store: &Store, a: Arriving) -> Result<Answer, Refusal> {
        let job = self.find(&a.job_id)?;
        if job.state != JobState::Running {
            return Err(Refusal::Precondition(format!("job {} is {:?}", a.job_id, job.state)));
        }
        if a.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(Refusal::Invalid(format!("{:?} is not a socket address", a.address)));
        }
        if a.generation > 0 || a.joining {
            return self.regroup(store, a);
        }
        self.change(store, &a.job_id.clone(), |job| {
            let Some(arrival) = job.rendezvous.arrive(a.rank, &a.address) else {
                return Err(Refusal::Invalid(format!("rank {} is outside the job", a.rank)));
            };
            let ready = arrival.ready.is_some();
            let addresses = arrival.ready.unwrap_or_default();
            let changed = arrival.changed || (ready && !job.formed);
            job.formed |= ready;
            let answer = Answer {
                ready,
                members: (0..addresses.len() as u32).collect(),
                addresses,
                ..Answer::default()
            };
            Ok((answer, changed))
        })
    }

    /// A rendezvous after lost workers, or to admit rejoining ones: ready once every
    /// worker in the ring (and every admitted joiner) has arrived for `generation`;
    /// the members are the arrivals in rank order. A joining worker waits here,
    /// whatever its generation, until the ring admits it.
    fn regroup(&mut self, store: &Store, a: Arriving) -> Result<Answer, Refusal> {
        let job = self.find(&a.job_id)?;
        let Some(task) = job.tasks.iter().find(|t| t.rank == a.rank && t.rank < job.workers) else {
            return Err(Refusal::Invalid(format!("rank {} is not a worker of the job", a.rank)));
        };
        if task.phase.is_final() {
            return Err(Refusal::Precondition(format!(
                "worker rank {} was declared lost ({}); it cannot rejoin this ring",
                a.rank, task.message
            )));
        }
        if !job.migratable {
            return Err(Refusal::Precondition(format!(
                "job {} cannot continue without a lost worker",
                a.job_id
            )));
        }
        let waits = task.role.waits_to_join();
        if waits && !a.joining {
            return Err(Refusal::Precondition(format!(
                "worker rank {} has not been admitted into the ring yet",
                a.rank
            )));
        }
        let live: Vec<(u32, f32)> = job
            .tasks
            .iter()
            .filter(|t| in_ring(t, job.workers))
            .map(|t| (t.rank, t.weight))
            .collect();
        let live_ranks: Vec<u32> = live.iter().map(|(r, _)| *r).collect();
        let weighted = job.weighted;
        self.change(store, &a.job_id.clone(), |job| {
            if waits {
                // Not admitted yet: wait for the next epoch boundary.
                let changed = job.rendezvous.wait(a.rank, &a.address);
                return Ok((Answer::default(), changed));
            }
            let (ring, changed) = if a.joining {
                // Admitted: the regroup already holds this worker's address.
                (job.rendezvous.admitted_ring(a.rank, &live_ranks), false)
            } else {
                let arrival = job
                    .rendezvous
                    .arrive_regroup(a.rank, &a.address, a.generation, &live_ranks)
                    .map_err(|current| {
                        Refusal::Precondition(format!(
                            "generation {} is over; the ring is at generation {current}",
                            a.generation
                        ))
                    })?;
                (arrival.ready, arrival.changed)
            };
            let mut answer = Answer {
                ready: ring.is_some(),
                generation: job.rendezvous.regroup.generation,
                ..Answer::default()
            };
            if let Some(ring) = ring {
                // In `live`'s order, so its weights line up.
                (answer.members, answer.addresses) = ring.into_iter().unzip();
                if weighted {
                    answer.weights = live.iter().map(|(_, w)| *w).collect();
                }
            }
            Ok((answer, changed))
        })
    }

    /// Between epochs, the ring asks whether relaunched ranks wait to join. The first
    /// member to ask for `(generation, epoch)` decides for everyone: the waiting
    /// joiners are admitted into generation + 1, which the members then form.
    /// Returns the admitted ranks.
    pub fn check_members(
        &mut self,
        l: &mut Ledger,
        job_id: &str,
        generation: u64,
        epoch: u64,
    ) -> Result<Vec<u32>, Refusal> {
        let job = self.find(job_id)?;
        if job.state != JobState::Running {
            return Err(Refusal::Precondition(format!("job {job_id} is {:?}", job.state)));
        }
        if let Some(ranks) = job.rendezvous.decided(generation, epoch) {
            return Ok(ranks.to_vec());
        }
        // Decided on a copy, stored, then kept: every member asking for this
        // (generation, epoch) — before or after a restart — hears the same.
        let ranks = self.change(l.store, job_id, |job| {
            let joining: Vec<u32> = job
                .tasks
                .iter()
                .filter(|t| t.role.waits_to_join() && !t.phase.is_final())
                .map(|t| t.rank)
                .collect();
            let ranks = job.rendezvous.admit(generation, epoch, |r| joining.contains(&r));
            for t in job.tasks.iter_mut().filter(|t| ranks.contains(&t.rank)) {
                t.role = TaskRole::Rejoining { admitted: true };
            }
            Ok((ranks, true))
        })?;
        if !ranks.is_empty() {
            let line = format!(
                "rank(s) {ranks:?} rejoin the ring after epoch {epoch} (generation {})",
                generation + 1
            );
            l.line(job_id, line.clone())?;
            l.raise(Severity::Info, job_id, format!("job {job_id}: {line}"))?;
        }
        Ok(ranks)
    }
}
