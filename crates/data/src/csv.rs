//! Images (or any fixed-length rows of pixel values) with labels, from CSV files —
//! the form Kaggle's Fashion-MNIST comes in: a header, a label column, and one
//! column per pixel.
//!
//! Values are 0–255, or 0–1 when no value in the file exceeds 1 (scaled to
//! 0–255). A file may be gzipped (`.csv.gz`). Quoted fields holding commas are not
//! supported; every error names the file and line.

use std::path::Path;

use crate::{DataError, ImageDataset};

fn format_error(path: &Path, reason: String) -> DataError {
    DataError::Format {
        path: path.to_path_buf(),
        format: "CSV",
        reason,
    }
}

fn read_text(path: &Path) -> Result<String, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    let bytes = if crate::gzip::is_gzip(&raw) {
        crate::gzip::gunzip(path, "CSV", &raw[..])?
    } else {
        raw
    };
    String::from_utf8(bytes).map_err(|e| format_error(path, format!("not UTF-8 text ({e})")))
}

fn unquote(field: &str) -> &str {
    let f = field.trim();
    f.strip_prefix('"').and_then(|x| x.strip_suffix('"')).unwrap_or(f)
}

/// Loads `path`: the column named `label_column` holds class labels (0–255), every
/// other column one pixel; images are `shape` (default: square when the pixel count
/// is a square, else one row).
pub fn load(path: &Path, label_column: &str, shape: Option<(usize, usize)>) -> Result<ImageDataset, DataError> {
    let text = read_text(path)?;
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines
        .next()
        .ok_or_else(|| format_error(path, "the file is empty".into()))?;
    let names: Vec<&str> = header.split(',').map(unquote).collect();
    let label_at = names.iter().position(|n| *n == label_column).ok_or_else(|| {
        let shown: Vec<&str> = names.iter().take(5).copied().collect();
        format_error(
            path,
            format!(
                "no column named {label_column:?} in the header (it starts {}); set dataset.label_column",
                shown.join(", ")
            ),
        )
    })?;
    let width = names.len() - 1;
    if width == 0 {
        return Err(format_error(path, "the only column is the label".into()));
    }
    let (rows, cols) = match shape {
        Some((r, c)) if r * c == width => (r, c),
        Some((r, c)) => {
            return Err(format_error(
                path,
                format!("{width} pixel columns do not make {r}×{c} images (set dataset.image_shape)"),
            ));
        }
        None => {
            let side = (width as f64).sqrt().round() as usize;
            if side * side == width { (side, side) } else { (1, width) }
        }
    };
    let mut labels = Vec::new();
    let mut values: Vec<f32> = Vec::new();
    for (n, line) in lines {
        let line_no = n + 1;
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != names.len() {
            return Err(format_error(
                path,
                format!("line {line_no} has {} fields, the header {}", fields.len(), names.len()),
            ));
        }
        for (i, field) in fields.iter().enumerate() {
            let f = unquote(field);
            let v: f32 = f.parse().map_err(|_| {
                format_error(
                    path,
                    format!("line {line_no}, column {:?}: {f:?} is not a number", names[i]),
                )
            })?;
            if i == label_at {
                if v.fract() != 0.0 || !(0.0..=255.0).contains(&v) {
                    return Err(format_error(
                        path,
                        format!("line {line_no}: label {f:?} is not a class number from 0 to 255"),
                    ));
                }
                labels.push(v as u8);
            } else if !(0.0..=255.0).contains(&v) {
                return Err(format_error(
                    path,
                    format!("line {line_no}, column {:?}: {v} is outside 0–255", names[i]),
                ));
            } else {
                values.push(v);
            }
        }
    }
    let scale = if values.iter().all(|v| *v <= 1.0) { 255.0 } else { 1.0 };
    Ok(ImageDataset {
        pixels: values.iter().map(|v| (v * scale).round() as u8).collect(),
        labels,
        rows,
        cols,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn loads_labels_and_square_images() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "t.csv", "label,p1,p2,p3,p4\n3,0,10,20,255\n\n7,1,2,3,4\n");
        let d = load(&p, "label", None).unwrap();
        assert_eq!((d.rows, d.cols, d.labels.clone()), (2, 2, vec![3, 7]));
        assert_eq!(d.pixels, vec![0, 10, 20, 255, 1, 2, 3, 4]);
        // The label may be anywhere; 0–1 values are scaled.
        let p = write(dir.path(), "u.csv", "\"a\",\"b\",\"class\"\n0.5,1.0,2\n");
        let d = load(&p, "class", Some((1, 2))).unwrap();
        assert_eq!((d.pixels.clone(), d.labels.clone()), (vec![128, 255], vec![2]));
    }

    #[test]
    fn mistakes_name_the_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("label,a,b\n1,2\n", "line 2 has 2 fields"),
            ("label,a,b\n1,2,x\n", "line 2, column \"b\": \"x\" is not a number"),
            ("label,a,b\n1.5,2,3\n", "label \"1.5\" is not a class number"),
            ("label,a,b\n1,2,300\n", "300 is outside 0–255"),
            ("klass,a,b\n1,2,3\n", "no column named \"label\""),
            ("", "the file is empty"),
        ];
        for (text, expected) in cases {
            let p = write(dir.path(), "bad.csv", text);
            let err = load(&p, "label", None).unwrap_err().to_string();
            assert!(err.contains(expected) && err.contains("bad.csv"), "{err}");
        }
        let p = write(dir.path(), "shape.csv", "label,a,b,c\n1,2,3,4\n");
        let err = load(&p, "label", Some((2, 2))).unwrap_err().to_string();
        assert!(err.contains("3 pixel columns do not make 2×2"), "{err}");
    }

    #[test]
    fn reads_gzip() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv.gz");
        let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(&p).unwrap(), Default::default());
        gz.write_all(b"label,x\n4,9\n").unwrap();
        gz.finish().unwrap();
        let d = load(&p, "label", None).unwrap();
        assert_eq!(
            (d.pixels.clone(), d.labels.clone(), d.rows, d.cols),
            (vec![9], vec![4], 1, 1)
        );
    }
}
