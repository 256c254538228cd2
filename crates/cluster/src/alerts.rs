//! Alerts: what an operator must know (a node went silent or died, a job failed).
//!
//! Every alert is stored (so `hetero alerts` lists it after a restart), logged, and —
//! when the coordinator has a webhook — POSTed there as JSON by a background task
//! that retries with back-off and never blocks the coordinator.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// One alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    /// Increasing id.
    pub id: u64,
    /// When (Unix ms).
    pub unix_ms: i64,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    /// The node or job it is about.
    pub subject: String,
    /// What happened.
    pub message: String,
}

/// A webhook URL we can deliver to (`http://host:port/path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    host: String,
    port: u16,
    path: String,
}

impl Webhook {
    /// Parses a URL; only plain `http://` is supported.
    pub fn parse(url: &str) -> Result<Webhook, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("alert webhook {url:?}: only http:// URLs are supported (put a TLS proxy in front for https)")
        })?;
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
            None => (authority.to_string(), 80),
        };
        if host.is_empty() {
            return Err(format!("alert webhook {url:?}: no host"));
        }
        Ok(Webhook { host, port, path })
    }

    /// POSTs `body` as JSON; succeeds on a 2xx answer.
    pub async fn post(&self, body: &str) -> Result<(), String> {
        let attempt = async {
            let mut stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let request = format!(
                "POST {} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                self.path,
                self.host,
                self.port,
                body.len()
            );
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
        };
        tokio::time::timeout(Duration::from_secs(5), attempt)
            .await
            .map_err(|_| "timed out".to_string())?
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
    fn parses_http_urls_only() {
        let h = Webhook::parse("http://127.0.0.1:9000/alerts").unwrap();
        assert_eq!(
            (h.host.as_str(), h.port, h.path.as_str()),
            ("127.0.0.1", 9000, "/alerts")
        );
        assert_eq!(Webhook::parse("http://example.org").unwrap().port, 80);
        assert!(
            Webhook::parse("https://example.org")
                .unwrap_err()
                .contains("only http://")
        );
        assert!(Webhook::parse("http://h:notaport/").is_err());
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
            severity: "critical".into(),
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
