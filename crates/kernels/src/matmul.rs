//! Matrix products over the pool: `out[r][o] = Σ_i W[o][i]·x[r][i]`.
//!
//! ## Design
//! With more than sixteen activation rows per participant (prefill) the work is
//! groups of sixteen activation rows, each passing every weight row by its rows a
//! chunk of weight rows at a time (the chunk stays in L1 for the sixteen), and
//! whichever participant is free takes the next group: a core slowed by another
//! process no longer holds the others up. With fewer rows (decode, a running
//! batch, a short prompt) each participant takes a range of weight rows — whole
//! groups of four, so the tiles of later kernels never straddle two participants —
//! and every activation row, in tiles of four. Either way every output is one dot
//! product computed in one fixed order, so results are bit-identical for any number
//! of threads and whoever computes them. Each share of the output is a disjoint
//! slice cut before the job starts, handed over through an uncontended mutex.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::acts::QActs;
use crate::dispatch::{self, Level};
use crate::pool::{MAX_THREADS, Pool};
use crate::rewrite::{self, Rewrite};
use crate::{KernelError, QMatrix, QType};

/// Weight rows a participant keeps in L1 while its activation rows pass (prefill):
/// 32 rows of 576 Q8_0 weights are 20 KB.
const CHUNK: usize = 32;

/// Activation rows a participant takes at a time in a prefill: four tiles, each
/// weight row's chunk read into L1 once for the sixteen.
const GROUP: usize = 16;

/// Activation rows from which a pass rewrites Q4_0/Q5_0 weights as Q8_0 first (the
/// rewrite costs about what unpacking them in two tiles does).
const EXPAND_FROM: usize = 8;

/// The most matrices one [`Kernels::matmul_many`] call takes.
pub const MAX_MATRICES: usize = 4;

/// The kernels of one instruction-set level, run on a pool.
#[derive(Clone, Copy)]
pub struct Kernels {
    level: Level,
    pool: &'static Pool,
    prompt: bool,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = if self.prompt { ", for a prompt" } else { "" };
        write!(
            f,
            "Kernels({}, {} threads{mode})",
            self.level.name(),
            self.pool.threads()
        )
    }
}

impl Kernels {
    /// The widest level this CPU has (see [`Level::detect`]) on the process's pool.
    pub fn detect() -> Kernels {
        Kernels::new(Level::detect(), Pool::global())
    }

    /// `level`'s kernels on `pool`.
    pub fn new(level: Level, pool: &'static Pool) -> Kernels {
        Kernels {
            level,
            pool,
            prompt: false,
        }
    }

    /// These kernels for a prompt's products (`prompt`) or for decode steps'. On a
    /// level with a tile unit (`amx`) a prompt's rows of Q8_0, Q4_0, Q5_0, Q4_1 and
    /// Q5_1 matrices go through it: each output is then one integer sum per block
    /// (`simd::amx`), within rounding of the decode dot's result but not its bits. A
    /// prompt row's products still depend on nothing but that row, whatever rows
    /// and threads share the call. Elsewhere the mode changes nothing.
    pub fn for_prompt(self, prompt: bool) -> Kernels {
        Kernels { prompt, ..self }
    }

    /// The instruction-set level.
    pub fn level(&self) -> Level {
        self.level
    }

