//! Fashion-MNIST (and MNIST-layout) image datasets from their four IDX files.

use std::path::{Path, PathBuf};

use crate::DataError;
use crate::idx::{IdxArray, encode_idx, read_idx};

/// Which half of the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// `train-*` files.
    Train,
    /// `t10k-*` files.
    Test,
}

impl Split {
    fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

/// Where Debian's `dataset-fashion-mnist` package puts the files.
pub const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// How to obtain the data set, shown whenever it is missing.
pub const FASHION_MNIST_HINT: &str = " (get it with `hetero data fetch fashion-mnist`, which looks in \
    /usr/share/datasets/fashion-mnist after `apt-get install dataset-fashion-mnist`, \
    or pass `--from DIR` with train-/t10k- images and labels IDX files)";

/// Grey-scale images with one class label each.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageDataset {
    /// Pixels, `len × rows × cols`, row-major.
    pub pixels: Vec<u8>,
    /// One label per image.
    pub labels: Vec<u8>,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
}

impl ImageDataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.pixels[i * n..(i + 1) * n]
    }

    /// Keeps only the first `n` images (all when `n` is larger).
    pub fn truncate(&mut self, n: usize) {
        let n = n.min(self.len());
        self.labels.truncate(n);
        self.pixels.truncate(n * self.rows * self.cols);
    }

    /// Loads one split from `dir`, accepting `.gz` or raw files.
    pub fn load(dir: &Path, split: Split) -> Result<Self, DataError> {
        let images = read_idx(&find(dir, &format!("{}-images-idx3-ubyte", split.prefix()))?)?;
        let labels = read_idx(&find(dir, &format!("{}-labels-idx1-ubyte", split.prefix()))?)?;
        if images.dims.len() != 3 || labels.dims.len() != 1 {
            return Err(DataError::Inconsistent(format!(
                "{}: images must have 3 dimensions and labels 1 (found {:?} and {:?})",
                dir.display(),
                images.dims,
                labels.dims
            )));
        }
        if images.dims[0] != labels.dims[0] {
            return Err(DataError::Inconsistent(format!(
                "{}: {} images but {} labels",
                dir.display(),
                images.dims[0],
                labels.dims[0]
            )));
        }
        if let Some(bad) = labels.data.iter().find(|&&l| l > 9) {
            return Err(DataError::Inconsistent(format!(
                "{}: label {bad} is outside the 10 classes",
                dir.display()
            )));
        }
        Ok(ImageDataset {
            rows: images.dims[1],
            cols: images.dims[2],
            pixels: images.data,
            labels: labels.data,
        })
    }

    /// Writes this dataset as gzip IDX files for `split` into `dir`.
    pub fn save(&self, dir: &Path, split: Split) -> Result<(), DataError> {
        use std::io::Write;
        std::fs::create_dir_all(dir).map_err(|source| DataError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let arrays = [
            (
                "images-idx3-ubyte",
                IdxArray {
                    dims: vec![self.len(), self.rows, self.cols],
                    data: self.pixels.clone(),
                },
            ),
            (
                "labels-idx1-ubyte",
                IdxArray {
                    dims: vec![self.len()],
                    data: self.labels.clone(),
                },
            ),
        ];
        for (suffix, array) in arrays {
            let path = dir.join(format!("{}-{suffix}.gz", split.prefix()));
            let io = |source| DataError::Io {
                path: path.clone(),
                source,
            };
            let file = std::fs::File::create(&path).map_err(io)?;
            let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::best());
            gz.write_all(&encode_idx(&array)).map_err(io)?;
            gz.finish().map_err(io)?;
        }
        Ok(())
    }
}

fn find(dir: &Path, stem: &str) -> Result<PathBuf, DataError> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let path = dir.join(&name);
        if path.is_file() {
            return Ok(path);
        }
    }
    Err(DataError::Missing {
        dir: dir.to_path_buf(),
        name: format!("{stem}[.gz]"),
        hint: FASHION_MNIST_HINT.to_string(),
    })
}

/// Whether `dir` holds all four Fashion-MNIST files.
pub fn is_complete(dir: &Path) -> bool {
    [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    .iter()
    .all(|stem| find(dir, stem).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(n: usize) -> ImageDataset {
        ImageDataset {
            pixels: (0..n * 4).map(|i| i as u8).collect(),
            labels: (0..n).map(|i| (i % 10) as u8).collect(),
            rows: 2,
            cols: 2,
        }
    }

    #[test]
    fn save_then_load() {
        let dir = tempfile::tempdir().unwrap();
        let ds = tiny(5);
        ds.save(dir.path(), Split::Train).unwrap();
        ds.save(dir.path(), Split::Test).unwrap();
        assert!(is_complete(dir.path()));
        let back = ImageDataset::load(dir.path(), Split::Test).unwrap();
        assert_eq!(back.pixels, ds.pixels);
        assert_eq!(back.labels, ds.labels);
        assert_eq!(back.image(1), &[4, 5, 6, 7]);
    }

    #[test]
    fn missing_files_explain_how_to_get_them() {
        let dir = tempfile::tempdir().unwrap();
        let err = ImageDataset::load(dir.path(), Split::Train).unwrap_err().to_string();
        assert!(
            err.contains("train-images-idx3-ubyte") && err.contains("hetero data fetch"),
            "{err}"
        );
    }

    #[test]
    fn count_mismatch_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        tiny(5).save(dir.path(), Split::Train).unwrap();
        let other = tiny(4);
        other.save(&dir.path().join("x"), Split::Train).unwrap();
        std::fs::rename(
            dir.path().join("x/train-labels-idx1-ubyte.gz"),
            dir.path().join("train-labels-idx1-ubyte.gz"),
        )
        .unwrap();
        let err = ImageDataset::load(dir.path(), Split::Train).unwrap_err().to_string();
        assert!(err.contains("5 images but 4 labels"), "{err}");
    }
}
