//! The cluster token on every call: clients attach it, the server checks it.
//!
//! The token travels as `authorization: Bearer <token>` metadata. A call without it
//! or with another token is answered `UNAUTHENTICATED` before any handler runs, so
//! it can change nothing.

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Server side: refuses calls that do not carry the token.
#[derive(Clone)]
pub struct CheckToken {
    expected: String,
}

impl CheckToken {
    /// Accepts only `token`.
    pub fn new(token: impl Into<String>) -> Self {
        CheckToken {
            expected: format!("Bearer {}", token.into()),
        }
    }
}

/// A fresh random token (32 hex characters, 128 bits): a cluster's, a node's key,
/// an inference mesh's. The one generator every crate uses.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    hex(&bytes)
}

/// `bytes` as lowercase hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares without an early exit, so timing does not reveal the token's prefix.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Interceptor for CheckToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match request.metadata().get("authorization") {
            Some(v) if constant_time_eq(v.as_bytes(), self.expected.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated("wrong cluster token")),
            None => Err(Status::unauthenticated(
                "missing cluster token (authorization metadata)",
            )),
        }
    }
}

/// Client side: attaches the token to every call.
#[derive(Clone)]
pub struct AttachToken {
    value: MetadataValue<tonic::metadata::Ascii>,
}

impl AttachToken {
    /// Attaches `token`; fails if it is not printable ASCII.
    pub fn new(token: &str) -> Result<Self, String> {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| "the cluster token must be printable ASCII".to_string())?;
        Ok(AttachToken { value })
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.value.clone());
        Ok(request)
    }
}

/// The length and SHA-256 (lowercase hex) of the file at `path`: how a dataset
/// file the coordinator serves is named in its listing and checked on arrival.
pub fn file_sha256(path: &std::path::Path) -> std::io::Result<(u64, String)> {
    use sha2::{Digest, Sha256};
    let mut file = std::fs::File::open(path)?;
    let mut sha = Sha256::new();
    let size = std::io::copy(&mut file, &mut sha)?;
    Ok((size, hex(&sha.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_check() {
        let mut check = CheckToken::new("s3cret");
        assert_eq!(
            check.call(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let mut wrong = AttachToken::new("nope").unwrap();
        let req = wrong.call(Request::new(())).unwrap();
        assert_eq!(check.call(req).unwrap_err().code(), tonic::Code::Unauthenticated);
        let mut right = AttachToken::new("s3cret").unwrap();
        let req = right.call(Request::new(())).unwrap();
        assert!(check.call(req).is_ok());
    }
}
