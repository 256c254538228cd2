//! `hetero bench`: measured figures, each beside a baseline run in the same process.
//!
//! - `allreduce`: ring allreduce over real loopback TCP, algorithm and bus bandwidth
//!   (nccl-tests definitions: busbw = algbw · 2(n−1)/n);
//! - `train`: one worker's training speed through the whole system (dispatch backend,
//!   gradient flattening, allreduce path) against a plain burn loop of the same model;
//! - `scheduler`: the coordinator under a burst of jobs (see [`crate::bench_scheduler`]).

use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use clap::Subcommand;
use hetero_comm::Ring;
use hetero_data::ImageDataset;
use hetero_data::mnist::Split;
use hetero_models::{Classifier, CnnConfig, MlpConfig};
use hetero_train::image_task::{ImageTask, image_batch};
use hetero_train::{TrainOptions, Trainer};

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Ring allreduce bandwidth over loopback TCP.
    Allreduce {
        /// Worker counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "2,3,4")]
        workers: Vec<usize>,
        /// Largest message, in MiB (sizes go 4 KiB, 16 KiB, … up to it).
        #[arg(long, default_value_t = 64)]
        max_mib: usize,
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
    /// Training speed of one worker through the system versus a plain burn loop.
    Train {
        /// Model: cnn or mlp.
        #[arg(long, default_value = "cnn")]
        model: String,
        /// Timed steps per measurement.
        #[arg(long, default_value_t = 30)]
        steps: usize,
        /// Batch size.
        #[arg(long, default_value_t = 128)]
        batch: usize,
        /// Folder with Fashion-MNIST.
        #[arg(long, default_value = "data/fashion-mnist-subset")]
        data: std::path::PathBuf,
    },
}

