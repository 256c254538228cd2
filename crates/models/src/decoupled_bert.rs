//! BERT decoupled ([`crate::decouple`]): the same embeddings and mean pooling as
//! [`BertEncoder`], and layers that are either N_d post-norm sub-blocks on slices
//! of the hidden width ([`crate::sub_blocks`], attention masked at padding) or the
//! original block.
//!
//! [`DecoupledBert::sliced_from`] cuts one out of a loaded encoder (all-MiniLM-L6-v2,
//! BERT-Base): the starting point of weight decoupling, before any training.

use std::collections::BTreeMap;
use std::ops::Range;

use burn::module::Module;
use burn::prelude::*;

use crate::bert::{BertConfig, BertEmbeddings, BertEncoder, BertLayer, padding_mask};
use crate::checkpoint::{Named, Source, load_named, named, narrow_groups};
use crate::decouple::{Decoupling, DecouplingError, LayerKind, ModelShape, Variant, matching_inner_width};
use crate::sub_blocks::{Masking, NormPlacement, SubBlockShape, SubBlocks, from_slices, to_slices};

/// A decoupled BERT's shape: the original's, and how it is decoupled. Only a
/// decoupling that divides the model makes one.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoupledBertConfig {
    original: BertConfig,
    decoupling: Decoupling,
}

impl DecoupledBertConfig {
    /// `original` decoupled by `decoupling`, if it divides the model.
    pub fn new(original: BertConfig, decoupling: Decoupling) -> Result<Self, DecouplingError> {
        let config = DecoupledBertConfig { original, decoupling };
        decoupling.check(&config.shape())?;
        Ok(config)
    }

    /// The original model's configuration.
    pub fn original(&self) -> &BertConfig {
        &self.original
    }

    /// How it is decoupled.
    pub fn decoupling(&self) -> Decoupling {
        self.decoupling
    }

    /// Decoupled layer `layer`'s sub-blocks read from `source` (see
    /// [`DecoupledBert::tensors`]), only the sub-blocks `groups` (a device's share).
    pub fn load_sub_blocks<B: Backend, E>(
        &self,
        source: &mut Source<'_, E>,
        layer: usize,
        groups: Range<usize>,
        device: &B::Device,
    ) -> Result<SubBlocks<B>, E> {
        let fresh = SubBlocks::new(self.sub_blocks(), NormPlacement::Post, self.original.eps, device);
        Ok(narrow_groups(
            load_named(fresh, &sub_blocks_prefix(&self.original, layer), source)?,
            groups,
        ))
    }

    /// The checkpoint name and shape of every tensor [`DecoupledBert::tensors`]
    /// writes: the original's, less the decoupled layers', plus their sub-blocks'.
    pub fn tensor_shapes(&self) -> BTreeMap<String, Vec<usize>> {
        let c = &self.original;
        let kinds = self.decoupling.layer_kinds(c.layers);
        let decoupled: Vec<String> = (0..c.layers)
            .filter(|&i| kinds[i] == LayerKind::Decoupled)
            .map(|i| format!("{}encoder.layer.{i}.", c.prefix))
            .collect();
        let mut shapes = c.tensor_shapes();
        shapes.retain(|name, _| !decoupled.iter().any(|p| name.starts_with(p)));
        for (i, _) in kinds.iter().enumerate().filter(|(_, k)| **k == LayerKind::Decoupled) {
            let prefix = sub_blocks_prefix(c, i);
            shapes.extend(
                self.sub_blocks()
                    .tensor_shapes()
                    .into_iter()
                    .map(|(name, shape)| (format!("{prefix}{name}"), shape)),
            );
        }
        shapes
    }

    /// The original model's shape.
    pub fn shape(&self) -> ModelShape {
        ModelShape {
            layers: self.original.layers,
            width: self.original.hidden,
            heads: self.original.heads,
            kv_heads: self.original.heads,
        }
    }

    /// Parameters of one original block: Q/K/V/output with biases, two norms, the
    /// feed-forward.
    pub fn original_layer_params(&self) -> usize {
        let (h, f) = (self.original.hidden, self.original.intermediate);
        4 * (h * h + h) + 4 * h + (h * f + f) + (f * h + h)
    }

