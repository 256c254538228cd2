//! Samples that travel: before a worker trains on a sample, it holds it.
//!
//! ## Design
//! A worker on a machine without the dataset's files holds only what it was sent
//! ([`Task::presence`]). Whenever the split may have moved samples to a worker —
//! an epoch begins (after the neighbour exchange, a rebalance, joiners), the ring
//! re-formed after a loss, the first measurement re-shared an epoch — the members
//! run [`Trainer::fill_samples`] before their next step or evaluation:
//!
//! 1. one float per member says whether it lacks any sample it needs, and one
//!    more counts the members that hold only part of the dataset; when none
//!    lacks anything (every worker read the files, or already holds its part)
//!    that is all it costs — and once none holds only a part, later fills cost
//!    nothing at all until the ring re-forms;
//! 2. otherwise every member's presence bits are summed into one table;
//! 3. every member plans the same transfers from it ([`plan`]): each sample a
//!    member needs — its shard, and its part of the test set — comes from the
//!    nearest member upstream on the ring that holds it, so samples the neighbour
//!    exchange passed on travel exactly one hop;
//! 4. the bundles travel along the ring by [`hetero_comm::Ring::shift_bytes`],
//!    one hop a round, for as many rounds as the longest route; each member
//!    unpacks what is addressed to it and passes the rest on, and then checks
//!    that it holds everything it needs.
//!
//! Samples travel only where the workers form one ring (allreduce, local SGD); a
//! parameter server's groups have rings of their own, and a job of those with a
//! worker lacking samples stops with a message saying so.
//!
//! The data assignment is not touched, so the exactly-once accounting is the
//! assignment's as before; what moved, and what it cost, is reported
//! ([`Event::SamplesMoved`]) and summed into the run's summary.

use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use hetero_data::held::present;

use super::Trainer;
use crate::report::Event;
use crate::{Task, TrainError};

/// Samples to send from one member to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    /// The member that holds them.
    pub from: usize,
    /// The member that needs them.
    pub to: usize,
    /// Their ids.
    pub ids: Vec<usize>,
}

impl Route {
    /// Hops along the ring from `from` to `to` (forward, as shifts go).
    fn hops(&self, world: usize) -> usize {
        (self.to + world - self.from) % world
    }
}

/// What travelled over the run, as every member counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Moved {
    /// Samples delivered to members that lacked them.
    pub samples: u64,
    /// Bytes put on links (a bundle forwarded twice counts twice).
    pub bytes: u64,
    /// Seconds this member spent on it, from the first exchange of presence to
    /// the totals (the members wait for each other, so theirs are alike).
    pub secs: f64,
}

/// The transfers that give every member `needs[r]`: a sample member `r` lacks
/// (`held(r, id)` false) comes from the nearest member upstream that holds it.
/// Routes are ordered by sender, then receiver. A sample no member holds is an
/// error naming it.
pub(crate) fn plan(
    world: usize,
    needs: &[Vec<usize>],
    held: impl Fn(usize, usize) -> bool,
) -> Result<Vec<Route>, usize> {
    let mut routes: Vec<Route> = Vec::new();
    for (to, ids) in needs.iter().enumerate() {
        for &id in ids.iter().filter(|&&id| !held(to, id)) {
            let from = (1..world)
                .map(|d| (to + world - d) % world)
                .find(|&r| held(r, id))
                .ok_or(id)?;
            match routes.iter_mut().find(|r| r.from == from && r.to == to) {
                Some(r) => r.ids.push(id),
                None => routes.push(Route {
                    from,
                    to,
                    ids: vec![id],
                }),
            }
        }
    }
    routes.sort_by_key(|r| (r.from, r.to));
    Ok(routes)
}

impl<B: AutodiffBackend, T: Task<B>> Trainer<B, T> {
    /// The samples member `rank` needs: its shard, and its part of the test set.
    fn needs(&self, rank: usize) -> Vec<usize> {
        let train_len = self.local.task.train_len();
        let (a, b) = self.test_part(rank);
        let mut ids = self.run.assignment.shard(rank).to_vec();
        ids.extend((a..b).map(|i| train_len + i));
        ids
    }

