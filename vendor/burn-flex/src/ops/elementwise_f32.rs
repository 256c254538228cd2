//! Hetero: element-wise f32 maps for the hot activations (GELU, its gradient, exp),
//! compiled three times — AVX-512, AVX2 + FMA and the baseline — and picked at run
//! time, and split over rayon's threads when the tensor is large. flex's generic
//! element-wise path is compiled for the baseline (4-wide SSE2) and runs on one
//! thread; on a small transformer GELU's gradient alone took a seventh of a step.
//! Checked by `crates/models/tests/cpu_kernels.rs` (exp, GELU and its gradient
//! against f64 references, on tensors below and above the threshold for threads).

use alloc::vec::Vec;
use core::mem::MaybeUninit;

/// Defines `fn name(args)` whose body is compiled three times — AVX-512, AVX2 + FMA
/// and the baseline — and run in the widest version this CPU has. The body is an
/// `#[inline(always)]` function, so everything it calls inline is compiled for
/// that unit too (a closure handed to a `#[target_feature]` function is not
/// reliably inlined into it once it is large).
macro_rules! multiversioned {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            // `FMA`: whether this version may use fused multiply-adds (`madd`).
            #[inline(always)]
            #[allow(dead_code)]
            fn body<const FMA: bool>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(all(target_arch = "x86_64", feature = "std"))]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body::<true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body::<true>($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F, checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body::<false>($($arg),*)
        }
    };
}
pub(crate) use multiversioned;

/// `a · b + c`, fused into one instruction where `FMA` (a version compiled with
/// FMA); a plain multiply and add otherwise, where `mul_add` would call libm.
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(feature = "std")]
    if FMA {
        return a.mul_add(b, c);
    }
    a * b + c
}

/// `lanes` reduced by `op` as a tree (halves, then quarters, ...): four steps of
/// shuffles where a left-to-right fold is a chain of sixteen dependent scalar
/// operations (in attention's softmax, they cost more than a row's products).
#[inline(always)]
pub(crate) fn tree(mut lanes: [f32; 16], op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut half = 8;
    while half > 0 {
        for l in 0..half {
            lanes[l] = op(lanes[l], lanes[l + half]);
        }
        half /= 2;
    }
    lanes[0]
}

/// `Σ a[i]·b[i]` (equal lengths) in 16 lanes over whole blocks, so it runs in
/// vector registers (one f32 running sum stays scalar); the lanes reduced as a
/// [`tree`], then the rest added. Call it from a `multiversioned!` body.
#[inline(always)]
pub(crate) fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (blocks_a, blocks_b) = (a.chunks_exact(16), b.chunks_exact(16));
    let rest: f32 = blocks_a.remainder().iter().zip(blocks_b.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in blocks_a.zip(blocks_b) {
        for l in 0..16 {
            lanes[l] = madd::<FMA>(x[l], y[l], lanes[l]);
        }
    }
    tree(lanes, |x, y| x + y) + rest
}

/// Below this many elements one thread does the work (splitting costs more).
const PARALLEL_FROM: usize = 1 << 15;

/// A map kernel: writes `out[i]` from `src[i]` (equal lengths).
pub(crate) type MapKernel = fn(&[f32], &mut [MaybeUninit<f32>]);
/// A zip kernel: writes `out[i]` from `a[i]` and `b[i]` (equal lengths).
pub(crate) type ZipKernel = fn(&[f32], &[f32], &mut [MaybeUninit<f32>]);

