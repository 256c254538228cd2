//! A BERT encoder (all-MiniLM-L6-v2, BERT-Base) as burn modules: embeddings,
//! post-LayerNorm blocks whose attention goes through burn's fused `attention`
//! with a padding mask, and sentence-transformers' mean pooling. The same modules
//! are served by `hetero-infer` and can be trained by `hetero-train`.
//!
//! A block can be built as one worker's *part*: a range of attention heads and a
//! range of feed-forward units, cut out of the checkpoint's tensors at load time.
//! The whole ranges make the ordinary block; balanced ranges over a group make a
//! tensor-parallel block, whose two partial sums (attention output, feed-forward
//! output) the caller's `reduce` adds across the group before the bias, the
//! residual and the LayerNorm, which every member then computes alike.
//!
//! Every tensor's checkpoint name, shape and cut is declared once, in
//! [`BertTensor`]: [`BertConfig::tensor_shapes`] lists them and the loaders read
//! them through it.

use std::collections::BTreeMap;
use std::ops::Range;

use burn::module::Param;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear};
use burn::prelude::*;
use burn::tensor::activation::gelu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::checkpoint::{Named, Part, Source, input_columns, output_rows, param, span, vector};
use crate::sub_blocks::LayerWeights;

/// The encoder's shape (HF `config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    /// Width of the hidden states.
    pub hidden: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads per block.
    pub heads: usize,
    /// FFN width.
    pub intermediate: usize,
    /// Tokens the model knows.
    pub vocab: usize,
    /// Longest input, in tokens.
    pub max_positions: usize,
    /// Token types (segments).
    pub type_vocab: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// Prefix of every tensor name (`""` or `"bert."`).
    pub prefix: String,
}

/// The encoder's tensors: checkpoint name, shape (PyTorch's `[out, in]` for
/// matrices) and how a worker's part cuts it — declared here and nowhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BertTensor {
    /// `embeddings.word_embeddings.weight`: `[vocab, hidden]`.
    Words,
    /// `embeddings.position_embeddings.weight`: `[max_positions, hidden]`.
    Positions,
    /// `embeddings.token_type_embeddings.weight`: `[type_vocab, hidden]`.
    TokenTypes,
    /// `embeddings.LayerNorm`: `[hidden]` scale and shift.
    EmbeddingNorm,
    /// `attention.self.query`: `[hidden, hidden]`, cut by heads (output rows).
    Query,
    /// `attention.self.key`: as the query.
    Key,
    /// `attention.self.value`: as the query.
    Value,
    /// `attention.output.dense`: `[hidden, hidden]`, cut by heads (input columns).
    AttentionOutput,
    /// `attention.output.LayerNorm`: `[hidden]`.
    AttentionNorm,
    /// `intermediate.dense`: `[intermediate, hidden]`, cut by units (output rows).
    Intermediate,
    /// `output.dense`: `[hidden, intermediate]`, cut by units (input columns).
    Output,
    /// `output.LayerNorm`: `[hidden]`.
    OutputNorm,
}

impl BertTensor {
    /// The tensors of one block, in checkpoint order.
    pub const LAYER: [BertTensor; 8] = [
        BertTensor::Query,
        BertTensor::Key,
        BertTensor::Value,
        BertTensor::AttentionOutput,
        BertTensor::AttentionNorm,
        BertTensor::Intermediate,
        BertTensor::Output,
        BertTensor::OutputNorm,
    ];

    /// The name's stem (without `.weight` / `.bias`) for block `layer`.
    pub fn stem(self, c: &BertConfig, layer: usize) -> String {
        let p = &c.prefix;
        let block = |n: &str| format!("{p}encoder.layer.{layer}.{n}");
        match self {
            BertTensor::Words => format!("{p}embeddings.word_embeddings"),
            BertTensor::Positions => format!("{p}embeddings.position_embeddings"),
            BertTensor::TokenTypes => format!("{p}embeddings.token_type_embeddings"),
            BertTensor::EmbeddingNorm => format!("{p}embeddings.LayerNorm"),
            BertTensor::Query => block("attention.self.query"),
            BertTensor::Key => block("attention.self.key"),
            BertTensor::Value => block("attention.self.value"),
            BertTensor::AttentionOutput => block("attention.output.dense"),
            BertTensor::AttentionNorm => block("attention.output.LayerNorm"),
            BertTensor::Intermediate => block("intermediate.dense"),
            BertTensor::Output => block("output.dense"),
            BertTensor::OutputNorm => block("output.LayerNorm"),
        }
    }