    /// Makes every member hold the samples it needs (see the module's design);
    /// returns what moved, when anything did.
    pub(super) fn fill_samples(&mut self) -> Result<Option<Event>, TrainError> {
        // Every member held the whole dataset when last asked, and one that
        // holds it keeps it: nothing can be lacking, and asking would be a
        // collective — a barrier where every worker waits for the slowest —
        // at every epoch's start and every change of the split.
        if self.all_hold_everything {
            return Ok(None);
        }
        let world = self.world();
        let len = self.local.task.train_len() + self.local.task.test_len();
        let words = len.div_ceil(16);
        let mine = self.local.task.presence();
        if let Some(w) = &mine
            && w.len() != words
        {
            return Err(TrainError::Task(format!(
                "the task reports presence for {} ids, the dataset has {len}",
                w.len() * 16
            )));
        }
        let lacks = |words: &[f32], ids: &[usize]| ids.iter().find(|&&id| !present(words, id)).copied();
        // One slot per member: 1 when it lacks a sample it needs; then how
        // many members hold only part of the dataset.
        let mut lacking = vec![0f32; world + 1];
        lacking[self.rank] = f32::from(u8::from(
            mine.as_ref()
                .is_some_and(|w| lacks(w, &self.needs(self.rank)).is_some()),
        ));
        lacking[world] = f32::from(u8::from(mine.is_some()));
        self.global_sum(&mut lacking)?;
        self.all_hold_everything = lacking[world] == 0.0;
        if lacking.iter().all(|&x| x == 0.0) {
            return Ok(None);
        }
        // Bundles travel along the ring of all workers; a parameter server's
        // groups each have a ring of their own.
        if self.ring().world() != world {
            return Err(TrainError::Config(
                "a worker lacks samples of the dataset, and samples travel only in jobs whose workers form one \
                 ring (allreduce, local-sgd): give every worker the dataset's files"
                    .into(),
            ));
        }
        let started = Instant::now();
        let mut table = vec![0f32; world * words];
        let own = &mut table[self.rank * words..(self.rank + 1) * words];
        match mine {
            Some(w) => own.copy_from_slice(&w),
            None => own.iter_mut().enumerate().for_each(|(i, x)| {
                let bits = (len - i * 16).min(16);
                *x = ((1u32 << bits) - 1) as f32;
            }),
        }
        self.global_sum(&mut table)?;
        let needs: Vec<Vec<usize>> = (0..world).map(|r| self.needs(r)).collect();
        let held = |r: usize, id: usize| present(&table[r * words..(r + 1) * words], id);
        let routes = plan(world, &needs, held).map_err(|id| {
            TrainError::Config(format!(
                "sample {id} is needed but no worker holds it (the workers that read the dataset are gone)"
            ))
        })?;
        let rounds = routes.iter().map(|r| r.hops(world)).max().unwrap_or(0);
        let mut outgoing = Vec::new();
        for route in routes.iter().filter(|r| r.from == self.rank) {
            let bundle =
                self.local.task.pack_samples(&route.ids).map_err(|id| {
                    TrainError::Task(format!("this worker was to send sample {id} but does not hold it"))
                })?;
            put_entry(&mut outgoing, route.to, &bundle);
        }
        let (mut received, mut sent) = (0u64, 0u64);
        for _ in 0..rounds {
            sent += outgoing.len() as u64;
            let incoming = self.ring().shift_bytes(&outgoing)?;
            outgoing.clear();
            for (to, bundle) in entries(&incoming)? {
                if to == self.rank {
                    received += self.local.task.unpack_samples(bundle).map_err(TrainError::Task)? as u64;
                } else {
                    put_entry(&mut outgoing, to, bundle);
                }
            }
        }
        if let Some(words) = self.local.task.presence()
            && let Some(id) = lacks(&words, &needs[self.rank])
        {
            return Err(TrainError::Task(format!(
                "sample {id} did not arrive from the workers that hold it"
            )));
        }
        // Counts as 16-bit parts, so that the float sums stay exact.
        let parts = |v: u64| [(v >> 32) as f32, ((v >> 16) & 0xffff) as f32, (v & 0xffff) as f32];
        let mut totals: Vec<f32> = parts(received).into_iter().chain(parts(sent)).collect();
        self.global_sum(&mut totals)?;
        let whole = |p: &[f32]| ((p[0] as u64) << 32) + ((p[1] as u64) << 16) + p[2] as u64;
        let moved = Moved {
            samples: whole(&totals[..3]),
            bytes: whole(&totals[3..]),
            secs: started.elapsed().as_secs_f64(),
        };
        self.moved.samples += moved.samples;
        self.moved.bytes += moved.bytes;
        self.moved.secs += moved.secs;
        Ok(Some(Event::SamplesMoved {
            epoch: self.run.epoch,
            samples: moved.samples,
            bytes: moved.bytes,
            secs: moved.secs,
        }))
    }
}

