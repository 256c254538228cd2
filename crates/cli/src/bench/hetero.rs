//! `hetero bench hetero`: how much of unlike devices' combined speed one job gets.
//!
//! Heterogeneous efficiency = the job's training throughput over the whole run ÷
//! the sum of each device's throughput when it trains alone at the local batch it
//! has in the job (a smaller batch is slower per sample, so the job is not blamed
//! for that). Each device is an agent whose workers are capped at a fraction of
//! this machine's speed (`--speeds`, default 1, 0.5, 0.25) — by a CPU quota where
//! the machine allows one, else by the sleep throttle, and the table says which —
//! one single-threaded worker per agent. Every figure comes from the run summaries
//! of real jobs on an embedded cluster (coordinator, agents, worker processes, TCP
//! ring), in the same run: the job with an even split, with the weighted split
//! (compute scores as the starting guess, then set from the throughput measured a
//! few steps into the first epoch), and weighted and rebalanced between epochs;
//! each job is followed by its devices alone at the local batches it ended with,
//! each for about as long as the job ran, so a baseline is measured minutes, not
//! a quarter of an hour, from the job it judges, and `--rounds` repeats the lot
//! to show the spread. Each device runs on CPUs packed for it
//! ([`cpu_pin::pack`]: at 1 / 0.5 / 0.25 on two cores, a core for the full-speed
//! device and one shared by the others), in the job and alone, as separate
//! machines would; `--no-pin` lets them share every core. The devices alone are
//! measured twice: one after another on an idle host, and all at once (each in a
//! job of its own), which loads the host as the job does — see [`solo_rates`]. The
//! workers combine their work by `--strategy` (the spec's `training.strategy`)
//! and exchange at `--exchange-precision`. An even split is bound by the slowest
//! device (n × its speed ÷ the sum), printed beside it.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hetero_cluster::cpu_pin::{self, CpuSet};
use hetero_cluster::local::LocalCluster;
use hetero_data::shard::Split;
use hetero_job::events::RunSummary;
use hetero_job::{ExchangePrecision, Strategy};
use hetero_proto as pb;
use hetero_proto::client;

/// What to train in each run.
pub struct HeteroBench<'a> {
    /// Speed cap of each device, in (0, 1].
    pub speeds: &'a [f32],
    /// `cnn` or `mlp`.
    pub model: &'a str,
    /// Training samples per epoch.
    pub train_limit: usize,
    /// Samples per step over all workers.
    pub global_batch: usize,
    /// Epochs per run.
    pub epochs: usize,
    /// How the job's workers combine their work (a device alone just steps).
    pub strategy: Strategy,
    /// How the floats they exchange travel.
    pub precision: ExchangePrecision,
    /// Times every variant is measured (each with its own solo baselines).
    pub rounds: usize,
    /// The splits to run, in [`VARIANTS`]' order (see [`splits`]).
    pub splits: Vec<Variant>,
    /// Exchange while computing (the spec's `training.overlap`).
    pub overlap: bool,
    /// Pin each device to cores of its own ([`cpu_pin::pack`]), in the job and alone.
    pub pin: bool,
    /// Fashion-MNIST folder.
    pub data: &'a Path,
}

/// How a job divides its work.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Variant {
    label: &'static str,
    weighted: bool,
    rebalance: bool,
}

const VARIANTS: [Variant; 3] = [
    Variant {
        label: "even",
        weighted: false,
        rebalance: false,
    },
    Variant {
        label: "weighted",
        weighted: true,
        rebalance: false,
    },
    Variant {
        label: "weighted+rebalance",
        weighted: true,
        rebalance: true,
    },
];

/// A device training alone.
const ALONE: Variant = Variant {
    label: "alone",
    weighted: false,
    rebalance: false,
};

/// The fewest samples a device trains on alone (over as many epochs of a smaller
/// `--train-limit` as it takes, the first step's warm-up included, as in the job).
const LEAST_SOLO_SAMPLES: usize = 2000;

