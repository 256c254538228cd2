//! The activation quantizers: a row of f32 activations to signed bytes per block
//! (ggml's `quantize_row_q8_0/q8_1/q8_K`), so a product with quantized weights is an
//! integer dot product per block.
//!
//! Scales are kept as f32 (ggml rounds Q8_0/Q8_1 scales to f16 in the block): the
//! activations are ours and never written to a file, and f32 is the more accurate.

/// `x` rounded to the nearest integer, ties to even, for |x| < 2²²: adding 1.5·2²³
/// leaves no fraction bits, so the FPU's own rounding (to nearest even) does it.
/// (`f32::round_ties_even` is a libm call on x86-64's baseline, a third of the
/// time of quantizing; this is two additions, and vectorises.)
#[inline]
pub(crate) fn round_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// Q8_0 and Q8_1: per block of 32, `d = max|x| / 127` and `q = round(x / d)`, ties to
/// even as the x86 kernels round. `sums`, when given (Q8_1), gets `d·Σq` per block.
#[inline(always)]
pub(crate) fn quantize_q8(x: &[f32], qs: &mut [i8], d: &mut [f32], mut sums: Option<&mut [f32]>) {
    for (k, (x, q)) in x.chunks_exact(32).zip(qs.chunks_exact_mut(32)).enumerate() {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in q.iter_mut().zip(x) {
            *q = round_even(v * id) as i8;
            sum += *q as i32;
        }
        d[k] = amax / 127.0;
        if let Some(sums) = sums.as_deref_mut() {
            sums[k] = d[k] * sum as f32;
        }
    }
}

/// `−128·Σq` of every 4 integers of `qs` into `starts`: where the VNNI tile's
/// products with unsigned weight bytes (`q_w + 128`) start, so that they end at
/// `Σ q_w·q` (`simd::wide`).
#[inline(always)]
pub(crate) fn starts(qs: &[i8], starts: &mut [i32]) {
    for (s, q) in starts.iter_mut().zip(qs.chunks_exact(4)) {
        *s = -128 * q.iter().map(|&v| v as i32).sum::<i32>();
    }
}

/// Q8_K: per block of 256, the value of largest magnitude maps to −127 (ggml's
/// `quantize_row_q8_K_ref`), `bsums` gets the sum of every 16 integers.
#[inline(always)]
pub(crate) fn quantize_q8k(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
    for (k, (x, q)) in x.chunks_exact(256).zip(qs.chunks_exact_mut(256)).enumerate() {
        let max = x.iter().fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let sums = &mut bsums[16 * k..16 * k + 16];
        if max == 0.0 {
            d[k] = 0.0;
            q.fill(0);
            sums.fill(0);
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in q.iter_mut().zip(x) {
            *q = round_even(iscale * v).min(127.0) as i8;
        }
        for (s, q) in sums.iter_mut().zip(q.chunks_exact(16)) {
            *s = q.iter().map(|&v| v as i16).sum();
        }
        d[k] = 1.0 / iscale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_maps_the_largest_magnitude_to_127_and_zero_blocks_to_zero() {
        let mut x = vec![0.0f32; 64];
        x[3] = -2.0;
        x[4] = 1.0;
        x[5] = 1.0 / 127.0 * 2.0 * 0.5; // exactly half a step: ties to even → 0
        let (mut q, mut d, mut s) = (vec![0i8; 64], vec![0.0; 2], vec![0.0; 2]);
        quantize_q8(&x, &mut q, &mut d, Some(&mut s));
        assert_eq!((q[3], q[4], q[5]), (-127, 64, 0));
        assert_eq!(d, vec![2.0 / 127.0, 0.0]);
        assert!((s[0] - d[0] * (-127.0 + 64.0)).abs() < 1e-7);
        assert!(q[32..].iter().all(|&v| v == 0));
    }

    #[test]
    fn rounding_is_to_nearest_even_as_the_library_rounds() {
        for i in -1_000_000..1_000_000 {
            let x = i as f32 * 0.000_25;
            assert_eq!(round_even(x), x.round_ties_even(), "{x}");
        }
        assert_eq!((round_even(0.5), round_even(1.5), round_even(-2.5)), (0.0, 2.0, -2.0));
    }

    #[test]
    fn q8k_keeps_the_sign_of_the_largest_value_and_sums_every_16() {
        let x: Vec<f32> = (0..256).map(|i| i as f32 / 255.0).collect();
        let (mut q, mut d, mut b) = (vec![0i8; 256], vec![0.0; 1], vec![0i16; 16]);
        quantize_q8k(&x, &mut q, &mut d, &mut b);
        assert_eq!(q[255], -127); // the largest value is positive: iscale is negative
        assert!(d[0] < 0.0 && (q[255] as f32 * d[0] - 1.0).abs() < 1e-6);
        assert_eq!(b[15], q[240..].iter().map(|&v| v as i16).sum::<i16>());
        let zero = vec![0.0f32; 256];
        quantize_q8k(&zero, &mut q, &mut d, &mut b);
        assert_eq!((d[0], q[0], b[0]), (0.0, 0, 0));
    }
}
