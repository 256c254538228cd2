//! Finding the other workers: each rank tells the coordinator its data-plane
//! address and asks until every rank has done so.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hetero_proto as pb;

use crate::{WorkerError, WorkerSetup};

/// How long a worker waits for the slowest peer to arrive.
pub const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(180);

/// Publishes `address` for this rank and returns every rank's address.
pub fn exchange(setup: &WorkerSetup, address: SocketAddr) -> Result<Vec<SocketAddr>, WorkerError> {
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
            };
            let resp = client
                .rendezvous(req)
                .await
                .map_err(|s| WorkerError::Rendezvous(s.message().to_string()))?
                .into_inner();
            if resp.ready {
                return resp
                    .addresses
                    .iter()
                    .map(|a| {
                        a.parse()
                            .map_err(|_| WorkerError::Rendezvous(format!("bad peer address {a:?}")))
                    })
                    .collect();
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
