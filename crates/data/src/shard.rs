//! Which samples each worker trains on, and in what order.
//!
//! A [`Split`] — even, or weighted by each worker's compute share — cuts the
//! dataset's indices, shuffled once with the job's seed, into one contiguous shard
//! per worker; each epoch a worker visits its own shard in a fresh order drawn from
//! `(seed, epoch, rank)`. Every worker can compute every other worker's shard, so no
//! index lists travel over the network.
//!
//! A global batch is made of each worker's `Split::local_batch`; gradients are
//! weighted by those sizes so that a step equals a single-machine step on the whole
//! global batch.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// The balanced `[start, end)` of part `part` when `len` items are cut into `parts`.
pub fn balanced(len: usize, parts: usize, part: usize) -> (usize, usize) {
    (len * part / parts, len * (part + 1) / parts)
}

/// The shard's visiting order for `epoch`.
pub fn epoch_order(shard: &[usize], seed: u64, epoch: usize, rank: usize) -> Vec<usize> {
    let mut order = shard.to_vec();
    let mix = seed ^ ((epoch as u64 + 1) << 32) ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    order.shuffle(&mut StdRng::seed_from_u64(mix));
    order
}

/// How a job's work is divided among its workers: by weight (each worker's share of
/// the job's compute), or evenly when all weights are equal.
///
/// Worker `r` owns samples `[⌊len·W_r/W⌋, ⌊len·W_{r+1}/W⌋)` of the shuffled dataset
/// (`W_r` the weights before `r`, `W` their sum) and contributes
/// `local_batch(global, r)` samples to every global batch — at least one each, the
/// rest in proportion to weight — so that unlike workers finish a step together.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    weights: Vec<f64>,
}

impl Split {
    /// Equal shares for `world` workers.
    pub fn even(world: usize) -> Split {
        Split {
            weights: vec![1.0; world.max(1)],
        }
    }

    /// Shares proportional to `weights`; non-positive or non-finite weights make the
    /// split even (a split must never starve a worker).
    pub fn weighted(weights: &[f64]) -> Split {
        if weights.is_empty() || weights.iter().any(|w| !(w.is_finite() && *w > 0.0)) {
            return Split::even(weights.len());
        }
        Split {
            weights: weights.to_vec(),
        }
    }

    /// Number of workers.
    pub fn world(&self) -> usize {
        self.weights.len()
    }

    /// The dataset indices `[start, end)` (into the shuffled order) of worker `rank`:
    /// cumulative shares, rounded down.
    pub fn shard_bounds(&self, len: usize, rank: usize) -> (usize, usize) {
        let sum: f64 = self.weights.iter().sum();
        let cut = |i: usize| {
            if i == self.weights.len() {
                return len;
            }
            let before: f64 = self.weights[..i].iter().sum();
            ((len as f64 * before / sum).floor() as usize).min(len)
        };
        (cut(rank), cut(rank + 1))
    }

    /// Every worker's part of a global batch: proportional to weight, at least
    /// one each when `global ≥ world`, summing to `global`, rounded so that the
    /// slowest worker's step is as short as it can be.
    ///
    /// Why not the largest remainders: a part's step takes `part / ideal` of the
    /// time an exact split would, so a sample more lengthens a small part's step
    /// far more than a large one's — at ideals 60.4 / 26.4 / 9.2 of 96, the
    /// largest remainder may give the extra sample to the 26 (its step 2.3 %
    /// longer than exact, and everyone waits for it), where the 60 takes it for
    /// 1 %. Each extra sample goes where the step it lengthens stays shortest
    /// (and one too many is taken where the step is longest).
    pub fn local_batches(&self, global: usize) -> Vec<usize> {
        let sum: f64 = self.weights.iter().sum();
        let ideal: Vec<f64> = self.weights.iter().map(|w| global as f64 * w / sum).collect();
        let least = usize::from(global >= self.world());
        let mut parts: Vec<usize> = ideal.iter().map(|x| (x.floor() as usize).max(least)).collect();
        // How long a step of `part` samples takes, relative to the exact split.
        let load = |part: usize, i: usize| part as f64 / ideal[i].max(f64::MIN_POSITIVE);
        while parts.iter().sum::<usize>() > global {
            let i = (0..parts.len())
                .filter(|&i| parts[i] > least)
                .max_by(|&a, &b| load(parts[a], a).total_cmp(&load(parts[b], b)))
                .expect("a part above the minimum exists while the sum is too large");
            parts[i] -= 1;
        }
        while parts.iter().sum::<usize>() < global {
            let i = (0..parts.len())
                .max_by(|&a, &b| load(parts[b] + 1, b).total_cmp(&load(parts[a] + 1, a)))
                .expect("at least one worker");
            parts[i] += 1;
        }
        parts
    }