    /// The weight's shape; every tensor but the three tables also has a bias of
    /// the first dimension (a norm: scale `.weight` and shift `.bias`).
    pub fn shape(self, c: &BertConfig) -> Vec<usize> {
        let (d, f) = (c.hidden, c.intermediate);
        match self {
            BertTensor::Words => vec![c.vocab, d],
            BertTensor::Positions => vec![c.max_positions, d],
            BertTensor::TokenTypes => vec![c.type_vocab, d],
            BertTensor::EmbeddingNorm | BertTensor::AttentionNorm | BertTensor::OutputNorm => vec![d],
            BertTensor::Query | BertTensor::Key | BertTensor::Value | BertTensor::AttentionOutput => vec![d, d],
            BertTensor::Intermediate => vec![f, d],
            BertTensor::Output => vec![d, f],
        }
    }

    fn has_bias(self) -> bool {
        !matches!(self, BertTensor::Words | BertTensor::Positions | BertTensor::TokenTypes)
    }
}

impl BertConfig {
    /// all-MiniLM-L6-v2's shape.
    pub fn mini_lm() -> Self {
        BertConfig {
            hidden: 384,
            layers: 6,
            heads: 12,
            intermediate: 1536,
            vocab: 30522,
            max_positions: 512,
            type_vocab: 2,
            eps: 1e-12,
            prefix: String::new(),
        }
    }

    /// BERT-Base's shape.
    pub fn base() -> Self {
        BertConfig {
            hidden: 768,
            layers: 12,
            heads: 12,
            intermediate: 3072,
            ..Self::mini_lm()
        }
    }

    /// Reads an HF `config.json`'s text; the error says which key is wrong.
    pub fn from_hf_json(text: &str) -> Result<Self, String> {
        let json: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let num = |key: &str| {
            json[key]
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .filter(|v| *v <= 1 << 24)
                .ok_or_else(|| format!("no {key} (a whole number up to 2^24)"))
        };
        let act = json["hidden_act"].as_str().unwrap_or("gelu");
        if act != "gelu" {
            return Err(format!("hidden_act {act}; only gelu (BERT's) is built"));
        }
        let config = BertConfig {
            hidden: num("hidden_size")?,
            layers: num("num_hidden_layers")?,
            heads: num("num_attention_heads")?,
            intermediate: num("intermediate_size")?,
            vocab: num("vocab_size")?,
            max_positions: num("max_position_embeddings")?,
            type_vocab: num("type_vocab_size").unwrap_or(2).max(1),
            eps: json["layer_norm_eps"].as_f64().unwrap_or(1e-12),
            prefix: String::new(),
        };
        if config.heads == 0 || !config.hidden.is_multiple_of(config.heads) {
            return Err(format!(
                "{} heads do not divide hidden size {}",
                config.heads, config.hidden
            ));
        }
        Ok(config)
    }

