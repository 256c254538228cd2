//! The cost model: what a placement costs on profiled devices and links,
//! predicted by walking a step exactly as [`crate::runtime`] runs it.
//!
//! ## Design
//! A step is bulk-synchronous: phases of computation (every worker that has
//! work in a layer runs it; the phase lasts as long as the slowest) alternate
//! with rounds of communication. So the prediction is a walk over the
//! placement with the runtime's own states ([`crate::activations`]: the hidden
//! state whole on some workers, or sliced by sub-block) and the mesh's own
//! algorithms (a direct exchange below [`THREADED`] bytes, a ring above), adding:
//! - per compute phase, the largest profiled time among its workers, each times
//!   its slow-down from the others computing in the same phase (the profile's
//!   `alongside` ratios, added: a device sharing a core with one other computing
//!   runs about half as fast);
//! - per communication round, the largest one-way latency among its transfers
//!   plus the longest of: any device's bytes out over its interface's rate, any
//!   device's bytes in over its interface's rate, and any transfer over its
//!   link's rate (a device's interface rate is its fastest measured link).
//!
//! Memory is a hard limit: weights (the embedding, each layer's part or
//! sub-blocks, the head's part) plus the KV cache for the longest context, per
//! device, against its free memory.

use std::collections::BTreeMap;
use std::ops::Range;

use hetero_comm::mesh::THREADED;
use hetero_models::LayerKind;

use crate::InferError;
use crate::placement::{Layout, Original, Placement};
use crate::profile::{Profile, Shape};
use crate::runtime::Arch;

/// A prediction for one request shape (or a weighted sum of several).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prediction {
    /// Seconds, end to end.
    pub total: f64,
    /// Of which computing.
    pub compute: f64,
    /// Of which communicating.
    pub communication: f64,
    /// Bytes sent over each link `(from, to)`.
    pub traffic: BTreeMap<(usize, usize), u64>,
}

impl Prediction {
    /// `self + weight × other`.
    pub fn add(&mut self, other: &Prediction, weight: f64) {
        self.total += weight * other.total;
        self.compute += weight * other.compute;
        self.communication += weight * other.communication;
        for (&link, &bytes) in &other.traffic {
            *self.traffic.entry(link).or_default() += (weight * bytes as f64).round() as u64;
        }
    }

    /// Bytes over all links.
    pub fn bytes(&self) -> u64 {
        self.traffic.values().sum()
    }
}

/// Where the hidden state is, as the runtime tracks it.
#[derive(Debug, Clone, PartialEq)]
enum State {
    Whole(Vec<usize>),
    Sliced(Vec<usize>, Vec<Range<usize>>),
}

/// One walk's running totals.
struct Walk<'a> {
    profile: &'a Profile,
    /// Floats in one whole hidden state.
    state: usize,
    divisions: usize,
    prediction: Prediction,
}

