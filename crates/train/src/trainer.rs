//! Synchronous data-parallel training over a [`Ring`].
//!
//! Every worker starts from rank 0's parameters (broadcast), trains on its own shard
//! (`hetero_data::shard`), and after each backward pass the ring sums the gradients,
//! each pre-multiplied by `local_batch / global_batch`. The sum is then exactly the
//! gradient of the mean loss over the global batch, whatever the split, and every
//! worker applies the same update — so a step on `n` workers equals a step on one
//! machine with the whole batch, and the workers' parameters never drift apart.
//!
//! The batch's mean loss travels in the same allreduce as the gradients (one extra
//! float), so progress reporting costs no extra round trip.

use std::time::{Duration, Instant};

use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use hetero_comm::Ring;
use hetero_data::shard::{self, Split};

use crate::params;
use crate::report::{
    EpochRecord, Event, LOSS_CURVE_POINTS, RunSummary, WorkerFigures, downsample, seconds_to_accuracy,
};
use crate::{Evaluation, Task, TrainError};

/// How to train.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Passes over the training set.
    pub epochs: usize,
    /// Samples per step over all workers.
    pub global_batch: usize,
    /// Seed for initialisation and data order.
    pub seed: u64,
    /// Samples per evaluation batch.
    pub eval_batch: usize,
    /// Name of the backend, for the summary.
    pub backend: String,
    /// Least time between two step events.
    pub event_interval: Duration,
    /// Each worker's share of the work (its compute score); empty: an even split.
    pub weights: Vec<f64>,
    /// Speed cap in (0, 1]: after computing, a worker idles so that its compute takes
    /// `1 / speed` times as long — a documented knob to emulate a slower device.
    pub speed: f64,
}

/// How long to idle after `compute` to run at `speed` of full speed.
pub fn throttle_delay(compute: Duration, speed: f64) -> Duration {
    if speed >= 1.0 || speed <= 0.0 || !speed.is_finite() {
        return Duration::ZERO;
    }
    compute.mul_f64(1.0 / speed - 1.0)
}

impl TrainOptions {
    /// Options with the usual evaluation batch and event rate.
    pub fn new(epochs: usize, global_batch: usize, seed: u64) -> Self {
        TrainOptions {
            epochs,
            global_batch,
            seed,
            eval_batch: 500,
            backend: "flex".into(),
            event_interval: Duration::from_millis(500),
            speed: 1.0,
            weights: vec![],
        }
    }
}

/// One worker's side of a data-parallel run.
pub struct Trainer<'r, B: AutodiffBackend, T: Task<B>> {
    task: T,
    model: Option<T::Model>,
    ring: &'r mut Ring,
    device: B::Device,
    options: TrainOptions,
    samples: u64,
    compute: Duration,
    comm: Duration,
}

impl<'r, B: AutodiffBackend, T: Task<B>> Trainer<'r, B, T> {
    /// Seeds burn, builds the model and adopts rank 0's parameters.
    pub fn new(task: T, device: B::Device, ring: &'r mut Ring, options: TrainOptions) -> Result<Self, TrainError> {
        if options.global_batch < ring.world() {
            return Err(TrainError::Config(format!(
                "global batch {} is smaller than the {} workers",
                options.global_batch,
                ring.world()
            )));
        }
        B::seed(&device, options.seed);
        let mut model = task.model(&device);
        let started = Instant::now();
        // One worker has no one to agree with: its own initial model is the global one.
        if ring.world() > 1 {
            let mut flat = params::flatten(&model);
            ring.broadcast(&mut flat, 0)?;
            model = params::load(model, &flat);
        }
        let comm = started.elapsed();
        Ok(Trainer {
            task,
            model: Some(model),
            ring,
            device,
            options,
            samples: 0,
            compute: Duration::ZERO,
            comm,
        })
    }

    /// The model as it is now.
    pub fn model(&self) -> &T::Model {
        self.model.as_ref().expect("model is present between steps")
    }

    /// All parameters, flattened (identical on every worker).
    pub fn parameters(&self) -> Vec<f32> {
        params::flatten(self.model())
    }

