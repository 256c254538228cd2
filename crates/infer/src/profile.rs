//! Offline profiling (seed 000, module 3): how fast each device of a mesh runs
//! each layer kind the planner may place, what memory it has free, and how fast
//! each link between two workers is — the facts [`crate::plan`] weighs.
//!
//! ## Design
//! - Compute is timed per *layer kind*, at each request shape asked for (on
//!   copies that together outgrow the CPU's caches, run in turn: a step reads
//!   each layer's weights from memory, and a decode step is bound by that): the
//!   embedding; an original layer whole and as one of k tensor-parallel parts
//!   (k = 2..workers); n sub-blocks of a decoupled layer (n = 1..N_d: a worker's
//!   share runs as one batched module, so n sub-blocks do not cost n times one);
//!   the output head whole and split. The weights are random, of the model's own
//!   shapes: time does not depend on the values.
//! - Each device is timed alone while the others wait, then every pair at once
//!   on an original layer. The ratios, `alongside[j]`, are how much slower a
//!   device computes while device j computes too: 1 for devices on separate
//!   machines, about 2 for two workers pinned to one core, a little above 1 for
//!   two cores sharing memory bandwidth. The planner adds up, for each compute
//!   phase, the slow-down from every other device computing in it — so it knows
//!   which devices share a core, and does not give both of them work at once.
//! - Links: per pair, a ping-pong gives the one-way latency, a bulk transfer each
//!   way the bandwidth. The planner takes a device's links to share its network
//!   interface (a switch, Wi-Fi, the test bed's bridge), whose rate is the
//!   device's fastest link.
//! - Memory: the kernel's MemAvailable, lowered to the cgroup's limit when one is
//!   set.
//! - A profile names the model's shape ([`crate::Arch::summary`]) and its devices;
//!   the planner refuses one measured on another model or another mesh.

use std::path::Path;
use std::time::{Duration, Instant};

use burn::prelude::*;
use hetero_comm::Mesh;
use hetero_models::LayerKind;
use serde::{Deserialize, Serialize};

use crate::InferError;
use crate::bert::{BertEmbeddings, BertLayer, padding_mask};
use crate::llama::{KvCache, LlamaEmbeddings, LlamaHead, LlamaLayer};
use crate::runtime::Arch;
use crate::weights::RandomWeights;
use hetero_models::sub_blocks::Masking;

/// The profile format's version.
pub const VERSION: u32 = 2;

/// The largest profile file read: far above a real one (a few KiB per device).
pub const MAX_FILE: u64 = 16 << 20;

/// A request shape: `batch` rows of `tokens` new tokens after `context` cached
/// ones (a prefill has no context; a decode step is one token after the prompt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    /// Rows.
    pub batch: usize,
    /// New tokens per row.
    pub tokens: usize,
    /// Tokens already in the KV cache (decoders).
    pub context: usize,
}

impl Shape {
    /// A prefill (or an encoder's request) of `seq` tokens.
    pub fn prefill(batch: usize, seq: usize) -> Self {
        Shape {
            batch,
            tokens: seq,
            context: 0,
        }
    }

    /// One decode step after `context` tokens.
    pub fn decode(batch: usize, context: usize) -> Self {
        Shape {
            batch,
            tokens: 1,
            context,
        }
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.context {
            0 => write!(f, "prefill {}x{}", self.batch, self.tokens),
            c => write!(f, "decode {}x{} after {c}", self.batch, self.tokens),
        }
    }
}

/// Seconds one device takes for each layer kind at one shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindTimes {
    /// The embedding.
    pub embed: f64,
    /// `original[k - 1]`: one of k tensor-parallel parts of an original layer
    /// (k = 1: the whole layer).
    pub original: Vec<f64>,
    /// `sub_blocks[n - 1]`: n sub-blocks of a decoupled layer (empty for an
    /// ordinary model).
    pub sub_blocks: Vec<f64>,
    /// `head[k - 1]`: one of k vocabulary parts of the output head (empty for an
    /// encoder).
    pub head: Vec<f64>,
}

