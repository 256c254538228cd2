//! Length-prefixed frames: `[kind: u8][len: u32 LE][payload: len bytes]`.
//!
//! Why a kind byte: a peer that dies mid-job or a stray connection must be told
//! apart from data, and an `Abort` frame lets a worker tell its ring why it stops.
//! Why a limit: the length comes from the network; we refuse to allocate more than
//! [`DEFAULT_MAX_FRAME`] (or the configured maximum) on its word.

use std::io::{self, Read, Write};

use crate::CommError;

/// The largest payload accepted unless configured otherwise: 64 MiB.
pub const DEFAULT_MAX_FRAME: u32 = 64 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Handshake messages.
    Hello = 1,
    /// A piece of a tensor (little-endian f32).
    Data = 2,
    /// The sender gives up; the payload is a UTF-8 reason.
    Abort = 3,
    /// A piece of a message of bytes (a training state, a command): the receiver
    /// decodes it, nothing computes on it.
    Message = 4,
}

impl FrameKind {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(FrameKind::Hello),
            2 => Some(FrameKind::Data),
            3 => Some(FrameKind::Abort),
            4 => Some(FrameKind::Message),
            _ => None,
        }
    }
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, kind: FrameKind, payload: &[u8]) -> io::Result<()> {
    w.write_all(&header(kind, payload.len())?)?;
    w.write_all(payload)
}

/// The five header bytes of a frame of `kind` whose payload is `len` bytes.
pub(crate) fn header(kind: FrameKind, len: usize) -> io::Result<[u8; 5]> {
    let len =
        u32::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame payload over 4 GiB"))?;
    let mut h = [0u8; 5];
    h[0] = kind as u8;
    h[1..].copy_from_slice(&len.to_le_bytes());
    Ok(h)
}

/// Reads one frame into `buf` (resized to the payload) and returns its kind; an
/// `Abort` frame is an error carrying its reason.
///
/// `peer` only names the other end in errors.
pub fn read_frame(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
    max: u32,
    peer: &str,
    during: &'static str,
) -> Result<FrameKind, CommError> {
    let kind = read_raw(r, buf, max, peer, during)?;
    if kind == FrameKind::Abort {
        return Err(CommError::Protocol {
            peer: peer.to_string(),
            reason: format!("peer aborted: {}", String::from_utf8_lossy(buf)),
        });
    }
    Ok(kind)
}

/// [`read_frame`] without reading an `Abort` as an error: for sealed frames, whose
/// payload means nothing until it is opened.
pub(crate) fn read_raw(
    r: &mut impl Read,
    buf: &mut Vec<u8>,
    max: u32,
    peer: &str,
    during: &'static str,
) -> Result<FrameKind, CommError> {
    let mut header = [0u8; 5];
    if let Err(e) = r.read_exact(&mut header) {
        return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
            CommError::PeerClosed {
                peer: peer.to_string(),
                during,
            }
        } else {
            CommError::io(format!("reading a frame header from {peer} during {during}"), e)
        });
    }
    let kind = FrameKind::from_byte(header[0]).ok_or_else(|| CommError::Protocol {
        peer: peer.to_string(),
        reason: format!("unknown frame kind {:#04x}", header[0]),
    })?;
    let len = u32::from_le_bytes(header[1..].try_into().expect("4 bytes"));
    if len > max {
        return Err(CommError::FrameTooLarge {
            len: len.into(),
            max: max.into(),
        });
    }
    buf.resize(len as usize, 0);
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            CommError::Protocol {
                peer: peer.to_string(),
                reason: format!("truncated frame: expected {len} payload bytes during {during}"),
            }
        } else {
            CommError::io(format!("reading a frame from {peer} during {during}"), e)
        }
    })?;
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut wire = Vec::new();
        write_frame(&mut wire, FrameKind::Data, b"hello").unwrap();
        write_frame(&mut wire, FrameKind::Data, b"").unwrap();
        let mut r = &wire[..];
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut r, &mut buf, 100, "t", "test").unwrap(), FrameKind::Data);
        assert_eq!(buf, b"hello");
        read_frame(&mut r, &mut buf, 100, "t", "test").unwrap();
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_frame_is_refused_before_allocation() {
        let mut wire = vec![FrameKind::Data as u8];
        wire.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = read_frame(&mut &wire[..], &mut Vec::new(), 1024, "t", "test").unwrap_err();
        assert!(matches!(err, CommError::FrameTooLarge { len, max: 1024 } if len == u32::MAX as u64));
    }

    #[test]
    fn truncated_frame_is_a_protocol_error() {
        let mut wire = Vec::new();
        write_frame(&mut wire, FrameKind::Data, b"0123456789").unwrap();
        wire.truncate(9);
        let err = read_frame(&mut &wire[..], &mut Vec::new(), 1024, "t", "test").unwrap_err();
        assert!(err.to_string().contains("truncated frame"), "{err}");
    }

    #[test]
    fn closed_stream_and_unknown_kind() {
        let err = read_frame(&mut &[][..], &mut Vec::new(), 1024, "p", "test").unwrap_err();
        assert!(matches!(err, CommError::PeerClosed { .. }));
        let wire = [9u8, 0, 0, 0, 0];
        let err = read_frame(&mut &wire[..], &mut Vec::new(), 1024, "p", "test").unwrap_err();
        assert!(err.to_string().contains("unknown frame kind"));
    }

    #[test]
    fn abort_frame_carries_its_reason() {
        let mut wire = Vec::new();
        write_frame(&mut wire, FrameKind::Abort, b"out of memory").unwrap();
        let err = read_frame(&mut &wire[..], &mut Vec::new(), 1024, "p", "test").unwrap_err();
        assert!(err.to_string().contains("out of memory"));
    }
}