    /// Multiply-adds of one original block for one token attending over `t` keys.
    pub fn original_layer_macs(&self, t: usize) -> usize {
        let (h, f) = (self.original.hidden, self.original.intermediate);
        4 * h * h + 2 * h * f + 2 * t * h
    }

    /// The shape of a decoupled layer's sub-blocks, with I′ chosen so a decoupled
    /// layer holds as many parameters as an original one.
    pub fn sub_blocks(&self) -> SubBlockShape {
        let shape = self.shape();
        let heads = self.decoupling.sub_block_heads(&shape);
        let mut sub = SubBlockShape {
            divisions: self.decoupling.divisions,
            slice: self.decoupling.slice_width(&shape),
            heads,
            attention: heads * self.original.head_dim(),
            inner: 0,
        };
        let (n, s) = (sub.divisions, sub.slice);
        sub.inner = matching_inner_width(self.original_layer_params(), n * sub.fixed_params(), n * (2 * s + 1));
        sub
    }
}

/// One layer of a decoupled BERT. (A module built once per layer: boxing its
/// large variant would buy nothing, and burn's `Module` derive takes it unboxed.)
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
enum Layer<B: Backend> {
    /// N_d post-norm sub-blocks.
    Decoupled(SubBlocks<B>),
    /// The original block.
    Original(BertLayer<B>),
}

/// A BERT encoder whose layers are decoupled or original.
#[derive(Module, Debug)]
pub struct DecoupledBert<B: Backend> {
    embeddings: BertEmbeddings<B>,
    layers: Vec<Layer<B>>,
    divisions: usize,
}

impl<B: Backend> DecoupledBert<B> {
    /// The decoupled version of `original` (whole, on one device) by slicing its
    /// weights; the original layers are copied.
    pub fn sliced_from(original: &BertEncoder<B>, config: &DecoupledBertConfig) -> Self {
        crate::checkpoint::draw(original);
        let sub = config.sub_blocks();
        let split = config.decoupling.variant == Variant::SplitHeads;
        let layers = original
            .layers
            .iter()
            .zip(config.decoupling.layer_kinds(original.layers.len()))
            .map(|(layer, kind)| match (kind, layer.weights()) {
                (LayerKind::Decoupled, Some(weights)) => {
                    Layer::Decoupled(SubBlocks::sliced(weights, sub, split, NormPlacement::Post))
                }
                _ => Layer::Original(layer.clone()),
            })
            .collect();
        DecoupledBert {
            embeddings: original.embeddings.clone(),
            layers,
            divisions: config.decoupling.divisions,
        }
    }

    /// Reads a whole decoupled encoder written by [`DecoupledBert::tensors`].
    pub fn load<E>(source: &mut Source<'_, E>, config: &DecoupledBertConfig, device: &B::Device) -> Result<Self, E> {
        let c = &config.original;
        let embeddings = BertEmbeddings::load(source, c, device)?;
        let every = 0..config.decoupling.divisions;
        let layers = config
            .decoupling
            .layer_kinds(c.layers)
            .into_iter()
            .enumerate()
            .map(|(i, kind)| {
                Ok(match kind {
                    LayerKind::Decoupled => {
                        Layer::Decoupled(config.load_sub_blocks(source, i, every.clone(), device)?)
                    }
                    LayerKind::Original => Layer::Original(BertLayer::load(source, c, i, (0, 1), device)?),
                })
            })
            .collect::<Result<_, E>>()?;
        Ok(DecoupledBert {
            embeddings,
            layers,
            divisions: config.decoupling.divisions,
        })
    }

