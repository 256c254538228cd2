//! The agent: one per machine. It offers the machine's devices to the coordinator
//! as resource groups, heartbeats, starts one worker *process* per assigned task,
//! forwards each worker's output (log lines and progress events) and reports how
//! every worker ended — a crash is reported with its exit status and last lines,
//! never lost.
//!
//! Worker protocol (both the built-in `hetero worker` and a user's own program):
//! the agent passes `HETERO_*` environment variables (see [`WorkerEnv`]); the worker
//! prints ordinary log lines, and progress events as `@hetero-event <json>` lines on
//! stdout; exit status 0 means success.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hetero_proto::{self as pb, PROTOCOL_VERSION};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, oneshot, watch};

use hetero_job::events::EVENT_PREFIX;
use hetero_job::worker_env::{JOB_FATAL_EXIT, STALLED_EXIT, WorkerEnv, WorkerRole};

use crate::ClusterError;
use crate::agent_config::DeclaredDevice;
use crate::cpu_pin::CpuSet;
use crate::cpu_quota::CpuQuota;
use crate::records::TaskState;
use hetero_proto::client::{Client, connect};

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Coordinator address (`host:port`).
    pub coordinator: String,
    /// Cluster token.
    pub token: String,
    /// Workers this machine runs at once.
    pub slots: u32,
    /// Where workers' spec files go.
    pub work_dir: PathBuf,
    /// The program that runs built-in workers (`<it> worker`).
    pub worker_program: PathBuf,
    /// Address workers' data-plane listeners bind to (reachable by other machines).
    pub data_host: String,
    /// This machine's name.
    pub hostname: String,
    /// Speed cap of the CPU group, in (0, 1] (1: full speed).
    pub speed: f32,
    /// Measured matmul GFLOP/s of the CPU group (0: not measured).
    pub gflops: f32,
    /// Devices declared in the agent's configuration file.
    pub declared: Vec<DeclaredDevice>,
    /// Backend of the CPU group's workers when a job asks for `auto` (empty: the
    /// fastest).
    pub backend: String,
    /// GPU groups driven by a burn backend this build has (`hetero agent --gpu cuda:2`).
    pub gpus: Vec<GpuGroup>,
    /// How long a worker may stay stopped (SIGSTOP, a debugger) before it is killed
    /// and its job goes on without it ([`crate::process_state`]).
    pub stopped_grace: Duration,
    /// This host reads no dataset from disk: its workers receive their samples
    /// from workers that hold them (`--no-local-data`).
    pub no_local_data: bool,
    /// Bytes the data cache (`<work dir>/data-cache`) may hold: at start, the
    /// folders used least recently are removed until it fits.
    pub data_cache_max: u64,
    /// The CPUs this agent's workers run on (`--cpus`); `None`: wherever the
    /// kernel puts them.
    pub cpus: Option<CpuSet>,
}

/// GPUs of one burn backend on this machine: one worker per device.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuGroup {
    /// Backend name, also the group's kind: `cuda`, `rocm` or `vulkan`.
    pub backend: String,
    /// Devices.
    pub count: u32,
    /// Memory of each device, in GB.
    pub memory_gb: f64,
}

impl AgentConfig {
    /// A configuration with full speed, no profile and no declared devices.
    pub fn new(coordinator: String, token: String, slots: u32, work_dir: PathBuf, worker_program: PathBuf) -> Self {
        AgentConfig {
            coordinator,
            token,
            slots,
            work_dir,
            worker_program,
            data_host: "127.0.0.1".into(),
            hostname: "local".into(),
            speed: 1.0,
            gflops: 0.0,
            declared: vec![],
            backend: String::new(),
            gpus: vec![],
            stopped_grace: Duration::from_secs(15),
            no_local_data: false,
            data_cache_max: 20 << 30,
            cpus: None,
        }
    }
}

