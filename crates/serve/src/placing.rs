//! What a user asks of an inference mesh, before anything starts: how many ranks,
//! which placement (named, a file, or `auto`), the memory budget; and the part
//! of a model one rank loads under a placement.
//!
//! Everything here is data and pure functions: the front ([`crate::front`]), the
//! planner's trials ([`crate::auto`]), the memory check ([`crate::memory`]) and the
//! workers ([`crate::worker`]) all read it, and it reads none of them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use hetero_data::model_fetch::cache_dir;
use hetero_infer::models::{self, Model};
use hetero_infer::plan::Objective;
use hetero_infer::{Arch, Placement, Worker};

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
    /// `auto`'s profile: read when the file exists, else measured and written there.
    pub profile: Option<PathBuf>,
    /// What `auto` plans for: the request (encoders) or prompt (decoders) length…
    pub plan_seq: usize,
    /// …and the decode steps after it (decoders).
    pub plan_tokens: usize,
    /// How many of the planner's finalists `auto` tries on the workers before it
    /// settles ([`crate::auto`]); 0 or 1 takes the prediction alone.
    pub trials: usize,
    /// The key/value cache the run must hold, and what each worker may use:
    /// a named placement that does not fit is refused before anything loads.
    pub budget: Budget,
}

/// The placement name that asks the planner.
pub const AUTO: &str = "auto";

impl Placing {
    /// How many ranks the mesh has: the `--mesh` addresses, else `--workers`.
    pub fn world(&self) -> Result<usize> {
        Ok(match &self.mesh {
            Some(list) => parse_mesh(list)?.len(),
            None => self.workers.max(1),
        })
    }

    /// What `auto` makes fast for `arch`.
    pub fn objective(&self, arch: &Arch) -> Objective {
        match arch.is_encoder() {
            true => Objective::encoder(self.plan_seq),
            false => Objective::decoder(self.plan_seq, self.plan_tokens),
        }
    }
}

/// Opens a model, fetching a known one first, saying what it does.
pub fn open_model(what: &str) -> Result<Model> {
    models::open(what, &cache_dir(), &mut |m| eprintln!("{m}")).with_context(|| format!("opening {what}"))
}

/// The placements `--placement` names (comma-separated), for `workers` workers;
/// `auto` stands for the one the front will choose (and send).
pub fn placements_of(arch: &Arch, names: &str, workers: usize) -> Result<Vec<Option<Placement>>> {
    names
        .split(',')
        .map(|n| match n.trim() {
            AUTO => Ok(None),
            n => placement_of(arch, n, workers).map(Some),
        })
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

/// What a worker loads before the front tells it its part: nothing, unless it
/// is rank 0 of a single placement.
pub fn idle(arch: &Arch, workers: usize) -> Placement {
    Placement::named("single", &arch.layout(), workers).expect("single fits every model")
}

/// How long a host name of `--mesh` may take to resolve. In Kubernetes a pod's
/// name resolves only once the pod runs, and the ranks of one group start in
/// any order.
const RESOLVE_FOR: std::time::Duration = std::time::Duration::from_secs(180);

/// The addresses of a `--mesh` list: `IP:PORT` or `HOST:PORT` entries (host names
/// resolved, waiting up to [`RESOLVE_FOR`] in all for names not yet known).
pub(crate) fn parse_mesh(list: &str) -> Result<Vec<SocketAddr>> {
    const MAX_RANKS: usize = 4096;
    let entries: Vec<&str> = list.split(',').map(str::trim).collect();
    if entries.len() > MAX_RANKS {
        bail!("--mesh has {} addresses; at most {MAX_RANKS}", entries.len());
    }
    // One deadline for the whole list, however many names wait.
    let deadline = std::time::Instant::now() + RESOLVE_FOR;
    entries.into_iter().map(|a| resolve_entry(a, deadline)).collect()
}

/// One `--mesh` entry as an address, retrying a name that does not resolve
/// yet until `deadline`.
fn resolve_entry(entry: &str, deadline: std::time::Instant) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = entry.parse() {
        return Ok(addr);
    }
    let (host, port) = entry
        .rsplit_once(':')
        .filter(|(h, _)| !h.is_empty() && h.len() <= 253)
        .with_context(|| format!("{entry:?} in --mesh is not HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("{entry:?} in --mesh: {port:?} is not a port"))?;
    let wait = RESOLVE_FOR.as_secs();
    loop {
        let over = std::time::Instant::now() >= deadline;
        match (host, port).to_socket_addrs() {
            Ok(mut addrs) => {
                if let Some(addr) = addrs.next() {
                    return Ok(addr);
                }
                if over {
                    bail!("{host} in --mesh resolves to no address (the mesh's names were tried for {wait} s)");
                }
            }
            Err(e) if over => {
                bail!("{host} in --mesh does not resolve (the mesh's names were tried for {wait} s): {e}")
            }
            Err(_) => {}
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// What the run must hold beyond its weights, and what a worker may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    /// Sequences whose key/value caches are held at once (the server's batch).
    pub sequences: usize,
    /// Positions each sequence may reach (prompt and generated tokens).
    pub positions: usize,
    /// Bytes each worker may use (`--max-memory`); `None`: what its host has free.
    pub per_worker: Option<u64>,
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

/// `rank`'s part of `model` under `p`: the weights that process needs, no more.
pub fn load_part(model: &Model, p: &Placement, rank: usize) -> Result<Worker<InferBackend>, hetero_infer::InferError> {
    Worker::<InferBackend>::load(
        model.arch.clone(),
        model.weights.as_ref(),
        p.clone(),
        rank,
        &Default::default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_entries_take_addresses_and_host_names() {
        let addrs = parse_mesh("10.0.0.1:47100, localhost:47101").unwrap();
        assert_eq!(addrs[0], "10.0.0.1:47100".parse().unwrap());
        assert_eq!(addrs[1].port(), 47101);
        assert!(addrs[1].ip().is_loopback(), "{:?}", addrs[1]);
        for bad in ["host", ":80", "host:port", "host:70000"] {
            let e = parse_mesh(bad).unwrap_err().to_string();
            assert!(e.contains("--mesh"), "{bad}: {e}");
        }
        let too_many = vec!["127.0.0.1:1"; 4097].join(",");
        assert!(parse_mesh(&too_many).is_err());
    }
}
