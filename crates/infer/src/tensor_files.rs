//! Safetensors files, alone or as the shards of one model, read with the
//! `safetensors` crate from a memory map.
//!
//! ## Design
//! A Hugging Face folder holds its weights either in one `model.safetensors` or in
//! shards (`model-00001-of-00004.safetensors`…) listed by
//! `model.safetensors.index.json`, whose `weight_map` says which shard holds each
//! tensor. [`SafeTensors`] is one file, [`Shards`] the set; both are [`Weights`],
//! so a model reads a tensor by name without knowing how its folder is cut.
//!
//! Everything a file says about itself is checked when it opens, not when a
//! request runs: the header's length against the file's, every tensor's bytes
//! against its type and shape and against the file (the crate validates the
//! offsets), an index's shard names (plain file names in the folder — an index
//! cannot point outside it), and that each tensor the index lists is in the shard
//! it names. Tensors are read from the map (`HETERO_NO_MMAP=1`: from the file)
//! and converted to f32 one at a time.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use hetero_kernels::Bytes;
use safetensors::{Dtype, SafeTensorError};

use crate::InferError;
use crate::weights::{Loaded, Weights, read_json};

/// Refuse headers above 100 MB (the format's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// Refuse index files above 64 MB (the largest models' are a few MB).
const MAX_INDEX: u64 = 64 << 20;

/// The one-file weights name.
pub const SINGLE_FILE: &str = "model.safetensors";

/// The index of a sharded model.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where one tensor of a file is.
#[derive(Debug, Clone)]
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range in the file.
    start: usize,
    end: usize,
}

/// One safetensors file: its header checked and in memory, tensors read on demand.
#[derive(Debug)]
pub struct SafeTensors {
    path: PathBuf,
    entries: BTreeMap<String, Entry>,
    /// The whole file, mapped (`None` with `HETERO_NO_MMAP=1`).
    mapped: Option<Bytes>,
}

impl SafeTensors {
    /// Maps `path` and checks its header: that it is JSON, that every tensor lies
    /// inside the file and has as many bytes as its type and shape need.
    pub fn open(path: &Path) -> Result<SafeTensors, InferError> {
        let bad = |why: String| InferError::weights(path, why);
        let mut file = File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
        let file_len = file.metadata().map_err(|e| bad(format!("cannot stat: {e}")))?.len();
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|_| bad("shorter than a safetensors header".into()))?;
        let header_len = u64::from_le_bytes(len);
        if header_len > MAX_HEADER || header_len.saturating_add(8) > file_len {
            return Err(bad(format!(
                "header length {header_len} does not fit a {file_len}-byte file: not safetensors, or truncated"
            )));
        }
        let map = Bytes::map(path).map_err(|e| bad(e.to_string()))?;
        let (header, metadata) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| match e {
            SafeTensorError::InvalidHeaderDeserialization(e) => bad(format!("the header is not valid JSON: {e}")),
            SafeTensorError::InvalidHeader(e) => bad(format!("the header is not UTF-8: {e}")),
            SafeTensorError::MetadataIncompleteBuffer => bad(format!(
                "the header describes more or fewer bytes than the file's {file_len}: the file is truncated or has bytes appended"
            )),
            SafeTensorError::TensorInvalidInfo => {
                bad("a tensor's byte count does not match its type and shape".into())
            }
            other => bad(format!("not a valid safetensors file: {other}")),
        })?;
        let data_start = 8 + header;
        let entries = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let entry = Entry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                };
                (name, entry)
            })
            .collect();
        Ok(SafeTensors {
            path: path.to_path_buf(),
            entries,
            mapped: Bytes::mapping_allowed().then_some(map),
        })
    }

    /// The names of the tensors in the file.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// `convert` of the stored bytes of `e` (tensor `name`'s): straight from the
    /// map, or read from the file.
    fn with_bytes<T>(&self, name: &str, e: &Entry, convert: impl FnOnce(&[u8]) -> T) -> Result<T, InferError> {
        let cannot = |why: String| InferError::tensor(&self.path, name, why);
        if let Some(map) = &self.mapped {
            let bytes = map
                .slice(e.start..e.end)
                .map_err(|_| cannot("lies past the end of the file (changed since it was opened?)".into()))?;
            return Ok(convert(&bytes));
        }
        let mut file = File::open(&self.path).map_err(|err| cannot(format!("cannot open: {err}")))?;
        let mut raw = vec![0u8; e.end - e.start];
        file.seek(SeekFrom::Start(e.start as u64))
            .and_then(|_| file.read_exact(&mut raw))
            .map_err(|err| cannot(format!("cannot read its bytes: {err}")))?;
        Ok(convert(&raw))
    }
}

