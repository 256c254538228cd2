//! The built-in language model, decoupled ([`crate::decouple`]): the same
//! embeddings and head as [`TinyLm`], and layers that are either N_d independent
//! sub-blocks on slices of the hidden width or the original pre-norm block.
//!
//! A sub-block is the original block made narrow: on its slice `x_i` of width
//! `s = H / N_d`, `x_i + attention(norm(x_i))` then `x_i + feed_forward(norm(x_i))`,
//! where attention maps the slice to the sub-block's heads (all of them at full head
//! width for `full-heads`, `heads / N_d` for `split-heads`) and back to `s`, and the
//! feed-forward is `s → I′ → s` with I′ chosen so the decoupled layer holds as many
//! parameters as the original ([`DecoupledLmConfig::inner_width`]). The N_d
//! sub-blocks of a layer are [`crate::sub_blocks`]' (pre-norm).
//!
//! [`DecoupledLm::sliced_from`] builds one from a trained original by slicing its
//! weights (weight decoupling's starting point); with every layer original it *is*
//! the original.

use burn::nn::{Embedding, Linear};
use burn::prelude::*;

use crate::decouple::{Decoupling, DecouplingError, LayerKind, ModelShape, Variant, matching_inner_width};
use crate::lm::{Block, TinyLm, TinyLmConfig, embed};
use crate::sub_blocks::{Masking, NormPlacement, SubBlockShape, SubBlocks, from_slices, to_slices};

/// A decoupled language model's shape: the original's, and how it is decoupled.
/// Only a decoupling that divides the model makes one ([`DecoupledLmConfig::new`]).
#[derive(Debug, Clone)]
pub struct DecoupledLmConfig {
    original: TinyLmConfig,
    decoupling: Decoupling,
}

/// A language model whose layers are decoupled or original.
#[derive(Module, Debug)]
pub struct DecoupledLm<B: Backend> {
    tokens: Embedding<B>,
    positions: Embedding<B>,
    layers: Vec<Layer<B>>,
    head: Linear<B>,
    divisions: usize,
}

/// One layer of a decoupled model.
#[derive(Module, Debug)]
enum Layer<B: Backend> {
    /// N_d sub-blocks, each on its own slice.
    Decoupled(SubBlocks<B>),
    /// The ordinary block over the whole width.
    Original(Block<B>),
}

/// Parameters and multiply-adds of the two kinds of layer, per token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerCosts {
    /// Parameters of one original layer.
    pub original_params: usize,
    /// Parameters of one decoupled layer (all N_d sub-blocks).
    pub decoupled_params: usize,
    /// Multiply-adds of one original layer for one token at context `t`
    /// (projections, feed-forward, and attention over `t` keys).
    pub original_macs: usize,
    /// Multiply-adds of one sub-block for the same token.
    pub sub_block_macs: usize,
}

impl DecoupledLmConfig {
    /// `original` decoupled by `decoupling`, if it divides the model.
    pub fn new(original: TinyLmConfig, decoupling: Decoupling) -> Result<Self, DecouplingError> {
        let config = DecoupledLmConfig { original, decoupling };
        decoupling.check(&config.shape())?;
        Ok(config)
    }

    /// The model it decouples.
    pub fn original(&self) -> &TinyLmConfig {
        &self.original
    }

    /// Slices, blocks and sub-block variant.
    pub fn decoupling(&self) -> Decoupling {
        self.decoupling
    }

    /// The original model's shape.
    pub fn shape(&self) -> ModelShape {
        ModelShape {
            layers: self.original.layers,
            width: self.original.d_model,
            heads: self.original.heads,
            kv_heads: self.original.heads,
        }
    }

    /// The shape of a decoupled layer's sub-blocks, I′ included.
    pub fn sub_blocks(&self) -> SubBlockShape {
        let shape = self.shape();
        let head_width = shape.width / shape.heads;
        let heads = self.decoupling.sub_block_heads(&shape);
        let mut sub = SubBlockShape {
            divisions: self.decoupling.divisions,
            slice: self.decoupling.slice_width(&shape),
            heads,
            attention: heads * head_width,
            inner: 0,
        };
        // I′: the decoupled layer's parameter count nearest the original layer's.
        let (n, s) = (sub.divisions, sub.slice);
        sub.inner = matching_inner_width(
            original_layer_params(shape.width),
            n * sub.fixed_params(),
            n * (2 * s + 1),
        );
        sub
    }