/// Bytes each layer kind holds: weights, and KV cache per token of context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sizes {
    /// The embedding's weights.
    pub embed: u64,
    /// `original[k - 1]`: weights of the largest of k parts of an original layer.
    pub original: Vec<u64>,
    /// Weights of one sub-block.
    pub sub_block: u64,
    /// `head[k - 1]`: weights of the largest of k parts of the head.
    pub head: Vec<u64>,
    /// `original_cache[k - 1]`: KV cache per token (and row) of one of k parts.
    pub original_cache: Vec<u64>,
    /// KV cache per token (and row) of one sub-block.
    pub sub_block_cache: u64,
}

/// One device: its speed at each shape, and its memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// Its rank in the mesh.
    pub rank: usize,
    /// Its data-plane address, when known.
    pub address: Option<String>,
    /// Threads it computes with.
    pub threads: usize,
    /// Memory free for weights and caches, bytes.
    pub free_memory: u64,
    /// Times at each of the profile's shapes, in order.
    pub times: Vec<KindTimes>,
    /// `alongside[j]`: how many times slower it computes while device j computes
    /// too (1 for itself).
    pub alongside: Vec<f64>,
}

/// One direction of one link.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// Sending rank.
    pub from: usize,
    /// Receiving rank.
    pub to: usize,
    /// Bytes per second.
    pub bandwidth: f64,
    /// One-way latency, seconds.
    pub latency: f64,
}

/// Everything the planner needs to know about a mesh and a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// [`VERSION`].
    pub version: u32,
    /// The model's name as given.
    pub model: String,
    /// Its shape ([`Arch::summary`]).
    pub arch: String,
    /// The request shapes timed.
    pub shapes: Vec<Shape>,
    /// What each layer kind holds.
    pub sizes: Sizes,
    /// The devices, by rank.
    pub devices: Vec<Device>,
    /// Both directions of every pair of devices.
    pub links: Vec<Link>,
}

impl Profile {
    /// The link `from → to`.
    pub fn link(&self, from: usize, to: usize) -> Option<&Link> {
        self.links.iter().find(|l| l.from == from && l.to == to)
    }

