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

/// One worker of a job.
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

/// A placed worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// `<job>-r<rank>`.
    pub task_id: String,
    /// Rank in the job's ring.
    pub rank: u32,
    /// The agent that runs it.
    pub agent_id: String,
    /// Its role in the job.
    pub role: String,
    /// Its state.
    pub state: TaskState,
    /// Why it ended (with last log lines on failure).
    pub message: String,
    /// Whether the agent has been told to start it.
    pub delivered: bool,
    /// Compute threads it may use.
    pub threads: u32,
    /// Kind of the resource group it runs in.
    #[serde(default)]
    pub group: String,
    /// Device memory reserved for it, in MiB.
    #[serde(default)]
    pub memory_mb: u64,
    /// Its share of the job's work: its group's compute score at placement.
    #[serde(default = "unit_weight")]
    pub weight: f32,
    /// The worker was lost after the ring formed and its work moved to the others.
    #[serde(default)]
    pub migrated: bool,
    /// Times this rank was relaunched after a loss, when its node came back.
    #[serde(default)]
    pub rejoins: u32,
    /// A relaunched rank not yet admitted into the ring (that happens between epochs).
    #[serde(default)]
    pub joining: bool,
    /// It failed in a way no other worker could get past (the job's output cannot
    /// be written): the job fails rather than migrating its samples.
    #[serde(default)]
    pub job_fatal: bool,
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

impl From<&JobRecord> for pb::JobInfo {
    fn from(j: &JobRecord) -> Self {
        pb::JobInfo {
            job_id: j.job_id.clone(),
            name: j.name.clone(),
            state: pb::JobState::from(j.state) as i32,
            message: j.message.clone(),
            submitted_unix_ms: j.submitted_ms,
            started_unix_ms: j.started_ms,
            finished_unix_ms: j.finished_ms,
            workers: j.workers,
            tasks: j
                .tasks
                .iter()
                .map(|t| pb::TaskInfo {
                    task_id: t.task_id.clone(),
                    rank: t.rank,
                    agent_id: t.agent_id.clone(),
                    role: t.role.clone(),
                    state: pb::TaskState::from(t.state) as i32,
                    message: t.message.clone(),
                    loss: 0.0,
                    samples_per_sec: 0.0,
                })
                .collect(),
            output_dir: j.output_dir.clone(),
            summary_json: j.summary_json.clone(),
            spec_json: j.spec_json.clone(),
        }
    }
}

impl From<&GroupRecord> for pb::ResourceGroup {
    fn from(g: &GroupRecord) -> Self {
        pb::ResourceGroup {
            kind: g.kind.clone(),
            devices: g.devices,
            memory_bytes: g.memory_bytes,
            worker_slots: g.worker_slots,
            gflops: g.gflops,
            speed: g.speed,
            score: g.score(),
            command: g.command.clone(),
            backend: g.backend.clone(),
        }
    }
}

impl From<&pb::ResourceGroup> for GroupRecord {
    fn from(g: &pb::ResourceGroup) -> Self {
        GroupRecord {
            kind: g.kind.clone(),
            devices: g.devices,
            memory_bytes: g.memory_bytes,
            worker_slots: g.worker_slots,
            gflops: g.gflops,
            speed: if g.speed > 0.0 { g.speed } else { 1.0 },
            score_override: 0.0,
            command: g.command.clone(),
            backend: g.backend.clone(),
        }
    }
}