    /// Worker `rank`'s part of a global batch (see [`Split::local_batches`]).
    pub fn local_batch(&self, global: usize, rank: usize) -> usize {
        self.local_batches(global)[rank]
    }

    /// Steps per epoch: the worker whose shard runs out first decides.
    pub fn steps_per_epoch(&self, len: usize, global: usize) -> usize {
        (0..self.world())
            .map(|r| {
                let (a, b) = self.shard_bounds(len, r);
                (b - a) / self.local_batch(global, r).max(1)
            })
            .min()
            .unwrap_or(0)
    }

    /// The sample indices of worker `rank`, in no particular order.
    pub fn shard(&self, len: usize, rank: usize, seed: u64) -> Vec<usize> {
        let mut all: Vec<usize> = (0..len).collect();
        all.shuffle(&mut StdRng::seed_from_u64(seed));
        let (a, b) = self.shard_bounds(len, rank);
        all[a..b].to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_dataset() {
        for world in 1..=5 {
            let split = Split::even(world);
            let mut all: Vec<usize> = (0..world).flat_map(|r| split.shard(103, r, 7)).collect();
            all.sort();
            assert_eq!(all, (0..103).collect::<Vec<_>>());
        }
    }

    #[test]
    fn local_batches_sum_to_global() {
        for world in 1..=7 {
            for global in [1usize, 10, 128, 129] {
                let sum: usize = (0..world).map(|r| Split::even(world).local_batch(global, r)).sum();
                assert_eq!(sum, global);
            }
        }
    }

    #[test]
    fn steps_fit_every_shard() {
        assert_eq!(Split::even(3).steps_per_epoch(1000, 100), 9);
        assert_eq!(Split::even(1).steps_per_epoch(1000, 100), 10);
        assert_eq!(Split::even(2).steps_per_epoch(5, 100), 0);
    }

    #[test]
    fn weighted_split_partitions_and_follows_weights() {
        let split = Split::weighted(&[4.0, 2.0, 1.0]);
        let mut all: Vec<usize> = (0..3).flat_map(|r| split.shard(700, r, 3)).collect();
        all.sort();
        assert_eq!(all, (0..700).collect::<Vec<_>>(), "every sample in exactly one shard");
        assert_eq!(
            (0..3).map(|r| split.shard(700, r, 3).len()).collect::<Vec<_>>(),
            vec![400, 200, 100]
        );
        let batches: Vec<usize> = (0..3).map(|r| split.local_batch(70, r)).collect();
        assert_eq!(batches.iter().sum::<usize>(), 70);
        assert_eq!(batches, vec![40, 20, 10]);
        assert_eq!(split.steps_per_epoch(700, 70), 10);
    }

    #[test]
    fn an_extra_sample_goes_where_it_lengthens_the_slowest_step_least() {
        // Ideals 60.38 / 26.4 / 9.22 of 96: the largest remainder (0.4) would
        // make the 26 a 27, stepping 2.3 % longer than exact; the 60 takes it
        // for 1 %.
        let split = Split::weighted(&[0.629, 0.275, 0.096]);
        let batches = split.local_batches(96);
        assert_eq!(batches, vec![61, 26, 9]);
        let slowest = |b: &[usize]| {
            (0..3)
                .map(|i| b[i] as f64 / (96.0 * [0.629, 0.275, 0.096][i]))
                .fold(0.0, f64::max)
        };
        for other in [[60, 27, 9], [60, 26, 10]] {
            assert!(slowest(&batches) < slowest(&other), "{other:?}");
        }
    }

    #[test]
    fn every_worker_gets_a_sample_however_small_its_weight() {
        let split = Split::weighted(&[1000.0, 1.0]);
        assert_eq!(split.local_batch(10, 1), 1);
        assert_eq!(split.local_batch(10, 0) + split.local_batch(10, 1), 10);
        // Bad weights fall back to an even split.
        assert_eq!(Split::weighted(&[1.0, 0.0]), Split::even(2));
        assert_eq!(Split::weighted(&[1.0, f64::NAN]), Split::even(2));
    }

    #[test]
    fn even_split_matches_the_balanced_helpers() {
        for world in 1..=5 {
            let split = Split::even(world);
            for r in 0..world {
                assert_eq!(split.shard_bounds(103, r), balanced(103, world, r));
            }
            assert_eq!((0..world).map(|r| split.local_batch(128, r)).sum::<usize>(), 128);
        }
    }

    #[test]
    fn epoch_order_is_a_permutation_that_changes() {
        let shard = Split::even(2).shard(50, 0, 1);
        let a = epoch_order(&shard, 1, 0, 0);
        let b = epoch_order(&shard, 1, 1, 0);
        assert_ne!(a, b);
        let (mut sa, mut ss) = (a.clone(), shard.clone());
        sa.sort();
        ss.sort();
        assert_eq!(sa, ss);
        assert_eq!(a, epoch_order(&shard, 1, 0, 0));
    }
}
