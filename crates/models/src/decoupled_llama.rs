//! The llama decoder decoupled ([`crate::decouple`]): the same embeddings, rotary
//! positions and head as [`crate::llama`], and layers that are either N_d
//! independent llama sub-blocks on slices of the hidden width or the original block.
//!
//! Sub-block `i` on its slice `x_i` (width `s = H / N_d`) is the llama block made
//! narrow: `x_i + attention(rms_norm(x_i))` then `x_i + swiglu(rms_norm(x_i))`.
//! Attention has rotary positions per head and grouped-query attention:
//! - `full-heads`: Q maps the slice to every query head, K and V to every
//!   key/value head, all at full head width;
//! - `split-heads`: the sub-block owns `kv_heads / N_d` key/value heads and the
//!   query heads that share them, so its key/value cache is 1/N_d of the original's.
//!
//! Each decoupled layer keeps one key/value cache for its N_d sub-blocks, stacked
//! on the batch axis group-major (`[N_d · batch, kv heads, time, head_dim]`): rows
//! `i · batch ..` are sub-block `i`'s, what a device holding sub-block `i` keeps.
//! The SwiGLU width I′ is chosen so a decoupled layer holds as many parameters as
//! an original one.
//!
//! [`DecoupledLlama::sliced_from`] cuts one out of loaded original blocks: weight
//! decoupling's starting point, before any training.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ops::Range;

use burn::nn::RotaryEncoding;
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::checkpoint::{Named, Source, load_named, named, narrow_groups};
use crate::decouple::{Decoupling, DecouplingError, LayerKind, ModelShape, Variant, matching_inner_width};
use crate::grouped::{GroupedLinear, GroupedRmsNorm};
use crate::llama::{KvCache, LlamaConfig, LlamaEmbeddings, LlamaHead, LlamaLayer};
use crate::sub_blocks::{from_slices, slice_inputs, slice_outputs, slices_of, to_slices, unit_inputs, unit_outputs};

/// A decoupled llama's shape: the original's, and how it is decoupled. Only a
/// decoupling that divides the model makes one.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoupledLlamaConfig {
    original: LlamaConfig,
    decoupling: Decoupling,
}

/// The shape of a decoupled llama layer's sub-blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlamaSubBlockShape {
    /// N_d: sub-blocks.
    pub divisions: usize,
    /// Width of a slice.
    pub slice: usize,
    /// A sub-block's query heads.
    pub heads: usize,
    /// A sub-block's key/value heads.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// SwiGLU inner width I′.
    pub inner: usize,
}

impl LlamaSubBlockShape {
    /// Parameters of one sub-block that do not depend on I′: two norms, Q, K, V,
    /// the output projection.
    pub fn fixed_params(&self) -> usize {
        let (s, q, kv) = (self.slice, self.heads * self.head_dim, self.kv_heads * self.head_dim);
        2 * s + 2 * s * q + 2 * s * kv
    }

    /// Parameters of all N_d sub-blocks.
    pub fn params(&self) -> usize {
        self.divisions * (self.fixed_params() + 3 * self.slice * self.inner)
    }

    /// The checkpoint name (module path) and shape of every tensor of the stacked
    /// sub-blocks ([`LlamaSubBlocks`]), group axis first.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (n, s, f) = (self.divisions, self.slice, self.inner);
        let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        vec![
            ("attention_norm.gamma".into(), vec![n, s]),
            ("query.weight".into(), vec![n, s, q]),
            ("key.weight".into(), vec![n, s, kv]),
            ("value.weight".into(), vec![n, s, kv]),
            ("output.weight".into(), vec![n, q, s]),
            ("feed_forward_norm.gamma".into(), vec![n, s]),
            ("gate.weight".into(), vec![n, s, f]),
            ("up.weight".into(), vec![n, s, f]),
            ("down.weight".into(), vec![n, f, s]),
        ]
    }

    /// Multiply-adds of one sub-block for one token attending over `t` keys.
    pub fn macs(&self, t: usize) -> usize {
        let (s, q, kv) = (self.slice, self.heads * self.head_dim, self.kv_heads * self.head_dim);
        2 * s * q + 2 * s * kv + 3 * s * self.inner + 2 * t * q
    }
}

