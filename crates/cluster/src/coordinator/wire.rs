//! Every conversion between the coordinator's records and the protocol's
//! messages, in both directions, and its refusals as gRPC statuses.

use hetero_proto as pb;
use tonic::Status;

use super::Refusal;
use super::jobs::{Orders, Report, Start};
use super::nodes::Health;
use super::rendezvous::{Answer, Arriving};
use super::telemetry::Telemetry;
use crate::alerts::AlertRecord;
use crate::records::{GroupRecord, JobRecord, NodeRecord, task_state_from_wire};
use crate::store::LogRecord;

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Status {
        match r {
            Refusal::NotFound(m) => Status::not_found(m),
            Refusal::Invalid(m) => Status::invalid_argument(m),
            Refusal::Precondition(m) => Status::failed_precondition(m),
            Refusal::Store(e) => Status::internal(format!("the coordinator's store failed: {e}")),
        }
    }
}

/// A job as the wire shows it, with its tasks' latest training figures.
pub(crate) fn job_info(j: &JobRecord, telemetry: &Telemetry) -> pb::JobInfo {
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
            .map(|t| {
                let (loss, samples_per_sec) = telemetry.figures(&t.task_id).unwrap_or((0.0, 0.0));
                pb::TaskInfo {
                    task_id: t.task_id.clone(),
                    rank: t.rank,
                    agent_id: t.agent_id.clone(),
                    role: t.role.name().into(),
                    state: pb::TaskState::from(t.phase.state()) as i32,
                    message: t.message.clone(),
                    loss,
                    samples_per_sec,
                }
            })
            .collect(),
        output_dir: j.output_dir.clone(),
        summary_json: j.summary_json.clone(),
        spec_json: j.spec_json.clone(),
        topology: j.topology(),
    }
}

/// A node as the wire shows it: health, groups with scores, usage, busy slots.
pub(crate) fn node_info(n: &NodeRecord, health: Health, busy: usize, usage: Vec<pb::DeviceUsage>) -> pb::NodeInfo {
    pb::NodeInfo {
        agent_id: n.agent_id.clone(),
        hostname: n.hostname.clone(),
        status: health.name().into(),
        last_heartbeat_unix_ms: n.last_heartbeat_ms,
        groups: n.groups.iter().map(resource_group).collect(),
        busy_slots: busy as u32,
        usage,
    }
}

/// A resource group as the wire shows it.
fn resource_group(g: &GroupRecord) -> pb::ResourceGroup {
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

/// A resource group an agent offers (no operator's score yet).
pub(crate) fn group_record(g: &pb::ResourceGroup) -> GroupRecord {
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

/// A stored log line as the wire shows it.
pub(crate) fn log_entry(job_id: &str, l: LogRecord) -> pb::LogEntry {
    pb::LogEntry {
        seq: l.seq,
        job_id: job_id.to_string(),
        rank: l.rank,
        unix_ms: l.unix_ms,
        kind: l.kind.name().into(),
        text: l.text,
    }
}

/// A stored alert as the wire shows it.
pub(crate) fn alert(a: AlertRecord) -> pb::Alert {
    pb::Alert {
        id: a.id,
        unix_ms: a.unix_ms,
        severity: a.severity.name().into(),
        subject: a.subject,
        message: a.message,
    }
}

/// What an agent must do, as a heartbeat's reply.
pub(crate) fn orders(o: Orders) -> pb::HeartbeatResponse {
    pb::HeartbeatResponse {
        start: o.start.into_iter().map(assignment).collect(),
        cancel_task_ids: o.cancel,
        reregister: false,
    }
}

fn assignment(s: Start) -> pb::TaskAssignment {
    pb::TaskAssignment {
        task_id: s.task.task_id,
        job_id: s.job_id,
        rank: s.task.rank,
        world_size: s.world,
        spec_json: s.spec_json,
        output_dir: s.output_dir,
        program: s.program,
        threads: s.task.threads,
        group: s.task.group,
        weights: s.weights,
        role: s.role.name().into(),
        groups: s.groups,
    }
}

/// An agent's report about a task.
pub(crate) fn report(r: pb::ReportTaskRequest) -> Report {
    Report {
        ended: task_state_from_wire(r.state),
        agent_id: r.agent_id,
        task_id: r.task_id,
        message: r.message,
        job_fatal: r.job_fatal,
        log_lines: r.log_lines,
        events_json: r.events_json,
    }
}

/// A rank arriving at a rendezvous.
pub(crate) fn arriving(r: pb::RendezvousRequest) -> Arriving {
    Arriving {
        job_id: r.job_id,
        rank: r.rank,
        address: r.address,
        generation: r.generation,
        joining: r.joining,
    }
}

/// What the rank hears.
pub(crate) fn answer(a: Answer) -> pb::RendezvousResponse {
    pb::RendezvousResponse {
        ready: a.ready,
        addresses: a.addresses,
        members: a.members,
        weights: a.weights,
        generation: a.generation,
        dataset_in_flight: false,
    }
}
