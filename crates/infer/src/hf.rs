//! Hugging Face model folders of the llama family — Llama, Mistral, Qwen2, SmolLM —
//! opened as the same decoder a GGUF file gives, and the local Hugging Face cache
//! (`models--org--name/snapshots/…`) resolved by a model's hub name.
//!
//! ## Design
//! The decoder's modules know their tensors by GGUF names
//! ([`hetero_models::llama::LlamaTensor`]); a folder names them as `transformers`
//! does. [`HfLlamaWeights`] is the translation, a [`Weights`] over the folder's
//! safetensors ([`crate::tensor_files`]) that answers to GGUF names — so every
//! placement, tensor-parallel slicing included, loads a folder through the code
//! that loads a GGUF file.
//!
//! One translation is more than a name. `transformers` rotates each head's two
//! halves (`rotate_half`: dimension `i` pairs with `i + head_dim/2`); llama.cpp's
//! converter permutes the query and key rows so that pairs are adjacent
//! (`2i, 2i + 1`), which is what burn's rotary encoding rotates. The same row
//! permutation is applied here as the tensors are read ([`adjacent_pairs`]), and
//! undone when a model is written out as a folder ([`crate::hf_write`]).
//!
//! Qwen2 is a llama whose query, key and value projections add biases
//! ([`LlamaConfig::attention_bias`]); the query and key biases are reordered with
//! their rows.
//!
//! A configuration this decoder would run *wrongly* is refused by name, never
//! approximated: rope scaling (Llama 3.1's long context), MLP biases, an
//! activation other than SiLU, a head width other than `hidden / heads`. Mistral's
//! sliding window is honoured by serving at most that many positions.

use std::path::{Path, PathBuf};

use hetero_models::llama::{LlamaConfig, LlamaTensor};

use crate::InferError;
use crate::llama::{MAX_CONTEXT, MAX_FFN, MAX_HEADS, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH, check_heads};
use crate::weights::{Loaded, Weights, read_json};

/// The `model_type`s of `config.json` opened as a llama decoder.
pub const LLAMA_FAMILY: [&str; 3] = ["llama", "mistral", "qwen2"];

/// The largest `config.json` read.
const MAX_CONFIG: u64 = 4 << 20;

/// A folder's `config.json`, as JSON (a bounded read).
pub fn read_config(dir: &Path) -> Result<serde_json::Value, InferError> {
    let path = dir.join("config.json");
    let bad = |why: String| InferError::weights(&path, why);
    read_json(&path, MAX_CONFIG)
        .map_err(bad)?
        .ok_or_else(|| bad("missing".into()))
}

