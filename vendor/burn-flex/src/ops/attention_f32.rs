//! Hetero: fused scaled-dot-product attention for f32, forward and backward, for
//! score tiles that fit in cache (`seq_q × seq_kv ≤ MAX_TILE`).
//!
//! Each `(batch, head)` pair is one small problem: its query, key and value rows
//! are gathered (from any strides, so the `swap_dims` views a transformer passes
//! cost no copy) into per-thread buffers that stay in cache, and its scores,
//! softmax and weighted sum of values are computed there, without ever writing
//! the `[batch, heads, seq_q, seq_kv]` score tensor to memory. Query rows go in
//! blocks of [`ROWS`]: every product is a register-blocked tile, so each row of
//! the right-hand operand is loaded once per block, not once per query row. The
//! backward pass recomputes the probabilities the same way, then sweeps the query
//! blocks (the query gradient) and the key blocks (key and value gradients).
//! Causal blocks stop at their last row's last visible key, so scores wholly
//! hidden from a block are never computed. Work is split over the batch with
//! rayon; every `(batch, head)` pair is computed by one thread in a fixed order,
//! so results do not depend on scheduling.
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
use core::ops::Range;
use burn_backend::DType;
use burn_backend::ops::AttentionModuleOptions;
use burn_std::{Bytes, Shape};

use super::attention::broadcast_attn_mask_bias;
use super::elementwise_f32::{dot, madd, multiversioned, tree};
use super::unary::exp_f32;
use crate::{FlexTensor, Layout};

/// Largest score tile (`seq_q × seq_kv`, each padded to a multiple of 16) the
/// fused kernels handle: a head's probabilities and the gathered key and value
/// rows stay in L2 up to this size.
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
        && padded(query.layout().shape()[2]) * padded(key.layout().shape()[2]) <= MAX_TILE
}

/// Width of the register blocks: 16 f32 lanes, one AVX-512 register (two AVX2
/// ones). Every per-head buffer pads its rows to a multiple of it with zeros.
const W: usize = 16;

/// Rows in a register block: query rows (or key rows, for the key and value
/// gradients) are taken this many at a time, so each row of the right-hand
/// operand loaded into registers serves all of them.
const ROWS: usize = 8;

fn padded(n: usize) -> usize {
    n.div_ceil(W) * W
}

/// `dst.copy_from_slice(src)` for the short rows of a head, inlined: W lanes at a
/// time as whole registers. (`copy_from_slice` calls `memmove`, whose call and
/// dispatch cost more than copying 16 floats; gathering rows that way took 3 %
/// of a transformer's step.)
#[inline(always)]
fn copy_short(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    let mut dst = dst.chunks_exact_mut(W);
    let mut src = src.chunks_exact(W);
    for (d, s) in (&mut dst).zip(&mut src) {
        let d: &mut [f32; W] = d.try_into().unwrap();
        *d = *<&[f32; W]>::try_from(s).unwrap();
    }
    for (d, s) in dst.into_remainder().iter_mut().zip(src.remainder()) {
        *d = *s;
    }
}

/// A left-hand operand: element `(r, k)` at `data[r·rs + k·ks]`. Either stride
/// may be 1, so a matrix and its transpose are read alike.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    rs: usize,
    ks: usize,
}

/// Where a product's rows go: row `r` at `data[r·rs..]`, only the first `rows`
/// rows and `cols` columns (the rest of a register block is padding).
struct Dest<'a> {
    data: &'a mut [f32],
    rs: usize,
    rows: usize,
    cols: usize,
}

impl Dest<'_> {
    fn put(&mut self, r: usize, c0: usize, lanes: &[f32; W]) {
        if r < self.rows && c0 < self.cols {
            let n = W.min(self.cols - c0);
            copy_short(&mut self.data[r * self.rs + c0..][..n], &lanes[..n]);
        }
    }
}