impl Walk<'_> {
    /// A compute phase: `work` is each computing device's profiled seconds.
    fn compute(&mut self, work: &[(usize, f64)]) {
        let longest = work
            .iter()
            .map(|&(d, t)| {
                let alongside = &self.profile.devices[d].alongside;
                let slow_down: f64 = work
                    .iter()
                    .filter(|&&(o, _)| o != d)
                    .map(|&(o, _)| alongside[o] - 1.0)
                    .sum();
                t * (1.0 + slow_down)
            })
            .fold(0.0, f64::max);
        self.prediction.compute += longest;
        self.prediction.total += longest;
    }

    /// One round of simultaneous transfers `(from, to, floats)`.
    fn round(&mut self, flows: &[(usize, usize, usize)]) {
        let bytes: Vec<_> = flows.iter().map(|&(a, b, floats)| (a, b, 4 * floats)).collect();
        self.round_bytes(&bytes);
    }

    /// One round of simultaneous frames `(from, to, payload bytes)`.
    fn round_bytes(&mut self, flows: &[(usize, usize, usize)]) {
        let flows: Vec<_> = flows.iter().filter(|f| f.0 != f.1).copied().collect();
        if flows.is_empty() {
            return;
        }
        let p = self.profile;
        let world = p.devices.len();
        let link = |a: usize, b: usize| p.link(a, b).expect("checked: every link measured");
        let interface = |d: usize, out: bool| {
            (0..world)
                .filter(|&o| o != d)
                .map(|o| {
                    if out {
                        link(d, o).bandwidth
                    } else {
                        link(o, d).bandwidth
                    }
                })
                .fold(0.0, f64::max)
        };
        let (mut out, mut inn) = (vec![0f64; world], vec![0f64; world]);
        let mut slowest = 0f64;
        let mut latency = 0f64;
        for &(a, b, payload) in &flows {
            let bytes = payload as f64 + 5.0;
            out[a] += bytes;
            inn[b] += bytes;
            slowest = slowest.max(bytes / link(a, b).bandwidth);
            latency = latency.max(link(a, b).latency);
            *self.prediction.traffic.entry((a, b)).or_default() += bytes as u64;
        }
        for d in 0..world {
            slowest = slowest
                .max(out[d] / interface(d, true))
                .max(inn[d] / interface(d, false));
        }
        self.prediction.communication += latency + slowest;
        self.prediction.total += latency + slowest;
    }

    /// `from`'s holders copy the whole state to each of `to` lacking it.
    fn hand_over(&mut self, holders: &[usize], to: &[usize]) {
        let needers: Vec<usize> = to.iter().copied().filter(|w| !holders.contains(w)).collect();
        let flows: Vec<_> = needers
            .iter()
            .enumerate()
            .map(|(j, &w)| (holders[j % holders.len()], w, self.state))
            .collect();
        self.round(&flows);
    }

    fn sizes(&self, ranges: &[Range<usize>]) -> Vec<usize> {
        let per = self.state / self.divisions;
        ranges.iter().map(|r| r.len() * per).collect()
    }

    /// The mesh's all-gather of parts of `sizes` floats over `group`.
    fn all_gather(&mut self, group: &[usize], sizes: &[usize]) {
        let g = group.len();
        let total: usize = sizes.iter().sum();
        if g == 1 {
            return;
        }
        if g == 2 || total * 4 <= THREADED {
            let flows: Vec<_> = (0..g)
                .flat_map(|i| {
                    (0..g)
                        .filter(move |&j| j != i)
                        .map(move |j| (group[i], group[j], sizes[i]))
                })
                .collect();
            self.round(&flows);
        } else {
            for step in 0..g - 1 {
                let flows: Vec<_> = (0..g)
                    .map(|p| (group[p], group[(p + 1) % g], sizes[(p + g - step) % g]))
                    .collect();
                self.round(&flows);
            }
        }
    }

    /// The mesh's allreduce of `floats` over `group`.
    fn allreduce(&mut self, group: &[usize], floats: usize) {
        let g = group.len();
        if g <= 1 {
            return;
        }
        if g > 2 && floats * 4 > THREADED {
            for _ in 0..2 * (g - 1) {
                let flows: Vec<_> = (0..g).map(|p| (group[p], group[(p + 1) % g], floats / g)).collect();
                self.round(&flows);
            }
        } else {
            let flows: Vec<_> = group
                .iter()
                .flat_map(|&a| group.iter().filter(move |&&b| b != a).map(move |&b| (a, b, floats)))
                .collect();
            self.round(&flows);
        }
    }

    /// The state sliced as `ranges` over `workers`, as [`crate::activations`] does it.
    fn slice_as(&mut self, state: State, workers: &[usize], ranges: &[Range<usize>]) -> State {
        let holders = match state {
            State::Sliced(w, r) if w == workers && r == ranges => return State::Sliced(w, r),
            sliced @ State::Sliced(..) => match self.make_whole(sliced, workers) {
                State::Whole(h) => h,
                State::Sliced(..) => unreachable!("made whole"),
            },
            State::Whole(h) => h,
        };
        let per = self.state / self.divisions;
        let flows: Vec<_> = workers
            .iter()
            .zip(ranges)
            .filter(|(w, r)| !holders.contains(w) && !r.is_empty())
            .enumerate()
            .map(|(j, (&w, r))| (holders[j % holders.len()], w, r.len() * per))
            .collect();
        self.round(&flows);
        State::Sliced(workers.to_vec(), ranges.to_vec())
    }

    /// The state whole on `to`, as [`crate::activations`] does it.
    fn make_whole(&mut self, state: State, to: &[usize]) -> State {
        let holders = match state {
            State::Sliced(workers, ranges) if ranges.iter().all(|r| r.len() == self.divisions) => workers,
            State::Sliced(workers, ranges) => {
                let sizes = self.sizes(&ranges);
                if workers.len() == to.len() && workers.iter().all(|w| to.contains(w)) {
                    self.all_gather(&workers, &sizes);
                    workers
                } else {
                    let root = if workers.contains(&to[0]) { to[0] } else { workers[0] };
                    let flows: Vec<_> = workers.iter().zip(&sizes).map(|(&w, &n)| (w, root, n)).collect();
                    self.round(&flows);
                    vec![root]
                }
            }
            State::Whole(holders) => holders,
        };
        self.hand_over(&holders, to);
        State::Whole(to.to_vec())
    }
}

