//! The control plane end to end: real gRPC on loopback, a real redb file, real
//! worker processes (small shell programs standing in for a user's training
//! program, so these tests exercise the agent and coordinator, not burn).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hetero_cluster::coordinator::{Coordinator, CoordinatorConfig};
use hetero_cluster::local::LocalCluster;
use hetero_proto as pb;
use hetero_proto::client::{self, Client, connect};
use tokio::sync::watch;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist-subset")
}

fn custom_spec(program: &Path, workers: usize) -> String {
    format!(
        "name = \"t\"\n[model]\nkind = \"custom\"\n[task]\nprogram = \"{}\"\n[dataset]\npath = \"{}\"\n[cluster]\nworkers = {workers}\n[training]\nglobal_batch_size = 8\n[output]\ndir = \"{}\"\n",
        program.display(),
        data_dir().display(),
        std::env::temp_dir().join("hetero-test-runs").display()
    )
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

async fn submit(client: &mut Client, spec: String) -> String {
    client::submit(client, &spec, "").await.unwrap()
}

async fn wait_for(client: &mut Client, job_id: &str, done: impl Fn(&pb::JobInfo) -> bool) -> pb::JobInfo {
    let info = client::wait_for(client, job_id, Duration::from_secs(60), &done)
        .await
        .unwrap();
    assert!(done(&info), "job never got there: {info:?}");
    info
}

/// The nodes the coordinator knows.
async fn nodes(client: &mut Client) -> Vec<pb::NodeInfo> {
    client
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
}

async fn get(client: &mut Client, job_id: &str) -> pb::JobInfo {
    client
        .get_job(pb::GetJobRequest { job_id: job_id.into() })
        .await
        .unwrap()
        .into_inner()
}

fn ended(info: &pb::JobInfo) -> bool {
    client::has_ended(info)
}

#[tokio::test]
async fn a_crashing_worker_fails_its_job_with_its_last_lines() {
    let dir = tempfile::tempdir().unwrap();
    let crash = script(
        dir.path(),
        "crash.sh",
        "echo \"loading data\"\necho \"boom: out of memory\" >&2\nexit 3",
    );
    let cluster = LocalCluster::start(2, "/bin/false".into()).await.unwrap();
    let mut client = cluster.client().await.unwrap();
    let job = submit(&mut client, custom_spec(&crash, 2)).await;
    let info = wait_for(&mut client, &job, ended).await;
    assert_eq!(info.state, pb::JobState::Failed as i32, "{info:?}");
    assert!(info.message.contains("exited with status 3"), "{}", info.message);
    assert!(info.message.contains("boom: out of memory"), "{}", info.message);
    let failed = info
        .tasks
        .iter()
        .find(|t| t.state == pb::TaskState::Failed as i32)
        .unwrap();
    assert!(failed.message.contains("loading data"));
    // The log holds the worker's lines too.
    let texts = client::log_texts(&mut client, &job).await.unwrap();
    assert!(texts.iter().any(|t| t == "boom: out of memory"), "{texts:?}");
    // The failed job's slots are free again: a job needing both starts and succeeds.
    let quick = script(dir.path(), "quick.sh", "echo fine");
    let next = submit(&mut client, custom_spec(&quick, 2)).await;
    let info = wait_for(&mut client, &next, ended).await;
    assert_eq!(info.state, pb::JobState::Succeeded as i32, "{info:?}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_missing_program_is_reported() {
    let cluster = LocalCluster::start(1, "/bin/false".into()).await.unwrap();
    let mut client = cluster.client().await.unwrap();
    let job = submit(&mut client, custom_spec(Path::new("/nonexistent/trainer"), 1)).await;
    let info = wait_for(&mut client, &job, ended).await;
    assert_eq!(info.state, pb::JobState::Failed as i32);
    assert!(
        info.message
            .contains("cannot start worker program /nonexistent/trainer"),
        "{}",
        info.message
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn cancelling_stops_running_workers_and_frees_the_slots() {
    let dir = tempfile::tempdir().unwrap();
    let sleeper = script(dir.path(), "sleep.sh", "echo started\nexec sleep 300");
    let quick = script(dir.path(), "quick.sh", "echo done");
    let cluster = LocalCluster::start(2, "/bin/false".into()).await.unwrap();
    let mut client = cluster.client().await.unwrap();
    let job = submit(&mut client, custom_spec(&sleeper, 2)).await;
    // A second job cannot start while the first holds both slots.
    let second = submit(&mut client, custom_spec(&quick, 1)).await;
    wait_for(&mut client, &job, |i| {
        i.tasks.iter().all(|t| t.state == pb::TaskState::Running as i32)
    })
    .await;
    let queued = get(&mut client, &second).await;
    assert_eq!(queued.state, pb::JobState::Queued as i32);
    let r = client
        .cancel_job(pb::CancelJobRequest { job_id: job.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, pb::JobState::Cancelled as i32);
    let info = wait_for(&mut client, &second, ended).await;
    assert_eq!(info.state, pb::JobState::Succeeded as i32, "{info:?}");
    let first = get(&mut client, &job).await;
    assert!(first.tasks.iter().all(|t| t.state == pb::TaskState::Cancelled as i32));
    cluster.shutdown().await;
}

#[tokio::test]
async fn wrong_or_missing_token_is_refused_and_changes_nothing() {
    let cluster = LocalCluster::start(1, "/bin/false".into()).await.unwrap();
    // Another token derives another authority: TLS refuses this coordinator's
    // certificate before a call (or the token) is sent.
    let refused = connect(&cluster.address, "not-the-token")
        .await
        .expect_err("TLS must refuse");
    assert!(refused.to_string().contains("certificate"), "{refused}");
    // Plaintext to a TLS coordinator gets nowhere either.
    if let Ok(mut plain) = connect(&format!("http://{}", cluster.address), &cluster.token).await {
        assert!(plain.list_jobs(pb::ListJobsRequest {}).await.is_err());
    }
    // Past TLS (the right authority), a wrong token is still refused by every call.
    let tls_channel = || async {
        tonic::transport::Endpoint::from_shared(format!("https://{}", cluster.address))
            .unwrap()
            .tls_config(hetero_proto::tls::client_config(&cluster.token).unwrap())
            .unwrap()
            .connect()
            .await
            .unwrap()
    };
    let mut intruder = pb::coordinator_client::CoordinatorClient::with_interceptor(
        tls_channel().await,
        hetero_proto::auth::AttachToken::new("not-the-token").unwrap(),
    );
    let spec = custom_spec(Path::new("/bin/true"), 1);
    let err = intruder
        .submit_job(pb::SubmitJobRequest {
            spec_toml: spec.clone(),
            base_dir: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = intruder
        .register_agent(pb::RegisterAgentRequest {
            protocol_version: hetero_proto::PROTOCOL_VERSION,
            agent_id: String::new(),
            hostname: "evil".into(),
            agent_key: String::new(),
            groups: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        intruder.list_jobs(pb::ListJobsRequest {}).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );

    // No token at all.
    let mut bare = pb::coordinator_client::CoordinatorClient::new(tls_channel().await);
    let err = bare
        .cancel_job(pb::CancelJobRequest {
            job_id: "job-000001".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    let mut client = cluster.client().await.unwrap();
    assert!(
        client
            .list_jobs(pb::ListJobsRequest {})
            .await
            .unwrap()
            .into_inner()
            .jobs
            .is_empty()
    );
    let nodes = nodes(&mut client).await;
    assert!(nodes.iter().all(|n| n.hostname != "evil"));
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_bad_spec_is_refused_with_the_key_named() {
    let cluster = LocalCluster::start(1, "/bin/false".into()).await.unwrap();
    let mut client = cluster.client().await.unwrap();
    let err = client
        .submit_job(pb::SubmitJobRequest {
            spec_toml: custom_spec(Path::new("/bin/true"), 1).replace("[training]\n", "[training]\nepoch = 3\n"),
            base_dir: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("training.epoch"), "{}", err.message());
    assert!(
        client
            .list_jobs(pb::ListJobsRequest {})
            .await
            .unwrap()
            .into_inner()
            .jobs
            .is_empty()
    );
    cluster.shutdown().await;
}

async fn serve(path: &Path, token: &str) -> (String, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    serve_with(CoordinatorConfig::new(path, token)).await
}

/// A coordinator with `config` on a free loopback port: its address, the switch that
/// stops it, and its task.
async fn serve_with(config: CoordinatorConfig) -> (String, watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let coordinator = Coordinator::open(config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (tx, mut rx) = watch::channel(false);
    let handle = tokio::spawn(async move {
        coordinator
            .serve(listener, async move {
                let _ = rx.changed().await;
            })
            .await
            .unwrap();
    });
    (address, tx, handle)
}

#[tokio::test]
async fn a_restarted_coordinator_still_lists_accepted_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("coordinator.redb");
    let (address, stop, handle) = serve(&store, "tok").await;
    let mut client = connect(&address, "tok").await.unwrap();
    let a = submit(&mut client, custom_spec(Path::new("/bin/true"), 2)).await;
    let b = submit(&mut client, custom_spec(Path::new("/bin/true"), 1)).await;
    client
        .cancel_job(pb::CancelJobRequest { job_id: b.clone() })
        .await
        .unwrap();
    drop(client);
    stop.send(true).unwrap();
    handle.await.unwrap();

    let (address, stop, handle) = serve(&store, "tok").await;
    let mut client = connect(&address, "tok").await.unwrap();
    let jobs = client
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs;
    let ids: Vec<_> = jobs.iter().map(|j| j.job_id.clone()).collect();
    assert_eq!(ids, vec![a.clone(), b.clone()]);
    assert_eq!(jobs[0].state, pb::JobState::Queued as i32);
    assert_eq!(jobs[1].state, pb::JobState::Cancelled as i32);
    // New jobs continue the numbering instead of reusing an id.
    let c = submit(&mut client, custom_spec(Path::new("/bin/true"), 1)).await;
    assert_eq!(c, "job-000003");
    stop.send(true).unwrap();
    handle.await.unwrap();
}

fn with_scheduling(spec: String, scheduling: &str) -> String {
    format!("{spec}[scheduling]\n{scheduling}\n")
}

#[tokio::test]
async fn dependencies_wait_for_success_and_fail_after_failure() {
    let dir = tempfile::tempdir().unwrap();
    let ok = script(dir.path(), "ok.sh", "sleep 0.3; echo ok");
    let bad = script(dir.path(), "bad.sh", "exit 1");
    let cluster = LocalCluster::start(2, "/bin/false".into()).await.unwrap();
    let mut client = cluster.client().await.unwrap();
    let a = submit(&mut client, custom_spec(&ok, 1)).await;
    let b = submit(
        &mut client,
        with_scheduling(custom_spec(&ok, 1), &format!("after = [\"{a}\"]")),
    )
    .await;
    // b must not start while a runs, although a slot is free.
    let b_info = get(&mut client, &b).await;
    assert_eq!(b_info.state, pb::JobState::Queued as i32);
    let b_info = wait_for(&mut client, &b, ended).await;
    assert_eq!(b_info.state, pb::JobState::Succeeded as i32);
    let a_info = get(&mut client, &a).await;
    assert!(
        b_info.started_unix_ms >= a_info.finished_unix_ms,
        "{a_info:?} {b_info:?}"
    );

    let c = submit(&mut client, custom_spec(&bad, 1)).await;
    let d = submit(
        &mut client,
        with_scheduling(custom_spec(&ok, 1), &format!("after = [\"{c}\"]")),
    )
    .await;
    let d_info = wait_for(&mut client, &d, ended).await;
    assert_eq!(d_info.state, pb::JobState::Failed as i32);
    assert!(
        d_info.message.contains(&format!("dependency {c} did not succeed")),
        "{}",
        d_info.message
    );

    let err = client
        .submit_job(pb::SubmitJobRequest {
            spec_toml: with_scheduling(custom_spec(&ok, 1), "after = [\"job-999999\"]"),
            base_dir: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    cluster.shutdown().await;
}

#[tokio::test]
async fn higher_priority_starts_first_when_resources_free_up() {
    let dir = tempfile::tempdir().unwrap();
    let sleeper = script(dir.path(), "sleep.sh", "exec sleep 300");
    let cluster = LocalCluster::start(1, "/bin/false".into()).await.unwrap();
    let mut client = cluster.client().await.unwrap();
    let blocker = submit(&mut client, custom_spec(&sleeper, 1)).await;
    wait_for(&mut client, &blocker, |i| i.state == pb::JobState::Running as i32).await;
    let low = submit(&mut client, with_scheduling(custom_spec(&sleeper, 1), "priority = 0")).await;
    let high = submit(&mut client, with_scheduling(custom_spec(&sleeper, 1), "priority = 5")).await;
    client
        .cancel_job(pb::CancelJobRequest { job_id: blocker })
        .await
        .unwrap();
    wait_for(&mut client, &high, |i| i.state == pb::JobState::Running as i32).await;
    let low_info = get(&mut client, &low).await;
    assert_eq!(
        low_info.state,
        pb::JobState::Queued as i32,
        "the slot went to the lower priority"
    );
    client.cancel_job(pb::CancelJobRequest { job_id: high }).await.unwrap();
    wait_for(&mut client, &low, |i| i.state == pb::JobState::Running as i32).await;
    client.cancel_job(pb::CancelJobRequest { job_id: low }).await.unwrap();
    cluster.shutdown().await;
}

#[tokio::test]
async fn declared_devices_are_registered_scheduled_and_run_their_command() {
    use hetero_cluster::agent_config::AgentFile;
    let dir = tempfile::tempdir().unwrap();
    let runner = script(
        dir.path(),
        "npu-runner.sh",
        "echo \"npu worker rank $HETERO_RANK of $HETERO_WORLD\"",
    );
    let file = AgentFile::parse(&format!(
        "speed = 0.5\n[[device]]\nkind = \"npu\"\ncount = 2\nmemory_gb = 8\ncommand = \"{}\"\n",
        runner.display()
    ))
    .unwrap();
    let cluster = LocalCluster::start_with(|a| {
        a.slots = 1;
        a.worker_program = "/bin/false".into();
        a.speed = file.speed.unwrap() as f32;
        a.gflops = 100.0;
        a.declared = file.devices;
    })
    .await
    .unwrap();
    let mut client = cluster.client().await.unwrap();
    let started = Instant::now();
    let nodes = loop {
        let nodes = client
            .list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
        if !nodes.is_empty() {
            break nodes;
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let groups = &nodes[0].groups;
    let npu = groups.iter().find(|g| g.kind == "npu").expect("npu group registered");
    assert_eq!((npu.devices, npu.worker_slots), (2, 2));
    assert_eq!(npu.memory_bytes, 16_000_000_000);
    let cpu = groups.iter().find(|g| g.kind == "cpu").unwrap();
    assert_eq!(cpu.score, 50.0, "score = measured 100 GFLOP/s × speed cap 0.5");

    // An operator overrides the score; 0 restores the measured one.
    let node = client
        .set_group_score(pb::SetGroupScoreRequest {
            agent_id: nodes[0].agent_id.clone(),
            kind: "cpu".into(),
            score: 80.0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.groups.iter().find(|g| g.kind == "cpu").unwrap().score, 80.0);
    let err = client
        .set_group_score(pb::SetGroupScoreRequest {
            agent_id: nodes[0].agent_id.clone(),
            kind: "tpu".into(),
            score: 1.0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // A built-in job that needs NPUs runs the declared command on both NPU slots,
    // although the CPU group has only one slot.
    let spec = format!(
        "[dataset]\npath = \"{}\"\n[cluster]\nworkers = 2\ndevice = \"npu\"\nmemory_per_worker_mb = 4000\n[training]\nglobal_batch_size = 8\n",
        data_dir().display()
    );
    let job = submit(&mut client, spec.clone()).await;
    let info = wait_for(&mut client, &job, ended).await;
    assert_eq!(info.state, pb::JobState::Succeeded as i32, "{info:?}");
    // More memory than an NPU has: the job waits instead of overbooking.
    let big = submit(&mut client, spec.replace("4000", "9000")).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let waiting = get(&mut client, &big).await;
    assert_eq!(waiting.state, pb::JobState::Queued as i32);
    client.cancel_job(pb::CancelJobRequest { job_id: big }).await.unwrap();

    // The CPU group's speed cap reaches its workers: as a CPU quota where this
    // machine's cgroups give one (the worker then need not slow itself), else as the
    // speed its sleep throttle keeps to — and the worker is told which.
    let echo = script(
        dir.path(),
        "speed.sh",
        "echo \"speed=$HETERO_SPEED by $HETERO_THROTTLE\"",
    );
    let job = submit(&mut client, custom_spec(&echo, 1)).await;
    wait_for(&mut client, &job, ended).await;
    let texts = client::log_texts(&mut client, &job).await.unwrap();
    assert!(
        texts.iter().any(|t| t.starts_with("speed=1 by a CPU quota of 0.5 ×")
            || t.starts_with("speed=0.5 by the sleep throttle at speed 0.5 (no CPU quota: ")),
        "{texts:?}"
    );
    cluster.shutdown().await;
}

/// An agent given CPUs starts its workers on those alone (every process and thread
/// they start inherits it), and reports as many cores as it was given.
#[tokio::test]
async fn a_pinned_agents_workers_run_on_its_cpus_alone() {
    use hetero_cluster::cpu_pin::CpuSet;
    let allowed = CpuSet::allowed().unwrap();
    let last = CpuSet::of(vec![*allowed.cpus().last().unwrap()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start_with(|a| {
        a.slots = 1;
        a.worker_program = "/bin/false".into();
        a.cpus = Some(last.clone());
    })
    .await
    .unwrap();
    let mut client = cluster.client().await.unwrap();
    // The worker's child reports its own affinity, as the kernel has it.
    let affinity = script(
        dir.path(),
        "affinity.sh",
        "sh -c 'grep Cpus_allowed_list /proc/self/status'",
    );
    let job = submit(&mut client, custom_spec(&affinity, 1)).await;
    let info = wait_for(&mut client, &job, ended).await;
    assert_eq!(info.state, pb::JobState::Succeeded as i32, "{info:?}");
    let texts = client::log_texts(&mut client, &job).await.unwrap();
    let reported: Vec<&str> = texts
        .iter()
        .filter_map(|t| t.strip_prefix("Cpus_allowed_list:"))
        .map(str::trim)
        .collect();
    assert_eq!(reported, [last.to_string().as_str()], "{texts:?}");
    let nodes = nodes(&mut client).await;
    let cpu = nodes[0].groups.iter().find(|g| g.kind == "cpu").unwrap();
    assert_eq!(cpu.devices, 1, "one pinned CPU, one core");
    cluster.shutdown().await;
}

/// A TCP relay on loopback that forwards both ways to `to` and keeps a copy of
/// every byte the client sent.
async fn recording_relay(to: String) -> (String, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(&to).await.unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = cr.read(&mut buf).await {
                    if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    record.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn calls_cross_the_wire_encrypted_unless_the_operator_says_insecure() {
    // TLS (the default): calls through the relay work, and the relay never sees the token.
    let cluster = LocalCluster::start(1, "/bin/false".into()).await.unwrap();
    let (relay, seen) = recording_relay(cluster.address.clone()).await;
    let mut client = connect(&relay, &cluster.token).await.unwrap();
    client.list_jobs(pb::ListJobsRequest {}).await.unwrap();
    let bytes = seen.lock().unwrap().clone();
    assert!(bytes.len() > 100, "the relay carried the call");
    assert!(
        !bytes
            .windows(cluster.token.len())
            .any(|w| w == cluster.token.as_bytes())
    );
    assert!(!bytes.windows(14).any(|w| w == b"PRI * HTTP/2.0"), "HTTP/2 in clear");
    cluster.shutdown().await;

    // --insecure: the same call in plaintext, and the token is there for anyone to read.
    let dir = tempfile::tempdir().unwrap();
    let mut config = CoordinatorConfig::new(dir.path().join("store.redb"), "plain-token-123");
    config.tls = hetero_cluster::coordinator::ControlTls::Insecure;
    let (addr, stop, server) = serve_with(config).await;
    let (relay, seen) = recording_relay(addr.clone()).await;
    let mut client = connect(&format!("http://{relay}"), "plain-token-123").await.unwrap();
    client.list_jobs(pb::ListJobsRequest {}).await.unwrap();
    let bytes = seen.lock().unwrap().clone();
    // (HPACK compresses the header that carries the token, but any reader decodes it.)
    assert!(
        bytes.windows(14).any(|w| w == b"PRI * HTTP/2.0"),
        "plaintext HTTP/2 on the wire"
    );
    // A TLS client refuses a plaintext coordinator rather than send it the token.
    assert!(connect(&addr, "plain-token-123").await.is_err());
    let _ = stop.send(true);
    let _ = server.await;
}

#[tokio::test]
async fn a_worker_that_stays_stopped_is_killed_and_named_rather_than_holding_its_job() {
    let dir = tempfile::tempdir().unwrap();
    // The worker says it started, then stops itself as SIGSTOP or a debugger would.
    let stops = script(
        dir.path(),
        "stops.sh",
        "echo \"started\"\nkill -STOP $$\necho \"never\"",
    );
    let cluster = LocalCluster::start_with(|config| {
        config.slots = 1;
        config.worker_program = "/bin/false".into();
        config.stopped_grace = Duration::from_secs(1);
    })
    .await
    .unwrap();
    let mut client = cluster.client().await.unwrap();
    let job = submit(&mut client, custom_spec(&stops, 1)).await;
    let info = wait_for(&mut client, &job, ended).await;
    assert_eq!(info.state, pb::JobState::Failed as i32, "{info:?}");
    assert!(
        info.message.contains("stopped (SIGSTOP or a debugger)"),
        "{}",
        info.message
    );
    let texts = client::log_texts(&mut client, &job).await.unwrap();
    assert!(
        texts.iter().any(|t| t == "started") && !texts.iter().any(|t| t == "never"),
        "{texts:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_node_id_is_taken_back_only_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let (address, stop, handle) = serve(&dir.path().join("coordinator.redb"), "tok").await;
    let mut client = connect(&address, "tok").await.unwrap();
    let register = |id: &str, key: &str, host: &str| pb::RegisterAgentRequest {
        protocol_version: hetero_proto::PROTOCOL_VERSION,
        agent_id: id.into(),
        hostname: host.into(),
        groups: vec![pb::ResourceGroup {
            kind: "cpu".into(),
            devices: 1,
            memory_bytes: 1 << 30,
            worker_slots: 1,
            ..Default::default()
        }],
        agent_key: key.into(),
    };
    // Two agents whose folders kept ids from an earlier coordinator: the first is
    // given node-1 afresh, the second remembered node-1 too but not its new key.
    let a = client
        .register_agent(register("node-7", "old", "a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.agent_id, "node-1");
    assert_eq!(a.agent_key.len(), 32);
    let b = client
        .register_agent(register("node-1", "old", "b"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.agent_id, "node-2", "the second agent must not take the first's node");
    // The first comes back with its key and is the same node.
    let again = client
        .register_agent(register("node-1", &a.agent_key, "a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.agent_id, "node-1");
    let nodes = nodes(&mut client).await;
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    stop.send(true).unwrap();
    handle.await.unwrap();
}

/// A certificate authority and a coordinator certificate it signs for 127.0.0.1 and
/// localhost, as an operator's own PKI would give: (CA PEM, chain PEM, key PEM).
fn operator_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (
        ca_cert.pem(),
        format!("{}{}", cert.pem(), ca_cert.pem()),
        key.serialize_pem(),
    )
}

#[tokio::test]
async fn an_operators_own_certificate_is_trusted_through_their_authority_alone() {
    use hetero_cluster::coordinator::ControlTls;
    use hetero_proto::client::{Trust, connect_trusting};
    let dir = tempfile::tempdir().unwrap();
    let (ca, chain, key) = operator_pki();
    let mut config = CoordinatorConfig::new(dir.path().join("c.redb"), "tok");
    config.tls = ControlTls::Operator {
        cert_pem: chain,
        key_pem: key,
    };
    let (address, stop, handle) = serve_with(config).await;

    // Trusting the operator's authority, for the address dialled: calls go through.
    let mut client = connect_trusting(&address, "tok", &Trust::Authority(ca)).await.unwrap();
    client.list_jobs(pb::ListJobsRequest {}).await.unwrap();
    // The token's authority did not sign it: refused before anything is sent.
    let err = connect_trusting(&address, "tok", &Trust::Token)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("certificate"), "{err}");
    // Nor did another authority.
    let (other, _, _) = operator_pki();
    let err = connect_trusting(&address, "tok", &Trust::Authority(other))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("HETERO_TLS_CA"), "{err}");
    stop.send(true).unwrap();
    handle.await.unwrap();
}
