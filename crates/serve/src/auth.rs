//! Who may use the API: with an API key (`hetero serve --api-key`, the
//! `HETERO_API_KEY` variable, `--api-key-file`, or an inference job's
//! `api_key_file`), every `/v1/…` request must carry it as
//! `Authorization: Bearer <key>` — what OpenAI's clients send from their
//! `api_key` — or is answered 401 before a handler runs, so it is neither parsed
//! nor queued and costs the model nothing.
//!
//! `/metrics` stays open, as Prometheus scrapes without credentials (vLLM does the
//! same): it holds counts and timings, never a prompt or a reply.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Json, Response};
use serde_json::json;

/// Longest key accepted, and longest key file read.
const MAX_KEY: usize = 512;

/// The key every `/v1/…` request must present.
#[derive(Clone)]
pub struct ApiKey(Arc<str>);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(…)") // never the key itself, in logs or panics
    }
}

impl ApiKey {
    /// A key as given: printable ASCII without spaces (it travels in a header), at
    /// most 512 bytes.
    pub fn new(key: &str) -> Result<ApiKey> {
        if key.is_empty() {
            bail!("the API key is empty");
        }
        if key.len() > MAX_KEY {
            bail!("the API key is {} bytes; at most {MAX_KEY}", key.len());
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            bail!("the API key must be printable ASCII without spaces (it travels in an HTTP header)");
        }
        Ok(ApiKey(key.into()))
    }

    /// The key in `path`: its first line, without the line end.
    pub fn from_file(path: &Path) -> Result<ApiKey> {
        use std::io::Read;
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_KEY as u64 + 2).read_to_string(&mut text))
            .with_context(|| format!("reading the API key file {}", path.display()))?;
        let line = text.lines().next().unwrap_or("");
        ApiKey::new(line.trim_end()).with_context(|| format!("the API key file {}", path.display()))
    }

    /// Whether an `Authorization` header value presents this key.
    pub fn admits(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(given) = authorization.and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let Some(key) = given.strip_prefix("Bearer ") else {
            return false;
        };
        hetero_proto::auth::constant_time_eq(key.trim().as_bytes(), self.0.as_bytes())
    }
}

/// Middleware: passes requests that present the key, answers 401 to the rest
/// (OpenAI's error shape and code, so its clients report it as a key problem).
pub async fn require(State(key): State<ApiKey>, request: Request, next: Next) -> Response {
    let authorization = request.headers().get(header::AUTHORIZATION);
    if key.admits(authorization) {
        return next.run(request).await;
    }
    let message = if authorization.is_some() {
        "the API key is wrong: send `Authorization: Bearer <key>` with the key this server was started with"
    } else {
        "an API key is required: send `Authorization: Bearer <key>`"
    };
    let body = json!({"error": {"message": message, "type": "invalid_request_error", "code": "invalid_api_key"}});
    let mut reply = (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    reply
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_key_as_a_bearer_is_admitted() {
        let key = ApiKey::new("sk-abc123").unwrap();
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert!(key.admits(Some(&h("Bearer sk-abc123"))));
        assert!(!key.admits(None));
        for wrong in [
            "Bearer sk-abc12",
            "Bearer sk-abc1234",
            "sk-abc123",
            "Basic sk-abc123",
            "Bearer ",
        ] {
            assert!(!key.admits(Some(&h(wrong))), "{wrong}");
        }
    }

    #[test]
    fn keys_that_cannot_travel_in_a_header_are_refused_with_the_reason() {
        assert!(ApiKey::new("").unwrap_err().to_string().contains("empty"));
        assert!(ApiKey::new("a b").unwrap_err().to_string().contains("printable"));
        assert!(
            ApiKey::new(&"k".repeat(600))
                .unwrap_err()
                .to_string()
                .contains("600 bytes")
        );
        assert_eq!(format!("{:?}", ApiKey::new("secret").unwrap()), "ApiKey(…)");
    }

    #[test]
    fn a_key_file_gives_its_first_line_and_a_missing_one_is_named() {
        let dir = std::env::temp_dir().join(format!("hetero-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, "sk-from-file\n").unwrap();
        let key = ApiKey::from_file(&path).unwrap();
        assert!(key.admits(Some(&HeaderValue::from_static("Bearer sk-from-file"))));
        let missing = ApiKey::from_file(&dir.join("nope")).unwrap_err();
        assert!(format!("{missing:#}").contains("nope"), "{missing:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