/// Predicts one step of `shape` under `placement` on the profiled devices.
pub fn predict(arch: &Arch, profile: &Profile, placement: &Placement, shape: Shape) -> Result<Prediction, InferError> {
    let layout = arch.layout();
    placement.check(&layout)?;
    if placement.workers != profile.devices.len() {
        return Err(InferError::Profile(format!(
            "the placement has {} workers, the profile {} devices",
            placement.workers,
            profile.devices.len()
        )));
    }
    let at = profile.shape_index(shape)?;
    let times = |d: usize| &profile.devices[d].times[at];
    let mut walk = Walk {
        profile,
        state: shape.batch * shape.tokens * arch.hidden(),
        divisions: layout.divisions,
        prediction: Prediction::default(),
    };
    // The front's command (the rows' lengths, cache slots and ids) reaches every
    // worker.
    let command: Vec<_> = (1..placement.workers)
        .map(|r| (0, r, crate::command::run_bytes(shape.batch, shape.tokens)))
        .collect();
    walk.round_bytes(&command);
    let first = &placement.stages[0];
    let embed: Vec<_> = first.workers.iter().map(|&d| (d, times(d).embed)).collect();
    walk.compute(&embed);
    let mut state = State::Whole(first.workers.clone());
    for stage in &placement.stages {
        let ranges = stage.sub_block_ranges(layout.divisions);
        let on = stage.holders_after();
        let parts = match stage.originals() {
            Original::TensorParallel => stage.workers.len(),
            Original::Replicated | Original::Gather => 1,
        };
        for layer in stage.layers.clone() {
            match layout.kinds[layer] {
                LayerKind::Decoupled => {
                    state = walk.slice_as(state, &stage.workers, &ranges);
                    let work: Vec<_> = stage
                        .workers
                        .iter()
                        .zip(&ranges)
                        .filter(|(_, r)| !r.is_empty())
                        .map(|(&d, r)| (d, times(d).sub_blocks[r.len() - 1]))
                        .collect();
                    walk.compute(&work);
                }
                LayerKind::Original => {
                    state = walk.make_whole(state, &on);
                    let work: Vec<_> = on.iter().map(|&d| (d, times(d).original[parts - 1])).collect();
                    walk.compute(&work);
                    if parts > 1 {
                        // Two all-reduces: attention and feed-forward.
                        walk.allreduce(&stage.workers, walk.state);
                        walk.allreduce(&stage.workers, walk.state);
                    }
                }
            }
        }
        state = walk.make_whole(state, &on);
    }
    // The output: a decoder's head (split with a tensor-parallel last stage, the
    // parts' best tokens compared), then the result to rank 0.
    let last = placement.stages.last().expect("checked");
    let leader = last.holders_after()[0];
    let width = match arch.llama() {
        Some(_) => {
            let group: Vec<usize> = (0..placement.workers)
                .filter(|&r| last.head_part(r).is_some())
                .collect();
            let k = group.len();
            let work: Vec<_> = group.iter().map(|&d| (d, times(d).head[k - 1])).collect();
            walk.compute(&work);
            walk.allreduce(&group, shape.batch * 2 * k);
            1
        }
        None => arch.hidden(),
    };
    walk.round(&[(leader, 0, shape.batch * width)]);
    Ok(walk.prediction)
}

