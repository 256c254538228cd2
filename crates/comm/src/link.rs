//! An authenticated connection after its handshake: frames sealed with AES-256-GCM
//! under keys only its two ends hold, or — where the operator opted out for a
//! trusted link — plain frames.
//!
//! ## Design
//! The handshake ([`crate::handshake`]) proves both ends hold the cluster token and
//! derives two keys from it and both sides' fresh nonces, one per direction, so no
//! two connections (nor the two directions of one) ever share a key. Each direction
//! is a half of its own — a [`Sender`] or a [`Receiver`] — because collectives write
//! to one peer on a helper thread while reading from another (or the same) peer.
//!
//! A sealed frame is the plain frame's header, `[kind][len]`, with `len` counting
//! the 16-byte tag, then the sealed payload and its tag. The header is the AEAD's
//! associated data and the nonce is the frame's number in its direction, so a
//! changed byte, a changed header, a dropped, repeated or reordered frame all fail
//! to open: the receiver refuses the frame, names the peer and the operation, and
//! the link is dead from then on (no frame after a refused one is read).
//!
//! Plain frames ([`Cipher::None`]) are the opt-out for links an operator trusts
//! (`HETERO_DATA_PLANE=plaintext` on every node): both ends must choose alike, and
//! the handshake refuses a mismatch by name.

use std::io::{self, Read, Write};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

use crate::CommError;
use crate::frame::{FrameKind, header, read_frame, read_raw, write_frame};

/// Bytes of the authentication tag a sealed frame carries.
pub const TAG: usize = 16;

/// How frames travel after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    /// Sealed with AES-256-GCM (the default).
    Aes256Gcm,
    /// In the clear, authenticated only by the handshake: for trusted links.
    None,
}

impl Cipher {
    /// The choice this process makes: `HETERO_DATA_PLANE=plaintext` opts out,
    /// anything else (or nothing) seals.
    pub fn from_env() -> Cipher {
        match std::env::var("HETERO_DATA_PLANE").as_deref() {
            Ok("plaintext") => Cipher::None,
            _ => Cipher::Aes256Gcm,
        }
    }

    /// Its byte in the handshake.
    pub(crate) fn byte(self) -> u8 {
        match self {
            Cipher::Aes256Gcm => 1,
            Cipher::None => 0,
        }
    }

    /// Its name, for errors.
    pub(crate) fn name_of(byte: u8) -> &'static str {
        match byte {
            1 => "AES-256-GCM frames",
            0 => "plaintext frames (HETERO_DATA_PLANE=plaintext)",
            _ => "an unknown cipher",
        }
    }
}

/// The two keys of one connection, as one end sees them.
#[derive(Clone)]
pub struct Keys {
    /// Seals what this end sends.
    pub send: [u8; 32],
    /// Opens what this end receives.
    pub recv: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(…)") // never the keys themselves
    }
}

/// One direction's AEAD state: the key and the number of the next frame.
struct Aead {
    key: LessSafeKey,
    frames: u64,
}

impl Aead {
    fn new(key: &[u8; 32]) -> Aead {
        let key = UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key is AES-256's");
        Aead {
            key: LessSafeKey::new(key),
            frames: 0,
        }
    }

    /// The next frame's nonce: its number, never reused under this key.
    fn next_nonce(&mut self) -> Nonce {
        let mut n = [0u8; NONCE_LEN];
        n[..8].copy_from_slice(&self.frames.to_le_bytes());
        self.frames += 1;
        Nonce::assume_unique_for_key(n)
    }
}

impl<W> std::fmt::Debug for Sender<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Sender")
            .field("sealed", &self.seal.is_some())
            .finish_non_exhaustive()
    }
}

impl<R> std::fmt::Debug for Receiver<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("sealed", &self.open.is_some())
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// The sending half of a link.
pub struct Sender<W = std::net::TcpStream> {
    w: W,
    seal: Option<Aead>,
    sealed: Vec<u8>,
}

impl<W: Write> Sender<W> {
    /// Sends frames on `w`, sealed with `key` (or plain when `None`).
    pub fn new(w: W, key: Option<&[u8; 32]>) -> Sender<W> {
        Sender {
            w,
            seal: key.map(Aead::new),
            sealed: Vec::new(),
        }
    }

