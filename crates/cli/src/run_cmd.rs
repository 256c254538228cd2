//! `hetero run SPEC`: one rank of a job whose processes a cluster engine has
//! already placed — `srun`, `mpirun`, a Kubernetes Indexed Job or JobSet, a
//! LeaderWorkerSet — or that a person started on each host with `--rank`.
//!
//! ## Design
//! Every process is one worker. Where it stands comes from the launcher's
//! variables ([`hetero_cluster::launch_env`]), which refuse an environment that is
//! incomplete or contradictory before anything starts.
//!
//! Rank 0 also hosts an embedded coordinator for this job alone: the rendezvous,
//! the logs, the dashboard and the run summary, exactly as under `hetero local`.
//! Every rank, rank 0 included, runs an agent with one slot that registers with
//! it. Once `world` agents have joined, rank 0 submits the spec with
//! `cluster.workers = world` and follows it with the usual progress bars. So the
//! strategies, weighted splits, lost-worker recovery and checkpoints are the
//! ones `hetero local` runs, not a second implementation.
//!
//! The other ranks watch the job's state and exit with its outcome. The engine
//! sees a failed job as failed tasks, and a succeeded job as every task
//! succeeding. Rank 0 keeps its coordinator up until the other ranks have seen
//! the end (their agents fall silent) or [`LINGER`] has passed. Otherwise a rank
//! polling at the wrong moment would see its leader vanish, and report a
//! success as a failure.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use hetero_cluster::agent::{self, AgentConfig};
use hetero_cluster::coordinator::{Coordinator, CoordinatorConfig};
use hetero_cluster::launch_env::{self, Explicit, Launch};
use hetero_job::JobSpec;
use hetero_proto as pb;
use hetero_proto::client::{Client, ClientError, connect};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::{data_cmd, follow, local, server_cmds};

/// The longest rank 0 waits, after the job ended, for the other ranks to see it.
const LINGER: Duration = Duration::from_secs(15);

/// How long a rank's agent may be silent before rank 0 takes it as gone.
const SILENT: Duration = Duration::from_millis(1_500);

/// How long a rank that had reached its leader tolerates losing it.
const LEADER_LOST_AFTER: Duration = Duration::from_secs(30);

/// Turns true when this process is asked to stop (Ctrl-C, SIGTERM).
type Asked = watch::Receiver<bool>;

/// `hetero run`'s options. Each of rank, world and leader may also come from
/// the launcher's own variables; see `docs/deploy.md`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// The job spec (TOML). `cluster.workers` is replaced by the world size.
    pub spec: PathBuf,
    /// This process's rank (default: HETERO_RANK, or from srun, mpirun, Kubernetes or LeaderWorkerSet).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Ranks in the job (default: HETERO_WORLD, or from the launcher).
    #[arg(long)]
    pub world: Option<usize>,
    /// Where rank 0 runs: HOST[:PORT] (default: HETERO_LEADER, or from the launcher).
    #[arg(long)]
    pub leader: Option<String>,
    /// The port rank 0's coordinator listens on, when --leader names none.
    #[arg(long, env = "HETERO_PORT", default_value_t = 29_400)]
    pub port: u16,
    /// Secret every rank shares.
    #[arg(long, env = "HETERO_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Without HETERO_TOKEN: derive the token from the launcher's job id (no
    /// secret: for networks you trust).
    #[arg(long)]
    pub token_from_job_id: bool,
    /// Address other ranks reach this one's worker at (default: this host's
    /// address on the route to the leader).
    #[arg(long, env = "HETERO_DATA_HOST")]
    pub data_host: Option<String>,
    /// burn backend of this rank's worker when the job asks for `auto`.
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// GPUs this rank offers besides its CPU slot: BACKEND:COUNT[:MEMORY_GB]
    /// (e.g. cuda:1 with `srun --gpus-per-task=1`); needs a build with that backend.
    #[arg(long = "gpu", value_name = "BACKEND:COUNT[:GB]")]
    pub gpus: Vec<String>,
    /// This rank reads no dataset from disk: it receives its samples from the others.
    #[arg(long)]
    pub no_local_data: bool,
    /// Rank 0: address of the dashboard and /metrics.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub dashboard: String,
    /// Seconds to wait for every rank to join (and, on other ranks, for the leader).
    #[arg(long, default_value_t = 300)]
    pub rendezvous_timeout: u64,
    /// Folder for this rank's files, kept between runs (each rank uses
    /// `rank-N/` in it; default: a new temporary folder).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// Runs this process's rank of the job; exits with the job's outcome.
