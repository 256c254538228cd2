//! The job table: every job's record, and the ways a job moves through its life —
//! queued, placed, its tasks started and ended, lost workers migrated or
//! relaunched, and its end decided from its tasks.
//!
//! Every change is made on a copy of the job's record, stored, and only then kept
//! ([`Jobs::keep`]): a store that cannot write returns its error to the caller and
//! memory never holds what the disk does not.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use hetero_job::events::Event;
use hetero_job::{CHECKPOINT_FILE, JobSpec, WorkerRole};

use super::nodes::Nodes;
use super::{Ledger, Refusal};
use crate::alerts::Severity;
use crate::records::{JobRecord, JobState, TaskPhase, TaskRecord, TaskRole, TaskState};
use crate::rendezvous::Rendezvous;
use crate::scheduler::{self, Demand, Queued};
use crate::store::{LogKind, Store};
use crate::{ClusterError, now_ms};

/// Every job the coordinator accepted.
pub(crate) struct Jobs {
    map: BTreeMap<String, JobRecord>,
    next: u64,
}

/// A worker for an agent to start.
pub(crate) struct Start {
    /// The task.
    pub task: TaskRecord,
    /// Its job.
    pub job_id: String,
    /// The job's workers.
    pub world: u32,
    /// The job's spec (JSON).
    pub spec_json: String,
    /// The job's output folder.
    pub output_dir: String,
    /// A custom task's program (empty: the built-in worker).
    pub program: String,
    /// Every worker's share (empty: an even split).
    pub weights: Vec<f32>,
    /// Every worker's resource group (`node/kind`).
    pub groups: Vec<String>,
    /// What the process is started as.
    pub role: WorkerRole,
}

/// What an agent must do after a heartbeat.
#[derive(Default)]
pub(crate) struct Orders {
    /// Workers to start.
    pub start: Vec<Start>,
    /// Tasks to stop.
    pub cancel: Vec<String>,
}

/// What an agent reports about one of its tasks.
pub(crate) struct Report {
    /// The agent.
    pub agent_id: String,
    /// The task.
    pub task_id: String,
    /// Its end, when it ended.
    pub ended: Option<TaskState>,
    /// Why.
    pub message: String,
    /// It failed in a way no other worker could get past.
    pub job_fatal: bool,
    /// Lines it printed.
    pub log_lines: Vec<String>,
    /// Progress events it printed (JSON).
    pub events_json: Vec<String>,
}

/// Whether `t` is one of the job's workers (not its parameter server) that is in
/// the ring now: alive, and admitted if it rejoined.
pub(crate) fn in_ring(t: &TaskRecord, workers: u32) -> bool {
    t.rank < workers && !t.phase.is_final() && !t.role.waits_to_join()
}

fn job_number(id: &str) -> u64 {
    id.strip_prefix("job-").and_then(|n| n.parse().ok()).unwrap_or(0)
}

fn lower<T: std::fmt::Debug>(state: T) -> String {
    format!("{state:?}").to_lowercase()
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
        role: TaskRole::ParameterServer,
        phase: TaskPhase::Placed,
        message: String::new(),
        threads: 1,
        group: "cpu".into(),
        memory_mb: 0,
        weight: 0.0,
        rejoins: 0,
    }
}

impl Jobs {
    /// The jobs `store` holds.
    pub fn open(store: &Store) -> Result<Jobs, ClusterError> {
        let mut jobs = Jobs {
            map: BTreeMap::new(),
            next: 0,
        };
        for mut job in store.jobs()? {
            jobs.next = jobs.next.max(job_number(&job.job_id));
            if job.state == JobState::Running && job.rendezvous.slots.is_empty() {
                // Saved by a coordinator that kept rendezvous in memory only.
                job.rendezvous = Rendezvous::new(job.ranks());
            }
            jobs.map.insert(job.job_id.clone(), job);
        }
        Ok(jobs)
    }

    /// Job `job_id`.
    pub fn get(&self, job_id: &str) -> Option<&JobRecord> {
        self.map.get(job_id)
    }