    /// Participants per product.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    pub(crate) fn pool(&self) -> &'static Pool {
        self.pool
    }

    /// `out = x · Wᵀ`: `out` is `x.rows() × w.rows()`, row-major.
    pub fn matmul(&self, w: &QMatrix, x: &QActs, out: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_many(&[w], x, &mut [out])
    }

    /// Several products of one input in one hand-over to the pool (q, k and v; gate
    /// and up): `outs[m] = x · ws[m]ᵀ`.
    pub fn matmul_many(&self, ws: &[&QMatrix], x: &QActs, outs: &mut [&mut [f32]]) -> Result<(), KernelError> {
        check(ws, x, outs)?;
        #[cfg(target_arch = "x86_64")]
        if self.prompt && self.level.has_tiles() {
            return self.prompt_products(ws, x, outs);
        }
        let n = self.pool.threads();
        if x.rows() > 16 * n {
            // A prefill. Q4_0/Q5_0 matrices are rewritten as Q8_0 once for the whole
            // call when the copy is small enough, rather than chunk by chunk in every
            // group of activation rows (a 128-token prompt is eight groups).
            let how: Vec<Option<Rewrite>> = ws
                .iter()
                .map(|w| dispatch::expands_to_q8_0(self.level, w.ty()).then_some(Rewrite::Q8_0))
                .collect();
            let copy: usize = ws.iter().zip(&how).filter_map(|(w, h)| h.map(|h| h.bytes_of(w))).sum();
            if copy == 0 || copy > rewrite::WHOLE_MAX {
                let operands: Vec<Operand> = ws.iter().map(|w| Operand::of(w)).collect();
                self.prefill(&operands, x, outs);
            } else {
                WHOLE.with_borrow_mut(|buf| {
                    // Grows to the largest copy seen (later calls allocate nothing).
                    if buf.len() < copy {
                        buf.resize(copy, 0);
                    }
                    let rewritten = self.rewrite_whole(ws, &how, &mut buf[..copy]);
                    let operands: Vec<Operand> = ws
                        .iter()
                        .zip(rewritten)
                        .map(|(w, bytes)| match bytes {
                            Some(bytes) => Operand {
                                ty: QType::Q8_0,
                                bytes,
                                row_bytes: bytes.len() / w.rows(),
                                rows: w.rows(),
                            },
                            None => Operand::of(w),
                        })
                        .collect();
                    self.prefill(&operands, x, outs);
                });
            }
        } else if x.rows() > 1 {
            // A running batch (or a short prompt): each participant takes a range of
            // weight rows and passes every activation row by them, four at a time —
            // never more tiles than splitting the activation rows, and each weight
            // read once rather than once per participant (12 rows of a SmolLM2 layer:
            // 0.56–0.59 ms against 0.75). Its share of an output is then strided, so
            // it writes it whole (rows × its weight rows) into scratch, spread into
            // place after the job.
            let rows = x.rows();
            let bounds = |w: usize, t: usize| if t == n { w } else { w * t / n / 4 * 4 };
            BATCH_SCRATCH.with_borrow_mut(|scratch| {
                // Grows to the largest batch seen (later steps allocate nothing).
                let total = rows * ws.iter().map(|w| w.rows()).sum::<usize>();
                if scratch.len() < total {
                    scratch.resize(total, 0.0);
                }
                let mut staged: [&mut [f32]; MAX_MATRICES] = Default::default();
                let mut rest: &mut [f32] = scratch;
                for (m, w) in ws.iter().enumerate() {
                    let (mine, tail) = std::mem::take(&mut rest).split_at_mut(rows * w.rows());
                    staged[m] = mine;
                    rest = tail;
                }
                let parts = cut(&mut staged[..ws.len()], n, |m, t| rows * bounds(ws[m].rows(), t));
                self.pool.run(&|p| {
                    let mut mine = parts[p].lock().expect("a participant's outputs");
                    for (m, w) in ws.iter().enumerate() {
                        let rb = w.row_bytes();
                        let (lo, hi) = (bounds(w.rows(), p), bounds(w.rows(), p + 1));
                        if lo == hi {
                            continue;
                        }
                        for c0 in (lo..hi).step_by(CHUNK) {
                            let c1 = (c0 + CHUNK).min(hi);
                            let chunk = &w.bytes()[c0 * rb..c1 * rb];
                            let rows_out = mine[m].chunks_exact_mut(hi - lo).map(|o| &mut o[c0 - lo..c1 - lo]);
                            self.pass(&Operand::of(w), chunk, x, 0..rows, rows_out);
                        }
                    }
                });
                for (m, w) in ws.iter().enumerate() {
                    let mut from = 0;
                    for t in 0..n {
                        let (lo, hi) = (bounds(w.rows(), t), bounds(w.rows(), t + 1));
                        for r in 0..rows {
                            outs[m][r * w.rows() + lo..r * w.rows() + hi]
                                .copy_from_slice(&staged[m][from..from + hi - lo]);
                            from += hi - lo;
                        }
                    }
                }
            });
        } else {
            // One activation row, each participant a range of weight rows.
            let bounds = |rows: usize, t: usize| if t == n { rows } else { rows * t / n / 4 * 4 };
            for r in 0..x.rows() {
                let mut row_outs: [&mut [f32]; MAX_MATRICES] = Default::default();
                for (m, (o, w)) in outs.iter_mut().zip(ws).enumerate() {
                    row_outs[m] = &mut o[r * w.rows()..(r + 1) * w.rows()];
                }
                let parts = cut(&mut row_outs[..ws.len()], n, |m, t| bounds(ws[m].rows(), t));
                let xr = x.row(r);
                self.pool.run(&|p| {
                    let mut mine = parts[p].lock().expect("a participant's outputs");
                    for (m, w) in ws.iter().enumerate() {
                        let (lo, hi) = (bounds(w.rows(), p), bounds(w.rows(), p + 1));
                        let bytes = &w.bytes()[lo * w.row_bytes()..hi * w.row_bytes()];
                        dispatch::rows(self.level, w.ty(), bytes, w.row_bytes(), xr, mine[m]);
                    }
                });
            }
        }
        Ok(())
    }
}

