//! A llama-family decoder (SmolLM2) as burn modules: RMSNorm, rotary positions,
//! grouped-query attention through burn's fused `attention` (causal, aligned to
//! the end of the key/value cache), and a SwiGLU feed-forward; tensors named as in
//! GGUF files. Served by `hetero-infer`, trainable by `hetero-train`.
//!
//! As in [`crate::bert`], a block can be built as one worker's part: a range of
//! *key/value* heads (with the query heads that share them, so grouped-query
//! attention never crosses workers) and a range of FFN units. The output head can
//! be split by vocabulary rows. The key/value cache is not part of a block: the
//! caller passes each block its [`KvCache`], so one set of weights can decode
//! several sequences.
//!
//! Rotary positions: llama.cpp's converter permutes the Q and K rows so that
//! rotation pairs are adjacent, `(2i, 2i + 1)`; burn's [`RotaryEncoding`] rotates
//! exactly those pairs, so GGUF weights are used as stored.

use std::collections::BTreeMap;
use std::ops::Range;

use burn::nn::{
    Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig, RotaryEncoding, RotaryEncodingConfig,
};
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::checkpoint::{Named, Part, Source, input_columns, output_rows, param, span, transposed, vector};

/// The decoder's shape (GGUF `llama.*` metadata).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Width of the hidden states.
    pub hidden: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention).
    pub kv_heads: usize,
    /// FFN width.
    pub ffn: usize,
    /// Tokens the model knows.
    pub vocab: usize,
    /// Longest context.
    pub context: usize,
    /// RoPE base.
    pub rope_base: f32,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// Whether the output head has its own weight (`output.weight`) or reuses the
    /// token embeddings.
    pub separate_head: bool,
    /// Whether the query, key and value projections add a bias (Qwen2's do).
    pub attention_bias: bool,
}

/// The decoder's tensors: GGUF name, row-major shape (`[out, in]` for matrices)
/// — declared here and nowhere else. Only the query, key and value projections
/// may have a bias (when [`LlamaConfig::attention_bias`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlamaTensor {
    /// `token_embd.weight`: `[vocab, hidden]`.
    TokenEmbedding,
    /// `output_norm.weight`: `[hidden]`.
    OutputNorm,
    /// `output.weight`: `[vocab, hidden]` (only with a separate head).
    Output,
    /// `attn_norm.weight`: `[hidden]`.
    AttentionNorm,
    /// `attn_q.weight`: `[hidden, hidden]`, cut by key/value head groups.
    Query,
    /// `attn_k.weight`: `[kv_heads·head_dim, hidden]`, cut by key/value heads.
    Key,
    /// `attn_v.weight`: as the key.
    Value,
    /// `attn_q.bias`: `[hidden]`, cut as the query's rows.
    QueryBias,
    /// `attn_k.bias`: `[kv_heads·head_dim]`, cut as the key's rows.
    KeyBias,
    /// `attn_v.bias`: as the key's bias.
    ValueBias,
    /// `attn_output.weight`: `[hidden, hidden]`, cut by query heads (input columns).
    AttentionOutput,
    /// `ffn_norm.weight`: `[hidden]`.
    FeedForwardNorm,
    /// `ffn_gate.weight`: `[ffn, hidden]`, cut by units.
    Gate,
    /// `ffn_up.weight`: `[ffn, hidden]`, cut by units.
    Up,
    /// `ffn_down.weight`: `[hidden, ffn]`, cut by units (input columns).
    Down,
}

impl LlamaTensor {
    /// The tensors of one block.
    pub const LAYER: [LlamaTensor; 9] = [
        LlamaTensor::AttentionNorm,
        LlamaTensor::Query,
        LlamaTensor::Key,
        LlamaTensor::Value,
        LlamaTensor::AttentionOutput,
        LlamaTensor::FeedForwardNorm,
        LlamaTensor::Gate,
        LlamaTensor::Up,
        LlamaTensor::Down,
    ];

    /// The biases of one block that has them.
    pub const BIASES: [LlamaTensor; 3] = [LlamaTensor::QueryBias, LlamaTensor::KeyBias, LlamaTensor::ValueBias];

