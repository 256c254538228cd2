//! A decoupled model as a folder of files that `hetero infer` and `hetero serve`
//! open like any other model (seed 000, claim 2's result put to use).
//!
//! ## Design
//! A decoupled *decoder* is one file, `model.gguf`: the original GGUF's metadata
//! (shape, tokenizer) with `hetero.decoupling.{divisions,blocks,variant}` added,
//! the embeddings, head (always its own `output.weight`: a tied head trained
//! apart from the embeddings is tied no more) and original layers under GGUF's
//! names, decoupled layer i's sub-blocks under `blk.i.sub_blocks.*`, all F32.
//!
//! A decoupled *encoder* is the original model's folder with one file more:
//! - `config.json` and `tokenizer.json`: the original's, unchanged — the
//!   decoupled model has the original's width, heads, vocabulary and text;
//! - `decoupling.json`: `{"divisions": N_d, "blocks": N_b, "variant": "…"}`, the
//!   one thing that makes it decoupled ([`read_decoupling`]);
//! - `model.safetensors`: the embeddings and original layers under the original's
//!   tensor names (so they load, whole or as tensor-parallel parts, through the
//!   same code as the original's), and each decoupled layer's N_d sub-blocks
//!   stacked under `encoder.layer.i.sub_blocks.*` (see
//!   [`DecoupledBert::tensors`]).
//!
//! Everything is checked on open ([`crate::models::open`]): a decoupling that
//! does not divide the model, or a tensor missing or of the wrong shape, is an
//! error naming the file and the key.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use hetero_models::bert::{BertConfig, BertEncoder};
use hetero_models::checkpoint::Named;
use hetero_models::decoupled_bert::{DecoupledBert, DecoupledBertConfig};
use hetero_models::decoupled_llama::{DecoupledLlama, DecoupledLlamaConfig};
use hetero_models::llama::LlamaConfig;
use hetero_models::{Decoupling, Variant};

use crate::InferError;
use crate::decoupled::with_trained;
use crate::gguf::{Gguf, Value, gguf_bytes};
use crate::models::Model;
use crate::runtime::Arch;
use crate::weights::{Weights, safetensors_bytes, write_atomically};

/// The file that marks a folder's model as decoupled.
pub const DECOUPLING_FILE: &str = "decoupling.json";

/// The most divisions or blocks a decoupling file may ask for (far beyond any
/// model's width or depth; a bound on what sizes loops).
const MAX_PARTS: u64 = 4096;

/// What [`export`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    /// The folder.
    pub dir: PathBuf,
    /// Tensors in `model.safetensors`.
    pub tensors: usize,
    /// Parameters in them.
    pub parameters: usize,
    /// Bytes of `model.safetensors`.
    pub bytes: u64,
}

/// Writes `original`'s decoupled version (its weights sliced, or the `trained`
/// ones: a training checkpoint's flat buffer) into the new folder `dir`: an
/// encoder as a BERT folder, a decoder as `model.gguf`. A folder that already
/// holds files is refused: nothing is overwritten.
pub fn export<B: Backend>(
    original: &Model,
    decoupling: Decoupling,
    trained: Option<&[f32]>,
    dir: &Path,
    device: &B::Device,
) -> Result<Exported, InferError> {
    if dir.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        return Err(InferError::Config(format!(
            "{} already holds files; export into a new or empty folder",
            dir.display()
        )));
    }
    match &original.arch {
        Arch::Bert(c) => export_encoder::<B>(original, c, decoupling, trained, dir, device),
        Arch::Llama(c) => export_decoder::<B>(original, c, decoupling, trained, dir, device),
        Arch::DecoupledBert(_) | Arch::DecoupledLlama(_) => Err(InferError::Config(format!(
            "{} is already decoupled: export from the original model",
            original.name
        ))),
    }
}

