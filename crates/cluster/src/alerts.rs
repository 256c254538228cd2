//! Alerts: what an operator must know (a node went silent or died, a job failed).
//!
//! Every alert is stored (so `hetero alerts` lists it after a restart), logged, and —
//! when the coordinator has a webhook — POSTed there as JSON by a background task
//! that retries with back-off and never blocks the coordinator. An `https://`
//! webhook's certificate is verified (Mozilla's roots, built in, and the operator's
//! CA file when given); an `http://` one travels in clear.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// One alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    /// Increasing id.
    pub id: u64,
    /// When (Unix ms).
    pub unix_ms: i64,
    /// How much it matters.
    pub severity: Severity,
    /// The node or job it is about.
    pub subject: String,
    /// What happened.
    pub message: String,
}

/// How much an alert matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Something an operator may like to know (a node came back, ranks rejoined).
    Info,
    /// Something went wrong and was handled (a worker lost, a job failed).
    Warning,
    /// Something needs an operator (a node is dead).
    Critical,
}

impl Severity {
    /// Its name, as stored, sent and printed.
    pub fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// A webhook URL we can deliver to: `https://host[:port]/path` (verified against
/// the public web's roots, and the operator's own CA when given) or
/// `http://host[:port]/path`.
#[derive(Clone)]
pub struct Webhook {
    host: String,
    port: u16,
    path: String,
    /// `Some` for `https://`: what the server's certificate is checked against.
    tls: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        write!(f, "Webhook({scheme}://{}:{}{})", self.host, self.port, self.path)
    }
}

impl Webhook {
    /// Parses an `http://` or `https://` URL; an `https://` one trusts the public
    /// web's certificate authorities (Mozilla's list, built in).
    pub fn parse(url: &str) -> Result<Webhook, String> {
        Webhook::parse_with_ca(url, None)
    }

    /// [`Webhook::parse`], an `https://` URL also trusting the certificates in the
    /// PEM file `ca` (a company's own authority, or the server's self-signed one).
    pub fn parse_with_ca(url: &str, ca: Option<&Path>) -> Result<Webhook, String> {
        let (rest, tls, default_port) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
            (Some(rest), _) => (rest, true, 443),
            (None, Some(rest)) => (rest, false, 80),
            _ => return Err(format!("alert webhook {url:?}: an http:// or https:// URL")),
        };
        if ca.is_some() && !tls {
            return Err(format!("alert webhook {url:?}: a CA file is for https:// URLs"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse()
                    .map_err(|_| format!("alert webhook {url:?}: bad port {p:?}"))?,
            ),
            None => (authority.to_string(), default_port),
        };
        if host.is_empty() {
            return Err(format!("alert webhook {url:?}: no host"));
        }
        let tls = match tls {
            false => None,
            true => {
                ServerName::try_from(host.clone()).map_err(|e| format!("alert webhook {url:?}: host {host:?}: {e}"))?;
                Some(Arc::new(client_config(ca)?))
            }
        };
        Ok(Webhook { host, port, path, tls })
    }

    /// POSTs `body` as JSON; succeeds on a 2xx answer.
    pub async fn post(&self, body: &str) -> Result<(), String> {
        let request = format!(
            "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.path,
            self.host,
            self.port,
            body.len()
        );
        let attempt = async {
            let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            match &self.tls {
                None => exchange(stream, &request).await,
                Some(config) => {
                    let name = ServerName::try_from(self.host.clone()).map_err(|e| e.to_string())?;
                    let stream = tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name, stream)
                        .await
                        .map_err(|e| format!("TLS with {}: {e}", self.host))?;
                    exchange(stream, &request).await
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), attempt)
            .await
            .map_err(|_| "timed out".to_string())?
    }
}

