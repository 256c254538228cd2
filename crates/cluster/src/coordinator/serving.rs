//! The two calls that serve a job's dataset files to its workers
//! ([`super::data_source`] decides what may be served), and whether a job's
//! files are on their way.
//!
//! A worker fetches its dataset before it joins the rendezvous, so the members
//! that have the data wait for it there. A transfer can outlast their wait (a few
//! GB over a slow link), so the rendezvous says when this job's files went out
//! lately, and the waiting workers count their wait from then: a stalled
//! transfer still ends the job, a slow one does not.

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hetero_job::JobSpec;
use hetero_proto as pb;
use tokio::sync::mpsc;
use tonic::Status;

use super::data_source::{self, CHUNK};
use super::{Coordinator, Served};

/// How recently a chunk must have gone out for a job's dataset to count as on
/// its way (a fetching worker asks for the next file at once, and a file's
/// chunks follow each other, so a live transfer sends far more often).
pub(crate) const IN_FLIGHT: Duration = Duration::from_secs(15);

impl Coordinator {
    /// Whether a chunk of `job_id`'s dataset went out within [`IN_FLIGHT`].
    pub(crate) fn dataset_in_flight(&self, job_id: &str) -> bool {
        let sending = self.inner.sending.lock().unwrap_or_else(|p| p.into_inner());
        sending.get(job_id).is_some_and(|at| at.elapsed() < IN_FLIGHT)
    }

    /// Notes that a chunk of `job_id`'s dataset is going out now, forgetting
    /// jobs whose transfers have ended.
    fn note_sending(&self, job_id: &str) {
        let mut sending = self.inner.sending.lock().unwrap_or_else(|p| p.into_inner());
        sending.retain(|_, at| at.elapsed() < IN_FLIGHT);
        sending.insert(job_id.to_string(), Instant::now());
    }

    /// The dataset of `job_id` as served here, listed once and kept; `Ok(Err(why))`
    /// when it is not served.
    pub(crate) async fn served_dataset(&self, job_id: &str) -> Result<Result<Arc<Served>, String>, Status> {
        let known = || {
            self.inner
                .served
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(job_id)
                .cloned()
        };
        if let Some(s) = known() {
            return Ok(s);
        }
        let _one_at_a_time = self.inner.listing.lock().await;
        if let Some(s) = known() {
            return Ok(s);
        }
        let spec_json = {
            let st = self.lock();
            st.jobs.find(job_id)?.spec_json.clone()
        };
        let spec = JobSpec::from_json(&spec_json).map_err(|e| Status::internal(format!("the job's spec: {e}")))?;
        let allowed = self.inner.config.serve_data.clone();
        let listed = tokio::task::spawn_blocking(move || {
            let folder = data_source::served_folder(&allowed, &spec.dataset.path)?;
            let files = data_source::list(&folder)?;
            Ok::<_, String>(Served { folder, files })
        })
        .await
        .map_err(|e| Status::internal(format!("listing the dataset: {e}")))?;
        let listed = listed.map(Arc::new);
        self.inner
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(job_id.to_string(), listed.clone());
        Ok(listed)
    }

    /// The listing a worker asks for.
    pub(crate) async fn dataset_listing(&self, job_id: &str) -> Result<pb::DatasetFilesResponse, Status> {
        Ok(match self.served_dataset(job_id).await? {
            Ok(served) => pb::DatasetFilesResponse {
                served: true,
                why: String::new(),
                files: served
                    .files
                    .iter()
                    .map(|f| pb::DatasetFile {
                        name: f.name.clone(),
                        size: f.size,
                        sha256: f.sha256.clone(),
                    })
                    .collect(),
            },
            Err(why) => pb::DatasetFilesResponse {
                served: false,
                why,
                files: vec![],
            },
        })
    }

    /// One file from `offset`, in chunks of at most [`CHUNK`] bytes.
    pub(crate) async fn dataset_chunks(
        &self,
        req: pb::FetchDatasetFileRequest,
    ) -> Result<mpsc::Receiver<Result<pb::DataChunk, Status>>, Status> {
        let served = self
            .served_dataset(&req.job_id)
            .await?
            .map_err(Status::failed_precondition)?;
        let (mut file, mut left) = match data_source::open_at(&served.folder, &served.files, &req.name, req.offset) {
            Ok(opened) => opened,
            Err(why) => {
                // The folder may have changed: the next worker to ask gets a
                // new listing, not this one again.
                self.inner
                    .served
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&req.job_id);
                return Err(Status::invalid_argument(why));
            }
        };
        let (tx, rx) = mpsc::channel(4);
        let coordinator = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; CHUNK];
            while left > 0 {
                let want = buf.len().min(left as usize);
                let chunk = match file.read(&mut buf[..want]) {
                    Ok(0) => Err(Status::data_loss(format!("{} ended early", req.name))),
                    Ok(n) => Ok(pb::DataChunk {
                        data: buf[..n].to_vec(),
                    }),
                    Err(e) => Err(Status::internal(format!("reading {}: {e}", req.name))),
                };
                let failed = chunk.is_err();
                if let Ok(c) = &chunk {
                    left -= c.data.len() as u64;
                    coordinator.note_sending(&req.job_id);
                }
                // The worker hung up: nothing more to send.
                if tx.blocking_send(chunk).is_err() || failed {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::CoordinatorConfig;

    #[test]
    fn a_job_counts_as_fetching_only_while_its_chunks_go_out() {
        let dir = tempfile::tempdir().unwrap();
        let c = Coordinator::open(CoordinatorConfig::new(dir.path().join("c.redb"), "token")).unwrap();
        assert!(!c.dataset_in_flight("job-1"));
        c.note_sending("job-1");
        assert!(c.dataset_in_flight("job-1"));
        assert!(!c.dataset_in_flight("job-2"));
        // Its last chunk went out a window ago: the transfer has ended.
        let long_ago = Instant::now().checked_sub(IN_FLIGHT).unwrap();
        c.inner.sending.lock().unwrap().insert("job-1".into(), long_ago);
        assert!(!c.dataset_in_flight("job-1"));
        c.note_sending("job-2");
        assert!(
            !c.inner.sending.lock().unwrap().contains_key("job-1"),
            "ended transfers are forgotten"
        );
    }
}
