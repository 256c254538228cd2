//! The stalled-worker watchdog: a worker that makes no progress in its own work
//! for `training.stall_after_secs` ends itself, and its job goes on without it as
//! without any lost worker.
//!
//! A worker hung in its device, deadlocked, or far too slow for the job keeps its
//! connections open and its process running, so neither the data plane's
//! keepalives nor its agent notice: every other worker of the ring waits for it,
//! forever. Only time spent outside waits on peers counts
//! ([`hetero_comm::liveness`]), so the workers waiting for the stalled one never
//! fire, and the stalled one's exit breaks their connections and starts the
//! regroup they already know.

use std::io::Write;
use std::time::Duration;

use hetero_comm::liveness::{Liveness, Watch};

use hetero_job::worker_env::STALLED_EXIT;

/// How often the watchdog samples.
const TICK: Duration = Duration::from_millis(250);

/// Why a watchdog fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stalled {
    /// Busy time without progress when it fired.
    pub busy: Duration,
}

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stalled: no training step finished in {} s of this worker's own work (not counting waits on \
             its peers; training.stall_after_secs): stopping so that the job goes on without it",
            self.busy.as_secs()
        )
    }
}

/// Watches `of` from a thread of its own and calls `fire` once when its busy time
/// since the last progress reaches `limit`.
pub fn watch(of: &'static Liveness, limit: Duration, fire: impl FnOnce(Stalled) + Send + 'static) {
    std::thread::Builder::new()
        .name("hetero-watchdog".into())
        .spawn(move || {
            let mut watch = Watch::new(of);
            loop {
                std::thread::sleep(TICK);
                let busy = watch.sample(TICK);
                if busy >= limit {
                    return fire(Stalled { busy });
                }
            }
        })
        .expect("a thread for the watchdog");
}

/// Arms the process's watchdog for a training run: past `limit` without progress,
/// the worker says why on stderr and exits with [`STALLED_EXIT`], which its agent
/// reports as a lost worker. A zero `limit` turns it off.
pub fn arm(limit: Duration) {
    if limit.is_zero() {
        return;
    }
    watch(Liveness::global(), limit, |stalled| {
        // The agent may be gone, and `eprintln!` would panic on a broken pipe.
        let _ = writeln!(std::io::stderr(), "{stalled}");
        std::process::exit(i32::from(STALLED_EXIT));
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A worker that steps, or waits on a peer however long, is left alone; one
    /// busy past its limit without a step is named.
    #[test]
    fn only_a_worker_busy_past_its_limit_without_progress_is_stalled() {
        static STEPPING: Liveness = Liveness::new();
        static WAITING: Liveness = Liveness::new();
        static STUCK: Liveness = Liveness::new();
        let limit = Duration::from_secs(2);
        let (tx, rx) = mpsc::channel();
        for (name, of) in [("stepping", &STEPPING), ("waiting", &WAITING), ("stuck", &STUCK)] {
            let tx = tx.clone();
            // The others fire after the test has stopped listening: ignored.
            watch(of, limit, move |s| drop(tx.send((name, s))));
        }
        let waits = WAITING.on_peers();
        for _ in 0..20 {
            STEPPING.progressed();
            std::thread::sleep(Duration::from_millis(200));
        }
        drop(waits);
        let (name, stalled) = rx.try_recv().expect("the stuck worker was named");
        assert_eq!(name, "stuck");
        assert!(stalled.busy >= limit, "{stalled}");
        assert!(stalled.to_string().contains("training.stall_after_secs"));
        assert!(rx.try_recv().is_err(), "only the stuck one fired");
    }
}
