//! Finding the other workers: each rank tells the coordinator its data-plane
//! address and asks until every rank has done so — at the start, and again as a
//! [`Membership`] when the ring broke and the survivors must form a new one.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use hetero_comm::{Ring, RingConfig};
use hetero_proto as pb;
use hetero_train::{Membership, Regroup, TrainError};

use crate::{WorkerError, WorkerSetup};

/// Who is in a ring: members' original ranks, addresses and compute scores.
pub struct Members {
    /// Original ranks, in ring order.
    pub ranks: Vec<usize>,
    /// Data-plane addresses, in ring order.
    pub addresses: Vec<SocketAddr>,
    /// Compute scores (empty unless the split is weighted).
    pub weights: Vec<f64>,
}

/// How long a worker waits for the slowest peer to arrive.
pub const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(180);

/// Publishes `address` for this rank and returns every rank's address.
pub fn exchange(setup: &WorkerSetup, address: SocketAddr) -> Result<Vec<SocketAddr>, WorkerError> {
    Ok(members(setup, address, 0)?.addresses)
}

/// Publishes `address` for ring `generation` and waits for the other members.
pub fn members(setup: &WorkerSetup, address: SocketAddr, generation: u64) -> Result<Members, WorkerError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| WorkerError::Rendezvous(format!("cannot start a runtime: {e}")))?;
    rt.block_on(async {
        let mut client = hetero_cluster::client::connect(&setup.coordinator, &setup.token)
            .await
            .map_err(|e| WorkerError::Rendezvous(e.to_string()))?;
        let started = Instant::now();
        loop {
            let req = pb::RendezvousRequest {
                job_id: setup.job_id.clone(),
                rank: setup.rank as u32,
                address: address.to_string(),
                generation,
            };
            let resp = client
                .rendezvous(req)
                .await
                .map_err(|s| WorkerError::Rendezvous(s.message().to_string()))?
                .into_inner();
            if resp.ready {
                let addresses = resp
                    .addresses
                    .iter()
                    .map(|a| {
                        a.parse()
                            .map_err(|_| WorkerError::Rendezvous(format!("bad peer address {a:?}")))
                    })
                    .collect::<Result<_, _>>()?;
                return Ok(Members {
                    ranks: resp.members.iter().map(|&r| r as usize).collect(),
                    addresses,
                    weights: resp.weights.iter().map(|&w| w as f64).collect(),
                });
            }
            if started.elapsed() > RENDEZVOUS_TIMEOUT {
                return Err(WorkerError::Rendezvous(format!(
                    "not every worker arrived within {} s",
                    RENDEZVOUS_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Regroups through the coordinator: the survivors of a broken ring meet at the
/// next generation and form a new ring on the same listener.
pub struct CoordinatorMembership {
    setup: WorkerSetup,
    listener: TcpListener,
}

impl CoordinatorMembership {
    /// Regroups `setup`'s worker, listening on `listener` (the data-plane one).
    pub fn new(setup: WorkerSetup, listener: TcpListener) -> Self {
        CoordinatorMembership { setup, listener }
    }
}

impl Membership for CoordinatorMembership {
    fn regroup(&mut self, generation: u64, reason: &str) -> Result<Regroup, TrainError> {
        eprintln!("ring broken ({reason}); regrouping with the survivors (generation {generation})");
        let lost = |e: String| TrainError::Config(format!("cannot regroup after a lost worker: {e}"));
        let address = self.listener.local_addr().map_err(|e| lost(e.to_string()))?;
        let members = members(&self.setup, address, generation).map_err(|e| lost(e.to_string()))?;
        let rank = members
            .ranks
            .iter()
            .position(|&r| r == self.setup.rank)
            .ok_or_else(|| lost("this worker is not among the survivors".into()))?;
        let listener = self.listener.try_clone().map_err(|e| lost(e.to_string()))?;
        let session = format!("{}#g{generation}", self.setup.job_id);
        let config = RingConfig::new(rank, members.ranks.len(), session, self.setup.token.clone());
        let ring = Ring::form(config, listener, &members.addresses)?;
        eprintln!(
            "ring re-formed: {} worker(s), original ranks {:?}",
            members.ranks.len(),
            members.ranks
        );
        Ok(Regroup {
            ring,
            members: members.ranks,
            weights: members.weights,
        })
    }
}
