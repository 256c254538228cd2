//! Runs that lose a worker, or take one back, and lose no sample.

use std::thread;
use std::time::Duration;

use hetero_comm::server::ServerClient;
use hetero_job::{Optimizer, Strategy};
use hetero_models::MlpConfig;
use hetero_train::image_task::ImageTask;
use hetero_train::{Event, Membership, RunSummary, ServerGroup, TrainOptions, Trainer, params};

use crate::common::*;

/// Kill one of three workers mid-epoch: the other two re-form the ring, take over
/// its samples and finish with the same model; nothing is lost, and only the one
/// step that was cut short is computed twice.
#[test]
fn survivors_finish_when_a_worker_dies_mid_epoch() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let board = std::sync::Arc::new((std::sync::Mutex::new(Vec::new()), std::sync::Condvar::new()));
    let (len, global, epochs) = (240, 24, 2);
    let results: Vec<thread::Result<RunSummary>> = thread::scope(|s| {
        let handles: Vec<_> = ring_of(3)
            .into_iter()
            .enumerate()
            .map(|(rank, ring)| {
                let (seen, board) = (seen.clone(), board.clone());
                s.spawn(move || {
                    let task = Recorded {
                        inner: ImageTask::new(synthetic(len, 3), synthetic(30, 4), |d| {
                            MlpConfig::new().with_hidden(16).init(d)
                        }),
                        seen,
                        die_at: (rank == 2).then_some(4),
                        calls: std::cell::Cell::new(0),
                        delay: Duration::ZERO,
                        delay_from: 0,
                        delay_before: Duration::ZERO,
                    };
                    let options = TrainOptions::new(epochs, global, 7).with_optimizer(Optimizer::Adam, 1e-2);
                    let mut t = Trainer::new(task, Default::default(), ring, options)
                        .unwrap()
                        .with_membership(Box::new(Board::new(rank, &[2], &board)));
                    let mut events = vec![];
                    let summary = t.run(&mut |e| events.push(e)).unwrap();
                    assert!(
                        events
                            .iter()
                            .any(|e| matches!(e, Event::Migrated { lost, workers: 2, .. } if lost == &[2]))
                    );
                    (summary, t.parameters())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().map(|(s, _)| s)).collect()
    });
    assert!(results[2].is_err(), "worker 2 died");
    let a = results[0].as_ref().unwrap();
    let b = results[1].as_ref().unwrap();
    assert_eq!(a.lost_workers, vec![2]);
    assert_eq!(a.test_accuracy, b.test_accuracy);
    assert_eq!(a.history.len(), epochs);
    let mut counts = vec![0usize; len];
    for &i in seen.lock().unwrap().iter() {
        counts[i] += 1;
    }
    assert!(
        counts.iter().all(|&c| c == epochs || c == epochs + 1),
        "every sample in every epoch"
    );
    let repeated = counts.iter().filter(|&&c| c > epochs).count();
    assert!(
        repeated <= global,
        "only the interrupted step repeats ({repeated} samples)"
    );
}

/// Rank 2 dies mid-epoch; its replacement joins at the next epoch boundary,
/// receives the whole state and trains the remaining epochs with the others:
/// all three end with the same model and summary, and no sample is lost.
#[test]
fn a_lost_worker_rejoins_at_the_next_epoch() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let board: Entries = Default::default();
    let decisions = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let (len, global, epochs) = (240, 24, 3);
    let options = || TrainOptions::new(epochs, global, 7).with_optimizer(Optimizer::Adam, 1e-2);
    let membership = |rank| {
        let mut b = Board::new(rank, &[2, 3], &board);
        b.admit_from = Some(1);
        b.decisions = decisions.clone();
        Box::new(b)
    };
    let results: Vec<thread::Result<Finished>> = thread::scope(|s| {
        let mut handles: Vec<_> = ring_of(3)
            .into_iter()
            .enumerate()
            .map(|(rank, ring)| {
                let task = recorded(len, &seen, (rank == 2).then_some(4));
                let membership = membership(rank);
                s.spawn(move || {
                    let mut t = Trainer::new(task, Default::default(), ring, options())
                        .unwrap()
                        .with_membership(membership);
                    let mut events = vec![];
                    let summary = t.run(&mut |e| events.push(e)).unwrap();
                    (summary, t.parameters(), events)
                })
            })
            .collect();
        // The replacement for rank 2: it waits on the board for generation 2.
        let task = recorded(len, &seen, None);
        let mut joiner_board = membership(2);
        handles.push(s.spawn(move || {
            let regroup = joiner_board.regroup(2, "joining").unwrap();
            let mut t = Trainer::joining(task, Default::default(), regroup, 2, options())
                .unwrap()
                .with_membership(joiner_board);
            let mut events = vec![];
            let summary = t.run(&mut |e| events.push(e)).unwrap();
            (summary, t.parameters(), events)
        }));
        handles.into_iter().map(|h| h.join()).collect()
    });
    assert!(results[2].is_err(), "the first rank 2 died");
    let (a, pa, events) = results[0].as_ref().unwrap();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Migrated { lost, .. } if lost == &[2]))
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Rejoined { epoch: 1, joined, workers: 3, .. } if joined == &[2])),
        "{events:?}"
    );
    assert_eq!(a.lost_workers, vec![2]);
    assert_eq!(a.rejoined_workers, vec![2]);
    assert_eq!(a.workers, 3);
    assert_eq!(a.history.len(), epochs);
    for r in [1, 3] {
        let (b, pb, _) = results[r].as_ref().unwrap();
        assert_eq!(pa, pb, "worker {r} ends with the same model");
        assert_eq!(
            curve(&a.history),
            curve(&b.history),
            "worker {r} reports the same history"
        );
        assert_eq!(a.test_accuracy, b.test_accuracy);
    }
    let (joiner, _, _) = results[3].as_ref().unwrap();
    assert!(joiner.per_worker[2].samples > 0, "the joiner trained");
    let counts = visits(&seen, len);
    assert!(
        counts.iter().all(|&c| c == epochs || c == epochs + 1),
        "every sample in every epoch: {counts:?}"
    );
    assert!(counts.iter().filter(|&&c| c > epochs).count() <= global);
}