pub fn run(args: &RunArgs) -> Result<ExitCode> {
    let explicit = Explicit {
        rank: args.rank,
        world: args.world,
        leader: args.leader.clone(),
    };
    let launch = launch_env::resolve(&|name| std::env::var(name).ok(), &explicit)
        .map_err(|e| anyhow!("hetero run cannot tell where this process stands: {e}"))?;
    let port = launch.leader.port.unwrap_or(args.port);
    let engines: Vec<&str> = launch.engines.iter().map(|e| e.name()).collect();
    println!(
        "hetero run: rank {} of {} ({}); leader {}:{port}",
        launch.rank,
        launch.world,
        engines.join(" + "),
        launch.leader.host
    );
    let text = local::spec_text(&args.spec, Some(launch.world))?;
    let base = JobSpec::folder_of(&args.spec);
    let mut spec = JobSpec::parse(&text).with_context(|| format!("in {}", args.spec.display()))?;
    spec.resolve_paths(&base);
    let backend = hetero_job::Backend::from_name(&args.backend)
        .with_context(|| format!("--backend {:?}: choose {}", args.backend, hetero_job::Backend::names()))?;
    let gpus = args
        .gpus
        .iter()
        .map(|g| server_cmds::parse_gpu(g))
        .collect::<Result<Vec<_>>>()?;
    let token = token(args.token.as_deref(), args.token_from_job_id, &launch, port)?;
    let leader_is_here = launch.rank == 0;
    if leader_is_here && spec.task.is_none() && spec.inference.is_none() && spec.dataset.kind == "fashion-mnist" {
        data_cmd::ensure_fashion_mnist(&spec.dataset.path)?;
    }
    let timeout = Duration::from_secs(args.rendezvous_timeout.max(1));
    // Each rank's own folder, even when every rank is given one --work-dir on a
    // shared file system: an agent's identity file must not be shared.
    let scratch = tempfile::tempdir().context("creating this rank's folder")?;
    let rank_dir = match &args.work_dir {
        Some(dir) => std::path::absolute(dir)?.join(format!("rank-{}", launch.rank)),
        None => scratch.path().to_path_buf(),
    };
    std::fs::create_dir_all(&rank_dir).with_context(|| format!("creating {}", rank_dir.display()))?;
    let leader_address = launch_env::Leader {
        host: launch.leader.host.clone(),
        port: Some(port),
    }
    .to_string();
    let data_host = match &args.data_host {
        Some(h) => h.clone(),
        None => data_host(&launch, port, timeout)?,
    };
    let mut config = AgentConfig::new(
        if leader_is_here {
            format!("127.0.0.1:{port}")
        } else {
            leader_address.clone()
        },
        token.clone(),
        1,
        rank_dir.join("agent"),
        std::env::current_exe()?,
    );
    config.data_host = data_host;
    config.hostname = server_cmds::this_host();
    config.gflops = hetero_worker::backend::measure_gflops(backend);
    config.no_local_data = args.no_local_data;
    config.gpus = gpus;
    if backend != hetero_job::Backend::Auto {
        config.backend = backend.name().into();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // One listener for the whole run: once tokio handles SIGTERM, the default
        // action (exit) no longer happens, so no moment may go unlistened.
        let (asked_tx, asked) = watch::channel(false);
        tokio::spawn(async move {
            terminated().await;
            let _ = asked_tx.send(true);
        });
        let (stop, stop_rx) = watch::channel(false);
        // A store of this run's own: a reused --work-dir never shows the other
        // ranks an earlier run's job.
        let store = tempfile::Builder::new()
            .prefix("coordinator-")
            .tempdir_in(&rank_dir)
            .context("creating the coordinator's folder")?;
        let served = if leader_is_here {
            Some(serve_coordinator(store.path(), &token, port, &args.dashboard, stop_rx.clone()).await?)
        } else {
            None
        };
        let mut agent = tokio::spawn(agent::run(config, stop_rx));
        let work = async {
            if leader_is_here {
                lead(&launch, &token, port, &text, &base, timeout, asked).await
            } else {
                follow_leader(&launch, &leader_address, &token, timeout, asked).await
            }
        };
        // The agent ends only when told to; ending first, it failed (a refused
        // token, another protocol), and waiting on would only time out.
        let outcome = tokio::select! {
            outcome = work => outcome,
            ended = &mut agent => Err(match ended {
                Ok(Err(e)) => anyhow!("rank {}: this rank's agent stopped: {e}", launch.rank),
                _ => anyhow!("rank {}: this rank's agent stopped", launch.rank),
            }),
        };
        let _ = stop.send(true);
        if !agent.is_finished() {
            let _ = agent.await;
        }
        if let Some(server) = served {
            let _ = server.await;
        }
        drop(store);
        drop(scratch);
        Ok(if outcome? { ExitCode::SUCCESS } else { ExitCode::FAILURE })
    })
}

