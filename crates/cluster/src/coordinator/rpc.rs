//! The gRPC service: each handler validates its request, converts it
//! ([`super::wire`]) and makes its change through [`Coordinator::apply`] — or,
//! for a question, reads the state under the lock.

use std::collections::HashSet;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use hetero_job::JobSpec;
use hetero_proto::coordinator_server::Coordinator as CoordinatorRpc;
use hetero_proto::{self as pb, PROTOCOL_VERSION};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{Coordinator, Refusal, wire};
use crate::now_ms;

type LogStream = Pin<Box<dyn Stream<Item = Result<pb::LogEntry, Status>> + Send>>;
type DataStream = Pin<Box<dyn Stream<Item = Result<pb::DataChunk, Status>> + Send>>;

#[tonic::async_trait]
impl CoordinatorRpc for Coordinator {
    async fn register_agent(
        &self,
        req: Request<pb::RegisterAgentRequest>,
    ) -> Result<Response<pb::RegisterAgentResponse>, Status> {
        let req = req.into_inner();
        if req.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "agent speaks protocol {}, this coordinator speaks {PROTOCOL_VERSION}; run the same Hetero version",
                req.protocol_version
            )));
        }
        if req.groups.is_empty() {
            return Err(Status::invalid_argument(
                "an agent must offer at least one resource group",
            ));
        }
        if let Some(g) = req.groups.iter().find(|g| g.kind.is_empty() || g.worker_slots == 0) {
            return Err(Status::invalid_argument(format!(
                "resource group {:?} needs a kind and at least one worker slot",
                g.kind
            )));
        }
        let groups = req.groups.iter().map(wire::group_record).collect();
        let (agent_id, agent_key) = self.apply(|jobs, nodes, l| {
            let (id, key) = nodes.register(l.store, &req.agent_id, &req.agent_key, req.hostname, groups)?;
            jobs.rejoin_lost(l, &id)?;
            jobs.schedule(l, nodes)?;
            Ok((id, key))
        })?;
        Ok(Response::new(pb::RegisterAgentResponse {
            agent_id,
            heartbeat_interval_ms: self.inner.config.heartbeat_interval.as_millis() as u32,
            agent_key,
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = req.into_inner();
        let reported: HashSet<String> = req.tasks.iter().map(|t| t.task_id.clone()).collect();
        let orders = self.apply(|jobs, nodes, l| {
            if !nodes.heartbeat(&req.agent_id, req.usage) {
                return Ok(None);
            }
            jobs.schedule(l, nodes)?;
            Ok(Some(jobs.reconcile(l, &req.agent_id, &reported)?))
        })?;
        Ok(Response::new(match orders {
            Some(orders) => wire::orders(orders),
            None => pb::HeartbeatResponse {
                reregister: true,
                ..Default::default()
            },
        }))
    }

    async fn report_task(
        &self,
        req: Request<pb::ReportTaskRequest>,
    ) -> Result<Response<pb::ReportTaskResponse>, Status> {
        let report = wire::report(req.into_inner());
        self.apply(|jobs, nodes, l| jobs.report(l, nodes, report))?;
        Ok(Response::new(pb::ReportTaskResponse {}))
    }

    async fn rendezvous(
        &self,
        req: Request<pb::RendezvousRequest>,
    ) -> Result<Response<pb::RendezvousResponse>, Status> {
        let arriving = wire::arriving(req.into_inner());
        let job_id = arriving.job_id.clone();
        let answer = self.apply(|jobs, _, l| jobs.arrive(l.store, arriving))?;
        let mut response = wire::answer(answer);
        response.dataset_in_flight = !response.ready && self.dataset_in_flight(&job_id);
        Ok(Response::new(response))
    }

    async fn check_membership(
        &self,
        req: Request<pb::CheckMembershipRequest>,
    ) -> Result<Response<pb::CheckMembershipResponse>, Status> {
        let req = req.into_inner();
        let joining = self.apply(|jobs, _, l| jobs.check_members(l, &req.job_id, req.generation, req.epoch))?;
        Ok(Response::new(pb::CheckMembershipResponse {
            regroup: !joining.is_empty(),
            joining,
        }))
    }

    async fn submit_job(&self, req: Request<pb::SubmitJobRequest>) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let req = req.into_inner();
        let mut spec = JobSpec::parse(&req.spec_toml).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !req.base_dir.is_empty() {
            spec.resolve_paths(Path::new(&req.base_dir));
        }
        let job_id = self.apply(|jobs, nodes, l| jobs.enqueue(l, nodes, spec))?;
        Ok(Response::new(pb::SubmitJobResponse { job_id }))
    }

    async fn resume_job(&self, req: Request<pb::ResumeJobRequest>) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let old_id = req.into_inner().job_id;
        let job_id = self.apply(|jobs, nodes, l| jobs.resume(l, nodes, &old_id))?;
        Ok(Response::new(pb::SubmitJobResponse { job_id }))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::JobInfo>, Status> {
        let id = req.into_inner().job_id;
        let st = self.lock();
        let job = st.jobs.find(&id)?;
        Ok(Response::new(wire::job_info(job, &st.telemetry)))
    }

    async fn list_jobs(&self, _req: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let st = self.lock();
        Ok(Response::new(pb::ListJobsResponse {
            jobs: st.jobs.all().map(|j| wire::job_info(j, &st.telemetry)).collect(),
        }))
    }

    type StreamLogsStream = LogStream;

    async fn stream_logs(&self, req: Request<pb::StreamLogsRequest>) -> Result<Response<LogStream>, Status> {
        let req = req.into_inner();
        let mut tick = {
            let st = self.lock();
            st.jobs.find(&req.job_id)?;
            st.telemetry.follow_logs()
        };
        let (tx, rx) = mpsc::channel(256);
        let me = self.clone();
        tokio::spawn(async move {
            let mut after = req.after_seq;
            loop {
                // Read the job's state *before* its logs: a job seen final here has
                // all of its lines stored, so the last read below gets them all.
                let ended = me.lock().jobs.get(&req.job_id).is_none_or(|j| j.state.is_final());
                loop {
                    let lines = match me.inner.store.logs(&req.job_id, after, 500) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = tx.send(Err(Refusal::Store(e).into())).await;
                            return;
                        }
                    };
                    if lines.is_empty() {
                        break;
                    }
                    for l in lines {
                        after = l.seq;
                        if tx.send(Ok(wire::log_entry(&req.job_id, l))).await.is_err() {
                            return;
                        }
                    }
                }
                if !req.follow || ended {
                    return;
                }
                tokio::select! {
                    _ = tick.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> Result<Response<pb::CancelJobResponse>, Status> {
        let id = req.into_inner().job_id;
        let state = self.apply(|jobs, nodes, l| jobs.cancel(l, nodes, &id))?;
        Ok(Response::new(pb::CancelJobResponse {
            state: pb::JobState::from(state) as i32,
        }))
    }

    async fn dataset_files(
        &self,
        req: Request<pb::DatasetFilesRequest>,
    ) -> Result<Response<pb::DatasetFilesResponse>, Status> {
        Ok(Response::new(self.dataset_listing(&req.into_inner().job_id).await?))
    }

    type FetchDatasetFileStream = DataStream;

    async fn fetch_dataset_file(
        &self,
        req: Request<pb::FetchDatasetFileRequest>,
    ) -> Result<Response<DataStream>, Status> {
        let chunks = self.dataset_chunks(req.into_inner()).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(chunks))))
    }

    async fn list_alerts(
        &self,
        req: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let alerts = self
            .inner
            .store
            .alerts(req.into_inner().after_id)
            .map_err(Refusal::Store)?;
        Ok(Response::new(pb::ListAlertsResponse {
            alerts: alerts.into_iter().map(wire::alert).collect(),
        }))
    }

    async fn list_nodes(&self, _req: Request<pb::ListNodesRequest>) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self.node_infos(&self.lock());
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn set_group_score(&self, req: Request<pb::SetGroupScoreRequest>) -> Result<Response<pb::NodeInfo>, Status> {
        let req = req.into_inner();
        if !req.score.is_finite() || req.score < 0.0 {
            return Err(Status::invalid_argument(format!(
                "score {} must be a number ≥ 0",
                req.score
            )));
        }
        let info = self.apply(|jobs, nodes, l| {
            let node = nodes.set_score(l.store, &req.agent_id, &req.kind, req.score)?.clone();
            let health = nodes.health(&node, now_ms());
            Ok(wire::node_info(
                &node,
                health,
                jobs.busy_on(&node.agent_id),
                nodes.usage(&node.agent_id),
            ))
        })?;
        Ok(Response::new(info))
    }
}
