//! The compute device a worker runs on, chosen at run time through burn's
//! `Dispatch` backend: one binary drives whichever backends it was built with.
//!
//! This build drives `flex` (burn's pure-Rust CPU backend, with AVX-512 kernels
//! picked at run time) and `ndarray` (burn's older CPU backend: an unlike second
//! backend for heterogeneous tests). GPU backends (`cuda`, `rocm`, `vulkan`/`wgpu`) join behind
//! cargo features; `auto` then prefers them.

use burn::{Dispatch, DispatchDevice};
use hetero_job::Backend;

/// The backend every worker computes with.
pub type SystemBackend = Dispatch;
/// A device of [`SystemBackend`].
pub type SystemDevice = DispatchDevice;

/// The autodiff device for `backend`, and its name. `auto` is the fastest backend
/// this build drives (today `flex`).
pub fn device(backend: Backend) -> (SystemDevice, &'static str) {
    match backend {
        Backend::Auto | Backend::Flex => (
            DispatchDevice::autodiff(DispatchDevice::Flex(burn::backend::flex::FlexDevice)),
            "flex",
        ),
        Backend::Ndarray => (
            DispatchDevice::autodiff(DispatchDevice::NdArray(burn::backend::ndarray::NdArrayDevice::Cpu)),
            "ndarray",
        ),
    }
}

/// The backend a worker runs on: the job's choice, unless it said `auto` and its
/// agent's group names one (`HETERO_BACKEND`), which lets one job mix backends.
pub fn choose(job: Backend, group: Option<&str>) -> Result<Backend, String> {
    match (job, group) {
        (Backend::Auto, Some(name)) => Backend::from_name(name)
            .ok_or_else(|| format!("HETERO_BACKEND={name:?} is not a backend this build drives (flex, ndarray)")),
        (b, _) => Ok(b),
    }
}

/// Measured matmul throughput of `backend` with this process's threads, in GFLOP/s: the
/// capability profile an agent reports when it registers.
pub fn measure_gflops(backend: Backend) -> f32 {
    use burn::prelude::*;
    let (device, _) = device(backend);
    let n = 256;
    let a = Tensor::<SystemBackend, 2>::ones([n, n], &device);
    let b = Tensor::<SystemBackend, 2>::ones([n, n], &device);
    let _ = a.clone().matmul(b.clone()).into_data(); // warm-up
    let started = std::time::Instant::now();
    let mut rounds = 0u32;
    while started.elapsed() < std::time::Duration::from_millis(300) {
        let _ = a.clone().matmul(b.clone()).into_data();
        rounds += 1;
    }
    let flops = 2.0 * (n * n * n) as f64 * rounds as f64;
    (flops / started.elapsed().as_secs_f64() / 1e9) as f32
}