impl Weights for SafeTensors {
    fn path(&self) -> &Path {
        &self.path
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.entries.get(name).map(|e| e.shape.clone())
    }

    fn read(&self, name: &str) -> Result<Loaded, InferError> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| InferError::tensor(&self.path, name, "not in the file"))?;
        let values = match e.dtype {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 => self.with_bytes(name, e, |raw| to_f32(e.dtype, raw))?,
            other => {
                return Err(InferError::tensor(
                    &self.path,
                    name,
                    format!("stored as {other:?}; weights must be F32, F16 or BF16"),
                ));
            }
        };
        Ok(Loaded {
            shape: e.shape.clone(),
            values,
        })
    }
}

/// Little-endian `raw` of a float `dtype` as f32.
fn to_f32(dtype: Dtype, raw: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F16 => raw
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => raw
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    }
}

/// A model's weights cut into shards, found through its index.
#[derive(Debug)]
pub struct Shards {
    index: PathBuf,
    files: Vec<Arc<SafeTensors>>,
    /// Tensor name → position in `files`.
    map: BTreeMap<String, usize>,
}

impl Shards {
    /// Reads the index at `index`, opens every shard it names (in the index's
    /// folder) and checks each tensor is where the index says.
    pub fn open(index: &Path) -> Result<Shards, InferError> {
        let bad = |why: String| InferError::weights(index, why);
        let json = read_json(index, MAX_INDEX)
            .map_err(bad)?
            .ok_or_else(|| bad("missing".into()))?;
        let weight_map = json["weight_map"]
            .as_object()
            .ok_or_else(|| bad("no \"weight_map\" object (tensor name → shard file)".into()))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut by_file: BTreeMap<&str, usize> = BTreeMap::new();
        let mut files = Vec::new();
        let mut map = BTreeMap::new();
        for (tensor, file) in weight_map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("weight_map[{tensor:?}] is not a file name")))?;
            if !is_plain_file_name(file) {
                return Err(bad(format!(
                    "weight_map[{tensor:?}] = {file:?}: a shard must be a file name in the index's folder"
                )));
            }
            let position = match by_file.get(file) {
                Some(&p) => p,
                None => {
                    files.push(Arc::new(SafeTensors::open(&dir.join(file))?));
                    by_file.insert(file, files.len() - 1);
                    files.len() - 1
                }
            };
            if files[position].shape(tensor).is_none() {
                return Err(InferError::tensor(
                    &dir.join(file),
                    tensor,
                    format!(
                        "the index {} puts it in this shard, which does not hold it",
                        index.display()
                    ),
                ));
            }
            map.insert(tensor.clone(), position);
        }
        if files.is_empty() {
            return Err(bad("the weight_map lists no tensors".into()));
        }
        Ok(Shards {
            index: index.to_path_buf(),
            files,
            map,
        })
    }

    /// How many shard files there are.
    pub fn shards(&self) -> usize {
        self.files.len()
    }

    fn file(&self, name: &str) -> Option<&SafeTensors> {
        self.map.get(name).map(|&p| &*self.files[p])
    }
}

impl Weights for Shards {
    fn path(&self) -> &Path {
        &self.index
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.file(name)?.shape(name)
    }

