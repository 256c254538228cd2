//! `hetero local`: the embedded default. A coordinator, one agent and the job's
//! worker processes on this machine, talking real gRPC and a real TCP data plane,
//! exactly as a multi-machine cluster does.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use hetero_cluster::cpu_pin::{self, CpuSet};
use hetero_cluster::local::LocalCluster;
use hetero_job::{Backend, JobSpec};
use hetero_proto as pb;

use crate::{data_cmd, follow};

/// The spec's text with `cluster.workers` replaced, when asked.
pub fn spec_text(path: &Path, workers: Option<usize>) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let Some(w) = workers else { return Ok(text) };
    let mut table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    let cluster = table
        .entry("cluster")
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .context("`cluster` must be a table")?;
    cluster.insert("workers".into(), toml::Value::Integer(w as i64));
    Ok(toml::to_string(&table)?)
}

/// One `--group SPEED[:BACKEND][:nodata]`: its speed, backend, and whether its
/// host reads no dataset from disk (its workers receive their samples from the
/// others).
fn parse_group(arg: &str) -> Result<(f32, Backend, bool)> {
    let mut parts = arg.split(':');
    let speed = parts.next().unwrap_or_default();
    let speed: f32 = speed.parse().ok().filter(|s| *s > 0.0 && *s <= 1.0).with_context(|| {
        format!("--group {arg:?}: the speed must be a number in (0, 1], e.g. --group 0.5 or --group 1:ndarray")
    })?;
    let (mut backend, mut no_data) = (Backend::Auto, false);
    for part in parts {
        match part {
            "nodata" => no_data = true,
            name => {
                backend = Backend::from_name(name).with_context(|| {
                    format!(
                        "--group {arg:?}: {name:?} is neither a backend ({}) nor nodata",
                        Backend::names()
                    )
                })?
            }
        }
    }
    Ok((speed, backend, no_data))
}

/// Gives every `auto` group the CPU backend that trains this job fastest here,
/// measured on the job's own model, and says which one and why.
fn resolve_auto(spec: &JobSpec, groups: &mut [(f32, Backend)]) {
    println!("measuring this build's CPU backends on the job's model…");
    let (ranked, errors) = hetero_worker::probe::rank_cpu_backends(spec);
    for e in &errors {
        println!("  {e}");
    }
    println!("{}", hetero_worker::probe::describe(&ranked));
    let fastest = ranked.first().map_or(Backend::Flex, |(b, _)| *b);
    for (_, backend) in groups.iter_mut().filter(|(_, b)| *b == Backend::Auto) {
        *backend = fastest;
    }
}

/// The CPUs each group's agent runs its workers on when the groups emulate unlike
/// devices (a speed cap below 1): packed so that no core is asked for more than
/// its time ([`hetero_cluster::cpu_pin::pack`]). Unpinned (`Ok` of none) for one
/// group or groups at full speed; `Err(why)` when the emulated devices ask for more
/// than the host has, and they then share its cores.
fn pin_emulated_devices(groups: &[(f32, Backend)], slots: u32, threads: usize) -> Result<Vec<CpuSet>, String> {
    if groups.len() < 2 || groups.iter().all(|(speed, _)| *speed >= 1.0) {
        return Ok(vec![]);
    }
    let demands: Vec<f64> = groups
        .iter()
        .map(|(speed, _)| *speed as f64 * slots as f64 * threads.max(1) as f64)
        .collect();
    cpu_pin::pack_here(&demands)
}

/// Runs the job in `spec_path` on an embedded cluster and reports how it went.
pub fn run(spec_path: &Path, workers: Option<usize>, groups: &[String]) -> Result<ExitCode> {
    let parsed = groups.iter().map(|g| parse_group(g)).collect::<Result<Vec<_>>>()?;
    let no_data: Vec<bool> = parsed.iter().map(|g| g.2).collect();
    let mut groups: Vec<(f32, Backend)> = parsed.into_iter().map(|(s, b, _)| (s, b)).collect();
    if groups.is_empty() {
        groups.push((1.0, Backend::Auto));
    }
    let text = spec_text(spec_path, workers)?;
    let base = JobSpec::folder_of(spec_path);
    let mut spec = JobSpec::parse(&text).with_context(|| format!("in {}", spec_path.display()))?;
    spec.resolve_paths(&base);
    let asked = std::iter::once(spec.cluster.backend).chain(groups.iter().map(|(_, b)| *b));
    for backend in asked.filter(|b| *b != Backend::Auto) {
        hetero_worker::backend::device(backend, 0).map_err(anyhow::Error::msg)?;
    }
    if spec.task.is_none() && spec.inference.is_none() && spec.dataset.kind == "fashion-mnist" {
        data_cmd::ensure_fashion_mnist(&spec.dataset.path)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let program = std::env::current_exe()?;
        let slots = spec.cluster.workers.div_ceil(groups.len()) as u32;
        if spec.cluster.backend == Backend::Auto && groups.iter().any(|(_, b)| *b == Backend::Auto) {
            resolve_auto(&spec, &mut groups);
        }
        let mut profiles = Vec::new();
        for (_, backend) in &groups {
            profiles.push(hetero_worker::backend::measure_gflops(*backend));
        }
        let pins = pin_emulated_devices(&groups, slots, spec.cluster.threads_per_worker);
        let cluster = LocalCluster::start_agents(groups.len(), |i, agent| {
            let (speed, backend) = groups[i];
            agent.cpus = pins.as_ref().ok().and_then(|p| p.get(i).cloned());
            agent.slots = slots;
            agent.worker_program = program.clone();
            agent.gflops = profiles[i];
            agent.speed = speed;
            agent.no_local_data = no_data.get(i).copied().unwrap_or(false);
            if backend != Backend::Auto {
                agent.backend = backend.name().into();
            }
        })
        .await?;
        println!(
            "local cluster: coordinator on {}, {} agent(s), {} worker process(es)",
            cluster.address,
            groups.len(),
            spec.cluster.workers
        );
        for (i, ((speed, backend), gflops)) in groups.iter().zip(&profiles).enumerate() {
            let pinned = match &pins {
                Ok(p) => p.get(i).map(|c| format!(", on CPUs {c}")).unwrap_or_default(),
                Err(_) => String::new(),
            };
            println!(
                "  agent {i}: cpu group, {slots} slot(s), backend {}, speed cap {speed}{pinned}, {gflops:.0} GFLOP/s measured",
                backend.name()
            );
        }
        if let Err(why) = &pins {
            println!("  not pinned: {why}");
        }
        println!("dashboard: {}", cluster.dashboard_link());
        let mut client = cluster.client().await?;
        let job_id = client
            .submit_job(pb::SubmitJobRequest {
                spec_toml: text,
                base_dir: base.display().to_string(),
            })
            .await
            .map_err(|s| anyhow::anyhow!("the coordinator refused the job: {}", s.message()))?
            .into_inner()
            .job_id;
        println!(
            "submitted {job_id}: {} ({} epoch(s), global batch {})",
            spec.name, spec.training.epochs, spec.training.global_batch_size
        );
        let info = follow::follow_job(&mut client, &job_id, true).await?;
        let ok = follow::print_outcome(&info);
        cluster.shutdown().await;
        Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
    })
}
