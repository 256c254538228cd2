//! The storage formats a weight matrix can have ([`QType`]) and the formats its
//! activations are quantized to before a product ([`ActType`]).
//!
//! A row of `n` weights is `n / block_elems` consecutive blocks of `block_bytes`
//! each, blocks running along the input dimension, exactly as GGUF stores them, so a
//! tensor's bytes in the file are its bytes in memory.

use crate::KernelError;

/// A weight format: GGUF's ggml types that Hetero reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    /// 32-bit floats.
    F32,
    /// IEEE half floats.
    F16,
    /// bfloat16.
    BF16,
    /// 32 weights: an f16 scale and 4-bit integers offset by 8.
    Q4_0,
    /// 32 weights: f16 scale and minimum, 4-bit integers.
    Q4_1,
    /// 32 weights: an f16 scale, 5-bit integers offset by 16.
    Q5_0,
    /// 32 weights: f16 scale and minimum, 5-bit integers.
    Q5_1,
    /// 32 weights: an f16 scale and signed bytes.
    Q8_0,
    /// 256 weights in 8 sub-blocks of 32 with 6-bit scales and minimums, 4-bit integers.
    Q4K,
    /// As [`QType::Q4K`] with 5-bit integers.
    Q5K,
    /// 256 weights in 16 sub-blocks of 16 with signed 8-bit scales, 6-bit integers offset by 32.
    Q6K,
    /// 256 weights: an f32 scale, signed bytes and sums of every 16 (ggml's activation format).
    Q8K,
}

/// The format activations are quantized to for a product with a weight format
/// (llama.cpp's `vec_dot_type`): the integer parts of both then meet in one integer
/// dot product per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActType {
    /// Activations stay f32 (float weights).
    F32,
    /// 32 signed bytes and an f32 scale.
    Q8_0,
    /// As [`ActType::Q8_0`] plus the block's sum (scale × Σ q), which the weights'
    /// minimum multiplies.
    Q8_1,
    /// 256 signed bytes, an f32 scale and the sums of every 16 bytes.
    Q8K,
}

impl QType {
    /// Every format, in GGUF's id order.
    pub const ALL: [QType; 12] = [
        QType::F32,
        QType::F16,
        QType::Q4_0,
        QType::Q4_1,
        QType::Q5_0,
        QType::Q5_1,
        QType::Q8_0,
        QType::Q4K,
        QType::Q5K,
        QType::Q6K,
        QType::Q8K,
        QType::BF16,
    ];

    /// The format of GGUF's type id, if Hetero reads it.
    pub fn from_ggml(id: u32) -> Option<QType> {
        QType::ALL.into_iter().find(|t| t.ggml_id() == id)
    }

    /// GGUF's type id.
    pub fn ggml_id(self) -> u32 {
        match self {
            QType::F32 => 0,
            QType::F16 => 1,
            QType::Q4_0 => 2,
            QType::Q4_1 => 3,
            QType::Q5_0 => 6,
            QType::Q5_1 => 7,
            QType::Q8_0 => 8,
            QType::Q4K => 12,
            QType::Q5K => 13,
            QType::Q6K => 14,
            QType::Q8K => 15,
            QType::BF16 => 30,
        }
    }

    /// The name llama.cpp gives the format.
    pub fn name(self) -> &'static str {
        match self {
            QType::F32 => "F32",
            QType::F16 => "F16",
            QType::BF16 => "BF16",
            QType::Q4_0 => "Q4_0",
            QType::Q4_1 => "Q4_1",
            QType::Q5_0 => "Q5_0",
            QType::Q5_1 => "Q5_1",
            QType::Q8_0 => "Q8_0",
            QType::Q4K => "Q4_K",
            QType::Q5K => "Q5_K",
            QType::Q6K => "Q6_K",
            QType::Q8K => "Q8_K",
        }
    }

    /// Weights per block.
    pub fn block_elems(self) -> usize {
        match self {
            QType::F32 | QType::F16 | QType::BF16 => 1,
            QType::Q4_0 | QType::Q4_1 | QType::Q5_0 | QType::Q5_1 | QType::Q8_0 => 32,
            QType::Q4K | QType::Q5K | QType::Q6K | QType::Q8K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::F32 => 4,
            QType::F16 | QType::BF16 => 2,
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q5_0 => 22,
            QType::Q5_1 => 24,
            QType::Q8_0 => 34,
            QType::Q4K => 144,
            QType::Q5K => 176,
            QType::Q6K => 210,
            QType::Q8K => 292,
        }
    }

    /// Whether the format stores floats (no blocks, no activation quantization).
    pub fn is_float(self) -> bool {
        matches!(self, QType::F32 | QType::F16 | QType::BF16)
    }

    /// The activation format its products use.
    pub fn act(self) -> ActType {
        match self {
            QType::F32 | QType::F16 | QType::BF16 => ActType::F32,
            QType::Q4_0 | QType::Q5_0 | QType::Q8_0 => ActType::Q8_0,
            QType::Q4_1 | QType::Q5_1 => ActType::Q8_1,
            QType::Q4K | QType::Q5K | QType::Q6K | QType::Q8K => ActType::Q8K,
        }
    }

    /// Bytes of a row of `n` weights; `n` must be whole blocks.
    pub fn row_bytes(self, n: usize) -> Result<usize, KernelError> {
        if !n.is_multiple_of(self.block_elems()) {
            return Err(KernelError::NotBlockAligned {
                what: format!("a row of {n} weights"),
                ty: self,
            });
        }
        (n / self.block_elems())
            .checked_mul(self.block_bytes())
            .ok_or_else(|| KernelError::TooLarge(format!("a {} row of {n} weights", self.name())))
    }
}

impl ActType {
    /// Every activation format, in [`ActType::index`] order.
    pub const ALL: [ActType; 4] = [ActType::F32, ActType::Q8_0, ActType::Q8_1, ActType::Q8K];

    /// Its position in [`ActType::ALL`] (for tables of one entry per format).
    pub fn index(self) -> usize {
        match self {
            ActType::F32 => 0,
            ActType::Q8_0 => 1,
            ActType::Q8_1 => 2,
            ActType::Q8K => 3,
        }
    }

    /// Activations per block (1 for f32).
    pub fn block_elems(self) -> usize {
        match self {
            ActType::F32 => 1,
            ActType::Q8_0 | ActType::Q8_1 => 32,
            ActType::Q8K => 256,
        }
    }
}

impl std::fmt::Display for QType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ggml_ids_round_trip_and_unknown_ids_are_none() {
        for t in QType::ALL {
            assert_eq!(QType::from_ggml(t.ggml_id()), Some(t));
            assert_eq!(t.block_elems() % t.act().block_elems(), 0, "{t}");
        }
        assert_eq!(QType::from_ggml(9), None); // Q8_1 is an activation format only
        assert_eq!(QType::from_ggml(10), None); // Q2_K is not read
    }

    #[test]
    fn rows_must_be_whole_blocks() {
        assert_eq!(QType::Q4_1.row_bytes(576).unwrap(), 18 * 20);
        assert_eq!(QType::Q6K.row_bytes(1536).unwrap(), 6 * 210);
        assert!(matches!(
            QType::Q4K.row_bytes(576),
            Err(KernelError::NotBlockAligned { ty: QType::Q4K, .. })
        ));
        assert!(QType::Q8_0.row_bytes(usize::MAX - 31).is_err());
    }
}
