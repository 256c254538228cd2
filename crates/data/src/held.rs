//! The images one worker holds, and the bundles in which images travel to a
//! worker that lacks them.
//!
//! ## Design
//! A worker that read the dataset's files holds every image; one on a machine
//! without them starts with none and receives, from the workers that do, the
//! images its shard needs (and its part of the test set) — after every change of
//! the split, only those it does not hold yet. Samples are named by one id space:
//! `0..train_len` are training images, `train_len..train_len + test_len` test
//! images, so one bundle carries either.
//!
//! A bundle is one message (little-endian): the magic `HSB1`, the images' rows
//! and columns (u32 each), the count (u32), then per image its id (u64), its label
//! (u8) and its `rows × cols` pixels, and last a CRC-32 of everything before it.
//! [`HeldImages::unpack`] checks the magic, the shape against its own, the count
//! against the bytes present (before it allocates anything), every id against its
//! length and the checksum — a damaged or foreign bundle is an error naming what
//! was wrong, and changes nothing.

use crate::DataError;
use crate::mnist::ImageDataset;

const MAGIC: &[u8; 4] = b"HSB1";
const HEADER: usize = 4 + 4 + 4 + 4;
const CHECKSUM: usize = 4;

/// A worker's training and test images, and which of them it holds.
#[derive(Debug, Clone)]
pub struct HeldImages {
    /// The training set (images not held are zeros).
    pub train: ImageDataset,
    /// The test set (images not held are zeros).
    pub test: ImageDataset,
    /// Which ids it holds; `None`: all of them.
    held: Option<Vec<bool>>,
}

impl HeldImages {
    /// Every image of `train` and `test` (a worker that read the files).
    pub fn complete(train: ImageDataset, test: ImageDataset) -> HeldImages {
        HeldImages {
            train,
            test,
            held: None,
        }
    }

    /// None of the images yet, of sets of `train_len` and `test_len` images of
    /// `rows × cols` (a worker on a machine without the dataset).
    pub fn empty(train_len: usize, test_len: usize, rows: usize, cols: usize) -> HeldImages {
        let blank = |n: usize| ImageDataset {
            pixels: vec![0; n * rows * cols],
            labels: vec![0; n],
            rows,
            cols,
        };
        HeldImages {
            train: blank(train_len),
            test: blank(test_len),
            held: Some(vec![false; train_len + test_len]),
        }
    }

    /// Only the images `keep` says of `complete` (to build workers that lack
    /// some, e.g. in tests).
    pub fn only(complete: &HeldImages, keep: impl Fn(usize) -> bool) -> HeldImages {
        let (train, test) = (&complete.train, &complete.test);
        let mut part = HeldImages::empty(train.len(), test.len(), train.rows, train.cols);
        let ids: Vec<usize> = (0..complete.len()).filter(|&i| keep(i) && complete.holds(i)).collect();
        part.put_all(complete, &ids);
        part
    }

    /// Ids in all: training images, then test images.
    pub fn len(&self) -> usize {
        self.train.len() + self.test.len()
    }

    /// Whether it has no ids at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it holds image `id`.
    pub fn holds(&self, id: usize) -> bool {
        id < self.len() && self.held.as_ref().is_none_or(|h| h[id])
    }

    /// Whether it holds every image.
    pub fn is_complete(&self) -> bool {
        self.held.as_ref().is_none_or(|h| h.iter().all(|&x| x))
    }

    /// Images it holds.
    pub fn count_held(&self) -> usize {
        self.held
            .as_ref()
            .map_or(self.len(), |h| h.iter().filter(|&&x| x).count())
    }

    /// The image and label of `id` (either set).
    fn sample(&self, id: usize) -> (&[u8], u8) {
        let (set, i) = self.locate(id);
        (set.image(i), set.labels[i])
    }

    fn locate(&self, id: usize) -> (&ImageDataset, usize) {
        if id < self.train.len() {
            (&self.train, id)
        } else {
            (&self.test, id - self.train.len())
        }
    }