impl DecoupledLlamaConfig {
    /// `original` decoupled by `decoupling`, if it divides the model (for
    /// `split-heads`, N_d must divide the key/value heads too).
    pub fn new(original: LlamaConfig, decoupling: Decoupling) -> Result<Self, DecouplingError> {
        if original.attention_bias {
            return Err(DecouplingError {
                key: "divisions",
                value: decoupling.divisions,
                fits: "a model whose attention adds biases (Qwen2) is not decoupled yet".into(),
            });
        }
        let config = DecoupledLlamaConfig { original, decoupling };
        decoupling.check(&config.shape())?;
        Ok(config)
    }

    /// The model it decouples.
    pub fn original(&self) -> &LlamaConfig {
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
            width: self.original.hidden,
            heads: self.original.heads,
            kv_heads: self.original.kv_heads,
        }
    }

    /// Parameters of one original block: two norms, Q, K, V, output, SwiGLU.
    pub fn original_layer_params(&self) -> usize {
        let c = &self.original;
        let (h, kv) = (c.hidden, c.kv_heads * c.head_dim());
        2 * h + 2 * h * h + 2 * h * kv + 3 * h * c.ffn
    }

    /// Multiply-adds of one original block for one token attending over `t` keys.
    pub fn original_layer_macs(&self, t: usize) -> usize {
        let c = &self.original;
        let (h, kv) = (c.hidden, c.kv_heads * c.head_dim());
        2 * h * h + 2 * h * kv + 3 * h * c.ffn + 2 * t * h
    }

    /// The GGUF name and shape of every tensor [`DecoupledLlama::tensors`]
    /// writes: the original's (with its own `output.weight`), less the decoupled
    /// layers', plus their sub-blocks'.
    pub fn tensor_shapes(&self) -> BTreeMap<String, Vec<usize>> {
        let c = &self.original;
        let kinds = self.decoupling.layer_kinds(c.layers);
        let mut shapes = LlamaConfig {
            separate_head: true,
            attention_bias: false,
            ..c.clone()
        }
        .tensor_shapes();
        for (i, _) in kinds.iter().enumerate().filter(|(_, k)| **k == LayerKind::Decoupled) {
            shapes.retain(|name, _| !name.starts_with(&format!("blk.{i}.")));
            let prefix = sub_blocks_prefix(i);
            shapes.extend(
                self.sub_blocks()
                    .tensor_shapes()
                    .into_iter()
                    .map(|(name, shape)| (format!("{prefix}{name}"), shape)),
            );
        }
        shapes
    }

    /// Decoupled layer `layer`'s sub-blocks read from `source` (see
    /// [`DecoupledLlama::tensors`]), only the sub-blocks `groups` (a device's share).
    pub fn load_sub_blocks<B: Backend, E>(
        &self,
        source: &mut Source<'_, E>,
        layer: usize,
        groups: Range<usize>,
        device: &B::Device,
    ) -> Result<LlamaSubBlocks<B>, E> {
        let fresh = LlamaSubBlocks::new(self.sub_blocks(), self.original.eps, device);
        Ok(narrow_groups(
            load_named(fresh, &sub_blocks_prefix(layer), source)?,
            groups,
        ))
    }

    /// The shape of a decoupled layer's sub-blocks, I′ included.
    pub fn sub_blocks(&self) -> LlamaSubBlockShape {
        let shape = self.shape();
        let mut sub = LlamaSubBlockShape {
            divisions: self.decoupling.divisions,
            slice: self.decoupling.slice_width(&shape),
            heads: self.decoupling.sub_block_heads(&shape),
            kv_heads: self.decoupling.sub_block_kv_heads(&shape),
            head_dim: self.original.head_dim(),
            inner: 0,
        };
        let n = sub.divisions;
        sub.inner = matching_inner_width(self.original_layer_params(), n * sub.fixed_params(), n * 3 * sub.slice);
        sub
    }
}

