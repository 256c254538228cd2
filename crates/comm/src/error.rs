//! The data plane's one error type: every failure says which peer and what happened.

use std::io;

/// A failure on the data plane.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// An I/O error while talking to a peer.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing, and with whom.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The peer closed the connection in the middle of a collective.
    #[error("peer {peer} closed the connection during {during}")]
    PeerClosed {
        /// The peer's address or rank.
        peer: String,
        /// The operation in progress.
        during: &'static str,
    },
    /// A frame announced a payload larger than the configured limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes (corrupt stream or wrong peer)")]
    FrameTooLarge {
        /// Announced length.
        len: u64,
        /// Configured maximum.
        max: u64,
    },
    /// The handshake failed: wrong token, wrong protocol, wrong job.
    #[error("data-plane handshake with {peer} failed: {reason}")]
    Handshake {
        /// The peer's address.
        peer: String,
        /// Why it failed.
        reason: String,
    },
    /// The peer sent something other than what the protocol expects next.
    #[error("protocol error from {peer}: {reason}")]
    Protocol {
        /// The peer's address or rank.
        peer: String,
        /// What was wrong.
        reason: String,
    },
    /// A sealed frame did not open: altered, replayed, reordered or sealed under
    /// another key. Nothing after it is read.
    #[error(
        "a frame from {peer} during {during} failed to authenticate (altered, replayed, out of order or \
         sealed under another key): the connection is closed"
    )]
    Tampered {
        /// The peer's address or rank.
        peer: String,
        /// The operation in progress.
        during: &'static str,
    },
    /// The caller asked for something the ring cannot do.
    #[error("invalid ring configuration: {0}")]
    Config(String),
}

impl CommError {
    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        CommError::Io {
            context: context.into(),
            source,
        }
    }
}
