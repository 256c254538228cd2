//! Matrix products over the pool: `out[r][o] = Σ_i W[o][i]·x[r][i]`.
//!
//! ## Design
//! Work is split statically. With as many activation rows as participants (prefill)
//! each participant takes a range of activation rows and every weight row; with
//! fewer (decode) each takes a range of weight rows — whole groups of four, so the
//! tiles of later kernels never straddle two participants. Either way every output
//! is one dot product computed in one fixed order, so results are bit-identical for
//! any number of threads. Each participant's share of the output is a disjoint
//! slice cut before the job starts, handed over through an uncontended mutex.

use std::sync::Mutex;

use crate::acts::QActs;
use crate::dispatch::{self, Level};
use crate::pool::{MAX_THREADS, Pool};
use crate::{KernelError, QMatrix};

/// The most matrices one [`Kernels::matmul_many`] call takes.
pub const MAX_MATRICES: usize = 4;

/// The kernels of one instruction-set level, run on a pool.
#[derive(Clone, Copy)]
pub struct Kernels {
    level: Level,
    pool: &'static Pool,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kernels({}, {} threads)", self.level.name(), self.pool.threads())
    }
}

impl Kernels {
    /// The widest level this CPU has (see [`Level::detect`]) on the process's pool.
    pub fn detect() -> Kernels {
        Kernels::new(Level::detect(), Pool::global())
    }

    /// `level`'s kernels on `pool`.
    pub fn new(level: Level, pool: &'static Pool) -> Kernels {
        Kernels { level, pool }
    }

    /// The instruction-set level.
    pub fn level(&self) -> Level {
        self.level
    }

    /// Participants per product.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// `out = x · Wᵀ`: `out` is `x.rows() × w.rows()`, row-major.
    pub fn matmul(&self, w: &QMatrix, x: &QActs, out: &mut [f32]) -> Result<(), KernelError> {
        self.matmul_many(&[w], x, &mut [out])
    }

    /// Several products of one input in one hand-over to the pool (q, k and v; gate
    /// and up): `outs[m] = x · ws[m]ᵀ`.
    pub fn matmul_many(&self, ws: &[&QMatrix], x: &QActs, outs: &mut [&mut [f32]]) -> Result<(), KernelError> {
        check(ws, x, outs)?;
        let n = self.pool.threads();
        if x.rows() >= n && x.rows() > 1 {
            // Each participant: a range of activation rows, every weight row.
            let bounds = |t: usize| x.rows() * t / n;
            let parts = cut(outs, n, |m, t| bounds(t) * ws[m].rows());
            self.pool.run(&|p| {
                let mut mine = parts[p].lock().expect("a participant's outputs");
                for (m, w) in ws.iter().enumerate() {
                    let out = &mut mine[m];
                    for (i, r) in (bounds(p)..bounds(p + 1)).enumerate() {
                        let o = &mut out[i * w.rows()..(i + 1) * w.rows()];
                        dispatch::rows(self.level, w.ty(), w.bytes(), w.row_bytes(), x.row(r), o);
                    }
                }
            });
        } else {
            // One activation row at a time, each participant a range of weight rows.
            let bounds = |rows: usize, t: usize| if t == n { rows } else { rows * t / n / 4 * 4 };
            for r in 0..x.rows() {
                let mut row_outs: [&mut [f32]; MAX_MATRICES] = Default::default();
                for (m, (o, w)) in outs.iter_mut().zip(ws).enumerate() {
                    row_outs[m] = &mut o[r * w.rows()..(r + 1) * w.rows()];
                }
                let parts = cut(&mut row_outs[..ws.len()], n, |m, t| bounds(ws[m].rows(), t));
                let xr = x.row(r);
                self.pool.run(&|p| {
                    let mut mine = parts[p].lock().expect("a participant's outputs");
                    for (m, w) in ws.iter().enumerate() {
                        let (lo, hi) = (bounds(w.rows(), p), bounds(w.rows(), p + 1));
                        let bytes = &w.bytes()[lo * w.row_bytes()..hi * w.row_bytes()];
                        dispatch::rows(self.level, w.ty(), bytes, w.row_bytes(), xr, &mut mine[m]);
                    }
                });
            }
        }
        Ok(())
    }
}

fn check(ws: &[&QMatrix], x: &QActs, outs: &[&mut [f32]]) -> Result<(), KernelError> {
    if ws.len() != outs.len() || ws.len() > MAX_MATRICES {
        return Err(KernelError::Shape(format!(
            "{} matrices and {} outputs (at most {MAX_MATRICES} of each, as many of one as the other)",
            ws.len(),
            outs.len()
        )));
    }
    for (w, out) in ws.iter().zip(outs) {
        if w.cols() != x.cols() || w.ty().act() != x.ty() {
            return Err(KernelError::Shape(format!(
                "a {} × {} {} matrix times {} activations of {:?}",
                w.rows(),
                w.cols(),
                w.ty(),
                x.cols(),
                x.ty()
            )));
        }
        if out.len() != x.rows() * w.rows() {
            return Err(KernelError::Length {
                what: format!("the output of {} rows × {}", x.rows(), w.rows()),
                expected: x.rows() * w.rows(),
                got: out.len(),
            });
        }
    }
    Ok(())
}

type Parts<'a> = [Mutex<[&'a mut [f32]; MAX_MATRICES]>; MAX_THREADS];

/// Cuts each output `outs[m]` at `at(m, t)` for `t` in `1..n` into `n` consecutive
/// slices; participant `t` gets slice `t` of every output.
fn cut<'a>(outs: &'a mut [&mut [f32]], n: usize, at: impl Fn(usize, usize) -> usize) -> Parts<'a> {
    let parts: Parts<'a> = std::array::from_fn(|_| Mutex::new(Default::default()));
    for (m, out) in outs.iter_mut().enumerate() {
        let mut rest: &'a mut [f32] = &mut **out;
        for (t, part) in parts.iter().enumerate().take(n) {
            let len = if t + 1 == n {
                rest.len()
            } else {
                at(m, t + 1) - at(m, t)
            };
            let (mine, tail) = rest.split_at_mut(len);
            part.lock().expect("fresh")[m] = mine;
            rest = tail;
        }
    }
    parts
}
