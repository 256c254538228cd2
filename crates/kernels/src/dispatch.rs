//! Which kernels this CPU can run, and the only calls into them.
//!
//! ## Design
//! A [`Level`] names an instruction-set level, and holding one is the proof that the
//! CPU has every feature of it: the only ways to make one are [`Level::detect`], which
//! asks the CPU, and [`Level::lower`], which can only step down. The `unsafe` blocks
//! below call `#[target_feature]` functions of `simd/`, and each is sound because its
//! `match` arm is reached only with a level that includes those features.
//!
//! `HETERO_SIMD=scalar|avx2|avx512|amx` lowers the detected level (never raises it), so
//! the lower levels can be tested and compared on a machine that has the higher ones.
//! The tile level (`amx`) is the AVX-512 level plus a prompt's products on Intel's
//! tile unit (`simd::amx`); it exists only where Linux grants the tile state.
#![allow(unsafe_code)]

use crate::acts::ActRow;
use crate::{QType, formats};

/// An instruction-set level whose kernels this CPU can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Level(Tier);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tier {
    Scalar,
    Avx2,
    Avx512,
    Amx,
}

impl Level {
    /// Plain Rust, any CPU.
    pub const SCALAR: Level = Level(Tier::Scalar);

    /// The widest level this CPU has, lowered by `HETERO_SIMD` if it is set.
    pub fn detect() -> Level {
        let best = Level::widest();
        match std::env::var("HETERO_SIMD").ok().as_deref().and_then(Level::parse_tier) {
            Some(tier) => best.lower(tier),
            None => best,
        }
    }

    fn widest() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 =
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
            let avx512 = avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni");
            if avx512 && crate::simd::amx::granted() {
                return Level(Tier::Amx);
            }
            if avx512 {
                return Level(Tier::Avx512);
            }
            if avx2 {
                return Level(Tier::Avx2);
            }
        }
        Level(Tier::Scalar)
    }

    fn parse_tier(s: &str) -> Option<Level> {
        match s {
            "scalar" => Some(Level(Tier::Scalar)),
            "avx2" => Some(Level(Tier::Avx2)),
            "avx512" => Some(Level(Tier::Avx512)),
            "amx" => Some(Level(Tier::Amx)),
            _ => None,
        }
    }

    /// This level or `to`, whichever is lower: a level can only be lowered.
    pub fn lower(self, to: Level) -> Level {
        self.min(to)
    }

    /// Every level this CPU can run, lowest first (for tests and benchmarks).
    pub fn available() -> Vec<Level> {
        let top = Level::widest();
        [Tier::Scalar, Tier::Avx2, Tier::Avx512, Tier::Amx]
            .into_iter()
            .map(Level)
            .filter(|l| *l <= top)
            .collect()
    }

    /// The level's name, as `HETERO_SIMD` spells it.
    pub fn name(self) -> &'static str {
        match self.0 {
            Tier::Scalar => "scalar",
            Tier::Avx2 => "avx2",
            Tier::Avx512 => "avx512",
            Tier::Amx => "amx",
        }
    }

    /// Whether a prompt's products can run on the tile unit ([`tile_slab`]).
    pub(crate) fn has_tiles(self) -> bool {
        self.0 == Tier::Amx
    }
}

/// `out[o] = Σ_i w[o][i]·x[i]` for the `out.len()` rows of `ty` in `w` (`row_bytes`
/// each) and one activation row of `ty.act()`. The kernel is the widest of `level`
/// that exists for `ty`; formats without one at a level use the next lower.
pub(crate) fn rows(level: Level, ty: QType, w: &[u8], row_bytes: usize, x: ActRow, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::simd::{avx2, avx512};
        if let ActRow::Q8(x) = x {
            macro_rules! pick {
                ($m:ident) => {
                    match ty {
                        QType::Q4_0 => return unsafe { $m::rows_q4_0(w, row_bytes, x, out) },
                        QType::Q4_1 => return unsafe { $m::rows_q4_1(w, row_bytes, x, out) },
                        QType::Q5_0 => return unsafe { $m::rows_q5_0(w, row_bytes, x, out) },
                        QType::Q5_1 => return unsafe { $m::rows_q5_1(w, row_bytes, x, out) },
                        QType::Q8_0 => return unsafe { $m::rows_q8_0(w, row_bytes, x, out) },
                        QType::Q4K => return unsafe { $m::rows_q4k(w, row_bytes, x, out) },
                        QType::Q5K => return unsafe { $m::rows_q5k(w, row_bytes, x, out) },
                        QType::Q6K => return unsafe { $m::rows_q6k(w, row_bytes, x, out) },
                        _ => {}
                    }
                };
            }
            // SAFETY (every call `pick!` makes): `level` proves the CPU has the features
            // of the module called (AVX-512 includes everything AVX2 needs).
            match level.0 {
                Tier::Avx512 | Tier::Amx => pick!(avx512),
                Tier::Avx2 => pick!(avx2),
                Tier::Scalar => {}
            }
        }
    }
    let _ = level;
    for (row, o) in w.chunks_exact(row_bytes).zip(out) {
        *o = formats::dot_scalar(ty, row, x);
    }
}