    /// Every tensor under its checkpoint name: the embeddings and the original
    /// layers as the original model names them (so they load as BERT's do), the
    /// sub-blocks of decoupled layer `i` stacked (`[N_d, …]`) under
    /// `encoder.layer.i.sub_blocks.` and their module path (`query.weight`).
    pub fn tensors(&self, config: &DecoupledBertConfig) -> Vec<Named> {
        let c = &config.original;
        let mut out = self.embeddings.tensors(c);
        for (i, layer) in self.layers.iter().enumerate() {
            match layer {
                Layer::Decoupled(sub) => out.extend(named(sub, &sub_blocks_prefix(c, i))),
                Layer::Original(block) => {
                    out.extend(block.tensors(c, i).expect("a decoupled model holds whole layers"))
                }
            }
        }
        out
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

    /// # Shapes
    /// - ids: `[batch, seq]`; `lengths[b]` of row `b` are real tokens, the rest padding
    /// - returns: `[batch, seq, hidden]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>, lengths: &[usize]) -> Tensor<B, 3> {
        let [_, seq] = ids.dims();
        let padding = padding_mask::<B>(lengths, seq, &ids.device());
        let masking = Masking::Padding(padding.clone());
        let mut x = self.embeddings.forward(ids);
        let mut whole = |t: Tensor<B, 3>| -> Result<Tensor<B, 3>, std::convert::Infallible> { Ok(t) };
        for layer in &self.layers {
            x = match layer {
                Layer::Decoupled(sub) => from_slices(sub.forward(to_slices(x, self.divisions), &masking)),
                Layer::Original(block) => match block.forward(x, &padding, &mut whole) {
                    Ok(y) => y,
                },
            };
        }
        x
    }
}

/// Where decoupled layer `layer`'s sub-blocks are in a checkpoint.
fn sub_blocks_prefix(c: &BertConfig, layer: usize) -> String {
    format!("{}encoder.layer.{layer}.sub_blocks.", c.prefix)
}

#[cfg(test)]
mod tests {

    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    use super::*;

    type B = Flex;

    fn small() -> BertConfig {
        BertConfig {
            hidden: 32,
            layers: 4,
            heads: 4,
            intermediate: 64,
            vocab: 50,
            max_positions: 16,
            ..BertConfig::mini_lm()
        }
    }

