//! `hetero bench hetero`: how much of unlike devices' combined speed one job gets.
//!
//! Heterogeneous efficiency = the job's training throughput ÷ the sum of each
//! worker's throughput when it trains alone. Each device is an agent whose workers
//! are capped at a fraction of this machine's speed (`--speeds`, default 1, 0.5,
//! 0.25), one single-threaded worker per agent, so the devices never compete for a
//! core (1 + 0.5 + 0.25 < 2 cores). Every figure comes from the run summaries of real
//! jobs on an embedded cluster (coordinator, agents, worker processes, TCP ring):
//! first each device alone, then the job with an even split, with the weighted split
//! (static compute scores), and with the weighted split rebalanced between epochs to
//! the throughput each worker measured — in the same run. An even split is bound by
//! the slowest device (3 × 0.25 / 1.75 ≈ 0.43 of the sum for the default speeds).
//! The last epoch's figure shows where rebalancing settles.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hetero_cluster::local::LocalCluster;
use hetero_job::events::RunSummary;
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

/// Runs the benchmark and prints its table.
pub fn run(b: &HeteroBench) -> Result<()> {
    if b.speeds.iter().any(|s| !(*s > 0.0 && *s <= 1.0)) {
        bail!("every speed must be in (0, 1]");
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
    let solo_batch = (b.global_batch / n).max(1);
    println!(
        "heterogeneous efficiency: {} {}, {} samples × {} epoch(s), devices at {:?} of this machine",
        b.model,
        if n == 1 { "worker" } else { "workers" },
        b.train_limit,
        b.epochs,
        b.speeds
    );
    let mut solo = Vec::new();
    for &speed in b.speeds {
        let s = rt.block_on(job(b, &data, &[speed], gflops, solo_batch, "even", false))?;
        println!("  alone at {speed}: {:.0} samples/s", s.samples_per_sec);
        solo.push(s.samples_per_sec);
    }
    let sum: f64 = solo.iter().sum();
    println!("  sum of the devices alone: {sum:.0} samples/s");
    println!();
    println!(
        "{:<20} {:>10} {:>11} {:>16} {:>11}   samples per worker",
        "split", "samples/s", "efficiency", "last epoch s/s", "efficiency"
    );
    for (label, split, rebalance) in [
        ("even", "even", false),
        ("weighted", "weighted", false),
        ("weighted+rebalance", "weighted", true),
    ] {
        let s = rt.block_on(job(b, &data, b.speeds, gflops, b.global_batch, split, rebalance))?;
        let per: Vec<String> = s.per_worker.iter().map(|w| w.samples.to_string()).collect();
        let last = last_epoch_rate(&s, b.train_limit);
        println!(
            "{label:<20} {:>10.0} {:>11.3} {:>16.0} {:>11.3}   {}",
            s.samples_per_sec,
            s.samples_per_sec / sum,
            last,
            last / sum,
            per.join(" / ")
        );
    }
    Ok(())
}

/// Samples/s of the last epoch (its samples over the time since the previous one).
fn last_epoch_rate(s: &RunSummary, samples: usize) -> f64 {
    match s.history.as_slice() {
        [.., a, b] => samples as f64 / (b.elapsed_secs - a.elapsed_secs).max(1e-9),
        [only] => samples as f64 / only.elapsed_secs.max(1e-9),
        [] => 0.0,
    }
}

/// One job on a fresh embedded cluster with one single-slot agent per speed.
async fn job(
    b: &HeteroBench<'_>,
    data: &Path,
    speeds: &[f32],
    gflops: f32,
    batch: usize,
    split: &str,
    rebalance: bool,
) -> Result<RunSummary> {
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
        b.epochs,
        speeds.len(),
        out.path().display()
    );
    let mut c = cluster.client().await?;
    let job_id = client::submit(&mut c, &spec, "/").await?;
    let info = client::wait_for(&mut c, &job_id, Duration::from_secs(3600), client::has_ended).await?;
    cluster.shutdown().await;
    if info.state != hetero_proto::JobState::Succeeded as i32 {
        bail!("the {split} job on {speeds:?} did not succeed: {}", info.message);
    }
    serde_json::from_str(&info.summary_json).context("reading the run summary")
}
