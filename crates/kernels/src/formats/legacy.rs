//! ggml's 32-weight blocks: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0.
//!
//! | type | bytes | layout | weight i |
//! |---|---|---|---|
//! | Q4_0 | 18 | d f16, qs[16] | i<16: `(qs[i]&15) − 8`, i≥16: `(qs[i−16]>>4) − 8`; × d |
//! | Q4_1 | 20 | d f16, m f16, qs[16] | nibble as Q4_0 without −8; × d + m |
//! | Q5_0 | 22 | d f16, qh u32, qs[16] | nibble \| bit i of qh << 4, − 16; × d |
//! | Q5_1 | 24 | d f16, m f16, qh u32, qs[16] | 5-bit value as Q5_0 without −16; × d + m |
//! | Q8_0 | 34 | d f16, qs[32] i8 | qs[i] × d |
//!
//! Each format has a dequantiser, the scalar dot product with its activation format
//! (the reference every SIMD kernel is tested against) and the reference quantizer
//! of ggml's `quantize_row_*_ref`, used to make test and timing weights.

use half::f16;

use crate::acts::Q8Row;

pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn put_f16(out: &mut Vec<u8>, v: f32) {
    out.extend(f16::from_f32(v).to_le_bytes());
}

/// The 32 unsigned integers of a block's nibbles, element order.
fn nibbles(qs: &[u8]) -> [u8; 32] {
    let mut q = [0u8; 32];
    for (j, &b) in qs.iter().enumerate() {
        q[j] = b & 0x0F;
        q[j + 16] = b >> 4;
    }
    q
}

/// The 32 unsigned 5-bit integers of a Q5 block: nibbles plus bit i of `qh`.
fn fives(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut q = nibbles(qs);
    for (i, v) in q.iter_mut().enumerate() {
        *v |= (((qh >> i) & 1) as u8) << 4;
    }
    q
}

