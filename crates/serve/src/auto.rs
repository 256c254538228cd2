//! `--placement auto`: profile the mesh (or read a profile), plan on it, then try
//! the planner's finalists on the mesh itself and keep the fastest.
//!
//! ## Design
//! The cost model ([`hetero_infer::cost`]) ranks every candidate from a profile.
//! What a profile cannot see — workers that share a core, so that one computes
//! while the other waits on a link; a host whose speed drifts; a network that
//! behaves differently under load than in a ping-pong — can reorder candidates
//! predicted close together. So, as FFTW's planner measures its finalists rather
//! than trusting its estimate, `auto` runs the objective's request under each
//! finalist ([`Plan::finalists`]: the best of each structure within
//! [`FINAL_SPREAD`](hetero_infer::plan::FINAL_SPREAD) of the best prediction) on
//! the real workers, and keeps the fastest measured. It costs each finalist one
//! load of every part and a few requests; `trials = 1` keeps the prediction alone.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{Result, bail};
use hetero_comm::Mesh;
use hetero_infer::models::Model;
use hetero_infer::plan::{Candidate, Objective, Plan, plan};
use hetero_infer::profile::{Profile, Shape};
use hetero_infer::{Arch, Front, Output, Placement, Request, Want, profile_mesh, send_placement};

use crate::InferBackend;
use crate::placing::{Placing, load_part};

/// Finalists tried by default.
pub const TRIALS: usize = 4;

/// Timed runs of the objective per finalist (after a warm-up); the fastest counts.
const RUNS: usize = 2;

/// Decode steps timed per run; their mean stands for every step the objective counts.
const STEPS: usize = 4;

/// The profile `auto` plans on: `place.profile` when that file exists (checked
/// against this model and mesh), else measured now over `mesh` (and written to
/// `place.profile` when given). `addrs` are the mesh's addresses when its hosts are
/// fixed (`--mesh`), so a profile of other hosts is refused.
pub fn profile_for(
    mesh: &mut Mesh,
    model_name: &str,
    model: &Model,
    place: &Placing,
    addrs: Option<&[SocketAddr]>,
) -> Result<Profile> {
    let addresses: Option<Vec<String>> = addrs.map(|a| a.iter().map(ToString::to_string).collect());
    if let Some(path) = place.profile.as_ref().filter(|p| p.is_file()) {
        let p = Profile::load(path, &model.arch, mesh.world(), addresses.as_deref())?;
        eprintln!("profile: {}", path.display());
        return Ok(p);
    }
    let shapes = place.objective(&model.arch).profile_shapes();
    let mut profile = profile_mesh::<InferBackend>(mesh, &model.arch, model_name, &shapes, &mut |m| {
        eprintln!("profiling: {m}")
    })?;
    if let Some(a) = addresses {
        for (d, address) in profile.devices.iter_mut().zip(a) {
            d.address = Some(address);
        }
    }
    if let Some(path) = &place.profile {
        let text = serde_json::to_string_pretty(&profile)?;
        hetero_infer::weights::write_atomically(path, text.as_bytes())?;
        eprintln!("profile written to {}", path.display());
    }
    Ok(profile)
}

/// `auto` from start to end: the profile, the plan for the shapes it was
/// measured at, and the finalists tried. Returns the front under the winner
/// (every other worker has been sent it) and the profile.
pub fn decide(
    mut mesh: Mesh,
    model_name: &str,
    model: &Model,
    place: &Placing,
    addrs: Option<&[SocketAddr]>,
) -> Result<(Front<InferBackend>, Placement, Profile)> {
    let profile = profile_for(&mut mesh, model_name, model, place, addrs)?;
    let objective = Objective::of_profile(&profile, place.plan_tokens);
    let plan = plan(&model.arch, &profile, &objective)?;
    let (front, chosen) = settle(mesh, model, &plan, &objective, place.trials)?;
    Ok((front, chosen.placement, profile))
}

