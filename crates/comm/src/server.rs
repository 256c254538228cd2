//! The parameter server's wire: requests from workers (or group leaders) and replies,
//! each a list of floats, over authenticated TCP.
//!
//! A message is one `Data` frame holding `[op: u8][count: u64 LE]`, then the floats
//! in `Data` frames of at most [`PIECE_FLOATS`] each — so a model of any size passes
//! under the frame limit. The server's logic (what a push does to the model) lives
//! with the optimiser in `hetero-train`; this module only moves messages.

use std::io::{BufReader, BufWriter};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::frame::{DEFAULT_MAX_FRAME, FrameKind};
use crate::link::{self, Cipher, Keys, Receiver, Sender};
use crate::ring::Handshakes;
use crate::{CommError, handshake};

/// Floats per data frame: 16 MiB.
pub const PIECE_FLOATS: usize = 4 << 20;

/// What a client asks of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Send me the global model.
    Pull = 1,
    /// Here is my (group's) gradient; send me the model after it was applied.
    Push = 2,
    /// Here are my numbers; send me the sum over all clients.
    Sum = 3,
    /// I am done.
    Bye = 4,
    /// A reply.
    Reply = 5,
}

impl Op {
    fn from_byte(b: u8) -> Option<Op> {
        [Op::Pull, Op::Push, Op::Sum, Op::Bye, Op::Reply]
            .into_iter()
            .find(|op| *op as u8 == b)
    }
}

/// One end of a server connection.
pub struct Channel {
    reader: Receiver<BufReader<TcpStream>>,
    writer: Sender<BufWriter<TcpStream>>,
    peer: String,
    buf: Vec<u8>,
}

impl Channel {
    fn new(stream: TcpStream, keys: Option<Keys>, io_timeout: Duration) -> Result<Channel, CommError> {
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
        link::tune(&stream, io_timeout)?;
        let writer = BufWriter::with_capacity(
            1 << 20,
            stream.try_clone().map_err(|e| CommError::io("cloning a stream", e))?,
        );
        Ok(Channel {
            reader: Receiver::new(
                BufReader::with_capacity(1 << 20, stream),
                keys.as_ref().map(|k| &k.recv),
            ),
            writer: Sender::new(writer, keys.as_ref().map(|k| &k.send)),
            peer,
            buf: Vec::new(),
        })
    }

