//! What the coordinator tells people: every job's log, each task's latest
//! training figures and the job's live chart, and alerts.
//!
//! Log lines and alerts are stored before they are announced (log followers
//! woken, the alert queued for the webhook); a store that cannot write returns
//! its error to the change that wrote them. Figures and chart points are kept in
//! memory only: they are a view of a running job, rebuilt by its next events.

use std::collections::HashMap;

use hetero_job::events::Event;
use tokio::sync::{mpsc, watch};

use crate::alerts::{AlertRecord, Severity};
use crate::store::{LogKind, LogRecord, Store};
use crate::{ClusterError, now_ms};

/// One point of a job's live chart: (global step, loss, job samples/s).
pub(crate) type ChartPoint = (u64, f32, f64);

/// Points of a job's live chart kept in memory.
const HISTORY_POINTS: usize = 5000;

/// Logs, figures, the chart and alerts.
pub(crate) struct Telemetry {
    /// Last log sequence number per job.
    log_seq: HashMap<String, u64>,
    /// Latest (loss, samples/s) each task reported.
    metrics: HashMap<String, (f32, f64)>,
    /// Per job, its leader's (global step, loss, samples/s of the job) over time, capped.
    history: HashMap<String, Vec<ChartPoint>>,
    next_alert: u64,
    /// Bumped whenever a log line is appended, to wake log followers.
    log_tick: watch::Sender<u64>,
    /// Alerts on their way to the webhook.
    alerts: mpsc::UnboundedSender<AlertRecord>,
}

impl Telemetry {
    /// Telemetry going on from what `store` holds; alerts go to `alerts`.
    pub fn open(store: &Store, alerts: mpsc::UnboundedSender<AlertRecord>) -> Result<Telemetry, ClusterError> {
        Ok(Telemetry {
            log_seq: HashMap::new(),
            metrics: HashMap::new(),
            history: HashMap::new(),
            next_alert: store.alerts(0)?.last().map_or(0, |a| a.id),
            log_tick: watch::channel(0).0,
            alerts,
        })
    }

    /// A receiver woken by every appended log line.
    pub fn follow_logs(&self) -> watch::Receiver<u64> {
        self.log_tick.subscribe()
    }

    /// The last sequence number of `job_id`'s log, when this coordinator appended
    /// to it (else the store knows).
    pub fn cached_seq(&self, job_id: &str) -> Option<u64> {
        self.log_seq.get(job_id).copied()
    }

    /// The last sequence number of `job_id`'s log.
    fn last_seq(&self, store: &Store, job_id: &str) -> Result<u64, ClusterError> {
        match self.cached_seq(job_id) {
            Some(s) => Ok(s),
            None => store.last_log_seq(job_id),
        }
    }

    /// Appends `texts` to `job_id`'s log as `kind` lines of `rank` (−1: the
    /// coordinator).
    pub fn log(
        &mut self,
        store: &Store,
        job_id: &str,
        rank: i32,
        kind: LogKind,
        texts: Vec<String>,
    ) -> Result<(), ClusterError> {
        if texts.is_empty() {
            return Ok(());
        }
        let seq = self.last_seq(store, job_id)?;
        let now = now_ms();
        let lines: Vec<LogRecord> = texts
            .into_iter()
            .enumerate()
            .map(|(i, text)| LogRecord {
                seq: seq + 1 + i as u64,
                rank,
                unix_ms: now,
                kind,
                text,
            })
            .collect();
        let last = lines.last().map_or(seq, |l| l.seq);
        store.append_logs(job_id, &lines)?;
        self.log_seq.insert(job_id.to_string(), last);
        self.log_tick.send_modify(|t| *t += 1);
        Ok(())
    }

    /// One line the coordinator writes about `job_id`.
    pub fn state_line(&mut self, store: &Store, job_id: &str, line: String) -> Result<(), ClusterError> {
        self.log(store, job_id, -1, LogKind::State, vec![line])
    }

