//! Helpers shared by the CLI's integration tests.
#![allow(dead_code)] // each test file uses some of them

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use std::io::{Read, Write};
use std::time::Duration;

/// POSTs a JSON `body` to `path` on `addr` over plain HTTP/1.1; returns the status
/// code and the response body.
pub fn post_json(addr: &str, path: &str, body: &str) -> (u16, String) {
    request(addr, "POST", path, &[("Content-Type", "application/json")], body)
}

/// One HTTP/1.1 request with `headers` and `body`; the status and the body of the
/// reply.
pub fn request(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response.split(' ').nth(1).unwrap().parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The vectors of a `/v1/embeddings` response body.
pub fn embeddings_of(body: &str) -> Vec<Vec<f64>> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

/// The cosine of two unit vectors.
pub fn cosine(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// GETs `path` on `addr`; returns the status code and the body.
pub fn get(addr: &str, path: &str) -> (u16, String) {
    request(addr, "GET", path, &[], "")
}

/// A `hetero serve` process and the address it serves on; killed when dropped.
pub struct Server(pub Child, pub String);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `hetero serve ARGS` on a free loopback port and waits until it serves.
pub fn serve(args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hetero"))
        .env_remove("HETERO_TOKEN")
        .env_remove("HETERO_API_KEY")
        .arg("serve")
        .args(args)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit("http://").next().unwrap().to_string();
    assert!(addr.contains(':'), "{line:?}");
    Server(child, addr)
}
