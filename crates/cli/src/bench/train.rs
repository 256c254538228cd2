//! `hetero bench train`: one worker's training speed, per model and backend, beside a
//! plain burn loop run in the same process.
//!
//! The baseline is what a burn user writes for one machine: `Autodiff<Flex>`, forward,
//! backward and Adam — nothing else. Then, for each backend asked for, the same plain
//! loop through the dispatch backend, and the Hetero worker step (task, gradient
//! flattening, the allreduce path of a one-worker ring, the optimiser). The PyTorch
//! side of the comparison is `benches/vs-pytorch.sh`. Measurements alternate so
//! drifting machine load hits all alike; each row is the best of two rounds.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::backend::{Autodiff, Flex};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use hetero_data::ImageDataset;
use hetero_data::mnist::Split;
use hetero_data::text::{TokenWindows, Tokenizer, read_corpus};
use hetero_job::Backend;
use hetero_models::{CnnConfig, MlpConfig, TinyLmConfig};
use hetero_train::image_task::ImageTask;
use hetero_train::text_task::TextTask;
use hetero_train::{Task, TrainOptions, Trainer};
use hetero_worker::{SystemBackend, SystemDevice};

/// The models `hetero bench train` measures.
pub const MODELS: &str = "mlp, cnn, transformer";

/// What to measure.
pub struct TrainBench<'a> {
    /// mlp, cnn or transformer.
    pub model: &'a str,
    /// Backends to run Hetero's rows on.
    pub backends: &'a [Backend],
    /// Timed steps per measurement.
    pub steps: usize,
    /// Batch size (images, or windows of 64 tokens).
    pub batch: usize,
    /// Data folder (Fashion-MNIST for images, a text corpus for the transformer);
    /// `None` takes the committed subset.
    pub data: Option<&'a Path>,
}

/// Samples per second of a plain burn loop: forward, backward, Adam — nothing else.
fn plain_loop<B: AutodiffBackend, T: Task<B>>(task: &T, batch: usize, steps: usize, device: &B::Device) -> f64 {
    let mut model = task.model(device);
    let mut optim = AdamConfig::new().init::<B, T::Model>();
    let len = task.train_len();
    let mut run = |model: T::Model, step: usize| {
        let idx: Vec<usize> = (0..batch).map(|i| (step * batch + i) % len).collect();
        let loss = task.loss(&model, task.train_batch(&idx, device));
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
fn system_loop<T: Task<SystemBackend>>(task: T, device: SystemDevice, batch: usize, steps: usize) -> Result<f64> {
    let ring = hetero_comm::ring::loopback(1, "bench", "bench")
        .context("forming a one-worker ring")?
        .pop()
        .context("one ring")?;
    let options = TrainOptions::new(1, batch, 1).with_optimizer(hetero_job::Optimizer::Adam, 1e-3);
    let len = task.train_len();
    let mut trainer = Trainer::new(task, device, ring, options)?;
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

/// The rows of the table, measured once.
struct Round {
    baseline: f64,
    /// Per backend: (plain loop through the dispatch backend, Hetero worker step).
    per_backend: Vec<(f64, f64)>,
}

fn images(data: Option<&Path>) -> Result<ImageDataset> {
    let dir = data.unwrap_or(Path::new("data/fashion-mnist-subset"));
    Ok(ImageDataset::load(dir, Split::Train)?)
}

fn text_task(data: Option<&Path>) -> Result<TextTask> {
    let dir = data.unwrap_or(Path::new("data/shakespeare-subset"));
    let text = read_corpus(dir)?;
    let tokenizer = Tokenizer::chars_of(&text);
    let ids = tokenizer.encode(&text)?;
    let windows = TokenWindows { ids, context: 64 };
    let config = TinyLmConfig::new(tokenizer.vocab_size(), 64);
    Ok(TextTask::new(windows.clone(), windows, config))
}

fn measure(bench: &TrainBench, devices: &[SystemDevice]) -> Result<Round> {
    let (batch, steps) = (bench.batch, bench.steps);
    let flex = Default::default();
    type Plain = Autodiff<Flex>;
    macro_rules! image_round {
        ($config:expr) => {{
            let data = images(bench.data)?;
            let baseline = plain_loop(
                &ImageTask::<Plain, _>::new(data.clone(), data.clone(), |d| $config.init(d)),
                batch,
                steps,
                &flex,
            );
            let mut per_backend = Vec::new();
            for device in devices {
                let task = || ImageTask::<SystemBackend, _>::new(data.clone(), data.clone(), |d| $config.init(d));
                let plain = plain_loop(&task(), batch, steps, device);
                per_backend.push((plain, system_loop(task(), device.clone(), batch, steps)?));
            }
            Round { baseline, per_backend }
        }};
    }
    Ok(match bench.model {
        "cnn" => image_round!(CnnConfig::new()),
        "mlp" => image_round!(MlpConfig::new()),
        "transformer" => {
            let baseline = plain_loop::<Plain, _>(&text_task(bench.data)?, batch, steps, &flex);
            let mut per_backend = Vec::new();
            for device in devices {
                let plain = plain_loop::<SystemBackend, _>(&text_task(bench.data)?, batch, steps, device);
                per_backend.push((
                    plain,
                    system_loop(text_task(bench.data)?, device.clone(), batch, steps)?,
                ));
            }
            Round { baseline, per_backend }
        }
        other => anyhow::bail!("unknown model {other:?}; choose one of {MODELS}"),
    })
}

/// Runs the benchmark and prints its table.
pub fn run(bench: &TrainBench) -> Result<()> {
    let devices = bench
        .backends
        .iter()
        .map(|b| hetero_worker::backend::device(*b, 0).map(|(d, _)| d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    println!(
        "{}, batch {}, {} timed steps, {} threads",
        bench.model,
        bench.batch,
        bench.steps,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into())
    );
    let rounds = (0..2).map(|_| measure(bench, &devices)).collect::<Result<Vec<_>>>()?;
    let best = |f: &dyn Fn(&Round) -> f64| rounds.iter().map(f).fold(0.0, f64::max);
    let baseline = best(&|r| r.baseline);

    println!("{:<52} {:>10} {:>8}", "", "samples/s", "ratio");
    let row = |label: String, v: f64| println!("{label:<52} {v:>10.0} {:>8.3}", v / baseline);
    row("plain burn loop, Autodiff<Flex>".into(), baseline);
    for (i, backend) in bench.backends.iter().enumerate() {
        row(
            format!("plain burn loop, dispatch/{}", backend.name()),
            best(&|r| r.per_backend[i].0),
        );
        row(
            format!("hetero worker step, {}", backend.name()),
            best(&|r| r.per_backend[i].1),
        );
    }
    Ok(())
}
