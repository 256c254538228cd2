//! Rank 0 of an inference mesh — the front — and how it meets the other ranks:
//! worker processes it starts on this machine (each binds a loopback port, says
//! which, and learns the others' from its standard input), or `hetero
//! infer-worker`s already running at the `--mesh` addresses. Every rank loads only
//! the blocks its placement gives it. Under `--placement auto` the others start
//! idle; the front profiles the mesh (or reads `--profile`), plans, tries the
//! planner's finalists and sends them the winner ([`crate::auto`]).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use hetero_comm::{Mesh, RingConfig};
use hetero_infer::models::Model;
use hetero_infer::profile::Profile;
use hetero_infer::{Front, Placement};

use crate::InferBackend;
use crate::auto::{decide, profile_for};
use crate::placing::{AUTO, Placing, describe, load_part, parse_mesh, placements_of};

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

/// A front that has met its workers.
pub struct Started {
    /// Rank 0 with its part loaded.
    pub front: Front<InferBackend>,
    /// The worker processes it started (killed when dropped).
    pub children: Children,
    /// The profile `auto` planned on (or `--profile`'s, when given).
    pub profile: Option<Profile>,
    /// The placement `auto` chose.
    pub chosen: Option<Placement>,
    /// The mesh's addresses when its hosts are fixed (`--mesh`).
    pub fixed: Option<Vec<SocketAddr>>,
}

/// Rank 0's front: starts (or meets) the other workers, forms the mesh, loads its
/// own part — under `auto`, the planner's choice, which the others are sent.
pub fn start_front(model_name: &str, model: &Model, place: &Placing) -> Result<Started> {
    // A named placement that does not fit is refused before any worker starts.
    if let Some(p) = placements_of(&model.arch, &place.placement, place.world()?)?.remove(0) {
        crate::memory::fits(model, &p, &place.budget, place.mesh.is_none())
            .with_context(|| format!("placing {model_name} under {}", describe(&p)))?;
    }
    let (mut mesh, children, addrs) = meet(model_name, place)?;
    let workers = mesh.world();
    let fixed = place.mesh.is_some().then_some(addrs.as_slice());
    let fixed_addrs = fixed.map(<[SocketAddr]>::to_vec);
    let (front, profile, chosen) = match placements_of(&model.arch, &place.placement, workers)?.remove(0) {
        None => {
            let (front, p, profile) = decide(mesh, model_name, model, place, fixed)?;
            (front, Some(profile), Some(p))
        }
        Some(p) => {
            let profile = match &place.profile {
                Some(_) => Some(profile_for(&mut mesh, model_name, model, place, fixed)?),
                None => None,
            };
            let worker = load_part(model, &p, 0)?;
            (Front { worker, mesh }, profile, None)
        }
    };
    Ok(Started {
        front,
        children,
        profile,
        chosen,
        fixed: fixed_addrs,
    })
}

/// Profiles the mesh `place` describes (its workers start idle) and stops them.
pub fn profile_only(model_name: &str, model: &Model, place: &Placing) -> Result<Profile> {
    let place = Placing {
        placement: AUTO.into(),
        ..place.clone()
    };
    let (mut mesh, _children, addrs) = meet(model_name, &place)?;
    let fixed = place.mesh.is_some().then_some(addrs.as_slice());
    let profile = profile_for(&mut mesh, model_name, model, &place, fixed)?;
    hetero_infer::protocol::stop_followers(&mut mesh)?;
    Ok(profile)
}

/// Starts (or meets) the other workers and forms the mesh.
fn meet(model_name: &str, place: &Placing) -> Result<(Mesh, Children, Vec<SocketAddr>)> {
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
            let token = place.token.clone().unwrap_or_else(hetero_proto::auth::new_token);
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let mut addrs = vec![listener.local_addr()?];
            let mut children = Children(vec![]);
            let exe = std::env::current_exe()?;
            // The workers share this machine's cores: each process gets its share of
            // threads (unless RAYON_NUM_THREADS says otherwise), or their spinning
            // helpers would take turns with each other's compute.
            let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                (cores / place.workers.max(1)).max(1).to_string()
            });
            if let Ok(n) = threads.parse() {
                hetero_kernels::Pool::init_global(n);
            }
            for rank in 1..place.workers {
                let mut child = Command::new(&exe)
                    .args(["infer-worker", model_name, "--rank", &rank.to_string()])
                    .args(["--placement", &place.placement, "--workers", &place.workers.to_string()])
                    .env("HETERO_TOKEN", &token)
                    .env("RAYON_NUM_THREADS", &threads)
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
    let mesh = form(0, workers, &token, listener, &addrs)?;
    Ok((mesh, children, addrs))
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
