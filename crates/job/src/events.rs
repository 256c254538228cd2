//! What a worker tells the control plane while it trains: progress events, one
//! per line of its standard output after [`EVENT_PREFIX`], and the run's summary.
//!
//! This is half of the contract between workers and the control plane (the other
//! half is [`crate::worker_env`]): the agent forwards the lines, the coordinator
//! decodes them with [`Event::from_line`] and keeps the summary, the CLI prints
//! them — none of them links the trainer to read them.

use serde::{Deserialize, Serialize};

/// Prefix of a worker's stdout line that carries a progress event.
pub const EVENT_PREFIX: &str = "@hetero-event ";

/// Progress of a run, emitted by every worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A training step finished.
    Step {
        /// Epoch, from 0.
        epoch: usize,
        /// Step within the epoch, from 0.
        step: usize,
        /// Steps per epoch.
        steps: usize,
        /// Mean loss of the global batch.
        loss: f32,
        /// This worker's samples per second (recent).
        samples_per_sec: f64,
    },
    /// An epoch finished and was evaluated.
    Epoch {
        /// Epoch, from 0.
        epoch: usize,
        /// Mean training loss over the epoch.
        train_loss: f64,
        /// Test accuracy in [0, 1] (absent without a test set).
        test_accuracy: Option<f64>,
        /// Mean test loss.
        test_loss: Option<f64>,
        /// Seconds since training started.
        elapsed_secs: f64,
    },
    /// Measured throughput drifted from the split: shards and local batches now
    /// follow `shares` (one per worker, summing to 1) — from the rest of `epoch`
    /// when `within_epoch` (the first measurement of a weighted run, or a check
    /// of the split with `rebalance`), else from `epoch` on.
    Rebalanced {
        /// The first epoch with the new split (the current one when `within_epoch`).
        epoch: usize,
        /// Each worker's new share of the work.
        shares: Vec<f64>,
        /// Each worker's measured training samples per second of compute, at its
        /// local batch (empty from a build before they were reported).
        #[serde(default)]
        rates: Vec<f64>,
        /// Taken a few steps into the epoch rather than at its end.
        #[serde(default)]
        within_epoch: bool,
    },
    /// Workers lacked samples they were to train on or evaluate (a machine without
    /// the dataset's files) and received them from workers that hold them.
    SamplesMoved {
        /// The epoch being trained.
        epoch: usize,
        /// Samples delivered, all workers together.
        samples: u64,
        /// Bytes put on links, all workers together.
        bytes: u64,
        /// Seconds it took.
        secs: f64,
    },
    /// A weighted run could not set its split from measured throughput, and
    /// says why instead of falling back silently.
    SplitKept {
        /// The epoch being trained.
        epoch: usize,
        /// What was missing, and which split the run keeps.
        why: String,
    },
    /// Workers were lost mid-run: the survivors re-formed the ring, took over the
    /// lost workers' samples and continued from the latest global model.
    Migrated {
        /// Epoch in which it happened.
        epoch: usize,
        /// Global optimiser step the survivors continued from.
        step: u64,
        /// Original ranks of the workers lost.
        lost: Vec<usize>,
        /// Workers left.
        workers: usize,
        /// Each survivor's new share of the work.
        shares: Vec<f64>,
        /// The original ranks of the ring's members now, in ring order.
        #[serde(default)]
        members: Vec<usize>,
        /// The parameter server's topology was given up: the workers go on as one
        /// allreduce ring (the server, or a worker, was lost).
        #[serde(default)]
        collapsed: bool,
    },
    /// Lost workers came back (their node returned) and joined the ring between
    /// epochs: they adopted the latest global model and took a share of the work.
    Rejoined {
        /// The first epoch they train in.
        epoch: usize,
        /// Original ranks of the workers that joined.
        joined: Vec<usize>,
        /// Workers now.
        workers: usize,
        /// Each worker's new share of the work.
        shares: Vec<f64>,
        /// The original ranks of the ring's members now, in ring order.
        members: Vec<usize>,
    },
    /// The training state after `epoch` epochs was saved to `path`.
    Checkpointed {
        /// Epochs done.
        epoch: usize,
        /// The checkpoint file.
        path: String,
    },
    /// The run finished; only rank 0 carries the summary.
    Done {
        /// The summary.
        summary: Box<RunSummary>,
    },
}

/// One worker's share of the work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerFigures {
    /// Rank.
    pub rank: usize,
    /// Training samples processed.
    pub samples: u64,
    /// Seconds spent computing (forward, backward, optimiser, batching).
    pub compute_secs: f64,
    /// Seconds spent in collectives (includes waiting for slower workers).
    pub comm_secs: f64,
    /// Samples per second of wall time.
    pub samples_per_sec: f64,
}

