//! Activations quantized for a product: [`QActs`] holds `rows` rows of one
//! [`ActType`] in buffers reused from call to call, so decoding allocates nothing
//! once the buffers have grown to the model's widths.

use crate::formats::q8;
use crate::{ActType, KernelError};

/// One row of Q8 activations, borrowed from [`QActs`]: `qs` holds the row's signed
/// bytes, `d` one scale per block; `sums` (Q8_1) the block's `d·Σq`; `bsums` (Q8_K)
/// the sums of every 16 bytes; `starts` (Q8_0) `−128·Σq` of every 4 bytes.
#[derive(Debug, Clone, Copy)]
pub struct Q8Row<'a> {
    /// The integers, block after block.
    pub qs: &'a [i8],
    /// One scale per block.
    pub d: &'a [f32],
    /// Q8_1: `d·Σq` per block; empty otherwise.
    pub sums: &'a [f32],
    /// Q8_K: sums of every 16 integers (16 per block); empty otherwise.
    pub bsums: &'a [i16],
    /// Q8_0: `−128·Σq` of every 4 integers (8 per block), the start of each lane of
    /// the VNNI tile's products with weights made unsigned (`simd::wide`); empty
    /// otherwise.
    pub starts: &'a [i32],
}

/// One row of activations in the format a product needs.
#[derive(Debug, Clone, Copy)]
pub enum ActRow<'a> {
    /// Float weights meet f32 activations.
    F32(&'a [f32]),
    /// Quantized weights meet Q8 activations.
    Q8(Q8Row<'a>),
}

/// `rows` rows of `cols` activations quantized to one [`ActType`].
#[derive(Debug, Clone)]
pub struct QActs {
    ty: ActType,
    rows: usize,
    cols: usize,
    f32s: Vec<f32>,
    qs: Vec<i8>,
    d: Vec<f32>,
    sums: Vec<f32>,
    bsums: Vec<i16>,
    starts: Vec<i32>,
}

impl Default for QActs {
    fn default() -> Self {
        QActs::new()
    }
}

impl QActs {
    /// Empty buffers; they grow on first use.
    pub fn new() -> QActs {
        QActs {
            ty: ActType::F32,
            rows: 0,
            cols: 0,
            f32s: Vec::new(),
            qs: Vec::new(),
            d: Vec::new(),
            sums: Vec::new(),
            bsums: Vec::new(),
            starts: Vec::new(),
        }
    }

    /// Quantizes `x`, `rows` rows of `cols` (row-major), to `ty`, replacing what the
    /// buffers held. ([`crate::Kernels::quantize`] does it on the pool.)
    pub fn quantize(&mut self, ty: ActType, x: &[f32], rows: usize, cols: usize) -> Result<(), KernelError> {
        self.prepare(ty, x, rows, cols)?.quantize(ty, x);
        Ok(())
    }

    /// Checks `x` against the shape, sizes the buffers for it and hands out all of
    /// its rows to be written.
    pub(crate) fn prepare(
        &mut self,
        ty: ActType,
        x: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<RowsMut<'_>, KernelError> {
        if rows.checked_mul(cols) != Some(x.len()) {
            return Err(KernelError::Length {
                what: format!("activations of {rows} rows × {cols}"),
                expected: rows.saturating_mul(cols),
                got: x.len(),
            });
        }
        let block = ty.block_elems();
        if !cols.is_multiple_of(block) {
            return Err(KernelError::ActsNotBlockAligned { cols, ty });
        }
        (self.ty, self.rows, self.cols) = (ty, rows, cols);
        let blocks = x.len() / block;
        let (f32s, qs, d, sums, bsums, starts) = match ty {
            ActType::F32 => (x.len(), 0, 0, 0, 0, 0),
            ActType::Q8_0 => (0, x.len(), blocks, 0, 0, x.len() / 4),
            ActType::Q8_1 => (0, x.len(), blocks, blocks, 0, 0),
            ActType::Q8K => (0, x.len(), blocks, 0, 16 * blocks, 0),
        };
        self.f32s.resize(f32s, 0.0);
        self.qs.resize(qs, 0);
        self.d.resize(d, 0.0);
        self.sums.resize(sums, 0.0);
        self.bsums.resize(bsums, 0);
        self.starts.resize(starts, 0);
        Ok(RowsMut {
            cols,
            f32s: &mut self.f32s,
            qs: &mut self.qs,
            d: &mut self.d,
            sums: &mut self.sums,
            bsums: &mut self.bsums,
            starts: &mut self.starts,
        })
    }

    /// The format the rows are in.
    pub fn ty(&self) -> ActType {
        self.ty
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Activations per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> ActRow<'_> {
        let n = self.cols;
        let per = self.ty.block_elems();
        let (b0, b1) = (r * n / per, (r + 1) * n / per);
        match self.ty {
            ActType::F32 => ActRow::F32(&self.f32s[r * n..(r + 1) * n]),
            ActType::Q8_0 => ActRow::Q8(Q8Row {
                qs: &self.qs[r * n..(r + 1) * n],
                d: &self.d[b0..b1],
                sums: &[],
                bsums: &[],
                starts: &self.starts[r * n / 4..(r + 1) * n / 4],
            }),
            ActType::Q8_1 => ActRow::Q8(Q8Row {
                qs: &self.qs[r * n..(r + 1) * n],
                d: &self.d[b0..b1],
                sums: &self.sums[b0..b1],
                bsums: &[],
                starts: &[],
            }),
            ActType::Q8K => ActRow::Q8(Q8Row {
                qs: &self.qs[r * n..(r + 1) * n],
                d: &self.d[b0..b1],
                sums: &[],
                bsums: &self.bsums[16 * b0..16 * b1],
                starts: &[],
            }),
        }
    }

    /// The values the quantized row stands for (`q·d`), for error bounds in tests.
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        match self.row(r) {
            ActRow::F32(x) => x.to_vec(),
            ActRow::Q8(x) => {
                let per = self.ty.block_elems();
                x.qs.iter().enumerate().map(|(i, &q)| q as f32 * x.d[i / per]).collect()
            }
        }
    }
}

