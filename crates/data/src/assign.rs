//! Which samples each worker trains on, step by step, as workers change.
//!
//! An [`Assignment`] holds every worker's shard (sample ids in visiting order), a
//! cursor per shard, and each worker's local batch. A step takes the next
//! `local_batch` ids of every shard; an epoch ends when every cursor reaches the end
//! of its shard, so each sample is visited **exactly once per epoch** — a last, short
//! step takes what is left, and a worker whose shard has run out contributes an empty
//! batch. Every worker holds the whole assignment and changes it only by the
//! deterministic operations below, so all workers always agree on it without
//! sending index lists:
//!
//! - [`Assignment::begin_epoch`] reshuffles each shard;
//! - [`Assignment::exchange`] passes a random fraction of each shard to its ring
//!   neighbour (so no worker keeps seeing the same corner of the data);
//! - [`Assignment::rebalance`] resizes the shards and batches to a new [`Split`]
//!   (measured throughput drifted, or a worker joined);
//! - [`Assignment::migrate`] hands the shards of workers that died to the survivors,
//!   and shares with workers that joined, without losing or repeating a sample.
//!
//! A worker that joins a running job has none of that history: it receives the
//! assignment as numbers ([`Assignment::to_words`]).

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};

use crate::shard::Split;

/// Every worker's samples, batch sizes and progress through the current epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    shards: Vec<Vec<usize>>,
    cursors: Vec<usize>,
    batches: Vec<usize>,
}

fn rng_for(seed: u64, epoch: usize, rank: usize, salt: u64) -> StdRng {
    let mix = seed ^ ((epoch as u64 + 1) << 32) ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt;
    StdRng::seed_from_u64(mix)
}

impl Assignment {
    /// The first assignment of `len` samples: `split`'s shards of the dataset
    /// shuffled with `seed`, and `split`'s local batches of `global`.
    pub fn new(len: usize, split: &Split, global: usize, seed: u64) -> Assignment {
        let world = split.world();
        Assignment {
            shards: (0..world).map(|r| split.shard(len, r, seed)).collect(),
            cursors: vec![0; world],
            batches: split.local_batches(global),
        }
    }

    /// Number of workers.
    pub fn world(&self) -> usize {
        self.shards.len()
    }

    /// Worker `rank`'s samples, in this epoch's visiting order.
    pub fn shard(&self, rank: usize) -> &[usize] {
        &self.shards[rank]
    }

    /// Every worker's local batch size.
    pub fn batches(&self) -> &[usize] {
        &self.batches
    }

    /// This epoch's accounting so far: its samples, the visits made (each counted)
    /// and the distinct samples visited. At an epoch's end all three are equal when
    /// no sample was skipped or visited twice, whoever was lost or joined.
    pub fn coverage(&self) -> (usize, usize, usize) {
        let samples = self.shards.iter().map(Vec::len).sum();
        let mut seen: Vec<usize> = (0..self.world())
            .flat_map(|r| self.shards[r][..self.cursors[r]].iter().copied())
            .collect();
        let visited = seen.len();
        seen.sort_unstable();
        seen.dedup();
        (samples, visited, seen.len())
    }

    /// How far each worker is through its shard.
    pub fn cursors(&self) -> &[usize] {
        &self.cursors
    }

    /// Moves the cursors (to adopt another worker's progress after a failure).
    ///
    /// # Panics
    /// If `cursors` does not fit the shards — a programming error.
    pub fn set_cursors(&mut self, cursors: &[usize]) {
        assert_eq!(cursors.len(), self.world(), "one cursor per worker");
        for (c, (shard, new)) in self.cursors.iter_mut().zip(self.shards.iter().zip(cursors)) {
            assert!(*new <= shard.len(), "cursor beyond its shard");
            *c = *new;
        }
    }

    /// Steps left in this epoch.
    pub fn steps_left(&self) -> usize {
        (0..self.world())
            .map(|r| (self.shards[r].len() - self.cursors[r]).div_ceil(self.batches[r].max(1)))
            .max()
            .unwrap_or(0)
    }

    /// Whether this epoch's samples are all used.
    pub fn epoch_done(&self) -> bool {
        self.steps_left() == 0
    }

    /// The samples worker `rank` trains on in the next step (may be empty).
    pub fn next_batch(&self, rank: usize) -> &[usize] {
        let shard = &self.shards[rank];
        let from = self.cursors[rank];
        &shard[from..(from + self.batches[rank]).min(shard.len())]
    }

    /// Samples in the next step over all workers.
    pub fn next_global_batch(&self) -> usize {
        (0..self.world()).map(|r| self.next_batch(r).len()).sum()
    }

    /// Marks the next step as done.
    pub fn advance(&mut self) {
        for r in 0..self.world() {
            self.cursors[r] = (self.cursors[r] + self.batches[r]).min(self.shards[r].len());
        }
    }

