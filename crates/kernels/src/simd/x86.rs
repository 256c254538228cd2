//! The body of the x86 kernels, instantiated per level by `simd/mod.rs`.

/// Defines the kernels of one x86 level: `$features` for `#[target_feature]`, and
/// `|a, b| body` summing four unsigned × signed byte products into each i32 lane.
macro_rules! x86_kernels {
    ($features:literal, |$a:ident, $b:ident| $mul_sum:block) => {
        /// Weight rows a decode step's loop asks for ahead of the row it multiplies.
        const PREFETCH_ROWS: usize = 4;

        use std::arch::x86_64::*;

        use bytemuck::cast;

        use crate::acts::Q8Row;

        /// Σ over groups of four of unsigned `a` × signed `b` bytes, as eight i32.
        #[target_feature(enable = $features)]
        #[inline]
        fn mul_sum_us8($a: __m256i, $b: __m256i) -> __m256i {
            $mul_sum
        }

        /// Σ of signed × signed bytes: the sign moves to `b` so `a` can be unsigned.
        #[target_feature(enable = $features)]
        #[inline]
        fn mul_sum_i8(a: __m256i, b: __m256i) -> __m256i {
            mul_sum_us8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a))
        }

        #[target_feature(enable = $features)]
        #[inline]
        fn hsum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }

        /// Two f16 at the start of `b` as f32 (scale and minimum of a block).
        ///
        /// Broadcast, not inserted into lane 0: an insert keeps the other lanes of some
        /// register, and the compiler picked the accumulator, chaining every block's
        /// conversion to the previous block's sum (Q8_0 ran at half speed).
        #[target_feature(enable = $features)]
        #[inline]
        fn f16_pair(b: [u8; 4]) -> (f32, f32) {
            let v = _mm_cvtph_ps(_mm_set1_epi32(i32::from_le_bytes(b)));
            (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
        }

        /// 16 bytes of nibbles as 32 bytes: low nibbles (elements 0..16) then high.
        #[target_feature(enable = $features)]
        #[inline]
        fn nibbles(q: [u8; 16]) -> __m256i {
            let lo: __m128i = cast(q);
            _mm256_and_si256(
                _mm256_set_m128i(_mm_srli_epi16::<4>(lo), lo),
                _mm256_set1_epi8(0x0F),
            )
        }

        /// Asks for the `len` bytes of `w` from `at` (where they exist) to be brought
        /// into cache: a decode step streams its weights from memory once, and the
        /// core's own prefetchers alone left it waiting on them (SmolLM2 Q4_K_M on a
        /// Xeon with 2 threads: 15.4 → 5.4 ms per token).
        #[target_feature(enable = $features)]
        #[inline]
        fn prefetch_ahead(w: &[u8], at: usize, len: usize) {
            if let Some(ahead) = w.get(at..at + len) {
                for line in ahead.chunks(64) {
                    _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast());
                }
            }
        }

        #[inline(always)]
        fn arr<const N: usize>(s: &[u8]) -> [u8; N] {
            s.try_into().expect("a fixed range of a fixed-size block")
        }

        /// A block's f16 scale, broadcast to eight lanes (a broadcast, not a lane insert:
        /// an insert keeps some register's other lanes, and the compiler once picked the
        /// accumulator, chaining every block to the one before — half speed).
        #[target_feature(enable = $features)]
        #[inline]
        fn scale8(h: [u8; 2]) -> __m256 {
            _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes(h)))
        }

        /// The 32 bits of a Q5 block's `qh` as 32 bytes: 0xFF where bit i is set.
        #[target_feature(enable = $features)]
        #[inline]
        fn bits32(qh: [u8; 4]) -> __m256i {
            // Byte i takes qh's byte i/8, then every bit but bit i%8 is forced on.
            let spread = _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            );
            let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(i32::from_le_bytes(qh)), spread);
            let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
            _mm256_cmpeq_epi8(_mm256_or_si256(bytes, others), _mm256_set1_epi64x(-1))
        }

        // Each legacy block unpacked to (d_w in eight lanes, m_w, its 32 integers):
        // signed for Q4_0, Q5_0 and Q8_0, unsigned for Q4_1 and Q5_1 (their minimum
        // meets the activations' block sums instead).

        #[target_feature(enable = $features)]
        #[inline]
        fn unpack_q4_0(b: &[u8; 18]) -> (__m256, f32, __m256i) {
            let q = _mm256_sub_epi8(nibbles(arr(&b[2..18])), _mm256_set1_epi8(8));
            (scale8([b[0], b[1]]), 0.0, q)
        }

        #[target_feature(enable = $features)]
        #[inline]
        fn unpack_q4_1(b: &[u8; 20]) -> (__m256, f32, __m256i) {
            let (d, m) = f16_pair(arr(&b[0..4]));
            (_mm256_set1_ps(d), m, nibbles(arr(&b[4..20])))
        }

        #[target_feature(enable = $features)]
        #[inline]
        fn unpack_q5_0(b: &[u8; 22]) -> (__m256, f32, __m256i) {
            // A clear fifth bit means q − 16 = nibble − 16: the nibble with its top bits set.
            let high = _mm256_andnot_si256(bits32(arr(&b[2..6])), _mm256_set1_epi8(0xF0u8 as i8));
            (
                scale8([b[0], b[1]]),
                0.0,
                _mm256_or_si256(nibbles(arr(&b[6..22])), high),
            )
        }

        #[target_feature(enable = $features)]
        #[inline]
        fn unpack_q5_1(b: &[u8; 24]) -> (__m256, f32, __m256i) {
            let (d, m) = f16_pair(arr(&b[0..4]));
            let high = _mm256_and_si256(bits32(arr(&b[4..8])), _mm256_set1_epi8(0x10));
            (
                _mm256_set1_ps(d),
                m,
                _mm256_or_si256(nibbles(arr(&b[8..24])), high),
            )
        }

        #[target_feature(enable = $features)]
        #[inline]
        fn unpack_q8_0(b: &[u8; 34]) -> (__m256, f32, __m256i) {
            (
                scale8([b[0], b[1]]),
                0.0,
                cast::<[u8; 32], __m256i>(arr(&b[2..34])),
            )
        }

        legacy_kernels!(
            $features,
            Q4_0,
            18,
            unpack_q4_0,
            signed,
            dot_q4_0,
            dot4_q4_0,
            dot8_q4_0,
            rows_q4_0,
            rows4_q4_0
        );
        legacy_kernels!(
            $features,
            Q4_1,
            20,
            unpack_q4_1,
            unsigned,
            dot_q4_1,
            dot4_q4_1,
            dot8_q4_1,
            rows_q4_1,
            rows4_q4_1
        );
        legacy_kernels!(
            $features,
            Q5_0,
            22,
            unpack_q5_0,
            signed,
            dot_q5_0,
            dot4_q5_0,
            dot8_q5_0,
            rows_q5_0,
            rows4_q5_0
        );
        legacy_kernels!(
            $features,
            Q5_1,
            24,
            unpack_q5_1,
            unsigned,
            dot_q5_1,
            dot4_q5_1,
            dot8_q5_1,
            rows_q5_1,
            rows4_q5_1
        );
        legacy_kernels!(
            $features,
            Q8_0,
            34,
            unpack_q8_0,
            signed,
            dot_q8_0,
            dot4_q8_0,
            dot8_q8_0,
            rows_q8_0,
            rows4_q8_0
        );

        kquant_kernels!($features);

        /// Legacy blocks rewritten with their 32 integers as bytes, as the format's
        /// unpacker gives them: Q4_0/Q5_0 as Q8_0 blocks (the scale's two bytes, then
        /// signed bytes), Q4_1/Q5_1 as the tile unit's unsigned blocks (`simd::amx`:
        /// the scale and minimum's four bytes, then unsigned bytes).
        #[target_feature(enable = $features)]
        pub(crate) fn expand(ty: crate::QType, src: &[u8], dst: &mut [u8]) {
            macro_rules! rewrite {
                ($n:literal, $head:literal, $unpack:ident) => {
                    for (b, o) in src
                        .as_chunks::<$n>()
                        .0
                        .iter()
                        .zip(dst.as_chunks_mut::<{ $head + 32 }>().0)
                    {
                        o[..$head].copy_from_slice(&b[..$head]);
                        o[$head..].copy_from_slice(&cast::<__m256i, [u8; 32]>($unpack(b).2));
                    }
                };
            }
            match ty {
                crate::QType::Q4_0 => rewrite!(18, 2, unpack_q4_0),
                crate::QType::Q5_0 => rewrite!(22, 2, unpack_q5_0),
                crate::QType::Q4_1 => rewrite!(20, 4, unpack_q4_1),
                crate::QType::Q5_1 => rewrite!(24, 4, unpack_q5_1),
                _ => unreachable!("only Q4_0, Q5_0, Q4_1 and Q5_1 are rewritten"),
            }
        }

        // The f32 operations of `ops` (and the activations' quantizer), compiled
        // again for this level: they are `#[inline(always)]` plain loops.

        #[target_feature(enable = $features)]
        pub(crate) fn attend_many<const N: usize>(
            qs: [&[f32]; N],
            keys: &[f32],
            values: &[f32],
            scale: f32,
            scores: &mut [f32],
            outs: [&mut [f32]; N],
        ) {
            crate::ops::attend_many(qs, keys, values, scale, scores, outs)
        }

        #[target_feature(enable = $features)]
        pub(crate) fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
            crate::ops::silu_mul(gate, up, out)
        }

        #[target_feature(enable = $features)]
        pub(crate) fn rms_norm(x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) {
            crate::ops::rms_norm(x, gamma, eps, out)
        }

        /// Q8_0 and Q8_1 activations as `formats::q8::quantize_q8` makes them, eight
        /// lanes at a time (ggml's AVX2 `quantize_row_q8_0`): the same maximum, scale
        /// and integers — `cvtps2dq` rounds to nearest even, as `round_even` does.
        #[target_feature(enable = $features)]
        fn quantize_q8(x: &[f32], qs: &mut [i8], d: &mut [f32], mut sums: Option<&mut [f32]>) {
            let (x32, _) = x.as_chunks::<32>();
            let (q32, _) = qs.as_chunks_mut::<32>();
            let sign = _mm256_set1_ps(-0.0);
            let eight = |s: &[f32]| cast::<[f32; 8], __m256>(s.try_into().expect("8 values"));
            for (k, (xb, q)) in x32.iter().zip(q32).enumerate() {
                let (v0, v1, v2, v3) = (
                    eight(&xb[0..8]),
                    eight(&xb[8..16]),
                    eight(&xb[16..24]),
                    eight(&xb[24..32]),
                );
                let m = _mm256_max_ps(
                    _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                    _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)),
                );
                let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
                let id = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
                let i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, id));
                let i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, id));
                let i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, id));
                let i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, id));
                // Packing works within 128-bit halves; the permutation restores the order.
                let bytes = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
                let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                *q = cast::<__m256i, [i8; 32]>(bytes);
                d[k] = amax / 127.0;
                if let Some(sums) = sums.as_deref_mut() {
                    let s = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
                    let total: i32 = cast::<__m256i, [i32; 8]>(s).iter().sum();
                    sums[k] = d[k] * total as f32;
                }
            }
        }

        /// Q8_K activations as `formats::q8::quantize_q8k` makes them, eight lanes at
        /// a time: the first value of largest magnitude maps to −127, the integers
        /// round to nearest even (`cvtps2dq`) and saturate at 127 in the packing, as
        /// `.min(127.0)` does; `bsums` sums every 16.
        #[target_feature(enable = $features)]
        fn quantize_q8k(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
            let (x256, _) = x.as_chunks::<256>();
            let (q256, _) = qs.as_chunks_mut::<256>();
            let sign = _mm256_set1_ps(-0.0);
            let eight = |s: &[f32]| cast::<[f32; 8], __m256>(s.try_into().expect("8 values"));
            for (k, (xb, q)) in x256.iter().zip(q256).enumerate() {
                let sums = &mut bsums[16 * k..16 * k + 16];
                let mut m = _mm256_setzero_ps();
                for c in 0..32 {
                    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, eight(&xb[8 * c..8 * c + 8])));
                }
                let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
                let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
                let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
                if amax == 0.0 {
                    d[k] = 0.0;
                    q.fill(0);
                    sums.fill(0);
                    continue;
                }
                // The first value of that magnitude, with its sign.
                let target = _mm256_set1_ps(amax);
                let mut max = amax;
                for c in 0..32 {
                    let v = eight(&xb[8 * c..8 * c + 8]);
                    let hits = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_andnot_ps(sign, v), target));
                    if hits != 0 {
                        max = xb[8 * c + hits.trailing_zeros() as usize];
                        break;
                    }
                }
                let iscale = -127.0 / max;
                let scale = _mm256_set1_ps(iscale);
                for g in 0..8 {
                    let at = 32 * g;
                    let i0 = _mm256_cvtps_epi32(_mm256_mul_ps(scale, eight(&xb[at..at + 8])));
                    let i1 = _mm256_cvtps_epi32(_mm256_mul_ps(scale, eight(&xb[at + 8..at + 16])));
                    let i2 = _mm256_cvtps_epi32(_mm256_mul_ps(scale, eight(&xb[at + 16..at + 24])));
                    let i3 = _mm256_cvtps_epi32(_mm256_mul_ps(scale, eight(&xb[at + 24..at + 32])));
                    let bytes = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
                    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                    let out: [i8; 32] = cast(bytes);
                    q[at..at + 32].copy_from_slice(&out);
                    for (h, half) in out.chunks_exact(16).enumerate() {
                        sums[2 * g + h] = half.iter().map(|&v| v as i16).sum();
                    }
                }
                d[k] = 1.0 / iscale;
            }
        }

        #[target_feature(enable = $features)]
        pub(crate) fn quantize(rows: crate::acts::RowsMut<'_>, ty: crate::ActType, x: &[f32]) {
            match ty {
                crate::ActType::Q8_0 => {
                    quantize_q8(x, rows.qs, rows.d, None);
                    crate::formats::q8::starts(rows.qs, rows.starts);
                }
                crate::ActType::Q8_1 => quantize_q8(x, rows.qs, rows.d, Some(rows.sums)),
                crate::ActType::Q8K => quantize_q8k(x, rows.qs, rows.d, rows.bsums),
                crate::ActType::F32 => rows.quantize(ty, x),
            }
        }
    };
}

