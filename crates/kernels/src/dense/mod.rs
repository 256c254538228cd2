//! f32 kernels for training on the CPU: the hot operations of the models Hetero
//! trains, on plain slices, called by burn's flex backend through the hooks in
//! `vendor/burn-flex` (see `vendor/README.md` and `vendor/patches/`).
//!
//! - [`maps`]: element-wise exp, GELU and its gradient, ReLU and its gradient,
//!   vectorised for the CPU at hand and split over threads;
//! - [`conv`]: a 2-D convolution and its three gradients as im2col + GEMM;
//! - [`pool`]: the 2×2, stride-2 max pool and its gradient;
//! - [`attention`]: fused scaled-dot-product attention, forward and backward;
//! - [`layer_norm`]: layer normalisation's gradients in one sweep.
//!
//! Each is compiled for AVX-512, AVX2 + FMA and the baseline and picked at run time
//! (`multiversioned!`), and threaded with rayon (flex's pool). Every reduction adds
//! its partial sums in a fixed order, so results do not depend on the thread count
//! (exact checkpoint resume relies on it). Checked here against plain formulas, and
//! through flex against burn's own operations in `crates/models/tests/cpu_kernels.rs`.

#[macro_use]
mod multiversion;

pub mod attention;
pub mod conv;
pub mod layer_norm;
pub mod maps;
pub mod pool;
