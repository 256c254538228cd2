//! What the coordinator knows: jobs, their tasks, and the nodes (agents) that run
//! them — plain serde types, stored as JSON in redb and converted to wire types here.

use hetero_proto as pb;
use serde::{Deserialize, Serialize};

/// A job's life: queued → running → one of the three ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Waiting for resources.
    Queued,
    /// Its workers were placed.
    Running,
    /// Every worker finished.
    Succeeded,
    /// A worker failed; the message says which and why.
    Failed,
    /// A user cancelled it.
    Cancelled,
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

/// A task's state as the wire and the agents speak of it (the coordinator keeps
/// more: [`TaskPhase`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    /// Placed on an agent, not yet reported running.
    Pending,
    /// The worker process runs.
    Running,
    /// Exited 0.
    Succeeded,
    /// Exited otherwise, or its node was lost.
    Failed,
    /// Stopped on request.
    Cancelled,
}

impl TaskState {
    /// Whether the task has ended.
    pub fn is_final(self) -> bool {
        matches!(self, TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled)
    }
}

/// What a task is in its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskRole {
    /// A rank of the job's ring; the leader (rank 0) speaks for the job.
    Worker {
        /// Rank 0.
        leader: bool,
    },
    /// The job's parameter server (rank `workers`).
    ParameterServer,
    /// A lost rank relaunched when its node came back.
    Rejoining {
        /// The ring let it in (that happens between epochs); until then it holds no
        /// work and keeps nothing alive.
        admitted: bool,
    },
}

impl TaskRole {
    /// How people (and the wire's `TaskInfo.role`) read it.
    pub fn name(self) -> &'static str {
        match self {
            TaskRole::Worker { leader: true } => "compute, ring leader",
            TaskRole::Worker { leader: false } => "compute",
            TaskRole::ParameterServer => "parameter-server",
            TaskRole::Rejoining { .. } => "compute, rejoining",
        }
    }

    /// What the worker process is started as.
    pub fn worker_role(self) -> hetero_job::WorkerRole {
        match self {
            TaskRole::Worker { .. } => hetero_job::WorkerRole::Worker,
            TaskRole::ParameterServer => hetero_job::WorkerRole::ParameterServer,
            TaskRole::Rejoining { .. } => hetero_job::WorkerRole::Joining,
        }
    }

    /// A relaunched rank the ring has not let in yet.
    pub fn waits_to_join(self) -> bool {
        self == TaskRole::Rejoining { admitted: false }
    }
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskPhase {
    /// Placed on an agent that has not been told yet.
    Placed,
    /// The agent was told to start it; it has not reported running.
    Starting,
    /// The worker process runs.
    Running,
    /// Exited 0.
    Succeeded,
    /// Exited otherwise, or its node or agent was lost; `fatal`: in a way no other
    /// worker could get past (the job's output cannot be written), so the job fails
    /// rather than migrating its samples.
    Failed {
        /// No survivor could go on either.
        fatal: bool,
    },
    /// Lost after the ring formed, and its work moved to the survivors.
    Migrated,
    /// Stopped on request (or with its job).
    Cancelled,
}

impl TaskPhase {
    /// Whether the task has ended.
    pub fn is_final(self) -> bool {
        !matches!(self, TaskPhase::Placed | TaskPhase::Starting | TaskPhase::Running)
    }

    /// Failed, and its loss not yet recorded as a migration.
    pub fn failed(self) -> bool {
        matches!(self, TaskPhase::Failed { .. })
    }

    /// The state the wire and the agents speak of.
    pub fn state(self) -> TaskState {
        match self {
            TaskPhase::Placed | TaskPhase::Starting => TaskState::Pending,
            TaskPhase::Running => TaskState::Running,
            TaskPhase::Succeeded => TaskState::Succeeded,
            TaskPhase::Failed { .. } | TaskPhase::Migrated => TaskState::Failed,
            TaskPhase::Cancelled => TaskState::Cancelled,
        }
    }
}

/// A placed worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "StoredTask", into = "StoredTask")]
pub struct TaskRecord {
    /// `<job>-r<rank>`.
    pub task_id: String,
    /// Rank in the job's ring.
    pub rank: u32,
    /// The agent that runs it.
    pub agent_id: String,
    /// Its role in the job.
    pub role: TaskRole,
    /// Where it is in its life.
    pub phase: TaskPhase,
    /// Why it ended (with last log lines on failure).
    pub message: String,
    /// Compute threads it may use.
    pub threads: u32,
    /// Kind of the resource group it runs in.
    pub group: String,
    /// Device memory reserved for it, in MiB.
    pub memory_mb: u64,
    /// Its share of the job's work: its group's compute score at placement.
    pub weight: f32,
    /// Times this rank was relaunched after a loss, when its node came back.
    pub rejoins: u32,
}

