//! A small causal transformer language model: token and position embeddings,
//! pre-norm transformer blocks whose self-attention is causal, and a linear head
//! over the vocabulary. It predicts the next token at every position.
//!
//! The blocks are written here rather than taken from burn's `TransformerEncoder`
//! so that attention goes through burn's fused `attention` operation with its causal
//! flag: burn's multi-head attention materialises and masks the
//! `[batch, heads, time, time]` scores itself, a dozen passes over memory forward and
//! backward, where the fused operation (flex's kernel, and its backward pass) keeps
//! each head's scores in cache. The layout matches PyTorch's
//! `nn.TransformerEncoderLayer(norm_first=True, activation="gelu")`.

use burn::nn::{Embedding, EmbeddingConfig, Gelu, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::sub_blocks::LayerWeights;

/// The language model's shape.
#[derive(Config, Debug)]
pub struct TinyLmConfig {
    /// Tokens the model knows.
    pub vocab: usize,
    /// Longest input, in tokens.
    pub context: usize,
    /// Width of the hidden states.
    #[config(default = 64)]
    pub d_model: usize,
    /// Transformer blocks.
    #[config(default = 2)]
    pub layers: usize,
    /// Attention heads per block.
    #[config(default = 4)]
    pub heads: usize,
}

/// A causal transformer language model.
#[derive(Module, Debug)]
pub struct TinyLm<B: Backend> {
    pub(crate) tokens: Embedding<B>,
    pub(crate) positions: Embedding<B>,
    pub(crate) blocks: Vec<Block<B>>,
    pub(crate) head: Linear<B>,
}

/// One pre-norm block: `x + attention(norm(x))`, then `x + feed_forward(norm(x))`.
#[derive(Module, Debug)]
pub(crate) struct Block<B: Backend> {
    pub(crate) attention_norm: LayerNorm<B>,
    pub(crate) query: Linear<B>,
    pub(crate) key: Linear<B>,
    pub(crate) value: Linear<B>,
    pub(crate) output: Linear<B>,
    pub(crate) feed_forward_norm: LayerNorm<B>,
    pub(crate) feed_forward_in: Linear<B>,
    pub(crate) feed_forward_out: Linear<B>,
    pub(crate) gelu: Gelu,
    pub(crate) heads: usize,
}

impl TinyLmConfig {
    /// A freshly initialised model.
    pub fn init<B: Backend>(&self, device: &B::Device) -> TinyLm<B> {
        assert!(
            self.d_model.is_multiple_of(self.heads),
            "d_model {} is not a multiple of heads {}",
            self.d_model,
            self.heads
        );
        let d = self.d_model;
        let linear = |inputs, outputs| LinearConfig::new(inputs, outputs).init(device);
        let block = || Block {
            attention_norm: LayerNormConfig::new(d).init(device),
            query: linear(d, d),
            key: linear(d, d),
            value: linear(d, d),
            output: linear(d, d),
            feed_forward_norm: LayerNormConfig::new(d).init(device),
            feed_forward_in: linear(d, 4 * d),
            feed_forward_out: linear(4 * d, d),
            gelu: Gelu::new(),
            heads: self.heads,
        };
        TinyLm {
            tokens: EmbeddingConfig::new(self.vocab, d).init(device),
            positions: EmbeddingConfig::new(self.context, d).init(device),
            blocks: (0..self.layers).map(|_| block()).collect(),
            head: linear(d, self.vocab),
        }
    }
}

impl<B: Backend> TinyLm<B> {
    /// # Shapes
    /// - tokens: `[batch, time]` (time ≤ the configured context)
    /// - returns: `[batch, time, vocab]` next-token logits
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let x = embed(&self.tokens, &self.positions, tokens);
        let x = self.blocks.iter().fold(x, |x, block| block.forward(x));
        self.head.forward(x)
    }
}

