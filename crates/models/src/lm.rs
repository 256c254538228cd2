//! A small causal transformer language model: token and position embeddings,
//! pre-norm transformer blocks with an autoregressive mask, and a linear head over
//! the vocabulary. It predicts the next token at every position.

use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::transformer::{TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::prelude::*;

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
    tokens: Embedding<B>,
    positions: Embedding<B>,
    blocks: TransformerEncoder<B>,
    head: Linear<B>,
}

impl TinyLmConfig {
    /// A freshly initialised model.
    pub fn init<B: Backend>(&self, device: &B::Device) -> TinyLm<B> {
        TinyLm {
            tokens: EmbeddingConfig::new(self.vocab, self.d_model).init(device),
            positions: EmbeddingConfig::new(self.context, self.d_model).init(device),
            blocks: TransformerEncoderConfig::new(self.d_model, 4 * self.d_model, self.heads, self.layers)
                .with_dropout(0.0)
                .with_norm_first(true)
                .init(device),
            head: LinearConfig::new(self.d_model, self.vocab).init(device),
        }
    }
}

impl<B: Backend> TinyLm<B> {
    /// # Shapes
    /// - tokens: `[batch, time]` (time ≤ the configured context)
    /// - returns: `[batch, time, vocab]` next-token logits
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [batch, time] = tokens.dims();
        let device = tokens.device();
        let positions = Tensor::<B, 1, Int>::arange(0..time as i64, &device)
            .reshape([1, time])
            .repeat_dim(0, batch);
        let x = self.tokens.forward(tokens) + self.positions.forward(positions);
        let mask = generate_autoregressive_mask::<B>(batch, time, &device);
        let x = self.blocks.forward(TransformerEncoderInput::new(x).mask_attn(mask));
        self.head.forward(x)
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