/// A task as stores written before [`TaskRole`] and [`TaskPhase`] hold it (a role
/// string, a state and four flags), so a coordinator reads its old store and an
/// older one reads a newer store.
#[derive(Serialize, Deserialize)]
struct StoredTask {
    task_id: String,
    rank: u32,
    agent_id: String,
    role: String,
    state: TaskState,
    message: String,
    delivered: bool,
    threads: u32,
    #[serde(default)]
    group: String,
    #[serde(default)]
    memory_mb: u64,
    #[serde(default = "unit_weight")]
    weight: f32,
    #[serde(default)]
    migrated: bool,
    #[serde(default)]
    rejoins: u32,
    #[serde(default)]
    joining: bool,
    #[serde(default)]
    job_fatal: bool,
}

impl From<StoredTask> for TaskRecord {
    fn from(t: StoredTask) -> Self {
        let role = if t.role == TaskRole::ParameterServer.name() {
            TaskRole::ParameterServer
        } else if t.rejoins > 0 {
            TaskRole::Rejoining { admitted: !t.joining }
        } else {
            TaskRole::Worker { leader: t.rank == 0 }
        };
        let phase = match t.state {
            TaskState::Pending if t.delivered => TaskPhase::Starting,
            TaskState::Pending => TaskPhase::Placed,
            TaskState::Running => TaskPhase::Running,
            TaskState::Succeeded => TaskPhase::Succeeded,
            TaskState::Failed if t.migrated => TaskPhase::Migrated,
            TaskState::Failed => TaskPhase::Failed { fatal: t.job_fatal },
            TaskState::Cancelled => TaskPhase::Cancelled,
        };
        TaskRecord {
            task_id: t.task_id,
            rank: t.rank,
            agent_id: t.agent_id,
            role,
            phase,
            message: t.message,
            threads: t.threads,
            group: t.group,
            memory_mb: t.memory_mb,
            weight: t.weight,
            rejoins: t.rejoins,
        }
    }
}

impl From<TaskRecord> for StoredTask {
    fn from(t: TaskRecord) -> Self {
        StoredTask {
            role: t.role.name().into(),
            state: t.phase.state(),
            delivered: t.phase != TaskPhase::Placed,
            migrated: t.phase == TaskPhase::Migrated,
            joining: t.role.waits_to_join(),
            job_fatal: t.phase == TaskPhase::Failed { fatal: true },
            task_id: t.task_id,
            rank: t.rank,
            agent_id: t.agent_id,
            message: t.message,
            threads: t.threads,
            group: t.group,
            memory_mb: t.memory_mb,
            weight: t.weight,
            rejoins: t.rejoins,
        }
    }
}

fn unit_weight() -> f32 {
    1.0
}

/// An accepted job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// `job-000001`, …
    pub job_id: String,
    /// From the spec.
    pub name: String,
    /// The validated spec, as JSON.
    pub spec_json: String,
    /// Workers asked for.
    pub workers: u32,
    /// Program of a custom task (empty: built-in worker).
    pub program: String,
    /// Compute threads per worker asked for (0: share the node's cores).
    pub threads_per_worker: u32,
    /// Where the job's results go.
    pub output_dir: String,
    /// Its state.
    pub state: JobState,
    /// Why it is in that state.
    pub message: String,
    /// Timestamps (Unix ms; 0 = not yet).
    pub submitted_ms: i64,
    /// When it started.
    pub started_ms: i64,
    /// When it ended.
    pub finished_ms: i64,
    /// Its workers, once placed.
    pub tasks: Vec<TaskRecord>,
    /// Rank 0's run summary (JSON), once done.
    pub summary_json: String,
    /// Queue priority (higher first).
    #[serde(default)]
    pub priority: i64,
    /// Jobs that must succeed first.
    #[serde(default)]
    pub after: Vec<String>,
    /// Placement policy.
    #[serde(default)]
    pub policy: hetero_job::Policy,
    /// Device kind each worker needs.
    #[serde(default)]
    pub device: String,
    /// Device memory each worker needs, in MiB.
    #[serde(default)]
    pub memory_per_worker_mb: u64,
    /// Whether its data is split by compute score (else evenly).
    #[serde(default)]
    pub weighted: bool,
    /// The job's strategy lets survivors take over a lost worker's samples.
    #[serde(default)]
    pub migratable: bool,
    /// The job runs a parameter server (its last task).
    #[serde(default)]
    pub server: bool,
    /// Every worker found its peers once (the first ring formed).
    #[serde(default)]
    pub formed: bool,
    /// Where its ranks listen and how its ring regroups, kept so that a restarted
    /// coordinator answers as before.
    #[serde(default)]
    pub rendezvous: crate::rendezvous::Rendezvous,
}