    fn put(&mut self, id: usize, label: u8, pixels: &[u8]) {
        let (set, i) = if id < self.train.len() {
            (&mut self.train, id)
        } else {
            let n = self.train.len();
            (&mut self.test, id - n)
        };
        let size = set.rows * set.cols;
        set.labels[i] = label;
        set.pixels[i * size..(i + 1) * size].copy_from_slice(pixels);
        if let Some(h) = self.held.as_mut() {
            h[id] = true;
        }
    }

    fn put_all(&mut self, from: &HeldImages, ids: &[usize]) {
        for &id in ids {
            let (pixels, label) = from.sample(id);
            self.put(id, label, pixels);
        }
    }

    /// A bundle of images `ids`, or the first id it does not hold.
    pub fn pack(&self, ids: &[usize]) -> Result<Vec<u8>, usize> {
        if let Some(&missing) = ids.iter().find(|&&id| !self.holds(id)) {
            return Err(missing);
        }
        let (rows, cols) = (self.train.rows, self.train.cols);
        let mut out = Vec::with_capacity(HEADER + ids.len() * (9 + rows * cols) + CHECKSUM);
        out.extend_from_slice(MAGIC);
        for v in [rows, cols, ids.len()] {
            out.extend_from_slice(&(v as u32).to_le_bytes());
        }
        for &id in ids {
            let (pixels, label) = self.sample(id);
            out.extend_from_slice(&(id as u64).to_le_bytes());
            out.push(label);
            out.extend_from_slice(pixels);
        }
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Takes in the images of bundle `bytes`, whose labels must be below
    /// `classes`; returns how many it carried. A bundle that is damaged, of other
    /// images, of ids outside this dataset or of labels past `classes` is refused
    /// whole.
    pub fn unpack(&mut self, bytes: &[u8], classes: usize) -> Result<usize, DataError> {
        let bad = |reason: String| DataError::Inconsistent(format!("a bundle of images was refused: {reason}"));
        if bytes.len() < HEADER + CHECKSUM || &bytes[..4] != MAGIC {
            return Err(bad(format!("{} bytes without a bundle's header", bytes.len())));
        }
        let (body, tail) = bytes.split_at(bytes.len() - CHECKSUM);
        let expected = u32::from_le_bytes(tail.try_into().expect("four bytes"));
        if crc32(body) != expected {
            return Err(bad("its checksum does not match (damaged on the way)".into()));
        }
        let word = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().expect("four bytes")) as usize;
        let (rows, cols, count) = (word(4), word(8), word(12));
        if (rows, cols) != (self.train.rows, self.train.cols) {
            return Err(bad(format!(
                "its images are {rows}×{cols}, this dataset's {}×{}",
                self.train.rows, self.train.cols
            )));
        }
        let record = 9 + rows * cols;
        if count.checked_mul(record) != Some(body.len() - HEADER) {
            return Err(bad(format!(
                "it says {count} images but holds {} bytes of them",
                body.len() - HEADER
            )));
        }
        let records: Vec<(usize, u8, &[u8])> = body[HEADER..]
            .chunks_exact(record)
            .map(|r| {
                let id = u64::from_le_bytes(r[..8].try_into().expect("eight bytes"));
                (usize::try_from(id).unwrap_or(usize::MAX), r[8], &r[9..])
            })
            .collect();
        if let Some((id, ..)) = records.iter().find(|(id, ..)| *id >= self.len()) {
            return Err(bad(format!("image {id} is outside a dataset of {}", self.len())));
        }
        if let Some((id, label, _)) = records.iter().find(|(_, label, _)| *label as usize >= classes) {
            return Err(bad(format!("image {id} has label {label}, past the {classes} classes")));
        }
        let test_shape = (self.test.rows, self.test.cols);
        if let Some((id, ..)) = records
            .iter()
            .find(|(id, ..)| *id >= self.train.len() && test_shape != (rows, cols))
        {
            return Err(bad(format!(
                "test image {id} is {rows}×{cols}, this test set's {}×{}",
                test_shape.0, test_shape.1
            )));
        }
        for (id, label, pixels) in records {
            self.put(id, label, pixels);
        }
        Ok(count)
    }

