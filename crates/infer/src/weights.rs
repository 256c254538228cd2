//! Weight files, one tensor at a time: the [`Weights`] trait every format
//! implements (safetensors in [`crate::tensor_files`], GGUF in [`crate::gguf`]),
//! random weights of a model's shape, and the checks every load makes (the name is
//! there, the shape is what the model's configuration says).
//!
//! Tensors come back row-major with the outer dimension first, the PyTorch
//! convention: a linear layer's weight is `[out, in]` in both safetensors and GGUF
//! (whose dimension lists are innermost first and are reversed here).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hetero_kernels::{Bytes, QType};

use crate::InferError;

/// One tensor read from a file, as f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// Row-major shape, outer dimension first.
    pub shape: Vec<usize>,
    /// The values.
    pub values: Vec<f32>,
}

/// One tensor as stored, in a quantized format, for the quantized kernels.
#[derive(Debug, Clone)]
pub struct RawTensor {
    /// The storage format.
    pub ty: QType,
    /// Row-major shape, outer dimension first.
    pub shape: Vec<usize>,
    /// The stored bytes (memory-mapped where possible).
    pub bytes: Bytes,
}

/// A weights file that hands out tensors by name.
pub trait Weights: Send + Sync {
    /// The file, for error messages.
    fn path(&self) -> &Path;
    /// The shape of `name`, if the file holds it.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Reads and converts one tensor.
    fn read(&self, name: &str) -> Result<Loaded, InferError>;
    /// The tensor as stored, if it is stored quantized and quantized products are
    /// wanted; `None` means it is read as f32 ([`Weights::read`]).
    fn raw(&self, _name: &str) -> Option<Result<RawTensor, InferError>> {
        None
    }

    /// Reads `name` and checks its shape is `expect`.
    fn expect(&self, name: &str, expect: &[usize]) -> Result<Vec<f32>, InferError> {
        match self.shape(name) {
            None => Err(InferError::tensor(
                self.path(),
                name,
                "missing: this file does not hold the model the configuration describes",
            )),
            Some(shape) if shape != expect => Err(InferError::tensor(
                self.path(),
                name,
                format!("shape {shape:?}, but the model's configuration needs {expect:?}"),
            )),
            Some(_) => Ok(self.read(name)?.values),
        }
    }
}

/// Deterministic random weights of given shapes: timing runs of a model's shape
/// (BERT-Base) and equality tests need no download. Scales and norm weights near 1,
/// everything else small, so activations stay in a realistic range.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    shapes: BTreeMap<String, Vec<usize>>,
    seed: u64,
    path: PathBuf,
    /// The format matrices are stored in (`None`: f32).
    stored: Option<QType>,
    /// Whether [`Weights::raw`] is off (only dequantised values are handed out).
    hide_raw: bool,
}

impl RandomWeights {
    /// Weights for `shapes` (as a model's `tensor_shapes()` gives them) from `seed`.
    pub fn new(shapes: BTreeMap<String, Vec<usize>>, seed: u64) -> Self {
        RandomWeights {
            shapes,
            seed,
            path: PathBuf::from(format!("<random weights, seed {seed}>")),
            stored: None,
            hide_raw: false,
        }
    }

    /// The same weights with every matrix whose rows are whole blocks of `ty`
    /// stored as `ty` (by the reference quantizers), as a quantized GGUF file would
    /// hold them: [`Weights::raw`] hands those out, and [`Weights::read`] their
    /// dequantised values, so both paths compute with the same weights.
    pub fn stored_as(mut self, ty: QType) -> Self {
        self.path = PathBuf::from(format!("<random weights, seed {}, {ty}>", self.seed));
        self.stored = Some(ty);
        self
    }

    /// The same weights with [`Weights::raw`] turned off: the f32 path on the
    /// values a quantized file's dequantisation gives.
    pub fn dequantized(mut self) -> Self {
        self.path = PathBuf::from(format!("{} (dequantised)", self.path.display()));
        self.hide_raw = true;
        self
    }

