//! A llama-family decoder (SmolLM2): RMSNorm, rotary positions, grouped-query
//! attention with a KV cache, and a SwiGLU FFN; weights named as in GGUF files.
//!
//! As in [`crate::bert`], a block is loaded as one worker's part: a range of
//! *key/value* heads (with the query heads that share them, so grouped-query
//! attention never crosses workers) and a range of FFN units. The output head can be
//! split by vocabulary rows.
//!
//! Rotary positions: llama.cpp's converter permutes the Q and K rows so that
//! rotation pairs are adjacent, `(2i, 2i + 1)`; burn's [`RotaryEncoding`] rotates
//! exactly those pairs, so GGUF weights are used as stored.

use std::collections::BTreeMap;
use std::ops::Range;

use burn::nn::{RotaryEncoding, RotaryEncodingConfig};
use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};

use crate::InferError;
use crate::bert::Reduce;
use crate::gguf::Gguf;
use crate::parts::{Dense, join_heads, rms_norm, span, split_heads, transposed, vector};
use crate::weights::Weights;

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
        }
    }

    /// Reads the shape from a GGUF file's metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Self, InferError> {
        let arch = g.meta("general.architecture")?.as_str().unwrap_or_default().to_string();
        if arch != "llama" {
            return Err(InferError::Config(format!(
                "architecture {arch:?}; only llama is built"
            )));
        }
        let n = |k: &str| g.meta_u64(&format!("llama.{k}")).map(|v| v as usize);
        let vocab = match g.meta_u64("llama.vocab_size") {
            Ok(v) => v as usize,
            Err(_) => g.meta_strings("tokenizer.ggml.tokens")?.len(),
        };
        let config = LlamaConfig {
            hidden: n("embedding_length")?,
            layers: n("block_count")?,
            heads: n("attention.head_count")?,
            kv_heads: n("attention.head_count_kv").unwrap_or(n("attention.head_count")?),
            ffn: n("feed_forward_length")?,
            vocab,
            context: n("context_length")?,
            rope_base: g.meta_f64("llama.rope.freq_base").unwrap_or(10_000.0) as f32,
            eps: g.meta_f64("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            separate_head: g.tensors.contains_key("output.weight"),
        };
        if config.heads == 0
            || config.kv_heads == 0
            || !config.heads.is_multiple_of(config.kv_heads)
            || !config.hidden.is_multiple_of(config.heads)
        {
            return Err(InferError::Config(format!(
                "{} heads, {} key/value heads, width {}: heads must divide the width and key/value heads the heads",
                config.heads, config.kv_heads, config.hidden
            )));
        }
        Ok(config)
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Every tensor the decoder reads, with its row-major shape.
    pub fn tensor_shapes(&self) -> BTreeMap<String, Vec<usize>> {
        let (d, f, kv) = (self.hidden, self.ffn, self.kv_heads * self.head_dim());
        let mut m = BTreeMap::new();
        m.insert("token_embd.weight".into(), vec![self.vocab, d]);
        m.insert("output_norm.weight".into(), vec![d]);
        if self.separate_head {
            m.insert("output.weight".into(), vec![self.vocab, d]);
        }
        for l in 0..self.layers {
            let b = format!("blk.{l}.");
            m.insert(format!("{b}attn_norm.weight"), vec![d]);
            m.insert(format!("{b}ffn_norm.weight"), vec![d]);
            m.insert(format!("{b}attn_q.weight"), vec![d, d]);
            m.insert(format!("{b}attn_k.weight"), vec![kv, d]);
            m.insert(format!("{b}attn_v.weight"), vec![kv, d]);
            m.insert(format!("{b}attn_output.weight"), vec![d, d]);
            m.insert(format!("{b}ffn_gate.weight"), vec![f, d]);
            m.insert(format!("{b}ffn_up.weight"), vec![f, d]);
            m.insert(format!("{b}ffn_down.weight"), vec![d, f]);
        }
        m
    }

    /// The rotary encoding every block shares.
    pub fn rope<B: Backend>(&self, max_positions: usize, device: &B::Device) -> RotaryEncoding<B> {
        RotaryEncodingConfig::new(max_positions.min(self.context).max(1), self.head_dim())
            .with_theta(self.rope_base)
            .init(device)
    }
}