/// The block's (scale, minimum, unsigned integers, integer offset): weight i is
/// `(q[i] − offset)·d + m`.
fn unpack(ty: Legacy, b: &[u8]) -> (f32, f32, [u8; 32], i32) {
    match ty {
        Legacy::Q4_0 => (f16_at(b, 0), 0.0, nibbles(&b[2..18]), 8),
        Legacy::Q4_1 => (f16_at(b, 0), f16_at(b, 2), nibbles(&b[4..20]), 0),
        Legacy::Q5_0 => (f16_at(b, 0), 0.0, fives(u32_at(b, 2), &b[6..22]), 16),
        Legacy::Q5_1 => (f16_at(b, 0), f16_at(b, 2), fives(u32_at(b, 4), &b[8..24]), 0),
        Legacy::Q8_0 => {
            // Signed bytes shifted by 128 to share the unsigned form; offset restores them.
            let mut q = [0u8; 32];
            for (v, &s) in q.iter_mut().zip(&b[2..34]) {
                *v = (s as i8 as i32 + 128) as u8;
            }
            (f16_at(b, 0), 0.0, q, 128)
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The five legacy formats, for code shared between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Legacy {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
}

impl Legacy {
    pub(crate) fn bytes(self) -> usize {
        match self {
            Legacy::Q4_0 => 18,
            Legacy::Q4_1 => 20,
            Legacy::Q5_0 => 22,
            Legacy::Q5_1 => 24,
            Legacy::Q8_0 => 34,
        }
    }

    /// Whether its activations carry block sums (Q8_1), which the minimum multiplies.
    pub(crate) fn has_min(self) -> bool {
        matches!(self, Legacy::Q4_1 | Legacy::Q5_1)
    }
}

/// Dequantises whole blocks `raw` into `out` (32 values per block).
pub(crate) fn dequantize(ty: Legacy, raw: &[u8], out: &mut [f32]) {
    for (b, o) in raw.chunks_exact(ty.bytes()).zip(out.chunks_exact_mut(32)) {
        let (d, m, q, offset) = unpack(ty, b);
        for (v, &q) in o.iter_mut().zip(&q) {
            *v = (q as i32 - offset) as f32 * d + m;
        }
    }
}

/// Σ wᵢ·xᵢ of a weight row and a Q8_0 (no minimum) or Q8_1 row, block by block:
/// `d_w·d_x·Σ (q − offset)·y + m_w·s_x`.
pub(crate) fn dot(ty: Legacy, w: &[u8], x: &Q8Row) -> f32 {
    let mut sum = 0.0f32;
    for (k, b) in w.chunks_exact(ty.bytes()).enumerate() {
        let (d, m, q, offset) = unpack(ty, b);
        let y = &x.qs[32 * k..32 * k + 32];
        let dot: i32 = q.iter().zip(y).map(|(&q, &y)| (q as i32 - offset) * y as i32).sum();
        sum += d * x.d[k] * dot as f32;
        if ty.has_min() {
            sum += m * x.sums[k];
        }
    }
    sum
}

/// The tile unit's formula (`simd::amx`) for one weight row and one Q8_0/Q8_1 row:
/// one integer sum per block, `acc += (d_w·d_x)·Σ(q − offset)·y` with a fused
/// multiply-add block by block, and the minimum's `Σ m_w·s_x` in a sum of its own
/// added at the end.
#[cfg(test)]
pub(crate) fn tile_dot(ty: Legacy, w: &[u8], x: &Q8Row) -> f32 {
    let (mut acc, mut mins) = (0f32, 0f32);
    for (k, b) in w.chunks_exact(ty.bytes()).enumerate() {
        let (d, m, q, offset) = unpack(ty, b);
        let y = &x.qs[32 * k..32 * k + 32];
        let dot: i32 = q.iter().zip(y).map(|(&q, &y)| (q as i32 - offset) * y as i32).sum();
        acc = (d * x.d[k]).mul_add(dot as f32, acc);
        if ty.has_min() {
            mins = m.mul_add(x.sums[k], mins);
        }
    }
    if ty.has_min() { acc + mins } else { acc }
}

/// ggml's reference quantizer of each format (`quantize_row_*_ref`), appending whole
/// blocks of `x` (a multiple of 32 values) to `out`.
pub(crate) fn quantize(ty: Legacy, x: &[f32], out: &mut Vec<u8>) {
    for x in x.chunks_exact(32) {
        match ty {
            Legacy::Q4_0 | Legacy::Q5_0 => {
                // The value of largest magnitude maps to the most negative integer.
                let max = x.iter().fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let (levels, top) = if ty == Legacy::Q4_0 { (-8.0, 15) } else { (-16.0, 31) };
                let d = max / levels;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q: Vec<u8> = x
                    .iter()
                    .map(|v| ((v * id - levels + 0.5) as i8).min(top) as u8)
                    .collect();
                put_f16(out, d);
                pack(ty == Legacy::Q5_0, &q, out);
            }
            Legacy::Q4_1 | Legacy::Q5_1 => {
                let min = x.iter().copied().fold(f32::INFINITY, f32::min);
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let top = if ty == Legacy::Q4_1 { 15u8 } else { 31 };
                let d = (max - min) / top as f32;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let q: Vec<u8> = x.iter().map(|v| (((v - min) * id + 0.5) as u8).min(top)).collect();
                put_f16(out, d);
                put_f16(out, min);
                pack(ty == Legacy::Q5_1, &q, out);
            }
            Legacy::Q8_0 => {
                let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                put_f16(out, d);
                out.extend(x.iter().map(|v| (v * id).round_ties_even() as i8 as u8));
            }
        }
    }
}

/// Packs 32 unsigned integers as nibbles (and, for five bits, the `qh` word first).
fn pack(five: bool, q: &[u8], out: &mut Vec<u8>) {
    if five {
        let qh = q
            .iter()
            .enumerate()
            .fold(0u32, |h, (i, &v)| h | (((v >> 4) as u32 & 1) << i));
        out.extend(qh.to_le_bytes());
    }
    out.extend((0..16).map(|j| (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_low_nibbles_first_then_high() {
        let mut block = Vec::new();
        put_f16(&mut block, 1.0);
        put_f16(&mut block, 0.5);
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut v = [0.0; 32];
        dequantize(Legacy::Q4_1, &block, &mut v);
        let expect: Vec<f32> = (0..16)
            .map(|j| j as f32 + 0.5)
            .chain((0..16).map(|j| 15.5 - j as f32))
            .collect();
        assert_eq!(v.to_vec(), expect);
    }

    /// The first block of SmolLM2's `blk.0.attn_q.weight`, checked against gguf-py's
    /// dequantiser.
    #[test]
    fn q4_1_matches_llama_cpp_on_a_real_block() {
        let hex = "0f30d8b9458765406f65164b677664502267655a";
        let raw: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let mut v = [0.0; 32];
        dequantize(Legacy::Q4_1, &raw, &mut v);
        let expect = [
            -0.096313, 0.157349, -0.096313, -0.730469, 1.171997, -0.096313, 0.030518, 0.664673,
        ];
        for (a, b) in v.iter().zip(expect) {
            assert!((a - b).abs() < 1e-5, "{v:?}");
        }
        assert!((v[31] - -0.096313).abs() < 1e-5);
    }

    #[test]
    fn q8_0_and_q4_0_and_q5_scale_their_integers() {
        let mut v = [0.0; 32];
        let mut block = f16::from_f32(0.25).to_le_bytes().to_vec();
        block.extend((0..32).map(|j| (j as i8 - 16) as u8));
        dequantize(Legacy::Q8_0, &block, &mut v);
        assert_eq!(v.to_vec(), (0..32).map(|j| (j - 16) as f32 * 0.25).collect::<Vec<_>>());
        let mut block = f16::from_f32(2.0).to_le_bytes().to_vec();
        block.extend([0x8Fu8; 16]);
        dequantize(Legacy::Q4_0, &block, &mut v);
        assert!(v[..16].iter().all(|&x| x == 14.0) && v[16..].iter().all(|&x| x == 0.0));
        // Q5_0: the fifth bit of element j is bit j of qh (low half), j+16 (high half).
        let mut block = f16::from_f32(1.0).to_le_bytes().to_vec();
        block.extend(0x0001_0001u32.to_le_bytes());
        block.extend([0u8; 16]);
        dequantize(Legacy::Q5_0, &block, &mut v);
        assert_eq!((v[0], v[1], v[16], v[17]), (0.0, -16.0, 0.0, -16.0));
        // Q5_1: the same bits, plus the minimum.
        let mut block = f16::from_f32(0.5).to_le_bytes().to_vec();
        put_f16(&mut block, -1.0);
        block.extend(0x8000_0000u32.to_le_bytes());
        block.extend([0xF0u8; 16]);
        dequantize(Legacy::Q5_1, &block, &mut v);
        assert_eq!((v[0], v[16], v[31]), (-1.0, 6.5, 14.5));
    }

    #[test]
    fn quantizers_reproduce_their_grid_values() {
        for ty in [Legacy::Q4_0, Legacy::Q4_1, Legacy::Q5_0, Legacy::Q5_1, Legacy::Q8_0] {
            let x: Vec<f32> = (0..64).map(|i| ((i * 37 % 64) as f32 - 30.0) / 8.0).collect();
            let mut raw = Vec::new();
            quantize(ty, &x, &mut raw);
            assert_eq!(raw.len(), 2 * ty.bytes());
            let mut back = vec![0.0; 64];
            dequantize(ty, &raw, &mut back);
            // Half a step of the block's range (≈ 7.9), a little more where Q4_0/Q5_0
            // clip the end opposite their largest magnitude.
            let step = match ty {
                Legacy::Q4_0 | Legacy::Q4_1 => 0.3,
                Legacy::Q5_0 | Legacy::Q5_1 => 0.15,
                Legacy::Q8_0 => 0.02,
            };
            for (a, b) in x.iter().zip(&back) {
                assert!((a - b).abs() <= step, "{ty:?}: {a} came back as {b}");
            }
        }
    }
}
