//! GGUF files (llama.cpp's format): metadata, tensor directory, and the tensors
//! themselves, dequantised to f32 on load.
//!
//! Layout (version 2 and 3, little-endian): magic `GGUF`, version, tensor count,
//! metadata count; the metadata as (key, type, value); the tensor directory as
//! (name, dims innermost first, ggml type, offset); then, aligned to
//! `general.alignment` (32 by default), the data section the offsets count from.
//!
//! Only the directory is read when a file is opened; [`Weights::read`] then seeks
//! to one tensor and reads just its bytes, so a worker that holds layers 10–19
//! never reads layers 0–9. Opening checks that every tensor lies inside the file,
//! so a truncated download fails at once, naming the first tensor cut off.
//!
//! Formats read: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants Q4_K,
//! Q5_K, Q6_K and Q8_K ([`hetero_kernels::QType`]; blocks along the innermost
//! dimension). [`Weights::read`] dequantises to f32; [`Weights::raw`] hands out a
//! tensor's bytes as stored, memory-mapped (`HETERO_NO_MMAP=1` reads them instead),
//! for the quantized kernels.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hetero_kernels::{Bytes, QType};

use crate::InferError;
use crate::weights::{Loaded, RawTensor, Weights};

/// Refuse metadata strings and arrays larger than this (a corrupt length would
/// otherwise ask for gigabytes).
const MAX_ITEMS: u64 = 1 << 24;

/// Most metadata values (array elements included) one header may hold: a
/// vocabulary of 256k tokens with its merges and scores is under 1M. Each value
/// costs tens of bytes in memory for one in the file, so this bounds what a
/// hostile header can make us allocate.
const MAX_VALUES: u64 = 1 << 23;

