//! A 2-D convolution, forward and both backward passes, as per-sample im2col + GEMM
//! (the `gemm` crate), in parallel over the batch.
//!
//! flex's own forward goes through its 3-D convolution, whose patch gathering cost
//! three times its GEMM on the CNNs Hetero trains; burn's default backward computes
//! the weight gradient as a convolution whose kernel is the whole output-gradient
//! map (a GEMM with an inner size of 9 for a 3×3 kernel) and the input gradient as
//! a transposed convolution. Here, for every sample `n` (with `col_n` the
//! `[c·kh·kw, oh·ow]` patches of its input):
//!
//! - forward: `Y_n = W · col_n (+ bias)`;
//! - weight:  `dW += dY_n · col_nᵀ`, one accumulator per thread, summed at the end
//!   in a fixed order (so results do not depend on scheduling);
//! - input:   `dcol_n = Wᵀ · dY_n`, then scattered back onto the input (col2im).
//!
//! A 1×1 kernel with stride 1 and no padding reads the input as its own columns.
//! Groups are handled group by group. With stride 1 and as many output columns as
//! input columns (a "same" 3×3), im2col copies each tap's whole shifted plane at
//! once and zeroes the columns that wrapped around, and col2im adds it back the
//! same way.
//!
//! `unsafe` is allowed here for two reasons: the `gemm` crate's entry point takes
//! raw pointers and strides (the slices' lengths are checked against them), and
//! the forward output is written into a vector's spare capacity (each sample's is
//! filled with the bias or overwritten by gemm) before its length is set.
#![allow(unsafe_code)]

use std::mem::MaybeUninit;

use super::multiversion::{by_chunks, for_chunks, uninit};

/// One 2-D convolution: input `[n, c, h, w]`, weight `[o, cg, kh, kw]` (`cg` input
/// channels per group), output `[n, o, oh, ow]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2d {
    /// Samples.
    pub n: usize,
    /// Input channels.
    pub c: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub o: usize,
    /// Input channels per group (the weight's second dimension).
    pub cg: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
    /// Groups.
    pub groups: usize,
    /// Stride (rows, columns).
    pub stride: [usize; 2],
    /// Zero padding (rows, columns).
    pub padding: [usize; 2],
    /// Dilation (rows, columns).
    pub dilation: [usize; 2],
}

impl Conv2d {
    /// Whether [`Conv2d::forward`] is the right kernel: everything but depthwise
    /// convolutions (one input and one output channel per group), which a GEMM of
    /// one row does worse than a direct loop.
    pub fn suits_gemm(&self) -> bool {
        self.groups == 1 || self.cg > 1 || self.o / self.groups > 1
    }

    /// Rows of one group's columns: `cg·kh·kw`.
    fn rows(&self) -> usize {
        self.cg * self.kh * self.kw
    }

    /// Output positions per sample.
    fn positions(&self) -> usize {
        self.oh * self.ow
    }

    /// Output channels per group.
    fn og(&self) -> usize {
        self.o / self.groups
    }

    /// For kernel tap `(i, j)` and output row `r`, the input row (if inside).
    #[inline]
    fn input_row(&self, r: usize, i: usize) -> Option<usize> {
        (r * self.stride[0] + i * self.dilation[0])
            .checked_sub(self.padding[0])
            .filter(|&y| y < self.h)
    }

    /// The output columns `q` whose input column for tap `j` lies inside: a range,
    /// since the input column grows with `q`.
    #[inline]
    fn valid_columns(&self, j: usize) -> core::ops::Range<usize> {
        let (s, off, p) = (self.stride[1], j * self.dilation[1], self.padding[1]);
        // q·s + off ≥ p  and  q·s + off − p < w
        let first = p.saturating_sub(off).div_ceil(s);
        let end = if self.w + p > off {
            (self.w + p - off).div_ceil(s)
        } else {
            0
        };
        first.min(self.ow)..end.min(self.ow).max(first.min(self.ow))
    }

