//! `hetero bench infer`: latency and traffic of one model under several placements
//! (single device, tensor parallel, pipeline, or placement files), measured in one
//! run over the same workers and mesh, so the rows compare like with like.
//!
//! An encoder is timed per request (batch 1, `--seq` tokens); a decoder per token
//! (a `--seq`-token prefill — the mean of three after one of the same length — then
//! `--tokens` greedy steps through the KV caches).
//! Bytes are what every worker of the mesh sent, read from the workers' own counters
//! around each request (the few bytes of reading them are taken off). Compute and
//! communication time are reported apart, because test-bed hosts share this
//! machine's cores: compute then reads slower than on separate devices, while
//! communication is what the links cost.
//!
//! With a profile (`--profile`, or measured when a placement is `auto`), each row
//! also shows the planner's prediction for that placement (`hetero_infer::cost`)
//! and how far the measurement is from it. An entry `MODEL@PLACEMENT` runs another
//! model over the same workers (a decoupled version beside its original); each
//! model gets its own profile.

use std::time::{Duration, Instant};

use anyhow::Result;
use hetero_infer::cost::{Prediction, predict};
use hetero_infer::plan::{Objective, plan};
use hetero_infer::profile::{Profile, Shape};
use hetero_infer::{Arch, Front, Output, Report, Request, Want, send_model};

use hetero_serve::InferBackend;
use hetero_serve::auto::{profile_for, settle};
use hetero_serve::front::start_front;
use hetero_serve::placing::{AUTO, Placing, describe, load_part, open_model, placement_of};

/// What `hetero bench infer` measures.
pub struct InferBench<'a> {
    /// The model (e.g. `bert-base-random`, `smollm2`).
    pub model: &'a str,
    /// Workers, placements (comma-separated), mesh.
    pub place: &'a Placing,
    /// Timed requests (encoders).
    pub requests: usize,
    /// Timed decode steps (decoders).
    pub tokens: usize,
    /// Sequence length (encoders), prompt length (decoders).
    pub seq: usize,
}

struct Row {
    placement: String,
    /// The planner's prediction per timed unit (a request, or a decode step) and
    /// for the prefill, when there is a profile.
    predicted: Option<(Prediction, Option<Prediction>)>,
    latencies: Vec<Duration>,
    bytes: Vec<u64>,
    compute: Vec<Duration>,
    communication: Vec<Duration>,
    first: Option<Duration>,
}

fn mean(d: &[Duration]) -> Duration {
    if d.is_empty() {
        Duration::ZERO
    } else {
        d.iter().sum::<Duration>() / d.len() as u32
    }
}

fn quantile(d: &[Duration], q: f64) -> Duration {
    let mut s = d.to_vec();
    s.sort();
    s.get(((s.len().max(1) - 1) as f64 * q).round() as usize)
        .copied()
        .unwrap_or_default()
}

/// Runs `req` and measures it: wall time, bytes all workers sent, the largest
/// compute and communication time of any worker.
/// Timed prefills per decoder placement (their mean is reported).
const PREFILLS: usize = 3;

fn timed(front: &mut Front<InferBackend>, req: &Request) -> Result<(Output, Duration, u64, Duration, Duration)> {
    let before = front.reports()?;
    let clock = Instant::now();
    let out = front.run(req)?;
    let took = clock.elapsed();
    let after = front.reports()?;
    let sent: u64 = after.iter().map(|r| r.bytes_sent).sum::<u64>() - before.iter().map(|r| r.bytes_sent).sum::<u64>();
    let overhead = hetero_infer::protocol::REPORT_EXCHANGE_BYTES * (after.len() as u64 - 1);
    let most = |f: fn(&Report) -> Duration| after.iter().map(f).max().unwrap_or_default();
    Ok((
        out,
        took,
        sent.saturating_sub(overhead),
        most(|r| r.timing.compute),
        most(|r| r.timing.communication),
    ))
}