    /// Writes one frame of `kind` carrying `payload`.
    pub fn send(&mut self, kind: FrameKind, payload: &[u8]) -> io::Result<()> {
        // A send blocks while the peer does not read: that is waiting, not work.
        let _waiting = crate::liveness::on_peers();
        let Some(aead) = &mut self.seal else {
            return write_frame(&mut self.w, kind, payload);
        };
        let head = header(kind, payload.len() + TAG)?;
        self.sealed.clear();
        self.sealed.extend_from_slice(payload);
        let nonce = aead.next_nonce();
        let tag = aead
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(head), &mut self.sealed)
            .map_err(|_| io::Error::other("sealing a frame failed"))?;
        self.sealed.extend_from_slice(tag.as_ref());
        self.w.write_all(&head)?;
        self.w.write_all(&self.sealed)
    }

    /// Flushes what a buffered writer holds.
    pub fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }

    /// The writer underneath.
    pub fn get_ref(&self) -> &W {
        &self.w
    }
}

/// The receiving half of a link.
pub struct Receiver<R = std::net::TcpStream> {
    r: R,
    open: Option<Aead>,
    /// A frame failed to open: nothing after it can be trusted.
    broken: bool,
}

impl<R: Read> Receiver<R> {
    /// Reads frames from `r`, opened with `key` (or plain when `None`).
    pub fn new(r: R, key: Option<&[u8; 32]>) -> Receiver<R> {
        Receiver {
            r,
            open: key.map(Aead::new),
            broken: false,
        }
    }

    /// Reads one frame into `buf` (its payload, opened) and returns its kind; a
    /// payload over `max` bytes is refused before it is read. `peer` and `during`
    /// name the other end and the operation in errors.
    pub fn recv(
        &mut self,
        buf: &mut Vec<u8>,
        max: u32,
        peer: &str,
        during: &'static str,
    ) -> Result<FrameKind, CommError> {
        let _waiting = crate::liveness::on_peers();
        if self.broken {
            return Err(CommError::Tampered {
                peer: peer.to_string(),
                during,
            });
        }
        let Some(aead) = &mut self.open else {
            return read_frame(&mut self.r, buf, max, peer, during);
        };
        // `Abort` is read as data and acted on once opened: an abort is sealed like
        // any frame, so a stranger cannot forge one.
        let kind = read_raw(&mut self.r, buf, max.saturating_add(TAG as u32), peer, during)?;
        let refuse = |broken: &mut bool| {
            *broken = true;
            CommError::Tampered {
                peer: peer.to_string(),
                during,
            }
        };
        if buf.len() < TAG {
            return Err(refuse(&mut self.broken));
        }
        let head = header(kind, buf.len()).expect("read lengths fit in 32 bits");
        let nonce = aead.next_nonce();
        let Ok(plain) = aead.key.open_in_place(nonce, Aad::from(head), buf) else {
            return Err(refuse(&mut self.broken));
        };
        let n = plain.len();
        buf.truncate(n);
        if kind == FrameKind::Abort {
            return Err(CommError::Protocol {
                peer: peer.to_string(),
                reason: format!("peer aborted: {}", String::from_utf8_lossy(buf)),
            });
        }
        Ok(kind)
    }

    /// The reader underneath.
    pub fn get_ref(&self) -> &R {
        &self.r
    }
}

/// Sets what every formed data-plane stream needs: no Nagle delay, `io_timeout` on
/// each read and write, TCP keepalive (a probe after 5 s of silence, then every
/// 2 s, three unanswered closing it) and a 15 s bound on data left unacknowledged
/// (`TCP_USER_TIMEOUT`), so a crashed host or a cut link is noticed in about 11 s
/// whether this end waits for data or sends it — even while a collective waits
/// minutes for a slow peer's compute (a live peer's kernel answers the probes).
/// (With 10 s and 5 s, survivors of a cut link waited 26 s, long after the
/// coordinator had declared the node dead.)
pub(crate) fn tune(s: &std::net::TcpStream, io_timeout: std::time::Duration) -> Result<(), CommError> {
    use std::time::Duration;
    let configure = |what: &str| {
        let what = what.to_string();
        move |e| CommError::io(format!("setting {what} on a data-plane stream"), e)
    };
    s.set_nodelay(true).map_err(configure("TCP_NODELAY"))?;
    s.set_read_timeout(Some(io_timeout))
        .map_err(configure("a read timeout"))?;
    s.set_write_timeout(Some(io_timeout))
        .map_err(configure("a write timeout"))?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(2))
        .with_retries(3);
    let socket = socket2::SockRef::from(s);
    socket
        .set_tcp_keepalive(&keepalive)
        .map_err(configure("TCP keepalive"))?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    socket
        .set_tcp_user_timeout(Some(Duration::from_secs(15)))
        .map_err(configure("TCP_USER_TIMEOUT"))?;
    Ok(())
}