/// [`rows`] for four activation rows at once: formats with a tile kernel unpack each
/// weight block once for all four; the others run [`rows`] four times. Either way
/// each output has the bits [`rows`] would give it.
pub(crate) fn rows4(level: Level, ty: QType, w: &[u8], row_bytes: usize, x: [ActRow; 4], out: [&mut [f32]; 4]) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::simd::{avx2, avx512};
        if let [ActRow::Q8(a), ActRow::Q8(b), ActRow::Q8(c), ActRow::Q8(d)] = x {
            let q = [a, b, c, d];
            macro_rules! pick {
                ($m:ident) => {
                    match ty {
                        QType::Q4_0 => return unsafe { $m::rows4_q4_0(w, row_bytes, &q, out) },
                        QType::Q4_1 => return unsafe { $m::rows4_q4_1(w, row_bytes, &q, out) },
                        QType::Q5_0 => return unsafe { $m::rows4_q5_0(w, row_bytes, &q, out) },
                        QType::Q5_1 => return unsafe { $m::rows4_q5_1(w, row_bytes, &q, out) },
                        QType::Q8_0 => return unsafe { $m::rows4_q8_0(w, row_bytes, &q, out) },
                        QType::Q4K => return unsafe { $m::rows4_q4k(w, row_bytes, &q, out) },
                        QType::Q5K => return unsafe { $m::rows4_q5k(w, row_bytes, &q, out) },
                        QType::Q6K => return unsafe { $m::rows4_q6k(w, row_bytes, &q, out) },
                        _ => {}
                    }
                };
            }
            // SAFETY: as in `rows`.
            match level.0 {
                Tier::Avx512 | Tier::Amx => {
                    // The wide tile (simd/wide.rs) for the signed formats.
                    match ty {
                        QType::Q4_0 => return unsafe { avx512::rows4w_q4_0(w, row_bytes, &q, out) },
                        QType::Q5_0 => return unsafe { avx512::rows4w_q5_0(w, row_bytes, &q, out) },
                        QType::Q8_0 => return unsafe { avx512::rows4w_q8_0(w, row_bytes, &q, out) },
                        _ => pick!(avx512),
                    }
                }
                Tier::Avx2 => pick!(avx2),
                Tier::Scalar => {}
            }
        }
    }
    for (x, out) in x.into_iter().zip(out) {
        rows(level, ty, w, row_bytes, x, out);
    }
}

/// Calls `$f` of the level's module (`simd::avx512`, `simd::avx2`) with `$args`, or
/// `$fallback` at the scalar level.
macro_rules! at_level {
    ($level:expr, $f:ident($($args:expr),*), $fallback:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            use crate::simd::{avx2, avx512};
            // SAFETY: `level` proves the CPU has the features of the module called.
            match $level.0 {
                Tier::Avx512 | Tier::Amx => return unsafe { avx512::$f($($args),*) },
                Tier::Avx2 => return unsafe { avx2::$f($($args),*) },
                Tier::Scalar => {}
            }
        }
        let _ = $level;
        $fallback
    }};
}

/// Whether a prefill rewrites `ty` as Q8_0 ([`expand`]) at `level`.
pub(crate) fn expands_to_q8_0(level: Level, ty: QType) -> bool {
    cfg!(target_arch = "x86_64") && level.0 != Tier::Scalar && matches!(ty, QType::Q4_0 | QType::Q5_0)
}

/// Rewrites whole Q4_0/Q5_0 blocks `src` as Q8_0 blocks `dst` (the same f16 scale,
/// the same integers as signed bytes), or Q4_1/Q5_1 blocks as the tile unit's
/// unsigned blocks (`simd::amx::Form::Unsigned`), at a level above the scalar one.
pub(crate) fn expand(level: Level, ty: QType, src: &[u8], dst: &mut [u8]) {
    at_level!(
        level,
        expand(ty, src, dst),
        unreachable!("blocks are rewritten only above the scalar level")
    )
}

