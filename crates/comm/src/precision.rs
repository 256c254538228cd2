//! How the floats of a collective travel: every bit, or half of them.
//!
//! ## Design
//! Under a CPU quota, or on a slow link, an allreduce costs in proportion to its
//! bytes: each one is sealed, sent, opened and copied. [`Precision::Bf16`] sends
//! bfloat16 — the top half of an f32, so the same range with 8 bits of mantissa
//! — for half the bytes. It suits what training exchanges: gradients, and models'
//! differences from a point every worker agrees on, whose rounding error is small
//! beside the step they make (PyTorch DDP's `bf16_compress_hook` does the same).
//!
//! Each rank adds in f32 and rounds only what it forwards, so in a ring of n
//! ranks a sum is rounded up to n − 1 times on its way; and each rank rounds the
//! chunk it owns before handing it round, so that every rank ends with exactly
//! the same values — a ring whose members disagree by one bit would drift apart.

/// How floats travel in an allreduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Every bit: little-endian f32.
    #[default]
    F32,
    /// bfloat16, little-endian: half the bytes, rounded to nearest even.
    Bf16,
}

impl Precision {
    /// Bytes a float takes on the wire.
    pub fn bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        }
    }

    /// `values` as they travel.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * self.bytes());
        match self {
            Precision::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Precision::Bf16 => values
                .iter()
                .for_each(|&v| out.extend_from_slice(&to_bf16(v).to_le_bytes())),
        }
        out
    }

    /// Reads the floats of `frame` (exactly `dst.len()` of them: the caller
    /// checked its length) into `dst`: added to it when `add`, else copied.
    pub fn fold(self, dst: &mut [f32], frame: &[u8], add: bool) {
        let put = |d: &mut f32, v: f32| if add { *d += v } else { *d = v };
        match self {
            Precision::F32 => {
                for (d, b) in dst.iter_mut().zip(frame.chunks_exact(4)) {
                    put(d, f32::from_le_bytes(b.try_into().expect("4 bytes")));
                }
            }
            Precision::Bf16 => {
                for (d, b) in dst.iter_mut().zip(frame.chunks_exact(2)) {
                    put(d, from_bf16(u16::from_le_bytes(b.try_into().expect("2 bytes"))));
                }
            }
        }
    }

    /// Rounds `values` in place to what they would be after travelling.
    pub fn round(self, values: &mut [f32]) {
        if self == Precision::Bf16 {
            values.iter_mut().for_each(|v| *v = from_bf16(to_bf16(*v)));
        }
    }
}

/// `v` rounded to the nearest bfloat16 (ties to even); a NaN stays a NaN.
fn to_bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        // Keep the sign and set the quiet bit: cutting the mantissa could leave
        // an infinity's bit pattern.
        return ((bits >> 16) | 0x0040) as u16;
    }
    let tie_to_even = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(tie_to_even) >> 16) as u16
}

fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_keeps_eight_bits_of_mantissa_rounding_to_nearest_even() {
        let exact = [0.0f32, -0.0, 1.0, -2.5, 0.15625, f32::INFINITY, f32::NEG_INFINITY];
        for v in exact {
            assert_eq!(from_bf16(to_bf16(v)).to_bits(), v.to_bits(), "{v} is a bfloat16");
        }
        // 1 + 2⁻⁸ lies halfway between 1 and 1 + 2⁻⁷: the tie goes to the even 1.
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        // 1 + 3·2⁻⁸ lies halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: to the even 1 + 2⁻⁶.
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 1.0 / 64.0);
        for v in [0.1f32, -3.3e-5, 12345.678, 7.1e30] {
            let r = from_bf16(to_bf16(v));
            assert!(((r - v) / v).abs() <= 1.0 / 256.0, "{v} → {r}");
        }
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert!(from_bf16(to_bf16(-f32::NAN)).is_nan());
    }

    #[test]
    fn what_travels_is_what_rounding_gives() {
        let values = [0.1f32, -7.25, 1e-3, 3.0e8];
        for p in [Precision::F32, Precision::Bf16] {
            let frame = p.encode(&values);
            assert_eq!(frame.len(), values.len() * p.bytes());
            let mut copied = [9.0f32; 4];
            p.fold(&mut copied, &frame, false);
            let mut rounded = values;
            p.round(&mut rounded);
            assert_eq!(copied, rounded, "{p:?}");
            let mut summed = [1.0f32; 4];
            p.fold(&mut summed, &frame, true);
            assert_eq!(summed, rounded.map(|v| v + 1.0), "{p:?}");
        }
        let mut exact = values;
        Precision::F32.round(&mut exact);
        assert_eq!(exact, values);
    }
}
