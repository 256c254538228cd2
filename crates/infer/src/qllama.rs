//! The llama decoder on quantized weights: the same block as
//! [`hetero_models::llama::LlamaLayer`], computed with [`hetero_kernels`] on the
//! tensors as the GGUF file stores them.
//!
//! ## Design
//! The burn modules dequantise every weight to f32 at load, so decoding a token
//! streams ~6× the file's bytes, and runs as ~25 small tensor ops per block, each
//! allocating. Here the matrices stay in their blocks ([`QMatrix`], memory-mapped),
//! activations live in flat `[rows, width]` buffers of a [`Scratch`] reused from
//! token to token, and a block is five products (q|k|v, o, gate|up, down — the
//! matrices sharing an input go to the thread pool together) with the norms, rotary
//! positions and attention in between.
//!
//! The math is the burn block's, step for step: RMSNorm, rotary positions on
//! adjacent pairs (GGUF's permuted Q/K), grouped-query attention (query head `j` of
//! a part reads key/value head `j / group`), causal and aligned to the end of the
//! cache, SwiGLU. Only the products differ: activations are quantized per block
//! before each (as llama.cpp does), which the tests bound.
//!
//! A worker's part is cut as `LlamaLayer::load` cuts it: q, k, v, gate and up by
//! output rows (whole rows are whole blocks: a view, no copy), attn_output and
//! down by input columns (a partial sum). A column cut that falls inside a block
//! cannot be taken from the blocks; that one matrix is then dequantised and kept
//! as f32 (said once in the log), never a different cut.

use std::ops::Range;

use hetero_kernels::{ActType, AttentionShape, KernelError, Kernels, MAX_MATRICES, QActs, QMatrix, QType, ops};
use hetero_models::checkpoint::{Part, span};

use crate::InferError;
use crate::llama::{LlamaConfig, LlamaTensor};
use crate::weights::Weights;

/// Whether `weights` keeps the decoder's block matrices quantized (and quantized
/// products are wanted).
pub fn is_quantized(weights: &dyn Weights) -> bool {
    LlamaTensor::LAYER.iter().any(|t| weights.raw(&t.name(0)).is_some())
}

/// Whether the model `arch` with `weights` runs on this path: an (undecoupled)
/// llama decoder whose block matrices are stored quantized.
pub fn runs_on_blocks(arch: &crate::runtime::Arch, weights: &dyn Weights) -> bool {
    matches!(arch, crate::runtime::Arch::Llama(_)) && is_quantized(weights)
}

/// A matrix of the model as stored: quantized blocks, or (a float tensor in a
/// quantized file) f32.
fn matrix(w: &dyn Weights, t: LlamaTensor, c: &LlamaConfig, layer: usize) -> Result<QMatrix, InferError> {
    let (name, shape) = (t.name(layer), t.shape(c));
    let kernel_error = |e: KernelError| InferError::tensor(w.path(), &name, e.to_string());
    match w.raw(&name) {
        Some(raw) => {
            let raw = raw?;
            if raw.shape != shape {
                return Err(InferError::tensor(
                    w.path(),
                    &name,
                    format!("shape {:?}, but the model's configuration needs {shape:?}", raw.shape),
                ));
            }
            QMatrix::new(raw.ty, shape[0], shape[1], raw.bytes).map_err(kernel_error)
        }
        None => {
            let values = w.expect(&name, &shape)?;
            QMatrix::quantize(QType::F32, &values, shape[0], shape[1]).map_err(kernel_error)
        }
    }
}

/// Rows `keep` of `m` (`None` when empty).
fn rows(m: QMatrix, keep: Range<usize>) -> Result<Option<QMatrix>, KernelError> {
    if keep.is_empty() {
        return Ok(None);
    }
    m.row_range(keep).map(Some)
}