/// Adds the NVIDIA GPUs NVML finds (with the `nvml` feature) unless `--gpu cuda:…`
/// already describes them.
fn add_discovered_gpus(config: &mut AgentConfig) {
    #[cfg(feature = "nvml")]
    if !config.gpus.iter().any(|g| g.backend == "cuda")
        && let Some((count, memory)) = crate::nvml::discover()
    {
        tracing::info!(count, "NVIDIA GPUs found through NVML");
        config.gpus.push(GpuGroup {
            backend: "cuda".into(),
            count,
            memory_gb: memory as f64 / 1e9,
        });
    }
    #[cfg(not(feature = "nvml"))]
    let _ = config;
}

/// The devices of this machine, as resource groups: the CPU (always), GPU groups and
/// every declared device kind.
pub fn discover_groups(config: &AgentConfig) -> Vec<pb::ResourceGroup> {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    // A pinned agent's workers compute on its CPUs alone: their threads are sized to them.
    let cores = crate::cpu_pin::cores(config.cpus.as_ref());
    let mut groups = vec![pb::ResourceGroup {
        kind: "cpu".into(),
        devices: cores,
        memory_bytes: sys.total_memory(),
        worker_slots: config.slots.max(1),
        gflops: config.gflops,
        speed: config.speed,
        score: 0.0,
        command: String::new(),
        backend: config.backend.clone(),
    }];
    for g in &config.gpus {
        groups.push(pb::ResourceGroup {
            kind: g.backend.clone(),
            devices: g.count,
            memory_bytes: (g.memory_gb * g.count as f64 * 1e9) as u64,
            worker_slots: g.count,
            gflops: 0.0,
            speed: 1.0,
            score: 0.0,
            command: String::new(),
            backend: g.backend.clone(),
        });
    }
    for d in &config.declared {
        groups.push(pb::ResourceGroup {
            kind: d.kind.clone(),
            devices: d.count,
            memory_bytes: (d.memory_gb * d.count as f64 * 1e9) as u64,
            worker_slots: d.slots.unwrap_or(d.count),
            gflops: 0.0,
            speed: 1.0,
            score: 0.0,
            command: d.command.display().to_string(),
            backend: String::new(),
        });
    }
    groups
}

struct Running {
    cancel: Option<oneshot::Sender<()>>,
    /// The group and device index the worker owns.
    device: (String, usize),
}

type Tasks = Arc<Mutex<HashMap<String, Running>>>;

/// The file in an agent's work folder that keeps the node id the coordinator gave
/// it, and the id's key (a line each): a restarted agent registers as the same
/// node, and the ranks it lost come back.
pub const ID_FILE: &str = "agent-id";

/// The node id and key this agent had before it restarted, if its work folder
/// kept them.
fn remembered_id(config: &AgentConfig) -> (String, String) {
    let text = std::fs::read_to_string(config.work_dir.join(ID_FILE)).unwrap_or_default();
    let mut lines = text.lines().map(str::trim);
    let id = lines.next().unwrap_or_default().to_string();
    let key = lines.next().unwrap_or_default().to_string();
    (id, key)
}

/// Keeps `agent_id` and its key for the next start (a failure only costs the node
/// its identity). Owner-only: the key proves the id.
fn remember_id(config: &AgentConfig, agent_id: &str, key: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let path = config.work_dir.join(ID_FILE);
    let written = std::fs::create_dir_all(&config.work_dir).and_then(|_| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        std::io::Write::write_all(&mut file, format!("{agent_id}\n{key}\n").as_bytes())
    });
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot keep the node id in the work folder; a restart registers a new node");
    }
}

