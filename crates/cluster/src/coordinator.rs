//! The coordinator: the task-manager node of seed 001.
//!
//! It accepts jobs, places their workers on agents (gang placement, see
//! [`crate::scheduler`]), hands assignments out in heartbeat replies, lets workers
//! find each other (rendezvous), keeps every job's log, and decides each job's end.
//!
//! ## Design
//! All state sits in one [`State`] behind a mutex; handlers validate, lock, change,
//! write through to the [`Store`] and unlock — no await while locked. What an agent
//! must do (start or stop a task) is *derived* from that state at each heartbeat
//! rather than queued, so a restarted coordinator, which reloads the state, owes no
//! agent a message it forgot.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hetero_job::events::Event;
use hetero_job::{CHECKPOINT_FILE, JobSpec, WorkerRole};
use hetero_proto::auth::CheckToken;
use hetero_proto::coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer};
use hetero_proto::{self as pb, PROTOCOL_VERSION};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::alerts::{AlertRecord, Webhook};
use crate::records::{GroupRecord, JobRecord, JobState, NodeRecord, TaskRecord, TaskState, task_state_from_wire};
use crate::rendezvous::Rendezvous;
use crate::scheduler::{self, Demand, GroupCapacity, Queued};
use crate::store::{LogRecord, Store};
use crate::{ClusterError, now_ms};

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// The redb file.
    pub store_path: PathBuf,
    /// The cluster token every call must carry.
    pub token: String,
    /// How often agents heartbeat.
    pub heartbeat_interval: Duration,
    /// Silence after which a node is dead and its tasks fail.
    pub dead_after: Duration,
    /// Where alerts are POSTed, if anywhere.
    pub alert_webhook: Option<Webhook>,
    /// How gRPC is served.
    pub tls: ControlTls,
}

/// How the coordinator serves gRPC.
#[derive(Debug, Clone)]
pub enum ControlTls {
    /// TLS, its certificate signed by the authority the token derives (the default;
    /// [`hetero_proto::tls`]).
    Token,
    /// TLS with the operator's certificate chain and key (PEM, `--tls-cert`,
    /// `--tls-key`); nodes trust the operator's authority (`HETERO_TLS_CA`).
    Operator {
        /// The certificate chain.
        cert_pem: String,
        /// Its private key.
        key_pem: String,
    },
    /// Plaintext HTTP/2 (`--insecure`).
    Insecure,
}

impl CoordinatorConfig {
    /// Defaults: heartbeat every 500 ms, dead after 10 s of silence, TLS.
    pub fn new(store_path: impl Into<PathBuf>, token: impl Into<String>) -> Self {
        CoordinatorConfig {
            store_path: store_path.into(),
            token: token.into(),
            heartbeat_interval: Duration::from_millis(500),
            dead_after: Duration::from_secs(10),
            alert_webhook: None,
            tls: ControlTls::Token,
        }
    }
}

#[derive(Default)]
struct State {
    jobs: BTreeMap<String, JobRecord>,
    nodes: BTreeMap<String, NodeRecord>,
    /// Last log sequence number per job.
    log_seq: HashMap<String, u64>,
    next_job: u64,
    next_node: u64,
    next_alert: u64,
    /// Health last seen per node, to alert once per change.
    health: HashMap<String, Health>,
    /// Device usage from each node's last heartbeat.
    usage: HashMap<String, Vec<pb::DeviceUsage>>,
    /// Latest (loss, samples/s) each task reported.
    metrics: HashMap<String, (f32, f64)>,
    /// Per job, rank 0's (global step, loss, samples/s of the job) over time, capped.
    history: HashMap<String, Vec<ChartPoint>>,
}

/// One point of a job's live chart: (global step, loss, job samples/s).
pub(crate) type ChartPoint = (u64, f32, f64);

/// Points of a job's live chart kept in memory.
const HISTORY_POINTS: usize = 5000;

/// A node's health as the monitor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Alive,
    Suspect,
    Dead,
}

impl Health {
    fn name(self) -> &'static str {
        match self {
            Health::Alive => "alive",
            Health::Suspect => "suspect",
            Health::Dead => "dead",
        }
    }
}

struct Inner {
    state: Mutex<State>,
    store: Store,
    config: CoordinatorConfig,
    /// Bumped whenever a log line is appended, to wake log followers.
    log_tick: watch::Sender<u64>,
    /// Alerts on their way to the webhook (taken by `serve`, which delivers them).
    alert_tx: mpsc::UnboundedSender<AlertRecord>,
    alert_rx: Mutex<Option<mpsc::UnboundedReceiver<AlertRecord>>>,
}

/// A coordinator; clone it freely (it is a handle).
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

/// Whether `t` is one of the job's workers (not its parameter server) that is in
/// the ring now: alive, and admitted if it rejoined.
fn in_ring(t: &TaskRecord, workers: u32) -> bool {
    t.rank < workers && !t.state.is_final() && !t.joining
}

/// The parameter server of a job whose workers are `placed`: rank `workers`, on the
/// node that runs most of them (so most gradients cross no network), without taking
/// a worker slot — it sums and steps, and waits on the network the rest of the time.
fn server_task(job_id: &str, workers: u32, placed: &[TaskRecord]) -> TaskRecord {
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for t in placed {
        *count.entry(t.agent_id.as_str()).or_default() += 1;
    }
    let most = count.values().copied().max().unwrap_or(0);
    // Ties go to the node of the lowest rank.
    let node = placed
        .iter()
        .find(|t| count[t.agent_id.as_str()] == most)
        .map_or_else(String::new, |t| t.agent_id.clone());
    TaskRecord {
        task_id: format!("{job_id}-ps"),
        rank: workers,
        agent_id: node,
        role: WorkerRole::ParameterServer.name().into(),
        state: TaskState::Pending,
        message: String::new(),
        delivered: false,
        threads: 1,
        group: "cpu".into(),
        memory_mb: 0,
        weight: 0.0,
        migrated: false,
        rejoins: 0,
        joining: false,
        job_fatal: false,
    }
}

fn job_number(id: &str) -> u64 {
    id.strip_prefix("job-").and_then(|n| n.parse().ok()).unwrap_or(0)
}

fn store_status(e: ClusterError) -> Status {
    Status::internal(format!("the coordinator's store failed: {e}"))
}

