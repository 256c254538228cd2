//! The f32 operations between the products of a decoder block: normalisation,
//! rotary positions, the gated activation and attention over a cache. They are a
//! small share of a token's time; they are written as plain loops the compiler
//! vectorises, in the same order of operations as the burn modules they stand in
//! for, so the quantized path differs from the f32 one only by its products.

/// `out = x / √(mean(x²) + eps) · γ`, row by row (`x` and `out` are rows of `γ.len()`).
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
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// Rotates the adjacent pairs `(2i, 2i + 1)` of one head by the angles whose
/// `[cos, sin]` are `cos_sin[2i], cos_sin[2i + 1]`.
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
pub fn attend(q: &[f32], keys: &[f32], values: &[f32], scale: f32, scores: &mut [f32], out: &mut [f32]) {
    let hd = q.len();
    let len = keys.len() / hd;
    let scores = &mut scores[..len];
    let mut max = f32::NEG_INFINITY;
    for (s, k) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
        *s = dot(q, k) * scale;
        max = max.max(*s);
    }
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    for (&p, v) in scores.iter().zip(values.chunks_exact(hd)) {
        let p = p / sum;
        for (o, &v) in out.iter_mut().zip(v) {
            *o += p * v;
        }
    }
}

/// Σ aᵢ·bᵢ in eight running sums (so it vectorises), then their sum.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, a_rest) = a.as_chunks::<8>();
    let (b8, b_rest) = b.as_chunks::<8>();
    for (a, b) in a8.iter().zip(b8) {
        for j in 0..8 {
            acc[j] += a[j] * b[j];
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(a, b)| a * b).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

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