/// The N_d llama sub-blocks of one decoupled layer, parameters stacked along a
/// first group axis (group `i` is sub-block `i`).
#[derive(Module, Debug)]
pub struct LlamaSubBlocks<B: Backend> {
    attention_norm: GroupedRmsNorm<B>,
    query: GroupedLinear<B>,
    key: GroupedLinear<B>,
    value: GroupedLinear<B>,
    output: GroupedLinear<B>,
    feed_forward_norm: GroupedRmsNorm<B>,
    gate: GroupedLinear<B>,
    up: GroupedLinear<B>,
    down: GroupedLinear<B>,
    /// A sub-block's key/value heads.
    kv_heads: usize,
    /// Query heads per key/value head.
    group: usize,
    head_dim: usize,
}

impl<B: Backend> LlamaSubBlocks<B> {
    /// Sub-blocks of `shape` with unit norms and zero projections: the frame a
    /// checkpoint's values are read into.
    pub fn new(shape: LlamaSubBlockShape, eps: f64, device: &B::Device) -> Self {
        let (n, s, f) = (shape.divisions, shape.slice, shape.inner);
        let (q, kv) = (shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim);
        let linear = |i: usize, o: usize| GroupedLinear::from_tensors(Tensor::zeros([n, i, o], device), None);
        let norm = || GroupedRmsNorm::from_tensor(Tensor::ones([n, s], device), eps);
        LlamaSubBlocks {
            attention_norm: norm(),
            query: linear(s, q),
            key: linear(s, kv),
            value: linear(s, kv),
            output: linear(q, s),
            feed_forward_norm: norm(),
            gate: linear(s, f),
            up: linear(s, f),
            down: linear(f, s),
            kv_heads: shape.kv_heads,
            group: shape.heads / shape.kv_heads,
            head_dim: shape.head_dim,
        }
    }

    /// Sub-blocks of `shape` cut out of the full block `layer`: Q/K/V rows of the
    /// slice (for `split-heads`, only the columns of the sub-block's key/value heads
    /// and their query heads), output-projection columns of the slice, the norms'
    /// scales of the slice, the first I′ SwiGLU units (units beyond the original's
    /// start with a zero output). `None` if `layer` is only a part of a block.
    pub fn sliced(layer: &LlamaLayer<B>, shape: LlamaSubBlockShape, split_heads: bool, eps: f64) -> Option<Self> {
        let w = layer.weights()?;
        let (n, inner) = (shape.divisions, shape.inner);
        let norm = |gamma: Tensor<B, 1>| GroupedRmsNorm::from_tensor(slices_of(gamma, n), eps);
        Some(LlamaSubBlocks {
            attention_norm: norm(w.attention_norm),
            query: slice_inputs(w.query, None, n, split_heads),
            key: slice_inputs(w.key, None, n, split_heads),
            value: slice_inputs(w.value, None, n, split_heads),
            output: slice_outputs(w.output, None, n, split_heads),
            feed_forward_norm: norm(w.feed_forward_norm),
            gate: unit_inputs(w.gate, None, n, inner),
            up: unit_inputs(w.up, None, n, inner),
            down: unit_outputs(w.down, None, n, inner),
            kv_heads: shape.kv_heads,
            group: shape.heads / shape.kv_heads,
            head_dim: shape.head_dim,
        })
    }

    /// Runs the new tokens of every slice through its sub-block, extending `cache`
    /// (this layer's, all sub-blocks stacked group-major on the batch axis).
    ///
    /// # Shapes
    /// - x: `[divisions, batch, seq, slice]`, at positions `cache.len()..cache.len() + seq`
    /// - returns: the same; sub-block `i`'s output depends on slice `i` only
    pub fn forward(&self, x: Tensor<B, 4>, rope: &RotaryEncoding<B>, cache: &mut KvCache<B>) -> Tensor<B, 4> {
        let x = x.clone() + self.attend(self.attention_norm.forward(x), rope, cache);
        let h = self.feed_forward_norm.forward(x.clone());
        x + self
            .down
            .forward(silu(self.gate.forward(h.clone())) * self.up.forward(h))
    }

