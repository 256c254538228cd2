//! A gRPC client of the coordinator that carries the cluster token on every call.

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::auth::AttachToken;
use crate::coordinator_client::CoordinatorClient;

/// A call to the coordinator that failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect to the coordinator.
    #[error("cannot reach the coordinator at {address}: {message}")]
    Connect {
        /// The address tried.
        address: String,
        /// Why.
        message: String,
    },
    /// The coordinator's TLS certificate does not come from this token: the
    /// token is wrong (or the server is not Hetero's coordinator). Retrying
    /// cannot help.
    #[error("cannot reach the coordinator at {address}: {message}")]
    WrongToken {
        /// The address tried.
        address: String,
        /// Why.
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
}

impl ClientError {
    fn rpc(context: &str, status: tonic::Status) -> Self {
        ClientError::Rpc {
            context: context.into(),
            status: Box::new(status),
        }
    }
}

/// The coordinator client type used everywhere.
pub type Client = CoordinatorClient<InterceptedService<Channel, AttachToken>>;

/// How long one call may wait for the coordinator's answer.
pub const CALL_DEADLINE: Duration = Duration::from_secs(30);

/// The URL of a coordinator address: `host:port` (or `https://host:port`) is reached
/// over TLS, `http://host:port` in plaintext (a coordinator started with
/// `--insecure`).
pub fn endpoint_url(address: &str) -> String {
    if address.starts_with("http://") || address.starts_with("https://") {
        address.to_string()
    } else {
        format!("https://{address}")
    }
}

/// The environment variable naming an operator's certificate authority (a PEM
/// file) that every node trusts instead of the token's (`hetero coordinator
/// --tls-cert/--tls-key`). Agents pass it on to their workers.
pub const TLS_CA_ENV: &str = "HETERO_TLS_CA";

/// Whom a node trusts to be the coordinator.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The authority the cluster token derives ([`crate::tls`]).
    Token,
    /// An operator's authority (PEM), for the host name or address dialled.
    Authority(String),
}

impl Trust {
    /// [`Trust::Authority`] from the file [`TLS_CA_ENV`] names, if it names one.
    pub fn from_env() -> Result<Trust, String> {
        match std::env::var_os(TLS_CA_ENV) {
            None => Ok(Trust::Token),
            Some(path) => std::fs::read_to_string(&path)
                .map(Trust::Authority)
                .map_err(|e| format!("{TLS_CA_ENV}={}: {e}", path.to_string_lossy())),
        }
    }
}

/// Connects to the coordinator at `address` with `token`: over TLS, trusting only
/// the authority the token derives ([`crate::tls`]) or the operator's that
/// [`TLS_CA_ENV`] names, unless the address is `http://…`.
pub async fn connect(address: &str, token: &str) -> Result<Client, ClientError> {
    let trust = Trust::from_env().map_err(|message| ClientError::Connect {
        address: address.to_string(),
        message,
    })?;
    connect_trusting(address, token, &trust).await
}

