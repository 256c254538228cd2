//! What the server's `/metrics` shows, in Prometheus's text format: time to first
//! token and time per output token as histograms, the queue's depth, the running
//! batch, requests by outcome, and tokens in and out.
//!
//! ## Design
//! Counters are atomics the HTTP handlers and the runtime thread bump without a
//! lock; histograms keep cumulative bucket counts, as Prometheus reads them, so a
//! scrape is a plain read. Names follow Prometheus's conventions (`_seconds`,
//! `_total`) under `hetero_`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A latency histogram over fixed bucket bounds (seconds).
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations at or below each bound (cumulative), then all of them.
    counts: Vec<AtomicU64>,
    /// The sum of observations, in microseconds.
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Counts one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            if s <= *bound {
                count.fetch_add(1, Relaxed);
            }
        }
        self.counts[self.bounds.len()].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts[self.bounds.len()].load(Relaxed)
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", count.load(Relaxed));
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count());
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

/// How a request ended, for `hetero_requests_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered.
    Done,
    /// Refused as malformed or unfit (400).
    Refused,
    /// Turned away because the queue was full (429).
    Busy,
    /// The client left before the end.
    Cancelled,
    /// The runtime failed it (500/503).
    Failed,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Done,
        Outcome::Refused,
        Outcome::Busy,
        Outcome::Cancelled,
        Outcome::Failed,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Refused => "refused",
            Outcome::Busy => "busy",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed => "failed",
        }
    }
}

/// The server's figures.
pub struct Metrics {
    /// Prefill, up to the first new token.
    pub first_token: Histogram,
    /// Each later token.
    pub per_token: Histogram,
    /// End-to-end, from arrival to the last token.
    pub request: Histogram,
    /// Requests waiting for the runtime.
    pub queued: AtomicU64,
    /// Sequences in the running batch.
    pub running: AtomicU64,
    /// Prompt tokens read.
    pub tokens_in: AtomicU64,
    /// Tokens generated.
    pub tokens_out: AtomicU64,
    /// Decode steps run (each one token for every running sequence).
    pub decode_steps: AtomicU64,
    /// Sequences those steps decoded, summed: over `decode_steps`, the mean batch.
    pub decoded_rows: AtomicU64,
    outcomes: [AtomicU64; 5],
}

impl Default for Metrics {
    fn default() -> Self {
        const FIRST: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
        const TOKEN: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
        const WHOLE: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
        Metrics {
            first_token: Histogram::new(FIRST),
            per_token: Histogram::new(TOKEN),
            request: Histogram::new(WHOLE),
            queued: AtomicU64::new(0),
            running: AtomicU64::new(0),
            tokens_in: AtomicU64::new(0),
            tokens_out: AtomicU64::new(0),
            decode_steps: AtomicU64::new(0),
            decoded_rows: AtomicU64::new(0),
            outcomes: Default::default(),
        }
    }
}

impl Metrics {
    /// Counts a request that ended as `outcome`.
    pub fn ended(&self, outcome: Outcome) {
        self.outcomes[Outcome::ALL.iter().position(|&o| o == outcome).expect("listed")].fetch_add(1, Relaxed);
    }

    /// The Prometheus text exposition of every figure.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.first_token.write(
            &mut out,
            "hetero_time_to_first_token_seconds",
            "Time from a request's start of prefill to its first generated token.",
        );
        self.per_token.write(
            &mut out,
            "hetero_time_per_output_token_seconds",
            "Time between consecutive generated tokens.",
        );
        self.request.write(
            &mut out,
            "hetero_request_duration_seconds",
            "Time from a request's arrival to its last token, queueing included.",
        );
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Relaxed)
            );
        };
        gauge(
            &mut out,
            "hetero_queue_depth",
            "Requests waiting for the model.",
            "gauge",
            &self.queued,
        );
        gauge(
            &mut out,
            "hetero_running_sequences",
            "Sequences in the running batch.",
            "gauge",
            &self.running,
        );
        gauge(
            &mut out,
            "hetero_prompt_tokens_total",
            "Prompt tokens read.",
            "counter",
            &self.tokens_in,
        );
        gauge(
            &mut out,
            "hetero_generation_tokens_total",
            "Tokens generated.",
            "counter",
            &self.tokens_out,
        );
        gauge(
            &mut out,
            "hetero_decode_steps_total",
            "Decode steps run, each one token for every running sequence.",
            "counter",
            &self.decode_steps,
        );
        gauge(
            &mut out,
            "hetero_decoded_sequences_total",
            "Sequences the decode steps ran, summed (over the steps: the mean batch).",
            "counter",
            &self.decoded_rows,
        );
        let name = "hetero_requests_total";
        let _ = writeln!(out, "# HELP {name} Requests by how they ended.\n# TYPE {name} counter");
        for (o, count) in Outcome::ALL.iter().zip(&self.outcomes) {
            let _ = writeln!(out, "{name}{{outcome=\"{}\"}} {}", o.label(), count.load(Relaxed));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_the_text_parses_as_prometheus() {
        let m = Metrics::default();
        for ms in [3, 7, 40, 2000] {
            m.per_token.observe(Duration::from_millis(ms));
        }
        m.ended(Outcome::Busy);
        let text = m.render();
        let value = |line_start: &str| -> f64 {
            let line = text
                .lines()
                .find(|l| l.starts_with(line_start))
                .unwrap_or_else(|| panic!("{line_start}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        let p = "hetero_time_per_output_token_seconds";
        assert_eq!(value(&format!("{p}_bucket{{le=\"0.005\"}}")), 1.0);
        assert_eq!(value(&format!("{p}_bucket{{le=\"0.01\"}}")), 2.0);
        assert_eq!(value(&format!("{p}_bucket{{le=\"1\"}}")), 3.0);
        assert_eq!(value(&format!("{p}_bucket{{le=\"+Inf\"}}")), 4.0);
        assert_eq!(value(&format!("{p}_count")), 4.0);
        assert!((value(&format!("{p}_sum")) - 2.05).abs() < 1e-9);
        assert_eq!(value("hetero_requests_total{outcome=\"busy\"}"), 1.0);
        // Every sample line is `name{labels} value`, every family has HELP and TYPE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, v) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("hetero_") && v.parse::<f64>().is_ok(), "{line}");
        }
        assert_eq!(text.matches("# TYPE").count(), text.matches("# HELP").count());
    }
}
