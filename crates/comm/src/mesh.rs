//! A full mesh of workers: every pair of ranks shares one authenticated TCP stream
//! (its frames sealed, [`crate::link`]).
//!
//! Distributed inference needs more than a ring: a pipeline stage hands its
//! activations to whichever rank holds the next layers, and a tensor-parallel layer
//! sums partial results inside the group of ranks that split it, which need not be
//! the whole job. The mesh gives point-to-point [`Mesh::send`] / [`Mesh::recv`] and,
//! on top, collectives over any *group* of ranks ([`Mesh::allreduce_sum`],
//! [`Mesh::broadcast`], and for a decoupled model's slices of unequal sizes
//! [`Mesh::all_gather`] and [`Mesh::gather`]). Inference meshes are small (a handful of devices), so the
//! `world·(world − 1)/2` streams cost nothing.
//!
//! ## Design
//! - Forming: every rank listens, connects to each lower rank and accepts each
//!   higher one, all authenticated by the [`crate::handshake`] (a stranger or another
//!   job is refused and the rank keeps waiting until the deadline).
//! - The group allreduce of a small buffer is a direct exchange: each member sends
//!   its buffer to every other member and adds what it receives **in group order**,
//!   so all members end with bit-identical sums. A decoded token's hidden state is a
//!   few KiB: latency, not bandwidth, bounds it, and one round beats a ring's
//!   `2·(g − 1)` rounds. Above [`THREADED`] bytes (a prefill's activations) and with
//!   more than two members, the bandwidth-optimal ring (reduce-scatter + all-gather
//!   along the group's order) takes over: each member then sends `2·(g − 1)/g` of
//!   the buffer instead of `g − 1` times it. Large frames are written by helper
//!   threads so that two peers sending each other large frames never both block.
//! - Every byte written is counted ([`Mesh::bytes_sent`]): benchmarks report bytes
//!   per token.

use std::net::{SocketAddr, TcpListener};
use std::thread;
use std::time::Instant;

use crate::frame::FrameKind;
use crate::link::{self, Receiver, Sender};
use crate::precision::Precision;
use crate::ring::{accept_ranks, check_membership, dial};
use crate::{CommError, RingConfig};

/// Payloads above this many bytes are written by helper threads (below it the
/// kernel's socket buffer takes the whole frame without a reader).
pub const THREADED: usize = 32 * 1024;

/// One formed mesh; [`RingConfig`] names this rank, the world and the limits.
#[derive(Debug)]
pub struct Mesh {
    config: RingConfig,
    /// `senders[r]`: the sending half of the link to rank `r` (`None` for this rank
    /// itself). The halves live apart so that one link's sending half can be lent
    /// to a writer thread while this thread reads from its receiving half.
    senders: Vec<Option<Sender>>,
    /// `receivers[r]`: the receiving half of the link from rank `r`.
    receivers: Vec<Option<Receiver>>,
    sent: u64,
}

impl Mesh {
    /// This worker's rank.
    pub fn rank(&self) -> usize {
        self.config.rank
    }

    /// Number of workers.
    pub fn world(&self) -> usize {
        self.config.world
    }

    /// Bytes this rank has written to its peers so far (frame headers included).
    pub fn bytes_sent(&self) -> u64 {
        self.sent
    }