/// [`connect`], trusting `trust`.
pub async fn connect_trusting(address: &str, token: &str, trust: &Trust) -> Result<Client, ClientError> {
    let url = endpoint_url(address);
    let fail = |message: String| ClientError::Connect {
        address: address.to_string(),
        message,
    };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| fail(format!("not an address: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        // Every call has a deadline: the coordinator answers each at once (a log
        // stream's answer is its first header; its lines follow outside it), so one
        // that takes this long is stalled and the caller hears so.
        .timeout(CALL_DEADLINE)
        .tcp_nodelay(true)
        // HTTP/2 pings: a coordinator that vanished (host down, link cut) fails the
        // calls waiting on it in about 30 s instead of leaving them hanging.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let tls = url.starts_with("https://");
    if tls {
        let config = match trust {
            Trust::Token => crate::tls::client_config(token),
            Trust::Authority(ca) => {
                // The name checked is the one dialled, as with any TLS server.
                let uri: tonic::transport::Uri = url.parse().map_err(|e| fail(format!("not an address: {e}")))?;
                let host = uri
                    .host()
                    .unwrap_or_default()
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                crate::tls::operator_client_config(ca, host)
            }
        };
        endpoint = endpoint
            .tls_config(config.map_err(fail)?)
            .map_err(|e| fail(format!("configuring TLS: {e}")))?;
    }
    // The connect timeout covers TCP only: a coordinator that is stopped still has
    // its connections accepted by the kernel, and the TLS and HTTP/2 handshakes
    // would wait for it forever.
    let connecting = tokio::time::timeout(CALL_DEADLINE, endpoint.connect())
        .await
        .map_err(|_| {
            fail(format!(
                "it accepted the connection but did not answer in {} s (stopped, hung or overloaded?)",
                CALL_DEADLINE.as_secs()
            ))
        })?;
    let channel = connecting.map_err(|e| {
        // tonic's own message is "transport error"; the cause says what happened.
        let mut why = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let s_text = s.to_string();
            if !why.contains(&s_text) {
                why = format!("{why}: {s_text}");
            }
            source = s.source();
        }
        fail(if !tls {
            why
        } else if why.contains("certificate") && matches!(trust, Trust::Authority(_)) {
            format!(
                "{why} — the coordinator's certificate is not signed by the authority in {TLS_CA_ENV} for this name"
            )
        } else if why.contains("certificate") {
            return ClientError::WrongToken {
                address: address.to_string(),
                message: format!(
                    "{why} — the coordinator's certificate does not come from this token: a wrong cluster \
                     token (or not Hetero's coordinator)"
                ),
            };
        } else {
            format!("{why} (a coordinator started with --insecure is reached as http://{address})")
        })
    })?;
    let attach = AttachToken::new(token).map_err(fail)?;
    Ok(CoordinatorClient::with_interceptor(channel, attach).max_decoding_message_size(64 << 20))
}

/// Submits a job spec (TOML text; relative paths resolve against `base_dir`) and
/// returns the job's id.
pub async fn submit(client: &mut Client, spec_toml: &str, base_dir: &str) -> Result<String, ClientError> {
    let req = crate::SubmitJobRequest {
        spec_toml: spec_toml.to_string(),
        base_dir: base_dir.to_string(),
    };
    Ok(client
        .submit_job(req)
        .await
        .map_err(|s| ClientError::rpc("submitting a job", s))?
        .into_inner()
        .job_id)
}

/// Polls `job_id` until `done` holds for it, for at most `timeout`.
pub async fn wait_for(
    client: &mut Client,
    job_id: &str,
    timeout: Duration,
    done: impl Fn(&crate::JobInfo) -> bool,
) -> Result<crate::JobInfo, ClientError> {
    let started = std::time::Instant::now();
    loop {
        let req = crate::GetJobRequest { job_id: job_id.into() };
        let info = client
            .get_job(req)
            .await
            .map_err(|s| ClientError::rpc("polling a job", s))?
            .into_inner();
        if done(&info) || started.elapsed() > timeout {
            return Ok(info);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a job has ended (succeeded, failed or cancelled).
pub fn has_ended(info: &crate::JobInfo) -> bool {
    info.state >= crate::JobState::Succeeded as i32
}

/// Every log line of `job_id` stored so far.
pub async fn log_texts(client: &mut Client, job_id: &str) -> Result<Vec<String>, ClientError> {
    let req = crate::StreamLogsRequest {
        job_id: job_id.into(),
        after_seq: 0,
        follow: false,
    };
    let mut stream = client
        .stream_logs(req)
        .await
        .map_err(|s| ClientError::rpc("reading a log", s))?
        .into_inner();
    let mut texts = Vec::new();
    while let Some(entry) = tokio_stream::StreamExt::next(&mut stream).await {
        texts.push(entry.map_err(|s| ClientError::rpc("reading a log", s))?.text);
    }
    Ok(texts)
}
