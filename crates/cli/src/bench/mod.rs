//! `hetero bench`: measured figures, each beside a baseline run in the same process.
//!
//! - `allreduce`: ring allreduce over real loopback TCP, algorithm and bus bandwidth
//!   (nccl-tests definitions: busbw = algbw · 2(n−1)/n);
//! - `train`: one worker's training speed per model and backend against a plain burn
//!   loop (see [`crate::bench::train`]);
//! - `scheduler`: the coordinator under a burst of jobs (see [`crate::bench::scheduler`]);
//! - `hetero`: unlike devices in one job, weighted versus even split (see
//!   [`crate::bench::hetero`]);
//! - `infer`: a model's inference against llama.cpp, and placements against each
//!   other (see [`crate::bench::infer`]).

pub mod hetero;
pub mod infer;
pub mod scheduler;
pub mod train;

use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Subcommand;
use hetero_comm::Ring;
use hetero_job::Backend;

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Ring allreduce bandwidth: threads over loopback TCP, or (with `--peers`) one
    /// process per rank, e.g. one per host of the weak-link test bed.
    Allreduce {
        /// Worker counts to measure (threads in this process).
        #[arg(long, value_delimiter = ',', default_value = "2,3,4")]
        workers: Vec<usize>,
        /// Largest message, in MiB (sizes go 4 KiB, 16 KiB, … up to it).
        #[arg(long, default_value_t = 64)]
        max_mib: usize,
        /// Every rank's data-plane address, in rank order: this process is one rank.
        #[arg(long, value_delimiter = ',')]
        peers: Vec<std::net::SocketAddr>,
        /// This process's rank (with `--peers`).
        #[arg(long, default_value_t = 0)]
        rank: usize,
        /// Smallest message, in KiB.
        #[arg(long, default_value_t = 4)]
        min_kib: usize,
        /// The link rate in Mbit/s, to print bus bandwidth as a fraction of it.
        #[arg(long)]
        link_mbit: Option<f64>,
    },
    /// The coordinator under load: placement decisions/s and heartbeat latency.
    Scheduler {
        /// Jobs to submit.
        #[arg(long, default_value_t = 1000)]
        jobs: usize,
        /// Simulated resource groups (one agent each, 4 slots).
        #[arg(long, default_value_t = 100)]
        groups: usize,
    },
    /// Heterogeneous efficiency: a job on unlike devices versus their solo speeds.
    Hetero {
        /// Speed cap of each device.
        #[arg(long, value_delimiter = ',', default_value = "1,0.5,0.25")]
        speeds: Vec<f32>,
        /// Model: cnn or mlp.
        #[arg(long, default_value = "cnn")]
        model: String,
        /// Training samples per epoch.
        #[arg(long, default_value_t = 2000)]
        train_limit: usize,
        /// Global batch size.
        #[arg(long, default_value_t = 96)]
        batch: usize,
        /// Epochs per run.
        #[arg(long, default_value_t = 3)]
        epochs: usize,
        /// How the workers combine their work: allreduce, local-sgd,
        /// parameter-server or hierarchical (the spec's `training.strategy`).
        #[arg(long, default_value = "allreduce")]
        strategy: String,
        /// Local steps between two averages, with --strategy local-sgd.
        #[arg(long)]
        sync_every: Option<usize>,
        /// How the exchanged floats travel: f32 or bf16 (the spec's
        /// `training.exchange_precision`; allreduce and local-sgd).
        #[arg(long, default_value = "f32")]
        exchange_precision: String,
        /// Times every split is measured, each job with its own solo baselines.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=20))]
        rounds: u16,
        /// Which splits to run: even, weighted, weighted+rebalance (all by default).
        #[arg(long, value_delimiter = ',', default_value = "even,weighted,weighted+rebalance")]
        splits: Vec<String>,
        /// Exchange after computing, not while computing (the spec's
        /// `training.overlap = false`): local SGD averages at once, allreduce sends
        /// all gradients after the whole backward pass.
        #[arg(long)]
        no_overlap: bool,
        /// Leave the devices unpinned: they share all the host's cores (by default
        /// each runs on cores packed for it, as separate machines would).
        #[arg(long)]
        no_pin: bool,
        /// Folder with Fashion-MNIST.
        #[arg(long, default_value = "data/fashion-mnist-subset")]
        data: std::path::PathBuf,
    },
    /// Inference latency and traffic of one model under several placements, in one run
    /// over the same workers (local processes, or the hosts of a --mesh).
    Infer {
        /// Model: bert-base-random, smollm2-random, minilm, smollm2, …
        model: String,
        /// Timed requests (encoders).
        #[arg(long, default_value_t = 20)]
        requests: usize,
        /// Timed decode steps (decoders).
        #[arg(long, default_value_t = 32)]
        tokens: usize,
        /// Sequence length (encoders) or prompt length (decoders).
        #[arg(long, default_value_t = 128)]
        seq: usize,
        #[command(flatten)]
        place: crate::infer_cmd::PlacingArgs,
    },
    /// Training speed of one worker per backend versus a plain burn loop.
    Train {
        /// Model: mlp, cnn or transformer.
        #[arg(long, default_value = "cnn")]
        model: String,
        /// Backends to measure Hetero on (flex, ndarray, and those the build has).
        #[arg(long, value_delimiter = ',', default_value = "flex")]
        backends: Vec<String>,
        /// Timed steps per measurement.
        #[arg(long, default_value_t = 30)]
        steps: usize,
        /// Batch size.
        #[arg(long, default_value_t = 128)]
        batch: usize,
        /// Data folder: Fashion-MNIST, or a text corpus for the transformer (default:
        /// the committed subsets).
        #[arg(long)]
        data: Option<std::path::PathBuf>,
    },
}

