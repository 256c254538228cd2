//! What each worker will hold under a placement — its weights as it keeps them
//! and its key/value cache at a context — computed from the model's tensors
//! before anything is loaded: `hetero infer|serve --dry-run` prints it, and a
//! run refuses a placement that does not fit a worker's memory.
//!
//! ## Design
//! A worker's share of a tensor follows how the blocks cut it
//! ([`hetero_models::llama`], [`hetero_models::bert`]): attention tensors by
//! heads (key/value heads for a decoder), feed-forward tensors by units, the head
//! by vocabulary rows, a decoupled layer's stacked sub-blocks by sub-block; norms
//! and the biases added after a reduction are whole on every part. Each tensor
//! costs what the worker keeps: its stored bytes when it runs on quantized blocks
//! ([`crate::qllama`], memory-mapped), four bytes a value when it is converted
//! to f32 at load. The key/value cache is f32: two vectors of the part's
//! key/value width per token, layer and sequence.
//!
//! The figure is the worker's steady state, not its peak while loading (a tensor
//! is converted one at a time), and not the runtime's own buffers (activations of
//! one step, a few MB at these widths).

use std::ops::Range;

use hetero_models::LayerKind;
use hetero_models::checkpoint::span;

use crate::placement::Placement;
use crate::runtime::Arch;
use crate::weights::Weights;

/// One worker's bytes under a placement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Weights as the worker keeps them.
    pub weights: u64,
    /// Key/value cache at the context and batch asked for.
    pub cache: u64,
}

impl Footprint {
    /// Weights and cache.
    pub fn total(&self) -> u64 {
        self.weights + self.cache
    }
}

/// How a block cuts a tensor between the parts of a tensor-parallel layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Every part holds it whole (norms, biases added after the reduction).
    Whole,
    /// By attention heads (key/value heads for a decoder).
    Heads,
    /// By feed-forward units.
    Units,
    /// A decoupled layer's sub-blocks, stacked on the first axis.
    SubBlocks,
}

/// Which part of the model a tensor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Embedding,
    Layer(usize, Cut),
    /// The output head (its norm whole, its matrix cut by vocabulary rows).
    Head {
        rows: bool,
    },
}

/// The owner of tensor `name` (GGUF names for decoders, `transformers`' for BERT).
fn owner(name: &str) -> Owner {
    let name = name.strip_prefix("bert.").unwrap_or(name);
    if name == "output_norm.weight" {
        return Owner::Head { rows: false };
    }
    if name == "output.weight" {
        return Owner::Head { rows: true };
    }
    let Some((l, rest)) = name
        .strip_prefix("blk.")
        .or_else(|| name.strip_prefix("encoder.layer."))
        .and_then(layer_and_rest)
    else {
        return Owner::Embedding;
    };
    let cut = if rest.starts_with("sub_blocks.") {
        Cut::SubBlocks
    } else if rest.contains("norm") || rest.contains("LayerNorm") {
        Cut::Whole
    } else if rest.starts_with("attn_")
        || rest.starts_with("attention.self.")
        || rest == "attention.output.dense.weight"
    {
        Cut::Heads
    } else if rest.starts_with("ffn_") || rest.starts_with("intermediate.") || rest == "output.dense.weight" {
        Cut::Units
    } else {
        Cut::Whole
    };
    Owner::Layer(l, cut)
}

