//! Layer normalisation's gradients for f32, in one sweep over the rows. burn
//! builds them from a dozen tensor operations (each a pass over the activations);
//! here each row is read once for its statistics and once more for its gradient,
//! `dγ` and `dβ` gathered per block of rows. Blocks are a fixed number of rows and
//! their partial sums are added in order, so the result does not depend on the
//! number of threads.
//!
//! `unsafe` is allowed here for one reason: the input gradient is written into a
//! vector's spare capacity, its length set once every block wrote its rows.
#![allow(unsafe_code)]

use std::mem::MaybeUninit;

use super::multiversion::dot;

/// Rows per block: each block is one task and has its own `dγ`, `dβ` sums.
const ROWS: usize = 64;

/// The gradients of `layer_norm(x) = γ · (x − mean) / √(var + ε) + β` over rows of
/// `gamma.len()` values, for the output gradient `grad`: `(dx, dγ, dβ)`.
///
/// # Panics
/// When `x` and `grad` differ in length or are not whole rows.
pub fn backward(x: &[f32], gamma: &[f32], epsilon: f32, grad: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (n, d) = (x.len(), gamma.len());
    assert!(
        d > 0 && n % d == 0 && grad.len() == n,
        "layer norm: {n} values, rows of {d}, {} gradients",
        grad.len()
    );
    let mut dx: Vec<f32> = Vec::with_capacity(n);
    let block = ROWS * d;
    let out = &mut dx.spare_capacity_mut()[..n];
    let partials: Vec<Vec<f32>> = {
        use rayon::prelude::*;
        out.par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .zip(grad.par_chunks(block))
            .map(|((dx, x), g)| {
                let mut sums = vec![0f32; 2 * d];
                rows_backward(x, g, gamma, epsilon, dx, &mut sums);
                sums
            })
            .collect()
    };
    // SAFETY: the blocks cover all `n` values and `rows_backward` wrote each one.
    unsafe { dx.set_len(n) };
    let mut totals = vec![0f64; 2 * d];
    for part in &partials {
        for (t, &p) in totals.iter_mut().zip(part) {
            *t += p as f64;
        }
    }
    let dgamma = totals[..d].iter().map(|&v| v as f32).collect();
    let dbeta = totals[d..].iter().map(|&v| v as f32).collect();
    (dx, dgamma, dbeta)
}

multiversioned! {
    /// One block of rows (`x`, `g` and `dx` are `rows × d`, `d = gamma.len()`):
    /// writes `dx` and adds each row's `g · x̂` and `g` to `sums` (`[dγ, dβ]`).
    fn rows_backward(x: &[f32], g: &[f32], gamma: &[f32], epsilon: f32, dx: &mut [MaybeUninit<f32>], sums: &mut [f32]) {
        let d = gamma.len();
        let (dgamma, dbeta) = sums.split_at_mut(d);
        let ones = vec![1f32; d];
        // Per row: x − mean, then ĝ = g·γ.
        let (mut centered, mut ghat) = (vec![0f32; d], vec![0f32; d]);
        for ((x, g), dx) in x.chunks_exact(d).zip(g.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let mean = dot::<FMA>(x, &ones) / d as f32;
            for (c, &v) in centered.iter_mut().zip(x) {
                *c = v - mean;
            }
            let rstd = 1.0 / (dot::<FMA>(&centered, &centered) / d as f32 + epsilon).sqrt();
            for ((h, &gv), &w) in ghat.iter_mut().zip(g).zip(gamma) {
                *h = gv * w;
            }
            // The means of ĝ and of ĝ·x̂ (x̂ = (x − mean)·rstd).
            let mean_g = dot::<FMA>(&ghat, &ones) / d as f32;
            let mean_gx = dot::<FMA>(&ghat, &centered) * rstd / d as f32;
            for i in 0..d {
                let xhat = centered[i] * rstd;
                dx[i].write(rstd * (ghat[i] - mean_g - xhat * mean_gx));
                dgamma[i] += g[i] * xhat;
                dbeta[i] += g[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gradients from the definition, in f64, one row at a time.
    fn reference(x: &[f32], gamma: &[f32], eps: f64, grad: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let d = gamma.len();
        let (mut dx, mut dg, mut db) = (vec![], vec![0.0; d], vec![0.0; d]);
        for (x, g) in x.chunks(d).zip(grad.chunks(d)) {
            let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let mean = x.iter().sum::<f64>() / d as f64;
            let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            let xhat: Vec<f64> = x.iter().map(|v| (v - mean) * rstd).collect();
            let ghat: Vec<f64> = g.iter().zip(gamma).map(|(&g, &w)| g as f64 * w as f64).collect();
            let mean_g = ghat.iter().sum::<f64>() / d as f64;
            let mean_gx = ghat.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / d as f64;
            for i in 0..d {
                dx.push(rstd * (ghat[i] - mean_g - xhat[i] * mean_gx));
                dg[i] += g[i] as f64 * xhat[i];
                db[i] += g[i] as f64;
            }
        }
        (dx, dg, db)
    }

    #[test]
    fn gradients_match_the_definition_for_any_number_of_blocks() {
        for (rows, d) in [(1, 7), (3, 64), (ROWS * 2 + 5, 33)] {
            let x: Vec<f32> = (0..rows * d).map(|i| ((i * 7919) % 101) as f32 / 17.0 - 3.0).collect();
            let grad: Vec<f32> = (0..rows * d).map(|i| ((i * 104_729) % 37) as f32 / 9.0 - 2.0).collect();
            let gamma: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 / d as f32).collect();
            let (dx, dg, db) = backward(&x, &gamma, 1e-5, &grad);
            let (rx, rg, rb) = reference(&x, &gamma, 1e-5, &grad);
            for (got, want) in dx.iter().zip(&rx).chain(dg.iter().zip(&rg)).chain(db.iter().zip(&rb)) {
                assert!(
                    (*got as f64 - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "{got} vs {want} ({rows}×{d})"
                );
            }
        }
    }
}
