//! Workers that lack the dataset's samples receive them from workers that hold
//! them, and train exactly as if they had read the files.

use hetero_data::held::HeldImages;
use hetero_job::Optimizer;
use hetero_models::MlpConfig;
use hetero_train::image_task::ImageTask;
use hetero_train::{Event, RunSummary, TrainOptions};

use crate::common::*;

/// A 3-worker weighted run with the neighbour exchange, where `lacking(rank, id)`
/// says which samples a worker starts without; every worker's summary, model
/// and events.
fn run(lacking: impl Fn(usize, usize) -> bool + Sync) -> Vec<(RunSummary, Vec<f32>, Vec<Event>)> {
    let full = HeldImages::complete(synthetic(300, 3), synthetic(60, 4));
    train_ring(3, |rank| {
        let images = HeldImages::only(&full, |id| !lacking(rank, id));
        let task = ImageTask::<B, _>::from_held(images, |d| MlpConfig::new().with_hidden(16).init(d));
        let mut o = TrainOptions::new(3, 30, 11).with_optimizer(Optimizer::Sgd, 1e-2);
        o.weights = vec![3.0, 2.0, 1.0];
        o.exchange_fraction = 0.2;
        (task, o)
    })
}

/// Rank 1 holds nothing and rank 2 only the first half of the ids: what they lack
/// arrives before they need it — after every neighbour exchange too — and the run
/// ends bit for bit where the run of three workers with the whole dataset ends.
#[test]
fn workers_without_the_dataset_train_exactly_as_if_they_had_it() {
    let whole = run(|_, _| false);
    let travelled = run(|rank, id| rank == 1 || (rank == 2 && id >= 180));
    assert_eq!(
        whole[0].0.moved_samples, 0,
        "nothing moves when every worker holds everything"
    );
    assert!(whole[0].2.iter().all(|e| !matches!(e, Event::SamplesMoved { .. })));
    for (rank, ((a, pa, _), (b, pb, events))) in whole.iter().zip(&travelled).enumerate() {
        assert_eq!(pa, pb, "rank {rank} ends with the same model");
        let losses = |s: &RunSummary| s.history.iter().map(|h| h.train_loss).collect::<Vec<_>>();
        assert_eq!(losses(a), losses(b));
        assert_eq!(a.test_accuracy, b.test_accuracy, "its test part arrived too");
        for h in &b.history {
            let c = h.coverage;
            assert_eq!((c.visited, c.distinct), (300, 300), "epoch {}: {c:?}", h.epoch);
        }
        let moves: Vec<u64> = events
            .iter()
            .filter_map(|e| match e {
                Event::SamplesMoved { samples, .. } => Some(*samples),
                _ => None,
            })
            .collect();
        assert!(moves.len() >= 3, "a fill at each epoch's start: {moves:?}");
        assert!(
            moves[0] > 100,
            "rank 1's shard and test part, rank 2's missing half: {moves:?}"
        );
        assert!(
            moves[1..].iter().all(|&m| m > 0),
            "the exchange hands on samples they lack: {moves:?}"
        );
        assert_eq!(b.moved_samples, moves.iter().sum::<u64>());
        assert!(b.moved_bytes > b.moved_samples * 784, "{b:?}");
    }
}
