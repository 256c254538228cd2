//! An allreduce that runs while its caller goes on:
//! [`Ring::start_allreduce_sum_as`] hands the ring's links to a thread of their
//! own, and [`Ring::finish_allreduce`] takes the sums, and the links, back.
//!
//! ## Design
//! Local SGD with overlap sends an average of the models and keeps stepping; it
//! needs the average only steps later. A scoped thread cannot outlive the call
//! that started it, so the links themselves travel: while they are away the ring
//! holds the thread. Any other collective on the ring first waits for it
//! ([`Ring::settle`]) and keeps its result for `finish_allreduce`. Every member
//! runs its collectives in one order, so a background allreduce never overtakes
//! another collective, nor is overtaken by one. A ring dropped while its links
//! are away shuts their sockets, so the thread and the neighbours learn at once
//! instead of waiting out the read timeout. A failure shows when the caller
//! finishes the allreduce or runs another collective, whichever comes first —
//! steps later for local SGD, which then regroups as after any other failure.

use std::net::{Shutdown, TcpStream};
use std::thread::JoinHandle;

use crate::link::{Receiver, Sender};
use crate::precision::Precision;
use crate::{CommError, Ring};

/// Where a ring's background allreduce stands.
#[derive(Debug, Default)]
pub(crate) enum Background {
    /// None was started, or its result was taken.
    #[default]
    Idle,
    /// Running; the links are on its thread.
    Away {
        thread: JoinHandle<Flight>,
        /// Handles on the links' sockets, to shut them if the ring is dropped.
        sockets: Vec<TcpStream>,
    },
    /// Finished (the links are back); its sums wait for `finish_allreduce`.
    Landed(Result<Vec<f32>, CommError>),
}

/// What the allreduce's thread hands back: the links and the sums.
#[derive(Debug)]
pub(crate) struct Flight {
    next: Option<Sender>,
    prev: Option<Receiver>,
    result: Result<Vec<f32>, CommError>,
}

impl Ring {
    /// Starts summing `buf` over every rank, as [`Ring::allreduce_sum_as`] does,
    /// on a thread of its own; [`Ring::finish_allreduce`] returns the sums. Every
    /// rank must start it at the same point of its collectives. Other collectives
    /// may run meanwhile: each waits for this one first.
    pub fn start_allreduce_sum_as(&mut self, mut buf: Vec<f32>, precision: Precision) -> Result<(), CommError> {
        self.settle();
        if !matches!(self.background, Background::Idle) {
            return Err(CommError::Config(
                "an allreduce is already under way in the background: finish it first".into(),
            ));
        }
        if self.config.world == 1 || buf.is_empty() {
            self.background = Background::Landed(Ok(buf));
            return Ok(());
        }
        let sockets = [
            self.next.as_ref().map(|n| n.get_ref().try_clone()),
            self.prev.as_ref().map(|p| p.get_ref().try_clone()),
        ]
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .collect();
        // The links go to the thread only once it runs: a thread that cannot
        // be started leaves them here.
        let (hand_over, links) = std::sync::mpsc::channel::<Ring>();
        let thread = std::thread::Builder::new()
            .name(format!("allreduce-r{}", self.config.rank))
            .spawn(move || {
                let Ok(mut away) = links.recv() else {
                    unreachable!("the links are sent right after the thread starts");
                };
                let result = away.allreduce_sum_as(&mut buf, precision).map(|()| buf);
                Flight {
                    next: away.next.take(),
                    prev: away.prev.take(),
                    result,
                }
            })
            .map_err(|e| CommError::io("starting a background allreduce", e))?;
        let away = Ring {
            config: self.config.clone(),
            next: self.next.take(),
            prev: self.prev.take(),
            background: Background::Idle,
        };
        hand_over.send(away).expect("the thread waits for its links");
        self.background = Background::Away { thread, sockets };
        Ok(())
    }

    /// Waits for the allreduce [`Ring::start_allreduce_sum_as`] started and
    /// returns its sums; an error when none was started.
    pub fn finish_allreduce(&mut self) -> Result<Vec<f32>, CommError> {
        self.settle();
        match std::mem::take(&mut self.background) {
            Background::Landed(result) => result,
            Background::Idle => Err(CommError::Config("no allreduce was started in the background".into())),
            Background::Away { .. } => unreachable!("settle() brought it back"),
        }
    }

    /// Whether an allreduce started in the background has not been finished.
    pub fn allreduce_under_way(&self) -> bool {
        !matches!(self.background, Background::Idle)
    }

    /// A background allreduce's failure, taken for the collective about to run:
    /// it closed the links, so that collective would only fail on a closed
    /// socket. [`Ring::finish_allreduce`] then says it failed before.
    pub(crate) fn background_failure(&mut self) -> Result<(), CommError> {
        if !matches!(self.background, Background::Landed(Err(_))) {
            return Ok(());
        }
        let Background::Landed(Err(e)) = std::mem::take(&mut self.background) else {
            unreachable!("checked above");
        };
        self.background = Background::Landed(Err(CommError::Config(format!(
            "the allreduce started in the background failed: {e}"
        ))));
        Err(e)
    }

