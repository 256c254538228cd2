//! Hetero's cluster: the coordinator (task-manager node), the agent that runs on
//! every machine, and the embedded store that lets a restarted coordinator lose
//! nothing it accepted.
//!
//! Reading order:
//! - [`records`]: jobs, tasks (with a [`records::TaskRole`] and a
//!   [`records::TaskPhase`]) and nodes as the coordinator knows them, and the task
//!   states the wire and the agents speak of;
//! - [`store`]: those records in redb;
//! - [`scheduler`]: where a queued job's workers go (pure, tested alone);
//! - [`coordinator`]: typed state (jobs, nodes, rendezvous, telemetry), the gRPC
//!   service over it (`rpc`, with every protobuf conversion in `wire`) and the
//!   monitor loop;
//! - [`alerts`]: stored alerts and their webhook delivery;
//! - [`dashboard`]: the web dashboard and Prometheus `/metrics`;
//! - [`agent`]: registration, heartbeats, worker processes, log forwarding;
//! - [`agent_config`]: an agent's file of declared devices and speed cap;
//! - [`cpu_quota`]: a capped CPU worker's control group and its CPU quota;
//! - [`cpu_pin`]: the CPUs an agent's workers run on, and how emulated devices
//!   are packed onto a host's cores;
//! - the token-carrying gRPC client every node uses is `hetero_proto::client`;
//! - [`local`]: a whole cluster inside one process, for `hetero local` and tests.
//!
//! **Invariant:** tensors never pass through this crate; it moves specs, states,
//! logs and progress events.

pub mod agent;
pub mod agent_config;
pub mod alerts;
pub mod coordinator;
pub mod cpu_pin;
pub mod cpu_quota;
pub mod dashboard;
pub mod dashboard_access;
pub mod error;
pub mod launch_env;
pub mod local;
#[cfg(feature = "nvml")]
pub mod nvml;
pub mod process_state;
pub mod records;
pub mod rendezvous;
pub mod scheduler;
pub mod store;

pub use error::ClusterError;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
