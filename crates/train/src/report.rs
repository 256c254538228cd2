//! What a training run tells the world: progress events while it runs, and a
//! machine-readable summary at the end.

use serde::{Deserialize, Serialize};

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
    /// follow `shares` (one per worker, summing to 1) from `epoch` on.
    Rebalanced {
        /// The first epoch with the new split.
        epoch: usize,
        /// Each worker's new share of the work.
        shares: Vec<f64>,
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
    /// [`LOSS_CURVE_POINTS`] points (step order).
    pub loss_curve: Vec<f32>,
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

/// Most points kept in [`RunSummary::loss_curve`].
pub const LOSS_CURVE_POINTS: usize = 400;

/// Averages `losses` into at most `points` buckets of consecutive steps.
pub fn downsample(losses: &[f32], points: usize) -> Vec<f32> {
    if losses.len() <= points {
        return losses.to_vec();
    }
    (0..points)
        .map(|i| {
            let (a, b) = (losses.len() * i / points, losses.len() * (i + 1) / points);
            losses[a..b].iter().sum::<f32>() / (b - a) as f32
        })
        .collect()
}

/// The loss curve as a self-contained SVG picture.
pub fn loss_curve_svg(curve: &[f32], title: &str) -> String {
    let (w, h, pad) = (640.0f32, 320.0f32, 40.0f32);
    let max = curve.iter().cloned().fold(f32::MIN, f32::max).max(1e-6);
    let n = curve.len().max(2) - 1;
    let points: Vec<String> = curve
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let x = pad + (w - 2.0 * pad) * i as f32 / n as f32;
            let y = h - pad - (h - 2.0 * pad) * (l / max);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{pad}" y="20">{title}</text>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="black"/>
<text x="4" y="{top}">{max:.2}</text><text x="4" y="{b}">0</text>
<text x="{r}" y="{lbl}" text-anchor="end">training steps →</text>
<polyline fill="none" stroke="#1f6feb" stroke-width="1.5" points="{pts}"/>
</svg>
"##,
        b = h - pad,
        r = w - pad,
        top = pad + 4.0,
        lbl = h - 12.0,
        pts = points.join(" ")
    )
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
    fn downsample_keeps_means() {
        assert_eq!(downsample(&[1.0, 2.0], 5), vec![1.0, 2.0]);
        assert_eq!(downsample(&[1.0, 3.0, 5.0, 7.0], 2), vec![2.0, 6.0]);
    }

    #[test]
    fn svg_has_one_point_per_value() {
        let svg = loss_curve_svg(&[2.3, 1.0, 0.5], "loss");
        assert!(svg.starts_with("<svg"));
        let pts = svg.split("points=\"").nth(1).unwrap().split('"').next().unwrap();
        assert_eq!(pts.split(' ').count(), 3);
    }
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
