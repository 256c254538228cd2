//! The coordinator as a source of a job's dataset files, for workers on hosts
//! without them: the data of a job submitted from the coordinator's machine
//! need not be copied to every host by hand.
//!
//! ## Design
//! Only folders the operator names (`hetero coordinator --serve-data DIR`) are
//! served, and only to holders of the cluster token, and only as the dataset of a
//! job: a worker asks for its job's files, never for a path. Any token holder
//! may submit a job, so without the allow-list any token holder could read any
//! folder on the coordinator's host through a job spec.
//!
//! Paths are compared after canonicalisation, so `..` and symbolic links
//! cannot leave an allowed folder. What a listing may hold is bounded in files,
//! depth and bytes. A file is named by its place in the listing, and it is
//! checked again when it is read: a file that changed since it was listed
//! cannot be passed off under the old name.

use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// The most files one dataset may have to be served.
pub const MAX_FILES: usize = 100_000;
/// The most bytes one dataset may have to be served.
pub const MAX_BYTES: u64 = 16 << 30;
/// Folders below the dataset's folder that are followed.
const MAX_DEPTH: usize = 4;
/// Bytes in one chunk of a file sent.
pub const CHUNK: usize = 1 << 20;

/// One file of a served dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedFile {
    /// Relative to the dataset's folder, `/`-separated.
    pub name: String,
    /// Its length.
    pub size: u64,
    /// SHA-256 of its contents, lowercase hex.
    pub sha256: String,
}

/// The dataset folder `path` of a job, if it lies inside one of `allowed`
/// (both canonicalised); otherwise why not, for the worker's log.
pub fn served_folder(allowed: &[PathBuf], path: &Path) -> Result<PathBuf, String> {
    if allowed.is_empty() {
        return Err("the coordinator serves no data (start it with --serve-data DIR)".into());
    }
    let real = path
        .canonicalize()
        .map_err(|e| format!("the coordinator cannot read {}: {e}", path.display()))?;
    let inside = allowed
        .iter()
        .filter_map(|a| a.canonicalize().ok())
        .any(|a| real.starts_with(&a));
    if !inside {
        return Err(format!(
            "{} is not inside a folder the coordinator serves (--serve-data)",
            path.display()
        ));
    }
    if !real.is_dir() {
        return Err(format!("{} is not a folder", path.display()));
    }
    Ok(real)
}

/// Every regular file under `folder` (to [`MAX_DEPTH`]), sorted by name, with
/// its size and SHA-256; refused past [`MAX_FILES`] or [`MAX_BYTES`].
pub fn list(folder: &Path) -> Result<Vec<ServedFile>, String> {
    let mut names = Vec::new();
    let mut left_out = Vec::new();
    collect(folder, folder, 0, &mut names, &mut left_out)?;
    if let Some(first) = left_out.first() {
        // A worker given part of a dataset would train on part of it, silently.
        return Err(format!(
            "{} entr(ies) of the dataset cannot be sent (links, or folders deeper than {MAX_DEPTH}), e.g. {first}",
            left_out.len()
        ));
    }
    names.sort();
    // The sizes first: a dataset past the limit is refused before anything is read.
    let mut total = 0u64;
    for name in &names {
        total += std::fs::symlink_metadata(folder.join(name))
            .map_err(|e| format!("{name}: {e}"))?
            .len();
        if total > MAX_BYTES {
            return Err(format!("the dataset holds more than {} GiB", MAX_BYTES >> 30));
        }
    }
    let mut files = Vec::with_capacity(names.len());
    for name in names {
        let (size, sha256) =
            hetero_proto::auth::file_sha256(&folder.join(&name)).map_err(|e| format!("reading {name}: {e}"))?;
        files.push(ServedFile { name, size, sha256 });
    }
    Ok(files)
}

fn collect(
    root: &Path,
    dir: &Path,
    depth: usize,
    names: &mut Vec<String>,
    left_out: &mut Vec<String>,
) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("listing {}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("listing {}: {e}", dir.display()))?;
        // Hidden files are no dataset's (and may be a secret someone keeps there).
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        // Not followed: a link could lead out of the served folder.
        let kind = entry
            .file_type()
            .map_err(|e| format!("{}: {e}", entry.path().display()))?;
        let path = entry.path();
        if kind.is_dir() && depth < MAX_DEPTH {
            collect(root, &path, depth + 1, names, left_out)?;
        } else if !kind.is_file() {
            left_out.push(path.display().to_string());
        } else {
            let relative = path.strip_prefix(root).expect("below the root");
            let name = relative
                .components()
                .map(|c| c.as_os_str().to_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| format!("{} is not a UTF-8 name", path.display()))?
                .join("/");
            names.push(name);
            if names.len() > MAX_FILES {
                return Err(format!("the dataset holds more than {MAX_FILES} files"));
            }
        }
    }
    Ok(())
}

