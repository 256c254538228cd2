//! The coordinator: the task-manager node of seed 001.
//!
//! It accepts jobs, places their workers on agents (gang placement, see
//! [`crate::scheduler`]), hands assignments out in heartbeat replies, lets workers
//! find each other (rendezvous), keeps every job's log, and decides each job's end.
//!
//! ## Design
//! The state is three tables behind one mutex, each owning its invariants:
//! `jobs` (every job's record and its life: queued, placed, settled, finished),
//! `nodes` (agents and their health) and `telemetry` (logs, chart points,
//! alerts). The gRPC handlers (`rpc`) validate and convert (`wire`), then make
//! their change through one `Coordinator::apply`: lock, change, write through to
//! the `Store`, unlock — no await while locked. A change is made on a copy of a
//! record, stored, and only then kept, so a store that cannot write fails the call
//! (a `Refusal`) and memory never holds what the disk does not: nothing accepted
//! is lost. Node health returns its changes; the monitor applies them to the jobs.
//! What an agent must do (start or stop a task) is *derived* from the state at
//! each heartbeat rather than queued, so a restarted coordinator, which reloads the
//! state, owes no agent a message it forgot.

pub mod data_source;
mod jobs;
mod nodes;
mod rendezvous;
mod rpc;
mod serving;
mod telemetry;
mod wire;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hetero_proto as pb;
use hetero_proto::auth::CheckToken;
use hetero_proto::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;

use self::jobs::Jobs;
use self::nodes::{Health, HealthChange, Nodes};
pub(crate) use self::telemetry::ChartPoint;
use self::telemetry::Telemetry;
use crate::alerts::{AlertRecord, Severity, Webhook};
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
    /// Folders whose jobs' datasets workers without the files may fetch from
    /// here (`--serve-data`; empty: none).
    pub serve_data: Vec<PathBuf>,
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
            serve_data: Vec::new(),
        }
    }
}

/// Why a change was refused. Nothing was kept: the caller may try again.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// It names a job, task or node the coordinator does not know.
    NotFound(String),
    /// The request itself is wrong.
    Invalid(String),
    /// The request is right but the state does not allow it now.
    Precondition(String),
    /// The store could not write the change.
    Store(ClusterError),
}

impl From<ClusterError> for Refusal {
    fn from(e: ClusterError) -> Self {
        Refusal::Store(e)
    }
}

/// Where a change writes down what it did besides its own table: the store, and
/// the logs and alerts people read.
pub(crate) struct Ledger<'a> {
    /// The store every change goes to.
    pub store: &'a Store,
    /// Logs, figures and alerts.
    pub telemetry: &'a mut Telemetry,
}

impl Ledger<'_> {
    /// One line the coordinator writes into `job_id`'s log.
    pub fn line(&mut self, job_id: &str, line: String) -> Result<(), ClusterError> {
        self.telemetry.state_line(self.store, job_id, line)
    }

    /// Raises an alert about `subject`.
    pub fn raise(&mut self, severity: Severity, subject: &str, message: String) -> Result<(), ClusterError> {
        self.telemetry.raise(self.store, severity, subject, message)
    }
}

struct State {
    jobs: Jobs,
    nodes: Nodes,
    telemetry: Telemetry,
}

