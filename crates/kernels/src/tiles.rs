//! A prompt's products on the tile unit (`simd::amx`), at the level that has one.
//!
//! ## Design
//! The work is units of one matrix's 64 weight rows (four slabs of sixteen) × one
//! group of sixteen activation rows, taken by whichever participant is free next,
//! the units of one chunk of weight rows after one another so its rows stay in
//! cache for every group. Each unit's outputs — sixteen activation rows' pieces of
//! 64 outputs — are cut before the job starts, as in `matmul`. Q4_0/Q5_0 matrices
//! are rewritten as Q8_0 and Q4_1/Q5_1 as unsigned bytes once per call
//! ([`Rewrite`]); the activations are packed for the tile once per call
//! ([`Packed`]). Matrices of other formats (the K-quants, floats) and rewrites past
//! [`rewrite::WHOLE_MAX`] take the row-at-a-time kernels.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::acts::QActs;
use crate::dispatch;
use crate::matmul::Kernels;
use crate::rewrite::{self, Rewrite};
use crate::simd::amx::{Form, Packed, TILE};
use crate::{KernelError, MAX_MATRICES, QMatrix, QType};

/// Weight rows per unit of work.
const UNIT_ROWS: usize = 4 * TILE;

thread_local! {
    /// A prompt's matrices rewritten for the tile unit.
    static REWRITTEN: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A prompt's activations packed for the tile unit.
    static PACKED: std::cell::RefCell<Packed> = std::cell::RefCell::new(Packed::default());
    /// A last slab of fewer than sixteen weight rows, padded with zero rows.
    static PAD: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A matrix as the tile unit reads it.
struct Operand<'a> {
    form: Form,
    bytes: &'a [u8],
    row_bytes: usize,
    rows: usize,
}

/// How `w` reaches the tile unit: its form, and the rewrite it needs first.
fn route(w: &QMatrix) -> Option<(Form, Option<Rewrite>)> {
    let how = match w.ty() {
        QType::Q8_0 => return Some((Form::Signed, None)),
        QType::Q4_0 | QType::Q5_0 => Rewrite::Q8_0,
        QType::Q4_1 | QType::Q5_1 => Rewrite::Unsigned,
        _ => return None,
    };
    let form = match how {
        Rewrite::Q8_0 => Form::Signed,
        Rewrite::Unsigned => Form::Unsigned,
    };
    (how.bytes_of(w) <= rewrite::WHOLE_MAX).then_some((form, Some(how)))
}