    /// The other end's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Sends one message.
    pub fn send(&mut self, op: Op, values: &[f32]) -> Result<(), CommError> {
        let io = |e| CommError::io(format!("sending to {}", self.peer), e);
        let mut header = [0u8; 9];
        header[0] = op as u8;
        header[1..].copy_from_slice(&(values.len() as u64).to_le_bytes());
        self.writer.send(FrameKind::Data, &header).map_err(io)?;
        let mut bytes = Vec::with_capacity(values.len().min(PIECE_FLOATS) * 4);
        for piece in values.chunks(PIECE_FLOATS) {
            bytes.clear();
            for v in piece {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            self.writer.send(FrameKind::Data, &bytes).map_err(io)?;
        }
        self.writer.flush().map_err(io)
    }

    /// Receives one message; `None` when the other end closed cleanly between
    /// messages.
    pub fn recv(&mut self) -> Result<Option<(Op, Vec<f32>)>, CommError> {
        let during = "a parameter-server exchange";
        let kind = match self.reader.recv(&mut self.buf, DEFAULT_MAX_FRAME, &self.peer, during) {
            Err(CommError::PeerClosed { .. }) => return Ok(None),
            other => other?,
        };
        let protocol = |reason: String| CommError::Protocol {
            peer: self.peer.clone(),
            reason,
        };
        if kind == FrameKind::Abort {
            return Err(protocol(format!("gave up: {}", String::from_utf8_lossy(&self.buf))));
        }
        if kind != FrameKind::Data || self.buf.len() != 9 {
            return Err(protocol("malformed message header".into()));
        }
        let op = Op::from_byte(self.buf[0]).ok_or_else(|| protocol(format!("unknown operation {}", self.buf[0])))?;
        let count = u64::from_le_bytes(self.buf[1..9].try_into().expect("8 bytes")) as usize;
        if count > (16usize << 30) / 4 {
            return Err(protocol(format!("a message of {count} floats is more than 16 GiB")));
        }
        let mut values = Vec::with_capacity(count);
        while values.len() < count {
            let kind = self.reader.recv(&mut self.buf, DEFAULT_MAX_FRAME, &self.peer, during)?;
            let expected = (count - values.len()).min(PIECE_FLOATS) * 4;
            if kind != FrameKind::Data || self.buf.len() != expected {
                return Err(protocol(format!(
                    "expected a piece of {expected} bytes, got {} bytes",
                    self.buf.len()
                )));
            }
            values.extend(
                self.buf
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
            );
        }
        Ok(Some((op, values)))
    }

    /// Tells the other end why we stop (best effort).
    pub fn abort(&mut self, reason: &str) {
        let _ = self.writer.send(FrameKind::Abort, reason.as_bytes());
        let _ = self.writer.flush();
    }

    fn call(&mut self, op: Op, values: &[f32]) -> Result<Vec<f32>, CommError> {
        self.send(op, values)?;
        match self.recv()? {
            Some((Op::Reply, reply)) => Ok(reply),
            Some((op, _)) => Err(CommError::Protocol {
                peer: self.peer.clone(),
                reason: format!("expected a reply, got {op:?}"),
            }),
            None => Err(CommError::PeerClosed {
                peer: self.peer.clone(),
                during: "a parameter-server exchange",
            }),
        }
    }
}

/// A worker's (or group leader's) connection to the parameter server.
pub struct ServerClient {
    channel: Channel,
}

impl ServerClient {
    /// Connects to the server at `addr` as client `id` of job `session`.
    pub fn connect(
        addr: SocketAddr,
        session: &str,
        token: &str,
        id: u32,
        timeout: Duration,
    ) -> Result<Self, CommError> {
        let deadline = Instant::now() + timeout;
        let mut stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(CommError::io(
                        format!("connecting to the parameter server at {addr}"),
                        e,
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        stream
            .set_read_timeout(Some(crate::ring::HANDSHAKE_TIMEOUT))
            .map_err(|e| CommError::io("setting a read timeout", e))?;
        let keys = handshake::connect(&mut stream, token, session, id, Cipher::from_env())?;
        Ok(ServerClient {
            channel: Channel::new(stream, keys, Duration::from_secs(3600))?,
        })
    }

    /// The global model.
    pub fn pull(&mut self) -> Result<Vec<f32>, CommError> {
        self.channel.call(Op::Pull, &[])
    }

    /// Sends a gradient; returns the model after the server applied it.
    pub fn push(&mut self, grads: &[f32]) -> Result<Vec<f32>, CommError> {
        self.channel.call(Op::Push, grads)
    }

    /// Replaces `values` by their sum over all clients.
    pub fn sum(&mut self, values: &mut [f32]) -> Result<(), CommError> {
        let total = self.channel.call(Op::Sum, values)?;
        if total.len() != values.len() {
            return Err(CommError::Protocol {
                peer: self.channel.peer.clone(),
                reason: format!("a sum of {} values for {}", total.len(), values.len()),
            });
        }
        values.copy_from_slice(&total);
        Ok(())
    }

    /// Says goodbye (the server ends when every client has).
    pub fn bye(mut self) -> Result<(), CommError> {
        self.channel.send(Op::Bye, &[])
    }
}

/// Accepts `clients` authenticated connections for `session`; returns each with the
/// client id it proved. Fails when they do not all arrive within `timeout` or an id
/// repeats.
pub fn accept_clients(
    listener: &TcpListener,
    clients: usize,
    session: &str,
    token: &str,
    timeout: Duration,
) -> Result<Vec<(u32, Channel)>, CommError> {
    let deadline = Instant::now() + timeout;
    // Each handshake on its own thread: a silent stranger delays no client.
    let mut handshakes = Handshakes::new(listener, token, session, Cipher::from_env())?;
    let mut out: Vec<(u32, Channel)> = Vec::new();
    while out.len() < clients {
        if Instant::now() >= deadline {
            return Err(CommError::Config(format!(
                "{} of {clients} clients reached the parameter server in {} s",
                out.len(),
                timeout.as_secs()
            )));
        }
        for (_, result) in handshakes.poll(listener, deadline)? {
            // A stranger or a stale connection is refused, not fatal.
            let Ok(a) = result else { continue };
            let id = a.rank as u32;
            if out.iter().any(|(seen, _)| *seen == id) {
                return Err(CommError::Config(format!("two clients claim id {id}")));
            }
            out.push((id, Channel::new(a.stream, a.keys, Duration::from_secs(3600))?));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_of_any_size_round_trip() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut clients = accept_clients(&listener, 1, "job", "tok", Duration::from_secs(10)).unwrap();
            let (id, mut ch) = clients.pop().unwrap();
            assert_eq!(id, 7);
            while let Some((op, values)) = ch.recv().unwrap() {
                match op {
                    Op::Sum => ch
                        .send(Op::Reply, &values.iter().map(|v| v * 2.0).collect::<Vec<_>>())
                        .unwrap(),
                    Op::Push | Op::Pull => ch.send(Op::Reply, &values).unwrap(),
                    Op::Bye => break,
                    Op::Reply => panic!("a client sent a reply"),
                }
            }
        });
        let mut c = ServerClient::connect(addr, "job", "tok", 7, Duration::from_secs(10)).unwrap();
        let big: Vec<f32> = (0..PIECE_FLOATS + 3).map(|i| i as f32).collect();
        assert_eq!(c.push(&big).unwrap(), big);
        assert_eq!(c.pull().unwrap(), Vec::<f32>::new());
        let mut v = [1.0, 2.5];
        c.sum(&mut v).unwrap();
        assert_eq!(v, [2.0, 5.0]);
        c.bye().unwrap();
        server.join().unwrap();
    }

    #[test]
    fn a_wrong_token_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            accept_clients(&listener, 1, "job", "right", Duration::from_secs(2)).map(|_| ())
        });
        assert!(ServerClient::connect(addr, "job", "wrong", 1, Duration::from_secs(5)).is_err());
        let err = server.join().unwrap().unwrap_err();
        assert!(err.to_string().contains("0 of 1 clients"), "{err}");
    }

    #[test]
    fn silent_strangers_do_not_keep_a_client_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Three connections that never speak, before the real client. One at a
        // time, each would hold the server for the handshake's whole 10 s.
        let _strangers: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let server = std::thread::spawn(move || {
            accept_clients(&listener, 1, "job", "tok", Duration::from_secs(5)).map(|c| c.len())
        });
        let client = ServerClient::connect(addr, "job", "tok", 2, Duration::from_secs(5)).unwrap();
        assert_eq!(server.join().unwrap().unwrap(), 1);
        client.bye().unwrap();
    }
}
