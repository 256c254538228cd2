//! ggml's K-quants: super-blocks of 256 weights with per-sub-block scales.
//!
//! - **Q4_K** (144 B): `d f16, dmin f16, scales[12], qs[128]`. Eight sub-blocks of 32,
//!   each a 6-bit scale `sc` and 6-bit minimum `m` packed in `scales` (see
//!   [`scale_min`]); `x = d·sc·q − dmin·m`. Quants run in four chunks of 64: byte
//!   `qs[32c + l]` holds element `64c + l` in its low nibble and `64c + 32 + l` in its
//!   high nibble.
//! - **Q5_K** (176 B): `d, dmin, scales[12], qh[32], qs[128]`: Q4_K plus a fifth bit,
//!   bit `2c` of `qh[l]` for element `64c + l` and bit `2c + 1` for `64c + 32 + l`.
//! - **Q6_K** (210 B): `ql[128], qh[64], scales[16] i8, d f16`. Sixteen sub-blocks of 16,
//!   `x = d·scales[i/16]·(e − 32)` with `e` six bits spread over `ql` and `qh`.
//! - **Q8_K** (292 B): `d f32, qs[256] i8, bsums[16] i16` — ggml's activation format
//!   for all three; read as a weight format for completeness.
//!
//! As in `legacy`, each has a dequantiser, its scalar dot with Q8_K activations and a
//! quantizer. The quantizers here are plain min/max ones (ggml's search for the
//! best scales is not needed for test and timing weights); files from llama.cpp
//! decode the same whichever quantizer made them.

use half::f16;

use super::legacy::f16_at;
use crate::acts::Q8Row;

/// Sub-block `j`'s (scale, minimum) from the 12 packed bytes (ggml's `get_scale_min_k4`):
/// the first four sub-blocks keep six bits in bytes `j` and `j + 4`; the last four
/// keep their low four bits in byte `j + 4` and their top two in the spare top bits of
/// bytes `j − 4` and `j`.
pub(crate) fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// All eight (scales, minimums) of the 12 packed bytes at once — [`scale_min`] for
/// every `j`, in a few 32-bit operations (ggml's `kmask` unpacking): the kernels
/// decode one per super-block.
#[inline(always)]
pub(crate) fn scales_mins8(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (a, b, c) = (word(0), word(1), word(2));
    let scales_lo = a & LOW6;
    let scales_hi = (c & LOW4) | (((a >> 6) & LOW2) << 4);
    let mins_lo = b & LOW6;
    let mins_hi = ((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4);
    let join = |lo: u32, hi: u32| {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&lo.to_le_bytes());
        out[4..].copy_from_slice(&hi.to_le_bytes());
        out
    };
    (join(scales_lo, scales_hi), join(mins_lo, mins_hi))
}

/// A Q4_K or Q5_K super-block as (d, dmin, scales, minimums, unsigned integers).
fn unpack_45(b: &[u8], five: bool) -> (f32, f32, [u8; 8], [u8; 8], [u8; 256]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        (sc[j], m[j]) = scale_min(j, scales);
    }
    let (qh, qs) = if five {
        (&b[16..48], &b[48..176])
    } else {
        (&b[0..0], &b[16..144])
    };
    let mut q = [0u8; 256];
    for c in 0..4 {
        for l in 0..32 {
            let byte = qs[32 * c + l];
            q[64 * c + l] = byte & 0x0F;
            q[64 * c + 32 + l] = byte >> 4;
            if five {
                q[64 * c + l] |= ((qh[l] >> (2 * c)) & 1) << 4;
                q[64 * c + 32 + l] |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
            }
        }
    }
    (d, dmin, sc, m, q)
}