struct Inner {
    state: Mutex<State>,
    store: Store,
    config: CoordinatorConfig,
    /// Alerts on their way to the webhook (taken by `serve`, which delivers them).
    alert_rx: Mutex<Option<mpsc::UnboundedReceiver<AlertRecord>>>,
    /// Each job's served dataset, listed once (its folder and files), or why it
    /// is not served; dropped when a file is found changed.
    served: Mutex<std::collections::HashMap<String, Result<Arc<Served>, String>>>,
    /// Held while a dataset is listed: the workers of a job ask at once, and the
    /// files are read and hashed once, not once per worker.
    listing: tokio::sync::Mutex<()>,
    /// When a chunk of each job's dataset last went out (jobs sent to within
    /// [`serving::IN_FLIGHT`]): the rendezvous tells waiting workers a member is
    /// still fetching.
    sending: Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

/// A job's dataset as this coordinator serves it.
pub(crate) struct Served {
    /// The canonical folder.
    pub folder: PathBuf,
    /// Its files, with sizes and digests.
    pub files: Vec<data_source::ServedFile>,
}

/// A coordinator; clone it freely (it is a handle).
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

impl Coordinator {
    /// Opens the store and reloads every job and node it holds.
    pub fn open(config: CoordinatorConfig) -> Result<Coordinator, ClusterError> {
        let store = Store::open(&config.store_path)?;
        let (alert_tx, alert_rx) = mpsc::unbounded_channel();
        let state = State {
            jobs: Jobs::open(&store)?,
            nodes: Nodes::open(&store, config.heartbeat_interval, config.dead_after)?,
            telemetry: Telemetry::open(&store, alert_tx)?,
        };
        Ok(Coordinator {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                store,
                config,
                alert_rx: Mutex::new(Some(alert_rx)),
                served: Mutex::default(),
                listing: tokio::sync::Mutex::new(()),
                sending: Mutex::default(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes one change to the state: every handler that changes anything comes
    /// through here, with the tables and a [`Ledger`] to write to.
    fn apply<R>(
        &self,
        change: impl FnOnce(&mut Jobs, &mut Nodes, &mut Ledger) -> Result<R, Refusal>,
    ) -> Result<R, Refusal> {
        let mut st = self.lock();
        let State { jobs, nodes, telemetry } = &mut *st;
        let mut ledger = Ledger {
            store: &self.inner.store,
            telemetry,
        };
        change(jobs, nodes, &mut ledger)
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

    /// Follows every node's health from its heartbeats and acts on each change. A
    /// change that could not be stored is tried again at the next check.
    fn check_nodes(&self) {
        let mut failed = Vec::new();
        let _ = self.apply(|jobs, nodes, l| {
            for change in nodes.check(now_ms()) {
                if let Err(e) = on_health(jobs, l, &change) {
                    tracing::error!(error = ?e, node = %change.node, "could not act on a node's health");
                    failed.push(change.node);
                }
            }
            for node in &failed {
                nodes.recheck(node);
            }
            Ok(())
        });
    }

    /// Every node and job, the latest alerts: what the dashboard draws.
    pub(crate) fn snapshot(&self) -> (Vec<pb::NodeInfo>, Vec<pb::JobInfo>, Vec<AlertRecord>) {
        let (nodes, jobs) = {
            let st = self.lock();
            (
                self.node_infos(&st),
                st.jobs.all().rev().map(|j| wire::job_info(j, &st.telemetry)).collect(),
            )
        };
        let mut alerts = self.inner.store.alerts(0).unwrap_or_default();
        let keep = alerts.len().saturating_sub(50);
        alerts.drain(..keep);
        alerts.reverse();
        (nodes, jobs, alerts)
    }

    fn node_infos(&self, st: &State) -> Vec<pb::NodeInfo> {
        let now = now_ms();
        st.nodes
            .all()
            .map(|n| {
                let health = st.nodes.health(n, now);
                wire::node_info(n, health, st.jobs.busy_on(&n.agent_id), st.nodes.usage(&n.agent_id))
            })
            .collect()
    }

    /// A job's live chart points and its last `lines` log lines.
    pub(crate) fn job_detail(&self, job_id: &str, lines: usize) -> Option<(Vec<ChartPoint>, Vec<LogRecord>)> {
        let (history, cached) = {
            let st = self.lock();
            st.jobs.get(job_id)?;
            (st.telemetry.chart(job_id), st.telemetry.cached_seq(job_id))
        };
        // Read from the store outside the lock when the log's end is not cached.
        let last = cached
            .or_else(|| self.inner.store.last_log_seq(job_id).ok())
            .unwrap_or(0);
        let logs = self
            .inner
            .store
            .logs(job_id, last.saturating_sub(lines as u64), lines)
            .unwrap_or_default();
        Some((history, logs))
    }
}

/// Acts on a node's change of health: a node back relaunches its lost ranks, a
/// dead one fails its tasks and settles their jobs; each change raises one alert.
fn on_health(jobs: &mut Jobs, l: &mut Ledger, change: &HealthChange) -> Result<(), ClusterError> {
    let node = &change.node;
    match change.health {
        Health::Alive => {
            l.raise(Severity::Info, node, format!("node {node} is heartbeating again"))?;
            jobs.rejoin_lost(l, node)
        }
        Health::Suspect => l.raise(
            Severity::Warning,
            node,
            format!("node {node} missed heartbeats ({} ms silent)", change.silent_ms),
        ),
        Health::Dead => {
            let touched = jobs.node_lost(l.store, node, change.silent_ms)?;
            let msg = format!(
                "node {node} is dead: no heartbeat for {} s; {} running job(s) affected",
                change.silent_ms / 1000,
                touched.len()
            );
            l.raise(Severity::Critical, node, msg)?;
            for job_id in touched {
                jobs.settle(l, &job_id)?;
            }
            Ok(())
        }
    }
}
