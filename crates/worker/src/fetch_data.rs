//! A worker on a host without its job's dataset fetches the files from the
//! coordinator, when the coordinator serves them (`--serve-data`): the data of
//! a job submitted from the coordinator's machine reaches every host.
//!
//! ## Design
//! What arrives is checked before it is used. The listing is bounded in files
//! and bytes, every name must be a plain relative path, and every file is
//! checked against its SHA-256 and size. A file is written beside its final
//! name and renamed only once it is whole and checked.
//!
//! The copy goes into the agent's data cache, in a folder named by the
//! listing's digest. So the next job on the same data takes it from there,
//! checking each file again, and a dataset that changed on the coordinator gets
//! a new folder.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use hetero_job::WorkerEnv;
use hetero_proto as pb;
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;

/// The most files a served dataset may list.
const MAX_FILES: usize = 100_000;
/// The most bytes a served dataset may hold.
const MAX_BYTES: u64 = 16 << 30;
/// The longest wait for the next chunk of a file.
const CHUNK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The folder holding this job's dataset as the coordinator serves it,
/// fetched into the data cache (`Ok(None)`: the coordinator does not serve it,
/// or this worker was not started by an agent).
pub fn from_coordinator() -> Result<Option<PathBuf>, String> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let (Some(coordinator), Some(token), Some(job_id)) = (
        var(WorkerEnv::COORDINATOR),
        var(WorkerEnv::TOKEN),
        var(WorkerEnv::JOB_ID),
    ) else {
        return Ok(None);
    };
    let cache = match var(WorkerEnv::DATA_CACHE) {
        Some(dir) => PathBuf::from(dir),
        None => std::env::temp_dir().join("hetero-data-cache"),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting a runtime to fetch the dataset: {e}"))?;
    runtime.block_on(fetch(&coordinator, &token, &job_id, &cache))
}

async fn fetch(coordinator: &str, token: &str, job_id: &str, cache: &Path) -> Result<Option<PathBuf>, String> {
    let mut client = hetero_proto::client::connect(coordinator, token)
        .await
        .map_err(|e| format!("asking the coordinator for the dataset: {e}"))?;
    let listing = client
        .dataset_files(pb::DatasetFilesRequest { job_id: job_id.into() })
        .await
        .map_err(|s| format!("asking the coordinator for the dataset: {}", s.message()))?
        .into_inner();
    if !listing.served {
        eprintln!("the coordinator does not send this job's dataset: {}", listing.why);
        return Ok(None);
    }
    check_listing(&listing.files)?;
    let folder = cache.join(format!("served-{}", listing_digest(&listing.files)));
    hetero_job::cache_space::mark_used(&folder);
    let total: u64 = listing.files.iter().map(|f| f.size).sum();
    let (mut fetched, mut kept) = (0u64, 0usize);
    for file in &listing.files {
        let path = folder.join(&file.name);
        if matches!(hetero_proto::auth::file_sha256(&path), Ok((size, sha)) if size == file.size && sha == file.sha256)
        {
            kept += 1;
            continue;
        }
        fetch_file(&mut client, job_id, file, &path).await?;
        fetched += file.size;
    }
    eprintln!(
        "dataset from the coordinator: {} file(s), {:.1} MB; {:.1} MB fetched, {kept} file(s) already in {}",
        listing.files.len(),
        total as f64 / 1e6,
        fetched as f64 / 1e6,
        folder.display()
    );
    Ok(Some(folder))
}

/// Refuses a listing past the bounds, or with a name that is not a plain
/// relative path (`..`, absolute, empty parts).
fn check_listing(files: &[pb::DatasetFile]) -> Result<(), String> {
    if files.len() > MAX_FILES {
        return Err(format!(
            "the coordinator lists {} files; at most {MAX_FILES}",
            files.len()
        ));
    }
    let total = files.iter().try_fold(0u64, |t, f| t.checked_add(f.size));
    if total.is_none_or(|t| t > MAX_BYTES) {
        return Err(format!("the coordinator lists more than {} GiB", MAX_BYTES >> 30));
    }
    for f in files {
        let path = Path::new(&f.name);
        let plain = !f.name.is_empty()
            && f.name.len() <= 4096
            && path.components().all(|c| matches!(c, Component::Normal(_)))
            && f.sha256.len() == 64
            && f.sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !plain {
            return Err(format!(
                "the coordinator listed a file {:?} this worker will not write",
                f.name
            ));
        }
    }
    Ok(())
}