/// The decoder's shape from a llama-family `config.json`, or why it is refused.
pub fn llama_config(json: &serde_json::Value) -> Result<LlamaConfig, String> {
    let model_type = json["model_type"].as_str().unwrap_or("");
    if !LLAMA_FAMILY.contains(&model_type) {
        return Err(format!(
            "model_type {model_type:?}; the llama family ({}) and BERT are built",
            LLAMA_FAMILY.join(", ")
        ));
    }
    let num = |key: &str, max: u64| {
        json[key]
            .as_u64()
            .filter(|v| (1..=max).contains(v))
            .map(|v| v as usize)
            .ok_or_else(|| format!("{key} must be a whole number from 1 to {max}"))
    };
    let act = json["hidden_act"].as_str().unwrap_or("silu");
    if act != "silu" {
        return Err(format!("hidden_act {act:?}; only SiLU (SwiGLU) is built"));
    }
    if json["mlp_bias"].as_bool() == Some(true) {
        return Err("mlp_bias is true; biases in the feed-forward are not built".into());
    }
    // Qwen2's query, key and value projections add biases; a llama with
    // `attention_bias` adds them to the output projection too, which is not built.
    if model_type != "qwen2" && json["attention_bias"].as_bool() == Some(true) {
        return Err("attention_bias is true; a llama's biases on all four attention projections are not built".into());
    }
    let attention_bias = model_type == "qwen2";
    let scaling = &json["rope_scaling"];
    let scaling_type = scaling["rope_type"].as_str().or(scaling["type"].as_str());
    if !scaling.is_null() && scaling_type != Some("default") {
        return Err(format!(
            "rope_scaling {}; only unscaled rotary positions are built",
            scaling_type.unwrap_or("(unnamed)")
        ));
    }
    let heads = num("num_attention_heads", MAX_HEADS)?;
    let hidden = num("hidden_size", MAX_WIDTH)?;
    let mut context = num("max_position_embeddings", MAX_CONTEXT)?;
    // Qwen2 names a window it does not use (`use_sliding_window: false`).
    let windowed = json["use_sliding_window"].as_bool() != Some(false);
    if let Some(window) = json["sliding_window"]
        .as_u64()
        .filter(|&w| windowed && w > 0 && (w as usize) < context)
    {
        // Past the window Mistral attends to fewer positions than full attention:
        // serve no longer than the window, where both agree.
        context = window as usize;
    }
    let config = LlamaConfig {
        hidden,
        layers: num("num_hidden_layers", MAX_LAYERS)?,
        heads,
        kv_heads: match json["num_key_value_heads"].is_null() {
            true => heads,
            false => num("num_key_value_heads", MAX_HEADS)?,
        },
        ffn: num("intermediate_size", MAX_FFN)?,
        vocab: num("vocab_size", MAX_VOCAB)?,
        context,
        rope_base: json["rope_theta"].as_f64().unwrap_or(10_000.0) as f32,
        eps: json["rms_norm_eps"].as_f64().unwrap_or(1e-6),
        separate_head: !json["tie_word_embeddings"].as_bool().unwrap_or(false),
        attention_bias,
    };
    check_heads(&config)?;
    if let Some(d) = json["head_dim"].as_u64().filter(|&d| d as usize != config.head_dim()) {
        return Err(format!(
            "head_dim {d}, but hidden_size / num_attention_heads is {}; only heads that split the width are built",
            config.head_dim()
        ));
    }
    let sane = config.rope_base.is_finite() && config.rope_base > 1.0 && config.eps > 0.0 && config.eps < 1.0;
    if !sane {
        return Err(format!(
            "rope_theta {} and rms_norm_eps {} must be a base above 1 and an epsilon in (0, 1)",
            config.rope_base, config.eps
        ));
    }
    Ok(config)
}

/// The name `transformers` gives tensor `t` (of block `layer`).
pub fn hf_name(t: LlamaTensor, layer: usize) -> String {
    let block = |n: &str| format!("model.layers.{layer}.{n}.weight");
    match t {
        LlamaTensor::TokenEmbedding => "model.embed_tokens.weight".into(),
        LlamaTensor::OutputNorm => "model.norm.weight".into(),
        LlamaTensor::Output => "lm_head.weight".into(),
        LlamaTensor::AttentionNorm => block("input_layernorm"),
        LlamaTensor::Query => block("self_attn.q_proj"),
        LlamaTensor::Key => block("self_attn.k_proj"),
        LlamaTensor::Value => block("self_attn.v_proj"),
        LlamaTensor::QueryBias => format!("model.layers.{layer}.self_attn.q_proj.bias"),
        LlamaTensor::KeyBias => format!("model.layers.{layer}.self_attn.k_proj.bias"),
        LlamaTensor::ValueBias => format!("model.layers.{layer}.self_attn.v_proj.bias"),
        LlamaTensor::AttentionOutput => block("self_attn.o_proj"),
        LlamaTensor::FeedForwardNorm => block("post_attention_layernorm"),
        LlamaTensor::Gate => block("mlp.gate_proj"),
        LlamaTensor::Up => block("mlp.up_proj"),
        LlamaTensor::Down => block("mlp.down_proj"),
    }
}

/// How many heads' rows `t` holds when its rows are rotated (query and key, and
/// their biases), or `None` for every other tensor.
pub fn rotated_heads(t: LlamaTensor, c: &LlamaConfig) -> Option<usize> {
    match t {
        LlamaTensor::Query | LlamaTensor::QueryBias => Some(c.heads),
        LlamaTensor::Key | LlamaTensor::KeyBias => Some(c.kv_heads),
        _ => None,
    }
}