impl<B: Backend> Block<B> {
    /// The block's tensors, for cutting sub-blocks out of it.
    pub(crate) fn weights(&self) -> LayerWeights<B> {
        let linear = |l: &Linear<B>| {
            let bias = l.bias.as_ref().map(|b| b.val());
            let weight = l.weight.val();
            let bias = bias.unwrap_or_else(|| Tensor::zeros([weight.dims()[1]], &weight.device()));
            (weight, bias)
        };
        let norm = |n: &LayerNorm<B>| {
            let gamma = n.gamma.val();
            let beta = n.beta.as_ref().map_or_else(|| gamma.zeros_like(), |b| b.val());
            (gamma, beta)
        };
        LayerWeights {
            attention_norm: norm(&self.attention_norm),
            query: linear(&self.query),
            key: linear(&self.key),
            value: linear(&self.value),
            output: linear(&self.output),
            feed_forward_norm: norm(&self.feed_forward_norm),
            feed_forward_in: linear(&self.feed_forward_in),
            feed_forward_out: linear(&self.feed_forward_out),
            epsilon: 1e-5,
        }
    }
}

/// Token plus position embeddings: `[batch, time]` ids to `[batch, time, d_model]`.
pub(crate) fn embed<B: Backend>(
    tokens: &Embedding<B>,
    positions: &Embedding<B>,
    ids: Tensor<B, 2, Int>,
) -> Tensor<B, 3> {
    let [batch, time] = ids.dims();
    let at = Tensor::<B, 1, Int>::arange(0..time as i64, &ids.device())
        .reshape([1, time])
        .repeat_dim(0, batch);
    tokens.forward(ids) + positions.forward(at)
}

/// Causal attention through burn's fused operation: `[batch, heads, time, head
/// width]` queries, keys and values to the context of the same shape.
pub(crate) fn causal_attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
    let options = AttentionModuleOptions {
        is_causal: true,
        ..Default::default()
    };
    attention(q, k, v, None, None, options)
}

impl<B: Backend> Block<B> {
    /// `[batch, time, d_model]` in and out.
    pub(crate) fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = x.clone() + self.attend(self.attention_norm.forward(x));
        let hidden = self
            .gelu
            .forward(self.feed_forward_in.forward(self.feed_forward_norm.forward(x.clone())));
        x + self.feed_forward_out.forward(hidden)
    }

    /// Causal multi-head self-attention.
    fn attend(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, time, d_model] = x.dims();
        let per_head = |linear: &Linear<B>| {
            linear
                .forward(x.clone())
                .reshape([batch, time, self.heads, d_model / self.heads])
                .swap_dims(1, 2)
        };
        let context = causal_attention(per_head(&self.query), per_head(&self.key), per_head(&self.value));
        self.output
            .forward(context.swap_dims(1, 2).reshape([batch, time, d_model]))
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;

    use super::*;

    #[test]
    fn predicts_every_position_and_never_looks_ahead() {
        let device = Default::default();
        let model = TinyLmConfig::new(50, 8).init::<Flex>(&device);
        let a = Tensor::<Flex, 2, Int>::from_ints([[1, 2, 3, 4, 5, 6]], &device);
        let b = Tensor::<Flex, 2, Int>::from_ints([[1, 2, 3, 9, 9, 9]], &device);
        let (la, lb) = (model.forward(a), model.forward(b));
        assert_eq!(la.dims(), [1, 6, 50]);
        // The first three positions see the same prefix, so they predict the same.
        let diff = (la.clone().slice([0..1, 0..3]) - lb.clone().slice([0..1, 0..3]))
            .abs()
            .max()
            .into_scalar();
        assert!(diff < 1e-5, "a later token changed an earlier prediction by {diff}");
        let later = (la.slice([0..1, 3..6]) - lb.slice([0..1, 3..6]))
            .abs()
            .max()
            .into_scalar();
        assert!(later > 1e-4);
    }
}
