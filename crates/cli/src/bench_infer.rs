//! `hetero bench infer`: latency and traffic of one model under several placements
//! (single device, tensor parallel, pipeline, or placement files), measured in one
//! run over the same workers and mesh, so the rows compare like with like.
//!
//! An encoder is timed per request (batch 1, `--seq` tokens); a decoder per token
//! (a `--seq`-token prefill, then `--tokens` greedy steps through the KV caches).
//! Bytes are what every worker of the mesh sent, read from the workers' own counters
//! around each request (the few bytes of reading them are taken off). Compute and
//! communication time are reported apart, because test-bed hosts share this
//! machine's cores: compute then reads slower than on separate devices, while
//! communication is what the links cost.
//!
//! With a profile (`--profile`, or measured for `auto`), each row also shows the
//! planner's prediction for that placement (`hetero_infer::cost`) and how far the
//! measurement is from it.

use std::time::{Duration, Instant};

use anyhow::Result;
use hetero_infer::cost::{Prediction, predict};
use hetero_infer::profile::{Profile, Shape};
use hetero_infer::{Arch, Front, Output, Report, Request, Want, Worker};

use hetero_serve::InferBackend;
use hetero_serve::front::{Placing, describe, open_model, placements_of, start_front};

/// Bytes one report exchange costs: a 25-byte command and a 29-byte reply.
const REPORT_BYTES: u64 = 25 + 29;

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
fn timed(front: &mut Front<InferBackend>, req: &Request) -> Result<(Output, Duration, u64, Duration, Duration)> {
    let before = front.reports()?;
    let clock = Instant::now();
    let out = front.run(req)?;
    let took = clock.elapsed();
    let after = front.reports()?;
    let sent: u64 = after.iter().map(|r| r.bytes_sent).sum::<u64>() - before.iter().map(|r| r.bytes_sent).sum::<u64>();
    let overhead = REPORT_BYTES * (after.len() as u64 - 1);
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
            // Warm-up: a short prefill and two steps.
            front.run(&Request::decode(
                vec![ids[..4.min(ids.len())].to_vec()],
                true,
                Want::NextToken,
            ))?;
            let prefill = Request::decode(vec![ids.clone()], true, Want::NextToken);
            let (out, took, _, _, _) = timed(front, &prefill)?;
            row.first = Some(took);
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

/// Runs the benchmark and prints its table.
pub fn run(b: &InferBench) -> Result<()> {
    let model = open_model(b.model)?;
    let started = start_front(b.model, &model, b.place)?;
    let (mut front, _children, profile) = (started.front, started.children, started.profile);
    let workers = front.worker.placement().workers;
    let placements: Vec<hetero_infer::Placement> = placements_of(&model.arch, &b.place.placement, workers)?
        .into_iter()
        .map(|p| {
            p.or_else(|| started.chosen.clone())
                .expect("auto was chosen at the start")
        })
        .collect();
    let names: Vec<&str> = b.place.placement.split(',').map(str::trim).collect();
    let unit = match model.arch {
        Arch::Bert(_) | Arch::DecoupledBert(_) => format!("request (batch 1, {} tokens)", b.seq),
        Arch::Llama(_) | Arch::DecoupledLlama(_) => format!("token (after a {}-token prefill)", b.seq),
    };
    println!("{} on {workers} worker(s); per {unit}", b.model);
    let mut rows = Vec::new();
    for (i, p) in placements.iter().enumerate() {
        if i > 0 {
            let w = Worker::<InferBackend>::load(
                model.arch.clone(),
                model.weights.as_ref(),
                p.clone(),
                0,
                &Default::default(),
            )?;
            front.switch(p, w)?;
        }
        eprintln!("measuring {}: {}", names[i], describe(p));
        let mut row = measure(&mut front, &model.arch, b, names[i])?;
        if let Some(profile) = &profile {
            // A profile measured at other shapes predicts nothing here.
            row.predicted = prediction(&model.arch, profile, p, b)
                .map_err(|e| eprintln!("no prediction for {}: {e}", names[i]))
                .ok();
        }
        rows.push(row);
    }
    front.stop()?;

    let base = mean(&rows[0].latencies).as_secs_f64();
    println!(
        "{:<22} {:>9} {:>8} {:>8} {:>8} {:>12} {:>10} {:>9} {:>10} {:>8}",
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
            "{:<22} {:>9.2} {:>8.2} {:>8.2} {:>8.2} {:>12.0} {:>10.2} {:>9.2} {:>10} {:>8}",
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
                    "{:<22} prefill (first token) {:.1} ms{predicted}",
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
