//! Rank 0 of an inference mesh — the front — and how it meets the other ranks:
//! worker processes it starts on this machine (each binds a loopback port, says
//! which, and learns the others' from its standard input), or `hetero
//! infer-worker`s already running at the `--mesh` addresses. Every rank loads only
//! the blocks its placement gives it.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hetero_comm::{Mesh, RingConfig};
use hetero_data::model_fetch::cache_dir;
use hetero_infer::models::{self, Model};
use hetero_infer::{Arch, Front, Placement, Worker};

use crate::InferBackend;

/// Where the model runs: how many workers, which placement, which mesh.
#[derive(Debug, Clone, Default)]
pub struct Placing {
    /// single, tensor-parallel, pipeline, or a placement file (docs/inference.md);
    /// benchmarks give several, comma-separated, and switch between them.
    pub placement: String,
    /// Worker processes (rank 0 is this one).
    pub workers: usize,
    /// Comma-separated data-plane addresses of all ranks, rank 0 first, when the
    /// workers run on other hosts (each started with `hetero infer-worker`).
    pub mesh: Option<String>,
    /// Data-plane token every worker must hold (default: a fresh one for local workers).
    pub token: Option<String>,
}

/// Opens a model, fetching a known one first, saying what it does.
pub fn open_model(what: &str) -> Result<Model> {
    models::open(what, &cache_dir(), &mut |m| eprintln!("{m}")).with_context(|| format!("opening {what}"))
}

/// The placements `--placement` names (comma-separated), for `workers` workers.
pub fn placements_of(arch: &Arch, names: &str, workers: usize) -> Result<Vec<Placement>> {
    names
        .split(',')
        .map(|n| placement_of(arch, n.trim(), workers))
        .collect()
}

/// The placement `name` names, for `workers` workers.
pub fn placement_of(arch: &Arch, name: &str, workers: usize) -> Result<Placement> {
    let p = if Path::new(name).is_file() {
        Placement::load(Path::new(name), &arch.layout())?
    } else {
        Placement::named(name, &arch.layout(), workers)?
    };
    if p.workers != workers {
        bail!(
            "the placement uses {} workers but --workers is {workers} (or the mesh has {workers} addresses)",
            p.workers
        );
    }
    Ok(p)
}

pub(crate) fn parse_mesh(list: &str) -> Result<Vec<SocketAddr>> {
    list.split(',')
        .map(|a| {
            a.trim()
                .parse()
                .with_context(|| format!("{a:?} in --mesh is not HOST:PORT"))
        })
        .collect()
}

/// Worker processes started by this one; they are killed when it ends.
pub struct Children(pub(crate) Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Rank 0's front: starts (or meets) the other workers, forms the mesh, loads its
/// own part.
pub fn start_front(model_name: &str, model: &Model, place: &Placing) -> Result<(Front<InferBackend>, Children)> {
    let (workers, addrs, listener, children, token) = match &place.mesh {
        Some(list) => {
            let addrs = parse_mesh(list)?;
            let token = place
                .token
                .clone()
                .context("--mesh needs --token (or HETERO_TOKEN): the workers on other hosts hold it too")?;
            let listener = TcpListener::bind(addrs[0]).with_context(|| format!("binding {}", addrs[0]))?;
            (addrs.len(), addrs, listener, Children(vec![]), token)
        }
        None => {
            let token = place.token.clone().unwrap_or_else(fresh_token);
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let mut addrs = vec![listener.local_addr()?];
            let mut children = Children(vec![]);
            let exe = std::env::current_exe()?;
            for rank in 1..place.workers {
                let mut child = Command::new(&exe)
                    .args(["infer-worker", model_name, "--rank", &rank.to_string()])
                    .args(["--placement", &place.placement, "--workers", &place.workers.to_string()])
                    .env("HETERO_TOKEN", &token)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .context("starting a worker process")?;
                let mut line = String::new();
                BufReader::new(child.stdout.take().expect("piped"))
                    .read_line(&mut line)
                    .context("reading a worker's address")?;
                children.0.push(child);
                let addr = line
                    .trim()
                    .strip_prefix("listening on ")
                    .with_context(|| format!("worker {rank} did not start (it said {line:?})"))?;
                addrs.push(addr.parse()?);
            }
            let list = addrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
            for child in &mut children.0 {
                writeln!(child.stdin.as_mut().expect("piped"), "{list}")?;
            }
            (place.workers, addrs, listener, children, token)
        }
    };
    let placement = placements_of(&model.arch, &place.placement, workers)?.remove(0);
    let mesh = form(0, workers, &token, listener, &addrs)?;
    let worker = Worker::<InferBackend>::load(
        model.arch.clone(),
        model.weights.as_ref(),
        placement,
        0,
        &Default::default(),
    )?;
    Ok((Front { worker, mesh }, children))
}

pub(crate) fn form(
    rank: usize,
    world: usize,
    token: &str,
    listener: TcpListener,
    addrs: &[SocketAddr],
) -> Result<Mesh> {
    let mut config = RingConfig::new(rank, world, "hetero-infer", token);
    // Workers load their weights before they connect: allow for a slow disk.
    config.connect_timeout = Duration::from_secs(600);
    config.io_timeout = Duration::from_secs(3600);
    Mesh::form(config, listener, addrs).context("forming the data-plane mesh")
}

fn fresh_token() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..32).map(|_| format!("{:x}", rng.random_range(0..16u8))).collect()
}

/// One line per stage: blocks, mode and workers.
pub fn describe(p: &Placement) -> String {
    p.stages
        .iter()
        .map(|s| {
            format!(
                "blocks {}..{} {} on {:?}",
                s.layers.start, s.layers.end, s.mode, s.workers
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}
