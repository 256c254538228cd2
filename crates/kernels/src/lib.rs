//! Matrix products on quantized weights, for Hetero's CPU inference.
//!
//! Weights stay in the block formats of their GGUF file ([`QType`]): a worker's memory
//! is about the size of the tensors it holds, and decoding one token streams those
//! bytes once — the bound on decode speed. A product quantizes its activations per
//! block to signed bytes ([`ActType`], as llama.cpp does) so each block of weights
//! meets its activations in one integer dot product.
//!
//! - [`QMatrix`]: a weight matrix in file format, sliced by whole rows or whole blocks.
//! - [`QActs`]: activations quantized for a product, in buffers reused across calls.
//! - [`Kernels`]: the products, in the widest instruction set the CPU has (AVX-512
//!   VNNI, AVX2, or plain Rust; see [`Level`]), threaded on a persistent [`Pool`]; a
//!   prompt's products ([`Kernels::for_prompt`]) on Intel's tile unit where there is one.
//!
//! And [`dense`]: the f32 kernels of training (convolution, pooling, attention,
//! layer norm, activations) that burn's flex backend calls through Hetero's hooks.
//!
//! Workspace lints deny `unsafe`; a few modules allow it, each saying why in its doc:
//! `dispatch` and `dense::multiversion` (calling `#[target_feature]` kernels), `pool`
//! (handing a borrowed job to helper threads), `bytes` (memory-mapping model files),
//! `simd::amx` (the tile unit's instructions, in inline assembly), and
//! `dense::{maps, conv, pool, layer_norm}` (outputs written into spare capacity
//! before a vector's length is set; `gemm`'s pointer-and-stride entry point).

mod acts;
mod bytes;
pub mod dense;
mod dispatch;
mod formats;
mod matmul;
mod matrix;
pub mod ops;
mod pool;
mod rewrite;
mod rowwise;
mod simd;
#[cfg(target_arch = "x86_64")]
mod tiles;
mod types;

pub use acts::{ActRow, Q8Row, QActs};
pub use bytes::Bytes;
pub use dispatch::Level;
pub use formats::{dequantize, quantize};
pub use matmul::{AttentionShape, CacheRows, Kernels, MAX_MATRICES};
pub use matrix::QMatrix;
pub use pool::{MAX_THREADS, Pool};
pub use rowwise::RowWork;
pub use types::{ActType, QType};

/// What went wrong, naming the tensor or shape involved.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A length or cut that is not whole blocks of the format.
    #[error("{what} is not whole {ty} blocks of {} weights", ty.block_elems())]
    NotBlockAligned {
        /// What was cut.
        what: String,
        /// The format.
        ty: QType,
    },
    /// Activations whose row length is not whole blocks of their format.
    #[error("rows of {cols} activations are not whole {ty:?} blocks of {}", ty.block_elems())]
    ActsNotBlockAligned {
        /// Activations per row.
        cols: usize,
        /// The activation format.
        ty: ActType,
    },
    /// Bytes or values of the wrong length.
    #[error("{what}: expected {expected}, got {got}")]
    Length {
        /// What was measured.
        what: String,
        /// The length it must have.
        expected: usize,
        /// The length it had.
        got: usize,
    },
    /// Shapes that do not fit together.
    #[error("shapes do not fit: {0}")]
    Shape(String),
    /// A size past what this machine can address.
    #[error("{0} is too large")]
    TooLarge(String),
    /// A file that cannot be read or mapped.
    #[error("{0}")]
    Io(String),
}