    /// For tap `(i, j)`, when output position `p` reads input position `p + delta`
    /// of the plane (stride 1 and as many output columns as input columns, so rows
    /// have one pitch), that shift and the output rows that read inside the image.
    fn shift(&self, i: usize, j: usize) -> Option<Shift> {
        if self.stride != [1, 1] || self.ow != self.w {
            return None;
        }
        let row = (i * self.dilation[0]) as isize - self.padding[0] as isize;
        let column = (j * self.dilation[1]) as isize - self.padding[1] as isize;
        // Output row r reads input row r + row, inside when 0 ≤ r + row < h.
        let first = (-row).clamp(0, self.oh as isize) as usize;
        let end = (self.h as isize - row).clamp(first as isize, self.oh as isize) as usize;
        Some(Shift {
            delta: row * self.w as isize + column,
            rows: first..end,
            plane: self.h * self.w,
            ow: self.ow,
        })
    }

    /// Whether a sample's input already is its own columns (1×1, stride 1, no
    /// padding): then im2col would only copy it.
    fn input_is_columns(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == [1, 1] && self.padding == [0, 0]
    }

    /// Group `g`'s columns of one sample: `image` itself when it already is its own
    /// columns, else `col` filled by [`Self::im2col`].
    fn columns<'a>(&self, image: &'a [f32], g: usize, col: &'a mut [f32]) -> &'a [f32] {
        if self.input_is_columns() {
            &image[g * self.cg * self.h * self.w..][..self.rows() * self.positions()]
        } else {
            self.im2col(image, g, col);
            col
        }
    }

