//! Hetero's addition to flex: a 2-D convolution, forward and both backward
//! passes, as per-sample im2col + GEMM (the `gemm` crate), in parallel over the
//! batch.
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
//! Groups are handled group by group (depthwise convolutions stay on flex's own
//! kernel); other float types go through f32. The bias gradient is summed in place.

use alloc::vec;
use alloc::vec::Vec;
use core::mem::MaybeUninit;
use burn_backend::DType;
use burn_backend::ops::ConvOptions;
use burn_backend::ops::conv::calculate_conv_output_size;
use burn_std::{Bytes, Shape};

use crate::{FlexTensor, Layout};

/// Shapes and geometry of one conv2d, read from its tensors.
#[derive(Clone, Copy)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    /// Input channels per group (the weight's second dimension).
    cg: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    groups: usize,
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
}

impl Geometry {
    fn of(x: &[usize], weight: &[usize], grad: &[usize], options: &ConvOptions<2>) -> Self {
        Geometry {
            n: x[0],
            c: x[1],
            h: x[2],
            w: x[3],
            o: weight[0],
            cg: weight[1],
            kh: weight[2],
            kw: weight[3],
            oh: grad[2],
            ow: grad[3],
            groups: options.groups,
            stride: options.stride,
            padding: options.padding,
            dilation: options.dilation,
        }
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
        let end = if self.w + p > off { (self.w + p - off).div_ceil(s) } else { 0 };
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
        Some(Shift { delta: row * self.w as isize + column, rows: first..end, plane: self.h * self.w, ow: self.ow })
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
                            crate::ops::elementwise_f32::add_assign(dst, &row[lo..hi]);
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

/// `dst (m×n) = [dst +] a (m×k) · b (k×n)`, all row-major with the given row
/// strides, `b` optionally read transposed (stored `n×k`).
#[allow(clippy::too_many_arguments)]
/// `dst` may be uninitialised unless `accumulate`; gemm writes all of `m×n`.
fn gemm(m: usize, n: usize, k: usize, dst: &mut [MaybeUninit<f32>], a: &[f32], a_transposed: bool, b: &[f32], b_transposed: bool, accumulate: bool) {
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

/// `values` seen as possibly uninitialised, for [`gemm`]'s destination.
fn uninit(values: &mut [f32]) -> &mut [MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and every value written through
    // it (by gemm) is an initialised f32, so `values` stays initialised.
    unsafe { &mut *(values as *mut [f32] as *mut [MaybeUninit<f32>]) }
}

/// Runs `f(first_sample, samples)` over contiguous chunks of the batch, one per
/// thread, and returns what each returned.
fn by_chunks<R: Send>(n: usize, f: impl Fn(usize, usize) -> R + Sync) -> Vec<R> {
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        let chunks = rayon::current_num_threads().clamp(1, n.max(1));
        let size = n.div_ceil(chunks).max(1);
        (0..n.div_ceil(size))
            .into_par_iter()
            .map(|i| f(i * size, size.min(n - i * size)))
            .collect()
    }
    #[cfg(not(feature = "rayon"))]
    {
        vec![f(0, n)]
    }
}

/// Runs `f(first_sample, out_chunk)` over contiguous chunks of the batch, one per
/// thread, each writing its own samples' part of `out` (`per_sample` values each).
fn for_chunks<T: Send>(n: usize, out: &mut [T], per_sample: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if out.is_empty() || per_sample == 0 {
        return;
    }
    #[cfg(feature = "rayon")]
    {
        use rayon::prelude::*;
        let chunks = rayon::current_num_threads().clamp(1, n.max(1));
        let size = n.div_ceil(chunks).max(1);
        out.par_chunks_mut(size * per_sample)
            .enumerate()
            .for_each(|(i, chunk)| f(i * size, chunk));
    }
    #[cfg(not(feature = "rayon"))]
    {
        let _ = n;
        f(0, out)
    }
}

fn as_f32(t: FlexTensor) -> FlexTensor {
    let t = if t.dtype() == DType::F32 {
        t
    } else {
        <crate::Flex as burn_backend::ops::FloatTensorOps<crate::Flex>>::float_cast(t, burn_backend::FloatDType::F32)
    };
    t.to_contiguous()
}

fn back_to(t: FlexTensor, dtype: DType) -> FlexTensor {
    if dtype == DType::F32 {
        t
    } else {
        <crate::Flex as burn_backend::ops::FloatTensorOps<crate::Flex>>::float_cast(t, dtype.into())
    }
}

fn tensor(data: Vec<f32>, shape: [usize; 4]) -> FlexTensor {
    FlexTensor::new(Bytes::from_elems(data), Layout::contiguous(Shape::from(shape.to_vec())), DType::F32)
}

/// Whether [`conv2d`] handles this convolution: everything but depthwise ones
/// (one input and one output channel per group), which flex's own kernel does
/// better than a GEMM of one row.
pub fn conv2d_handles(weight: &FlexTensor, options: &ConvOptions<2>) -> bool {
    let shape = weight.layout().shape();
    options.groups == 1 || shape[1] > 1 || shape[0] / options.groups > 1
}

/// A conv2d's output: `Y_n = W · col_n + bias`, sample by sample.
pub fn conv2d(x: FlexTensor, weight: FlexTensor, bias: Option<FlexTensor>, options: &ConvOptions<2>) -> FlexTensor {
    let dtype = x.dtype();
    let (x, weight) = (as_f32(x), as_f32(weight));
    let bias = bias.map(as_f32);
    let (xs, ws) = (x.layout().shape(), weight.layout().shape());
    let out = |i: usize| calculate_conv_output_size(ws[2 + i], options.stride[i], options.padding[i], options.dilation[i], xs[2 + i]);
    let (oh, ow) = (out(0), out(1));
    let g = Geometry::of(xs, ws, &[xs[0], ws[0], oh, ow], options);
    let (xs, ws): (&[f32], &[f32]) = (x.storage(), weight.storage());
    let bs: Option<&[f32]> = bias.as_ref().map(|b| b.storage());
    let (rows, l, og) = (g.rows(), g.positions(), g.og());
    let (sample_in, sample_out) = (g.c * g.h * g.w, g.o * l);
    // Not zeroed: each sample's output is filled with the bias or overwritten by gemm.
    let len = g.n * sample_out;
    let mut y: Vec<f32> = Vec::with_capacity(len);
    for_chunks(g.n, &mut y.spare_capacity_mut()[..len], sample_out, |first, y| {
        let mut col = vec![0f32; if g.input_is_columns() { 0 } else { rows * l }];
        for (k, s) in (first..first + y.len() / sample_out).enumerate() {
            let image = &xs[s * sample_in..][..sample_in];
            let y = &mut y[k * sample_out..][..sample_out];
            if let Some(bs) = bs {
                for (row, &b) in y.chunks_exact_mut(l).zip(bs) {
                    row.fill(MaybeUninit::new(b));
                }
            }
            for group in 0..g.groups {
                let col = g.columns(image, group, &mut col);
                let w = &ws[group * og * rows..][..og * rows];
                // Y_g (og × l) [+]= W_g (og × rows) · col (rows × l)
                gemm(og, l, rows, &mut y[group * og * l..], w, false, col, false, bs.is_some());
            }
        }
    });
    // SAFETY: the chunks cover all `len` outputs and every sample's was written.
    unsafe { y.set_len(len) };
    back_to(tensor(y, [g.n, g.o, oh, ow]), dtype)
}

/// The gradient of a conv2d's weight.
pub fn conv2d_weight_backward(x: FlexTensor, weight: FlexTensor, grad: FlexTensor, options: &ConvOptions<2>) -> FlexTensor {
    let dtype = weight.dtype();
    let (x, grad) = (as_f32(x), as_f32(grad));
    let g = Geometry::of(x.layout().shape(), weight.layout().shape(), grad.layout().shape(), options);
    let (xs, dys): (&[f32], &[f32]) = (x.storage(), grad.storage());
    let (rows, l, og) = (g.rows(), g.positions(), g.og());
    let partials = by_chunks(g.n, |first, count| {
        let mut dw = vec![0f32; g.o * rows];
        let mut col = vec![0f32; if g.input_is_columns() { 0 } else { rows * l }];
        for s in first..first + count {
            let image = &xs[s * g.c * g.h * g.w..][..g.c * g.h * g.w];
            for group in 0..g.groups {
                let col = g.columns(image, group, &mut col);
                let dy = &dys[(s * g.o + group * og) * l..][..og * l];
                // dW_g (og × rows) += dY (og × l) · colᵀ (l × rows)
                gemm(og, rows, l, uninit(&mut dw[group * og * rows..]), dy, false, col, true, true);
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
    back_to(tensor(dw, [g.o, g.cg, g.kh, g.kw]), dtype)
}

/// The gradient of a conv2d's input.
pub fn conv2d_x_backward(x: FlexTensor, weight: FlexTensor, grad: FlexTensor, options: &ConvOptions<2>) -> FlexTensor {
    let dtype = x.dtype();
    let (weight, grad) = (as_f32(weight), as_f32(grad));
    let g = Geometry::of(x.layout().shape(), weight.layout().shape(), grad.layout().shape(), options);
    let (ws, dys): (&[f32], &[f32]) = (weight.storage(), grad.storage());
    let (rows, l, og) = (g.rows(), g.positions(), g.og());
    let sample = g.c * g.h * g.w;
    let mut dx = vec![0f32; g.n * sample];
    for_chunks(g.n, &mut dx, sample, |first, dx| {
        let mut col = vec![0f32; rows * l];
        for (k, s) in (first..first + dx.len() / sample).enumerate() {
            for group in 0..g.groups {
                let w = &ws[group * og * rows..][..og * rows];
                let dy = &dys[(s * g.o + group * og) * l..][..og * l];
                // dcol (rows × l) = Wᵀ (rows × og) · dY (og × l)
                gemm(rows, l, og, uninit(&mut col), w, true, dy, false, false);
                g.col2im(&mut col, group, &mut dx[k * sample..][..sample]);
            }
        }
    });
    back_to(tensor(dx, [g.n, g.c, g.h, g.w]), dtype)
}

/// The gradient of a conv2d's bias: the output gradient summed over batch and
/// positions, read in place (burn's default first copies it channels-first).
pub fn conv2d_bias_backward(_x: FlexTensor, bias: FlexTensor, grad: FlexTensor) -> FlexTensor {
    let dtype = bias.dtype();
    let grad = as_f32(grad);
    let shape = grad.layout().shape();
    let (n, o, l) = (shape[0], shape[1], shape[2] * shape[3]);
    let dys: &[f32] = grad.storage();
    // Each channel is summed by one thread, samples in order: each sample's positions
    // in 16 f32 lanes, the rest in f64.
    let channel = |c: usize| -> f32 {
        let mut sum = 0f64;
        for s in 0..n {
            sum += crate::ops::elementwise_f32::sum(&dys[(s * o + c) * l..][..l]);
        }
        sum as f32
    };
    #[cfg(feature = "rayon")]
    let db: Vec<f32> = {
        use rayon::prelude::*;
        (0..o).into_par_iter().map(channel).collect()
    };
    #[cfg(not(feature = "rayon"))]
    let db: Vec<f32> = (0..o).map(channel).collect();
    let out = FlexTensor::new(Bytes::from_elems(db), Layout::contiguous(bias.layout().shape().clone()), DType::F32);
    back_to(out, dtype)
}