/// Input columns `keep` of `m` (`None` when empty); f32 where the cut is inside a block.
fn columns(m: QMatrix, keep: Range<usize>, name: &str) -> Result<Option<QMatrix>, KernelError> {
    if keep.is_empty() {
        return Ok(None);
    }
    if keep == (0..m.cols()) {
        return Ok(Some(m));
    }
    match m.col_range(keep.clone()) {
        Err(KernelError::NotBlockAligned { .. }) => {
            tracing::info!(
                "{name}: columns {}..{} cut {} blocks of {}; this part is kept as f32",
                keep.start,
                keep.end,
                m.ty(),
                m.ty().block_elems()
            );
            let all = m.dequantize()?;
            let cut: Vec<f32> = all
                .chunks_exact(m.cols())
                .flat_map(|r| r[keep.clone()].to_vec())
                .collect();
            QMatrix::quantize(QType::F32, &cut, m.rows(), keep.len()).map(Some)
        }
        other => other.map(Some),
    }
}

fn norm(w: &dyn Weights, t: LlamaTensor, c: &LlamaConfig, layer: usize) -> Result<Vec<f32>, InferError> {
    w.expect(&t.name(layer), &t.shape(c))
}

/// The attention's matrices of one part.
#[derive(Debug)]
struct Attention {
    q: QMatrix,
    k: QMatrix,
    v: QMatrix,
    /// This part's query heads' columns: a partial sum.
    o: QMatrix,
    /// The query, key and value biases of this part's rows (Qwen2), or none.
    biases: Option<[Vec<f32>; 3]>,
}

/// The feed-forward's matrices of one part.
#[derive(Debug)]
struct FeedForward {
    gate: QMatrix,
    up: QMatrix,
    /// This part's units' columns: a partial sum.
    down: QMatrix,
}

/// One decoder block, or one worker's part of it, on quantized weights.
#[derive(Debug)]
pub struct QLlamaLayer {
    attention_norm: Vec<f32>,
    feed_forward_norm: Vec<f32>,
    eps: f32,
    attention: Option<Attention>,
    feed_forward: Option<FeedForward>,
    /// Key/value heads of this part.
    kv_heads: usize,
    group: usize,
    head_dim: usize,
}

impl QLlamaLayer {
    /// Block `layer`'s part `index` of `of`, cut as `LlamaLayer::load` cuts it.
    pub fn load(w: &dyn Weights, c: &LlamaConfig, layer: usize, part: Part) -> Result<Self, InferError> {
        let (hd, g) = (c.head_dim(), c.group());
        let kv_heads = span(c.kv_heads, part.0, part.1);
        let kv_rows = kv_heads.start * hd..kv_heads.end * hd;
        let q_rows = kv_heads.start * g * hd..kv_heads.end * g * hd;
        let units = span(c.ffn, part.0, part.1);
        let m = |t: LlamaTensor| matrix(w, t, c, layer);
        let cut = |t: LlamaTensor, r: Result<Option<QMatrix>, KernelError>| {
            r.map_err(|e| InferError::tensor(w.path(), &t.name(layer), e.to_string()))
        };
        let bias = |t: LlamaTensor, keep: &Range<usize>| -> Result<Vec<f32>, InferError> {
            Ok(w.expect(&t.name(layer), &t.shape(c))?[keep.clone()].to_vec())
        };
        let biases = match c.attention_bias && !kv_heads.is_empty() {
            true => Some([
                bias(LlamaTensor::QueryBias, &q_rows)?,
                bias(LlamaTensor::KeyBias, &kv_rows)?,
                bias(LlamaTensor::ValueBias, &kv_rows)?,
            ]),
            false => None,
        };
        let attention = match kv_heads.is_empty() {
            true => None,
            false => Some(Attention {
                biases,
                q: cut(LlamaTensor::Query, rows(m(LlamaTensor::Query)?, q_rows.clone()))?.expect("non-empty"),
                k: cut(LlamaTensor::Key, rows(m(LlamaTensor::Key)?, kv_rows.clone()))?.expect("non-empty"),
                v: cut(LlamaTensor::Value, rows(m(LlamaTensor::Value)?, kv_rows))?.expect("non-empty"),
                o: cut(
                    LlamaTensor::AttentionOutput,
                    columns(
                        m(LlamaTensor::AttentionOutput)?,
                        q_rows,
                        &LlamaTensor::AttentionOutput.name(layer),
                    ),
                )?
                .expect("non-empty"),
            }),
        };
        let feed_forward = match units.is_empty() {
            true => None,
            false => Some(FeedForward {
                gate: cut(LlamaTensor::Gate, rows(m(LlamaTensor::Gate)?, units.clone()))?.expect("non-empty"),
                up: cut(LlamaTensor::Up, rows(m(LlamaTensor::Up)?, units.clone()))?.expect("non-empty"),
                down: cut(
                    LlamaTensor::Down,
                    columns(m(LlamaTensor::Down)?, units, &LlamaTensor::Down.name(layer)),
                )?
                .expect("non-empty"),
            }),
        };
        Ok(QLlamaLayer {
            attention_norm: norm(w, LlamaTensor::AttentionNorm, c, layer)?,
            feed_forward_norm: norm(w, LlamaTensor::FeedForwardNorm, c, layer)?,
            eps: c.eps as f32,
            attention,
            feed_forward,
            kv_heads: kv_heads.len(),
            group: g,
            head_dim: hd,
        })
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        let a = self.attention.iter().flat_map(|a| [&a.q, &a.k, &a.v, &a.o]);
        let f = self.feed_forward.iter().flat_map(|f| [&f.gate, &f.up, &f.down]);
        a.chain(f).map(|m| m.bytes().len()).sum()
    }

