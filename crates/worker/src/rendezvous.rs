//! Finding the other workers: each rank tells the coordinator its data-plane
//! address and asks until every rank has done so — at the start, and again as a
//! [`Membership`] when the ring broke and the survivors must form a new one, or
//! lost ranks rejoin between epochs ([`join`] is the rejoining worker's side).

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use hetero_comm::liveness;
use hetero_comm::{Ring, RingConfig};
use hetero_proto as pb;
use hetero_train::{Membership, Regroup, TrainError};

use crate::{WorkerError, WorkerSetup};

/// Who is in a ring: members' original ranks, addresses and compute scores.
pub struct Members {
    /// The ring's generation.
    pub generation: u64,
    /// Original ranks, in ring order.
    pub ranks: Vec<usize>,
    /// Data-plane addresses, in ring order.
    pub addresses: Vec<SocketAddr>,
    /// Compute scores (empty unless the split is weighted).
    pub weights: Vec<f64>,
}

/// How long a worker waits for the slowest peer to arrive — counted again from
/// each answer that says the coordinator is still sending the job's dataset to a
/// member (a chunk went out within the last 15 s).
pub const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(180);

/// Publishes `address` for this rank and returns every rank's address.
pub fn exchange(setup: &WorkerSetup, address: SocketAddr) -> Result<Vec<SocketAddr>, WorkerError> {
    Ok(members(setup, address, 0, false, RENDEZVOUS_TIMEOUT)?.addresses)
}

/// How long a rejoining worker waits to be admitted: the ring admits it at the next
/// epoch boundary, however long the epoch.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

fn runtime() -> Result<tokio::runtime::Runtime, WorkerError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| WorkerError::Rendezvous(format!("cannot start a runtime: {e}")))
}