    /// Each sub-block's grouped-query attention over its own heads.
    fn attend(&self, x: Tensor<B, 4>, rope: &RotaryEncoding<B>, cache: &mut KvCache<B>) -> Tensor<B, 4> {
        let [groups, batch, seq, _] = x.dims();
        let (kvh, g, hd) = (self.kv_heads, self.group, self.head_dim);
        let start = cache.len();
        // Groups and batch become one batch axis, group-major.
        let heads = |y: Tensor<B, 4>, n: usize| y.reshape([groups * batch, seq, n, hd]).swap_dims(1, 2);
        let q = rope.apply(heads(self.query.forward(x.clone()), kvh * g), start);
        let k = rope.apply(heads(self.key.forward(x.clone()), kvh), start);
        let v = heads(self.value.forward(x), kvh);
        let (k, v) = cache.extend(k, v);
        let time = start + seq;
        let expand = |t: Tensor<B, 4>| {
            t.unsqueeze_dim::<5>(2)
                .repeat_dim(2, g)
                .reshape([groups * batch, kvh * g, time, hd])
        };
        let options = AttentionModuleOptions {
            is_causal: seq > 1,
            ..Default::default()
        };
        let context = attention(q, expand(k), expand(v), None, None, options);
        self.output
            .forward(context.swap_dims(1, 2).reshape([groups, batch, seq, kvh * g * hd]))
    }
}

/// One layer of a decoupled llama.
#[derive(Module, Debug)]
enum Layer<B: Backend> {
    /// N_d sub-blocks, each on its own slice.
    Decoupled(LlamaSubBlocks<B>),
    /// The ordinary block over the whole width.
    Original(LlamaLayer<B>),
}

/// A llama decoder whose layers are decoupled or original.
#[derive(Module, Debug)]
pub struct DecoupledLlama<B: Backend> {
    embeddings: LlamaEmbeddings<B>,
    layers: Vec<Layer<B>>,
    head: LlamaHead<B>,
    rope: RotaryEncoding<B>,
    divisions: usize,
}

impl<B: Backend> DecoupledLlama<B> {
    /// The decoupled version of a loaded original (`layers` whole, not parts):
    /// embeddings, head and original layers kept, every decoupled layer cut into
    /// sub-blocks ([`LlamaSubBlocks::sliced`]). `None` if a layer is a part.
    pub fn sliced_from(
        config: &DecoupledLlamaConfig,
        embeddings: LlamaEmbeddings<B>,
        layers: Vec<LlamaLayer<B>>,
        head: LlamaHead<B>,
        rope: RotaryEncoding<B>,
    ) -> Option<Self> {
        let decoupling = config.decoupling();
        let split = decoupling.variant == Variant::SplitHeads;
        let kinds = decoupling.layer_kinds(layers.len());
        let layers = layers
            .into_iter()
            .zip(kinds)
            .map(|(layer, kind)| match kind {
                LayerKind::Original => Some(Layer::Original(layer)),
                LayerKind::Decoupled => {
                    LlamaSubBlocks::sliced(&layer, config.sub_blocks(), split, config.original().eps)
                        .map(Layer::Decoupled)
                }
            })
            .collect::<Option<Vec<_>>>()?;
        Some(DecoupledLlama {
            embeddings,
            layers,
            head,
            rope,
            divisions: decoupling.divisions,
        })
    }

    /// The original decoder (every layer original, through the same code) and
    /// its decoupled version of `config`, read from `source`; they share the
    /// embeddings, the head and the original layers' weights. Positions up to
    /// `context` are encoded.
    pub fn pair_from<E>(
        source: &mut Source<'_, E>,
        config: &DecoupledLlamaConfig,
        context: usize,
        device: &B::Device,
    ) -> Result<(Self, Self), E> {
        let c = config.original();
        let embeddings = LlamaEmbeddings::load(source, c, device)?;
        let layers = (0..c.layers)
            .map(|l| LlamaLayer::load(source, c, l, (0, 1), device))
            .collect::<Result<Vec<_>, _>>()?;
        let head = LlamaHead::load(source, c, (0, 1), device)?;
        let rope = c.rope(context, device);
        let every_layer_original = DecoupledLlamaConfig {
            decoupling: Decoupling {
                blocks: c.layers,
                ..config.decoupling()
            },
            ..config.clone()
        };
        let whole = "layers loaded whole slice into sub-blocks";
        let original = Self::sliced_from(
            &every_layer_original,
            embeddings.clone(),
            layers.clone(),
            head.clone(),
            rope.clone(),
        )
        .expect(whole);
        let decoupled = Self::sliced_from(config, embeddings, layers, head, rope).expect(whole);
        Ok((original, decoupled))
    }