/// Bytes `rank` holds under `placement`: weights, and the KV cache of `batch`
/// rows of `context` tokens.
pub fn memory(arch: &Arch, profile: &Profile, placement: &Placement, rank: usize, batch: usize, context: usize) -> u64 {
    let layout: Layout = arch.layout();
    let s = &profile.sizes;
    let mut bytes = 0u64;
    if placement.stages[0].workers.contains(&rank) {
        bytes += s.embed;
    }
    let tokens = (batch * context) as u64;
    for stage in &placement.stages {
        let Some(pos) = stage.workers.iter().position(|&w| w == rank) else {
            continue;
        };
        let sub = stage.sub_block_ranges(layout.divisions)[pos].len() as u64;
        let part = stage.original_part(rank);
        for layer in stage.layers.clone() {
            bytes += match (layout.kinds[layer], part) {
                (LayerKind::Decoupled, _) => sub * (s.sub_block + tokens * s.sub_block_cache),
                (LayerKind::Original, Some((_, k))) => s.original[k - 1] + tokens * s.original_cache[k - 1],
                (LayerKind::Original, None) => 0,
            };
        }
    }
    if arch.llama().is_some()
        && let Some((_, k)) = placement.stages.last().expect("checked").head_part(rank)
    {
        bytes += s.head[k - 1];
    }
    bytes
}