    /// One synchronous step on this worker's samples `indices`; returns the mean
    /// loss of the global batch.
    pub fn step(&mut self, indices: &[usize]) -> Result<f32, TrainError> {
        let started = Instant::now();
        let model = self.model.take().expect("model is present between steps");
        let batch = self.task.train_batch(indices, &self.device);
        let loss = self.task.loss(&model, batch);
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        let local_loss = loss.into_scalar().elem::<f32>();
        let weight = indices.len() as f32 / self.options.global_batch as f32;
        let (mut flat, layout) = params::take_grads::<B, _>(&model, &mut grads, weight);
        flat.push(local_loss * weight);
        std::thread::sleep(throttle_delay(started.elapsed(), self.options.speed));
        let reduce_started = Instant::now();
        let reduced = self.ring.allreduce_sum(&mut flat);
        let comm = reduce_started.elapsed();
        if let Err(e) = reduced {
            self.model = Some(model);
            return Err(e.into());
        }
        let global_loss = flat.pop().expect("loss slot");
        let grads = params::grads_from_flat(&layout, &flat);
        self.model = Some(self.task.apply_gradients(model, grads));
        self.samples += indices.len() as u64;
        self.comm += comm;
        self.compute += started.elapsed() - comm;
        Ok(global_loss)
    }

    /// Evaluates the test set, each worker a balanced part; every worker gets the
    /// totals.
    pub fn evaluate(&mut self) -> Result<Option<Evaluation>, TrainError> {
        let len = self.task.test_len();
        if len == 0 {
            return Ok(None);
        }
        let started = Instant::now();
        let (a, b) = shard::balanced(len, self.ring.world(), self.ring.rank());
        let mut sums = Evaluation::default();
        let step = self.options.eval_batch.max(1);
        for start in (a..b).step_by(step) {
            let indices: Vec<usize> = (start..(start + step).min(b)).collect();
            let batch = self.task.test_batch(&indices, &self.device);
            let e = self.task.evaluate(self.model(), batch);
            sums.loss_sum += e.loss_sum;
            sums.correct += e.correct;
            sums.count += e.count;
        }
        let mut buf = [sums.loss_sum as f32, sums.correct as f32, sums.count as f32];
        let computed = started.elapsed();
        self.ring.allreduce_sum(&mut buf)?;
        self.comm += started.elapsed() - computed;
        self.compute += computed;
        Ok(Some(Evaluation {
            loss_sum: buf[0] as f64,
            correct: buf[1] as f64,
            count: buf[2] as f64,
        }))
    }

    /// Trains for the configured epochs, evaluating after each, reporting through
    /// `on_event`; returns the run's summary (the same on every worker).
    pub fn run(&mut self, on_event: &mut dyn FnMut(Event)) -> Result<RunSummary, TrainError> {
        let (rank, world) = (self.ring.rank(), self.ring.world());
        let o = self.options.clone();
        let len = self.task.train_len();
        let split = if o.weights.len() == world {
            Split::weighted(&o.weights)
        } else {
            Split::even(world)
        };
        let steps = split.steps_per_epoch(len, o.global_batch);
        if steps == 0 {
            return Err(TrainError::Config(format!(
                "{len} training samples cannot fill one global batch of {} over {world} workers",
                o.global_batch
            )));
        }
        let my_shard = split.shard(len, rank, o.seed);
        let local = split.local_batch(o.global_batch, rank);
        let started = Instant::now();
        let mut history = Vec::new();
        let mut last_event = Instant::now() - o.event_interval;
        let (mut window_start, mut window_samples): (Instant, usize);
        let mut last_eval = None;
        let mut losses = Vec::with_capacity(steps * o.epochs);
        for epoch in 0..o.epochs {
            let order = shard::epoch_order(&my_shard, o.seed, epoch, rank);
            let mut loss_sum = 0.0f64;
            // The rate shown is training speed: evaluation time stays out of it.
            (window_start, window_samples) = (Instant::now(), 0);
            for step in 0..steps {
                let loss = self.step(&order[step * local..(step + 1) * local])?;
                if !loss.is_finite() {
                    return Err(TrainError::Task(format!(
                        "loss became {loss} at epoch {epoch}, step {step}; lower training.learning_rate"
                    )));
                }
                loss_sum += loss as f64;
                losses.push(loss);
                window_samples += local;
                if last_event.elapsed() >= o.event_interval || step + 1 == steps {
                    let rate = window_samples as f64 / window_start.elapsed().as_secs_f64().max(1e-9);
                    on_event(Event::Step {
                        epoch,
                        step,
                        steps,
                        loss,
                        samples_per_sec: rate,
                    });
                    last_event = Instant::now();
                    (window_start, window_samples) = (Instant::now(), 0);
                }
            }
            let eval = self.evaluate()?;
            let train_loss = loss_sum / steps as f64;
            let test_accuracy = eval.map(|e| e.correct / e.count.max(1.0));
            let test_loss = eval.map(|e| e.loss_sum / e.count.max(1.0));
            let elapsed_secs = started.elapsed().as_secs_f64();
            on_event(Event::Epoch {
                epoch,
                train_loss,
                test_accuracy,
                test_loss,
                elapsed_secs,
            });
            history.push(EpochRecord {
                epoch,
                train_loss,
                test_accuracy,
                elapsed_secs,
            });
            last_eval = eval;
        }
        let wall = started.elapsed().as_secs_f64();
        let per_worker = self.gather_figures(wall)?;
        let total_samples: u64 = per_worker.iter().map(|w| w.samples).sum();
        Ok(RunSummary {
            workers: world,
            backend: o.backend.clone(),
            epochs: o.epochs,
            global_batch_size: o.global_batch,
            test_accuracy: last_eval.map(|e| e.correct / e.count.max(1.0)),
            test_loss: last_eval.map(|e| e.loss_sum / e.count.max(1.0)),
            first_epoch_loss: history.first().map_or(f64::NAN, |h| h.train_loss),
            last_epoch_loss: history.last().map_or(f64::NAN, |h| h.train_loss),
            samples_per_sec: total_samples as f64 / wall.max(1e-9),
            wall_secs: wall,
            seconds_to_accuracy: seconds_to_accuracy(&history),
            history,
            per_worker,
            loss_curve: downsample(&losses, LOSS_CURVE_POINTS),
        })
    }

