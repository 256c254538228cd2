//! Collectives on a [`Ring`]: allreduce (sum and mean), broadcast of floats,
//! broadcast of a message of bytes, and the shift of one message of bytes from
//! every rank to its next.
//!
//! ## Design
//! The allreduce is the bandwidth-optimal ring algorithm: the buffer is cut into
//! `world` chunks; `world − 1` reduce-scatter steps leave each rank owning one fully
//! summed chunk, and `world − 1` all-gather steps hand every owned chunk round the
//! ring. Each rank sends and receives `2·(world − 1)/world` of the buffer in all,
//! independent of the worker count.
//!
//! In step `k` (of `2·(world − 1)`) rank `r` sends chunk `(r − k) mod world` and
//! receives chunk `(r − k − 1) mod world`, adding it during reduce-scatter and copying
//! it during all-gather. The chunk received in step `k` is the one sent in step
//! `k + 1`, so chunks are cut into pieces and each received piece is forwarded the
//! moment it is reduced: a writer thread sends while the caller's thread receives and
//! reduces, and the ring works as a pipeline instead of `2·(world − 1)` barriers.
//!
//! Any length works: chunks are balanced (`len·c/world` boundaries), so a buffer
//! shorter than the ring simply has empty chunks, which send nothing.

use std::sync::mpsc;
use std::thread;

use crate::frame::FrameKind;
use crate::link::{Receiver, Sender};
use crate::precision::Precision;
use crate::{CommError, Ring};

/// Floats per piece: 256 KiB frames keep the pipeline full without large copies.
const PIECE: usize = 64 * 1024;

/// Bytes per piece of a message: the same 256 KiB.
const MESSAGE_PIECE: usize = 4 * PIECE;

/// The longest message a member accepts (its length comes from a peer; the buffer
/// grows only with the bytes that arrive, but a length past this is refused at once).
pub const MAX_MESSAGE: u64 = 64 << 30;

fn chunk_bounds(len: usize, world: usize, chunk: usize) -> (usize, usize) {
    (len * chunk / world, len * (chunk + 1) / world)
}

fn pieces(start: usize, end: usize) -> impl Iterator<Item = (usize, usize)> {
    (start..end).step_by(PIECE).map(move |s| (s, (s + PIECE).min(end)))
}

/// Runs `body` with a writer thread that sends every queued piece to `next` as a
/// frame of `kind`. Returns the first error of either side.
fn with_writer<T>(
    next: &mut Sender,
    kind: FrameKind,
    peer: String,
    body: impl FnOnce(&mpsc::Sender<Vec<u8>>) -> Result<T, CommError>,
) -> Result<T, CommError> {
    thread::scope(|scope| {
        // Unbounded on purpose: a bounded queue can deadlock the ring when every rank
        // blocks on enqueueing while no rank reads. At most one buffer's worth waits.
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let writer = scope.spawn(move || -> Result<(), CommError> {
            for piece in rx {
                next.send(kind, &piece)
                    .map_err(|e| CommError::io(format!("sending to {peer}"), e))?;
            }
            Ok(())
        });
        let result = body(&tx);
        drop(tx);
        let sent = writer
            .join()
            .map_err(|_| CommError::Config("writer thread panicked".into()))?;
        let value = result?;
        sent?;
        Ok(value)
    })
}

impl Ring {
    /// Closes both of this rank's links after a failed collective, so that its
    /// neighbours learn at once (a closed connection) instead of waiting out the
    /// read timeout for data that will never come. A ring that failed is not used
    /// again: recovery forms a new one.
    fn fail<T>(&mut self, result: Result<T, CommError>) -> Result<T, CommError> {
        if result.is_err() {
            if let Some(next) = &self.next {
                let _ = next.get_ref().shutdown(std::net::Shutdown::Both);
            }
            if let Some(prev) = &self.prev {
                let _ = prev.get_ref().shutdown(std::net::Shutdown::Both);
            }
        }
        result
    }

    fn check_root(&self, root: usize) -> Result<(), CommError> {
        match root < self.config.world {
            true => Ok(()),
            false => Err(CommError::Config(format!(
                "broadcast root {root} outside a ring of {}",
                self.config.world
            ))),
        }
    }

