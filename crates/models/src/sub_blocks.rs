//! A decoupled layer: N_d independent transformer sub-blocks, one per slice of the
//! hidden state ([`crate::decouple`]), shared by every decoupled model (the
//! built-in language model, BERT).
//!
//! Sub-block `i` on its slice `x_i` (width `s = H / N_d`) is the original layer
//! made narrow: attention maps the slice to the sub-block's heads and back to `s`,
//! the feed-forward is `s → I′ → s` with GELU, and the norms work on the slice.
//! The norms sit before each part (`pre-norm`, the language model) or after each
//! residual sum (`post-norm`, BERT). The N_d sub-blocks' parameters are stacked
//! along a first group axis ([`crate::grouped`]): sub-block `i` is group `i` of
//! every parameter, and nothing ever mixes groups.
//!
//! [`SubBlocks::sliced`] cuts one out of an original layer's weights: sub-block
//! `i` takes the rows and columns that belong to slice `i` (and, for
//! `split-heads`, to its heads).

use burn::nn::Gelu;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::grouped::{GroupedLinear, GroupedNorm};

/// The shape of a decoupled layer's sub-blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubBlockShape {
    /// N_d: sub-blocks.
    pub divisions: usize,
    /// Width of a slice.
    pub slice: usize,
    /// A sub-block's attention heads.
    pub heads: usize,
    /// Width of a sub-block's attention (its heads × head width).
    pub attention: usize,
    /// Feed-forward inner width I′.
    pub inner: usize,
}

impl SubBlockShape {
    /// Parameters of all N_d sub-blocks.
    pub fn params(&self) -> usize {
        self.divisions * (self.fixed_params() + self.inner * (2 * self.slice + 1))
    }

    /// Parameters of one sub-block that do not depend on I′: two norms, Q/K/V,
    /// the output projection, the feed-forward's output bias.
    pub fn fixed_params(&self) -> usize {
        let (s, a) = (self.slice, self.attention);
        4 * s + 3 * (s * a + a) + a * s + s + s
    }

    /// Multiply-adds of one sub-block for one token attending over `t` keys.
    pub fn macs(&self, t: usize) -> usize {
        let (s, a) = (self.slice, self.attention);
        4 * s * a + 2 * s * self.inner + 2 * t * a
    }
}

/// Where a sub-block's norms sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormPlacement {
    /// `x + f(norm(x))` (the language model).
    Pre,
    /// `norm(x + f(x))` (BERT).
    Post,
}

/// What attention may see.
#[derive(Debug, Clone)]
pub enum Masking<B: Backend> {
    /// Every query sees the keys up to its own position.
    Causal,
    /// `[batch, 1, 1, time]`, true where a key is padding.
    Padding(Tensor<B, 4, Bool>),
}

/// N_d pre- or post-norm sub-blocks, their parameters stacked along a first
/// group axis (group `i` is sub-block `i`).
#[derive(Module, Debug)]
pub struct SubBlocks<B: Backend> {
    attention_norm: GroupedNorm<B>,
    query: GroupedLinear<B>,
    key: GroupedLinear<B>,
    value: GroupedLinear<B>,
    output: GroupedLinear<B>,
    feed_forward_norm: GroupedNorm<B>,
    feed_forward_in: GroupedLinear<B>,
    feed_forward_out: GroupedLinear<B>,
    gelu: Gelu,
    /// A sub-block's attention heads.
    heads: usize,
    /// Whether the norms come first (pre-norm) or after the sums (post-norm).
    pre_norm: bool,
}

