//! The `hetero` binary as a user runs it: separate processes, real gRPC and TCP on
//! loopback, the committed Fashion-MNIST subset.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn hetero() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hetero"));
    c.env_remove("HETERO_TOKEN").env_remove("HETERO_COORDINATOR");
    c
}

fn subset() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist-subset")
}

fn write_spec(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(&path, body).unwrap();
    path
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The `summary.json` at `path`.
fn summary_at(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn local_cluster_trains_the_cnn_across_three_processes() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(
        dir.path(),
        &format!(
            "name = \"e2e\"\n[model]\nkind = \"cnn\"\n[dataset]\npath = \"{}\"\ntrain_limit = 3000\ntest_limit = 600\n\
             [training]\nepochs = 2\nglobal_batch_size = 48\n[cluster]\nworkers = 3\n[output]\ndir = \"runs\"\n",
            subset().display()
        ),
    );
    let out = hetero().arg("local").arg(&spec).output().unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("epoch 2/2"), "{log}");
    let summary_path = dir.path().join("runs/job-000001/summary.json");
    let summary = summary_at(&summary_path);
    assert_eq!(summary["workers"], 3);
    // Chance is ln(10) ≈ 2.30; the last epoch must be far below it and below the first.
    let first = summary["first_epoch_loss"].as_f64().unwrap();
    let last = summary["last_epoch_loss"].as_f64().unwrap();
    assert!(last < first && last < 0.75, "loss {first} → {last}\n{log}");
    assert!(summary["test_accuracy"].as_f64().unwrap() > 0.7, "{summary}");
    let per_worker = summary["per_worker"].as_array().unwrap();
    assert_eq!(per_worker.len(), 3);
    assert!(per_worker.iter().all(|w| w["samples"] == per_worker[0]["samples"]));
    let curve = summary["loss_curve"].as_array().unwrap();
    assert!(curve.len() > 10);
    let svg = std::fs::read_to_string(dir.path().join("runs/job-000001/loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
}

#[test]
fn bad_spec_names_the_key_and_runs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(dir.path(), "[model]\nkind = \"resnet\"\n[dataset]\npath = \"x\"\n");
    let out = hetero().arg("local").arg(&spec).output().unwrap();
    assert!(!out.status.success());
    let log = text(&out);
    assert!(
        log.contains("`model.kind` = \"resnet\" is not allowed; one of: cnn, mlp, transformer, custom"),
        "{log}"
    );
    assert!(!log.contains("local cluster"), "{log}");
    assert!(!dir.path().join("runs").exists());
}

#[test]
fn truncated_dataset_fails_the_job_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for f in std::fs::read_dir(subset()).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), data.join(f.file_name())).unwrap();
    }
    let images = data.join("train-images-idx3-ubyte.gz");
    let bytes = std::fs::read(&images).unwrap();
    std::fs::write(&images, &bytes[..bytes.len() / 2]).unwrap();
    let spec = write_spec(
        dir.path(),
        &format!(
            "[model]\nkind = \"mlp\"\n[dataset]\npath = \"{}\"\n[cluster]\nworkers = 2\n",
            data.display()
        ),
    );
    let out = hetero().arg("local").arg(&spec).output().unwrap();
    let log = text(&out);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("failed"), "{log}");
    assert!(log.contains("train-images-idx3-ubyte.gz is not a valid IDX"), "{log}");
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `hetero coordinator` on `port` (0: any free one, chosen by the
/// coordinator itself, so parallel tests never race for a port) with `extra`
/// options; returns it and the port it listens on.
fn start_coordinator_with(port: u16, data_dir: &Path, extra: &[&str]) -> (Killed, u16) {
    use std::io::BufRead;
    let mut child = hetero()
        .args([
            "coordinator",
            "--dashboard",
            "127.0.0.1:0",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args(extra)
        .arg("--data-dir")
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Keep draining its output so its later lines never hit a closed pipe.
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("coordinator listening on ") {
                let _ = tx.send(addr.rsplit(':').next().unwrap().parse::<u16>().unwrap());
            }
        }
    });
    let killed = Killed(child);
    let port = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("coordinator did not start");
    (killed, port)
}

