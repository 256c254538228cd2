//! Serving placed models: what the user asks for and a rank's part of the model
//! ([`placing`]), the front of an inference mesh and how it meets the other ranks
//! ([`front`]), how it settles `--placement auto` ([`auto`]), the
//! ranks that follow it ([`worker`]: `hetero infer-worker` and an inference
//! job's workers), and the OpenAI-compatible HTTP API in front of it
//! ([`server`]), with its request checks ([`requests`]) and figures ([`metrics`]). `hetero infer`, `hetero serve` and `hetero bench infer` are this
//! crate behind the command line's argument parsing.

pub mod auth;
pub mod auto;
pub(crate) mod batcher;
pub mod front;
pub mod memory;
pub mod metrics;
pub mod placing;
pub mod requests;
pub mod server;
pub mod worker;

/// The backend inference runs on.
pub type InferBackend = burn::backend::Flex;
