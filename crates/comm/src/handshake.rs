//! Mutual authentication of a data-plane connection with the cluster token.
//!
//! The connecting side (`connect`) and the accepting side (`accept`) each prove that
//! they hold the token by sending an HMAC-SHA256 over both sides' random nonces, the
//! job's session name, the cipher and a role label; the token never crosses the
//! wire. A peer of another job, another protocol version, another cipher choice or
//! with another token is refused with a reason, and the refusal reaches the other
//! end as an `Abort` frame.
//!
//! ```text
//! connector                                          acceptor
//!   Hello{magic, version, cipher, rank, session, nc} ->
//!                                                   <- Hello{magic, version, ns, mac("acceptor", c, nc, ns)}
//!   Hello{mac("connector", c, ns, nc, rank)}        ->
//!                                                   <- Hello{ok}
//! ```
//!
//! Both ends then derive the connection's two keys, one per direction, as HMACs of
//! the token over both nonces ([`crate::link`] seals frames with them). The MACs
//! cover the cipher byte, so no one on the path can talk the ends down to plain
//! frames.

use std::io::Write;
use std::net::TcpStream;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::CommError;
use crate::frame::{FrameKind, read_frame, write_frame};
use crate::link::{Cipher, Keys};

const MAGIC: &[u8; 4] = b"HTRO";
/// Version of the data-plane protocol; both ends must agree. (2: the cipher byte,
/// sealed frames.)
pub const PROTOCOL_VERSION: u16 = 2;
const NONCE: usize = 32;
const MAC: usize = 32;
const HELLO_MAX: u32 = 4096;