/// Starts `hetero agent` with one slot against the coordinator on `port`.
fn start_agent(port: u16, data_dir: &Path, work_dir: &Path) -> Killed {
    let child = client("agent", port, data_dir)
        .args(["--slots", "1", "--work-dir"])
        .arg(work_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Killed(child)
}

fn start_coordinator(port: u16, data_dir: &Path) -> (Killed, u16) {
    start_coordinator_with(port, data_dir, &[])
}

fn client(cmd: &str, port: u16, data_dir: &Path) -> Command {
    let mut c = hetero();
    c.arg(cmd)
        .arg("--coordinator")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(data_dir);
    c
}

#[cfg(unix)]
#[test]
fn a_coordinator_keeps_its_folder_private_and_its_token_off_the_terminal() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut child = hetero()
        .env_remove("HETERO_TOKEN")
        .args([
            "coordinator",
            "--dashboard",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&state)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _coordinator = Killed(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut printed = Vec::new();
    while !printed.last().is_some_and(|l: &String| l.starts_with("cluster token")) {
        printed.push(
            rx.recv_timeout(Duration::from_secs(20))
                .expect("the coordinator did not start"),
        );
    }
    let printed = printed.join("\n");
    let token = std::fs::read_to_string(state.join("token")).unwrap();
    assert!(!printed.contains(token.trim()), "the token was printed:\n{printed}");
    assert!(
        printed.contains(&state.join("token").display().to_string()),
        "{printed}"
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700, "the data folder");
    assert_eq!(mode(&state.join("token")), 0o600, "the token");
    assert_eq!(mode(&state.join("coordinator.redb")), 0o600, "the store");
}

#[cfg(unix)]
#[test]
fn a_call_to_a_stalled_coordinator_fails_at_its_deadline_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (coordinator, port) = start_coordinator(0, &state);
    let pid = coordinator.0.id().to_string();
    let signal = |sig: &str| Command::new("kill").args([sig, &pid]).status().unwrap();
    assert!(client("status", port, &state).output().unwrap().status.success());
    signal("-STOP");
    let mut status = client("status", port, &state)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded only so that a regression fails this test instead of hanging the suite.
    let ended = (0..1200).find_map(|_| {
        std::thread::sleep(Duration::from_millis(100));
        status.try_wait().unwrap()
    });
    signal("-CONT");
    let exit = ended.unwrap_or_else(|| {
        let _ = status.kill();
        panic!("a call to a stopped coordinator never ended");
    });
    let out = status.wait_with_output().unwrap();
    assert!(!exit.success());
    let said = text(&out).to_lowercase();
    assert!(
        said.contains("did not answer") || said.contains("timeout") || said.contains("deadline"),
        "{said}"
    );
}

#[test]
fn a_coordinator_killed_and_restarted_still_lists_its_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (coordinator, port) = start_coordinator(0, &state);

    // An agent with one slot registers; a job asking for four workers stays queued.
    let _agent = start_agent(port, &state, &dir.path().join("agent"));
    let spec = write_spec(
        dir.path(),
        &format!(
            "name = \"waits\"\n[dataset]\npath = \"{}\"\n[cluster]\nworkers = 4\n",
            subset().display()
        ),
    );
    let out = client("submit", port, &state).arg(&spec).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let job_id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(job_id, "job-000001");
    let started = Instant::now();
    loop {
        let out = client("nodes", port, &state).output().unwrap();
        if text(&out).contains("node-1") {
            assert!(text(&out).contains("cpu"), "{}", text(&out));
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "agent never registered");
        std::thread::sleep(Duration::from_millis(100));
    }

    drop(coordinator); // SIGKILL: no chance to flush anything
    let (_coordinator, _) = start_coordinator(port, &state);
    let out = client("status", port, &state).output().unwrap();
    let listing = text(&out);
    assert!(out.status.success(), "{listing}");
    assert!(
        listing.contains("job-000001") && listing.contains("waits") && listing.contains("queued"),
        "{listing}"
    );

    // The wrong token is refused by the restarted coordinator too: its certificate
    // comes from the right token, which the client's does not match.
    let out = client("status", port, &state)
        .args(["--token", "wrong"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("a wrong cluster token"), "{}", text(&out));

    let out = client("cancel", port, &state).arg(&job_id).output().unwrap();
    assert!(text(&out).contains("cancelled"), "{}", text(&out));
}

/// Every Rust file opens with a `//!` comment saying why it exists.
#[test]
fn every_source_file_says_what_it_is_for() {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && p.file_name().is_some_and(|n| n != "target") {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    walk(&root.join("crates"), &mut files);
    walk(&root.join("examples"), &mut files);
    let missing: Vec<_> = files
        .iter()
        .filter(|f| !std::fs::read_to_string(f).unwrap().trim_start().starts_with("//!"))
        .collect();
    assert!(missing.is_empty(), "files without a //! header: {missing:?}");
}

/// A tiny HTTP server that records every request body it is sent.
fn webhook_server() -> (u16, std::sync::mpsc::Receiver<String>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { break };
            let mut buf = vec![0u8; 65536];
            let mut got = 0;
            // Read until the body announced by Content-Length has arrived.
            loop {
                let n = s.read(&mut buf[got..]).unwrap_or(0);
                got += n;
                let text = String::from_utf8_lossy(&buf[..got]).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if body.len() >= len || n == 0 {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                        let _ = tx.send(body.to_string());
                        break;
                    }
                } else if n == 0 {
                    break;
                }
            }
        }
    });
    (port, rx)
}

#[test]
fn a_killed_agent_fails_its_tasks_and_raises_an_alert_to_the_webhook() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (hook_port, hook) = webhook_server();
    let hook_url = format!("http://127.0.0.1:{hook_port}/alerts");
    let (_coordinator, port) = start_coordinator_with(0, &state, &["--dead-after", "2", "--alert-webhook", &hook_url]);
    let started = Instant::now();
    let mut agent = start_agent(port, &state, &dir.path().join("agent"));
    // The "training program" records its pid so the test can clean it up: killing
    // an agent with SIGKILL leaves its children running, as on a real machine.
    let pid_file = dir.path().join("worker.pid");
    let program = dir.path().join("train.sh");
    std::fs::write(
        &program,
        format!("#!/bin/sh\necho $$ > {}\nexec sleep 120\n", pid_file.display()),
    )
    .unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    let spec = write_spec(
        dir.path(),
        &format!(
            "name = \"victim\"\n[model]\nkind = \"custom\"\n[task]\nprogram = \"{}\"\n[dataset]\npath = \"{}\"\n",
            program.display(),
            subset().display()
        ),
    );
    let out = client("submit", port, &state).arg(&spec).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    while !pid_file.exists() {
        assert!(started.elapsed() < Duration::from_secs(30), "worker never started");
        std::thread::sleep(Duration::from_millis(50));
    }

    agent.0.kill().unwrap(); // SIGKILL
    let _ = agent.0.wait();
    let killed_at = Instant::now();
    let status = loop {
        let out = client("status", port, &state).arg("job-000001").output().unwrap();
        let t = text(&out);
        if t.contains("state      failed") {
            break t;
        }
        assert!(killed_at.elapsed() < Duration::from_secs(20), "job never failed:\n{t}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.contains("node-1 stopped heartbeating"), "{status}");

    let alerts = text(&client("alerts", port, &state).output().unwrap());
    assert!(
        alerts.contains("critical") && alerts.contains("node node-1 is dead"),
        "{alerts}"
    );
    let mut bodies = Vec::new();
    while !bodies.iter().any(|b: &String| b.contains("is dead")) {
        bodies.push(
            hook.recv_timeout(Duration::from_secs(20))
                .expect("the webhook received no dead-node alert"),
        );
    }
    let alert: serde_json::Value = serde_json::from_str(bodies.last().unwrap()).unwrap();
    assert_eq!(alert["severity"], "critical");
    assert_eq!(alert["subject"], "node-1");

    if let Ok(pid) = std::fs::read_to_string(&pid_file) {
        let _ = Command::new("kill").arg("-9").arg(pid.trim()).status();
    }
}

/// Trains a small MLP job on a local cluster with one agent per `--group`; the run's
/// log once it has succeeded, learned and written its summary.
fn train_on_groups(dir: &Path, groups: &[&str]) -> (PathBuf, String) {
    let spec = write_spec(
        dir,
        &format!(
            "name = \"groups\"\n[model]\nkind = \"mlp\"\n[dataset]\npath = \"{}\"\ntrain_limit = 2000\ntest_limit = 400\nsplit = \"weighted\"\n\
             [training]\nepochs = 2\nglobal_batch_size = 40\n[cluster]\nworkers = {}\n[output]\ndir = \"runs\"\n",
            subset().display(),
            groups.len()
        ),
    );
    let mut cmd = hetero();
    cmd.arg("local").arg(&spec);
    for group in groups {
        cmd.args(["--group", group]);
    }
    let out = cmd.output().unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains(&format!("{} agent(s)", groups.len())), "{log}");
    let summary = summary_at(&dir.join("runs/job-000001/summary.json"));
    assert!(summary["last_epoch_loss"].as_f64().unwrap() < summary["first_epoch_loss"].as_f64().unwrap());
    assert!(summary["test_accuracy"].as_f64().unwrap() > 0.6, "{summary}");
    (spec, log)
}