    /// Both links, with the names of the peers at their ends. An allreduce
    /// running in the background lands first ([`Ring::settle`]); if it failed,
    /// its error is this collective's (it closed the links), so the cause is
    /// what the caller sees.
    fn peers(&mut self) -> Result<(&mut Sender, &mut Receiver, String, String), CommError> {
        self.settle();
        self.background_failure()?;
        let world = self.config.world;
        let rank = self.config.rank;
        let next = format!("rank {}", (rank + 1) % world);
        let prev = format!("rank {}", (rank + world - 1) % world);
        let (Some(n), Some(p)) = (self.next.as_mut(), self.prev.as_mut()) else {
            return Err(CommError::Config(format!(
                "rank {rank}'s ring has lost its links (a failed collective closed them)"
            )));
        };
        Ok((n, p, next, prev))
    }

    /// Sums `buf` element-wise across all ranks; every rank ends with the same sum.
    pub fn allreduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.allreduce_sum_as(buf, Precision::F32)
    }

    /// [`Ring::allreduce_sum`] with the floats travelling at `precision`: added
    /// in f32, rounded where they travel, and every rank ends with the same
    /// (rounded) sums. Every rank must pass the same precision.
    pub fn allreduce_sum_as(&mut self, buf: &mut [f32], precision: Precision) -> Result<(), CommError> {
        let result = self.ring_sum(buf, precision);
        self.fail(result)
    }

    fn ring_sum(&mut self, buf: &mut [f32], precision: Precision) -> Result<(), CommError> {
        let world = self.config.world;
        let rank = self.config.rank;
        let max = self.config.max_frame;
        if world == 1 || buf.is_empty() {
            return Ok(());
        }
        let len = buf.len();
        let steps = 2 * (world - 1);
        let (next, prev, next_name, prev_name) = self.peers()?;
        with_writer(next, FrameKind::Data, next_name, |tx| {
            let (s, e) = chunk_bounds(len, world, rank);
            for (a, b) in pieces(s, e) {
                tx.send(precision.encode(&buf[a..b])).ok();
            }
            let mut frame = Vec::new();
            for k in 0..steps {
                let chunk = (rank + 2 * world - k - 1) % world;
                let reducing = k < world - 1;
                // After the last reduce step this rank owns `chunk`, summed: it
                // keeps what the others will receive, to the last bit.
                let owned = k == world - 2;
                let forwarding = k + 1 < steps;
                let (s, e) = chunk_bounds(len, world, chunk);
                for (a, b) in pieces(s, e) {
                    prev.recv(&mut frame, max, &prev_name, "allreduce")?;
                    let expected = (b - a) * precision.bytes();
                    if frame.len() != expected {
                        return Err(CommError::Protocol {
                            peer: prev_name,
                            reason: format!(
                                "allreduce piece of {} bytes where {expected} were expected (peers disagree on the buffer length or the precision?)",
                                frame.len(),
                            ),
                        });
                    }
                    let dst = &mut buf[a..b];
                    precision.fold(dst, &frame, reducing);
                    if owned {
                        precision.round(dst);
                    }
                    if forwarding {
                        tx.send(precision.encode(dst)).ok();
                    }
                }
            }
            Ok(())
        })
    }

    /// Averages `buf` across all ranks.
    pub fn allreduce_mean(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        self.allreduce_sum(buf)?;
        let n = self.config.world as f32;
        buf.iter_mut().for_each(|v| *v /= n);
        Ok(())
    }

    /// Copies `root`'s `buf` to every rank (pipelined along the ring).
    pub fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        let result = self.ring_broadcast(buf, root);
        self.fail(result)
    }

    fn ring_broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        let world = self.config.world;
        let rank = self.config.rank;
        let max = self.config.max_frame;
        self.check_root(root)?;
        if world == 1 || buf.is_empty() {
            return Ok(());
        }
        let last = (root + world - 1) % world;
        let (next, prev, next_name, prev_name) = self.peers()?;
        with_writer(next, FrameKind::Data, next_name, |tx| {
            if rank == root {
                for (a, b) in pieces(0, buf.len()) {
                    tx.send(Precision::F32.encode(&buf[a..b])).ok();
                }
                return Ok(());
            }
            let mut frame = Vec::new();
            for (a, b) in pieces(0, buf.len()) {
                prev.recv(&mut frame, max, &prev_name, "broadcast")?;
                if frame.len() != (b - a) * 4 {
                    return Err(CommError::Protocol {
                        peer: prev_name,
                        reason: "broadcast piece of unexpected length".into(),
                    });
                }
                Precision::F32.fold(&mut buf[a..b], &frame, false);
                if rank != last {
                    tx.send(frame.clone()).ok();
                }
            }
            Ok(())
        })
    }
}

