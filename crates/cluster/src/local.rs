//! An embedded cluster in this process: a coordinator (with its dashboard) on
//! loopback ports and one
//! agent whose workers are real child processes. `hetero local` runs jobs on it,
//! and integration tests use it as their setup helper.

use std::path::PathBuf;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::ClusterError;
use crate::agent::{self, AgentConfig};
use crate::coordinator::{Coordinator, CoordinatorConfig};
use hetero_proto::client::{Client, connect};

/// A running embedded cluster; [`LocalCluster::shutdown`] stops it and its workers.
pub struct LocalCluster {
    /// The coordinator's address.
    pub address: String,
    /// The cluster token.
    pub token: String,
    /// Address of the web dashboard (`http://<it>/`; [`LocalCluster::dashboard_link`]
    /// logs a browser in).
    pub dashboard: String,
    dashboard_task: JoinHandle<Result<(), ClusterError>>,
    stop: watch::Sender<bool>,
    server: JoinHandle<Result<(), ClusterError>>,
    agents: Vec<JoinHandle<Result<(), ClusterError>>>,
    _scratch: tempfile::TempDir,
}

impl LocalCluster {
    /// Starts a coordinator and one agent with `slots` worker slots whose built-in
    /// workers run `worker_program worker`.
    pub async fn start(slots: u32, worker_program: PathBuf) -> Result<LocalCluster, ClusterError> {
        Self::start_with(|config| {
            config.slots = slots;
            config.worker_program = worker_program;
        })
        .await
    }

    /// Starts a coordinator and one agent whose configuration `configure` adjusts
    /// (slots, speed cap, declared devices, measured GFLOP/s …).
    pub async fn start_with(configure: impl FnOnce(&mut AgentConfig)) -> Result<LocalCluster, ClusterError> {
        let mut configure = Some(configure);
        Self::start_agents(1, |_, config| {
            if let Some(f) = configure.take() {
                f(config)
            }
        })
        .await
    }

    /// Starts a coordinator and `agents` agents — unlike resource groups on one
    /// machine when `configure(i, config)` gives them different speeds or backends.
    pub async fn start_agents(
        agents: usize,
        mut configure: impl FnMut(usize, &mut AgentConfig),
    ) -> Result<LocalCluster, ClusterError> {
        let scratch = tempfile::tempdir().map_err(|e| ClusterError::io("creating the cluster's folder", e))?;
        let token = hetero_proto::auth::new_token();
        let coordinator = Coordinator::open(CoordinatorConfig::new(scratch.path().join("coordinator.redb"), &token))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| ClusterError::io("binding a loopback port", e))?;
        let address = listener
            .local_addr()
            .map_err(|e| ClusterError::io("reading the bound port", e))?
            .to_string();
        let dashboard_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| ClusterError::io("binding the dashboard port", e))?;
        let dashboard = dashboard_listener
            .local_addr()
            .map_err(|e| ClusterError::io("reading the dashboard port", e))?
            .to_string();
        let dashboard_task = tokio::spawn(crate::dashboard::serve(coordinator.clone(), dashboard_listener, vec![]));
        let (stop, stop_rx) = watch::channel(false);
        let mut stop_server = stop_rx.clone();
        let server = tokio::spawn(coordinator.serve(listener, async move {
            let _ = stop_server.changed().await;
        }));
        let mut handles = Vec::new();
        for i in 0..agents.max(1) {
            let mut config = AgentConfig::new(
                address.clone(),
                token.clone(),
                1,
                scratch.path().join(format!("agent-{i}")),
                PathBuf::from("hetero"),
            );
            config.hostname = format!("local-{i}");
            configure(i, &mut config);
            handles.push(tokio::spawn(agent::run(config, stop_rx.clone())));
        }
        Ok(LocalCluster {
            address,
            token,
            dashboard,
            dashboard_task,
            stop,
            server,
            agents: handles,
            _scratch: scratch,
        })
    }

    /// The dashboard's address with the token, which logs a browser in (the link
    /// Jupyter prints, for a cluster that lives as long as this process).
    pub fn dashboard_link(&self) -> String {
        format!("http://{}/?token={}", self.dashboard, self.token)
    }

    /// A client of this cluster's coordinator.
    pub async fn client(&self) -> Result<Client, ClusterError> {
        Ok(connect(&self.address, &self.token).await?)
    }

    /// Stops the agent (killing its workers) and the coordinator.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for agent in self.agents {
            let _ = agent.await;
        }
        let _ = self.server.await;
        self.dashboard_task.abort();
    }
}