#[test]
fn a_local_cluster_of_unlike_groups_trains_one_job() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, log) = train_on_groups(dir.path(), &["1:flex", "0.5:ndarray"]);
    assert!(
        log.contains("on flex") && log.contains("on ndarray"),
        "both backends must run:\n{log}"
    );
    // The capped worker says how it is slowed: a CPU quota where this machine's
    // cgroups allow one, else its own sleep throttle and why not the quota.
    assert!(
        log.contains("slowed to emulate a slower device by a CPU quota of 0.5 ×")
            || log.contains("slowed to emulate a slower device by the sleep throttle at speed 0.5 (no CPU quota: "),
        "{log}"
    );

    let out = hetero()
        .arg("local")
        .arg(&spec)
        .args(["--group", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("the speed must be a number in (0, 1]"),
        "{}",
        text(&out)
    );
}

/// Three unlike devices (full, half and quarter speed) in one weighted job with the
/// neighbour exchange and rebalancing: the split is set from what the workers
/// measured in the first epoch, each worker trains on as many samples as its share
/// says, the slowest the fewest, and no sample is visited twice in an epoch.
#[test]
fn a_weighted_job_of_three_unlike_workers_follows_their_speeds_and_visits_each_sample_once() {
    let dir = tempfile::tempdir().unwrap();
    let (len, epochs) = (1500u64, 3);
    let spec = write_spec(
        dir.path(),
        &format!(
            "name = \"unlike\"\n[model]\nkind = \"mlp\"\n[dataset]\npath = \"{}\"\ntrain_limit = {len}\ntest_limit = 300\n\
             split = \"weighted\"\nexchange_fraction = 0.2\nrebalance = true\n[training]\nepochs = {epochs}\nglobal_batch_size = 60\n\
             [cluster]\nworkers = 3\nthreads_per_worker = 1\n[output]\ndir = \"runs\"\n",
            subset().display()
        ),
    );
    let out = hetero()
        .arg("local")
        .arg(&spec)
        .args(["--group", "1", "--group", "0.5", "--group", "0.25"])
        .output()
        .unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("split set from the throughput measured in its first steps"),
        "{log}"
    );
    let summary = summary_at(&dir.path().join("runs/job-000001/summary.json"));
    assert_every_sample_once_per_epoch(&summary, len);
    // Each rank's speed, from its own log line saying how it is slowed.
    let speed_of = |rank: usize| -> f64 {
        let prefix = format!("[worker {rank}] ");
        log.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .find_map(|l| {
                let cap = l
                    .split_once("a CPU quota of ")
                    .or_else(|| l.split_once("the sleep throttle at speed "))?
                    .1;
                cap.split([' ', ':']).next()?.parse().ok()
            })
            .unwrap_or(1.0)
    };
    let samples: Vec<u64> = summary["per_worker"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["samples"].as_u64().unwrap())
        .collect();
    let speeds: Vec<f64> = (0..3).map(speed_of).collect();
    let mut by_speed: Vec<usize> = (0..3).collect();
    by_speed.sort_by(|&a, &b| speeds[a].total_cmp(&speeds[b]));
    assert_eq!(
        by_speed.iter().map(|&r| speeds[r]).collect::<Vec<_>>(),
        vec![0.25, 0.5, 1.0],
        "{log}"
    );
    assert!(
        samples[by_speed[0]] < samples[by_speed[2]],
        "the quarter-speed worker trains on fewer samples than the full-speed one: {samples:?}\n{log}"
    );
    // After the first epoch a worker's samples are its share of the epoch.
    let history = summary["history"].as_array().unwrap();
    for (rank, &n) in samples.iter().enumerate() {
        let after_first: f64 = history[1..]
            .iter()
            .map(|h| h["shares"][rank].as_f64().unwrap() * len as f64)
            .sum();
        assert!(
            (n as f64) >= after_first - 3.0 && (n as f64) <= after_first + len as f64,
            "rank {rank}: {n} samples, shares say {after_first:.0} after the first epoch\n{summary}"
        );
    }
}

/// A worker whose host reads no dataset from disk (`--group 1:nodata`, i.e.
/// `hetero agent --no-local-data`) builds its task from what the other worker
/// read and receives its samples — its shard, its part of the test set, and the
/// samples the neighbour exchange passes it each epoch — over the ring.
#[test]
fn a_worker_without_the_dataset_receives_its_samples_from_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let len = 1200u64;
    let spec = write_spec(
        dir.path(),
        &format!(
            "name = \"nodata\"\n[model]\nkind = \"mlp\"\n[dataset]\npath = \"{}\"\ntrain_limit = {len}\ntest_limit = 300\n\
             exchange_fraction = 0.2\n[training]\nepochs = 3\nglobal_batch_size = 40\n\
             [cluster]\nworkers = 2\nthreads_per_worker = 1\n[output]\ndir = \"runs\"\n",
            subset().display()
        ),
    );
    let out = hetero()
        .arg("local")
        .arg(&spec)
        .args(["--group", "1", "--group", "1:nodata"])
        .output()
        .unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("no dataset read here (this agent reads no dataset from disk)")
            && log.contains("this host has no copy of the dataset: the task is built from what rank"),
        "{log}"
    );
    assert!(log.contains("sample(s) sent to workers that lacked them"), "{log}");
    let summary = summary_at(&dir.path().join("runs/job-000001/summary.json"));
    assert_every_sample_once_per_epoch(&summary, len);
    let moved = summary["moved_samples"].as_u64().unwrap();
    // Its half of the training set and of the test set at least, and each
    // epoch's exchange on top.
    assert!(moved >= len / 2 + 150, "{summary}");
    assert!(summary["test_accuracy"].as_f64().unwrap() > 0.6, "{summary}");
}

