//! [`Bytes`]: a weight tensor's bytes, shared and cheap to slice — either read into
//! memory or memory-mapped from the model file, so a worker's memory is about the
//! size of the weights it holds and workers on one host share the page cache.
//!
//! Mapping a file is the one `unsafe` here: the map is read-only, but if another
//! process truncates or rewrites the file while it is mapped, reads see the change
//! or fault (the usual mmap caveat). Model files are not edited in place; where that
//! cannot be promised, `HETERO_NO_MMAP=1` reads tensors into memory instead.
#![allow(unsafe_code)]

use std::fs::File;
use std::ops::{Deref, Range};
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;

use crate::KernelError;

#[derive(Clone)]
enum Backing {
    Owned(Arc<[u8]>),
    Mapped(Arc<Mmap>),
}

/// A range of shared bytes.
#[derive(Clone)]
pub struct Bytes {
    backing: Backing,
    range: Range<usize>,
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.backing {
            Backing::Owned(_) => "owned",
            Backing::Mapped(_) => "mapped",
        };
        write!(f, "Bytes({kind}, {}..{})", self.range.start, self.range.end)
    }
}

impl Bytes {
    /// Bytes owned in memory.
    pub fn from_vec(v: Vec<u8>) -> Bytes {
        let len = v.len();
        Bytes {
            backing: Backing::Owned(v.into()),
            range: 0..len,
        }
    }

    /// Whether model files may be mapped: not when `HETERO_NO_MMAP=1` (the
    /// readers then read tensors into memory).
    pub fn mapping_allowed() -> bool {
        std::env::var_os("HETERO_NO_MMAP").is_none_or(|v| v != "1")
    }

    /// The whole of `path`, memory-mapped read-only.
    pub fn map(path: &Path) -> Result<Bytes, KernelError> {
        let file = File::open(path).map_err(|e| KernelError::Io(format!("cannot open {}: {e}", path.display())))?;
        // SAFETY: the map is read-only and private to this process; the module doc
        // states what happens if the file changes underneath it.
        let map =
            unsafe { Mmap::map(&file) }.map_err(|e| KernelError::Io(format!("cannot map {}: {e}", path.display())))?;
        let len = map.len();
        Ok(Bytes {
            backing: Backing::Mapped(Arc::new(map)),
            range: 0..len,
        })
    }

    /// Whether the bytes are a view of a mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.backing, Backing::Mapped(_))
    }

    /// A sub-range, relative to this one, sharing the same backing.
    pub fn slice(&self, r: Range<usize>) -> Result<Bytes, KernelError> {
        if r.start > r.end || r.end > self.len() {
            return Err(KernelError::Length {
                what: format!("bytes {}..{} of a view", r.start, r.end),
                expected: self.len(),
                got: r.end,
            });
        }
        Ok(Bytes {
            backing: self.backing.clone(),
            range: self.range.start + r.start..self.range.start + r.end,
        })
    }
}

impl Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        let all: &[u8] = match &self.backing {
            Backing::Owned(v) => v,
            Backing::Mapped(m) => m,
        };
        &all[self.range.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_and_owned_bytes_slice_alike() {
        let dir = std::env::temp_dir().join(format!("hetero-kernels-bytes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b");
        std::fs::write(&path, (0..100u8).collect::<Vec<_>>()).unwrap();
        let mapped = Bytes::map(&path).unwrap();
        let owned = Bytes::from_vec((0..100u8).collect());
        for b in [mapped, owned] {
            let s = b.slice(10..20).unwrap().slice(5..7).unwrap();
            assert_eq!(&*s, &[15, 16]);
            assert!(b.slice(90..101).is_err());
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