    /// Fills `col` (`[rows, positions]`) with the patches of `image`'s group `g`
    /// (`image` is one sample, `[c, h, w]`).
    fn im2col(&self, image: &[f32], g: usize, col: &mut [f32]) {
        let (l, ow) = (self.positions(), self.ow);
        for ci in 0..self.cg {
            let plane = &image[(g * self.cg + ci) * self.h * self.w..][..self.h * self.w];
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let row = &mut col[((ci * self.kh + i) * self.kw + j) * l..][..l];
                    let cols = self.valid_columns(j);
                    if let Some(shift) = self.shift(i, j) {
                        // One copy of the whole shifted plane, then the columns that
                        // wrapped around to a neighbouring row zeroed.
                        let (lo, hi) = shift.span();
                        row[..lo].fill(0.0);
                        if hi > lo {
                            row[lo..hi].copy_from_slice(&plane[(lo as isize + shift.delta) as usize..][..hi - lo]);
                        }
                        row[hi..].fill(0.0);
                        for r in shift.rows.clone() {
                            row[r * ow..][..cols.start].fill(0.0);
                            row[r * ow + cols.end..][..ow - cols.end].fill(0.0);
                        }
                        continue;
                    }
                    for r in 0..self.oh {
                        let out = &mut row[r * ow..][..ow];
                        let Some(y) = self.input_row(r, i) else {
                            out.fill(0.0);
                            continue;
                        };
                        out[..cols.start].fill(0.0);
                        out[cols.end..].fill(0.0);
                        let src = &plane[y * self.w..][..self.w];
                        let base = j * self.dilation[1];
                        if cols.is_empty() {
                            continue;
                        }
                        if self.stride[1] == 1 {
                            let from = cols.start + base - self.padding[1];
                            out[cols.clone()].copy_from_slice(&src[from..][..cols.len()]);
                        } else {
                            for q in cols.clone() {
                                out[q] = src[q * self.stride[1] + base - self.padding[1]];
                            }
                        }
                    }
                }
            }
        }
    }

    /// Adds `col` (`[rows, positions]`) back onto `image`'s group `g`: the adjoint of
    /// [`Self::im2col`].
    /// `col` is scratch: its entries that fall outside the image may be zeroed.
    fn col2im(&self, col: &mut [f32], g: usize, image: &mut [f32]) {
        let (l, ow) = (self.positions(), self.ow);
        for ci in 0..self.cg {
            let plane = &mut image[(g * self.cg + ci) * self.h * self.w..][..self.h * self.w];
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let row = &mut col[((ci * self.kh + i) * self.kw + j) * l..][..l];
                    let cols = self.valid_columns(j);
                    if let Some(shift) = self.shift(i, j) {
                        // The columns that would wrap around to a neighbouring row
                        // zeroed, then one add of the whole shifted plane.
                        for r in shift.rows.clone() {
                            row[r * ow..][..cols.start].fill(0.0);
                            row[r * ow + cols.end..][..ow - cols.end].fill(0.0);
                        }
                        let (lo, hi) = shift.span();
                        if hi > lo {
                            let dst = &mut plane[(lo as isize + shift.delta) as usize..][..hi - lo];
                            super::maps::add_assign(dst, &row[lo..hi]);
                        }
                        continue;
                    }
                    let row = &*row;
                    for r in 0..self.oh {
                        let Some(y) = self.input_row(r, i) else { continue };
                        let src = &row[r * ow..][..ow];
                        let dst = &mut plane[y * self.w..][..self.w];
                        let base = j * self.dilation[1];
                        if cols.is_empty() {
                            continue;
                        }
                        if self.stride[1] == 1 {
                            let from = cols.start + base - self.padding[1];
                            for (d, v) in dst[from..][..cols.len()].iter_mut().zip(&src[cols.clone()]) {
                                *d += v;
                            }
                        } else {
                            for q in cols.clone() {
                                dst[q * self.stride[1] + base - self.padding[1]] += src[q];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// How one kernel tap reads the plane when rows share a pitch ([`Geometry::shift`]).
struct Shift {
    /// Output position `p` reads plane position `p + delta`.
    delta: isize,
    /// The output rows whose input row lies inside the image.
    rows: core::ops::Range<usize>,
    /// Plane size, `h·w`.
    plane: usize,
    /// Output row width (equal to the input's).
    ow: usize,
}

impl Shift {
    /// The output positions `lo..hi` within the rows inside whose input position
    /// lies in the plane (possibly none: `lo == hi`). Every position inside the
    /// image (a row in `rows` and a valid column) is among them; the others are not
    /// read.
    fn span(&self) -> (usize, usize) {
        let (first, end) = ((self.rows.start * self.ow) as isize, (self.rows.end * self.ow) as isize);
        let lo = (-self.delta).clamp(first, end);
        let hi = (self.plane as isize - self.delta).clamp(lo, end);
        (lo as usize, hi as usize)
    }
}

/// `dst (m×n) = [dst +] a (m×k) · b (k×n)`, all row-major, `a` or `b` optionally
/// read transposed (stored `k×m`, `n×k`). `dst` may be uninitialised unless
/// `accumulate`; gemm writes all of `m×n`.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [MaybeUninit<f32>],
    a: &[f32],
    a_transposed: bool,
    b: &[f32],
    b_transposed: bool,
    accumulate: bool,
) {
    debug_assert!(dst.len() >= m * n);
    debug_assert!(a.len() >= m * k && b.len() >= k * n);
    // (column stride, row stride) of each operand.
    let (a_cs, a_rs) = if a_transposed { (m as isize, 1) } else { (1, k as isize) };
    let (b_cs, b_rs) = if b_transposed { (k as isize, 1) } else { (1, n as isize) };
    // SAFETY: the slices hold at least m·n, m·k and k·n elements (checked above in
    // debug builds, guaranteed by the callers' shapes), and the strides describe
    // exactly those row-major layouts.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().cast::<f32>(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

impl Conv2d {
    /// The output, `[n, o, oh, ow]`: `Y_n = W · col_n + bias`, sample by sample.
    /// `x` is `[n, c, h, w]`, `weight` `[o, cg, kh, kw]`, `bias` `[o]`.
    pub fn forward(&self, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let g = *self;
        let (rows, l, og) = (g.rows(), g.positions(), g.og());
        let (sample_in, sample_out) = (g.c * g.h * g.w, g.o * l);
        assert!(
            x.len() >= g.n * sample_in && weight.len() >= g.o * rows,
            "conv2d: operands smaller than {g:?}"
        );
        // Not zeroed: each sample's output is filled with the bias or overwritten by gemm.
        let len = g.n * sample_out;
        let mut y: Vec<f32> = Vec::with_capacity(len);
        for_chunks(g.n, &mut y.spare_capacity_mut()[..len], sample_out, |first, y| {
            let mut col = vec![0f32; if g.input_is_columns() { 0 } else { rows * l }];
            for (k, s) in (first..first + y.len() / sample_out).enumerate() {
                let image = &x[s * sample_in..][..sample_in];
                let y = &mut y[k * sample_out..][..sample_out];
                if let Some(bias) = bias {
                    for (row, &b) in y.chunks_exact_mut(l).zip(bias) {
                        row.fill(MaybeUninit::new(b));
                    }
                }
                for group in 0..g.groups {
                    let col = g.columns(image, group, &mut col);
                    let w = &weight[group * og * rows..][..og * rows];
                    // Y_g (og × l) [+]= W_g (og × rows) · col (rows × l)
                    gemm(
                        og,
                        l,
                        rows,
                        &mut y[group * og * l..],
                        w,
                        false,
                        col,
                        false,
                        bias.is_some(),
                    );
                }
            }
        });
        // SAFETY: the chunks cover all `len` outputs and every sample's was written.
        unsafe { y.set_len(len) };
        y
    }

    /// The weight's gradient, `[o, cg, kh, kw]`, for the output gradient `grad`
    /// (`[n, o, oh, ow]`) of input `x`.
    pub fn weight_grad(&self, x: &[f32], grad: &[f32]) -> Vec<f32> {
        let g = *self;
        let (rows, l, og) = (g.rows(), g.positions(), g.og());
        let partials = by_chunks(g.n, |first, count| {
            let mut dw = vec![0f32; g.o * rows];
            let mut col = vec![0f32; if g.input_is_columns() { 0 } else { rows * l }];
            for s in first..first + count {
                let image = &x[s * g.c * g.h * g.w..][..g.c * g.h * g.w];
                for group in 0..g.groups {
                    let col = g.columns(image, group, &mut col);
                    let dy = &grad[(s * g.o + group * og) * l..][..og * l];
                    // dW_g (og × rows) += dY (og × l) · colᵀ (l × rows)
                    gemm(
                        og,
                        rows,
                        l,
                        uninit(&mut dw[group * og * rows..]),
                        dy,
                        false,
                        col,
                        true,
                        true,
                    );
                }
            }
            dw
        });
        let mut dw = vec![0f32; g.o * rows];
        for part in partials {
            for (a, b) in dw.iter_mut().zip(part) {
                *a += b;
            }
        }
        dw
    }

    /// The input's gradient, `[n, c, h, w]`, for the output gradient `grad`.
    pub fn input_grad(&self, weight: &[f32], grad: &[f32]) -> Vec<f32> {
        let g = *self;
        let (rows, l, og) = (g.rows(), g.positions(), g.og());
        let sample = g.c * g.h * g.w;
        let mut dx = vec![0f32; g.n * sample];
        for_chunks(g.n, &mut dx, sample, |first, dx| {
            let mut col = vec![0f32; rows * l];
            for (k, s) in (first..first + dx.len() / sample).enumerate() {
                for group in 0..g.groups {
                    let w = &weight[group * og * rows..][..og * rows];
                    let dy = &grad[(s * g.o + group * og) * l..][..og * l];
                    // dcol (rows × l) = Wᵀ (rows × og) · dY (og × l)
                    gemm(rows, l, og, uninit(&mut col), w, true, dy, false, false);
                    g.col2im(&mut col, group, &mut dx[k * sample..][..sample]);
                }
            }
        });
        dx
    }
}

/// A convolution's bias gradient, `[o]`: the output gradient `grad` (`[n, o, l]`,
/// `l` positions per channel) summed over samples and positions, in place. Each
/// channel is summed by one thread, samples in order: each sample's positions in
/// 16 f32 lanes, the rest in f64.
pub fn bias_grad(grad: &[f32], n: usize, o: usize, l: usize) -> Vec<f32> {
    use rayon::prelude::*;
    (0..o)
        .into_par_iter()
        .map(|c| {
            let mut sum = 0f64;
            for s in 0..n {
                sum += super::maps::sum(&grad[(s * o + c) * l..][..l]);
            }
            sum as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The convolution from its definition, and its gradients by the chain rule,
    /// one multiply at a time in f64.
    fn direct(g: &Conv2d, x: &[f32], w: &[f32], dy: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let og = g.o / g.groups;
        let mut y = vec![0f64; g.n * g.o * g.oh * g.ow];
        let mut dx = vec![0f64; x.len()];
        let mut dw = vec![0f64; w.len()];
        for s in 0..g.n {
            for oc in 0..g.o {
                let group = oc / og;
                for r in 0..g.oh {
                    for q in 0..g.ow {
                        let yi = ((s * g.o + oc) * g.oh + r) * g.ow + q;
                        for ci in 0..g.cg {
                            let c = group * g.cg + ci;
                            for i in 0..g.kh {
                                for j in 0..g.kw {
                                    let yy = (r * g.stride[0] + i * g.dilation[0]) as isize - g.padding[0] as isize;
                                    let xx = (q * g.stride[1] + j * g.dilation[1]) as isize - g.padding[1] as isize;
                                    if yy < 0 || xx < 0 || yy >= g.h as isize || xx >= g.w as isize {
                                        continue;
                                    }
                                    let xi = ((s * g.c + c) * g.h + yy as usize) * g.w + xx as usize;
                                    let wi = ((oc * g.cg + ci) * g.kh + i) * g.kw + j;
                                    y[yi] += x[xi] as f64 * w[wi] as f64;
                                    dx[xi] += dy[yi] as f64 * w[wi] as f64;
                                    dw[wi] += dy[yi] as f64 * x[xi] as f64;
                                }
                            }
                        }
                    }
                }
            }
        }
        (y, dx, dw)
    }

    fn close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                "{what}[{i}]: {a} vs {b}"
            );
        }
    }

    #[test]
    fn every_pass_matches_the_definition_over_strides_paddings_dilations_and_groups() {
        let shapes = [
            // n, c, h, w, o, groups, k, stride, padding, dilation
            (2, 3, 7, 7, 4, 1, 3, 1, 1, 1), // "same" 3×3: the shifted-plane path
            (3, 4, 6, 5, 6, 2, 3, 2, 1, 1), // grouped, strided
            (1, 2, 8, 8, 3, 1, 3, 1, 2, 2), // dilated
            (2, 5, 4, 4, 3, 1, 1, 1, 0, 1), // 1×1: the input is its own columns
            (5, 1, 5, 9, 2, 1, 2, 3, 0, 1), // more samples than threads, odd widths
        ];
        for (n, c, h, w, o, groups, k, s, p, d) in shapes {
            let out = |len: usize| (len + 2 * p - d * (k - 1) - 1) / s + 1;
            let g = Conv2d {
                n,
                c,
                h,
                w,
                o,
                cg: c / groups,
                kh: k,
                kw: k,
                oh: out(h),
                ow: out(w),
                groups,
                stride: [s, s],
                padding: [p, p],
                dilation: [d, d],
            };
            let x: Vec<f32> = (0..n * c * h * w).map(|i| ((i * 37) % 23) as f32 / 7.0 - 1.5).collect();
            let wt: Vec<f32> = (0..o * g.cg * k * k)
                .map(|i| ((i * 11) % 17) as f32 / 9.0 - 0.8)
                .collect();
            let dy: Vec<f32> = (0..n * o * g.oh * g.ow)
                .map(|i| ((i * 5) % 13) as f32 / 6.0 - 1.0)
                .collect();
            let bias: Vec<f32> = (0..o).map(|i| i as f32 * 0.25).collect();
            let (y, dx, dw) = direct(&g, &x, &wt, &dy);
            let with_bias: Vec<f64> = y
                .iter()
                .enumerate()
                .map(|(i, v)| v + bias[(i / (g.oh * g.ow)) % o] as f64)
                .collect();
            close(&g.forward(&x, &wt, Some(&bias)), &with_bias, "forward");
            close(&g.forward(&x, &wt, None), &y, "forward without bias");
            close(&g.input_grad(&wt, &dy), &dx, "input gradient");
            close(&g.weight_grad(&x, &dy), &dw, "weight gradient");
            let db: Vec<f64> = (0..o)
                .map(|oc| {
                    (0..n)
                        .map(|s| {
                            dy[(s * o + oc) * g.oh * g.ow..][..g.oh * g.ow]
                                .iter()
                                .map(|&v| v as f64)
                                .sum::<f64>()
                        })
                        .sum()
                })
                .collect();
            close(&bias_grad(&dy, n, o, g.oh * g.ow), &db, "bias gradient");
        }
    }
}