    /// Runs the new tokens `x` (`[batch·seq, hidden]`, row-major; row `b` continues
    /// the sequence in cache slot `slots[b]`, at its next `seq` positions) through
    /// the block in place, extending `cache`. `reduce` sums a partial result over
    /// the part's group; every part calls it twice, holding heads and units or not.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        x: &mut [f32],
        slots: &[usize],
        seq: usize,
        rope: &Rope,
        cache: &mut QKvCache,
        s: &mut Scratch,
        k: &Kernels,
        reduce: &mut dyn FnMut(&mut [f32]) -> Result<(), InferError>,
    ) -> Result<(), InferError> {
        let batch = slots.len();
        let rows = batch * seq;
        let hidden = self.attention_norm.len();
        // A prompt's products may take the tile unit; a decode step's keep the dot.
        let k = &k.for_prompt(seq > 1);
        s.starts.clear();
        s.starts.extend(slots.iter().map(|&slot| cache.len(slot)));
        if let Some(&start) = s.starts.iter().find(|&&start| start + seq > rope.positions()) {
            return Err(InferError::Request(format!(
                "positions {start}..{} are past the model's context of {}",
                start + seq,
                rope.positions()
            )));
        }
        s.out.clear();
        s.out.resize(rows * hidden, 0.0);
        if let Some(a) = &self.attention {
            let (hd, qn, kvn) = (self.head_dim, a.q.rows(), a.k.rows());
            grow(&mut s.h, rows * hidden);
            k.rms_norm(x, &self.attention_norm, self.eps, &mut s.h);
            grow(&mut s.q, rows * qn);
            grow(&mut s.k, rows * kvn);
            grow(&mut s.v, rows * kvn);
            products(
                k,
                &mut s.acts,
                &s.h,
                rows,
                [&a.q, &a.k, &a.v].as_slice(),
                &mut [&mut s.q[..], &mut s.k[..], &mut s.v[..]],
            )?;
            if let Some([bq, bk, bv]) = &a.biases {
                for (out, bias) in [(&mut s.q, bq), (&mut s.k, bk), (&mut s.v, bv)] {
                    for row in out[..rows * bias.len()].chunks_exact_mut(bias.len()) {
                        row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
                    }
                }
            }
            let starts = &s.starts;
            k.by_rows(
                rows,
                [&mut s.q[..rows * qn], &mut s.k[..rows * kvn]],
                &|range, [q, kk]| {
                    for (i, r) in range.enumerate() {
                        let cs = rope.at(starts[r / seq] + r % seq);
                        q[i * qn..(i + 1) * qn]
                            .chunks_exact_mut(hd)
                            .for_each(|h| ops::rope(h, cs));
                        kk[i * kvn..(i + 1) * kvn]
                            .chunks_exact_mut(hd)
                            .for_each(|h| ops::rope(h, cs));
                    }
                },
            );
            cache.append(&s.k, &s.v, slots, seq, self.kv_heads, hd)?;
            grow(&mut s.ctx, rows * qn);
            let shape = AttentionShape {
                batch,
                seq,
                starts: &s.starts,
                heads: qn / hd,
                group: self.group,
                head_dim: hd,
            };
            let cache: &QKvCache = cache;
            let rows_of = |b: usize, head, n| (cache.keys(slots[b], head, n), cache.values(slots[b], head, n));
            k.attention(shape, &s.q, &rows_of, &mut s.scores, &mut s.ctx);
            products(k, &mut s.acts, &s.ctx, rows, [&a.o].as_slice(), &mut [&mut s.out[..]])?;
        }
        reduce(&mut s.out)?;
        x.iter_mut().zip(&s.out).for_each(|(x, o)| *x += o);

        s.out.fill(0.0);
        if let Some(f) = &self.feed_forward {
            let units = f.gate.rows();
            grow(&mut s.h, rows * hidden);
            k.rms_norm(x, &self.feed_forward_norm, self.eps, &mut s.h);
            grow(&mut s.gate, rows * units);
            grow(&mut s.up, rows * units);
            products(
                k,
                &mut s.acts,
                &s.h,
                rows,
                [&f.gate, &f.up].as_slice(),
                &mut [&mut s.gate[..], &mut s.up[..]],
            )?;
            grow(&mut s.act, rows * units);
            k.silu_mul(rows, &s.gate, &s.up, &mut s.act);
            products(
                k,
                &mut s.acts,
                &s.act,
                rows,
                [&f.down].as_slice(),
                &mut [&mut s.out[..]],
            )?;
        }
        reduce(&mut s.out)?;
        x.iter_mut().zip(&s.out).for_each(|(x, o)| *x += o);
        Ok(())
    }
}