fn export_encoder<B: Backend>(
    original: &Model,
    c: &BertConfig,
    decoupling: Decoupling,
    trained: Option<&[f32]>,
    dir: &Path,
    device: &B::Device,
) -> Result<Exported, InferError> {
    let from = original
        .weights
        .path()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    if !from.join("config.json").is_file() {
        return Err(InferError::Config(format!(
            "{} has no config.json beside its weights to export with",
            original.name
        )));
    }
    let config = DecoupledBertConfig::new(c.clone(), decoupling).map_err(|e| InferError::Config(e.to_string()))?;
    let source = &mut |name: &str, shape: &[usize]| original.weights.expect(name, shape);
    let encoder = BertEncoder::<B>::load(source, c, device)?;
    let model = with_trained(DecoupledBert::sliced_from(&encoder, &config), trained)?;
    let tensors = model.tensors(&config);
    let bytes = safetensors_bytes(tensors.iter().map(as_parts));
    create(dir)?;
    let copy = |name: &str| -> Result<(), InferError> {
        std::fs::copy(from.join(name), dir.join(name))
            .map(|_| ())
            .map_err(|e| InferError::weights(&from.join(name), format!("cannot copy into {}: {e}", dir.display())))
    };
    copy("config.json")?;
    if from.join("tokenizer.json").is_file() {
        copy("tokenizer.json")?;
    }
    let description = serde_json::json!({
        "divisions": decoupling.divisions,
        "blocks": decoupling.blocks,
        "variant": decoupling.variant.name(),
    });
    write_atomically(
        &dir.join(DECOUPLING_FILE),
        serde_json::to_string_pretty(&description).expect("JSON").as_bytes(),
    )?;
    // The weights last: a folder with model.safetensors is a complete one.
    write_atomically(&dir.join("model.safetensors"), &bytes)?;
    Ok(exported(dir, &tensors, &bytes))
}

/// A decoder as one GGUF file: the original's metadata (its tokenizer included),
/// `hetero.decoupling.*` added, every tensor F32.
fn export_decoder<B: Backend>(
    original: &Model,
    c: &LlamaConfig,
    decoupling: Decoupling,
    trained: Option<&[f32]>,
    dir: &Path,
    device: &B::Device,
) -> Result<Exported, InferError> {
    let config = DecoupledLlamaConfig::new(c.clone(), decoupling).map_err(|e| InferError::Config(e.to_string()))?;
    let mut metadata = Gguf::open(original.weights.path())?.metadata;
    let source = &mut |name: &str, shape: &[usize]| original.weights.expect(name, shape);
    let (_, student) = DecoupledLlama::<B>::pair_from(source, &config, c.context, device)?;
    let model = with_trained(student, trained)?;
    let tensors = model.tensors();
    metadata.insert(DIVISIONS.into(), Value::U(decoupling.divisions as u64));
    metadata.insert(BLOCKS.into(), Value::U(decoupling.blocks as u64));
    metadata.insert(VARIANT.into(), Value::Str(decoupling.variant.name().into()));
    // All tensors are F32 now (llama.cpp's file type 0).
    metadata.insert("general.file_type".into(), Value::U(0));
    let bytes = gguf_bytes(&metadata, tensors.iter().map(as_parts));
    create(dir)?;
    write_atomically(&dir.join("model.gguf"), &bytes)?;
    Ok(exported(dir, &tensors, &bytes))
}

fn as_parts(t: &Named) -> (&str, &[usize], &[f32]) {
    (t.name.as_str(), t.shape.as_slice(), t.values.as_slice())
}

fn create(dir: &Path) -> Result<(), InferError> {
    std::fs::create_dir_all(dir).map_err(|e| InferError::weights(dir, format!("cannot create: {e}")))
}

fn exported(dir: &Path, tensors: &[Named], bytes: &[u8]) -> Exported {
    Exported {
        dir: dir.to_path_buf(),
        tensors: tensors.len(),
        parameters: tensors.iter().map(|t| t.values.len()).sum(),
        bytes: bytes.len() as u64,
    }
}

/// The GGUF metadata keys of a decoupled decoder.
const DIVISIONS: &str = "hetero.decoupling.divisions";
const BLOCKS: &str = "hetero.decoupling.blocks";
const VARIANT: &str = "hetero.decoupling.variant";