/// Refuses `placement` when a device would hold more than it has free, naming
/// the device and both numbers.
pub fn check_memory(
    arch: &Arch,
    profile: &Profile,
    placement: &Placement,
    batch: usize,
    context: usize,
) -> Result<(), InferError> {
    for d in &profile.devices {
        let need = memory(arch, profile, placement, d.rank, batch, context);
        if need > d.free_memory {
            return Err(InferError::Profile(format!(
                "device {} would hold {} MiB of weights and KV cache ({batch} x {context} tokens), \
                 but has {} MiB free",
                d.rank,
                need >> 20,
                d.free_memory >> 20
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;

    use super::*;
    use crate::bert::BertConfig;
    use crate::llama::LlamaConfig;
    use crate::protocol::{Followed, Front, REPORT_EXCHANGE_BYTES, follow, profile_mesh, send_placement};
    use crate::runtime::{Request, Want, Worker};
    use crate::weights::RandomWeights;
    use hetero_models::decoupled_bert::DecoupledBertConfig;
    use hetero_models::decoupled_llama::DecoupledLlamaConfig;
    use hetero_models::{Decoupling, Variant};

    type B = Flex;

    /// Profiles a loopback mesh of `world` workers in this process, then runs
    /// `requests` under each of `placements` (sent by the front, as `--placement
    /// auto` does); returns the profile and, per placement and request, the bytes
    /// every worker sent together.
    fn profile_and_run(
        arch: &Arch,
        world: usize,
        shapes: &[Shape],
        placements: &[Placement],
        requests: &[Request],
    ) -> (Profile, Vec<Vec<u64>>) {
        let weights = RandomWeights::new(arch.tensor_shapes(), 3);
        let idle = Placement::named("single", &arch.layout(), world).unwrap();
        let meshes = hetero_comm::mesh::loopback(world, "profile", "t").unwrap();
        std::thread::scope(|s| {
            let mut handles = Vec::new();
            for (rank, mut mesh) in meshes.into_iter().enumerate() {
                let (arch, idle, weights) = (arch.clone(), idle.clone(), &weights);
                handles.push(s.spawn(move || {
                    let load =
                        |p: Placement| Worker::<B>::load(arch.clone(), weights, p, rank, &Default::default()).unwrap();
                    if rank > 0 {
                        let mut worker = load(idle);
                        while let Followed::Place(p) = follow(&mut worker, &mut mesh).unwrap() {
                            worker = load(p);
                        }
                        return None;
                    }
                    let profile = profile_mesh::<B>(&mut mesh, &arch, "test", shapes, &mut |_| {}).unwrap();
                    let mut front = Front {
                        worker: load(idle),
                        mesh,
                    };
                    let mut bytes = Vec::new();
                    for p in placements {
                        send_placement(&mut front.mesh, p).unwrap();
                        front.worker = load(p.clone());
                        let mut per_request = Vec::new();
                        for req in requests {
                            let before: u64 = front.reports().unwrap().iter().map(|r| r.bytes_sent).sum();
                            front.run(req).unwrap();
                            let after: u64 = front.reports().unwrap().iter().map(|r| r.bytes_sent).sum();
                            per_request.push(after - before - REPORT_EXCHANGE_BYTES * (world as u64 - 1));
                        }
                        bytes.push(per_request);
                    }
                    front.stop().unwrap();
                    Some((profile, bytes))
                }));
            }
            handles.into_iter().map(|h| h.join().unwrap()).next().flatten().unwrap()
        })
    }

    /// The cost model walks a step as the runtime runs it: on a real profile of a
    /// loopback mesh, its bytes are the bytes the workers really send, byte for
    /// byte, for every kind of placement — and the profile survives its file.
    #[test]
    fn predicted_traffic_is_the_runtime_traffic() {
        let bert = BertConfig {
            hidden: 48,
            heads: 4,
            layers: 4,
            intermediate: 64,
            vocab: 50,
            max_positions: 16,
            ..BertConfig::mini_lm()
        };
        let decoupling = Decoupling {
            divisions: 4,
            blocks: 2,
            variant: Variant::SplitHeads,
        };
        let arch = Arch::DecoupledBert(DecoupledBertConfig::new(bert, decoupling).unwrap());
        let layout = arch.layout();
        let seq = 12;
        let placements: Vec<Placement> = [
            "single",
            "tensor-parallel",
            "pipeline",
            "decoupled",
            "decoupled-replicated",
            "decoupled-gather",
        ]
        .iter()
        .map(|n| Placement::named(n, &layout, 3).unwrap())
        .chain([Placement::parse(
            "workers = 3\n[[stage]]\nlayers = \"0..3\"\nmode = \"decoupled\"\nworkers = [2, 0]\n\
             sub_blocks = [3, 1]\noriginal = \"gather\"\n[[stage]]\nlayers = \"3..4\"\nworkers = [1]\n",
            &layout,
        )
        .unwrap()])
        .collect();
        let shapes = [Shape::prefill(1, seq)];
        let request = Request::embed(&[(0..seq as u32).map(|i| i % 40 + 1).collect()]);
        let (profile, bytes) = profile_and_run(&arch, 3, &shapes, &placements, &[request]);
        let file = serde_json::to_string(&profile).unwrap();
        let back: Profile = serde_json::from_str(&file).unwrap();
        assert_eq!(back, profile);
        back.check(&arch, 3, None).unwrap();
        assert_eq!(profile.links.len(), 6);
        assert!(
            profile
                .devices
                .iter()
                .all(|d| d.times[0].sub_blocks.len() == 4 && d.free_memory > 0)
        );
        for (p, measured) in placements.iter().zip(&bytes) {
            let predicted = predict(&arch, &profile, p, shapes[0]).unwrap();
            assert_eq!(predicted.bytes(), measured[0], "{}", p.to_toml());
        }
    }

    /// The same for a decoder's prefill and decode steps (greedy tokens: the head
    /// parts compare their best candidates).
    #[test]
    fn predicted_decoder_traffic_is_the_runtime_traffic() {
        let llama = LlamaConfig {
            hidden: 48,
            layers: 4,
            heads: 6,
            kv_heads: 3,
            ffn: 70,
            vocab: 61,
            context: 64,
            rope_base: 10_000.0,
            eps: 1e-5,
            separate_head: true,
            attention_bias: false,
        };
        let decoupling = Decoupling {
            divisions: 3,
            blocks: 2,
            variant: Variant::SplitHeads,
        };
        let arch = Arch::DecoupledLlama(DecoupledLlamaConfig::new(llama, decoupling).unwrap());
        let layout = arch.layout();
        let placements: Vec<Placement> = ["single", "tensor-parallel", "pipeline", "decoupled", "decoupled-gather"]
            .iter()
            .map(|n| Placement::named(n, &layout, 3).unwrap())
            .collect();
        let shapes = [Shape::prefill(1, 5), Shape::decode(1, 5)];
        let requests = [
            Request::decode(vec![vec![1, 5, 9, 17, 3]], true, Want::NextToken),
            Request::decode(vec![vec![22]], false, Want::NextToken),
        ];
        let (profile, bytes) = profile_and_run(&arch, 3, &shapes, &placements, &requests);
        assert!(profile.sizes.sub_block_cache > 0 && profile.sizes.original_cache[0] > 0);
        for (p, measured) in placements.iter().zip(&bytes) {
            for (shape, m) in shapes.iter().zip(measured) {
                let predicted = predict(&arch, &profile, p, *shape).unwrap();
                assert_eq!(predicted.bytes(), *m, "{shape}: {}", p.to_toml());
            }
        }
    }
}