    /// Every worker's figures, gathered by an allreduce of per-rank slots.
    fn gather_figures(&mut self, wall: f64) -> Result<Vec<WorkerFigures>, TrainError> {
        let (rank, world) = (self.ring.rank(), self.ring.world());
        let mut slots = vec![0f32; world * 3];
        slots[rank * 3] = self.samples as f32;
        slots[rank * 3 + 1] = self.compute.as_secs_f32();
        slots[rank * 3 + 2] = self.comm.as_secs_f32();
        self.ring.allreduce_sum(&mut slots)?;
        Ok((0..world)
            .map(|r| WorkerFigures {
                rank: r,
                samples: slots[r * 3] as u64,
                compute_secs: slots[r * 3 + 1] as f64,
                comm_secs: slots[r * 3 + 2] as f64,
                samples_per_sec: slots[r * 3] as f64 / wall.max(1e-9),
            })
            .collect())
    }
}

/// Trains `task` on `device` over `ring` and returns the summary.
pub fn train<B: AutodiffBackend, T: Task<B>>(
    task: T,
    device: B::Device,
    ring: &mut Ring,
    options: TrainOptions,
    on_event: &mut dyn FnMut(Event),
) -> Result<RunSummary, TrainError> {
    Trainer::new(task, device, ring, options)?.run(on_event)
}

#[cfg(test)]
mod tests {
    use std::thread;

    use burn::backend::{Autodiff, Flex};
    use hetero_data::ImageDataset;
    use hetero_job::Optimizer;
    use hetero_models::{CnnConfig, MlpConfig};
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::image_task::ImageTask;

    type B = Autodiff<Flex>;

    /// Random but learnable images: pixels `i` with `i % 10 == label` are bright.
    fn synthetic(n: usize, seed: u64) -> ImageDataset {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let labels: Vec<u8> = (0..n).map(|_| rng.random_range(0..10)).collect();
        let pixels = labels
            .iter()
            .flat_map(|&l| (0..784).map(move |i| if i % 10 == l as usize { 160u8 } else { 40 }))
            .map(|p| p.saturating_add(rng.random_range(0..60)))
            .collect();
        ImageDataset {
            pixels,
            labels,
            rows: 28,
            cols: 28,
        }
    }

    fn ring_of(world: usize) -> Vec<Ring> {
        hetero_comm::ring::loopback(world, "t", "k").unwrap()
    }

    /// Every task starts from the same weights: burn's RNG is global, so threads
    /// initialising at once would otherwise draw interleaved numbers.
    fn cnn_task(optimizer: Optimizer) -> ImageTask<B, hetero_models::Cnn<B>> {
        static INITIAL: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
        let initial = INITIAL.get_or_init(|| params::flatten(&CnnConfig::new().init::<B>(&Default::default())));
        ImageTask::new(synthetic(64, 1), synthetic(20, 2), optimizer, 1e-2, move |d| {
            params::load(CnnConfig::new().init(d), initial)
        })
    }

