//! Bundles of images a worker received, kept on its host so that a worker started
//! there again (relaunched after a failure, the next job on the same data) takes
//! them from disk instead of from the other workers.
//!
//! ## Design
//! A cache is a folder named for the dataset (see [`cache_key`]); each process
//! that writes to it appends to a file of its own (`<pid>-<time>.bundles`, made
//! new), so two workers of one job on one host never interleave their writes. A file is a
//! sequence of records, each a bundle's length (u64, little-endian) and the
//! bundle, whose own checksum vouches for it ([`crate::held`]). Loading reads
//! every file of the folder and unpacks each record; a record cut short (a crash
//! mid-write), a length past what the file holds, or a damaged bundle ends that
//! file's reading and is reported, and the images it would have given are simply
//! received again.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::held::HeldImages;

/// Longest record a cache file may announce.
const MAX_RECORD: u64 = 1 << 30;

/// A folder of cached bundles for one dataset.
#[derive(Debug)]
pub struct BundleCache {
    dir: PathBuf,
    file: Option<std::fs::File>,
}

/// What loading a cache gave.
#[derive(Debug, Default, PartialEq)]
pub struct Loaded {
    /// Images taken from it.
    pub images: usize,
    /// Files whose reading stopped early, and why.
    pub damaged: Vec<String>,
}

/// A folder name for a dataset: its path and its description hashed (FNV-1a, 64
/// bits). The description should say everything that decides the images — how
/// they are read and prepared, and a fingerprint of their contents — so that
/// another dataset, or the same path with other contents, never reads this
/// one's images.
pub fn cache_key(path: &Path, facts: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in path
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .chain([0u8].iter())
        .chain(facts)
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

impl BundleCache {
    /// The cache in folder `dir` (made when the first bundle is kept).
    pub fn new(dir: impl Into<PathBuf>) -> BundleCache {
        BundleCache {
            dir: dir.into(),
            file: None,
        }
    }

    /// Its folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Unpacks every cached bundle into `images` (labels below `classes`).
    pub fn load_into(&self, images: &mut HeldImages, classes: usize) -> Loaded {
        let mut loaded = Loaded::default();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return loaded;
        };
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "bundles"))
            .collect();
        files.sort();
        for path in files {
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    loaded.damaged.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            let mut rest = bytes.as_slice();
            while !rest.is_empty() {
                let problem = if rest.len() < 8 {
                    Some(format!("{} bytes where a record's length was expected", rest.len()))
                } else {
                    let len = u64::from_le_bytes(rest[..8].try_into().expect("eight bytes"));
                    if len > MAX_RECORD || len > (rest.len() - 8) as u64 {
                        Some(format!("a record of {len} bytes with {} left", rest.len() - 8))
                    } else {
                        let (record, after) = rest[8..].split_at(len as usize);
                        rest = after;
                        match images.unpack(record, classes) {
                            Ok(n) => {
                                loaded.images += n;
                                None
                            }
                            Err(e) => Some(e.to_string()),
                        }
                    }
                };
                if let Some(why) = problem {
                    loaded.damaged.push(format!("{}: {why}", path.display()));
                    break;
                }
            }
        }
        loaded
    }

    /// Keeps `bundle` (appended to this process's file).
    pub fn append(&mut self, bundle: &[u8]) -> std::io::Result<()> {
        if self.file.is_none() {
            std::fs::create_dir_all(&self.dir)?;
            // A name no earlier process used (a pid comes back), so a file cut by a
            // crash is never appended to.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let path = self.dir.join(format!("{}-{nanos}.bundles", std::process::id()));
            self.file = Some(std::fs::OpenOptions::new().create_new(true).append(true).open(path)?);
        }
        let file = self.file.as_mut().expect("opened above");
        let mut record = Vec::with_capacity(8 + bundle.len());
        record.extend_from_slice(&(bundle.len() as u64).to_le_bytes());
        record.extend_from_slice(bundle);
        file.write_all(&record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mnist::ImageDataset;

    fn full() -> HeldImages {
        let set = |n: usize| ImageDataset {
            pixels: (0..n * 4).map(|i| i as u8).collect(),
            labels: (0..n).map(|i| (i % 10) as u8).collect(),
            rows: 2,
            cols: 2,
        };
        HeldImages::complete(set(20), set(5))
    }

    #[test]
    fn a_worker_started_again_takes_its_images_from_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let full = full();
        let mut cache = BundleCache::new(dir.path().join("k"));
        cache.append(&full.pack(&[1, 2, 3]).unwrap()).unwrap();
        cache.append(&full.pack(&[21]).unwrap()).unwrap();
        let mut again = HeldImages::empty(20, 5, 2, 2);
        let loaded = BundleCache::new(dir.path().join("k")).load_into(&mut again, 10);
        assert_eq!(
            loaded,
            Loaded {
                images: 4,
                damaged: vec![]
            }
        );
        assert!([1, 2, 3, 21].iter().all(|&id| again.holds(id)));
        assert_eq!(again.count_held(), 4);
        // No folder yet: nothing, and no error.
        let none = BundleCache::new(dir.path().join("absent")).load_into(&mut again, 10);
        assert_eq!(none, Loaded::default());
    }

    #[test]
    fn a_cut_or_damaged_file_gives_what_precedes_the_damage_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let full = full();
        let mut cache = BundleCache::new(dir.path());
        cache.append(&full.pack(&[4]).unwrap()).unwrap();
        cache.append(&full.pack(&[5]).unwrap()).unwrap();
        drop(cache);
        let file = std::fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
        let bytes = std::fs::read(&file).unwrap();
        for cut in 0..bytes.len() {
            std::fs::write(&file, &bytes[..cut]).unwrap();
            let mut w = HeldImages::empty(20, 5, 2, 2);
            let loaded = BundleCache::new(dir.path()).load_into(&mut w, 10);
            let first = bytes.len() / 2;
            assert_eq!(loaded.images, usize::from(cut >= first), "cut at {cut}");
            assert_eq!(
                loaded.damaged.is_empty(),
                cut == 0 || cut == first,
                "cut at {cut}: {loaded:?}"
            );
        }
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        std::fs::write(&file, &flipped).unwrap();
        let mut w = HeldImages::empty(20, 5, 2, 2);
        let loaded = BundleCache::new(dir.path()).load_into(&mut w, 10);
        assert_eq!(loaded.images, 1);
        assert!(loaded.damaged[0].contains("checksum"), "{loaded:?}");
    }

    #[test]
    fn another_dataset_or_other_contents_get_another_folder() {
        let a = cache_key(Path::new("/data/f"), &[1, 2]);
        assert_eq!(a, cache_key(Path::new("/data/f"), &[1, 2]));
        assert_ne!(a, cache_key(Path::new("/data/g"), &[1, 2]));
        assert_ne!(a, cache_key(Path::new("/data/f"), &[1, 3]));
    }
}
