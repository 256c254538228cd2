//! The wide tile of the AVX-512 level: four weight rows × four activation rows of a
//! signed legacy format (Q4_0, Q5_0, Q8_0), for prefill.
//!
//! ## Design
//! The tile of `x86.rs` is two weight rows × four activation rows because AVX2 has
//! sixteen vector registers; AVX-512 has thirty-two, room for sixteen accumulators,
//! so each activation block is loaded once for four weight rows instead of two.
//!
//! It also drops the sign trick. `vpdpbusd` multiplies *unsigned* by signed bytes, so
//! a signed × signed product costs two `vpsignb` besides the `vpdpbusd`, per product.
//! Here the weight bytes are made unsigned once per block (`q ^ 0x80` is `q + 128`)
//! and `128·Σy` is taken off as the starting value of each product:
//! `Σ (q + 128)·y − 128·Σy = Σ q·y`. The starts belong to the activations, so they
//! are made once per activation block when the row is quantized
//! ([`Q8Row::starts`], one per lane of four bytes) rather than once per weight block
//! and tile — a fifth of the tile's `vpdpbusd`s. Both are exact integer sums of the
//! same four bytes per lane, so every lane — and, with the blocks accumulated in the
//! dot's order (`acc += (d_w·d_x)·Σq·y`), every output — has the bits the
//! row-at-a-time dot gives it. (AVX2's `maddubs` would saturate on `(q + 128)·y`,
//! which is why this tile is the VNNI level's alone.)

/// `acc += (d_w·d_x)·Σ q·y` for one weight block made unsigned (`q`) and one
/// activation block (its start `s`, its bytes `y`); `$dd` holds the four weight blocks'
/// `d_w·d_x` in each 128-bit half, and `$lane` picks this block's.
macro_rules! wide_step {
    ($acc:ident, $dd:ident, $lane:literal, $s:ident, $q:ident, $y:ident) => {
        $acc = _mm256_fmadd_ps(
            _mm256_permute_ps::<{ $lane * 0x55 }>($dd),
            _mm256_cvtepi32_ps(_mm256_dpbusd_epi32($s, $q, $y)),
            $acc,
        );
    };
}

