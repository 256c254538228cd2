//! Images in class folders: `DIR/<class>/<image>` (PNG, JPEG, PGM/PPM), the layout
//! of torchvision's `ImageFolder`. Classes are numbered in alphabetical order of
//! their folder names; images are read as grey levels and, when a shape is given,
//! resized to it (otherwise all must share the first image's size).

use std::path::{Path, PathBuf};

use crate::preprocess::resize_image;
use crate::{DataError, ImageDataset};

const EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "pgm", "ppm"];

fn io(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .map(|e| e.map(|e| e.path()).map_err(io(dir)))
        .collect::<Result<_, _>>()?;
    out.sort();
    Ok(out)
}

/// The class folder names under `dir`, in label order.
pub fn classes(dir: &Path) -> Result<Vec<String>, DataError> {
    let classes: Vec<String> = sorted_entries(dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    if classes.is_empty() {
        return Err(DataError::Inconsistent(format!(
            "{} has no class folders (expected {}/<class>/<image>.png)",
            dir.display(),
            dir.display()
        )));
    }
    if classes.len() > 256 {
        return Err(DataError::Inconsistent(format!(
            "{} has {} class folders; at most 256 are supported",
            dir.display(),
            classes.len()
        )));
    }
    Ok(classes)
}

/// Loads every image under `dir`'s class folders, labelled by `classes` (pass the
/// training set's classes when loading a test set, so labels agree).
pub fn load(dir: &Path, classes: &[String], shape: Option<(usize, usize)>) -> Result<ImageDataset, DataError> {
    let mut data = ImageDataset {
        pixels: Vec::new(),
        labels: Vec::new(),
        rows: shape.map_or(0, |s| s.0),
        cols: shape.map_or(0, |s| s.1),
    };
    for found in self::classes(dir)? {
        if !classes.contains(&found) {
            return Err(DataError::Inconsistent(format!(
                "{}: class folder {found:?} is not among the training classes {classes:?}",
                dir.display()
            )));
        }
    }
    for (label, class) in classes.iter().enumerate() {
        let class_dir = dir.join(class);
        if !class_dir.is_dir() {
            continue;
        }
        for path in sorted_entries(&class_dir)? {
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().to_lowercase())
                .unwrap_or_default();
            if !EXTENSIONS.contains(&ext.as_str()) {
                continue;
            }
            let image = image::open(&path)
                .map_err(|e| DataError::Format {
                    path: path.clone(),
                    format: "image",
                    reason: e.to_string(),
                })?
                .to_luma8();
            let (w, h) = (image.width() as usize, image.height() as usize);
            if data.rows == 0 {
                (data.rows, data.cols) = (h, w);
            }
            let pixels = if (h, w) == (data.rows, data.cols) {
                image.into_raw()
            } else if shape.is_some() {
                resize_image(image.as_raw(), h, w, data.rows, data.cols)
            } else {
                return Err(DataError::Inconsistent(format!(
                    "{} is {h}×{w} but earlier images are {}×{}; set preprocess.resize",
                    path.display(),
                    data.rows,
                    data.cols
                )));
            };
            data.pixels.extend(pixels);
            data.labels.push(label as u8);
        }
    }
    if data.labels.is_empty() {
        return Err(DataError::Inconsistent(format!(
            "{} holds no images ({})",
            dir.display(),
            EXTENSIONS.join(", ")
        )));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save(path: &Path, w: u32, h: u32, value: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::GrayImage::from_pixel(w, h, image::Luma([value]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn classes_are_folders_in_alphabetical_order() {
        let dir = tempfile::tempdir().unwrap();
        save(&dir.path().join("train/cat/1.png"), 4, 3, 10);
        save(&dir.path().join("train/ant/1.png"), 4, 3, 20);
        save(&dir.path().join("train/ant/2.pgm"), 4, 3, 30);
        std::fs::write(dir.path().join("train/ant/notes.txt"), "ignored").unwrap();
        let train = dir.path().join("train");
        let classes = classes(&train).unwrap();
        assert_eq!(classes, vec!["ant", "cat"]);
        let d = load(&train, &classes, None).unwrap();
        assert_eq!((d.rows, d.cols, d.labels.clone()), (3, 4, vec![0, 0, 1]));
        assert_eq!(d.image(2), &[10; 12]);
        // Resized on request.
        let d = load(&train, &classes, Some((2, 2))).unwrap();
        assert_eq!(d.image(1), &[30; 4]);
    }

    #[test]
    fn mistakes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        save(&dir.path().join("a/x/1.png"), 4, 4, 1);
        save(&dir.path().join("a/x/2.png"), 5, 4, 1);
        let err = load(&dir.path().join("a"), &["x".into()], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("2.png is 4×5 but earlier images are 4×4"), "{err}");

        std::fs::create_dir_all(dir.path().join("b/y")).unwrap();
        std::fs::write(dir.path().join("b/y/broken.png"), b"not a png").unwrap();
        let err = load(&dir.path().join("b"), &["y".into()], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("broken.png is not a valid image file"), "{err}");

        let err = load(&dir.path().join("b"), &["z".into()], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"y\" is not among the training classes"), "{err}");

        std::fs::create_dir_all(dir.path().join("empty")).unwrap();
        assert!(
            classes(&dir.path().join("empty"))
                .unwrap_err()
                .to_string()
                .contains("no class folders")
        );
    }
}