    /// Sets [`BertConfig::prefix`] to `"bert."` when the checkpoint names its
    /// tensors so (`holds` says whether it has a tensor of that name).
    pub fn with_prefix_detected(mut self, holds: impl Fn(&str) -> bool) -> Self {
        if !holds("embeddings.word_embeddings.weight") && holds("bert.embeddings.word_embeddings.weight") {
            self.prefix = "bert.".into();
        }
        self
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Every tensor the encoder reads, with its shape: what a random-weights file
    /// for this shape must hold.
    pub fn tensor_shapes(&self) -> BTreeMap<String, Vec<usize>> {
        let embedding = [
            BertTensor::Words,
            BertTensor::Positions,
            BertTensor::TokenTypes,
            BertTensor::EmbeddingNorm,
        ];
        let all = embedding
            .iter()
            .map(|t| (*t, 0))
            .chain((0..self.layers).flat_map(|l| BertTensor::LAYER.iter().map(move |t| (*t, l))));
        let mut m = BTreeMap::new();
        for (t, layer) in all {
            let (stem, shape) = (t.stem(self, layer), t.shape(self));
            if t.has_bias() {
                m.insert(format!("{stem}.bias"), vec![shape[0]]);
            }
            m.insert(format!("{stem}.weight"), shape);
        }
        m
    }
}

/// Word, position and token-type embeddings followed by a LayerNorm.
#[derive(Module, Debug)]
pub struct BertEmbeddings<B: Backend> {
    words: Embedding<B>,
    positions: Embedding<B>,
    /// Only type 0 is used (single sentences): `[hidden]`.
    token_type: Param<Tensor<B, 1>>,
    norm: LayerNorm<B>,
}

impl<B: Backend> BertEmbeddings<B> {
    /// Reads the embedding tables.
    pub fn load<E>(source: &mut Source<'_, E>, c: &BertConfig, device: &B::Device) -> Result<Self, E> {
        let d = c.hidden;
        let table = |source: &mut Source<'_, E>, t: BertTensor| -> Result<Embedding<B>, E> {
            let shape = t.shape(c);
            let values = source(&format!("{}.weight", t.stem(c, 0)), &shape)?;
            let mut e = EmbeddingConfig::new(shape[0], d).init(device);
            e.weight = param(Tensor::from_data(TensorData::new(values, [shape[0], d]), device));
            Ok(e)
        };
        let words = table(source, BertTensor::Words)?;
        let positions = table(source, BertTensor::Positions)?;
        let types = source(
            &format!("{}.weight", BertTensor::TokenTypes.stem(c, 0)),
            &BertTensor::TokenTypes.shape(c),
        )?;
        Ok(BertEmbeddings {
            words,
            positions,
            token_type: param(vector(&types[..d], device)),
            norm: load_norm(source, c, BertTensor::EmbeddingNorm, 0, device)?,
        })
    }

    /// The tables under their checkpoint names, as [`BertEmbeddings::load`] reads
    /// them. Only token type 0 is kept, so the token-type table's other rows are
    /// written as zeros.
    pub fn tensors(&self, c: &BertConfig) -> Vec<Named> {
        let name = |t: BertTensor, what: &str| format!("{}.{what}", t.stem(c, 0));
        let mut types = vec![0f32; c.type_vocab * c.hidden];
        let type0 = self.token_type.val().into_data().to_vec::<f32>().expect("f32");
        types[..c.hidden].copy_from_slice(&type0);
        let mut out = vec![
            Named::of(name(BertTensor::Words, "weight"), self.words.weight.val()),
            Named::of(name(BertTensor::Positions, "weight"), self.positions.weight.val()),
            Named {
                name: name(BertTensor::TokenTypes, "weight"),
                shape: BertTensor::TokenTypes.shape(c),
                values: types,
            },
        ];
        out.extend(norm_tensors(&self.norm, &BertTensor::EmbeddingNorm.stem(c, 0)));
        out
    }

    /// Tokens the table knows, and the longest input.
    pub fn limits(&self) -> (usize, usize) {
        (self.words.weight.dims()[0], self.positions.weight.dims()[0])
    }

    /// # Shapes
    /// - ids: `[batch, seq]`, every id below the vocabulary, seq ≤ max positions
    /// - returns: `[batch, seq, hidden]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [batch, seq] = ids.dims();
        let at = Tensor::<B, 1, Int>::arange(0..seq as i64, &ids.device())
            .reshape([1, seq])
            .repeat_dim(0, batch);
        let x = self.words.forward(ids) + self.positions.forward(at) + self.token_type.val().unsqueeze();
        self.norm.forward(x)
    }
}

/// One post-LN block, or one worker's part of it (some heads, some FFN units).
/// A part with no heads or no units holds `None` there and adds nothing.
#[derive(Module, Debug)]
pub struct BertLayer<B: Backend> {
    query: Option<Linear<B>>,
    key: Option<Linear<B>>,
    value: Option<Linear<B>>,
    /// This part's heads' columns, without the bias (added once, after the sum).
    attention_output: Option<Linear<B>>,
    attention_output_bias: Param<Tensor<B, 1>>,
    attention_norm: LayerNorm<B>,
    intermediate: Option<Linear<B>>,
    /// This part's units' columns, without the bias.
    output: Option<Linear<B>>,
    output_bias: Param<Tensor<B, 1>>,
    output_norm: LayerNorm<B>,
    /// Heads of this part.
    heads: usize,
    /// The norms' epsilon.
    epsilon: f64,
}

