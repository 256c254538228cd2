//! Fused scaled-dot-product attention for f32, forward and backward, for
//! score tiles that fit in cache (`seq_q × seq_kv ≤ MAX_TILE`).
//!
//! Each `(batch, head)` pair is one small problem: its query, key and value rows
//! are gathered (from any strides, so the `swap_dims` views a transformer passes
//! cost no copy) into per-thread buffers that stay in cache, and its scores,
//! softmax and weighted sum of values are computed there, without ever writing
//! the `[batch, heads, seq_q, seq_kv]` score tensor to memory. Query rows go in
//! blocks of `ROWS`: every product is a register-blocked tile, so each row of
//! the right-hand operand is loaded once per block, not once per query row. The
//! backward pass recomputes the probabilities the same way, then sweeps the query
//! blocks (the query gradient) and the key blocks (key and value gradients).
//! Causal blocks stop at their last row's last visible key, so scores wholly
//! hidden from a block are never computed. Work is split over the batch with
//! rayon; every `(batch, head)` pair is computed by one thread in a fixed order,
//! so results do not depend on scheduling.
//!
//! Results (the output and the three gradients) are laid out in memory as
//! `[batch, seq, heads, dim]`, so a caller can return them as `[batch, heads, seq,
//! dim]` views whose `swap_dims(1, 2)` and `reshape` (merging the heads again) are
//! free.

use std::ops::Range;

use super::maps::exp_f32;
use super::multiversion::{dot, madd, tree};

/// Largest score tile (`seq_q × seq_kv`, each padded to a multiple of 16) the
/// fused kernels handle: a head's probabilities and the gathered key and value
/// rows stay in L2 up to this size.
const MAX_TILE: usize = 256 * 256;

/// Whether the fused kernels take a problem of `seq_q` queries over `seq_kv` keys:
/// its score tile fits `MAX_TILE`.
pub fn fits(seq_q: usize, seq_kv: usize) -> bool {
    padded(seq_q) * padded(seq_kv) <= MAX_TILE
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
                for (r, acc) in tile::<HALF, 2, FMA>(a, r1, ks.clone(), &b[c * W..], bs)
                    .iter()
                    .enumerate()
                {
                    put(r1 + r, c, acc);
                }
                c += 2;
            } else {
                for (r, acc) in tile::<HALF, 1, FMA>(a, r1, ks.clone(), &b[c * W..], bs)
                    .iter()
                    .enumerate()
                {
                    put(r1 + r, c, acc);
                }
                c += 1;
            }
        }
    }
}

/// A 4-D f32 operand `[batch, heads, seq, dim]` read through its own strides:
/// element `(b, h, t, d)` at `data[start + b·s₀ + h·s₁ + t·s₂ + d·s₃]` (so the
/// `swap_dims` views a transformer passes need no copy).
#[derive(Debug, Clone, Copy)]
pub struct Strided<'a> {
    /// The storage.
    pub data: &'a [f32],
    /// Where element `(0, 0, 0, 0)` is.
    pub start: isize,
    /// The step of each dimension.
    pub strides: [isize; 4],
    /// `[batch, heads, seq, dim]`.
    pub shape: [usize; 4],
}

impl<'a> Strided<'a> {
    fn at(&self, b: usize, h: usize, t: usize, d: usize) -> usize {
        (self.start
            + b as isize * self.strides[0]
            + h as isize * self.strides[1]
            + t as isize * self.strides[2]
            + d as isize * self.strides[3]) as usize
    }

