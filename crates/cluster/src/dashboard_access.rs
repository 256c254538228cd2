//! Who may see the dashboard: the operator, who holds the cluster token.
//!
//! ## Design
//! The page and its JSON hold job names, logs and node addresses, so they go only
//! to a browser that has shown the token once — the link `/?token=…` that
//! `hetero local` prints, or the form at `/login` — and then carries a session
//! cookie, `<expiry>.<HMAC-SHA256(token, expiry)>`: HttpOnly, SameSite=Strict,
//! valid for 12 hours. The cookie reveals nothing of the token and cannot be made
//! without it, and a new token ends every session. Scripts and Prometheus send the
//! token as `Authorization: Bearer …` instead.
//!
//! Every request's `Host` must be an IP address, `localhost`, or a name the
//! operator allowed (`hetero coordinator --dashboard-host NAME`). A page on another
//! site that points its own name at this address (DNS rebinding) is refused before
//! anything is read, whatever cookie the browser holds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Form;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The session cookie's name.
const COOKIE: &str = "hetero_dashboard";

/// How long a login lasts.
const SESSION_SECS: u64 = 12 * 3600;

/// The dashboard's gate: the token it checks and the host names it answers to.
#[derive(Clone)]
pub struct Access {
    token: Arc<str>,
    hosts: Arc<[String]>,
}

impl Access {
    /// Admits holders of `token`, on IP addresses, `localhost` and `hosts`.
    pub fn new(token: &str, hosts: &[String]) -> Access {
        Access {
            token: token.into(),
            hosts: hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        }
    }

    /// Whether `host` (a `Host` header: a name or address, with or without a port)
    /// is one this dashboard answers to.
    pub fn host_allowed(&self, host: &str) -> bool {
        let name = match host.strip_prefix('[') {
            Some(v6) => {
                return v6.split_once(']').is_some_and(|(address, port)| {
                    address.parse::<std::net::Ipv6Addr>().is_ok() && (port.is_empty() || port.starts_with(':'))
                });
            }
            None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
        };
        let name = name.to_ascii_lowercase();
        name.parse::<std::net::Ipv4Addr>().is_ok() || name == "localhost" || self.hosts.contains(&name)
    }

    /// A cookie value valid until `expiry` (seconds since the epoch).
    fn session(&self, expiry: u64) -> String {
        format!("{expiry}.{}", hetero_proto::auth::hex(&self.mac(expiry)))
    }