/// The address other ranks reach this rank's worker at: this host's address on
/// the route to the leader. A pod's DNS name appears only once the pod runs, so
/// the leader's name is retried until `timeout`.
fn data_host(launch: &Launch, port: u16, timeout: Duration) -> Result<String> {
    let started = Instant::now();
    let mut said = false;
    let host = &launch.leader.host;
    let ip = loop {
        match route_to(host, port) {
            Ok(ip) => break ip,
            Err(e) if started.elapsed() >= timeout => {
                return Err(e.context(format!(
                    "finding this host's address on the route to the leader {host} for {} s (give --data-host)",
                    timeout.as_secs()
                )));
            }
            Err(e) => {
                if !said {
                    println!(
                        "rank {}: waiting for the leader's name {host} to resolve ({e:#})",
                        launch.rank
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    let loopback = ip.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback());
    let named_loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback());
    if loopback && !named_loopback && launch.world > 1 {
        eprintln!(
            "warning: rank {}: {host} resolves to a loopback address here ({ip}; /etc/hosts often maps this host's \
             own name so), so this rank's worker listens on loopback: ranks on other hosts cannot reach it. \
             If any rank runs elsewhere, give --data-host (HETERO_DATA_HOST) with this host's address.",
            launch.rank
        );
    }
    Ok(ip)
}

/// The token every rank shares: the one given, or with `--token-from-job-id`
/// one derived from the launcher's job id (the same on every rank of this job).
fn token(given: Option<&str>, from_job_id: bool, launch: &Launch, port: u16) -> Result<String> {
    if let Some(t) = given.map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(t.to_string());
    }
    if !from_job_id {
        bail!(
            "no HETERO_TOKEN: set it (or --token) to the same secret on every rank, e.g. \
             `export HETERO_TOKEN=$(openssl rand -hex 16)` before srun or mpirun -x HETERO_TOKEN, or a Secret on \
             Kubernetes. On a network you trust, --token-from-job-id derives one from the launcher's job id."
        )
    }
    let Some(job) = &launch.job else {
        bail!("--token-from-job-id: the launcher gives no job id to derive a token from; set HETERO_TOKEN")
    };
    eprintln!(
        "warning: --token-from-job-id: the token is derived from the launcher's job id ({job}), which is no \
         secret: anyone who can reach port {port} of the leader and knows it can join"
    );
    let digest = Sha256::digest(format!("hetero run token v1\0{job}").as_bytes());
    Ok(hetero_proto::auth::hex(&digest[..16]))
}

/// This host's address on the route to `host:port`: the address the other
/// ranks reach this one at. A UDP socket's connect picks the route and sends
/// nothing.
fn route_to(host: &str, port: u16) -> Result<String> {
    use std::net::{ToSocketAddrs, UdpSocket};
    let target = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to no address"))?;
    let bind = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let socket = UdpSocket::bind(bind)?;
    socket.connect(target)?;
    Ok(socket.local_addr()?.ip().to_string())
}

/// Starts rank 0's coordinator on every interface at `port`, with its dashboard;
/// it serves until `stop` turns true.
async fn serve_coordinator(
    work_dir: &std::path::Path,
    token: &str,
    port: u16,
    dashboard: &str,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<Result<(), hetero_cluster::ClusterError>>> {
    let coordinator = Coordinator::open(CoordinatorConfig::new(work_dir.join("coordinator.redb"), token))?;
    let listener = listen_everywhere(port)
        .with_context(|| format!("rank 0 binding port {port} for the coordinator (another job's port? give --port)"))?;
    let listen = listener.local_addr()?;
    let board = tokio::net::TcpListener::bind(dashboard)
        .await
        .with_context(|| format!("binding the dashboard at {dashboard}"))?;
    println!(
        "rank 0: coordinator on {listen}; dashboard and /metrics on http://{}/ (log in with the job's token)",
        board.local_addr()?
    );
    tokio::spawn(hetero_cluster::dashboard::serve(coordinator.clone(), board, vec![]));
    Ok(tokio::spawn(coordinator.serve(listener, async move {
        let _ = stop.changed().await;
    })))
}

/// A listener on every interface at `port`: one dual-stack socket (IPv6 and
/// IPv4, whatever the system's default), so the leader's name reaches it
/// whichever family it resolves to; IPv4 alone where IPv6 is off.
fn listen_everywhere(port: u16) -> Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let dual = || -> std::io::Result<Socket> {
        let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        socket.set_only_v6(false)?;
        socket.set_reuse_address(true)?;
        socket.bind(&std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
        Ok(socket)
    };
    let socket = match dual() {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => return Err(e.into()),
        Err(_) => {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&std::net::SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)).into())?;
            socket
        }
    };
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(tokio::net::TcpListener::from_std(socket.into())?)
}