    /// Starts `epoch`: every shard in a fresh order drawn from `(seed, epoch, rank)`.
    pub fn begin_epoch(&mut self, seed: u64, epoch: usize) {
        for (rank, shard) in self.shards.iter_mut().enumerate() {
            shard.sort_unstable();
            shard.shuffle(&mut rng_for(seed, epoch, rank, 0));
        }
        self.cursors.iter_mut().for_each(|c| *c = 0);
    }

    /// Neighbour exchange between epochs: each worker passes a random `fraction` of
    /// its shard to the next worker on the ring, then shard sizes are restored to
    /// `split`'s shares. Starts the epoch over: call it between epochs, before
    /// [`Assignment::begin_epoch`].
    pub fn exchange(&mut self, fraction: f64, split: &Split, seed: u64, epoch: usize) {
        let world = self.world();
        self.cursors.iter_mut().for_each(|c| *c = 0);
        if world < 2 || fraction <= 0.0 {
            return;
        }
        let outgoing: Vec<Vec<usize>> = self
            .shards
            .iter()
            .enumerate()
            .map(|(rank, shard)| {
                let count = ((shard.len() as f64 * fraction.min(1.0)).round() as usize).min(shard.len());
                shard
                    .choose_multiple(&mut rng_for(seed, epoch, rank, 0xE7C4), count)
                    .copied()
                    .collect()
            })
            .collect();
        for (rank, gone) in outgoing.iter().enumerate() {
            let gone: std::collections::HashSet<usize> = gone.iter().copied().collect();
            self.shards[rank].retain(|i| !gone.contains(i));
        }
        for (rank, moved) in outgoing.into_iter().enumerate() {
            self.shards[(rank + 1) % world].extend(moved);
        }
        self.resize_to(split);
    }

    /// New shares between epochs: shard sizes and local batches follow `split`
    /// (moving as few samples as possible). Starts the epoch over, like
    /// [`Assignment::exchange`].
    ///
    /// # Panics
    /// If `split` is for another number of workers — a programming error.
    pub fn rebalance(&mut self, split: &Split, global: usize) {
        assert_eq!(split.world(), self.world(), "a split for every worker");
        self.cursors.iter_mut().for_each(|c| *c = 0);
        self.batches = split.local_batches(global);
        self.resize_to(split);
    }

    /// Moves samples from shards above their share of the total to shards below it.
    /// Only samples not yet visited this epoch move; cursors stay valid.
    fn resize_to(&mut self, split: &Split) {
        let total: usize = self.shards.iter().map(Vec::len).sum();
        let targets: Vec<usize> = (0..self.world())
            .map(|r| {
                let (a, b) = split.shard_bounds(total, r);
                b - a
            })
            .collect();
        let mut pool = Vec::new();
        for (r, shard) in self.shards.iter_mut().enumerate() {
            let spare = shard.len().saturating_sub(targets[r].max(self.cursors[r]));
            pool.extend(shard.drain(shard.len() - spare..));
        }
        pool.reverse();
        for (r, shard) in self.shards.iter_mut().enumerate() {
            while shard.len() < targets[r] {
                match pool.pop() {
                    Some(i) => shard.push(i),
                    None => break,
                }
            }
        }
        // Whatever could not go where the shares say stays with the last worker.
        self.shards.last_mut().expect("at least one worker").extend(pool);
    }

    /// The ring changed: workers `dead` (old positions) are gone and new workers
    /// join at positions `joined` of the new order (the survivors keep their old
    /// order around them). Works mid-epoch: the samples not yet visited this epoch
    /// are shared out so that what is left of the epoch follows `split` (one share
    /// per new position) — nothing is lost and nothing is visited twice — and the
    /// dead's visited samples join the survivors' shards for the next epochs.
    ///
    /// # Panics
    /// If no worker survives, `split` is not for the new workers, or a joined
    /// position is outside the new order — programming errors.
    pub fn migrate(&self, dead: &[usize], joined: &[usize], split: &Split, global: usize) -> Assignment {
        let survivors: Vec<usize> = (0..self.world()).filter(|r| !dead.contains(r)).collect();
        assert!(!survivors.is_empty(), "someone must survive");
        let world = survivors.len() + joined.len();
        assert_eq!(split.world(), world, "a split for every worker");
        let mut visited: Vec<Vec<usize>> = survivors
            .iter()
            .map(|&r| self.shards[r][..self.cursors[r]].to_vec())
            .collect();
        let mut left: Vec<Vec<usize>> = survivors
            .iter()
            .map(|&r| self.shards[r][self.cursors[r]..].to_vec())
            .collect();
        for (n, &d) in dead.iter().enumerate() {
            if d >= self.world() {
                continue;
            }
            visited[n % survivors.len()].extend_from_slice(&self.shards[d][..self.cursors[d]]);
            left[0].extend_from_slice(&self.shards[d][self.cursors[d]..]);
        }
        let mut joined = joined.to_vec();
        joined.sort_unstable();
        for &j in &joined {
            assert!(j <= visited.len(), "joined position {j} outside a ring of {world}");
            visited.insert(j, Vec::new());
            left.insert(j, Vec::new());
        }
        // Share out what is left of the epoch by resizing only the unvisited parts.
        let mut rest = Assignment {
            shards: left,
            cursors: vec![0; world],
            batches: split.local_batches(global),
        };
        rest.resize_to(split);
        Assignment {
            cursors: visited.iter().map(Vec::len).collect(),
            shards: visited
                .into_iter()
                .zip(rest.shards)
                .map(|(mut v, l)| {
                    v.extend(l);
                    v
                })
                .collect(),
            batches: rest.batches,
        }
    }