/// Sets `v`'s length to `n` (its contents are overwritten next); keeps its memory.
fn grow(v: &mut Vec<f32>, n: usize) {
    v.resize(n, 0.0);
}

/// `outs[i] = x · ws[i]ᵀ` for `x` of `rows` rows: `x` is quantized once per
/// activation format the matrices need, and matrices sharing one go to the pool
/// together.
fn products(
    k: &Kernels,
    acts: &mut [QActs; 4],
    x: &[f32],
    rows: usize,
    ws: &[&QMatrix],
    outs: &mut [&mut [f32]],
) -> Result<(), InferError> {
    let cols = x.len() / rows.max(1);
    for ty in ActType::ALL {
        if !ws.iter().any(|w| w.ty().act() == ty) {
            continue;
        }
        let a = &mut acts[ty.index()];
        k.quantize(a, ty, x, rows, cols)?;
        let mut chosen: [&QMatrix; MAX_MATRICES] = [ws[0]; MAX_MATRICES];
        let mut into: [&mut [f32]; MAX_MATRICES] = Default::default();
        let mut n = 0;
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            if w.ty().act() == ty {
                (chosen[n], into[n]) = (*w, &mut **out);
                n += 1;
            }
        }
        k.matmul_many(&chosen[..n], a, &mut into[..n])?;
    }
    Ok(())
}