impl Ring {
    /// Copies `root`'s message `msg` to every rank (the others' `msg` is replaced),
    /// pipelined along the ring: its length first, so members need not know it, then
    /// pieces of at most [`MESSAGE_PIECE`] bytes. A member's buffer grows only with
    /// the bytes that arrive; a length past [`MAX_MESSAGE`], a piece past the length
    /// announced or a frame of another kind is refused, naming the peer.
    pub fn broadcast_bytes(&mut self, msg: &mut Vec<u8>, root: usize) -> Result<(), CommError> {
        let result = self.ring_broadcast_bytes(msg, root);
        self.fail(result)
    }

    fn ring_broadcast_bytes(&mut self, msg: &mut Vec<u8>, root: usize) -> Result<(), CommError> {
        let world = self.config.world;
        let rank = self.config.rank;
        let max = self.config.max_frame;
        self.check_root(root)?;
        if world == 1 {
            return Ok(());
        }
        let last = (root + world - 1) % world;
        let (next, prev, next_name, prev_name) = self.peers()?;
        with_writer(next, FrameKind::Message, next_name, |tx| {
            if rank == root {
                tx.send((msg.len() as u64).to_le_bytes().to_vec()).ok();
                for piece in msg.chunks(MESSAGE_PIECE) {
                    tx.send(piece.to_vec()).ok();
                }
                return Ok(());
            }
            let forward = |frame: &[u8]| {
                if rank != last {
                    tx.send(frame.to_vec()).ok();
                }
            };
            *msg = receive_message(prev, max, &prev_name, forward)?;
            Ok(())
        })
    }

    /// Sends `msg` to the next rank and returns the previous rank's message: every
    /// rank sends one (empty is fine) and receives one — the neighbour exchange.
    /// Framed and bounded like [`Ring::broadcast_bytes`]; a ring of one gets its own
    /// message back.
    pub fn shift_bytes(&mut self, msg: &[u8]) -> Result<Vec<u8>, CommError> {
        let result = self.ring_shift_bytes(msg);
        self.fail(result)
    }

    fn ring_shift_bytes(&mut self, msg: &[u8]) -> Result<Vec<u8>, CommError> {
        if self.config.world == 1 {
            return Ok(msg.to_vec());
        }
        let max = self.config.max_frame;
        let (next, prev, next_name, prev_name) = self.peers()?;
        with_writer(next, FrameKind::Message, next_name, |tx| {
            tx.send((msg.len() as u64).to_le_bytes().to_vec()).ok();
            for piece in msg.chunks(MESSAGE_PIECE) {
                tx.send(piece.to_vec()).ok();
            }
            receive_message(prev, max, &prev_name, |_| {})
        })
    }
}

