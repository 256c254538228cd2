//! What a worker measures of itself: samples trained, time computing and time
//! communicating, and the throttle that emulates a slower device.
//!
//! Every step is timed by one [`StepClock`]: what the aggregation spends inside
//! [`StepClock::communicate`] is communication, the rest of the step is compute.
//! The run's summary gathers every worker's figures ([`Meter::slots`],
//! [`figures`]).

use std::time::{Duration, Instant};

use crate::report::WorkerFigures;

/// Emulates a device `speed` times as fast as this machine: after each step's
/// compute the worker idles until the step has taken `1 / speed` times the work it
/// needed. The work is the process's CPU time spread over its threads (capped by
/// the wall time), so time spent waiting for a core that other workers on the same
/// machine hold is not stretched as if the device were slow at it; and it is a
/// running mean per sample, so a hiccup of the host (a page fault) delays the step
/// by its own length, as it would delay the slower device, instead of `1 / speed`
/// times its length.
#[derive(Debug, Clone)]
pub struct Throttle {
    speed: f64,
    threads: f64,
    per_sample: Option<f64>,
}

impl Throttle {
    /// A throttle to `speed` in (0, 1] for a worker computing on `threads` threads;
    /// other speeds never idle.
    pub fn new(speed: f64, threads: usize) -> Throttle {
        Throttle {
            speed,
            threads: threads.max(1) as f64,
            per_sample: None,
        }
    }

    /// How long to idle after a step that has taken `wall` so far and `cpu` of the
    /// process's CPU time for `samples` samples.
    pub fn delay(&mut self, wall: Duration, cpu: Duration, samples: usize) -> Duration {
        if !(self.speed > 0.0 && self.speed < 1.0) || samples == 0 {
            return Duration::ZERO;
        }
        let work = wall.as_secs_f64().min(cpu.as_secs_f64() / self.threads);
        let now = work / samples as f64;
        let typical = match self.per_sample {
            None => now,
            Some(mean) => 0.8 * mean + 0.2 * now,
        };
        self.per_sample = Some(typical);
        let target = typical * samples as f64 / self.speed;
        Duration::from_secs_f64((target - wall.as_secs_f64()).max(0.0))
    }
}

/// Threads a worker computes on: `RAYON_NUM_THREADS` (set by its agent), else the
/// machine's cores.
pub fn compute_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// One worker's running totals.
#[derive(Debug)]
pub(crate) struct Meter {
    throttle: Throttle,
    /// Samples this worker trained on.
    pub samples: u64,
    /// Time spent computing (steps and evaluation).
    pub compute: Duration,
    /// Time spent waiting on the others.
    pub comm: Duration,
}

impl Meter {
    /// Totals at zero, throttled to `speed` (see [`Throttle`]).
    pub fn new(speed: f64) -> Meter {
        Meter {
            throttle: Throttle::new(speed, compute_threads()),
            samples: 0,
            compute: Duration::ZERO,
            comm: Duration::ZERO,
        }
    }

    /// Starts timing a step.
    pub fn step(&mut self) -> StepClock<'_> {
        StepClock {
            started: Instant::now(),
            cpu: cpu_time::ProcessTime::now(),
            comm: Duration::ZERO,
            meter: self,
        }
    }

    /// Adds a stretch of work outside steps (evaluation, gathering figures).
    pub fn add(&mut self, compute: Duration, comm: Duration) {
        self.compute += compute;
        self.comm += comm;
    }

    /// This worker's figures in its slots of a buffer with three slots per
    /// worker of the job (`slot` is its original rank), for the others to sum.
    pub fn slots(&self, slot: usize, workers: usize) -> Vec<f32> {
        let mut slots = vec![0f32; workers * 3];
        slots[slot * 3] = self.samples as f32;
        slots[slot * 3 + 1] = self.compute.as_secs_f32();
        slots[slot * 3 + 2] = self.comm.as_secs_f32();
        slots
    }
}

/// Every worker's figures from the sum of their [`Meter::slots`] over a run of
/// `wall` seconds (a lost worker's slots are zero).
pub(crate) fn figures(slots: &[f32], wall: f64) -> Vec<WorkerFigures> {
    slots
        .chunks_exact(3)
        .enumerate()
        .map(|(r, s)| WorkerFigures {
            rank: r,
            samples: s[0] as u64,
            compute_secs: s[1] as f64,
            comm_secs: s[2] as f64,
            samples_per_sec: s[0] as f64 / wall.max(1e-9),
        })
        .collect()
}

/// Times one step: its communication, its compute, and the throttle's idling.
pub(crate) struct StepClock<'a> {
    meter: &'a mut Meter,
    started: Instant,
    cpu: cpu_time::ProcessTime,
    comm: Duration,
}

impl StepClock<'_> {
    /// After the step's compute on `samples` samples: idles as the throttle says.
    pub fn idle(&mut self, samples: usize) {
        let delay = self
            .meter
            .throttle
            .delay(self.started.elapsed(), self.cpu.elapsed(), samples);
        std::thread::sleep(delay);
    }

    /// Runs `exchange`, counting its time as communication.
    pub fn communicate<R>(&mut self, exchange: impl FnOnce() -> R) -> R {
        let started = Instant::now();
        let result = exchange();
        self.comm += started.elapsed();
        result
    }

    /// Ends the step, which trained on `samples` samples.
    pub fn finish(self, samples: usize) {
        let wall = self.started.elapsed();
        self.meter.samples += samples as u64;
        self.meter.add(wall.saturating_sub(self.comm), self.comm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_stretches_compute_to_the_speed_cap() {
        let ms = Duration::from_millis;
        let close = |d: Duration, secs: f64| (d.as_secs_f64() - secs).abs() < 1e-6;
        assert_eq!(Throttle::new(1.0, 1).delay(ms(100), ms(100), 10), Duration::ZERO);
        assert_eq!(Throttle::new(0.0, 1).delay(ms(100), ms(100), 10), Duration::ZERO);
        assert!(close(Throttle::new(0.5, 1).delay(ms(100), ms(100), 10), 0.1));
        let mut quarter = Throttle::new(0.25, 1);
        assert!(close(quarter.delay(ms(100), ms(100), 10), 0.3));
        // A 50 ms hiccup is not stretched fourfold: the typical work moves a fifth.
        assert!(close(quarter.delay(ms(150), ms(150), 10), 0.44 - 0.15));
        // Waiting for a core (wall > CPU time) is not work: 60 ms of CPU in 100 ms.
        let mut half = Throttle::new(0.5, 1);
        assert!(close(half.delay(ms(100), ms(60), 10), 0.02));
        // Two threads: CPU time counts half.
        assert!(close(Throttle::new(0.5, 2).delay(ms(100), ms(200), 10), 0.1));
    }

    #[test]
    fn a_workers_figures_land_in_its_own_slots() {
        let mut m = Meter::new(1.0);
        m.samples = 40;
        m.add(Duration::from_secs(3), Duration::from_secs(1));
        let mut sum = m.slots(1, 3);
        let other = Meter {
            samples: 10,
            ..Meter::new(1.0)
        };
        sum.iter_mut().zip(other.slots(0, 3)).for_each(|(a, b)| *a += b);
        let f = figures(&sum, 2.0);
        assert_eq!(f.len(), 3);
        assert_eq!((f[0].rank, f[0].samples), (0, 10));
        assert_eq!((f[1].samples, f[1].compute_secs, f[1].comm_secs), (40, 3.0, 1.0));
        assert_eq!(f[1].samples_per_sec, 20.0);
        assert_eq!(f[2].samples, 0, "a lost worker reports nothing");
    }
}
