//! `hetero coordinator` and `hetero agent`: the long-running roles of a real cluster.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use hetero_cluster::agent::{self, AgentConfig, GpuGroup};
use hetero_cluster::agent_config::AgentFile;
use hetero_cluster::alerts::Webhook;
use hetero_cluster::coordinator::{ControlTls, Coordinator, CoordinatorConfig};
use hetero_cluster::cpu_pin::{self, CpuSet};
use tokio::sync::watch;

use crate::connection::{Connection, read_token_file};

/// `hetero coordinator`'s options.
#[derive(clap::Args)]
pub struct CoordinatorArgs {
    /// Address to serve gRPC on.
    #[arg(long, default_value = "0.0.0.0:7070")]
    pub listen: String,
    /// Folder for the store and the token file.
    #[arg(long, default_value = ".hetero")]
    pub data_dir: PathBuf,
    /// Cluster token (default: reuse <data-dir>/token, or create one).
    #[arg(long, env = "HETERO_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Seconds without a heartbeat before a node is declared dead.
    #[arg(long, default_value_t = 10)]
    pub dead_after: u64,
    /// POST every alert as JSON to this https:// (or http://) URL (retried, never blocking).
    #[arg(long)]
    pub alert_webhook: Option<String>,
    /// PEM certificates an https:// webhook may also be signed by (besides the
    /// public web's authorities): a company CA, or the server's own certificate.
    #[arg(long)]
    pub alert_webhook_ca: Option<PathBuf>,
    /// Address of the web dashboard and /metrics (read-only; for holders of the token).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub dashboard: String,
    /// A host name the dashboard answers to besides IP addresses and localhost
    /// (the name in the URL operators open; repeat for several).
    #[arg(long = "dashboard-host")]
    pub dashboard_hosts: Vec<String>,
    /// Serve gRPC in plaintext, the token readable on the path (agents and
    /// clients then give --coordinator http://HOST:PORT). Only on links you trust.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    pub insecure: bool,
    /// Serve this PEM certificate chain (from your own authority) instead of one
    /// the token's authority signs; agents, workers and clients then trust your
    /// authority through HETERO_TLS_CA=FILE. Needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A folder whose jobs' datasets workers on hosts without them may fetch
    /// from this coordinator (checked against their SHA-256); repeatable. Only
    /// datasets inside these folders are ever sent.
    #[arg(long = "serve-data", value_name = "DIR")]
    pub serve_data: Vec<PathBuf>,
}

/// `hetero agent`'s options.
#[derive(clap::Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub conn: Connection,
    /// Workers this machine runs at once (default: its core count, or the CPUs
    /// `--cpus` names).
    #[arg(long)]
    pub slots: Option<u32>,
    /// Address other machines reach this one's workers at.
    #[arg(long, default_value = "127.0.0.1")]
    pub data_host: String,
    /// Folder for workers' files.
    #[arg(long, default_value = ".hetero/agent")]
    pub work_dir: PathBuf,
    /// Configuration file: CPU slots, speed cap, declared devices (see docs/cluster.md).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Speed cap of this agent's CPU in (0, 1]: its workers get that share of their
    /// cores' time (a CPU quota, else a sleep throttle) to emulate a slower device.
    #[arg(long)]
    pub speed: Option<f64>,
    /// burn backend of this agent's CPU workers for jobs that ask for `auto`.
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// GPUs to offer: BACKEND:COUNT[:MEMORY_GB] (e.g. cuda:2:24), repeatable; needs a
    /// build with that backend's feature.
    #[arg(long = "gpu", value_name = "BACKEND:COUNT[:GB]")]
    pub gpus: Vec<String>,
    /// This host's workers of built-in image jobs read no dataset from disk: they
    /// receive their samples from workers that hold them (allreduce and local-sgd
    /// jobs; other jobs read their files as usual).
    #[arg(long)]
    pub no_local_data: bool,
    /// GB the data cache in --work-dir may hold (samples received, datasets
    /// fetched); at start, the folders used least recently are removed until it fits.
    #[arg(long, default_value_t = 20.0)]
    pub data_cache_max_gb: f64,
    /// CPUs this agent's workers run on, in the kernel's list format (`1`, `0-3`,
    /// `0,2`; Linux): emulated devices sharing a host each keep cores of their own.
    /// The agent's speed score is still measured on all the host's cores.
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<String>,
}

/// Creates `dir` if needed and makes it the owner's alone (0700): it holds the
/// token and the store, which name every job, node and log line.
fn private_folder(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    restrict(dir, 0o700)
}

