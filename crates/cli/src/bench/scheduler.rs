//! `hetero bench scheduler`: the coordinator under load. Simulated agents (gRPC
//! clients in this process, each offering one CPU group) heartbeat, take the tasks
//! they are assigned and report them finished at once, while a client submits a
//! burst of jobs. Prints placement decisions per second — the pure placement
//! function, and end to end through gRPC and the store — and heartbeat latency.

use std::time::{Duration, Instant};

use anyhow::Result;
use hetero_cluster::coordinator::{Coordinator, CoordinatorConfig};
use hetero_cluster::scheduler::{self, Demand, GroupCapacity};
use hetero_job::Policy;
use hetero_proto as pb;
use rand::{Rng, SeedableRng};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs the benchmark with `jobs` jobs against `groups` simulated groups.
pub fn run(jobs: usize, groups: usize) -> Result<()> {
    // 1. The placement function alone.
    let caps: Vec<GroupCapacity> = (0..groups)
        .map(|i| GroupCapacity {
            agent_id: format!("node-{i}"),
            kind: "cpu".into(),
            free_slots: 4,
            free_memory_mb: 16_000,
        })
        .collect();
    let started = Instant::now();
    let mut decisions = 0u64;
    while started.elapsed() < Duration::from_millis(500) {
        for policy in [Policy::Uniform, Policy::ResourceState] {
            let d = Demand {
                workers: 1 + (decisions % 8) as u32,
                kind: "cpu".into(),
                memory_mb: 1000,
                policy,
            };
            std::hint::black_box(scheduler::place(&d, &caps));
            decisions += 1;
        }
    }
    let pure = decisions as f64 / started.elapsed().as_secs_f64();
    println!("placement function: {pure:.0} decisions/s over {groups} groups");

    // 2. End to end.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let dir = tempfile::tempdir()?;
        let token = "bench";
        let mut config = CoordinatorConfig::new(dir.path().join("c.redb"), token);
        config.heartbeat_interval = Duration::from_millis(200);
        let coordinator = Coordinator::open(config)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        tokio::spawn(coordinator.serve(listener, std::future::pending()));

        let (lat_tx, mut lat_rx) = tokio::sync::mpsc::unbounded_channel::<Duration>();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        for i in 0..groups {
            let mut c = hetero_proto::client::connect(&address, token).await?;
            let id = c
                .register_agent(pb::RegisterAgentRequest {
                    protocol_version: hetero_proto::PROTOCOL_VERSION,
                    agent_id: String::new(),
                    hostname: format!("sim-{i}"),
                    agent_key: String::new(),
                    groups: vec![pb::ResourceGroup {
                        kind: "cpu".into(),
                        devices: 4,
                        memory_bytes: 16 << 30,
                        worker_slots: 4,
                        ..Default::default()
                    }],
                })
                .await?
                .into_inner()
                .agent_id;
            let (lat_tx, stop_rx) = (lat_tx.clone(), stop_rx.clone());
            tokio::spawn(async move {
                // Stagger the agents over one interval, as real ones would be.
                tokio::time::sleep(Duration::from_millis((i as u64 * 200) / groups as u64)).await;
                while !*stop_rx.borrow() {
                    let t = Instant::now();
                    let Ok(resp) = c
                        .heartbeat(pb::HeartbeatRequest {
                            agent_id: id.clone(),
                            tasks: vec![],
                            usage: vec![],
                        })
                        .await
                    else {
                        break;
                    };
                    let _ = lat_tx.send(t.elapsed());
                    for a in resp.into_inner().start {
                        let _ = c
                            .report_task(pb::ReportTaskRequest {
                                agent_id: id.clone(),
                                task_id: a.task_id,
                                state: pb::TaskState::Succeeded as i32,
                                message: "simulated".into(),
                                ..Default::default()
                            })
                            .await;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        }

        let mut client = hetero_proto::client::connect(&address, token).await?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let started = Instant::now();
        for _ in 0..jobs {
            let workers = rng.random_range(1..=4);
            let priority = rng.random_range(-5..=5);
            let policy = if rng.random_bool(0.5) { "uniform" } else { "resource-state" };
            let spec = format!(
                "[model]\nkind = \"custom\"\n[task]\nprogram = \"/bin/true\"\n[dataset]\npath = \"/nonexistent\"\n\
                 [cluster]\nworkers = {workers}\n[training]\nglobal_batch_size = 8\n\
                 [scheduling]\npriority = {priority}\npolicy = \"{policy}\"\n"
            );
            client.submit_job(pb::SubmitJobRequest { spec_toml: spec, base_dir: String::new() }).await?;
        }
        let submitted = started.elapsed();
        let progress = indicatif::ProgressBar::new(jobs as u64);
        loop {
            let listed = client.list_jobs(pb::ListJobsRequest {}).await?.into_inner().jobs;
            let done = listed.iter().filter(|j| j.state == pb::JobState::Succeeded as i32).count();
            progress.set_position(done as u64);
            if done == jobs {
                break;
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "jobs did not finish in 10 minutes");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        progress.finish_and_clear();
        let total = started.elapsed();
        let _ = stop_tx.send(true);
        let mut lat = Vec::new();
        while let Ok(l) = lat_rx.try_recv() {
            lat.push(l);
        }
        lat.sort();
        println!(
            "end to end: {jobs} jobs submitted in {:.2} s ({:.0} submissions/s); all placed and finished in {:.2} s ({:.0} jobs/s)",
            submitted.as_secs_f64(),
            jobs as f64 / submitted.as_secs_f64(),
            total.as_secs_f64(),
            jobs as f64 / total.as_secs_f64()
        );
        println!(
            "heartbeats under that load: {} handled, latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            lat.len(),
            percentile(&lat, 0.5).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3,
            lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3
        );
        Ok(())
    })
}
