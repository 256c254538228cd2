//! Element-wise f32 maps for the hot activations — exp, GELU and its gradient,
//! ReLU and its gradient — compiled for AVX-512, AVX2 + FMA and the baseline and
//! picked at run time, and split over rayon's threads when the tensor is large.
//! flex's generic element-wise path is compiled for the baseline (4-wide SSE2) and
//! runs on one thread; on a small transformer GELU's gradient alone took a seventh
//! of a step.
//!
//! The scalar functions ([`exp_f32`], [`erf_f32`], [`gelu_f32`], ...) avoid libm so
//! that loops over them vectorise; each is `#[inline(always)]`, so a kernel (or
//! flex's generic path) inlines it into its loop.
//!
//! `unsafe` is allowed here for one reason: outputs are written into a vector's
//! spare capacity and its length set once every value was written (a memset of a
//! fresh multi-megabyte buffer cost as much as the map itself).
#![allow(unsafe_code)]

use std::mem::MaybeUninit;

/// `e^x` for f32 without calling libm, so loops over it vectorise: Cephes'
/// `expf` (range reduction by ln 2 in two parts, a degree-5 polynomial, the
/// exponent set directly), within 2 ulp of the exact value over the normal range.
/// Below −87.3 it is 0 (libm's slow underflow path is what masked attention
/// scores took), above 88.7 infinity; NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    let c = x.clamp(-87.3, 88.7);
    // Round to nearest by adding and taking away 1.5·2²³ (no `floor`: without
    // SSE 4.1 that is a libm call and the loop would not vectorise).
    const ROUND: f32 = 12_582_912.0;
    let t = c * LOG2E + ROUND;
    let n = t - ROUND;
    // n as an integer, from t's bits (an `as i32` cast saturates and checks for NaN
    // per element, which keeps the loop scalar).
    let ni = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = c - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes' 5.0000001e-1, which is 0.5 in f32
    let p = p * r * r + r + 1.0;
    // 2ⁿ, for n = 128 (x above ~88.03) as 2¹²⁷·2: 2¹²⁸ itself is past f32's
    // exponents, and p·2¹²⁸ with p < 1 is still finite. (×1 elsewhere: exact.)
    let (e, twice) = if ni > 127 { (ni - 1, 2.0) } else { (ni, 1.0) };
    let scale = f32::from_bits(((e + 127) as u32) << 23);
    let y = p * scale * twice;
    if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else {
        y
    }
}

/// The error function for f32, to f32 rounding: [`erf_absolute_and_gauss_f32`]'s
/// form, and near 0 (where that form cancels, 1 − almost 1) the Maclaurin series to
/// x¹³, exact to f32 rounding for |x| < 0.5.
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    let (tail, _) = erf_absolute_and_gauss_f32(x);
    let x2 = x * x;
    let series = x
        * std::f32::consts::FRAC_2_SQRT_PI
        * (1.0
            + x2 * (-1.0 / 3.0
                + x2 * (1.0 / 10.0 + x2 * (-1.0 / 42.0 + x2 * (1.0 / 216.0 + x2 * (-1.0 / 1320.0 + x2 / 9360.0))))));
    if x.abs() < 0.5 { series } else { tail }
}

/// `erf(x)` without [`erf_f32`]'s series near 0, and `e^(−x²)`: erf within an
/// absolute 1.5e-7 everywhere, but not to a relative one where erf is tiny. GELU
/// only ever adds erf to 1, so that is all it needs, and it skips a polynomial;
/// its gradient takes the normal density from the same exp (`e^(−u²)` at
/// `u = x/√2` is `e^(−x²/2)`), saving another exp per element.
#[inline(always)]
pub fn erf_absolute_and_gauss_f32(x: f32) -> (f32, f32) {
    // Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, the form PyTorch's
    // vectorised CPU erf uses) on the vectorisable `exp_f32`, instead of libm's
    // branchy erff, which took a tenth of a transformer's training step.
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let gauss = exp_f32(-a * a);
    ((1.0 - poly * gauss).copysign(x), gauss)
}