/// Runs a benchmark.
pub fn run(command: BenchCommand) -> Result<ExitCode> {
    match command {
        BenchCommand::Allreduce { workers, max_mib } => allreduce(&workers, max_mib)?,
        BenchCommand::Scheduler { jobs, groups } => crate::bench_scheduler::run(jobs, groups)?,
        BenchCommand::Train {
            model,
            steps,
            batch,
            data,
        } => train(&model, steps, batch, &data)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn rings(world: usize) -> Result<Vec<Ring>> {
    hetero_comm::ring::loopback(world, "bench", "bench").context("forming a loopback ring")
}

fn allreduce(worker_counts: &[usize], max_mib: usize) -> Result<()> {
    println!("ring allreduce over loopback TCP (each worker a thread with its own sockets)");
    println!(
        "{:>8} {:>10} {:>10} {:>12} {:>12}",
        "workers", "size", "time", "algbw GB/s", "busbw GB/s"
    );
    for &world in worker_counts {
        let mut rings = rings(world)?;
        let mut bytes = 4096usize;
        while bytes <= max_mib << 20 {
            let floats = bytes / 4;
            // Enough iterations for ~0.5 s of work, at least 3.
            let iters = ((256usize << 20) / bytes).clamp(3, 200);
            let times: Vec<Duration> = thread::scope(|s| {
                let handles: Vec<_> = rings
                    .iter_mut()
                    .map(|ring| {
                        s.spawn(move || {
                            let mut buf = vec![1.0f32; floats];
                            ring.allreduce_sum(&mut buf).expect("warm-up");
                            let started = Instant::now();
                            for _ in 0..iters {
                                ring.allreduce_sum(&mut buf).expect("allreduce");
                            }
                            started.elapsed() / iters as u32
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().expect("bench thread")).collect()
            });
            let t = times.into_iter().max().unwrap_or_default().as_secs_f64();
            let algbw = bytes as f64 / t / 1e9;
            let busbw = algbw * 2.0 * (world - 1) as f64 / world as f64;
            println!(
                "{world:>8} {:>10} {:>8.3}ms {algbw:>12.3} {busbw:>12.3}",
                human(bytes),
                t * 1e3
            );
            bytes *= 4;
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

/// Samples per second of a plain burn loop: forward, backward, Adam — nothing else.
fn plain_loop<B: AutodiffBackend, M: AutodiffModule<B> + Classifier<B>>(
    model: M,
    data: &ImageDataset,
    batch: usize,
    steps: usize,
    device: &B::Device,
) -> f64 {
    let mut model = model;
    let mut optim = AdamConfig::new().init::<B, M>();
    let loss_fn = burn::nn::loss::CrossEntropyLossConfig::new().init(device);
    let mut run = |model: M, step: usize| {
        let idx: Vec<usize> = (0..batch).map(|i| (step * batch + i) % data.len()).collect();
        let b = image_batch::<B>(data, &idx, device);
        let loss = loss_fn.forward(model.forward(b.images), b.labels);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        optim.step(1e-3, model, grads)
    };
    for s in 0..3 {
        model = run(model, s);
    }
    let started = Instant::now();
    for s in 0..steps {
        model = run(model, s + 3);
    }
    (steps * batch) as f64 / started.elapsed().as_secs_f64()
}

/// Samples per second of the system's step: dispatch backend, task, gradient
/// flattening and the allreduce path of a one-worker ring.
fn system_loop<M, F>(init: F, data: &ImageDataset, batch: usize, steps: usize) -> Result<f64>
where
    M: AutodiffModule<hetero_worker::SystemBackend> + Classifier<hetero_worker::SystemBackend>,
    F: Fn(&hetero_worker::SystemDevice) -> M + Send + 'static,
{
    let (device, _) = hetero_worker::backend::device(hetero_job::Backend::Auto, 0).map_err(anyhow::Error::msg)?;
    let task = ImageTask::new(data.clone(), data.clone(), init);
    let ring = rings(1)?.pop().expect("one ring");
    let options = TrainOptions::new(1, batch, 1).with_optimizer(hetero_job::Optimizer::Adam, 1e-3);
    let mut trainer = Trainer::new(task, device, ring, options)?;
    let len = data.len();
    let idx = |step: usize| -> Vec<usize> { (0..batch).map(|i| (step * batch + i) % len).collect() };
    for s in 0..3 {
        trainer.step(&idx(s), batch)?;
    }
    let started = Instant::now();
    for s in 0..steps {
        trainer.step(&idx(s + 3), batch)?;
    }
    Ok((steps * batch) as f64 / started.elapsed().as_secs_f64())
}

fn train(model: &str, steps: usize, batch: usize, dir: &std::path::Path) -> Result<()> {
    let data = ImageDataset::load(dir, Split::Train)?;
    type Plain = Autodiff<Flex>;
    let device = Default::default();
    println!(
        "{model}, batch {batch}, {steps} timed steps, {} threads",
        rayon_threads()
    );
    // Alternate the two measurements so drifting machine load hits both alike.
    let (dispatch_device, _) =
        hetero_worker::backend::device(hetero_job::Backend::Auto, 0).map_err(anyhow::Error::msg)?;
    type Dispatch = hetero_worker::SystemBackend;
    let (mut plain, mut plain_dispatch, mut system) = (Vec::new(), Vec::new(), Vec::new());
    macro_rules! measure {
        ($config:expr) => {{
            plain.push(plain_loop::<Plain, _>(
                $config.init(&device),
                &data,
                batch,
                steps,
                &device,
            ));
            plain_dispatch.push(plain_loop::<Dispatch, _>(
                $config.init(&dispatch_device),
                &data,
                batch,
                steps,
                &dispatch_device,
            ));
            system.push(system_loop(|d| $config.init(d), &data, batch, steps)?);
        }};
    }
    for _ in 0..2 {
        match model {
            "cnn" => measure!(CnnConfig::new()),
            "mlp" => measure!(MlpConfig::new()),
            other => anyhow::bail!("unknown model {other:?}; choose cnn or mlp"),
        }
    }
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let (p, d, s) = (best(&plain), best(&plain_dispatch), best(&system));
    println!("{:<40} {:>12} {:>8}", "", "samples/s", "ratio");
    println!("{:<40} {p:>12.0} {:>8.3}", "plain burn loop (Autodiff<Flex>)", 1.0);
    println!("{:<40} {d:>12.0} {:>8.3}", "plain burn loop (Dispatch/flex)", d / p);
    println!("{:<40} {s:>12.0} {:>8.3}", "hetero worker step (Dispatch/flex)", s / p);
    println!("system / plain loop: {:.3}", s / p);
    Ok(())
}

fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into())
}
