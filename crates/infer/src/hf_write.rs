//! A llama decoder written out as a Hugging Face folder — `config.json`,
//! safetensors shards with their index, `tokenizer.json`,
//! `tokenizer_config.json` (the chat template) and `generation_config.json` —
//! that `transformers` and [`crate::models::open`] both read.
//!
//! ## Design
//! The tensors are read one at a time as f32 (a quantized file's are
//! dequantised: the folder holds what Hetero's f32 path computes with), their
//! query and key rows put back into `transformers`' rotary order
//! ([`crate::hf::adjacent_pairs`]), and stored as F32, F16 or BF16. Shards are
//! planned from the shapes before anything is written, so the names
//! (`model-00001-of-00003.safetensors`) are final; each shard is written whole
//! and renamed into place, and `config.json` comes last: a folder with it is
//! complete.

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use hetero_models::llama::{LlamaConfig, LlamaTensor};

use crate::InferError;
use crate::hf::{adjacent_pairs, hf_name, rotated_heads};
use crate::models::Model;
use crate::runtime::Arch;
use crate::tensor_files::{INDEX_FILE, SINGLE_FILE};
use crate::weights::{safetensors_file, write_atomically};

/// How the folder stores its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreAs {
    /// 32-bit floats: exactly the values Hetero's f32 path uses.
    F32,
    /// IEEE half floats.
    F16,
    /// bfloat16 (what most hub checkpoints hold).
    BF16,
}

impl StoreAs {
    /// The type named `name` (`f32`, `f16`, `bf16`).
    pub fn from_name(name: &str) -> Option<StoreAs> {
        match name.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(StoreAs::F32),
            "f16" | "float16" => Some(StoreAs::F16),
            "bf16" | "bfloat16" => Some(StoreAs::BF16),
            _ => None,
        }
    }

    fn width(self) -> usize {
        match self {
            StoreAs::F32 => 4,
            StoreAs::F16 | StoreAs::BF16 => 2,
        }
    }

    /// The safetensors dtype and `torch_dtype` names.
    fn names(self) -> (&'static str, &'static str) {
        match self {
            StoreAs::F32 => ("F32", "float32"),
            StoreAs::F16 => ("F16", "float16"),
            StoreAs::BF16 => ("BF16", "bfloat16"),
        }
    }

    fn extend(self, out: &mut Vec<u8>, values: &[f32]) {
        match self {
            StoreAs::F32 => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
            StoreAs::F16 => out.extend(values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes())),
            StoreAs::BF16 => out.extend(values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes())),
        }
    }
}

/// What [`write_folder`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// The folder.
    pub dir: PathBuf,
    /// Safetensors files.
    pub shards: usize,
    /// Tensors in them.
    pub tensors: usize,
    /// Bytes of weights.
    pub bytes: u64,
}