/// Defines `$rows4w`, the wide-tile version of `$rows4` for a signed legacy format
/// whose blocks are `$n` bytes and unpack with `$unpack`.
macro_rules! wide_tile {
    ($features:literal, $n:literal, $unpack:ident, $dot16:ident, $rows4:ident, $rows4w:ident) => {
        /// Four weight rows × four activation rows, sixteen named accumulators (an
        /// array of them was kept in memory by the compiler).
        #[target_feature(enable = $features)]
        fn $dot16(w: [&[[u8; $n]]; 4], x: &[Q8Row; 4]) -> [[f32; 4]; 4] {
            let n = w[0].len();
            let [w0, w1, w2, w3] = w.map(|w| &w[..n]);
            let [x0, x1, x2, x3] = x;
            let (y0, y1, y2, y3) = (
                &x0.qs.as_chunks::<32>().0[..n],
                &x1.qs.as_chunks::<32>().0[..n],
                &x2.qs.as_chunks::<32>().0[..n],
                &x3.qs.as_chunks::<32>().0[..n],
            );
            let (e0, e1, e2, e3) = (&x0.d[..n], &x1.d[..n], &x2.d[..n], &x3.d[..n]);
            let (t0, t1, t2, t3) = (
                &x0.starts.as_chunks::<8>().0[..n],
                &x1.starts.as_chunks::<8>().0[..n],
                &x2.starts.as_chunks::<8>().0[..n],
                &x3.starts.as_chunks::<8>().0[..n],
            );
            let flip = _mm256_set1_epi8(0x80u8 as i8);
            let z = _mm256_setzero_ps();
            let (mut a00, mut a01, mut a02, mut a03) = (z, z, z, z);
            let (mut a10, mut a11, mut a12, mut a13) = (z, z, z, z);
            let (mut a20, mut a21, mut a22, mut a23) = (z, z, z, z);
            let (mut a30, mut a31, mut a32, mut a33) = (z, z, z, z);
            for k in 0..n {
                let (_, _, q0) = $unpack(&w0[k]);
                let (_, _, q1) = $unpack(&w1[k]);
                let (_, _, q2) = $unpack(&w2[k]);
                let (_, _, q3) = $unpack(&w3[k]);
                let (q0, q1, q2, q3) = (
                    _mm256_xor_si256(q0, flip),
                    _mm256_xor_si256(q1, flip),
                    _mm256_xor_si256(q2, flip),
                    _mm256_xor_si256(q3, flip),
                );
                // The four weight scales (each block's first two bytes) in one conversion;
                // `d_w·d_x` for the four in one product per activation row — the same
                // float product the row-at-a-time dot takes lane by lane.
                let halves = [&w0[k], &w1[k], &w2[k], &w3[k]].map(|b| u16::from_le_bytes([b[0], b[1]]));
                let dw = _mm_cvtph_ps(cast::<[u16; 8], __m128i>([
                    halves[0], halves[1], halves[2], halves[3], 0, 0, 0, 0,
                ]));
                let dd = |e: f32| {
                    let v = _mm_mul_ps(dw, _mm_set1_ps(e));
                    _mm256_set_m128(v, v)
                };
                let (y, s) = (cast(y0[k]), cast(t0[k]));
                let d = dd(e0[k]);
                wide_step!(a00, d, 0, s, q0, y);
                wide_step!(a10, d, 1, s, q1, y);
                wide_step!(a20, d, 2, s, q2, y);
                wide_step!(a30, d, 3, s, q3, y);
                let (y, s) = (cast(y1[k]), cast(t1[k]));
                let d = dd(e1[k]);
                wide_step!(a01, d, 0, s, q0, y);
                wide_step!(a11, d, 1, s, q1, y);
                wide_step!(a21, d, 2, s, q2, y);
                wide_step!(a31, d, 3, s, q3, y);
                let (y, s) = (cast(y2[k]), cast(t2[k]));
                let d = dd(e2[k]);
                wide_step!(a02, d, 0, s, q0, y);
                wide_step!(a12, d, 1, s, q1, y);
                wide_step!(a22, d, 2, s, q2, y);
                wide_step!(a32, d, 3, s, q3, y);
                let (y, s) = (cast(y3[k]), cast(t3[k]));
                let d = dd(e3[k]);
                wide_step!(a03, d, 0, s, q0, y);
                wide_step!(a13, d, 1, s, q1, y);
                wide_step!(a23, d, 2, s, q2, y);
                wide_step!(a33, d, 3, s, q3, y);
            }
            [
                [hsum(a00), hsum(a01), hsum(a02), hsum(a03)],
                [hsum(a10), hsum(a11), hsum(a12), hsum(a13)],
                [hsum(a20), hsum(a21), hsum(a22), hsum(a23)],
                [hsum(a30), hsum(a31), hsum(a32), hsum(a33)],
            ]
        }

        /// `$rows4` in wide tiles: four weight rows at a time, the last one to
        /// three by the narrow tile.
        #[target_feature(enable = $features)]
        pub(crate) fn $rows4w(w: &[u8], row_bytes: usize, x: &[Q8Row; 4], out: [&mut [f32]; 4]) {
            let [o0, o1, o2, o3] = out;
            let mut quads = w.chunks_exact(4 * row_bytes);
            for (i, four) in (&mut quads).enumerate() {
                let rows = [0, 1, 2, 3].map(|j| four[j * row_bytes..(j + 1) * row_bytes].as_chunks::<$n>().0);
                let t = $dot16(rows, x);
                for (j, [a, b, c, d]) in t.into_iter().enumerate() {
                    let o = 4 * i + j;
                    [o0[o], o1[o], o2[o], o3[o]] = [a, b, c, d];
                }
            }
            let rest = quads.remainder();
            if !rest.is_empty() {
                let done = (w.len() - rest.len()) / row_bytes;
                $rows4(
                    rest,
                    row_bytes,
                    x,
                    [&mut o0[done..], &mut o1[done..], &mut o2[done..], &mut o3[done..]],
                );
            }
        }
    };
}
