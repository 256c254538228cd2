//! The llama-family decoder as served: the modules are `hetero_models::llama`'s
//! (one definition for training and serving); this file reads a GGUF file's
//! metadata into their configuration (bounded: every number that sizes a loop or a
//! table is checked) and checks a request's ids.

use burn::prelude::*;

pub use hetero_models::llama::{KvCache, LlamaConfig, LlamaEmbeddings, LlamaHead, LlamaLayer, LlamaTensor};

use crate::InferError;
use crate::gguf::Gguf;
use crate::weights::Weights;

// Bounds on what a configuration may say: far beyond any released model, they
// bound the loops and tables the numbers size.
/// The widest hidden state read.
pub const MAX_WIDTH: u64 = 1 << 16;
/// The most blocks.
pub const MAX_LAYERS: u64 = 1 << 10;
/// The most heads (query or key/value).
pub const MAX_HEADS: u64 = 1 << 10;
/// The widest feed-forward.
pub const MAX_FFN: u64 = 1 << 20;
/// The largest vocabulary.
pub const MAX_VOCAB: u64 = 1 << 24;
/// The longest context.
pub const MAX_CONTEXT: u64 = 1 << 24;

/// Reads the decoder's shape from a GGUF file's metadata.
pub fn config_from_gguf(g: &Gguf) -> Result<LlamaConfig, InferError> {
    let arch = g.meta("general.architecture")?.as_str().unwrap_or_default().to_string();
    if arch != "llama" {
        return Err(InferError::Config(format!(
            "architecture {arch:?}; only llama is built"
        )));
    }
    let n = |k: &str, max: u64| {
        let key = format!("llama.{k}");
        match g.meta_u64(&key)? {
            v if (1..=max).contains(&v) => Ok(v as usize),
            v => Err(InferError::weights(
                g.path(),
                format!("metadata {key} = {v}; it must be from 1 to {max}"),
            )),
        }
    };
    let vocab = match g.meta_u64("llama.vocab_size") {
        Ok(_) => n("vocab_size", MAX_VOCAB)?,
        Err(_) => g.meta_strings("tokenizer.ggml.tokens")?.len(),
    };
    let config = LlamaConfig {
        hidden: n("embedding_length", MAX_WIDTH)?,
        layers: n("block_count", MAX_LAYERS)?,
        heads: n("attention.head_count", MAX_HEADS)?,
        kv_heads: match g.metadata.contains_key("llama.attention.head_count_kv") {
            true => n("attention.head_count_kv", MAX_HEADS)?,
            false => n("attention.head_count", MAX_HEADS)?,
        },
        ffn: n("feed_forward_length", MAX_FFN)?,
        vocab,
        context: n("context_length", MAX_CONTEXT)?,
        rope_base: g.meta_f64("llama.rope.freq_base").unwrap_or(10_000.0) as f32,
        eps: g.meta_f64("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        separate_head: g.tensors.contains_key("output.weight"),
        attention_bias: g.tensors.contains_key("blk.0.attn_q.bias"),
    };
    check_heads(&config).map_err(InferError::Config)?;
    Ok(config)
}

/// Heads divide the width, key/value heads divide the heads, and a head's width
/// is even (rotary positions rotate pairs).
pub fn check_heads(c: &LlamaConfig) -> Result<(), String> {
    let fits = c.heads > 0
        && c.kv_heads > 0
        && c.heads.is_multiple_of(c.kv_heads)
        && c.hidden.is_multiple_of(c.heads)
        && c.head_dim().is_multiple_of(2);
    match fits {
        true => Ok(()),
        false => Err(format!(
            "{} heads, {} key/value heads, width {}: heads must divide the width into even head widths, and key/value heads the heads",
            c.heads, c.kv_heads, c.hidden
        )),
    }
}

/// The embeddings of `ids` (`[batch][seq]`, all rows the same length), after
/// checking every id is in the vocabulary.
pub fn embed<B: Backend>(
    e: &LlamaEmbeddings<B>,
    ids: &[Vec<u32>],
    device: &B::Device,
) -> Result<Tensor<B, 3>, InferError> {
    Ok(e.forward(crate::bert::ids_tensor(ids, e.vocab(), device)?))
}
