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
//! Quantisations read: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 (ggml's
//! `dequantize_row_*`: blocks of 32 along the innermost dimension).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::InferError;
use crate::weights::{Loaded, Weights};

/// Refuse metadata strings and arrays larger than this (a corrupt length would
/// otherwise ask for gigabytes).
const MAX_ITEMS: u64 = 1 << 24;

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
    /// The metadata, by key.
    pub metadata: BTreeMap<String, Value>,
    /// The tensor directory, by name.
    pub tensors: BTreeMap<String, TensorInfo>,
}

/// (elements per block, bytes per block) of a ggml type this reader dequantises.
fn block_layout(ggml_type: u32) -> Option<(u64, u64)> {
    Some(match ggml_type {
        0 => (1, 4),   // F32
        1 => (1, 2),   // F16
        30 => (1, 2),  // BF16
        2 => (32, 18), // Q4_0
        3 => (32, 20), // Q4_1
        6 => (32, 22), // Q5_0
        7 => (32, 24), // Q5_1
        8 => (32, 34), // Q8_0
        _ => return None,
    })
}

fn type_name(ggml_type: u32) -> String {
    let name = match ggml_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        30 => "BF16",
        _ => return format!("ggml type {ggml_type}"),
    };
    name.to_string()
}

/// A reader over the header that counts its position and names what it reads.
struct Header<R> {
    r: R,
    at: u64,
    path: PathBuf,
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
        if n > MAX_ITEMS {
            return Err(InferError::weights(
                &self.path,
                format!(
                    "{what} of {n} at byte {} is not plausible: the file is corrupt",
                    self.at - 8
                ),
            ));
        }
        Ok(n)
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

    fn value(&mut self, kind: u32, key: &str) -> Result<Value, InferError> {
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
            9 => {
                let inner = self.u32(key)?;
                let n = self.count(key)?;
                Value::Array((0..n).map(|_| self.value(inner, key)).collect::<Result<_, _>>()?)
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
            let value = h.value(kind, &key)?;
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
            let position = data_start + offset;
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
            metadata,
            tensors,
        })
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
        let mut file =
            File::open(&self.path).map_err(|e| InferError::weights(&self.path, format!("cannot open: {e}")))?;
        let mut raw = vec![0u8; info.bytes as usize];
        file.seek(SeekFrom::Start(info.position))
            .and_then(|_| file.read_exact(&mut raw))
            .map_err(|e| InferError::tensor(&self.path, name, format!("cannot read its bytes: {e}")))?;
        let values = dequantize(info.ggml_type, &raw, (info.bytes / size * per) as usize);
        Ok(Loaded {
            shape: self.shape(name).unwrap_or_default(),
            values,
        })
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantises `raw` (whole blocks of `ggml_type`) into `n` f32 values.
pub fn dequantize(ggml_type: u32, raw: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    match ggml_type {
        0 => out.extend(
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
        ),
        1 => out.extend(raw.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())),
        30 => out.extend(raw.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())),
        2 => {
            for b in raw.chunks_exact(18) {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|q| ((q & 0x0F) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|q| ((q >> 4) as i32 - 8) as f32 * d));
            }
        }
        3 => {
            for b in raw.chunks_exact(20) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|q| (q & 0x0F) as f32 * d + m));
                out.extend(qs.iter().map(|q| (q >> 4) as f32 * d + m));
            }
        }
        6 | 7 => {
            let with_min = ggml_type == 7;
            let size = if with_min { 24 } else { 22 };
            for b in raw.chunks_exact(size) {
                let d = f16_at(b, 0);
                let (m, at) = if with_min { (f16_at(b, 2), 4) } else { (0.0, 2) };
                let qh = u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
                let qs = &b[at + 4..at + 20];
                let offset = if with_min { 0 } else { 16 };
                let value = |q: u32| (q as i32 - offset) as f32 * d + m;
                out.extend(
                    qs.iter()
                        .enumerate()
                        .map(|(j, q)| value((q & 0x0F) as u32 | (((qh >> j) << 4) & 0x10))),
                );
                out.extend(
                    qs.iter()
                        .enumerate()
                        .map(|(j, q)| value((q >> 4) as u32 | ((qh >> (j + 12)) & 0x10))),
                );
            }
        }
        8 => {
            for b in raw.chunks_exact(34) {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        other => unreachable!("ggml type {other} has no dequantiser; block_layout filters it"),
    }
    debug_assert_eq!(out.len(), n);
    out
}

