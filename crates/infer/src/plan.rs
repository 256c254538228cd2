//! The planner (seed 000, module 3): chooses a placement for a model on profiled
//! devices by predicting every candidate with [`crate::cost`] and keeping the
//! fastest that fits in memory.
//!
//! ## Design
//! Candidates, over the `k` fastest devices for every `k` (fastest first, so a
//! gather lands on the fastest):
//! - for every model: `single` on each device, `tensor-parallel`, `pipeline` with
//!   layers in proportion to measured speed, and for four or more devices a
//!   pipeline of two tensor-parallel halves (mixed);
//! - for a decoupled model, a `decoupled` stage with the sub-blocks even *or in
//!   proportion to each device's measured sub-block speed* (largest remainder;
//!   a slow device may hold none), and original layers replicated,
//!   tensor-parallel or gathered — the last original layer may take another mode
//!   than the others (it decides where the output ends up), so it gets a stage of
//!   its own when it does.
//!
//! The objective is a weighted sum of request shapes: an encoder's request, or a
//! decoder's prefill plus its decode steps.

use std::ops::Range;

use hetero_models::LayerKind;
use hetero_models::checkpoint::span;

use crate::InferError;
use crate::cost::{Prediction, check_memory, predict};
use crate::placement::{Mode, Original, Placement, Stage, consecutive};
use crate::profile::{Profile, Shape};
use crate::runtime::Arch;

/// What to make fast: request shapes, each with how many of it a request runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    /// `(shape, count)`.
    pub shapes: Vec<(Shape, f64)>,
    /// The longest context to hold KV cache for (decoders).
    pub context: usize,
    /// Rows.
    pub batch: usize,
}

impl Objective {
    /// One encoder request of `seq` tokens.
    pub fn encoder(seq: usize) -> Self {
        Objective {
            shapes: vec![(Shape::prefill(1, seq), 1.0)],
            context: 0,
            batch: 1,
        }
    }

    /// A decoder's prefill of `prompt` tokens and `tokens` decode steps.
    pub fn decoder(prompt: usize, tokens: usize) -> Self {
        Objective {
            shapes: vec![
                (Shape::prefill(1, prompt), 1.0),
                (Shape::decode(1, prompt), tokens as f64),
            ],
            context: prompt + tokens,
            batch: 1,
        }
    }

    /// The shapes `profile` was measured at, a decode step counted `tokens`
    /// times: what to plan for when a profile is all there is to go on.
    pub fn of_profile(profile: &Profile, tokens: usize) -> Self {
        let shapes: Vec<(Shape, f64)> = profile
            .shapes
            .iter()
            .map(|&s| (s, if s.context == 0 { 1.0 } else { tokens as f64 }))
            .collect();
        Objective {
            context: shapes
                .iter()
                .map(|(s, _)| s.context + s.tokens + tokens)
                .max()
                .unwrap_or(0),
            batch: shapes.iter().map(|(s, _)| s.batch).max().unwrap_or(1),
            shapes,
        }
    }

    /// The shapes a profile must time for this objective.
    pub fn profile_shapes(&self) -> Vec<Shape> {
        self.shapes.iter().map(|s| s.0).collect()
    }
}

/// A candidate and what it is predicted to cost.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// A short name (`decoupled 4 even, originals gather`).
    pub name: String,
    /// The placement.
    pub placement: Placement,
    /// Its predicted cost, the objective's weighted sum.
    pub prediction: Prediction,
    /// Each shape's own prediction, in the objective's order.
    pub per_shape: Vec<Prediction>,
    /// Why it cannot run, if it cannot (memory).
    pub refused: Option<String>,
}

/// The planner's answer: the chosen candidate, and every one it weighed, fastest
/// first.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The fastest candidate that fits.
    pub chosen: Candidate,
    /// Every candidate, fastest first (those that do not fit last).
    pub candidates: Vec<Candidate>,
}

/// Predicts `placement` for `objective`, memory checked.
pub fn evaluate(
    arch: &Arch,
    profile: &Profile,
    name: &str,
    placement: Placement,
    objective: &Objective,
) -> Result<Candidate, InferError> {
    let mut prediction = Prediction::default();
    let mut per_shape = Vec::new();
    for &(shape, count) in &objective.shapes {
        let p = predict(arch, profile, &placement, shape)?;
        prediction.add(&p, count);
        per_shape.push(p);
    }
    let refused = check_memory(arch, profile, &placement, objective.batch, objective.context)
        .err()
        .map(|e| match e {
            InferError::Profile(m) => m,
            other => other.to_string(),
        });
    Ok(Candidate {
        name: name.to_string(),
        placement,
        prediction,
        per_shape,
        refused,
    })
}