/// The token embedding table.
#[derive(Debug)]
pub struct LlamaEmbeddings<B: Backend> {
    table: Tensor<B, 2>,
}

impl<B: Backend> LlamaEmbeddings<B> {
    /// Loads `token_embd.weight`.
    pub fn load(w: &dyn Weights, c: &LlamaConfig, device: &B::Device) -> Result<Self, InferError> {
        let v = w.expect("token_embd.weight", &[c.vocab, c.hidden])?;
        Ok(LlamaEmbeddings {
            table: Tensor::from_data(TensorData::new(v, [c.vocab, c.hidden]), device),
        })
    }

    /// `ids` is `[batch][seq]`; returns `[batch, seq, hidden]`.
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<Tensor<B, 3>, InferError> {
        let [vocab, d] = self.table.dims();
        let (batch, seq) = (ids.len(), ids.first().map_or(0, Vec::len));
        if let Some(bad) = ids.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(InferError::Request(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let flat: Vec<i64> = ids.iter().flatten().map(|&t| t as i64).collect();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(flat, [batch * seq]), &self.table.device());
        Ok(self.table.clone().select(0, index).reshape([batch, seq, d]))
    }
}

/// One decoder block, or one worker's part of it, with its KV cache.
#[derive(Debug)]
pub struct LlamaLayer<B: Backend> {
    kv_heads: Range<usize>,
    group: usize,
    head_dim: usize,
    attn_norm: Tensor<B, 1>,
    q: Dense<B>,
    k: Dense<B>,
    v: Dense<B>,
    o: Dense<B>,
    ffn_norm: Tensor<B, 1>,
    gate: Dense<B>,
    up: Dense<B>,
    down: Dense<B>,
    eps: f64,
    /// Keys and values of the positions seen so far: `[batch, kv heads, time, head_dim]`.
    cache: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
}

impl<B: Backend> LlamaLayer<B> {
    /// Loads block `layer`'s part `index` of `of`.
    pub fn load(
        w: &dyn Weights,
        c: &LlamaConfig,
        layer: usize,
        (index, of): (usize, usize),
        device: &B::Device,
    ) -> Result<Self, InferError> {
        let (d, f, hd, g) = (c.hidden, c.ffn, c.head_dim(), c.group());
        let kvd = c.kv_heads * hd;
        let b = format!("blk.{layer}.");
        let get = |n: &str, shape: &[usize]| w.expect(&format!("{b}{n}.weight"), shape);
        let kv_heads = span(c.kv_heads, index, of);
        let kv_cols = kv_heads.start * hd..kv_heads.end * hd;
        let q_cols = kv_heads.start * g * hd..kv_heads.end * g * hd;
        let units = span(f, index, of);
        Ok(LlamaLayer {
            attn_norm: vector(&get("attn_norm", &[d])?, device),
            q: Dense::columns(&get("attn_q", &[d, d])?, None, d, d, q_cols.clone(), device),
            k: Dense::columns(&get("attn_k", &[kvd, d])?, None, kvd, d, kv_cols.clone(), device),
            v: Dense::columns(&get("attn_v", &[kvd, d])?, None, kvd, d, kv_cols, device),
            o: Dense::rows(&get("attn_output", &[d, d])?, d, d, q_cols, device),
            ffn_norm: vector(&get("ffn_norm", &[d])?, device),
            gate: Dense::columns(&get("ffn_gate", &[f, d])?, None, f, d, units.clone(), device),
            up: Dense::columns(&get("ffn_up", &[f, d])?, None, f, d, units.clone(), device),
            down: Dense::rows(&get("ffn_down", &[d, f])?, d, f, units, device),
            kv_heads,
            group: g,
            head_dim: hd,
            eps: c.eps,
            cache: None,
        })
    }

    /// Forgets the cached keys and values (a new sequence starts).
    pub fn reset(&mut self) {
        self.cache = None;
    }

    /// Positions held in the cache.
    pub fn cached(&self) -> usize {
        self.cache.as_ref().map_or(0, |(k, _)| k.dims()[2])
    }