/// Rank 0: waits for every rank, submits the job, follows it, then lingers until
/// the other ranks saw the end. `Ok(true)`: the job succeeded.
async fn lead(
    launch: &Launch,
    token: &str,
    port: u16,
    text: &str,
    base: &std::path::Path,
    timeout: Duration,
    mut asked: Asked,
) -> Result<bool> {
    let mut client = connect(&format!("127.0.0.1:{port}"), token).await?;
    rendezvous(&mut client, launch.world, timeout, asked.clone()).await?;
    let job_id = client
        .submit_job(pb::SubmitJobRequest {
            spec_toml: text.to_string(),
            base_dir: base.display().to_string(),
        })
        .await
        .map_err(|s| anyhow!("the coordinator refused the job: {}", s.message()))?
        .into_inner()
        .job_id;
    println!("submitted {job_id} over {} rank(s)", launch.world);
    let info = tokio::select! {
        info = follow::follow_job(&mut client, &job_id, true) => info?,
        _ = asked.wait_for(|a| *a) => {
            eprintln!("rank 0: stopping: cancelling {job_id}");
            let _ = client.cancel_job(pb::CancelJobRequest { job_id: job_id.clone() }).await;
            return Ok(false);
        }
    };
    let ok = follow::print_outcome(&info);
    linger(&mut client).await;
    Ok(ok)
}

/// Waits until `world` agents are alive, showing how many have joined.
async fn rendezvous(client: &mut Client, world: usize, timeout: Duration, mut asked: Asked) -> Result<()> {
    let started = Instant::now();
    let mut shown = usize::MAX;
    loop {
        let nodes = client.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes;
        let joined = nodes.iter().filter(|n| n.status == "alive").count();
        if joined != shown {
            println!("rendezvous: {joined} of {world} rank(s) joined");
            shown = joined;
        }
        if joined >= world {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!(
                "rendezvous: only {joined} of {world} ranks joined within {} s; the others did not start, or \
                 cannot reach this host at the leader address and port (a firewall, a wrong --leader or --port), \
                 or hold another HETERO_TOKEN",
                timeout.as_secs()
            );
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = asked.wait_for(|a| *a) => bail!("stopped during the rendezvous"),
        }
    }
}

