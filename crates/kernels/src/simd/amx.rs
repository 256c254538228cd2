//! A prompt's products on Intel's tile unit (AMX-INT8, Sapphire Rapids and later):
//! sixteen weight rows × sixteen activation rows × one block of 32 in one
//! instruction.
//!
//! ## Design
//! `tdpbssd` (signed × signed) and `tdpbusd` (unsigned × signed) multiply a tile A
//! of 16 rows × 32 bytes by a tile B of 8 rows × 64 bytes into a tile C of 16 × 16
//! exact `i32` sums:
//! - A holds one block of sixteen weight rows, loaded straight from the matrix with
//!   the row length as the stride: Q8_0 as the file has it (its integers start two
//!   bytes into each block), Q4_0/Q5_0 rewritten as Q8_0 and Q4_1/Q5_1 as [`Form::
//!   Unsigned`] blocks once per call (`crate::tiles`).
//! - B holds the same block of sixteen activation rows in the layout the
//!   instruction reads (four consecutive bytes of a row side by side, row after row:
//!   [`Packed`]), packed once per call.
//! - C's 256 sums are stored and scaled in AVX-512 registers:
//!   `acc += (d_w·d_x)·Σ q·y` block by block, and for the unsigned form
//!   `+ Σ m_w·s_x` summed on its own and added at the end.
//!
//! Every output is therefore one integer sum per block accumulated in block order:
//! it does not depend on which rows share its tiles or which thread ran them. It is
//! not the row-at-a-time dot's bits (the dot converts eight partial sums per block),
//! so the tile is used for a prompt's products only (`Kernels::for_prompt`): decode
//! steps keep the dot, and a prompt's rows all go through the tile whatever their
//! number. `formats::legacy::tile_dot` is the formula in plain Rust, which the
//! tests hold the tile to bit for bit.
//!
//! Linux gives a process the tile registers' state only when it asks
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, once, for all its threads): [`granted`] asks,
//! and the tile level exists only where the answer is yes. Each call configures the
//! tiles (`ldtilecfg`) and releases them after (`tilerelease`), so no thread keeps
//! tile state between calls. The instructions are written as inline assembly (their
//! intrinsics are not stable Rust), which is why this module allows `unsafe`; each
//! block says what makes it sound.
#![allow(unsafe_code)]

use std::arch::asm;
use std::arch::x86_64::*;

use bytemuck::cast;

use crate::QActs;
use crate::acts::ActRow;

/// Rows of a tile: weight rows per slab, activation rows per group.
pub(crate) const TILE: usize = 16;

/// How a weight block is laid out for tile A.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// Q8_0 blocks: an f16 scale, then 32 signed bytes.
    Signed,
    /// Q4_1/Q5_1 rewritten: an f16 scale, an f16 minimum, then 32 unsigned bytes.
    Unsigned,
}

impl Form {
    /// Bytes of one block.
    pub(crate) const fn block_bytes(self) -> usize {
        match self {
            Form::Signed => 34,
            Form::Unsigned => 36,
        }
    }

    /// Where a block's integers start.
    const fn quants(self) -> usize {
        match self {
            Form::Signed => 2,
            Form::Unsigned => 4,
        }
    }
}

/// Whether this CPU has AMX-INT8 and the kernel lets this process use the tiles.
pub(crate) fn granted() -> bool {
    static GRANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GRANTED.get_or_init(|| has_amx_int8() && request_tile_state())
}

/// CPUID leaf 7: AMX-TILE (EDX bit 24) and AMX-INT8 (bit 25).
fn has_amx_int8() -> bool {
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86_64 CPU; leaf 7 is read only if leaf 0 says it exists.
    let (max, leaf7) = unsafe { (__cpuid(0).eax, __cpuid_count(7, 0)) };
    max >= 7 && leaf7.edx & (1 << 24) != 0 && leaf7.edx & (1 << 25) != 0
}

