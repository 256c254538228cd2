//! The IDX file format (LeCun's MNIST format), gzip-compressed or raw.
//!
//! Layout: magic `00 00 TT DD` (TT = element type, DD = number of dimensions), then
//! DD big-endian u32 dimension sizes, then the elements. Only unsigned bytes
//! (TT = 0x08) are used by image datasets, and only those are accepted.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::DataError;

const FORMAT: &str = "IDX (ubyte)";

/// An IDX array of bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimension sizes, outermost first.
    pub dims: Vec<usize>,
    /// Elements in row-major order.
    pub data: Vec<u8>,
}

/// Reads an IDX file; `.gz` files are decompressed on the fly.
pub fn read_idx(path: &Path) -> Result<IdxArray, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        crate::gzip::gunzip(path, FORMAT, BufReader::new(file))?
    } else {
        let mut bytes = Vec::new();
        BufReader::new(file).read_to_end(&mut bytes).map_err(io)?;
        bytes
    };
    parse_idx(&bytes).map_err(|reason| DataError::Format {
        path: path.to_path_buf(),
        format: FORMAT,
        reason,
    })
}

/// Parses IDX bytes; the error says what is wrong.
pub fn parse_idx(bytes: &[u8]) -> Result<IdxArray, String> {
    if bytes.len() < 4 {
        return Err(format!("{} bytes is too short for a header", bytes.len()));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(format!(
            "wrong magic {:02x} {:02x} {:02x} {:02x} (expected 00 00 08 NN)",
            bytes[0], bytes[1], bytes[2], bytes[3]
        ));
    }
    if bytes[2] != 0x08 {
        return Err(format!("element type {:#04x} is not unsigned byte (0x08)", bytes[2]));
    }
    let ndims = bytes[3] as usize;
    if ndims == 0 || ndims > 4 {
        return Err(format!("{ndims} dimensions (expected 1 to 4)"));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err("truncated header".into());
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")) as usize)
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or("dimensions overflow")?;
    let body = bytes.len() - header;
    if body != count {
        return Err(format!(
            "header promises {count} elements ({dims:?}) but the file holds {body}{}",
            if body < count {
                " (truncated)"
            } else {
                " (trailing bytes)"
            }
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Encodes an array as IDX bytes (used to write dataset subsets).
pub fn encode_idx(array: &IdxArray) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, array.dims.len() as u8];
    for d in &array.dims {
        out.extend_from_slice(&(*d as u32).to_be_bytes());
    }
    out.extend_from_slice(&array.data);
    out
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn sample() -> IdxArray {
        IdxArray {
            dims: vec![2, 3],
            data: vec![1, 2, 3, 4, 5, 6],
        }
    }

    #[test]
    fn round_trip_raw_and_gzip() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("a-idx2-ubyte");
        std::fs::write(&raw, encode_idx(&sample())).unwrap();
        assert_eq!(read_idx(&raw).unwrap(), sample());
        let gz = dir.path().join("a-idx2-ubyte.gz");
        let mut enc = flate2::write::GzEncoder::new(File::create(&gz).unwrap(), Default::default());
        enc.write_all(&encode_idx(&sample())).unwrap();
        enc.finish().unwrap();
        assert_eq!(read_idx(&gz).unwrap(), sample());
    }

    #[test]
    fn wrong_magic_is_named() {
        let mut bytes = encode_idx(&sample());
        bytes[0] = 0x1f;
        assert!(parse_idx(&bytes).unwrap_err().contains("wrong magic"));
        bytes[0] = 0;
        bytes[2] = 0x0d;
        assert!(parse_idx(&bytes).unwrap_err().contains("not unsigned byte"));
    }

    #[test]
    fn truncated_body_is_named() {
        let mut bytes = encode_idx(&sample());
        bytes.pop();
        let err = parse_idx(&bytes).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        assert!(parse_idx(&bytes[..6]).unwrap_err().contains("truncated header"));
    }

    #[test]
    fn truncated_gzip_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("cut.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), Default::default());
        enc.write_all(&vec![7u8; 10_000]).unwrap();
        let full = enc.finish().unwrap();
        std::fs::write(&gz, &full[..full.len() / 2]).unwrap();
        let err = read_idx(&gz).unwrap_err().to_string();
        assert!(err.contains("cut.gz") && err.contains("truncated"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = read_idx(Path::new("/nonexistent/x.gz")).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/x.gz"), "{err}");
    }
}