/// Keeps rank 0's coordinator up until every other agent has fallen silent, or
/// [`LINGER`] has passed.
async fn linger(client: &mut Client) {
    let until = Instant::now() + LINGER;
    while Instant::now() < until {
        let Ok(nodes) = client.list_nodes(pb::ListNodesRequest {}).await else {
            return;
        };
        let now = hetero_cluster::now_ms();
        let talking = nodes
            .into_inner()
            .nodes
            .iter()
            .filter(|n| now - n.last_heartbeat_unix_ms < SILENT.as_millis() as i64)
            .count();
        // This rank's own agent keeps talking until the end.
        if talking <= 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Another rank: waits for the job rank 0 submits to end; `Ok(true)` when it
/// succeeded.
async fn follow_leader(
    launch: &Launch,
    leader: &str,
    token: &str,
    timeout: Duration,
    mut asked: Asked,
) -> Result<bool> {
    let started = Instant::now();
    let mut client: Option<Client> = None;
    let mut reached: Option<Instant> = None;
    let mut seen_job = String::new();
    loop {
        if client.is_none() {
            match connect(leader, token).await {
                Ok(c) => client = Some(c),
                Err(e @ ClientError::WrongToken { .. }) => {
                    bail!("rank {}: {e}; every rank needs the same HETERO_TOKEN", launch.rank)
                }
                Err(_) => {}
            }
        }
        let answer = match client.as_mut() {
            Some(c) => c.list_jobs(pb::ListJobsRequest {}).await.map(|r| r.into_inner().jobs),
            None => Err(tonic::Status::unavailable("not connected")),
        };
        match answer {
            Ok(jobs) => {
                reached = Some(Instant::now());
                if let Some(job) = jobs.iter().max_by_key(|j| j.submitted_unix_ms) {
                    if seen_job != job.job_id {
                        println!("rank {}: worker of {} ({})", launch.rank, job.job_id, job.name);
                        seen_job = job.job_id.clone();
                    }
                    if is_final(job.state) {
                        let state = hetero_cluster::records::job_state_name(job.state);
                        println!("rank {}: {} {state}: {}", launch.rank, job.job_id, job.message);
                        return Ok(job.state == pb::JobState::Succeeded as i32);
                    }
                }
            }
            Err(status) if status.code() == tonic::Code::Unauthenticated => bail!(
                "rank {}: the leader at {leader} refused this rank's token: every rank needs the same HETERO_TOKEN",
                launch.rank
            ),
            Err(status) => {
                client = None;
                match reached {
                    Some(at) if at.elapsed() > LEADER_LOST_AFTER => bail!(
                        "rank {}: lost the leader at {leader} for {} s before the job ended: {}",
                        launch.rank,
                        LEADER_LOST_AFTER.as_secs(),
                        status.message()
                    ),
                    None if started.elapsed() > timeout => bail!(
                        "rank {}: the leader at {leader} did not answer within {} s (is rank 0 running, and this \
                         address and port reachable from here?): {}",
                        launch.rank,
                        timeout.as_secs(),
                        status.message()
                    ),
                    _ => {}
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = asked.wait_for(|a| *a) => bail!("rank {}: stopped before the job ended", launch.rank),
        }
    }
}

fn is_final(state: i32) -> bool {
    [pb::JobState::Succeeded, pb::JobState::Failed, pb::JobState::Cancelled]
        .iter()
        .any(|s| *s as i32 == state)
}

/// Resolves when this process is asked to stop: Ctrl-C, or SIGTERM, which is
/// what Slurm's `scancel` and Kubernetes send.
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use hetero_cluster::launch_env::{Engine, Leader};

    use super::*;

    fn launch(job: Option<&str>) -> Launch {
        Launch {
            rank: 0,
            world: 2,
            leader: Leader {
                host: "127.0.0.1".into(),
                port: None,
            },
            engines: vec![Engine::Slurm],
            job: job.map(str::to_string),
            read: vec![],
            peers: None,
        }
    }

    #[test]
    fn a_token_is_required_unless_derived_on_request() {
        let e = token(None, false, &launch(Some("slurm:1")), 1).unwrap_err().to_string();
        assert!(
            e.contains("no HETERO_TOKEN") && e.contains("--token-from-job-id"),
            "{e}"
        );
        assert_eq!(token(Some(" s3cret "), false, &launch(None), 1).unwrap(), "s3cret");
        let a = token(None, true, &launch(Some("slurm:1")), 1).unwrap();
        assert_eq!(a, token(None, true, &launch(Some("slurm:1")), 1).unwrap());
        assert_ne!(a, token(None, true, &launch(Some("slurm:2")), 1).unwrap());
        let e = token(None, true, &launch(None), 1).unwrap_err().to_string();
        assert!(e.contains("no job id"), "{e}");
    }

    #[test]
    fn the_route_to_loopback_is_loopback() {
        assert_eq!(route_to("127.0.0.1", 9).unwrap(), "127.0.0.1");
    }
}
