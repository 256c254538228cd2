//! Whole runs: learning, clear errors, resuming from a checkpoint.

use hetero_job::Optimizer;
use hetero_models::MlpConfig;
use hetero_train::image_task::ImageTask;
use hetero_train::{Event, TrainOptions, Trainer, train};

use crate::common::*;

#[test]
fn run_learns_and_reports() {
    let task = ImageTask::<B, _>::new(synthetic(400, 3), synthetic(100, 4), |d| {
        MlpConfig::new().with_hidden(32).init(d)
    });
    let mut events = Vec::new();
    let summary = train(
        task,
        Default::default(),
        ring_of(1).pop().unwrap(),
        TrainOptions::new(3, 40, 1).with_optimizer(Optimizer::Adam, 1e-2),
        &mut |e| events.push(e),
    )
    .unwrap();
    assert!(summary.last_epoch_loss < summary.first_epoch_loss * 0.5, "{summary:?}");
    assert!(summary.test_accuracy.unwrap() > 0.5, "{summary:?}");
    assert_eq!(summary.per_worker[0].samples, 3 * 10 * 40);
    assert_eq!(events.iter().filter(|e| matches!(e, Event::Epoch { .. })).count(), 3);
}

#[test]
fn too_small_a_dataset_is_a_clear_error() {
    let task = ImageTask::<B, _>::new(synthetic(10, 3), synthetic(0, 4), |d| {
        MlpConfig::new().with_hidden(4).init(d)
    });
    let err = train(
        task,
        Default::default(),
        ring_of(1).pop().unwrap(),
        TrainOptions::new(1, 64, 1),
        &mut |_| {},
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("cannot fill one global batch"), "{err}");
}

/// Stopping after a checkpoint and resuming from it ends exactly where an
/// uninterrupted run ends: parameters, Adam's moments and the data order all
/// carry over.
#[test]
fn resuming_from_a_checkpoint_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("checkpoint.bin");
    let task = || {
        ImageTask::<B, _>::new(synthetic(200, 3), synthetic(50, 4), |d| {
            MlpConfig::new().with_hidden(16).init(d)
        })
    };
    let options = |epochs: usize| {
        let mut o = TrainOptions::new(epochs, 20, 9).with_optimizer(Optimizer::Adam, 1e-2);
        o.checkpoint = Some(path.clone());
        o
    };
    let mut straight = Trainer::new(task(), Default::default(), ring_of(1).pop().unwrap(), options(3)).unwrap();
    let whole = straight.run(&mut |_| {}).unwrap();
    let expected = straight.parameters();

    let mut first = Trainer::new(task(), Default::default(), ring_of(1).pop().unwrap(), options(2)).unwrap();
    let mut saved = vec![];
    first
        .run(&mut |e| {
            if let Event::Checkpointed { epoch, .. } = e {
                saved.push(epoch)
            }
        })
        .unwrap();
    assert_eq!(saved, vec![1, 2]);
    let mut again = options(3);
    again.resume = Some(path.clone());
    let mut second = Trainer::new(task(), Default::default(), ring_of(1).pop().unwrap(), again).unwrap();
    let resumed = second.run(&mut |_| {}).unwrap();
    assert_eq!(second.parameters(), expected);
    assert_eq!(resumed.resumed_at_epoch, Some(2));
    assert_eq!(resumed.history.len(), 3);
    assert_eq!(resumed.test_accuracy, whole.test_accuracy);

    // A checkpoint of another model is refused with both sizes named.
    let mut wrong = TrainOptions::new(3, 20, 9);
    wrong.resume = Some(path.clone());
    let other = ImageTask::<B, _>::new(synthetic(200, 3), synthetic(50, 4), |d| {
        MlpConfig::new().with_hidden(8).init(d)
    });
    let err = Trainer::new(other, Default::default(), ring_of(1).pop().unwrap(), wrong)
        .err()
        .unwrap();
    assert!(err.to_string().contains("this job's model has"), "{err}");
}

/// A parameter-server strategy on a plain ring has no server to speak to: the
/// trainer says so instead of training as something else.
#[test]
fn a_server_strategy_without_a_server_is_a_clear_error() {
    let task = ImageTask::<B, _>::new(synthetic(40, 3), synthetic(10, 4), |d| {
        MlpConfig::new().with_hidden(4).init(d)
    });
    let mut options = TrainOptions::new(1, 8, 1);
    options.strategy = hetero_job::Strategy::Hierarchical;
    let err = Trainer::new(task, Default::default(), ring_of(1).pop().unwrap(), options)
        .err()
        .unwrap();
    assert!(err.to_string().contains("needs a parameter server"), "{err}");
}
