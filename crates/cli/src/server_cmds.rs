//! `hetero coordinator` and `hetero agent`: the long-running roles of a real cluster.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use hetero_cluster::agent::{self, AgentConfig, GpuGroup};
use hetero_cluster::agent_config::AgentFile;
use hetero_cluster::alerts::Webhook;
use hetero_cluster::coordinator::{ControlTls, Coordinator, CoordinatorConfig};
use tokio::sync::watch;

use crate::connection::{Connection, read_token_file};

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

/// Runs the coordinator until Ctrl-C. `alert_webhook`: the URL alerts are POSTed to
/// and a CA file for it; `dashboard`: its address and the host names it answers to
/// besides IP addresses and localhost; `tls`: `--insecure` and the operator's
/// certificate and key files.
pub fn coordinator(
    listen: &str,
    data_dir: &Path,
    token: Option<String>,
    dead_after: u64,
    alert_webhook: (Option<&str>, Option<&Path>),
    dashboard: (&str, Vec<String>),
    tls: (bool, Option<(PathBuf, PathBuf)>),
) -> Result<ExitCode> {
    let (dashboard, dashboard_hosts) = dashboard;
    private_folder(data_dir)?;
    let token_file = data_dir.join("token");
    if token_file.exists() {
        restrict(&token_file, 0o600)?;
    }
    let token = match token.or_else(|| read_token_file(data_dir)) {
        Some(t) => t,
        None => {
            let t = hetero_cluster::new_token();
            write_private(&token_file, t.as_bytes())?;
            t
        }
    };
    let mut config = CoordinatorConfig::new(data_dir.join("coordinator.redb"), &token);
    config.dead_after = std::time::Duration::from_secs(dead_after.max(1));
    config.tls = control_tls(tls.0, tls.1)?;
    let served = config.tls.clone();
    let (webhook, webhook_ca) = alert_webhook;
    config.alert_webhook = webhook
        .map(|url| Webhook::parse_with_ca(url, webhook_ca))
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
            dashboard_hosts,
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
fn parse_gpu(arg: &str) -> Result<GpuGroup> {
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

/// Runs an agent until Ctrl-C.
#[allow(clippy::too_many_arguments)] // one per command-line option
pub fn agent(
    conn: &Connection,
    slots: Option<u32>,
    data_host: &str,
    work_dir: &Path,
    config_file: Option<&Path>,
    speed: Option<f64>,
    backend: &str,
    gpus: &[String],
) -> Result<ExitCode> {
    let gpus = gpus.iter().map(|g| parse_gpu(g)).collect::<Result<Vec<_>>>()?;
    let backend = hetero_job::Backend::from_name(backend)
        .with_context(|| format!("--backend {backend:?}: choose auto, flex or ndarray"))?;
    let token = conn.token()?;
    let file = match config_file {
        Some(path) => AgentFile::load(path).map_err(anyhow::Error::msg)?,
        None => AgentFile::default(),
    };
    let speed = speed.or(file.speed).unwrap_or(1.0);
    if !(speed > 0.0 && speed <= 1.0) {
        bail!("--speed {speed} is not allowed; a speed cap is in (0, 1]");
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let hostname = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "agent".into());
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
    println!(
        "agent: cpu {} slot(s), {gflops:.1} GFLOP/s measured, speed cap {speed}; {} declared device kind(s); coordinator {}",
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
