//! A persistent pool of threads for the matrix products: one job at a time, run by
//! every participant at once, the caller being participant 0.
//!
//! ## Design
//! Decoding one token is ~150 small products of ~0.05 ms each, so handing a job to
//! the helpers must cost microseconds, not the tens of microseconds of waking a
//! sleeping thread (rayon from a thread outside its pool takes that path). Helpers
//! therefore spin on a job counter for a while after each job and only then park;
//! between the products of one token they are still spinning.
//!
//! A job is a borrowed `&dyn Fn(participant)`. Helpers need it as `'static`, which is
//! the one `unsafe` here: [`Pool::run`] erases the lifetime and does not return — nor
//! unwind — until every helper has finished the job and dropped its copy of the
//! reference. A panic in any participant is caught, the job still completes on the
//! others, and the first panic is re-raised in the caller.
//!
//! One caller at a time: a second thread calling [`Pool::run`] while a job runs (two
//! workers in one process, or a job that itself calls `run`) does not wait — it runs
//! every participant's share itself, one after the other. The shares are the same, so
//! the results are too.
#![allow(unsafe_code)]

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// How long a helper keeps spinning for the next job before it parks.
const SPIN: Duration = Duration::from_micros(100);

/// The most participants a pool has (a bound on fixed-size per-participant tables).
pub const MAX_THREADS: usize = 64;

type Job = &'static (dyn Fn(usize) + Sync);

/// The process's pool ([`Pool::global`]).
static GLOBAL: OnceLock<Pool> = OnceLock::new();

struct Shared {
    /// Bumped once per job; a helper runs a job when it sees a new value.
    epoch: AtomicU64,
    job: Mutex<Option<Job>>,
    /// Helpers that have not yet finished the current job.
    remaining: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Per helper: parked (or about to park) and waiting to be unparked.
    sleeping: Vec<AtomicBool>,
    /// Set when the pool is dropped: helpers leave instead of running a job.
    stop: AtomicBool,
}

/// A persistent pool of `threads` participants (the caller and `threads − 1` helpers).
pub struct Pool {
    shared: Arc<Shared>,
    helpers: Vec<Thread>,
    busy: Mutex<()>,
}

impl Pool {
    /// A pool of `threads` participants (at least 1, at most [`MAX_THREADS`]).
    pub fn new(threads: usize) -> Pool {
        let threads = threads.clamp(1, MAX_THREADS);
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            remaining: AtomicUsize::new(0),
            panic: Mutex::new(None),
            sleeping: (1..threads).map(|_| AtomicBool::new(false)).collect(),
            stop: AtomicBool::new(false),
        });
        let helpers = (1..threads)
            .map(|i| {
                let shared = shared.clone();
                thread::Builder::new()
                    .name(format!("hetero-kernels-{i}"))
                    .spawn(move || helper(&shared, i))
                    .expect("cannot start a kernel thread")
                    .thread()
                    .clone()
            })
            .collect();
        Pool {
            shared,
            helpers,
            busy: Mutex::new(()),
        }
    }

    /// The process's pool: `RAYON_NUM_THREADS` participants if set (the knob the
    /// cluster agent sets per worker), else one per available core.
    pub fn global() -> &'static Pool {
        GLOBAL.get_or_init(|| Pool::new(default_threads()))
    }

    /// Sizes the process's pool to `threads` before its first use (several worker
    /// processes sharing one machine's cores); false if it already runs, at its size.
    pub fn init_global(threads: usize) -> bool {
        let mut made = false;
        GLOBAL.get_or_init(|| {
            made = true;
            Pool::new(threads)
        });
        made
    }

    /// Number of participants.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `job(p)` for every participant `p` in `0..threads()` at once and returns
    /// when all have finished; re-raises a participant's panic.
    pub fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        let n = self.threads();
        let Ok(_busy) = self.busy.try_lock() else {
            // Another job is running (or this is a job calling run): do every share here.
            (0..n).for_each(job);
            return;
        };
        if n == 1 {
            return job(0);
        }
        // SAFETY: the reference is only used by helpers between the epoch bump below and
        // their decrement of `remaining`, and this function waits for `remaining` to reach
        // zero (panics included: they are caught) before clearing the slot and returning.
        let erased: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(job) };
        *self.shared.job.lock().expect("job slot") = Some(erased);
        self.shared.remaining.store(n - 1, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        for (i, t) in self.helpers.iter().enumerate() {
            if self.shared.sleeping[i].swap(false, Ordering::SeqCst) {
                t.unpark();
            }
        }
        let mine = catch_unwind(AssertUnwindSafe(|| job(0)));
        let mut spins = 0u32;
        while self.shared.remaining.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < 1 << 16 {
                std::hint::spin_loop();
            } else {
                thread::yield_now();
            }
        }
        *self.shared.job.lock().expect("job slot") = None;
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if let Some(p) = self.shared.panic.lock().expect("panic slot").take() {
            resume_unwind(p);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        for t in &self.helpers {
            t.unpark();
        }
    }
}

fn default_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get()))
}

fn helper(shared: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        seen = wait_for_job(shared, index, seen);
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let job = shared
            .job
            .lock()
            .expect("job slot")
            .expect("a job is set before its epoch");
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| job(index))) {
            shared.panic.lock().expect("panic slot").get_or_insert(p);
        }
        shared.remaining.fetch_sub(1, Ordering::Release);
    }
}

/// Spins until the epoch moves past `seen`, parking after [`SPIN`]; returns the new epoch.
fn wait_for_job(shared: &Shared, index: usize, seen: u64) -> u64 {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let epoch = shared.epoch.load(Ordering::Acquire);
        if epoch != seen {
            return epoch;
        }
        spins = spins.wrapping_add(1);
        if !spins.is_multiple_of(64) || start.elapsed() < SPIN {
            std::hint::spin_loop();
            continue;
        }
        // Announce the sleep, then look once more: either `run` sees the flag and
        // unparks us, or we see its new epoch here (both are SeqCst).
        shared.sleeping[index - 1].store(true, Ordering::SeqCst);
        if shared.epoch.load(Ordering::SeqCst) == seen {
            thread::park();
        }
        shared.sleeping[index - 1].store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_participant_runs_once_per_job() {
        let pool = Pool::new(3);
        for _ in 0..1000 {
            let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            pool.run(&|p| {
                hits[p].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn helpers_wake_from_parking() {
        let pool = Pool::new(2);
        let count = AtomicUsize::new(0);
        for _ in 0..3 {
            thread::sleep(SPIN * 20);
            pool.run(&|_| {
                count.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(count.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn a_helpers_panic_reaches_the_caller_and_the_pool_goes_on() {
        let pool = Pool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|p| assert!(p != 1, "participant 1 fails"))
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(&|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_job_calling_run_does_the_inner_shares_itself() {
        let pool = Pool::new(2);
        let count = AtomicUsize::new(0);
        pool.run(&|_| {
            pool.run(&|_| {
                count.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(count.load(Ordering::Relaxed), 4);
    }
}