/// A GGUF v3 file of `metadata` and F32 tensors `(name, shape, values)` (shape
/// row-major, outer dimension first, as [`Weights::read`] returns them), as
/// bytes. Integers are written as 64-bit, floats as f64; an array's element type
/// is its first element's (strings for an empty one).
pub fn gguf_bytes<'a>(
    metadata: &BTreeMap<String, Value>,
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize], &'a [f32])> + Clone,
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
    out.extend((tensors.clone().into_iter().count() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        string(&mut out, k);
        out.extend(type_of(v).to_le_bytes());
        value(&mut out, v);
    }
    write_tensors(&mut out, tensors);
    out
}

/// GGUF's tensor directory and data for F32 `tensors`, after the metadata:
/// names, dimensions innermost first, offsets 32-byte aligned, then the values.
fn write_tensors<'a>(out: &mut Vec<u8>, tensors: impl IntoIterator<Item = (&'a str, &'a [usize], &'a [f32])> + Clone) {
    let mut offset = 0u64;
    for (name, shape, values) in tensors.clone() {
        out.extend((name.len() as u64).to_le_bytes());
        out.extend(name.as_bytes());
        out.extend((shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend(0u32.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (values.len() as u64 * 4).div_ceil(32) * 32;
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    for (_, _, values) in tensors {
        let start = out.len();
        out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        out.resize(start + (values.len() * 4).div_ceil(32) * 32, 0);
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
        super::write_tensors(
            &mut out,
            tensors.iter().map(|(n, s, v)| (*n, s.as_slice(), v.as_slice())),
        );
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
    fn q4_1_low_nibbles_first_then_high() {
        let mut block = Vec::new();
        block.extend(f16::from_f32(1.0).to_le_bytes());
        block.extend(f16::from_f32(0.5).to_le_bytes());
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let v = dequantize(3, &block, 32);
        let expect: Vec<f32> = (0..16)
            .map(|j| j as f32 + 0.5)
            .chain((0..16).map(|j| 15.5 - j as f32))
            .collect();
        assert_eq!(v, expect);
    }

    /// The first block of SmolLM2's `blk.0.attn_q.weight`, checked against
    /// gguf-py's dequantiser.
    #[test]
    fn q4_1_matches_llama_cpp_on_a_real_block() {
        let hex = "0f30d8b9458765406f65164b677664502267655a";
        let raw: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let v = dequantize(3, &raw, 32);
        let expect = [
            -0.096313, 0.157349, -0.096313, -0.730469, 1.171997, -0.096313, 0.030518, 0.664673,
        ];
        for (a, b) in v.iter().zip(expect) {
            assert!((a - b).abs() < 1e-5, "{v:?}");
        }
        assert!((v[31] - -0.096313).abs() < 1e-5);
    }

    #[test]
    fn q8_0_and_q4_0_and_q5_scale_their_integers() {
        let mut block = f16::from_f32(0.25).to_le_bytes().to_vec();
        block.extend((0..32).map(|j| (j as i8 - 16) as u8));
        assert_eq!(
            dequantize(8, &block, 32),
            (0..32).map(|j| (j - 16) as f32 * 0.25).collect::<Vec<_>>()
        );
        let mut block = f16::from_f32(2.0).to_le_bytes().to_vec();
        block.extend([0x8Fu8; 16]);
        let v = dequantize(2, &block, 32);
        assert!(v[..16].iter().all(|&x| x == 14.0) && v[16..].iter().all(|&x| x == 0.0));
        // Q5_0: the fifth bit of element j is bit j of qh (low half), j+16 (high half).
        let mut block = f16::from_f32(1.0).to_le_bytes().to_vec();
        block.extend(0x0001_0001u32.to_le_bytes());
        block.extend([0u8; 16]);
        let v = dequantize(6, &block, 32);
        assert_eq!((v[0], v[1], v[16], v[17]), (0.0, -16.0, 0.0, -16.0));
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
}