    /// Every job, in id order.
    pub fn all(&self) -> impl DoubleEndedIterator<Item = &JobRecord> {
        self.map.values()
    }

    /// Job `job_id`, or a refusal naming it.
    pub fn find(&self, job_id: &str) -> Result<&JobRecord, Refusal> {
        self.map
            .get(job_id)
            .ok_or_else(|| Refusal::NotFound(format!("no job {job_id}")))
    }

    /// Stores `job` — a changed copy of a job — and only then keeps it.
    pub fn keep(&mut self, store: &Store, job: JobRecord) -> Result<(), ClusterError> {
        store.put_job(&job)?;
        self.map.insert(job.job_id.clone(), job);
        Ok(())
    }

    /// Tasks still running (or about to) on `agent_id`.
    pub fn busy_on(&self, agent_id: &str) -> usize {
        self.map
            .values()
            .flat_map(|j| &j.tasks)
            .filter(|t| t.agent_id == agent_id && !t.phase.is_final())
            .count()
    }

    /// Worker slots and memory (MiB) taken per (node, group kind). A parameter
    /// server takes no worker slot (see `server_task`).
    fn usage(&self) -> HashMap<(String, String), (u32, u64)> {
        let mut used: HashMap<(String, String), (u32, u64)> = HashMap::new();
        for t in self
            .map
            .values()
            .flat_map(|j| &j.tasks)
            .filter(|t| !t.phase.is_final() && t.role != TaskRole::ParameterServer)
        {
            let u = used.entry((t.agent_id.clone(), t.group.clone())).or_default();
            u.0 += 1;
            u.1 += t.memory_mb;
        }
        used
    }