/// Arrays of arrays are allowed this deep (GGUF files nest at most once); a file
/// nesting deeper would otherwise recurse until the stack overflows.
const MAX_NESTING: u32 = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U(u64),
    /// Any signed integer type.
    I(i64),
    /// f32 or f64.
    F(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    Str(String),
    /// An array of values.
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is one.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U(v) => Some(*v),
            Value::I(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F(v) => Some(*v),
            Value::U(v) => Some(*v as f64),
            Value::I(v) => Some(*v as f64),
            _ => None,
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Where one tensor is and how it is stored.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Dimensions, innermost first (GGUF's order).
    pub dims: Vec<u64>,
    /// The ggml type id.
    pub ggml_type: u32,
    /// Absolute byte position in the file.
    pub position: u64,
    /// Bytes on disk.
    pub bytes: u64,
}

/// An opened GGUF file: metadata and tensor directory in memory, tensors on disk.
#[derive(Debug)]
pub struct Gguf {
    path: PathBuf,
    /// The whole file mapped, on the first [`Weights::raw`].
    mapped: OnceLock<Bytes>,
    /// Whether [`Weights::raw`] hands out quantized tensors (false: everything is
    /// dequantised, the f32 path).
    native: bool,
    /// The metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// The tensor directory, by name.
    pub tensors: BTreeMap<String, TensorInfo>,
}

/// (elements per block, bytes per block) of a ggml type this reader reads.
fn block_layout(ggml_type: u32) -> Option<(u64, u64)> {
    QType::from_ggml(ggml_type).map(|t| (t.block_elems() as u64, t.block_bytes() as u64))
}

fn type_name(ggml_type: u32) -> String {
    match (QType::from_ggml(ggml_type), ggml_type) {
        (Some(t), _) => t.name().to_string(),
        (None, 9) => "Q8_1".into(),
        (None, 10) => "Q2_K".into(),
        (None, 11) => "Q3_K".into(),
        (None, other) => format!("ggml type {other}"),
    }
}

/// A reader over the header that counts its position and names what it reads.
struct Header<R> {
    r: R,
    at: u64,
    path: PathBuf,
    /// The file's length: no count may promise more items than bytes are left.
    len: u64,
    /// Metadata values read so far ([`MAX_VALUES`]).
    values: u64,
}

impl<R: Read> Header<R> {
    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], InferError> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|e| {
            InferError::weights(
                &self.path,
                format!("the header ends early, reading {what} at byte {}: {e}", self.at),
            )
        })?;
        self.at += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32, InferError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, InferError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    fn count(&mut self, what: &str) -> Result<u64, InferError> {
        let n = self.u64(what)?;
        // Every item takes at least one byte of the file.
        let left = self.len.saturating_sub(self.at);
        let wrong = match n {
            n if n > left => format!("more than the {left} bytes left: the header ends early or is corrupt"),
            n if n > MAX_ITEMS => "not plausible: the file is corrupt".to_string(),
            n => return Ok(n),
        };
        Err(InferError::weights(
            &self.path,
            format!("{what} of {n} at byte {} is {wrong}", self.at - 8),
        ))
    }

    fn string(&mut self, what: &str) -> Result<String, InferError> {
        let len = self.count(what)? as usize;
        let mut b = vec![0u8; len];
        self.r.read_exact(&mut b).map_err(|e| {
            InferError::weights(
                &self.path,
                format!("the header ends inside {what} at byte {}: {e}", self.at),
            )
        })?;
        self.at += len as u64;
        String::from_utf8(b).map_err(|_| InferError::weights(&self.path, format!("{what} is not UTF-8")))
    }

    fn value(&mut self, kind: u32, key: &str, depth: u32) -> Result<Value, InferError> {
        self.values += 1;
        if self.values > MAX_VALUES {
            return Err(InferError::weights(
                &self.path,
                format!("more than {MAX_VALUES} metadata values (at {key}): not a model's header"),
            ));
        }
        Ok(match kind {
            0 => Value::U(u8::from_le_bytes(self.bytes(key)?).into()),
            1 => Value::I(i8::from_le_bytes(self.bytes(key)?).into()),
            2 => Value::U(u16::from_le_bytes(self.bytes(key)?).into()),
            3 => Value::I(i16::from_le_bytes(self.bytes(key)?).into()),
            4 => Value::U(u32::from_le_bytes(self.bytes(key)?).into()),
            5 => Value::I(i32::from_le_bytes(self.bytes(key)?).into()),
            6 => Value::F(f32::from_le_bytes(self.bytes(key)?).into()),
            7 => Value::Bool(self.bytes::<1>(key)?[0] != 0),
            8 => Value::Str(self.string(key)?),
            9 if depth >= MAX_NESTING => {
                return Err(InferError::weights(
                    &self.path,
                    format!("metadata {key} nests arrays more than {MAX_NESTING} deep"),
                ));
            }
            9 => {
                let inner = self.u32(key)?;
                let n = self.count(key)?;
                Value::Array(
                    (0..n)
                        .map(|_| self.value(inner, key, depth + 1))
                        .collect::<Result<_, _>>()?,
                )
            }
            10 => Value::U(self.u64(key)?),
            11 => Value::I(i64::from_le_bytes(self.bytes(key)?)),
            12 => Value::F(f64::from_le_bytes(self.bytes(key)?)),
            other => {
                return Err(InferError::weights(
                    &self.path,
                    format!("metadata {key} has unknown value type {other}"),
                ));
            }
        })
    }
}

