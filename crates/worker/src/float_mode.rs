//! How a worker's threads treat subnormal floats: as zero.
//!
//! Training makes subnormal floats: for one, Adam's first moment of a parameter
//! whose gradient has become zero (a ReLU unit that no longer fires) shrinks by
//! 0.9 a step, and some hundreds of steps later it passes below f32's least
//! normal number (~1.2e-38). Every multiplication and
//! addition that touches such a subnormal takes a slow path on x86 — measured
//! here, the CNN's steps ran at half speed from its second epoch on. Flushing
//! subnormal results to zero (FTZ) and reading subnormal inputs as zero (DAZ), as
//! the GPU kernels and PyTorch's CPU kernels commonly do, changes values below
//! 1e-38 only: nothing a model's training can see.

/// Sets flush-to-zero and denormals-are-zero on this thread and on every thread
/// of the global rayon pool, which the CPU backend computes on. Call it before
/// anything uses that pool (it is built here, with `RAYON_NUM_THREADS` threads
/// as rayon would build it); once it exists, only this thread changes.
pub fn flush_subnormals() {
    on_this_thread();
    // An error means the pool already exists: nothing else to do then.
    let _ = rayon::ThreadPoolBuilder::new()
        .start_handler(|_| on_this_thread())
        .build_global();
}

/// FTZ and DAZ in this thread's MXCSR (x86-64; elsewhere nothing changes).
#[allow(unsafe_code)]
fn on_this_thread() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: MXCSR's FTZ (bit 15) and DAZ (bit 6) only change how this thread's
    // SSE/AVX arithmetic treats subnormals; every x86-64 CPU has both bits.
    #[allow(deprecated)]
    unsafe {
        use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
        _mm_setcsr(_mm_getcsr() | 0x8040);
    }
}

#[cfg(test)]
mod tests {
    use std::hint::black_box;

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn subnormals_become_zero_on_a_flushing_thread() {
        // On a thread of its own: the test harness's threads keep their mode.
        let (made, read, normal) = std::thread::spawn(|| {
            super::flush_subnormals();
            // 1e-20 × 1e-20 is 1e-40, subnormal: flushed to zero as it is made.
            let made = black_box(1e-20f32) * black_box(1e-20f32);
            // 1e-40 read as an input (a subnormal made without arithmetic).
            let read = black_box(f32::from_bits(0x0001_16c2)) * black_box(1.0f32);
            let normal = black_box(1e-18f32) * black_box(1e-18f32);
            (made, read, normal)
        })
        .join()
        .unwrap();
        assert_eq!((made, read), (0.0, 0.0));
        assert!(normal > 1e-37, "normal numbers are untouched: {normal}");
        // A thread that did not ask keeps its subnormals.
        assert!(black_box(1e-20f32) * black_box(1e-20f32) > 0.0);
    }
}
