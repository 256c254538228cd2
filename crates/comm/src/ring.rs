//! A ring of workers: each rank holds one authenticated TCP stream to its successor
//! (it only writes there) and one from its predecessor (it only reads there).
//!
//! Forming the ring is symmetric and needs no coordinator beyond the address list:
//! every rank listens (the listener is bound *before* addresses are exchanged, so a
//! connect never races a bind), connects to `rank + 1` and accepts `rank − 1`.
//! Connections that fail the handshake — a stranger, another job, a wrong token — are
//! refused and the rank keeps waiting for the right one until the deadline.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::CommError;
use crate::frame::DEFAULT_MAX_FRAME;
use crate::handshake;

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
        }
    }
}

/// A formed ring. Collectives live in [`crate::collectives`].
#[derive(Debug)]
pub struct Ring {
    pub(crate) config: RingConfig,
    /// Stream to `rank + 1` (write side). `None` when `world == 1`.
    pub(crate) next: Option<TcpStream>,
    /// Stream from `rank − 1` (read side). `None` when `world == 1`.
    pub(crate) prev: Option<TcpStream>,
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
            });
        }
        let deadline = Instant::now() + config.connect_timeout;
        let prev_rank = (rank + world - 1) % world;
        let next_addr = addrs[(rank + 1) % world];

        let acceptor = {
            let config = config.clone();
            thread::spawn(move || {
                accept_ranks(&listener, &config, &[prev_rank], deadline)
                    .map(|mut one| one.pop().expect("one accepted stream").1)
            })
        };
        let next = dial(next_addr, (rank + 1) % world, &config, deadline);
        let prev = acceptor
            .join()
            .map_err(|_| CommError::Config("acceptor thread panicked".into()))?;
        let (next, prev) = (next?, prev?);
        for s in [&next, &prev] {
            s.set_nodelay(true)
                .map_err(|e| CommError::io("setting TCP_NODELAY", e))?;
            s.set_read_timeout(Some(config.io_timeout))
                .map_err(|e| CommError::io("setting a read timeout", e))?;
            s.set_write_timeout(Some(config.io_timeout))
                .map_err(|e| CommError::io("setting a write timeout", e))?;
        }
        Ok(Ring {
            config,
            next: Some(next),
            prev: Some(prev),
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
) -> Result<TcpStream, CommError> {
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
                handshake::connect(&mut s, &config.token, &config.session, config.rank as u32)?;
                s.set_read_timeout(None).ok();
                return Ok(s);
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut) => {
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(CommError::io(format!("connecting to {addr}"), e)),
        }
    }
}

/// Accepts one authenticated connection from each rank of `wanted`, refusing
/// strangers, other jobs and ranks out of turn, until `deadline`.
pub(crate) fn accept_ranks(
    listener: &TcpListener,
    config: &RingConfig,
    wanted: &[usize],
    deadline: Instant,
) -> Result<Vec<(usize, TcpStream)>, CommError> {
    listener
        .set_nonblocking(true)
        .map_err(|e| CommError::io("configuring the listener", e))?;
    let mut accepted: Vec<(usize, TcpStream)> = Vec::new();
    let mut last_refusal: Option<CommError> = None;
    let missing = |accepted: &[(usize, TcpStream)]| -> Vec<usize> {
        wanted
            .iter()
            .copied()
            .filter(|r| !accepted.iter().any(|(a, _)| a == r))
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
        match listener.accept() {
            Ok((mut s, peer)) => {
                s.set_nonblocking(false)
                    .map_err(|e| CommError::io("configuring a stream", e))?;
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(100));
                s.set_read_timeout(Some(left)).ok();
                match handshake::accept(&mut s, &config.token, &config.session) {
                    Ok(r) if missing(&accepted).contains(&(r as usize)) => {
                        s.set_read_timeout(None).ok();
                        accepted.push((r as usize, s));
                    }
                    Ok(r) => {
                        let expected = missing(&accepted);
                        tracing::warn!(%peer, rank = r, ?expected, "unexpected rank connected; refused");
                        last_refusal = Some(CommError::Protocol {
                            peer: peer.to_string(),
                            reason: format!("rank {r} connected where rank(s) {expected:?} were expected"),
                        });
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "data-plane connection refused");
                        last_refusal = Some(e);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(CommError::io("accepting a data-plane connection", e)),
        }
    }
    Ok(accepted)
}
