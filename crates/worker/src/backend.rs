//! The compute device a worker runs on, chosen at run time through burn's
//! `Dispatch` backend: one binary drives whichever backends it was built with.
//!
//! This build drives `flex` (burn's pure-Rust CPU backend, with AVX-512 kernels
//! picked at run time). GPU backends (`cuda`, `rocm`, `vulkan`/`wgpu`) join behind
//! cargo features; `auto` then prefers them.

use burn::{Dispatch, DispatchDevice};
use hetero_job::Backend;

/// The backend every worker computes with.
pub type SystemBackend = Dispatch;
/// A device of [`SystemBackend`].
pub type SystemDevice = DispatchDevice;

/// The autodiff device for `backend`, and its name.
pub fn device(backend: Backend) -> (SystemDevice, &'static str) {
    match backend {
        Backend::Auto | Backend::Flex => (
            DispatchDevice::autodiff(DispatchDevice::Flex(burn::backend::flex::FlexDevice)),
            "flex",
        ),
    }
}
