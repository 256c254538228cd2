//! Gzip inputs, decompressed under a ceiling: a few kilobytes of a hostile or
//! corrupt file can expand to any size, so decompression stops past
//! [`MAX_DECOMPRESSED`] and the error names the file and the limit.

use std::io::Read;
use std::path::Path;

use flate2::read::MultiGzDecoder;

use crate::DataError;

/// Most bytes one gzip input may expand to (2 GiB). A larger dataset file is better
/// stored uncompressed, where it is read as it is and never held twice.
pub const MAX_DECOMPRESSED: u64 = 2 << 30;

/// Whether `bytes` begin as a gzip stream does.
pub(crate) fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// The decompressed bytes of `compressed`, the contents of `path`, a gzip-compressed
/// file of `format` (which errors name).
pub(crate) fn gunzip(path: &Path, format: &'static str, compressed: impl Read) -> Result<Vec<u8>, DataError> {
    gunzip_limited(path, format, compressed, MAX_DECOMPRESSED)
}

fn gunzip_limited(path: &Path, format: &'static str, compressed: impl Read, limit: u64) -> Result<Vec<u8>, DataError> {
    let format_error = |reason: String| DataError::Format {
        path: path.to_path_buf(),
        format,
        reason,
    };
    let mut out = Vec::new();
    MultiGzDecoder::new(compressed)
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| format_error(format!("decompression failed ({e}); the file may be truncated")))?;
    if out.len() as u64 > limit {
        return Err(format_error(format!(
            "it decompresses to more than {limit} bytes, the most one input may expand to"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn a_stream_that_expands_past_the_limit_is_refused_by_name() {
        let zeros = gz(&vec![0u8; 1 << 20]); // ~1 KB that expands 1000-fold
        let path = Path::new("bomb.gz");
        assert_eq!(gunzip_limited(path, "IDX", &zeros[..], 1 << 20).unwrap().len(), 1 << 20);
        let err = gunzip_limited(path, "IDX", &zeros[..], (1 << 20) - 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bomb.gz is not a valid IDX") && err.contains("more than 1048575 bytes"),
            "{err}"
        );
    }

    #[test]
    fn a_cut_stream_is_called_truncated() {
        let cut = gz(b"hello, world, hello, world");
        let err = gunzip(Path::new("cut.gz"), "CSV", &cut[..cut.len() - 6])
            .unwrap_err()
            .to_string();
        assert!(err.contains("cut.gz") && err.contains("truncated"), "{err}");
        assert!(is_gzip(&cut) && !is_gzip(b"plain"));
    }
}