/// Reads one message from `prev` (named `prev_name`): its length, then its pieces,
/// handing every frame as it came to `on_frame` (to forward it). A length past
/// [`MAX_MESSAGE`], a piece past the length announced or a frame of another kind
/// is refused, naming the peer; the buffer grows only with the bytes that arrive.
fn receive_message(
    prev: &mut Receiver,
    max: u32,
    prev_name: &str,
    mut on_frame: impl FnMut(&[u8]),
) -> Result<Vec<u8>, CommError> {
    let refuse = |reason: String| CommError::Protocol {
        peer: prev_name.to_string(),
        reason,
    };
    let mut frame = Vec::new();
    let kind = prev.recv(&mut frame, max, prev_name, "a message's length")?;
    let len = match (kind, <[u8; 8]>::try_from(frame.as_slice())) {
        (FrameKind::Message, Ok(bytes)) => u64::from_le_bytes(bytes),
        _ => {
            return Err(refuse(format!(
                "a {kind:?} frame of {} bytes where a message's length was expected",
                frame.len()
            )));
        }
    };
    if len > MAX_MESSAGE {
        return Err(refuse(format!("a message of {len} bytes (at most {MAX_MESSAGE})")));
    }
    on_frame(&frame);
    let mut msg = Vec::new();
    while (msg.len() as u64) < len {
        let kind = prev.recv(&mut frame, max, prev_name, "a message")?;
        if kind != FrameKind::Message || frame.is_empty() {
            return Err(refuse(format!(
                "a {kind:?} frame of {} bytes inside a message",
                frame.len()
            )));
        }
        if msg.len() as u64 + frame.len() as u64 > len {
            return Err(refuse(format!("a message longer than the {len} bytes announced")));
        }
        msg.extend_from_slice(&frame);
        on_frame(&frame);
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::RingConfig;

    /// Runs `f` on a real loopback ring of `world` threads and returns each rank's result.
    pub(crate) fn on_ring<T: Send>(world: usize, f: impl Fn(&mut Ring) -> T + Sync) -> Vec<T> {
        let listeners: Vec<_> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, l)| {
                    let addrs = &addrs;
                    let f = &f;
                    s.spawn(move || {
                        let cfg = RingConfig::new(rank, world, "test", "token");
                        let mut ring = Ring::form(cfg, l, addrs).unwrap();
                        f(&mut ring)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn input(rank: usize, len: usize) -> Vec<f32> {
        // Small integers keep float sums exact, so equality can be exact too.
        (0..len).map(|i| ((i * 7 + rank * 13) % 31) as f32 - 15.0).collect()
    }

    #[test]
    fn allreduce_equals_sequential_sum() {
        for world in 1..=5 {
            for len in [0usize, 1, 7, 1000, (1 << 20) + 3] {
                let results = on_ring(world, |ring| {
                    let mut buf = input(ring.rank(), len);
                    ring.allreduce_sum(&mut buf).unwrap();
                    buf
                });
                let inputs: Vec<Vec<f32>> = (0..world).map(|r| input(r, len)).collect();
                let expected: Vec<f32> = (0..len).map(|i| inputs.iter().map(|v| v[i]).sum()).collect();
                for (rank, got) in results.iter().enumerate() {
                    assert_eq!(got, &expected, "world {world}, len {len}, rank {rank}");
                }
            }
        }
    }

    /// At bf16 every rank ends with the same bits, within bf16's rounding of
    /// the exact sum (each partial sum is rounded once per hop), and half the
    /// bytes travel (a rank that disagreed on the precision would be refused).
    #[test]
    fn a_bf16_allreduce_agrees_to_the_bit_within_rounding_of_the_sum() {
        let value = |rank: usize, i: usize| ((i * 7919 + rank * 104_729) % 10_007) as f32 * 1.37e-3 - 6.5;
        for world in 2..=4 {
            let len = 300_007;
            let results = on_ring(world, |ring| {
                let mut buf: Vec<f32> = (0..len).map(|i| value(ring.rank(), i)).collect();
                ring.allreduce_sum_as(&mut buf, Precision::Bf16).unwrap();
                buf
            });
            for got in &results[1..] {
                assert!(got == &results[0], "world {world}: ranks disagree");
            }
            for (i, got) in results[0].iter().enumerate() {
                let exact: f32 = (0..world).map(|r| value(r, i)).sum();
                let bound: f32 = (0..world).map(|r| value(r, i).abs()).sum::<f32>() * world as f32 / 256.0;
                assert!((got - exact).abs() <= bound, "world {world}, [{i}]: {got} for {exact}");
            }
        }
    }

    #[test]
    fn allreduce_is_reusable_and_mean_divides() {
        let results = on_ring(3, |ring| {
            let mut a = vec![ring.rank() as f32; 10];
            ring.allreduce_mean(&mut a).unwrap();
            let mut b = vec![1.0f32; 5];
            ring.allreduce_sum(&mut b).unwrap();
            (a, b)
        });
        for (a, b) in results {
            assert_eq!(a, vec![1.0; 10]);
            assert_eq!(b, vec![3.0; 5]);
        }
    }

    #[test]
    fn broadcast_from_every_root() {
        for world in 1..=4 {
            for root in 0..world {
                let results = on_ring(world, |ring| {
                    let mut buf = input(ring.rank(), 70_000);
                    ring.broadcast(&mut buf, root).unwrap();
                    buf
                });
                for got in results {
                    assert_eq!(got, input(root, 70_000));
                }
            }
        }
    }

    /// A message of bytes, empty, short or of many pieces, reaches every rank from
    /// every root whatever the members held before.
    #[test]
    fn a_message_of_any_length_reaches_every_rank_from_every_root() {
        let message = |seed: usize, len: usize| -> Vec<u8> { (0..len).map(|i| (i * 31 + seed * 7) as u8).collect() };
        for world in 1..=4 {
            for root in 0..world {
                for len in [0, 5, MESSAGE_PIECE * 2 + 3] {
                    let results = on_ring(world, |ring| {
                        let mut msg = message(ring.rank() + 1, 11);
                        if ring.rank() == root {
                            msg = message(root, len);
                        }
                        ring.broadcast_bytes(&mut msg, root).unwrap();
                        msg
                    });
                    for got in results {
                        assert!(got == message(root, len), "world {world}, root {root}, {len} bytes");
                    }
                }
            }
        }
    }

    /// A member expecting a message that gets a tensor's frames refuses them by name
    /// instead of reading floats as a length.
    #[test]
    fn a_tensor_where_a_message_is_expected_is_refused() {
        let results = on_ring(2, |ring| {
            if ring.rank() == 0 {
                ring.broadcast(&mut [1.0, 2.0], 0)
                    .map(|_| String::new())
                    .map_err(|e| e.to_string())
            } else {
                ring.broadcast_bytes(&mut Vec::new(), 0)
                    .map(|_| String::new())
                    .map_err(|e| e.to_string())
            }
        });
        let refused = results[1].as_ref().expect_err("rank 1 refuses");
        assert!(refused.contains("rank 0") && refused.contains("Data"), "{refused}");
    }

    /// Each rank's message lands at its next neighbour, whatever the lengths
    /// (empty, one piece, several pieces).
    #[test]
    fn a_shift_hands_each_message_to_the_next_rank() {
        let message = |rank: usize| -> Vec<u8> { (0..rank * 300_000).map(|i| (i + rank) as u8).collect() };
        for world in [1, 2, 3] {
            let got = on_ring(world, |ring| ring.shift_bytes(&message(ring.rank())).unwrap());
            for (rank, m) in got.iter().enumerate() {
                assert_eq!(*m, message((rank + world - 1) % world), "world {world}, rank {rank}");
            }
        }
    }

    #[test]
    fn mismatched_lengths_are_reported_not_hung() {
        let results = on_ring(2, |ring| {
            let mut buf = vec![1.0; if ring.rank() == 0 { 10 } else { 12 }];
            ring.allreduce_sum(&mut buf).map_err(|e| e.to_string())
        });
        assert!(
            results
                .iter()
                .any(|r| r.as_ref().is_err_and(|e| e.contains("disagree"))),
            "{results:?}"
        );
    }

    #[test]
    fn wrong_token_cannot_join_a_ring() {
        let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs = [l0.local_addr().unwrap(), l1.local_addr().unwrap()];
        let (r0, r1) = thread::scope(|s| {
            let a = s.spawn(|| {
                let mut cfg = RingConfig::new(0, 2, "job", "right");
                cfg.connect_timeout = std::time::Duration::from_secs(2);
                Ring::form(cfg, l0, &addrs)
            });
            let b = s.spawn(|| {
                let mut cfg = RingConfig::new(1, 2, "job", "wrong");
                cfg.connect_timeout = std::time::Duration::from_secs(2);
                Ring::form(cfg, l1, &addrs)
            });
            (a.join().unwrap(), b.join().unwrap())
        });
        assert!(r0.is_err() && r1.is_err());
    }
}