fn mac(token: &str, parts: &[&[u8]]) -> [u8; MAC] {
    let mut m = Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("HMAC takes any key");
    for p in parts {
        m.update(&(p.len() as u32).to_le_bytes());
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// The connection's keys from the connector's side (`connector`) or the acceptor's.
fn keys(token: &str, session: &str, nc: &[u8], ns: &[u8], connector: bool) -> Keys {
    let key = |direction: &[u8]| mac(token, &[b"data-plane key", direction, session.as_bytes(), nc, ns]);
    let (c2a, a2c) = (key(b"connector to acceptor"), key(b"acceptor to connector"));
    match connector {
        true => Keys { send: c2a, recv: a2c },
        false => Keys { send: a2c, recv: c2a },
    }
}

fn nonce() -> [u8; NONCE] {
    let mut n = [0u8; NONCE];
    rand::rng().fill_bytes(&mut n);
    n
}

fn refuse(stream: &mut TcpStream, peer: &str, reason: String) -> CommError {
    // Best effort: tell the other end why, then report it here.
    let _ = write_frame(stream, FrameKind::Abort, reason.as_bytes());
    let _ = stream.flush();
    CommError::Handshake {
        peer: peer.to_string(),
        reason,
    }
}

fn read_hello(stream: &mut TcpStream, peer: &str) -> Result<Vec<u8>, CommError> {
    let mut buf = Vec::new();
    match read_frame(stream, &mut buf, HELLO_MAX, peer, "handshake") {
        Ok(FrameKind::Hello) => Ok(buf),
        Ok(kind) => Err(CommError::Handshake {
            peer: peer.to_string(),
            reason: format!("expected a hello frame, got {kind:?}"),
        }),
        Err(CommError::Protocol { reason, .. }) => Err(CommError::Handshake {
            peer: peer.to_string(),
            reason,
        }),
        Err(e) => Err(e),
    }
}

fn io_err(peer: &str) -> impl Fn(std::io::Error) -> CommError + '_ {
    move |e| CommError::io(format!("handshake with {peer}"), e)
}

/// Authenticates the connecting side of `stream` as `rank` of `session`; returns the
/// connection's keys (`None` under [`Cipher::None`]).
pub fn connect(
    stream: &mut TcpStream,
    token: &str,
    session: &str,
    rank: u32,
    cipher: Cipher,
) -> Result<Option<Keys>, CommError> {
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let nc = nonce();
    let c = [cipher.byte()];
    let mut hello = Vec::with_capacity(64 + session.len());
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    hello.push(cipher.byte());
    hello.extend_from_slice(&rank.to_le_bytes());
    hello.extend_from_slice(&(session.len() as u16).to_le_bytes());
    hello.extend_from_slice(session.as_bytes());
    hello.extend_from_slice(&nc);
    write_frame(stream, FrameKind::Hello, &hello).map_err(io_err(&peer))?;

    let reply = read_hello(stream, &peer)?;
    if reply.len() != 4 + 2 + NONCE + MAC || &reply[..4] != MAGIC {
        return Err(refuse(stream, &peer, "malformed reply (not a Hetero worker)".into()));
    }
    let version = u16::from_le_bytes([reply[4], reply[5]]);
    if version != PROTOCOL_VERSION {
        return Err(refuse(
            stream,
            &peer,
            format!("protocol version {version}, we speak {PROTOCOL_VERSION}"),
        ));
    }
    let ns = &reply[6..6 + NONCE];
    let their_mac = &reply[6 + NONCE..];
    if mac(token, &[b"acceptor", &c, session.as_bytes(), &nc, ns]) != their_mac {
        return Err(refuse(
            stream,
            &peer,
            "the peer does not hold this cluster's token (or serves another job)".into(),
        ));
    }
    let proof = mac(
        token,
        &[b"connector", &c, session.as_bytes(), ns, &nc, &rank.to_le_bytes()],
    );
    write_frame(stream, FrameKind::Hello, &proof).map_err(io_err(&peer))?;
    let verdict = read_hello(stream, &peer)?;
    if verdict != [1] {
        return Err(CommError::Handshake {
            peer,
            reason: "peer did not confirm the handshake".into(),
        });
    }
    Ok((cipher == Cipher::Aes256Gcm).then(|| keys(token, session, &nc, ns, true)))
}

/// Authenticates the accepting side of `stream` for `session`; returns the rank the
/// connector claimed (and proved with the token) and the connection's keys (`None`
/// under [`Cipher::None`]).
pub fn accept(
    stream: &mut TcpStream,
    token: &str,
    session: &str,
    cipher: Cipher,
) -> Result<(u32, Option<Keys>), CommError> {
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let hello = read_hello(stream, &peer)?;
    if hello.len() < 6 || &hello[..4] != MAGIC {
        return Err(refuse(stream, &peer, "not a Hetero data-plane hello".into()));
    }
    let version = u16::from_le_bytes([hello[4], hello[5]]);
    if version != PROTOCOL_VERSION {
        return Err(refuse(
            stream,
            &peer,
            format!("protocol version {version}, we speak {PROTOCOL_VERSION}"),
        ));
    }
    if hello.len() < 13 {
        return Err(refuse(stream, &peer, "malformed hello".into()));
    }
    if hello[6] != cipher.byte() {
        return Err(refuse(
            stream,
            &peer,
            format!(
                "the peer sends {}, this end {}: set HETERO_DATA_PLANE alike on every node",
                Cipher::name_of(hello[6]),
                Cipher::name_of(cipher.byte())
            ),
        ));
    }
    let c = [cipher.byte()];
    let rank = u32::from_le_bytes(hello[7..11].try_into().expect("4 bytes"));
    let slen = u16::from_le_bytes([hello[11], hello[12]]) as usize;
    if hello.len() != 13 + slen + NONCE {
        return Err(refuse(stream, &peer, "malformed hello".into()));
    }
    let their_session = &hello[13..13 + slen];
    if their_session != session.as_bytes() {
        return Err(refuse(
            stream,
            &peer,
            format!(
                "session mismatch: peer is in '{}', we are in '{session}'",
                String::from_utf8_lossy(their_session)
            ),
        ));
    }
    let nc = &hello[13 + slen..];
    let ns = nonce();
    let mut reply = Vec::with_capacity(4 + 2 + NONCE + MAC);
    reply.extend_from_slice(MAGIC);
    reply.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    reply.extend_from_slice(&ns);
    reply.extend_from_slice(&mac(token, &[b"acceptor", &c, session.as_bytes(), nc, &ns]));
    write_frame(stream, FrameKind::Hello, &reply).map_err(io_err(&peer))?;

    let proof = read_hello(stream, &peer)?;
    let expected = mac(
        token,
        &[b"connector", &c, session.as_bytes(), &ns, nc, &rank.to_le_bytes()],
    );
    if proof != expected {
        return Err(refuse(
            stream,
            &peer,
            "the connecting peer does not hold this cluster's token".into(),
        ));
    }
    write_frame(stream, FrameKind::Hello, &[1]).map_err(io_err(&peer))?;
    Ok((
        rank,
        (cipher == Cipher::Aes256Gcm).then(|| keys(token, session, nc, &ns, false)),
    ))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::thread;

    use super::*;

    type Sides = (Result<Option<Keys>, CommError>, Result<(u32, Option<Keys>), CommError>);

    fn pair(client_token: &'static str, server_token: &'static str, client_session: &'static str) -> Sides {
        ciphers(
            client_token,
            server_token,
            client_session,
            Cipher::Aes256Gcm,
            Cipher::Aes256Gcm,
        )
    }

    fn ciphers(
        client_token: &'static str,
        server_token: &'static str,
        client_session: &'static str,
        client_cipher: Cipher,
        server_cipher: Cipher,
    ) -> Sides {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            accept(&mut s, server_token, "job-1", server_cipher)
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let client = connect(&mut c, client_token, client_session, 3, client_cipher);
        (client, server.join().unwrap())
    }

    #[test]
    fn same_token_succeeds_reports_rank_and_agrees_on_keys() {
        let (c, s) = pair("secret", "secret", "job-1");
        let (rank, server_keys) = s.unwrap();
        assert_eq!(rank, 3);
        let (client, server) = (c.unwrap().unwrap(), server_keys.unwrap());
        assert_eq!((client.send, client.recv), (server.recv, server.send));
        assert_ne!(client.send, client.recv, "each direction has its own key");
        // Another connection between the same two: other nonces, other keys.
        let (again, _) = pair("secret", "secret", "job-1");
        assert_ne!(again.unwrap().unwrap().send, client.send);
    }

    #[test]
    fn both_ends_must_choose_the_same_cipher() {
        let (c, s) = ciphers("secret", "secret", "job-1", Cipher::None, Cipher::Aes256Gcm);
        let s = s.unwrap_err().to_string();
        assert!(s.contains("plaintext frames") && s.contains("HETERO_DATA_PLANE"), "{s}");
        assert!(c.unwrap_err().to_string().contains("HETERO_DATA_PLANE"));
        let (c, s) = ciphers("secret", "secret", "job-1", Cipher::None, Cipher::None);
        assert!(
            c.unwrap().is_none() && s.unwrap().1.is_none(),
            "plain links have no keys"
        );
    }

    #[test]
    fn wrong_token_is_refused_on_both_sides() {
        let (c, s) = pair("wrong", "secret", "job-1");
        let c = c.unwrap_err().to_string();
        assert!(c.contains("token"), "{c}");
        assert!(s.is_err());
    }

    #[test]
    fn other_job_is_refused() {
        let (c, s) = pair("secret", "secret", "job-2");
        assert!(s.unwrap_err().to_string().contains("session mismatch"));
        assert!(c.unwrap_err().to_string().contains("session mismatch"));
    }

    #[test]
    fn garbage_client_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            accept(&mut s, "secret", "job-1", Cipher::Aes256Gcm)
        });
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert!(server.join().unwrap().is_err());
    }
}
