//! A BERT encoder (all-MiniLM-L6-v2, BERT-Base): embeddings, post-LayerNorm
//! blocks, and sentence-transformers' mean pooling with L2 normalisation.
//!
//! A block is loaded as one worker's *part*: a range of attention heads and a range
//! of FFN units. The whole ranges make a single-device block; balanced ranges over
//! a group make a tensor-parallel block, whose two partial sums (attention output,
//! FFN output) the caller's `reduce` adds across the group before the bias, the
//! residual and the LayerNorm, which every member then computes alike.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use burn::prelude::*;
use burn::tensor::activation::{gelu, softmax};

use crate::InferError;
use crate::parts::{Dense, join_heads, layer_norm, span, split_heads, vector};
use crate::weights::Weights;

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

/// A reduction across the workers that share a tensor-parallel block.
pub type Reduce<'a, B> = dyn FnMut(Tensor<B, 3>) -> Result<Tensor<B, 3>, InferError> + 'a;

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

    /// Reads an HF `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, InferError> {
        let text = std::fs::read_to_string(path).map_err(|e| InferError::weights(path, format!("cannot read: {e}")))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| InferError::weights(path, format!("not JSON: {e}")))?;
        let num = |key: &str| {
            json[key]
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| InferError::weights(path, format!("no {key}")))
        };
        let act = json["hidden_act"].as_str().unwrap_or("gelu");
        if act != "gelu" {
            return Err(InferError::weights(
                path,
                format!("hidden_act {act}; only gelu (BERT's) is built"),
            ));
        }
        let config = BertConfig {
            hidden: num("hidden_size")?,
            layers: num("num_hidden_layers")?,
            heads: num("num_attention_heads")?,
            intermediate: num("intermediate_size")?,
            vocab: num("vocab_size")?,
            max_positions: num("max_position_embeddings")?,
            type_vocab: num("type_vocab_size").unwrap_or(2),
            eps: json["layer_norm_eps"].as_f64().unwrap_or(1e-12),
            prefix: String::new(),
        };
        if config.heads == 0 || !config.hidden.is_multiple_of(config.heads) {
            return Err(InferError::weights(
                path,
                format!("{} heads do not divide hidden size {}", config.heads, config.hidden),
            ));
        }
        Ok(config)
    }

    /// Sets [`BertConfig::prefix`] to what `weights` uses.
    pub fn with_prefix_of(mut self, weights: &dyn Weights) -> Self {
        if weights.shape("embeddings.word_embeddings.weight").is_none()
            && weights.shape("bert.embeddings.word_embeddings.weight").is_some()
        {
            self.prefix = "bert.".into();
        }
        self
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Every tensor the encoder reads, with its shape: what a random-weights file
    /// for this shape must hold.
    pub fn tensor_shapes(&self) -> BTreeMap<String, Vec<usize>> {
        let (d, f) = (self.hidden, self.intermediate);
        let p = &self.prefix;
        let mut m = BTreeMap::new();
        m.insert(format!("{p}embeddings.word_embeddings.weight"), vec![self.vocab, d]);
        m.insert(
            format!("{p}embeddings.position_embeddings.weight"),
            vec![self.max_positions, d],
        );
        m.insert(
            format!("{p}embeddings.token_type_embeddings.weight"),
            vec![self.type_vocab, d],
        );
        m.insert(format!("{p}embeddings.LayerNorm.weight"), vec![d]);
        m.insert(format!("{p}embeddings.LayerNorm.bias"), vec![d]);
        for l in 0..self.layers {
            let b = format!("{p}encoder.layer.{l}.");
            for n in [
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
            ] {
                m.insert(format!("{b}{n}.weight"), vec![d, d]);
                m.insert(format!("{b}{n}.bias"), vec![d]);
            }
            m.insert(format!("{b}intermediate.dense.weight"), vec![f, d]);
            m.insert(format!("{b}intermediate.dense.bias"), vec![f]);
            m.insert(format!("{b}output.dense.weight"), vec![d, f]);
            m.insert(format!("{b}output.dense.bias"), vec![d]);
            for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
                m.insert(format!("{b}{n}.weight"), vec![d]);
                m.insert(format!("{b}{n}.bias"), vec![d]);
            }
        }
        m
    }
}