    /// The tensor's name (in block `layer` for a block's tensor).
    pub fn name(self, layer: usize) -> String {
        let block = |n: &str| format!("blk.{layer}.{n}.weight");
        match self {
            LlamaTensor::TokenEmbedding => "token_embd.weight".into(),
            LlamaTensor::OutputNorm => "output_norm.weight".into(),
            LlamaTensor::Output => "output.weight".into(),
            LlamaTensor::AttentionNorm => block("attn_norm"),
            LlamaTensor::Query => block("attn_q"),
            LlamaTensor::Key => block("attn_k"),
            LlamaTensor::Value => block("attn_v"),
            LlamaTensor::QueryBias => format!("blk.{layer}.attn_q.bias"),
            LlamaTensor::KeyBias => format!("blk.{layer}.attn_k.bias"),
            LlamaTensor::ValueBias => format!("blk.{layer}.attn_v.bias"),
            LlamaTensor::AttentionOutput => block("attn_output"),
            LlamaTensor::FeedForwardNorm => block("ffn_norm"),
            LlamaTensor::Gate => block("ffn_gate"),
            LlamaTensor::Up => block("ffn_up"),
            LlamaTensor::Down => block("ffn_down"),
        }
    }

    /// The tensor's row-major shape.
    pub fn shape(self, c: &LlamaConfig) -> Vec<usize> {
        let (d, f, kv) = (c.hidden, c.ffn, c.kv_heads * c.head_dim());
        match self {
            LlamaTensor::TokenEmbedding | LlamaTensor::Output => vec![c.vocab, d],
            LlamaTensor::OutputNorm
            | LlamaTensor::AttentionNorm
            | LlamaTensor::FeedForwardNorm
            | LlamaTensor::QueryBias => vec![d],
            LlamaTensor::KeyBias | LlamaTensor::ValueBias => vec![kv],
            LlamaTensor::Query | LlamaTensor::AttentionOutput => vec![d, d],
            LlamaTensor::Key | LlamaTensor::Value => vec![kv, d],
            LlamaTensor::Gate | LlamaTensor::Up => vec![f, d],
            LlamaTensor::Down => vec![d, f],
        }
    }

    fn read<E>(self, source: &mut Source<'_, E>, c: &LlamaConfig, layer: usize) -> Result<Vec<f32>, E> {
        source(&self.name(layer), &self.shape(c))
    }
}

impl LlamaConfig {
    /// SmolLM2-135M's shape.
    pub fn smol_lm2() -> Self {
        LlamaConfig {
            hidden: 576,
            layers: 30,
            heads: 9,
            kv_heads: 3,
            ffn: 1536,
            vocab: 49152,
            context: 8192,
            rope_base: 100_000.0,
            eps: 1e-5,
            separate_head: false,
            attention_bias: false,
        }
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Query heads per key/value head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Every tensor the decoder reads, as (tensor, block; 0 outside the blocks).
    pub fn tensors(&self) -> Vec<(LlamaTensor, usize)> {
        let mut top = vec![LlamaTensor::TokenEmbedding, LlamaTensor::OutputNorm];
        if self.separate_head {
            top.push(LlamaTensor::Output);
        }
        let biases: &[LlamaTensor] = if self.attention_bias { &LlamaTensor::BIASES } else { &[] };
        top.into_iter()
            .map(|t| (t, 0))
            .chain((0..self.layers).flat_map(|l| LlamaTensor::LAYER.iter().chain(biases).map(move |t| (*t, l))))
            .collect()
    }

    /// Every tensor the decoder reads, with its row-major shape.
    pub fn tensor_shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.tensors()
            .into_iter()
            .map(|(t, l)| (t.name(l), t.shape(self)))
            .collect()
    }

    /// The rotary encoding every block shares.
    pub fn rope<B: Backend>(&self, max_positions: usize, device: &B::Device) -> RotaryEncoding<B> {
        let mut rope = RotaryEncodingConfig::new(max_positions.min(self.context).max(1), self.head_dim())
            .with_theta(self.rope_base)
            .init(device);
        // burn builds these tables from integer ranges; on the dispatch backend an
        // integer tensor converted to float is a plain one even on an autodiff
        // device, and a plain tensor cannot meet autodiff ones in an op (nor be
        // made `valid`). Rebuilt from their values, they are the device's own.
        rope.freq_complex = Tensor::from_data(rope.freq_complex.into_data(), device);
        rope.theta = Tensor::from_data(rope.theta.into_data(), device);
        rope
    }
}

/// The token embedding table.
#[derive(Module, Debug)]
pub struct LlamaEmbeddings<B: Backend> {
    table: Embedding<B>,
}