/// The shape of one causal attention step: `batch` rows of `seq` new queries,
/// row `b` at positions `starts[b]..starts[b] + seq`, `heads` query heads of `head_dim`, each
/// `group` of them sharing a key/value head.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape<'a> {
    /// Sequences.
    pub batch: usize,
    /// New positions per sequence.
    pub seq: usize,
    /// Positions each sequence had cached before them (`batch` of them: a running
    /// batch holds sequences at different points).
    pub starts: &'a [usize],
    /// Query heads.
    pub heads: usize,
    /// Query heads per key/value head.
    pub group: usize,
    /// Width of a head.
    pub head_dim: usize,
}

/// A sequence's cached keys or values for one key/value head: `(batch row, head,
/// positions) → positions × head_dim` values.
pub type CacheRows<'a> = &'a (dyn Fn(usize, usize, usize) -> (&'a [f32], &'a [f32]) + Sync);

impl Kernels {
    /// Causal attention, `ctx = softmax(q·kᵀ/√d)·V` per query head, on the pool.
    ///
    /// `q` and `ctx` are `[batch·seq][heads][head_dim]`: the unit of work is one
    /// (query, head) pair, a contiguous `head_dim` of both, and participants take
    /// consecutive runs of units of about equal cost (a query at position p reads
    /// p + 1 cached positions). `scores` is scratch, grown as needed.
    pub fn attention(
        &self,
        shape: AttentionShape<'_>,
        q: &[f32],
        cache: CacheRows,
        scores: &mut Vec<f32>,
        ctx: &mut [f32],
    ) {
        let AttentionShape {
            seq,
            starts,
            heads,
            group,
            head_dim: hd,
            ..
        } = shape;
        let units = shape.batch * seq * heads;
        assert_eq!(starts.len(), shape.batch, "one start per sequence");
        let seen = |u: usize| starts[u / heads / seq] + (u / heads) % seq + 1;
        let n = self.pool.threads().min(units.max(1));
        // Boundaries where the running cost passes t/n of the total.
        let total: usize = (0..units).map(seen).sum();
        let mut bounds = [units; MAX_THREADS + 1];
        bounds[0] = 0;
        let (mut t, mut run) = (1, 0);
        for u in 0..units {
            while t < n && run >= total * t / n {
                bounds[t] = u;
                t += 1;
            }
            run += seen(u);
        }
        // Query heads sharing a key/value head go through together, `tile` at a time.
        let tile = [4, 3, 2].into_iter().find(|t| group % t == 0).unwrap_or(1);
        let width = tile * (starts.iter().max().copied().unwrap_or(0) + seq);
        scores.resize(n * width, 0.0);
        let mut ctx_parts = [&mut ctx[..]];
        let parts = cut(&mut ctx_parts, n, |_, t| bounds[t] * hd);
        let scratch: [Mutex<&mut [f32]>; MAX_THREADS] = {
            let mut chunks = scores.chunks_exact_mut(width);
            std::array::from_fn(|_| Mutex::new(chunks.next().unwrap_or_default()))
        };
        let scale = 1.0 / (hd as f32).sqrt();
        self.pool.run(&|p| {
            if p >= n {
                return;
            }
            let mut mine = parts[p].lock().expect("a participant's outputs");
            let mut scores = scratch[p].lock().expect("a participant's scratch");
            let (mut u, end) = (bounds[p], bounds[p + 1]);
            while u < end {
                // Units u..u + tile are the heads of one position over one key/value
                // head when u is a multiple of tile (tile divides group, group heads).
                let take = if u % tile == 0 && u + tile <= end { tile } else { 1 };
                let (keys, values) = cache(u / heads / seq, (u % heads) / group, seen(u));
                let out = &mut mine[0][(u - bounds[p]) * hd..(u - bounds[p] + take) * hd];
                let qs = &q[u * hd..(u + take) * hd];
                match take {
                    4 => attend_tile::<4>(self.level, qs, keys, values, scale, &mut scores, out),
                    3 => attend_tile::<3>(self.level, qs, keys, values, scale, &mut scores, out),
                    2 => attend_tile::<2>(self.level, qs, keys, values, scale, &mut scores, out),
                    _ => attend_tile::<1>(self.level, qs, keys, values, scale, &mut scores, out),
                }
                u += take;
            }
        });
    }
}