/// One slab of sixteen weight rows times one group of sixteen packed activation
/// rows on the tile unit (`simd::amx::slab`).
#[cfg(target_arch = "x86_64")]
pub(crate) fn tile_slab(
    level: Level,
    form: crate::simd::amx::Form,
    w: &[u8],
    row_bytes: usize,
    x: &crate::simd::amx::Packed,
    group: usize,
    out: &mut [[f32; 16]; 16],
) {
    assert!(level.has_tiles(), "the tile unit at level {}", level.name());
    // SAFETY: the tile level exists only where the CPU has AMX-INT8 and AVX-512 and
    // Linux granted the tile state (`Level::widest`).
    unsafe { crate::simd::amx::slab(form, w, row_bytes, x, group, out) }
}

/// [`crate::ops::attend_many`] compiled for `level`.
pub(crate) fn attend_many<const N: usize>(
    level: Level,
    qs: [&[f32]; N],
    keys: &[f32],
    values: &[f32],
    scale: f32,
    scores: &mut [f32],
    outs: [&mut [f32]; N],
) {
    at_level!(
        level,
        attend_many(qs, keys, values, scale, scores, outs),
        crate::ops::attend_many(qs, keys, values, scale, scores, outs)
    )
}

/// [`crate::ops::silu_mul`] compiled for `level`.
pub(crate) fn silu_mul(level: Level, gate: &[f32], up: &[f32], out: &mut [f32]) {
    at_level!(level, silu_mul(gate, up, out), crate::ops::silu_mul(gate, up, out))
}

/// [`crate::ops::rms_norm`] compiled for `level`.
pub(crate) fn rms_norm(level: Level, x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) {
    at_level!(
        level,
        rms_norm(x, gamma, eps, out),
        crate::ops::rms_norm(x, gamma, eps, out)
    )
}

/// Quantizes `x` into `rows` ([`crate::acts::RowsMut::quantize`]) compiled for `level`.
pub(crate) fn quantize(level: Level, rows: crate::acts::RowsMut<'_>, ty: crate::ActType, x: &[f32]) {
    at_level!(level, quantize(rows, ty, x), rows.quantize(ty, x))
}

#[cfg(test)]
mod tests {
    use half::f16;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::QActs;

    /// Random bytes for `rows` rows of `cols` weights of `ty`, with every scale and
    /// minimum replaced by a finite value of magnitude ≤ 1 (any other bit pattern is a
    /// valid block).
    pub(crate) fn random_blocks(ty: QType, rows: usize, cols: usize, rng: &mut StdRng) -> Vec<u8> {
        let mut raw: Vec<u8> = (0..ty.row_bytes(cols).unwrap() * rows).map(|_| rng.random()).collect();
        let half = |rng: &mut StdRng| f16::from_f32(rng.random_range(-1.0f32..1.0)).to_le_bytes();
        for b in raw.chunks_exact_mut(ty.block_bytes()) {
            match ty {
                QType::Q4_0 | QType::Q5_0 | QType::Q8_0 => b[0..2].copy_from_slice(&half(rng)),
                QType::Q4_1 | QType::Q5_1 | QType::Q4K | QType::Q5K => {
                    b[0..2].copy_from_slice(&half(rng));
                    b[2..4].copy_from_slice(&half(rng));
                }
                QType::Q6K => b[208..210].copy_from_slice(&half(rng)),
                QType::Q8K => b[0..4].copy_from_slice(&rng.random_range(-0.01f32..0.01).to_le_bytes()),
                QType::F16 | QType::BF16 => b.copy_from_slice(&half(rng)),
                QType::F32 => b.copy_from_slice(&rng.random_range(-1.0f32..1.0).to_le_bytes()),
            }
        }
        raw
    }