/// Word, position and token-type embeddings followed by a LayerNorm.
#[derive(Debug)]
pub struct BertEmbeddings<B: Backend> {
    words: Tensor<B, 2>,
    positions: Tensor<B, 2>,
    token_type: Tensor<B, 1>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    eps: f64,
    vocab: usize,
    max_positions: usize,
}

impl<B: Backend> BertEmbeddings<B> {
    /// Loads the embedding tables.
    pub fn load(w: &dyn Weights, c: &BertConfig, device: &B::Device) -> Result<Self, InferError> {
        let (p, d) = (&c.prefix, c.hidden);
        let table = |name: &str, rows: usize| -> Result<Tensor<B, 2>, InferError> {
            let v = w.expect(&format!("{p}embeddings.{name}.weight"), &[rows, d])?;
            Ok(Tensor::from_data(TensorData::new(v, [rows, d]), device))
        };
        let types = w.expect(
            &format!("{p}embeddings.token_type_embeddings.weight"),
            &[c.type_vocab, d],
        )?;
        Ok(BertEmbeddings {
            words: table("word_embeddings", c.vocab)?,
            positions: table("position_embeddings", c.max_positions)?,
            token_type: vector(&types[..d], device),
            gamma: vector(&w.expect(&format!("{p}embeddings.LayerNorm.weight"), &[d])?, device),
            beta: vector(&w.expect(&format!("{p}embeddings.LayerNorm.bias"), &[d])?, device),
            eps: c.eps,
            vocab: c.vocab,
            max_positions: c.max_positions,
        })
    }

    /// `ids` is `[batch][seq]` (all rows the same length); returns `[batch, seq, hidden]`.
    pub fn forward(&self, ids: &[Vec<u32>]) -> Result<Tensor<B, 3>, InferError> {
        let (batch, seq) = (ids.len(), ids.first().map_or(0, Vec::len));
        if seq > self.max_positions {
            return Err(InferError::Request(format!(
                "{seq} tokens; this encoder reads at most {}",
                self.max_positions
            )));
        }
        if let Some(bad) = ids.iter().flatten().find(|&&t| t as usize >= self.vocab) {
            return Err(InferError::Request(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab
            )));
        }
        let device = self.words.device();
        let flat: Vec<i64> = ids.iter().flatten().map(|&t| t as i64).collect();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(flat, [batch * seq]), &device);
        let d = self.words.dims()[1];
        let words = self.words.clone().select(0, index).reshape([batch, seq, d]);
        let positions = self.positions.clone().narrow(0, 0, seq).unsqueeze::<3>();
        let x = words + positions + self.token_type.clone().unsqueeze();
        Ok(layer_norm(x, &self.gamma, &self.beta, self.eps))
    }
}

/// One post-LN block, or one worker's part of it.
#[derive(Debug)]
pub struct BertLayer<B: Backend> {
    heads: Range<usize>,
    head_dim: usize,
    q: Dense<B>,
    k: Dense<B>,
    v: Dense<B>,
    o: Dense<B>,
    o_bias: Tensor<B, 1>,
    ln1: (Tensor<B, 1>, Tensor<B, 1>),
    ffn_in: Dense<B>,
    ffn_out: Dense<B>,
    ffn_bias: Tensor<B, 1>,
    ln2: (Tensor<B, 1>, Tensor<B, 1>),
    eps: f64,
}