impl Kernels {
    /// A prefill: groups of [`GROUP`] activation rows, taken by whichever participant
    /// is free next (a core slowed by another process no longer holds the others
    /// up); a group passes every weight row by its rows, a few weight rows at a time.
    fn prefill(&self, ws: &[Operand], x: &QActs, outs: &mut [&mut [f32]]) {
        let rows = x.rows();
        let groups = rows.div_ceil(GROUP);
        let mut units: Vec<Mutex<[&mut [f32]; MAX_MATRICES]>> = Vec::with_capacity(groups);
        let mut rests: [&mut [f32]; MAX_MATRICES] = Default::default();
        for (m, out) in outs.iter_mut().enumerate() {
            rests[m] = &mut **out;
        }
        for g in 0..groups {
            let take = (rows - g * GROUP).min(GROUP);
            let mut unit: [&mut [f32]; MAX_MATRICES] = Default::default();
            for (m, w) in ws.iter().enumerate() {
                let (mine, tail) = std::mem::take(&mut rests[m]).split_at_mut(take * w.rows);
                (unit[m], rests[m]) = (mine, tail);
            }
            units.push(Mutex::new(unit));
        }
        let next = AtomicUsize::new(0);
        self.pool.run(&|_| {
            loop {
                let g = next.fetch_add(1, Ordering::Relaxed);
                let Some(unit) = units.get(g) else { break };
                let mut mine = unit.lock().expect("a group's outputs");
                let (first, last) = (g * GROUP, ((g + 1) * GROUP).min(rows));
                for (m, w) in ws.iter().enumerate() {
                    let (n, rb) = (w.rows, w.row_bytes);
                    for c0 in (0..n).step_by(CHUNK) {
                        let c1 = (c0 + CHUNK).min(n);
                        let chunk = &w.bytes[c0 * rb..c1 * rb];
                        let rows_out = mine[m].chunks_exact_mut(n).map(|o| &mut o[c0..c1]);
                        self.pass(w, chunk, x, first..last, rows_out);
                    }
                }
            }
        });
    }