/// `acc[r][c][l] = Σ_{k ∈ ks} a(r0 + r, k) · b[k·bs + c·W + l]`: an `R × C·W` block
/// of a product kept in registers while `k` is swept, each `b` row loaded once
/// for all `R` rows. (`R · C` accumulators also keep that many independent chains
/// of additions in flight.)
#[inline(always)]
fn tile<const R: usize, const C: usize, const FMA: bool>(
    a: Operand,
    r0: usize,
    ks: Range<usize>,
    b: &[f32],
    bs: usize,
) -> [[[f32; W]; C]; R] {
    let mut acc = [[[0f32; W]; C]; R];
    for k in ks {
        let row = &b[k * bs..][..C * W];
        let at = r0 * a.rs + k * a.ks;
        for (r, acc) in acc.iter_mut().enumerate() {
            let x = a.data[at + r * a.rs];
            for (c, acc) in acc.iter_mut().enumerate() {
                for l in 0..W {
                    acc[l] = madd::<FMA>(x, row[c * W + l], acc[l]);
                }
            }
        }
    }
    acc
}

/// Rows `r0..r0 + ROWS` of `A · B` over `ks`, where `B`'s rows are `bs` apart and
/// `chunks · W` wide, into the same rows of `out`.
#[inline(always)]
fn block_product<const FMA: bool>(
    a: Operand,
    r0: usize,
    ks: Range<usize>,
    b: &[f32],
    bs: usize,
    chunks: usize,
    out: &mut Dest,
) {
    let mut put = |r: usize, c: usize, lanes: &[[f32; W]]| {
        for (i, lanes) in lanes.iter().enumerate() {
            out.put(r, (c + i) * W, lanes);
        }
    };
    if chunks == 1 {
        // One chunk wide (a head's width of 16): all ROWS rows at once.
        for (r, acc) in tile::<ROWS, 1, FMA>(a, r0, ks, b, bs).iter().enumerate() {
            put(r0 + r, 0, acc);
        }
        return;
    }
    // Wider (scores, or heads wider than 16): half the rows, two chunks at a time.
    const HALF: usize = ROWS / 2;
    for r1 in [r0, r0 + HALF] {
        let mut c = 0;
        while c < chunks {
            if c + 2 <= chunks {
                for (r, acc) in tile::<HALF, 2, FMA>(a, r1, ks.clone(), &b[c * W..], bs).iter().enumerate() {
                    put(r1 + r, c, acc);
                }
                c += 2;
            } else {
                for (r, acc) in tile::<HALF, 1, FMA>(a, r1, ks.clone(), &b[c * W..], bs).iter().enumerate() {
                    put(r1 + r, c, acc);
                }
                c += 1;
            }
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
                copy_short(row, &self.data[at..at + self.cols]);
            } else {
                for (d, x) in row.iter_mut().enumerate() {
                    *x = self.data[self.at(b, h, t, d)];
                }
            }
        }
    }
}

