//! The K-quant kernels of the x86 levels (Q4_K, Q5_K, Q6_K weights against Q8_K
//! activations), instantiated inside `x86_kernels!`.
//!
//! ## Design
//! A super-block of 256 weights costs more to unpack than to multiply: six-bit
//! scales and minimums decoded one by one, nibbles (and fifth or sixth bits) spread
//! to bytes. So each format is split into an *unpack* of one weight super-block and
//! an *apply* of the unpacked block to one activation row, and two kernels are built
//! from them: the dot of one row (decode) and the tile of four activation rows
//! (prefill), which unpacks each super-block once for the four. Both run the same
//! `apply`, so a tile and a single row give each output the same bits.

/// Defines the K-quant kernels of one x86 level; `$features` as in `x86_kernels!`.
macro_rules! kquant_kernels {
    ($features:literal) => {
        /// A Q4_K/Q5_K super-block unpacked: scales, minimums and, per 64 weights
        /// `c`, the low (`q[2c]`) and high (`q[2c + 1]`) 32 as unsigned bytes.
        ///
        /// `m` holds each minimum twice, as 16-bit lanes beside the activations'
        /// sixteen `bsums` (two per sub-block).
        struct Q45 {
            d: f32,
            dmin: f32,
            sc: [i16; 8],
            m: __m256i,
            q: [__m256i; 8],
        }

        /// Σ of the eight 32-bit lanes (exact: integers).
        #[target_feature(enable = $features)]
        #[inline]
        fn hsum_i32(v: __m256i) -> i32 {
            let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s)))
        }

        /// Unpacks a Q4_K (`five` false, 144 bytes) or Q5_K (176 bytes) super-block.
        #[target_feature(enable = $features)]
        #[inline]
        fn unpack_q45k<const N: usize>(b: &[u8; N], five: bool) -> Q45 {
            let m4 = _mm256_set1_epi8(0x0F);
            let (d, dmin) = f16_pair(arr(&b[0..4]));
            let (sc8, m8) = crate::formats::kquant::scales_mins8(&b[4..16]);
            let sc = sc8.map(|v| v as i16);
            let m8 = _mm_set_epi64x(0, i64::from_le_bytes(m8));
            let m = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));
            let (qh, qs) = if five {
                (&b[16..48], &b[48..176])
            } else {
                (&b[0..0], &b[16..144])
            };
            let mut hbits = if five {
                cast::<[u8; 32], __m256i>(arr(qh))
            } else {
                _mm256_setzero_si256()
            };
            let mut q = [_mm256_setzero_si256(); 8];
            for c in 0..4 {
                let q4 = cast::<[u8; 32], __m256i>(arr(&qs[32 * c..32 * c + 32]));
                let mut lo = _mm256_and_si256(q4, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q4), m4);
                if five {
                    let one = _mm256_set1_epi8(1);
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(_mm256_and_si256(hbits, one)));
                    hi = _mm256_or_si256(
                        hi,
                        _mm256_slli_epi16::<3>(_mm256_and_si256(hbits, _mm256_set1_epi8(2))),
                    );
                    hbits = _mm256_srli_epi16::<2>(hbits);
                }
                (q[2 * c], q[2 * c + 1]) = (lo, hi);
            }
            Q45 { d, dmin, sc, m, q }
        }

        /// Super-block `k` of activation row `x` against the unpacked block:
        /// `acc += d·d_x·Σ_j sc_j·Σ q·y` and `mins −= dmin·d_x·Σ_j m_j·(bsums of j)`.
        #[target_feature(enable = $features)]
        #[inline]
        fn apply_q45k(b: &Q45, x: &Q8Row, k: usize, acc: &mut __m256, mins: &mut f32) {
            let dx = x.d[k];
            let bsums: __m256i = cast(<[i16; 16]>::try_from(&x.bsums[16 * k..16 * k + 16]).expect("16"));
            let summ = hsum_i32(_mm256_madd_epi16(b.m, bsums));
            *mins -= b.dmin * dx * summ as f32;
            let y = &x.qs[256 * k..256 * k + 256];
            let mut sumi = _mm256_setzero_si256();
            for c in 0..4 {
                let ylo: __m256i = cast(<[i8; 32]>::try_from(&y[64 * c..64 * c + 32]).expect("32"));
                let yhi: __m256i = cast(<[i8; 32]>::try_from(&y[64 * c + 32..64 * c + 64]).expect("32"));
                let plo = _mm256_madd_epi16(
                    _mm256_set1_epi16(b.sc[2 * c]),
                    _mm256_maddubs_epi16(b.q[2 * c], ylo),
                );
                let phi = _mm256_madd_epi16(
                    _mm256_set1_epi16(b.sc[2 * c + 1]),
                    _mm256_maddubs_epi16(b.q[2 * c + 1], yhi),
                );
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(plo, phi));
            }
            *acc = _mm256_fmadd_ps(_mm256_set1_ps(b.d * dx), _mm256_cvtepi32_ps(sumi), *acc);
        }

        /// Q4_K or Q5_K row · Q8_K row.
        #[target_feature(enable = $features)]
        fn dot_q45k<const N: usize>(w: &[[u8; N]], x: &Q8Row, five: bool) -> f32 {
            let (mut acc, mut mins) = (_mm256_setzero_ps(), 0.0f32);
            for (k, b) in w.iter().enumerate() {
                apply_q45k(&unpack_q45k(b, five), x, k, &mut acc, &mut mins);
            }
            hsum(acc) + mins
        }

        /// Q4_K or Q5_K row · four Q8_K rows, each super-block unpacked once.
        #[target_feature(enable = $features)]
        fn dot4_q45k<const N: usize>(w: &[[u8; N]], x: &[Q8Row; 4], five: bool) -> [f32; 4] {
            let (mut a0, mut a1, mut a2, mut a3) = (
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
            );
            let mut mins = [0.0f32; 4];
            for (k, b) in w.iter().enumerate() {
                let u = unpack_q45k(b, five);
                apply_q45k(&u, &x[0], k, &mut a0, &mut mins[0]);
                apply_q45k(&u, &x[1], k, &mut a1, &mut mins[1]);
                apply_q45k(&u, &x[2], k, &mut a2, &mut mins[2]);
                apply_q45k(&u, &x[3], k, &mut a3, &mut mins[3]);
            }
            [
                hsum(a0) + mins[0],
                hsum(a1) + mins[1],
                hsum(a2) + mins[2],
                hsum(a3) + mins[3],
            ]
        }

        /// A Q6_K super-block unpacked: its scale, sixteen sub-block scales and, per
        /// 32 weights, the unsigned six bits `e` (the offset of 32 is taken off once
        /// per block through the activations' sums).
        struct Q6 {
            d: f32,
            sc: [i8; 16],
            /// The sixteen scales as 16-bit lanes, beside the activations' `bsums`.
            sc16: __m256i,
            e: [__m256i; 8],
        }

        #[target_feature(enable = $features)]
        #[inline]
        fn unpack_q6k(b: &[u8; 210]) -> Q6 {
            let m4 = _mm256_set1_epi8(0x0F);
            let m2 = _mm256_set1_epi8(0x03);
            let (ql, qh) = (&b[0..128], &b[128..192]);
            let sc: [i8; 16] = core::array::from_fn(|i| b[192 + i] as i8);
            let d = _mm_cvtss_f32(_mm256_castps256_ps128(scale8([b[208], b[209]])));
            let mut e = [_mm256_setzero_si256(); 8];
            for n in 0..2 {
                let l1 = cast::<[u8; 32], __m256i>(arr(&ql[64 * n..64 * n + 32]));
                let l2 = cast::<[u8; 32], __m256i>(arr(&ql[64 * n + 32..64 * n + 64]));
                let h = cast::<[u8; 32], __m256i>(arr(&qh[32 * n..32 * n + 32]));
                e[4 * n] = _mm256_or_si256(
                    _mm256_and_si256(l1, m4),
                    _mm256_slli_epi16::<4>(_mm256_and_si256(h, m2)),
                );
                e[4 * n + 1] = _mm256_or_si256(
                    _mm256_and_si256(l2, m4),
                    _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(h), m2)),
                );
                e[4 * n + 2] = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4),
                    _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(h), m2)),
                );
                e[4 * n + 3] = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(l2), m4),
                    _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(h), m2)),
                );
            }
            let sc16 = _mm256_cvtepi8_epi16(cast::<[i8; 16], __m128i>(sc));
            Q6 { d, sc, sc16, e }
        }

        /// Super-block `k` of activation row `x` against the unpacked block:
        /// `acc += d·d_x·(Σ_i sc_i·Σ e·y − 32·Σ_i sc_i·bsum_i)`.
        #[target_feature(enable = $features)]
        #[inline]
        fn apply_q6k(b: &Q6, x: &Q8Row, k: usize, acc: &mut __m256) {
            let y = &x.qs[256 * k..256 * k + 256];
            let bsums: __m256i = cast(<[i16; 16]>::try_from(&x.bsums[16 * k..16 * k + 16]).expect("16"));
            let offset = hsum_i32(_mm256_madd_epi16(b.sc16, bsums)) * 32;
            let mut sumi = _mm256_setzero_si256();
            for (j, e) in b.e.iter().enumerate() {
                // Elements 128n + 32i .. +32 (j = 4n + i): sub-blocks 8n + 2i and 8n + 2i + 1.
                let at = 128 * (j / 4) + 32 * (j % 4);
                let yv: __m256i = cast(<[i8; 32]>::try_from(&y[at..at + 32]).expect("32"));
                let s = at / 16;
                let scales = _mm256_set_m128i(_mm_set1_epi16(b.sc[s + 1] as i16), _mm_set1_epi16(b.sc[s] as i16));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(scales, _mm256_maddubs_epi16(*e, yv)));
            }
            let total = _mm256_sub_epi32(sumi, _mm256_setr_epi32(offset, 0, 0, 0, 0, 0, 0, 0));
            *acc = _mm256_fmadd_ps(_mm256_set1_ps(b.d * x.d[k]), _mm256_cvtepi32_ps(total), *acc);
        }

        /// Q6_K row · Q8_K row.
        #[target_feature(enable = $features)]
        fn dot_q6k(w: &[[u8; 210]], x: &Q8Row) -> f32 {
            let mut acc = _mm256_setzero_ps();
            for (k, b) in w.iter().enumerate() {
                apply_q6k(&unpack_q6k(b), x, k, &mut acc);
            }
            hsum(acc)
        }

        /// Q6_K row · four Q8_K rows, each super-block unpacked once.
        #[target_feature(enable = $features)]
        fn dot4_q6k(w: &[[u8; 210]], x: &[Q8Row; 4]) -> [f32; 4] {
            let (mut a0, mut a1, mut a2, mut a3) = (
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
            );
            for (k, b) in w.iter().enumerate() {
                let u = unpack_q6k(b);
                apply_q6k(&u, &x[0], k, &mut a0);
                apply_q6k(&u, &x[1], k, &mut a1);
                apply_q6k(&u, &x[2], k, &mut a2);
                apply_q6k(&u, &x[3], k, &mut a3);
            }
            [hsum(a0), hsum(a1), hsum(a2), hsum(a3)]
        }

        kquant_rows!(
            $features,
            144,
            |r, x| dot_q45k(r, x, false),
            |r, x| dot4_q45k(r, x, false),
            rows_q4k,
            rows4_q4k
        );
        kquant_rows!(
            $features,
            176,
            |r, x| dot_q45k(r, x, true),
            |r, x| dot4_q45k(r, x, true),
            rows_q5k,
            rows4_q5k
        );
        kquant_rows!(
            $features,
            210,
            |r, x| dot_q6k(r, x),
            |r, x| dot4_q6k(r, x),
            rows_q6k,
            rows4_q6k
        );
    };
}