    /// Waits for a background allreduce, if one is away, and takes its links
    /// back; its result stays for [`Ring::finish_allreduce`].
    pub(crate) fn settle(&mut self) {
        if !matches!(self.background, Background::Away { .. }) {
            return;
        }
        let Background::Away { thread, .. } = std::mem::take(&mut self.background) else {
            unreachable!("checked above");
        };
        match thread.join() {
            Ok(flight) => {
                self.next = flight.next;
                self.prev = flight.prev;
                self.background = Background::Landed(flight.result);
            }
            // The allreduce itself panicked: a bug, not a peer's doing.
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if let Background::Away { thread, sockets } = std::mem::take(&mut self.background) {
            for socket in &sockets {
                let _ = socket.shutdown(Shutdown::Both);
            }
            // Its reads and writes fail at once on shut sockets; with a link
            // left open (a handle that could not be made) it is left to end on
            // its own rather than waited for.
            if sockets.len() == 2 {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::loopback;

    /// Runs `f` on each of `rings`, each on a thread.
    fn each_of<T: Send>(rings: Vec<Ring>, f: impl Fn(Ring) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let handles: Vec<_> = rings.into_iter().map(|r| s.spawn(|| f(r))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Runs `f` on every rank of a loopback ring of `world`, each on a thread.
    fn each_rank<T: Send>(world: usize, f: impl Fn(Ring) -> T + Sync) -> Vec<T> {
        each_of(loopback(world, "background", "token").unwrap(), f)
    }

    fn input(rank: usize, len: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7 + rank * 13) % 31) as f32).collect()
    }

    #[test]
    fn a_background_allreduce_lands_the_sums_a_blocking_one_gives() {
        for world in [1, 2, 3] {
            let len = 200_003;
            let results = each_rank(world, |mut ring| {
                let mut blocking = input(ring.rank(), len);
                ring.allreduce_sum(&mut blocking).unwrap();
                ring.start_allreduce_sum_as(input(ring.rank(), len), Precision::F32)
                    .unwrap();
                assert!(ring.allreduce_under_way());
                let landed = ring.finish_allreduce().unwrap();
                assert!(!ring.allreduce_under_way());
                (blocking, landed)
            });
            for (blocking, landed) in results {
                assert_eq!(blocking, landed, "world {world}");
            }
        }
    }

    #[test]
    fn a_collective_meanwhile_waits_for_it_and_leaves_its_sums_to_finish() {
        let results = each_rank(3, |mut ring| {
            let rank = ring.rank();
            ring.start_allreduce_sum_as(vec![rank as f32 + 1.0; 1000], Precision::F32)
                .unwrap();
            // A broadcast needs the links the allreduce holds: it waits for them.
            let mut b = vec![rank as f32; 10];
            ring.broadcast(&mut b, 2).unwrap();
            let again = ring.start_allreduce_sum_as(vec![0.0], Precision::F32).unwrap_err();
            (b, ring.finish_allreduce().unwrap(), again.to_string())
        });
        for (b, sums, again) in results {
            assert_eq!(b, vec![2.0; 10]);
            assert_eq!(sums, vec![6.0; 1000]);
            assert!(again.contains("already under way"), "{again}");
        }
    }

    #[test]
    fn finishing_what_was_never_started_is_an_error() {
        let mut rings = loopback(1, "background", "token").unwrap();
        let e = rings[0].finish_allreduce().unwrap_err().to_string();
        assert!(e.contains("no allreduce was started"), "{e}");
    }

    #[test]
    fn a_ring_dropped_with_its_allreduce_away_ends_it_and_tells_the_neighbours() {
        let mut rings = loopback(3, "background", "token").unwrap();
        let mut last = rings.pop().unwrap();
        last.start_allreduce_sum_as(vec![1.0; 1000], Precision::F32).unwrap();
        // Its thread waits for neighbours that have not started: the drop must
        // end that thread (else it would hang here) and close its links.
        drop(last);
        let errors = each_of(rings, |mut ring| {
            ring.start_allreduce_sum_as(vec![1.0; 1000], Precision::F32).unwrap();
            ring.finish_allreduce().unwrap_err()
        });
        assert_eq!(errors.len(), 2);
    }

    #[test]
    fn a_collective_after_a_failed_background_allreduce_reports_that_failure() {
        let mut rings = loopback(3, "background", "token").unwrap();
        drop(rings.pop());
        let results = each_of(rings, |mut ring| {
            ring.start_allreduce_sum_as(vec![1.0; 1000], Precision::F32).unwrap();
            let broadcast = ring.broadcast(&mut [0.0; 4], 0).unwrap_err().to_string();
            (broadcast, ring.finish_allreduce().unwrap_err().to_string())
        });
        for (broadcast, finished) in results {
            // The allreduce's own failure (a closed neighbour), not the closed
            // socket the broadcast would have met.
            assert!(!broadcast.contains("during broadcast"), "{broadcast}");
            assert!(
                finished.contains("failed") && finished.contains(&broadcast),
                "{finished}"
            );
        }
    }
}