impl<B: Backend> BertLayer<B> {
    /// Reads block `layer`'s part `index` of `of` (heads and FFN units split evenly).
    pub fn load<E>(
        source: &mut Source<'_, E>,
        c: &BertConfig,
        layer: usize,
        part: Part,
        device: &B::Device,
    ) -> Result<Self, E> {
        let hd = c.head_dim();
        let heads = span(c.heads, part.0, part.1);
        let cols = heads.start * hd..heads.end * hd;
        let units = span(c.intermediate, part.0, part.1);
        let mut columns = |t: BertTensor, keep: Range<usize>| load_rows(source, c, t, layer, keep, device);
        let query = columns(BertTensor::Query, cols.clone())?;
        let key = columns(BertTensor::Key, cols.clone())?;
        let value = columns(BertTensor::Value, cols.clone())?;
        let intermediate = columns(BertTensor::Intermediate, units.clone())?;
        let (attention_output, attention_output_bias) =
            load_row_part(source, c, BertTensor::AttentionOutput, layer, cols, device)?;
        let (output, output_bias) = load_row_part(source, c, BertTensor::Output, layer, units, device)?;
        Ok(BertLayer {
            query,
            key,
            value,
            attention_output,
            attention_output_bias,
            attention_norm: load_norm(source, c, BertTensor::AttentionNorm, layer, device)?,
            intermediate,
            output,
            output_bias,
            output_norm: load_norm(source, c, BertTensor::OutputNorm, layer, device)?,
            heads: heads.len(),
            epsilon: c.eps,
        })
    }

    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - padding: `[batch, 1, 1, seq]`, true where a key is padding
    /// - returns: `[batch, seq, hidden]`
    ///
    /// `reduce` sums a partial result over the part's group (the identity for a
    /// whole block).
    pub fn forward<E>(
        &self,
        x: Tensor<B, 3>,
        padding: &Tensor<B, 4, Bool>,
        reduce: &mut dyn FnMut(Tensor<B, 3>) -> Result<Tensor<B, 3>, E>,
    ) -> Result<Tensor<B, 3>, E> {
        let attention = match (&self.query, &self.key, &self.value, &self.attention_output) {
            (Some(q), Some(k), Some(v), Some(o)) => {
                let [batch, seq, _] = x.dims();
                let per_head = |l: &Linear<B>| {
                    let y = l.forward(x.clone());
                    let width = y.dims()[2];
                    y.reshape([batch, seq, self.heads, width / self.heads]).swap_dims(1, 2)
                };
                let context = attention(
                    per_head(q),
                    per_head(k),
                    per_head(v),
                    Some(padding.clone()),
                    None,
                    AttentionModuleOptions::default(),
                );
                let [_, heads, _, head_dim] = context.dims();
                o.forward(context.swap_dims(1, 2).reshape([batch, seq, heads * head_dim]))
            }
            _ => x.zeros_like(),
        };
        let attention = reduce(attention)? + self.attention_output_bias.val().unsqueeze();
        let x = self.attention_norm.forward(x + attention);
        let ffn = match (&self.intermediate, &self.output) {
            (Some(i), Some(o)) => o.forward(gelu(i.forward(x.clone()))),
            _ => x.zeros_like(),
        };
        let ffn = reduce(ffn)? + self.output_bias.val().unsqueeze();
        Ok(self.output_norm.forward(x + ffn))
    }
}