/// A registered agent and its resource groups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// `node-1`, …
    pub agent_id: String,
    /// Machine name.
    pub hostname: String,
    /// Its resource groups.
    pub groups: Vec<GroupRecord>,
    /// Last heartbeat (Unix ms).
    pub last_heartbeat_ms: i64,
    /// The secret the coordinator gave the agent with its id: an agent that comes
    /// back with the id must show it, so two agents never share a node.
    #[serde(default)]
    pub key: String,
}

/// A group of devices of one kind on one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Device kind.
    pub kind: String,
    /// Device count (cores for a CPU).
    pub devices: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Workers it runs at once.
    pub worker_slots: u32,
    /// Measured matmul GFLOP/s of the whole group (0: not measured).
    #[serde(default)]
    pub gflops: f32,
    /// Speed cap (1 = full speed).
    #[serde(default = "full_speed")]
    pub speed: f32,
    /// Operator's override of the compute score (0: none).
    #[serde(default)]
    pub score_override: f32,
    /// Program that runs workers on a declared device kind.
    #[serde(default)]
    pub command: String,
    /// burn backend of a CPU group's workers ("" = the fastest).
    #[serde(default)]
    pub backend: String,
}

fn full_speed() -> f32 {
    1.0
}

impl GroupRecord {
    /// The compute score the scheduler and operators see: the override if set,
    /// else measured GFLOP/s × speed cap.
    pub fn score(&self) -> f32 {
        if self.score_override > 0.0 {
            self.score_override
        } else {
            self.gflops * self.speed
        }
    }
}

impl JobRecord {
    /// Its ranks: the workers, and the parameter server if it has one.
    pub fn ranks(&self) -> usize {
        self.workers as usize + usize::from(self.server)
    }

    /// How its ranks combine their work, as placed, in a few lines for people
    /// ([`hetero_job::topology::describe`]; empty if its spec cannot be read).
    pub fn topology(&self) -> Vec<String> {
        let place = |t: &TaskRecord| format!("{}/{}", t.agent_id, t.group);
        let mut workers: Vec<&TaskRecord> = self.tasks.iter().filter(|t| t.rank < self.workers).collect();
        workers.sort_by_key(|t| t.rank);
        workers.dedup_by_key(|t| t.rank);
        let places: Vec<String> = workers.into_iter().map(place).collect();
        let server = self
            .tasks
            .iter()
            .find(|t| t.role == TaskRole::ParameterServer)
            .map(place);
        hetero_job::JobSpec::from_json(&self.spec_json)
            .map(|spec| hetero_job::topology::describe(&spec, &places, self.workers as usize, server.as_deref()))
            .unwrap_or_default()
    }
}

impl NodeRecord {
    /// Workers this node runs at once.
    pub fn slots(&self) -> u32 {
        self.groups.iter().map(|g| g.worker_slots).sum()
    }

    /// Cores (devices) of its CPU groups.
    pub fn cores(&self) -> u32 {
        self.groups
            .iter()
            .filter(|g| g.kind == "cpu")
            .map(|g| g.devices)
            .sum::<u32>()
            .max(1)
    }
}

impl From<JobState> for pb::JobState {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Queued => pb::JobState::Queued,
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        }
    }
}

impl From<TaskState> for pb::TaskState {
    fn from(s: TaskState) -> Self {
        match s {
            TaskState::Pending => pb::TaskState::Pending,
            TaskState::Running => pb::TaskState::Running,
            TaskState::Succeeded => pb::TaskState::Succeeded,
            TaskState::Failed => pb::TaskState::Failed,
            TaskState::Cancelled => pb::TaskState::Cancelled,
        }
    }
}

