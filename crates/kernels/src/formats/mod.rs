//! Every weight format's bytes: dequantisers, scalar dot products (the reference the
//! SIMD kernels are tested against, and the kernels of the baseline level) and
//! quantizers for weights and activations.

pub(crate) mod kquant;
pub(crate) mod legacy;
pub(crate) mod q8;

use half::{bf16, f16};

use crate::acts::ActRow;
use crate::{KernelError, QType};
use kquant::KQuant;
use legacy::Legacy;

/// The shared code's family of a format.
enum Family {
    Float,
    Legacy(Legacy),
    K(KQuant),
}

fn family(ty: QType) -> Family {
    match ty {
        QType::F32 | QType::F16 | QType::BF16 => Family::Float,
        QType::Q4_0 => Family::Legacy(Legacy::Q4_0),
        QType::Q4_1 => Family::Legacy(Legacy::Q4_1),
        QType::Q5_0 => Family::Legacy(Legacy::Q5_0),
        QType::Q5_1 => Family::Legacy(Legacy::Q5_1),
        QType::Q8_0 => Family::Legacy(Legacy::Q8_0),
        QType::Q4K => Family::K(KQuant::Q4K),
        QType::Q5K => Family::K(KQuant::Q5K),
        QType::Q6K => Family::K(KQuant::Q6K),
        QType::Q8K => Family::K(KQuant::Q8K),
    }
}

/// The value of float weight `i` of a float row.
fn float_at(ty: QType, raw: &[u8], i: usize) -> f32 {
    match ty {
        QType::F32 => f32::from_le_bytes([raw[4 * i], raw[4 * i + 1], raw[4 * i + 2], raw[4 * i + 3]]),
        QType::F16 => f16::from_le_bytes([raw[2 * i], raw[2 * i + 1]]).to_f32(),
        _ => bf16::from_le_bytes([raw[2 * i], raw[2 * i + 1]]).to_f32(),
    }
}

/// Dequantises `raw`, whole blocks of `ty`, into `out`; `raw` must hold exactly
/// `out.len()` weights.
pub fn dequantize(ty: QType, raw: &[u8], out: &mut [f32]) -> Result<(), KernelError> {
    let expect = ty.row_bytes(out.len())?;
    if raw.len() != expect {
        return Err(KernelError::Length {
            what: format!("{} {ty} weights", out.len()),
            expected: expect,
            got: raw.len(),
        });
    }
    match family(ty) {
        Family::Float => {
            for (i, v) in out.iter_mut().enumerate() {
                *v = float_at(ty, raw, i);
            }
        }
        Family::Legacy(l) => legacy::dequantize(l, raw, out),
        Family::K(k) => kquant::dequantize(k, raw, out),
    }
    Ok(())
}

/// `x` (whole blocks of `ty`) in `ty`'s bytes, by the reference quantizers: for
/// making weights in tests, timings and profiles. Float formats round to nearest.
pub fn quantize(ty: QType, x: &[f32]) -> Result<Vec<u8>, KernelError> {
    let mut out = Vec::with_capacity(ty.row_bytes(x.len())?);
    match family(ty) {
        Family::Float => match ty {
            QType::F32 => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
            QType::F16 => x.iter().for_each(|&v| out.extend(f16::from_f32(v).to_le_bytes())),
            _ => x.iter().for_each(|&v| out.extend(bf16::from_f32(v).to_le_bytes())),
        },
        Family::Legacy(l) => legacy::quantize(l, x, &mut out),
        Family::K(k) => kquant::quantize(k, x, &mut out),
    }
    Ok(out)
}

/// Σ wᵢ·xᵢ of one weight row (bytes of `ty`) and one activation row of `ty.act()`,
/// in plain Rust. Callers check that the row lengths match.
pub(crate) fn dot_scalar(ty: QType, w: &[u8], x: ActRow) -> f32 {
    match (family(ty), x) {
        (Family::Float, ActRow::F32(x)) => x.iter().enumerate().map(|(i, &v)| float_at(ty, w, i) * v).sum(),
        (Family::Legacy(l), ActRow::Q8(x)) => legacy::dot(l, w, &x),
        (Family::K(k), ActRow::Q8(x)) => kquant::dot(k, w, &x),
        _ => unreachable!("{ty} met activations of another format; QActs::quantize picks ty.act()"),
    }
}