impl Gguf {
    /// Reads the metadata and tensor directory of `path` and checks that every
    /// tensor's bytes lie inside the file.
    pub fn open(path: &Path) -> Result<Gguf, InferError> {
        let file = File::open(path).map_err(|e| InferError::weights(path, format!("cannot open: {e}")))?;
        let file_len = file
            .metadata()
            .map_err(|e| InferError::weights(path, format!("cannot stat: {e}")))?
            .len();
        let mut h = Header {
            r: BufReader::new(file),
            at: 0,
            path: path.to_path_buf(),
            len: file_len,
            values: 0,
        };
        if &h.bytes::<4>("the magic")? != b"GGUF" {
            return Err(InferError::weights(path, "not a GGUF file (no GGUF magic)"));
        }
        let version = h.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(InferError::weights(
                path,
                format!("GGUF version {version}; versions 2 and 3 are read"),
            ));
        }
        let tensor_count = h.count("the tensor count")?;
        let kv_count = h.count("the metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = h.string("a metadata key")?;
            let kind = h.u32(&key)?;
            let value = h.value(kind, &key, 0)?;
            metadata.insert(key, value);
        }
        let mut directory = Vec::new();
        for _ in 0..tensor_count {
            let name = h.string("a tensor name")?;
            let n_dims = h.u32(&name)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(InferError::tensor(path, &name, format!("{n_dims} dimensions")));
            }
            let dims = (0..n_dims).map(|_| h.u64(&name)).collect::<Result<Vec<_>, _>>()?;
            let ggml_type = h.u32(&name)?;
            let offset = h.u64(&name)?;
            directory.push((name, dims, ggml_type, offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1);
        let data_start = h.at.div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, dims, ggml_type, offset) in directory {
            let elements = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let bytes = match (elements, block_layout(ggml_type)) {
                (Some(n), Some((per, size))) if n % per == 0 => n / per * size,
                (Some(_), Some((per, _))) => {
                    return Err(InferError::tensor(
                        path,
                        &name,
                        format!("{dims:?} does not fill blocks of {per}"),
                    ));
                }
                (None, _) => return Err(InferError::tensor(path, &name, format!("dimensions {dims:?} overflow"))),
                // Not readable, but its size is unknown: it cannot be checked. Reading
                // it later says which type it is.
                (Some(_), None) => 0,
            };
            let position = data_start.saturating_add(offset);
            if position.saturating_add(bytes) > file_len {
                return Err(InferError::tensor(
                    path,
                    &name,
                    format!(
                        "ends at byte {} but the file has {file_len} bytes: the file is truncated",
                        position.saturating_add(bytes)
                    ),
                ));
            }
            tensors.insert(
                name,
                TensorInfo {
                    dims,
                    ggml_type,
                    position,
                    bytes,
                },
            );
        }
        Ok(Gguf {
            path: path.to_path_buf(),
            mapped: OnceLock::new(),
            native: true,
            metadata,
            tensors,
        })
    }

    /// The same file, its quantized tensors handed out as stored ([`Weights::raw`],
    /// `native`) or only ever dequantised to f32 (not `native`).
    pub fn with_native(mut self, native: bool) -> Gguf {
        self.native = native;
        self
    }

    /// Bytes `position..position + len` of the file: a view of the file mapped
    /// once, or (`HETERO_NO_MMAP=1`) read into memory.
    fn bytes_at(&self, name: &str, position: u64, len: u64) -> Result<Bytes, InferError> {
        if !Bytes::mapping_allowed() {
            return self.read_range(name, position, len).map(Bytes::from_vec);
        }
        let range = position as usize..(position + len) as usize;
        let all = match self.mapped.get() {
            Some(all) => all,
            None => {
                let map = Bytes::map(&self.path).map_err(|e| InferError::weights(&self.path, e.to_string()))?;
                self.mapped.get_or_init(|| map)
            }
        };
        all.slice(range).map_err(|_| {
            InferError::tensor(
                &self.path,
                name,
                "lies past the end of the file (changed since it was opened?)",
            )
        })
    }

    /// Reads bytes `position..position + len` of the file (tensor `name`'s).
    fn read_range(&self, name: &str, position: u64, len: u64) -> Result<Vec<u8>, InferError> {
        let mut file =
            File::open(&self.path).map_err(|e| InferError::weights(&self.path, format!("cannot open: {e}")))?;
        let mut raw = vec![0u8; len as usize];
        file.seek(SeekFrom::Start(position))
            .and_then(|_| file.read_exact(&mut raw))
            .map_err(|e| InferError::tensor(&self.path, name, format!("cannot read its bytes: {e}")))?;
        Ok(raw)
    }

    /// A metadata value that must be there.
    pub fn meta(&self, key: &str) -> Result<&Value, InferError> {
        self.metadata
            .get(key)
            .ok_or_else(|| InferError::weights(&self.path, format!("no metadata {key}")))
    }

    /// A metadata integer that must be there.
    pub fn meta_u64(&self, key: &str) -> Result<u64, InferError> {
        self.meta(key)?
            .as_u64()
            .ok_or_else(|| InferError::weights(&self.path, format!("metadata {key} is not an integer")))
    }

    /// A metadata number that must be there.
    pub fn meta_f64(&self, key: &str) -> Result<f64, InferError> {
        self.meta(key)?
            .as_f64()
            .ok_or_else(|| InferError::weights(&self.path, format!("metadata {key} is not a number")))
    }

    /// A metadata array of strings that must be there.
    pub fn meta_strings(&self, key: &str) -> Result<Vec<&str>, InferError> {
        match self.meta(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| InferError::weights(&self.path, format!("metadata {key} holds a non-string")))
                })
                .collect(),
            _ => Err(InferError::weights(
                &self.path,
                format!("metadata {key} is not an array"),
            )),
        }
    }
}

