//! A decoupled model as a folder of files that `hetero infer` and `hetero serve`
//! open like any other model (seed 000, claim 2's result put to use).
//!
//! ## Design
//! The folder is the original model's folder with one file more:
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
use hetero_models::bert::BertEncoder;
use hetero_models::decoupled_bert::{DecoupledBert, DecoupledBertConfig};
use hetero_models::{Decoupling, Variant};

use crate::InferError;
use crate::decoupled::with_trained;
use crate::models::Model;
use crate::runtime::Arch;
use crate::weights::{safetensors_bytes, write_atomically};

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
/// ones: a training checkpoint's flat buffer) into the new folder `dir`. A folder
/// that already holds files is refused: nothing is overwritten.
pub fn export<B: Backend>(
    original: &Model,
    decoupling: Decoupling,
    trained: Option<&[f32]>,
    dir: &Path,
    device: &B::Device,
) -> Result<Exported, InferError> {
    let Arch::Bert(c) = &original.arch else {
        return Err(InferError::Config(format!(
            "{} is not an encoder: exporting decoupled decoders is not built yet (encoders, \
             as distill jobs train them, are)",
            original.name
        )));
    };
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
    if dir.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        return Err(InferError::Config(format!(
            "{} already holds files; export into a new or empty folder",
            dir.display()
        )));
    }
    let config = DecoupledBertConfig::new(c.clone(), decoupling).map_err(|e| InferError::Config(e.to_string()))?;
    let source = &mut |name: &str, shape: &[usize]| original.weights.expect(name, shape);
    let encoder = BertEncoder::<B>::load(source, c, device)?;
    let model = with_trained(DecoupledBert::sliced_from(&encoder, &config), trained)?;
    let tensors = model.tensors(&config);
    let bytes = safetensors_bytes(
        tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice(), t.values.as_slice())),
    );
    std::fs::create_dir_all(dir).map_err(|e| InferError::weights(dir, format!("cannot create: {e}")))?;
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
    Ok(Exported {
        dir: dir.to_path_buf(),
        tensors: tensors.len(),
        parameters: tensors.iter().map(|t| t.values.len()).sum(),
        bytes: bytes.len() as u64,
    })
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
    let count = |key: &str| -> Result<usize, InferError> {
        match json.get(key).and_then(serde_json::Value::as_u64) {
            Some(n @ 1..=MAX_PARTS) => Ok(n as usize),
            _ => Err(bad(format!(
                "{key} = {}: needs a whole number from 1 to {MAX_PARTS}",
                json.get(key).map_or("(missing)".to_string(), ToString::to_string)
            ))),
        }
    };
    let variant = json.get("variant").and_then(serde_json::Value::as_str).unwrap_or("");
    let variant = Variant::from_name(variant).ok_or_else(|| {
        bad(format!(
            "variant = {variant:?}: needs \"{}\" or \"{}\"",
            Variant::FullHeads.name(),
            Variant::SplitHeads.name()
        ))
    })?;
    Ok(Some(Decoupling {
        divisions: count("divisions")?,
        blocks: count("blocks")?,
        variant,
    }))
}