/// Runs the agent until `shutdown` becomes true; its workers are killed then.
pub async fn run(mut config: AgentConfig, mut shutdown: watch::Receiver<bool>) -> Result<(), ClusterError> {
    add_discovered_gpus(&mut config);
    keep_cache_within(&config);
    let tasks: Tasks = Arc::default();
    let mut client: Option<Client> = None;
    let mut agent_id = String::new();
    let (mut known_id, mut known_key) = remembered_id(&config);
    let mut interval = Duration::from_millis(500);
    let mut warned = false;
    let mut sys = sysinfo::System::new();
    while !*shutdown.borrow() {
        if client.is_none() {
            match connect(&config.coordinator, &config.token).await {
                Ok(c) => client = Some(c),
                // A coordinator of another token stays one: say so and stop.
                Err(e @ hetero_proto::client::ClientError::WrongToken { .. }) => return Err(e.into()),
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "coordinator unreachable; retrying");
                        warned = true;
                    }
                }
            }
        }
        if let Some(c) = client.as_mut() {
            if agent_id.is_empty() {
                let req = pb::RegisterAgentRequest {
                    protocol_version: PROTOCOL_VERSION,
                    agent_id: known_id.clone(),
                    hostname: config.hostname.clone(),
                    groups: discover_groups(&config),
                    agent_key: known_key.clone(),
                };
                match c.register_agent(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        tracing::info!(agent_id = %r.agent_id, "registered with the coordinator");
                        agent_id = r.agent_id;
                        if agent_id != known_id || r.agent_key != known_key {
                            remember_id(&config, &agent_id, &r.agent_key);
                            (known_id, known_key) = (agent_id.clone(), r.agent_key);
                        }
                        interval = Duration::from_millis(r.heartbeat_interval_ms.max(50) as u64);
                        warned = false;
                    }
                    Err(s)
                        if s.code() == tonic::Code::Unauthenticated || s.code() == tonic::Code::FailedPrecondition =>
                    {
                        return Err(ClusterError::rpc("registering with the coordinator", s));
                    }
                    Err(s) => {
                        tracing::warn!(status = %s, "registration failed; retrying");
                        client = None;
                    }
                }
            } else {
                let list = {
                    let t = tasks.lock().unwrap_or_else(|p| p.into_inner());
                    t.keys()
                        .map(|id| pb::TaskStatus {
                            task_id: id.clone(),
                            state: pb::TaskState::Running as i32,
                        })
                        .collect()
                };
                sys.refresh_cpu_usage();
                sys.refresh_memory();
                #[allow(unused_mut)]
                let mut usage = vec![pb::DeviceUsage {
                    kind: "cpu".into(),
                    utilization: sys.global_cpu_usage() / 100.0,
                    memory_used_bytes: sys.used_memory(),
                }];
                #[cfg(feature = "nvml")]
                if let Some((utilization, memory_used_bytes)) = crate::nvml::usage() {
                    usage.push(pb::DeviceUsage {
                        kind: "cuda".into(),
                        utilization,
                        memory_used_bytes,
                    });
                }
                let req = pb::HeartbeatRequest {
                    agent_id: agent_id.clone(),
                    tasks: list,
                    usage,
                };
                match c.heartbeat(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        warned = false;
                        if r.reregister {
                            agent_id.clear();
                            continue;
                        }
                        for id in r.cancel_task_ids {
                            let mut t = tasks.lock().unwrap_or_else(|p| p.into_inner());
                            if let Some(cancel) = t.get_mut(&id).and_then(|r| r.cancel.take()) {
                                let _ = cancel.send(());
                            }
                        }
                        for a in r.start {
                            start_worker(&config, &agent_id, c.clone(), &tasks, a);
                        }
                    }
                    Err(s) => {
                        if !warned {
                            tracing::warn!(status = %s, "heartbeat failed; retrying");
                            warned = true;
                        }
                        client = None;
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => {}
        }
    }
    // Workers are spawned with kill_on_drop; cancelling them ends their processes.
    for (_, r) in tasks.lock().unwrap_or_else(|p| p.into_inner()).iter_mut() {
        if let Some(c) = r.cancel.take() {
            let _ = c.send(());
        }
    }
    Ok(())
}

/// Shrinks the data cache to its size, the folders used least recently first.
/// It runs before any worker of this agent does, so none loses a folder it uses.
fn keep_cache_within(config: &AgentConfig) {
    let cache = config.work_dir.join("data-cache");
    match hetero_job::cache_space::evict(&cache, config.data_cache_max) {
        Ok(e) => {
            for (path, bytes) in &e.removed {
                tracing::info!(folder = %path.display(), bytes, "removed from the data cache (least recently used)");
            }
        }
        Err(e) => tracing::warn!(error = %e, cache = %cache.display(), "could not keep the data cache within its size"),
    }
}