/// The loops over weight rows of one K-quant format: `$rows` (one activation row)
/// and `$rows4` (four), from the format's dot and four-row dot.
macro_rules! kquant_rows {
    ($features:literal, $n:literal, |$r:ident, $x:ident| $dot:expr, |$r4:ident, $x4:ident| $dot4:expr, $rows:ident, $rows4:ident) => {
        #[doc = concat!("`out[o] = row o of w · x` for rows of ", stringify!($n), "-byte super-blocks.")]
        #[target_feature(enable = $features)]
        pub(crate) fn $rows(w: &[u8], row_bytes: usize, x: Q8Row, out: &mut [f32]) {
            for (i, (row, o)) in w.chunks_exact(row_bytes).zip(out).enumerate() {
                prefetch_ahead(w, (i + PREFETCH_ROWS) * row_bytes, row_bytes);
                let ($r, $x) = (row.as_chunks::<$n>().0, &x);
                *o = $dot;
            }
        }

        #[doc = concat!("`out[r][o] = row o of w · x[r]` for four activation rows, ", stringify!($n), "-byte super-blocks.")]
        #[target_feature(enable = $features)]
        pub(crate) fn $rows4(w: &[u8], row_bytes: usize, x: &[Q8Row; 4], out: [&mut [f32]; 4]) {
            let [o0, o1, o2, o3] = out;
            for (o, row) in w.chunks_exact(row_bytes).enumerate() {
                prefetch_ahead(w, (o + PREFETCH_ROWS) * row_bytes, row_bytes);
                let ($r4, $x4) = (row.as_chunks::<$n>().0, x);
                [o0[o], o1[o], o2[o], o3[o]] = $dot4;
            }
        }
    };
}