/// Each device's samples/s training alone on `samples[device]` samples at
/// `batches[device]` (see [`JobRun::solo_samples`]): one device after
/// another on an otherwise idle host, or (`at_once`) every device at once, each
/// in a job of its own, so the host is as loaded as in the job. Unpinned, the
/// devices of this emulation share two cores: a device computes 10–20 % slower
/// while the others run, which the first baseline blames on the job and the
/// second does not; separate machines would not share them. Pinned, each device
/// runs on its `pins[device]` alone too.
fn solo_rates(
    b: &HeteroBench,
    rt: &tokio::runtime::Runtime,
    data: &Path,
    gflops: f32,
    (batches, samples): (&[usize], &[usize]),
    pins: &[CpuSet],
    at_once: bool,
) -> Result<Vec<f64>> {
    let solo = |device: usize| -> Result<f64> {
        let (speed, batch, samples) = (b.speeds[device], batches[device], samples[device]);
        let limit = b.train_limit.min(samples);
        let run = rt.block_on(job(
            b,
            data,
            (&[speed], pins.get(device..=device).unwrap_or_default()),
            gflops,
            batch,
            ALONE,
            (limit, samples.div_ceil(limit)),
        ))?;
        Ok(run.summary.samples_per_sec)
    };
    let rates: Vec<f64> = if at_once {
        std::thread::scope(|s| {
            let running: Vec<_> = (0..b.speeds.len()).map(|d| s.spawn(move || solo(d))).collect();
            running
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a solo run panicked"))))
                .collect::<Result<_>>()
        })?
    } else {
        (0..b.speeds.len()).map(solo).collect::<Result<_>>()?
    };
    let how = if at_once { "all at once" } else { "one at a time" };
    let each: Vec<String> = rates
        .iter()
        .zip(batches)
        .enumerate()
        .map(|(d, (rate, batch))| format!("device {d} at batch {batch}: {rate:.0}"))
        .collect();
    println!("    alone, {how}: {} samples/s", each.join(", "));
    Ok(rates)
}