/// GELU of an f32, `0.5 x (1 + erf(x / √2))`. erf needs only an absolute precision
/// here (it is added to 1).
#[inline(always)]
pub fn gelu_f32(x: f32) -> f32 {
    let (erf, _) = erf_absolute_and_gauss_f32(x * std::f32::consts::FRAC_1_SQRT_2);
    0.5 * x * (1.0 + erf)
}

/// GELU's gradient at `x` times the upstream gradient `g`: `g (Φ(x) + x φ(x))`.
#[inline(always)]
pub fn gelu_grad_f32(x: f32, g: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    // erf(x / √2) and e^(−x² / 2) from one exp.
    let (erf, gauss) = erf_absolute_and_gauss_f32(x * std::f32::consts::FRAC_1_SQRT_2);
    let cdf = 0.5 * (1.0 + erf);
    let pdf = INV_SQRT_2PI * gauss;
    g * (cdf + x * pdf)
}

/// Below this many elements one thread does the work (splitting costs more).
const PARALLEL_FROM: usize = 1 << 15;

/// A map kernel: writes `out[i]` from `src[i]` (equal lengths).
pub type MapKernel = fn(&[f32], &mut [MaybeUninit<f32>]);
/// A zip kernel: writes `out[i]` from `a[i]` and `b[i]` (equal lengths).
pub type ZipKernel = fn(&[f32], &[f32], &mut [MaybeUninit<f32>]);