/// An agent that reads no dataset keeps the images its workers received: the
/// next job on the same data takes them from the host's cache and moves fewer.
#[test]
fn an_agent_without_the_dataset_keeps_what_its_workers_received() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_coordinator, port) = start_coordinator(0, &state);
    let _with = start_agent(port, &state, &dir.path().join("with"));
    let without = client("agent", port, &state)
        .args(["--slots", "1", "--no-local-data", "--work-dir"])
        .arg(dir.path().join("without"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _without = Killed(without);
    let spec = write_spec(
        dir.path(),
        &format!(
            "name = \"cached\"\n[model]\nkind = \"mlp\"\n[dataset]\npath = \"{}\"\ntrain_limit = 800\ntest_limit = 200\n\
             exchange_fraction = 0.2\n[training]\nepochs = 2\nglobal_batch_size = 40\n\
             [cluster]\nworkers = 2\nthreads_per_worker = 1\n[output]\ndir = \"{}\"\n",
            subset().display(),
            dir.path().join("runs").display()
        ),
    );
    let mut moved = Vec::new();
    for job in ["job-000001", "job-000002"] {
        let out = client("submit", port, &state)
            .arg(&spec)
            .arg("--follow")
            .output()
            .unwrap();
        let log = text(&out);
        assert!(out.status.success(), "{log}");
        let summary = summary_at(&dir.path().join(format!("runs/{job}/summary.json")));
        moved.push(summary["moved_samples"].as_u64().unwrap());
        if job == "job-000002" {
            let logs = text(&client("logs", port, &state).arg(job).output().unwrap());
            assert!(logs.contains("image(s) taken from this host's cache"), "{logs}");
        }
    }
    assert!(
        moved[0] >= 500,
        "the first job moves the worker's half and test part: {moved:?}"
    );
    assert!(
        moved[1] < moved[0] / 2,
        "the second takes most from the cache: {moved:?}"
    );
    assert!(dir.path().join("without/data-cache").is_dir());
}

/// PyTorch's kernels and flex's train one job side by side (a build with
/// `--features libtorch`, see docs/libtorch.md).
#[test]
#[cfg(feature = "libtorch")]
fn a_libtorch_worker_and_a_flex_worker_train_one_job() {
    let dir = tempfile::tempdir().unwrap();
    let (_, log) = train_on_groups(dir.path(), &["1:libtorch", "1:flex"]);
    assert!(log.contains("on libtorch") && log.contains("on flex"), "{log}");
}

#[test]
fn a_build_without_libtorch_says_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_spec(
        dir.path(),
        &format!(
            "name = \"torch\"\n[model]\nkind = \"mlp\"\n[dataset]\npath = \"{}\"\ntrain_limit = 200\ntest_limit = 100\n\
             [training]\nepochs = 1\nglobal_batch_size = 20\n[cluster]\nworkers = 1\nbackend = \"libtorch\"\n[output]\ndir = \"runs\"\n",
            subset().display()
        ),
    );
    let out = hetero().arg("local").arg(&spec).output().unwrap();
    let log = text(&out);
    if cfg!(feature = "libtorch") {
        assert!(out.status.success(), "{log}");
        assert!(log.contains("on libtorch"), "{log}");
    } else {
        assert!(!out.status.success(), "{log}");
        assert!(
            log.contains("does not drive libtorch") && log.contains("--features libtorch"),
            "{log}"
        );
    }
}

#[test]
fn gpu_groups_need_a_build_with_their_backend() {
    let dir = tempfile::tempdir().unwrap();
    let run = |gpu: &str| {
        let out = hetero()
            .args([
                "agent",
                "--token",
                "t",
                "--coordinator",
                "127.0.0.1:9",
                "--gpu",
                gpu,
                "--work-dir",
            ])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
        text(&out)
    };
    if !cfg!(feature = "cuda") {
        assert!(run("cuda:2").contains("this build does not drive cuda; rebuild with `--features cuda`"));
    }
    if !cfg!(feature = "libtorch") {
        assert!(
            run("libtorch-cuda:1")
                .contains("this build does not drive libtorch-cuda; rebuild with `--features libtorch`")
        );
    }
    assert!(run("flex:2").contains("not a GPU backend"));
    assert!(run("libtorch:2").contains("not a GPU backend"));
    assert!(run("cuda").contains("expected BACKEND:COUNT[:MEMORY_GB]"));
    assert!(run("cuda:0").contains("expected BACKEND:COUNT[:MEMORY_GB]"));
}

/// The pid of the worker process of `rank` in a job of the coordinator on `port`
/// (found by its environment, as an operator would with `ps e`).
fn worker_pid(port: u16, rank: usize) -> Option<u32> {
    let coordinator = format!("HETERO_COORDINATOR=127.0.0.1:{port}");
    let rank = format!("HETERO_RANK={rank}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let environ = std::fs::read(entry.path().join("environ")).ok()?;
        let vars: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
        let has = |v: &str| vars.contains(&v.as_bytes());
        (has(&coordinator) && has(&rank)).then_some(pid)
    })
}

