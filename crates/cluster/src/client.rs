//! A gRPC client of the coordinator that carries the cluster token on every call.

use std::time::Duration;

use hetero_proto::auth::AttachToken;
use hetero_proto::coordinator_client::CoordinatorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::ClusterError;

/// The coordinator client type used everywhere.
pub type Client = CoordinatorClient<InterceptedService<Channel, AttachToken>>;

/// Normalises `host:port` to `http://host:port`.
pub fn endpoint_url(address: &str) -> String {
    if address.starts_with("http://") || address.starts_with("https://") {
        address.to_string()
    } else {
        format!("http://{address}")
    }
}

/// Connects to the coordinator at `address` with `token`.
pub async fn connect(address: &str, token: &str) -> Result<Client, ClusterError> {
    let url = endpoint_url(address);
    let fail = |message: String| ClusterError::Connect {
        address: address.to_string(),
        message,
    };
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| fail(format!("not an address: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let channel = endpoint.connect().await.map_err(|e| fail(e.to_string()))?;
    let attach = AttachToken::new(token).map_err(fail)?;
    Ok(CoordinatorClient::with_interceptor(channel, attach).max_decoding_message_size(64 << 20))
}