/// Registers the task as running (synchronously, so the next heartbeat lists it)
/// and starts its supervising tokio task.
fn start_worker(config: &AgentConfig, agent_id: &str, client: Client, tasks: &Tasks, a: pb::TaskAssignment) {
    let (cancel_tx, cancel_rx) = oneshot::channel();
    let index = {
        let mut running = tasks.lock().unwrap_or_else(|p| p.into_inner());
        // The lowest device index of the group that no running worker owns.
        let index = (0..)
            .find(|i| !running.values().any(|r| r.device == (a.group.clone(), *i)))
            .unwrap_or(0);
        running.insert(
            a.task_id.clone(),
            Running {
                cancel: Some(cancel_tx),
                device: (a.group.clone(), index),
            },
        );
        index
    };
    let config = config.clone();
    let agent_id = agent_id.to_string();
    let tasks = tasks.clone();
    tokio::spawn(async move {
        let task_id = a.task_id.clone();
        let ended = supervise(&config, &agent_id, client.clone(), &a, index, cancel_rx).await;
        report_final(client, &agent_id, &task_id, ended).await;
        tasks.lock().unwrap_or_else(|p| p.into_inner()).remove(&task_id);
    });
}

/// How a worker ended, as its agent reports it.
struct Ended {
    state: TaskState,
    /// Why, with the last lines of a failed worker.
    message: String,
    /// It failed in a way no other worker could get past ([`JOB_FATAL_EXIT`]).
    job_fatal: bool,
}

impl Ended {
    fn new(state: TaskState, message: impl Into<String>) -> Ended {
        Ended {
            state,
            message: message.into(),
            job_fatal: false,
        }
    }

    fn failed(message: impl Into<String>) -> Ended {
        Ended::new(TaskState::Failed, message)
    }
}

/// Retries the final report until the coordinator takes it (it may be restarting).
async fn report_final(mut client: Client, agent_id: &str, task_id: &str, ended: Ended) {
    let req = pb::ReportTaskRequest {
        agent_id: agent_id.to_string(),
        task_id: task_id.to_string(),
        state: pb::TaskState::from(ended.state) as i32,
        message: ended.message,
        log_lines: vec![],
        events_json: vec![],
        job_fatal: ended.job_fatal,
    };
    // Until it is taken: meanwhile the heartbeats still list the task, so the
    // coordinator (which may be restarting, or unable to write its store) neither
    // declares the worker lost nor hears a wrong end.
    let mut backoff = Backoff::default();
    let mut warned_at: Option<std::time::Instant> = None;
    loop {
        match client.report_task(req.clone()).await {
            Ok(_) => return,
            Err(s) if s.code() == tonic::Code::NotFound => return,
            Err(s) => {
                if warned_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    tracing::warn!(status = %s, task_id, "could not report a worker's end yet; retrying");
                    warned_at = Some(std::time::Instant::now());
                }
                tokio::time::sleep(backoff.next()).await;
            }
        }
    }
}

/// The pause before the next try of a call the coordinator did not take (it may be
/// restarting): 250 ms, doubling to at most 5 s.
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    fn next(&mut self) -> Duration {
        let pause = Duration::from_millis(250) * (1 << self.0.min(5));
        self.0 += 1;
        pause.min(Duration::from_secs(5))
    }
}

