//! The common 2×2, stride-2 max pool (no padding or dilation; odd edges dropped, as
//! floor mode does) and its gradient, as straight loops over pairs of rows, in
//! parallel over the planes. Outputs and flat `h·w` indices are those of burn's
//! general max pool (the first maximum wins).
//!
//! `unsafe` is allowed here for one reason: outputs are written into vectors'
//! spare capacity, their lengths set once every plane wrote all of its values.
#![allow(unsafe_code)]

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// The max pool of `planes` planes of `h × w` values (`x`, plane after plane):
/// each plane's `(h / 2) × (w / 2)` maxima and their indices within the plane.
pub fn max_pool_2x2(x: &[f32], planes: usize, h: usize, w: usize) -> (Vec<f32>, Vec<i64>) {
    let (oh, ow) = (h / 2, w / 2);
    let len = planes * oh * ow;
    let mut output: Vec<f32> = Vec::with_capacity(len);
    let mut indices: Vec<i64> = Vec::with_capacity(len);
    if len > 0 {
        assert!(
            x.len() >= planes * h * w,
            "max pool: {} values for {planes} planes of {h}×{w}",
            x.len()
        );
        let out = &mut output.spare_capacity_mut()[..len];
        let idx = &mut indices.spare_capacity_mut()[..len];
        x.par_chunks(h * w)
            .zip(out.par_chunks_mut(oh * ow).zip(idx.par_chunks_mut(oh * ow)))
            .for_each(|(src, (out, idx))| max_pool_2x2_plane(src, w, out, idx));
        // SAFETY: the planes cover all `len` outputs and each plane wrote all of its
        // `oh·ow` values and indices.
        unsafe {
            output.set_len(len);
            indices.set_len(len);
        }
    }
    (output, indices)
}

multiversioned! {
    /// One plane of [`max_pool_2x2`]: `src` is `[h, w]`, `out` and `idx` are
    /// `[h / 2, w / 2]`.
    fn max_pool_2x2_plane(src: &[f32], w: usize, out: &mut [MaybeUninit<f32>], idx: &mut [MaybeUninit<i64>]) {
        let ow = w / 2;
        if ow == 0 {
            return;
        }
        for (r, (out, idx)) in out.chunks_exact_mut(ow).zip(idx.chunks_exact_mut(ow)).enumerate() {
            let (top, bottom) = (&src[2 * r * w..][..2 * ow], &src[(2 * r + 1) * w..][..2 * ow]);
            let base = (2 * r * w) as i64;
            for q in 0..ow {
                let (a, b, c, d) = (top[2 * q], top[2 * q + 1], bottom[2 * q], bottom[2 * q + 1]);
                // The first maximum wins: a later candidate must be strictly larger.
                let (mut best, mut at) = (a, 0i64);
                if b > best {
                    (best, at) = (b, 1);
                }
                if c > best {
                    (best, at) = (c, w as i64);
                }
                if d > best {
                    (best, at) = (d, w as i64 + 1);
                }
                out[q].write(best);
                idx[q].write(base + 2 * q as i64 + at);
            }
        }
    }
}

/// The gradient of [`max_pool_2x2`] for `planes` planes of `h × w`: each plane
/// zeroed, then each window's gradient `grad` put at the index it recorded.
/// `None` when an index lies outside its window (the caller then scatters in
/// general).
pub fn max_unpool_2x2(grad: &[f32], indices: &[i64], planes: usize, h: usize, w: usize) -> Option<Vec<f32>> {
    let (oh, ow) = (h / 2, w / 2);
    if oh == 0 || ow == 0 {
        return None; // no windows: nothing of a 2×2 pool's to undo
    }
    let (len, out_plane) = (planes * h * w, oh * ow);
    if grad.len() < planes * oh * ow || indices.len() < planes * oh * ow {
        return None;
    }
    let mut dx: Vec<f32> = Vec::with_capacity(len);
    if len > 0 {
        let out = &mut dx.spare_capacity_mut()[..len];
        let all_inside = out
            .par_chunks_mut(h * w)
            .zip(grad.par_chunks(out_plane).zip(indices.par_chunks(out_plane)))
            .all(|(dx, (g, i))| max_unpool_2x2_plane(g, i, h, w, dx));
        if !all_inside {
            return None;
        }
        // SAFETY: every plane wrote all of its `h·w` values (it returned true).
        unsafe { dx.set_len(len) };
    }
    Some(dx)
}

/// One plane of [`max_unpool_2x2`]: all of `dx` (`[h, w]`) zeroed, then each
/// window's gradient put at its index (windows are disjoint, so nothing adds up);
/// false, with `dx` partly written, if an index is outside its window.
fn max_unpool_2x2_plane(grad: &[f32], indices: &[i64], h: usize, w: usize, dx: &mut [MaybeUninit<f32>]) -> bool {
    let (oh, ow) = (h / 2, w / 2);
    dx.fill(MaybeUninit::new(0.0));
    for r in 0..oh {
        for q in 0..ow {
            let (g, at) = (grad[r * ow + q], indices[r * ow + q]);
            let top_left = 2 * r * w + 2 * q;
            let Some(offset) = usize::try_from(at).ok().and_then(|at| at.checked_sub(top_left)) else {
                return false;
            };
            if !(offset < 2 || offset == w || offset == w + 1) {
                return false;
            }
            dx[top_left + offset].write(g);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_window_gives_its_first_maximum_and_the_gradient_goes_back_there() {
        let (planes, h, w) = (3, 5, 7);
        // Ties on purpose: values repeat every 4.
        let x: Vec<f32> = (0..planes * h * w).map(|i| ((i * 7) % 4) as f32).collect();
        let (y, idx) = max_pool_2x2(&x, planes, h, w);
        let (oh, ow) = (h / 2, w / 2);
        assert_eq!(y.len(), planes * oh * ow);
        for p in 0..planes {
            for r in 0..oh {
                for q in 0..ow {
                    let window = [
                        (2 * r) * w + 2 * q,
                        (2 * r) * w + 2 * q + 1,
                        (2 * r + 1) * w + 2 * q,
                        (2 * r + 1) * w + 2 * q + 1,
                    ];
                    let plane = &x[p * h * w..][..h * w];
                    let best = window.iter().map(|&i| plane[i]).fold(f32::MIN, f32::max);
                    let first = *window.iter().find(|&&i| plane[i] == best).unwrap();
                    let at = p * oh * ow + r * ow + q;
                    assert_eq!((y[at], idx[at]), (best, first as i64));
                }
            }
        }
        let grad: Vec<f32> = (0..y.len()).map(|i| i as f32 + 1.0).collect();
        let dx = max_unpool_2x2(&grad, &idx, planes, h, w).unwrap();
        assert_eq!(dx.iter().sum::<f32>(), grad.iter().sum::<f32>());
        for (at, (&g, &i)) in grad.iter().zip(&idx).enumerate() {
            let p = at / (oh * ow);
            assert_eq!(dx[p * h * w + i as usize], g);
        }
        let mut outside = idx.clone();
        outside[0] = 3 * w as i64;
        assert!(
            max_unpool_2x2(&grad, &outside, planes, h, w).is_none(),
            "an index outside its window"
        );
    }
}
