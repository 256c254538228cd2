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
//! then each device alone at each local batch the jobs ended with. An even split
//! is bound by the slowest device (n × its speed ÷ the sum), printed beside it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hetero_cluster::local::LocalCluster;
use hetero_data::shard::Split;
use hetero_job::events::RunSummary;
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
    /// Fashion-MNIST folder.
    pub data: &'a Path,
}

/// How a job divides its work.
#[derive(Debug, Clone, Copy)]
struct Variant {
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

/// Epochs of a device's solo run: its speed is steady after the first.
const SOLO_EPOCHS: usize = 2;

/// Runs the benchmark and prints its table.
pub fn run(b: &HeteroBench) -> Result<()> {
    if b.speeds.iter().any(|s| !(*s > 0.0 && *s <= 1.0)) {
        bail!("every speed must be in (0, 1]");
    }
    if b.speeds.len() < 2 {
        bail!("give two or more devices (--speeds 1,0.5,0.25)");
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
    println!(
        "heterogeneous efficiency: {} workers of {}, {} samples × {} epoch(s), global batch {}, devices at {:?} of one core",
        n, b.model, b.train_limit, b.epochs, b.global_batch, b.speeds
    );
    let mut jobs = Vec::new();
    for v in VARIANTS {
        let r = rt.block_on(job(b, &data, b.speeds, gflops, b.global_batch, v, b.epochs))?;
        let s = &r.summary;
        println!(
            "  {:<20} {:.0} samples/s over {:.1} s",
            v.label, s.samples_per_sec, s.wall_secs
        );
        jobs.push((v, r));
    }
    // Each device alone at every local batch a job ended with.
    let mut solo: BTreeMap<(usize, usize), f64> = BTreeMap::new();
    for (_, r) in &jobs {
        for (device, batch) in r.final_batches(b.global_batch).into_iter().enumerate() {
            if let std::collections::btree_map::Entry::Vacant(slot) = solo.entry((device, batch)) {
                let alone = Variant {
                    label: "alone",
                    weighted: false,
                    rebalance: false,
                };
                let speed = b.speeds[device];
                let r = rt.block_on(job(b, &data, &[speed], gflops, batch, alone, SOLO_EPOCHS.min(b.epochs)))?;
                let rate = r.summary.samples_per_sec;
                println!("  device {device} (speed {speed}) alone at batch {batch}: {rate:.0} samples/s");
                slot.insert(rate);
            }
        }
    }
    let alone = |r: &JobRun| -> Vec<f64> {
        let batches = r.final_batches(b.global_batch);
        batches.iter().enumerate().map(|(d, &bt)| solo[&(d, bt)]).collect()
    };
    // The even split's bound: every device steps at the slowest one's pace.
    let even_alone = alone(&jobs[0].1);
    let slowest = even_alone.iter().cloned().fold(f64::INFINITY, f64::min);
    let even_bound = n as f64 * slowest / even_alone.iter().sum::<f64>();
    println!();
    println!("devices slowed by {}", jobs[0].1.slowed);
    println!(
        "{:<20} {:>10} {:>10} {:>11}   by device: local batch, samples, compute s / comm s",
        "split", "samples/s", "sum alone", "efficiency"
    );
    for (v, r) in &jobs {
        let s = &r.summary;
        let sum: f64 = alone(r).iter().sum();
        let batches = r.final_batches(b.global_batch);
        let figures: Vec<String> = r
            .by_device(&s.per_worker)
            .iter()
            .zip(&batches)
            .map(|(w, batch)| format!("{batch}, {}, {:.1}/{:.1}", w.samples, w.compute_secs, w.comm_secs))
            .collect();
        println!(
            "{:<20} {:>10.0} {:>10.0} {:>11.3}   {}",
            v.label,
            s.samples_per_sec,
            sum,
            s.samples_per_sec / sum,
            figures.join(" | ")
        );
    }
    println!("the even split's bound (n × the slowest alone ÷ the sum): {even_bound:.3}");
    println!();
    println!("how the weighted splits converged (shares by device at each epoch's end):");
    let total: f64 = b.speeds.iter().map(|&s| s as f64).sum();
    let scores: Vec<f64> = b.speeds.iter().map(|&s| s as f64 / total).collect();
    for (v, r) in jobs.iter().filter(|(v, _)| v.weighted) {
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

fn percentages(shares: &[f64]) -> String {
    shares
        .iter()
        .map(|s| format!("{:.1}", s * 100.0))
        .collect::<Vec<_>>()
        .join("/")
        + " %"
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

    /// Per-rank figures listed by device.
    fn by_device<T: Clone>(&self, per_rank: &[T]) -> Vec<T> {
        let mut order: Vec<usize> = (0..self.devices.len()).collect();
        order.sort_by_key(|&r| self.devices[r]);
        order.into_iter().filter_map(|r| per_rank.get(r).cloned()).collect()
    }
}

async fn job(
    b: &HeteroBench<'_>,
    data: &Path,
    speeds: &[f32],
    gflops: f32,
    batch: usize,
    variant: Variant,
    epochs: usize,
) -> Result<JobRun> {
    let split = if variant.weighted { "weighted" } else { "even" };
    let rebalance = variant.rebalance;
    let program = std::env::current_exe()?;
    let out = tempfile::tempdir()?;
    let cluster = LocalCluster::start_agents(speeds.len(), |i, agent| {
        agent.slots = 1;
        agent.worker_program = program.clone();
        agent.gflops = gflops;
        agent.speed = speeds[i];
    })
    .await?;
    let spec = format!(
        "name = \"bench-{split}\"\n[model]\nkind = \"{}\"\n[dataset]\npath = \"{}\"\ntrain_limit = {}\ntest_limit = 100\n\
         split = \"{split}\"\nrebalance = {rebalance}\n[training]\nepochs = {}\nglobal_batch_size = {batch}\ncheckpoint_every = 0\n\
         [cluster]\nworkers = {}\nthreads_per_worker = 1\n[output]\ndir = \"{}\"\n",
        b.model,
        data.display(),
        b.train_limit,
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