    /// Index of `shape` among the profile's shapes, or an error saying how to
    /// measure it.
    pub fn shape_index(&self, shape: Shape) -> Result<usize, InferError> {
        self.shapes.iter().position(|&s| s == shape).ok_or_else(|| {
            InferError::Profile(format!(
                "no times for {shape} (the profile has {}): profile again at that shape",
                self.shapes
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// Reads a profile file, bounded and checked against `arch` and a mesh of
    /// `workers` (at `addresses`, when known).
    pub fn load(path: &Path, arch: &Arch, workers: usize, addresses: Option<&[String]>) -> Result<Self, InferError> {
        let at = |m: String| InferError::Profile(format!("{}: {m}", path.display()));
        let len = std::fs::metadata(path).map_err(|e| at(e.to_string()))?.len();
        if len > MAX_FILE {
            return Err(at(format!("{len} bytes; a profile is at most {MAX_FILE}")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| at(e.to_string()))?;
        let p: Profile = serde_json::from_str(&text).map_err(|e| at(e.to_string()))?;
        p.check(arch, workers, addresses).map_err(|e| match e {
            InferError::Profile(m) => at(m),
            other => other,
        })?;
        Ok(p)
    }

    /// Checks the profile fits `arch` and a mesh of `workers`, and that its
    /// numbers are whole: one entry per device and shape, finite and positive.
    pub fn check(&self, arch: &Arch, workers: usize, addresses: Option<&[String]>) -> Result<(), InferError> {
        let fail = |m: String| Err(InferError::Profile(m));
        if self.version != VERSION {
            return fail(format!("version {}, this Hetero reads {VERSION}", self.version));
        }
        if self.arch != arch.summary() {
            return fail(format!(
                "measured on {} ({}), not on this model ({}): profile it again",
                self.model,
                self.arch,
                arch.summary()
            ));
        }
        if self.devices.len() != workers {
            return fail(format!(
                "{} devices profiled, but the mesh has {workers}",
                self.devices.len()
            ));
        }
        let divisions = arch.layout().divisions;
        let divisions = if divisions > 1 { divisions } else { 0 };
        let heads = if arch.is_encoder() { 0 } else { workers };
        for (i, d) in self.devices.iter().enumerate() {
            if d.rank != i {
                return fail(format!("device {i} says it is rank {}", d.rank));
            }
            if let (Some(mine), Some(theirs)) = (&d.address, addresses.and_then(|a| a.get(i)))
                && mine != theirs
            {
                return fail(format!(
                    "rank {i} was profiled at {mine}, but the mesh has it at {theirs}: profile this mesh"
                ));
            }
            if d.times.len() != self.shapes.len() {
                return fail(format!(
                    "device {i}: times for {} shapes, not {}",
                    d.times.len(),
                    self.shapes.len()
                ));
            }
            for (t, shape) in d.times.iter().zip(&self.shapes) {
                let counts = [t.original.len(), t.sub_blocks.len(), t.head.len()];
                if counts != [workers, divisions, heads] {
                    return fail(format!(
                        "device {i}, {shape}: {counts:?} original, sub-block and head times, \
                         expected {:?}",
                        [workers, divisions, heads]
                    ));
                }
                let all =
                    std::iter::once(t.embed).chain(t.original.iter().chain(&t.sub_blocks).chain(&t.head).copied());
                if let Some(bad) = all.clone().find(|v| !v.is_finite() || *v < 0.0) {
                    return fail(format!("device {i}, {shape}: time {bad} is not a duration"));
                }
            }
            if d.alongside.len() != workers {
                return fail(format!(
                    "device {i}: {} alongside ratios, expected {workers}",
                    d.alongside.len()
                ));
            }
            if let Some(bad) = d.alongside.iter().find(|v| !v.is_finite() || **v < 1.0 || **v > 64.0) {
                return fail(format!(
                    "device {i}: alongside ratio {bad} is not a slow-down (1 to 64)"
                ));
            }
        }
        for from in 0..workers {
            for to in (0..workers).filter(|&t| t != from) {
                match self.link(from, to) {
                    Some(l)
                        if l.bandwidth.is_finite()
                            && l.bandwidth > 0.0
                            && l.latency.is_finite()
                            && l.latency >= 0.0 => {}
                    Some(l) => {
                        return fail(format!(
                            "link {from} → {to}: bandwidth {} B/s, latency {} s",
                            l.bandwidth, l.latency
                        ));
                    }
                    None => return fail(format!("no measurement of the link {from} → {to}")),
                }
            }
        }
        Ok(())
    }

    /// The profile as tables: compute per device and shape, memory, links.
    pub fn show(&self) -> String {
        let mut out = format!("{} ({})\n", self.model, self.arch);
        for (si, shape) in self.shapes.iter().enumerate() {
            out += &format!("\n{shape}, milliseconds\n{:<8} {:>8}", "device", "embed");
            let first = &self.devices[0].times[si];
            for k in 1..=first.original.len() {
                out += &format!(
                    " {:>9}",
                    if k == 1 {
                        "layer".to_string()
                    } else {
                        format!("layer/{k}")
                    }
                );
            }
            for n in 1..=first.sub_blocks.len() {
                out += &format!(" {:>8}", format!("{n} sub"));
            }
            for k in 1..=first.head.len() {
                out += &format!(
                    " {:>8}",
                    if k == 1 {
                        "head".to_string()
                    } else {
                        format!("head/{k}")
                    }
                );
            }
            out += "\n";
            for d in &self.devices {
                let t = &d.times[si];
                out += &format!("{:<8} {:>8.3}", d.rank, t.embed * 1e3);
                for v in &t.original {
                    out += &format!(" {:>9.3}", v * 1e3);
                }
                for v in t.sub_blocks.iter().chain(&t.head) {
                    out += &format!(" {:>8.3}", v * 1e3);
                }
                out += "\n";
            }
        }
        out += &format!("\n{:<8} {:>8} {:>12}  address\n", "device", "threads", "free MiB");
        for d in &self.devices {
            out += &format!(
                "{:<8} {:>8} {:>12}  {}\n",
                d.rank,
                d.threads,
                d.free_memory >> 20,
                d.address.as_deref().unwrap_or("-")
            );
        }
        out += "\nslow-down while another device computes (row: the device, column: the other)\n";
        out += &format!("{:<8}", "device");
        for j in 0..self.devices.len() {
            out += &format!(" {j:>6}");
        }
        out += "\n";
        for d in &self.devices {
            out += &format!("{:<8}", d.rank);
            for v in &d.alongside {
                out += &format!(" {v:>6.2}");
            }
            out += "\n";
        }
        out += &format!("\n{:<10} {:>12} {:>12}\n", "link", "Mbit/s", "latency ms");
        for l in &self.links {
            out += &format!(
                "{:<10} {:>12.1} {:>12.3}\n",
                format!("{} → {}", l.from, l.to),
                l.bandwidth * 8.0 / 1e6,
                l.latency * 1e3
            );
        }
        out
    }
}

/// The seconds `run` takes: the median of repeated runs after one warm-up,
/// repeated until a quarter of a second has passed (at least 3, at most 25 times).
fn median_time(mut run: impl FnMut()) -> f64 {
    run();
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < 3 || (times.len() < 25 && start.elapsed() < Duration::from_millis(250)) {
        let t = Instant::now();
        run();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Weights a kind's copies hold together, at least: more than a CPU's caches,
/// so that timing copies one after another reads weights from memory as a step
/// through different layers does (decode steps are bound by that).
const COLD_BYTES: u64 = 96 << 20;

/// How many copies of a module of `bytes` to time in turn.
fn copies(bytes: u64) -> usize {
    COLD_BYTES.div_ceil(bytes.max(1)).clamp(1, 16) as usize
}

/// The seconds one of `n` copies takes, run in turn (see [`COLD_BYTES`]).
fn cycle_time(n: usize, mut run: impl FnMut(usize)) -> f64 {
    median_time(|| (0..n).for_each(&mut run)) / n as f64
}

/// `load` called until the copies hold [`COLD_BYTES`] (at least once).
fn load_copies<T, E>(mut load: impl FnMut() -> Result<T, E>, bytes: impl Fn(&T) -> u64) -> Result<Vec<T>, E> {
    let first = load()?;
    let n = copies(bytes(&first));
    let mut all = vec![first];
    for _ in 1..n {
        all.push(load()?);
    }
    Ok(all)
}

/// Forces a tensor's computation.
fn done<B: Backend, const D: usize>(t: Tensor<B, D>) {
    let _ = t.into_data();
}

/// Which layer kinds [`measure_device`] times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kinds {
    /// Every kind the planner places.
    All,
    /// An original layer whole, alone (`original[0]`; the rest left empty): what
    /// two devices time at once to see how much they slow each other.
    OriginalWhole,
}

/// What this device's layer kinds hold and how long they take at each shape, for
/// a mesh of `workers` devices. Measured on random weights of `arch`'s shapes.
pub fn measure_device<B: Backend>(
    arch: &Arch,
    shapes: &[Shape],
    workers: usize,
    device: &B::Device,
    kinds: Kinds,
) -> Result<(Vec<KindTimes>, Sizes), InferError> {
    let all = kinds == Kinds::All;
    let workers = if all { workers } else { 1 };
    let weights = RandomWeights::new(arch.tensor_shapes(), 7);
    let tensor = &mut |n: &str, s: &[usize]| crate::weights::Weights::expect(&weights, n, s);
    let layout = arch.layout();
    let original = layout.kinds.iter().position(|&k| k == LayerKind::Original).unwrap_or(0);
    let decoupled = layout.kinds.iter().position(|&k| k == LayerKind::Decoupled);
    let parts: Vec<(usize, usize)> = (1..=workers).map(|k| (0, k)).collect();
    let bytes = |params: usize| 4 * params as u64;
    let mut times: Vec<KindTimes> = shapes
        .iter()
        .map(|_| KindTimes {
            embed: 0.0,
            original: vec![],
            sub_blocks: vec![],
            head: vec![],
        })
        .collect();
    let mut sizes = Sizes {
        embed: 0,
        original: vec![],
        sub_block: 0,
        head: vec![],
        original_cache: vec![],
        sub_block_cache: 0,
    };
    let hidden = arch.hidden();
    let input = |s: &Shape| {
        Tensor::<B, 3>::random(
            [s.batch, s.tokens, hidden],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            device,
        )
    };
    let ids = |s: &Shape| vec![vec![1u32; s.tokens]; s.batch];
    let never = |t: Tensor<B, 3>| -> Result<Tensor<B, 3>, InferError> { Ok(t) };
    match (arch.bert(), arch.llama()) {
        (Some(c), _) => {
            let embed = BertEmbeddings::<B>::load(tensor, c, device)?;
            sizes.embed = bytes(embed.num_params());
            for (t, s) in times.iter_mut().zip(shapes).filter(|_| all) {
                t.embed = median_time(|| done(crate::bert::embed(&embed, &ids(s), device).expect("ids in range")));
            }
            for &part in &parts {
                let layers = load_copies(
                    || BertLayer::<B>::load(tensor, c, original, part, device),
                    |l| bytes(l.num_params()),
                )?;
                sizes.original.push(bytes(layers[0].num_params()));
                sizes.original_cache.push(0);
                for (t, s) in times.iter_mut().zip(shapes) {
                    let (x, mask) = (input(s), padding_mask::<B>(&vec![s.tokens; s.batch], s.tokens, device));
                    t.original.push(cycle_time(layers.len(), |i| {
                        done(layers[i].forward(x.clone(), &mask, &mut { never }).expect("no reduce"))
                    }));
                }
            }
            if let (Arch::DecoupledBert(dc), Some(layer), true) = (arch, decoupled, all) {
                let d = dc.decoupling().divisions;
                for n in 1..=d {
                    let subs = load_copies(
                        || dc.load_sub_blocks::<B, InferError>(tensor, layer, 0..n, device),
                        |b| bytes(b.num_params()),
                    )?;
                    if n == 1 {
                        sizes.sub_block = bytes(subs[0].num_params());
                    }
                    for (t, s) in times.iter_mut().zip(shapes) {
                        let x = hetero_models::sub_blocks::to_slices(input(s), d).narrow(0, 0, n);
                        let masking = Masking::Padding(padding_mask::<B>(&vec![s.tokens; s.batch], s.tokens, device));
                        t.sub_blocks
                            .push(cycle_time(subs.len(), |i| done(subs[i].forward(x.clone(), &masking))));
                    }
                }
            }
        }
        (None, Some(c)) => {
            let embed = LlamaEmbeddings::<B>::load(tensor, c, device)?;
            sizes.embed = bytes(embed.num_params());
            let rope = c.rope(c.context, device);
            for (t, s) in times.iter_mut().zip(shapes).filter(|_| all) {
                t.embed = median_time(|| done(crate::llama::embed(&embed, &ids(s), device).expect("ids in range")));
            }
            // A cache holding `context` positions, filled by a prefill.
            let filled = |forward: &mut dyn FnMut(Tensor<B, 3>, &mut KvCache<B>), s: &Shape| {
                let mut cache = KvCache::new();
                if s.context > 0 {
                    forward(
                        Tensor::random(
                            [s.batch, s.context, hidden],
                            burn::tensor::Distribution::Normal(0.0, 1.0),
                            device,
                        ),
                        &mut cache,
                    );
                }
                cache
            };
            for &part in &parts {
                let layers = load_copies(
                    || LlamaLayer::<B>::load(tensor, c, original, part, device),
                    |l| bytes(l.num_params()),
                )?;
                sizes.original.push(bytes(layers[0].num_params()));
                let mut one = KvCache::new();
                done(layers[0].forward(input(&Shape::prefill(1, 1)), &rope, &mut one, &mut { never })?);
                sizes.original_cache.push(one.bytes() as u64);
                for (t, s) in times.iter_mut().zip(shapes) {
                    let caches: Vec<KvCache<B>> = layers
                        .iter()
                        .map(|layer| {
                            filled(
                                &mut |x, cache| {
                                    done(layer.forward(x, &rope, cache, &mut { never }).expect("no reduce"))
                                },
                                s,
                            )
                        })
                        .collect();
                    let x = input(s);
                    t.original.push(cycle_time(layers.len(), |i| {
                        done(
                            layers[i]
                                .forward(x.clone(), &rope, &mut caches[i].clone(), &mut { never })
                                .expect("no reduce"),
                        )
                    }));
                }
                if !all {
                    continue;
                }
                let head = LlamaHead::<B>::load(tensor, c, part, device)?;
                sizes.head.push(bytes(head.num_params()));
                for (t, s) in times.iter_mut().zip(shapes) {
                    let x = input(s);
                    t.head.push(median_time(|| done(head.forward(x.clone()))));
                }
            }
            if let (Arch::DecoupledLlama(dc), Some(layer), true) = (arch, decoupled, all) {
                let d = dc.decoupling().divisions;
                for n in 1..=d {
                    let subs = load_copies(
                        || dc.load_sub_blocks::<B, InferError>(tensor, layer, 0..n, device),
                        |b| bytes(b.num_params()),
                    )?;
                    let slices = |x: Tensor<B, 3>| hetero_models::sub_blocks::to_slices(x, d).narrow(0, 0, n);
                    if n == 1 {
                        sizes.sub_block = bytes(subs[0].num_params());
                        let mut one = KvCache::new();
                        done(subs[0].forward(slices(input(&Shape::prefill(1, 1))), &rope, &mut one));
                        sizes.sub_block_cache = one.bytes() as u64;
                    }
                    for (t, s) in times.iter_mut().zip(shapes) {
                        let caches: Vec<KvCache<B>> = subs
                            .iter()
                            .map(|sub| filled(&mut |x, cache| done(sub.forward(slices(x), &rope, cache)), s))
                            .collect();
                        let x = slices(input(s));
                        t.sub_blocks.push(cycle_time(subs.len(), |i| {
                            done(subs[i].forward(x.clone(), &rope, &mut caches[i].clone()))
                        }));
                    }
                }
            }
        }
        (None, None) => unreachable!("a model is an encoder or a decoder"),
    }
    Ok((times, sizes))
}

/// Memory this process may still use: MemAvailable, lowered to the cgroup's
/// limit (v2 `memory.max`, v1 `memory.limit_in_bytes`) less its usage.
pub fn free_memory() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(u64::MAX, |kb| kb * 1024);
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let cgroup = match (read("/sys/fs/cgroup/memory.max"), read("/sys/fs/cgroup/memory.current")) {
        (Some(max), Some(used)) => Some(max.saturating_sub(used)),
        _ => match (
            read("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
            read("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
        ) {
            (Some(max), Some(used)) => Some(max.saturating_sub(used)),
            _ => None,
        },
    };
    available.min(cgroup.unwrap_or(u64::MAX))
}

/// Threads this process may run on.
pub fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Bytes of the first bulk transfer of a link measurement; the second is sized
/// from it to last about [`BULK_TIME`].
const PROBE_BYTES: usize = 256 << 10;
const BULK_TIME: f64 = 0.4;
const MAX_BULK: usize = 32 << 20;
const PINGS: usize = 9;

/// Measures the link between this rank and `peer` with it (both call this, the
/// lower rank first in every exchange): returns `(one-way latency, bandwidth
/// from the lower rank to the higher, and back)` on both.
pub fn measure_link(mesh: &mut Mesh, peer: usize) -> Result<(f64, f64, f64), InferError> {
    let me = mesh.rank();
    let lower = me < peer;
    let mut one = [0f32];
    let mut rtts = Vec::new();
    for _ in 0..PINGS {
        let t = Instant::now();
        if lower {
            mesh.send(peer, &one)?;
            mesh.recv(peer, &mut one)?;
        } else {
            mesh.recv(peer, &mut one)?;
            mesh.send(peer, &one)?;
        }
        rtts.push(t.elapsed().as_secs_f64());
    }
    rtts.sort_by(f64::total_cmp);
    let rtt = rtts[PINGS / 2];
    // Bulk: the sender times from its first byte to the receiver's one-float
    // acknowledgement, less a round trip.
    let mut bulk = |sender: bool| -> Result<f64, InferError> {
        // The probe's size is fixed; the sender sizes the second transfer from the
        // probe's rate and tells the receiver how many values it will be, then
        // the rate it measured.
        let mut floats = PROBE_BYTES / 4;
        let mut rate = 0.0;
        for round in 0..2 {
            let mut values = vec![0f32; floats];
            let t = Instant::now();
            if sender {
                mesh.send(peer, &values)?;
                mesh.recv(peer, &mut one)?;
                rate = (4 * floats) as f64 / (t.elapsed().as_secs_f64() - rtt).max(1e-6);
                let next = ((rate * BULK_TIME) as usize).clamp(PROBE_BYTES, MAX_BULK) / 4;
                mesh.send(peer, &[next as f32, rate as f32])?;
                floats = next;
            } else {
                mesh.recv(peer, &mut values)?;
                mesh.send(peer, &one)?;
                let mut told = [0f32; 2];
                mesh.recv(peer, &mut told)?;
                (floats, rate) = (told[0] as usize, f64::from(told[1]));
            }
            if round == 1 {
                break;
            }
        }
        Ok(rate)
    };
    let up = bulk(lower)?;
    let down = bulk(!lower)?;
    Ok((rtt / 2.0, up, down))
}