/// The machine-readable result of a run (`summary.json` in the job's folder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Workers at the start.
    pub workers: usize,
    /// How the workers combined their work (`training.strategy`).
    #[serde(default)]
    pub strategy: String,
    /// Original ranks of workers lost (and migrated away from) during the run.
    #[serde(default)]
    pub lost_workers: Vec<usize>,
    /// Original ranks of lost workers that came back and rejoined the ring.
    #[serde(default)]
    pub rejoined_workers: Vec<usize>,
    /// Times the split was adjusted to measured throughput.
    #[serde(default)]
    pub rebalances: usize,
    /// Samples sent to workers that lacked them (a machine without the dataset's
    /// files), over the run.
    #[serde(default)]
    pub moved_samples: u64,
    /// Bytes those samples took on the links.
    #[serde(default)]
    pub moved_bytes: u64,
    /// Seconds spent moving them.
    #[serde(default)]
    pub moved_secs: f64,
    /// The epoch this run resumed at from a checkpoint (absent: from scratch).
    #[serde(default)]
    pub resumed_at_epoch: Option<usize>,
    /// Backend the workers ran on.
    pub backend: String,
    /// Epochs trained.
    pub epochs: usize,
    /// Global batch size.
    pub global_batch_size: usize,
    /// Test accuracy after the last epoch, in [0, 1].
    pub test_accuracy: Option<f64>,
    /// Mean test loss after the last epoch.
    pub test_loss: Option<f64>,
    /// Mean training loss of the first and the last epoch.
    pub first_epoch_loss: f64,
    /// Mean training loss of the last epoch.
    pub last_epoch_loss: f64,
    /// Training samples per second, all workers together.
    pub samples_per_sec: f64,
    /// Seconds from the first step to the end of the last evaluation.
    pub wall_secs: f64,
    /// Per-epoch history: (train loss, test accuracy, elapsed seconds).
    pub history: Vec<EpochRecord>,
    /// Each worker's figures.
    pub per_worker: Vec<WorkerFigures>,
    /// Seconds from the first step until the end-of-epoch evaluation first reached
    /// each test accuracy in [`ACCURACY_MARKS`] (marks never reached are absent),
    /// keyed by percent, e.g. `"89"`.
    #[serde(default)]
    pub seconds_to_accuracy: std::collections::BTreeMap<String, f64>,
    /// Global-batch training loss over the run, averaged into at most
    /// a few hundred points (step order).
    pub loss_curve: Vec<f32>,
}

impl Event {
    /// The event as one line of a worker's output (prefix, JSON, no newline).
    pub fn to_line(&self) -> String {
        format!(
            "{EVENT_PREFIX}{}",
            serde_json::to_string(self).expect("events serialise")
        )
    }

    /// The event an event's JSON (a line after its prefix) carries; `None` for
    /// text that is not one (an event this build does not know, damaged JSON).
    pub fn from_json(json: &str) -> Option<Event> {
        serde_json::from_str(json).ok()
    }

    /// The event a line of a worker's output carries, if it carries one.
    pub fn from_line(line: &str) -> Option<Event> {
        line.strip_prefix(EVENT_PREFIX).and_then(Event::from_json)
    }
}

/// Test accuracies whose time of first arrival the summary records.
pub const ACCURACY_MARKS: [u32; 4] = [85, 88, 89, 90];

/// When each of [`ACCURACY_MARKS`] was first reached, from the epoch history.
pub fn seconds_to_accuracy(history: &[EpochRecord]) -> std::collections::BTreeMap<String, f64> {
    ACCURACY_MARKS
        .iter()
        .filter_map(|&mark| {
            history
                .iter()
                .find(|e| e.test_accuracy.is_some_and(|a| a * 100.0 >= mark as f64 - 1e-9))
                .map(|e| (mark.to_string(), e.elapsed_secs))
        })
        .collect()
}

/// One epoch in the summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch, from 0.
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Test accuracy.
    pub test_accuracy: Option<f64>,
    /// Seconds since training started.
    pub elapsed_secs: f64,
    /// The epoch's accounting, from the ring's data assignment at its end.
    #[serde(default)]
    pub coverage: Coverage,
    /// Each worker's share of the work at the epoch's end (how the split
    /// converged; empty from a build before it was recorded).
    #[serde(default)]
    pub shares: Vec<f64>,
}

/// Which training samples an epoch visited, whatever workers were lost or joined in
/// it: `samples == visited == distinct` means none was skipped or visited twice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    /// Training samples in the epoch.
    pub samples: usize,
    /// Visits made (a sample visited twice counts twice).
    pub visited: usize,
    /// Distinct samples visited.
    pub distinct: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_to_accuracy_takes_the_first_epoch_past_each_mark() {
        let e = |epoch, acc, secs| EpochRecord {
            epoch,
            train_loss: 0.0,
            test_accuracy: Some(acc),
            elapsed_secs: secs,
            shares: vec![],
            coverage: Coverage::default(),
        };
        let t = seconds_to_accuracy(&[e(0, 0.865, 37.5), e(1, 0.8993, 73.2), e(2, 0.9092, 108.1)]);
        assert_eq!(t["85"], 37.5);
        assert_eq!(t["88"], 73.2);
        assert_eq!(t["89"], 73.2);
        assert_eq!(t["90"], 108.1);
        assert!(seconds_to_accuracy(&[e(0, 0.5, 1.0)]).is_empty());
    }

    #[test]
    fn an_event_reads_back_from_its_line_and_nothing_else_does() {
        let step = Event::Step {
            epoch: 1,
            step: 4,
            steps: 10,
            loss: 0.5,
            samples_per_sec: 1234.5,
        };
        assert_eq!(Event::from_line(&step.to_line()), Some(step));
        let line = Event::Checkpointed {
            epoch: 2,
            path: "out/checkpoint.bin".into(),
        }
        .to_line();
        assert!(line.starts_with(EVENT_PREFIX) && !line.contains('\n'));
        assert_eq!(Event::from_line("epoch 2 done"), None);
        assert_eq!(Event::from_line(&format!("{EVENT_PREFIX}{{\"type\":\"step\"")), None);
        assert_eq!(
            Event::from_line(&format!("{EVENT_PREFIX}{{\"type\":\"future\"}}")),
            None
        );
    }
}
