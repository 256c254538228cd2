//! Every strategy's step against the step one machine takes with the whole batch.

use std::thread;
use std::time::Duration;

use hetero_comm::Precision;
use hetero_comm::server::ServerClient;
use hetero_job::{Optimizer, Strategy};
use hetero_models::MlpConfig;
use hetero_train::image_task::ImageTask;
use hetero_train::{RunSummary, ServerGroup, TrainOptions, Trainer, params, seeded_model};

use crate::common::*;

/// The batch-equivalence guarantee: two workers with B/2 each end where one
/// worker with B ends, and stay identical to each other.
#[test]
fn two_half_batches_equal_one_full_batch() {
    for optimizer in [Optimizer::Sgd, Optimizer::Adam] {
        let batches: Vec<Vec<usize>> = (0..3).map(|s| (s * 8..s * 8 + 8).collect()).collect();
        let solo_ring = ring_of(1).pop().unwrap();
        let mut solo = Trainer::new(
            cnn_task(),
            Default::default(),
            solo_ring,
            TrainOptions::new(1, 8, 5).with_optimizer(optimizer, 1e-2),
        )
        .unwrap();
        for b in &batches {
            solo.step(b, 8).unwrap();
        }
        let expected = solo.parameters();

        let rings = ring_of(2);
        let results: Vec<Vec<f32>> = thread::scope(|s| {
            let handles: Vec<_> = rings
                .into_iter()
                .enumerate()
                .map(|(rank, ring)| {
                    let batches = &batches;
                    s.spawn(move || {
                        let mut t = Trainer::new(
                            cnn_task(),
                            Default::default(),
                            ring,
                            TrainOptions::new(1, 8, 5).with_optimizer(optimizer, 1e-2),
                        )
                        .unwrap();
                        for b in batches {
                            t.step(&b[rank * 4..rank * 4 + 4], 8).unwrap();
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
        let initial = params::flatten(&seeded_model(&cnn_task(), &Default::default(), 0));
        assert_ne!(expected, initial, "training moved the parameters");
    }
}

/// The same with unlike workers: local batches of 5 and 3 (a weighted split)
/// still sum to exactly the gradient of the global batch of 8.
#[test]
fn unequal_local_batches_equal_one_full_batch() {
    let batch: Vec<usize> = (0..8).collect();
    let solo_ring = ring_of(1).pop().unwrap();
    let mut solo = Trainer::new(
        cnn_task(),
        Default::default(),
        solo_ring,
        TrainOptions::new(1, 8, 5).with_optimizer(Optimizer::Sgd, 1e-2),
    )
    .unwrap();
    solo.step(&batch, 8).unwrap();
    solo.step(&batch, 8).unwrap();
    let expected = solo.parameters();
    let parts = [&batch[..5], &batch[5..]];
    let results: Vec<Vec<f32>> = thread::scope(|s| {
        let handles: Vec<_> = ring_of(2)
            .into_iter()
            .zip(parts)
            .map(|(ring, part)| {
                s.spawn(move || {
                    let options = TrainOptions::new(1, 8, 5).with_optimizer(Optimizer::Sgd, 1e-2);
                    let mut t = Trainer::new(cnn_task(), Default::default(), ring, options).unwrap();
                    t.step(part, 8).unwrap();
                    t.step(part, 8).unwrap();
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

/// Every worker's parameters after `steps` steps of the CNN, each worker on its
/// part of one global batch (`parts`, one per worker of a loopback ring).
fn steps_on_parts(parts: &[&[usize]], steps: usize, options: &TrainOptions) -> Vec<Vec<f32>> {
    let global = parts.iter().map(|p| p.len()).sum();
    thread::scope(|s| {
        let handles: Vec<_> = ring_of(parts.len())
            .into_iter()
            .zip(parts)
            .map(|(ring, part)| {
                let options = options.clone();
                s.spawn(move || {
                    let mut t = Trainer::new(cnn_task(), Default::default(), ring, options).unwrap();
                    for _ in 0..steps {
                        t.step(part, global).unwrap();
                    }
                    t.parameters()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Local SGD that averages after every step is, for plain SGD, exactly the
/// allreduce step: Σ s_w (p − lr·g_w) = p − lr·Σ s_w g_w.
#[test]
fn local_sgd_every_step_equals_allreduce_for_sgd() {
    let batch: Vec<usize> = (0..8).collect();
    let parts = [&batch[..5], &batch[5..]];
    let run = |strategy: Strategy| {
        let mut options = TrainOptions::new(1, 8, 5).with_optimizer(Optimizer::Sgd, 1e-2);
        options.strategy = strategy;
        // Each average before the next step's gradients, as allreduce has them.
        options.overlap = false;
        steps_on_parts(&parts, 3, &options)
    };
    let allreduce = run(Strategy::Allreduce);
    let local = run(Strategy::LocalSgd { sync_every: 1 });
    let worst = allreduce[0]
        .iter()
        .zip(&local[0])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "max parameter difference {worst}");
    // Between averages the models differ; after one they agree again.
    let rare = run(Strategy::LocalSgd { sync_every: 2 });
    assert_ne!(rare[0], rare[1], "3 steps with sync_every 2 end between averages");
}

/// At bf16 the exchange is half the bytes and every worker still ends with
/// the same model, to the bit — the ring rounds each summed chunk where it is
/// owned, before handing it round — close to the f32 run's: for allreduce
/// (rounded gradients) and for local SGD (rounded changes since the last
/// average; its first average, with no agreed anchor yet, is f32).
#[test]
fn at_bf16_workers_agree_to_the_bit_and_stay_close_to_f32() {
    let batch: Vec<usize> = (0..12).collect();
    let parts = [&batch[..6], &batch[6..9], &batch[9..]];
    let run = |strategy: Strategy, precision: Precision| {
        // Plain SGD: Adam's normalised steps would amplify any difference (a
        // gradient near zero flips its step), bf16's or another's.
        let mut options = TrainOptions::new(1, 12, 5).with_optimizer(Optimizer::Sgd, 5e-2);
        options.strategy = strategy;
        options.precision = precision;
        // Step 4's average made at once, not sent during a fifth step.
        options.overlap = false;
        steps_on_parts(&parts, 4, &options)
    };
    for strategy in [Strategy::Allreduce, Strategy::LocalSgd { sync_every: 2 }] {
        let exact = run(strategy, Precision::F32);
        let rounded = run(strategy, Precision::Bf16);
        assert_eq!(rounded[0], rounded[1], "{strategy:?}: one model");
        assert_eq!(rounded[0], rounded[2], "{strategy:?}: one model");
        let (mut worst, mut moved) = (0f32, 0f32);
        let start = params::flatten(&seeded_model(&cnn_task(), &Default::default(), 5));
        for ((r, e), s) in rounded[0].iter().zip(&exact[0]).zip(&start) {
            worst = worst.max((r - e).abs());
            moved = moved.max((e - s).abs());
        }
        assert_ne!(rounded[0], exact[0], "{strategy:?}: bf16 rounds");
        assert!(
            worst < moved / 10.0,
            "{strategy:?}: {worst} off f32 after steps of up to {moved}"
        );
    }
}

/// Overlapped local SGD sends each average while the next steps compute (here
/// averages after every step and every 4 steps, landing 1 and 2 steps later),
/// and each worker adds the steps it took meanwhile to the average when it
/// lands: the workers still end every epoch on one model, at bf16 too, and
/// learn as with the averages made at once, those steps of staleness apart.
#[test]
fn overlapped_local_sgd_ends_each_epoch_on_one_model_and_learns_like_the_plain_one() {
    let run = |every: usize, overlap: bool, precision: Precision| {
        train_ring(3, |_| {
            let mut o = TrainOptions::new(4, 12, 5).with_optimizer(Optimizer::Sgd, 1e-1);
            o.strategy = Strategy::LocalSgd { sync_every: every };
            o.overlap = overlap;
            o.precision = precision;
            (cnn_task(), o)
        })
    };
    for every in [1, 4] {
        let plain = run(every, false, Precision::F32);
        for precision in [Precision::F32, Precision::Bf16] {
            let overlapped = run(every, true, precision);
            for (summary, model, _) in &overlapped[1..] {
                assert_eq!(*model, overlapped[0].1, "every {every}, {precision:?}: one model");
                assert_eq!(summary.history.len(), 4);
            }
            assert_ne!(
                overlapped[0].1, plain[0].1,
                "every {every}, {precision:?}: the averages arrive steps late"
            );
            let losses = |f: &[Finished]| -> Vec<f64> { f[0].0.history.iter().map(|h| h.train_loss).collect() };
            let (p, o) = (losses(&plain), losses(&overlapped));
            // The kernels' parallel sums vary by a few thousandths between runs:
            // the bounds are what the run learned, not its last digits.
            let last = o.len() - 1;
            assert!(o[last] < o[0], "every {every}, {precision:?}: it learns: {o:?}");
            assert!(
                (o[last] - p[last]).abs() < p[0] - p[last],
                "every {every}, {precision:?}: {o:?} ends nearer the plain run's last loss than the plain run's first is: {p:?}"
            );
        }
    }
}

/// The parameter server (one group per worker) and the hierarchical strategy
/// (groups {0, 1} and {2}) take exactly the allreduce step.
#[test]
fn parameter_server_and_hierarchical_steps_equal_the_allreduce_step() {
    let batch: Vec<usize> = (0..9).collect();
    let parts = [&batch[..4], &batch[4..7], &batch[7..]];
    let initial = params::flatten(&seeded_model(&cnn_task(), &Default::default(), 0));
    let mut solo = Trainer::new(
        cnn_task(),
        Default::default(),
        ring_of(1).pop().unwrap(),
        TrainOptions::new(1, 9, 5).with_optimizer(Optimizer::Sgd, 1e-2),
    )
    .unwrap();
    for _ in 0..2 {
        solo.step(&batch, 9).unwrap();
    }
    let expected = solo.parameters();
    for (strategy, groups) in [
        (
            Strategy::ParameterServer { staleness: 0 },
            vec![vec![0], vec![1], vec![2]],
        ),
        (Strategy::Hierarchical, vec![vec![0, 1], vec![2]]),
    ] {
        let (addr, server) = parameter_server(groups.len(), initial.clone(), None);
        let results: Vec<Vec<f32>> = thread::scope(|s| {
            let mut handles = vec![];
            for group in &groups {
                for (position, ring) in ring_of(group.len()).into_iter().enumerate() {
                    let (group, rank) = (group.clone(), group[position]);
                    handles.push(s.spawn(move || {
                        let client = (position == 0).then(|| {
                            ServerClient::connect(addr, "t", "k", rank as u32, Duration::from_secs(20)).unwrap()
                        });
                        let server = ServerGroup {
                            client,
                            staleness: None,
                            rank,
                            world: 3,
                            group,
                        };
                        let mut options = TrainOptions::new(1, 9, 5).with_optimizer(Optimizer::Sgd, 1e-2);
                        options.strategy = strategy;
                        let mut t =
                            Trainer::with_server(cnn_task(), Default::default(), ring, server, options).unwrap();
                        for _ in 0..2 {
                            t.step(parts[rank], 9).unwrap();
                        }
                        let result = t.parameters();
                        t.finish().unwrap();
                        result
                    }));
                }
            }
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let report = server.join().unwrap().unwrap();
        assert_eq!(report.steps, 2, "{strategy:?}");
        for r in &results {
            let worst = expected.iter().zip(r).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "{strategy:?}: max parameter difference {worst}");
        }
    }
}

/// Asynchronous parameter server: workers run whole epochs and the loss falls.
#[test]
fn asynchronous_parameter_server_trains() {
    let initial = params::flatten(&MlpConfig::new().with_hidden(16).init::<B>(&Default::default()));
    let (addr, server) = parameter_server(2, initial, Some(2));
    let summaries: Vec<RunSummary> = thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                s.spawn(move || {
                    let client = ServerClient::connect(addr, "t", "k", rank as u32, Duration::from_secs(20)).unwrap();
                    let server = ServerGroup {
                        client: Some(client),
                        staleness: Some(2),
                        rank,
                        world: 2,
                        group: vec![rank],
                    };
                    let task = ImageTask::<B, _>::new(synthetic(400, 3), synthetic(100, 4), |d| {
                        MlpConfig::new().with_hidden(16).init(d)
                    });
                    let mut options = TrainOptions::new(3, 40, 1).with_optimizer(Optimizer::Sgd, 1e-2);
                    options.strategy = Strategy::ParameterServer { staleness: 2 };
                    let ring = ring_of(1).pop().unwrap();
                    let mut t = Trainer::with_server(task, Default::default(), ring, server, options).unwrap();
                    t.run(&mut |_| {}).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let report = server.join().unwrap().unwrap();
    assert_eq!(report.pushes, 2 * 3 * 10, "every step of every worker was pushed");
    let s = &summaries[0];
    assert!(s.last_epoch_loss < s.first_epoch_loss, "{s:?}");
    assert_eq!(
        summaries[0].test_accuracy, summaries[1].test_accuracy,
        "evaluation is global"
    );
}

/// A task whose loss is computed in one stage: `inner`'s, without its split.
struct OneStage<T>(T);

impl<T: hetero_train::Task<B>> hetero_train::Task<B> for OneStage<T> {
    type Model = T::Model;
    type Batch = T::Batch;
    fn train_len(&self) -> usize {
        self.0.train_len()
    }
    fn test_len(&self) -> usize {
        self.0.test_len()
    }
    fn model(&self, device: &burn::tensor::Device<B>) -> T::Model {
        self.0.model(device)
    }
    fn train_batch(&self, indices: &[usize], device: &burn::tensor::Device<B>) -> T::Batch {
        self.0.train_batch(indices, device)
    }
    fn test_batch(&self, indices: &[usize], device: &burn::tensor::Device<B>) -> T::Batch {
        self.0.test_batch(indices, device)
    }
    fn loss(&self, model: &T::Model, batch: T::Batch) -> burn::tensor::Tensor<B, 1> {
        self.0.loss(model, batch)
    }
    fn evaluate(&self, model: &T::Model, batch: T::Batch) -> hetero_train::Evaluation {
        self.0.evaluate(model, batch)
    }
}

/// The CNN's staged step (the head's gradients exchanged while the body's are
/// computed, on three workers, one of them with an empty batch) ends where one
/// machine's one-stage step with the whole batch ends.
#[test]
fn a_staged_step_on_three_workers_equals_one_stage_on_one() {
    let task = cnn_task();
    let model = seeded_model(&task, &Default::default(), 0);
    assert!(
        hetero_train::Task::<B>::head_params(&task, &model).is_some(),
        "the CNN splits"
    );
    let batches: Vec<Vec<usize>> = (0..3).map(|s| (s * 8..s * 8 + 8).collect()).collect();
    // Plain SGD: a gradient scaled wrongly moves the parameters by as much
    // (Adam would hide a constant factor).
    let options = || TrainOptions::new(1, 8, 5).with_optimizer(Optimizer::Sgd, 1e-2);
    let mut solo = Trainer::new(
        OneStage(cnn_task()),
        Default::default(),
        ring_of(1).pop().unwrap(),
        options(),
    )
    .unwrap();
    let solo_losses: Vec<f32> = batches.iter().map(|b| solo.step(b, 8).unwrap()).collect();
    let expected = solo.parameters();
    // Local batches of 5, 3 and 0 samples.
    let cuts = [(0, 5), (5, 8), (8, 8)];
    let runs: Vec<(Vec<f32>, Vec<f32>)> = thread::scope(|s| {
        let handles: Vec<_> = ring_of(3)
            .into_iter()
            .zip(cuts)
            .map(|(ring, (a, b))| {
                let batches = &batches;
                s.spawn(move || {
                    let mut t = Trainer::new(cnn_task(), Default::default(), ring, options()).unwrap();
                    let losses = batches.iter().map(|batch| t.step(&batch[a..b], 8).unwrap()).collect();
                    (t.parameters(), losses)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let results: Vec<&Vec<f32>> = runs.iter().map(|(p, _)| p).collect();
    assert_eq!(results[0], results[1], "workers drifted apart");
    assert_eq!(results[0], results[2], "workers drifted apart");
    // Every worker's step loss is the global batch's, the one machine's.
    for (_, losses) in &runs {
        for (got, want) in losses.iter().zip(&solo_losses) {
            assert!((got - want).abs() < 1e-5, "step loss {got} against {want}");
        }
    }
    let worst = expected
        .iter()
        .zip(results[0].iter())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "max parameter difference {worst}");
}