/// Defines a multiversioned [`MapKernel`] applying the `#[inline(always)]`
/// function `$f` to each element. (Called directly, `$f` is inlined into every
/// version; handed over as a closure or `Fn`, a large one was not, and ran once
/// per element through a call.)
macro_rules! map_kernel {
    ($(#[$meta:meta])* $name:ident, $f:path) => {
        multiversioned! {
            $(#[$meta])*
            pub fn $name(src: &[f32], out: &mut [MaybeUninit<f32>]) {
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
            pub fn $name(a: &[f32], b: &[f32], out: &mut [MaybeUninit<f32>]) {
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
    exp_f32
);
map_kernel!(
    /// GELU of each element.
    gelu,
    gelu_f32
);
zip_kernel!(
    /// GELU's gradient at each `a` times the upstream gradient `b`.
    gelu_grad,
    gelu_grad_f32
);

map_kernel!(
    /// ReLU of each element (NaN becomes 0, as `max(0)` gives).
    relu,
    relu_f32
);

multiversioned! {
    /// ReLU of each element, in place.
    pub fn relu_in_place(xs: &mut [f32]) {
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
    pub fn relu_grad_in_place(output: &[f32], grad: &mut [f32]) {
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
    pub fn sum(values: &[f32]) -> f64 {
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
    pub fn add_assign(dst: &mut [f32], src: &[f32]) {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d += v;
        }
    }
}

/// Runs `update(start, chunk)` over consecutive chunks of `values` (one per thread
/// when it is large).
pub fn update(values: &mut [f32], update: impl Fn(usize, &mut [f32]) + Sync) {
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
pub fn map(src: &[f32], kernel: MapKernel) -> Vec<f32> {
    filled(src.len(), |start, out| kernel(&src[start..start + out.len()], out))
}

/// `kernel` over each pair of elements of `a` and `b` (equal lengths).
pub fn zip_map(a: &[f32], b: &[f32], kernel: ZipKernel) -> Vec<f32> {
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
    fill(0, spare);
    // SAFETY: `fill` wrote all `len` elements.
    unsafe { out.set_len(len) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values across exp's range, the edges where it saturates, and below and
    /// above the size from which maps split over threads.
    fn samples(n: usize) -> Vec<f32> {
        (0..n).map(|i| -90.0 + 180.0 * i as f32 / n as f32).collect()
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value() {
        for x in samples(100_003) {
            let (got, want) = (exp_f32(x), (x as f64).exp());
            if x < -87.3 {
                assert_eq!(got, 0.0, "{x}: flushed to 0 below −87.3");
            } else if x > 88.7 {
                assert_eq!(got, f32::INFINITY, "{x}: infinite above 88.7");
            } else {
                let ulp = (want as f32).to_bits().abs_diff(got.to_bits());
                assert!(ulp <= 2, "exp({x}) = {got}, want {want} ({ulp} ulp)");
            }
        }
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn the_maps_compute_their_formulas_below_and_above_the_thread_split() {
        for n in [5, PARALLEL_FROM + 7] {
            let xs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 6.0).collect();
            let gs: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            for (x, y) in xs.iter().zip(map(&xs, exp)) {
                assert_eq!(y, exp_f32(*x));
            }
            for (x, y) in xs.iter().zip(map(&xs, gelu)) {
                let want = 0.5 * *x as f64 * (1.0 + erf64(*x as f64 / 2f64.sqrt()));
                assert!(
                    (y as f64 - want).abs() < 2e-6 * (1.0 + want.abs()),
                    "gelu({x}) = {y}, want {want}"
                );
            }
            for ((x, g), y) in xs.iter().zip(&gs).zip(zip_map(&xs, &gs, gelu_grad)) {
                let x = *x as f64;
                let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
                let want = *g as f64 * (0.5 * (1.0 + erf64(x / 2f64.sqrt())) + x * pdf);
                assert!(
                    (y as f64 - want).abs() < 2e-6 * (1.0 + want.abs()),
                    "gelu'({x}) = {y}, want {want}"
                );
            }
            let relu_of = map(&xs, relu);
            assert!(relu_of.iter().zip(&xs).all(|(y, x)| *y == x.max(0.0)));
            let mut in_place = xs.clone();
            update(&mut in_place, |_, chunk| relu_in_place(chunk));
            assert_eq!(in_place, relu_of);
            let grads = zip_map(&relu_of, &gs, relu_grad);
            let mut grads_in_place = gs.clone();
            update(&mut grads_in_place, |start, chunk| {
                relu_grad_in_place(&relu_of[start..start + chunk.len()], chunk)
            });
            assert_eq!(grads, grads_in_place);
            assert!(
                grads
                    .iter()
                    .zip(&relu_of)
                    .zip(&gs)
                    .all(|((d, y), g)| *d == if *y > 0.0 { *g } else { 0.0 })
            );
        }
    }

    #[test]
    fn erf_is_within_f32_rounding_and_keeps_its_sign() {
        for i in -4000..=4000 {
            let x = i as f32 / 1000.0;
            let want = erf64(x as f64);
            assert!((erf_f32(x) as f64 - want).abs() < 2e-7 + 1e-6 * want.abs(), "erf({x})");
        }
        assert_eq!(erf_f32(0.0), 0.0);
        assert!(erf_f32(-1e-3) < 0.0);
    }

    #[test]
    fn a_sum_does_not_depend_on_where_the_values_lie() {
        let xs: Vec<f32> = (0..1000).map(|i| 1.0 / (i + 1) as f32).collect();
        let want: f64 = xs.iter().map(|&x| x as f64).sum();
        assert!((sum(&xs) - want).abs() < 1e-5);
        assert_eq!(sum(&xs), sum(&xs.clone()));
        let mut acc = vec![1.0f32; 1000];
        add_assign(&mut acc, &xs);
        assert!(acc.iter().zip(&xs).all(|(a, x)| *a == 1.0 + x));
    }

    /// erf in f64 (Abramowitz & Stegun 7.1.28's continued refinement is overkill;
    /// a 60-term Maclaurin series is exact in f64 for |x| ≤ 4).
    fn erf64(x: f64) -> f64 {
        if x.abs() > 4.0 {
            return x.signum();
        }
        let (mut term, mut total) = (x, x);
        for n in 1..120 {
            term *= -x * x / n as f64;
            total += term / (2 * n + 1) as f64;
        }
        total * 2.0 / std::f64::consts::PI.sqrt()
    }
}