    /// Activation rows `rows` past the weight rows `chunk` of `w` (a few, kept in
    /// L1), each row's products into the next of `outs`: four rows at a time (a tile
    /// unpacks each weight block once for the four), and a last two or three as one
    /// tile too, its spare rows repeating the last and their products thrown away —
    /// a tile costs about what two single rows do.
    fn pass<'o>(
        &self,
        w: &Operand,
        chunk: &[u8],
        x: &QActs,
        rows: std::ops::Range<usize>,
        outs: impl Iterator<Item = &'o mut [f32]>,
    ) {
        let (rb, ty) = (w.row_bytes, w.ty);
        if rows.len() >= EXPAND_FROM && dispatch::expands_to_q8_0(self.level, ty) {
            // Q4_0 and Q5_0 blocks rewritten as Q8_0 once for all these rows rather
            // than unpacked again in every tile: the same scales and integers, so the
            // same bits, at Q8_0's speed.
            return EXPANDED.with_borrow_mut(|wide| {
                let blocks = chunk.len() / ty.block_bytes();
                wide.resize(blocks * QType::Q8_0.block_bytes(), 0);
                dispatch::expand(self.level, ty, chunk, wide);
                let wide_rb = rb / ty.block_bytes() * QType::Q8_0.block_bytes();
                self.pass_bytes(QType::Q8_0, wide, wide_rb, x, rows, outs)
            });
        }
        self.pass_bytes(ty, chunk, rb, x, rows, outs)
    }

    /// [`Self::pass`] on rows of `ty` held in `chunk`, `rb` bytes each.
    fn pass_bytes<'o>(
        &self,
        ty: QType,
        chunk: &[u8],
        rb: usize,
        x: &QActs,
        rows: std::ops::Range<usize>,
        mut outs: impl Iterator<Item = &'o mut [f32]>,
    ) {
        let mut spare = [[0f32; CHUNK]; 2];
        let mut r = rows.start;
        while r < rows.end {
            let take = (rows.end - r).min(4);
            if take == 1 {
                let out = outs.next().expect("a row per activation row");
                dispatch::rows(self.level, ty, chunk, rb, x.row(r), out);
                return;
            }
            let mut spares = spare.iter_mut();
            let mut j = 0;
            let tile: [&mut [f32]; 4] = [(); 4].map(|_| {
                j += 1;
                match j <= take {
                    true => outs.next().expect("a row per activation row"),
                    false => &mut spares.next().expect("at most two spare rows")[..chunk.len() / rb],
                }
            });
            let xs = [0, 1, 2, 3].map(|j| x.row(r + j.min(take - 1)));
            dispatch::rows4(self.level, ty, chunk, rb, xs, tile);
            r += take;
        }
    }
}

/// `N` consecutive query heads (`qs`, `N × head_dim`) over the same keys and values,
/// into `out` (`N × head_dim`).
fn attend_tile<const N: usize>(
    level: Level,
    qs: &[f32],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = qs.len() / N;
    let heads: [&[f32]; N] = std::array::from_fn(|i| &qs[i * hd..(i + 1) * hd]);
    let mut outs = out.chunks_exact_mut(hd);
    let outs: [&mut [f32]; N] = std::array::from_fn(|_| outs.next().expect("N heads of output"));
    dispatch::attend_many(level, heads, keys, values, scale, scores, outs);
}

/// A matrix as a pass sees it: `rows` rows of `ty`, `row_bytes` each — a
/// [`QMatrix`] as it is, or its Q8_0 rewrite.
#[derive(Clone, Copy)]
struct Operand<'a> {
    ty: QType,
    bytes: &'a [u8],
    row_bytes: usize,
    rows: usize,
}

