//! Hetero: fused scaled-dot-product attention for f32, forward and backward, for
//! score tiles that fit in cache (`seq_q × seq_kv ≤ MAX_TILE`).
//!
//! Each `(batch, head)` pair is one small problem: its query, key and value rows
//! are gathered (from any strides, so the `swap_dims` views a transformer passes
//! cost no copy) into buffers that stay in L1, and every query row's scores,
//! softmax and weighted sum of values are computed there, without ever writing
//! the `[batch, heads, seq_q, seq_kv]` score tensor to memory. The backward pass
//! recomputes each row's probabilities the same way and accumulates all three
//! gradients in one sweep. Causal rows stop at their last visible key, so masked
//! scores are never computed. Work is split over the batch with rayon; every
//! `(batch, head)` pair is computed by one thread in a fixed order, so results do
//! not depend on scheduling.
//!
//! Results (the output and the three gradients) are laid out in memory as
//! `[batch, seq, heads, dim]` and returned as `[batch, heads, seq, dim]` views: the
//! `swap_dims(1, 2)` and `reshape` that merge the heads again are then free.
//!
//! Checked in `crates/models/tests/cpu_kernels.rs` against burn's attention built
//! from tensor operations (values and all three gradients, with and without the
//! causal flag and a mask, on strided inputs).

use alloc::vec;
use alloc::vec::Vec;
use burn_backend::DType;
use burn_backend::ops::AttentionModuleOptions;
use burn_std::{Bytes, Shape};

use super::attention::broadcast_attn_mask_bias;
use super::elementwise_f32::{madd, multiversioned};
use super::unary::exp_f32;
use crate::{FlexTensor, Layout};

/// Largest score tile (`seq_q × seq_kv`) the fused kernels handle: one query row
/// of scores and the gathered key and value rows stay in L1/L2 up to this size.
const MAX_TILE: usize = 256 * 256;

/// Whether the fused kernels handle these arguments: f32, 4-D, no additive bias
/// and no softcap, and a score tile of at most [`MAX_TILE`] elements.
pub(crate) fn handles(
    query: &FlexTensor,
    key: &FlexTensor,
    value: &FlexTensor,
    has_bias: bool,
    options: &AttentionModuleOptions,
) -> bool {
    let four_d = |t: &FlexTensor| t.layout().num_dims() == 4;
    [query, key, value]
        .iter()
        .all(|t| t.dtype() == DType::F32 && four_d(t))
        && !has_bias
        && options.softcap.is_none()
        && query.layout().shape()[2] * key.layout().shape()[2] <= MAX_TILE
}

/// Width of the register blocks: 16 f32 lanes, one AVX-512 register (two AVX2
/// ones). Every per-head buffer pads its rows to a multiple of it with zeros.
const W: usize = 16;

fn padded(n: usize) -> usize {
    n.div_ceil(W) * W
}

/// `out[c·W..][..W] = Σ_d x[d] · m[d·stride + c·W..][..W]` for every chunk of `out`:
/// a row vector times a row-major matrix, each output block kept in registers
/// while `x` is swept. Four partial sums (over `d` mod 4) keep four independent
/// chains of additions in flight; one chain waited on each add's latency.
#[inline(always)]
fn row_times<const FMA: bool>(x: &[f32], m: &[f32], stride: usize, out: &mut [f32]) {
    #[inline(always)]
    fn add<const FMA: bool>(acc: &mut [f32; W], xd: f32, row: &[f32]) {
        let row: &[f32; W] = row[..W].try_into().unwrap();
        for l in 0..W {
            acc[l] = madd::<FMA>(xd, row[l], acc[l]);
        }
    }
    for (c, o) in out.chunks_exact_mut(W).enumerate() {
        let m = &m[c * W..];
        let (mut a0, mut a1, mut a2, mut a3) = ([0f32; W], [0f32; W], [0f32; W], [0f32; W]);
        let mut quads = x.chunks_exact(4);
        let mut d = 0;
        for xs in &mut quads {
            add::<FMA>(&mut a0, xs[0], &m[d * stride..]);
            add::<FMA>(&mut a1, xs[1], &m[(d + 1) * stride..]);
            add::<FMA>(&mut a2, xs[2], &m[(d + 2) * stride..]);
            add::<FMA>(&mut a3, xs[3], &m[(d + 3) * stride..]);
            d += 4;
        }
        for &xd in quads.remainder() {
            add::<FMA>(&mut a0, xd, &m[d * stride..]);
            d += 1;
        }
        for l in 0..W {
            o[l] = (a0[l] + a1[l]) + (a2[l] + a3[l]);
        }
    }
}