/// Sets `path`'s permission bits to `mode` (Unix; elsewhere nothing to do).
fn restrict(path: &Path, mode: u32) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("making {} private ({mode:04o})", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

/// Writes `bytes` to `path` readable by the owner alone (0600) from its first byte,
/// atomically: a file beside it, then a rename, so no reader ever sees a part.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let part = path.with_extension("part");
    let _ = std::fs::remove_file(&part);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&part)
        .with_context(|| format!("creating {}", part.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", part.display()))?;
    std::fs::rename(&part, path).with_context(|| format!("renaming {} to {}", part.display(), path.display()))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// How the coordinator serves gRPC, from `--insecure` and `--tls-cert`/`--tls-key`
/// (clap keeps them apart): the operator's files are read and checked here, so a
/// wrong one is named before anything starts.
fn control_tls(insecure: bool, files: Option<(PathBuf, PathBuf)>) -> Result<ControlTls> {
    Ok(match (insecure, files) {
        (true, _) => ControlTls::Insecure,
        (false, None) => ControlTls::Token,
        (false, Some((cert, key))) => {
            let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
            let (cert_pem, key_pem) = (read(&cert)?, read(&key)?);
            hetero_proto::tls::operator_server_config(&cert_pem, &key_pem)
                .map_err(|e| anyhow::anyhow!("{e} ({} / {})", cert.display(), key.display()))?;
            ControlTls::Operator { cert_pem, key_pem }
        }
    })
}

/// Runs the coordinator until Ctrl-C.
pub fn coordinator(args: &CoordinatorArgs) -> Result<ExitCode> {
    let data_dir = args.data_dir.as_path();
    let (listen, dashboard) = (args.listen.as_str(), args.dashboard.as_str());
    private_folder(data_dir)?;
    let token_file = data_dir.join("token");
    if token_file.exists() {
        restrict(&token_file, 0o600)?;
    }
    let token = match args.token.clone().or_else(|| read_token_file(data_dir)) {
        Some(t) => t,
        None => {
            let t = hetero_proto::auth::new_token();
            write_private(&token_file, t.as_bytes())?;
            t
        }
    };
    let mut config = CoordinatorConfig::new(data_dir.join("coordinator.redb"), &token);
    config.dead_after = std::time::Duration::from_secs(args.dead_after.max(1));
    config.tls = control_tls(args.insecure, args.tls_cert.clone().zip(args.tls_key.clone()))?;
    for dir in &args.serve_data {
        let real = dir
            .canonicalize()
            .with_context(|| format!("--serve-data {}", dir.display()))?;
        if !real.is_dir() {
            bail!("--serve-data {}: not a folder", dir.display());
        }
        // The store and the token file are never a dataset.
        if let Ok(own) = data_dir.canonicalize()
            && own.starts_with(&real)
        {
            bail!(
                "--serve-data {}: it holds this coordinator's --data-dir ({}), with its token and store",
                dir.display(),
                own.display()
            );
        }
        println!(
            "serving datasets under {} to workers whose hosts lack them",
            real.display()
        );
        config.serve_data.push(real);
    }
    let served = config.tls.clone();
    config.alert_webhook = args
        .alert_webhook
        .as_deref()
        .map(|url| Webhook::parse_with_ca(url, args.alert_webhook_ca.as_deref()))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let coordinator = Coordinator::open(config)?;
    runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        println!("coordinator listening on {}", listener.local_addr()?);
        match served {
            ControlTls::Insecure => eprintln!(
                "warning: --insecure: gRPC in plaintext, the cluster token readable by anyone on the path \
                 (agents and clients: --coordinator http://{})",
                listener.local_addr()?
            ),
            ControlTls::Operator { .. } => println!(
                "gRPC over TLS with your certificate (agents, workers and clients: {}=YOUR-CA.pem)",
                hetero_proto::client::TLS_CA_ENV
            ),
            ControlTls::Token => println!("gRPC over TLS, its authority derived from the cluster token"),
        }
        let board = tokio::net::TcpListener::bind(dashboard)
            .await
            .with_context(|| format!("binding {dashboard}"))?;
        println!("dashboard and /metrics on http://{}/", board.local_addr()?);
        tokio::spawn(hetero_cluster::dashboard::serve(
            coordinator.clone(),
            board,
            args.dashboard_hosts.clone(),
        ));
        // The token itself stays in its file: a terminal's scroll-back, a log
        // collector or a shared screen is no place for a secret.
        if token_file.exists() {
            println!(
                "cluster token in {} (agents and clients: --token or HETERO_TOKEN)",
                token_file.display()
            );
        } else {
            println!("cluster token as given (--token or HETERO_TOKEN)");
        }
        coordinator
            .serve(listener, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// One `--gpu BACKEND:COUNT[:GB]`, checked against the backends this build drives.
pub fn parse_gpu(arg: &str) -> Result<GpuGroup> {
    let parts: Vec<&str> = arg.split(':').collect();
    let usage = || format!("--gpu {arg:?}: expected BACKEND:COUNT[:MEMORY_GB], e.g. cuda:2:24");
    let (name, count) = match parts.as_slice() {
        [b, c] | [b, c, _] => (*b, c.parse::<u32>().ok().filter(|c| *c > 0).with_context(usage)?),
        _ => bail!(usage()),
    };
    let memory_gb = match parts.get(2) {
        Some(m) => m.parse::<f64>().ok().filter(|m| *m > 0.0).with_context(usage)?,
        None => 0.0,
    };
    let backend = hetero_job::Backend::from_name(name)
        .filter(|b| b.is_gpu())
        .with_context(|| format!("--gpu {arg:?}: {name:?} is not a GPU backend (cuda, rocm, vulkan, libtorch-cuda)"))?;
    if !hetero_worker::backend::compiled().contains(&backend) {
        bail!(
            "--gpu {arg:?}: this build does not drive {name}; rebuild with `--features {}`",
            backend.cargo_feature().unwrap_or_default()
        );
    }
    Ok(GpuGroup {
        backend: name.to_string(),
        count,
        memory_gb,
    })
}

/// This machine's name, as agents report it.
pub fn this_host() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "agent".into())
}

/// Runs an agent until Ctrl-C.
pub fn agent(args: &AgentArgs) -> Result<ExitCode> {
    let AgentArgs {
        conn,
        slots,
        data_host,
        work_dir,
        config: config_file,
        speed,
        backend,
        gpus,
        no_local_data,
        data_cache_max_gb,
        cpus,
    } = args;
    if !(data_cache_max_gb.is_finite() && *data_cache_max_gb >= 0.0) {
        bail!("--data-cache-max-gb {data_cache_max_gb}: give a size in GB, 0 or more");
    }
    let gpus = gpus.iter().map(|g| parse_gpu(g)).collect::<Result<Vec<_>>>()?;
    let cpus = cpus
        .as_deref()
        .map(|list| CpuSet::parse(list).and_then(CpuSet::checked))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--cpus: {e}"))?;
    let backend = hetero_job::Backend::from_name(backend)
        .with_context(|| format!("--backend {backend:?}: choose auto, flex or ndarray"))?;
    let token = conn.token()?;
    let file = match config_file.as_deref() {
        Some(path) => AgentFile::load(path).map_err(anyhow::Error::msg)?,
        None => AgentFile::default(),
    };
    let speed = speed.or(file.speed).unwrap_or(1.0);
    if !(speed > 0.0 && speed <= 1.0) {
        bail!("--speed {speed} is not allowed; a speed cap is in (0, 1]");
    }
    // A pinned agent runs one worker per CPU it was given, not per core of the host.
    let cores = cpu_pin::cores(cpus.as_ref());
    let hostname = this_host();
    let gflops = hetero_worker::backend::measure_gflops(backend);
    let mut config = AgentConfig::new(
        conn.coordinator().to_string(),
        token,
        slots.or(file.slots).unwrap_or(cores),
        std::path::absolute(work_dir)?,
        std::env::current_exe()?,
    );
    config.data_host = data_host.to_string();
    config.hostname = hostname;
    config.speed = speed as f32;
    config.gflops = gflops;
    config.declared = file.devices;
    if backend != hetero_job::Backend::Auto {
        config.backend = backend.name().into();
    }
    config.gpus = gpus;
    config.no_local_data = *no_local_data;
    config.data_cache_max = (data_cache_max_gb * 1e9).min(u64::MAX as f64) as u64;
    let pinned = cpus.as_ref().map(|c| format!(" on CPUs {c}")).unwrap_or_default();
    config.cpus = cpus;
    println!(
        "agent: cpu {} slot(s){pinned}, {gflops:.1} GFLOP/s measured, speed cap {speed}; {} declared device kind(s); coordinator {}",
        config.slots,
        config.declared.len(),
        config.coordinator
    );
    runtime()?.block_on(async move {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            let _ = tx.send(true);
        });
        agent::run(config, rx).await?;
        Ok(ExitCode::SUCCESS)
    })
}