/// A Q6_K super-block as (d, sixteen signed scales, integers already minus 32).
fn unpack_6(b: &[u8]) -> (f32, [i8; 16], [i8; 256]) {
    let (ql, qh) = (&b[0..128], &b[128..192]);
    let mut sc = [0i8; 16];
    for (s, &byte) in sc.iter_mut().zip(&b[192..208]) {
        *s = byte as i8;
    }
    let mut e = [0i8; 256];
    for n in 0..2 {
        let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
        for l in 0..32 {
            let at = 128 * n + l;
            e[at] = ((ql[l] & 15) | ((qh[l] & 3) << 4)) as i8 - 32;
            e[at + 32] = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            e[at + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            e[at + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    (f16_at(b, 208), sc, e)
}

/// A Q8_K super-block's (d, integers).
fn unpack_8(b: &[u8]) -> (f32, [i8; 256]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let mut q = [0i8; 256];
    for (v, &byte) in q.iter_mut().zip(&b[4..260]) {
        *v = byte as i8;
    }
    (d, q)
}

/// The four K formats, for code shared between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KQuant {
    Q4K,
    Q5K,
    Q6K,
    Q8K,
}

impl KQuant {
    pub(crate) fn bytes(self) -> usize {
        match self {
            KQuant::Q4K => 144,
            KQuant::Q5K => 176,
            KQuant::Q6K => 210,
            KQuant::Q8K => 292,
        }
    }
}

/// Dequantises whole super-blocks `raw` into `out` (256 values per block).
pub(crate) fn dequantize(ty: KQuant, raw: &[u8], out: &mut [f32]) {
    for (b, o) in raw.chunks_exact(ty.bytes()).zip(out.chunks_exact_mut(256)) {
        match ty {
            KQuant::Q4K | KQuant::Q5K => {
                let (d, dmin, sc, m, q) = unpack_45(b, ty == KQuant::Q5K);
                for (i, v) in o.iter_mut().enumerate() {
                    let j = i / 32;
                    *v = d * sc[j] as f32 * q[i] as f32 - dmin * m[j] as f32;
                }
            }
            KQuant::Q6K => {
                let (d, sc, e) = unpack_6(b);
                for (i, v) in o.iter_mut().enumerate() {
                    *v = d * sc[i / 16] as f32 * e[i] as f32;
                }
            }
            KQuant::Q8K => {
                let (d, q) = unpack_8(b);
                for (v, &q) in o.iter_mut().zip(&q) {
                    *v = d * q as f32;
                }
            }
        }
    }
}

/// Σ wᵢ·xᵢ of a weight row and a Q8_K row, super-block by super-block.
pub(crate) fn dot(ty: KQuant, w: &[u8], x: &Q8Row) -> f32 {
    let mut sum = 0.0f32;
    for (k, b) in w.chunks_exact(ty.bytes()).enumerate() {
        let y = &x.qs[256 * k..256 * k + 256];
        let dx = x.d[k];
        match ty {
            KQuant::Q4K | KQuant::Q5K => {
                let (d, dmin, sc, m, q) = unpack_45(b, ty == KQuant::Q5K);
                let bsums = &x.bsums[16 * k..16 * k + 16];
                let (mut sumi, mut summ) = (0i32, 0i32);
                for j in 0..8 {
                    let part: i32 = (32 * j..32 * j + 32).map(|i| q[i] as i32 * y[i] as i32).sum();
                    sumi += sc[j] as i32 * part;
                    summ += m[j] as i32 * (bsums[2 * j] as i32 + bsums[2 * j + 1] as i32);
                }
                sum += d * dx * sumi as f32 - dmin * dx * summ as f32;
            }
            KQuant::Q6K => {
                let (d, sc, e) = unpack_6(b);
                let sumi: i32 = (0..16)
                    .map(|s| {
                        let part: i32 = (16 * s..16 * s + 16).map(|i| e[i] as i32 * y[i] as i32).sum();
                        sc[s] as i32 * part
                    })
                    .sum();
                sum += d * dx * sumi as f32;
            }
            KQuant::Q8K => {
                let (d, q) = unpack_8(b);
                let sumi: i32 = q.iter().zip(y).map(|(&q, &y)| q as i32 * y as i32).sum();
                sum += d * dx * sumi as f32;
            }
        }
    }
    sum
}

/// Appends whole super-blocks of `x` (a multiple of 256 values) quantized to `ty`.
pub(crate) fn quantize(ty: KQuant, x: &[f32], out: &mut Vec<u8>) {
    for x in x.chunks_exact(256) {
        match ty {
            KQuant::Q4K | KQuant::Q5K => quantize_45(x, ty == KQuant::Q5K, out),
            KQuant::Q6K => quantize_6(x, out),
            KQuant::Q8K => {
                let (mut qs, mut d, mut bsums) = ([0i8; 256], [0f32; 1], [0i16; 16]);
                super::q8::quantize_q8k(x, &mut qs, &mut d, &mut bsums);
                out.extend(d[0].to_le_bytes());
                out.extend(qs.iter().map(|&q| q as u8));
                for s in bsums {
                    out.extend(s.to_le_bytes());
                }
            }
        }
    }
}

fn quantize_45(x: &[f32], five: bool, out: &mut Vec<u8>) {
    let top = if five { 31.0 } else { 15.0 };
    // Each sub-block: x ≈ scale·q − min with min ≥ 0 (the format subtracts it).
    let mut scale = [0f32; 8];
    let mut min = [0f32; 8];
    for j in 0..8 {
        let s = &x[32 * j..32 * j + 32];
        let lo = s.iter().copied().fold(0.0f32, f32::min);
        let hi = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        scale[j] = (hi - lo) / top;
        min[j] = -lo;
    }
    let d = scale.iter().copied().fold(0.0, f32::max) / 63.0;
    let dmin = min.iter().copied().fold(0.0, f32::max) / 63.0;
    // The stored f16 values are what dequantisation uses, so integers are fitted to them.
    let (d16, dmin16) = (f16::from_f32(d).to_f32(), f16::from_f32(dmin).to_f32());
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        sc[j] = if d16 > 0.0 {
            (scale[j] / d16).round().min(63.0) as u8
        } else {
            0
        };
        m[j] = if dmin16 > 0.0 {
            (min[j] / dmin16).round().min(63.0) as u8
        } else {
            0
        };
    }
    let mut q = [0u8; 256];
    for (i, v) in q.iter_mut().enumerate() {
        let j = i / 32;
        let step = d16 * sc[j] as f32;
        if step > 0.0 {
            *v = ((x[i] + dmin16 * m[j] as f32) / step).round().clamp(0.0, top) as u8;
        }
    }
    out.extend(f16::from_f32(d).to_le_bytes());
    out.extend(f16::from_f32(dmin).to_le_bytes());
    let mut packed = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            packed[j] = sc[j];
            packed[j + 4] = m[j];
        } else {
            packed[j + 4] = (sc[j] & 0x0F) | ((m[j] & 0x0F) << 4);
            packed[j - 4] |= (sc[j] >> 4) << 6;
            packed[j] |= (m[j] >> 4) << 6;
        }
    }
    out.extend(packed);
    if five {
        let mut qh = [0u8; 32];
        for c in 0..4 {
            for (l, h) in qh.iter_mut().enumerate() {
                *h |= ((q[64 * c + l] >> 4) & 1) << (2 * c);
                *h |= ((q[64 * c + 32 + l] >> 4) & 1) << (2 * c + 1);
            }
        }
        out.extend(qh);
    }
    for c in 0..4 {
        out.extend((0..32).map(|l| (q[64 * c + l] & 0x0F) | ((q[64 * c + 32 + l] & 0x0F) << 4)));
    }
}