/// A 4-D f32 tensor read through its own strides.
struct View<'a> {
    data: &'a [f32],
    start: isize,
    strides: [isize; 4],
    rows: usize,
    cols: usize,
}

impl<'a> View<'a> {
    fn of(tensor: &'a FlexTensor) -> Self {
        let layout = tensor.layout();
        let s = layout.strides();
        let shape = layout.shape();
        View {
            data: tensor.storage(),
            start: layout.start_offset() as isize,
            strides: [s[0], s[1], s[2], s[3]],
            rows: shape[2],
            cols: shape[3],
        }
    }

    fn at(&self, b: usize, h: usize, t: usize, d: usize) -> usize {
        (self.start
            + b as isize * self.strides[0]
            + h as isize * self.strides[1]
            + t as isize * self.strides[2]
            + d as isize * self.strides[3]) as usize
    }

    /// The `(b, h)` matrix, row `t` at `out[t·stride..]` (the padding is left as is).
    fn gather(&self, b: usize, h: usize, out: &mut [f32], stride: usize) {
        for t in 0..self.rows {
            let row = &mut out[t * stride..][..self.cols];
            if self.strides[3] == 1 {
                let at = self.at(b, h, t, 0);
                row.copy_from_slice(&self.data[at..at + self.cols]);
            } else {
                for (d, x) in row.iter_mut().enumerate() {
                    *x = self.data[self.at(b, h, t, d)];
                }
            }
        }
    }

    /// The `(b, h)` matrix transposed, column `t` at `out[d·stride + t]`.
    fn gather_transposed(&self, b: usize, h: usize, out: &mut [f32], stride: usize) {
        for t in 0..self.rows {
            let base = self.at(b, h, t, 0) as isize;
            for d in 0..self.cols {
                out[d * stride + t] = self.data[(base + d as isize * self.strides[3]) as usize];
            }
        }
    }
}

/// The shapes, scale and masking every head shares.
struct Problem<'a> {
    batch: usize,
    heads: usize,
    seq_q: usize,
    seq_kv: usize,
    head_dim: usize,
    val_dim: usize,
    scale: f32,
    /// Keys after `row + causal_offset` are hidden from query `row` (causal only).
    causal_offset: Option<isize>,
    /// `[seq_q, seq_kv]` tiles of u8 (nonzero: hidden) and the steps between the
    /// tiles of consecutive batches and heads (0 where the mask broadcasts).
    mask: Option<(&'a [u8], usize, usize)>,
}

impl Problem<'_> {
    fn new<'m>(
        query: &FlexTensor,
        key: &FlexTensor,
        value: &FlexTensor,
        mask: Option<&'m (FlexTensor, usize, usize)>,
        options: &AttentionModuleOptions,
    ) -> Problem<'m> {
        let q = query.layout().shape();
        let k = key.layout().shape();
        let v = value.layout().shape();
        assert!(
            k[0] == q[0] && v[0] == q[0] && k[1] == q[1] && v[1] == q[1],
            "attention: batch and heads of query {q:?}, key {k:?} and value {v:?} differ"
        );
        assert_eq!(k[3], q[3], "attention: key head_dim differs from query's");
        assert_eq!(v[2], k[2], "attention: value seq_kv differs from key's");
        let scale = options.scale.unwrap_or_else(|| 1.0 / (q[3] as f64).sqrt()) as f32;
        Problem {
            batch: q[0],
            heads: q[1],
            seq_q: q[2],
            seq_kv: k[2],
            head_dim: q[3],
            val_dim: v[3],
            scale,
            causal_offset: options.is_causal.then(|| k[2] as isize - q[2] as isize),
            mask: mask.map(|(m, batch_step, head_step)| (m.bytes(), *batch_step, *head_step)),
        }
    }

    /// How many leading keys query `row` may see (all of them unless causal).
    fn visible(&self, row: usize) -> usize {
        match self.causal_offset {
            Some(offset) => (row as isize + offset + 1).clamp(0, self.seq_kv as isize) as usize,
            None => self.seq_kv,
        }
    }

    /// The first query row that may see key `j` (0 unless causal).
    fn first_seeing(&self, j: usize) -> usize {
        match self.causal_offset {
            Some(offset) => (j as isize - offset).clamp(0, self.seq_q as isize) as usize,
            None => 0,
        }
    }

    /// The mask row of query `row` for head `(b, h)`, if there is a mask.
    fn mask_row(&self, b: usize, h: usize, row: usize) -> Option<&[u8]> {
        self.mask.map(|(m, batch_step, head_step)| {
            let at = b * batch_step + h * head_step + row * self.seq_kv;
            &m[at..at + self.seq_kv]
        })
    }
}

