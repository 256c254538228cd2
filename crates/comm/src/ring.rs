//! A ring of workers: each rank holds one authenticated TCP stream to its successor
//! (it only writes there) and one from its predecessor (it only reads there).
//!
//! Forming the ring is symmetric and needs no coordinator beyond the address list:
//! every rank listens (the listener is bound *before* addresses are exchanged, so a
//! connect never races a bind), connects to `rank + 1` and accepts `rank − 1`.
//! Connections that fail the handshake — a stranger, another job, a wrong token — are
//! refused and the rank keeps waiting for the right one until the deadline. Each
//! accepted connection's handshake runs on its own thread under a short deadline
//! ([`HANDSHAKE_TIMEOUT`]) while the listener keeps accepting, so a stranger that
//! connects and says nothing costs a thread for seconds and delays no one.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use crate::CommError;
use crate::background::Background;
use crate::frame::DEFAULT_MAX_FRAME;
use crate::handshake;
use crate::link::{self, Cipher, Keys, Receiver, Sender};

/// How long one connection may take to prove itself before it is dropped: a peer
/// on any real link answers in a few round trips.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections whose handshakes may run at once; more are closed unread.
const PENDING_HANDSHAKES: usize = 64;

/// A stream that passed its handshake, with the rank it proved and its keys.
pub(crate) struct Authenticated {
    pub(crate) rank: usize,
    pub(crate) stream: TcpStream,
    pub(crate) keys: Option<Keys>,
}

/// Who this rank is and how it talks to the others.
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// This worker's rank, `0..world`.
    pub rank: usize,
    /// Number of workers in the ring.
    pub world: usize,
    /// Job-unique session name; peers of another session are refused.
    pub session: String,
    /// The cluster token both ends must hold.
    pub token: String,
    /// Largest frame accepted from a peer.
    pub max_frame: u32,
    /// How long forming the ring may take.
    pub connect_timeout: Duration,
    /// How long one read may block before the peer is declared lost. Collectives wait
    /// for the slowest worker's compute, so this is minutes, not milliseconds.
    pub io_timeout: Duration,
    /// Sealed or plain frames ([`Cipher::from_env`] by default); every rank must
    /// choose alike.
    pub cipher: Cipher,
}

impl RingConfig {
    /// A configuration with default limits.
    pub fn new(rank: usize, world: usize, session: impl Into<String>, token: impl Into<String>) -> Self {
        RingConfig {
            rank,
            world,
            session: session.into(),
            token: token.into(),
            max_frame: DEFAULT_MAX_FRAME,
            connect_timeout: Duration::from_secs(60),
            io_timeout: Duration::from_secs(600),
            cipher: Cipher::from_env(),
        }
    }
}

/// A formed ring. Collectives live in [`crate::collectives`].
#[derive(Debug)]
pub struct Ring {
    pub(crate) config: RingConfig,
    /// Link to `rank + 1` (write side). `None` when `world == 1`.
    pub(crate) next: Option<Sender>,
    /// Link from `rank − 1` (read side). `None` when `world == 1`.
    pub(crate) prev: Option<Receiver>,
    /// An allreduce running on a thread of its own with both links
    /// ([`crate::background`]).
    pub(crate) background: Background,
}

impl Ring {
    /// This worker's rank.
    pub fn rank(&self) -> usize {
        self.config.rank
    }

    /// Number of workers.
    pub fn world(&self) -> usize {
        self.config.world
    }