/// Asks Linux for the tile data state (`ARCH_REQ_XCOMP_PERM`, `XFEATURE_XTILEDATA`).
#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: u64 = 0x1023;
    const XFEATURE_XTILEDATA: u64 = 18;
    let ret: i64;
    // SAFETY: arch_prctl with this request only changes which state the kernel saves
    // for the process; it reads and writes no memory of ours. `syscall` clobbers rcx
    // and r11, which are declared.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// A prompt's activations packed for tile B: for each group of sixteen rows and
/// each block, the tile (8 rows × 64 bytes), the sixteen rows' scales and, for
/// Q8_1 activations, their block sums. Rows past the last are zero.
#[derive(Debug, Default)]
pub(crate) struct Packed {
    blocks: usize,
    groups: usize,
    tiles: Vec<[u8; 512]>,
    d: Vec<[f32; TILE]>,
    sums: Vec<[f32; TILE]>,
}

impl Packed {
    /// Packs `x` (Q8_0 or Q8_1 rows), replacing what was held; keeps the memory.
    pub(crate) fn pack(&mut self, x: &QActs) {
        self.blocks = x.cols() / 32;
        self.groups = x.rows().div_ceil(TILE);
        let n = self.groups * self.blocks;
        self.tiles.clear();
        self.tiles.resize(n, [0; 512]);
        self.d.clear();
        self.d.resize(n, [0.0; TILE]);
        self.sums.clear();
        self.sums.resize(n, [0.0; TILE]);
        for r in 0..x.rows() {
            let ActRow::Q8(row) = x.row(r) else {
                unreachable!("the tile takes Q8 activations only")
            };
            let (g, j) = (r / TILE, r % TILE);
            let qs: &[u8] = bytemuck::cast_slice(row.qs);
            for k in 0..self.blocks {
                let at = g * self.blocks + k;
                let (tile, q) = (&mut self.tiles[at], &qs[32 * k..32 * k + 32]);
                // Row kk of the tile holds bytes 4kk..4kk + 4 of all sixteen rows.
                for kk in 0..8 {
                    tile[kk * 64 + j * 4..kk * 64 + j * 4 + 4].copy_from_slice(&q[4 * kk..4 * kk + 4]);
                }
                self.d[at][j] = row.d[k];
                if !row.sums.is_empty() {
                    self.sums[at][j] = row.sums[k];
                }
            }
        }
    }

    /// Groups of sixteen rows.
    pub(crate) fn groups(&self) -> usize {
        self.groups
    }
}

/// The tiles' shapes, as `ldtilecfg` reads them: palette 1; tiles 0 and 1 are C
/// (16 rows × 64 bytes), 2 and 3 are A (16 × 32), 4 and 5 are B (8 × 64).
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    fn new() -> Config {
        let mut c = [0u8; 64];
        c[0] = 1;
        for (t, rows, bytes) in [
            (0, 16, 64u16),
            (1, 16, 64),
            (2, 16, 32),
            (3, 16, 32),
            (4, 8, 64),
            (5, 8, 64),
        ] {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&bytes.to_le_bytes());
            c[48 + t] = rows;
        }
        Config(c)
    }
}

/// One block's sums into `c` (16 × 16 `i32`): tile `$c` zeroed, A from `$a` with
/// stride `$rs`, B from `$b`, multiplied by `$op`, stored.
macro_rules! block_product {
    ($op:literal, $c:literal, $a:literal, $b:literal, $wp:expr, $rs:expr, $bp:expr, $cp:expr) => {
        asm!(
            concat!("tilezero ", $c),
            concat!("tileloadd ", $a, ", [{a} + {rs}*1]"),
            concat!("tileloadd ", $b, ", [{b} + {s64}*1]"),
            concat!($op, " ", $c, ", ", $a, ", ", $b),
            concat!("tilestored [{c} + {s64}*1], ", $c),
            a = in(reg) $wp,
            rs = in(reg) $rs,
            b = in(reg) $bp,
            s64 = in(reg) 64usize,
            c = in(reg) $cp,
            options(nostack),
        )
    };
}