/// Runs the benchmark and prints its table.
pub fn run(b: &HeteroBench) -> Result<()> {
    if b.speeds.iter().any(|s| !(*s > 0.0 && *s <= 1.0)) {
        bail!("every speed must be in (0, 1]");
    }
    if b.speeds.len() < 2 {
        bail!("give two or more devices (--speeds 1,0.5,0.25)");
    }
    if b.train_limit == 0 {
        bail!("--train-limit must be at least 1 (samples per epoch)");
    }
    if b.precision != ExchangePrecision::F32 && b.strategy.uses_parameter_server() {
        bail!("--exchange-precision applies to allreduce and local-sgd; a parameter server's exchange is f32");
    }
    let data = std::path::absolute(b.data)?;
    if !hetero_data::mnist::is_complete(&data) {
        bail!(
            "{} does not hold Fashion-MNIST (try data/fashion-mnist-subset)",
            data.display()
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let gflops = hetero_worker::backend::measure_gflops(hetero_job::Backend::Flex);
    let n = b.speeds.len();
    let demands: Vec<f64> = b.speeds.iter().map(|&s| s as f64).collect();
    let (pins, pinned) = match b.pin.then(|| cpu_pin::pack_here(&demands)) {
        Some(Ok(pins)) => {
            let each: Vec<String> = pins.iter().map(|p| p.to_string()).collect();
            let how = format!(
                "each device on its own CPUs ({}), in the job and alone",
                each.join(" | ")
            );
            (pins, how)
        }
        Some(Err(why)) => (vec![], format!("not pinned: {why}; the devices share every core")),
        None => (vec![], "not pinned (--no-pin): the devices share every core".into()),
    };
    println!(
        "heterogeneous efficiency: {} workers of {}, {} samples × {} epoch(s), global batch {}, devices at {:?} of one core, {}, exchange_precision = {}, overlap = {}",
        n,
        b.model,
        b.train_limit,
        b.epochs,
        b.global_batch,
        b.speeds,
        b.strategy.spec_lines().trim().replace('\n', ", "),
        b.precision.name(),
        b.overlap
    );
    println!("{pinned}");
    // Rounds of every variant, each job followed by its devices alone: the host's
    // speed drifts by ±10 % over minutes, so a baseline is measured next to the
    // job it judges, and rounds show the spread.
    let mut runs: Vec<(Variant, Measured)> = Vec::new();
    for round in 1..=b.rounds {
        for &v in &b.splits {
            let run = rt.block_on(job(
                b,
                &data,
                (b.speeds, &pins),
                gflops,
                b.global_batch,
                v,
                (b.train_limit, b.epochs),
            ))?;
            let s = &run.summary;
            println!(
                "  round {round} {:<20} {:.0} samples/s over {:.1} s",
                v.label, s.samples_per_sec, s.wall_secs
            );
            let work = (&run.final_batches(b.global_batch)[..], &run.solo_samples()[..]);
            let alone = solo_rates(b, &rt, &data, gflops, work, &pins, false)?;
            let together = solo_rates(b, &rt, &data, gflops, work, &pins, true)?;
            runs.push((v, Measured { run, alone, together }));
        }
    }
    println!();
    println!("devices slowed by {}", runs[0].1.run.slowed);
    println!(
        "{:<24} {:>10} {:>10} {:>11} {:>10} {:>11} {:>9} {:>10}   by device: local batch, samples, compute s / comm s",
        "split (round)", "samples/s", "sum alone", "efficiency", "sum at once", "efficiency", "accuracy", "last loss"
    );
    for (i, (v, m)) in runs.iter().enumerate() {
        let label = format!("{} ({})", v.label, i / b.splits.len() + 1);
        let s = &m.run.summary;
        let batches = m.run.final_batches(b.global_batch);
        let figures: Vec<String> = m
            .run
            .by_device(&s.per_worker)
            .iter()
            .zip(&batches)
            .map(|(w, batch)| format!("{batch}, {}, {:.1}/{:.1}", w.samples, w.compute_secs, w.comm_secs))
            .collect();
        println!(
            "{:<24} {:>10.0} {:>10.0} {:>11.3} {:>10.0} {:>11.3} {:>9} {:>10.4}   {}",
            label,
            s.samples_per_sec,
            m.alone.iter().sum::<f64>(),
            m.efficiency(&m.alone),
            m.together.iter().sum::<f64>(),
            m.efficiency(&m.together),
            s.test_accuracy.map_or("-".into(), |a| format!("{:.1} %", a * 100.0)),
            s.last_epoch_loss,
            figures.join(" | ")
        );
    }
    println!();
    println!(
        "over {} round(s): median efficiency (lowest–highest), against the devices alone one at a time | all at once",
        b.rounds
    );
    for &v in &b.splits {
        let of_variant: Vec<&Measured> = runs
            .iter()
            .filter(|(r, _)| r.label == v.label)
            .map(|(_, m)| m)
            .collect();
        let (median, low, high) = spread(of_variant.iter().map(|m| m.efficiency(&m.alone)).collect());
        let (median_t, low_t, high_t) = spread(of_variant.iter().map(|m| m.efficiency(&m.together)).collect());
        println!(
            "  {:<20} {median:.3} ({low:.3}–{high:.3}) | {median_t:.3} ({low_t:.3}–{high_t:.3})",
            v.label
        );
    }
    // The even split's bound: every device steps at the slowest one's pace.
    let bounds: Vec<f64> = runs
        .iter()
        .filter(|(v, _)| !v.weighted)
        .map(|(_, m)| n as f64 * m.alone.iter().cloned().fold(f64::INFINITY, f64::min) / m.alone.iter().sum::<f64>())
        .collect();
    if !bounds.is_empty() {
        let (median, low, high) = spread(bounds);
        println!("  the even split's bound (n × the slowest alone ÷ the sum): {median:.3} ({low:.3}–{high:.3})");
    }
    if !b.splits.iter().any(|v| v.weighted) {
        return Ok(());
    }
    println!();
    println!("how the weighted splits converged (shares by device at each epoch's end):");
    let total: f64 = b.speeds.iter().map(|&s| s as f64).sum();
    let scores: Vec<f64> = b.speeds.iter().map(|&s| s as f64 / total).collect();
    for (v, r) in runs.iter().filter(|(v, _)| v.weighted).map(|(v, m)| (v, &m.run)) {
        let mut steps = vec![format!("scores {}", percentages(&scores))];
        steps.extend(
            r.summary
                .history
                .iter()
                .map(|h| format!("epoch {} {}", h.epoch + 1, percentages(&r.by_device(&h.shares)))),
        );
        println!("  {:<20} {}", v.label, steps.join(" → "));
    }
    Ok(())
}

/// The splits named on the command line (`--splits`), in [`VARIANTS`]' order.
pub fn splits(names: &[String]) -> Result<Vec<Variant>> {
    let known = || VARIANTS.map(|v| v.label).join(", ");
    for name in names {
        if !VARIANTS.iter().any(|v| v.label == name) {
            bail!("--splits {name:?}: each one of {}", known());
        }
    }
    let chosen: Vec<Variant> = VARIANTS
        .into_iter()
        .filter(|v| names.iter().any(|n| n == v.label))
        .collect();
    if chosen.is_empty() {
        bail!("--splits: name one or more of {}", known());
    }
    Ok(chosen)
}

/// The precision named on the command line (`--exchange-precision`).
pub fn precision(name: &str) -> Result<ExchangePrecision> {
    ExchangePrecision::from_name(name)
        .with_context(|| format!("--exchange-precision {name:?}: one of {}", ExchangePrecision::NAMES))
}

/// The strategy named on the command line (`--strategy`, `--sync-every`).
pub fn strategy(name: &str, sync_every: Option<usize>) -> Result<Strategy> {
    let Some(strategy) = Strategy::from_spec(name, sync_every, None) else {
        bail!("--strategy {name:?}: one of {}", Strategy::NAMES);
    };
    match (strategy, sync_every) {
        (Strategy::LocalSgd { sync_every: 0 }, _) => bail!("--sync-every must be at least 1"),
        (Strategy::LocalSgd { .. }, _) | (_, None) => Ok(strategy),
        (_, Some(_)) => bail!("--sync-every is only read with --strategy local-sgd"),
    }
}

fn percentages(shares: &[f64]) -> String {
    shares
        .iter()
        .map(|s| format!("{:.1}", s * 100.0))
        .collect::<Vec<_>>()
        .join("/")
        + " %"
}

/// The median, lowest and highest of `values` (not empty).
fn spread(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    (median, values[0], values[n - 1])
}

/// A job of the benchmark and each device's speed alone, measured right after
/// it at the local batch the device ended the job with.
struct Measured {
    run: JobRun,
    /// Samples/s of each device alone, one at a time, by device.
    alone: Vec<f64>,
    /// Samples/s of each device alone, all at once, by device.
    together: Vec<f64>,
}

impl Measured {
    /// The job's throughput over the sum of its devices' rates `alone`
    /// (`self.alone` or `self.together`).
    fn efficiency(&self, alone: &[f64]) -> f64 {
        self.run.summary.samples_per_sec / alone.iter().sum::<f64>()
    }
}

/// A finished job of the benchmark.
struct JobRun {
    summary: RunSummary,
    /// How its devices were slowed (from the workers' logs).
    slowed: String,
    /// The device (index into the speeds) each rank ran on.
    devices: Vec<usize>,
}

impl JobRun {
    /// Each device's local batch at the end of the run (by its last epoch's
    /// shares; an even split when they were not recorded), by device.
    fn final_batches(&self, global: usize) -> Vec<usize> {
        let s = &self.summary;
        let shares = s.history.last().map(|h| h.shares.clone()).unwrap_or_default();
        let split = if shares.len() == s.workers {
            Split::weighted(&shares)
        } else {
            Split::even(s.workers)
        };
        let by_rank = split.local_batches(global);
        let mut by_device = vec![0; by_rank.len()];
        for (rank, &device) in self.devices.iter().enumerate() {
            by_device[device] = by_rank[rank];
        }
        by_device
    }

    /// How many samples each device trains on alone, by device: as many as it
    /// computes in the job's wall time at the rate it computed in the job, so
    /// that every baseline spans about as long as the job (the host's speed
    /// drifts over seconds too, and a short baseline catches one moment of it)
    /// and, all at once, the devices load the host for all of it.
    fn solo_samples(&self) -> Vec<usize> {
        let wall = self.summary.wall_secs;
        self.by_device(&self.summary.per_worker)
            .iter()
            .map(|w| {
                let rate = w.samples as f64 / w.compute_secs.max(1e-9);
                let samples = if rate.is_finite() { rate * wall } else { 0.0 };
                (samples.min(1e9) as usize).max(LEAST_SOLO_SAMPLES)
            })
            .collect()
    }

    /// Per-rank figures listed by device.
    fn by_device<T: Clone>(&self, per_rank: &[T]) -> Vec<T> {
        let mut order: Vec<usize> = (0..self.devices.len()).collect();
        order.sort_by_key(|&r| self.devices[r]);
        order.into_iter().filter_map(|r| per_rank.get(r).cloned()).collect()
    }
}

/// One job on devices at `speeds`, each pinned to `pins[device]` (unpinned when
/// `pins` is empty).
async fn job(
    b: &HeteroBench<'_>,
    data: &Path,
    (speeds, pins): (&[f32], &[CpuSet]),
    gflops: f32,
    batch: usize,
    variant: Variant,
    (train_limit, epochs): (usize, usize),
) -> Result<JobRun> {
    let split = if variant.weighted { "weighted" } else { "even" };
    let rebalance = variant.rebalance;
    // A device alone just steps: its strategy would only add a server to wait on.
    let strategy = if speeds.len() > 1 {
        format!(
            "{}exchange_precision = \"{}\"\noverlap = {}\n",
            b.strategy.spec_lines(),
            b.precision.name(),
            b.overlap
        )
    } else {
        Strategy::Allreduce.spec_lines()
    };
    let program = std::env::current_exe()?;
    let out = tempfile::tempdir()?;
    let cluster = LocalCluster::start_agents(speeds.len(), |i, agent| {
        agent.slots = 1;
        agent.worker_program = program.clone();
        agent.gflops = gflops;
        agent.speed = speeds[i];
        agent.cpus = pins.get(i).cloned();
    })
    .await?;
    let spec = format!(
        "name = \"bench-{split}\"\n[model]\nkind = \"{}\"\n[dataset]\npath = \"{}\"\ntrain_limit = {}\ntest_limit = 100\n\
         split = \"{split}\"\nrebalance = {rebalance}\n[training]\nepochs = {}\nglobal_batch_size = {batch}\ncheckpoint_every = 0\n\
         {strategy}[cluster]\nworkers = {}\nthreads_per_worker = 1\n[output]\ndir = \"{}\"\n",
        b.model,
        data.display(),
        train_limit,
        epochs,
        speeds.len(),
        out.path().display()
    );
    let mut c = cluster.client().await?;
    let job_id = client::submit(&mut c, &spec, "/").await?;
    let info = client::wait_for(&mut c, &job_id, Duration::from_secs(3600), client::has_ended).await?;
    let logs = client::log_texts(&mut c, &job_id).await.unwrap_or_default();
    let nodes = c
        .list_nodes(pb::ListNodesRequest {})
        .await
        .map(|r| r.into_inner().nodes);
    cluster.shutdown().await;
    if info.state != hetero_proto::JobState::Succeeded as i32 {
        bail!("the {split} job on {speeds:?} did not succeed: {}", info.message);
    }
    // Agent i's hostname is local-i: each rank's device from the node it ran on.
    let nodes = nodes.context("listing the nodes")?;
    let device_of = |agent: &str| {
        nodes
            .iter()
            .find(|n| n.agent_id == agent)
            .and_then(|n| n.hostname.strip_prefix("local-")?.parse::<usize>().ok())
            .filter(|&d| d < speeds.len())
    };
    let mut devices = vec![None; speeds.len()];
    for t in info.tasks.iter().filter(|t| (t.rank as usize) < speeds.len()) {
        devices[t.rank as usize] = device_of(&t.agent_id);
    }
    let devices: Vec<usize> = devices
        .into_iter()
        .enumerate()
        .map(|(rank, d)| d.with_context(|| format!("rank {rank} ran on no known device")))
        .collect::<Result<_>>()?;
    let slowed: Vec<String> = logs
        .iter()
        .filter_map(|l| {
            l.split_once("slowed to emulate a slower device by ")
                .map(|(_, how)| how.to_string())
                .or_else(|| {
                    l.contains("idles to emulate a slower device")
                        .then(|| "the sleep throttle".into())
                })
        })
        .collect();
    let slowed = match slowed.first() {
        Some(how) => how.clone(),
        None => "nothing (every device at full speed)".into(),
    };
    let summary = serde_json::from_str(&info.summary_json).context("reading the run summary")?;
    Ok(JobRun {
        summary,
        slowed,
        devices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_names_a_strategy_and_only_local_sgd_reads_sync_every() {
        assert_eq!(strategy("allreduce", None).unwrap(), Strategy::Allreduce);
        assert_eq!(
            strategy("local-sgd", None).unwrap(),
            Strategy::LocalSgd { sync_every: 8 }
        );
        assert_eq!(
            strategy("local-sgd", Some(4)).unwrap().spec_lines(),
            "strategy = \"local-sgd\"\nsync_every = 4\n"
        );
        let wrong = strategy("ring", None).unwrap_err().to_string();
        assert!(wrong.contains("\"ring\"") && wrong.contains("local-sgd"), "{wrong}");
        assert!(strategy("allreduce", Some(4)).is_err());
        assert!(strategy("local-sgd", Some(0)).is_err());
    }

    #[test]
    fn the_command_line_names_splits_and_they_run_in_one_order() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let chosen = splits(&names(&["weighted+rebalance", "even"])).unwrap();
        assert_eq!(chosen, vec![VARIANTS[0], VARIANTS[2]]);
        let wrong = splits(&names(&["uneven"])).unwrap_err().to_string();
        assert!(
            wrong.contains("\"uneven\"") && wrong.contains("weighted+rebalance"),
            "{wrong}"
        );
        assert!(splits(&[]).is_err());
    }

    #[test]
    fn spread_gives_the_median_and_the_extremes() {
        assert_eq!(spread(vec![0.9, 0.7, 0.8]), (0.8, 0.7, 0.9));
        assert_eq!(spread(vec![0.6, 0.8]), (0.7, 0.6, 0.8));
    }
}
