//! The f32 operations between the products of a decoder block: normalisation,
//! rotary positions, the gated activation and attention over a cache. They are a
//! small share of a token's time; they are written as plain loops the compiler
//! vectorises, in the same order of operations as the burn modules they stand in
//! for, so the quantized path differs from the f32 one only by its products.
//!
//! They are `#[inline(always)]` so that `dispatch` can compile them again inside
//! each level's `#[target_feature]` functions (AVX2's eight lanes rather than the
//! baseline's four). Rust never fuses a multiply and an add on its own, and every
//! sum here runs in a fixed order, so each level computes the same bits.

/// `out = x / √(mean(x²) + eps) · γ`, row by row (`x` and `out` are rows of `γ.len()`).
#[inline(always)]
pub fn rms_norm(x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) {
    let n = gamma.len();
    for (x, out) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let mean = x.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let rms = (mean + eps).sqrt();
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(gamma) {
            *o = v / rms * g;
        }
    }
}

/// `out = silu(gate) · up = gate·σ(gate)·up`, elementwise.
#[inline(always)]
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp(-g)) * u;
    }
}

/// e^x in plain arithmetic that vectorises, for the softmax and the gated activation
/// (libm's `expf` is a call per value, and was a third of prefill attention's time).
///
/// Cephes' `expf`: x = n·ln 2 + r with |r| ≤ ln 2 / 2 (n rounded by the 1.5·2²³
/// trick, ln 2 split in two so r is exact), e^r by a degree-7 polynomial, 2ⁿ put into
/// the exponent bits. Within 2 ulp of `f32::exp` (tested); x is clamped to
/// [−87, 88], so e^x stays a normal number (≥ 1.6·10⁻³⁸, ≤ 1.7·10³⁸).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    // t's low mantissa bits hold n (|n| ≤ 127 < 2²²); n + 127 ∈ [1, 254], a normal exponent.
    let n = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    y * f32::from_bits(((n + 127) << 23) as u32)
}

/// Rotates the adjacent pairs `(2i, 2i + 1)` of one head by the angles whose
/// `[cos, sin]` are `cos_sin[2i], cos_sin[2i + 1]`.
#[inline(always)]
pub fn rope(head: &mut [f32], cos_sin: &[f32]) {
    for (pair, cs) in head.chunks_exact_mut(2).zip(cos_sin.chunks_exact(2)) {
        let (a, b) = (pair[0], pair[1]);
        let (cos, sin) = (cs[0], cs[1]);
        pair[0] = a * cos - b * sin;
        pair[1] = b * cos + a * sin;
    }
}

/// One query head attending over `keys.len() / q.len()` cached positions:
/// `out = softmax(q·kᵀ · scale) · V`. `keys` and `values` are rows of `q.len()`,
/// one per position; `scores` is scratch of at least that many.
#[inline(always)]
pub fn attend(q: &[f32], keys: &[f32], values: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32]) {
    attend_many([q], keys, values, scale, scores, [out]);
}

/// [`attend`] for `N` query heads over the same keys and values (grouped-query
/// attention's heads of one position): each key and value is loaded once for the
/// `N`, and the `N` dot products give the processor independent sums to overlap.
/// Each head's arithmetic is [`attend`]'s own, in its order, so the same bits.
/// `scores` is scratch of at least `N` × positions.
#[inline(always)]
pub fn attend_many<const N: usize>(
    qs: [&[f32]; N],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut [f32],
    outs: [&mut [f32]; N],
) {
    let hd = qs[0].len();
    let len = keys.len() / hd;
    let scores = &mut scores[..N * len];
    let mut max = [f32::NEG_INFINITY; N];
    for (p, k) in keys.chunks_exact(hd).enumerate() {
        let d = dots(qs, k);
        for i in 0..N {
            let s = d[i] * scale;
            scores[i * len + p] = s;
            max[i] = max[i].max(s);
        }
    }
    for (i, s) in scores.chunks_exact_mut(len.max(1)).enumerate().take(N) {
        // The exponentials in a loop of their own (it vectorises), then their sum.
        for v in s.iter_mut() {
            *v = exp(*v - max[i]);
        }
        let total = sum(s);
        for v in s.iter_mut() {
            *v /= total;
        }
    }
    // out_i = Σ_p s_ip·V_p, sixteen dimensions at a time, the sums held in registers
    // across the positions (accumulating into `out` itself stored and reloaded it at
    // every position, a wait on the store each time). Each dimension still sums the
    // positions in order.
    let chunks = hd / 16;
    for c in 0..chunks {
        let mut acc = [[0f32; 16]; N];
        for (p, v) in values.chunks_exact(hd).enumerate() {
            let v: &[f32; 16] = v[16 * c..16 * c + 16].try_into().expect("16 values");
            for i in 0..N {
                let w = scores[i * len + p];
                for j in 0..16 {
                    acc[i][j] += w * v[j];
                }
            }
        }
        for i in 0..N {
            outs[i][16 * c..16 * c + 16].copy_from_slice(&acc[i]);
        }
    }
    for j in 16 * chunks..hd {
        for i in 0..N {
            let mut o = 0.0;
            for (p, v) in values.chunks_exact(hd).enumerate() {
                o += scores[i * len + p] * v[j];
            }
            outs[i][j] = o;
        }
    }
}