    /// The format `name` is stored in, if it is a matrix stored quantized.
    fn stored(&self, name: &str) -> Option<QType> {
        let ty = self.stored?;
        let shape = self.shapes.get(name)?;
        (shape.len() == 2 && shape[1].is_multiple_of(ty.block_elems())).then_some(ty)
    }

    fn values(&self, name: &str) -> Result<Loaded, InferError> {
        let shape = self
            .shape(name)
            .ok_or_else(|| InferError::tensor(&self.path, name, "not in the file"))?;
        // splitmix64, seeded by the name, so every worker draws the same tensor.
        let mut state = name.bytes().fold(self.seed ^ 0x9E37_79B9_7F4A_7C15, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01B3)
        });
        let mut next = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let is_scale = shape.len() == 1 && (name.contains("norm") || name.contains("LayerNorm.weight"));
        let n: usize = shape.iter().product();
        let values = (0..n)
            .map(|_| if is_scale { 1.0 + 0.1 * next() } else { 0.08 * next() })
            .collect();
        Ok(Loaded { shape, values })
    }
}

impl Weights for RandomWeights {
    fn path(&self) -> &Path {
        &self.path
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shapes.get(name).cloned()
    }

    fn read(&self, name: &str) -> Result<Loaded, InferError> {
        let mut loaded = self.values(name)?;
        if let Some(ty) = self.stored(name) {
            let bytes = hetero_kernels::quantize(ty, &loaded.values)?;
            hetero_kernels::dequantize(ty, &bytes, &mut loaded.values)?;
        }
        Ok(loaded)
    }

    fn raw(&self, name: &str) -> Option<Result<RawTensor, InferError>> {
        let ty = self.stored(name).filter(|_| !self.hide_raw)?;
        Some(self.values(name).and_then(|loaded| {
            Ok(RawTensor {
                ty,
                bytes: Bytes::from_vec(hetero_kernels::quantize(ty, &loaded.values)?),
                shape: loaded.shape,
            })
        }))
    }
}

/// A safetensors file of F32 tensors `(name, shape, values)`, as bytes: the
/// header's length, the JSON header (padded with spaces to 8 bytes, as the
/// format recommends), then the values little-endian in the given order.
pub fn safetensors_bytes<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a [usize], &'a [f32])>) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        let start = data.len();
        data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    safetensors_file(&header, data)
}

/// A safetensors file from its `header` (name → dtype, shape, data offsets) and
/// `data`: the header's length, the header padded with spaces to 8 bytes (as the
/// format recommends), the data.
pub fn safetensors_file(header: &serde_json::Map<String, serde_json::Value>, data: Vec<u8>) -> Vec<u8> {
    let mut header = serde_json::to_vec(header).expect("a JSON map serialises");
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.reserve(header.len() + data.len());
    out.extend(header);
    out.extend(data);
    out
}

/// Writes `bytes` to `path` whole or not at all: into a temporary file beside
/// it, renamed over `path` once complete.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), InferError> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes)
        .and_then(|_| std::fs::rename(&partial, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&partial);
            InferError::weights(path, format!("cannot write: {e}"))
        })
}

/// The JSON in `path`, read only if the file is at most `max` bytes: `Ok(None)`
/// when there is no such file; the reason, without the path, when it cannot be
/// read or parsed (callers name the file in their own error).
pub(crate) fn read_json(path: &Path, max: u64) -> Result<Option<serde_json::Value>, String> {
    let len = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read: {e}")),
        Ok(m) => m.len(),
    };
    if len > max {
        return Err(format!("{len} bytes; at most {max} are read"));
    }
    let text = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| format!("not valid JSON: {e}"))
}

/// Writers of small safetensors files, for tests here and in other modules.
#[cfg(test)]
pub(crate) mod write {
    /// A safetensors file of F32 `tensors`.
    pub fn safetensors(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
        super::safetensors_bytes(tensors.iter().map(|(n, s, v)| (*n, s.as_slice(), v.as_slice())))
    }
}
