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
                "this worker reads no dataset here (its agent runs with --no-local-data, or the dataset's folder \
                 is missing on this host), and a {role} cannot receive its samples from the other workers (only \
                 the workers of an allreduce or local-sgd ring can, from the start): give this host the dataset's \
                 files"
            ))),
        }
    }
}

/// Agrees on the dataset's facts over `ring`: `describe` gives this worker's
/// (it read the files; called only when some worker lacks them), `lacking` says
/// whether it needs them. Returns the facts when this worker needs them. Every
/// member calls it once, right after the ring forms. When some worker lacks the
/// data, every worker that read the files checks that its copy gives the same
/// facts as the one sent (sizes, shape, normalisation, a fingerprint of the
/// contents): copies that differ stop every worker with a message naming them.
pub fn exchange_facts(
    ring: &mut Ring,
    describe: Option<&dyn Fn() -> Vec<u8>>,
    lacking: bool,
) -> Result<Option<Vec<u8>>, WorkerError> {
    let (world, rank) = (ring.world(), ring.rank());
    let mut flags = vec![0f32; 2 * world];
    flags[rank] = f32::from(u8::from(describe.is_some()));
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
    let mine = describe.map(|d| d());
    let mut facts = if rank == root {
        mine.clone().unwrap_or_default()
    } else {
        Vec::new()
    };
    ring.broadcast_bytes(&mut facts, root)?;
    let mut differs = vec![0f32; world];
    differs[rank] = f32::from(u8::from(mine.as_ref().is_some_and(|m| *m != facts)));
    ring.allreduce_sum(&mut differs)?;
    let differing: Vec<usize> = (0..world).filter(|&r| differs[r] > 0.0).collect();
    if !differing.is_empty() {
        return Err(WorkerError::Setup(format!(
            "worker(s) {differing:?} read a copy of the dataset that differs from rank {root}'s (its sizes, image \
             shape, normalisation or contents): give every host the same files, or start the agents of the \
             hosts whose copy differs with --no-local-data"
        )));
    }
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
        let same = || vec![1u8; 4];
        let got = on_ring(3, |ring| {
            let r = ring.rank();
            exchange_facts(ring, (r > 0).then_some(&same as &dyn Fn() -> Vec<u8>), r == 0).unwrap()
        });
        assert_eq!(got, vec![Some(vec![1; 4]), None, None]);
        // Nobody lacks anything: nothing travels, and nobody describes its copy.
        let never = || -> Vec<u8> { panic!("described although nobody lacks the data") };
        let got = on_ring(2, |ring| exchange_facts(ring, Some(&never), false).unwrap());
        assert_eq!(got, vec![None, None]);
    }

    #[test]
    fn copies_that_differ_stop_every_worker_naming_them() {
        let got = on_ring(3, |ring| {
            let r = ring.rank();
            let copy = move || vec![r as u8; 4];
            exchange_facts(ring, (r > 0).then_some(&copy as &dyn Fn() -> Vec<u8>), r == 0)
                .unwrap_err()
                .to_string()
        });
        for e in got {
            assert!(
                e.contains("worker(s) [2] read a copy of the dataset that differs from rank 1's"),
                "{e}"
            );
        }
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
