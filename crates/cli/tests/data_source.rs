//! The coordinator as the source of a job's dataset (`--serve-data`): agents
//! on hosts without the files, a job submitted from the coordinator's machine.
//! Real processes, real gRPC on loopback, the committed Fashion-MNIST subset.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `hetero CMD` with the coordinator's folder (where its token is) given.
fn hetero(cmd: &str, state: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hetero"));
    c.env_remove("HETERO_TOKEN")
        .env_remove("HETERO_COORDINATOR")
        .arg(cmd)
        .arg("--data-dir")
        .arg(state);
    c
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A coordinator on a free port serving `served`, and its port.
fn coordinator(state: &Path, served: &Path) -> (Killed, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hetero"))
        .env_remove("HETERO_TOKEN")
        .args(["coordinator", "--listen", "127.0.0.1:0", "--dashboard", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(state)
        .arg("--serve-data")
        .arg(served)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
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
        .expect("the coordinator did not start");
    (killed, port)
}

/// An agent with one slot whose host reads no dataset from disk.
fn agent_without_data(port: u16, state: &Path, work: &Path) -> Killed {
    agent_with(port, state, work, &[])
}

/// [`agent_without_data`] with `extra` options.
fn agent_with(port: u16, state: &Path, work: &Path, extra: &[&str]) -> Killed {
    let child = hetero("agent", state)
        .args(["--coordinator", &format!("127.0.0.1:{port}")])
        .args(["--slots", "1", "--no-local-data"])
        .args(extra)
        .arg("--work-dir")
        .arg(work)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Killed(child)
}

fn submit(port: u16, state: &Path, spec: &Path) -> Output {
    hetero("submit", state)
        .args(["--coordinator", &format!("127.0.0.1:{port}"), "--follow"])
        .arg(spec)
        .output()
        .unwrap()
}

fn spec(dir: &Path, data: &Path) -> std::path::PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"served\"\n[model]\nkind = \"mlp\"\n[dataset]\npath = {data:?}\n\
             [training]\nepochs = 1\nglobal_batch_size = 64\n[cluster]\nworkers = 2\n\
             [output]\ndir = {:?}\n",
            dir.join("runs")
        ),
    )
    .unwrap();
    path
}

/// Two agents that read no data, a job whose dataset is only in a folder the
/// coordinator serves: every worker fetches the files (checked against their
/// SHA-256) and the job trains; the next job takes them from the agents' cache.
#[test]
fn workers_without_the_data_fetch_it_from_the_coordinator_that_serves_it() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served");
    let data = served.join("fashion-mnist-subset");
    std::fs::create_dir_all(&data).unwrap();
    let subset = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist-subset");
    for entry in std::fs::read_dir(&subset).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), data.join(entry.file_name())).unwrap();
    }
    let state = dir.path().join("state");
    let (_coordinator, port) = coordinator(&state, &served);
    let agents: Vec<Killed> = (0..2)
        .map(|i| agent_without_data(port, &state, &dir.path().join(format!("agent-{i}"))))
        .collect();
    let spec = spec(dir.path(), &data);
    let first = submit(port, &state, &spec);
    let t = text(&first);
    assert!(first.status.success(), "{t}");
    assert_eq!(
        t.matches("dataset from the coordinator: 4 file(s), 2.2 MB; 2.2 MB fetched")
            .count(),
        2,
        "{t}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("runs/job-000001/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["workers"], 2, "{summary}");
    assert!(summary["test_accuracy"].as_f64().unwrap() > 0.5, "{summary}");
    // Nothing travelled between the workers: each held every file.
    assert_eq!(summary["moved_samples"], 0, "{summary}");

    let second = submit(port, &state, &spec);
    let t = text(&second);
    assert!(second.status.success(), "{t}");
    assert_eq!(
        t.matches("0.0 MB fetched, 4 file(s) already in").count(),
        2,
        "both workers take the files from their cache: {t}"
    );

    // An agent started again with room for nothing empties its cache first.
    drop(agents);
    let cache = dir.path().join("agent-0/data-cache");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1, "one dataset cached");
    let _again = agent_with(port, &state, &dir.path().join("agent-0"), &["--data-cache-max-gb", "0"]);
    let emptied = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::fs::read_dir(&cache).is_ok_and(|d| d.count() == 0)
    });
    assert!(
        emptied,
        "the cache was not emptied: {:?}",
        std::fs::read_dir(&cache).map(|d| d.count())
    );
}

/// A dataset outside the served folders is not sent: the workers say why, and
/// with nobody holding the files the job fails instead of training on nothing.
#[test]
fn a_dataset_outside_the_served_folders_is_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    let state = dir.path().join("state");
    let (_coordinator, port) = coordinator(&state, &served);
    let _agents: Vec<Killed> = (0..2)
        .map(|i| agent_without_data(port, &state, &dir.path().join(format!("agent-{i}"))))
        .collect();
    let subset = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist-subset");
    let out = submit(port, &state, &spec(dir.path(), &subset.canonicalize().unwrap()));
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("the coordinator does not send this job's dataset")
            && t.contains("not inside a folder the coordinator serves"),
        "{t}"
    );
}

/// A text corpus cannot travel between workers, but it can come from the
/// coordinator: two agents that read no data train the transformer on it.
#[test]
fn a_text_corpus_comes_from_the_coordinator_too() {
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served");
    let corpus = served.join("shakespeare");
    std::fs::create_dir_all(&corpus).unwrap();
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/shakespeare-subset");
    for entry in std::fs::read_dir(&committed).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), corpus.join(entry.file_name())).unwrap();
    }
    let state = dir.path().join("state");
    let (_coordinator, port) = coordinator(&state, &served);
    let _agents: Vec<Killed> = (0..2)
        .map(|i| agent_without_data(port, &state, &dir.path().join(format!("agent-{i}"))))
        .collect();
    let spec = dir.path().join("bard.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"bard\"\n[model]\nkind = \"transformer\"\n[dataset]\nkind = \"text\"\npath = {corpus:?}\n\
             tokenizer = \"char\"\ncontext = 32\ntrain_limit = 200\ntest_limit = 40\n[training]\nepochs = 1\n\
             global_batch_size = 16\nlearning_rate = 0.003\n[cluster]\nworkers = 2\n[output]\ndir = {:?}\n",
            dir.path().join("runs")
        ),
    )
    .unwrap();
    let out = submit(port, &state, &spec);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("dataset from the coordinator"), "{t}");
    assert!(dir.path().join("runs/job-000001/summary.json").exists(), "{t}");
}
