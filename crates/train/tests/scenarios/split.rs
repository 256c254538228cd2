//! Weighted runs whose split follows what the workers measured.

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use hetero_job::{Optimizer, Strategy};
use hetero_train::{Event, TrainOptions, Trainer};

use crate::common::*;

/// The rebalances a worker reported within epochs (`within`) or between them:
/// each one's epoch, new shares and measured rates, in order.
fn rebalances(events: &[Event], within: bool) -> Vec<(usize, &Vec<f64>, &Vec<f64>)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Rebalanced {
                epoch,
                shares,
                rates,
                within_epoch,
            } if *within_epoch == within => Some((*epoch, shares, rates)),
            _ => None,
        })
        .collect()
}

/// Compute scores that are wrong — equal, for a worker many times slower — are
/// only the starting guess: a few steps into the first epoch the workers measure
/// themselves, the slow one's share drops, the rest of that epoch is re-shared,
/// and every sample is still visited exactly once per epoch.
#[test]
fn a_weighted_run_sets_its_split_from_measured_throughput_within_the_first_epoch() {
    let (len, global, epochs) = (600, 40, 2);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let finished = train_ring(2, |rank| {
        let mut task = recorded(len, &seen, None);
        // Rank 1 takes 3 ms a sample more: many times slower, whatever else
        // loads the machine.
        if rank == 1 {
            task.delay = Duration::from_millis(3);
        }
        let mut o = TrainOptions::new(epochs, global, 5).with_optimizer(Optimizer::Sgd, 1e-2);
        o.weights = vec![1.0, 1.0];
        o.measure_split = true;
        (task, o)
    });
    for (summary, _, events) in &finished {
        let measured = rebalances(events, true);
        let [(0, shares, rates)] = measured[..] else {
            panic!("one measurement in the first epoch: {events:?}")
        };
        assert!(rates[0] > rates[1], "the throttled worker is slower: {rates:?}");
        assert!(shares[1] < 0.4, "its share follows: {shares:?}");
        assert_eq!(
            summary.history[0].shares, *shares,
            "the epoch ended with the measured split"
        );
        for h in &summary.history {
            let c = h.coverage;
            assert_eq!((c.visited, c.distinct), (len, len), "epoch {}: {c:?}", h.epoch);
        }
        assert!(summary.per_worker[1].samples < summary.per_worker[0].samples);
    }
    assert_eq!(finished[0].1, finished[1].1, "one model");
    assert!(
        visits(&seen, len).iter().all(|&n| n == epochs),
        "every sample once per epoch"
    );
}

/// With `rebalance`, the split keeps following the workers within an epoch:
/// rank 1 slows down only after the first measurement (which saw two equal
/// workers), and a check of the split 32 steps after it re-shares the rest of the same
/// epoch — the only epoch of this run — so the fast worker stops waiting for it
/// before the epoch ends. Every sample is still visited exactly once.
#[test]
fn with_rebalance_a_worker_that_slows_mid_epoch_gets_less_of_that_epoch() {
    slows_mid_epoch(Strategy::Allreduce, false);
}

/// The same with local SGD, whose check's rates ride in an average sent while
/// the next steps compute (they come back a few steps after the check, after
/// the same step on both workers).
#[test]
fn with_local_sgd_the_checks_rates_ride_in_an_overlapped_average() {
    slows_mid_epoch(Strategy::LocalSgd { sync_every: 4 }, true);
}

/// With averages too rare to bring a check's rates back within the epoch (one
/// per 100 steps, in an epoch of 60), the check takes a collective of its own
/// and the split still follows.
#[test]
fn with_rare_averages_a_check_takes_a_collective_of_its_own() {
    slows_mid_epoch(Strategy::LocalSgd { sync_every: 100 }, true);
}

fn slows_mid_epoch(strategy: Strategy, overlap: bool) {
    let (len, global) = (960, 16);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let finished = train_ring(2, |rank| {
        let mut task = recorded(len, &seen, None);
        // Equal workers (sleep outweighs compute), until rank 1 slows down after
        // the measurement at step 8 (a fifth of 60 steps, at most 8).
        task.delay = Duration::from_millis(1);
        if rank == 1 {
            (task.delay_before, task.delay, task.delay_from) = (task.delay, Duration::from_millis(4), 16);
        }
        let mut o = TrainOptions::new(1, global, 5).with_optimizer(Optimizer::Sgd, 1e-2);
        o.weights = vec![1.0, 1.0];
        o.measure_split = true;
        o.rebalance = true;
        (o.strategy, o.overlap) = (strategy, overlap);
        (task, o)
    });
    for (summary, _, events) in &finished {
        let within: Vec<_> = rebalances(events, true)
            .into_iter()
            .filter(|&(epoch, ..)| epoch == 0)
            .map(|(_, shares, _)| shares)
            .collect();
        let [measured, paced, ..] = within[..] else {
            panic!("the first measurement and a later check within the epoch: {events:?}")
        };
        assert!(measured[1] > 0.4, "the first steps saw equal workers: {measured:?}");
        assert!(paced[1] < 0.3, "rank 1's share follows its slowdown: {paced:?}");
        assert_eq!(summary.history[0].shares, **within.last().unwrap());
        let c = summary.history[0].coverage;
        assert_eq!((c.visited, c.distinct), (len, len), "{c:?}");
    }
    assert_eq!(finished[0].1, finished[1].1, "one model");
    assert!(visits(&seen, len).iter().all(|&n| n == 1), "every sample once");
}