    /// The feed-forward inner width I′ of a sub-block.
    pub fn inner_width(&self) -> usize {
        self.sub_blocks().inner
    }

    /// Parameters and multiply-adds per layer kind, at context `t`.
    pub fn costs(&self, t: usize) -> LayerCosts {
        let h = self.original.d_model;
        let sub = self.sub_blocks();
        LayerCosts {
            original_params: original_layer_params(h),
            decoupled_params: sub.params(),
            // Q, K, V, output, FFN in and out, plus scores and their weighted sum.
            original_macs: 4 * h * h + 8 * h * h + 2 * t * h,
            sub_block_macs: sub.macs(t),
        }
    }

    /// A freshly initialised decoupled model.
    pub fn init<B: Backend>(&self, device: &B::Device) -> DecoupledLm<B> {
        let original = self.original.init::<B>(device);
        let sub = self.sub_blocks();
        let kinds = self.decoupling.layer_kinds(self.original.layers);
        let layers = original
            .blocks
            .into_iter()
            .zip(kinds)
            .map(|(block, kind)| match kind {
                LayerKind::Original => Layer::Original(block),
                LayerKind::Decoupled => Layer::Decoupled(SubBlocks::new(sub, NormPlacement::Pre, 1e-5, device)),
            })
            .collect();
        DecoupledLm {
            tokens: original.tokens,
            positions: original.positions,
            layers,
            head: original.head,
            divisions: self.decoupling.divisions,
        }
    }
}

/// Parameters of one original block of width `h` (two norms, four projections,
/// a feed-forward of `4h`).
fn original_layer_params(h: usize) -> usize {
    2 * 2 * h + 4 * (h * h + h) + (h * 4 * h + 4 * h) + (4 * h * h + h)
}

impl<B: Backend> DecoupledLm<B> {
    /// # Shapes
    /// - tokens: `[batch, time]` (time ≤ the configured context)
    /// - returns: `[batch, time, vocab]` next-token logits
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let mut hidden = Hidden::Whole(embed(&self.tokens, &self.positions, tokens));
        for layer in &self.layers {
            hidden = match layer {
                Layer::Decoupled(layer) => {
                    Hidden::Sliced(layer.forward(hidden.sliced(self.divisions), &Masking::Causal))
                }
                Layer::Original(block) => Hidden::Whole(block.forward(hidden.whole())),
            };
        }
        self.head.forward(hidden.whole())
    }

    /// The kind of every layer, in order.
    pub fn layer_kinds(&self) -> Vec<LayerKind> {
        self.layers
            .iter()
            .map(|l| match l {
                Layer::Decoupled(_) => LayerKind::Decoupled,
                Layer::Original(_) => LayerKind::Original,
            })
            .collect()
    }

    /// The decoupled version of a trained `original`: embeddings, head and original
    /// layers copied; every decoupled layer's sub-block `i` takes the rows and
    /// columns of the original's weights that belong to slice `i` (and, for
    /// `split-heads`, to its heads) — Q/K/V rows of the slice, output-projection
    /// columns of the slice, norm parameters of the slice, the first I′
    /// feed-forward units (units beyond the original's start with a zero output,
    /// so they change nothing until trained).
    pub fn sliced_from(original: &TinyLm<B>, decoupling: Decoupling) -> Result<DecoupledLm<B>, DecouplingError> {
        let [vocab, width] = original.tokens.weight.dims();
        let [context, _] = original.positions.weight.dims();
        let heads = original.blocks.first().map_or(1, |b| b.heads);
        let config = DecoupledLmConfig::new(
            TinyLmConfig::new(vocab, context)
                .with_d_model(width)
                .with_layers(original.blocks.len())
                .with_heads(heads),
            decoupling,
        )?;
        // burn draws a parameter lazily, on first read, and a clone of an undrawn
        // parameter draws its own values: draw them all before copying any.
        crate::checkpoint::draw(original);
        let kinds = decoupling.layer_kinds(original.blocks.len());
        let layers = original
            .blocks
            .iter()
            .zip(kinds)
            .map(|(block, kind)| match kind {
                LayerKind::Original => Layer::Original(block.clone()),
                LayerKind::Decoupled => Layer::Decoupled(SubBlocks::sliced(
                    block.weights(),
                    config.sub_blocks(),
                    decoupling.variant == Variant::SplitHeads,
                    NormPlacement::Pre,
                )),
            })
            .collect();
        Ok(DecoupledLm {
            tokens: original.tokens.clone(),
            positions: original.positions.clone(),
            layers,
            head: original.head.clone(),
            divisions: decoupling.divisions,
        })
    }
}