impl Kernels {
    /// A prompt's products at the tile level: the matrices the tile unit takes go
    /// through it, the others through the row-at-a-time kernels.
    pub(crate) fn prompt_products(
        &self,
        ws: &[&QMatrix],
        x: &QActs,
        outs: &mut [&mut [f32]],
    ) -> Result<(), KernelError> {
        let (mut tiled, mut others): ([&QMatrix; MAX_MATRICES], [&QMatrix; MAX_MATRICES]) =
            ([ws[0]; MAX_MATRICES], [ws[0]; MAX_MATRICES]);
        let (mut tiled_out, mut others_out): ([&mut [f32]; MAX_MATRICES], [&mut [f32]; MAX_MATRICES]) =
            Default::default();
        let (mut t, mut o) = (0, 0);
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            if route(w).is_some() {
                (tiled[t], tiled_out[t]) = (*w, &mut **out);
                t += 1;
            } else {
                (others[o], others_out[o]) = (*w, &mut **out);
                o += 1;
            }
        }
        if t > 0 {
            self.tile_products(&tiled[..t], x, &mut tiled_out[..t]);
        }
        if o > 0 {
            self.for_prompt(false)
                .matmul_many(&others[..o], x, &mut others_out[..o])?;
        }
        Ok(())
    }

    /// `outs[m] = x · ws[m]ᵀ` on the tile unit, for matrices [`route`] takes.
    fn tile_products(&self, ws: &[&QMatrix], x: &QActs, outs: &mut [&mut [f32]]) {
        let routes: Vec<(Form, Option<Rewrite>)> = ws.iter().map(|w| route(w).expect("a tiled matrix")).collect();
        let how: Vec<Option<Rewrite>> = routes.iter().map(|r| r.1).collect();
        let copy: usize = ws.iter().zip(&how).filter_map(|(w, h)| h.map(|h| h.bytes_of(w))).sum();
        REWRITTEN.with_borrow_mut(|buf| {
            // Grows to the largest copy seen (later calls allocate nothing).
            if buf.len() < copy {
                buf.resize(copy, 0);
            }
            let rewritten = self.rewrite_whole(ws, &how, &mut buf[..copy]);
            let operands: Vec<Operand> = ws
                .iter()
                .zip(rewritten)
                .zip(&routes)
                .map(|((w, bytes), &(form, _))| {
                    let bytes = bytes.unwrap_or(w.bytes());
                    Operand {
                        form,
                        bytes,
                        row_bytes: bytes.len() / w.rows(),
                        rows: w.rows(),
                    }
                })
                .collect();
            PACKED.with_borrow_mut(|packed| {
                packed.pack(x);
                self.run_tiles(&operands, packed, x.rows(), outs);
            });
        });
    }

    fn run_tiles(&self, ws: &[Operand], packed: &Packed, rows: usize, outs: &mut [&mut [f32]]) {
        struct Unit<'o> {
            m: usize,
            first: usize,
            group: usize,
            outs: Vec<&'o mut [f32]>,
        }
        let groups = packed.groups();
        let mut units: Vec<Mutex<Unit>> = Vec::new();
        for (m, (w, out)) in ws.iter().zip(outs.iter_mut()).enumerate() {
            let chunks = w.rows.div_ceil(UNIT_ROWS);
            // Every activation row's outputs cut at the chunks' bounds, by chunk.
            let mut pieces: Vec<Vec<&mut [f32]>> = (0..chunks).map(|_| Vec::with_capacity(rows)).collect();
            for row in out.chunks_exact_mut(w.rows) {
                let mut rest = row;
                for (c, by_chunk) in pieces.iter_mut().enumerate() {
                    let len = (w.rows - c * UNIT_ROWS).min(UNIT_ROWS);
                    let (piece, tail) = std::mem::take(&mut rest).split_at_mut(len);
                    by_chunk.push(piece);
                    rest = tail;
                }
            }
            for (c, by_chunk) in pieces.into_iter().enumerate() {
                let mut by_row = by_chunk.into_iter();
                for group in 0..groups {
                    units.push(Mutex::new(Unit {
                        m,
                        first: c * UNIT_ROWS,
                        group,
                        outs: by_row.by_ref().take(TILE).collect(),
                    }));
                }
            }
        }
        let next = AtomicUsize::new(0);
        let level = self.level();
        self.pool().run(&|_| {
            let mut result = [[0f32; TILE]; TILE];
            loop {
                let u = next.fetch_add(1, Ordering::Relaxed);
                let Some(unit) = units.get(u) else { break };
                let mut unit = unit.lock().expect("a unit's outputs");
                let w = &ws[unit.m];
                let (first, rb) = (unit.first, w.row_bytes);
                let end = (first + UNIT_ROWS).min(w.rows);
                for s in (first..end).step_by(TILE) {
                    let take = (end - s).min(TILE);
                    if take == TILE {
                        let slab = &w.bytes[s * rb..(s + TILE) * rb];
                        dispatch::tile_slab(level, w.form, slab, rb, packed, unit.group, &mut result);
                    } else {
                        PAD.with_borrow_mut(|pad| {
                            pad.clear();
                            pad.extend_from_slice(&w.bytes[s * rb..(s + take) * rb]);
                            pad.resize(TILE * rb, 0);
                            dispatch::tile_slab(level, w.form, pad, rb, packed, unit.group, &mut result);
                        });
                    }
                    for (j, out) in unit.outs.iter_mut().enumerate() {
                        for (i, o) in out[s - first..s - first + take].iter_mut().enumerate() {
                            *o = result[i][j];
                        }
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::acts::ActRow;
    use crate::formats::legacy::{self, Legacy};
    use crate::matmul::tests::assert_rows_alone_give_their_bits;
    use crate::{Level, Pool};

    const TILED: [(QType, Legacy); 5] = [
        (QType::Q8_0, Legacy::Q8_0),
        (QType::Q4_0, Legacy::Q4_0),
        (QType::Q5_0, Legacy::Q5_0),
        (QType::Q4_1, Legacy::Q4_1),
        (QType::Q5_1, Legacy::Q5_1),
    ];

    /// The tile level's kernels for a prompt on `threads`, or `None` (and a line
    /// saying so) on a machine without a tile unit.
    fn tile_kernels(threads: usize) -> Option<Kernels> {
        let level = Level::detect();
        if !level.has_tiles() {
            eprintln!("no tile unit here (level {}): nothing to test", level.name());
            return None;
        }
        Some(Kernels::new(level, Box::leak(Box::new(Pool::new(threads)))).for_prompt(true))
    }

    fn random(n: usize, scale: f32, rng: &mut StdRng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    /// Every output is the formula of `legacy::tile_dot`, bit for bit: a last slab
    /// of fewer than sixteen weight rows, a last group of fewer than sixteen
    /// activation rows and two matrices in one call included.
    #[test]
    fn a_slab_gives_each_output_the_bits_of_one_integer_sum_per_block() {
        let Some(k) = tile_kernels(2) else { return };
        let mut rng = StdRng::seed_from_u64(11);
        let cols = 256;
        for (ty, legacy_ty) in TILED {
            let (ra, rb) = (37, 64);
            let a = QMatrix::quantize(ty, &random(ra * cols, 1.0, &mut rng), ra, cols).unwrap();
            let b = QMatrix::quantize(ty, &random(rb * cols, 1.0, &mut rng), rb, cols).unwrap();
            for x_rows in [1, 5, 16, 20] {
                let mut x = QActs::new();
                x.quantize(ty.act(), &random(x_rows * cols, 2.0, &mut rng), x_rows, cols)
                    .unwrap();
                let (mut oa, mut ob) = (vec![0.0; x_rows * ra], vec![0.0; x_rows * rb]);
                k.matmul_many(&[&a, &b], &x, &mut [&mut oa, &mut ob]).unwrap();
                for (w, out) in [(&a, &oa), (&b, &ob)] {
                    for r in 0..x_rows {
                        let ActRow::Q8(xr) = x.row(r) else { unreachable!() };
                        for o in 0..w.rows() {
                            let row = &w.bytes()[o * w.row_bytes()..(o + 1) * w.row_bytes()];
                            let want = legacy::tile_dot(legacy_ty, row, &xr);
                            let got = out[r * w.rows() + o];
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "{ty}, {x_rows} rows: row {r}, output {o}: {got} against {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A prompt row's products depend on that row alone: the same bits whatever
    /// rows share its groups and whatever the number of threads.
    #[test]
    fn a_prompts_products_do_not_depend_on_the_rows_beside_it() {
        let mut rng = StdRng::seed_from_u64(12);
        let (cols, w_rows, x_rows) = (512, 70, 40);
        for (ty, _) in TILED {
            let w = QMatrix::quantize(ty, &random(w_rows * cols, 1.0, &mut rng), w_rows, cols).unwrap();
            let xf = random(x_rows * cols, 2.0, &mut rng);
            for threads in [1, 2, 3] {
                let Some(k) = tile_kernels(threads) else { return };
                let what = format!("{ty}, {threads} threads");
                assert_rows_alone_give_their_bits(&k, &w, &xf, [0, 15, 16, 39], &what);
            }
        }
    }

    /// The tile's results and the decode dot's differ only in the order of
    /// summation: by at most a few ulps of Σ|wᵢ·xᵢ|. Matrices the tile does not take
    /// (K-quants) keep the dot's bits in a prompt.
    #[test]
    fn a_prompts_products_stay_within_rounding_of_the_decode_dot() {
        let Some(k) = tile_kernels(2) else { return };
        let mut rng = StdRng::seed_from_u64(13);
        let (cols, w_rows, x_rows) = (1536, 48, 20);
        for ty in TILED.map(|t| t.0).into_iter().chain([QType::Q4K, QType::Q6K]) {
            let w = QMatrix::quantize(ty, &random(w_rows * cols, 1.0, &mut rng), w_rows, cols).unwrap();
            let wd = w.dequantize().unwrap();
            let mut x = QActs::new();
            x.quantize(ty.act(), &random(x_rows * cols, 2.0, &mut rng), x_rows, cols)
                .unwrap();
            let (mut prompt, mut decode) = (vec![0.0; x_rows * w_rows], vec![0.0; x_rows * w_rows]);
            k.matmul(&w, &x, &mut prompt).unwrap();
            k.for_prompt(false).matmul(&w, &x, &mut decode).unwrap();
            if route(&w).is_none() {
                assert_eq!(prompt, decode, "{ty} is not the tile's: the dot's bits");
                continue;
            }
            for r in 0..x_rows {
                let xq = x.dequantize_row(r);
                for o in 0..w_rows {
                    let wr = &wd[o * cols..(o + 1) * cols];
                    let mass: f64 = wr.iter().zip(&xq).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                    let (p, d) = (prompt[r * w_rows + o], decode[r * w_rows + o]);
                    assert!(
                        ((p - d) as f64).abs() <= 1e-5 * mass + 1e-6,
                        "{ty}: row {r}, output {o}: {p} against the dot's {d}"
                    );
                }
            }
        }
    }
}