fn worker_command(config: &AgentConfig, a: &pb::TaskAssignment, spec_file: &Path) -> Command {
    let declared = config.declared.iter().find(|d| d.kind == a.group);
    let mut cmd = match (a.program.is_empty(), declared) {
        (false, _) => Command::new(&a.program),
        (true, Some(d)) => Command::new(&d.command),
        (true, None) => {
            let mut c = Command::new(&config.worker_program);
            c.arg("worker");
            c
        }
    };
    if let Some(d) = declared {
        cmd.env(WorkerEnv::DEVICE_COMMAND, &d.command);
    }
    if a.group == "cpu" || a.group.is_empty() {
        cmd.env(WorkerEnv::SPEED, config.speed.to_string());
        cmd.env(WorkerEnv::BACKEND, &config.backend);
    }
    cmd.env(WorkerEnv::COORDINATOR, &config.coordinator)
        .env(WorkerEnv::TOKEN, &config.token)
        .env(WorkerEnv::JOB_ID, &a.job_id)
        .env(WorkerEnv::TASK_ID, &a.task_id)
        .env(WorkerEnv::RANK, a.rank.to_string())
        .env(WorkerEnv::WORLD, a.world_size.to_string())
        .env(WorkerEnv::SPEC_FILE, spec_file)
        .env(WorkerEnv::OUTPUT_DIR, &a.output_dir)
        .env(WorkerEnv::DATA_HOST, &config.data_host)
        .env("RAYON_NUM_THREADS", a.threads.max(1).to_string())
        // libtorch's intra-op pool (OpenMP) reads this one.
        .env("OMP_NUM_THREADS", a.threads.max(1).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// The CPU group that makes a CPU worker of a capped agent (`--speed` below 1) as
/// slow as its cap: `None` at full speed or on other devices, `Some(Err(why))` where
/// the operating system gives no quota.
fn cpu_quota_for(config: &AgentConfig, a: &pb::TaskAssignment) -> Option<Result<CpuQuota, String>> {
    let cpu = a.group == "cpu" || a.group.is_empty();
    if !(cpu && config.speed > 0.0 && config.speed < 1.0) {
        return None;
    }
    let cores = config.speed as f64 * a.threads.max(1) as f64;
    Some(CpuQuota::create(&a.task_id, cores))
}

/// Runs one worker to its end; returns how it ended and why.
async fn supervise(
    config: &AgentConfig,
    agent_id: &str,
    client: Client,
    a: &pb::TaskAssignment,
    device_index: usize,
    mut cancel: oneshot::Receiver<()>,
) -> Ended {
    let dir = config.work_dir.join(&a.job_id).join(format!("rank-{}", a.rank));
    let spec_file = dir.join("spec.json");
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&spec_file, &a.spec_json)) {
        return Ended::failed(format!("cannot write {}: {e}", spec_file.display()));
    }
    let mut command = worker_command(config, a, &spec_file);
    if !a.weights.is_empty() {
        let weights: Vec<String> = a.weights.iter().map(|w| w.to_string()).collect();
        command.env(WorkerEnv::WEIGHTS, weights.join(","));
    }
    command.env(WorkerEnv::DEVICE_INDEX, device_index.to_string());
    let role = match WorkerRole::from_name(&a.role) {
        Ok(role) => role,
        Err(e) => return Ended::failed(format!("the coordinator's assignment: {e}")),
    };
    if role != WorkerRole::Worker {
        command.env(WorkerEnv::ROLE, role.name());
    }
    if !a.groups.is_empty() {
        command.env(WorkerEnv::GROUPS, a.groups.join(","));
    }
    if config.no_local_data {
        command.env(WorkerEnv::NO_LOCAL_DATA, "1");
    }
    command.env(WorkerEnv::DATA_CACHE, config.work_dir.join("data-cache"));
    if let Some(g) = config.gpus.iter().find(|g| g.backend == a.group) {
        command.env(WorkerEnv::BACKEND, &g.backend);
    }
    // A slower CPU device: a CPU quota from the operating system where it can be had,
    // else the worker's own sleep throttle (the worker says which).
    let quota = cpu_quota_for(config, a);
    match &quota {
        Some(Ok(q)) => {
            command.env(WorkerEnv::SPEED, "1");
            command.env(
                WorkerEnv::THROTTLE,
                format!(
                    "a CPU quota of {} × {} thread(s) (cgroup {:?}, {})",
                    config.speed,
                    a.threads.max(1),
                    q.version(),
                    q.path().display()
                ),
            );
        }
        Some(Err(why)) => {
            command.env(
                WorkerEnv::THROTTLE,
                format!("the sleep throttle at speed {} (no CPU quota: {why})", config.speed),
            );
        }
        None => {}
    }
    // A worker computes on its device's CPUs; a parameter server is no device's
    // work, and pinned there it would take time a device's quota was packed into.
    if let Some(cpus) = config.cpus.as_ref().filter(|_| role == WorkerRole::Worker) {
        cpus.pin(&mut command);
        tracing::info!(task_id = %a.task_id, cpus = %cpus, "the worker runs pinned to its agent's CPUs");
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            let program = if a.program.is_empty() {
                config.worker_program.display().to_string()
            } else {
                a.program.clone()
            };
            return Ended::failed(format!("cannot start worker program {program}: {e}"));
        }
    };
    if let (Some(Ok(q)), Some(pid)) = (&quota, child.id())
        && let Err(e) = q.add(pid)
    {
        let _ = child.start_kill();
        return Ended::failed(format!("cannot put the worker into its CPU group: {e}"));
    }
    // Output goes to the coordinator from a task of its own, so a coordinator that
    // is away or stalled never stops this loop from draining the worker's pipes.
    let (output, batches) = mpsc::channel(256);
    let forwarder = tokio::spawn(forward_output(client, agent_id.to_string(), a.task_id.clone(), batches));
    let (line_tx, mut line_rx) = mpsc::channel::<String>(1024);
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    for stream in [
        Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(stderr),
    ] {
        let tx = line_tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).await.is_err() {
                    break;
                }
            }
        });
    }
    drop(line_tx);

    let mut tail: VecDeque<String> = VecDeque::new();
    let mut logs = Vec::new();
    let mut events = Vec::new();
    let mut flush = tokio::time::interval(Duration::from_millis(250));
    let mut cancelled = false;
    let mut output_open = true;
    // A stopped worker stalls its whole job and no connection notices: watch for it.
    let mut check = tokio::time::interval(Duration::from_millis(500));
    let mut stopped_since: Option<std::time::Instant> = None;
    let mut stalled: Option<String> = None;
    let status = loop {
        tokio::select! {
            line = line_rx.recv(), if output_open => match line {
                Some(line) => {
                    if let Some(event) = line.strip_prefix(EVENT_PREFIX) {
                        events.push(event.to_string());
                    } else {
                        if tail.len() == 20 { tail.pop_front(); }
                        tail.push_back(line.clone());
                        logs.push(line);
                    }
                    if logs.len() + events.len() >= 200 {
                        hand_over(&output, &mut logs, &mut events);
                    }
                }
                None => output_open = false,
            },
            _ = flush.tick() => hand_over(&output, &mut logs, &mut events),
            _ = &mut cancel, if !cancelled => {
                cancelled = true;
                let _ = child.start_kill();
            }
            _ = check.tick(), if stalled.is_none() => {
                let stopped = child.id().is_some_and(crate::process_state::is_stopped);
                match (stopped, stopped_since) {
                    (false, _) => stopped_since = None,
                    (true, None) => stopped_since = Some(std::time::Instant::now()),
                    (true, Some(since)) if since.elapsed() >= config.stopped_grace => {
                        let why = format!(
                            "stopped (SIGSTOP or a debugger) for {} s: killed so that its job goes on without it",
                            since.elapsed().as_secs()
                        );
                        tracing::warn!(task = %a.task_id, "{why}");
                        logs.push(format!("[agent] {why}"));
                        stalled = Some(why);
                        let _ = child.start_kill();
                    }
                    (true, Some(_)) => {}
                }
            }
            status = child.wait(), if !output_open => break status,
        }
    };
    // The rest of the output (the run summary among it) reaches the coordinator
    // before the worker's end does.
    if !logs.is_empty() || !events.is_empty() {
        let _ = output.send((logs, events)).await;
    }
    drop(output);
    let _ = forwarder.await;
    match status {
        _ if cancelled => Ended::new(TaskState::Cancelled, "stopped on request"),
        _ if stalled.is_some() => Ended::failed(stalled.unwrap_or_default()),
        Ok(s) if s.success() => Ended::new(TaskState::Succeeded, "exited 0"),
        Ok(s) if s.code() == Some(i32::from(STALLED_EXIT)) => Ended::failed(tail.back().cloned().unwrap_or_default()),
        Ok(s) if s.code() == Some(i32::from(JOB_FATAL_EXIT)) => Ended {
            // Its last line says why (`worker failed: output: …`).
            job_fatal: true,
            ..Ended::failed(tail.back().cloned().unwrap_or_default())
        },
        Ok(s) => {
            let how = match (s.code(), exit_signal(&s)) {
                (Some(code), _) => format!("exited with status {code}"),
                (None, Some(sig)) => format!("killed by signal {sig}"),
                _ => "ended abnormally".into(),
            };
            let tail: Vec<String> = tail.into_iter().collect();
            Ended::failed(format!("{how}; last lines:\n{}", tail.join("\n")))
        }
        Err(e) => Ended::failed(format!("lost track of the worker process: {e}")),
    }
}