impl<B: Backend> BertLayer<B> {
    /// A whole block's tensors, for cutting sub-blocks out of it; `None` for a
    /// part without every head and unit.
    pub fn weights(&self) -> Option<LayerWeights<B>> {
        let with_bias = |l: &Option<Linear<B>>| -> Option<(Tensor<B, 2>, Tensor<B, 1>)> {
            let l = l.as_ref()?;
            Some((l.weight.val(), l.bias.as_ref()?.val()))
        };
        let norm = |n: &LayerNorm<B>| {
            let gamma = n.gamma.val();
            let beta = n.beta.as_ref().map_or_else(|| gamma.zeros_like(), |b| b.val());
            (gamma, beta)
        };
        Some(LayerWeights {
            attention_norm: norm(&self.attention_norm),
            query: with_bias(&self.query)?,
            key: with_bias(&self.key)?,
            value: with_bias(&self.value)?,
            output: (
                self.attention_output.as_ref()?.weight.val(),
                self.attention_output_bias.val(),
            ),
            feed_forward_norm: norm(&self.output_norm),
            feed_forward_in: with_bias(&self.intermediate)?,
            feed_forward_out: (self.output.as_ref()?.weight.val(), self.output_bias.val()),
            epsilon: self.epsilon,
        })
    }
}

impl<B: Backend> BertLayer<B> {
    /// A whole block's tensors under their checkpoint names (`[out, in]`
    /// matrices), as [`BertLayer::load`] reads them; `None` for a part.
    pub fn tensors(&self, c: &BertConfig, layer: usize) -> Option<Vec<Named>> {
        let w = self.weights()?;
        let mut out = Vec::new();
        let mut matrix = |t: BertTensor, (weight, bias): (Tensor<B, 2>, Tensor<B, 1>)| {
            let stem = t.stem(c, layer);
            out.push(Named::of(format!("{stem}.weight"), weight.transpose()));
            out.push(Named::of(format!("{stem}.bias"), bias));
        };
        matrix(BertTensor::Query, w.query);
        matrix(BertTensor::Key, w.key);
        matrix(BertTensor::Value, w.value);
        matrix(BertTensor::AttentionOutput, w.output);
        matrix(BertTensor::Intermediate, w.feed_forward_in);
        matrix(BertTensor::Output, w.feed_forward_out);
        out.extend(norm_tensors(
            &self.attention_norm,
            &BertTensor::AttentionNorm.stem(c, layer),
        ));
        out.extend(norm_tensors(&self.output_norm, &BertTensor::OutputNorm.stem(c, layer)));
        Some(out)
    }
}

fn norm_tensors<B: Backend>(norm: &LayerNorm<B>, stem: &str) -> Vec<Named> {
    let gamma = norm.gamma.val();
    let beta = norm.beta.as_ref().map_or_else(|| gamma.zeros_like(), |b| b.val());
    vec![
        Named::of(format!("{stem}.weight"), gamma),
        Named::of(format!("{stem}.bias"), beta),
    ]
}

/// The whole encoder on one device: embeddings and every block.
#[derive(Module, Debug)]
pub struct BertEncoder<B: Backend> {
    /// Word, position and token-type embeddings.
    pub embeddings: BertEmbeddings<B>,
    /// The blocks, whole.
    pub layers: Vec<BertLayer<B>>,
}

impl<B: Backend> BertEncoder<B> {
    /// Reads every tensor of the encoder.
    pub fn load<E>(source: &mut Source<'_, E>, c: &BertConfig, device: &B::Device) -> Result<Self, E> {
        let embeddings = BertEmbeddings::load(source, c, device)?;
        let layers = (0..c.layers)
            .map(|l| BertLayer::load(source, c, l, (0, 1), device))
            .collect::<Result<_, E>>()?;
        Ok(BertEncoder { embeddings, layers })
    }

    /// # Shapes
    /// - ids: `[batch, seq]`; `lengths[b]` of row `b` are real tokens, the rest padding
    /// - returns: `[batch, seq, hidden]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>, lengths: &[usize]) -> Tensor<B, 3> {
        let [_, seq] = ids.dims();
        let padding = padding_mask::<B>(lengths, seq, &ids.device());
        let x = self.embeddings.forward(ids);
        let mut whole = |t: Tensor<B, 3>| -> Result<Tensor<B, 3>, std::convert::Infallible> { Ok(t) };
        self.layers
            .iter()
            .fold(x, |x, layer| match layer.forward(x, &padding, &mut whole) {
                Ok(y) => y,
            })
    }
}

