//! The cluster crate's error type.

/// A failure of the coordinator, the agent or the store.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The embedded store failed.
    #[error("store {path}: {message}")]
    Store {
        /// Database file.
        path: String,
        /// What failed.
        message: String,
    },
    /// A gRPC call failed.
    #[error("{context}: {status}")]
    Rpc {
        /// What we were doing.
        context: String,
        /// The status returned.
        status: Box<tonic::Status>,
    },
    /// Could not connect to the coordinator.
    #[error("cannot reach the coordinator at {address}: {message}")]
    Connect {
        /// The address tried.
        address: String,
        /// Why.
        message: String,
    },
    /// Local I/O (spawning workers, writing files, binding ports).
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl ClusterError {
    /// Wraps a gRPC status with context.
    pub fn rpc(context: impl Into<String>, status: tonic::Status) -> Self {
        ClusterError::Rpc {
            context: context.into(),
            status: Box::new(status),
        }
    }

    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ClusterError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<hetero_proto::client::ClientError> for ClusterError {
    fn from(e: hetero_proto::client::ClientError) -> Self {
        use hetero_proto::client::ClientError;
        match e {
            ClientError::Connect { address, message } | ClientError::WrongToken { address, message } => {
                ClusterError::Connect { address, message }
            }
            ClientError::Rpc { context, status } => ClusterError::Rpc { context, status },
        }
    }
}