    /// Forms the mesh. `listener` must be the one whose address stands at
    /// `addrs[config.rank]`.
    pub fn form(config: RingConfig, listener: TcpListener, addrs: &[SocketAddr]) -> Result<Mesh, CommError> {
        check_membership("mesh", &config, addrs)?;
        let RingConfig { rank, world, .. } = config;
        let deadline = Instant::now() + config.connect_timeout;
        let higher: Vec<usize> = (rank + 1..world).collect();
        let acceptor = {
            let config = config.clone();
            thread::spawn(move || accept_ranks(&listener, &config, &higher, deadline))
        };
        let mut links = Vec::new();
        let mut failure = None;
        for (lower, addr) in addrs.iter().enumerate().take(rank) {
            match dial(*addr, lower, &config, deadline) {
                Ok(a) => links.push(a),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let accepted = acceptor
            .join()
            .map_err(|_| CommError::Config("acceptor thread panicked".into()))?;
        if let Some(e) = failure {
            return Err(e);
        }
        links.extend(accepted?);
        let mut senders: Vec<Option<Sender>> = (0..world).map(|_| None).collect();
        let mut receivers: Vec<Option<Receiver>> = (0..world).map(|_| None).collect();
        for a in links {
            link::tune(&a.stream, config.io_timeout)?;
            let (tx, rx) = link::halves(a.stream, a.keys.as_ref())?;
            (senders[a.rank], receivers[a.rank]) = (Some(tx), Some(rx));
        }
        Ok(Mesh {
            config,
            senders,
            receivers,
            sent: 0,
        })
    }

    fn sender(&mut self, peer: usize) -> Result<&mut Sender, CommError> {
        half(&mut self.senders, peer, self.config.world)
    }

    fn receiver(&mut self, peer: usize) -> Result<&mut Receiver, CommError> {
        half(&mut self.receivers, peer, self.config.world)
    }

    /// Sends `values` to rank `to`.
    pub fn send(&mut self, to: usize, values: &[f32]) -> Result<(), CommError> {
        let bytes = Precision::F32.encode(values);
        self.sender(to)?
            .send(FrameKind::Data, &bytes)
            .map_err(|e| CommError::io(format!("sending to rank {to}"), e))?;
        self.sent += 5 + bytes.len() as u64;
        Ok(())
    }

    /// Receives exactly `into.len()` values from rank `from`.
    pub fn recv(&mut self, from: usize, into: &mut [f32]) -> Result<(), CommError> {
        let max = self.config.max_frame;
        let mut frame = Vec::new();
        let name = format!("rank {from}");
        let kind = self
            .receiver(from)?
            .recv(&mut frame, max, &name, "a point-to-point transfer")?;
        decode_into(kind, &frame, into, &name)
    }

    /// Sends the message `bytes` (a command, a reply) to rank `to` as one frame.
    pub fn send_msg(&mut self, to: usize, bytes: &[u8]) -> Result<(), CommError> {
        self.sender(to)?
            .send(FrameKind::Message, bytes)
            .map_err(|e| CommError::io(format!("sending a message to rank {to}"), e))?;
        self.sent += 5 + bytes.len() as u64;
        Ok(())
    }

    /// Receives one message from rank `from` into `into` (replaced), at most the
    /// mesh's frame limit; a tensor's frame where a message is expected is refused.
    pub fn recv_msg(&mut self, from: usize, into: &mut Vec<u8>) -> Result<(), CommError> {
        let max = self.config.max_frame;
        let name = format!("rank {from}");
        let kind = self.receiver(from)?.recv(into, max, &name, "a message")?;
        if kind != FrameKind::Message {
            return Err(CommError::Protocol {
                peer: name,
                reason: format!("a {kind:?} frame of {} bytes where a message was expected", into.len()),
            });
        }
        Ok(())
    }

    /// Sums `buf` element-wise over the ranks of `group` (which must hold this rank;
    /// every member calls with the same group and length). Members add in group
    /// order, so all of them end with the same bits.
    pub fn allreduce_sum(&mut self, group: &[usize], buf: &mut [f32]) -> Result<(), CommError> {
        let me = self.check_group(group)?;
        if group.len() == 1 || buf.is_empty() {
            return Ok(());
        }
        if group.len() > 2 && buf.len() * 4 > THREADED {
            return self.ring_allreduce(group, buf);
        }
        let others: Vec<usize> = group.iter().copied().filter(|&r| r != me).collect();
        let theirs = self.exchange(&others, buf, &vec![buf.len(); others.len()])?;
        let mut sum = vec![0f32; buf.len()];
        for &member in group {
            let part = if member == me {
                &*buf
            } else {
                &theirs[others.iter().position(|&o| o == member).unwrap_or(0)]
            };
            sum.iter_mut().zip(part).for_each(|(s, v)| *s += v);
        }
        buf.copy_from_slice(&sum);
        Ok(())
    }

    /// The bandwidth-optimal allreduce for large buffers: along the group's order
    /// as a ring, `g − 1` reduce-scatter steps then `g − 1` all-gather steps, each
    /// member sending `2·(g − 1)/g` of the buffer (a direct exchange sends `g − 1`
    /// times it). Every member ends with the same bits: the all-gather copies each
    /// chunk from the one member that finished summing it.
    fn ring_allreduce(&mut self, group: &[usize], buf: &mut [f32]) -> Result<(), CommError> {
        let g = group.len();
        let pos = group
            .iter()
            .position(|&r| r == self.config.rank)
            .expect("checked member");
        let (next, prev) = (group[(pos + 1) % g], group[(pos + g - 1) % g]);
        let len = buf.len();
        let bounds = |c: usize| (len * c / g, len * (c + 1) / g);
        let mut incoming = Vec::new();
        for step in 0..2 * (g - 1) {
            let reducing = step < g - 1;
            let send_chunk = (pos + 2 * g - step) % g;
            let recv_chunk = (pos + 2 * g - step - 1) % g;
            let (a, b) = bounds(send_chunk);
            let outgoing = Precision::F32.encode(&buf[a..b]);
            let (c, d) = bounds(recv_chunk);
            incoming.resize(d - c, 0f32);
            self.send_recv(next, &outgoing, prev, &mut incoming)?;
            let dst = &mut buf[c..d];
            if reducing {
                dst.iter_mut().zip(&incoming).for_each(|(x, v)| *x += v);
            } else {
                dst.copy_from_slice(&incoming);
            }
        }
        Ok(())
    }

    /// Sends `bytes` to `to` while receiving `into.len()` values from `from`.
    fn send_recv(&mut self, to: usize, bytes: &[u8], from: usize, into: &mut [f32]) -> Result<(), CommError> {
        let max = self.config.max_frame;
        let world = self.config.world;
        let writer = half(&mut self.senders, to, world)?;
        let reader = half(&mut self.receivers, from, world)?;
        let name = format!("rank {from}");
        thread::scope(|scope| -> Result<(), CommError> {
            let sending = scope.spawn(move || {
                writer
                    .send(FrameKind::Data, bytes)
                    .map_err(|e| CommError::io(format!("sending to rank {to}"), e))
            });
            let mut frame = Vec::new();
            let got = reader
                .recv(&mut frame, max, &name, "an allreduce")
                .and_then(|kind| decode_into(kind, &frame, into, &name));
            sending
                .join()
                .map_err(|_| CommError::Config("writer thread panicked".into()))??;
            got
        })?;
        self.sent += 5 + bytes.len() as u64;
        Ok(())
    }

    /// Copies `root`'s `buf` to every other member of `group`.
    pub fn broadcast(&mut self, group: &[usize], root: usize, buf: &mut [f32]) -> Result<(), CommError> {
        let me = self.check_group(group)?;
        if !group.contains(&root) {
            return Err(CommError::Config(format!(
                "broadcast root {root} is not in the group {group:?}"
            )));
        }
        if me == root {
            let others: Vec<usize> = group.iter().copied().filter(|&r| r != me).collect();
            self.send_all(&others, buf)
        } else {
            self.recv(root, buf)
        }
    }

    /// Concatenates every member's `mine` in group order on every member of
    /// `group`: member `i` contributes `sizes[i]` values (zero is allowed), and
    /// every member ends with the same `sizes.iter().sum()` values — copies, so the
    /// same bits. A direct exchange for small parts or two members; a ring above
    /// [`THREADED`] bytes, where each member sends each part but its successor's
    /// once instead of its own part `g − 1` times.
    pub fn all_gather(&mut self, group: &[usize], mine: &[f32], sizes: &[usize]) -> Result<Vec<f32>, CommError> {
        let pos = self.check_parts(group, mine, sizes)?;
        let offsets: Vec<usize> = sizes
            .iter()
            .scan(0, |at, &n| {
                let start = *at;
                *at += n;
                Some(start)
            })
            .collect();
        let total: usize = sizes.iter().sum();
        let mut all = vec![0f32; total];
        let place = |all: &mut [f32], i: usize, values: &[f32]| {
            all[offsets[i]..offsets[i] + sizes[i]].copy_from_slice(values);
        };
        place(&mut all, pos, mine);
        let g = group.len();
        if g == 1 {
            return Ok(all);
        }
        if g == 2 || total * 4 <= THREADED {
            let others: Vec<usize> = (0..g).filter(|&i| i != pos).collect();
            let ranks: Vec<usize> = others.iter().map(|&i| group[i]).collect();
            let lens: Vec<usize> = others.iter().map(|&i| sizes[i]).collect();
            let theirs = self.exchange(&ranks, mine, &lens)?;
            for (&i, values) in others.iter().zip(&theirs) {
                place(&mut all, i, values);
            }
            return Ok(all);
        }
        // The ring: at step s each member passes on the part it received at step
        // s − 1 (its own at step 0), so after g − 1 steps every part went round.
        let (next, prev) = (group[(pos + 1) % g], group[(pos + g - 1) % g]);
        let mut incoming = Vec::new();
        for step in 0..g - 1 {
            let send = (pos + g - step) % g;
            let recv = (pos + g - step - 1) % g;
            let outgoing = Precision::F32.encode(&all[offsets[send]..offsets[send] + sizes[send]]);
            incoming.resize(sizes[recv], 0f32);
            self.send_recv(next, &outgoing, prev, &mut incoming)?;
            place(&mut all, recv, &incoming);
        }
        Ok(all)
    }

    /// Brings every member's `mine` to `root`, concatenated in group order
    /// (member `i` contributes `sizes[i]` values): `Some` on the root, `None` on
    /// the others.
    pub fn gather(
        &mut self,
        group: &[usize],
        root: usize,
        mine: &[f32],
        sizes: &[usize],
    ) -> Result<Option<Vec<f32>>, CommError> {
        let pos = self.check_parts(group, mine, sizes)?;
        if !group.contains(&root) {
            return Err(CommError::Config(format!(
                "gather root {root} is not in the group {group:?}"
            )));
        }
        if group[pos] != root {
            self.send(root, mine)?;
            return Ok(None);
        }
        let mut all = Vec::with_capacity(sizes.iter().sum());
        let mut part = Vec::new();
        for (i, &member) in group.iter().enumerate() {
            if i == pos {
                all.extend_from_slice(mine);
            } else {
                part.resize(sizes[i], 0f32);
                self.recv(member, &mut part)?;
                all.extend_from_slice(&part);
            }
        }
        Ok(Some(all))
    }

    /// Checks a group and its parts' sizes; returns this rank's place in the group.
    fn check_parts(&self, group: &[usize], mine: &[f32], sizes: &[usize]) -> Result<usize, CommError> {
        let me = self.check_group(group)?;
        let pos = group.iter().position(|&r| r == me).expect("checked member");
        if sizes.len() != group.len() {
            return Err(CommError::Config(format!(
                "{} part sizes for a group of {}",
                sizes.len(),
                group.len()
            )));
        }
        if sizes[pos] != mine.len() {
            return Err(CommError::Config(format!(
                "rank {me} holds {} values, but its part is {} long",
                mine.len(),
                sizes[pos]
            )));
        }
        Ok(pos)
    }

    fn check_group(&self, group: &[usize]) -> Result<usize, CommError> {
        let me = self.config.rank;
        if !group.contains(&me) {
            return Err(CommError::Config(format!("rank {me} is not in the group {group:?}")));
        }
        if let Some(r) = group.iter().find(|&&r| r >= self.config.world) {
            return Err(CommError::Config(format!(
                "rank {r} is outside a mesh of {}",
                self.config.world
            )));
        }
        Ok(me)
    }

    /// Sends `values` to each of `to`.
    fn send_all(&mut self, to: &[usize], values: &[f32]) -> Result<(), CommError> {
        for &r in to {
            self.send(r, values)?;
        }
        Ok(())
    }

    /// Sends `buf` to each of `others` and receives from each a buffer of the
    /// length `lens` gives it, in `others`' order.
    fn exchange(&mut self, others: &[usize], buf: &[f32], lens: &[usize]) -> Result<Vec<Vec<f32>>, CommError> {
        let bytes = Precision::F32.encode(buf);
        let max = self.config.max_frame;
        let mut received: Vec<Vec<f32>> = lens.iter().map(|&n| vec![0f32; n]).collect();
        if bytes.len() <= THREADED && lens.iter().all(|&n| n * 4 <= THREADED) {
            for &r in others {
                self.sender(r)?
                    .send(FrameKind::Data, &bytes)
                    .map_err(|e| CommError::io(format!("sending to rank {r}"), e))?;
            }
            for (&r, into) in others.iter().zip(&mut received) {
                let mut frame = Vec::new();
                let name = format!("rank {r}");
                let kind = self.receiver(r)?.recv(&mut frame, max, &name, "an allreduce")?;
                decode_into(kind, &frame, into, &name)?;
            }
        } else {
            // Each peer's sending half is lent to a thread of its own while this
            // thread reads the peers in turn.
            if let Some(&r) = others
                .iter()
                .find(|&&r| self.senders.get(r).is_none_or(Option::is_none))
            {
                return Err(not_a_peer(r, self.config.world));
            }
            let writers: Vec<(usize, &mut Sender)> = self
                .senders
                .iter_mut()
                .enumerate()
                .filter(|(r, _)| others.contains(r))
                .filter_map(|(r, s)| s.as_mut().map(|s| (r, s)))
                .collect();
            let receivers = &mut self.receivers;
            thread::scope(|scope| -> Result<(), CommError> {
                let handles: Vec<_> = writers
                    .into_iter()
                    .map(|(r, s)| {
                        let bytes = &bytes;
                        scope.spawn(move || {
                            s.send(FrameKind::Data, bytes)
                                .map_err(|e| CommError::io(format!("sending to rank {r}"), e))
                        })
                    })
                    .collect();
                let mut read = Ok(());
                for (&r, into) in others.iter().zip(&mut received) {
                    let mut frame = Vec::new();
                    let name = format!("rank {r}");
                    let got = receivers[r]
                        .as_mut()
                        .expect("checked above")
                        .recv(&mut frame, max, &name, "an allreduce")
                        .and_then(|kind| decode_into(kind, &frame, into, &name));
                    if got.is_err() {
                        read = got;
                        break;
                    }
                }
                for h in handles {
                    h.join()
                        .map_err(|_| CommError::Config("writer thread panicked".into()))??;
                }
                read
            })?;
        }
        self.sent += (5 + bytes.len() as u64) * others.len() as u64;
        Ok(received)
    }
}

/// The half of the link with `peer` that `halves` holds.
fn half<T>(halves: &mut [Option<T>], peer: usize, world: usize) -> Result<&mut T, CommError> {
    halves
        .get_mut(peer)
        .and_then(Option::as_mut)
        .ok_or_else(|| not_a_peer(peer, world))
}

fn not_a_peer(peer: usize, world: usize) -> CommError {
    CommError::Config(format!("rank {peer} is not a peer in a mesh of {world}"))
}

fn decode_into(kind: FrameKind, frame: &[u8], into: &mut [f32], peer: &str) -> Result<(), CommError> {
    if kind == FrameKind::Abort {
        return Err(CommError::Protocol {
            peer: peer.to_string(),
            reason: format!("the peer gave up: {}", String::from_utf8_lossy(frame)),
        });
    }
    if frame.len() != into.len() * 4 {
        return Err(CommError::Protocol {
            peer: peer.to_string(),
            reason: format!(
                "{} bytes where {} were expected (the peers disagree on the tensor's shape)",
                frame.len(),
                into.len() * 4
            ),
        });
    }
    Precision::F32.fold(into, frame, false);
    Ok(())
}

/// A whole mesh on loopback inside this process, one [`Mesh`] per rank: for tests
/// and single-machine runs.
pub fn loopback(world: usize, session: &str, token: &str) -> Result<Vec<Mesh>, CommError> {
    crate::ring::on_loopback(world, session, token, Mesh::form)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn on_mesh<T: Send>(world: usize, f: impl Fn(&mut Mesh) -> T + Sync) -> Vec<T> {
        let meshes = loopback(world, "m", "token").unwrap();
        thread::scope(|s| {
            let handles: Vec<_> = meshes
                .into_iter()
                .map(|mut m| {
                    let f = &f;
                    s.spawn(move || f(&mut m))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn group_sums_are_identical_on_every_member() {
        for len in [3, 100_000] {
            let out = on_mesh(4, |m| {
                let r = m.rank();
                let mut buf: Vec<f32> = (0..len).map(|i| (i as f32 * 0.1 + r as f32).sin()).collect();
                // Ranks 0, 2, 3 sum; rank 1 sits this one out.
                if r != 1 {
                    m.allreduce_sum(&[0, 2, 3], &mut buf).unwrap();
                }
                (buf, m.bytes_sent())
            });
            let expect: Vec<f32> = (0..len)
                .map(|i| {
                    [0, 2, 3]
                        .iter()
                        .fold(0f32, |s, &r| s + (i as f32 * 0.1 + r as f32).sin())
                })
                .collect();
            for r in [0, 2, 3] {
                let worst = out[r]
                    .0
                    .iter()
                    .zip(&expect)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-5, "rank {r}, {len} values: {worst}");
                assert_eq!(out[r].0, out[0].0, "every member holds the same bits");
            }
            if len == 3 {
                // Small: a direct exchange, each member sending to the two others.
                assert_eq!(out[0].1, 2 * (5 + 4 * len as u64));
            } else {
                // Large: a ring, each member sending 2·(g − 1)/g of the buffer.
                let ring = 4 * (2 * len as u64 * 2 / 3);
                assert!(
                    out[0].1.abs_diff(ring) < 64,
                    "{} bytes, a ring sends about {ring}",
                    out[0].1
                );
            }
            assert_eq!(out[1].1, 0);
        }
    }

    /// Parts of unequal sizes (one empty) arrive whole and in group order on every
    /// member, by a direct exchange when small and by the ring when large; a gather
    /// brings them to the root only.
    #[test]
    fn all_gather_and_gather_concatenate_unequal_parts_in_group_order() {
        for scale in [1, 20_000] {
            let sizes = [2 * scale, 0, scale, 3 * scale];
            let group = [3, 0, 2, 1];
            let out = on_mesh(4, |m| {
                let pos = group.iter().position(|&r| r == m.rank()).unwrap();
                let mine: Vec<f32> = (0..sizes[pos]).map(|i| (pos * 1_000_000 + i) as f32).collect();
                let all = m.all_gather(&group, &mine, &sizes).unwrap();
                let sent = m.bytes_sent();
                let gathered = m.gather(&group, 2, &mine, &sizes).unwrap();
                (all, gathered, sent)
            });
            let expect: Vec<f32> = (0..4)
                .flat_map(|pos| (0..sizes[pos]).map(move |i| (pos * 1_000_000 + i) as f32))
                .collect();
            for (rank, (all, gathered, _)) in out.iter().enumerate() {
                assert_eq!(all, &expect, "rank {rank}, scale {scale}");
                assert_eq!(gathered.as_ref(), (rank == 2).then_some(&expect));
            }
            if scale > 1 {
                // The ring: each member sends every part but its successor's once.
                let total: usize = sizes.iter().sum();
                for (pos, &rank) in group.iter().enumerate() {
                    let skipped = sizes[(pos + 1) % 4];
                    let ring = 4 * (total - skipped) as u64 + 5 * 3;
                    assert_eq!(out[rank].2, ring, "rank {rank}");
                }
            }
        }
        let bad = on_mesh(2, |m| {
            let wrong = m.all_gather(&[0, 1], &[1.0], &[2, 2]).unwrap_err().to_string();
            let count = m.gather(&[0, 1], 0, &[1.0], &[1]).unwrap_err().to_string();
            (wrong, count)
        });
        assert!(bad[0].0.contains("holds 1 values, but its part is 2 long"), "{bad:?}");
        assert!(bad[1].1.contains("1 part sizes for a group of 2"), "{bad:?}");
    }

    #[test]
    fn point_to_point_and_broadcast() {
        let out = on_mesh(3, |m| {
            let mut buf = vec![m.rank() as f32; 4];
            match m.rank() {
                0 => m.send(2, &[7.0, 8.0, 9.0, 10.0]).unwrap(),
                2 => m.recv(0, &mut buf).unwrap(),
                _ => {}
            }
            m.broadcast(&[0, 1, 2], 2, &mut buf).unwrap();
            buf
        });
        assert!(out.iter().all(|b| b == &[7.0, 8.0, 9.0, 10.0]), "{out:?}");
    }

    #[test]
    fn a_rank_outside_the_world_or_missing_addresses_is_a_config_error() {
        use crate::Ring;
        let bad = |rank, world, addrs: usize| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addrs = vec![listener.local_addr().unwrap(); addrs];
            let config = RingConfig::new(rank, world, "s", "t");
            let mesh = Mesh::form(config.clone(), listener.try_clone().unwrap(), &addrs).err();
            let ring = Ring::form(config, listener, &addrs).err();
            [mesh, ring].map(|e| match e {
                Some(CommError::Config(message)) => message,
                other => panic!("expected a config error, got {other:?}"),
            })
        };
        assert_eq!(
            bad(3, 3, 3),
            ["rank 3 is not in a mesh of 3", "rank 3 is not in a ring of 3"]
        );
        assert_eq!(
            bad(0, 0, 0),
            ["rank 0 is not in a mesh of 0", "rank 0 is not in a ring of 0"]
        );
        assert_eq!(
            bad(1, 3, 2),
            ["2 addresses for a mesh of 3", "2 addresses for a ring of 3"]
        );
    }

    #[test]
    fn a_wrong_length_or_group_is_a_clear_error() {
        let out = on_mesh(2, |m| {
            let mut buf = vec![1.0; 3 + m.rank()];
            let sum = m.allreduce_sum(&[0, 1], &mut buf).map_err(|e| e.to_string());
            let group = m.allreduce_sum(&[5], &mut buf).map_err(|e| e.to_string());
            (sum, group)
        });
        assert!(
            out.iter()
                .any(|(s, _)| s.as_ref().is_err_and(|e| e.contains("disagree"))),
            "{out:?}"
        );
        assert!(
            out.iter()
                .all(|(_, g)| g.as_ref().is_err_and(|e| e.contains("not in the group")))
        );
    }

    #[test]
    fn a_stranger_with_the_wrong_token_is_refused() {
        let listeners: Vec<_> = (0..2).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let mut it = listeners.into_iter();
        let (l0, l1) = (it.next().unwrap(), it.next().unwrap());
        let a = addrs.clone();
        let zero = thread::spawn(move || {
            let mut c = RingConfig::new(0, 2, "s", "right");
            c.connect_timeout = Duration::from_secs(2);
            Mesh::form(c, l0, &a)
        });
        let mut c = RingConfig::new(1, 2, "s", "wrong");
        c.connect_timeout = Duration::from_secs(2);
        let one = Mesh::form(c, l1, &addrs);
        assert!(one.is_err());
        let err = zero.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("rank(s) [1]"), "{err}");
    }
}