/// Waits until job-000001's log holds `needle`; returns the log.
fn wait_for_log(port: u16, state: &Path, needle: &str, started: Instant) -> String {
    loop {
        let logs = text(&client("logs", port, state).arg("job-000001").output().unwrap());
        if logs.contains(needle) {
            return logs;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "no {needle:?} in the log:\n{logs}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until job-000001 ends; returns its status.
fn wait_for_end(port: u16, state: &Path, started: Instant) -> String {
    loop {
        let t = text(&client("status", port, state).arg("job-000001").output().unwrap());
        if t.contains("state      succeeded") || t.contains("state      failed") {
            return t;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "job never ended:\n{t}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn kill_9(pid: u32) {
    assert!(
        Command::new("kill")
            .arg("-9")
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success()
    );
}

/// A spec of a 3-worker job on the subset, with `training` lines added.
fn three_worker_spec(dir: &Path, model: &str, training: &str) -> PathBuf {
    write_spec(
        dir,
        &format!(
            "name = \"survivor\"\n[model]\nkind = \"{model}\"\n[dataset]\npath = \"{}\"\ntrain_limit = 3000\ntest_limit = 500\n\
             [training]\nglobal_batch_size = 48\n{training}\n[cluster]\nworkers = 3\nthreads_per_worker = 1\n\
             [output]\ndir = \"{}\"\n",
            subset().display(),
            dir.join("runs").display()
        ),
    )
}

/// A coordinator (with `extra` options), one single-slot agent per worker in
/// `dir`, and job-000001 submitted: three workers of `model` on the subset with
/// `training` lines. Returns the coordinator, its port, its folder and the agents.
fn three_agents_and_a_job(
    dir: &Path,
    extra: &[&str],
    model: &str,
    training: &str,
) -> (Killed, u16, PathBuf, Vec<Killed>) {
    let state = dir.join("state");
    let (coordinator, port) = start_coordinator_with(0, &state, extra);
    let agents = (0..3)
        .map(|i| start_agent(port, &state, &dir.join(format!("agent{i}"))))
        .collect();
    let spec = three_worker_spec(dir, model, training);
    let out = client("submit", port, &state).arg(&spec).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    (coordinator, port, state, agents)
}

/// Every epoch of the run visited each training sample once: none skipped, none
/// twice, whoever was lost or joined (the summary's accounting).
fn assert_every_sample_once_per_epoch(summary: &serde_json::Value, samples: u64) {
    for e in summary["history"].as_array().unwrap() {
        let c = &e["coverage"];
        assert_eq!(
            (c["samples"].as_u64(), c["visited"].as_u64(), c["distinct"].as_u64()),
            (Some(samples), Some(samples), Some(samples)),
            "epoch {}: {c}",
            e["epoch"]
        );
    }
}

#[test]
fn a_worker_killed_mid_epoch_migrates_its_samples_and_the_job_completes() {
    let dir = tempfile::tempdir().unwrap();
    let (_coordinator, port, state, _agents) =
        three_agents_and_a_job(dir.path(), &["--dead-after", "3"], "cnn", "epochs = 3");

    // Wait for the first epoch's end, then kill rank 2 in the middle of the second.
    let started = Instant::now();
    wait_for_log(port, &state, "\"type\":\"epoch\"", started);
    kill_9(worker_pid(port, 2).expect("rank 2's worker process"));

    let status = wait_for_end(port, &state, started);
    let logs = text(&client("logs", port, &state).arg("job-000001").output().unwrap());
    assert!(status.contains("state      succeeded"), "{status}\n{logs}");
    assert!(status.contains("rank 2 lost and migrated"), "{status}");
    assert!(
        status.contains("topology   allreduce: 3 worker(s) in one ring"),
        "the job's real topology: {status}"
    );
    assert!(
        logs.contains("its samples migrate to the 2 surviving worker(s)"),
        "{logs}"
    );
    assert!(logs.contains("\"type\":\"migrated\""), "{logs}");
    let alerts = text(&client("alerts", port, &state).output().unwrap());
    assert!(alerts.contains("worker rank 2") && alerts.contains("lost"), "{alerts}");

    let summary = summary_at(&dir.path().join("runs/job-000001/summary.json"));
    assert_eq!(summary["lost_workers"], serde_json::json!([2]), "{summary}");
    assert_eq!(summary["history"].as_array().unwrap().len(), 3, "{summary}");
    assert_every_sample_once_per_epoch(&summary, 3000);
    assert!(summary["test_accuracy"].as_f64().unwrap() > 0.6, "{summary}");
}

#[test]
fn a_worker_stalled_in_its_own_work_ends_itself_and_only_it_while_its_job_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_coordinator, port) = start_coordinator_with(0, &state, &["--dead-after", "3"]);
    // Two ordinary agents and one whose device is hundreds of times too slow for
    // the job: its first step takes far longer than the job's stall limit, while
    // its two peers can only wait for it on the data plane.
    let mut agents: Vec<Killed> = (0..2)
        .map(|i| start_agent(port, &state, &dir.path().join(format!("agent{i}"))))
        .collect();
    let slow = client("agent", port, &state)
        .args(["--slots", "1", "--speed", "0.002", "--work-dir"])
        .arg(dir.path().join("slow"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    agents.push(Killed(slow));
    let spec = three_worker_spec(dir.path(), "cnn", "epochs = 2\nstall_after_secs = 4");
    let out = client("submit", port, &state).arg(&spec).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));

    let started = Instant::now();
    let status = wait_for_end(port, &state, started);
    let logs = text(&client("logs", port, &state).arg("job-000001").output().unwrap());
    assert!(status.contains("state      succeeded"), "{status}\n{logs}");
    assert!(logs.contains("stalled: no training step finished in"), "{logs}");
    let summary = summary_at(&dir.path().join("runs/job-000001/summary.json"));
    let lost = summary["lost_workers"].as_array().unwrap().clone();
    assert!(!lost.is_empty(), "{summary}");
    assert!(
        lost.iter().all(|r| r == &lost[0]),
        "only the slow worker ended, however long its peers waited for it: {summary}"
    );
    assert_every_sample_once_per_epoch(&summary, 3000);
}

/// The parent of process `pid`.
fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name is in parentheses and may hold spaces: count after it.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split(' ').nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_node_that_comes_back_rejoins_its_job_at_the_next_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let (_coordinator, port, state, mut agents) =
        three_agents_and_a_job(dir.path(), &["--dead-after", "3"], "cnn", "epochs = 6");
    let work = |i: usize| dir.path().join(format!("agent{i}"));

    // After the first epoch, rank 2's whole node goes down: its agent (kill -9, so
    // it cannot stop its worker; the worker notices its agent is gone) ...
    let started = Instant::now();
    wait_for_log(port, &state, "\"type\":\"epoch\"", started);
    let worker = worker_pid(port, 2).expect("rank 2's worker process");
    let agent = parent_of(worker);
    let index = agents.iter().position(|a| a.0.id() == agent).expect("rank 2's agent");
    agents[index].0.kill().unwrap();
    agents[index].0.wait().unwrap();
    let gone = Instant::now();
    while std::path::Path::new(&format!("/proc/{worker}")).exists() {
        assert!(
            gone.elapsed() < Duration::from_secs(10),
            "the orphaned worker lives on: {:?}",
            std::fs::read_to_string(format!("/proc/{worker}/stat"))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // ... and comes back: the same agent, from the same work folder.
    agents[index] = start_agent(port, &state, &work(index));

    wait_for_log(port, &state, "worker rank 2 relaunched", started);
    let status = wait_for_end(port, &state, started);
    let logs = text(&client("logs", port, &state).arg("job-000001").output().unwrap());
    assert!(status.contains("state      succeeded"), "{status}\n{logs}");
    assert!(logs.contains("rejoin the ring after epoch"), "{logs}");
    assert!(logs.contains("\"type\":\"rejoined\""), "{logs}");
    let summary = summary_at(&dir.path().join("runs/job-000001/summary.json"));
    assert_eq!(summary["lost_workers"], serde_json::json!([2]), "{summary}");
    assert_eq!(summary["rejoined_workers"], serde_json::json!([2]), "{summary}");
    assert_eq!(summary["history"].as_array().unwrap().len(), 6, "{summary}");
    assert!(summary["per_worker"][2]["samples"].as_u64().unwrap() > 0, "{summary}");
    assert_every_sample_once_per_epoch(&summary, 3000);
    assert!(summary["test_accuracy"].as_f64().unwrap() > 0.6, "{summary}");
    let nodes = text(&client("nodes", port, &state).output().unwrap());
    assert_eq!(
        nodes.matches("node-").count(),
        3,
        "the agent came back as the same node:\n{nodes}"
    );
}

/// Waits until job-000001's status holds `needle`.
fn wait_for_status(port: u16, state: &Path, needle: &str, started: Instant) {
    loop {
        let t = text(&client("status", port, state).arg("job-000001").output().unwrap());
        if t.contains(needle) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "never {needle:?}:\n{t}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_coordinator_killed_mid_rendezvous_and_mid_training_sees_its_job_through() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, port, state, _agents) = three_agents_and_a_job(dir.path(), &[], "cnn", "epochs = 3");

    // The moment the job is placed its workers start and look for each other: the
    // coordinator dies (kill -9) while they do, and comes back on the same port.
    let started = Instant::now();
    wait_for_status(port, &state, "state      running", started);
    drop(coordinator);
    std::thread::sleep(Duration::from_secs(2));
    let (coordinator, _) = start_coordinator(port, &state);

    // Once more mid-training, after the first epoch (an epoch boundary asks the
    // coordinator who joins; the run's events are held by the agents meanwhile).
    wait_for_log(port, &state, "\"type\":\"epoch\"", started);
    drop(coordinator);
    std::thread::sleep(Duration::from_secs(3));
    let (_coordinator, _) = start_coordinator(port, &state);

    let status = wait_for_end(port, &state, started);
    let logs = text(&client("logs", port, &state).arg("job-000001").output().unwrap());
    assert!(status.contains("state      succeeded"), "{status}\n{logs}");
    assert!(!status.contains("lost"), "no worker was lost:\n{status}");
    let summary = summary_at(&dir.path().join("runs/job-000001/summary.json"));
    assert_eq!(summary["history"].as_array().unwrap().len(), 3, "{summary}");
    assert_eq!(summary["lost_workers"], serde_json::json!([]), "{summary}");
    assert_every_sample_once_per_epoch(&summary, 3000);
    // The coordinator holds the run summary too, though a restart fell mid-run.
    assert!(status.contains("accuracy"), "{status}");
}

#[test]
fn a_checkpoint_that_cannot_be_written_fails_the_job_and_keeps_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let (_coordinator, port, state, _agents) = three_agents_and_a_job(dir.path(), &[], "cnn", "epochs = 4");

    // After the first checkpoint, its next write cannot happen: a folder stands
    // where the new file is written before it replaces the old one.
    let started = Instant::now();
    let checkpoint = dir.path().join("runs/job-000001/checkpoint.bin");
    wait_for_log(port, &state, "\"type\":\"checkpointed\"", started);
    let blocker = dir.path().join("runs/job-000001/checkpoint.bin.partial");
    // (A write in progress holds that name for a moment: try again.)
    while let Err(e) = std::fs::create_dir(&blocker) {
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let kept = std::fs::read(&checkpoint).unwrap();

    let status = wait_for_end(port, &state, started);
    let logs = text(&client("logs", port, &state).arg("job-000001").output().unwrap());
    assert!(status.contains("state      failed"), "{status}\n{logs}");
    assert!(status.contains("cannot write checkpoint"), "{status}");
    assert!(status.contains("nor could any other"), "{status}");
    // No survivor was sent to fail the same way in turn.
    assert!(!logs.contains("samples migrate"), "{logs}");
    // The previous checkpoint is whole, and the job resumes from it.
    let now = std::fs::read(&checkpoint).unwrap();
    assert!(now == kept || now.len() == kept.len(), "the checkpoint changed size");
    std::fs::remove_dir(&blocker).unwrap();
    let out = client("resume", port, &state)
        .args(["job-000001", "--follow"])
        .output()
        .unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let summary = summary_at(&dir.path().join("runs/job-000002/summary.json"));
    assert!(summary["resumed_at_epoch"].as_u64().expect("resumed") >= 1, "{summary}");
    assert_eq!(summary["history"].as_array().unwrap().len(), 4, "{summary}");
}

#[test]
fn a_parameter_server_job_survives_a_killed_worker_as_one_ring() {
    let dir = tempfile::tempdir().unwrap();
    let (_coordinator, port, state, _agents) = three_agents_and_a_job(
        dir.path(),
        &["--dead-after", "3"],
        "mlp",
        "epochs = 3\nstrategy = \"parameter-server\"\nlearning_rate = 0.002",
    );
    let started = Instant::now();
    wait_for_log(port, &state, "\"type\":\"epoch\"", started);
    kill_9(worker_pid(port, 1).expect("rank 1's worker process"));

    let status = wait_for_end(port, &state, started);
    let logs = text(&client("logs", port, &state).arg("job-000001").output().unwrap());
    assert!(status.contains("state      succeeded"), "{status}\n{logs}");
    assert!(logs.contains("go on as one allreduce ring"), "{logs}");
    assert!(logs.contains("\"collapsed\":true"), "{logs}");
    let summary = summary_at(&dir.path().join("runs/job-000001/summary.json"));
    assert_eq!(summary["lost_workers"], serde_json::json!([1]), "{summary}");
    assert_eq!(summary["history"].as_array().unwrap().len(), 3, "{summary}");
    assert!(summary["test_accuracy"].as_f64().unwrap() > 0.6, "{summary}");
}

#[test]
fn an_inference_job_serves_a_model_from_workers_on_two_agents() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_coordinator, port) = start_coordinator(0, &state);
    let _agents: Vec<Killed> = (0..2)
        .map(|i| start_agent(port, &state, &dir.path().join(format!("agent{i}"))))
        .collect();
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let spec = write_spec(
        dir.path(),
        &format!(
            "name = \"embeddings\"\n[inference]\nmodel = \"minilm\"\nplacement = \"tensor-parallel\"\n\
             listen = \"{http}\"\n[cluster]\nworkers = 2\n[output]\ndir = \"{}\"\n",
            dir.path().join("runs").display()
        ),
    );
    let out = client("submit", port, &state).arg(&spec).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let started = Instant::now();
    let logs = wait_for_log(port, &state, "serving minilm on http://", started);
    assert!(
        logs.contains("rank 1 of 2: minilm under blocks 0..6 tensor-parallel on [0, 1]"),
        "{logs}"
    );

    let (status, body) = common::post_json(
        &http.to_string(),
        "/v1/embeddings",
        r#"{"input": ["A man is eating food.", "A man is eating a piece of bread."]}"#,
    );
    assert_eq!(status, 200, "{body}");
    let e = common::embeddings_of(&body);
    let cos = common::cosine(&e[0], &e[1]);
    assert!((cos - 0.755).abs() < 0.01, "{cos}");

    // A service runs until it is cancelled; cancelling ends its workers.
    let out = client("cancel", port, &state).arg("job-000001").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let status = wait_for_end_state(port, &state, "cancelled", started);
    assert!(status.contains("cancelled"), "{status}");
    let gone = Instant::now();
    while std::net::TcpStream::connect(http).is_ok() {
        assert!(gone.elapsed() < Duration::from_secs(30), "the server outlived its job");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until job-000001's state is `state_name`; returns its status.
fn wait_for_end_state(port: u16, state: &Path, state_name: &str, started: Instant) -> String {
    loop {
        let t = text(&client("status", port, state).arg("job-000001").output().unwrap());
        if t.contains(&format!("state      {state_name}")) {
            return t;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "job never became {state_name}:\n{t}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn every_strategy_trains_through_separate_processes() {
    for (strategy, extra) in [
        ("local-sgd", "sync_every = 4"),
        ("parameter-server", ""),
        ("parameter-server", "staleness = 2"),
        ("hierarchical", ""),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let spec = write_spec(
            dir.path(),
            &format!(
                "name = \"{strategy}\"\n[model]\nkind = \"mlp\"\n[dataset]\npath = \"{}\"\ntrain_limit = 1500\ntest_limit = 300\n\
                 [training]\nepochs = 2\nglobal_batch_size = 30\nlearning_rate = 0.002\nstrategy = \"{strategy}\"\n{extra}\n\
                 [cluster]\nworkers = 3\n[output]\ndir = \"runs\"\n",
                subset().display()
            ),
        );
        // Two agents with two slots each for three workers: two workers share a node,
        // so `hierarchical` has a group of two and a group of one.
        let out = hetero()
            .arg("local")
            .arg(&spec)
            .args(["--group", "1", "--group", "1"])
            .output()
            .unwrap();
        let log = text(&out);
        assert!(out.status.success(), "{strategy} {extra}: {log}");
        let summary = summary_at(&dir.path().join("runs/job-000001/summary.json"));
        assert_eq!(summary["strategy"], strategy, "{summary}");
        let (first, last) = (
            summary["first_epoch_loss"].as_f64().unwrap(),
            summary["last_epoch_loss"].as_f64().unwrap(),
        );
        assert!(
            last < first && last < 1.0,
            "{strategy} {extra}: loss {first} → {last}\n{log}"
        );
        assert!(summary["test_accuracy"].as_f64().unwrap() > 0.6, "{summary}");
        if strategy != "local-sgd" {
            assert!(
                log.contains("rank 3 → node-1/cpu"),
                "the parameter server is placed: {log}"
            );
        }
        if strategy == "hierarchical" {
            // The groups really form: each leader logs its group's ranks.
            let mut sizes: Vec<usize> = log
                .lines()
                .filter(|l| l.contains(" reduce together; rank "))
                .filter_map(|l| Some(l.split_once("rank(s) [")?.1.split_once(']')?.0.split(", ").count()))
                .collect();
            sizes.sort();
            assert_eq!(sizes, vec![1, 2], "a group of two and a group of one: {log}");
            assert!(
                log.contains("topology: hierarchical: 2 group(s) reduce inside")
                    && log.contains("topology: group node-1/cpu: rank(s) 0, ")
                    && log.contains("topology: group node-2/cpu: rank(s) "),
                "the job's log shows its topology: {log}"
            );
        }
    }
}

#[test]
fn a_cancelled_job_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_coordinator, port) = start_coordinator(0, &state);
    let _agents: Vec<Killed> = (0..2)
        .map(|i| start_agent(port, &state, &dir.path().join(format!("agent{i}"))))
        .collect();
    let spec = write_spec(
        dir.path(),
        &format!(
            "name = \"long\"\n[model]\nkind = \"cnn\"\n[dataset]\npath = \"{}\"\ntrain_limit = 3000\ntest_limit = 500\n\
             [training]\nepochs = 4\nglobal_batch_size = 48\n[cluster]\nworkers = 2\nthreads_per_worker = 1\n\
             [output]\ndir = \"{}\"\n",
            subset().display(),
            dir.path().join("runs").display()
        ),
    );
    let out = client("submit", port, &state).arg(&spec).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let checkpoint = dir.path().join("runs/job-000001/checkpoint.bin");
    let started = Instant::now();
    while !checkpoint.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint was written"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = client("cancel", port, &state).arg("job-000001").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));

    let out = client("resume", port, &state)
        .args(["job-000001", "--follow"])
        .output()
        .unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("job-000001 resumes as job-000002"), "{log}");
    let summary = summary_at(&dir.path().join("runs/job-000002/summary.json"));
    let at = summary["resumed_at_epoch"].as_u64().expect("resumed") as usize;
    assert!((1..4).contains(&at), "{summary}");
    assert_eq!(summary["history"].as_array().unwrap().len(), 4, "{summary}");
    assert!(summary["test_accuracy"].as_f64().unwrap() > 0.7, "{summary}");

    // A finished job is not resumed, and the user is told why.
    let out = client("resume", port, &state).arg("job-000002").output().unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("only a failed or cancelled job can be resumed"),
        "{}",
        text(&out)
    );
}

/// The committed subset, exported as a user might have it: CSV files, and PNG
/// class folders of 32×32 images.
fn export_subset(dir: &Path, train_n: usize, test_n: usize) {
    use hetero_data::ImageDataset;
    use hetero_data::mnist::Split;
    for (split, n, name) in [(Split::Train, train_n, "train"), (Split::Test, test_n, "test")] {
        let mut d = ImageDataset::load(&subset(), split).unwrap();
        d.truncate(n);
        let header: Vec<String> = (0..784).map(|i| format!("pixel{i}")).collect();
        let mut csv = format!("label,{}\n", header.join(","));
        for i in 0..d.len() {
            let row: Vec<String> = d.image(i).iter().map(|p| p.to_string()).collect();
            csv.push_str(&format!("{},{}\n", d.labels[i], row.join(",")));
            let big = hetero_data::preprocess::resize_image(d.image(i), 28, 28, 32, 32);
            let path = dir.join(format!("folders/{name}/class-{}/{i}.png", d.labels[i]));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            image::GrayImage::from_raw(32, 32, big).unwrap().save(&path).unwrap();
        }
        std::fs::create_dir_all(dir.join("csv")).unwrap();
        std::fs::write(dir.join(format!("csv/{name}.csv")), csv).unwrap();
    }
}

#[test]
fn csv_files_and_image_folders_train_with_preprocessing() {
    let dir = tempfile::tempdir().unwrap();
    export_subset(dir.path(), 1500, 300);
    for (kind, path, preprocess) in [
        (
            "csv",
            "csv",
            "crop_padding = 2\nhorizontal_flip = true\nnoise_std = 0.05",
        ),
        ("image-folder", "folders", "resize = [28, 28]\nnormalize = \"dataset\""),
    ] {
        let spec = write_spec(
            dir.path(),
            &format!(
                "name = \"{kind}\"\n[model]\nkind = \"mlp\"\n[dataset]\nkind = \"{kind}\"\npath = \"{}\"\n\
                 [preprocess]\n{preprocess}\n[training]\nepochs = 2\nglobal_batch_size = 30\n[cluster]\nworkers = 2\n\
                 [output]\ndir = \"runs-{kind}\"\n",
                dir.path().join(path).display()
            ),
        );
        let out = hetero().arg("local").arg(&spec).output().unwrap();
        let log = text(&out);
        assert!(out.status.success(), "{kind}: {log}");
        let summary = summary_at(&dir.path().join(format!("runs-{kind}/job-000001/summary.json")));
        assert!(summary["test_accuracy"].as_f64().unwrap() > 0.6, "{kind}: {summary}");
        assert!(
            summary["last_epoch_loss"].as_f64().unwrap() < summary["first_epoch_loss"].as_f64().unwrap(),
            "{kind}: {summary}"
        );
    }
    // A CSV file with a broken row fails the job and says where.
    std::fs::write(dir.path().join("csv/train.csv"), "label,a\n1,2\n3,x\n").unwrap();
    let spec = write_spec(
        dir.path(),
        &format!(
            "[dataset]\nkind = \"csv\"\npath = \"{}\"\nimage_shape = [1, 1]\n[model]\nkind = \"mlp\"\n[output]\ndir = \"runs-bad\"\n",
            dir.path().join("csv").display()
        ),
    );
    let out = hetero().arg("local").arg(&spec).output().unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("train.csv is not a valid CSV file: line 3, column \"a\": \"x\" is not a number"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_transformer_learns_shakespeare_across_two_workers() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("shakespeare");
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/shakespeare-subset");
    let out = hetero()
        .args(["data", "fetch", "shakespeare", "--from"])
        .arg(&committed)
        .arg("--to")
        .arg(&corpus)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("1 texts"), "{}", text(&out));
    let spec = write_spec(
        dir.path(),
        &format!(
            "name = \"bard\"\n[model]\nkind = \"transformer\"\n[dataset]\nkind = \"text\"\npath = \"{}\"\ntokenizer = \"char\"\n\
             context = 32\ntrain_limit = 400\ntest_limit = 60\n[training]\nepochs = 2\nglobal_batch_size = 16\n\
             learning_rate = 0.003\n[cluster]\nworkers = 2\n[output]\ndir = \"runs\"\n",
            corpus.display()
        ),
    );
    let out = hetero().arg("local").arg(&spec).output().unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let summary = summary_at(&dir.path().join("runs/job-000001/summary.json"));
    let (first, last) = (
        summary["first_epoch_loss"].as_f64().unwrap(),
        summary["last_epoch_loss"].as_f64().unwrap(),
    );
    // Chance over Macbeth's ~70 characters is ln 70 ≈ 4.2.
    assert!(last < first && last < 3.2, "loss {first} → {last}\n{log}");
    assert!(summary["test_accuracy"].as_f64().unwrap() > 0.2, "{summary}");

    // A tokenizer file that is not one fails the job and names the file.
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let bad = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("tokenizer = \"char\"", "tokenizer = \"tokenizer.json\"")
        .replace("runs", "runs-bad");
    std::fs::write(&spec, bad).unwrap();
    let out = hetero().arg("local").arg(&spec).output().unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("tokenizer.json is not a valid Hugging Face tokenizer.json"),
        "{}",
        text(&out)
    );
}