/// Names the listing by its contents: the same files, the same folder.
fn listing_digest(files: &[pb::DatasetFile]) -> String {
    let mut sha = Sha256::new();
    for f in files {
        sha.update(f.name.as_bytes());
        sha.update([0]);
        sha.update(f.sha256.as_bytes());
    }
    hetero_proto::auth::hex(&sha.finalize()[..12])
}

/// Fetches `file` into `path`: written beside it, checked, then renamed.
async fn fetch_file(
    client: &mut hetero_proto::client::Client,
    job_id: &str,
    file: &pb::DatasetFile,
    path: &Path,
) -> Result<(), String> {
    let fail = |e: String| format!("fetching {} from the coordinator: {e}", file.name);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
    }
    let part = path.with_extension(format!("part-{}", std::process::id()));
    let mut out = std::fs::File::create(&part).map_err(|e| fail(format!("creating {}: {e}", part.display())))?;
    let mut stream = client
        .fetch_dataset_file(pb::FetchDatasetFileRequest {
            job_id: job_id.into(),
            name: file.name.clone(),
            offset: 0,
        })
        .await
        .map_err(|s| fail(s.message().to_string()))?
        .into_inner();
    let (mut sha, mut size) = (Sha256::new(), 0u64);
    let written = async {
        loop {
            // A coordinator that stops sending mid-file is not waited on for ever.
            let next = tokio::time::timeout(CHUNK_WAIT, stream.next())
                .await
                .map_err(|_| format!("no data for {} s", CHUNK_WAIT.as_secs()))?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|s| s.message().to_string())?;
            size += chunk.data.len() as u64;
            if size > file.size {
                return Err(format!("more than the {} bytes listed", file.size));
            }
            sha.update(&chunk.data);
            out.write_all(&chunk.data).map_err(|e| e.to_string())?;
        }
        out.sync_all().map_err(|e| e.to_string())
    }
    .await;
    let checked = written.and_then(|()| {
        let got = hetero_proto::auth::hex(&sha.finalize());
        if size != file.size || got != file.sha256 {
            return Err(format!(
                "{size} bytes with SHA-256 {got}, where the listing says {} bytes and {}: damaged on the way",
                file.size, file.sha256
            ));
        }
        std::fs::rename(&part, path).map_err(|e| e.to_string())
    });
    if let Err(e) = checked {
        let _ = std::fs::remove_file(&part);
        return Err(fail(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> pb::DatasetFile {
        pb::DatasetFile {
            name: name.into(),
            size: 1,
            sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn a_listing_with_a_name_that_leaves_the_folder_is_refused() {
        assert!(check_listing(&[file("train.idx"), file("class-a/x.png")]).is_ok());
        for bad in ["../x", "/etc/passwd", "a/../../b", "", "a//b/./c"] {
            let e = check_listing(&[file(bad)]);
            if bad == "a//b/./c" {
                // `Path` folds `//` and `.`: a plain path all the same.
                assert!(e.is_ok(), "{bad}");
            } else {
                assert!(e.is_err(), "{bad}");
            }
        }
        let mut huge = file("x");
        huge.size = MAX_BYTES + 1;
        assert!(check_listing(&[huge]).is_err());
        let mut overflow = file("y");
        overflow.size = u64::MAX;
        assert!(check_listing(&[overflow, file("z")]).is_err());
        let mut bad_digest = file("w");
        bad_digest.sha256 = "zz".into();
        assert!(check_listing(&[bad_digest]).is_err());
    }

    #[test]
    fn the_same_files_name_the_same_folder() {
        let a = listing_digest(&[file("a"), file("b")]);
        assert_eq!(a, listing_digest(&[file("a"), file("b")]));
        assert_ne!(a, listing_digest(&[file("a"), file("c")]));
    }
}
