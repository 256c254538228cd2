//! The BERT encoder as served: the modules are `hetero_models::bert`'s (one
//! definition for training and serving); this file adds what serving needs around
//! them — reading an HF `config.json`, checking a request's ids, and the shape of
//! the reduction a tensor-parallel block calls.

use std::path::Path;

use burn::prelude::*;

pub use hetero_models::bert::{BertConfig, BertEmbeddings, BertLayer, BertTensor, mean_pool, padding_mask};

use crate::InferError;

/// A reduction across the workers that share a tensor-parallel block.
pub type Reduce<'a, B> = dyn FnMut(Tensor<B, 3>) -> Result<Tensor<B, 3>, InferError> + 'a;

/// Reads an HF `config.json`.
pub fn config_from_file(path: &Path) -> Result<BertConfig, InferError> {
    let text = std::fs::read_to_string(path).map_err(|e| InferError::weights(path, format!("cannot read: {e}")))?;
    BertConfig::from_hf_json(&text).map_err(|reason| InferError::weights(path, reason))
}

/// The embeddings of `ids` (`[batch][seq]`, all rows the same length), after
/// checking the rows fit the positions.
pub fn embed<B: Backend>(
    e: &BertEmbeddings<B>,
    ids: &[Vec<u32>],
    device: &B::Device,
) -> Result<Tensor<B, 3>, InferError> {
    let (vocab, max_positions) = e.limits();
    let seq = ids.first().map_or(0, Vec::len);
    if seq > max_positions {
        return Err(InferError::Request(format!(
            "{seq} tokens; this encoder reads at most {max_positions}"
        )));
    }
    Ok(e.forward(ids_tensor(ids, vocab, device)?))
}

/// `ids` (`[batch][seq]`, all rows the same length) as a tensor, after checking
/// every id is below `vocab`.
pub(crate) fn ids_tensor<B: Backend>(
    ids: &[Vec<u32>],
    vocab: usize,
    device: &B::Device,
) -> Result<Tensor<B, 2, Int>, InferError> {
    if let Some(bad) = ids.iter().flatten().find(|&&t| t as usize >= vocab) {
        return Err(InferError::Request(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    let (batch, seq) = (ids.len(), ids.first().map_or(0, Vec::len));
    let flat: Vec<i64> = ids.iter().flatten().map(|&t| t as i64).collect();
    Ok(Tensor::from_data(TensorData::new(flat, [batch, seq]), device))
}