/// The built-in language model in either form, for code that trains or serves
/// whichever a spec names.
#[derive(Module, Debug)]
pub enum LanguageModel<B: Backend> {
    /// Every layer original.
    Original(TinyLm<B>),
    /// Decoupled layers in blocks that end in original ones.
    Decoupled(DecoupledLm<B>),
}

/// The shape of a [`LanguageModel`].
#[derive(Debug, Clone)]
pub enum LanguageModelConfig {
    /// The original model.
    Original(TinyLmConfig),
    /// Its decoupled form.
    Decoupled(DecoupledLmConfig),
}

impl LanguageModelConfig {
    /// A freshly initialised model.
    pub fn init<B: Backend>(&self, device: &B::Device) -> LanguageModel<B> {
        match self {
            LanguageModelConfig::Original(c) => LanguageModel::Original(c.init(device)),
            LanguageModelConfig::Decoupled(c) => LanguageModel::Decoupled(c.init(device)),
        }
    }
}

impl From<TinyLmConfig> for LanguageModelConfig {
    fn from(config: TinyLmConfig) -> Self {
        LanguageModelConfig::Original(config)
    }
}

impl<B: Backend> LanguageModel<B> {
    /// # Shapes
    /// - tokens: `[batch, time]`
    /// - returns: `[batch, time, vocab]` next-token logits
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        match self {
            LanguageModel::Original(m) => m.forward(tokens),
            LanguageModel::Decoupled(m) => m.forward(tokens),
        }
    }
}

/// The hidden state between layers: whole, or cut into slices.
enum Hidden<B: Backend> {
    /// `[batch, time, width]`.
    Whole(Tensor<B, 3>),
    /// `[divisions, batch, time, width / divisions]`: slice `i` is columns
    /// `i·s .. (i+1)·s` of the whole.
    Sliced(Tensor<B, 4>),
}

impl<B: Backend> Hidden<B> {
    fn sliced(self, divisions: usize) -> Tensor<B, 4> {
        match self {
            Hidden::Sliced(x) => x,
            Hidden::Whole(x) => to_slices(x, divisions),
        }
    }

