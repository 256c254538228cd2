//! Which samples each worker trains on, and in what order.
//!
//! An even split: the dataset's indices are shuffled once with the job's seed and cut
//! into `world` contiguous, balanced shards; each epoch a worker visits its own shard
//! in a fresh order drawn from `(seed, epoch, rank)`. Every worker can compute every
//! other worker's shard, so no index lists travel over the network.
//!
//! A global batch of `B` samples is made of `local_batch(B, world, rank)` samples
//! from each worker; the sizes differ by at most one, and gradients are weighted by
//! them so that a step equals a single-machine step on the whole global batch.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// The balanced `[start, end)` of part `part` when `len` items are cut into `parts`.
pub fn balanced(len: usize, parts: usize, part: usize) -> (usize, usize) {
    (len * part / parts, len * (part + 1) / parts)
}

/// This worker's share of a global batch.
pub fn local_batch(global: usize, world: usize, rank: usize) -> usize {
    let (a, b) = balanced(global, world, rank);
    b - a
}

/// The sample indices of worker `rank` among `world`, in no particular order.
pub fn even_shard(len: usize, world: usize, rank: usize, seed: u64) -> Vec<usize> {
    let mut all: Vec<usize> = (0..len).collect();
    all.shuffle(&mut StdRng::seed_from_u64(seed));
    let (a, b) = balanced(len, world, rank);
    all[a..b].to_vec()
}

/// Steps per epoch: every worker must take the same number, so the smallest shard
/// decides (a partial last batch is dropped; the next epoch's order differs).
pub fn steps_per_epoch(len: usize, global_batch: usize, world: usize) -> usize {
    (0..world)
        .map(|r| {
            let (a, b) = balanced(len, world, r);
            (b - a) / local_batch(global_batch, world, r).max(1)
        })
        .min()
        .unwrap_or(0)
}

/// The shard's visiting order for `epoch`.
pub fn epoch_order(shard: &[usize], seed: u64, epoch: usize, rank: usize) -> Vec<usize> {
    let mut order = shard.to_vec();
    let mix = seed ^ ((epoch as u64 + 1) << 32) ^ (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    order.shuffle(&mut StdRng::seed_from_u64(mix));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_dataset() {
        for world in 1..=5 {
            let mut all: Vec<usize> = (0..world).flat_map(|r| even_shard(103, world, r, 7)).collect();
            all.sort();
            assert_eq!(all, (0..103).collect::<Vec<_>>());
        }
    }

    #[test]
    fn local_batches_sum_to_global() {
        for world in 1..=7 {
            for global in [1usize, 10, 128, 129] {
                let sum: usize = (0..world).map(|r| local_batch(global, world, r)).sum();
                assert_eq!(sum, global);
            }
        }
    }

    #[test]
    fn steps_fit_every_shard() {
        assert_eq!(steps_per_epoch(1000, 100, 3), 9);
        assert_eq!(steps_per_epoch(1000, 100, 1), 10);
        assert_eq!(steps_per_epoch(5, 100, 2), 0);
    }

    #[test]
    fn epoch_order_is_a_permutation_that_changes() {
        let shard = even_shard(50, 2, 0, 1);
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