/// Buffers one worker's blocks share from token to token (grown, never shrunk).
#[derive(Debug, Default)]
pub struct Scratch {
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    ctx: Vec<f32>,
    out: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    scores: Vec<f32>,
    /// Each row's cached positions before this step.
    starts: Vec<usize>,
    /// Quantized activations, one per [`ActType`].
    acts: [QActs; 4],
}

/// The keys and values of the sequences a worker holds, for its key/value heads:
/// one slot per sequence (a running batch holds several, each at its own length),
/// each `[heads][cap][head_dim]`, so attention reads a head's keys contiguously.
/// A slot grows by doubling, not per token, and keeps its memory when emptied
/// for the next sequence.
#[derive(Debug, Clone, Default)]
pub struct QKvCache {
    slots: Vec<SlotCache>,
    heads: usize,
    hd: usize,
}

#[derive(Debug, Clone, Default)]
struct SlotCache {
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
    cap: usize,
}

/// The most sequences one cache holds.
pub const MAX_SLOTS: usize = 256;

impl QKvCache {
    /// An empty cache.
    pub fn new() -> Self {
        QKvCache::default()
    }

    /// Positions held by `slot`'s sequence.
    pub fn len(&self, slot: usize) -> usize {
        self.slots.get(slot).map_or(0, |s| s.len)
    }

    /// Empties `slots` (new sequences start there); their memory is kept.
    pub fn reset(&mut self, slots: &[usize]) {
        for &slot in slots {
            if let Some(s) = self.slots.get_mut(slot) {
                s.len = 0;
            }
        }
    }

    /// Appends `seq` positions to each of `slots`: row `b` of `k` and `v`
    /// (`[slots·seq, heads·hd]`) goes to `slots[b]`.
    fn append(
        &mut self,
        k: &[f32],
        v: &[f32],
        slots: &[usize],
        seq: usize,
        heads: usize,
        hd: usize,
    ) -> Result<(), InferError> {
        if let Some(&slot) = slots.iter().find(|&&s| s >= MAX_SLOTS) {
            return Err(InferError::Request(format!(
                "cache slot {slot}: a worker holds at most {MAX_SLOTS} sequences"
            )));
        }
        (self.heads, self.hd) = (heads, hd);
        let most = slots.iter().max().map_or(0, |m| m + 1);
        if self.slots.len() < most {
            self.slots.resize_with(most, SlotCache::default);
        }
        for (b, &slot) in slots.iter().enumerate() {
            let c = &mut self.slots[slot];
            let need = c.len + seq;
            if need > c.cap {
                let cap = need.max(2 * c.cap).max(16);
                let relaid = |old: &[f32]| {
                    let mut new = vec![0.0; heads * cap * hd];
                    for h in 0..heads {
                        new[h * cap * hd..][..c.len * hd].copy_from_slice(&old[h * c.cap * hd..][..c.len * hd]);
                    }
                    new
                };
                let (nk, nv) = (relaid(&c.k), relaid(&c.v));
                (c.k, c.v, c.cap) = (nk, nv, cap);
            }
            for i in 0..seq {
                let row = (b * seq + i) * heads * hd;
                for h in 0..heads {
                    let at = (h * c.cap + c.len + i) * hd;
                    c.k[at..at + hd].copy_from_slice(&k[row + h * hd..row + (h + 1) * hd]);
                    c.v[at..at + hd].copy_from_slice(&v[row + h * hd..row + (h + 1) * hd]);
                }
            }
            c.len = need;
        }
        Ok(())
    }

    fn keys(&self, slot: usize, head: usize, n: usize) -> &[f32] {
        let c = &self.slots[slot];
        &c.k[head * c.cap * self.hd..][..n * self.hd]
    }

    fn values(&self, slot: usize, head: usize, n: usize) -> &[f32] {
        let c = &self.slots[slot];
        &c.v[head * c.cap * self.hd..][..n * self.hd]
    }
}