    /// Forms the ring. `listener` must be the one whose address stands at
    /// `addrs[config.rank]`.
    pub fn form(config: RingConfig, listener: TcpListener, addrs: &[SocketAddr]) -> Result<Ring, CommError> {
        check_membership("ring", &config, addrs)?;
        let RingConfig { rank, world, .. } = config;
        if world == 1 {
            return Ok(Ring {
                config,
                next: None,
                prev: None,
                background: Background::Idle,
            });
        }
        let deadline = Instant::now() + config.connect_timeout;
        let prev_rank = (rank + world - 1) % world;
        let next_addr = addrs[(rank + 1) % world];

        let acceptor = {
            let config = config.clone();
            thread::spawn(move || {
                accept_ranks(&listener, &config, &[prev_rank], deadline)
                    .map(|mut one| one.pop().expect("one accepted stream"))
            })
        };
        let next = dial(next_addr, (rank + 1) % world, &config, deadline);
        let prev = acceptor
            .join()
            .map_err(|_| CommError::Config("acceptor thread panicked".into()))?;
        let (next, prev) = (next?, prev?);
        for s in [&next.stream, &prev.stream] {
            link::tune(s, config.io_timeout)?;
        }
        Ok(Ring {
            next: Some(Sender::new(next.stream, next.keys.as_ref().map(|k| &k.send))),
            prev: Some(Receiver::new(prev.stream, prev.keys.as_ref().map(|k| &k.recv))),
            config,
            background: Background::Idle,
        })
    }
}

/// A whole ring on loopback inside this process, one [`Ring`] per rank (formed by
/// threads in parallel): for tests and benchmarks.
pub fn loopback(world: usize, session: &str, token: &str) -> Result<Vec<Ring>, CommError> {
    on_loopback(world, session, token, Ring::form)
}

/// Forms `world` ranks with `form` on loopback ports, each in its own thread.
pub(crate) fn on_loopback<T: Send + 'static>(
    world: usize,
    session: &str,
    token: &str,
    form: fn(RingConfig, TcpListener, &[SocketAddr]) -> Result<T, CommError>,
) -> Result<Vec<T>, CommError> {
    let listeners = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").map_err(|e| CommError::io("binding a loopback port", e)))
        .collect::<Result<Vec<_>, _>>()?;
    let addrs = listeners
        .iter()
        .map(|l| l.local_addr().map_err(|e| CommError::io("reading a bound port", e)))
        .collect::<Result<Vec<_>, _>>()?;
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let (addrs, config) = (addrs.clone(), RingConfig::new(rank, world, session, token));
            thread::spawn(move || form(config, l, &addrs))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| CommError::Config("a forming thread panicked".into()))?
        })
        .collect()
}

/// That `config.rank` is one of `config.world` ranks and `addrs` holds one address
/// per rank, for a `shape` ("ring", "mesh") about to be formed.
pub(crate) fn check_membership(shape: &str, config: &RingConfig, addrs: &[SocketAddr]) -> Result<(), CommError> {
    let RingConfig { rank, world, .. } = *config;
    if world == 0 || rank >= world {
        return Err(CommError::Config(format!("rank {rank} is not in a {shape} of {world}")));
    }
    if addrs.len() != world {
        return Err(CommError::Config(format!(
            "{} addresses for a {shape} of {world}",
            addrs.len()
        )));
    }
    Ok(())
}

/// Connects to rank `peer` at `addr` and authenticates as this rank, retrying while
/// the peer is not listening yet, until `deadline`.
pub(crate) fn dial(
    addr: SocketAddr,
    peer: usize,
    config: &RingConfig,
    deadline: Instant,
) -> Result<Authenticated, CommError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(CommError::io(
                format!("connecting to rank {peer} at {addr}"),
                io::Error::new(io::ErrorKind::TimedOut, "data-plane formation timed out"),
            ));
        }
        match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(5))) {
            Ok(mut s) => {
                s.set_read_timeout(Some(left)).ok();
                let keys = handshake::connect(
                    &mut s,
                    &config.token,
                    &config.session,
                    config.rank as u32,
                    config.cipher,
                )?;
                s.set_read_timeout(None).ok();
                return Ok(Authenticated {
                    rank: peer,
                    stream: s,
                    keys,
                });
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut) => {
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(CommError::io(format!("connecting to {addr}"), e)),
        }
    }
}

/// A handshake that ended: where the connection came from, and what it proved.
pub(crate) type Finished = (SocketAddr, Result<Authenticated, CommError>);

/// Handshakes of accepted connections, each on a thread of its own under
/// [`HANDSHAKE_TIMEOUT`], while the caller keeps accepting: a stranger that connects
/// and says nothing costs a thread for seconds and delays no one.
pub(crate) struct Handshakes {
    secrets: Arc<(String, String)>,
    cipher: Cipher,
    done: mpsc::Sender<Finished>,
    results: mpsc::Receiver<Finished>,
    pending: usize,
}

