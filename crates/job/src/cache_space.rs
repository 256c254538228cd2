//! Keeping an agent's data cache within a size: the folders used least
//! recently go first.
//!
//! ## Design
//! The cache (`<agent work dir>/data-cache/`) holds one folder per dataset:
//! - bundles a worker received over the ring (`hetero_data::bundle_cache`);
//! - files it fetched from the coordinator.
//!
//! A worker that uses a folder marks it ([`mark_used`]: a `.last-used` file
//! it rewrites), and the agent evicts when it starts ([`evict`]), when none of
//! its workers run. So no folder is taken from under one of its workers.
//!
//! Only marked folders are ever removed. Anything else someone put there is
//! left alone, and a cache that is a symbolic link is not followed (it may
//! lead to a disk of other things). A folder that cannot be measured is
//! skipped, not a reason to stop.

use std::path::{Path, PathBuf};

/// The file whose modification time says when a cache folder was last used.
pub const MARK: &str = ".last-used";

/// Marks the cache folder `dir` as used now. Best effort: a cache that cannot
/// be marked is only evicted sooner.
pub fn mark_used(dir: &Path) {
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::write(dir.join(MARK), b"");
}

/// What [`evict`] did.
#[derive(Debug, Default, PartialEq)]
pub struct Evicted {
    /// The folders removed (oldest first) and their bytes.
    pub removed: Vec<(PathBuf, u64)>,
    /// Bytes the cache holds now.
    pub kept: u64,
}

/// Removes `cache`'s folders, least recently used first, until it holds at
/// most `max_bytes`. A missing cache is an empty one.
pub fn evict(cache: &Path, max_bytes: u64) -> std::io::Result<Evicted> {
    let mut folders = Vec::new();
    match std::fs::symlink_metadata(cache) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(std::io::Error::other(format!(
                "{} is a symbolic link: the cache is not kept within its size through it",
                cache.display()
            )));
        }
        _ => {}
    }
    let entries = match std::fs::read_dir(cache) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Evicted::default()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let path = entry.path();
        // Marked by a worker, or not the cache's to remove.
        let Ok(used) = std::fs::metadata(path.join(MARK)).and_then(|m| m.modified()) else {
            continue;
        };
        let Ok(size) = size_of(&path) else { continue };
        folders.push((used, size, path));
    }
    folders.sort();
    let mut total: u64 = folders.iter().map(|(_, size, _)| size).sum();
    let mut removed = Vec::new();
    for (_, size, path) in folders {
        if total <= max_bytes {
            break;
        }
        std::fs::remove_dir_all(&path)?;
        total -= size;
        removed.push((path, size));
    }
    Ok(Evicted { removed, kept: total })
}

/// Bytes of the regular files under `dir` (links are not followed).
fn size_of(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            total += size_of(&entry.path())?;
        } else if kind.is_file() {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn folder(cache: &Path, name: &str, bytes: usize, used_secs_ago: u64) -> PathBuf {
        let dir = cache.join(name);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/data"), vec![0u8; bytes]).unwrap();
        mark_used(&dir);
        let when = SystemTime::now() - Duration::from_secs(used_secs_ago);
        std::fs::File::options()
            .write(true)
            .open(dir.join(MARK))
            .unwrap()
            .set_modified(when)
            .unwrap();
        dir
    }

    #[test]
    fn the_least_recently_used_folders_go_first_until_the_cache_fits() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("data-cache");
        let old = folder(&cache, "old", 1000, 3000);
        let middle = folder(&cache, "middle", 1000, 2000);
        let recent = folder(&cache, "recent", 1000, 10);
        let e = evict(&cache, 2500).unwrap();
        assert_eq!(e.removed, vec![(old.clone(), 1000)]);
        assert_eq!(e.kept, 2000);
        assert!(!old.exists() && middle.exists() && recent.exists());
        // Using a folder moves it to the back of the line.
        mark_used(&middle);
        let e = evict(&cache, 1000).unwrap();
        assert_eq!(e.removed, vec![(recent.clone(), 1000)]);
        assert!(middle.exists());
    }

    #[test]
    fn only_marked_folders_are_removed_and_a_linked_cache_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("data-cache");
        let theirs = cache.join("someone-elses");
        std::fs::create_dir_all(&theirs).unwrap();
        std::fs::write(theirs.join("file"), vec![0u8; 500]).unwrap();
        let ours = folder(&cache, "ours", 100, 5);
        let e = evict(&cache, 0).unwrap();
        assert_eq!(e.removed, vec![(ours, 100)]);
        assert!(theirs.exists());
        let linked = tmp.path().join("linked-cache");
        std::os::unix::fs::symlink(&cache, &linked).unwrap();
        folder(&cache, "again", 100, 5);
        assert!(evict(&linked, 0).is_err());
        assert!(cache.join("again").exists());
    }

    #[test]
    fn a_cache_within_its_size_or_missing_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(evict(&tmp.path().join("none"), 0).unwrap(), Evicted::default());
        let kept = folder(tmp.path(), "a", 10, 5);
        let e = evict(tmp.path(), 100).unwrap();
        assert!(e.removed.is_empty() && kept.exists());
        assert_eq!(e.kept, 10);
    }
}