/// A few steps can mislead (a worker under a CPU quota may run them
/// unthrottled): here rank 1 slows down only after the first measurement, which
/// saw two equal workers. The first epoch's whole figures set the next epoch's
/// split, even without `rebalance`, and only that once.
#[test]
fn a_weighted_run_settles_its_split_on_the_whole_first_epoch() {
    let (len, global, epochs) = (600, 40, 3);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let finished = train_ring(2, |rank| {
        let mut task = recorded(len, &seen, None);
        // Equal workers (sleep outweighs compute), until rank 1 slows down after
        // the measurement at the third step (a fifth of 15 steps, at least 3).
        task.delay = Duration::from_millis(1);
        if rank == 1 {
            (task.delay_before, task.delay, task.delay_from) = (task.delay, Duration::from_millis(4), 5);
        }
        let mut o = TrainOptions::new(epochs, global, 5).with_optimizer(Optimizer::Sgd, 1e-2);
        o.weights = vec![1.0, 1.0];
        o.measure_split = true;
        assert!(!o.rebalance);
        (task, o)
    });
    for (summary, _, events) in &finished {
        let between = rebalances(events, false);
        let [(1, shares, _)] = between[..] else {
            panic!("one settling after the first epoch, none later: {events:?}")
        };
        let first = &summary.history[0].shares;
        assert!(first[1] > 0.4, "the first steps saw equal workers: {first:?}");
        assert!(
            shares[1] < first[1] - 0.05,
            "rank 1's share drops: {first:?} → {shares:?}"
        );
        assert_eq!(summary.history[1].shares, *shares);
        assert_eq!(summary.history[2].shares, *shares, "no rebalance after that");
        for h in &summary.history {
            let c = h.coverage;
            assert_eq!((c.visited, c.distinct), (len, len), "epoch {}: {c:?}", h.epoch);
        }
    }
    assert!(
        visits(&seen, len).iter().all(|&n| n == epochs),
        "every sample once per epoch"
    );
}

/// The measured split outlives a lost worker: the survivors keep their measured
/// shares (the membership's scores are empty here, which would mean an even
/// split), so the slow survivor still gets the smaller part.
#[test]
fn survivors_keep_the_measured_split_after_a_loss() {
    let (len, global, epochs) = (240, 24, 2);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let board: Entries = Default::default();
    let events: Vec<thread::Result<Vec<Event>>> = thread::scope(|s| {
        let handles: Vec<_> = ring_of(3)
            .into_iter()
            .enumerate()
            .map(|(rank, ring)| {
                // Rank 2 dies at its sixth batch, after the measurement at step 3.
                let mut task = recorded(len, &seen, (rank == 2).then_some(5));
                if rank == 1 {
                    task.delay = Duration::from_millis(3);
                }
                let board = board.clone();
                s.spawn(move || {
                    let mut o = TrainOptions::new(epochs, global, 5).with_optimizer(Optimizer::Sgd, 1e-2);
                    o.weights = vec![1.0, 1.0, 1.0];
                    o.measure_split = true;
                    let mut t = Trainer::new(task, Default::default(), ring, o)
                        .unwrap()
                        .with_membership(Box::new(Board::new(rank, &[2], &board)));
                    let mut events = vec![];
                    t.run(&mut |e| events.push(e)).unwrap();
                    events
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    assert!(events[2].is_err(), "rank 2 died");
    for e in &events[..2] {
        let e = e.as_ref().unwrap();
        let measured = e
            .iter()
            .any(|e| matches!(e, Event::Rebalanced { within_epoch: true, .. }));
        let shares = e.iter().find_map(|e| match e {
            Event::Migrated { shares, lost, .. } if lost == &[2] => Some(shares.clone()),
            _ => None,
        });
        assert!(measured, "{e:?}");
        let shares = shares.expect("the survivors migrated");
        assert!(shares[1] < 0.4, "the slow survivor keeps the smaller share: {shares:?}");
    }
}