impl<'a> Operand<'a> {
    fn of(w: &'a QMatrix) -> Operand<'a> {
        Operand {
            ty: w.ty(),
            bytes: w.bytes(),
            row_bytes: w.row_bytes(),
            rows: w.rows(),
        }
    }
}

fn check(ws: &[&QMatrix], x: &QActs, outs: &[&mut [f32]]) -> Result<(), KernelError> {
    if ws.len() != outs.len() || ws.len() > MAX_MATRICES {
        return Err(KernelError::Shape(format!(
            "{} matrices and {} outputs (at most {MAX_MATRICES} of each, as many of one as the other)",
            ws.len(),
            outs.len()
        )));
    }
    for (w, out) in ws.iter().zip(outs) {
        if w.cols() != x.cols() || w.ty().act() != x.ty() {
            return Err(KernelError::Shape(format!(
                "a {} × {} {} matrix times {} activations of {:?}",
                w.rows(),
                w.cols(),
                w.ty(),
                x.cols(),
                x.ty()
            )));
        }
        if out.len() != x.rows() * w.rows() {
            return Err(KernelError::Length {
                what: format!("the output of {} rows × {}", x.rows(), w.rows()),
                expected: x.rows() * w.rows(),
                got: out.len(),
            });
        }
    }
    Ok(())
}

thread_local! {
    /// Where a running batch's products are staged (see `matmul_many`).
    static BATCH_SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A prefill's Q4_0/Q5_0 matrices rewritten as Q8_0 (see `matmul_many`).
    static WHOLE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A chunk of Q4_0/Q5_0 weight rows rewritten as Q8_0 (see `pass`).
    static EXPANDED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

type Parts<'a> = [Mutex<[&'a mut [f32]; MAX_MATRICES]>; MAX_THREADS];

/// Cuts each output `outs[m]` at `at(m, t)` for `t` in `1..n` into `n` consecutive
/// slices; participant `t` gets slice `t` of every output.
pub(crate) fn cut<'a>(outs: &'a mut [&mut [f32]], n: usize, at: impl Fn(usize, usize) -> usize) -> Parts<'a> {
    let parts: Parts<'a> = std::array::from_fn(|_| Mutex::new(Default::default()));
    for (m, out) in outs.iter_mut().enumerate() {
        let mut rest: &'a mut [f32] = out;
        for (t, part) in parts.iter().enumerate().take(n) {
            let len = if t + 1 == n {
                rest.len()
            } else {
                at(m, t + 1) - at(m, t)
            };
            let (mine, tail) = rest.split_at_mut(len);
            part.lock().expect("fresh")[m] = mine;
            rest = tail;
        }
    }
    parts
}