/// A worker of a synchronous parameter-server run dies mid-epoch: the server
/// fails (it waits for every client), and the survivors go on as one allreduce
/// ring from the latest global model, taking over the lost worker's samples.
#[test]
fn parameter_server_workers_go_on_as_a_ring_when_one_dies() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let board: Entries = Default::default();
    let (len, global, epochs) = (240, 24, 2);
    let initial = params::flatten(&MlpConfig::new().with_hidden(16).init::<B>(&Default::default()));
    let (addr, server) = parameter_server(3, initial, None);
    let results: Vec<thread::Result<Finished>> = thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let task = recorded(len, &seen, (rank == 2).then_some(4));
                let membership = Box::new(Board::new(rank, &[2], &board));
                s.spawn(move || {
                    let client = ServerClient::connect(addr, "t", "k", rank as u32, Duration::from_secs(20)).unwrap();
                    let server = ServerGroup {
                        client: Some(client),
                        staleness: None,
                        rank,
                        world: 3,
                        group: vec![rank],
                    };
                    let mut options = TrainOptions::new(epochs, global, 7).with_optimizer(Optimizer::Sgd, 1e-2);
                    options.strategy = Strategy::ParameterServer { staleness: 0 };
                    let ring = ring_of(1).pop().unwrap();
                    let mut t = Trainer::with_server(task, Default::default(), ring, server, options)
                        .unwrap()
                        .with_membership(membership);
                    let mut events = vec![];
                    let summary = t.run(&mut |e| events.push(e)).unwrap();
                    (summary, t.parameters(), events)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    let failed = server.join().unwrap().unwrap_err().to_string();
    assert!(failed.contains("disconnected") || failed.contains("client"), "{failed}");
    assert!(results[2].is_err(), "worker 2 died");
    let (a, pa, events) = results[0].as_ref().unwrap();
    let (b, pb, _) = results[1].as_ref().unwrap();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Migrated { lost, collapsed: true, workers: 2, .. } if lost == &[2])),
        "{events:?}"
    );
    assert_eq!(pa, pb, "the survivors agree on the model");
    assert_eq!(a.lost_workers, vec![2]);
    // The survivors agree exactly on the model and on every epoch after the loss;
    // in the epoch the server was lost, the step in flight when it went may be
    // counted in one survivor's mean loss and not the other's (seen once in CI:
    // 2.25381 vs 2.25423), so that epoch's loss is compared within 0.1 %.
    let (ca, cb) = (curve(&a.history), curve(&b.history));
    assert_eq!(ca.len(), cb.len());
    for (x, y) in ca.iter().zip(&cb) {
        assert_eq!((x.0, x.2), (y.0, y.2), "{ca:?} vs {cb:?}");
        assert!((x.1 - y.1).abs() <= 1e-3 * y.1.abs(), "{ca:?} vs {cb:?}");
    }
    assert_eq!(ca.last(), cb.last(), "the last epoch is the same on both");
    assert!(a.last_epoch_loss < a.first_epoch_loss, "{a:?}");
    let counts = visits(&seen, len);
    assert!(
        counts.iter().all(|&c| c == epochs || c == epochs + 1),
        "every sample in every epoch: {counts:?}"
    );
}