impl Weights for Gguf {
    fn path(&self) -> &Path {
        &self.path
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors
            .get(name)
            .map(|t| t.dims.iter().rev().map(|&d| d as usize).collect())
    }

    fn raw(&self, name: &str) -> Option<Result<RawTensor, InferError>> {
        let info = self.tensors.get(name)?;
        let ty = QType::from_ggml(info.ggml_type).filter(|t| self.native && !t.is_float())?;
        Some(self.bytes_at(name, info.position, info.bytes).map(|bytes| RawTensor {
            ty,
            shape: self.shape(name).unwrap_or_default(),
            bytes,
        }))
    }

    fn read(&self, name: &str) -> Result<Loaded, InferError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| InferError::tensor(&self.path, name, "not in the file"))?;
        let Some((per, size)) = block_layout(info.ggml_type) else {
            return Err(InferError::tensor(
                &self.path,
                name,
                format!(
                    "stored as {}, which this reader cannot dequantise",
                    type_name(info.ggml_type)
                ),
            ));
        };
        let raw = self.read_range(name, info.position, info.bytes)?;
        let values = dequantize(info.ggml_type, &raw, (info.bytes / size * per) as usize);
        Ok(Loaded {
            shape: self.shape(name).unwrap_or_default(),
            values,
        })
    }
}

/// Dequantises `raw` (whole blocks of `ggml_type`) into `n` f32 values.
///
/// # Panics
/// If the type is not one [`block_layout`] knows or `raw` is not `n` values of it:
/// callers check both when the file is opened.
pub fn dequantize(ggml_type: u32, raw: &[u8], n: usize) -> Vec<f32> {
    let ty = QType::from_ggml(ggml_type).expect("block_layout filters unknown types");
    let mut out = vec![0.0; n];
    hetero_kernels::dequantize(ty, raw, &mut out).expect("opening checked the tensor's size");
    out
}

/// A tensor's data to write: f32 values, or bytes already in a format.
#[derive(Debug, Clone, Copy)]
pub enum TensorBytes<'a> {
    /// F32 values.
    F32(&'a [f32]),
    /// Whole blocks of a format, as [`hetero_kernels::quantize`] makes them.
    Raw(QType, &'a [u8]),
}

impl TensorBytes<'_> {
    fn len(&self) -> usize {
        match self {
            TensorBytes::F32(v) => 4 * v.len(),
            TensorBytes::Raw(_, b) => b.len(),
        }
    }

    fn ggml_type(&self) -> u32 {
        match self {
            TensorBytes::F32(_) => QType::F32.ggml_id(),
            TensorBytes::Raw(t, _) => t.ggml_id(),
        }
    }

    fn append(&self, out: &mut Vec<u8>) {
        match self {
            TensorBytes::F32(v) => out.extend(v.iter().flat_map(|v| v.to_le_bytes())),
            TensorBytes::Raw(_, b) => out.extend_from_slice(b),
        }
    }
}

/// A GGUF v3 file of `metadata` and F32 tensors `(name, shape, values)` (shape
/// row-major, outer dimension first, as [`Weights::read`] returns them), as
/// bytes. Integers are written as 64-bit, floats as f64; an array's element type
/// is its first element's (strings for an empty one).
pub fn gguf_bytes<'a>(
    metadata: &BTreeMap<String, Value>,
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize], &'a [f32])> + Clone,
) -> Vec<u8> {
    gguf_bytes_of(
        metadata,
        tensors
            .into_iter()
            .map(|(n, s, v)| (n, s, TensorBytes::F32(v)))
            .collect::<Vec<_>>(),
    )
}