#[cfg(test)]
pub(crate) mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::{ActType, QType};

    fn pool(threads: usize) -> &'static Pool {
        Box::leak(Box::new(Pool::new(threads)))
    }

    fn random(n: usize, scale: f32, rng: &mut StdRng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    /// Each output is one dot in one order whatever the split: any number of
    /// threads, and tiles or single rows, give the same bits.
    #[test]
    fn products_are_bit_identical_for_any_number_of_threads() {
        let mut rng = StdRng::seed_from_u64(1);
        let (cols, a_rows, b_rows) = (256, 37, 8);
        for ty in [QType::Q4_1, QType::Q8_0, QType::Q4K, QType::F32] {
            let a = QMatrix::quantize(ty, &random(a_rows * cols, 1.0, &mut rng), a_rows, cols).unwrap();
            let b = QMatrix::quantize(ty, &random(b_rows * cols, 1.0, &mut rng), b_rows, cols).unwrap();
            for x_rows in [1, 2, 3, 4, 7, 9, 13, 40, 51] {
                let mut x = QActs::new();
                x.quantize(ty.act(), &random(x_rows * cols, 2.0, &mut rng), x_rows, cols)
                    .unwrap();
                let mut first: Option<(Vec<f32>, Vec<f32>)> = None;
                for threads in [1, 2, 3] {
                    let k = Kernels::new(Level::detect(), pool(threads));
                    let (mut oa, mut ob) = (vec![0.0; x_rows * a_rows], vec![0.0; x_rows * b_rows]);
                    k.matmul_many(&[&a, &b], &x, &mut [&mut oa, &mut ob]).unwrap();
                    match &first {
                        None => first = Some((oa, ob)),
                        Some((fa, fb)) => assert!(fa == &oa && fb == &ob, "{ty}, {x_rows} rows, {threads} threads"),
                    }
                }
            }
        }
    }

    /// A prefill of matrices some of which are rewritten as Q8_0 for the call (Q4_0,
    /// Q5_0) and some not gives each matrix the bits it gets alone.
    #[test]
    fn a_prefill_of_mixed_formats_gives_each_matrix_its_own_products() {
        let mut rng = StdRng::seed_from_u64(7);
        let (cols, x_rows) = (256, 50);
        let types = [QType::Q5_0, QType::Q8_0, QType::Q4_0];
        let rows = [37, 12, 20];
        let ws: Vec<QMatrix> = types
            .iter()
            .zip(rows)
            .map(|(&ty, r)| QMatrix::quantize(ty, &random(r * cols, 1.0, &mut rng), r, cols).unwrap())
            .collect();
        let mut x = QActs::new();
        x.quantize(QType::Q8_0.act(), &random(x_rows * cols, 2.0, &mut rng), x_rows, cols)
            .unwrap();
        for threads in [1, 2, 3] {
            let k = Kernels::new(Level::detect(), pool(threads));
            let mut outs: Vec<Vec<f32>> = rows.iter().map(|r| vec![0.0; r * x_rows]).collect();
            let mut views: Vec<&mut [f32]> = outs.iter_mut().map(|o| &mut o[..]).collect();
            k.matmul_many(&ws.iter().collect::<Vec<_>>(), &x, &mut views).unwrap();
            for (m, w) in ws.iter().enumerate() {
                let mut alone = vec![0.0; rows[m] * x_rows];
                k.matmul(w, &x, &mut alone).unwrap();
                assert_eq!(alone, outs[m], "{}, {threads} threads", types[m]);
            }
        }
    }

    /// A row's products do not depend on the rows computed with it: a prefill's
    /// groups, a batch's tiles, Q4_0/Q5_0 rewritten as Q8_0, or the row alone as in
    /// decoding all give the same bits.
    #[test]
    fn a_rows_products_do_not_depend_on_the_rows_beside_it() {
        let mut rng = StdRng::seed_from_u64(4);
        let (cols, w_rows) = (512, 70);
        for ty in QType::ALL.into_iter().filter(|t| *t != QType::Q8K) {
            let w = QMatrix::quantize(ty, &random(w_rows * cols, 1.0, &mut rng), w_rows, cols).unwrap();
            for x_rows in [9, 40] {
                let xf = random(x_rows * cols, 2.0, &mut rng);
                for threads in [1, 2] {
                    let k = Kernels::new(Level::detect(), pool(threads));
                    let what = format!("{ty}, {x_rows} rows, {threads} threads");
                    assert_rows_alone_give_their_bits(&k, &w, &xf, 0..x_rows, &what);
                }
            }
        }
    }

    /// Asserts that each row `rows` of the activations `xf` gets from `k` the same
    /// products alone as among all of `xf`'s rows.
    pub(crate) fn assert_rows_alone_give_their_bits(
        k: &Kernels,
        w: &QMatrix,
        xf: &[f32],
        rows: impl IntoIterator<Item = usize>,
        what: &str,
    ) {
        let (cols, w_rows, ty) = (w.cols(), w.rows(), w.ty());
        let x_rows = xf.len() / cols;
        let mut x = QActs::new();
        x.quantize(ty.act(), xf, x_rows, cols).unwrap();
        let mut all = vec![0.0; x_rows * w_rows];
        k.matmul(w, &x, &mut all).unwrap();
        for r in rows {
            let mut one = QActs::new();
            one.quantize(ty.act(), &xf[r * cols..(r + 1) * cols], 1, cols).unwrap();
            let mut alone = vec![0.0; w_rows];
            k.matmul(w, &one, &mut alone).unwrap();
            assert_eq!(alone, all[r * w_rows..(r + 1) * w_rows], "{what}: row {r}");
        }
    }

    /// Against f64 products of the dequantised weights and the *unquantized*
    /// activations: the only error is rounding each activation to its block's grid,
    /// at most half a step (max|x|/254 of its block) per activation, so output o is
    /// off by at most Σ_blocks step/2 · Σ_(i in block) |w_oi| (plus f32 rounding).
    #[test]
    fn products_stay_within_the_activations_rounding_bound() {
        let mut rng = StdRng::seed_from_u64(2);
        let k = Kernels::detect();
        for (ty, rows, cols) in [
            (QType::Q4_0, 96, 576),
            (QType::Q4_1, 1536, 576),
            (QType::Q5_0, 64, 576),
            (QType::Q5_1, 64, 576),
            (QType::Q8_0, 576, 1536),
            (QType::Q4K, 64, 1536),
            (QType::Q5K, 64, 512),
            (QType::Q6K, 64, 512),
            (QType::Q8K, 64, 512),
            (QType::F16, 64, 96),
        ] {
            let w = QMatrix::quantize(ty, &random(rows * cols, 0.1, &mut rng), rows, cols).unwrap();
            let wd = w.dequantize().unwrap();
            for x_rows in [1, 5] {
                let xf = random(x_rows * cols, 3.0, &mut rng);
                let mut x = QActs::new();
                x.quantize(ty.act(), &xf, x_rows, cols).unwrap();
                let mut out = vec![0.0; x_rows * rows];
                k.matmul(&w, &x, &mut out).unwrap();
                let block = ty.act().block_elems();
                for r in 0..x_rows {
                    let xr = &xf[r * cols..(r + 1) * cols];
                    let steps: Vec<f64> = xr
                        .chunks(block)
                        .map(|b| match ty.act() {
                            ActType::F32 => 0.0,
                            _ => b.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 / 254.0,
                        })
                        .collect();
                    for o in 0..rows {
                        let wr = &wd[o * cols..(o + 1) * cols];
                        let exact: f64 = wr.iter().zip(xr).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let mass: f64 = wr.iter().zip(xr).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                        let bound: f64 = wr
                            .iter()
                            .enumerate()
                            .map(|(i, a)| a.abs() as f64 * steps[i / block])
                            .sum();
                        let got = out[r * rows + o] as f64;
                        assert!(
                            (got - exact).abs() <= 1.01 * bound + 1e-5 * mass + 1e-6,
                            "{ty} {rows}×{cols}, row {r}, output {o}: {got} against {exact} (bound {bound})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        let k = Kernels::detect();
        let w = QMatrix::quantize(QType::Q8_0, &[0.5; 64], 1, 64).unwrap();
        let mut x = QActs::new();
        x.quantize(ActType::Q8_1, &[1.0; 64], 1, 64).unwrap();
        assert!(
            k.matmul(&w, &x, &mut [0.0]).is_err(),
            "Q8_0 weights need Q8_0 activations"
        );
        x.quantize(ActType::Q8_0, &[1.0; 32], 1, 32).unwrap();
        assert!(k.matmul(&w, &x, &mut [0.0]).is_err(), "32 activations for rows of 64");
        x.quantize(ActType::Q8_0, &[1.0; 64], 1, 64).unwrap();
        assert!(k.matmul(&w, &x, &mut [0.0, 0.0]).is_err(), "two outputs for one row");
        k.matmul(&w, &x, &mut [0.0]).unwrap();
    }
}