/// Tries up to `trials` of `plan`'s finalists on the mesh and moves every worker
/// to the fastest measured (the planner's choice alone when there is one).
pub fn settle(
    mesh: Mesh,
    model: &Model,
    plan: &Plan,
    objective: &Objective,
    trials: usize,
) -> Result<(Front<InferBackend>, Candidate)> {
    let finalists = plan.finalists(trials);
    let mut front = place(mesh, model, &finalists[0].placement)?;
    if finalists.len() == 1 {
        say("auto", finalists[0], None);
        return Ok((front, finalists[0].clone()));
    }
    let mut best: Option<(f64, usize)> = None;
    for (i, c) in finalists.iter().enumerate() {
        if i > 0 {
            front = place(take_mesh(front), model, &c.placement)?;
        }
        let measured = time_objective(&mut front, objective)?;
        say("trial", c, Some(measured));
        if best.is_none_or(|(t, _)| measured < t) {
            best = Some((measured, i));
        }
    }
    let (_, i) = best.expect("at least one finalist");
    let winner = finalists[i];
    if i != finalists.len() - 1 {
        front = place(take_mesh(front), model, &winner.placement)?;
    }
    say("auto", winner, None);
    Ok((front, winner.clone()))
}

fn say(what: &str, c: &Candidate, measured: Option<f64>) {
    let p = &c.prediction;
    let measured = measured.map_or(String::new(), |m| format!(", measured {:.2} ms", m * 1e3));
    eprintln!(
        "{what}: {} — predicted {:.2} ms ({:.2} compute, {:.2} communication, {} bytes){measured}",
        c.name,
        p.total * 1e3,
        p.compute * 1e3,
        p.communication * 1e3,
        p.bytes()
    );
}

fn take_mesh(front: Front<InferBackend>) -> Mesh {
    let Front { worker, mesh } = front;
    drop(worker); // its weights go before the next part's come
    mesh
}

/// Sends every other worker `placement` and loads rank 0's part of it.
fn place(mut mesh: Mesh, model: &Model, placement: &Placement) -> Result<Front<InferBackend>> {
    send_placement(&mut mesh, placement)?;
    let worker = load_part(model, placement, 0)?;
    Ok(Front { worker, mesh })
}

/// Seconds the objective takes under the front's placement: each shape run as
/// a request (a decode step after a prefill of its context), weighted by its count;
/// the fastest of [`RUNS`] after a warm-up.
fn time_objective(front: &mut Front<InferBackend>, objective: &Objective) -> Result<f64> {
    let arch = front.worker.arch().clone();
    let mut fastest = f64::INFINITY;
    for run in 0..=RUNS {
        let mut total = 0.0;
        for &(shape, count) in &objective.shapes {
            total += count * time_shape(front, &arch, shape)?;
        }
        if run > 0 {
            fastest = fastest.min(total);
        }
    }
    Ok(fastest)
}

/// Seconds one step of `shape` takes.
fn time_shape(front: &mut Front<InferBackend>, arch: &Arch, shape: Shape) -> Result<f64> {
    let rows = |n: usize| -> Vec<Vec<u32>> {
        (0..shape.batch)
            .map(|r| (0..n).map(|i| 1 + ((r + i) as u32 * 7919) % 1000).collect())
            .collect()
    };
    if arch.is_encoder() {
        let req = Request::embed(&rows(shape.tokens));
        let clock = Instant::now();
        front.run(&req)?;
        return Ok(clock.elapsed().as_secs_f64());
    }
    if shape.context == 0 {
        let clock = Instant::now();
        front.run(&Request::decode(rows(shape.tokens), true, Want::NextToken))?;
        return Ok(clock.elapsed().as_secs_f64());
    }
    let Output::Tokens(mut next) = front.run(&Request::decode(rows(shape.context), true, Want::NextToken))? else {
        bail!("a decoder returned no token");
    };
    let clock = Instant::now();
    for _ in 0..STEPS {
        let step: Vec<Vec<u32>> = next.iter().map(|&t| vec![t; shape.tokens]).collect();
        if let Output::Tokens(t) = front.run(&Request::decode(step, false, Want::NextToken))? {
            next = t;
        }
    }
    Ok(clock.elapsed().as_secs_f64() / STEPS as f64)
}