/// Runs a benchmark.
pub fn run(command: BenchCommand) -> Result<ExitCode> {
    match command {
        BenchCommand::Allreduce {
            workers,
            max_mib,
            peers,
            rank,
            min_kib,
            link_mbit,
        } => {
            let sizes = Sizes {
                min: min_kib << 10,
                max: max_mib << 20,
                link_mbit,
            };
            if peers.is_empty() {
                allreduce(&workers, &sizes)?
            } else {
                allreduce_between_processes(&peers, rank, &sizes)?
            }
        }
        BenchCommand::Infer {
            model,
            requests,
            tokens,
            seq,
            place,
        } => crate::bench::infer::run(&crate::bench::infer::InferBench {
            model: &model,
            place: &place.placing(seq, tokens)?,
            requests,
            tokens,
            seq,
        })?,
        BenchCommand::Scheduler { jobs, groups } => crate::bench::scheduler::run(jobs, groups)?,
        BenchCommand::Hetero {
            speeds,
            model,
            train_limit,
            batch,
            epochs,
            strategy,
            sync_every,
            exchange_precision,
            rounds,
            splits,
            no_overlap,
            no_pin,
            data,
        } => crate::bench::hetero::run(&crate::bench::hetero::HeteroBench {
            splits: crate::bench::hetero::splits(&splits)?,
            pin: !no_pin,
            overlap: !no_overlap,
            precision: crate::bench::hetero::precision(&exchange_precision)?,
            speeds: &speeds,
            model: &model,
            train_limit,
            global_batch: batch,
            epochs,
            strategy: crate::bench::hetero::strategy(&strategy, sync_every)?,
            rounds: rounds.into(),
            data: &data,
        })?,
        BenchCommand::Train {
            model,
            backends,
            steps,
            batch,
            data,
        } => {
            let backends = backends
                .iter()
                .map(|name| Backend::from_name(name).with_context(|| format!("--backends: unknown backend {name:?}")))
                .collect::<Result<Vec<_>>>()?;
            crate::bench::train::run(&crate::bench::train::TrainBench {
                model: &model,
                backends: &backends,
                steps,
                batch,
                data: data.as_deref(),
            })?
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn rings(world: usize) -> Result<Vec<Ring>> {
    hetero_comm::ring::loopback(world, "bench", "bench").context("forming a loopback ring")
}

/// Message sizes to measure, and the link rate to compare with.
struct Sizes {
    min: usize,
    max: usize,
    link_mbit: Option<f64>,
}

impl Sizes {
    fn each(&self) -> impl Iterator<Item = usize> + '_ {
        std::iter::successors(Some(self.min.max(4)), |b| Some(b * 4)).take_while(|b| *b <= self.max)
    }

    fn header(&self) {
        let link = if self.link_mbit.is_some() { "  busbw/link" } else { "" };
        println!(
            "{:>8} {:>10} {:>10} {:>12} {:>12}{link}",
            "workers", "size", "time", "algbw GB/s", "busbw GB/s"
        );
    }

    fn row(&self, world: usize, bytes: usize, t: f64) {
        let algbw = bytes as f64 / t / 1e9;
        let busbw = algbw * 2.0 * (world - 1) as f64 / world as f64;
        let link = self
            .link_mbit
            .map(|m| format!("  {:>10.3}", busbw * 8e3 / m))
            .unwrap_or_default();
        println!(
            "{world:>8} {:>10} {:>8.3}ms {algbw:>12.3} {busbw:>12.3}{link}",
            human(bytes),
            t * 1e3
        );
    }
}

/// Iterations for about 0.5 s of work on loopback, at least 3.
fn iterations(bytes: usize) -> usize {
    ((256usize << 20) / bytes).clamp(3, 200)
}

/// Mean time of `iters` allreduces of `floats` floats after one warm-up.
fn time_allreduce(ring: &mut Ring, floats: usize, iters: usize) -> Result<Duration> {
    let mut buf = vec![1.0f32; floats];
    ring.allreduce_sum(&mut buf)?;
    let started = Instant::now();
    for _ in 0..iters {
        ring.allreduce_sum(&mut buf)?;
    }
    Ok(started.elapsed() / iters as u32)
}

fn allreduce(worker_counts: &[usize], sizes: &Sizes) -> Result<()> {
    println!("ring allreduce over loopback TCP (each worker a thread with its own sockets)");
    sizes.header();
    for &world in worker_counts {
        let mut rings = rings(world)?;
        for bytes in sizes.each() {
            let iters = iterations(bytes);
            let times: Vec<Duration> = thread::scope(|s| {
                let handles: Vec<_> = rings
                    .iter_mut()
                    .map(|ring| s.spawn(move || time_allreduce(ring, bytes / 4, iters)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("bench thread"))
                    .collect::<Result<_>>()
            })?;
            let t = times.into_iter().max().unwrap_or_default().as_secs_f64();
            sizes.row(world, bytes, t);
        }
    }
    Ok(())
}

/// One rank of a ring of processes (`peers` in rank order); rank 0 prints the
/// slowest rank's time for each size.
fn allreduce_between_processes(peers: &[std::net::SocketAddr], rank: usize, sizes: &Sizes) -> Result<()> {
    let world = peers.len();
    let listener = std::net::TcpListener::bind(peers.get(rank).context("--rank is not in --peers")?)
        .with_context(|| format!("binding {}", peers[rank]))?;
    let token = std::env::var("HETERO_TOKEN").unwrap_or_else(|_| "bench".into());
    let config = hetero_comm::RingConfig::new(rank, world, "bench-allreduce", token);
    let mut ring = Ring::form(config, listener, peers).context("forming the ring")?;
    if rank == 0 {
        println!(
            "ring allreduce between {world} processes: {}",
            peers.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
        );
        sizes.header();
    }
    for bytes in sizes.each() {
        // Fewer rounds for big messages on slow links: at least 3, about 64 MiB moved.
        let iters = ((64usize << 20) / bytes).clamp(3, 200);
        let t = time_allreduce(&mut ring, bytes / 4, iters)?;
        let mut slots = vec![0f32; world];
        slots[rank] = t.as_secs_f32();
        ring.allreduce_sum(&mut slots)?;
        if rank == 0 {
            let slowest = slots.iter().copied().fold(0f32, f32::max) as f64;
            sizes.row(world, bytes, slowest);
        }
    }
    Ok(())
}

fn human(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}