/// Chooses a placement for `arch` on `profile`'s devices.
pub fn plan(arch: &Arch, profile: &Profile, objective: &Objective) -> Result<Plan, InferError> {
    profile.check(arch, profile.devices.len(), None)?;
    for &(shape, _) in &objective.shapes {
        profile.shape_index(shape)?;
    }
    let mut candidates = Vec::new();
    for (name, placement) in candidates_for(arch, profile, objective.shapes[0].0)? {
        candidates.push(evaluate(arch, profile, &name, placement, objective)?);
    }
    candidates.sort_by(|a, b| {
        (a.refused.is_some(), a.prediction.total)
            .partial_cmp(&(b.refused.is_some(), b.prediction.total))
            .expect("finite")
    });
    let chosen = candidates[0].clone();
    if let Some(why) = &chosen.refused {
        return Err(InferError::Profile(format!(
            "no placement fits in the devices' memory; the fastest, {}: {why}",
            chosen.name
        )));
    }
    Ok(Plan { chosen, candidates })
}

/// How much slower than the best a candidate may be predicted and still be
/// tried on the mesh ([`Plan::finalists`]): the cost model's largest errors on the
/// test bed (cores shared by workers) are about this.
pub const FINAL_SPREAD: f64 = 2.0;

impl Plan {
    /// The candidates worth trying on the mesh itself, fastest predicted first:
    /// those that fit, predicted within [`FINAL_SPREAD`] of the best, at most `most`,
    /// and of each *structure* only the best (single on device 0 or on device 2 is
    /// one structure: the profile tells those apart well; what it misjudges is how
    /// structures compare).
    pub fn finalists(&self, most: usize) -> Vec<&Candidate> {
        let best = self.chosen.prediction.total;
        let mut seen = Vec::new();
        self.candidates
            .iter()
            .filter(|c| c.refused.is_none() && c.prediction.total <= FINAL_SPREAD * best)
            .filter(|c| {
                let shape = structure(&c.placement);
                let new = !seen.contains(&shape);
                seen.push(shape);
                new
            })
            .take(most.max(1))
            .collect()
    }
}

/// A placement with its devices forgotten: each stage's layers, mode and size.
fn structure(p: &Placement) -> Vec<(Range<usize>, String, usize)> {
    p.stages
        .iter()
        .map(|s| (s.layers.clone(), format!("{:?}", s.mode), s.workers.len()))
        .collect()
}

/// Devices in the order the planner takes them: each next the one that would
/// run an original layer at `shape` fastest beside those already taken (so a
/// device that shares a core with a taken one comes after those that do not).
fn by_speed(profile: &Profile, at: usize) -> Vec<usize> {
    let mut left: Vec<usize> = (0..profile.devices.len()).collect();
    let mut order = Vec::with_capacity(left.len());
    let beside = |d: usize, taken: &[usize]| {
        let device = &profile.devices[d];
        let slow_down: f64 = taken.iter().map(|&o| device.alongside[o] - 1.0).sum();
        device.times[at].original[0] * (1.0 + slow_down)
    };
    while !left.is_empty() {
        let next = (0..left.len())
            .min_by(|&i, &j| beside(left[i], &order).total_cmp(&beside(left[j], &order)))
            .expect("not empty");
        order.push(left.remove(next));
    }
    order
}

/// `total` split over weights in proportion (largest remainder), each share
/// at least `floor`.
fn proportional(total: usize, weights: &[f64], floor: usize) -> Vec<usize> {
    let k = weights.len();
    let spare = total.saturating_sub(floor * k);
    let sum: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| spare as f64 * w / sum).collect();
    let mut shares: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut order: Vec<usize> = (0..k).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let left = spare - shares.iter().sum::<usize>();
    for &i in order.iter().take(left) {
        shares[i] += 1;
    }
    shares.iter().map(|s| s + floor).collect()
}