impl Handshakes {
    /// Handshakes for `session` under `token`, prepared for `listener`.
    pub(crate) fn new(
        listener: &TcpListener,
        token: &str,
        session: &str,
        cipher: Cipher,
    ) -> Result<Handshakes, CommError> {
        listener
            .set_nonblocking(true)
            .map_err(|e| CommError::io("configuring the listener", e))?;
        let (done, results) = mpsc::channel();
        Ok(Handshakes {
            secrets: Arc::new((token.to_string(), session.to_string())),
            cipher,
            done,
            results,
            pending: 0,
        })
    }

    /// Accepts a waiting connection, if any, and starts its handshake (to finish
    /// before `deadline` at the latest); returns the handshakes finished since the
    /// last call, with the address each came from. Sleeps a moment when nothing
    /// happened, so a caller may loop on it.
    pub(crate) fn poll(&mut self, listener: &TcpListener, deadline: Instant) -> Result<Vec<Finished>, CommError> {
        let finished: Vec<_> = self.results.try_iter().collect();
        self.pending -= finished.len();
        match listener.accept() {
            // Not scoped: a handshake still running when the caller is done (a
            // stranger waiting out its deadline) finishes on its own, unread.
            Ok((s, peer)) if self.pending < PENDING_HANDSHAKES => {
                self.pending += 1;
                let (done, secrets, cipher) = (self.done.clone(), self.secrets.clone(), self.cipher);
                let limit = deadline
                    .saturating_duration_since(Instant::now())
                    .clamp(Duration::from_millis(100), HANDSHAKE_TIMEOUT);
                thread::spawn(move || {
                    let _ = done.send((peer, authenticate(s, &secrets.0, &secrets.1, cipher, limit)));
                });
            }
            Ok((_, peer)) => tracing::warn!(%peer, "too many handshakes at once; connection closed"),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if finished.is_empty() {
                    thread::sleep(Duration::from_millis(5));
                }
            }
            Err(e) => return Err(CommError::io("accepting a data-plane connection", e)),
        }
        Ok(finished)
    }
}

/// Accepts one authenticated connection from each rank of `wanted`, refusing
/// strangers, other jobs and ranks out of turn, until `deadline` ([`Handshakes`]).
pub(crate) fn accept_ranks(
    listener: &TcpListener,
    config: &RingConfig,
    wanted: &[usize],
    deadline: Instant,
) -> Result<Vec<Authenticated>, CommError> {
    let mut handshakes = Handshakes::new(listener, &config.token, &config.session, config.cipher)?;
    let mut accepted: Vec<Authenticated> = Vec::new();
    let mut last_refusal: Option<CommError> = None;
    let missing = |accepted: &[Authenticated]| -> Vec<usize> {
        wanted
            .iter()
            .copied()
            .filter(|r| !accepted.iter().any(|a| a.rank == *r))
            .collect()
    };
    while accepted.len() < wanted.len() {
        if Instant::now() >= deadline {
            let why = last_refusal
                .map(|e| format!(" (last refusal: {e})"))
                .unwrap_or_default();
            return Err(CommError::io(
                format!("waiting for rank(s) {:?} to connect{why}", missing(&accepted)),
                io::Error::new(io::ErrorKind::TimedOut, "data-plane formation timed out"),
            ));
        }
        for (peer, result) in handshakes.poll(listener, deadline)? {
            match result {
                Ok(a) if missing(&accepted).contains(&a.rank) => accepted.push(a),
                Ok(a) => {
                    let expected = missing(&accepted);
                    tracing::warn!(%peer, rank = a.rank, ?expected, "unexpected rank connected; refused");
                    last_refusal = Some(CommError::Protocol {
                        peer: peer.to_string(),
                        reason: format!("rank {} connected where rank(s) {expected:?} were expected", a.rank),
                    });
                }
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "data-plane connection refused");
                    last_refusal = Some(e);
                }
            }
        }
    }
    Ok(accepted)
}