/// An original layer's tensors in burn's layout (`[in, out]` weights), the raw
/// material of [`SubBlocks::sliced`].
#[derive(Debug, Clone)]
pub struct LayerWeights<B: Backend> {
    /// Norm before attention (pre-norm) or after its sum (post-norm): scale, shift.
    pub attention_norm: (Tensor<B, 1>, Tensor<B, 1>),
    /// Q, K, V: weight `[H, H]`, bias `[H]`.
    pub query: (Tensor<B, 2>, Tensor<B, 1>),
    /// As the query.
    pub key: (Tensor<B, 2>, Tensor<B, 1>),
    /// As the query.
    pub value: (Tensor<B, 2>, Tensor<B, 1>),
    /// Attention output: weight `[H, H]`, bias `[H]`.
    pub output: (Tensor<B, 2>, Tensor<B, 1>),
    /// The feed-forward's norm: scale, shift.
    pub feed_forward_norm: (Tensor<B, 1>, Tensor<B, 1>),
    /// First feed-forward matrix: `[H, F]`, bias `[F]`.
    pub feed_forward_in: (Tensor<B, 2>, Tensor<B, 1>),
    /// Second: `[F, H]`, bias `[H]`.
    pub feed_forward_out: (Tensor<B, 2>, Tensor<B, 1>),
    /// The norms' epsilon.
    pub epsilon: f64,
}

impl<B: Backend> SubBlocks<B> {
    /// Freshly initialised sub-blocks of `shape`.
    pub fn new(shape: SubBlockShape, norms: NormPlacement, epsilon: f64, device: &B::Device) -> Self {
        let SubBlockShape {
            divisions: n,
            slice: s,
            heads,
            attention: a,
            inner,
        } = shape;
        let mut attention_norm = GroupedNorm::new(n, s, device);
        let mut feed_forward_norm = GroupedNorm::new(n, s, device);
        attention_norm.set_epsilon(epsilon);
        feed_forward_norm.set_epsilon(epsilon);
        SubBlocks {
            attention_norm,
            query: GroupedLinear::new(n, s, a, device),
            key: GroupedLinear::new(n, s, a, device),
            value: GroupedLinear::new(n, s, a, device),
            output: GroupedLinear::new(n, a, s, device),
            feed_forward_norm,
            feed_forward_in: GroupedLinear::new(n, s, inner, device),
            feed_forward_out: GroupedLinear::new(n, inner, s, device),
            gelu: Gelu::new(),
            heads,
            pre_norm: norms == NormPlacement::Pre,
        }
    }

    /// Sub-blocks of `shape` cut out of an original layer: Q/K/V rows of the
    /// slice (and, when `split_heads`, only the columns of the sub-block's heads),
    /// output-projection columns of the slice (rows of its heads), norm
    /// parameters of the slice, the first I′ feed-forward units. Units beyond the
    /// original's start with random inputs and zero outputs, so they change
    /// nothing until trained.
    pub fn sliced(w: LayerWeights<B>, shape: SubBlockShape, split_heads: bool, norms: NormPlacement) -> Self {
        let SubBlockShape {
            divisions: n,
            slice: s,
            heads,
            attention: a,
            inner,
        } = shape;
        let norm = |(gamma, beta): (Tensor<B, 1>, Tensor<B, 1>)| {
            GroupedNorm::from_tensors(gamma.reshape([n, s]), beta.reshape([n, s]), w.epsilon)
        };
        let projection = |(weight, bias): (Tensor<B, 2>, Tensor<B, 1>)| {
            if split_heads {
                GroupedLinear::from_tensors(diagonal_blocks(weight, n), bias.reshape([n, a]))
            } else {
                GroupedLinear::from_tensors(weight.reshape([n, s, a]), bias.reshape([1, a]).repeat_dim(0, n))
            }
        };
        let output = {
            let (weight, bias) = w.output;
            let weight = if split_heads {
                diagonal_blocks(weight, n)
            } else {
                let [rows, _] = weight.dims();
                weight.reshape([rows, n, s]).swap_dims(0, 1)
            };
            GroupedLinear::from_tensors(weight, bias.reshape([n, s]))
        };
        let ((w_in, b_in), (w_out, b_out)) = (w.feed_forward_in, w.feed_forward_out);
        let [_, units] = w_in.dims();
        let device = w_in.device();
        let kept = units.min(inner);
        let mut w_in = w_in.slice([0..s * n, 0..kept]).reshape([n, s, kept]);
        let mut b_in = b_in.slice([0..kept]).reshape([1, kept]).repeat_dim(0, n);
        let mut w_out = w_out.slice([0..kept]).reshape([kept, n, s]).swap_dims(0, 1);
        if inner > kept {
            let extra = inner - kept;
            let bound = 1.0 / (s as f64).sqrt();
            w_in = Tensor::cat(
                vec![
                    w_in,
                    Tensor::random([n, s, extra], Distribution::Uniform(-bound, bound), &device),
                ],
                2,
            );
            b_in = Tensor::cat(vec![b_in, Tensor::zeros([n, extra], &device)], 1);
            w_out = Tensor::cat(vec![w_out, Tensor::zeros([n, extra, s], &device)], 1);
        }
        SubBlocks {
            attention_norm: norm(w.attention_norm),
            query: projection(w.query),
            key: projection(w.key),
            value: projection(w.value),
            output,
            feed_forward_norm: norm(w.feed_forward_norm),
            feed_forward_in: GroupedLinear::from_tensors(w_in, b_in),
            feed_forward_out: GroupedLinear::from_tensors(w_out, b_out.reshape([n, s])),
            gelu: Gelu::new(),
            heads,
            pre_norm: norms == NormPlacement::Pre,
        }
    }