/// Σ aᵢ in eight running sums (so it vectorises), then their sum.
#[inline(always)]
fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, rest) = a.as_chunks::<8>();
    for a in a8 {
        for j in 0..8 {
            acc[j] += a[j];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// Σ aᵢ·bᵢ in eight running sums (so it vectorises), then their sum — for `N` rows
/// `a` against one `b`, each in that order.
#[inline(always)]
fn dots<const N: usize>(a: [&[f32]; N], b: &[f32]) -> [f32; N] {
    let mut acc = [[0f32; 8]; N];
    let (b8, b_rest) = b.as_chunks::<8>();
    for (c, b) in b8.iter().enumerate() {
        for i in 0..N {
            let a: &[f32; 8] = a[i][8 * c..8 * c + 8].try_into().expect("8 values");
            for j in 0..8 {
                acc[i][j] += a[j] * b[j];
            }
        }
    }
    std::array::from_fn(|i| {
        let tail: f32 = a[i][8 * b8.len()..].iter().zip(b_rest).map(|(a, b)| a * b).sum();
        acc[i].iter().sum::<f32>() + tail
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within 2 ulp of libm's over the range softmax and SiLU use, and clamped,
    /// not infinite or zero, past it.
    #[test]
    fn exp_is_within_two_ulp_of_the_library() {
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (exp(x), x.exp());
            let ulp = f32::from_bits(want.to_bits() + 1) - want;
            assert!((got - want).abs() <= 2.0 * ulp, "e^{x}: {got} against {want}");
            x += 0.001_7;
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn rms_norm_gives_unit_root_mean_square_before_the_scale() {
        let x = [3.0, -4.0, 0.0, 5.0, 1.0, 1.0, 1.0, 1.0];
        let mut out = [0.0; 8];
        rms_norm(&x, &[1.0, 1.0, 1.0, 2.0], 0.0, &mut out);
        let ms = out[..3].iter().map(|v| v * v).sum::<f32>() + (out[3] / 2.0).powi(2);
        assert!((ms / 4.0 - 1.0).abs() < 1e-6);
        assert_eq!(out[4..], [1.0, 1.0, 1.0, 2.0]);
    }

    #[test]
    fn attention_weights_sum_to_one_and_favour_the_matching_key() {
        let q = [1.0, 0.0];
        let keys = [1.0, 0.0, 0.0, 1.0, -1.0, 0.0];
        let values = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        let (mut scores, mut out) = ([0.0; 3], [0.0; 2]);
        attend(&q, &keys, &values, 10.0, &mut scores, &mut out);
        let e = [10f32.exp(), 1.0, (-10f32).exp()];
        let sum: f32 = e.iter().sum();
        assert!((out[0] - e[0] / sum).abs() < 1e-6 && (out[1] - e[1] / sum).abs() < 1e-6);
    }

    #[test]
    fn rope_rotates_pairs_by_their_angle() {
        let mut head = [1.0, 0.0, 0.0, 2.0];
        let a = std::f32::consts::FRAC_PI_2;
        rope(&mut head, &[a.cos(), a.sin(), 1.0, 0.0]);
        assert!((head[0]).abs() < 1e-6 && (head[1] - 1.0).abs() < 1e-6);
        assert_eq!(head[2..], [0.0, 2.0]);
    }
}