    /// Queues a validated job and places what fits; returns its id.
    pub fn enqueue(&mut self, l: &mut Ledger, nodes: &Nodes, spec: JobSpec) -> Result<String, Refusal> {
        if let Some(dep) = spec.scheduling.after.iter().find(|d| !self.map.contains_key(*d)) {
            return Err(Refusal::Invalid(format!(
                "scheduling.after names {dep}, which is not a job here"
            )));
        }
        let job_id = format!("job-{:06}", self.next + 1);
        // Relative paths were resolved against the submitter's folder already.
        let output_dir = spec.output_dir.join(&job_id);
        let server = spec.training.strategy.uses_parameter_server();
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
            migratable: spec.cluster.workers > 1 || server,
            server,
            formed: false,
            rendezvous: Default::default(),
        };
        self.keep(l.store, job)?;
        self.next += 1;
        l.line(&job_id, format!("job queued: {} worker(s)", spec.cluster.workers))?;
        self.schedule(l, nodes)?;
        Ok(job_id)
    }

    /// A failed or cancelled job again, from its checkpoint (or the one it
    /// resumed from): a new job; returns its id.
    pub fn resume(&mut self, l: &mut Ledger, nodes: &Nodes, old_id: &str) -> Result<String, Refusal> {
        let old = self.find(old_id)?;
        if !matches!(old.state, JobState::Failed | JobState::Cancelled) {
            return Err(Refusal::Precondition(format!(
                "job {old_id} is {}; only a failed or cancelled job can be resumed",
                lower(old.state)
            )));
        }
        let mut spec = JobSpec::from_json(&old.spec_json)
            .map_err(|e| Refusal::Store(ClusterError::io("reading a stored spec", std::io::Error::other(e))))?;
        let own = Path::new(&old.output_dir).join(CHECKPOINT_FILE);
        let checkpoint = if own.exists() {
            own
        } else if let Some(earlier) = spec.training.resume_from.clone().filter(|p| p.exists()) {
            earlier
        } else {
            return Err(Refusal::Precondition(format!(
                "job {old_id} left no checkpoint at {} (it stopped before its first one; see training.checkpoint_every)",
                own.display()
            )));
        };
        spec.training.resume_from = Some(checkpoint.clone());
        let job_id = self.enqueue(l, nodes, spec)?;
        l.line(&job_id, format!("resumes job {old_id} from {}", checkpoint.display()))?;
        Ok(job_id)
    }

    /// Cancels `job_id` (nothing to do for an ended one); returns its state.
    pub fn cancel(&mut self, l: &mut Ledger, nodes: &Nodes, job_id: &str) -> Result<JobState, Refusal> {
        if !self.find(job_id)?.state.is_final() {
            self.finish(l, job_id, JobState::Cancelled, "cancelled by the user".into())?;
            self.schedule(l, nodes)?;
        }
        Ok(self.map[job_id].state)
    }

    /// Ends `job_id` in `state` with `message`, cancelling its live tasks.
    pub fn finish(
        &mut self,
        l: &mut Ledger,
        job_id: &str,
        state: JobState,
        message: String,
    ) -> Result<(), ClusterError> {
        let Some(job) = self.map.get(job_id).filter(|j| !j.state.is_final()) else {
            return Ok(());
        };
        let mut job = job.clone();
        job.state = state;
        job.message = message.clone();
        job.finished_ms = now_ms();
        job.rendezvous = Rendezvous::default();
        for t in job.tasks.iter_mut().filter(|t| !t.phase.is_final()) {
            t.phase = TaskPhase::Cancelled;
            if t.message.is_empty() {
                t.message = format!("stopped: job {}", lower(state));
            }
        }
        let name = job.name.clone();
        self.keep(l.store, job)?;
        if state == JobState::Failed {
            l.raise(
                Severity::Warning,
                job_id,
                format!("job {job_id} ({name}) failed: {message}"),
            )?;
        }
        l.line(job_id, format!("job {}: {message}", lower(state)))
    }

    /// Decides a running job's end from its tasks — or, when survivors can go on
    /// without the workers just lost, records the loss where users look.
    pub fn settle(&mut self, l: &mut Ledger, job_id: &str) -> Result<(), ClusterError> {
        let Some(job) = self.map.get(job_id).filter(|j| j.state == JobState::Running) else {
            return Ok(());
        };
        // A relaunched rank not yet admitted holds no work: it keeps nothing alive.
        let live = job
            .tasks
            .iter()
            .filter(|t| !t.phase.is_final() && !t.role.waits_to_join())
            .count();
        let workers_left = job.tasks.iter().filter(|t| in_ring(t, job.workers)).count();
        if let Some(t) = job.tasks.iter().find(|t| t.phase == TaskPhase::Failed { fatal: true }) {
            // No survivor could get past it: fail the job with the reason.
            let msg = format!(
                "worker rank {} cannot go on, nor could any other: {}",
                t.rank, t.message
            );
            return self.finish(l, job_id, JobState::Failed, msg);
        }
        let newly_lost = job.tasks.iter().any(|t| t.phase.failed());
        if newly_lost && job.formed && job.migratable && workers_left > 0 {
            // The survivors regroup by themselves.
            let mut job = job.clone();
            let (workers, server) = (job.workers, job.server);
            let mut lines = Vec::new();
            for t in job.tasks.iter_mut().filter(|t| t.phase.failed()) {
                t.phase = TaskPhase::Migrated;
                lines.push(if t.role == TaskRole::ParameterServer || t.rank >= workers {
                    format!(
                        "the parameter server on {} was lost ({}): the {workers_left} worker(s) go on as one \
                         allreduce ring from the latest global model",
                        t.agent_id, t.message
                    )
                } else if server {
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
            self.keep(l.store, job)?;
            for line in lines {
                l.raise(Severity::Warning, job_id, format!("job {job_id}: {line}"))?;
                l.line(job_id, line)?;
            }
            return Ok(());
        }
        let lost: Vec<String> = job
            .tasks
            .iter()
            .filter(|t| t.phase == TaskPhase::Migrated)
            .map(|t| match t.role {
                TaskRole::ParameterServer => "the parameter server".to_string(),
                _ => format!("rank {}", t.rank),
            })
            .collect();
        if let Some(failed) = job.tasks.iter().find(|t| t.phase.failed()) {
            let msg = format!("worker rank {} failed: {}", failed.rank, failed.message);
            self.finish(l, job_id, JobState::Failed, msg)
        } else if live == 0 && job.tasks.iter().any(|t| t.phase == TaskPhase::Succeeded) {
            let msg = if lost.is_empty() {
                "all workers finished".to_string()
            } else {
                format!("all surviving workers finished ({} lost and migrated)", lost.join(", "))
            };
            self.finish(l, job_id, JobState::Succeeded, msg)
        } else if live == 0 {
            self.finish(l, job_id, JobState::Failed, "every worker was lost".into())
        } else {
            Ok(())
        }
    }

    /// Places every queued job whose dependencies succeeded and that fits now, in
    /// queue order (priority, then submission). A job that does not fit does not
    /// block smaller ones behind it.
    pub fn schedule(&mut self, l: &mut Ledger, nodes: &Nodes) -> Result<(), ClusterError> {
        let now = now_ms();
        let queued: Vec<String> = self
            .map
            .values()
            .filter(|j| j.state == JobState::Queued)
            .map(|j| j.job_id.clone())
            .collect();
        let keys: Vec<Queued> = queued
            .iter()
            .map(|id| Queued {
                priority: self.map[id].priority,
                sequence: job_number(id),
            })
            .collect();
        for i in scheduler::queue_order(&keys) {
            let job_id = &queued[i];
            let mut waiting = false;
            let mut broken = None;
            for dep in &self.map[job_id].after {
                match self.map.get(dep).map(|d| d.state) {
                    Some(JobState::Succeeded) => {}
                    Some(JobState::Failed | JobState::Cancelled) | None => {
                        broken = Some(format!("dependency {dep} did not succeed"));
                        break;
                    }
                    Some(_) => waiting = true,
                }
            }
            if let Some(why) = broken {
                self.finish(l, job_id, JobState::Failed, why)?;
                continue;
            }
            if waiting {
                continue;
            }
            let groups = nodes.capacities(&self.usage(), now);
            let job = &self.map[job_id];
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
                    let node = nodes.get(agent).expect("capacities come from known nodes");
                    let threads = if job.threads_per_worker > 0 {
                        job.threads_per_worker
                    } else {
                        (node.cores() / per_node[agent.as_str()]).max(1)
                    };
                    TaskRecord {
                        task_id: format!("{job_id}-r{rank}"),
                        rank: rank as u32,
                        agent_id: agent.clone(),
                        role: TaskRole::Worker { leader: rank == 0 },
                        phase: TaskPhase::Placed,
                        message: String::new(),
                        threads,
                        group: groups[g].kind.clone(),
                        memory_mb: demand.memory_mb,
                        weight: node
                            .groups
                            .iter()
                            .find(|x| x.kind == groups[g].kind)
                            .map_or(1.0, |x| x.score()),
                        rejoins: 0,
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
            let mut job = job.clone();
            job.tasks = tasks;
            job.state = JobState::Running;
            job.started_ms = now;
            job.message = "placed".into();
            job.rendezvous = Rendezvous::new(job.ranks());
            let topology = job.topology();
            self.keep(l.store, job)?;
            l.line(job_id, format!("job running: {}", summary.join(", ")))?;
            for line in topology {
                l.line(job_id, format!("topology: {}", line.trim_start()))?;
            }
        }
        Ok(())
    }

    /// Node `agent_id` came back (its agent registered again, or it heartbeats
    /// again after being declared dead): each running job's ranks lost on it are
    /// relaunched there, to join their ring at the next epoch boundary.
    pub fn rejoin_lost(&mut self, l: &mut Ledger, agent_id: &str) -> Result<(), ClusterError> {
        let ids: Vec<String> = self
            .map
            .values()
            .filter(|j| j.state == JobState::Running && j.formed)
            .map(|j| j.job_id.clone())
            .collect();
        for job_id in ids {
            let mut job = self.map[&job_id].clone();
            let workers = job.workers;
            let mut relaunched = Vec::new();
            for t in job
                .tasks
                .iter_mut()
                .filter(|t| t.phase == TaskPhase::Migrated && t.agent_id == agent_id && t.rank < workers)
            {
                t.rejoins += 1;
                t.task_id = format!("{job_id}-r{}-j{}", t.rank, t.rejoins);
                t.phase = TaskPhase::Placed;
                t.message = format!("relaunched: node {agent_id} came back");
                t.role = TaskRole::Rejoining { admitted: false };
                relaunched.push(t.rank);
            }
            if relaunched.is_empty() {
                continue;
            }
            self.keep(l.store, job)?;
            for rank in relaunched {
                let line =
                    format!("worker rank {rank} relaunched on {agent_id}, which came back: it joins at the next epoch");
                l.line(&job_id, line.clone())?;
                l.raise(Severity::Info, &job_id, format!("job {job_id}: {line}"))?;
            }
        }
        Ok(())
    }

    /// Node `node` is dead: every live task on it failed. Returns the running jobs
    /// it touched, to be settled.
    pub fn node_lost(&mut self, store: &Store, node: &str, silent_ms: i64) -> Result<Vec<String>, ClusterError> {
        let ids: Vec<String> = self
            .map
            .values()
            .filter(|j| j.state == JobState::Running)
            .filter(|j| j.tasks.iter().any(|t| !t.phase.is_final() && t.agent_id == node))
            .map(|j| j.job_id.clone())
            .collect();
        for job_id in &ids {
            let mut job = self.map[job_id].clone();
            for t in job
                .tasks
                .iter_mut()
                .filter(|t| !t.phase.is_final() && t.agent_id == node)
            {
                t.phase = TaskPhase::Failed { fatal: false };
                t.message = format!("node {node} stopped heartbeating ({} s silent)", silent_ms / 1000);
            }
            self.keep(store, job)?;
        }
        Ok(ids)
    }

    /// What agent `agent_id`, running the tasks in `reported`, must do: start the
    /// tasks placed on it, stop those it should not run. A task it should run but
    /// does not (the agent restarted) is lost, and the node's lost ranks rejoin.
    pub fn reconcile(
        &mut self,
        l: &mut Ledger,
        agent_id: &str,
        reported: &HashSet<String>,
    ) -> Result<Orders, ClusterError> {
        let mut orders = Orders::default();
        let mut known = HashSet::new();
        let mut changed = Vec::new();
        let mut restarted = false;
        let ids: Vec<String> = self
            .map
            .values()
            .filter(|j| j.tasks.iter().any(|t| t.agent_id == agent_id))
            .map(|j| j.job_id.clone())
            .collect();
        for job_id in ids {
            let mut job = self.map[&job_id].clone();
            let mut start = Vec::new();
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
                let running_there = reported.contains(&t.task_id);
                match t.phase {
                    // An ended task still running there is stopped (a succeeded one
                    // is only finishing its exit).
                    phase if phase.is_final() && running_there && phase != TaskPhase::Succeeded => {
                        orders.cancel.push(t.task_id.clone());
                    }
                    phase if phase.is_final() => {}
                    TaskPhase::Placed => {
                        t.phase = TaskPhase::Starting;
                        dirty = true;
                        start.push(t.clone());
                    }
                    _ if !running_there => {
                        t.phase = TaskPhase::Failed { fatal: false };
                        t.message = format!("agent {agent_id} no longer runs this worker (agent restarted?)");
                        dirty = true;
                        restarted = true;
                    }
                    TaskPhase::Starting => {
                        t.phase = TaskPhase::Running;
                        dirty = true;
                    }
                    _ => {}
                }
            }
            if !dirty {
                continue;
            }
            orders.start.extend(start.into_iter().map(|task| Start {
                job_id: job.job_id.clone(),
                world: job.workers,
                spec_json: job.spec_json.clone(),
                output_dir: job.output_dir.clone(),
                program: job.program.clone(),
                weights: weights.clone(),
                groups: groups.clone(),
                role: task.role.worker_role(),
                task,
            }));
            self.keep(l.store, job)?;
            changed.push(job_id);
        }
        orders
            .cancel
            .extend(reported.iter().filter(|id| !known.contains(*id)).cloned());
        for job_id in changed {
            self.settle(l, &job_id)?;
        }
        if restarted {
            // The node is back (its agent restarted): its lost ranks rejoin.
            self.rejoin_lost(l, agent_id)?;
        }
        Ok(orders)
    }

    /// Takes an agent's report about one task: its run summary and its end are
    /// stored first, on a copy kept only once written — a store that cannot write
    /// fails the report before anything is appended, and the agent's retry finds
    /// memory as it was (no line logged twice, no end half-recorded); then its
    /// lines and events are logged, and its end settles the job.
    pub fn report(&mut self, l: &mut Ledger, nodes: &Nodes, r: Report) -> Result<(), Refusal> {
        let Some((job_id, rank, workers)) = self.map.values().find_map(|j| {
            j.tasks
                .iter()
                .find(|t| t.task_id == r.task_id && t.agent_id == r.agent_id)
                .map(|t| (j.job_id.clone(), t.rank, j.workers))
        }) else {
            return Err(Refusal::NotFound(format!(
                "no task {} on agent {}",
                r.task_id, r.agent_id
            )));
        };
        // Events this build cannot read (damaged, or from a newer worker) are kept
        // in the log as they came and otherwise ignored.
        let events: Vec<Event> = r.events_json.iter().filter_map(|e| Event::from_json(e)).collect();
        let summary = events.iter().rev().find_map(|event| match event {
            Event::Done { summary } => Some(serde_json::to_string(summary).expect("a summary serialises")),
            _ => None,
        });
        let ended = r.ended.filter(|_| {
            self.map[&job_id]
                .tasks
                .iter()
                .any(|t| t.task_id == r.task_id && !t.phase.is_final())
        });
        if summary.is_some() || ended.is_some() {
            let mut job = self.map[&job_id].clone();
            if let Some(summary) = summary {
                job.summary_json = summary;
            }
            if let Some(state) = ended {
                let task = job
                    .tasks
                    .iter_mut()
                    .find(|t| t.task_id == r.task_id)
                    .expect("found above");
                task.phase = match state {
                    TaskState::Pending => TaskPhase::Starting,
                    TaskState::Running => TaskPhase::Running,
                    TaskState::Succeeded => TaskPhase::Succeeded,
                    TaskState::Failed => TaskPhase::Failed { fatal: r.job_fatal },
                    TaskState::Cancelled => TaskPhase::Cancelled,
                };
                task.message = r.message.clone();
            }
            self.keep(l.store, job)?;
        }
        l.telemetry
            .log(l.store, &job_id, rank as i32, LogKind::Log, r.log_lines)?;
        l.telemetry.record(&r.task_id, &job_id, rank, workers, &events);
        l.telemetry
            .log(l.store, &job_id, rank as i32, LogKind::Event, r.events_json)?;
        if let Some(state) = ended {
            let line = format!("worker rank {rank} {}: {}", lower(state), r.message);
            l.telemetry
                .log(l.store, &job_id, rank as i32, LogKind::State, vec![line])?;
            self.settle(l, &job_id)?;
            self.schedule(l, nodes)?;
        }
        Ok(())
    }

    /// Changes `job_id` with `change` on a copy, and keeps it when `change` says it
    /// changed something (an unchanged job costs no store write).
    pub fn change<R>(
        &mut self,
        store: &Store,
        job_id: &str,
        change: impl FnOnce(&mut JobRecord) -> Result<(R, bool), Refusal>,
    ) -> Result<R, Refusal> {
        let mut job = self.find(job_id)?.clone();
        let (result, changed) = change(&mut job)?;
        if changed {
            self.keep(store, job)?;
        }
        Ok(result)
    }
}