/// Reorders the rows of a query or key matrix (`heads` heads of rows, `cols`
/// values each) between the two rotary conventions. `to_adjacent`: from
/// `transformers`' halves (row `i` pairs with `i + head_dim/2`) to adjacent pairs
/// (`2i`, `2i + 1`); otherwise back.
pub fn adjacent_pairs(values: &[f32], heads: usize, cols: usize, to_adjacent: bool) -> Vec<f32> {
    let rows = values.len() / cols.max(1);
    let head_dim = rows / heads.max(1);
    let half = head_dim / 2;
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for side in 0..2 {
                let halves = h * head_dim + side * half + i;
                let adjacent = h * head_dim + 2 * i + side;
                let (from, to) = if to_adjacent {
                    (halves, adjacent)
                } else {
                    (adjacent, halves)
                };
                out[to * cols..(to + 1) * cols].copy_from_slice(&values[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// A llama-family folder's weights answering to GGUF names.
pub struct HfLlamaWeights {
    inner: Box<dyn Weights>,
    config: LlamaConfig,
    /// GGUF name → (tensor, folder name).
    names: std::collections::BTreeMap<String, (LlamaTensor, String)>,
}

impl HfLlamaWeights {
    /// `inner` (the folder's safetensors) read as the decoder `config` describes;
    /// every tensor's presence and shape checked now, named as the folder names it.
    pub fn new(inner: Box<dyn Weights>, config: &LlamaConfig) -> Result<Self, InferError> {
        let mut names = std::collections::BTreeMap::new();
        for (t, layer) in config.tensors() {
            let name = hf_name(t, layer);
            let want = t.shape(config);
            match inner.shape(&name) {
                Some(s) if s == want => {}
                Some(s) => {
                    return Err(InferError::tensor(
                        inner.path(),
                        &name,
                        format!("shape {s:?}, but config.json needs {want:?}"),
                    ));
                }
                None => {
                    return Err(InferError::tensor(
                        inner.path(),
                        &name,
                        "missing (config.json needs it)",
                    ));
                }
            }
            names.insert(t.name(layer), (t, name));
        }
        Ok(HfLlamaWeights {
            inner,
            config: config.clone(),
            names,
        })
    }
}

impl Weights for HfLlamaWeights {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.inner.shape(&self.names.get(name)?.1)
    }

    fn read(&self, name: &str) -> Result<Loaded, InferError> {
        let (t, hf) = self
            .names
            .get(name)
            .ok_or_else(|| InferError::tensor(self.path(), name, "not a tensor of this model"))?;
        let mut loaded = self.inner.read(hf)?;
        if let Some(heads) = rotated_heads(*t, &self.config) {
            let cols = loaded.shape.get(1).copied().unwrap_or(1);
            loaded.values = adjacent_pairs(&loaded.values, heads, cols, true);
        }
        Ok(loaded)
    }
}

/// Where the local Hugging Face cache keeps models: `$HF_HUB_CACHE`, else
/// `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
/// `~/.cache/huggingface/hub` (as `huggingface_hub` looks).
pub fn hub_cache() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("HF_HUB_CACHE") {
        return dir;
    }
    if let Some(home) = var("HF_HOME") {
        return home.join("hub");
    }
    let cache = var("XDG_CACHE_HOME").unwrap_or_else(|| var("HOME").unwrap_or_else(|| ".".into()).join(".cache"));
    cache.join("huggingface/hub")
}

/// The snapshot folder of hub model `name` (`org/model`, optionally
/// `@revision`) in the cache at `hub`: `None` when `name` is not a hub name or
/// the cache does not hold it.
pub fn resolve_in_cache(name: &str, hub: &Path) -> Option<Result<PathBuf, InferError>> {
    let (repo, revision) = name.split_once('@').unwrap_or((name, "main"));
    let (org, model) = repo.split_once('/')?;
    let plain = |s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\', '\0']);
    if !plain(org) || !plain(model) || !plain(revision) {
        return None;
    }
    let dir = hub.join(format!("models--{org}--{model}"));
    if !dir.is_dir() {
        return None;
    }
    // A revision is a branch or tag under refs/ (holding a commit), or a commit.
    let commit = match std::fs::read_to_string(dir.join("refs").join(revision)) {
        Ok(commit) => commit.trim().to_string(),
        Err(_) => revision.to_string(),
    };
    let snapshot = dir.join("snapshots").join(&commit);
    if plain(&commit) && snapshot.is_dir() {
        return Some(Ok(snapshot));
    }
    let have: Vec<String> = std::fs::read_dir(dir.join("snapshots"))
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    Some(Err(InferError::Config(format!(
        "{name}: {} holds no snapshot for revision {revision} (snapshots: {})",
        dir.display(),
        if have.is_empty() {
            "none".into()
        } else {
            have.join(", ")
        }
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn smol() -> serde_json::Value {
        json!({"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
               "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
               "tie_word_embeddings": true, "hidden_act": "silu", "rope_scaling": null})
    }

    #[test]
    fn a_smollm2_config_is_smollm2s_shape() {
        assert_eq!(llama_config(&smol()).unwrap(), LlamaConfig::smol_lm2());
    }

    #[test]
    fn configurations_it_would_run_wrongly_are_refused_by_name() {
        let refused = |key: &str, value: serde_json::Value| {
            let mut c = smol();
            c[key] = value;
            llama_config(&c).unwrap_err()
        };
        assert!(refused("rope_scaling", json!({"rope_type": "llama3", "factor": 8.0})).contains("rope_scaling llama3"));
        assert!(refused("mlp_bias", json!(true)).contains("mlp_bias"));
        assert!(refused("attention_bias", json!(true)).contains("attention_bias"));
        assert!(refused("hidden_act", json!("gelu")).contains("hidden_act"));
        assert!(refused("model_type", json!("gpt2")).contains("model_type \"gpt2\""));
        assert!(refused("num_hidden_layers", json!(1u64 << 40)).contains("num_hidden_layers"));
        assert!(refused("num_key_value_heads", json!(2)).contains("key/value heads"));
        assert!(refused("head_dim", json!(128)).contains("head_dim 128"));
        let mut mistral = smol();
        mistral["model_type"] = json!("mistral");
        mistral["sliding_window"] = json!(4096);
        assert_eq!(llama_config(&mistral).unwrap().context, 4096);
        let mut qwen2 = smol();
        qwen2["model_type"] = json!("qwen2");
        qwen2["sliding_window"] = json!(4096);
        qwen2["use_sliding_window"] = json!(false);
        let c = llama_config(&qwen2).unwrap();
        assert!(c.attention_bias && c.context == 8192, "{c:?}");
    }

    #[test]
    fn rotary_rows_go_to_adjacent_pairs_and_back() {
        // Two heads of width 4, one column: halves (0 1 | 2 3) → pairs (0 2 1 3).
        let rows: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let adjacent = adjacent_pairs(&rows, 2, 1, true);
        assert_eq!(adjacent, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        assert_eq!(adjacent_pairs(&adjacent, 2, 1, false), rows);
    }

    #[test]
    fn hub_names_resolve_to_the_snapshot_their_ref_names() {
        let hub = tempfile::tempdir().unwrap();
        let model = hub.path().join("models--org--tiny");
        std::fs::create_dir_all(model.join("snapshots/abc123")).unwrap();
        std::fs::create_dir_all(model.join("refs")).unwrap();
        std::fs::write(model.join("refs/main"), "abc123\n").unwrap();
        let found = resolve_in_cache("org/tiny", hub.path()).unwrap().unwrap();
        assert_eq!(found, model.join("snapshots/abc123"));
        assert_eq!(resolve_in_cache("org/tiny@abc123", hub.path()).unwrap().unwrap(), found);
        let e = resolve_in_cache("org/tiny@v2", hub.path())
            .unwrap()
            .unwrap_err()
            .to_string();
        assert!(e.contains("revision v2") && e.contains("abc123"), "{e}");
        assert!(resolve_in_cache("org/other", hub.path()).is_none());
        assert!(resolve_in_cache("../x/y", hub.path()).is_none());
        assert!(resolve_in_cache("smollm2", hub.path()).is_none());
    }
}