    fn mac(&self, expiry: u64) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.token.as_bytes()).expect("HMAC takes any key length");
        mac.update(format!("hetero-dashboard-session:{expiry}").as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Whether `value` is a session cookie this token made and that has not expired.
    fn session_valid(&self, value: &str, now: u64) -> bool {
        let Some((expiry, mac)) = value.split_once('.') else {
            return false;
        };
        let Ok(expiry) = expiry.parse::<u64>() else {
            return false;
        };
        expiry > now
            && hetero_proto::auth::constant_time_eq(
                mac.as_bytes(),
                hetero_proto::auth::hex(&self.mac(expiry)).as_bytes(),
            )
    }

    fn token_matches(&self, given: &str) -> bool {
        hetero_proto::auth::constant_time_eq(given.as_bytes(), self.token.as_bytes())
    }

    /// Whether the request carries the token as a bearer or a live session cookie.
    fn admits(&self, headers: &HeaderMap, now: u64) -> bool {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if bearer.is_some_and(|t| self.token_matches(t.trim())) {
            return true;
        }
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .any(|(name, value)| name == COOKIE && self.session_valid(value, now))
    }

    /// A `Set-Cookie` that logs the browser in for [`SESSION_SECS`].
    fn login_cookie(&self, now: u64) -> HeaderValue {
        let value = format!(
            "{COOKIE}={}; Max-Age={SESSION_SECS}; Path=/; HttpOnly; SameSite=Strict",
            self.session(now + SESSION_SECS)
        );
        HeaderValue::from_str(&value).expect("digits, hex and ASCII")
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The `token` parameter of a query string, decoded as a browser encodes it.
fn query_token(query: &str) -> Option<String> {
    let uri: Uri = format!("/?{query}").parse().ok()?;
    let Query(mut params) = Query::<HashMap<String, String>>::try_from_uri(&uri).ok()?;
    params.remove("token")
}

/// Middleware in front of every route: the `Host` check, then the token.
pub async fn guard(State(access): State<Access>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !access.host_allowed(host) {
        let text = format!(
            "this dashboard does not answer to the host name {host:?} (it answers to IP addresses, \
             localhost and the names given with --dashboard-host)\n"
        );
        return (StatusCode::MISDIRECTED_REQUEST, text).into_response();
    }
    if request.uri().path() == "/login" {
        return next.run(request).await;
    }
    let now = now_secs();
    if let Some(token) = request.uri().query().and_then(query_token) {
        // A login link: set the cookie and send the browser on without the token
        // in its address bar or history.
        if !access.token_matches(&token) {
            return login_page(StatusCode::UNAUTHORIZED, "That token is not this cluster's.");
        }
        let mut reply = Redirect::to(request.uri().path()).into_response();
        reply.headers_mut().insert(header::SET_COOKIE, access.login_cookie(now));
        return reply;
    }
    if access.admits(request.headers(), now) {
        return next.run(request).await;
    }
    if request.uri().path() == "/" {
        return Redirect::to("/login").into_response();
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "the dashboard needs the cluster token: log in at /login, or send `Authorization: Bearer <token>`\n",
    )
        .into_response()
}

/// `GET /login`: the form.
pub async fn login_form() -> Response {
    login_page(StatusCode::OK, "")
}

/// The login form's one field.
#[derive(serde::Deserialize)]
pub struct Login {
    token: String,
}

/// `POST /login`: the form's answer.
pub async fn login(State(access): State<Access>, Form(form): Form<Login>) -> Response {
    if !access.token_matches(form.token.trim()) {
        return login_page(StatusCode::UNAUTHORIZED, "That token is not this cluster's.");
    }
    let mut reply = Redirect::to("/").into_response();
    reply
        .headers_mut()
        .insert(header::SET_COOKIE, access.login_cookie(now_secs()));
    reply
}

fn login_page(status: StatusCode, problem: &str) -> Response {
    let page = format!(
        "<!doctype html><html><head><meta charset=utf-8><title>Hetero — log in</title>\
         <style>body{{font:15px system-ui,sans-serif;max-width:32em;margin:4em auto;color:#222}}\
         input{{font:inherit;padding:.3em;width:100%;box-sizing:border-box}}p.bad{{color:#b00}}</style></head>\
         <body><h1>Hetero dashboard</h1><p class=bad>{problem}</p>\
         <form method=post action=/login><p><label>Cluster token<br>\
         <input type=password name=token autofocus autocomplete=current-password></label></p>\
         <p><button>Log in</button></p></form>\
         <p>The token is in the coordinator's data folder, in the file <code>token</code>.</p></body></html>"
    );
    (status, Html(page)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        Access::new("tok3n", &["hetero.example.org".to_string()])
    }

    #[test]
    fn hosts_are_addresses_localhost_or_the_names_allowed() {
        let a = access();
        for ok in [
            "127.0.0.1:8080",
            "10.1.2.3",
            "[::1]:80",
            "localhost:3000",
            "LOCALHOST",
            "hetero.example.org:80",
        ] {
            assert!(a.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example.com",
            "evil.example.com:8080",
            "",
            "127.0.0.1.evil.com",
            "[::1",
            "[zz]:80",
            "[::1]x",
        ] {
            assert!(!a.host_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn a_session_is_made_only_with_the_token_and_ends_at_its_expiry() {
        let a = access();
        let now = 1_000_000;
        let cookie = a.session(now + 60);
        assert!(a.session_valid(&cookie, now));
        assert!(!a.session_valid(&cookie, now + 60), "expired");
        let other = Access::new("another", &[]).session(now + 60);
        assert!(!a.session_valid(&other, now), "made with another token");
        let (_, mac) = cookie.split_once('.').unwrap();
        assert!(
            !a.session_valid(&format!("{}.{mac}", now + 10_000), now),
            "expiry moved"
        );
        for junk in ["", ".", "x.y", "123", "123."] {
            assert!(!a.session_valid(junk, now), "{junk:?}");
        }
    }

    #[test]
    fn bearer_or_cookie_admits_and_nothing_else_does() {
        let a = access();
        let now = now_secs();
        let mut h = HeaderMap::new();
        assert!(!a.admits(&h, now));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer tok3n"));
        assert!(a.admits(&h, now));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer tok3"));
        assert!(!a.admits(&h, now));
        let mut h = HeaderMap::new();
        let cookie = format!("theme=dark; {COOKIE}={}", a.session(now + 5));
        h.insert(header::COOKIE, HeaderValue::from_str(&cookie).unwrap());
        assert!(a.admits(&h, now));
    }

    #[test]
    fn login_links_decode_as_browsers_encode() {
        assert_eq!(query_token("a=1&token=ab%2Fc%3D+d").as_deref(), Some("ab/c= d"));
        assert_eq!(query_token("token=%zz%4"), Some("%zz%4".to_string()));
        assert_eq!(query_token("tokens=x"), None);
    }
}