    /// Runs the new tokens `x` (`[batch, seq, hidden]`, at positions
    /// `cached()..cached() + seq`) through the block, extending the cache.
    pub fn forward(
        &mut self,
        x: Tensor<B, 3>,
        rope: &RotaryEncoding<B>,
        reduce: &mut Reduce<B>,
    ) -> Result<Tensor<B, 3>, InferError> {
        let start = self.cached();
        let [batch, seq, _] = x.dims();
        let attention = if self.kv_heads.is_empty() {
            x.zeros_like()
        } else {
            let (kvh, hd, g) = (self.kv_heads.len(), self.head_dim, self.group);
            let h = rms_norm(x.clone(), &self.attn_norm, self.eps);
            let q = rope.apply(split_heads(self.q.forward(h.clone()), kvh * g, hd), start);
            let k = rope.apply(split_heads(self.k.forward(h.clone()), kvh, hd), start);
            let v = split_heads(self.v.forward(h), kvh, hd);
            let (k, v) = match self.cache.take() {
                Some((ck, cv)) => (Tensor::cat(vec![ck, k], 2), Tensor::cat(vec![cv, v], 2)),
                None => (k, v),
            };
            self.cache = Some((k.clone(), v.clone()));
            let time = start + seq;
            // Each key/value head serves `g` query heads (HF's repeat_kv order).
            let expand = |t: Tensor<B, 4>| {
                t.unsqueeze_dim::<5>(2)
                    .repeat_dim(2, g)
                    .reshape([batch, kvh * g, time, hd])
            };
            let scores = q.matmul(expand(k).swap_dims(2, 3)) / (hd as f64).sqrt();
            let scores = if seq > 1 {
                scores + causal_mask(seq, start, &x.device())
            } else {
                scores
            };
            self.o.forward(join_heads(softmax(scores, 3).matmul(expand(v))))
        };
        let x = x + reduce(attention)?;
        let ffn = if self.gate.out_width() == 0 {
            x.zeros_like()
        } else {
            let h = rms_norm(x.clone(), &self.ffn_norm, self.eps);
            self.down
                .forward(silu(self.gate.forward(h.clone())) * self.up.forward(h))
        };
        Ok(x + reduce(ffn)?)
    }
}

/// `[1, 1, seq, start + seq]`: query `i` (at position `start + i`) sees keys up to
/// its own position.
fn causal_mask<B: Backend>(seq: usize, start: usize, device: &B::Device) -> Tensor<B, 4> {
    let time = start + seq;
    let values: Vec<f32> = (0..seq)
        .flat_map(|i| (0..time).map(move |j| if j <= start + i { 0.0 } else { -1e9 }))
        .collect();
    Tensor::<B, 2>::from_data(TensorData::new(values, [seq, time]), device).unsqueeze::<4>()
}

/// The final RMSNorm and the output projection, or one worker's rows of it.
#[derive(Debug)]
pub struct LlamaHead<B: Backend> {
    norm: Tensor<B, 1>,
    /// `[hidden, rows]`: the transposed slice of the output (or embedding) matrix.
    weight: Tensor<B, 2>,
    /// The vocabulary ids this part scores.
    pub rows: Range<usize>,
    eps: f64,
}

impl<B: Backend> LlamaHead<B> {
    /// Loads part `index` of `of` of the vocabulary.
    pub fn load(
        w: &dyn Weights,
        c: &LlamaConfig,
        (index, of): (usize, usize),
        device: &B::Device,
    ) -> Result<Self, InferError> {
        let name = if c.separate_head {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let all = w.expect(name, &[c.vocab, c.hidden])?;
        let rows = span(c.vocab, index, of);
        let slice = all[rows.start * c.hidden..rows.end * c.hidden].to_vec();
        Ok(LlamaHead {
            norm: vector(&w.expect("output_norm.weight", &[c.hidden])?, device),
            weight: transposed(&slice, rows.len(), c.hidden, device),
            rows,
            eps: c.eps,
        })
    }

    /// Logits of this part's vocabulary rows for the last position of each row of
    /// `x`: `[batch, rows]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [batch, seq, d] = x.dims();
        let last = x.slice([0..batch, seq - 1..seq]).reshape([batch, d]);
        let h = rms_norm(last.unsqueeze::<3>(), &self.norm, self.eps).reshape([batch, d]);
        h.matmul(self.weight.clone())
    }
}
