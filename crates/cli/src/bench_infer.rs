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

use std::time::{Duration, Instant};

use anyhow::Result;
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

/// Runs the benchmark and prints its table.
pub fn run(b: &InferBench) -> Result<()> {
    let model = open_model(b.model)?;
    let (mut front, _children) = start_front(b.model, &model, b.place)?;
    let workers = front.worker.placement().workers;
    let placements = placements_of(&model.arch, &b.place.placement, workers)?;
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
            front.switch(i, w)?;
        }
        eprintln!("measuring {}: {}", names[i], describe(p));
        rows.push(measure(&mut front, &model.arch, b, names[i])?);
    }
    front.stop()?;

    let base = mean(&rows[0].latencies).as_secs_f64();
    println!(
        "{:<18} {:>10} {:>9} {:>9} {:>9} {:>12} {:>11} {:>11}",
        "placement", "mean ms", "p50 ms", "p90 ms", "× first", "bytes/unit", "compute ms", "comm ms",
    );
    for r in &rows {
        let m = mean(&r.latencies);
        let bytes = r.bytes.iter().sum::<u64>() as f64 / r.bytes.len().max(1) as f64;
        println!(
            "{:<18} {:>10.2} {:>9.2} {:>9.2} {:>9.2} {:>12.0} {:>11.2} {:>11.2}",
            r.placement,
            m.as_secs_f64() * 1e3,
            quantile(&r.latencies, 0.5).as_secs_f64() * 1e3,
            quantile(&r.latencies, 0.9).as_secs_f64() * 1e3,
            m.as_secs_f64() / base,
            bytes,
            mean(&r.compute).as_secs_f64() * 1e3,
            mean(&r.communication).as_secs_f64() * 1e3,
        );
    }
    if rows.iter().any(|r| r.first.is_some()) {
        for r in &rows {
            if let Some(f) = r.first {
                println!(
                    "{:<18} prefill (first token) {:.1} ms",
                    r.placement,
                    f.as_secs_f64() * 1e3
                );
            }
        }
    }
    println!(
        "compute/comm ms: the largest of any worker's compute and communication time in a step; \
         bytes/unit: what all workers sent together"
    );
    Ok(())
}