/// The roots an `https://` webhook's certificate is checked against: Mozilla's, and
/// those in `ca`.
fn client_config(ca: Option<&Path>) -> Result<ClientConfig, String> {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = ca {
        let certs = CertificateDer::pem_file_iter(ca)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("reading the webhook CA file {}: {e}", ca.display()))?;
        if certs.is_empty() {
            return Err(format!("the webhook CA file {} holds no certificate", ca.display()));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("the webhook CA file {}: {e}", ca.display()))?;
        }
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Sends `request` on `stream` and reads the status line of the answer.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, request: &str) -> Result<(), String> {
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut head = [0u8; 12];
    stream
        .read_exact(&mut head)
        .await
        .map_err(|e| format!("no answer: {e}"))?;
    let status = std::str::from_utf8(&head[9..12]).unwrap_or("?").to_string();
    if status.starts_with('2') {
        Ok(())
    } else {
        Err(format!("answered HTTP {status}"))
    }
}

/// Delivers queued alerts to `hook` in order, retrying each with back-off
/// (0.5 s doubling to 30 s, 10 tries) before giving up on it.
pub async fn deliver(hook: Webhook, mut alerts: mpsc::UnboundedReceiver<AlertRecord>) {
    while let Some(alert) = alerts.recv().await {
        let body = serde_json::to_string(&alert).expect("alerts serialise");
        let mut wait = Duration::from_millis(500);
        for attempt in 1..=10 {
            match hook.post(&body).await {
                Ok(()) => break,
                Err(e) if attempt == 10 => {
                    tracing::error!(alert = alert.id, error = %e, "gave up delivering an alert to the webhook")
                }
                Err(e) => {
                    tracing::warn!(alert = alert.id, attempt, error = %e, "alert webhook failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_and_https_urls() {
        let h = Webhook::parse("http://127.0.0.1:9000/alerts").unwrap();
        assert_eq!(
            (h.host.as_str(), h.port, h.path.as_str(), h.tls.is_some()),
            ("127.0.0.1", 9000, "/alerts", false)
        );
        assert_eq!(Webhook::parse("http://example.org").unwrap().port, 80);
        let s = Webhook::parse("https://hooks.example.org/x").unwrap();
        assert_eq!((s.port, s.tls.is_some()), (443, true));
        assert!(
            Webhook::parse("ftp://example.org")
                .unwrap_err()
                .contains("http:// or https://")
        );
        assert!(Webhook::parse("http://h:notaport/").is_err());
        let ca = Webhook::parse_with_ca("http://h/", Some(Path::new("/nonexistent")));
        assert!(ca.unwrap_err().contains("for https://"));
        let missing = Webhook::parse_with_ca("https://h/", Some(Path::new("/nonexistent/ca.pem")));
        assert!(missing.unwrap_err().contains("/nonexistent/ca.pem"));
    }

    /// An HTTPS server on loopback with a certificate for `localhost` from its own
    /// authority; answers every request 204 and counts them.
    async fn https_server() -> (u16, String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio_rustls::rustls::ServerConfig;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = served.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, count) = (acceptor.clone(), count.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = vec![0u8; 4096];
                    if tls.read(&mut buf).await.unwrap_or(0) > 0 {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let _ = tls
                            .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                            .await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        (port, cert.pem(), served)
    }

    #[tokio::test]
    async fn an_https_webhook_verifies_the_server_before_it_posts() {
        let (port, ca_pem, served) = https_server().await;
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ca_pem).unwrap();
        let url = format!("https://localhost:{port}/alerts");
        // Trusting the server's authority: delivered.
        let hook = Webhook::parse_with_ca(&url, Some(&ca)).unwrap();
        hook.post("{\"id\":1}").await.unwrap();
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Mozilla's roots alone do not know it: refused before anything is sent.
        let err = Webhook::parse(&url).unwrap().post("{\"id\":2}").await.unwrap_err();
        assert!(err.contains("certificate"), "{err}");
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn retries_until_the_server_answers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hook = Webhook::parse(&format!("http://127.0.0.1:{port}/hook")).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(deliver(hook, rx));
        let alert = AlertRecord {
            id: 1,
            unix_ms: 0,
            severity: Severity::Critical,
            subject: "node-1".into(),
            message: "dead".into(),
        };
        tx.send(alert).unwrap();
        // First attempt: answer 503; the second must come.
        for status in ["503 Service Unavailable", "200 OK"] {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            assert!(
                req.starts_with("POST /hook HTTP/1.1") && req.contains("\"subject\":\"node-1\""),
                "{req}"
            );
            s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                .await
                .unwrap();
        }
    }
}