/// Appends one addressed bundle to a shift's message: `[to u32][len u64][bundle]`.
fn put_entry(out: &mut Vec<u8>, to: usize, bundle: &[u8]) {
    out.extend_from_slice(&(to as u32).to_le_bytes());
    out.extend_from_slice(&(bundle.len() as u64).to_le_bytes());
    out.extend_from_slice(bundle);
}

/// The addressed bundles of a shift's message; a cut or overlong entry is an error.
fn entries(mut bytes: &[u8]) -> Result<Vec<(usize, &[u8])>, TrainError> {
    let bad = |why: String| TrainError::Task(format!("a message of samples from the ring was refused: {why}"));
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 12 {
            return Err(bad(format!(
                "{} bytes where an entry's header was expected",
                bytes.len()
            )));
        }
        let to = u32::from_le_bytes(bytes[..4].try_into().expect("four bytes")) as usize;
        let len = u64::from_le_bytes(bytes[4..12].try_into().expect("eight bytes"));
        let rest = &bytes[12..];
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= rest.len())
            .ok_or_else(|| bad(format!("an entry says {len} bytes, {} are left", rest.len())))?;
        out.push((to, &rest[..len]));
        bytes = &rest[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_lacking_sample_comes_from_the_nearest_holder_upstream() {
        // Four members; member 2 holds nothing, member 3 only sample 7.
        let held = |r: usize, id: usize| match r {
            2 => false,
            3 => id == 7,
            _ => true,
        };
        let needs = vec![vec![0, 1], vec![2], vec![3, 4, 7], vec![5, 6, 7]];
        let routes = plan(4, &needs, held).unwrap();
        assert_eq!(
            routes,
            vec![
                Route {
                    from: 1,
                    to: 2,
                    ids: vec![3, 4, 7]
                },
                // Member 2 upstream of 3 holds nothing: member 1, two hops away.
                Route {
                    from: 1,
                    to: 3,
                    ids: vec![5, 6]
                },
            ]
        );
        assert_eq!(routes[0].hops(4), 1, "the neighbour upstream sends");
        assert_eq!(routes[1].hops(4), 2);
        assert_eq!(plan(4, &needs, |_, _| false), Err(0), "nobody holds sample 0");
        assert!(plan(4, &needs, |_, _| true).unwrap().is_empty());
    }

    #[test]
    fn a_messages_entries_read_back_and_a_cut_one_is_refused() {
        let mut m = Vec::new();
        put_entry(&mut m, 2, b"abc");
        put_entry(&mut m, 0, b"");
        assert_eq!(entries(&m).unwrap(), vec![(2, &b"abc"[..]), (0, &b""[..])]);
        for cut in 1..m.len() {
            if cut != 15 {
                assert!(entries(&m[..cut]).is_err(), "cut at {cut}");
            }
        }
    }
}
