//! Hetero: element-wise f32 maps for the hot activations (GELU, its gradient, exp),
//! compiled three times — AVX-512, AVX2 + FMA and the baseline — and picked at run
//! time, and split over rayon's threads when the tensor is large. flex's generic
//! element-wise path is compiled for the baseline (4-wide SSE2) and runs on one
//! thread; on a small transformer GELU's gradient alone took a seventh of a step.
//! Checked by `crates/models/tests/cpu_kernels.rs` (exp, GELU and its gradient
//! against f64 references, on tensors below and above the threshold for threads).

use alloc::vec::Vec;

/// Below this many elements one thread does the work (splitting costs more).
const PARALLEL_FROM: usize = 1 << 15;

/// `f` of each element of `src`.
pub(crate) fn map(src: &[f32], f: impl Fn(f32) -> f32 + Sync + Send + Copy) -> Vec<f32> {
    let mut out = alloc::vec![0f32; src.len()];
    split(&mut out, |start, chunk| dispatch(chunk, |o| kernel1(&src[start..start + o.len()], o, f)));
    out
}

/// `f` of each pair of elements of `a` and `b` (equal lengths).
pub(crate) fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send + Copy) -> Vec<f32> {
    assert_eq!(a.len(), b.len());
    let mut out = alloc::vec![0f32; a.len()];
    split(&mut out, |start, chunk| {
        dispatch(chunk, |o| kernel2(&a[start..start + o.len()], &b[start..start + o.len()], o, f))
    });
    out
}

#[inline(always)]
fn kernel1(src: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32) {
    for (o, &x) in out.iter_mut().zip(src) {
        *o = f(x);
    }
}

#[inline(always)]
fn kernel2(a: &[f32], b: &[f32], out: &mut [f32], f: impl Fn(f32, f32) -> f32) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = f(x, y);
    }
}

/// Runs `body` on `out` in consecutive chunks, one per thread when it is large.
fn split(out: &mut [f32], body: impl Fn(usize, &mut [f32]) + Sync) {
    #[cfg(feature = "rayon")]
    if out.len() >= PARALLEL_FROM {
        use rayon::prelude::*;
        let size = out.len().div_ceil(rayon::current_num_threads().max(1)).max(1);
        out.par_chunks_mut(size)
            .enumerate()
            .for_each(|(i, chunk)| body(i * size, chunk));
        return;
    }
    let _ = PARALLEL_FROM;
    body(0, out)
}

/// Runs `body` compiled for the widest vector unit this CPU has.
#[inline(always)]
fn dispatch(out: &mut [f32], body: impl Fn(&mut [f32])) {
    #[cfg(all(target_arch = "x86_64", feature = "std"))]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, checked just above.
            return unsafe { avx512(out, body) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            return unsafe { avx2(out, body) };
        }
    }
    body(out)
}

#[cfg(all(target_arch = "x86_64", feature = "std"))]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn avx512(out: &mut [f32], body: impl Fn(&mut [f32])) {
    body(out)
}

#[cfg(all(target_arch = "x86_64", feature = "std"))]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2(out: &mut [f32], body: impl Fn(&mut [f32])) {
    body(out)
}

/// Defines `fn name(args)` whose body is compiled three times — AVX-512, AVX2 + FMA
/// and the baseline — and run in the widest version this CPU has. The body is an
/// `#[inline(always)]` function, so everything it calls inline is compiled for
/// that unit too (a closure handed to a `#[target_feature]` function is not
/// reliably inlined into it once it is large).
macro_rules! multiversioned {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(all(target_arch = "x86_64", feature = "std"))]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    body($($arg),*)
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
            body($($arg),*)
        }
    };
}
pub(crate) use multiversioned;