/// One head's operands and intermediates, rows padded to multiples of [`W`].
struct Head {
    /// Query rows, `seq_q × head_dim` (stride `dp`).
    q: Vec<f32>,
    /// Key rows, `seq_kv × head_dim` (stride `dp`); backward only.
    k: Vec<f32>,
    /// Keys transposed, `head_dim × seq_kv` (stride `kp`).
    kt: Vec<f32>,
    /// Value rows, `seq_kv × val_dim` (stride `vp`); forward only.
    v: Vec<f32>,
    /// Values transposed, `val_dim × seq_kv` (stride `kp`); backward only.
    vt: Vec<f32>,
    /// The forward output's and its gradient's rows, `seq_q × val_dim` (stride `vp`).
    o: Vec<f32>,
    g: Vec<f32>,
    /// Probabilities and score gradients transposed, `seq_kv × seq_q` (stride `qp`).
    pt: Vec<f32>,
    dst: Vec<f32>,
    /// One row of scores / probabilities, one of their gradients (`kp` long), the
    /// scaled query row and an output row.
    row: Vec<f32>,
    drow: Vec<f32>,
    q_scaled: Vec<f32>,
    out: Vec<f32>,
    dp: usize,
    vp: usize,
    kp: usize,
    qp: usize,
}

impl Head {
    fn new(p: &Problem, backward: bool) -> Self {
        let (dp, vp, kp, qp) = (padded(p.head_dim), padded(p.val_dim), padded(p.seq_kv), padded(p.seq_q));
        let only = |yes: bool, n: usize| vec![0f32; if yes { n } else { 0 }];
        Head {
            q: vec![0.0; p.seq_q * dp],
            k: only(backward, p.seq_kv * dp),
            kt: vec![0.0; p.head_dim * kp],
            v: only(!backward, p.seq_kv * vp),
            vt: only(backward, p.val_dim * kp),
            o: only(backward, p.seq_q * vp),
            g: only(backward, p.seq_q * vp),
            pt: only(backward, p.seq_kv * qp),
            dst: only(backward, p.seq_kv * qp),
            row: vec![0.0; kp],
            drow: vec![0.0; kp],
            q_scaled: vec![0.0; p.head_dim],
            out: vec![0.0; dp.max(vp)],
            dp,
            vp,
            kp,
            qp,
        }
    }