    /// The whole assignment as numbers, for a worker that joins a running job and
    /// holds none of its history: the worker count, then per worker its local
    /// batch, cursor, shard length and shard.
    pub fn to_words(&self) -> Vec<u64> {
        let mut words = vec![self.world() as u64];
        for r in 0..self.world() {
            words.extend([self.batches[r], self.cursors[r], self.shards[r].len()].map(|v| v as u64));
            words.extend(self.shards[r].iter().map(|&i| i as u64));
        }
        words
    }

    /// Reads [`Assignment::to_words`] back; says what is wrong when the words do
    /// not describe an assignment.
    pub fn from_words(words: &[u64]) -> Result<Assignment, String> {
        let mut at = 0usize;
        let mut next = |what: &str| -> Result<usize, String> {
            let w = *words
                .get(at)
                .ok_or_else(|| format!("assignment ends early: no {what} at word {at}"))?;
            at += 1;
            usize::try_from(w).map_err(|_| format!("{what} {w} does not fit this machine"))
        };
        let world = next("worker count")?;
        if world == 0 || world > words.len() {
            return Err(format!("an assignment for {world} workers in {} words", words.len()));
        }
        let (mut shards, mut cursors, mut batches) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..world {
            batches.push(next("local batch")?);
            let cursor = next("cursor")?;
            let len = next("shard length")?;
            if cursor > len || len > words.len() {
                return Err(format!("cursor {cursor} or shard length {len} out of range"));
            }
            cursors.push(cursor);
            shards.push((0..len).map(|_| next("sample id")).collect::<Result<Vec<_>, _>>()?);
        }
        if at != words.len() {
            return Err(format!("{} words left after the assignment", words.len() - at));
        }
        Ok(Assignment {
            shards,
            cursors,
            batches,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Runs the rest of the epoch and counts how often each sample is visited.
    fn visit_rest(a: &mut Assignment, seen: &mut HashMap<usize, usize>) {
        while !a.epoch_done() {
            for r in 0..a.world() {
                for &i in a.next_batch(r) {
                    *seen.entry(i).or_default() += 1;
                }
            }
            a.advance();
        }
    }

    fn assert_partition(a: &Assignment, len: usize) {
        let mut all: Vec<usize> = (0..a.world()).flat_map(|r| a.shard(r).to_vec()).collect();
        all.sort_unstable();
        assert_eq!(all, (0..len).collect::<Vec<_>>(), "shards must partition the dataset");
    }

    fn assert_once(seen: &HashMap<usize, usize>, len: usize) {
        assert_eq!(seen.len(), len, "every sample visited");
        assert!(seen.values().all(|&n| n == 1), "no sample visited twice");
    }

    #[test]
    fn every_sample_is_visited_exactly_once_per_epoch() {
        for (len, global, weights) in [
            (1000, 100, vec![1.0, 1.0, 1.0]),
            (1003, 64, vec![1.0, 0.5, 0.25]),
            (7, 4, vec![3.0, 1.0]),
        ] {
            let split = Split::weighted(&weights);
            let mut a = Assignment::new(len, &split, global, 9);
            for epoch in 0..3 {
                a.begin_epoch(9, epoch);
                let mut seen = HashMap::new();
                visit_rest(&mut a, &mut seen);
                assert_once(&seen, len);
            }
        }
    }

    #[test]
    fn exchange_moves_samples_to_the_neighbour_and_loses_none() {
        let split = Split::weighted(&[1.0, 0.5, 0.25]);
        let mut a = Assignment::new(2000, &split, 70, 3);
        let before: Vec<Vec<usize>> = (0..3).map(|r| a.shard(r).to_vec()).collect();
        let sizes: Vec<usize> = before.iter().map(Vec::len).collect();
        a.exchange(0.25, &split, 3, 0);
        assert_partition(&a, 2000);
        let after_sizes: Vec<usize> = (0..3).map(|r| a.shard(r).len()).collect();
        assert_eq!(after_sizes, sizes, "shares are kept");
        let from_0_in_1 = a.shard(1).iter().filter(|i| before[0].contains(i)).count();
        assert!(
            from_0_in_1 > 100,
            "worker 1 received part of worker 0's shard ({from_0_in_1})"
        );
        a.begin_epoch(3, 1);
        let mut seen = HashMap::new();
        visit_rest(&mut a, &mut seen);
        assert_once(&seen, 2000);
    }

    #[test]
    fn rebalance_follows_new_shares() {
        let mut a = Assignment::new(1200, &Split::even(3), 60, 1);
        let faster = Split::weighted(&[2.0, 1.0, 1.0]);
        a.rebalance(&faster, 60);
        assert_eq!(a.batches(), &[30, 15, 15]);
        assert_eq!(
            (0..3).map(|r| a.shard(r).len()).collect::<Vec<_>>(),
            vec![600, 300, 300]
        );
        assert_partition(&a, 1200);
        a.begin_epoch(1, 1);
        assert_eq!(a.steps_left(), 20);
    }

    #[test]
    fn migration_mid_epoch_loses_and_repeats_nothing() {
        for dead in [vec![0], vec![1], vec![2], vec![0, 2]] {
            let len = 1001;
            let mut a = Assignment::new(len, &Split::weighted(&[1.0, 0.5, 0.25]), 50, 5);
            a.begin_epoch(5, 0);
            let mut seen = HashMap::new();
            for _ in 0..7 {
                for r in 0..3 {
                    for &i in a.next_batch(r) {
                        *seen.entry(i).or_default() += 1;
                    }
                }
                a.advance();
            }
            let weights: Vec<f64> = [1.0, 0.5, 0.25]
                .iter()
                .enumerate()
                .filter(|(r, _)| !dead.contains(r))
                .map(|(_, w)| *w)
                .collect();
            let split = Split::weighted(&weights);
            let mut b = a.migrate(&dead, &[], &split, 50);
            assert_eq!(b.world(), 3 - dead.len());
            assert_eq!(b.batches().iter().sum::<usize>(), 50);
            visit_rest(&mut b, &mut seen);
            assert_once(&seen, len);
            // The assignment's own accounting says so too (the run summary's).
            assert_eq!(b.coverage(), (len, len, len), "dead {dead:?}");
            // The next epoch covers the whole dataset with the survivors.
            assert_partition(&b, len);
            b.begin_epoch(5, 1);
            let mut seen = HashMap::new();
            visit_rest(&mut b, &mut seen);
            assert_once(&seen, len);
        }
    }

    #[test]
    fn a_joining_worker_takes_a_share_and_nothing_repeats() {
        let len = 999;
        let mut a = Assignment::new(len, &Split::weighted(&[1.0, 0.5]), 60, 2);
        a.begin_epoch(2, 0);
        let mut seen = HashMap::new();
        for _ in 0..4 {
            for r in 0..2 {
                for &i in a.next_batch(r) {
                    *seen.entry(i).or_default() += 1;
                }
            }
            a.advance();
        }
        // Rank 1 was lost earlier; it comes back between ranks 0 and 2.
        let split = Split::weighted(&[1.0, 0.25, 0.5]);
        let mut b = a.migrate(&[], &[1], &split, 60);
        assert_eq!(b.world(), 3);
        assert_eq!(b.cursors()[1], 0);
        assert!(!b.shard(1).is_empty(), "the joiner gets samples this epoch");
        visit_rest(&mut b, &mut seen);
        assert_once(&seen, len);
        assert_partition(&b, len);
        // A loss and a join at once.
        let c = b.migrate(&[0], &[0], &Split::even(3), 60);
        assert_partition(&c, len);
        assert_eq!(c.batches(), &[20, 20, 20]);
    }

    #[test]
    fn an_assignment_survives_its_words() {
        let mut a = Assignment::new(301, &Split::weighted(&[1.0, 0.3, 0.7]), 30, 4);
        a.begin_epoch(4, 3);
        a.advance();
        let words = a.to_words();
        assert_eq!(Assignment::from_words(&words).unwrap(), a);
        for cut in [0, 1, 5, words.len() - 1] {
            let err = Assignment::from_words(&words[..cut]).unwrap_err();
            assert!(
                ["ends early", "workers", "out of range"]
                    .iter()
                    .any(|m| err.contains(m)),
                "{err}"
            );
        }
        let mut longer = words.clone();
        longer.push(0);
        assert!(Assignment::from_words(&longer).unwrap_err().contains("left after"));
        let mut bad = words;
        bad[2] = 1_000_000;
        assert!(Assignment::from_words(&bad).is_err());
    }
}