impl<B: Backend> BertLayer<B> {
    /// Loads block `layer`'s part `index` of `of` (heads and FFN units split evenly).
    pub fn load(
        w: &dyn Weights,
        c: &BertConfig,
        layer: usize,
        (index, of): (usize, usize),
        device: &B::Device,
    ) -> Result<Self, InferError> {
        let (d, f, hd) = (c.hidden, c.intermediate, c.head_dim());
        let b = format!("{}encoder.layer.{layer}.", c.prefix);
        let get = |n: &str, shape: &[usize]| w.expect(&format!("{b}{n}"), shape);
        let heads = span(c.heads, index, of);
        let cols = heads.start * hd..heads.end * hd;
        let units = span(f, index, of);
        let column = |n: &str, out: usize, keep: Range<usize>| -> Result<Dense<B>, InferError> {
            let weight = get(&format!("{n}.weight"), &[out, d])?;
            let bias = get(&format!("{n}.bias"), &[out])?;
            Ok(Dense::columns(&weight, Some(&bias), out, d, keep, device))
        };
        let norm = |n: &str| -> Result<(Tensor<B, 1>, Tensor<B, 1>), InferError> {
            Ok((
                vector(&get(&format!("{n}.weight"), &[d])?, device),
                vector(&get(&format!("{n}.bias"), &[d])?, device),
            ))
        };
        Ok(BertLayer {
            q: column("attention.self.query", d, cols.clone())?,
            k: column("attention.self.key", d, cols.clone())?,
            v: column("attention.self.value", d, cols.clone())?,
            o: Dense::rows(&get("attention.output.dense.weight", &[d, d])?, d, d, cols, device),
            o_bias: vector(&get("attention.output.dense.bias", &[d])?, device),
            ln1: norm("attention.output.LayerNorm")?,
            ffn_in: column("intermediate.dense", f, units.clone())?,
            ffn_out: Dense::rows(&get("output.dense.weight", &[d, f])?, d, f, units, device),
            ffn_bias: vector(&get("output.dense.bias", &[d])?, device),
            ln2: norm("output.LayerNorm")?,
            heads,
            head_dim: hd,
            eps: c.eps,
        })
    }

    /// `x`: `[batch, seq, hidden]`; `mask`: `[batch, 1, 1, seq]`, 0 for tokens and a
    /// large negative number for padding.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        mask: &Tensor<B, 4>,
        reduce: &mut Reduce<B>,
    ) -> Result<Tensor<B, 3>, InferError> {
        let attention = if self.heads.is_empty() {
            x.zeros_like()
        } else {
            let h = self.heads.len();
            let q = split_heads(self.q.forward(x.clone()), h, self.head_dim);
            let k = split_heads(self.k.forward(x.clone()), h, self.head_dim);
            let v = split_heads(self.v.forward(x.clone()), h, self.head_dim);
            let scores = q.matmul(k.swap_dims(2, 3)) / (self.head_dim as f64).sqrt() + mask.clone();
            self.o.forward(join_heads(softmax(scores, 3).matmul(v)))
        };
        let attention = reduce(attention)? + self.o_bias.clone().unsqueeze();
        let x = layer_norm(x + attention, &self.ln1.0, &self.ln1.1, self.eps);
        let ffn = if self.ffn_in.out_width() == 0 {
            x.zeros_like()
        } else {
            self.ffn_out.forward(gelu(self.ffn_in.forward(x.clone())))
        };
        let ffn = reduce(ffn)? + self.ffn_bias.clone().unsqueeze();
        Ok(layer_norm(x + ffn, &self.ln2.0, &self.ln2.1, self.eps))
    }
}

/// The additive attention mask for `lengths` real tokens in rows padded to `seq`.
pub fn padding_mask<B: Backend>(lengths: &[usize], seq: usize, device: &B::Device) -> Tensor<B, 4> {
    let values: Vec<f32> = lengths
        .iter()
        .flat_map(|&n| (0..seq).map(move |j| if j < n { 0.0 } else { -1e9 }))
        .collect();
    Tensor::<B, 2>::from_data(TensorData::new(values, [lengths.len(), seq]), device)
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