    /// Every level's kernel against the scalar reference, on random blocks: they may
    /// differ only in the order of summation, so by at most a few ulps of Σ|wᵢ·xᵢ|.
    #[test]
    fn every_level_agrees_with_the_scalar_dot_on_random_blocks() {
        let mut rng = StdRng::seed_from_u64(7);
        let (rows, cols) = (9, 512);
        for ty in QType::ALL {
            for _ in 0..20 {
                let raw = random_blocks(ty, rows, cols, &mut rng);
                let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-3.0f32..3.0)).collect();
                let mut acts = QActs::new();
                acts.quantize(ty.act(), &x, 1, cols).unwrap();
                let rb = ty.row_bytes(cols).unwrap();
                let xq = acts.dequantize_row(0);
                let mut w = vec![0.0; cols];
                let mut want = vec![0.0; rows];
                rows_of(Level::SCALAR, ty, &raw, rb, &acts, &mut want);
                for level in Level::available() {
                    let mut got = vec![0.0; rows];
                    rows_of(level, ty, &raw, rb, &acts, &mut got);
                    for r in 0..rows {
                        crate::dequantize(ty, &raw[r * rb..(r + 1) * rb], &mut w).unwrap();
                        let mass: f64 = w.iter().zip(&xq).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                        let tol = 1e-5 * mass + 1e-6;
                        assert!(
                            ((got[r] - want[r]) as f64).abs() <= tol,
                            "{ty} at {}: row {r}: {} against scalar {} (tolerance {tol})",
                            level.name(),
                            got[r],
                            want[r]
                        );
                    }
                }
            }
        }
    }

    /// The scalar dot is itself the sum of dequantised weights times dequantised
    /// activations (up to f32 rounding).
    #[test]
    fn the_scalar_dot_is_the_dot_of_the_dequantised_rows() {
        let mut rng = StdRng::seed_from_u64(8);
        let cols = 512;
        for ty in QType::ALL {
            let raw = random_blocks(ty, 1, cols, &mut rng);
            let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            let mut acts = QActs::new();
            acts.quantize(ty.act(), &x, 1, cols).unwrap();
            let mut w = vec![0.0; cols];
            crate::dequantize(ty, &raw, &mut w).unwrap();
            let xq = acts.dequantize_row(0);
            let exact: f64 = w.iter().zip(&xq).map(|(a, b)| *a as f64 * *b as f64).sum();
            let mass: f64 = w.iter().zip(&xq).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
            let got = formats::dot_scalar(ty, &raw, acts.row(0)) as f64;
            assert!((got - exact).abs() <= 1e-5 * mass + 1e-6, "{ty}: {got} against {exact}");
        }
    }

    /// A tile of four activation rows gives each output the bits a single row does.
    #[test]
    fn tiles_of_four_rows_equal_single_rows_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(9);
        let (rows_w, cols) = (5, 512);
        for ty in QType::ALL {
            let raw = random_blocks(ty, rows_w, cols, &mut rng);
            let x: Vec<f32> = (0..4 * cols).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            let mut acts = QActs::new();
            acts.quantize(ty.act(), &x, 4, cols).unwrap();
            let rb = ty.row_bytes(cols).unwrap();
            for level in Level::available() {
                let mut tiled = vec![0.0; 4 * rows_w];
                let [a, b, c, d] = {
                    let (ab, cd) = tiled.split_at_mut(2 * rows_w);
                    let (a, b) = ab.split_at_mut(rows_w);
                    let (c, d) = cd.split_at_mut(rows_w);
                    [a, b, c, d]
                };
                rows4(level, ty, &raw, rb, [0, 1, 2, 3].map(|r| acts.row(r)), [a, b, c, d]);
                for r in 0..4 {
                    let mut single = vec![0.0; rows_w];
                    rows(level, ty, &raw, rb, acts.row(r), &mut single);
                    assert_eq!(single, tiled[r * rows_w..(r + 1) * rows_w], "{ty} at {}", level.name());
                }
            }
        }
    }

    /// The f32 operations compiled for each level compute the bits of the plain ones.
    #[test]
    fn attention_gives_the_same_bits_at_every_level() {
        let mut rng = StdRng::seed_from_u64(10);
        let (hd, len) = (64, 77);
        let v = |n: usize, rng: &mut StdRng| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect() };
        let (q, keys, values) = (v(hd, &mut rng), v(hd * len, &mut rng), v(hd * len, &mut rng));
        let mut want = vec![0.0; hd];
        crate::ops::attend(&q, &keys, &values, 0.125, &mut vec![0.0; len], &mut want);
        for level in Level::available() {
            let mut got = vec![0.0; hd];
            attend_many(level, [&q], &keys, &values, 0.125, &mut vec![0.0; len], [&mut got]);
            assert_eq!(got, want, "at {}", level.name());
            // Three heads over the same keys: each gets the bits it gets alone.
            let (q2, q3) = (keys[..hd].to_vec(), values[hd..2 * hd].to_vec());
            let (mut a, mut b, mut c) = (vec![0.0; hd], vec![0.0; hd], vec![0.0; hd]);
            let mut scores = vec![0.0; 3 * len];
            attend_many(
                level,
                [&q, &q2, &q3],
                &keys,
                &values,
                0.125,
                &mut scores,
                [&mut a, &mut b, &mut c],
            );
            for (qi, got) in [(&q, &a), (&q2, &b), (&q3, &c)] {
                let mut alone = vec![0.0; hd];
                crate::ops::attend(qi, &keys, &values, 0.125, &mut vec![0.0; len], &mut alone);
                assert_eq!(got, &alone, "a head of three at {}", level.name());
            }
        }
    }

    fn rows_of(level: Level, ty: QType, raw: &[u8], rb: usize, acts: &QActs, out: &mut [f32]) {
        rows(level, ty, raw, rb, acts.row(0), out);
    }
}
