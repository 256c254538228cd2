//! The SIMD kernels, one module per instruction-set level. Everything here but the
//! tile unit's `amx` (inline assembly; its doc says why) is safe code: each function carries `#[target_feature]`, inside which the pointer-free
//! intrinsics are safe to call, and loads go through `bytemuck::cast` of fixed-size
//! arrays rather than raw pointers. Calling these functions needs the features,
//! which only [`crate::dispatch`] promises (its `Level` proves them present).
//!
//! Both x86 levels share one body, [`x86_kernels!`], differing in how unsigned × signed
//! byte products are summed into 32-bit lanes: AVX2 multiplies to 16-bit pairs
//! (`maddubs`) and widens them (`madd` with ones); AVX-512 VNNI does it in one
//! `vpdpbusd` (its 256-bit form, which Zen 4 runs at full rate where 512-bit
//! instructions are split in two). The tile level (`amx`) adds a prompt's products
//! on Intel's tile unit to the AVX-512 level's kernels.

#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
#[cfg(target_arch = "x86_64")]
#[macro_use]
mod kquant_x86;
#[cfg(target_arch = "x86_64")]
#[macro_use]
mod x86;
#[cfg(target_arch = "x86_64")]
#[macro_use]
mod wide;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    x86_kernels!("avx2,fma,f16c", |a, b| {
        _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
    });
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    x86_kernels!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", |a, b| {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b)
    });
    wide_tile!(
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        18,
        unpack_q4_0,
        dot16_q4_0,
        rows4_q4_0,
        rows4w_q4_0
    );
    wide_tile!(
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        22,
        unpack_q5_0,
        dot16_q5_0,
        rows4_q5_0,
        rows4w_q5_0
    );
    wide_tile!(
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        34,
        unpack_q8_0,
        dot16_q8_0,
        rows4_q8_0,
        rows4w_q8_0
    );
}