impl Coordinator {
    /// Opens the store and reloads every job and node it holds.
    pub fn open(config: CoordinatorConfig) -> Result<Coordinator, ClusterError> {
        let store = Store::open(&config.store_path)?;
        let mut state = State::default();
        for mut job in store.jobs()? {
            state.next_job = state.next_job.max(job_number(&job.job_id));
            if job.state == JobState::Running && job.rendezvous.slots.is_empty() {
                // Saved by a coordinator that kept rendezvous in memory only.
                job.rendezvous = Rendezvous::new(job.ranks());
            }
            state.jobs.insert(job.job_id.clone(), job);
        }
        let now = now_ms();
        for mut node in store.nodes()? {
            // A fresh grace period: agents that still live will heartbeat again soon.
            node.last_heartbeat_ms = now;
            let n = node
                .agent_id
                .strip_prefix("node-")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            state.next_node = state.next_node.max(n);
            state.nodes.insert(node.agent_id.clone(), node);
        }
        state.next_alert = store.alerts(0)?.last().map_or(0, |a| a.id);
        let (log_tick, _) = watch::channel(0);
        let (alert_tx, alert_rx) = mpsc::unbounded_channel();
        Ok(Coordinator {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                store,
                config,
                log_tick,
                alert_tx,
                alert_rx: Mutex::new(Some(alert_rx)),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tonic service, behind the token check.
    pub fn service(&self) -> InterceptedService<CoordinatorServer<Coordinator>, CheckToken> {
        CoordinatorServer::with_interceptor(self.clone(), CheckToken::new(self.inner.config.token.clone()))
    }

    /// Serves gRPC on `listener` and runs the node monitor until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ClusterError> {
        let delivery = match (
            &self.inner.config.alert_webhook,
            self.inner.alert_rx.lock().ok().and_then(|mut r| r.take()),
        ) {
            (Some(hook), Some(rx)) => Some(tokio::spawn(crate::alerts::deliver(hook.clone(), rx))),
            _ => None,
        };
        let monitor = {
            let me = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tick.tick().await;
                    me.check_nodes();
                }
            })
        };
        // HTTP/2 pings both ways: a client that vanished frees its streams (a
        // `logs --follow` of a dead terminal) in about 30 s.
        let mut server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)));
        let tls = match &self.inner.config.tls {
            ControlTls::Token => Some(hetero_proto::tls::server_config(&self.inner.config.token)),
            ControlTls::Operator { cert_pem, key_pem } => {
                Some(hetero_proto::tls::operator_server_config(cert_pem, key_pem))
            }
            ControlTls::Insecure => None,
        };
        if let Some(tls) = tls {
            let tls =
                tls.map_err(|e| ClusterError::io("making the coordinator's certificate", std::io::Error::other(e)))?;
            server = server
                .tls_config(tls)
                .map_err(|e| ClusterError::io("configuring TLS", std::io::Error::other(e)))?;
        }
        let result = server
            .add_service(self.service())
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await;
        monitor.abort();
        if let Some(d) = delivery {
            d.abort();
        }
        result.map_err(|e| ClusterError::io("serving gRPC", std::io::Error::other(e)))
    }

    /// The cluster token (what the dashboard's login checks).
    pub(crate) fn token(&self) -> &str {
        &self.inner.config.token
    }

    fn append_log(&self, st: &mut State, job_id: &str, rank: i32, kind: &str, texts: Vec<String>) {
        if texts.is_empty() {
            return;
        }
        let seq = match st.log_seq.get(job_id) {
            Some(s) => *s,
            None => self.inner.store.last_log_seq(job_id).unwrap_or(0),
        };
        let now = now_ms();
        let lines: Vec<LogRecord> = texts
            .into_iter()
            .enumerate()
            .map(|(i, text)| LogRecord {
                seq: seq + 1 + i as u64,
                rank,
                unix_ms: now,
                kind: kind.to_string(),
                text,
            })
            .collect();
        let last = lines.last().map_or(seq, |l| l.seq);
        if let Err(e) = self.inner.store.append_logs(job_id, &lines) {
            tracing::error!(error = %e, job_id, "could not store log lines");
            return;
        }
        st.log_seq.insert(job_id.to_string(), last);
        self.inner.log_tick.send_modify(|t| *t += 1);
    }

    /// A node as the wire shows it: health, groups with scores, usage, busy slots.
    fn node_info(&self, st: &State, n: &NodeRecord) -> pb::NodeInfo {
        let status = self.health(n, now_ms());
        let busy = st
            .jobs
            .values()
            .flat_map(|j| &j.tasks)
            .filter(|t| t.agent_id == n.agent_id && !t.state.is_final())
            .count() as u32;
        pb::NodeInfo {
            agent_id: n.agent_id.clone(),
            hostname: n.hostname.clone(),
            status: status.name().into(),
            last_heartbeat_unix_ms: n.last_heartbeat_ms,
            groups: n.groups.iter().map(pb::ResourceGroup::from).collect(),
            busy_slots: busy,
            usage: st.usage.get(&n.agent_id).cloned().unwrap_or_default(),
        }
    }

    /// Records, logs and (with a webhook) delivers an alert.
    fn raise(&self, st: &mut State, severity: &str, subject: &str, message: String) {
        st.next_alert += 1;
        let alert = AlertRecord {
            id: st.next_alert,
            unix_ms: now_ms(),
            severity: severity.into(),
            subject: subject.into(),
            message,
        };
        tracing::warn!(severity, subject, message = %alert.message, "alert");
        if let Err(e) = self.inner.store.put_alert(&alert) {
            tracing::error!(error = %e, "could not store an alert");
        }
        let _ = self.inner.alert_tx.send(alert);
    }

    /// Stores `job` — a changed copy of a job — and only then keeps it in memory:
    /// a store that cannot write fails the call that changed it, and memory never
    /// holds what the disk does not.
    fn keep_job(&self, st: &mut State, job: JobRecord) -> Result<(), Status> {
        self.inner.store.put_job(&job).map_err(store_status)?;
        st.jobs.insert(job.job_id.clone(), job);
        Ok(())
    }

    fn save_job(&self, job: &JobRecord) {
        if let Err(e) = self.inner.store.put_job(job) {
            tracing::error!(error = %e, job_id = %job.job_id, "could not store job");
        }
    }

    /// Ends `job_id` in `state` with `message`, cancelling its live tasks.
    fn finish_job(&self, st: &mut State, job_id: &str, state: JobState, message: String) {
        let Some(job) = st.jobs.get_mut(job_id) else {
            return;
        };
        if job.state.is_final() {
            return;
        }
        job.state = state;
        job.message = message.clone();
        job.finished_ms = now_ms();
        job.rendezvous = Rendezvous::default();
        for t in &mut job.tasks {
            if !t.state.is_final() {
                t.state = TaskState::Cancelled;
                if t.message.is_empty() {
                    t.message = format!("stopped: job {}", format!("{state:?}").to_lowercase());
                }
            }
        }
        let job = job.clone();
        self.save_job(&job);
        if state == JobState::Failed {
            self.raise(
                st,
                "warning",
                job_id,
                format!("job {job_id} ({}) failed: {message}", job.name),
            );
        }
        let line = format!("job {}: {message}", format!("{state:?}").to_lowercase());
        self.append_log(st, job_id, -1, "state", vec![line]);
    }

    /// Decides a running job's end from its tasks.
    fn settle_job(&self, st: &mut State, job_id: &str) {
        let Some(job) = st.jobs.get(job_id) else {
            return;
        };
        if job.state != JobState::Running {
            return;
        }
        // A relaunched rank not yet admitted holds no work: it keeps nothing alive.
        let live = job.tasks.iter().filter(|t| !t.state.is_final() && !t.joining).count();
        let workers_left = job.tasks.iter().filter(|t| in_ring(t, job.workers)).count();
        let newly_lost: Vec<usize> = (0..job.tasks.len())
            .filter(|&i| job.tasks[i].state == TaskState::Failed && !job.tasks[i].migrated)
            .collect();
        let fatal = job.tasks.iter().find(|t| t.job_fatal && !t.migrated).map(|t| {
            format!(
                "worker rank {} cannot go on, nor could any other: {}",
                t.rank, t.message
            )
        });
        if let Some(msg) = fatal {
            // No survivor could get past it: fail the job with the reason.
            self.finish_job(st, job_id, JobState::Failed, msg);
            return;
        }
        if !newly_lost.is_empty() && job.formed && job.migratable && workers_left > 0 {
            // The survivors regroup by themselves; record the loss where users look.
            let job = st.jobs.get_mut(job_id).expect("checked above");
            let mut lines = Vec::new();
            for &i in &newly_lost {
                let t = &mut job.tasks[i];
                t.migrated = true;
                lines.push(if t.rank >= job.workers {
                    format!(
                        "the parameter server on {} was lost ({}): the {workers_left} worker(s) go on as one \
                         allreduce ring from the latest global model",
                        t.agent_id, t.message
                    )
                } else if job.server {
                    format!(
                        "worker rank {} on {} lost ({}): the {workers_left} surviving worker(s) take its samples \
                         and go on as one allreduce ring from the latest global model",
                        t.rank, t.agent_id, t.message
                    )
                } else {
                    format!(
                        "worker rank {} on {} lost ({}): its samples migrate to the {workers_left} surviving worker(s)",
                        t.rank, t.agent_id, t.message
                    )
                });
            }
            let saved = job.clone();
            self.save_job(&saved);
            for line in lines {
                self.raise(st, "warning", job_id, format!("job {job_id}: {line}"));
                self.append_log(st, job_id, -1, "state", vec![line]);
            }
            return;
        }
        let job = &st.jobs[job_id];
        let lost: Vec<String> = job
            .tasks
            .iter()
            .filter(|t| t.migrated)
            .map(|t| {
                if t.rank >= job.workers {
                    "the parameter server".to_string()
                } else {
                    format!("rank {}", t.rank)
                }
            })
            .collect();
        if let Some(failed) = job.tasks.iter().find(|t| t.state == TaskState::Failed && !t.migrated) {
            let msg = format!("worker rank {} failed: {}", failed.rank, failed.message);
            self.finish_job(st, job_id, JobState::Failed, msg);
        } else if live == 0 && job.tasks.iter().any(|t| t.state == TaskState::Succeeded) {
            let msg = if lost.is_empty() {
                "all workers finished".to_string()
            } else {
                format!("all surviving workers finished ({} lost and migrated)", lost.join(", "))
            };
            self.finish_job(st, job_id, JobState::Succeeded, msg);
        } else if live == 0 {
            self.finish_job(st, job_id, JobState::Failed, "every worker was lost".into());
        }
    }

    /// Queues a validated job; returns its id.
    fn enqueue(&self, st: &mut State, spec: JobSpec) -> Result<String, Status> {
        if let Some(dep) = spec.scheduling.after.iter().find(|d| !st.jobs.contains_key(*d)) {
            return Err(Status::invalid_argument(format!(
                "scheduling.after names {dep}, which is not a job here"
            )));
        }
        st.next_job += 1;
        let job_id = format!("job-{:06}", st.next_job);
        // Relative paths were resolved against `base_dir` above.
        let output_dir = spec.output_dir.join(&job_id);
        let job = JobRecord {
            job_id: job_id.clone(),
            name: spec.name.clone(),
            spec_json: spec.to_json(),
            workers: spec.cluster.workers as u32,
            program: spec
                .task
                .as_ref()
                .map(|t| t.program.display().to_string())
                .unwrap_or_default(),
            threads_per_worker: spec.cluster.threads_per_worker as u32,
            output_dir: output_dir.display().to_string(),
            state: JobState::Queued,
            message: "waiting for resources".into(),
            submitted_ms: now_ms(),
            started_ms: 0,
            finished_ms: 0,
            tasks: vec![],
            summary_json: String::new(),
            priority: spec.scheduling.priority,
            after: spec.scheduling.after.clone(),
            policy: spec.scheduling.policy,
            device: spec.cluster.device.clone(),
            memory_per_worker_mb: spec.cluster.memory_per_worker_mb,
            weighted: spec.dataset.split == hetero_job::SplitKind::Weighted,
            // With a parameter server, the workers go on without a lost member (or
            // without the server) as one allreduce ring.
            migratable: spec.cluster.workers > 1 || spec.training.strategy.uses_parameter_server(),
            server: spec.training.strategy.uses_parameter_server(),
            formed: false,
            rendezvous: Default::default(),
        };
        self.keep_job(st, job)?;
        let line = format!("job queued: {} worker(s)", spec.cluster.workers);
        self.append_log(st, &job_id, -1, "state", vec![line]);
        self.schedule(st);
        Ok(job_id)
    }

    /// A rendezvous after lost workers, or to admit rejoining ones: ready once every
    /// worker in the ring (and every admitted joiner) has arrived for `generation`;
    /// the members are the arrivals in rank order. A joining worker (`joining`) waits
    /// here, whatever its generation, until the ring admits it.
    fn regroup(&self, st: &mut State, req: pb::RendezvousRequest) -> Result<Response<pb::RendezvousResponse>, Status> {
        let job = &st.jobs[&req.job_id];
        let Some(task) = job.tasks.iter().find(|t| t.rank == req.rank && t.rank < job.workers) else {
            return Err(Status::invalid_argument(format!(
                "rank {} is not a worker of the job",
                req.rank
            )));
        };
        if task.state.is_final() {
            return Err(Status::failed_precondition(format!(
                "worker rank {} was declared lost ({}); it cannot rejoin this ring",
                req.rank, task.message
            )));
        }
        if !job.migratable {
            return Err(Status::failed_precondition(format!(
                "job {} cannot continue without a lost worker",
                req.job_id
            )));
        }
        if task.joining && !req.joining {
            return Err(Status::failed_precondition(format!(
                "worker rank {} has not been admitted into the ring yet",
                req.rank
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
        // Changed on a copy, stored, then kept (see `keep_job`).
        let mut job = job.clone();
        if task.joining {
            // Not admitted yet: wait for the next epoch boundary.
            if job.rendezvous.wait(req.rank, &req.address) {
                self.keep_job(st, job)?;
            }
            return Ok(Response::new(pb::RendezvousResponse::default()));
        }
        let (ring, changed) = if req.joining {
            // Admitted: the regroup already holds this worker's address.
            (job.rendezvous.admitted_ring(req.rank, &live_ranks), false)
        } else {
            let arrival = job
                .rendezvous
                .arrive_regroup(req.rank, &req.address, req.generation, &live_ranks)
                .map_err(|current| {
                    Status::failed_precondition(format!(
                        "generation {} is over; the ring is at generation {current}",
                        req.generation
                    ))
                })?;
            (arrival.ready, arrival.changed)
        };
        let mut resp = pb::RendezvousResponse {
            ready: ring.is_some(),
            generation: job.rendezvous.regroup.generation,
            ..Default::default()
        };
        if changed {
            self.keep_job(st, job)?;
        }
        if let Some(ring) = ring {
            // In `live`'s order, so its weights line up.
            (resp.members, resp.addresses) = ring.into_iter().unzip();
            if weighted {
                resp.weights = live.iter().map(|(_, w)| *w).collect();
            }
        }
        Ok(Response::new(resp))
    }

    /// Between epochs, the ring asks whether relaunched ranks wait to join. The first
    /// member to ask for `(generation, epoch)` decides for everyone: the waiting
    /// joiners are admitted into generation + 1, which the members then form.
    fn check_members(&self, st: &mut State, req: &pb::CheckMembershipRequest) -> Result<Vec<u32>, Status> {
        let Some(job) = st.jobs.get(&req.job_id) else {
            return Err(Status::not_found(format!("no job {}", req.job_id)));
        };
        if job.state != JobState::Running {
            return Err(Status::failed_precondition(format!(
                "job {} is {:?}",
                req.job_id, job.state
            )));
        }
        if let Some(ranks) = job.rendezvous.decided(req.generation, req.epoch) {
            return Ok(ranks.to_vec());
        }
        // Decided on a copy, stored, then kept: every member asking for this
        // (generation, epoch) — before or after a restart — hears the same.
        let mut job = job.clone();
        let joining: Vec<u32> = job
            .tasks
            .iter()
            .filter(|t| t.joining && !t.state.is_final())
            .map(|t| t.rank)
            .collect();
        let ranks = job
            .rendezvous
            .admit(req.generation, req.epoch, |r| joining.contains(&r));
        for t in job.tasks.iter_mut() {
            if ranks.contains(&t.rank) {
                t.joining = false;
            }
        }
        self.keep_job(st, job)?;
        if !ranks.is_empty() {
            let line = format!(
                "rank(s) {ranks:?} rejoin the ring after epoch {} (generation {})",
                req.epoch,
                req.generation + 1
            );
            self.append_log(st, &req.job_id, -1, "state", vec![line.clone()]);
            self.raise(st, "info", &req.job_id, format!("job {}: {line}", req.job_id));
        }
        Ok(ranks)
    }

    /// Node `agent_id` came back (its agent registered again, or it heartbeats
    /// again after being declared dead): each running job's ranks lost on it are
    /// relaunched there, to join their ring at the next epoch boundary.
    fn rejoin_lost(&self, st: &mut State, agent_id: &str) {
        let mut relaunched = Vec::new();
        for job in st
            .jobs
            .values_mut()
            .filter(|j| j.state == JobState::Running && j.formed)
        {
            let workers = job.workers;
            let mut changed = false;
            for t in job
                .tasks
                .iter_mut()
                .filter(|t| t.migrated && t.agent_id == agent_id && t.rank < workers)
            {
                t.rejoins += 1;
                t.task_id = format!("{}-r{}-j{}", job.job_id, t.rank, t.rejoins);
                t.state = TaskState::Pending;
                t.message = format!("relaunched: node {agent_id} came back");
                t.delivered = false;
                t.migrated = false;
                t.joining = true;
                t.role = "compute, rejoining".into();
                relaunched.push((job.job_id.clone(), t.rank));
                changed = true;
            }
            if changed {
                let saved = job.clone();
                self.save_job(&saved);
            }
        }
        for (job_id, rank) in relaunched {
            let line =
                format!("worker rank {rank} relaunched on {agent_id}, which came back: it joins at the next epoch");
            self.append_log(st, &job_id, -1, "state", vec![line.clone()]);
            self.raise(st, "info", &job_id, format!("job {job_id}: {line}"));
        }
    }

    /// Dead after `dead_after` of silence, suspect after three missed heartbeats.
    fn health(&self, node: &NodeRecord, now: i64) -> Health {
        let interval = self.inner.config.heartbeat_interval.as_millis() as i64;
        if !self.is_alive(node, now) {
            Health::Dead
        } else if now - node.last_heartbeat_ms > 3 * interval {
            Health::Suspect
        } else {
            Health::Alive
        }
    }

    fn is_alive(&self, node: &NodeRecord, now: i64) -> bool {
        now - node.last_heartbeat_ms < self.inner.config.dead_after.as_millis() as i64
    }

    /// Free capacity of every resource group on a live node.
    fn capacities(&self, st: &State, now: i64) -> Vec<GroupCapacity> {
        let mut used: HashMap<(&str, &str), (u32, u64)> = HashMap::new();
        // A parameter server takes no worker slot (see `server_task`).
        for t in st
            .jobs
            .values()
            .flat_map(|j| &j.tasks)
            .filter(|t| !t.state.is_final() && t.role != WorkerRole::ParameterServer.name())
        {
            let u = used.entry((t.agent_id.as_str(), t.group.as_str())).or_default();
            u.0 += 1;
            u.1 += t.memory_mb;
        }
        st.nodes
            .values()
            // A suspect node (silent for a few heartbeats) gets no new work.
            .filter(|n| self.health(n, now) == Health::Alive)
            .flat_map(|n| {
                let used = &used;
                n.groups.iter().map(move |g| {
                    let (slots, mem) = used
                        .get(&(n.agent_id.as_str(), g.kind.as_str()))
                        .copied()
                        .unwrap_or_default();
                    GroupCapacity {
                        agent_id: n.agent_id.clone(),
                        kind: g.kind.clone(),
                        free_slots: g.worker_slots.saturating_sub(slots),
                        free_memory_mb: (g.memory_bytes >> 20).saturating_sub(mem),
                    }
                })
            })
            .collect()
    }

    /// Places every queued job whose dependencies succeeded and that fits now, in
    /// queue order (priority, then submission). A job that does not fit does not
    /// block smaller ones behind it.
    fn schedule(&self, st: &mut State) {
        let now = now_ms();
        let queued: Vec<String> = st
            .jobs
            .values()
            .filter(|j| j.state == JobState::Queued)
            .map(|j| j.job_id.clone())
            .collect();
        let keys: Vec<Queued> = queued
            .iter()
            .map(|id| Queued {
                priority: st.jobs[id].priority,
                sequence: job_number(id),
            })
            .collect();
        for i in scheduler::queue_order(&keys) {
            let job_id = &queued[i];
            let job = &st.jobs[job_id];
            let mut waiting = false;
            let mut broken = None;
            for dep in &job.after {
                match st.jobs.get(dep).map(|d| d.state) {
                    Some(JobState::Succeeded) => {}
                    Some(JobState::Failed | JobState::Cancelled) | None => {
                        broken = Some(format!("dependency {dep} did not succeed"));
                        break;
                    }
                    Some(_) => waiting = true,
                }
            }
            if let Some(why) = broken {
                self.finish_job(st, job_id, JobState::Failed, why);
                continue;
            }
            if waiting {
                continue;
            }
            let groups = self.capacities(st, now);
            let demand = Demand {
                workers: job.workers,
                kind: if job.device.is_empty() {
                    "cpu".into()
                } else {
                    job.device.clone()
                },
                memory_mb: job.memory_per_worker_mb,
                policy: job.policy,
            };
            let Some(placement) = scheduler::place(&demand, &groups) else {
                continue;
            };
            let mut per_node: HashMap<&str, u32> = HashMap::new();
            for &g in &placement {
                *per_node.entry(groups[g].agent_id.as_str()).or_default() += 1;
            }
            let mut tasks: Vec<TaskRecord> = placement
                .iter()
                .enumerate()
                .map(|(rank, &g)| {
                    let agent = &groups[g].agent_id;
                    let threads = if job.threads_per_worker > 0 {
                        job.threads_per_worker
                    } else {
                        (st.nodes[agent].cores() / per_node[agent.as_str()]).max(1)
                    };
                    TaskRecord {
                        task_id: format!("{job_id}-r{rank}"),
                        rank: rank as u32,
                        agent_id: agent.clone(),
                        role: if rank == 0 {
                            "compute, ring leader".into()
                        } else {
                            "compute".into()
                        },
                        state: TaskState::Pending,
                        message: String::new(),
                        delivered: false,
                        threads,
                        group: groups[g].kind.clone(),
                        memory_mb: demand.memory_mb,
                        weight: st.nodes[agent]
                            .groups
                            .iter()
                            .find(|x| x.kind == groups[g].kind)
                            .map_or(1.0, |x| x.score()),
                        migrated: false,
                        rejoins: 0,
                        joining: false,
                        job_fatal: false,
                    }
                })
                .collect();
            if job.server {
                tasks.push(server_task(job_id, job.workers, &tasks));
            }
            let summary: Vec<String> = tasks
                .iter()
                .map(|t| format!("rank {} → {}/{}", t.rank, t.agent_id, t.group))
                .collect();
            let job = st.jobs.get_mut(job_id).expect("listed above");
            job.tasks = tasks;
            job.state = JobState::Running;
            job.started_ms = now;
            job.message = "placed".into();
            job.rendezvous = Rendezvous::new(job.ranks());
            let saved = job.clone();
            self.save_job(&saved);
            self.append_log(
                st,
                job_id,
                -1,
                "state",
                vec![format!("job running: {}", summary.join(", "))],
            );
        }
    }

    /// Follows every node's health from its heartbeats: a node silent for three
    /// intervals is suspect, one silent for `dead_after` is dead and its tasks fail.
    /// Each change raises one alert.
    fn check_nodes(&self) {
        let mut st = self.lock();
        let now = now_ms();
        let changes: Vec<(String, Health, i64)> = st
            .nodes
            .values()
            .filter_map(|n| {
                let silent = now - n.last_heartbeat_ms;
                let health = self.health(n, now);
                let before = st.health.get(&n.agent_id).copied().unwrap_or(Health::Alive);
                (before != health).then(|| (n.agent_id.clone(), health, silent))
            })
            .collect();
        for (node, health, silent) in changes {
            st.health.insert(node.clone(), health);
            match health {
                Health::Alive => {
                    self.raise(&mut st, "info", &node, format!("node {node} is heartbeating again"));
                    self.rejoin_lost(&mut st, &node);
                }
                Health::Suspect => self.raise(
                    &mut st,
                    "warning",
                    &node,
                    format!("node {node} missed heartbeats ({silent} ms silent)"),
                ),
                Health::Dead => {
                    let mut touched = Vec::new();
                    for job in st.jobs.values_mut().filter(|j| j.state == JobState::Running) {
                        for t in job
                            .tasks
                            .iter_mut()
                            .filter(|t| !t.state.is_final() && t.agent_id == node)
                        {
                            t.state = TaskState::Failed;
                            t.message = format!("node {node} stopped heartbeating ({} s silent)", silent / 1000);
                            touched.push(job.job_id.clone());
                        }
                    }
                    touched.dedup();
                    let msg = format!(
                        "node {node} is dead: no heartbeat for {} s; {} running job(s) affected",
                        silent / 1000,
                        touched.len()
                    );
                    self.raise(&mut st, "critical", &node, msg);
                    for job_id in touched {
                        self.settle_job(&mut st, &job_id);
                    }
                }
            }
        }
    }

    fn reconcile(
        &self,
        st: &mut State,
        agent_id: &str,
        reported: &HashMap<String, Option<TaskState>>,
    ) -> pb::HeartbeatResponse {
        let mut resp = pb::HeartbeatResponse::default();
        let mut changed = Vec::new();
        let mut known = HashSet::new();
        let mut restarted = false;
        for job in st.jobs.values_mut() {
            let mut dirty = false;
            let workers: Vec<&TaskRecord> = job.tasks.iter().filter(|t| t.rank < job.workers).collect();
            let weights: Vec<f32> = if job.weighted {
                workers.iter().map(|t| t.weight).collect()
            } else {
                vec![]
            };
            let groups: Vec<String> = workers.iter().map(|t| format!("{}/{}", t.agent_id, t.group)).collect();
            for t in job.tasks.iter_mut().filter(|t| t.agent_id == agent_id) {
                known.insert(t.task_id.clone());
                let running_there = reported.contains_key(&t.task_id);
                if t.state.is_final() {
                    if running_there && t.state != TaskState::Succeeded {
                        resp.cancel_task_ids.push(t.task_id.clone());
                    }
                    continue;
                }
                if !t.delivered {
                    t.delivered = true;
                    dirty = true;
                    resp.start.push(pb::TaskAssignment {
                        task_id: t.task_id.clone(),
                        job_id: job.job_id.clone(),
                        rank: t.rank,
                        world_size: job.workers,
                        spec_json: job.spec_json.clone(),
                        output_dir: job.output_dir.clone(),
                        program: job.program.clone(),
                        threads: t.threads,
                        group: t.group.clone(),
                        weights: weights.clone(),
                        role: if t.rank == job.workers {
                            WorkerRole::ParameterServer
                        } else if t.rejoins > 0 {
                            WorkerRole::Joining
                        } else {
                            WorkerRole::Worker
                        }
                        .name()
                        .into(),
                        groups: groups.clone(),
                    });
                } else if !running_there {
                    t.state = TaskState::Failed;
                    t.message = format!("agent {agent_id} no longer runs this worker (agent restarted?)");
                    dirty = true;
                    restarted = true;
                } else if t.state == TaskState::Pending {
                    t.state = TaskState::Running;
                    dirty = true;
                }
            }
            if dirty {
                changed.push(job.job_id.clone());
                let job = job.clone();
                self.save_job(&job);
            }
        }
        for id in reported.keys().filter(|id| !known.contains(*id)) {
            resp.cancel_task_ids.push(id.clone());
        }
        for job_id in changed {
            self.settle_job(st, &job_id);
        }
        if restarted {
            // The node is back (its agent restarted): its lost ranks rejoin.
            self.rejoin_lost(st, agent_id);
        }
        resp
    }
}

impl Coordinator {
    /// Every node and job, the latest alerts: what the dashboard draws.
    pub(crate) fn snapshot(&self) -> (Vec<pb::NodeInfo>, Vec<pb::JobInfo>, Vec<AlertRecord>) {
        let st = self.lock();
        let nodes = st.nodes.values().map(|n| self.node_info(&st, n)).collect();
        let jobs = st.jobs.values().rev().map(|j| st.job_info(j)).collect();
        drop(st);
        let mut alerts = self.inner.store.alerts(0).unwrap_or_default();
        let keep = alerts.len().saturating_sub(50);
        alerts.drain(..keep);
        alerts.reverse();
        (nodes, jobs, alerts)
    }

    /// A job's live chart points and its last `lines` log lines.
    pub(crate) fn job_detail(&self, job_id: &str, lines: usize) -> Option<(Vec<ChartPoint>, Vec<LogRecord>)> {
        let st = self.lock();
        if !st.jobs.contains_key(job_id) {
            return None;
        }
        let history = st.history.get(job_id).cloned().unwrap_or_default();
        let last = st.log_seq.get(job_id).copied().unwrap_or(0);
        drop(st);
        let last = if last == 0 {
            self.inner.store.last_log_seq(job_id).unwrap_or(0)
        } else {
            last
        };
        let logs = self
            .inner
            .store
            .logs(job_id, last.saturating_sub(lines as u64), lines)
            .unwrap_or_default();
        Some((history, logs))
    }
}

impl State {
    /// A job as the wire shows it, with its tasks' latest training metrics.
    fn job_info(&self, j: &JobRecord) -> pb::JobInfo {
        let mut info = pb::JobInfo::from(j);
        for t in &mut info.tasks {
            if let Some(&(loss, rate)) = self.metrics.get(&t.task_id) {
                t.loss = loss;
                t.samples_per_sec = rate;
            }
        }
        info
    }
}

type LogStream = Pin<Box<dyn Stream<Item = Result<pb::LogEntry, Status>> + Send>>;

fn to_entry(job_id: &str, l: LogRecord) -> pb::LogEntry {
    pb::LogEntry {
        seq: l.seq,
        job_id: job_id.to_string(),
        rank: l.rank,
        unix_ms: l.unix_ms,
        kind: l.kind,
        text: l.text,
    }
}

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
        let mut st = self.lock();
        // A node id is taken back only with its key: an agent whose folder kept an
        // id from another coordinator (or another's id) becomes a new node.
        let returning = st
            .nodes
            .get(&req.agent_id)
            .filter(|n| n.key.is_empty() || n.key == req.agent_key);
        let (agent_id, key) = match returning {
            Some(n) => (n.agent_id.clone(), req.agent_key.clone()),
            None => {
                st.next_node += 1;
                (format!("node-{}", st.next_node), crate::new_token())
            }
        };
        let mut groups: Vec<GroupRecord> = req.groups.iter().map(GroupRecord::from).collect();
        if let Some(old) = st.nodes.get(&agent_id) {
            for g in &mut groups {
                if let Some(o) = old.groups.iter().find(|o| o.kind == g.kind) {
                    g.score_override = o.score_override;
                }
            }
        }
        let node = NodeRecord {
            agent_id: agent_id.clone(),
            hostname: req.hostname,
            groups,
            last_heartbeat_ms: now_ms(),
            key: key.clone(),
        };
        self.inner.store.put_node(&node).map_err(store_status)?;
        tracing::info!(agent_id, hostname = %node.hostname, slots = node.slots(), "agent registered");
        st.nodes.insert(agent_id.clone(), node);
        self.rejoin_lost(&mut st, &agent_id);
        self.schedule(&mut st);
        Ok(Response::new(pb::RegisterAgentResponse {
            agent_id,
            heartbeat_interval_ms: self.inner.config.heartbeat_interval.as_millis() as u32,
            agent_key: key,
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = req.into_inner();
        let mut st = self.lock();
        let Some(node) = st.nodes.get_mut(&req.agent_id) else {
            return Ok(Response::new(pb::HeartbeatResponse {
                reregister: true,
                ..Default::default()
            }));
        };
        node.last_heartbeat_ms = now_ms();
        st.usage.insert(req.agent_id.clone(), req.usage.clone());
        let reported: HashMap<String, Option<TaskState>> = req
            .tasks
            .iter()
            .map(|t| (t.task_id.clone(), task_state_from_wire(t.state)))
            .collect();
        self.schedule(&mut st);
        let resp = self.reconcile(&mut st, &req.agent_id, &reported);
        Ok(Response::new(resp))
    }

    async fn report_task(
        &self,
        req: Request<pb::ReportTaskRequest>,
    ) -> Result<Response<pb::ReportTaskResponse>, Status> {
        let req = req.into_inner();
        let mut st = self.lock();
        let Some((job_id, rank)) = st.jobs.values().find_map(|j| {
            j.tasks
                .iter()
                .find(|t| t.task_id == req.task_id && t.agent_id == req.agent_id)
                .map(|t| (j.job_id.clone(), t.rank))
        }) else {
            return Err(Status::not_found(format!(
                "no task {} on agent {}",
                req.task_id, req.agent_id
            )));
        };
        // What must be stored — the run summary, the worker's end — is stored first,
        // on a copy kept only once written: a store that cannot write fails this
        // call before anything is appended, and the agent's retry finds memory as
        // it was (no line logged twice, no end half-recorded).
        // Events this build cannot read (damaged, or from a newer worker) are kept
        // in the log as they came and otherwise ignored.
        let events: Vec<Event> = req.events_json.iter().filter_map(|e| Event::from_json(e)).collect();
        let summary = events.iter().rev().find_map(|event| match event {
            Event::Done { summary } => Some(serde_json::to_string(summary).expect("a summary serialises")),
            _ => None,
        });
        let ended = task_state_from_wire(req.state).filter(|_| {
            st.jobs[&job_id]
                .tasks
                .iter()
                .any(|t| t.task_id == req.task_id && !t.state.is_final())
        });
        if summary.is_some() || ended.is_some() {
            let mut job = st.jobs[&job_id].clone();
            if let Some(summary) = summary {
                job.summary_json = summary;
            }
            if let Some(state) = ended {
                let task = job
                    .tasks
                    .iter_mut()
                    .find(|t| t.task_id == req.task_id)
                    .expect("found above");
                task.state = state;
                task.message = req.message.clone();
                task.job_fatal = state == TaskState::Failed && req.job_fatal;
            }
            self.keep_job(&mut st, job)?;
        }
        self.append_log(&mut st, &job_id, rank as i32, "log", req.log_lines);
        for event in &events {
            if let &Event::Step {
                epoch,
                step,
                steps,
                loss,
                samples_per_sec: rate,
            } = event
            {
                st.metrics.insert(req.task_id.clone(), (loss, rate));
                if rank == 0 {
                    let step = (epoch * steps + step + 1) as u64;
                    let workers = st.jobs.get(&job_id).map_or(1, |j| j.workers) as f64;
                    let points = st.history.entry(job_id.clone()).or_default();
                    if points.len() >= HISTORY_POINTS {
                        // Keep the whole run visible: drop every other point.
                        let thinned: Vec<_> = points.iter().step_by(2).copied().collect();
                        *points = thinned;
                    }
                    points.push((step, loss, rate * workers));
                }
            }
        }
        self.append_log(&mut st, &job_id, rank as i32, "event", req.events_json);
        if let Some(state) = ended {
            let line = format!(
                "worker rank {rank} {}: {}",
                format!("{state:?}").to_lowercase(),
                req.message
            );
            self.append_log(&mut st, &job_id, rank as i32, "state", vec![line]);
            self.settle_job(&mut st, &job_id);
            self.schedule(&mut st);
        }
        Ok(Response::new(pb::ReportTaskResponse {}))
    }

    async fn rendezvous(
        &self,
        req: Request<pb::RendezvousRequest>,
    ) -> Result<Response<pb::RendezvousResponse>, Status> {
        let req = req.into_inner();
        let mut st = self.lock();
        let state = st.jobs.get(&req.job_id).map(|j| j.state);
        match state {
            None => return Err(Status::not_found(format!("no job {}", req.job_id))),
            Some(JobState::Running) => {}
            Some(s) => {
                return Err(Status::failed_precondition(format!("job {} is {s:?}", req.job_id)));
            }
        }
        if req.address.parse::<std::net::SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "{:?} is not a socket address",
                req.address
            )));
        }
        if req.generation > 0 || req.joining {
            return self.regroup(&mut st, req);
        }
        // Changed on a copy, stored, and only then kept (see `keep_job`).
        let mut job = st.jobs[&req.job_id].clone();
        let Some(arrival) = job.rendezvous.arrive(req.rank, &req.address) else {
            return Err(Status::invalid_argument(format!(
                "rank {} is outside the job",
                req.rank
            )));
        };
        let ready = arrival.ready.is_some();
        let addresses = arrival.ready.unwrap_or_default();
        let members = (0..addresses.len() as u32).collect();
        if arrival.changed || (ready && !job.formed) {
            job.formed |= ready;
            self.keep_job(&mut st, job)?;
        }
        Ok(Response::new(pb::RendezvousResponse {
            ready,
            addresses,
            members,
            weights: vec![],
            generation: 0,
        }))
    }

    async fn check_membership(
        &self,
        req: Request<pb::CheckMembershipRequest>,
    ) -> Result<Response<pb::CheckMembershipResponse>, Status> {
        let req = req.into_inner();
        let mut st = self.lock();
        let joining = self.check_members(&mut st, &req)?;
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
        let mut st = self.lock();
        let job_id = self.enqueue(&mut st, spec)?;
        Ok(Response::new(pb::SubmitJobResponse { job_id }))
    }

    async fn resume_job(&self, req: Request<pb::ResumeJobRequest>) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let old_id = req.into_inner().job_id;
        let mut st = self.lock();
        let Some(old) = st.jobs.get(&old_id) else {
            return Err(Status::not_found(format!("no job {old_id}")));
        };
        if !matches!(old.state, JobState::Failed | JobState::Cancelled) {
            return Err(Status::failed_precondition(format!(
                "job {old_id} is {}; only a failed or cancelled job can be resumed",
                format!("{:?}", old.state).to_lowercase()
            )));
        }
        let mut spec = JobSpec::from_json(&old.spec_json).map_err(|e| Status::internal(e.to_string()))?;
        let own = Path::new(&old.output_dir).join(CHECKPOINT_FILE);
        let checkpoint = if own.exists() {
            own
        } else if let Some(earlier) = spec.training.resume_from.clone().filter(|p| p.exists()) {
            earlier
        } else {
            return Err(Status::failed_precondition(format!(
                "job {old_id} left no checkpoint at {} (it stopped before its first one; see training.checkpoint_every)",
                own.display()
            )));
        };
        spec.training.resume_from = Some(checkpoint.clone());
        let job_id = self.enqueue(&mut st, spec)?;
        let line = format!("resumes job {old_id} from {}", checkpoint.display());
        self.append_log(&mut st, &job_id, -1, "state", vec![line]);
        Ok(Response::new(pb::SubmitJobResponse { job_id }))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::JobInfo>, Status> {
        let id = req.into_inner().job_id;
        let st = self.lock();
        st.jobs
            .get(&id)
            .map(|j| Response::new(st.job_info(j)))
            .ok_or_else(|| Status::not_found(format!("no job {id}")))
    }

    async fn list_jobs(&self, _req: Request<pb::ListJobsRequest>) -> Result<Response<pb::ListJobsResponse>, Status> {
        let st = self.lock();
        Ok(Response::new(pb::ListJobsResponse {
            jobs: st.jobs.values().map(|j| st.job_info(j)).collect(),
        }))
    }

    type StreamLogsStream = LogStream;

    async fn stream_logs(&self, req: Request<pb::StreamLogsRequest>) -> Result<Response<LogStream>, Status> {
        let req = req.into_inner();
        if !self.lock().jobs.contains_key(&req.job_id) {
            return Err(Status::not_found(format!("no job {}", req.job_id)));
        }
        let (tx, rx) = mpsc::channel(256);
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = me.inner.log_tick.subscribe();
            let mut after = req.after_seq;
            loop {
                // Read the job's state *before* its logs: a job seen final here has
                // all of its lines stored, so the last read below gets them all.
                let ended = me.lock().jobs.get(&req.job_id).is_none_or(|j| j.state.is_final());
                loop {
                    let lines = match me.inner.store.logs(&req.job_id, after, 500) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = tx.send(Err(store_status(e))).await;
                            return;
                        }
                    };
                    if lines.is_empty() {
                        break;
                    }
                    for l in lines {
                        after = l.seq;
                        if tx.send(Ok(to_entry(&req.job_id, l))).await.is_err() {
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
        let mut st = self.lock();
        let Some(job) = st.jobs.get(&id) else {
            return Err(Status::not_found(format!("no job {id}")));
        };
        if !job.state.is_final() {
            self.finish_job(&mut st, &id, JobState::Cancelled, "cancelled by the user".into());
            self.schedule(&mut st);
        }
        let state = st.jobs[&id].state;
        Ok(Response::new(pb::CancelJobResponse {
            state: pb::JobState::from(state) as i32,
        }))
    }

    async fn list_alerts(
        &self,
        req: Request<pb::ListAlertsRequest>,
    ) -> Result<Response<pb::ListAlertsResponse>, Status> {
        let alerts = self
            .inner
            .store
            .alerts(req.into_inner().after_id)
            .map_err(store_status)?;
        Ok(Response::new(pb::ListAlertsResponse {
            alerts: alerts
                .into_iter()
                .map(|a| pb::Alert {
                    id: a.id,
                    unix_ms: a.unix_ms,
                    severity: a.severity,
                    subject: a.subject,
                    message: a.message,
                })
                .collect(),
        }))
    }

    async fn list_nodes(&self, _req: Request<pb::ListNodesRequest>) -> Result<Response<pb::ListNodesResponse>, Status> {
        let st = self.lock();
        let nodes = st.nodes.values().map(|n| self.node_info(&st, n)).collect();
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
        let mut st = self.lock();
        let Some(node) = st.nodes.get_mut(&req.agent_id) else {
            return Err(Status::not_found(format!("no node {}", req.agent_id)));
        };
        let Some(group) = node.groups.iter_mut().find(|g| g.kind == req.kind) else {
            return Err(Status::not_found(format!(
                "node {} has no {} group",
                req.agent_id, req.kind
            )));
        };
        group.score_override = req.score;
        let node = node.clone();
        self.inner.store.put_node(&node).map_err(store_status)?;
        Ok(Response::new(self.node_info(&st, &node)))
    }
}