    /// Stores, logs and (with a webhook) delivers an alert about `subject`.
    pub fn raise(
        &mut self,
        store: &Store,
        severity: Severity,
        subject: &str,
        message: String,
    ) -> Result<(), ClusterError> {
        let alert = AlertRecord {
            id: self.next_alert + 1,
            unix_ms: now_ms(),
            severity,
            subject: subject.into(),
            message,
        };
        tracing::warn!(severity = severity.name(), subject, message = %alert.message, "alert");
        store.put_alert(&alert)?;
        self.next_alert = alert.id;
        let _ = self.alerts.send(alert);
        Ok(())
    }

    /// Takes a worker's progress `events`: a step's figures become its task's
    /// latest, and the leader's (`rank` 0) a point of the job's chart, whose rate
    /// is the job's (`workers` × the leader's).
    pub fn record(&mut self, task_id: &str, job_id: &str, rank: u32, workers: u32, events: &[Event]) {
        for event in events {
            let &Event::Step {
                epoch,
                step,
                steps,
                loss,
                samples_per_sec,
            } = event
            else {
                continue;
            };
            self.metrics.insert(task_id.to_string(), (loss, samples_per_sec));
            if rank == 0 {
                let global = (epoch * steps + step + 1) as u64;
                let points = self.history.entry(job_id.to_string()).or_default();
                if points.len() >= HISTORY_POINTS {
                    // Keep the whole run visible: drop every other point.
                    let thinned: Vec<_> = points.iter().step_by(2).copied().collect();
                    *points = thinned;
                }
                points.push((global, loss, samples_per_sec * workers as f64));
            }
        }
    }

    /// A task's latest (loss, samples/s), if it reported a step.
    pub fn figures(&self, task_id: &str) -> Option<(f32, f64)> {
        self.metrics.get(task_id).copied()
    }

    /// A job's live chart.
    pub fn chart(&self, job_id: &str) -> Vec<ChartPoint> {
        self.history.get(job_id).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(epoch: usize, step: usize, loss: f32) -> Event {
        Event::Step {
            epoch,
            step,
            steps: 10,
            loss,
            samples_per_sec: 100.0,
        }
    }

    #[test]
    fn the_leaders_steps_draw_the_chart_and_every_tasks_last_step_is_its_figure() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut t = Telemetry::open(&store, tx).unwrap();
        t.record("j-r0", "j", 0, 3, &[step(0, 0, 2.0), step(1, 4, 1.0)]);
        t.record("j-r1", "j", 1, 3, &[step(1, 4, 1.5)]);
        assert_eq!(t.chart("j"), vec![(1, 2.0, 300.0), (15, 1.0, 300.0)]);
        assert_eq!(t.figures("j-r1"), Some((1.5, 100.0)));
        assert_eq!(t.figures("j-r2"), None);
    }

    #[test]
    fn log_lines_and_alerts_are_stored_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut t = Telemetry::open(&store, tx).unwrap();
        let woken = t.follow_logs();
        t.log(&store, "j", 2, LogKind::Log, vec!["a".into(), "b".into()])
            .unwrap();
        t.state_line(&store, "j", "c".into()).unwrap();
        assert!(woken.has_changed().unwrap());
        let lines = store.logs("j", 0, 10).unwrap();
        let seen: Vec<_> = lines.iter().map(|l| (l.seq, l.rank, l.kind, l.text.as_str())).collect();
        assert_eq!(
            seen,
            vec![
                (1, 2, LogKind::Log, "a"),
                (2, 2, LogKind::Log, "b"),
                (3, -1, LogKind::State, "c")
            ]
        );
        t.raise(&store, Severity::Warning, "j", "x".into()).unwrap();
        t.raise(&store, Severity::Info, "j", "y".into()).unwrap();
        let ids: Vec<_> = store.alerts(0).unwrap().iter().map(|a| (a.id, a.severity)).collect();
        assert_eq!(ids, vec![(1, Severity::Warning), (2, Severity::Info)]);
        assert_eq!(rx.try_recv().unwrap().message, "x");
    }
}