/// The acceptor's handshake on `s`, which must finish within `limit`.
fn authenticate(
    mut s: TcpStream,
    token: &str,
    session: &str,
    cipher: Cipher,
    limit: Duration,
) -> Result<Authenticated, CommError> {
    let configure = |e| CommError::io("configuring a data-plane stream", e);
    s.set_nonblocking(false).map_err(configure)?;
    s.set_read_timeout(Some(limit)).map_err(configure)?;
    s.set_write_timeout(Some(limit)).map_err(configure)?;
    let (rank, keys) = handshake::accept(&mut s, token, session, cipher)?;
    s.set_read_timeout(None).map_err(configure)?;
    Ok(Authenticated {
        rank: rank as usize,
        stream: s,
        keys,
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn listeners(n: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
        let ls: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
        (ls, addrs)
    }

    /// Forms a ring of two on `listeners`, rank 0 reaching rank 1 at `to_one`.
    fn form_two(ls: Vec<TcpListener>, addrs: &[SocketAddr], to_one: SocketAddr, timeout: Duration) -> Vec<Ring> {
        let handles: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let mut addrs = addrs.to_vec();
                if rank == 0 {
                    addrs[1] = to_one;
                }
                thread::spawn(move || {
                    let mut config = RingConfig::new(rank, 2, "job-7", "secret");
                    config.connect_timeout = timeout;
                    config.cipher = Cipher::Aes256Gcm;
                    Ring::form(config, l, &addrs)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    }

    #[test]
    fn a_silent_stranger_does_not_delay_the_ring_past_its_deadline() {
        let (ls, addrs) = listeners(2);
        // Strangers connect to both ranks first and never say a word. Each
        // handshake waited out the whole formation deadline before; now each has
        // its own thread, and the ring forms inside a deadline shorter than the
        // strangers' silence.
        let _strangers: Vec<TcpStream> = addrs.iter().map(|a| TcpStream::connect(a).unwrap()).collect();
        let mut ring = form_two(ls, &addrs, addrs[1], Duration::from_secs(4));
        let mut sums = thread::scope(|s| {
            let handles: Vec<_> = ring
                .iter_mut()
                .map(|r| {
                    s.spawn(move || {
                        let mut buf = vec![r.rank() as f32 + 1.0; 3];
                        r.allreduce_sum(&mut buf).map(|()| buf)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect::<Vec<_>>()
        });
        assert_eq!(sums.pop().unwrap(), vec![3.0; 3]);
    }

    #[test]
    fn a_frame_altered_on_the_path_is_refused_and_the_sender_named() {
        // A relay between rank 0 and rank 1 that passes the handshake through and
        // then flips one bit of every later frame from rank 0.
        let (ls, addrs) = listeners(2);
        let relay = TcpListener::bind("127.0.0.1:0").unwrap();
        let relay_addr = relay.local_addr().unwrap();
        let to_one = addrs[1];
        thread::spawn(move || {
            let (mut from0, _) = relay.accept().unwrap();
            let mut to1 = TcpStream::connect(to_one).unwrap();
            let (mut back_from, mut back_to) = (to1.try_clone().unwrap(), from0.try_clone().unwrap());
            thread::spawn(move || {
                let _ = std::io::copy(&mut back_from, &mut back_to);
            });
            let mut seen = 0usize;
            let mut buf = [0u8; 4096];
            while let Ok(n) = from0.read(&mut buf) {
                if n == 0 {
                    break;
                }
                // The handshake is a few hundred bytes; flip a byte well past it.
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    if seen + i == 1000 {
                        *b ^= 0x04;
                    }
                }
                seen += n;
                if to1.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let mut ring = form_two(ls, &addrs, relay_addr, Duration::from_secs(20));
        let results = thread::scope(|s| {
            let handles: Vec<_> = ring
                .iter_mut()
                .map(|r| {
                    s.spawn(move || {
                        let mut buf = vec![1.0f32; 1000];
                        r.allreduce_sum(&mut buf)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        });
        let refused = results[1].as_ref().unwrap_err();
        assert!(matches!(refused, CommError::Tampered { .. }), "{refused}");
        assert!(refused.to_string().contains("rank 0"), "{refused}");
        assert!(results[0].is_err(), "rank 0 learns that its ring broke");
    }
}