    /// # Shapes
    /// - x: `[divisions, batch, time, slice]`
    /// - returns: the same; sub-block `i`'s output depends on slice `i` only
    pub fn forward(&self, x: Tensor<B, 4>, masking: &Masking<B>) -> Tensor<B, 4> {
        if self.pre_norm {
            let x = x.clone() + self.attend(self.attention_norm.forward(x), masking);
            x.clone() + self.feed_forward(self.feed_forward_norm.forward(x))
        } else {
            let x = self.attention_norm.forward(x.clone() + self.attend(x, masking));
            self.feed_forward_norm.forward(x.clone() + self.feed_forward(x))
        }
    }

    fn feed_forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.feed_forward_out
            .forward(self.gelu.forward(self.feed_forward_in.forward(x)))
    }

    /// Each sub-block's attention over its own heads.
    fn attend(&self, x: Tensor<B, 4>, masking: &Masking<B>) -> Tensor<B, 4> {
        let [groups, batch, time, _] = x.dims();
        let [_, _, width] = self.query.weight.dims();
        let head_width = width / self.heads;
        // Groups and batch become one batch axis of the fused attention, group-major.
        let per_head = |linear: &GroupedLinear<B>| {
            linear
                .forward(x.clone())
                .reshape([groups * batch, time, self.heads, head_width])
                .swap_dims(1, 2)
        };
        let (mask, is_causal) = match masking {
            Masking::Causal => (None, true),
            Masking::Padding(mask) => (Some(mask.clone().repeat_dim(0, groups)), false),
        };
        let options = AttentionModuleOptions {
            is_causal,
            ..Default::default()
        };
        let context = attention(
            per_head(&self.query),
            per_head(&self.key),
            per_head(&self.value),
            mask,
            None,
            options,
        );
        self.output
            .forward(context.swap_dims(1, 2).reshape([groups, batch, time, width]))
    }
}

/// The `n` blocks on the diagonal of `[rows, cols]`: `[n, rows / n, cols / n]`.
fn diagonal_blocks<B: Backend>(w: Tensor<B, 2>, n: usize) -> Tensor<B, 3> {
    let [rows, cols] = w.dims();
    let (r, c) = (rows / n, cols / n);
    let blocks = (0..n)
        .map(|g| {
            w.clone()
                .slice([g * r..(g + 1) * r, g * c..(g + 1) * c])
                .reshape([1, r, c])
        })
        .collect();
    Tensor::cat(blocks, 0)
}

/// The hidden state `[batch, time, width]` cut into `divisions` contiguous slices:
/// `[divisions, batch, time, width / divisions]`.
pub fn to_slices<B: Backend>(x: Tensor<B, 3>, divisions: usize) -> Tensor<B, 4> {
    let [batch, time, width] = x.dims();
    x.reshape([batch, time, divisions, width / divisions])
        .permute([2, 0, 1, 3])
}

/// The slices joined back into `[batch, time, width]`.
pub fn from_slices<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [divisions, batch, time, slice] = x.dims();
    x.permute([1, 2, 0, 3]).reshape([batch, time, divisions * slice])
}
