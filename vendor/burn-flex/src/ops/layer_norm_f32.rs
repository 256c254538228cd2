//! Hetero: layer normalisation's gradients for f32, in one sweep over the rows.
//! burn builds them from a dozen tensor operations (each a pass over the
//! activations); here each row is read once for its statistics and once more for
//! its gradient, `dγ` and `dβ` gathered per block of rows. Blocks are a fixed
//! number of rows and their partial sums are added in order, so the result does
//! not depend on the number of threads. Checked against burn-backend's
//! `layer_norm_backward_fallback` in `crates/models/tests/cpu_kernels.rs`.

use alloc::vec;
use alloc::vec::Vec;
use core::mem::MaybeUninit;

use burn_backend::DType;
use burn_std::Bytes;

use super::elementwise_f32::{dot, multiversioned};
use crate::{FlexTensor, Layout};

/// Rows per block: each block is one task and has its own `dγ`, `dβ` sums.
const ROWS: usize = 64;

/// The input's, γ's and β's gradients for output gradient `grad`, or `None` when
/// the tensors are not all f32 of matching shapes (the caller then falls back).
pub fn layer_norm_backward(
    tensor: &FlexTensor,
    gamma: &FlexTensor,
    epsilon: f64,
    grad: &FlexTensor,
) -> Option<(FlexTensor, FlexTensor, FlexTensor)> {
    let shape = tensor.layout().shape().clone();
    let d = *shape.last()?;
    let all_f32 = [tensor, gamma, grad].iter().all(|t| t.dtype() == DType::F32);
    if !all_f32 || d == 0 || grad.layout().shape() != &shape || gamma.layout().shape().to_vec() != [d] {
        return None;
    }
    let (x, gamma, grad) = (tensor.to_contiguous(), gamma.to_contiguous(), grad.to_contiguous());
    let (xs, gs, gamma_s): (&[f32], &[f32], &[f32]) = (x.storage(), grad.storage(), gamma.storage());
    let n = shape.num_elements();
    let (xs, gs) = (&xs[..n], &gs[..n]);
    let epsilon = epsilon as f32;

    let mut dx: Vec<f32> = Vec::with_capacity(n);
    let block = ROWS * d;
    let run = |((dx, x), g): ((&mut [MaybeUninit<f32>], &[f32]), &[f32])| {
        let mut sums = vec![0f32; 2 * d];
        rows_backward(x, g, gamma_s, epsilon, dx, &mut sums);
        sums
    };
    let out = &mut dx.spare_capacity_mut()[..n];
    #[cfg(feature = "rayon")]
    let partials: Vec<Vec<f32>> = {
        use rayon::prelude::*;
        out.par_chunks_mut(block).zip(xs.par_chunks(block)).zip(gs.par_chunks(block)).map(run).collect()
    };
    #[cfg(not(feature = "rayon"))]
    let partials: Vec<Vec<f32>> = out.chunks_mut(block).zip(xs.chunks(block)).zip(gs.chunks(block)).map(run).collect();
    // SAFETY: the blocks cover all `n` values and `rows_backward` wrote each one.
    unsafe { dx.set_len(n) };

    let mut totals = vec![0f64; 2 * d];
    for part in &partials {
        for (t, &p) in totals.iter_mut().zip(part) {
            *t += p as f64;
        }
    }
    let (dgamma, dbeta): (Vec<f32>, Vec<f32>) = (
        totals[..d].iter().map(|&v| v as f32).collect(),
        totals[d..].iter().map(|&v| v as f32).collect(),
    );
    let vector = |values: Vec<f32>| FlexTensor::new(Bytes::from_elems(values), Layout::contiguous(gamma.layout().shape().clone()), DType::F32);
    Some((
        FlexTensor::new(Bytes::from_elems(dx), Layout::contiguous(shape), DType::F32),
        vector(dgamma),
        vector(dbeta),
    ))
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