/// The wire's task state, if it names one.
pub fn task_state_from_wire(s: i32) -> Option<TaskState> {
    match pb::TaskState::try_from(s).ok()? {
        pb::TaskState::Unspecified => None,
        pb::TaskState::Pending => Some(TaskState::Pending),
        pb::TaskState::Running => Some(TaskState::Running),
        pb::TaskState::Succeeded => Some(TaskState::Succeeded),
        pb::TaskState::Failed => Some(TaskState::Failed),
        pb::TaskState::Cancelled => Some(TaskState::Cancelled),
    }
}

/// Lower-case name of a wire job state, for people.
pub fn job_state_name(s: i32) -> &'static str {
    match pb::JobState::try_from(s).unwrap_or(pb::JobState::Unspecified) {
        pb::JobState::Unspecified => "unknown",
        pb::JobState::Queued => "queued",
        pb::JobState::Running => "running",
        pb::JobState::Succeeded => "succeeded",
        pb::JobState::Failed => "failed",
        pb::JobState::Cancelled => "cancelled",
    }
}

/// Lower-case name of a wire task state, for people.
pub fn task_state_name(s: i32) -> &'static str {
    match task_state_from_wire(s) {
        None => "unknown",
        Some(TaskState::Pending) => "pending",
        Some(TaskState::Running) => "running",
        Some(TaskState::Succeeded) => "succeeded",
        Some(TaskState::Failed) => "failed",
        Some(TaskState::Cancelled) => "cancelled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(role: TaskRole, phase: TaskPhase) -> TaskRecord {
        TaskRecord {
            task_id: "job-000001-r1".into(),
            rank: 1,
            agent_id: "node-1".into(),
            role,
            phase,
            message: "m".into(),
            threads: 2,
            group: "cpu".into(),
            memory_mb: 0,
            weight: 1.5,
            rejoins: u32::from(matches!(role, TaskRole::Rejoining { .. })),
        }
    }

    #[test]
    fn every_role_and_phase_reads_back_from_the_stored_form() {
        let roles = [
            TaskRole::Worker { leader: false },
            TaskRole::ParameterServer,
            TaskRole::Rejoining { admitted: false },
            TaskRole::Rejoining { admitted: true },
        ];
        let phases = [
            TaskPhase::Placed,
            TaskPhase::Starting,
            TaskPhase::Running,
            TaskPhase::Succeeded,
            TaskPhase::Failed { fatal: false },
            TaskPhase::Failed { fatal: true },
            TaskPhase::Migrated,
            TaskPhase::Cancelled,
        ];
        for role in roles {
            for phase in phases {
                let t = task(role, phase);
                let json = serde_json::to_string(&t).unwrap();
                assert_eq!(serde_json::from_str::<TaskRecord>(&json).unwrap(), t, "{json}");
            }
        }
        let mut leader = task(TaskRole::Worker { leader: true }, TaskPhase::Running);
        leader.rank = 0;
        let json = serde_json::to_string(&leader).unwrap();
        assert_eq!(serde_json::from_str::<TaskRecord>(&json).unwrap(), leader);
    }

    /// A store written before roles and phases were types holds a role string, a
    /// state and four flags: a coordinator reading it sees the same tasks.
    #[test]
    fn a_task_stored_with_the_old_flags_reads_as_its_role_and_phase() {
        let old = |role: &str, state: &str, delivered: bool, flags: &str| {
            let json = format!(
                r#"{{"task_id":"t","rank":1,"agent_id":"node-1","role":"{role}","state":"{state}",
                "message":"","delivered":{delivered},"threads":1{flags}}}"#
            );
            let t: TaskRecord = serde_json::from_str(&json).unwrap();
            (t.role, t.phase)
        };
        assert_eq!(
            old("compute", "Pending", false, ""),
            (TaskRole::Worker { leader: false }, TaskPhase::Placed)
        );
        assert_eq!(old("compute", "Pending", true, "").1, TaskPhase::Starting);
        assert_eq!(
            old("compute", "Failed", true, r#","migrated":true"#).1,
            TaskPhase::Migrated
        );
        assert_eq!(
            old("compute", "Failed", true, r#","job_fatal":true"#).1,
            TaskPhase::Failed { fatal: true }
        );
        assert_eq!(
            old("parameter-server", "Running", true, "").0,
            TaskRole::ParameterServer
        );
        assert_eq!(
            old("compute, rejoining", "Running", true, r#","rejoins":1,"joining":true"#).0,
            TaskRole::Rejoining { admitted: false }
        );
        assert_eq!(
            old("compute, rejoining", "Running", true, r#","rejoins":2"#).0,
            TaskRole::Rejoining { admitted: true }
        );
    }
}