fn quantize_6(x: &[f32], out: &mut Vec<u8>) {
    // Sub-block scales (x ≈ scale·e, e in −32..=31) then an i8 of each under one d.
    let scale: Vec<f32> = x
        .chunks_exact(16)
        .map(|s| {
            let max = s.iter().fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            max / -32.0
        })
        .collect();
    let amax = scale.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let d16 = f16::from_f32(d).to_f32();
    let sc: Vec<i8> = scale
        .iter()
        .map(|&s| {
            if d16 > 0.0 {
                (s / d16).round().clamp(-127.0, 127.0) as i8
            } else {
                0
            }
        })
        .collect();
    let mut e = [32u8; 256];
    for (i, v) in e.iter_mut().enumerate() {
        let step = d16 * sc[i / 16] as f32;
        if step != 0.0 {
            *v = ((x[i] / step).round().clamp(-32.0, 31.0) + 32.0) as u8;
        }
    }
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for n in 0..2 {
        for l in 0..32 {
            let at = 128 * n + l;
            let (q1, q2, q3, q4) = (e[at], e[at + 32], e[at + 64], e[at + 96]);
            ql[64 * n + l] = (q1 & 15) | ((q3 & 15) << 4);
            ql[64 * n + l + 32] = (q2 & 15) | ((q4 & 15) << 4);
            qh[32 * n + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend(f16::from_f32(d).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_eight_scales_and_minimums_at_once_are_each_one_decoded() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let s: [u8; 12] = std::array::from_fn(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            });
            let (sc, m) = scales_mins8(&s);
            for j in 0..8 {
                assert_eq!((sc[j], m[j]), scale_min(j, &s), "sub-block {j} of {s:?}");
            }
        }
    }

    /// The packing rule of `get_scale_min_k4`, byte by byte: sub-block 5's scale is
    /// the low nibble of byte 9 plus the top two bits of byte 1.
    #[test]
    fn scales_of_the_last_four_sub_blocks_borrow_top_bits() {
        let mut s = [0u8; 12];
        s[1] = 0b10_000011; // sub-block 1's scale 3, top bits 0b10 for sub-block 5's scale
        s[5] = 0b01_000111; // sub-block 1's min 7, top bits 0b01 for sub-block 5's min
        s[9] = 0xA4; // sub-block 5: scale low nibble 4, min low nibble 10
        assert_eq!(scale_min(1, &s), (3, 7));
        assert_eq!(scale_min(5, &s), (0b10_0100, 0b01_1010));
    }

    #[test]
    fn q6_k_quarters_come_from_ql_nibbles_and_qh_pairs() {
        let mut b = vec![0u8; 210];
        b[0] = 0x21; // ql[0]: element 0 low nibble 1, element 64 low nibble 2
        b[128] = 0b11_10_01_00; // qh[0]: high bits of elements 0, 32, 64, 96
        b[192..208].fill(1); // every scale 1
        b[208..210].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        let mut v = [0.0; 256];
        dequantize(KQuant::Q6K, &b, &mut v);
        assert_eq!(
            (v[0], v[32], v[64], v[96]),
            (1.0 - 32.0, 16.0 - 32.0, 2.0 + 32.0 - 32.0, 48.0 - 32.0)
        );
        assert_eq!(v[1], -32.0);
    }

    #[test]
    fn quantizers_round_trip_within_their_steps() {
        for (ty, tol) in [
            (KQuant::Q4K, 0.2),
            (KQuant::Q5K, 0.1),
            (KQuant::Q6K, 0.07),
            (KQuant::Q8K, 0.01),
        ] {
            let x: Vec<f32> = (0..512).map(|i| ((i * 97 % 512) as f32 - 250.0) / 128.0).collect();
            let mut raw = Vec::new();
            quantize(ty, &x, &mut raw);
            assert_eq!(raw.len(), 2 * ty.bytes(), "{ty:?}");
            let mut back = vec![0.0; 512];
            dequantize(ty, &raw, &mut back);
            for (a, b) in x.iter().zip(&back) {
                assert!((a - b).abs() <= tol, "{ty:?}: {a} came back as {b}");
            }
        }
    }
}
