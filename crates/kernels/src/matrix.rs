//! [`QMatrix`]: a weight matrix in its file format — `rows` output rows of `cols`
//! inputs, each row whole blocks — viewed, sliced and dequantised without leaving it.

use std::ops::Range;

use crate::{Bytes, KernelError, QType, formats};

/// Weights in file format: `rows` rows of `cols`, each `ty.row_bytes(cols)` bytes.
#[derive(Debug, Clone)]
pub struct QMatrix {
    ty: QType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: Bytes,
}

impl QMatrix {
    /// A matrix over `data`, which must be exactly `rows` rows of `cols` weights of `ty`.
    pub fn new(ty: QType, rows: usize, cols: usize, data: Bytes) -> Result<QMatrix, KernelError> {
        let row_bytes = ty.row_bytes(cols)?;
        let expected = row_bytes
            .checked_mul(rows)
            .ok_or_else(|| KernelError::TooLarge(format!("{rows} rows of {cols} {ty} weights")))?;
        if data.len() != expected {
            return Err(KernelError::Length {
                what: format!("{rows} rows of {cols} {ty} weights"),
                expected,
                got: data.len(),
            });
        }
        Ok(QMatrix {
            ty,
            rows,
            cols,
            row_bytes,
            data,
        })
    }

    /// `values` (row-major, `rows × cols`) quantized to `ty` by the reference quantizers.
    pub fn quantize(ty: QType, values: &[f32], rows: usize, cols: usize) -> Result<QMatrix, KernelError> {
        if rows.checked_mul(cols) != Some(values.len()) {
            return Err(KernelError::Length {
                what: format!("values of a {rows} × {cols} matrix"),
                expected: rows.saturating_mul(cols),
                got: values.len(),
            });
        }
        QMatrix::new(ty, rows, cols, Bytes::from_vec(formats::quantize(ty, values)?))
    }

    /// The weight format.
    pub fn ty(&self) -> QType {
        self.ty
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Inputs per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// All rows' bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// Row `r`'s bytes.
    pub fn row(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Rows `r` as a matrix sharing these bytes (no copy): a tensor-parallel worker's
    /// output rows.
    pub fn row_range(&self, r: Range<usize>) -> Result<QMatrix, KernelError> {
        if r.start > r.end || r.end > self.rows {
            return Err(KernelError::Shape(format!(
                "rows {}..{} of a matrix of {}",
                r.start, r.end, self.rows
            )));
        }
        let data = self.data.slice(r.start * self.row_bytes..r.end * self.row_bytes)?;
        QMatrix::new(self.ty, r.len(), self.cols, data)
    }

    /// Columns `c` of every row, copied (the row length changes): a tensor-parallel
    /// worker's share of the inputs. Only whole blocks can be cut out, so both ends must
    /// be multiples of the block (the end may also be `cols`).
    pub fn col_range(&self, c: Range<usize>) -> Result<QMatrix, KernelError> {
        let per = self.ty.block_elems();
        if c.start > c.end || c.end > self.cols {
            return Err(KernelError::Shape(format!(
                "columns {}..{} of a matrix of {}",
                c.start, c.end, self.cols
            )));
        }
        if !c.start.is_multiple_of(per) || !(c.end.is_multiple_of(per) || c.end == self.cols) {
            return Err(KernelError::NotBlockAligned {
                what: format!("columns {}..{}", c.start, c.end),
                ty: self.ty,
            });
        }
        let bb = self.ty.block_bytes();
        let (b0, b1) = (c.start / per * bb, c.end.div_ceil(per) * bb);
        let mut out = Vec::with_capacity((b1 - b0) * self.rows);
        for r in 0..self.rows {
            out.extend_from_slice(&self.row(r)[b0..b1]);
        }
        QMatrix::new(self.ty, self.rows, c.len(), Bytes::from_vec(out))
    }

    /// Row `r` as f32 (`out.len() == cols`): embedding look-ups and tests.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<(), KernelError> {
        if r >= self.rows {
            return Err(KernelError::Shape(format!("row {r} of a matrix of {}", self.rows)));
        }
        formats::dequantize(self.ty, self.row(r), out)
    }

    /// Every row as f32, row-major.
    pub fn dequantize(&self) -> Result<Vec<f32>, KernelError> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.dequantize_row(r, o)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0)
            .collect()
    }

    #[test]
    fn views_of_rows_and_columns_dequantise_to_the_slices_of_the_whole() {
        let (rows, cols) = (6, 96);
        let m = QMatrix::quantize(QType::Q4_1, &values(rows, cols), rows, cols).unwrap();
        let whole = m.dequantize().unwrap();
        let top = m.row_range(2..5).unwrap().dequantize().unwrap();
        assert_eq!(top, whole[2 * cols..5 * cols]);
        let mid = m.col_range(32..96).unwrap().dequantize().unwrap();
        for r in 0..rows {
            assert_eq!(mid[r * 64..(r + 1) * 64], whole[r * cols + 32..(r + 1) * cols]);
        }
    }

    #[test]
    fn cuts_inside_a_block_and_wrong_lengths_are_refused() {
        let m = QMatrix::quantize(QType::Q8_0, &values(2, 64), 2, 64).unwrap();
        assert!(matches!(m.col_range(16..64), Err(KernelError::NotBlockAligned { .. })));
        assert!(m.row_range(1..3).is_err());
        assert!(QMatrix::new(QType::Q8_0, 2, 64, Bytes::from_vec(vec![0; 135])).is_err());
        assert!(QMatrix::quantize(QType::Q4K, &values(1, 96), 1, 96).is_err());
    }
}