    fn whole(self) -> Tensor<B, 3> {
        match self {
            Hidden::Whole(x) => x,
            Hidden::Sliced(x) => from_slices(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::module::Module;
    use burn::tensor::Distribution;

    use super::*;

    type B = Flex;

    fn original() -> TinyLmConfig {
        TinyLmConfig::new(40, 12).with_d_model(32).with_layers(4).with_heads(4)
    }

    fn decoupling(divisions: usize, blocks: usize, variant: Variant) -> Decoupling {
        Decoupling {
            divisions,
            blocks,
            variant,
        }
    }

    fn config(divisions: usize, blocks: usize, variant: Variant) -> DecoupledLmConfig {
        DecoupledLmConfig::new(original(), decoupling(divisions, blocks, variant)).unwrap()
    }

    fn tokens(ids: &[i64]) -> Tensor<B, 2, Int> {
        Tensor::from_ints(
            burn::tensor::TensorData::new(ids.to_vec(), [1, ids.len()]),
            &Default::default(),
        )
    }

    fn max_diff(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    #[test]
    fn with_every_layer_original_it_is_the_original() {
        let device = Default::default();
        let original = original().init::<B>(&device);
        let decoupled = DecoupledLm::sliced_from(&original, decoupling(4, 4, Variant::FullHeads)).unwrap();
        assert!(decoupled.layer_kinds().iter().all(|k| *k == LayerKind::Original));
        let x = tokens(&[3, 1, 4, 1, 5, 9, 2, 6]);
        assert!(max_diff(original.forward(x.clone()), decoupled.forward(x)) <= 1e-5);
    }

    /// Changing slice `j` of a decoupled layer's input changes no output of
    /// sub-block `i ≠ j`, and does change slice `j`'s.
    #[test]
    fn sub_blocks_never_see_another_slice() {
        let device = Default::default();
        for variant in [Variant::FullHeads, Variant::SplitHeads] {
            let model = config(4, 1, variant).init::<B>(&device);
            let Layer::Decoupled(layer) = &model.layers[0] else {
                panic!("layer 0 of one block of four is decoupled")
            };
            let x = Tensor::<B, 4>::random([4, 2, 6, 8], Distribution::Normal(0.0, 1.0), &device);
            let changed = x.clone().slice_assign(
                [2..3, 0..2, 0..6, 0..8],
                Tensor::random([1, 2, 6, 8], Distribution::Normal(0.0, 1.0), &device),
            );
            let (a, b) = (
                layer.forward(x, &Masking::Causal),
                layer.forward(changed, &Masking::Causal),
            );
            let diff = |g: usize| {
                (a.clone().slice([g..g + 1]) - b.clone().slice([g..g + 1]))
                    .abs()
                    .max()
                    .into_scalar()
            };
            for g in [0, 1, 3] {
                assert_eq!(diff(g), 0.0, "{variant}: sub-block {g} saw slice 2");
            }
            assert!(diff(2) > 1e-3, "{variant}: slice 2's own output did not change");
        }
    }

    #[test]
    fn a_decoupled_layer_holds_as_many_parameters_as_an_original_one() {
        let device = Default::default();
        for variant in [Variant::FullHeads, Variant::SplitHeads] {
            for divisions in [2, 4] {
                let config = config(divisions, 1, variant);
                let model = config.init::<B>(&device);
                let original = config.original().init::<B>(&device);
                let Layer::Decoupled(layer) = &model.layers[0] else {
                    unreachable!()
                };
                let costs = config.costs(12);
                assert_eq!(layer.num_params(), costs.decoupled_params);
                assert_eq!(original.blocks[0].num_params(), costs.original_params);
                let ratio = costs.decoupled_params as f64 / costs.original_params as f64;
                assert!((ratio - 1.0).abs() < 0.01, "{variant} N_d={divisions}: {ratio}");
                let whole = model.num_params() as f64 / original.num_params() as f64;
                assert!((whole - 1.0).abs() < 0.01, "{variant} N_d={divisions}: {whole}");
            }
        }
    }

    /// Slicing keeps what a sub-block can keep: with one division every decoupled
    /// layer is the original layer itself.
    #[test]
    fn one_division_slices_to_the_original() {
        let device = Default::default();
        let original = original().init::<B>(&device);
        for variant in [Variant::FullHeads, Variant::SplitHeads] {
            let decoupling = Decoupling {
                divisions: 1,
                blocks: 1,
                variant,
            };
            let decoupled = DecoupledLm::sliced_from(&original, decoupling).unwrap();
            assert_eq!(decoupled.layer_kinds()[0], LayerKind::Decoupled);
            let x = tokens(&[7, 7, 1, 30, 2]);
            let diff = max_diff(original.forward(x.clone()), decoupled.forward(x));
            assert!(diff <= 1e-4, "{variant}: {diff}");
        }
    }

    #[test]
    fn a_decoupling_that_does_not_divide_is_refused() {
        let err = DecoupledLmConfig::new(original(), decoupling(3, 1, Variant::FullHeads)).unwrap_err();
        assert_eq!((err.key, err.value), ("divisions", 3));
        let original = original().init::<B>(&Default::default());
        let err = DecoupledLm::sliced_from(&original, decoupling(2, 3, Variant::FullHeads)).unwrap_err();
        assert_eq!(err.key, "blocks");
    }
}
