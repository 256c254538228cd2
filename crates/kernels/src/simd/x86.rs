//! The body of the x86 kernels, instantiated per level by `simd/mod.rs`.

/// Defines the kernels of one x86 level: `$features` for `#[target_feature]`, and
/// `|a, b| body` summing four unsigned × signed byte products into each i32 lane.
macro_rules! x86_kernels {
    ($features:literal, |$a:ident, $b:ident| $mul_sum:block) => {
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

        #[inline(always)]
        fn arr<const N: usize>(s: &[u8]) -> [u8; N] {
            s.try_into().expect("a fixed range of a fixed-size block")
        }

        /// Q4_1 row · Q8_1 row: `Σ d_w·d_x·Σ q·y + m_w·s_x`.
        #[target_feature(enable = $features)]
        pub(crate) fn dot_q4_1(w: &[[u8; 20]], qs: &[[i8; 32]], d: &[f32], s: &[f32]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            let mut mins = 0.0f32;
            for (((b, y), &dx), &sx) in w.iter().zip(qs).zip(d).zip(s) {
                let (dw, mw) = f16_pair(arr(&b[0..4]));
                mins += mw * sx;
                let p = mul_sum_us8(nibbles(arr(&b[4..20])), cast(*y));
                acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx), _mm256_cvtepi32_ps(p), acc);
            }
            hsum(acc) + mins
        }

        /// Q8_0 row · Q8_0 row: `Σ d_w·d_x·Σ q·y`.
        #[target_feature(enable = $features)]
        pub(crate) fn dot_q8_0(w: &[[u8; 34]], qs: &[[i8; 32]], d: &[f32]) -> f32 {
            let mut acc = _mm256_setzero_ps();
            for ((b, y), &dx) in w.iter().zip(qs).zip(d) {
                let dw = _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes([b[0], b[1]])));
                let p = mul_sum_i8(cast::<[u8; 32], __m256i>(arr(&b[2..34])), cast(*y));
                acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(dx)), _mm256_cvtepi32_ps(p), acc);
            }
            hsum(acc)
        }

        /// One Q4_1 row against four Q8_1 rows at once: each weight block is unpacked
        /// once for the four. Every output is accumulated exactly as [`dot_q4_1`]
        /// accumulates it, so a tile and a single row give the same bits.
        #[target_feature(enable = $features)]
        fn dot4_q4_1(w: &[[u8; 20]], x: &[Q8Row; 4]) -> [f32; 4] {
            let qs = x.map(|x| x.qs.as_chunks::<32>().0);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut mins = [0.0f32; 4];
            for (k, b) in w.iter().enumerate() {
                let (dw, mw) = f16_pair(arr(&b[0..4]));
                let q = nibbles(arr(&b[4..20]));
                for r in 0..4 {
                    mins[r] += mw * x[r].sums[k];
                    let p = mul_sum_us8(q, cast(qs[r][k]));
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x[r].d[k]), _mm256_cvtepi32_ps(p), acc[r]);
                }
            }
            [0, 1, 2, 3].map(|r| hsum(acc[r]) + mins[r])
        }

        /// One Q8_0 row against four Q8_0 rows at once (see [`dot4_q4_1`]).
        #[target_feature(enable = $features)]
        fn dot4_q8_0(w: &[[u8; 34]], x: &[Q8Row; 4]) -> [f32; 4] {
            let qs = x.map(|x| x.qs.as_chunks::<32>().0);
            let mut acc = [_mm256_setzero_ps(); 4];
            for (k, b) in w.iter().enumerate() {
                let dw = _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes([b[0], b[1]])));
                let q: __m256i = cast::<[u8; 32], __m256i>(arr(&b[2..34]));
                let aq = _mm256_sign_epi8(q, q);
                for r in 0..4 {
                    let p = mul_sum_us8(aq, _mm256_sign_epi8(cast(qs[r][k]), q));
                    acc[r] = _mm256_fmadd_ps(
                        _mm256_mul_ps(dw, _mm256_set1_ps(x[r].d[k])),
                        _mm256_cvtepi32_ps(p),
                        acc[r],
                    );
                }
            }
            [0, 1, 2, 3].map(|r| hsum(acc[r]))
        }

        /// `out[r][o] = row o of w · x[r]` for four activation rows, Q4_1 weights.
        #[target_feature(enable = $features)]
        pub(crate) fn rows4_q4_1(w: &[u8], row_bytes: usize, x: &[Q8Row; 4], out: [&mut [f32]; 4]) {
            let [o0, o1, o2, o3] = out;
            for (o, row) in w.chunks_exact(row_bytes).enumerate() {
                [o0[o], o1[o], o2[o], o3[o]] = dot4_q4_1(row.as_chunks::<20>().0, x);
            }
        }

        /// `out[r][o] = row o of w · x[r]` for four activation rows, Q8_0 weights.
        #[target_feature(enable = $features)]
        pub(crate) fn rows4_q8_0(w: &[u8], row_bytes: usize, x: &[Q8Row; 4], out: [&mut [f32]; 4]) {
            let [o0, o1, o2, o3] = out;
            for (o, row) in w.chunks_exact(row_bytes).enumerate() {
                [o0[o], o1[o], o2[o], o3[o]] = dot4_q8_0(row.as_chunks::<34>().0, x);
            }
        }

        /// `out[o] = row o of w · x` for Q4_1 rows of `row_bytes` each.
        #[target_feature(enable = $features)]
        pub(crate) fn rows_q4_1(w: &[u8], row_bytes: usize, x: Q8Row, out: &mut [f32]) {
            let qs = x.qs.as_chunks::<32>().0;
            for (row, o) in w.chunks_exact(row_bytes).zip(out) {
                *o = dot_q4_1(row.as_chunks::<20>().0, qs, x.d, x.sums);
            }
        }

        /// `out[o] = row o of w · x` for Q8_0 rows of `row_bytes` each.
        #[target_feature(enable = $features)]
        pub(crate) fn rows_q8_0(w: &[u8], row_bytes: usize, x: Q8Row, out: &mut [f32]) {
            let qs = x.qs.as_chunks::<32>().0;
            for (row, o) in w.chunks_exact(row_bytes).zip(out) {
                *o = dot_q8_0(row.as_chunks::<34>().0, qs, x.d);
            }
        }
    };
}