/// The decoupling a GGUF file's `hetero.decoupling.*` metadata describes, `None`
/// for an ordinary model.
pub fn decoupling_in_gguf(g: &Gguf) -> Result<Option<Decoupling>, InferError> {
    if !g.metadata.contains_key(DIVISIONS) {
        return Ok(None);
    }
    let bad = |why: String| InferError::weights(g.path(), why);
    parse(
        |key| {
            g.metadata
                .get(&format!("hetero.decoupling.{key}"))
                .map(|v| format!("{v:?}"))
        },
        |key| {
            g.metadata
                .get(&format!("hetero.decoupling.{key}"))
                .and_then(Value::as_u64)
        },
        g.metadata.get(VARIANT).and_then(Value::as_str),
        bad,
    )
    .map(Some)
}

/// The decoupling described by `dir`'s [`DECOUPLING_FILE`], `None` when it has none.
pub fn read_decoupling(dir: &Path) -> Result<Option<Decoupling>, InferError> {
    let path = dir.join(DECOUPLING_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let bad = |why: String| InferError::weights(&path, why);
    let text = std::fs::read_to_string(&path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    parse(
        |key| json.get(key).map(ToString::to_string),
        |key| json.get(key).and_then(serde_json::Value::as_u64),
        json.get("variant").and_then(serde_json::Value::as_str),
        bad,
    )
    .map(Some)
}

/// A decoupling from its three keys, each checked: `shown` prints a key's
/// value as found, `count` reads it as a whole number.
fn parse(
    shown: impl Fn(&str) -> Option<String>,
    count: impl Fn(&str) -> Option<u64>,
    variant: Option<&str>,
    bad: impl Fn(String) -> InferError,
) -> Result<Decoupling, InferError> {
    let parts = |key: &str| -> Result<usize, InferError> {
        match count(key) {
            Some(n @ 1..=MAX_PARTS) => Ok(n as usize),
            _ => Err(bad(format!(
                "{key} = {}: needs a whole number from 1 to {MAX_PARTS}",
                shown(key).unwrap_or_else(|| "(missing)".into())
            ))),
        }
    };
    let variant = variant.unwrap_or("");
    let variant = Variant::from_name(variant).ok_or_else(|| {
        bad(format!(
            "variant = {variant:?}: needs \"{}\" or \"{}\"",
            Variant::FullHeads.name(),
            Variant::SplitHeads.name()
        ))
    })?;
    Ok(Decoupling {
        divisions: parts("divisions")?,
        blocks: parts("blocks")?,
        variant,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every way a decoupling file can be wrong is an error naming the file and
    /// the key; a folder without one is an ordinary model.
    #[test]
    fn bad_decoupling_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_decoupling(dir.path()).unwrap(), None);
        let file = dir.path().join(DECOUPLING_FILE);
        for (text, says) in [
            ("{", "not JSON"),
            (r#"{"blocks": 3, "variant": "split-heads"}"#, "divisions = (missing)"),
            (
                r#"{"divisions": 0, "blocks": 3, "variant": "split-heads"}"#,
                "divisions = 0",
            ),
            (
                r#"{"divisions": 2, "blocks": 99999999, "variant": "split-heads"}"#,
                "blocks = 99999999",
            ),
            (
                r#"{"divisions": 2, "blocks": -1, "variant": "split-heads"}"#,
                "blocks = -1",
            ),
            (
                r#"{"divisions": 2, "blocks": 3, "variant": "half"}"#,
                "variant = \"half\"",
            ),
        ] {
            std::fs::write(&file, text).unwrap();
            let err = read_decoupling(dir.path()).unwrap_err().to_string();
            assert!(err.contains(DECOUPLING_FILE) && err.contains(says), "{text}: {err}");
        }
        std::fs::write(&file, r#"{"divisions": 2, "blocks": 3, "variant": "full-heads"}"#).unwrap();
        let d = read_decoupling(dir.path()).unwrap().unwrap();
        assert_eq!((d.divisions, d.blocks, d.variant), (2, 3, Variant::FullHeads));
    }
}
