//! Who a worker is: the environment its agent starts it with, its role, and the
//! exit statuses through which it tells its agent how it ended.
//!
//! This is half of the contract between workers and the control plane (the other
//! half is [`crate::events`]). An agent writes these variables, `hetero-worker`
//! (or a user's own training program linking it) reads them; neither side needs
//! the other's crate.

use serde::{Deserialize, Serialize};

/// Environment variables that tell a worker who it is.
pub struct WorkerEnv;

impl WorkerEnv {
    /// Coordinator address.
    pub const COORDINATOR: &'static str = "HETERO_COORDINATOR";
    /// Cluster token.
    pub const TOKEN: &'static str = "HETERO_TOKEN";
    /// Job id.
    pub const JOB_ID: &'static str = "HETERO_JOB_ID";
    /// Task id.
    pub const TASK_ID: &'static str = "HETERO_TASK_ID";
    /// Rank in the ring.
    pub const RANK: &'static str = "HETERO_RANK";
    /// Ring size.
    pub const WORLD: &'static str = "HETERO_WORLD";
    /// Path of the job spec (JSON).
    pub const SPEC_FILE: &'static str = "HETERO_SPEC_FILE";
    /// The job's output folder.
    pub const OUTPUT_DIR: &'static str = "HETERO_OUTPUT_DIR";
    /// Host the data-plane listener binds to.
    pub const DATA_HOST: &'static str = "HETERO_DATA_HOST";
    /// Every rank's share of the work, comma-separated (absent: an even split).
    pub const WEIGHTS: &'static str = "HETERO_WEIGHTS";
    /// Index of the device the worker owns within its group.
    pub const DEVICE_INDEX: &'static str = "HETERO_DEVICE_INDEX";
    /// Backend of the worker's group (used when the job asks for `auto`).
    pub const BACKEND: &'static str = "HETERO_BACKEND";
    /// Speed cap of the device, in (0, 1]: the worker slows itself to this fraction.
    pub const SPEED: &'static str = "HETERO_SPEED";
    /// How a capped worker is slowed, for it to say (a CPU quota, or its own sleep
    /// throttle and why); absent at full speed.
    pub const THROTTLE: &'static str = "HETERO_THROTTLE";
    /// The worker's [`WorkerRole`] by name (absent: a worker of the ring).
    pub const ROLE: &'static str = "HETERO_ROLE";
    /// Every worker rank's resource group (`node/kind`), comma-separated.
    pub const GROUPS: &'static str = "HETERO_GROUPS";
    /// The program declared for the worker's device kind, when it has one.
    pub const DEVICE_COMMAND: &'static str = "HETERO_DEVICE_COMMAND";
    /// Set (to `1`) when the worker's host reads no dataset from disk: its samples
    /// come from workers that hold them (`hetero agent --no-local-data`).
    pub const NO_LOCAL_DATA: &'static str = "HETERO_NO_LOCAL_DATA";
    /// The folder on the worker's host where images received from other workers
    /// are kept (`<agent work dir>/data-cache`).
    pub const DATA_CACHE: &'static str = "HETERO_DATA_CACHE";
}

/// What a worker process is started as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkerRole {
    /// A rank of the job's ring, there from the start.
    #[default]
    Worker,
    /// The job's parameter server (rank `world`).
    ParameterServer,
    /// A lost rank relaunched when its node came back: it joins the running ring
    /// at the next epoch boundary.
    Joining,
}

impl WorkerRole {
    /// The role's name in [`WorkerEnv::ROLE`] and on the wire (a worker's is
    /// empty: the variable is left unset).
    pub fn name(self) -> &'static str {
        match self {
            WorkerRole::Worker => "",
            WorkerRole::ParameterServer => "parameter-server",
            WorkerRole::Joining => "joining",
        }
    }

    /// The role a name stands for; the error lists the names there are.
    pub fn from_name(name: &str) -> Result<WorkerRole, String> {
        [WorkerRole::Worker, WorkerRole::ParameterServer, WorkerRole::Joining]
            .into_iter()
            .find(|r| r.name() == name)
            .ok_or_else(|| {
                format!(
                    "{name:?} is not a role (the roles are {:?} and {:?}, or none for a worker)",
                    WorkerRole::ParameterServer.name(),
                    WorkerRole::Joining.name()
                )
            })
    }
}

/// The exit status of a worker whose job cannot go on whoever takes over (its
/// output cannot be written): the agent reports it as fatal to the job, so the
/// coordinator fails the job with the reason instead of migrating the worker's
/// samples to a survivor that would fail the same way.
pub const JOB_FATAL_EXIT: u8 = 4;

/// The exit status of a worker whose watchdog found it stalled (no progress in
/// its own work for `training.stall_after_secs`): a lost worker, whose last line
/// says so.
pub const STALLED_EXIT: u8 = 5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_reads_back_from_its_name() {
        for role in [WorkerRole::Worker, WorkerRole::ParameterServer, WorkerRole::Joining] {
            assert_eq!(WorkerRole::from_name(role.name()), Ok(role));
        }
        let err = WorkerRole::from_name("leader").unwrap_err();
        assert!(err.contains("\"leader\"") && err.contains("parameter-server"), "{err}");
    }
}
