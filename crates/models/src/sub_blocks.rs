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

    /// The checkpoint name (module path) and shape of every tensor of the stacked
    /// sub-blocks ([`SubBlocks`], with biases and LayerNorms), group axis first.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (n, s, a, f) = (self.divisions, self.slice, self.attention, self.inner);
        let mut out = Vec::new();
        for norm in ["attention_norm", "feed_forward_norm"] {
            out.push((format!("{norm}.gamma"), vec![n, s]));
            out.push((format!("{norm}.beta"), vec![n, s]));
        }
        for (linear, inputs, outputs) in [
            ("query", s, a),
            ("key", s, a),
            ("value", s, a),
            ("output", a, s),
            ("feed_forward_in", s, f),
            ("feed_forward_out", f, s),
        ] {
            out.push((format!("{linear}.weight"), vec![n, inputs, outputs]));
            out.push((format!("{linear}.bias"), vec![n, outputs]));
        }
        out
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
        let (n, inner) = (shape.divisions, shape.inner);
        let norm = |(gamma, beta): (Tensor<B, 1>, Tensor<B, 1>)| {
            GroupedNorm::from_tensors(slices_of(gamma, n), slices_of(beta, n), w.epsilon)
        };
        let (w_in, b_in) = w.feed_forward_in;
        let (w_out, b_out) = w.feed_forward_out;
        let units_in = unit_inputs(w_in, Some(b_in), n, inner);
        SubBlocks {
            attention_norm: norm(w.attention_norm),
            query: slice_inputs(w.query.0, Some(w.query.1), n, split_heads),
            key: slice_inputs(w.key.0, Some(w.key.1), n, split_heads),
            value: slice_inputs(w.value.0, Some(w.value.1), n, split_heads),
            output: slice_outputs(w.output.0, Some(w.output.1), n, split_heads),
            feed_forward_norm: norm(w.feed_forward_norm),
            feed_forward_in: units_in,
            feed_forward_out: unit_outputs(w_out, Some(b_out), n, inner),
            gelu: Gelu::new(),
            heads: shape.heads,
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

/// A vector of the full width cut into its `n` slices: `[n, width / n]`.
pub(crate) fn slices_of<B: Backend>(v: Tensor<B, 1>, n: usize) -> Tensor<B, 2> {
    let [width] = v.dims();
    v.reshape([n, width / n])
}

/// A projection that reads the hidden state (`[H, out]`, burn's layout) cut for
/// `n` sub-blocks: group `i` takes the rows of slice `i` and either every column
/// (`split == false`: all heads) or the `i`-th block of columns (its heads; query
/// heads are grouped by their key/value head, so a key/value head's query heads
/// are one block).
pub(crate) fn slice_inputs<B: Backend>(
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    n: usize,
    split: bool,
) -> GroupedLinear<B> {
    let [rows, cols] = weight.dims();
    if split {
        GroupedLinear::from_tensors(diagonal_blocks(weight, n), bias.map(|b| b.reshape([n, cols / n])))
    } else {
        GroupedLinear::from_tensors(
            weight.reshape([n, rows / n, cols]),
            bias.map(|b| b.reshape([1, cols]).repeat_dim(0, n)),
        )
    }
}

/// A projection that writes the hidden state (`[in, H]`) cut for `n` sub-blocks:
/// group `i` takes the columns of slice `i` and either every row (all heads) or
/// the `i`-th block of rows (its heads).
pub(crate) fn slice_outputs<B: Backend>(
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    n: usize,
    split: bool,
) -> GroupedLinear<B> {
    let [rows, cols] = weight.dims();
    let weight = if split {
        diagonal_blocks(weight, n)
    } else {
        weight.reshape([rows, n, cols / n]).swap_dims(0, 1)
    };
    GroupedLinear::from_tensors(weight, bias.map(|b| slices_of(b, n)))
}

/// A feed-forward's input matrix (`[H, F]`) cut for `n` sub-blocks of `inner`
/// units: group `i` takes the rows of slice `i` and the first `inner` units. Units
/// beyond the original's `F` start random (as burn's `Linear` would).
pub(crate) fn unit_inputs<B: Backend>(
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    n: usize,
    inner: usize,
) -> GroupedLinear<B> {
    let [rows, units] = weight.dims();
    let (s, kept, device) = (rows / n, units.min(inner), weight.device());
    let mut w = weight.slice([0..rows, 0..kept]).reshape([n, s, kept]);
    let mut b = bias.map(|b| b.slice([0..kept]).reshape([1, kept]).repeat_dim(0, n));
    if inner > kept {
        let extra = inner - kept;
        let bound = 1.0 / (s as f64).sqrt();
        let fresh = Tensor::random([n, s, extra], Distribution::Uniform(-bound, bound), &device);
        w = Tensor::cat(vec![w, fresh], 2);
        b = b.map(|b| Tensor::cat(vec![b, Tensor::zeros([n, extra], &device)], 1));
    }
    GroupedLinear::from_tensors(w, b)
}

/// A feed-forward's output matrix (`[F, H]`) cut for `n` sub-blocks of `inner`
/// units: group `i` takes the first `inner` units' rows and the columns of slice
/// `i`. Units beyond the original's `F` get zero rows, so they change nothing
/// until trained.
pub(crate) fn unit_outputs<B: Backend>(
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    n: usize,
    inner: usize,
) -> GroupedLinear<B> {
    let [units, cols] = weight.dims();
    let (s, kept, device) = (cols / n, units.min(inner), weight.device());
    let mut w = weight.slice([0..kept]).reshape([kept, n, s]).swap_dims(0, 1);
    if inner > kept {
        w = Tensor::cat(vec![w, Tensor::zeros([n, inner - kept, s], &device)], 1);
    }
    GroupedLinear::from_tensors(w, bias.map(|b| slices_of(b, n)))
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