/// The four kernels of one legacy format at one level: a row's dot, the 4-row tile
/// (each weight block unpacked once for four activation rows), and their loops over
/// rows. Every output is accumulated in the same order by the dot and the tile —
/// `acc += (d_w·d_x)·Σq·y` block by block, the minimum's `m_w·s_x` in a sum of its
/// own — so a tile and a single row give the same bits.
macro_rules! legacy_kernels {
    ($features:literal, $name:ident, $n:literal, $unpack:ident, $sign:ident,
     $dot:ident, $dot4:ident, $dot8:ident, $rows:ident, $rows4:ident) => {
        #[target_feature(enable = $features)]
        fn $dot(w: &[[u8; $n]], x: &Q8Row) -> f32 {
            let qs = x.qs.as_chunks::<32>().0;
            let mut acc = _mm256_setzero_ps();
            let mut mins = 0.0f32;
            for (k, (b, (y, &dx))) in w.iter().zip(qs.iter().zip(x.d)).enumerate() {
                let (dw, mw, q) = $unpack(b);
                let p = legacy_kernels!(@product $sign, q, cast(*y));
                acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(dx)), _mm256_cvtepi32_ps(p), acc);
                legacy_kernels!(@min $sign, mins, mw, x, k);
            }
            hsum(acc) + mins
        }

        #[target_feature(enable = $features)]
        fn $dot4(w: &[[u8; $n]], x: &[Q8Row; 4]) -> [f32; 4] {
            let qs = x.map(|x| x.qs.as_chunks::<32>().0);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut mins = [0.0f32; 4];
            for (k, b) in w.iter().enumerate() {
                let (dw, mw, q) = $unpack(b);
                for r in 0..4 {
                    let p = legacy_kernels!(@product $sign, q, cast(qs[r][k]));
                    acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(x[r].d[k])), _mm256_cvtepi32_ps(p), acc[r]);
                    legacy_kernels!(@min $sign, mins[r], mw, x[r], k);
                }
            }
            [0, 1, 2, 3].map(|r| hsum(acc[r]) + mins[r])
        }

        /// Two weight rows against four activation rows, written out so the eight
        /// accumulators stay in registers: each activation block is loaded once for
        /// both rows, each weight block unpacked once for the four. Same order of
        /// accumulation as the dot, so the same bits.
        #[target_feature(enable = $features)]
        fn $dot8(w0: &[[u8; $n]], w1: &[[u8; $n]], x: &[Q8Row; 4]) -> [[f32; 4]; 2] {
            let n = w0.len();
            let w1 = &w1[..n];
            let [x0, x1, x2, x3] = x;
            let (q0, q1, q2, q3) = (
                &x0.qs.as_chunks::<32>().0[..n],
                &x1.qs.as_chunks::<32>().0[..n],
                &x2.qs.as_chunks::<32>().0[..n],
                &x3.qs.as_chunks::<32>().0[..n],
            );
            let (e0, e1, e2, e3) = (&x0.d[..n], &x1.d[..n], &x2.d[..n], &x3.d[..n]);
            let z = _mm256_setzero_ps();
            let (mut a00, mut a01, mut a02, mut a03) = (z, z, z, z);
            let (mut a10, mut a11, mut a12, mut a13) = (z, z, z, z);
            let mut m = [[0.0f32; 4]; 2];
            for k in 0..n {
                let (dw0, mw0, p0) = $unpack(&w0[k]);
                let (dw1, mw1, p1) = $unpack(&w1[k]);
                let (d0, d1, d2, d3) = (
                    _mm256_set1_ps(e0[k]),
                    _mm256_set1_ps(e1[k]),
                    _mm256_set1_ps(e2[k]),
                    _mm256_set1_ps(e3[k]),
                );
                let y: __m256i = cast(q0[k]);
                a00 = _mm256_fmadd_ps(_mm256_mul_ps(dw0, d0), _mm256_cvtepi32_ps(legacy_kernels!(@product $sign, p0, y)), a00);
                a10 = _mm256_fmadd_ps(_mm256_mul_ps(dw1, d0), _mm256_cvtepi32_ps(legacy_kernels!(@product $sign, p1, y)), a10);
                let y: __m256i = cast(q1[k]);
                a01 = _mm256_fmadd_ps(_mm256_mul_ps(dw0, d1), _mm256_cvtepi32_ps(legacy_kernels!(@product $sign, p0, y)), a01);
                a11 = _mm256_fmadd_ps(_mm256_mul_ps(dw1, d1), _mm256_cvtepi32_ps(legacy_kernels!(@product $sign, p1, y)), a11);
                let y: __m256i = cast(q2[k]);
                a02 = _mm256_fmadd_ps(_mm256_mul_ps(dw0, d2), _mm256_cvtepi32_ps(legacy_kernels!(@product $sign, p0, y)), a02);
                a12 = _mm256_fmadd_ps(_mm256_mul_ps(dw1, d2), _mm256_cvtepi32_ps(legacy_kernels!(@product $sign, p1, y)), a12);
                let y: __m256i = cast(q3[k]);
                a03 = _mm256_fmadd_ps(_mm256_mul_ps(dw0, d3), _mm256_cvtepi32_ps(legacy_kernels!(@product $sign, p0, y)), a03);
                a13 = _mm256_fmadd_ps(_mm256_mul_ps(dw1, d3), _mm256_cvtepi32_ps(legacy_kernels!(@product $sign, p1, y)), a13);
                for (r, xr) in [x0, x1, x2, x3].into_iter().enumerate() {
                    legacy_kernels!(@min $sign, m[0][r], mw0, xr, k);
                    legacy_kernels!(@min $sign, m[1][r], mw1, xr, k);
                }
            }
            [
                [hsum(a00) + m[0][0], hsum(a01) + m[0][1], hsum(a02) + m[0][2], hsum(a03) + m[0][3]],
                [hsum(a10) + m[1][0], hsum(a11) + m[1][1], hsum(a12) + m[1][2], hsum(a13) + m[1][3]],
            ]
        }

        #[doc = concat!("`out[o] = row o of w · x` for ", stringify!($name), " rows of `row_bytes` each.")]
        #[target_feature(enable = $features)]
        pub(crate) fn $rows(w: &[u8], row_bytes: usize, x: Q8Row, out: &mut [f32]) {
            for (i, (row, o)) in w.chunks_exact(row_bytes).zip(out).enumerate() {
                prefetch_ahead(w, (i + PREFETCH_ROWS) * row_bytes, row_bytes);
                *o = $dot(row.as_chunks::<$n>().0, &x);
            }
        }

        #[doc = concat!("`out[r][o] = row o of w · x[r]` for four activation rows, ", stringify!($name), " weights.")]
        #[target_feature(enable = $features)]
        pub(crate) fn $rows4(w: &[u8], row_bytes: usize, x: &[Q8Row; 4], out: [&mut [f32]; 4]) {
            let [o0, o1, o2, o3] = out;
            let mut pairs = w.chunks_exact(2 * row_bytes);
            for (i, two) in (&mut pairs).enumerate() {
                prefetch_ahead(w, (2 * i + PREFETCH_ROWS) * row_bytes, 2 * row_bytes);
                let (r0, r1) = two.split_at(row_bytes);
                let [a, b] = $dot8(r0.as_chunks::<$n>().0, r1.as_chunks::<$n>().0, x);
                let o = 2 * i;
                [o0[o], o1[o], o2[o], o3[o]] = a;
                [o0[o + 1], o1[o + 1], o2[o + 1], o3[o + 1]] = b;
            }
            if !pairs.remainder().is_empty() {
                let o = w.len() / row_bytes - 1;
                [o0[o], o1[o], o2[o], o3[o]] = $dot4(pairs.remainder().as_chunks::<$n>().0, x);
            }
        }
    };
    (@product signed, $q:expr, $y:expr) => { mul_sum_i8($q, $y) };
    (@product unsigned, $q:expr, $y:expr) => { mul_sum_us8($q, $y) };
    (@min signed, $mins:expr, $mw:expr, $x:expr, $k:expr) => { let _ = (&mut $mins, $mw, $k, &$x); };
    (@min unsigned, $mins:expr, $mw:expr, $x:expr, $k:expr) => { $mins += $mw * $x.sums[$k]; };
}
