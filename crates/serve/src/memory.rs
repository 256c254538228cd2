//! Will the placement fit? Each worker's weights and key/value cache
//! ([`hetero_infer::footprint`]) against the memory it may use — checked before
//! any worker loads, printed as a table by `--dry-run`.
//!
//! Workers this machine starts share its memory: together they must fit what it
//! has free, and each must fit `--max-memory` when given. A worker on another
//! host (`--mesh`) checks its own share when it loads ([`check_worker`]); the
//! front cannot see that host's memory, and the table says so.

use anyhow::{Result, bail};
use hetero_infer::Placement;
use hetero_infer::footprint::{Footprint, footprint, mib};
use hetero_infer::models::Model;
use hetero_infer::profile::free_memory;
use hetero_infer::qllama::runs_on_blocks;

use crate::placing::{Budget, Placing, describe, placements_of};
use hetero_models::LayerKind;

/// Every worker's footprint under `p`.
pub fn footprints(model: &Model, p: &Placement, budget: &Budget) -> Vec<Footprint> {
    let quantized = runs_on_blocks(&model.arch, model.weights.as_ref());
    (0..p.workers)
        .map(|rank| {
            footprint(
                &model.arch,
                model.weights.as_ref(),
                quantized,
                p,
                rank,
                budget.sequences,
                budget.positions,
            )
        })
        .collect()
}

/// Whether every worker fits under `p`: `Err` names the worker and both numbers.
/// `local`: every worker runs on this machine.
pub fn fits(model: &Model, p: &Placement, budget: &Budget, local: bool) -> Result<()> {
    check(&footprints(model, p, budget), budget, local, free_memory())
}

/// The table of what each worker holds, and whether it fits ([`fits`]).
pub fn report(model: &Model, p: &Placement, budget: &Budget, local: bool) -> (String, Result<()>) {
    let feet = footprints(model, p, budget);
    let free = free_memory();
    let mut out = format!(
        "{:<5} {:<34} {:>12} {:>12} {:>12}\n",
        "rank", "holds", "weights", "KV cache", "total"
    );
    for (rank, f) in feet.iter().enumerate() {
        out += &format!(
            "{rank:<5} {:<34} {:>12} {:>12} {:>12}\n",
            holds(model, p, rank),
            mib(f.weights),
            mib(f.cache),
            mib(f.total())
        );
    }
    let cache = match model.arch.llama() {
        Some(_) => format!(
            "KV cache for {} sequence(s) of {} positions",
            budget.sequences, budget.positions
        ),
        None => "no KV cache (an encoder)".to_string(),
    };
    out += &format!(
        "{cache}; weights {}\n",
        if runs_on_blocks(&model.arch, model.weights.as_ref()) {
            "as stored (quantized blocks, memory-mapped)"
        } else {
            "as f32"
        }
    );
    let verdict = check(&feet, budget, local, free);
    let sum: u64 = feet.iter().map(Footprint::total).sum();
    out += &match (local, &verdict) {
        (true, Ok(())) => format!(
            "all {} worker(s) on this machine: {} of {} free: fits\n",
            feet.len(),
            mib(sum),
            mib(free)
        ),
        (false, Ok(())) => format!(
            "rank 0 on this machine: {} of {} free: fits; the other ranks check their own hosts as they load\n",
            mib(feet[0].total()),
            mib(free)
        ),
        (_, Err(_)) => String::new(), // the caller reports the error
    };
    (out, verdict)
}

/// Whether the footprints fit: each within `budget.per_worker`, and those on this
/// machine (all of them when `local`, else rank 0) within `free` together.
fn check(feet: &[Footprint], budget: &Budget, local: bool, free: u64) -> Result<()> {
    if let Some(limit) = budget.per_worker
        && let Some((rank, f)) = feet.iter().enumerate().find(|(_, f)| f.total() > limit)
    {
        bail!(
            "worker {rank} would hold {} (weights {}, KV cache {}) but --max-memory allows {}; \
             use more workers, a smaller --batch or --context, or a quantized file",
            mib(f.total()),
            mib(f.weights),
            mib(f.cache),
            mib(limit)
        );
    }
    let here: u64 = match local {
        true => feet.iter().map(Footprint::total).sum(),
        false => feet[0].total(),
    };
    if here > free {
        bail!(
            "the workers on this machine would hold {} together but it has {} free; \
             use workers on other hosts (--mesh), a smaller --batch or --context, or a quantized file",
            mib(here),
            mib(free)
        );
    }
    Ok(())
}

/// `--dry-run`: the placement `place` names, what each worker would hold under it
/// and whether that fits, printed; nothing is started or loaded. An error when it
/// does not fit.
pub fn dry_run(model_name: &str, model: &Model, place: &Placing) -> Result<()> {
    let Some(p) = placements_of(&model.arch, &place.placement, place.world()?)?.remove(0) else {
        bail!(
            "--dry-run shows a named placement; `auto` is decided on the running workers \
             (run `hetero plan`, then --dry-run the placement file it writes)"
        );
    };
    println!("{model_name} under {}", describe(&p));
    let (table, fits) = report(model, &p, &place.budget, place.mesh.is_none());
    print!("{table}");
    fits
}

/// A worker's own check as it loads its part: its weights within what its host
/// has free (and `limit`).
pub fn check_worker(model: &Model, p: &Placement, rank: usize, limit: Option<u64>) -> Result<()> {
    let budget = Budget {
        per_worker: limit,
        ..Budget::default()
    };
    let mine = footprints(model, p, &budget)[rank];
    let free = free_memory().min(limit.unwrap_or(u64::MAX));
    if mine.weights > free {
        bail!(
            "worker {rank} would hold {} of weights under this placement but may use {}",
            mib(mine.weights),
            mib(free)
        );
    }
    Ok(())
}

/// What `rank` holds, in words: its blocks (and parts) and the embedding or head.
fn holds(model: &Model, p: &Placement, rank: usize) -> String {
    let layout = model.arch.layout();
    let mut parts = vec![];
    if p.stages[0].workers.contains(&rank) {
        parts.push("embed".to_string());
    }
    for s in p.stages.iter().filter(|s| s.workers.contains(&rank)) {
        let share = match s.original_part(rank) {
            Some((_, 1)) | None => String::new(),
            Some((i, k)) => format!(" ({}/{k})", i + 1),
        };
        let decoupled = s
            .layers
            .clone()
            .filter(|&l| layout.kinds[l] == LayerKind::Decoupled)
            .count();
        let note = if decoupled > 0 {
            format!(", {decoupled} decoupled")
        } else {
            String::new()
        };
        parts.push(format!("{}..{}{share}{note}", s.layers.start, s.layers.end));
    }
    if model.arch.llama().is_some() && p.stages.last().is_some_and(|s| s.head_part(rank).is_some()) {
        parts.push("head".into());
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sum_on_one_machine_and_each_worker_against_its_limit() {
        let f = |w: u64| Footprint { weights: w, cache: 0 };
        let budget = Budget::default();
        assert!(check(&[f(60), f(60)], &budget, true, 100).is_err());
        assert!(check(&[f(60), f(60)], &budget, false, 100).is_ok());
        let limited = Budget {
            per_worker: Some(50),
            ..budget
        };
        let e = check(&[f(40), f(60)], &limited, true, 1000).unwrap_err().to_string();
        assert!(e.contains("worker 1") && e.contains("--max-memory"), "{e}");
    }
}