/// `rows × cols` of `src` (rows `src_stride` apart) transposed into `out`, column
/// `t` of row `d` at `out[d·stride + t]`. Done on a head already gathered into
/// L1: transposing while gathering from the tensor was a scalar read of another
/// cache line per element.
fn transpose(src: &[f32], src_stride: usize, rows: usize, cols: usize, out: &mut [f32], stride: usize) {
    if stride == 0 {
        return; // no keys: nothing to transpose (and `chunks_mut(0)` panics)
    }
    for (d, out) in out.chunks_mut(stride).take(cols).enumerate() {
        for (t, x) in out[..rows].iter_mut().enumerate() {
            *x = src[t * src_stride + d];
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

/// One head's operands and intermediates. Rows are padded to multiples of [`W`]
/// and query rows to a multiple of [`ROWS`], with zeros.
struct Head {
    /// Query rows, `seq_q × head_dim` (stride `dp`).
    q: Vec<f32>,
    /// Key rows, `seq_kv × head_dim` (stride `dp`).
    k: Vec<f32>,
    /// Keys transposed, `head_dim × seq_kv` (stride `kp`).
    kt: Vec<f32>,
    /// Value rows, `seq_kv × val_dim` (stride `vp`).
    v: Vec<f32>,
    /// Values transposed, `val_dim × seq_kv` (stride `kp`); backward only.
    vt: Vec<f32>,
    /// The forward output's and its gradient's rows, `seq_q × val_dim` (stride `vp`);
    /// backward only.
    o: Vec<f32>,
    g: Vec<f32>,
    /// Probabilities and (backward only) score gradients, `seq_q × seq_kv`
    /// (stride `kp`).
    p: Vec<f32>,
    ds: Vec<f32>,
    dp: usize,
    vp: usize,
    kp: usize,
}

impl Head {
    fn new(p: &Problem, backward: bool) -> Self {
        let (dp, vp, kp) = (padded(p.head_dim), padded(p.val_dim), padded(p.seq_kv));
        let rows = p.seq_q.div_ceil(ROWS) * ROWS;
        let only = |yes: bool, n: usize| vec![0f32; if yes { n } else { 0 }];
        Head {
            q: vec![0.0; rows * dp],
            k: vec![0.0; p.seq_kv * dp],
            kt: vec![0.0; p.head_dim * kp],
            v: vec![0.0; p.seq_kv * vp],
            vt: only(backward, p.val_dim * kp),
            o: only(backward, p.seq_q * vp),
            g: only(backward, rows * vp),
            p: vec![0.0; rows * kp],
            ds: only(backward, rows * kp),
            dp,
            vp,
            kp,
        }
    }

    /// The scores of query rows `r0..r0 + ROWS` over their block's first `cols`
    /// keys (a multiple of [`W`]), scaled and turned into probabilities in `self.p`
    /// (zero for hidden keys and for rows that see no key). Returns, per row of
    /// the block, whether it sees any key.
    #[inline(always)]
    fn probabilities<const FMA: bool>(
        &mut self,
        p: &Problem,
        b: usize,
        h: usize,
        r0: usize,
        cols: usize,
    ) -> [bool; ROWS] {
        let q = Operand { data: &self.q, rs: self.dp, ks: 1 };
        let mut dest = Dest { data: &mut self.p, rs: self.kp, rows: usize::MAX, cols };
        block_product::<FMA>(q, r0, 0..p.head_dim, &self.kt, self.kp, cols / W, &mut dest);
        let mut sees = [false; ROWS];
        for (row, sees) in (r0..(r0 + ROWS).min(p.seq_q)).zip(&mut sees) {
            let scores = &mut self.p[row * self.kp..][..cols];
            *sees = softmax(scores, p.visible(row), p.mask_row(b, h, row), p.scale);
            if !*sees {
                scores.fill(0.0);
            }
        }
        sees
    }
}

/// `scores` (a multiple of [`W`] long) scaled by `scale` and turned into
/// probabilities in place; keys at and after `end` and those `mask` hides get 0.
/// False when every key is hidden.
#[inline(always)]
fn softmax(scores: &mut [f32], end: usize, mask: Option<&[u8]>, scale: f32) -> bool {
    if end == 0 {
        return false;
    }
    for s in scores[..end].iter_mut() {
        *s *= scale;
    }
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
    let max = tree(lanes, |a, b| if b > a { b } else { a });
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
    let inv = 1.0 / tree(sums, |a, b| a + b);
    for s in scores.iter_mut() {
        *s *= inv;
    }
    true
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
            k.gather(b, h, &mut s.k, s.dp);
            transpose(&s.k, s.dp, p.seq_kv, p.head_dim, &mut s.kt, s.kp);
            v.gather(b, h, &mut s.v, s.vp);
            let mut out = Dest { data: &mut out[h * p.val_dim..], rs: row_len, rows: p.seq_q, cols: p.val_dim };
            for r0 in (0..p.seq_q).step_by(ROWS) {
                // Keys the block's last row sees (the most any of its rows sees).
                let end = p.visible((r0 + ROWS).min(p.seq_q) - 1);
                if end == 0 {
                    continue; // every key hidden: the output rows stay 0
                }
                let _ = s.probabilities::<FMA>(p, b, h, r0, padded(end));
                // O = P · V
                let probs = Operand { data: &s.p, rs: s.kp, ks: 1 };
                block_product::<FMA>(probs, r0, 0..end, &s.v, s.vp, s.vp / W, &mut out);
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
            transpose(&s.k, s.dp, p.seq_kv, p.head_dim, &mut s.kt, s.kp);
            v.gather(b, h, &mut s.v, s.vp);
            transpose(&s.v, s.vp, p.seq_kv, p.val_dim, &mut s.vt, s.kp);
            o.gather(b, h, &mut s.o, s.vp);
            g.gather(b, h, &mut s.g, s.vp);
            // Blocks a row never reaches are read below (as zeros) by the key and
            // value gradients.
            s.p.fill(0.0);
            s.ds.fill(0.0);
            let mut dq = Dest { data: &mut dq[h * p.head_dim..], rs: qk_row, rows: p.seq_q, cols: p.head_dim };
            for r0 in (0..p.seq_q).step_by(ROWS) {
                let last = (r0 + ROWS).min(p.seq_q) - 1;
                let end = p.visible(last);
                if end == 0 {
                    continue; // every key hidden: no gradient flows
                }
                let cols = padded(end);
                let sees = s.probabilities::<FMA>(p, b, h, r0, cols);
                // dP = dO · Vᵗ, then dS = P ∘ (dP − δ) · scale with δ_i = dO_i · O_i
                let grads = Operand { data: &s.g, rs: s.vp, ks: 1 };
                let mut dest = Dest { data: &mut s.ds, rs: s.kp, rows: usize::MAX, cols };
                block_product::<FMA>(grads, r0, 0..p.val_dim, &s.vt, s.kp, cols / W, &mut dest);
                for (row, sees) in (r0..=last).zip(sees) {
                    let ds = &mut s.ds[row * s.kp..][..cols];
                    if !sees {
                        // No gradient flows (and a non-finite dO or O in that row
                        // must not reach the others through 0 · ∞).
                        ds.fill(0.0);
                        continue;
                    }
                    let delta = dot::<FMA>(&s.g[row * s.vp..][..s.vp], &s.o[row * s.vp..][..s.vp]);
                    let probs = &s.p[row * s.kp..][..cols];
                    for (d, &pj) in ds.iter_mut().zip(probs) {
                        *d = pj * (*d - delta) * p.scale;
                    }
                }
                // dQ = dS · K
                let score_grads = Operand { data: &s.ds, rs: s.kp, ks: 1 };
                block_product::<FMA>(score_grads, r0, 0..end, &s.k, s.dp, s.dp / W, &mut dq);
            }
            // dV = Pᵗ · dO and dK = dSᵗ · Q, over the query rows from the first that
            // sees the block's first key (earlier rows see none of the block; later
            // ones have zeros in P and dS where they do not see a key).
            let mut dv = Dest { data: &mut dv[h * p.val_dim..], rs: v_row, rows: p.seq_kv, cols: p.val_dim };
            let mut dk = Dest { data: &mut dk[h * p.head_dim..], rs: qk_row, rows: p.seq_kv, cols: p.head_dim };
            for j0 in (0..p.seq_kv).step_by(ROWS) {
                let seen_from = p.first_seeing(j0)..p.seq_q;
                let probs_t = Operand { data: &s.p, rs: 1, ks: s.kp };
                block_product::<FMA>(probs_t, j0, seen_from.clone(), &s.g, s.vp, s.vp / W, &mut dv);
                let score_grads_t = Operand { data: &s.ds, rs: 1, ks: s.kp };
                block_product::<FMA>(score_grads_t, j0, seen_from, &s.q, s.dp, s.dp / W, &mut dk);
            }
        }
    }
}
