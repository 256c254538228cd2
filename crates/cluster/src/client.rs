//! A gRPC client of the coordinator that carries the cluster token on every call.

use std::time::Duration;

use hetero_proto::auth::AttachToken;
use hetero_proto::coordinator_client::CoordinatorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::ClusterError;

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

/// Connects to the coordinator at `address` with `token`: over TLS, trusting only
/// the authority the token derives ([`hetero_proto::tls`]), unless the address is
/// `http://…`.
pub async fn connect(address: &str, token: &str) -> Result<Client, ClusterError> {
    let url = endpoint_url(address);
    let fail = |message: String| ClusterError::Connect {
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
        endpoint = endpoint
            .tls_config(hetero_proto::tls::client_config(token).map_err(fail)?)
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
        } else if why.contains("certificate") {
            format!(
                "{why} — the coordinator's certificate does not come from this token: a wrong cluster \
                 token (or not Hetero's coordinator)"
            )
        } else {
            format!("{why} (a coordinator started with --insecure is reached as http://{address})")
        })
    })?;
    let attach = AttachToken::new(token).map_err(fail)?;
    Ok(CoordinatorClient::with_interceptor(channel, attach).max_decoding_message_size(64 << 20))
}

/// Submits a job spec (TOML text; relative paths resolve against `base_dir`) and
/// returns the job's id.
pub async fn submit(client: &mut Client, spec_toml: &str, base_dir: &str) -> Result<String, ClusterError> {
    let req = hetero_proto::SubmitJobRequest {
        spec_toml: spec_toml.to_string(),
        base_dir: base_dir.to_string(),
    };
    Ok(client
        .submit_job(req)
        .await
        .map_err(|s| ClusterError::rpc("submitting a job", s))?
        .into_inner()
        .job_id)
}

/// Polls `job_id` until `done` holds for it, for at most `timeout`.
pub async fn wait_for(
    client: &mut Client,
    job_id: &str,
    timeout: Duration,
    done: impl Fn(&hetero_proto::JobInfo) -> bool,
) -> Result<hetero_proto::JobInfo, ClusterError> {
    let started = std::time::Instant::now();
    loop {
        let req = hetero_proto::GetJobRequest { job_id: job_id.into() };
        let info = client
            .get_job(req)
            .await
            .map_err(|s| ClusterError::rpc("polling a job", s))?
            .into_inner();
        if done(&info) || started.elapsed() > timeout {
            return Ok(info);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a job has ended (succeeded, failed or cancelled).
pub fn has_ended(info: &hetero_proto::JobInfo) -> bool {
    info.state >= hetero_proto::JobState::Succeeded as i32
}

/// Every log line of `job_id` stored so far.
pub async fn log_texts(client: &mut Client, job_id: &str) -> Result<Vec<String>, ClusterError> {
    let req = hetero_proto::StreamLogsRequest {
        job_id: job_id.into(),
        after_seq: 0,
        follow: false,
    };
    let mut stream = client
        .stream_logs(req)
        .await
        .map_err(|s| ClusterError::rpc("reading a log", s))?
        .into_inner();
    let mut texts = Vec::new();
    while let Some(entry) = tokio_stream::StreamExt::next(&mut stream).await {
        texts.push(entry.map_err(|s| ClusterError::rpc("reading a log", s))?.text);
    }
    Ok(texts)
}