/// Publishes `address` for ring `generation` (or, `joining`, for whichever ring
/// admits this worker) and waits for the other members.
pub fn members(
    setup: &WorkerSetup,
    address: SocketAddr,
    generation: u64,
    joining: bool,
    timeout: Duration,
) -> Result<Members, WorkerError> {
    let _waiting = liveness::on_peers();
    runtime()?.block_on(async {
        // Counted from the start, or from the last answer that said the
        // coordinator is still sending a member the dataset.
        let mut started = Instant::now();
        let mut said_fetching = false;
        let mut client = None;
        // Why the coordinator could not be asked, while it is away (restarting): the
        // record of who arrived survives a restart, so asking again is enough.
        let mut away_because: Option<String> = None;
        loop {
            if started.elapsed() > timeout {
                return Err(WorkerError::Rendezvous(match away_because {
                    Some(why) => format!(
                        "the coordinator at {} stayed unreachable for {} s: {why}",
                        setup.coordinator,
                        timeout.as_secs()
                    ),
                    None => format!("not every worker arrived within {} s", timeout.as_secs()),
                }));
            }
            if client.is_none() {
                match hetero_proto::client::connect(&setup.coordinator, &setup.token).await {
                    Ok(c) => client = Some(c),
                    Err(e) => {
                        away_because = Some(e.to_string());
                        tokio::time::sleep(AWAY_RETRY).await;
                        continue;
                    }
                }
            }
            let req = pb::RendezvousRequest {
                job_id: setup.job_id.clone(),
                rank: setup.rank as u32,
                address: address.to_string(),
                generation,
                joining,
            };
            let resp = match client.as_mut().expect("connected above").rendezvous(req).await {
                Ok(r) => r.into_inner(),
                Err(s) if coordinator_away(&s) => {
                    away_because = Some(s.message().to_string());
                    client = None;
                    tokio::time::sleep(AWAY_RETRY).await;
                    continue;
                }
                Err(s) => return Err(WorkerError::Rendezvous(s.message().to_string())),
            };
            away_because = None;
            if resp.dataset_in_flight {
                started = Instant::now();
                if !said_fetching {
                    eprintln!(
                        "waiting for the other workers: the coordinator is still sending the dataset to one of them"
                    );
                    said_fetching = true;
                }
            }
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
                    generation: resp.generation,
                    ranks: resp.members.iter().map(|&r| r as usize).collect(),
                    addresses,
                    weights: resp.weights.iter().map(|&w| w as f64).collect(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// How long a worker waits out a coordinator that is away (restarting, its host
/// rebooting) when it needs an answer between epochs, before giving up on it.
pub const COORDINATOR_OUTAGE: Duration = Duration::from_secs(120);

/// Pause between tries while the coordinator is away.
const AWAY_RETRY: Duration = Duration::from_millis(500);

/// Whether a call failed because the coordinator is away — restarting,
/// unreachable, stalled past the call's deadline — rather than because it refused.
/// Only such calls are worth another try.
fn coordinator_away(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled | tonic::Code::Unknown
    )
}

/// Regroups through the coordinator: the survivors of a broken ring meet at the
/// next generation and form a new ring on the same listener.
pub struct CoordinatorMembership {
    setup: WorkerSetup,
    listener: TcpListener,
    /// The runtime and connection the epoch boundaries' questions go over, kept
    /// from one epoch to the next: a new runtime and TLS connection each time
    /// cost ~45 ms a boundary, more under a CPU quota, and the whole ring waits
    /// for the slowest asker. The runtime runs only while a question is asked,
    /// so nothing answers the coordinator's HTTP/2 pings in between, and it
    /// closes the connection after ~30 s: a connection idle for [`KEEP_IDLE`]
    /// is made again, and a kept one that fails in any way is tried once anew.
    runtime: Option<tokio::runtime::Runtime>,
    /// The kept connection, and when it last answered.
    client: Option<(hetero_proto::client::Client, Instant)>,
}

/// How long a kept connection to the coordinator may idle and still be used:
/// below the coordinator's ping interval (10 s), so no ping went unanswered.
const KEEP_IDLE: Duration = Duration::from_secs(8);

impl CoordinatorMembership {
    /// Regroups `setup`'s worker, listening on `listener` (the data-plane one).
    pub fn new(setup: WorkerSetup, listener: TcpListener) -> Self {
        CoordinatorMembership {
            setup,
            listener,
            runtime: None,
            client: None,
        }
    }
}

/// Forms the ring described by `members` on `listener`, as this setup's rank.
fn form(setup: &WorkerSetup, listener: &TcpListener, members: Members) -> Result<Regroup, TrainError> {
    let fail = |e: String| {
        TrainError::Config(format!(
            "cannot form the ring of generation {}: {e}",
            members.generation
        ))
    };
    let rank = members
        .ranks
        .iter()
        .position(|&r| r == setup.rank)
        .ok_or_else(|| fail("this worker is not among its members".into()))?;
    let listener = listener.try_clone().map_err(|e| fail(e.to_string()))?;
    let _waiting = liveness::on_peers();
    let session = format!("{}#g{}", setup.job_id, members.generation);
    let config = RingConfig::new(rank, members.ranks.len(), session, setup.token.clone());
    let ring = Ring::form(config, listener, &members.addresses)?;
    eprintln!(
        "ring formed (generation {}): {} worker(s), original ranks {:?}",
        members.generation,
        members.ranks.len(),
        members.ranks
    );
    Ok(Regroup {
        ring,
        members: members.ranks,
        weights: members.weights,
    })
}

/// A relaunched rank's way in: waits until the running ring admits it (between
/// epochs) and forms the new ring with it. Returns the ring and its generation.
pub fn join(setup: &WorkerSetup, listener: &TcpListener) -> Result<(Regroup, u64), WorkerError> {
    let address = listener.local_addr().map_err(|e| WorkerError::Setup(e.to_string()))?;
    eprintln!(
        "rank {} rejoins {}: waiting for the next epoch boundary",
        setup.rank, setup.job_id
    );
    let members = members(setup, address, 0, true, JOIN_TIMEOUT)?;
    let generation = members.generation;
    Ok((form(setup, listener, members)?, generation))
}

impl Membership for CoordinatorMembership {
    fn regroup(&mut self, generation: u64, reason: &str) -> Result<Regroup, TrainError> {
        eprintln!("regrouping ({reason}): generation {generation}");
        let lost = |e: String| TrainError::Config(format!("cannot regroup ({reason}): {e}"));
        let address = self.listener.local_addr().map_err(|e| lost(e.to_string()))?;
        let members =
            members(&self.setup, address, generation, false, RENDEZVOUS_TIMEOUT).map_err(|e| lost(e.to_string()))?;
        form(&self.setup, &self.listener, members)
    }

    fn joiners_waiting(&mut self, generation: u64, epoch: usize) -> Result<bool, TrainError> {
        let fail = |e: String| TrainError::Config(format!("cannot ask the coordinator for joining workers: {e}"));
        let _waiting = liveness::on_peers();
        let runtime = match self.runtime.take() {
            Some(r) => r,
            None => runtime().map_err(|e| fail(e.to_string()))?,
        };
        let kept = &mut self.client;
        if kept.as_ref().is_some_and(|(_, used)| used.elapsed() > KEEP_IDLE) {
            *kept = None;
        }
        let setup = &self.setup;
        let answer = runtime.block_on(async {
            // A coordinator that blinks or restarts must not split the ring's
            // decision: ask again until it answers (it keeps its decision for this
            // epoch across a restart), for at most COORDINATOR_OUTAGE.
            let started = Instant::now();
            loop {
                // A kept connection the coordinator has since closed fails at
                // once, in whatever words: a new one is tried straight away.
                let reused = kept.is_some();
                let answer = match kept {
                    Some((client, _)) => ask_joiners(client, setup, generation, epoch).await,
                    None => match hetero_proto::client::connect(&setup.coordinator, &setup.token).await {
                        Ok(client) => {
                            ask_joiners(&mut kept.insert((client, Instant::now())).0, setup, generation, epoch).await
                        }
                        Err(e) => Err(NoAnswer::Away(e.to_string())),
                    },
                };
                if answer.is_ok() {
                    if let Some((_, used)) = kept.as_mut() {
                        *used = Instant::now();
                    }
                } else {
                    *kept = None;
                    if reused {
                        continue;
                    }
                }
                let why = match answer {
                    Ok(regroup) => return Ok(regroup),
                    Err(NoAnswer::Refused(why)) => return Err(fail(why)),
                    Err(NoAnswer::Away(why)) => why,
                };
                if started.elapsed() > COORDINATOR_OUTAGE {
                    return Err(fail(format!(
                        "unreachable for {} s: {why}",
                        COORDINATOR_OUTAGE.as_secs()
                    )));
                }
                tokio::time::sleep(AWAY_RETRY).await;
            }
        });
        self.runtime = Some(runtime);
        answer
    }
}

/// Why a question to the coordinator got no answer.
enum NoAnswer {
    /// It is away (restarting, unreachable, the connection closed): worth
    /// asking again.
    Away(String),
    /// It refused: asking again gets the same.
    Refused(String),
}

/// Asks the coordinator over `client` whether lost workers wait to rejoin the
/// ring of `generation` after `epoch`.
async fn ask_joiners(
    client: &mut hetero_proto::client::Client,
    setup: &WorkerSetup,
    generation: u64,
    epoch: usize,
) -> Result<bool, NoAnswer> {
    let req = pb::CheckMembershipRequest {
        job_id: setup.job_id.clone(),
        rank: setup.rank as u32,
        generation,
        epoch: epoch as u64,
    };
    match client.check_membership(req).await {
        Ok(r) => Ok(r.into_inner().regroup),
        Err(s) if coordinator_away(&s) => Err(NoAnswer::Away(s.message().to_string())),
        Err(s) => Err(NoAnswer::Refused(s.message().to_string())),
    }
}
