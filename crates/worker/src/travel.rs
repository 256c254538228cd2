//! A worker on a host without the job's dataset: it builds its task from what a
//! worker that read the files tells it over the ring, and receives its samples
//! from the workers that hold them (`hetero_train`'s `trainer/samples`).
//!
//! ## Design
//! A task is [`Prepared`] before the ring forms: built from the files, or — on a
//! host without them (`hetero agent --no-local-data`, or the dataset's folder is
//! not there) — waiting for the dataset's *facts* (its sizes, image shape,
//! normalisation). Once the ring has formed, every member takes part in
//! [`exchange_facts`]: one allreduce says who lacks the data and who can describe
//! it; when nobody lacks it, that is all; otherwise the lowest-ranked member that
//! read the files broadcasts its facts and the others build their tasks from
//! them. Only a ring of all workers from the start can do this (allreduce,
//! local SGD); elsewhere a worker without the data stops saying so.

use hetero_comm::Ring;

use crate::WorkerError;

/// Builds a task from the dataset's facts another worker sent.
pub type FromFacts<T> = Box<dyn FnOnce(&[u8]) -> Result<T, String>>;

/// A task as built before the ring forms.
pub enum Prepared<T> {
    /// Built from the dataset's files.
    Ready(T),
    /// This host has no dataset: the task is built from the facts another worker
    /// sends.
    FromPeers(FromFacts<T>),
}

impl<T> Prepared<T> {
    /// The task, where it needs no other worker; else an error saying why this
    /// worker cannot go on (`role` names what it was to be).
    pub fn ready(self, role: &str) -> Result<T, WorkerError> {
        match self {
            Prepared::Ready(t) => Ok(t),
            Prepared::FromPeers(_) => Err(WorkerError::Setup(format!(
                "this host has no copy of the dataset, and a {role} cannot receive its samples from the other \
                 workers (only the workers of an allreduce or local-sgd ring can, from the start): give this host \
                 the dataset's files"
            ))),
        }
    }
}

/// Agrees on the dataset's facts over `ring`: `mine` is what this worker can tell
/// (it read the files), `lacking` whether it needs them. Returns the facts when
/// this worker needs them. Every member calls it once, right after the ring forms.
pub fn exchange_facts(ring: &mut Ring, mine: Option<Vec<u8>>, lacking: bool) -> Result<Option<Vec<u8>>, WorkerError> {
    let (world, rank) = (ring.world(), ring.rank());
    let mut flags = vec![0f32; 2 * world];
    flags[rank] = f32::from(u8::from(mine.is_some()));
    flags[world + rank] = f32::from(u8::from(lacking));
    ring.allreduce_sum(&mut flags)?;
    if flags[world..].iter().all(|&f| f == 0.0) {
        return Ok(None);
    }
    let Some(root) = flags[..world].iter().position(|&f| f > 0.0) else {
        let without: Vec<usize> = (0..world).filter(|&r| flags[world + r] > 0.0).collect();
        return Err(WorkerError::Setup(format!(
            "worker(s) {without:?} have no copy of the dataset and no worker of this job read its files: \
             give at least one host the dataset"
        )));
    };
    let mut facts = mine.unwrap_or_default();
    ring.broadcast_bytes(&mut facts, root)?;
    if lacking {
        eprintln!(
            "this host has no copy of the dataset: the task is built from what rank {root} read, and its samples \
             come from the workers that hold them"
        );
    }
    Ok(lacking.then_some(facts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_ring<R: Send>(world: usize, f: impl Fn(&mut Ring) -> R + Sync) -> Vec<R> {
        let rings = hetero_comm::ring::loopback(world, "t", "k").unwrap();
        std::thread::scope(|s| {
            let handles: Vec<_> = rings
                .into_iter()
                .map(|mut ring| {
                    let f = &f;
                    s.spawn(move || f(&mut ring))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn a_worker_without_the_data_gets_the_lowest_holders_facts() {
        // Rank 0 lacks the data; ranks 1 and 2 read it (their facts differ, to see
        // whose arrive).
        let got = on_ring(3, |ring| {
            let r = ring.rank();
            let mine = (r > 0).then(|| vec![r as u8; 4]);
            exchange_facts(ring, mine, r == 0).unwrap()
        });
        assert_eq!(got, vec![Some(vec![1; 4]), None, None]);
        // Nobody lacks anything: nothing travels.
        let got = on_ring(2, |ring| exchange_facts(ring, Some(vec![7]), false).unwrap());
        assert_eq!(got, vec![None, None]);
    }

    #[test]
    fn without_any_worker_that_read_the_files_every_worker_says_so() {
        let got = on_ring(2, |ring| {
            exchange_facts(ring, None, ring.rank() == 1).unwrap_err().to_string()
        });
        for e in got {
            assert!(
                e.contains("[1] have no copy of the dataset and no worker of this job read its files"),
                "{e}"
            );
        }
    }
}