/// [`gguf_bytes`] with tensors in any format.
pub fn gguf_bytes_of<'a>(
    metadata: &BTreeMap<String, Value>,
    tensors: Vec<(&'a str, &'a [usize], TensorBytes<'a>)>,
) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn type_of(v: &Value) -> u32 {
        match v {
            Value::U(_) => 10,
            Value::I(_) => 11,
            Value::F(_) => 12,
            Value::Bool(_) => 7,
            Value::Str(_) => 8,
            Value::Array(_) => 9,
        }
    }
    fn value(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::U(x) => out.extend(x.to_le_bytes()),
            Value::I(x) => out.extend(x.to_le_bytes()),
            Value::F(x) => out.extend(x.to_le_bytes()),
            Value::Bool(x) => out.push(u8::from(*x)),
            Value::Str(s) => string(out, s),
            Value::Array(items) => {
                out.extend(items.first().map_or(8, type_of).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                items.iter().for_each(|item| value(out, item));
            }
        }
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        string(&mut out, k);
        out.extend(type_of(v).to_le_bytes());
        value(&mut out, v);
    }
    write_tensors(&mut out, &tensors);
    out
}

/// GGUF's tensor directory and data for `tensors`, after the metadata: names,
/// dimensions innermost first, types, offsets 32-byte aligned, then the data.
fn write_tensors(out: &mut Vec<u8>, tensors: &[(&str, &[usize], TensorBytes)]) {
    let mut offset = 0u64;
    for (name, shape, data) in tensors {
        out.extend((name.len() as u64).to_le_bytes());
        out.extend(name.as_bytes());
        out.extend((shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend(data.ggml_type().to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (data.len() as u64).div_ceil(32) * 32;
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    for (_, _, data) in tensors {
        let start = out.len();
        data.append(out);
        out.resize(start + data.len().div_ceil(32) * 32, 0);
    }
}

/// Writers of small GGUF files, for tests here and in other modules.
#[cfg(test)]
pub(crate) mod write {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// A metadata value to write.
    pub enum Meta<'a> {
        U32(u32),
        F32(f32),
        Str(&'a str),
        Strings(Vec<String>),
    }

    /// A GGUF v3 file with `meta` and F32 `tensors` (row-major, outer dimension
    /// first, as [`Weights::read`] returns them).
    pub fn gguf(meta: &[(&str, Meta)], tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((meta.len() as u64).to_le_bytes());
        for (k, v) in meta {
            string(&mut out, k);
            match v {
                Meta::U32(x) => {
                    out.extend(4u32.to_le_bytes());
                    out.extend(x.to_le_bytes());
                }
                Meta::F32(x) => {
                    out.extend(6u32.to_le_bytes());
                    out.extend(x.to_le_bytes());
                }
                Meta::Str(s) => {
                    out.extend(8u32.to_le_bytes());
                    string(&mut out, s);
                }
                Meta::Strings(items) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(8u32.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    for s in items {
                        string(&mut out, s);
                    }
                }
            }
        }
        let tensors: Vec<_> = tensors
            .iter()
            .map(|(n, s, v)| (*n, s.as_slice(), super::TensorBytes::F32(v)))
            .collect();
        super::write_tensors(&mut out, &tensors);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::write::{Meta, gguf};
    use super::*;

    /// What `gguf_bytes` writes, `open` reads back: every metadata value and tensor.
    #[test]
    fn written_files_read_back() {
        let metadata: BTreeMap<String, Value> = [
            ("a.u", Value::U(7)),
            ("a.i", Value::I(-3)),
            ("a.f", Value::F(0.25)),
            ("a.b", Value::Bool(true)),
            ("a.s", Value::Str("llama".into())),
            (
                "a.v",
                Value::Array(vec![Value::Str("x".into()), Value::Str("yz".into())]),
            ),
            ("a.e", Value::Array(vec![])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let values: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let bytes = gguf_bytes(&metadata, [("t", &[2usize, 3][..], &values[..])]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, bytes).unwrap();
        let g = Gguf::open(&path).unwrap();
        assert_eq!(g.metadata, metadata);
        assert_eq!(g.expect("t", &[2, 3]).unwrap(), values);
    }

    #[test]
    fn reads_metadata_and_one_tensor_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let bytes = gguf(
            &[
                ("general.architecture", Meta::Str("llama")),
                ("llama.block_count", Meta::U32(2)),
                ("llama.rope.freq_base", Meta::F32(10000.0)),
                ("tokenizer.ggml.tokens", Meta::Strings(vec!["a".into(), "b".into()])),
            ],
            &[
                ("w", vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
                ("n", vec![3], vec![7.0, 8.0, 9.0]),
            ],
        );
        std::fs::write(&path, &bytes).unwrap();
        let g = Gguf::open(&path).unwrap();
        assert_eq!(g.meta("general.architecture").unwrap().as_str(), Some("llama"));
        assert_eq!(g.meta_u64("llama.block_count").unwrap(), 2);
        assert_eq!(g.meta_strings("tokenizer.ggml.tokens").unwrap(), ["a", "b"]);
        let w = g.read("w").unwrap();
        assert_eq!((w.shape, w.values), (vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        assert_eq!(g.read("n").unwrap().values, [7.0, 8.0, 9.0]);
        let missing = g.read("x").unwrap_err().to_string();
        assert!(missing.contains("tensor x: not in the file"), "{missing}");

        // Truncated: the last tensor is cut off, and opening says so.
        std::fs::write(&path, &bytes[..bytes.len() - 30]).unwrap();
        let err = Gguf::open(&path).unwrap_err().to_string();
        assert!(err.contains("tensor n") && err.contains("truncated"), "{err}");
        // Cut inside the header.
        std::fs::write(&path, &bytes[..40]).unwrap();
        let err = Gguf::open(&path).unwrap_err().to_string();
        assert!(err.contains("header ends"), "{err}");
        std::fs::write(&path, b"PK\x03\x04 not a gguf").unwrap();
        assert!(Gguf::open(&path).unwrap_err().to_string().contains("not a GGUF file"));
    }

    /// A header of one metadata key `x` whose value is `body` (its type first).
    fn one_key(body: &[u8]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes()); // tensors
        b.extend(1u64.to_le_bytes()); // metadata
        b.extend(1u64.to_le_bytes());
        b.push(b'x');
        b.extend(body);
        b
    }

    #[test]
    fn hostile_headers_are_refused_without_recursing_or_allocating_what_they_claim() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let refused = |bytes: Vec<u8>| {
            std::fs::write(&path, bytes).unwrap();
            Gguf::open(&path).unwrap_err().to_string()
        };
        // Arrays of arrays, 100 000 deep: stack overflow if followed.
        let mut deep = 9u32.to_le_bytes().to_vec(); // x is an array …
        for _ in 0..100_000 {
            deep.extend(9u32.to_le_bytes()); // … of one array …
            deep.extend(1u64.to_le_bytes());
        }
        let err = refused(one_key(&deep));
        assert!(err.contains("metadata x nests arrays more than 4 deep"), "{err}");
        // A string that promises 16 MB in a file of 40 bytes.
        let mut long = 8u32.to_le_bytes().to_vec();
        long.extend((1u64 << 24).to_le_bytes());
        let err = refused(one_key(&long));
        assert!(err.contains("more than the 0 bytes left"), "{err}");
        // Ten million one-byte values: each would cost tens of bytes in memory.
        let mut many = 9u32.to_le_bytes().to_vec();
        many.extend(0u32.to_le_bytes()); // u8 elements
        many.extend(10_000_000u64.to_le_bytes());
        many.extend(vec![0u8; 10_000_000]);
        let err = refused(one_key(&many));
        assert!(err.contains("more than 8388608 metadata values"), "{err}");
    }
}