/// Some consecutive rows of a [`QActs`], to be written: every buffer cut at the
/// same rows, so the rows can be quantized in parts on several threads.
#[derive(Debug, Default)]
pub(crate) struct RowsMut<'a> {
    cols: usize,
    pub(crate) f32s: &'a mut [f32],
    pub(crate) qs: &'a mut [i8],
    pub(crate) d: &'a mut [f32],
    pub(crate) sums: &'a mut [f32],
    pub(crate) bsums: &'a mut [i16],
    pub(crate) starts: &'a mut [i32],
}

impl<'a> RowsMut<'a> {
    /// The first `rows` rows and the rest.
    pub(crate) fn split(self, rows: usize, ty: ActType) -> (RowsMut<'a>, RowsMut<'a>) {
        let values = rows * self.cols;
        let blocks = values / ty.block_elems();
        // Buffers the format does not use are empty, and stay so on both sides.
        fn at<T>(v: &mut [T], i: usize) -> (&mut [T], &mut [T]) {
            let i = if v.is_empty() { 0 } else { i };
            v.split_at_mut(i)
        }
        let (f0, f1) = at(self.f32s, values);
        let (q0, q1) = at(self.qs, values);
        let (d0, d1) = at(self.d, blocks);
        let (s0, s1) = at(self.sums, blocks);
        let (b0, b1) = at(self.bsums, 16 * blocks);
        let (t0, t1) = at(self.starts, values / 4);
        let cols = self.cols;
        (
            RowsMut {
                cols,
                f32s: f0,
                qs: q0,
                d: d0,
                sums: s0,
                bsums: b0,
                starts: t0,
            },
            RowsMut {
                cols,
                f32s: f1,
                qs: q1,
                d: d1,
                sums: s1,
                bsums: b1,
                starts: t1,
            },
        )
    }

    /// Quantizes `x`, exactly as many values as these rows hold, to `ty`.
    #[inline(always)]
    pub(crate) fn quantize(self, ty: ActType, x: &[f32]) {
        match ty {
            ActType::F32 => self.f32s.copy_from_slice(x),
            ActType::Q8_0 => {
                q8::quantize_q8(x, self.qs, self.d, None);
                q8::starts(self.qs, self.starts);
            }
            ActType::Q8_1 => q8::quantize_q8(x, self.qs, self.d, Some(self.sums)),
            ActType::Q8K => q8::quantize_q8k(x, self.qs, self.d, self.bsums),
        }
    }
}
