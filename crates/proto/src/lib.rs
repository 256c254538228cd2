//! Hetero's control-plane protocol: the generated gRPC types, the token check, and
//! the client every node (agents, workers, the CLI) reaches the coordinator with.
//!
//! **Invariant:** this is the only crate that names tonic or prost types in its
//! public API for the protocol; the coordinator and agent convert at their edges.
//! Tensors never travel through these messages.

#![allow(missing_docs)] // generated code

/// Generated messages and services of `proto/hetero.proto`.
pub mod v1 {
    tonic::include_proto!("hetero.v1");
}

pub mod auth;
pub mod client;
pub mod tls;

pub use v1::*;

/// Version of the control-plane protocol; agents of another version are refused.
pub const PROTOCOL_VERSION: u32 = 1;