#[cfg(unix)]
fn exit_signal(s: &std::process::ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    s.signal()
}

#[cfg(not(unix))]
fn exit_signal(_: &std::process::ExitStatus) -> Option<i32> {
    None
}

/// A batch of a worker's output: log lines and event lines.
type Output = (Vec<String>, Vec<String>);

/// Passes what the worker printed to its forwarder without waiting; if the
/// forwarder is behind (the coordinator is away), it stays here for the next try.
fn hand_over(output: &mpsc::Sender<Output>, logs: &mut Vec<String>, events: &mut Vec<String>) {
    if logs.is_empty() && events.is_empty() {
        return;
    }
    if let Err(mpsc::error::TrySendError::Full((l, e)) | mpsc::error::TrySendError::Closed((l, e))) =
        output.try_send((std::mem::take(logs), std::mem::take(events)))
    {
        (*logs, *events) = (l, e);
        cap_held(logs);
    }
}

/// Sends a worker's output to the coordinator as it comes, holding it while the
/// coordinator is away (restarting) and trying again with a growing pause. Ends
/// once the worker's output has ended and all of it was taken.
async fn forward_output(mut client: Client, agent_id: String, task_id: String, mut batches: mpsc::Receiver<Output>) {
    let (mut logs, mut events) = (Vec::new(), Vec::new());
    let mut open = true;
    let mut backoff = Backoff::default();
    let mut next_try = tokio::time::Instant::now();
    loop {
        let held = !logs.is_empty() || !events.is_empty();
        if !open && !held {
            // Everything the worker printed was taken (the last report went through
            // after its output ended): with neither branch below enabled, `select!`
            // would panic.
            return;
        }
        tokio::select! {
            got = batches.recv(), if open => match got {
                Some((l, e)) => { logs.extend(l); events.extend(e); }
                None => open = false,
            },
            _ = tokio::time::sleep_until(next_try), if held => {}
        }
        while open {
            match batches.try_recv() {
                Ok((l, e)) => {
                    logs.extend(l);
                    events.extend(e);
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        cap_held(&mut logs);
        if logs.is_empty() && events.is_empty() {
            if open {
                continue;
            }
            return;
        }
        if tokio::time::Instant::now() < next_try {
            continue;
        }
        let req = pb::ReportTaskRequest {
            agent_id: agent_id.clone(),
            task_id: task_id.clone(),
            state: pb::TaskState::Unspecified as i32,
            message: String::new(),
            log_lines: std::mem::take(&mut logs),
            events_json: std::mem::take(&mut events),
            job_fatal: false,
        };
        match client.report_task(req.clone()).await {
            Ok(_) => backoff = Backoff::default(),
            // The coordinator no longer knows the task: there is no one to tell.
            Err(s) if s.code() == tonic::Code::NotFound => return,
            Err(s) => {
                tracing::debug!(status = %s, task_id, "worker output held for the next try");
                logs = [req.log_lines, logs].concat();
                events = [req.events_json, events].concat();
                next_try = tokio::time::Instant::now() + backoff.next();
            }
        }
    }
}

/// Keeps at most OUTPUT_HELD log lines, dropping the oldest with a line saying how
/// many went. (Events — progress, the run summary — are few and all kept.)
fn cap_held(logs: &mut Vec<String>) {
    if logs.len() > OUTPUT_HELD {
        let dropped = logs.len() - OUTPUT_HELD;
        logs.drain(..dropped);
        logs.insert(
            0,
            format!("[agent] {dropped} line(s) dropped while the coordinator was unreachable"),
        );
    }
}

/// Log lines of one worker an agent holds while the coordinator is unreachable.
const OUTPUT_HELD: usize = 20_000;