/// `"12.attn_q.weight"` as block 12 and the rest of the name.
fn layer_and_rest(name: &str) -> Option<(usize, &str)> {
    let (n, rest) = name.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// The bytes `rank` keeps under `placement` of the model `arch` whose tensors
/// `weights` holds (`quantized`: the decoder runs on its stored blocks), with a
/// key/value cache of `batch` sequences of `context` positions.
pub fn footprint(
    arch: &Arch,
    weights: &dyn Weights,
    quantized: bool,
    placement: &Placement,
    rank: usize,
    batch: usize,
    context: usize,
) -> Footprint {
    let layout = arch.layout();
    let held = |name: &str, shape: &[usize]| -> u64 {
        let values: usize = shape.iter().product();
        match quantized.then(|| weights.raw(name)).flatten() {
            Some(Ok(raw)) => raw.bytes.len() as u64,
            _ => values as u64 * 4,
        }
    };
    // (heads, units) a whole layer has, to cut by.
    let (heads, units) = match (arch.bert(), arch.llama()) {
        (Some(c), _) => (c.heads, c.intermediate),
        (None, Some(c)) => (c.kv_heads, c.ffn),
        _ => (1, 1),
    };
    let share = |r: Range<usize>, of: usize| r.len() as f64 / of.max(1) as f64;
    let first = &placement.stages[0];
    let last = placement.stages.last().expect("a placement has a stage");
    let mut f = Footprint::default();
    for (name, shape) in arch.tensor_shapes() {
        let bytes = held(&name, &shape) as f64;
        let part = match owner(&name) {
            Owner::Embedding => f64::from(u8::from(first.workers.contains(&rank))),
            Owner::Head { rows } => match last.head_part(rank) {
                Some((i, k)) if rows => share(span(shape[0], i, k), shape[0]),
                Some(_) => 1.0,
                None => 0.0,
            },
            Owner::Layer(l, cut) => {
                let Some(stage) = placement.stages.iter().find(|s| s.layers.contains(&l)) else {
                    continue;
                };
                let Some(pos) = stage.workers.iter().position(|&w| w == rank) else {
                    continue;
                };
                match (layout.kinds[l], cut, stage.original_part(rank)) {
                    (LayerKind::Decoupled, Cut::SubBlocks, _) => {
                        let mine = stage.sub_block_ranges(layout.divisions)[pos].clone();
                        share(mine, layout.divisions)
                    }
                    (LayerKind::Decoupled, ..) | (LayerKind::Original, _, None) => 0.0,
                    (LayerKind::Original, Cut::Heads, Some((i, k))) => share(span(heads, i, k), heads),
                    (LayerKind::Original, Cut::Units, Some((i, k))) => share(span(units, i, k), units),
                    (LayerKind::Original, _, Some(_)) => 1.0,
                }
            }
        };
        f.weights += (bytes * part).round() as u64;
    }
    // A decoder whose head reuses the embeddings holds its rows again on the f32
    // path (the head's own matrix); quantized, the head reads the same mapped bytes.
    if let Some(c) = arch.llama().filter(|c| !c.separate_head && !quantized)
        && let Some((i, k)) = last.head_part(rank)
    {
        let table = held("token_embd.weight", &[c.vocab, c.hidden]) as f64;
        f.weights += (table * share(span(c.vocab, i, k), c.vocab)).round() as u64;
    }
    f.cache = cache_per_position(arch, placement, rank) * (batch * context) as u64;
    f
}

/// Bytes of key/value cache `rank` keeps per position of one sequence.
fn cache_per_position(arch: &Arch, placement: &Placement, rank: usize) -> u64 {
    let layout = arch.layout();
    let Some(c) = arch.llama() else {
        return 0; // Encoders keep no cache.
    };
    let (hd, kv) = (c.head_dim(), c.kv_heads);
    let sub_block = match arch {
        Arch::DecoupledLlama(d) => {
            let s = d.sub_blocks();
            2 * s.kv_heads * s.head_dim * 4
        }
        _ => 0,
    };
    let mut bytes = 0;
    for stage in &placement.stages {
        let Some(pos) = stage.workers.iter().position(|&w| w == rank) else {
            continue;
        };
        let subs = stage.sub_block_ranges(layout.divisions)[pos].len();
        for l in stage.layers.clone() {
            bytes += match (layout.kinds[l], stage.original_part(rank)) {
                (LayerKind::Decoupled, _) => subs * sub_block,
                (LayerKind::Original, Some((i, k))) => 2 * span(kv, i, k).len() * hd * 4,
                (LayerKind::Original, None) => 0,
            };
        }
    }
    bytes as u64
}

/// `bytes` as MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::LlamaConfig;
    use crate::weights::RandomWeights;
    use hetero_kernels::QType;

    fn smol() -> (Arch, RandomWeights) {
        let arch = Arch::Llama(LlamaConfig::smol_lm2());
        let weights = RandomWeights::new(arch.tensor_shapes(), 0);
        (arch, weights)
    }

    #[test]
    fn one_device_holds_every_value_and_tensor_parallel_parts_add_up_to_it() {
        let (arch, weights) = smol();
        let c = arch.llama().unwrap().clone();
        let params: usize = arch.tensor_shapes().values().map(|s| s.iter().product::<usize>()).sum();
        let one = footprint(&arch, &weights, false, &Placement::single(30), 0, 1, 100);
        // Every value as f32, plus the tied head's own copy of the table.
        assert_eq!(one.weights, ((params + c.vocab * c.hidden) * 4) as u64);
        assert_eq!(one.cache, (30 * 2 * 3 * 64 * 4 * 100) as u64);
        let tp = Placement::tensor_parallel(30, 3);
        let parts: Vec<_> = (0..3)
            .map(|r| footprint(&arch, &weights, false, &tp, r, 1, 100))
            .collect();
        // Parts hold the cut tensors once between them and the whole ones each;
        // the embedding lives on every worker of the first stage.
        let cut = parts.iter().map(|p| p.weights).sum::<u64>() - one.weights;
        let whole_per_part = (c.vocab * c.hidden + (2 * 30 + 1) * c.hidden) as u64 * 4;
        assert_eq!(cut, 2 * whole_per_part);
        assert_eq!(parts.iter().map(|p| p.cache).sum::<u64>(), one.cache);
        // A pipeline splits the layers, and the cache with them.
        let pipe = Placement::pipeline(30, 2);
        let (a, b) = (
            footprint(&arch, &weights, false, &pipe, 0, 1, 100),
            footprint(&arch, &weights, false, &pipe, 1, 1, 100),
        );
        assert_eq!(a.cache + b.cache, one.cache);
        assert!(a.weights < one.weights && b.weights < one.weights);
    }

    #[test]
    fn quantized_blocks_cost_their_stored_bytes() {
        let (arch, weights) = smol();
        let stored = weights.stored_as(QType::Q8_0);
        let f32_path = footprint(&arch, &stored, false, &Placement::single(30), 0, 1, 1);
        let blocks = footprint(&arch, &stored, true, &Placement::single(30), 0, 1, 1);
        // Q8_0 keeps 34 bytes per 32 values where f32 keeps 128; and the tied head
        // reads the embedding's mapped bytes instead of a copy of its own.
        let c = arch.llama().unwrap();
        let copy = (c.vocab * c.hidden * 4) as u64;
        let ratio = blocks.weights as f64 / (f32_path.weights - copy) as f64;
        assert!((0.26..0.3).contains(&ratio), "{ratio}");
    }
}