/// Defines a multiversioned [`MapKernel`] applying the `#[inline(always)]`
/// function `$f` to each element. (Called directly, `$f` is inlined into every
/// version; handed over as a closure or `Fn`, a large one was not, and ran once
/// per element through a call.)
macro_rules! map_kernel {
    ($(#[$meta:meta])* $name:ident, $f:path) => {
        multiversioned! {
            $(#[$meta])*
            pub(crate) fn $name(src: &[f32], out: &mut [MaybeUninit<f32>]) {
                for (o, &x) in out.iter_mut().zip(src) {
                    o.write($f(x));
                }
            }
        }
    };
}

/// Defines a multiversioned [`ZipKernel`] applying `$f` to each pair.
macro_rules! zip_kernel {
    ($(#[$meta:meta])* $name:ident, $f:path) => {
        multiversioned! {
            $(#[$meta])*
            pub(crate) fn $name(a: &[f32], b: &[f32], out: &mut [MaybeUninit<f32>]) {
                for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                    o.write($f(x, y));
                }
            }
        }
    };
}

map_kernel!(
    /// `e^x` of each element.
    exp,
    crate::ops::unary::exp_f32
);
map_kernel!(
    /// GELU of each element.
    gelu,
    crate::ops::activation::gelu_f32
);
zip_kernel!(
    /// GELU's gradient at each `a` times the upstream gradient `b`.
    gelu_grad,
    crate::ops::activation::gelu_grad_f32
);

map_kernel!(
    /// ReLU of each element (NaN becomes 0, as `max(0)` gives).
    relu,
    relu_f32
);

multiversioned! {
    /// ReLU of each element, in place.
    pub(crate) fn relu_in_place(xs: &mut [f32]) {
        for x in xs {
            *x = relu_f32(*x);
        }
    }
}

#[inline(always)]
fn relu_f32(x: f32) -> f32 {
    if x > 0.0 { x } else { 0.0 }
}

zip_kernel!(
    /// ReLU's gradient: the upstream gradient `b` where the output `a` is positive.
    relu_grad,
    relu_grad_f32
);

multiversioned! {
    /// ReLU's gradient written over the upstream gradient `grad`.
    pub(crate) fn relu_grad_in_place(output: &[f32], grad: &mut [f32]) {
        for (g, &o) in grad.iter_mut().zip(output) {
            *g = relu_grad_f32(o, *g);
        }
    }
}

#[inline(always)]
fn relu_grad_f32(output: f32, grad: f32) -> f32 {
    if output > 0.0 { grad } else { 0.0 }
}

multiversioned! {
    /// The sum of `values`: 16 f32 lanes (each summing every 16th value, in order),
    /// then the lanes and the remainder in f64. The order is fixed, so the result is
    /// the same on every run and thread count.
    pub(crate) fn sum(values: &[f32]) -> f64 {
        let mut lanes = [0f32; 16];
        let chunks = values.chunks_exact(16);
        let rest = chunks.remainder();
        for chunk in chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane += v;
            }
        }
        lanes.iter().chain(rest).map(|&v| v as f64).sum()
    }
}

multiversioned! {
    /// `dst[i] += src[i]` (equal lengths).
    pub(crate) fn add_assign(dst: &mut [f32], src: &[f32]) {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d += v;
        }
    }
}

/// Runs `update(start, chunk)` over consecutive chunks of `values` (one per thread
/// when it is large).
pub(crate) fn update(values: &mut [f32], update: impl Fn(usize, &mut [f32]) + Sync) {
    #[cfg(feature = "rayon")]
    if values.len() >= PARALLEL_FROM {
        use rayon::prelude::*;
        let size = values.len().div_ceil(rayon::current_num_threads().max(1)).max(1);
        values
            .par_chunks_mut(size)
            .enumerate()
            .for_each(|(i, chunk)| update(i * size, chunk));
        return;
    }
    update(0, values)
}

/// `kernel` over each element of `src`.
pub(crate) fn map(src: &[f32], kernel: MapKernel) -> Vec<f32> {
    filled(src.len(), |start, out| kernel(&src[start..start + out.len()], out))
}

/// `kernel` over each pair of elements of `a` and `b` (equal lengths).
pub(crate) fn zip_map(a: &[f32], b: &[f32], kernel: ZipKernel) -> Vec<f32> {
    assert_eq!(a.len(), b.len());
    filled(a.len(), |start, out| {
        let end = start + out.len();
        kernel(&a[start..end], &b[start..end], out)
    })
}

/// A vector of `len` elements, every one written by `fill(start, chunk)` over
/// consecutive chunks (one per thread when it is large). It is not zeroed first:
/// a memset of a fresh multi-megabyte buffer cost as much as the map itself.
fn filled(len: usize, fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    let spare = &mut out.spare_capacity_mut()[..len];
    #[cfg(feature = "rayon")]
    if len >= PARALLEL_FROM {
        use rayon::prelude::*;
        let size = len.div_ceil(rayon::current_num_threads().max(1)).max(1);
        spare
            .par_chunks_mut(size)
            .enumerate()
            .for_each(|(i, chunk)| fill(i * size, chunk));
        // SAFETY: the chunks cover all `len` elements and `fill` wrote each one.
        unsafe { out.set_len(len) };
        return out;
    }
    let _ = PARALLEL_FROM;
    fill(0, spare);
    // SAFETY: `fill` wrote all `len` elements.
    unsafe { out.set_len(len) };
    out
}