/// Rows of token ids of any lengths as one batch, padded with id 0 after each
/// row's end: `([batch, longest], lengths)` (what [`BertEncoder::forward`] takes).
pub fn padded_ids<B: Backend, R: AsRef<[u32]>>(rows: &[R], device: &B::Device) -> (Tensor<B, 2, Int>, Vec<usize>) {
    let lengths: Vec<usize> = rows.iter().map(|r| r.as_ref().len()).collect();
    let seq = lengths.iter().copied().max().unwrap_or(1).max(1);
    let flat: Vec<i64> = rows
        .iter()
        .flat_map(|r| (0..seq).map(|j| r.as_ref().get(j).map_or(0, |&t| i64::from(t))))
        .collect();
    (
        Tensor::from_data(TensorData::new(flat, [rows.len(), seq]), device),
        lengths,
    )
}

/// The padding mask for `lengths` real tokens in rows padded to `seq`:
/// `[batch, 1, 1, seq]`, true at padding.
pub fn padding_mask<B: Backend>(lengths: &[usize], seq: usize, device: &B::Device) -> Tensor<B, 4, Bool> {
    let values: Vec<bool> = lengths.iter().flat_map(|&n| (0..seq).map(move |j| j >= n)).collect();
    Tensor::<B, 2, Bool>::from_data(TensorData::new(values, [lengths.len(), seq]), device)
        .unsqueeze_dim::<3>(1)
        .unsqueeze_dim(1)
}

/// sentence-transformers' embedding: the mean of the real tokens' states (padding
/// left out), L2-normalised. Returns one row per sequence.
pub fn mean_pool<B: Backend>(x: Tensor<B, 3>, lengths: &[usize]) -> Vec<Vec<f32>> {
    let [batch, seq, d] = x.dims();
    let values = x.into_data().to_vec::<f32>().expect("f32 hidden states");
    (0..batch)
        .map(|b| {
            let n = lengths[b].clamp(1, seq);
            let mut mean = vec![0f32; d];
            for t in 0..n {
                let row = &values[(b * seq + t) * d..(b * seq + t + 1) * d];
                mean.iter_mut().zip(row).for_each(|(m, v)| *m += v);
            }
            let norm = mean.iter().map(|m| m * m).sum::<f32>().sqrt().max(1e-12);
            mean.iter().map(|m| m / norm).collect()
        })
        .collect()
}

/// Output rows `keep` of tensor `t` of block `layer`, with its bias.
fn load_rows<B: Backend, E>(
    source: &mut Source<'_, E>,
    c: &BertConfig,
    t: BertTensor,
    layer: usize,
    keep: Range<usize>,
    device: &B::Device,
) -> Result<Option<Linear<B>>, E> {
    let (stem, shape) = (t.stem(c, layer), t.shape(c));
    let w = source(&format!("{stem}.weight"), &shape)?;
    let b = source(&format!("{stem}.bias"), &[shape[0]])?;
    Ok(output_rows(&w, Some(&b), shape[1], keep, device))
}

/// A row part of a matrix without its bias (`None` when the part is empty), and the
/// whole bias.
type RowPart<B> = (Option<Linear<B>>, Param<Tensor<B, 1>>);

/// A row part of a matrix (input columns `keep`) and its whole bias.
fn load_row_part<B: Backend, E>(
    source: &mut Source<'_, E>,
    c: &BertConfig,
    t: BertTensor,
    layer: usize,
    keep: Range<usize>,
    device: &B::Device,
) -> Result<RowPart<B>, E> {
    let (stem, shape) = (t.stem(c, layer), t.shape(c));
    let w = source(&format!("{stem}.weight"), &shape)?;
    let bias = source(&format!("{stem}.bias"), &[shape[0]])?;
    Ok((
        input_columns(&w, shape[0], shape[1], keep, device),
        param(vector(&bias, device)),
    ))
}

fn load_norm<B: Backend, E>(
    source: &mut Source<'_, E>,
    c: &BertConfig,
    t: BertTensor,
    layer: usize,
    device: &B::Device,
) -> Result<LayerNorm<B>, E> {
    let stem = t.stem(c, layer);
    let d = c.hidden;
    let mut norm = LayerNormConfig::new(d).with_epsilon(c.eps).init(device);
    norm.gamma = param(vector(&source(&format!("{stem}.weight"), &[d])?, device));
    norm.beta = Some(param(vector(&source(&format!("{stem}.bias"), &[d])?, device)));
    Ok(norm)
}