/// `out[i][j]`: weight row `i` of the sixteen in `w` (`row_bytes` each, blocks of
/// `form`) times activation row `j` of group `g` of `x`, by the formula of
/// `formats::legacy::tile_dot`.
/// Pad rows (zero scales) give zeros.
///
/// # Safety
/// The CPU must have AMX-INT8, AVX-512F and F16C, and [`granted`] must have said yes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,avx2,fma")]
pub(crate) unsafe fn slab(form: Form, w: &[u8], row_bytes: usize, x: &Packed, g: usize, out: &mut [[f32; TILE]; TILE]) {
    let (blocks, bb) = (x.blocks, form.block_bytes());
    assert!(g < x.groups, "group {g} of {}", x.groups);
    assert!(
        row_bytes == blocks * bb && w.len() >= TILE * row_bytes,
        "a slab of {TILE} rows of {blocks} blocks"
    );
    let tiles = &x.tiles[g * blocks..(g + 1) * blocks];
    let ds = &x.d[g * blocks..(g + 1) * blocks];
    let config = Config::new();
    // SAFETY: the tile state was granted (the caller's promise); the configuration is
    // 64 bytes that live through the call.
    unsafe { asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly)) };
    let mut c = [[[0i32; TILE]; TILE]; 2];
    let mut acc = [_mm512_setzero_ps(); TILE];
    for k in 0..blocks {
        let wp = w[k * bb + form.quants()..].as_ptr();
        let (bp, cp) = (tiles[k].as_ptr(), c[k & 1].as_mut_ptr().cast::<u8>());
        // SAFETY: A reads 16 rows of 32 bytes at `wp + i·row_bytes`, inside `w` (the
        // assert above: block k's integers end by `(k + 1)·bb ≤ row_bytes` into each of
        // 16 rows); B reads the 512 bytes of `tiles[k]`; C writes the 1 KB of `c[k & 1]`.
        // Alternate C and A/B tiles let block k + 1's product start while block k's
        // sums are scaled.
        unsafe {
            match (form, k & 1) {
                (Form::Signed, 0) => block_product!("tdpbssd", "tmm0", "tmm2", "tmm4", wp, row_bytes, bp, cp),
                (Form::Signed, _) => block_product!("tdpbssd", "tmm1", "tmm3", "tmm5", wp, row_bytes, bp, cp),
                (Form::Unsigned, 0) => block_product!("tdpbusd", "tmm0", "tmm2", "tmm4", wp, row_bytes, bp, cp),
                (Form::Unsigned, _) => block_product!("tdpbusd", "tmm1", "tmm3", "tmm5", wp, row_bytes, bp, cp),
            }
        }
        let halves: [u16; TILE] = std::array::from_fn(|i| {
            let at = i * row_bytes + k * bb;
            u16::from_le_bytes([w[at], w[at + 1]])
        });
        let dw: [f32; TILE] = cast(_mm512_cvtph_ps(cast::<[u16; TILE], __m256i>(halves)));
        let dx: __m512 = cast(ds[k]);
        let sums = &c[k & 1];
        for i in 0..TILE {
            let s = _mm512_cvtepi32_ps(cast::<[i32; TILE], __m512i>(sums[i]));
            acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(dw[i]), dx), s, acc[i]);
        }
    }
    // SAFETY: releases the tiles this call configured; touches no memory.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
    if form == Form::Unsigned {
        let sx = &x.sums[g * blocks..(g + 1) * blocks];
        for (i, acc) in acc.iter_mut().enumerate() {
            let mut mins = _mm512_setzero_ps();
            for (k, sx) in sx.iter().enumerate() {
                let at = i * row_bytes + k * bb + 2;
                let m = half::f16::from_le_bytes([w[at], w[at + 1]]).to_f32();
                mins = _mm512_fmadd_ps(_mm512_set1_ps(m), cast(*sx), mins);
            }
            *acc = _mm512_add_ps(*acc, mins);
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = cast(a);
    }
}