    /// Reads a whole decoupled decoder written by [`DecoupledLlama::tensors`],
    /// positions up to `context` encoded.
    pub fn load<E>(
        source: &mut Source<'_, E>,
        config: &DecoupledLlamaConfig,
        context: usize,
        device: &B::Device,
    ) -> Result<Self, E> {
        let c = LlamaConfig {
            separate_head: true,
            attention_bias: false,
            ..config.original.clone()
        };
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
                    LayerKind::Original => Layer::Original(LlamaLayer::load(source, &c, i, (0, 1), device)?),
                })
            })
            .collect::<Result<_, E>>()?;
        Ok(DecoupledLlama {
            embeddings: LlamaEmbeddings::load(source, &c, device)?,
            layers,
            head: LlamaHead::load(source, &c, (0, 1), device)?,
            rope: c.rope(context, device),
            divisions: config.decoupling.divisions,
        })
    }

    /// Every tensor under its GGUF name: embeddings, head (as its own
    /// `output.weight`) and original layers as the original names them, the
    /// sub-blocks of decoupled layer `i` stacked (`[N_d, …]`) under
    /// `blk.i.sub_blocks.` and their module path.
    pub fn tensors(&self) -> Vec<Named> {
        let mut out = self.embeddings.tensors();
        for (i, layer) in self.layers.iter().enumerate() {
            match layer {
                Layer::Decoupled(sub) => out.extend(named(sub, &sub_blocks_prefix(i))),
                Layer::Original(block) => out.extend(block.tensors(i).expect("a decoupled model holds whole layers")),
            }
        }
        out.extend(self.head.tensors());
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

    /// One empty cache per layer: a new batch of sequences.
    pub fn caches(&self) -> Vec<KvCache<B>> {
        self.layers.iter().map(|_| KvCache::new()).collect()
    }

    /// Runs new tokens through every layer, extending `caches` (one per layer,
    /// from [`DecoupledLlama::caches`]).
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`, every id below the vocabulary
    /// - returns: `[batch, seq, vocab]` logits of the next token at every position
    pub fn forward(&self, ids: Tensor<B, 2, Int>, caches: &mut [KvCache<B>]) -> Tensor<B, 3> {
        let mut x = self.embeddings.forward(ids);
        let mut sliced: Option<Tensor<B, 4>> = None;
        for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
            match layer {
                Layer::Decoupled(sub) => {
                    let slices = sliced.take().unwrap_or_else(|| to_slices(x.clone(), self.divisions));
                    sliced = Some(sub.forward(slices, &self.rope, cache));
                }
                Layer::Original(block) => {
                    if let Some(slices) = sliced.take() {
                        x = from_slices(slices);
                    }
                    let Ok(y) = block.forward(x, &self.rope, cache, &mut |t| Ok::<_, Infallible>(t));
                    x = y;
                }
            }
        }
        if let Some(slices) = sliced {
            x = from_slices(slices);
        }
        self.head.forward_all(x)
    }
}

/// Where decoupled layer `layer`'s sub-blocks are in a checkpoint.
fn sub_blocks_prefix(layer: usize) -> String {
    format!("blk.{layer}.sub_blocks.")
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    use super::*;
    use crate::checkpoint::Source;

    type B = Flex;

    /// 4 layers, width 24, 6 query heads over 3 key/value heads, SwiGLU of 40.
    fn config() -> LlamaConfig {
        LlamaConfig {
            hidden: 24,
            layers: 4,
            heads: 6,
            kv_heads: 3,
            ffn: 40,
            vocab: 50,
            context: 64,
            rope_base: 10_000.0,
            eps: 1e-5,
            separate_head: true,
            attention_bias: false,
        }
    }

    /// A random original decoder of `c`'s shape, as loaded from a checkpoint.
    fn original(c: &LlamaConfig, device: &Device<B>) -> (LlamaEmbeddings<B>, Vec<LlamaLayer<B>>, LlamaHead<B>) {
        let shapes = c.tensor_shapes();
        let mut source: Box<Source<'_, Infallible>> = Box::new(|name: &str, shape: &[usize]| {
            assert_eq!(shapes[name], shape, "{name}");
            let n = shape.iter().product::<usize>();
            let t = Tensor::<B, 1>::random([n], Distribution::Normal(0.0, 0.3), device);
            // Norm scales near 1, as trained models have.
            let t = if shape.len() == 1 { t + 1.0 } else { t };
            Ok(t.into_data().to_vec::<f32>().unwrap())
        });
        let Ok(embeddings) = LlamaEmbeddings::load(&mut source, c, device);
        let layers = (0..c.layers)
            .map(|l| {
                let Ok(layer) = LlamaLayer::load(&mut source, c, l, (0, 1), device);
                layer
            })
            .collect();
        let Ok(head) = LlamaHead::load(&mut source, c, (0, 1), device);
        (embeddings, layers, head)
    }

    fn decoupled(c: &LlamaConfig, decoupling: Decoupling, device: &Device<B>) -> DecoupledLlama<B> {
        let config = DecoupledLlamaConfig::new(c.clone(), decoupling).unwrap();
        let (embeddings, layers, head) = original(c, device);
        DecoupledLlama::sliced_from(&config, embeddings, layers, head, c.rope(c.context, device)).unwrap()
    }

    fn max_difference(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// One division and a SwiGLU at least as wide as the original's: each
    /// decoupled layer is the original layer, so slicing took every weight from
    /// the right place (heads, rotary pairs, grouped-query order, units).
    #[test]
    fn one_division_is_the_original_for_both_variants() {
        let device = Default::default();
        let c = config();
        let ids = Tensor::<B, 2, Int>::from_data([[3, 14, 15, 9, 26, 5, 35], [8, 9, 7, 9, 3, 2, 38]], &device);
        for variant in [Variant::FullHeads, Variant::SplitHeads] {
            let one = Decoupling {
                divisions: 1,
                blocks: 1,
                variant,
            };
            let config = DecoupledLlamaConfig::new(c.clone(), one).unwrap();
            assert!(config.sub_blocks().inner >= c.ffn, "{:?}", config.sub_blocks());
            let (embeddings, layers, head) = original(&c, &device);
            let rope = c.rope(c.context, &device);
            let all_original = DecoupledLlama {
                embeddings: embeddings.clone(),
                layers: layers.iter().cloned().map(Layer::Original).collect(),
                head: head.clone(),
                rope: rope.clone(),
                divisions: 1,
            };
            let model = DecoupledLlama::sliced_from(&config, embeddings, layers, head, rope).unwrap();
            assert_eq!(model.layer_kinds()[0], LayerKind::Decoupled);
            let got = model.forward(ids.clone(), &mut model.caches());
            let want = all_original.forward(ids.clone(), &mut all_original.caches());
            assert!(max_difference(got, want) < 1e-4, "{variant}");
        }
    }

    /// What `tensors` writes (names as `tensor_shapes` declares them, each once),
    /// `load` reads back to the same model.
    #[test]
    fn written_tensors_load_back_to_the_same_model() {
        let device = Default::default();
        let c = LlamaConfig {
            separate_head: false,
            attention_bias: false,
            ..config()
        };
        let decoupling = Decoupling {
            divisions: 3,
            blocks: 2,
            variant: Variant::SplitHeads,
        };
        let model = decoupled(&c, decoupling, &device);
        let written = model.tensors();
        let file: BTreeMap<String, Named> = written.iter().map(|t| (t.name.clone(), t.clone())).collect();
        assert_eq!(file.len(), written.len(), "names are unique");
        let declared: BTreeMap<String, Vec<usize>> =
            written.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
        let config = DecoupledLlamaConfig::new(c.clone(), decoupling).unwrap();
        assert_eq!(config.tensor_shapes(), declared);
        let mut source = |name: &str, shape: &[usize]| -> Result<Vec<f32>, String> {
            let t = file.get(name).ok_or(format!("{name} missing"))?;
            assert_eq!(t.shape, shape, "{name}");
            Ok(t.values.clone())
        };
        let loaded = DecoupledLlama::<B>::load(&mut source, &config, c.context, &device).unwrap();
        let ids = Tensor::<B, 2, Int>::from_data([[3, 14, 15, 9, 26, 5, 35]], &device);
        let diff = max_difference(
            model.forward(ids.clone(), &mut model.caches()),
            loaded.forward(ids, &mut loaded.caches()),
        );
        assert!(diff == 0.0, "{diff}");
    }

    /// Decoding token by token through the per-layer caches gives what one pass
    /// over the whole sequence gives.
    #[test]
    fn cached_decoding_matches_one_pass() {
        let device = Default::default();
        let c = config();
        let model = decoupled(
            &c,
            Decoupling {
                divisions: 3,
                blocks: 2,
                variant: Variant::SplitHeads,
            },
            &device,
        );
        let ids = Tensor::<B, 2, Int>::from_data([[3, 14, 15, 9, 26], [8, 9, 7, 9, 3]], &device);
        let whole = model.forward(ids.clone(), &mut model.caches());
        let mut caches = model.caches();
        let prefix = model.forward(ids.clone().slice([0..2, 0..3]), &mut caches);
        let rest = model.forward(ids.slice([0..2, 3..5]), &mut caches);
        assert!(max_difference(whole, Tensor::cat(vec![prefix, rest], 1)) < 1e-4);
    }

    /// Within a decoupled layer, changing slice j changes no output of sub-block i ≠ j.
    #[test]
    fn slices_never_cross_inside_a_decoupled_layer() {
        let device = Default::default();
        let c = config();
        for variant in [Variant::FullHeads, Variant::SplitHeads] {
            let model = decoupled(
                &c,
                Decoupling {
                    divisions: 3,
                    blocks: 2,
                    variant,
                },
                &device,
            );
            let Layer::Decoupled(sub) = &model.layers[0] else {
                panic!("layer 0 is decoupled")
            };
            let x = Tensor::<B, 4>::random([3, 2, 5, 8], Distribution::Normal(0.0, 1.0), &device);
            let changed = x.clone().slice_assign(
                [1..2, 0..2, 0..5, 0..8],
                Tensor::random([1, 2, 5, 8], Distribution::Normal(0.0, 1.0), &device),
            );
            let (a, b) = (
                sub.forward(x, &model.rope, &mut KvCache::new()),
                sub.forward(changed, &model.rope, &mut KvCache::new()),
            );
            let diff = (a - b)
                .abs()
                .sum_dim(3)
                .sum_dim(2)
                .sum_dim(1)
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            assert_eq!(diff[0], 0.0, "{variant}");
            assert_eq!(diff[2], 0.0, "{variant}");
            assert!(diff[1] > 0.0, "{variant}");
        }
    }

    /// I′ keeps a decoupled layer's parameters within 1 % of an original's, and a
    /// split-heads sub-block's cache is 1/N_d of the layer's.
    #[test]
    fn parameter_counts_match_and_split_heads_split_the_cache() {
        let smol = LlamaConfig::smol_lm2();
        for variant in [Variant::FullHeads, Variant::SplitHeads] {
            let config = DecoupledLlamaConfig::new(
                smol.clone(),
                Decoupling {
                    divisions: 3,
                    blocks: 5,
                    variant,
                },
            )
            .unwrap();
            let (original, decoupled) = (config.original_layer_params(), config.sub_blocks().params());
            assert!(
                original.abs_diff(decoupled) * 100 <= original,
                "{variant}: {decoupled} vs {original}"
            );
        }
        let split = DecoupledLlamaConfig::new(
            smol,
            Decoupling {
                divisions: 3,
                blocks: 5,
                variant: Variant::SplitHeads,
            },
        )
        .unwrap()
        .sub_blocks();
        assert_eq!((split.heads, split.kv_heads), (3, 1));
    }
}
