//! The operations between the products, row by row on the pool: quantizing
//! activations, normalising, the gated activation, rotary positions.
//!
//! ## Design
//! In a prefill these see a hundred rows and more, and done by the calling thread
//! alone they were a fifth of the prefill's time while the other cores waited. So
//! each participant takes consecutive rows (`t·rows/n ..`) and writes only its rows
//! of each output, cut before the job and handed over through an uncontended mutex
//! as the products do. A row is computed by the same code whoever computes it, so
//! the results do not depend on the number of threads. Below [`PARALLEL`] rows (a
//! decode step) the caller does it all: handing a job over would cost more than it.

use std::ops::Range;
use std::sync::Mutex;

use crate::acts::RowsMut;
use crate::matmul::cut;
use crate::{ActType, KernelError, Kernels, MAX_MATRICES, MAX_THREADS, QActs, dispatch};

/// The work on one participant's rows: their range, and those rows of each output.
pub type RowWork<'f, const M: usize> = dyn Fn(Range<usize>, [&mut [f32]; M]) + Sync + 'f;

/// Rows from which the work is shared out.
const PARALLEL: usize = 4;

impl Kernels {
    /// Runs `f(rows, outs)` over `rows` rows, shared out by rows: each participant
    /// gets a range of rows and those rows of every output (`outs[m]` holds `rows`
    /// rows of `outs[m].len() / rows` values). At most [`MAX_MATRICES`] outputs.
    pub fn by_rows<const M: usize>(&self, rows: usize, mut outs: [&mut [f32]; M], f: &RowWork<'_, M>) {
        const { assert!(M <= MAX_MATRICES, "at most MAX_MATRICES outputs") };
        let n = self.threads();
        if rows < PARALLEL || n == 1 {
            return f(0..rows, outs);
        }
        let bounds = |t: usize| rows * t / n;
        let widths: [usize; M] = std::array::from_fn(|m| outs[m].len() / rows);
        let parts = cut(&mut outs, n, |m, t| bounds(t) * widths[m]);
        self.pool().run(&|p| {
            let mut mine = parts[p].lock().expect("a participant's rows");
            f(
                bounds(p)..bounds(p + 1),
                std::array::from_fn(|m| std::mem::take(&mut mine[m])),
            );
        });
    }

    /// [`QActs::quantize`] shared out by rows.
    pub fn quantize(
        &self,
        acts: &mut QActs,
        ty: ActType,
        x: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        let all = acts.prepare(ty, x, rows, cols)?;
        let n = self.threads();
        if rows < PARALLEL || n == 1 {
            dispatch::quantize(self.level(), all, ty, x);
            return Ok(());
        }
        let bounds = |t: usize| rows * t / n;
        let parts: [Mutex<RowsMut>; MAX_THREADS] = std::array::from_fn(|_| Mutex::default());
        let mut rest = all;
        for (t, part) in parts.iter().enumerate().take(n) {
            let (mine, tail) = rest.split(bounds(t + 1) - bounds(t), ty);
            *part.lock().expect("fresh") = mine;
            rest = tail;
        }
        self.pool().run(&|p| {
            let mine = std::mem::take(&mut *parts[p].lock().expect("a participant's rows"));
            dispatch::quantize(self.level(), mine, ty, &x[bounds(p) * cols..bounds(p + 1) * cols]);
        });
        Ok(())
    }

    /// [`crate::ops::rms_norm`] shared out by rows.
    pub fn rms_norm(&self, x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) {
        let n = gamma.len();
        self.by_rows(x.len() / n, [out], &|r, [out]| {
            dispatch::rms_norm(self.level(), &x[r.start * n..r.end * n], gamma, eps, out)
        });
    }

    /// [`crate::ops::silu_mul`] of `rows` rows, shared out by rows.
    pub fn silu_mul(&self, rows: usize, gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len() / rows.max(1);
        self.by_rows(rows, [out], &|r, [out]| {
            dispatch::silu_mul(
                self.level(),
                &gate[r.start * n..r.end * n],
                &up[r.start * n..r.end * n],
                out,
            )
        });
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::{Level, Pool};

    fn kernels(level: Level, threads: usize) -> Kernels {
        Kernels::new(level, Box::leak(Box::new(Pool::new(threads))))
    }

    /// Shared out or not, every row is computed by the same code, and every level
    /// compiles the same arithmetic: the same bits for any level, any number of
    /// threads and any number of rows.
    #[test]
    fn rows_shared_out_give_the_bits_of_one_thread() {
        let mut rng = StdRng::seed_from_u64(3);
        let cols = 512;
        for rows in [1, 3, 4, 7, 33] {
            let x: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-4.0f32..4.0)).collect();
            let y: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-4.0f32..4.0)).collect();
            let gamma: Vec<f32> = (0..cols).map(|_| rng.random_range(0.5f32..1.5)).collect();
            let one = kernels(Level::SCALAR, 1);
            let (mut norm1, mut silu1) = (vec![0.0; rows * cols], vec![0.0; rows * cols]);
            one.rms_norm(&x, &gamma, 1e-5, &mut norm1);
            one.silu_mul(rows, &x, &y, &mut silu1);
            for (level, threads) in Level::available().into_iter().flat_map(|l| [(l, 1), (l, 2), (l, 3)]) {
                let k = kernels(level, threads);
                let (mut norm, mut silu) = (vec![0.0; rows * cols], vec![0.0; rows * cols]);
                k.rms_norm(&x, &gamma, 1e-5, &mut norm);
                k.silu_mul(rows, &x, &y, &mut silu);
                assert!(
                    norm == norm1 && silu == silu1,
                    "{rows} rows on {threads} threads at {}",
                    level.name()
                );
                for ty in ActType::ALL {
                    let (mut a, mut b) = (QActs::new(), QActs::new());
                    a.quantize(ty, &x, rows, cols).unwrap();
                    k.quantize(&mut b, ty, &x, rows, cols).unwrap();
                    for r in 0..rows {
                        assert_eq!(a.dequantize_row(r), b.dequantize_row(r), "{ty:?}, row {r} of {rows}");
                        if let (crate::ActRow::Q8(p), crate::ActRow::Q8(q)) = (a.row(r), b.row(r)) {
                            assert!(p.sums == q.sums && p.bsums == q.bsums, "{ty:?} sums, row {r}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_wrong_shape_is_refused_before_anything_is_shared_out() {
        let k = kernels(Level::detect(), 2);
        let mut a = QActs::new();
        assert!(k.quantize(&mut a, ActType::Q8_0, &[0.0; 64], 3, 32).is_err());
        assert!(k.quantize(&mut a, ActType::Q8_0, &[0.0; 48], 3, 16).is_err());
    }
}
