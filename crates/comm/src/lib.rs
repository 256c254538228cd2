//! Hetero's data plane: tensors travel here, never through the gRPC control plane.
//!
//! Its modules, from the wire up:
//! - [`frame`]: length-prefixed frames on a TCP stream, with a size limit so a
//!   corrupt or hostile length cannot make us allocate gigabytes;
//! - [`handshake`]: a mutual HMAC challenge–response proving both ends hold the
//!   cluster token (the token itself never crosses the wire), which derives the
//!   connection's keys;
//! - [`link`]: the connection after it, each direction a half of its own, frames
//!   sealed with AES-256-GCM (or plain, where the operator trusts the link);
//! - [`ring`] and [`collectives`]: a ring of workers and the collectives built on it
//!   (bandwidth-optimal allreduce as reduce-scatter + all-gather, broadcast);
//! - [`mesh`]: every pair of ranks connected, with point-to-point transfers and
//!   collectives over any group of ranks (distributed inference);
//! - [`server`]: requests to a parameter server and its replies;
//! - [`liveness`]: time spent waiting on peers, kept apart from progress, so a
//!   watchdog can tell a stalled worker from the workers that wait for it.
//!
//! Everything is blocking `std::net`: a training worker is synchronous burn code and
//! needs no async runtime on its hot path.

pub mod background;
pub mod collectives;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod link;
pub mod liveness;
pub mod mesh;
pub mod precision;
pub mod ring;
pub mod server;

pub use error::CommError;
pub use mesh::Mesh;
pub use precision::Precision;
pub use ring::{Ring, RingConfig};