    /// Query `row`'s attention probabilities over its first `end` keys, into
    /// `self.row[..end]` (zero after it). False when every key is hidden.
    #[inline(always)]
    fn probabilities<const FMA: bool>(&mut self, p: &Problem, row: usize, end: usize, mask: Option<&[u8]>) -> bool {
        if end == 0 {
            return false;
        }
        for (s, &q) in self.q_scaled.iter_mut().zip(&self.q[row * self.dp..]) {
            *s = q * p.scale;
        }
        let blocks = padded(end);
        let scores = &mut self.row[..blocks];
        row_times::<FMA>(&self.q_scaled, &self.kt, self.kp, scores);
        scores[end..].fill(f32::NEG_INFINITY);
        if let Some(mask) = mask {
            for (s, &m) in scores.iter_mut().zip(mask) {
                if m != 0 {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
        // Whole blocks of W lanes, so each loop runs in vector registers (a float
        // running sum or `f32::max` would keep it scalar).
        let mut lanes = [f32::NEG_INFINITY; W];
        for block in scores.chunks_exact(W) {
            for l in 0..W {
                lanes[l] = if block[l] > lanes[l] { block[l] } else { lanes[l] };
            }
        }
        let max = lanes.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
        if max == f32::NEG_INFINITY {
            return false;
        }
        let mut sums = [0f32; W];
        for block in scores.chunks_exact_mut(W) {
            for l in 0..W {
                block[l] = exp_f32(block[l] - max);
                sums[l] += block[l];
            }
        }
        let inv = 1.0 / sums.iter().sum::<f32>();
        for s in scores.iter_mut() {
            *s *= inv;
        }
        true
    }
}

/// The mask as contiguous u8 `[seq_q, seq_kv]` tiles with per-batch and per-head steps.
fn prepare_mask(
    mask: Option<FlexTensor>,
    query: &FlexTensor,
    key: &FlexTensor,
) -> Option<(FlexTensor, usize, usize)> {
    mask.map(|m| {
        let q = query.layout().shape();
        let target = [q[0], q[1], q[2], key.layout().shape()[2]];
        let b = broadcast_attn_mask_bias(m, target, "mask");
        (b.tensor, b.batch_step, b.head_step)
    })
}

/// A `[batch, heads, seq, dim]` view of data laid out as `[batch, seq, heads, dim]`.
fn heads_view(data: Vec<f32>, batch: usize, heads: usize, seq: usize, dim: usize) -> FlexTensor {
    let strides = vec![(seq * heads * dim) as isize, dim as isize, (heads * dim) as isize, 1];
    FlexTensor::new(
        Bytes::from_elems(data),
        Layout::new(Shape::from(vec![batch, heads, seq, dim]), strides, 0),
        DType::F32,
    )
}

/// Runs `body(b, chunks)` for every batch index `b`, where chunk `i` is the `b`-th
/// `lens[i]`-long piece of `outs[i]`; in parallel over the batch when rayon is on.
fn per_batch<const N: usize>(
    outs: [&mut [f32]; N],
    lens: [usize; N],
    body: impl Fn(usize, [&mut [f32]; N]) + Sync + Send,
) {
    let batch = if lens[0] == 0 { 0 } else { outs[0].len() / lens[0] };
    let mut chunks: Vec<[&mut [f32]; N]> = Vec::with_capacity(batch);
    let mut rest = outs;
    for _ in 0..batch {
        let mut this: [&mut [f32]; N] = core::array::from_fn(|_| Default::default());
        for i in 0..N {
            let (a, b) = core::mem::take(&mut rest[i]).split_at_mut(lens[i]);
            this[i] = a;
            rest[i] = b;
        }
        chunks.push(this);
    }
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        chunks.into_par_iter().enumerate().for_each(|(b, c)| body(b, c));
    }
    #[cfg(not(feature = "rayon"))]
    chunks.into_iter().enumerate().for_each(|(b, c)| body(b, c));
}

/// softmax(mask(Q·Kᵗ·scale))·V, `[batch, heads, seq_q, val_dim]`.
pub(crate) fn forward(
    query: FlexTensor,
    key: FlexTensor,
    value: FlexTensor,
    mask: Option<FlexTensor>,
    options: AttentionModuleOptions,
) -> FlexTensor {
    let mask = prepare_mask(mask, &query, &key);
    let p = Problem::new(&query, &key, &value, mask.as_ref(), &options);
    let views = [View::of(&query), View::of(&key), View::of(&value)];
    let row_len = p.heads * p.val_dim;
    let mut out = vec![0f32; p.batch * p.seq_q * row_len];
    per_batch([&mut out], [p.seq_q * row_len], |b, [out]| forward_batch(&p, &views, b, out));
    heads_view(out, p.batch, p.heads, p.seq_q, p.val_dim)
}

/// The gradients of [`forward`] with respect to query, key and value, given its
/// `output` and the output's gradient `grad`.
pub(crate) fn backward(
    query: FlexTensor,
    key: FlexTensor,
    value: FlexTensor,
    mask: Option<FlexTensor>,
    output: FlexTensor,
    grad: FlexTensor,
    options: AttentionModuleOptions,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let mask = prepare_mask(mask, &query, &key);
    let p = Problem::new(&query, &key, &value, mask.as_ref(), &options);
    let views = [
        View::of(&query),
        View::of(&key),
        View::of(&value),
        View::of(&output),
        View::of(&grad),
    ];
    let (qk_row, v_row) = (p.heads * p.head_dim, p.heads * p.val_dim);
    let mut dq = vec![0f32; p.batch * p.seq_q * qk_row];
    let mut dk = vec![0f32; p.batch * p.seq_kv * qk_row];
    let mut dv = vec![0f32; p.batch * p.seq_kv * v_row];
    let lens = [p.seq_q * qk_row, p.seq_kv * qk_row, p.seq_kv * v_row];
    per_batch([&mut dq, &mut dk, &mut dv], lens, |b, [dq, dk, dv]| {
        backward_batch(&p, &views, b, dq, dk, dv)
    });
    (
        heads_view(dq, p.batch, p.heads, p.seq_q, p.head_dim),
        heads_view(dk, p.batch, p.heads, p.seq_kv, p.head_dim),
        heads_view(dv, p.batch, p.heads, p.seq_kv, p.val_dim),
    )
}

multiversioned! {
    /// Every head of batch `b`: its output rows into `out` (`[seq_q, heads, val_dim]`).
    fn forward_batch(p: &Problem<'_>, views: &[View<'_>; 3], b: usize, out: &mut [f32]) {
        let [q, k, v] = views;
        let row_len = p.heads * p.val_dim;
        let mut s = Head::new(p, false);
        for h in 0..p.heads {
            q.gather(b, h, &mut s.q, s.dp);
            k.gather_transposed(b, h, &mut s.kt, s.kp);
            v.gather(b, h, &mut s.v, s.vp);
            for row in 0..p.seq_q {
                let end = p.visible(row);
                if !s.probabilities::<FMA>(p, row, end, p.mask_row(b, h, row)) {
                    continue; // every key hidden: the output row stays 0
                }
                // O_i = Σ_j p_j V_j
                row_times::<FMA>(&s.row[..end], &s.v, s.vp, &mut s.out[..s.vp]);
                out[row * row_len + h * p.val_dim..][..p.val_dim].copy_from_slice(&s.out[..p.val_dim]);
            }
        }
    }
}

multiversioned! {
    /// Every head of batch `b`: its gradients into `dq` (`[seq_q, heads, head_dim]`),
    /// `dk` (`[seq_kv, heads, head_dim]`) and `dv` (`[seq_kv, heads, val_dim]`).
    fn backward_batch(
        p: &Problem<'_>,
        views: &[View<'_>; 5],
        b: usize,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let [q, k, v, o, g] = views;
        let (qk_row, v_row) = (p.heads * p.head_dim, p.heads * p.val_dim);
        let mut s = Head::new(p, true);
        for h in 0..p.heads {
            q.gather(b, h, &mut s.q, s.dp);
            k.gather(b, h, &mut s.k, s.dp);
            k.gather_transposed(b, h, &mut s.kt, s.kp);
            v.gather_transposed(b, h, &mut s.vt, s.kp);
            o.gather(b, h, &mut s.o, s.vp);
            g.gather(b, h, &mut s.g, s.vp);
            s.pt.fill(0.0);
            s.dst.fill(0.0);
            for row in 0..p.seq_q {
                let end = p.visible(row);
                if !s.probabilities::<FMA>(p, row, end, p.mask_row(b, h, row)) {
                    continue; // every key hidden: no gradient flows
                }
                let g_row = &s.g[row * s.vp..][..p.val_dim];
                let o_row = &s.o[row * s.vp..][..p.val_dim];
                let delta: f32 = g_row.iter().zip(o_row).map(|(g, o)| g * o).sum();
                // dP_j = dO_i · V_j, then dS_j = p_j (dP_j − δ_i) · scale
                let blocks = padded(end);
                row_times::<FMA>(g_row, &s.vt, s.kp, &mut s.drow[..blocks]);
                for (j, (d, &pj)) in s.drow[..end].iter_mut().zip(&s.row[..end]).enumerate() {
                    *d = pj * (*d - delta) * p.scale;
                    s.pt[j * s.qp + row] = pj;
                    s.dst[j * s.qp + row] = *d;
                }
                // dQ_i = Σ_j dS_j K_j
                row_times::<FMA>(&s.drow[..end], &s.k, s.dp, &mut s.out[..s.dp]);
                dq[row * qk_row + h * p.head_dim..][..p.head_dim].copy_from_slice(&s.out[..p.head_dim]);
            }
            // dV_j = Σ_i p_ij dO_i and dK_j = Σ_i dS_ij Q_i, over the rows that see key j.
            for j in 0..p.seq_kv {
                let first = p.first_seeing(j);
                let probs = &s.pt[j * s.qp + first..j * s.qp + p.seq_q];
                row_times::<FMA>(probs, &s.g[first * s.vp..], s.vp, &mut s.out[..s.vp]);
                dv[j * v_row + h * p.val_dim..][..p.val_dim].copy_from_slice(&s.out[..p.val_dim]);
                let grads = &s.dst[j * s.qp + first..j * s.qp + p.seq_q];
                row_times::<FMA>(grads, &s.q[first * s.dp..], s.dp, &mut s.out[..s.dp]);
                dk[j * qk_row + h * p.head_dim..][..p.head_dim].copy_from_slice(&s.out[..p.head_dim]);
            }
        }
    }
}