/// Rotary positions: `[cos, sin]` of every pair's angle at each position, computed
/// as burn's `RotaryEncoding` computes them (f32 `θᵢ = 1 / base^(2i/d)`, angle
/// `pos·θᵢ`), for positions up to the model's context, as far as used so far.
#[derive(Debug, Clone)]
pub struct Rope {
    theta: Vec<f32>,
    table: Vec<f32>,
    context: usize,
}

impl Rope {
    /// The rotations of heads of width `head_dim`, for up to `context` positions.
    pub fn new(head_dim: usize, base: f32, context: usize) -> Rope {
        let theta = (0..head_dim / 2)
            .map(|i| 1.0 / ((2 * i) as f32 / head_dim as f32 * base.ln()).exp())
            .collect();
        Rope {
            theta,
            table: Vec::new(),
            context,
        }
    }

    /// Positions it can rotate: the model's context.
    pub fn positions(&self) -> usize {
        self.context
    }

    /// Makes the table hold positions `0..n` (at most the context).
    pub fn cover(&mut self, n: usize) {
        let per = 2 * self.theta.len();
        let have = self.table.len() / per.max(1);
        let n = n.min(self.context);
        if n <= have {
            return;
        }
        let upto = n.max(2 * have).min(self.context);
        for pos in have..upto {
            for &t in &self.theta {
                let angle = pos as f32 * t;
                self.table.extend([angle.cos(), angle.sin()]);
            }
        }
    }

    /// Position `pos`'s `[cos, sin]` pairs (covered by [`Rope::cover`]).
    pub fn at(&self, pos: usize) -> &[f32] {
        let per = 2 * self.theta.len();
        &self.table[pos * per..(pos + 1) * per]
    }
}

/// The token embedding table, as stored; a look-up dequantises one row per token.
#[derive(Debug)]
pub struct QEmbeddings {
    table: QMatrix,
}

impl QEmbeddings {
    /// Reads `token_embd.weight`.
    pub fn load(w: &dyn Weights, c: &LlamaConfig) -> Result<Self, InferError> {
        Ok(QEmbeddings {
            table: matrix(w, LlamaTensor::TokenEmbedding, c, 0)?,
        })
    }

