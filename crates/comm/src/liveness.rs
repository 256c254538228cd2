//! Whether this process is making progress, so that a watchdog can tell a worker
//! stalled in its own work from one that waits on its peers.
//!
//! ## Design
//! When one worker of a ring stalls — a hung device, a deadlock, a device far too
//! slow for the job — every other worker waits for it on the data plane and makes
//! no progress either. Killing every worker that stopped making progress would
//! kill the whole ring; only the stalled one should go, and its peers then see its
//! connections break and regroup without it, as they do for any lost worker.
//!
//! So two things are counted. *Progress*: the trainer calls [`Liveness::progressed`]
//! after every step. *Waiting on peers*: every send and receive of a data-plane
//! frame (and every call a worker makes to the coordinator) holds an [`OnPeers`]
//! guard while it blocks. A [`Watch`] samples both and adds up only the time spent
//! *outside* such waits since the last progress: a worker whose busy time passes
//! its limit is stalled in its own work, and a worker blocked on a stalled peer
//! never is.
//!
//! Sampling is coarse on purpose (a watchdog ticks every fraction of a second):
//! a wait shorter than a tick may be missed, which only makes the watchdog slower
//! to fire, never wrong about a worker that keeps stepping.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Progress and waits of one process (the data plane uses [`Liveness::global`]).
#[derive(Debug, Default)]
pub struct Liveness {
    /// Bumped by each unit of progress.
    progress: AtomicU64,
    /// Threads blocked on a peer right now.
    waiting: AtomicUsize,
}

static GLOBAL: Liveness = Liveness::new();

impl Liveness {
    /// Nothing done yet, nobody waiting.
    pub const fn new() -> Liveness {
        Liveness {
            progress: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
        }
    }

    /// The process's own: the data plane's sends and receives are counted here.
    pub fn global() -> &'static Liveness {
        &GLOBAL
    }

    /// Records a unit of progress (a training step finished).
    pub fn progressed(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks the calling thread as waiting on a peer until the guard drops.
    pub fn on_peers(&self) -> OnPeers<'_> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        OnPeers(self)
    }
}

/// A thread waiting on a peer (see [`Liveness::on_peers`]).
#[must_use = "the wait lasts as long as the guard"]
pub struct OnPeers<'a>(&'a Liveness);

impl Drop for OnPeers<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// [`Liveness::global`]'s [`Liveness::on_peers`]: the data plane's wait guard.
pub fn on_peers() -> OnPeers<'static> {
    GLOBAL.on_peers()
}

/// A watchdog's view of a [`Liveness`]: the time spent outside waits on peers
/// since the last progress, from samples.
#[derive(Debug)]
pub struct Watch<'a> {
    of: &'a Liveness,
    seen: u64,
    busy: Duration,
}

impl<'a> Watch<'a> {
    /// Starts watching `of`; the busy time counts from now.
    pub fn new(of: &'a Liveness) -> Watch<'a> {
        Watch {
            of,
            seen: of.progress.load(Ordering::Relaxed),
            busy: Duration::ZERO,
        }
    }

    /// Takes a sample `since` the previous one; returns the busy time since the
    /// last progress (zero right after progress; unchanged while some thread
    /// waits on a peer).
    pub fn sample(&mut self, since: Duration) -> Duration {
        let now = self.of.progress.load(Ordering::Relaxed);
        if now != self.seen {
            self.seen = now;
            self.busy = Duration::ZERO;
        } else if self.of.waiting.load(Ordering::Relaxed) == 0 {
            self.busy += since;
        }
        self.busy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    #[test]
    fn only_time_outside_waits_since_the_last_progress_counts_as_busy() {
        let l = Liveness::new();
        let mut w = Watch::new(&l);
        assert_eq!(w.sample(TICK), TICK);
        assert_eq!(w.sample(TICK), 2 * TICK, "working without progress adds up");
        {
            let _waiting = l.on_peers();
            let _another = l.on_peers();
            assert_eq!(w.sample(TICK), 2 * TICK, "waiting on a peer is not stalling");
        }
        {
            let _waiting = l.on_peers();
            assert_eq!(w.sample(TICK), 2 * TICK, "nor while one thread still waits");
        }
        assert_eq!(w.sample(TICK), 3 * TICK, "a wait that ended stops pausing the count");
        l.progressed();
        assert_eq!(w.sample(TICK), Duration::ZERO, "progress starts it again");
        assert_eq!(w.sample(TICK), TICK);
    }
}