fn measure(front: &mut Front<InferBackend>, arch: &Arch, b: &InferBench, name: &str) -> Result<Row> {
    let mut row = Row {
        placement: name.to_string(),
        predicted: None,
        latencies: vec![],
        bytes: vec![],
        compute: vec![],
        communication: vec![],
        first: None,
    };
    let ids: Vec<u32> = (0..b.seq as u32).map(|i| 1000 + (i * 7919) % 20000).collect();
    match arch {
        Arch::Bert(_) | Arch::DecoupledBert(_) => {
            let req = Request::embed(std::slice::from_ref(&ids));
            front.run(&req)?; // warm-up
            for _ in 0..b.requests {
                let (_, took, bytes, compute, comm) = timed(front, &req)?;
                row.latencies.push(took);
                row.bytes.push(bytes);
                row.compute.push(compute);
                row.communication.push(comm);
            }
        }
        Arch::Llama(_) | Arch::DecoupledLlama(_) => {
            // Warm-up: a prefill of the same length (as llama-bench warms up with its
            // own test: buffers and caches grow to the prompt's size once), then the
            // mean of PREFILLS timed ones, each a fresh sequence.
            let prefill = Request::decode(vec![ids.clone()], true, Want::NextToken);
            front.run(&prefill)?;
            let mut out = None;
            let mut took = Duration::ZERO;
            for _ in 0..PREFILLS {
                let (o, t, _, _, _) = timed(front, &prefill)?;
                (out, took) = (Some(o), took + t);
            }
            row.first = Some(took / PREFILLS as u32);
            let out = out.expect("PREFILLS > 0");
            let Output::Tokens(mut token) = out else {
                anyhow::bail!("a decoder returned no token")
            };
            for _ in 0..b.tokens {
                let step = Request::decode(vec![vec![token[0]]], false, Want::NextToken);
                let (out, took, bytes, compute, comm) = timed(front, &step)?;
                row.latencies.push(took);
                row.bytes.push(bytes);
                row.compute.push(compute);
                row.communication.push(comm);
                if let Output::Tokens(t) = out {
                    token = t;
                }
            }
        }
    }
    Ok(row)
}

/// The planner's prediction for `placement`: per timed unit, and for a
/// decoder's prefill.
fn prediction(
    arch: &Arch,
    profile: &Profile,
    placement: &hetero_infer::Placement,
    b: &InferBench,
) -> Result<(Prediction, Option<Prediction>)> {
    Ok(match arch.is_encoder() {
        true => (predict(arch, profile, placement, Shape::prefill(1, b.seq))?, None),
        false => (
            predict(arch, profile, placement, Shape::decode(1, b.seq))?,
            Some(predict(arch, profile, placement, Shape::prefill(1, b.seq))?),
        ),
    })
}

/// The `(model, placement)` of each `--placement` entry: `MODEL@PLACEMENT` names
/// another model than the benchmark's (a decoupled version beside the
/// original, say), a bare name the benchmark's own.
fn entries(model: &str, list: &str) -> Vec<(String, String)> {
    list.split(',')
        .map(str::trim)
        .map(|e| match e.split_once('@') {
            Some((m, p)) if !std::path::Path::new(e).is_file() => (m.to_string(), p.to_string()),
            _ => (model.to_string(), e.to_string()),
        })
        .collect()
}