    /// The rows of `ids` (`[batch][seq]`), `[batch·seq, hidden]` row-major, after
    /// checking every id is in the vocabulary.
    pub fn lookup(&self, ids: &[Vec<u32>]) -> Result<Vec<f32>, InferError> {
        let vocab = self.table.rows();
        if let Some(bad) = ids.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(InferError::Request(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let hidden = self.table.cols();
        let mut out = vec![0.0; ids.iter().map(Vec::len).sum::<usize>() * hidden];
        for (row, &id) in out.chunks_exact_mut(hidden).zip(ids.iter().flatten()) {
            self.table.dequantize_row(id as usize, row)?;
        }
        Ok(out)
    }
}

/// The final RMSNorm and the output projection, or one worker's rows of it.
#[derive(Debug)]
pub struct QHead {
    norm: Vec<f32>,
    eps: f32,
    projection: QMatrix,
    first: usize,
}

impl QHead {
    /// Reads part `index` of `of` of the vocabulary (the embedding table's rows for a
    /// tied head: the same mapped bytes, no copy).
    pub fn load(w: &dyn Weights, c: &LlamaConfig, part: Part) -> Result<Self, InferError> {
        let tensor = match c.separate_head {
            true => LlamaTensor::Output,
            false => LlamaTensor::TokenEmbedding,
        };
        let all = matrix(w, tensor, c, 0)?;
        let keep = span(c.vocab, part.0, part.1);
        Ok(QHead {
            norm: norm(w, LlamaTensor::OutputNorm, c, 0)?,
            eps: c.eps as f32,
            projection: all
                .row_range(keep.clone())
                .map_err(|e| InferError::tensor(w.path(), &tensor.name(0), e.to_string()))?,
            first: keep.start,
        })
    }

    /// The vocabulary ids this part scores.
    pub fn rows(&self) -> Range<usize> {
        self.first..self.first + self.projection.rows()
    }

    /// Logits of this part's rows for the last position of each of `batch` rows of
    /// `x` (`[batch·seq, hidden]`): `[batch, rows]`.
    pub fn forward(&self, x: &[f32], batch: usize, s: &mut Scratch, k: &Kernels) -> Result<Vec<f32>, InferError> {
        let hidden = self.norm.len();
        let seq = x.len() / hidden / batch.max(1);
        grow(&mut s.h, batch * hidden);
        for b in 0..batch {
            let last = &x[((b + 1) * seq - 1) * hidden..(b + 1) * seq * hidden];
            ops::rms_norm(last, &self.norm, self.eps, &mut s.h[b * hidden..(b + 1) * hidden]);
        }
        let mut logits = vec![0.0; batch * self.projection.rows()];
        products(
            k,
            &mut s.acts,
            &s.h[..batch * hidden],
            batch,
            [&self.projection].as_slice(),
            &mut [&mut logits[..]],
        )?;
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use hetero_kernels::QType;

    use super::*;
    use crate::placement::Placement;
    use crate::protocol::run_in_process;
    use crate::runtime::{Arch, Output, Request, Want};
    use crate::weights::RandomWeights;

    /// A small decoder whose widths are whole blocks of 32 (and, for the FFN's
    /// input, of 256): 4 query heads over 2 key/value heads of 16.
    fn small() -> LlamaConfig {
        LlamaConfig {
            hidden: 64,
            layers: 3,
            heads: 4,
            kv_heads: 2,
            ffn: 256,
            vocab: 61,
            context: 64,
            rope_base: 10_000.0,
            eps: 1e-5,
            separate_head: false,
            attention_bias: false,
        }
    }

    /// A prefill of two rows, then two cached decode steps.
    fn requests(want: Want) -> Vec<Request> {
        vec![
            Request::decode(vec![vec![1, 5, 9, 17, 4], vec![3, 3, 8, 40, 2]], true, want),
            Request::decode(vec![vec![22], vec![7]], false, want),
            Request::decode(vec![vec![13], vec![60]], false, want),
        ]
    }

    fn logits(out: &[Output]) -> Vec<f32> {
        out.iter()
            .flat_map(|o| match o {
                Output::Logits(v) => v.concat(),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn run(w: &RandomWeights, placement: &Placement) -> Vec<f32> {
        logits(&run_in_process::<Flex>(&Arch::Llama(small()), w, placement, &requests(Want::Logits)).unwrap())
    }

    fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max)
    }

    /// With f32 matrices the products are exact, so this path and the burn block
    /// may differ only by rounding: norms, rotary positions, causal attention over
    /// the cache and the head are the same computation.
    #[test]
    fn on_f32_matrices_it_computes_what_the_burn_block_computes() {
        let plain = RandomWeights::new(small().tensor_shapes(), 11);
        let stored = RandomWeights::new(small().tensor_shapes(), 11).stored_as(QType::F32);
        let (burn, quantized) = (run(&plain, &Placement::single(3)), run(&stored, &Placement::single(3)));
        let worst = largest_difference(&burn, &quantized);
        assert!(worst < 1e-5, "{worst}");
    }

    /// On quantized matrices, the only difference from the burn block run on the
    /// same (dequantised) weights is the activations' quantization before each
    /// product: ~1/254 of each block's largest value, which stays small relative
    /// to the logits.
    #[test]
    fn on_quantized_matrices_it_stays_within_the_activations_rounding() {
        // The K-quants need rows of 256: only `ffn_down` (256 units) is stored so, the
        // rest stays f32 — a file of mixed formats, as Q4_K_M files are.
        for ty in QType::ALL.into_iter().filter(|t| !t.is_float() && *t != QType::Q8K) {
            let w = RandomWeights::new(small().tensor_shapes(), 12).stored_as(ty);
            let burn = run(
                &RandomWeights::new(small().tensor_shapes(), 12)
                    .stored_as(ty)
                    .dequantized(),
                &Placement::single(3),
            );
            let quantized = run(&w, &Placement::single(3));
            let scale = burn.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = largest_difference(&burn, &quantized);
            assert!(worst < 2e-2 * scale, "{ty}: {worst} against logits up to {scale}");
        }
    }

    /// Row cuts are views of the same blocks and column cuts at block boundaries
    /// quantize the same blocks of the input, so every placement computes what one
    /// device does up to the order of the partial sums — and, since rounding an
    /// activation to its grid is not continuous, the rare value that order moves
    /// across a rounding boundary (a step of 1/254 of its block's largest value).
    #[test]
    fn placements_agree_with_one_device() {
        let w = RandomWeights::new(small().tensor_shapes(), 13).stored_as(QType::Q4_1);
        let one = run(&w, &Placement::single(3));
        let scale = one.iter().fold(0f32, |m, v| m.max(v.abs()));
        for placement in [
            Placement::tensor_parallel(3, 2),
            Placement::pipeline(3, 2),
            Placement::pipeline(3, 3),
        ] {
            let worst = largest_difference(&one, &run(&w, &placement));
            assert!(
                worst < 1e-3 * scale,
                "{placement:?}: {worst} against logits up to {scale}"
            );
        }
        // A pipeline runs each layer whole, as one device does: the same numbers.
        assert_eq!(one, run(&w, &Placement::pipeline(3, 3)));
        // Three parts cut the 256 units at 85 and 170, inside blocks of 32: `down`
        // falls back to f32 columns (its input is then not quantized).
        let worst = largest_difference(&one, &run(&w, &Placement::tensor_parallel(3, 3)));
        assert!(worst < 5e-2, "{worst}");
    }

    /// Qwen2's query, key and value biases are added to each part's rows: this
    /// path and the burn block agree with them, on one device and cut over two
    /// and three workers, and they change the answer (they are really added).
    #[test]
    fn attention_biases_are_added_on_both_paths_and_every_placement() {
        let c = LlamaConfig {
            attention_bias: true,
            ..small()
        };
        let run = |c: &LlamaConfig, w: &RandomWeights, p: &Placement| {
            logits(&run_in_process::<Flex>(&Arch::Llama(c.clone()), w, p, &requests(Want::Logits)).unwrap())
        };
        let plain = RandomWeights::new(c.tensor_shapes(), 15);
        let stored = RandomWeights::new(c.tensor_shapes(), 15).stored_as(QType::F32);
        let one = run(&c, &plain, &Placement::single(3));
        for p in [
            Placement::single(3),
            Placement::tensor_parallel(3, 2),
            Placement::tensor_parallel(3, 3),
        ] {
            assert!(largest_difference(&one, &run(&c, &stored, &p)) < 1e-4, "{p:?}");
            assert!(largest_difference(&one, &run(&c, &plain, &p)) < 1e-4, "{p:?}");
        }
        let without = run(
            &small(),
            &RandomWeights::new(small().tensor_shapes(), 15),
            &Placement::single(3),
        );
        assert!(largest_difference(&one, &without) > 1e-2);
    }

    #[test]
    fn a_position_past_the_context_is_refused() {
        let w = RandomWeights::new(small().tensor_shapes(), 14).stored_as(QType::Q8_0);
        let long = Request::decode(vec![(0..65).map(|i| i % 50).collect()], true, Want::NextToken);
        let err = run_in_process::<Flex>(&Arch::Llama(small()), &w, &Placement::single(3), &[long])
            .unwrap_err()
            .to_string();
        assert!(err.contains("past the model's context of 64"), "{err}");
    }
}
