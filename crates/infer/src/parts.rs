//! Building blocks shared by the models: balanced splits of heads and columns, a
//! linear layer that holds only its worker's slice of a weight, and the norms.
//!
//! Tensor parallelism (Megatron style) needs two kinds of slices of a weight stored
//! `[out, in]`: a *column* split keeps some output rows (Q, K, V, the first FFN
//! matrix: each worker computes some heads or some FFN units), a *row* split keeps
//! some input columns (the attention output and the second FFN matrix: each worker
//! computes a partial sum, and an all-reduce adds them). A worker that runs a layer
//! alone simply holds the whole range.

use std::ops::Range;

use burn::prelude::*;

/// The `index`-th of `of` balanced parts of `0..total`: the first parts are one
/// shorter when `total` does not divide (3 heads over 2 workers: `0..1`, `1..3`).
pub fn span(total: usize, index: usize, of: usize) -> Range<usize> {
    total * index / of..total * (index + 1) / of
}

/// A dense layer `y = x·W + b` whose `W` is `[in, out]` (burn's layout).
///
/// Both are stored with the leading unit dimensions the 3-d matmul broadcasts over:
/// reshaping a shared weight at every call would copy it each time. A worker whose
/// part of a split is empty (more workers than heads) holds no weight at all, and
/// its callers skip the layer.
#[derive(Debug, Clone)]
pub struct Dense<B: Backend> {
    /// `[1, in, out]`; `None` for an empty part.
    weight: Option<Tensor<B, 3>>,
    /// `[1, 1, out]`.
    bias: Option<Tensor<B, 3>>,
}

impl<B: Backend> Dense<B> {
    /// Output rows `keep` of a PyTorch-layout `[out, in]` weight (a column split),
    /// with the same slice of the bias.
    pub fn columns(
        w: &[f32],
        b: Option<&[f32]>,
        out: usize,
        inp: usize,
        keep: Range<usize>,
        device: &B::Device,
    ) -> Self {
        let rows = keep.len();
        debug_assert!(keep.end <= out);
        if rows == 0 {
            return Dense {
                weight: None,
                bias: None,
            };
        }
        Dense {
            weight: Some(transposed(&w[keep.start * inp..keep.end * inp], rows, inp, device).unsqueeze()),
            bias: b.map(|b| Tensor::from_data(TensorData::new(b[keep].to_vec(), [1, 1, rows]), device)),
        }
    }

    /// Input columns `keep` of a PyTorch-layout `[out, in]` weight (a row split).
    /// The bias is left out: it is added once, after the partial sums are reduced.
    pub fn rows(w: &[f32], out: usize, inp: usize, keep: Range<usize>, device: &B::Device) -> Self {
        let cols = keep.len();
        if cols == 0 {
            return Dense {
                weight: None,
                bias: None,
            };
        }
        let mut slice = Vec::with_capacity(out * cols);
        for r in 0..out {
            slice.extend_from_slice(&w[r * inp + keep.start..r * inp + keep.end]);
        }
        Dense {
            weight: Some(transposed(&slice, out, cols, device).unsqueeze()),
            bias: None,
        }
    }

    /// `x·W (+ b)` over the last dimension.
    ///
    /// # Panics
    /// On an empty part (check [`Dense::out_width`] first).
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let y = x.matmul(self.weight.clone().expect("an empty part is never run"));
        match &self.bias {
            Some(b) => y + b.clone(),
            None => y,
        }
    }

    /// Output width.
    pub fn out_width(&self) -> usize {
        self.weight.as_ref().map_or(0, |w| w.dims()[2])
    }
}

/// `[cols, rows]` from a row-major `[rows, cols]` matrix, laid out contiguously (a
/// transposed *view* would make every matmul copy the weight first).
pub fn transposed<B: Backend>(m: &[f32], rows: usize, cols: usize, device: &B::Device) -> Tensor<B, 2> {
    let mut t = vec![0f32; rows * cols];
    for r in 0..rows {
        for (c, v) in m[r * cols..(r + 1) * cols].iter().enumerate() {
            t[c * rows + r] = *v;
        }
    }
    Tensor::from_data(TensorData::new(t, [cols, rows]), device)
}

/// A vector parameter (a bias or a norm's scale) as a tensor.
pub fn vector<B: Backend>(v: &[f32], device: &B::Device) -> Tensor<B, 1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), device)
}

/// LayerNorm over the last dimension: `(x − mean) / sqrt(var + eps) · γ + β`.
pub fn layer_norm<B: Backend>(x: Tensor<B, 3>, gamma: &Tensor<B, 1>, beta: &Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    let (var, mean) = x.clone().var_mean_bias(2);
    (x - mean) / (var + eps).sqrt() * gamma.clone().unsqueeze() + beta.clone().unsqueeze()
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) · γ`.
pub fn rms_norm<B: Backend>(x: Tensor<B, 3>, gamma: &Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    let ms = x.clone().powi_scalar(2).mean_dim(2);
    x / (ms + eps).sqrt() * gamma.clone().unsqueeze()
}

/// Splits `[batch, seq, heads·head_dim]` into `[batch, heads, seq, head_dim]`.
pub fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize, head_dim: usize) -> Tensor<B, 4> {
    let [b, s, _] = x.dims();
    x.reshape([b, s, heads, head_dim]).swap_dims(1, 2)
}

/// Joins `[batch, heads, seq, head_dim]` back into `[batch, seq, heads·head_dim]`.
pub fn join_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, h, s, d] = x.dims();
    x.swap_dims(1, 2).reshape([b, s, h * d])
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;

    use super::*;

    #[test]
    fn spans_cover_everything_once_even_when_uneven() {
        for (total, of) in [(12, 5), (3, 2), (1536, 3), (2, 3)] {
            let parts: Vec<_> = (0..of).map(|i| span(total, i, of)).collect();
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts[of - 1].end, total);
            assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
        }
        assert_eq!(span(3, 0, 2), 0..1);
    }

    #[test]
    fn column_and_row_parts_sum_to_the_whole() {
        let device = Default::default();
        let (out, inp) = (5, 4);
        let w: Vec<f32> = (0..out * inp).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..out).map(|i| i as f32).collect();
        let x = Tensor::<Flex, 3>::from_data(
            TensorData::new((0..8).map(|i| i as f32 * 0.1).collect(), [1, 2, inp]),
            &device,
        );
        let whole = Dense::<Flex>::columns(&w, Some(&b), out, inp, 0..out, &device).forward(x.clone());
        // Columns: the parts side by side are the whole.
        let left = Dense::<Flex>::columns(&w, Some(&b), out, inp, 0..2, &device).forward(x.clone());
        let right = Dense::<Flex>::columns(&w, Some(&b), out, inp, 2..5, &device).forward(x.clone());
        let joined = Tensor::cat(vec![left, right], 2);
        assert!(whole.clone().sub(joined).abs().max().into_scalar() < 1e-6);
        // Rows: the partial sums add up to the whole (without bias).
        let a = Dense::<Flex>::rows(&w, out, inp, 0..1, &device).forward(x.clone().slice([0..1, 0..2, 0..1]));
        let c = Dense::<Flex>::rows(&w, out, inp, 1..4, &device).forward(x.slice([0..1, 0..2, 1..4]));
        let sum = a + c + vector::<Flex>(&b, &device).unsqueeze();
        assert!(whole.sub(sum).abs().max().into_scalar() < 1e-5);
    }
}