/// Every placement the planner weighs, named.
fn candidates_for(arch: &Arch, profile: &Profile, main: Shape) -> Result<Vec<(String, Placement)>, InferError> {
    let layout = arch.layout();
    let layers = layout.layers();
    let world = profile.devices.len();
    let at = profile.shape_index(main)?;
    let order = by_speed(profile, at);
    let speed = |d: usize| 1.0 / profile.devices[d].times[at].original[0].max(1e-12);
    let mut out = Vec::new();
    for &d in &order {
        out.push((
            format!("single on {d}"),
            Placement {
                workers: world,
                stages: vec![Stage {
                    layers: 0..layers,
                    mode: Mode::Single,
                    workers: vec![d],
                }],
            },
        ));
    }
    for k in 2..=world {
        let top = &order[..k];
        out.push((
            format!("tensor-parallel over {top:?}"),
            Placement {
                workers: world,
                stages: vec![Stage {
                    layers: 0..layers,
                    mode: Mode::TensorParallel,
                    workers: top.to_vec(),
                }],
            },
        ));
        if k <= layers {
            let weights: Vec<f64> = top.iter().map(|&d| speed(d)).collect();
            let counts = proportional(layers, &weights, 1);
            out.push((
                format!("pipeline over {top:?}, layers {counts:?}"),
                Placement {
                    workers: world,
                    stages: consecutive(&counts)
                        .into_iter()
                        .zip(top)
                        .map(|(layers, &d)| Stage {
                            layers,
                            mode: Mode::Single,
                            workers: vec![d],
                        })
                        .collect(),
                },
            ));
        }
        if k >= 4 && k % 2 == 0 && layers >= 2 {
            let (a, b) = top.split_at(k / 2);
            out.push((
                format!("tensor-parallel {a:?} then {b:?}"),
                Placement {
                    workers: world,
                    stages: vec![
                        Stage {
                            layers: span(layers, 0, 2),
                            mode: Mode::TensorParallel,
                            workers: a.to_vec(),
                        },
                        Stage {
                            layers: span(layers, 1, 2),
                            mode: Mode::TensorParallel,
                            workers: b.to_vec(),
                        },
                    ],
                },
            ));
        }
    }
    if !layout.kinds.contains(&LayerKind::Decoupled) {
        return Ok(out);
    }
    let d = layout.divisions;
    let last_original = layout
        .kinds
        .iter()
        .rposition(|&k| k == LayerKind::Original)
        .unwrap_or(layers - 1);
    // Whether an original layer comes before the last: else only the last's mode matters.
    let body_has_originals = layout.kinds[..last_original].contains(&LayerKind::Original);
    let modes = [Original::Replicated, Original::TensorParallel, Original::Gather];
    for k in 2..=world {
        let top = &order[..k];
        let even = crate::placement::even(d, k);
        let sub_speed: Vec<f64> = top
            .iter()
            .map(|&w| 1.0 / profile.devices[w].times[at].sub_blocks[0].max(1e-12))
            .collect();
        let fast = proportional(d, &sub_speed, 0);
        let mut splits = vec![("even", even.clone())];
        if fast != even {
            splits.push(("by speed", fast));
        }
        for (how, counts) in &splits {
            for body in modes {
                for tail in modes {
                    if body != tail && !body_has_originals {
                        continue;
                    }
                    let stage = |layers: Range<usize>, original: Original| Stage {
                        layers,
                        mode: Mode::Decoupled {
                            sub_blocks: counts.clone(),
                            original,
                        },
                        workers: top.to_vec(),
                    };
                    let stages = match body == tail {
                        true => vec![stage(0..layers, tail)],
                        false => vec![stage(0..last_original, body), stage(last_original..layers, tail)],
                    };
                    let name = match body == tail {
                        true => format!(
                            "decoupled over {top:?}, sub-blocks {how} {counts:?}, originals {}",
                            tail.name()
                        ),
                        false => format!(
                            "decoupled over {top:?}, sub-blocks {how} {counts:?}, originals {} (last {})",
                            body.name(),
                            tail.name()
                        ),
                    };
                    out.push((name, Placement { workers: world, stages }));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bert::BertConfig;
    use crate::profile::{Device, KindTimes, Link, Sizes};
    use hetero_models::decoupled_bert::DecoupledBertConfig;
    use hetero_models::{Decoupling, Variant};

    /// BERT-Base decoupled 4 x 1 (eleven decoupled layers, one original).
    fn arch() -> Arch {
        let decoupling = Decoupling {
            divisions: 4,
            blocks: 1,
            variant: Variant::SplitHeads,
        };
        Arch::DecoupledBert(DecoupledBertConfig::new(BertConfig::base(), decoupling).unwrap())
    }

    /// Four devices of relative speeds `speeds` (1 = 40 ms a layer) on links of
    /// `mbit` Mbit/s with 0.2 ms latency.
    fn profile(arch: &Arch, speeds: &[f64], mbit: f64) -> Profile {
        let w = speeds.len();
        let layer = 0.040;
        let devices = speeds
            .iter()
            .enumerate()
            .map(|(rank, s)| Device {
                rank,
                address: None,
                threads: 1,
                free_memory: 8 << 30,
                times: vec![KindTimes {
                    embed: 0.001 / s,
                    original: (1..=w).map(|k| layer / s / k as f64 * 1.1).collect(),
                    sub_blocks: (1..=4).map(|n| layer / s * n as f64 / 4.0).collect(),
                    head: vec![],
                }],
                alongside: vec![1.0; w],
            })
            .collect();
        let links = (0..w)
            .flat_map(|a| (0..w).filter(move |&b| b != a).map(move |b| (a, b)))
            .map(|(from, to)| Link {
                from,
                to,
                bandwidth: mbit * 1e6 / 8.0,
                latency: 0.0002,
            })
            .collect();
        Profile {
            version: crate::profile::VERSION,
            model: "test".into(),
            arch: arch.summary(),
            shapes: vec![Shape::prefill(1, 128)],
            sizes: Sizes {
                embed: 100 << 20,
                original: (1..=w).map(|k| (28 << 20) / k as u64).collect(),
                sub_block: 7 << 20,
                head: vec![],
                original_cache: vec![0; w],
                sub_block_cache: 0,
            },
            devices,
            links,
        }
    }

    #[test]
    fn slow_links_choose_decoupled_and_fast_links_split_the_layers() {
        let arch = arch();
        let objective = Objective::encoder(128);
        let slow = plan(&arch, &profile(&arch, &[1.0; 4], 10.0), &objective).unwrap();
        assert!(slow.chosen.name.starts_with("decoupled"), "{}", slow.chosen.name);
        let tp = slow
            .candidates
            .iter()
            .find(|c| c.name.starts_with("tensor-parallel over [0, 1, 2, 3]"))
            .unwrap();
        assert!(tp.prediction.total > 3.0 * slow.chosen.prediction.total);
        // Each state crosses each link once per original layer, not twice per layer.
        assert!(slow.chosen.prediction.bytes() * 8 < tp.prediction.bytes());
        // On a fast network, all four devices compute: decoupled or tensor-parallel.
        let fast = plan(&arch, &profile(&arch, &[1.0; 4], 100_000.0), &objective).unwrap();
        assert!(!fast.chosen.name.starts_with("single"), "{}", fast.chosen.name);
        assert!(fast.chosen.prediction.total < 0.5 * 12.0 * 0.040);
    }

    #[test]
    fn unequal_devices_get_sub_blocks_in_proportion_to_their_speed() {
        let arch = arch();
        let p = profile(&arch, &[1.0, 1.0, 0.5, 0.25], 1000.0);
        let plan = plan(&arch, &p, &Objective::encoder(128)).unwrap();
        let even = plan
            .candidates
            .iter()
            .find(|c| c.name.contains("sub-blocks even [1, 1, 1, 1]") && c.name.ends_with("gather"))
            .unwrap();
        let by_speed = plan
            .candidates
            .iter()
            .find(|c| {
                c.name.contains("sub-blocks by speed")
                    && c.name.contains("over [0, 1, 2, 3]")
                    && c.name.ends_with("gather")
            })
            .unwrap();
        assert!(
            by_speed.name.contains("[2, 1, 1, 0]") || by_speed.name.contains("[1, 2, 1, 0]"),
            "{}",
            by_speed.name
        );
        assert!(by_speed.prediction.compute < even.prediction.compute);
        assert_eq!(proportional(4, &[4.0, 4.0, 2.0, 1.0], 0).iter().sum::<usize>(), 4);
        assert_eq!(proportional(12, &[1.0, 1.0, 1.0], 1), [4, 4, 4]);
    }

    #[test]
    fn a_device_without_memory_is_named_and_avoided() {
        let arch = arch();
        let mut p = profile(&arch, &[1.0; 4], 10.0);
        for d in &mut p.devices {
            d.free_memory = 250 << 20;
        }
        // No single device holds the whole model; shared, it fits.
        let plan = plan(&arch, &p, &Objective::encoder(128)).unwrap();
        let single = plan.candidates.iter().find(|c| c.name == "single on 0").unwrap();
        assert!(
            single.refused.as_ref().unwrap().contains("device 0 would hold"),
            "{:?}",
            single.refused
        );
        assert!(plan.chosen.refused.is_none());
        for d in &mut p.devices {
            d.free_memory = 1 << 20;
        }
        let err = super::plan(&arch, &p, &Objective::encoder(128))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no placement fits") && err.contains("MiB free"), "{err}");
    }

    #[test]
    fn a_profile_of_another_model_or_shape_is_refused() {
        let arch = arch();
        let p = profile(&arch, &[1.0; 4], 10.0);
        let other = Arch::Bert(BertConfig::base());
        let err = plan(&other, &p, &Objective::encoder(128)).unwrap_err().to_string();
        assert!(err.contains("not on this model"), "{err}");
        let err = plan(&arch, &p, &Objective::encoder(64)).unwrap_err().to_string();
        assert!(err.contains("no times for prefill 1x64"), "{err}");
        let err = p.check(&arch, 3, None).unwrap_err().to_string();
        assert!(err.contains("4 devices profiled, but the mesh has 3"), "{err}");
        let mut broken = p.clone();
        broken.links.pop();
        assert!(
            broken
                .check(&arch, 4, None)
                .unwrap_err()
                .to_string()
                .contains("no measurement of the link 3 → 2")
        );
        let mut negative = p.clone();
        negative.devices[1].times[0].original[0] = -1.0;
        assert!(
            negative
                .check(&arch, 4, None)
                .unwrap_err()
                .to_string()
                .contains("device 1")
        );
    }

    #[test]
    fn finalists_are_the_best_of_each_structure_within_the_spread() {
        let arch = arch();
        let plan = plan(&arch, &profile(&arch, &[1.0; 4], 1000.0), &Objective::encoder(128)).unwrap();
        let finalists = plan.finalists(8);
        assert_eq!(finalists[0].name, plan.chosen.name, "the planner's choice comes first");
        let shapes: Vec<_> = finalists.iter().map(|c| structure(&c.placement)).collect();
        for (i, s) in shapes.iter().enumerate() {
            assert!(!shapes[..i].contains(s), "{} repeats a structure", finalists[i].name);
        }
        assert!(
            finalists
                .iter()
                .all(|c| c.prediction.total <= FINAL_SPREAD * plan.chosen.prediction.total)
        );
        // Single on any of four identical devices is one finalist at most.
        assert!(finalists.iter().filter(|c| c.name.starts_with("single")).count() <= 1);
        assert!(finalists.len() > 1, "several structures are close on a fast network");
        assert_eq!(plan.finalists(1).len(), 1);
    }

    #[test]
    fn devices_that_share_a_core_are_not_paired() {
        let arch = arch();
        let mut p = profile(&arch, &[1.0; 4], 100_000.0);
        // Two cores, each shared by two workers: 0 with 1, 2 with 3.
        for (a, b) in [(0, 1), (1, 0), (2, 3), (3, 2)] {
            p.devices[a].alongside[b] = 2.0;
        }
        assert_eq!(by_speed(&p, 0), [0, 2, 1, 3]);
        let plan = plan(&arch, &p, &Objective::encoder(128)).unwrap();
        assert!(plan.candidates.iter().any(|c| c.name == "tensor-parallel over [0, 2]"));
        let tp = |workers: Vec<usize>| Placement {
            workers: 4,
            stages: vec![Stage {
                layers: 0..12,
                mode: Mode::TensorParallel,
                workers,
            }],
        };
        let shape = Shape::prefill(1, 128);
        let shared = predict(&arch, &p, &tp(vec![0, 1]), shape).unwrap();
        let apart = predict(&arch, &p, &tp(vec![0, 2]), shape).unwrap();
        assert!(
            (shared.compute / apart.compute - 2.0).abs() < 0.1,
            "{shared:?} {apart:?}"
        );
        // On four workers each computes beside its core's other: twice its part.
        let all = predict(&arch, &p, &tp(vec![0, 1, 2, 3]), shape).unwrap();
        assert!(
            all.compute >= apart.compute,
            "four parts on two cores are no faster than two"
        );
    }
}