    /// Which ids it holds, as bits packed 16 to a float (exact in an `f32`), for an
    /// allreduce that tells every worker what every other holds.
    pub fn presence_words(&self) -> Vec<f32> {
        (0..self.len().div_ceil(16))
            .map(|w| {
                (0..16)
                    .filter(|b| self.holds(w * 16 + b))
                    .fold(0u32, |acc, b| acc | 1 << b) as f32
            })
            .collect()
    }
}

impl HeldImages {
    /// A CRC-32 of the shape, every label and every pixel, training set then
    /// test set (of a worker that holds them all): two copies of a dataset that
    /// differ in anything give different fingerprints (but for a one-in-4-billion
    /// chance).
    pub fn fingerprint(&self) -> u32 {
        let mut crc = flate2::Crc::new();
        for set in [&self.train, &self.test] {
            for v in [set.len(), set.rows, set.cols] {
                crc.update(&(v as u64).to_le_bytes());
            }
            crc.update(&set.labels);
            crc.update(&set.pixels);
        }
        crc.sum()
    }
}

/// Whether `words` (from [`HeldImages::presence_words`]) say id `id` is held.
pub fn present(words: &[f32], id: usize) -> bool {
    words.get(id / 16).is_some_and(|&w| (w as u32) >> (id % 16) & 1 == 1)
}

/// CRC-32 (IEEE) of `bytes`.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(bytes);
    crc.sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(n: usize, seed: u8) -> ImageDataset {
        ImageDataset {
            pixels: (0..n * 4)
                .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
                .collect(),
            labels: (0..n).map(|i| (i % 10) as u8).collect(),
            rows: 2,
            cols: 2,
        }
    }

    #[test]
    fn a_worker_without_images_ends_with_the_same_bytes_it_was_sent() {
        let full = HeldImages::complete(images(10, 1), images(4, 9));
        let mut empty = HeldImages::empty(10, 4, 2, 2);
        assert_eq!(empty.count_held(), 0);
        let ids = [3, 0, 12, 7];
        let n = empty.unpack(&full.pack(&ids).unwrap(), 10).unwrap();
        assert_eq!(n, 4);
        for id in 0..14 {
            assert_eq!(empty.holds(id), ids.contains(&id), "id {id}");
        }
        for &id in &ids {
            assert_eq!(empty.sample(id), full.sample(id), "image {id}");
        }
        assert!(!empty.is_complete());
        let words = empty.presence_words();
        assert!((0..14).all(|id| present(&words, id) == ids.contains(&id)));
        assert_eq!(empty.pack(&[1]), Err(1), "it cannot pass on what it lacks");
    }

    #[test]
    fn every_damaged_or_foreign_bundle_is_refused_and_changes_nothing() {
        let full = HeldImages::complete(images(10, 1), images(4, 9));
        let bundle = full.pack(&[1, 2]).unwrap();
        let mut w = HeldImages::empty(10, 4, 2, 2);
        for cut in 0..bundle.len() {
            assert!(w.unpack(&bundle[..cut], 10).is_err(), "cut at {cut}");
        }
        for at in 0..bundle.len() {
            let mut flipped = bundle.clone();
            flipped[at] ^= 0x10;
            assert!(w.unpack(&flipped, 10).is_err(), "flipped byte {at}");
        }
        assert_eq!(w.count_held(), 0);
        // Another shape, or ids past this dataset: refused even with a good checksum.
        let other = HeldImages::complete(
            ImageDataset {
                pixels: vec![0; 9 * 3],
                labels: vec![0; 3],
                rows: 3,
                cols: 3,
            },
            images(0, 0),
        );
        let e = w.unpack(&other.pack(&[0]).unwrap(), 10).unwrap_err();
        assert!(e.to_string().contains("3×3"), "{e}");
        let bigger = HeldImages::complete(images(40, 1), images(0, 0));
        let e = w.unpack(&bigger.pack(&[30]).unwrap(), 10).unwrap_err();
        assert!(e.to_string().contains("image 30 is outside a dataset of 14"), "{e}");
        let e = w.unpack(&bundle, 2).unwrap_err();
        assert!(e.to_string().contains("label 2, past the 2 classes"), "{e}");
        assert_eq!(w.count_held(), 0);
    }
}