/// Writes `model` (a llama decoder with its tokenizer) into the new folder `dir`
/// as `store` values, cut into shards of at most `shard_bytes` (a tensor larger
/// than that is a shard alone). A folder that already holds files is refused.
pub fn write_folder(
    model: &Model,
    dir: &Path,
    store: StoreAs,
    shard_bytes: u64,
    progress: &mut dyn FnMut(&str),
) -> Result<Written, InferError> {
    let Arch::Llama(config) = &model.arch else {
        return Err(InferError::Config(format!(
            "{}: only an undecoupled llama decoder is written as a Hugging Face folder",
            model.name
        )));
    };
    let tokenizer = model.tokenizer()?;
    if dir.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        return Err(InferError::Config(format!(
            "{} already holds files; write into a new or empty folder",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| InferError::weights(dir, format!("cannot create: {e}")))?;

    let plan = plan_shards(config, store, shard_bytes);
    let file_name = |i: usize| match plan.len() {
        1 => SINGLE_FILE.to_string(),
        n => format!("model-{:05}-of-{n:05}.safetensors", i + 1),
    };
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (i, shard) in plan.iter().enumerate() {
        progress(&format!("writing {} ({} of {})", file_name(i), i + 1, plan.len()));
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for &(t, layer) in shard {
            let mut values = model.weights.read(&t.name(layer))?.values;
            if let Some(heads) = rotated_heads(t, config) {
                let cols = t.shape(config).get(1).copied().unwrap_or(1);
                values = adjacent_pairs(&values, heads, cols, false);
            }
            let start = data.len();
            store.extend(&mut data, &values);
            let name = hf_name(t, layer);
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": store.names().0, "shape": t.shape(config), "data_offsets": [start, data.len()]}),
            );
            weight_map.insert(name, file_name(i).into());
        }
        let bytes = safetensors_file(&header, data);
        total += bytes.len() as u64;
        write_atomically(&dir.join(file_name(i)), &bytes)?;
    }
    if plan.len() > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&dir.join(INDEX_FILE), &index)?;
    }
    write_atomically(&dir.join("tokenizer.json"), tokenizer.to_json()?.as_bytes())?;
    let token = |id: Option<&u32>| id.and_then(|&i| tokenizer.token(i));
    let eos = token(tokenizer.stop.first());
    let mut tokenizer_config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.context,
        "add_bos_token": false,
        "add_eos_token": false,
        "eos_token": eos,
    });
    if let Some((source, bos, eos)) = tokenizer.chat.model_template() {
        tokenizer_config["chat_template"] = source.into();
        if !bos.is_empty() {
            tokenizer_config["bos_token"] = bos.into();
        }
        if !eos.is_empty() {
            tokenizer_config["eos_token"] = eos.into();
        }
    }
    write_json(&dir.join("tokenizer_config.json"), &tokenizer_config)?;
    write_json(
        &dir.join("generation_config.json"),
        &serde_json::json!({"eos_token_id": tokenizer.stop}),
    )?;
    // Last: a folder with config.json is complete.
    write_json(&dir.join("config.json"), &config_json(config, store))?;
    Ok(Written {
        dir: dir.to_path_buf(),
        shards: plan.len(),
        tensors: plan.iter().map(Vec::len).sum(),
        bytes: total,
    })
}

/// The tensors of `config` cut into consecutive shards of at most `limit` bytes.
fn plan_shards(config: &LlamaConfig, store: StoreAs, limit: u64) -> Vec<Vec<(LlamaTensor, usize)>> {
    let mut shards: Vec<Vec<(LlamaTensor, usize)>> = vec![vec![]];
    let mut size = 0u64;
    for (t, layer) in config.tensors() {
        let bytes = (t.shape(config).iter().product::<usize>() * store.width()) as u64;
        if size > 0 && size + bytes > limit {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().expect("one shard at least").push((t, layer));
        size += bytes;
    }
    shards
}

/// `config` as a `transformers` `LlamaConfig`.
fn config_json(c: &LlamaConfig, store: StoreAs) -> serde_json::Value {
    // Biases on the query, key and value projections alone are Qwen2's layout.
    let (architecture, model_type) = match c.attention_bias {
        true => ("Qwen2ForCausalLM", "qwen2"),
        false => ("LlamaForCausalLM", "llama"),
    };
    serde_json::json!({
        "architectures": [architecture],
        "model_type": model_type,
        "use_sliding_window": false,
        "hidden_size": c.hidden,
        "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads,
        "num_key_value_heads": c.kv_heads,
        "intermediate_size": c.ffn,
        "vocab_size": c.vocab,
        "max_position_embeddings": c.context,
        "rope_theta": c.rope_base,
        "rms_norm_eps": c.eps,
        "tie_word_embeddings": !c.separate_head,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "rope_scaling": null,
        "torch_dtype": store.names().1,
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), InferError> {
    write_atomically(path, serde_json::to_string_pretty(value).expect("JSON").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_hold_whole_tensors_under_the_limit() {
        let c = LlamaConfig::smol_lm2();
        let plan = plan_shards(&c, StoreAs::BF16, 60 << 20);
        assert_eq!(plan.iter().map(Vec::len).sum::<usize>(), c.tensors().len());
        for shard in &plan {
            let bytes: usize = shard
                .iter()
                .map(|(t, _)| t.shape(&c).iter().product::<usize>() * 2)
                .sum();
            assert!(bytes <= 60 << 20 || shard.len() == 1, "{bytes}");
        }
        assert!(plan.len() >= 4, "{}", plan.len());
        assert_eq!(plan_shards(&c, StoreAs::F32, u64::MAX).len(), 1);
    }
}
