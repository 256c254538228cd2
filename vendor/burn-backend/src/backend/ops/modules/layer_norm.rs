//! Hetero: layer normalisation over the last dimension built from a backend's tensor
//! operations — the forward pass (burn's former default of `ModuleOps::layer_norm`)
//! and its gradients (the default of `ModuleOps::layer_norm_backward`), for backends
//! without a fused kernel.

use alloc::vec::Vec;

use burn_std::Shape;

use crate::{Backend, TensorMetadata, tensor::FloatTensor};

/// `[1, …, 1, d]`: a per-feature vector's shape broadcast against a rank-`rank` input.
fn per_feature(rank: usize, d: usize) -> Shape {
    let dims: Vec<usize> = (0..rank).map(|i| if i == rank - 1 { d } else { 1 }).collect();
    Shape::from(dims)
}

/// `(x − mean) / sqrt(var + ε)` over the last dimension, with that denominator.
fn normalized<B: Backend>(tensor: FloatTensor<B>, epsilon: f64) -> (FloatTensor<B>, FloatTensor<B>) {
    let last = tensor.shape().num_dims() - 1;
    let mean = B::float_mean_dim(tensor.clone(), last);
    let centered = B::float_sub(tensor, mean);
    let var = B::float_mean_dim(B::float_mul(centered.clone(), centered.clone()), last);
    let denom = B::float_sqrt(B::float_add_scalar(var, epsilon.into()));
    (B::float_div(centered, denom.clone()), denom)
}

/// `(x − mean) / sqrt(var + ε) · γ + β` over the last dimension (biased variance).
pub fn layer_norm_fallback<B: Backend>(
    tensor: FloatTensor<B>,
    gamma: FloatTensor<B>,
    beta: Option<FloatTensor<B>>,
    epsilon: f64,
) -> FloatTensor<B> {
    let shape = tensor.shape();
    let (rank, d) = (shape.num_dims(), shape[shape.num_dims() - 1]);
    let (normalized, _) = normalized::<B>(tensor, epsilon);
    let scaled = B::float_mul(normalized, B::float_reshape(gamma, per_feature(rank, d)));
    match beta {
        Some(beta) => B::float_add(scaled, B::float_reshape(beta, per_feature(rank, d))),
        None => scaled,
    }
}

/// The gradients of [`layer_norm_fallback`] for the output gradient `grad`: the
/// input's, γ's and β's. With `x̂` the normalised input and `ĝ = grad · γ`,
/// `dx = (ĝ − mean(ĝ) − x̂ · mean(ĝ · x̂)) / sqrt(var + ε)`, `dγ = Σ grad · x̂` and
/// `dβ = Σ grad`, the sums over every dimension but the last.
pub fn layer_norm_backward_fallback<B: Backend>(
    tensor: FloatTensor<B>,
    gamma: FloatTensor<B>,
    epsilon: f64,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let shape = tensor.shape();
    let (rank, d) = (shape.num_dims(), shape[shape.num_dims() - 1]);
    let last = rank - 1;
    let rows = shape.num_elements() / d.max(1);
    let (xhat, denom) = normalized::<B>(tensor, epsilon);
    let ghat = B::float_mul(grad.clone(), B::float_reshape(gamma, per_feature(rank, d)));
    let mean_g = B::float_mean_dim(ghat.clone(), last);
    let mean_gx = B::float_mean_dim(B::float_mul(ghat.clone(), xhat.clone()), last);
    let dx = B::float_div(B::float_sub(B::float_sub(ghat, mean_g), B::float_mul(xhat.clone(), mean_gx)), denom);
    // Sums over all rows: the tensors seen as [rows, d], summed down the rows.
    let over_rows = |t: FloatTensor<B>| {
        let t = B::float_reshape(t, Shape::from([rows, d]));
        B::float_reshape(B::float_sum_dim(t, 0), Shape::from([d]))
    };
    let dgamma = over_rows(B::float_mul(grad.clone(), xhat));
    let dbeta = over_rows(grad);
    (dx, dgamma, dbeta)
}
