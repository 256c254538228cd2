//! The llama-family decoder as served: the modules are `hetero_models::llama`'s
//! (one definition for training and serving); this file reads a GGUF file's
//! metadata into their configuration and checks a request's ids.

use burn::prelude::*;

pub use hetero_models::llama::{KvCache, LlamaConfig, LlamaEmbeddings, LlamaHead, LlamaLayer, LlamaTensor};

use crate::InferError;
use crate::gguf::Gguf;

/// Reads the decoder's shape from a GGUF file's metadata.
pub fn config_from_gguf(g: &Gguf) -> Result<LlamaConfig, InferError> {
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

/// The embeddings of `ids` (`[batch][seq]`, all rows the same length), after
/// checking every id is in the vocabulary.
pub fn embed<B: Backend>(
    e: &LlamaEmbeddings<B>,
    ids: &[Vec<u32>],
    device: &B::Device,
) -> Result<Tensor<B, 3>, InferError> {
    Ok(e.forward(crate::bert::ids_tensor(ids, e.vocab(), device)?))
}