/// Both halves of a TCP connection, under the keys its handshake derived (`None`:
/// plain frames).
pub fn halves(stream: std::net::TcpStream, keys: Option<&Keys>) -> Result<(Sender, Receiver), CommError> {
    let writer = stream
        .try_clone()
        .map_err(|e| CommError::io("cloning a data-plane stream", e))?;
    Ok((
        Sender::new(writer, keys.map(|k| &k.send)),
        Receiver::new(stream, keys.map(|k| &k.recv)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 32] = [7; 32];
    const B: [u8; 32] = [9; 32];

    fn sent(frames: &[(FrameKind, &[u8])], key: Option<&[u8; 32]>) -> Vec<u8> {
        let mut s = Sender::new(Vec::new(), key);
        for (kind, payload) in frames {
            s.send(*kind, payload).unwrap();
        }
        s.w
    }

    fn recv_all(wire: &[u8], key: Option<&[u8; 32]>, n: usize) -> Result<Vec<Vec<u8>>, CommError> {
        let mut r = Receiver::new(wire, key);
        (0..n)
            .map(|_| {
                let mut buf = Vec::new();
                r.recv(&mut buf, 1024, "rank 1", "a test").map(|_| buf)
            })
            .collect()
    }

    #[test]
    fn sealed_frames_round_trip_and_hide_their_payload() {
        let wire = sent(&[(FrameKind::Data, b"gradients!"), (FrameKind::Data, b"")], Some(&A));
        assert!(
            !wire.windows(10).any(|w| w == b"gradients!"),
            "the payload is on the wire in clear"
        );
        assert_eq!(recv_all(&wire, Some(&A), 2).unwrap(), [b"gradients!".to_vec(), vec![]]);
        // Plain frames are the frame module's, byte for byte.
        let plain = sent(&[(FrameKind::Data, b"abc")], None);
        let mut expected = Vec::new();
        write_frame(&mut expected, FrameKind::Data, b"abc").unwrap();
        assert_eq!(plain, expected);
    }

    #[test]
    fn any_changed_byte_is_refused_and_named() {
        let wire = sent(&[(FrameKind::Data, b"0123456789")], Some(&A));
        for i in 0..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 0x01;
            let err = recv_all(&bad, Some(&A), 1).unwrap_err();
            // A flipped length byte may instead announce more than the stream holds.
            assert!(
                matches!(
                    err,
                    CommError::Tampered { .. } | CommError::Protocol { .. } | CommError::FrameTooLarge { .. }
                ),
                "byte {i}: {err}"
            );
        }
        let err = recv_all(&wire, Some(&B), 1).unwrap_err().to_string();
        assert!(
            err.contains("rank 1") && err.contains("a test") && err.contains("failed to authenticate"),
            "{err}"
        );
    }

    #[test]
    fn dropped_repeated_or_reordered_frames_are_refused_and_the_link_stays_dead() {
        let one = sent(&[(FrameKind::Data, b"one")], Some(&A));
        let both = sent(&[(FrameKind::Data, b"one"), (FrameKind::Data, b"two")], Some(&A));
        let second = &both[one.len()..];
        // The second frame alone (the first dropped): its number does not match.
        assert!(matches!(recv_all(second, Some(&A), 1), Err(CommError::Tampered { .. })));
        // The first frame twice (replayed).
        let replayed = [one.clone(), one.clone()].concat();
        assert!(matches!(
            recv_all(&replayed, Some(&A), 2),
            Err(CommError::Tampered { .. })
        ));
        // Swapped, and once refused, the good frame after it is not read either.
        let swapped = [second.to_vec(), one.clone(), one].concat();
        let mut r = Receiver::new(&swapped[..], Some(&A));
        let mut buf = Vec::new();
        assert!(r.recv(&mut buf, 1024, "p", "t").is_err());
        assert!(matches!(
            r.recv(&mut buf, 1024, "p", "t"),
            Err(CommError::Tampered { .. })
        ));
    }

    #[test]
    fn a_sealed_abort_carries_its_reason_and_a_forged_one_is_refused() {
        let wire = sent(&[(FrameKind::Abort, b"out of memory")], Some(&A));
        let err = recv_all(&wire, Some(&A), 1).unwrap_err().to_string();
        assert!(err.contains("peer aborted: out of memory"), "{err}");
        let mut forged = Vec::new();
        write_frame(&mut forged, FrameKind::Abort, b"give up now, ha").unwrap();
        assert!(matches!(
            recv_all(&forged, Some(&A), 1),
            Err(CommError::Tampered { .. })
        ));
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_before_it_is_read() {
        let wire = sent(&[(FrameKind::Data, &[0u8; 2000])], Some(&A));
        assert!(matches!(
            recv_all(&wire, Some(&A), 1),
            Err(CommError::FrameTooLarge { .. })
        ));
    }
}