    /// The batch-equivalence guarantee: two workers with B/2 each end where one
    /// worker with B ends, and stay identical to each other.
    #[test]
    fn two_half_batches_equal_one_full_batch() {
        for optimizer in [Optimizer::Sgd, Optimizer::Adam] {
            let batches: Vec<Vec<usize>> = (0..3).map(|s| (s * 8..s * 8 + 8).collect()).collect();
            let mut solo_ring = ring_of(1).pop().unwrap();
            let mut solo = Trainer::new(
                cnn_task(optimizer),
                Default::default(),
                &mut solo_ring,
                TrainOptions::new(1, 8, 5),
            )
            .unwrap();
            for b in &batches {
                solo.step(b).unwrap();
            }
            let expected = solo.parameters();

            let rings = ring_of(2);
            let results: Vec<Vec<f32>> = thread::scope(|s| {
                let handles: Vec<_> = rings
                    .into_iter()
                    .enumerate()
                    .map(|(rank, mut ring)| {
                        let batches = &batches;
                        s.spawn(move || {
                            let mut t = Trainer::new(
                                cnn_task(optimizer),
                                Default::default(),
                                &mut ring,
                                TrainOptions::new(1, 8, 5),
                            )
                            .unwrap();
                            for b in batches {
                                t.step(&b[rank * 4..rank * 4 + 4]).unwrap();
                            }
                            t.parameters()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert_eq!(results[0], results[1], "workers drifted apart ({optimizer:?})");
            let worst = expected
                .iter()
                .zip(&results[0])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{optimizer:?}: max parameter difference {worst}");
            let initial = params::flatten(&cnn_task(optimizer).model(&Default::default()));
            assert_ne!(expected, initial, "training moved the parameters");
        }
    }

    /// The same with unlike workers: local batches of 5 and 3 (a weighted split)
    /// still sum to exactly the gradient of the global batch of 8.
    #[test]
    fn unequal_local_batches_equal_one_full_batch() {
        let batch: Vec<usize> = (0..8).collect();
        let mut solo_ring = ring_of(1).pop().unwrap();
        let mut solo = Trainer::new(
            cnn_task(Optimizer::Sgd),
            Default::default(),
            &mut solo_ring,
            TrainOptions::new(1, 8, 5),
        )
        .unwrap();
        solo.step(&batch).unwrap();
        solo.step(&batch).unwrap();
        let expected = solo.parameters();
        let parts = [&batch[..5], &batch[5..]];
        let results: Vec<Vec<f32>> = thread::scope(|s| {
            let handles: Vec<_> = ring_of(2)
                .into_iter()
                .zip(parts)
                .map(|(mut ring, part)| {
                    s.spawn(move || {
                        let options = TrainOptions::new(1, 8, 5);
                        let mut t =
                            Trainer::new(cnn_task(Optimizer::Sgd), Default::default(), &mut ring, options).unwrap();
                        t.step(part).unwrap();
                        t.step(part).unwrap();
                        t.parameters()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results[0], results[1]);
        let worst = expected
            .iter()
            .zip(&results[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-5, "max parameter difference {worst}");
    }

    #[test]
    fn run_learns_and_reports() {
        let mut rings = ring_of(1);
        let task = ImageTask::<B, _>::new(synthetic(400, 3), synthetic(100, 4), Optimizer::Adam, 1e-2, |d| {
            MlpConfig::new().with_hidden(32).init(d)
        });
        let mut events = Vec::new();
        let summary = train(
            task,
            Default::default(),
            &mut rings[0],
            TrainOptions::new(3, 40, 1),
            &mut |e| events.push(e),
        )
        .unwrap();
        assert!(summary.last_epoch_loss < summary.first_epoch_loss * 0.5, "{summary:?}");
        assert!(summary.test_accuracy.unwrap() > 0.5, "{summary:?}");
        assert_eq!(summary.per_worker[0].samples, 3 * 10 * 40);
        assert_eq!(events.iter().filter(|e| matches!(e, Event::Epoch { .. })).count(), 3);
    }

    #[test]
    fn throttle_stretches_compute_to_the_speed_cap() {
        let c = Duration::from_millis(100);
        assert_eq!(throttle_delay(c, 1.0), Duration::ZERO);
        assert_eq!(throttle_delay(c, 0.5), Duration::from_millis(100));
        assert_eq!(throttle_delay(c, 0.25), Duration::from_millis(300));
        assert_eq!(throttle_delay(c, 0.0), Duration::ZERO);
    }

    #[test]
    fn too_small_a_dataset_is_a_clear_error() {
        let mut rings = ring_of(1);
        let task = ImageTask::<B, _>::new(synthetic(10, 3), synthetic(0, 4), Optimizer::Sgd, 1e-3, |d| {
            MlpConfig::new().with_hidden(4).init(d)
        });
        let err = train(
            task,
            Default::default(),
            &mut rings[0],
            TrainOptions::new(1, 64, 1),
            &mut |_| {},
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("cannot fill one global batch"), "{err}");
    }
}