/// The file `name` of the listing `files` of `folder`, opened at `offset`,
/// and the bytes left to send.
pub fn open_at(folder: &Path, files: &[ServedFile], name: &str, offset: u64) -> Result<(std::fs::File, u64), String> {
    let listed = files
        .iter()
        .find(|f| f.name == name)
        .ok_or_else(|| format!("{name:?} is not a file of this job's dataset"))?;
    if offset > listed.size {
        return Err(format!(
            "offset {offset} is past the end of {name} ({} bytes)",
            listed.size
        ));
    }
    // Listed names never hold `..` (they were read from the folder), and the
    // path is checked to stay inside the folder all the same.
    let path = folder.join(name).canonicalize().map_err(|e| format!("{name}: {e}"))?;
    if !path.starts_with(folder) {
        return Err(format!("{name} leads out of the dataset's folder"));
    }
    let mut file = std::fs::File::open(&path).map_err(|e| format!("{name}: {e}"))?;
    let size = file.metadata().map_err(|e| format!("{name}: {e}"))?.len();
    if size != listed.size {
        return Err(format!(
            "{name} changed since it was listed ({} bytes, now {size})",
            listed.size
        ));
    }
    file.seek(SeekFrom::Start(offset)).map_err(|e| format!("{name}: {e}"))?;
    Ok((file, size - offset))
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use sha2::{Digest, Sha256};

    use super::*;

    fn tree() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("served/data");
        std::fs::create_dir_all(data.join("class-a")).unwrap();
        std::fs::write(data.join("train.idx"), b"hello").unwrap();
        std::fs::write(data.join("class-a/x.png"), b"png!").unwrap();
        std::fs::write(dir.path().join("secret"), b"no").unwrap();
        (dir, data)
    }

    #[test]
    fn only_folders_inside_the_allow_list_are_served() {
        let (dir, data) = tree();
        let allowed = vec![dir.path().join("served")];
        assert!(served_folder(&allowed, &data).is_ok());
        let e = served_folder(&allowed, dir.path()).unwrap_err();
        assert!(e.contains("not inside a folder the coordinator serves"), "{e}");
        // `..` does not leave the allowed folder.
        let e = served_folder(&allowed, &data.join("../..")).unwrap_err();
        assert!(e.contains("not inside"), "{e}");
        let e = served_folder(&[], &data).unwrap_err();
        assert!(e.contains("--serve-data"), "{e}");
    }

    #[test]
    fn a_symbolic_link_is_never_followed_and_a_dataset_holding_one_is_refused() {
        let (dir, data) = tree();
        let files = list(&data).unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["class-a/x.png", "train.idx"]);
        std::os::unix::fs::symlink(dir.path().join("secret"), data.join("link")).unwrap();
        std::os::unix::fs::symlink(dir.path(), dir.path().join("served/escape")).unwrap();
        let allowed = vec![dir.path().join("served")];
        let e = list(&data).unwrap_err();
        assert!(e.contains("cannot be sent") && e.contains("link"), "{e}");
        assert!(served_folder(&allowed, &dir.path().join("served/escape")).is_err());
        assert!(open_at(&data, &files, "link", 0).is_err());
    }

    #[test]
    fn hidden_files_are_not_listed() {
        let (_dir, data) = tree();
        std::fs::write(data.join(".token"), b"secret").unwrap();
        let files = list(&data).unwrap();
        assert!(files.iter().all(|f| !f.name.contains("token")));
        assert!(open_at(&data, &files, ".token", 0).is_err());
    }

    #[test]
    fn files_are_listed_with_their_digest_and_read_from_an_offset() {
        let (_dir, data) = tree();
        let files = list(&data).unwrap();
        let idx = files.iter().find(|f| f.name == "train.idx").unwrap();
        assert_eq!(idx.size, 5);
        assert_eq!(idx.sha256, hetero_proto::auth::hex(&Sha256::digest(b"hello")));
        let (mut file, left) = open_at(&data, &files, "train.idx", 2).unwrap();
        let mut rest = String::new();
        file.read_to_string(&mut rest).unwrap();
        assert_eq!((rest.as_str(), left), ("llo", 3));
        assert!(open_at(&data, &files, "train.idx", 6).is_err());
        assert!(open_at(&data, &files, "../secret", 0).is_err());
        std::fs::write(data.join("train.idx"), b"hello, changed").unwrap();
        let e = open_at(&data, &files, "train.idx", 0).unwrap_err();
        assert!(e.contains("changed since it was listed"), "{e}");
    }
}