    /// An encoder of random weights read through the loader, as a checkpoint would be.
    fn random_encoder(c: &BertConfig) -> BertEncoder<B> {
        let device = Default::default();
        let tensors: BTreeMap<String, Vec<f32>> = c
            .tensor_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let t = Tensor::<B, 1>::random([n], Distribution::Normal(0.0, 0.2), &device);
                let mut v = t.into_data().to_vec::<f32>().unwrap();
                if name.contains("LayerNorm.weight") {
                    v.iter_mut().for_each(|x| *x += 1.0);
                }
                (name, v)
            })
            .collect();
        BertEncoder::load(
            &mut |name: &str, _: &[usize]| Ok::<_, String>(tensors[name].clone()),
            c,
            &device,
        )
        .unwrap()
    }

    fn ids(rows: &[&[i64]]) -> Tensor<B, 2, Int> {
        let seq = rows[0].len();
        let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_data(TensorData::new(flat, [rows.len(), seq]), &Default::default())
    }

    fn decoupling(divisions: usize, blocks: usize, variant: Variant) -> Decoupling {
        Decoupling {
            divisions,
            blocks,
            variant,
        }
    }

    #[test]
    fn with_every_layer_original_it_is_the_original() {
        let c = small();
        let original = random_encoder(&c);
        let config = DecoupledBertConfig::new(c, decoupling(4, 4, Variant::FullHeads)).unwrap();
        let decoupled = DecoupledBert::sliced_from(&original, &config);
        let x = ids(&[&[1, 5, 9, 2, 0], &[3, 3, 7, 0, 0]]);
        let diff = (original.forward(x.clone(), &[5, 3]) - decoupled.forward(x, &[5, 3]))
            .abs()
            .max()
            .into_scalar();
        assert!(diff <= 1e-5, "{diff}");
    }

    /// With one division a decoupled layer is the original layer, cut and put
    /// back together: slicing loses nothing it could keep.
    #[test]
    fn one_division_slices_to_the_original() {
        let c = small();
        let original = random_encoder(&c);
        for variant in [Variant::FullHeads, Variant::SplitHeads] {
            let config = DecoupledBertConfig::new(c.clone(), decoupling(1, 1, variant)).unwrap();
            assert_eq!(config.sub_blocks().inner, c.intermediate);
            let decoupled = DecoupledBert::sliced_from(&original, &config);
            assert_eq!(decoupled.layer_kinds()[0], LayerKind::Decoupled);
            let x = ids(&[&[4, 8, 15, 16, 23, 42]]);
            let diff = (original.forward(x.clone(), &[6]) - decoupled.forward(x, &[6]))
                .abs()
                .max()
                .into_scalar();
            assert!(diff <= 1e-4, "{variant}: {diff}");
        }
    }

    /// Padding never changes a real token's state, in sub-blocks as in the original.
    #[test]
    fn padding_is_invisible_to_real_tokens() {
        let c = small();
        let config = DecoupledBertConfig::new(c.clone(), decoupling(2, 2, Variant::SplitHeads)).unwrap();
        let decoupled = DecoupledBert::sliced_from(&random_encoder(&c), &config);
        let short = decoupled.forward(ids(&[&[1, 2, 3]]), &[3]);
        let padded = decoupled.forward(ids(&[&[1, 2, 3, 0, 0]]), &[3]);
        let diff = (short - padded.slice([0..1, 0..3])).abs().max().into_scalar();
        assert!(diff <= 1e-5, "{diff}");
    }

    /// What `tensors` writes, `load` reads back to the same model; and every
    /// name is unique (a file holds each once).
    #[test]
    fn written_tensors_load_back_to_the_same_model() {
        let c = small();
        let config = DecoupledBertConfig::new(c.clone(), decoupling(2, 2, Variant::SplitHeads)).unwrap();
        let model = DecoupledBert::sliced_from(&random_encoder(&c), &config);
        let written = model.tensors(&config);
        let file: BTreeMap<String, crate::checkpoint::Named> =
            written.iter().map(|t| (t.name.clone(), t.clone())).collect();
        assert_eq!(file.len(), written.len(), "names are unique");
        let declared: BTreeMap<String, Vec<usize>> =
            written.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
        assert_eq!(
            config.tensor_shapes(),
            declared,
            "tensor_shapes declares what tensors writes"
        );
        assert!(
            file.contains_key("encoder.layer.0.sub_blocks.query.weight"),
            "{:?}",
            file.keys()
        );
        assert!(file.contains_key("encoder.layer.1.attention.self.query.weight"));
        let mut source = |name: &str, shape: &[usize]| -> Result<Vec<f32>, String> {
            let t = file.get(name).ok_or(format!("{name} missing"))?;
            if t.shape != shape {
                return Err(format!("{name}: {:?} vs {shape:?}", t.shape));
            }
            Ok(t.values.clone())
        };
        let loaded = DecoupledBert::<B>::load(&mut source, &config, &Default::default()).unwrap();
        let x = ids(&[&[1, 5, 9, 2, 0], &[3, 3, 7, 0, 0]]);
        let diff = (model.forward(x.clone(), &[5, 3]) - loaded.forward(x, &[5, 3]))
            .abs()
            .max()
            .into_scalar();
        assert!(diff == 0.0, "{diff}");
        // A device's share of the sub-blocks computes exactly its slices.
        let all = config
            .load_sub_blocks::<B, _>(&mut source, 0, 0..2, &Default::default())
            .unwrap();
        let second = config
            .load_sub_blocks::<B, _>(&mut source, 0, 1..2, &Default::default())
            .unwrap();
        let h = Tensor::<B, 3>::random([2, 5, 32], Distribution::Normal(0.0, 1.0), &Default::default());
        let masking = Masking::Padding(padding_mask::<B>(&[5, 3], 5, &Default::default()));
        let slices = to_slices(h, 2);
        let whole = all.forward(slices.clone(), &masking).narrow(0, 1, 1);
        let share = second.forward(slices.narrow(0, 1, 1), &masking);
        assert!((whole - share).abs().max().into_scalar() < 1e-6);
    }

    #[test]
    fn a_decoupled_layer_holds_as_many_parameters_as_an_original_one() {
        for (c, d) in [(small(), 4), (BertConfig::mini_lm(), 4), (BertConfig::base(), 4)] {
            for variant in [Variant::FullHeads, Variant::SplitHeads] {
                let config = DecoupledBertConfig::new(c.clone(), decoupling(d, 1, variant)).unwrap();
                let ratio = config.sub_blocks().params() as f64 / config.original_layer_params() as f64;
                assert!((ratio - 1.0).abs() < 0.01, "{variant} width {}: {ratio}", c.hidden);
            }
        }
        let c = small();
        let config = DecoupledBertConfig::new(c.clone(), decoupling(4, 1, Variant::SplitHeads)).unwrap();
        let model = SubBlocks::<B>::new(config.sub_blocks(), NormPlacement::Post, 1e-12, &Default::default());
        assert_eq!(model.num_params(), config.sub_blocks().params());
    }
}