    fn read(&self, name: &str) -> Result<Loaded, InferError> {
        self.file(name)
            .ok_or_else(|| InferError::tensor(&self.index, name, "not listed in the index"))?
            .read(name)
    }
}

/// Whether `name` names a file directly in a folder (no separators, not `..`).
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

/// The weights of the folder `dir`: its index's shards, its `model.safetensors`,
/// or its one `*.safetensors` file; `None` when it has none of them.
pub fn open_folder(dir: &Path) -> Option<Result<Box<dyn Weights>, InferError>> {
    if dir.join(INDEX_FILE).is_file() {
        return Some(Shards::open(&dir.join(INDEX_FILE)).map(|s| Box::new(s) as Box<dyn Weights>));
    }
    if dir.join(SINGLE_FILE).is_file() {
        return Some(SafeTensors::open(&dir.join(SINGLE_FILE)).map(|s| Box::new(s) as Box<dyn Weights>));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    match found.len() {
        0 => None,
        1 => Some(SafeTensors::open(&found.remove(0)).map(|s| Box::new(s) as Box<dyn Weights>)),
        n => Some(Err(InferError::weights(
            dir,
            format!("{n} .safetensors files but no {INDEX_FILE} saying which tensor is in which"),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::write;

    #[test]
    fn reads_tensors_and_checks_their_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let bytes = write::safetensors(&[
            ("a", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]),
            ("b", vec![3], vec![5.0, 6.0, 7.0]),
        ]);
        std::fs::write(&path, &bytes).unwrap();
        let st = SafeTensors::open(&path).unwrap();
        assert_eq!(st.names().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(st.expect("a", &[2, 2]).unwrap(), [1.0, 2.0, 3.0, 4.0]);
        let wrong = st.expect("a", &[4]).unwrap_err().to_string();
        assert!(
            wrong.contains("tensor a: shape [2, 2], but the model's configuration needs [4]"),
            "{wrong}"
        );
        let missing = st.expect("c", &[1]).unwrap_err().to_string();
        assert!(missing.contains("tensor c: missing"), "{missing}");

        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let cut = SafeTensors::open(&path).unwrap_err().to_string();
        assert!(cut.contains("truncated"), "{cut}");
        std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk").unwrap();
        let junk = SafeTensors::open(&path).unwrap_err().to_string();
        assert!(junk.contains("not safetensors"), "{junk}");
    }

    #[test]
    fn shards_are_found_through_their_index_and_an_index_cannot_point_outside_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("one.safetensors"),
            write::safetensors(&[("a", vec![2], vec![1.0, 2.0])]),
        )
        .unwrap();
        std::fs::write(
            d.join("two.safetensors"),
            write::safetensors(&[("b", vec![1], vec![3.0])]),
        )
        .unwrap();
        let index = |map: serde_json::Value| {
            std::fs::write(
                d.join(INDEX_FILE),
                serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
            )
            .unwrap();
            Shards::open(&d.join(INDEX_FILE))
        };
        let shards = index(serde_json::json!({"a": "one.safetensors", "b": "two.safetensors"})).unwrap();
        assert_eq!(shards.shards(), 2);
        assert_eq!(shards.read("b").unwrap().values, [3.0]);
        assert_eq!(shards.shape("a"), Some(vec![2]));
        assert!(open_folder(d).unwrap().unwrap().shape("b").is_some());

        let e = index(serde_json::json!({"a": "two.safetensors"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tensor a") && e.contains("does not hold it"), "{e}");
        let e = index(serde_json::json!({"a": "../one.safetensors"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("a file name in the index's folder"), "{e}");
        let e = index(serde_json::json!({"a": "gone.safetensors"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gone.safetensors") && e.contains("cannot open"), "{e}");
        std::fs::write(d.join(INDEX_FILE), "{").unwrap();
        let e = Shards::open(&d.join(INDEX_FILE)).unwrap_err().to_string();
        assert!(e.contains("not valid JSON"), "{e}");
    }
}