/// Runs the benchmark and prints its table.
pub fn run(b: &InferBench) -> Result<()> {
    let entries = entries(b.model, &b.place.placement);
    let first = Placing {
        placement: entries[0].1.clone(),
        ..b.place.clone()
    };
    let mut model = open_model(&entries[0].0)?;
    let started = start_front(&entries[0].0, &model, &first)?;
    let want_profiles = b.place.profile.is_some() || entries.iter().any(|e| e.1 == AUTO);
    let (mut profile, fixed) = (started.profile, started.fixed);
    let (mut front, _children) = (started.front, started.children);
    if want_profiles && profile.is_none() {
        profile = Some(profile_for(
            &mut front.mesh,
            &entries[0].0,
            &model,
            b.place,
            fixed.as_deref(),
        )?);
    }
    let workers = front.worker.placement().workers;
    let unit = match model.arch.is_encoder() {
        true => format!("request (batch 1, {} tokens)", b.seq),
        false => format!("token (after a {}-token prefill)", b.seq),
    };
    println!("{} on {workers} worker(s); per {unit}", b.model);
    let mut rows = Vec::new();
    for (i, (name, placement)) in entries.iter().enumerate() {
        let label = match name == b.model {
            true => placement.clone(),
            false => format!("{name}@{placement}"),
        };
        if i > 0 && *name != entries[i - 1].0 {
            // Another model: the others open it and wait; it gets its own profile.
            send_model(&mut front.mesh, name)?;
            model = open_model(name)?;
            let place = Placing {
                profile: None,
                ..b.place.clone()
            };
            profile = match want_profiles {
                true => Some(profile_for(&mut front.mesh, name, &model, &place, fixed.as_deref())?),
                false => None,
            };
        }
        let p = match (i, placement.as_str(), &profile) {
            (0, ..) => front.worker.placement().clone(),
            (_, AUTO, Some(profile)) => {
                // As `--placement auto` does it: the plan, its finalists tried.
                let objective = Objective::of_profile(profile, b.tokens);
                let plan = plan(&model.arch, profile, &objective)?;
                let Front { worker, mesh } = front;
                drop(worker);
                let (settled, chosen) = settle(mesh, &model, &plan, &objective, b.place.trials)?;
                front = settled;
                chosen.placement
            }
            _ => {
                let p = placement_of(&model.arch, placement, workers)?;
                let w = load_part(&model, &p, 0)?;
                front.switch(&p, w)?;
                p
            }
        };
        eprintln!("measuring {label}: {}", describe(&p));
        let mut row = measure(&mut front, &model.arch, b, &label)?;
        if let Some(profile) = &profile {
            // A profile measured at other shapes predicts nothing here.
            row.predicted = prediction(&model.arch, profile, &p, b)
                .map_err(|e| eprintln!("no prediction for {label}: {e}"))
                .ok();
        }
        rows.push(row);
    }
    front.stop()?;

    let base = mean(&rows[0].latencies).as_secs_f64();
    println!(
        "{:<32} {:>9} {:>8} {:>8} {:>8} {:>12} {:>10} {:>9} {:>10} {:>8}",
        "placement", "mean ms", "p50 ms", "p90 ms", "× first", "bytes/unit", "compute", "comm", "predicted", "error",
    );
    for r in &rows {
        let m = mean(&r.latencies);
        let bytes = r.bytes.iter().sum::<u64>() as f64 / r.bytes.len().max(1) as f64;
        let (predicted, error) = match &r.predicted {
            Some((p, _)) => (
                format!("{:.2}", p.total * 1e3),
                format!("{:+.0} %", 100.0 * (m.as_secs_f64() - p.total) / p.total),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{:<32} {:>9.2} {:>8.2} {:>8.2} {:>8.2} {:>12.0} {:>10.2} {:>9.2} {:>10} {:>8}",
            r.placement,
            m.as_secs_f64() * 1e3,
            quantile(&r.latencies, 0.5).as_secs_f64() * 1e3,
            quantile(&r.latencies, 0.9).as_secs_f64() * 1e3,
            m.as_secs_f64() / base,
            bytes,
            mean(&r.compute).as_secs_f64() * 1e3,
            mean(&r.communication).as_secs_f64() * 1e3,
            predicted,
            error,
        );
    }
    if rows.iter().any(|r| r.first.is_some()) {
        for r in &rows {
            if let Some(f) = r.first {
                let predicted = match &r.predicted {
                    Some((_, Some(p))) => format!(" (predicted {:.1} ms)", p.total * 1e3),
                    _ => String::new(),
                };
                println!(
                    "{:<32} prefill (first token) {:.1} ms{predicted}, mean of {PREFILLS} after a warm-up",
                    r.placement,
                    f.as_secs_f64() * 1e3
                );
            }
        }
    }
    println!(
        "compute/comm ms: the largest of any worker's compute and communication time in a step; \
         bytes/unit: what all workers sent together; predicted: the planner's cost model on the profile, \
         error: measured against it"
    );
    Ok(())
}