impl<B: Backend> LlamaEmbeddings<B> {
    /// Reads `token_embd.weight`.
    pub fn load<E>(source: &mut Source<'_, E>, c: &LlamaConfig, device: &B::Device) -> Result<Self, E> {
        let values = LlamaTensor::TokenEmbedding.read(source, c, 0)?;
        let mut table = EmbeddingConfig::new(c.vocab, c.hidden).init(device);
        table.weight = param(Tensor::from_data(TensorData::new(values, [c.vocab, c.hidden]), device));
        Ok(LlamaEmbeddings { table })
    }

    /// The table under its GGUF name.
    pub fn tensors(&self) -> Vec<Named> {
        vec![Named::of(LlamaTensor::TokenEmbedding.name(0), self.table.weight.val())]
    }

    /// Tokens the table knows.
    pub fn vocab(&self) -> usize {
        self.table.weight.dims()[0]
    }

    /// # Shapes
    /// - ids: `[batch, seq]`, every id below the vocabulary
    /// - returns: `[batch, seq, hidden]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.table.forward(ids)
    }
}

/// Keys and values of the positions a sequence has seen, for one block:
/// `[batch, this part's kv heads, time, head_dim]` each.
#[derive(Debug, Clone, Default)]
pub struct KvCache<B: Backend> {
    entries: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache (a new sequence).
    pub fn new() -> Self {
        KvCache { entries: None }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.entries.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    /// Bytes held (f32 keys and values).
    pub fn bytes(&self) -> usize {
        self.entries
            .as_ref()
            .map_or(0, |(k, v)| 4 * (k.shape().num_elements() + v.shape().num_elements()))
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the new positions' keys and values (`[batch, kv heads, seq,
    /// head_dim]`) and returns all positions' keys and values.
    pub(crate) fn extend(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let (k, v) = match self.entries.take() {
            Some((ck, cv)) => (Tensor::cat(vec![ck, k], 2), Tensor::cat(vec![cv, v], 2)),
            None => (k, v),
        };
        self.entries = Some((k.clone(), v.clone()));
        (k, v)
    }
}

/// A whole block's weights in burn's layout (`[in, out]` matrices), the raw
/// material of a decoupled layer's sub-blocks.
#[derive(Debug, Clone)]
pub struct LlamaWeights<B: Backend> {
    /// The RMSNorm scale before attention: `[hidden]`.
    pub attention_norm: Tensor<B, 1>,
    /// `[hidden, heads·head_dim]`, query heads grouped by their key/value head.
    pub query: Tensor<B, 2>,
    /// `[hidden, kv_heads·head_dim]`.
    pub key: Tensor<B, 2>,
    /// As the key.
    pub value: Tensor<B, 2>,
    /// `[heads·head_dim, hidden]`.
    pub output: Tensor<B, 2>,
    /// The RMSNorm scale before the feed-forward: `[hidden]`.
    pub feed_forward_norm: Tensor<B, 1>,
    /// `[hidden, ffn]`.
    pub gate: Tensor<B, 2>,
    /// `[hidden, ffn]`.
    pub up: Tensor<B, 2>,
    /// `[ffn, hidden]`.
    pub down: Tensor<B, 2>,
}

/// One decoder block, or one worker's part of it. A part without heads or units
/// holds `None` there and adds nothing.
#[derive(Module, Debug)]
pub struct LlamaLayer<B: Backend> {
    attention_norm: RmsNorm<B>,
    query: Option<Linear<B>>,
    key: Option<Linear<B>>,
    value: Option<Linear<B>>,
    /// This part's query heads' columns: a partial sum.
    attention_output: Option<Linear<B>>,
    feed_forward_norm: RmsNorm<B>,
    gate: Option<Linear<B>>,
    up: Option<Linear<B>>,
    /// This part's units' columns: a partial sum.
    down: Option<Linear<B>>,
    /// Key/value heads of this part.
    kv_heads: usize,
    /// Query heads per key/value head.
    group: usize,
    head_dim: usize,
}

impl<B: Backend> LlamaLayer<B> {
    /// Reads block `layer`'s part `index` of `of`.
    pub fn load<E>(
        source: &mut Source<'_, E>,
        c: &LlamaConfig,
        layer: usize,
        part: Part,
        device: &B::Device,
    ) -> Result<Self, E> {
        let (hd, g) = (c.head_dim(), c.group());
        let kv_heads = span(c.kv_heads, part.0, part.1);
        let kv_cols = kv_heads.start * hd..kv_heads.end * hd;
        let q_cols = kv_heads.start * g * hd..kv_heads.end * g * hd;
        let units = span(c.ffn, part.0, part.1);
        let mut rows =
            |t: LlamaTensor, bias: Option<LlamaTensor>, keep: Range<usize>| -> Result<Option<Linear<B>>, E> {
                let shape = t.shape(c);
                let bias = match bias.filter(|_| c.attention_bias) {
                    Some(b) => Some(b.read(source, c, layer)?),
                    None => None,
                };
                Ok(output_rows(
                    &t.read(source, c, layer)?,
                    bias.as_deref(),
                    shape[1],
                    keep,
                    device,
                ))
            };
        let query = rows(LlamaTensor::Query, Some(LlamaTensor::QueryBias), q_cols.clone())?;
        let key = rows(LlamaTensor::Key, Some(LlamaTensor::KeyBias), kv_cols.clone())?;
        let value = rows(LlamaTensor::Value, Some(LlamaTensor::ValueBias), kv_cols)?;
        let gate = rows(LlamaTensor::Gate, None, units.clone())?;
        let up = rows(LlamaTensor::Up, None, units.clone())?;
        let mut columns = |t: LlamaTensor, keep: Range<usize>| -> Result<Option<Linear<B>>, E> {
            let shape = t.shape(c);
            Ok(input_columns(
                &t.read(source, c, layer)?,
                shape[0],
                shape[1],
                keep,
                device,
            ))
        };
        let attention_output = columns(LlamaTensor::AttentionOutput, q_cols)?;
        let down = columns(LlamaTensor::Down, units)?;
        Ok(LlamaLayer {
            attention_norm: rms_norm(&LlamaTensor::AttentionNorm.read(source, c, layer)?, c.eps, device),
            query,
            key,
            value,
            attention_output,
            feed_forward_norm: rms_norm(&LlamaTensor::FeedForwardNorm.read(source, c, layer)?, c.eps, device),
            gate,
            up,
            down,
            kv_heads: kv_heads.len(),
            group: g,
            head_dim: hd,
        })
    }

    /// A whole block's tensors under their GGUF names (`[out, in]` matrices), as
    /// [`LlamaLayer::load`] reads them; `None` for a part.
    pub fn tensors(&self, layer: usize) -> Option<Vec<Named>> {
        let w = self.weights()?;
        let matrix = |t: LlamaTensor, m: Tensor<B, 2>| Named::of(t.name(layer), m.transpose());
        Some(vec![
            Named::of(LlamaTensor::AttentionNorm.name(layer), w.attention_norm),
            matrix(LlamaTensor::Query, w.query),
            matrix(LlamaTensor::Key, w.key),
            matrix(LlamaTensor::Value, w.value),
            matrix(LlamaTensor::AttentionOutput, w.output),
            Named::of(LlamaTensor::FeedForwardNorm.name(layer), w.feed_forward_norm),
            matrix(LlamaTensor::Gate, w.gate),
            matrix(LlamaTensor::Up, w.up),
            matrix(LlamaTensor::Down, w.down),
        ])
    }

    /// The block's weights, if it is a whole block without biases (`None` for a
    /// part that holds only some heads or units, or a block whose attention adds
    /// biases, which these weights do not carry).
    pub fn weights(&self) -> Option<LlamaWeights<B>> {
        if self.query.as_ref().is_some_and(|q| q.bias.is_some()) {
            return None;
        }
        let w = |l: &Option<Linear<B>>| l.as_ref().map(|l| l.weight.val());
        let weights = LlamaWeights {
            attention_norm: self.attention_norm.gamma.val(),
            query: w(&self.query)?,
            key: w(&self.key)?,
            value: w(&self.value)?,
            output: w(&self.attention_output)?,
            feed_forward_norm: self.feed_forward_norm.gamma.val(),
            gate: w(&self.gate)?,
            up: w(&self.up)?,
            down: w(&self.down)?,
        };
        let [hidden, _] = weights.query.dims();
        let whole = weights.output.dims()[0] == hidden && self.kv_heads * self.group * self.head_dim == hidden;
        whole.then_some(weights)
    }

    /// Runs the new tokens `x` (`[batch, seq, hidden]`, at positions
    /// `cache.len()..cache.len() + seq`) through the block, extending `cache`.
    /// `reduce` sums a partial result over the part's group.
    pub fn forward<E>(
        &self,
        x: Tensor<B, 3>,
        rope: &RotaryEncoding<B>,
        cache: &mut KvCache<B>,
        reduce: &mut dyn FnMut(Tensor<B, 3>) -> Result<Tensor<B, 3>, E>,
    ) -> Result<Tensor<B, 3>, E> {
        let start = cache.len();
        let [batch, seq, _] = x.dims();
        let attention = match (&self.query, &self.key, &self.value, &self.attention_output) {
            (Some(q), Some(k), Some(v), Some(o)) => {
                let (kvh, hd, g) = (self.kv_heads, self.head_dim, self.group);
                let h = self.attention_norm.forward(x.clone());
                let heads = |y: Tensor<B, 3>, n: usize| y.reshape([batch, seq, n, hd]).swap_dims(1, 2);
                let q = rope.apply(heads(q.forward(h.clone()), kvh * g), start);
                let k = rope.apply(heads(k.forward(h.clone()), kvh), start);
                let v = heads(v.forward(h), kvh);
                let (k, v) = cache.extend(k, v);
                let time = start + seq;
                // Each key/value head serves `g` query heads (HF's repeat_kv order).
                let expand = |t: Tensor<B, 4>| {
                    t.unsqueeze_dim::<5>(2)
                        .repeat_dim(2, g)
                        .reshape([batch, kvh * g, time, hd])
                };
                // Causal, aligned to the end: query i (at start + i) sees keys up to
                // its own position.
                let options = AttentionModuleOptions {
                    is_causal: seq > 1,
                    ..Default::default()
                };
                let context = attention(q, expand(k), expand(v), None, None, options);
                o.forward(context.swap_dims(1, 2).reshape([batch, seq, kvh * g * hd]))
            }
            _ => x.zeros_like(),
        };
        let x = x + reduce(attention)?;
        let ffn = match (&self.gate, &self.up, &self.down) {
            (Some(gate), Some(up), Some(down)) => {
                let h = self.feed_forward_norm.forward(x.clone());
                down.forward(silu(gate.forward(h.clone())) * up.forward(h))
            }
            _ => x.zeros_like(),
        };
        Ok(x + reduce(ffn)?)
    }
}

/// The final RMSNorm and the output projection, or one worker's rows of it.
#[derive(Module, Debug)]
pub struct LlamaHead<B: Backend> {
    norm: RmsNorm<B>,
    /// `[hidden, rows]`: this part's rows of the output (or embedding) matrix.
    projection: Linear<B>,
    /// First vocabulary id this part scores.
    first: usize,
}

impl<B: Backend> LlamaHead<B> {
    /// Reads part `index` of `of` of the vocabulary.
    pub fn load<E>(source: &mut Source<'_, E>, c: &LlamaConfig, part: Part, device: &B::Device) -> Result<Self, E> {
        let tensor = if c.separate_head {
            LlamaTensor::Output
        } else {
            LlamaTensor::TokenEmbedding
        };
        let all = tensor.read(source, c, 0)?;
        let rows = span(c.vocab, part.0, part.1);
        let slice = &all[rows.start * c.hidden..rows.end * c.hidden];
        let mut projection = LinearConfig::new(c.hidden, rows.len()).with_bias(false).init(device);
        projection.weight = param(transposed(slice, rows.len(), c.hidden, device));
        Ok(LlamaHead {
            norm: rms_norm(&LlamaTensor::OutputNorm.read(source, c, 0)?, c.eps, device),
            projection,
            first: rows.start,
        })
    }

    /// A whole head's tensors under their GGUF names: the final norm and, always
    /// as its own `output.weight`, the projection (a tied head that was trained
    /// apart from the embeddings is tied no more).
    pub fn tensors(&self) -> Vec<Named> {
        vec![
            Named::of(LlamaTensor::OutputNorm.name(0), self.norm.gamma.val()),
            Named::of(LlamaTensor::Output.name(0), self.projection.weight.val().transpose()),
        ]
    }

    /// The vocabulary ids this part scores.
    pub fn rows(&self) -> Range<usize> {
        self.first..self.first + self.projection.weight.dims()[1]
    }

    /// Logits of this part's vocabulary rows at every position of `x`:
    /// `[batch, seq, rows]`.
    pub fn forward_all(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.projection.forward(self.norm.forward(x))
    }

    /// Logits of this part's vocabulary rows for the last position of each row of
    /// `x`: `[batch, rows]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [batch, seq, _] = x.dims();
        let last = x.slice([0..batch, seq - 1..seq]);
        self.projection
            .forward(self.norm.forward(last))
            .reshape([batch, self.projection.weight.dims()[1]])
    }
}

fn rms_norm<B: Backend>(gamma: &[f32], eps: f64, device: &B::Device) -> RmsNorm<B> {
    let mut norm = RmsNormConfig::new(gamma.len()).with_epsilon(eps).init(device);
    norm.gamma = param(vector(gamma, device));
    norm
}