    /// The `(b, h)` matrix, row `t` at `out[t·stride..]` (the padding is left as is).
    fn gather(&self, b: usize, h: usize, out: &mut [f32], stride: usize) {
        let (rows, cols) = (self.shape[2], self.shape[3]);
        for t in 0..rows {
            let row = &mut out[t * stride..][..cols];
            if self.strides[3] == 1 {
                let at = self.at(b, h, t, 0);
                copy_short(row, &self.data[at..at + cols]);
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
        query: &Strided,
        key: &Strided,
        value: &Strided,
        mask: Option<Mask<'m>>,
        scale: Option<f64>,
        causal: bool,
    ) -> Problem<'m> {
        let (q, k, v) = (query.shape, key.shape, value.shape);
        assert!(
            k[0] == q[0] && v[0] == q[0] && k[1] == q[1] && v[1] == q[1],
            "attention: batch and heads of query {q:?}, key {k:?} and value {v:?} differ"
        );
        assert_eq!(k[3], q[3], "attention: key head_dim differs from query's");
        assert_eq!(v[2], k[2], "attention: value seq_kv differs from key's");
        let scale = scale.unwrap_or_else(|| 1.0 / (q[3] as f64).sqrt()) as f32;
        Problem {
            batch: q[0],
            heads: q[1],
            seq_q: q[2],
            seq_kv: k[2],
            head_dim: q[3],
            val_dim: v[3],
            scale,
            causal_offset: causal.then(|| k[2] as isize - q[2] as isize),
            mask: mask.map(|m| (m.hidden, m.batch_step, m.head_step)),
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

/// One head's operands and intermediates. Rows are padded to multiples of `W`
/// and query rows to a multiple of `ROWS`, with zeros.
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
    /// keys (a multiple of `W`), scaled and turned into probabilities in `self.p`
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
        let q = Operand {
            data: &self.q,
            rs: self.dp,
            ks: 1,
        };
        let mut dest = Dest {
            data: &mut self.p,
            rs: self.kp,
            rows: usize::MAX,
            cols,
        };
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

/// `scores` (a multiple of `W` long) scaled by `scale` and turned into
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

/// Which scores a mask hides: `[seq_q, seq_kv]` tiles of bytes (nonzero: hidden),
/// the tile of batch `b` and head `h` at `b·batch_step + h·head_step` (a step of 0
/// where the mask broadcasts).
#[derive(Debug, Clone, Copy)]
pub struct Mask<'a> {
    /// The tiles.
    pub hidden: &'a [u8],
    /// Between the tiles of consecutive batches.
    pub batch_step: usize,
    /// Between the tiles of consecutive heads.
    pub head_step: usize,
}

/// Runs `body(b, chunks)` for every batch index `b`, where chunk `i` is the `b`-th
/// `lens[i]`-long piece of `outs[i]`; in parallel over the batch when rayon is on.
fn per_batch<const N: usize>(
    outs: [&mut [f32]; N],
    lens: [usize; N],
    body: impl Fn(usize, [&mut [f32]; N]) + Sync + Send,
) {
    let batch = outs[0].len().checked_div(lens[0]).unwrap_or(0);
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
    use rayon::prelude::*;
    chunks.into_par_iter().enumerate().for_each(|(b, c)| body(b, c));
}

/// `softmax(mask(Q·Kᵗ·scale))·V` (scale `1/√head_dim` unless given; `causal`:
/// query `i` sees keys up to `i + seq_kv − seq_q`), laid out `[batch, seq_q,
/// heads, val_dim]`.
pub fn forward(
    query: Strided,
    key: Strided,
    value: Strided,
    mask: Option<Mask>,
    scale: Option<f64>,
    causal: bool,
) -> Vec<f32> {
    let p = Problem::new(&query, &key, &value, mask, scale, causal);
    let views = [query, key, value];
    let row_len = p.heads * p.val_dim;
    let mut out = vec![0f32; p.batch * p.seq_q * row_len];
    per_batch([&mut out], [p.seq_q * row_len], |b, [out]| {
        forward_batch(&p, &views, b, out)
    });
    out
}

/// The gradients of [`forward`] with respect to query, key and value, given its
/// `output` and the output's gradient `grad` (both `[batch, heads, seq_q,
/// val_dim]`), laid out `[batch, seq, heads, dim]` like [`forward`]'s result.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    query: Strided,
    key: Strided,
    value: Strided,
    mask: Option<Mask>,
    output: Strided,
    grad: Strided,
    scale: Option<f64>,
    causal: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let p = Problem::new(&query, &key, &value, mask, scale, causal);
    let views = [query, key, value, output, grad];
    let (qk_row, v_row) = (p.heads * p.head_dim, p.heads * p.val_dim);
    let mut dq = vec![0f32; p.batch * p.seq_q * qk_row];
    let mut dk = vec![0f32; p.batch * p.seq_kv * qk_row];
    let mut dv = vec![0f32; p.batch * p.seq_kv * v_row];
    let lens = [p.seq_q * qk_row, p.seq_kv * qk_row, p.seq_kv * v_row];
    per_batch([&mut dq, &mut dk, &mut dv], lens, |b, [dq, dk, dv]| {
        backward_batch(&p, &views, b, dq, dk, dv)
    });
    (dq, dk, dv)
}

multiversioned! {
    /// Every head of batch `b`: its output rows into `out` (`[seq_q, heads, val_dim]`).
    fn forward_batch(p: &Problem<'_>, views: &[Strided<'_>; 3], b: usize, out: &mut [f32]) {
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
        views: &[Strided<'_>; 5],
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention from its definition in f64, `[batch, heads, seq_q, dv]`, on
    /// contiguous `[b, h, t, d]` operands.
    #[allow(clippy::too_many_arguments)]
    fn naive(q: &[f32], k: &[f32], v: &[f32], shape: [usize; 5], hidden: &[u8], causal: bool) -> Vec<f64> {
        let [b, h, sq, sk, d] = shape;
        let scale = 1.0 / (d as f64).sqrt();
        let mut out = vec![0f64; b * h * sq * d];
        for bh in 0..b * h {
            for i in 0..sq {
                let sees = |j: usize| {
                    hidden[i * sk + j] == 0 && (!causal || j as isize <= i as isize + sk as isize - sq as isize)
                };
                let scores: Vec<f64> = (0..sk)
                    .map(|j| {
                        (0..d)
                            .map(|x| q[(bh * sq + i) * d + x] as f64 * k[(bh * sk + j) * d + x] as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = (0..sk).filter(|&j| sees(j)).map(|j| scores[j]).fold(f64::MIN, f64::max);
                let weights: Vec<f64> = (0..sk)
                    .map(|j| if sees(j) { (scores[j] - max).exp() } else { 0.0 })
                    .collect();
                let total: f64 = weights.iter().sum();
                for x in 0..d {
                    out[(bh * sq + i) * d + x] = if total == 0.0 {
                        0.0
                    } else {
                        (0..sk)
                            .map(|j| weights[j] / total * v[(bh * sk + j) * d + x] as f64)
                            .sum()
                    };
                }
            }
        }
        out
    }

    fn contiguous(data: &[f32], shape: [usize; 4]) -> Strided<'_> {
        let [_, h, t, d] = shape;
        Strided {
            data,
            start: 0,
            strides: [(h * t * d) as isize, (t * d) as isize, d as isize, 1],
            shape,
        }
    }

    /// `[b, h, t, d]` of a result laid out `[b, t, h, d]`.
    fn heads_first(x: &[f32], [b, h, t, d]: [usize; 4]) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        for bi in 0..b {
            for hi in 0..h {
                for ti in 0..t {
                    for di in 0..d {
                        out[((bi * h + hi) * t + ti) * d + di] = x[((bi * t + ti) * h + hi) * d + di];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn the_output_is_softmax_attention_with_the_mask_and_the_causal_flag() {
        let (b, h, sq, sk, d) = (2, 3, 5, 7, 16);
        let q: Vec<f32> = (0..b * h * sq * d)
            .map(|i| ((i * 31) % 19) as f32 / 10.0 - 0.9)
            .collect();
        let k: Vec<f32> = (0..b * h * sk * d)
            .map(|i| ((i * 17) % 23) as f32 / 12.0 - 0.9)
            .collect();
        let v: Vec<f32> = (0..b * h * sk * d).map(|i| ((i * 7) % 11) as f32 / 5.0 - 1.0).collect();
        let hidden: Vec<u8> = (0..sq * sk).map(|i| u8::from(i % 5 == 3)).collect();
        for causal in [false, true] {
            let mask = Mask {
                hidden: &hidden,
                batch_step: 0,
                head_step: 0,
            };
            let got = forward(
                contiguous(&q, [b, h, sq, d]),
                contiguous(&k, [b, h, sk, d]),
                contiguous(&v, [b, h, sk, d]),
                Some(mask),
                None,
                causal,
            );
            let want = naive(&q, &k, &v, [b, h, sq, sk, d], &hidden, causal);
            for (g, w) in heads_first(&got, [b, h, sq, d]).iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w} (causal {causal})");
            }
        }
    }

    #[test]
    fn the_gradients_are_the_outputs_derivatives() {
        let (b, h, sq, sk, d) = (1, 2, 4, 6, 16);
        let q: Vec<f32> = (0..b * h * sq * d)
            .map(|i| ((i * 13) % 17) as f32 / 9.0 - 0.9)
            .collect();
        let k: Vec<f32> = (0..b * h * sk * d)
            .map(|i| ((i * 5) % 19) as f32 / 10.0 - 0.9)
            .collect();
        let v: Vec<f32> = (0..b * h * sk * d).map(|i| ((i * 3) % 7) as f32 / 4.0 - 0.8).collect();
        let g: Vec<f32> = (0..b * h * sq * d).map(|i| ((i * 11) % 5) as f32 / 3.0 - 0.6).collect();
        let none = vec![0u8; sq * sk];
        // The loss Σ g·attention(q, k, v), in f64.
        let loss = |q: &[f32], k: &[f32], v: &[f32]| -> f64 {
            naive(q, k, v, [b, h, sq, sk, d], &none, true)
                .iter()
                .zip(&g)
                .map(|(o, g)| o * *g as f64)
                .sum()
        };
        let out = forward(
            contiguous(&q, [b, h, sq, d]),
            contiguous(&k, [b, h, sk, d]),
            contiguous(&v, [b, h, sk, d]),
            None,
            None,
            true,
        );
        let out = heads_first(&out, [b, h, sq, d]);
        let (dq, dk, dv) = backward(
            contiguous(&q, [b, h, sq, d]),
            contiguous(&k, [b, h, sk, d]),
            contiguous(&v, [b, h, sk, d]),
            None,
            contiguous(&out, [b, h, sq, d]),
            contiguous(&g, [b, h, sq, d]),
            None,
            true,
        );
        let (dq, dk, dv) = (
            heads_first(&dq, [b, h, sq, d]),
            heads_first(&dk, [b, h, sk, d]),
            heads_first(&dv, [b, h, sk, d]),
        );
        let eps = 1e-2f32;
        for (which, analytic) in [(0, &dq), (1, &dk), (2, &dv)] {
            for i in (0..analytic.len()).step_by(7) {
                let nudged = |delta: f32| {
                    let (mut q2, mut k2, mut v2) = (q.clone(), k.clone(), v.clone());
                    [&mut q2, &mut k2, &mut v2][which][i] += delta;
                    loss(&q2, &k2, &v2)
                };
                let numeric = (nudged(eps) - nudged(-eps)) / (2.0 * eps as f64);
                assert!(
                    (analytic[i] as f64 - numeric).abs() < 2e-3,
                    "operand {which}[{i}]: {} vs {numeric}",
                    analytic[i]
                );
            }
        }
    }
}
