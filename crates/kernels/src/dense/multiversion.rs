//! Compiling one body for several instruction sets and running the widest the CPU
//! has, and the small register-level helpers such bodies share.
//!
//! `unsafe` is allowed here for two reasons: calling a `#[target_feature]`
//! function, which is sound only on a CPU with those features — each call is
//! guarded by the run-time check just before it; and [`uninit`], a view of
//! initialised values that kernels only write through.
#![allow(unsafe_code)]

/// Defines `fn name(args)` whose body is compiled three times — AVX-512, AVX2 + FMA
/// and the baseline — and run in the widest version this CPU has. The body is an
/// `#[inline(always)]` function, so everything it calls inline is compiled for
/// that unit too (a closure handed to a `#[target_feature]` function is not
/// reliably inlined into it once it is large). Inside, `FMA` says whether the
/// version may use fused multiply-adds ([`madd`]).
macro_rules! multiversioned {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(dead_code)]
            fn body<const FMA: bool>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(unsafe_code)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body::<true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(unsafe_code)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body::<true>($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F, checked just above.
                    #[allow(unsafe_code)]
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA, checked just above.
                    #[allow(unsafe_code)]
                    return unsafe { avx2($($arg),*) };
                }
            }
            body::<false>($($arg),*)
        }
    };
}

/// `a · b + c`, fused into one instruction where `FMA` (a version compiled with
/// FMA); a plain multiply and add otherwise, where `mul_add` would call libm.
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `lanes` reduced by `op` as a tree (halves, then quarters, ...): four steps of
/// shuffles where a left-to-right fold is a chain of sixteen dependent scalar
/// operations (in attention's softmax, they cost more than a row's products).
#[inline(always)]
pub(crate) fn tree(mut lanes: [f32; 16], op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut half = 8;
    while half > 0 {
        for l in 0..half {
            lanes[l] = op(lanes[l], lanes[l + half]);
        }
        half /= 2;
    }
    lanes[0]
}

/// `Σ a[i]·b[i]` (equal lengths) in 16 lanes over whole blocks, so it runs in
/// vector registers (one f32 running sum stays scalar); the lanes reduced as a
/// [`tree`], then the rest added. Call it from a `multiversioned!` body.
#[inline(always)]
pub(crate) fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (blocks_a, blocks_b) = (a.chunks_exact(16), b.chunks_exact(16));
    let rest: f32 = blocks_a
        .remainder()
        .iter()
        .zip(blocks_b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in blocks_a.zip(blocks_b) {
        for l in 0..16 {
            lanes[l] = madd::<FMA>(x[l], y[l], lanes[l]);
        }
    }
    tree(lanes, |x, y| x + y) + rest
}

/// Runs `f(first, count)` over contiguous chunks of `0..n`, one per rayon thread,
/// and returns what each returned, in order.
pub(crate) fn by_chunks<R: Send>(n: usize, f: impl Fn(usize, usize) -> R + Sync) -> Vec<R> {
    use rayon::prelude::*;
    let chunks = rayon::current_num_threads().clamp(1, n.max(1));
    let size = n.div_ceil(chunks).max(1);
    (0..n.div_ceil(size))
        .into_par_iter()
        .map(|i| f(i * size, size.min(n - i * size)))
        .collect()
}

/// Runs `f(first, out_chunk)` over contiguous chunks of `0..n`, one per rayon
/// thread, each writing its own items' part of `out` (`per_item` values each).
pub(crate) fn for_chunks<T: Send>(n: usize, out: &mut [T], per_item: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    use rayon::prelude::*;
    if out.is_empty() || per_item == 0 {
        return;
    }
    let chunks = rayon::current_num_threads().clamp(1, n.max(1));
    let size = n.div_ceil(chunks).max(1);
    out.par_chunks_mut(size * per_item)
        .enumerate()
        .for_each(|(i, chunk)| f(i * size, chunk));
}

/// `values` seen as possibly uninitialised, for a kernel that only writes.
pub(crate) fn uninit(values: &mut [f32]) -> &mut [std::mem::MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and every value written through
    // it is an initialised f32, so `values` stays initialised.
    unsafe { &mut *(values as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) }
}
