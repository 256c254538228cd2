//! How a worker process keeps its memory.
//!
//! A training step allocates and frees the same large activation buffers (megabytes
//! each) over and over. glibc's malloc hands buffers that large to `mmap` and back
//! to the kernel on free, so every step page-faults and zeroes them afresh: measured
//! here, that made the CNN's step ~17% slower than a loop whose buffers happened to
//! stay in the heap. Pinning malloc's thresholds keeps freed buffers for reuse, as
//! PyTorch's caching allocator does.

/// Makes freed large buffers stay in the process for reuse (glibc only; elsewhere
/// this does nothing).
///
/// The workspace denies `unsafe`; this one FFI call is the exception.
#[allow(unsafe_code)]
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; it is called before the
    // process starts any work, and any value is valid for these parameters.
    unsafe {
        // glibc's largest mmap threshold on 64-bit systems; larger values are refused.
        const MMAP_MAX: libc::c_int = 32 << 20;
        const ONE_GIB: libc::c_int = 1 << 30;
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_MAX);
        libc::mallopt(libc::M_TRIM_THRESHOLD, ONE_GIB);
    }
}
