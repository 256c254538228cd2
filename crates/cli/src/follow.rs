//! Watching a job: its log stream drawn as live progress bars (one per worker),
//! epoch results as lines, and a summary table at the end.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hetero_cluster::records::job_state_name;
use hetero_job::JobSpec;
use hetero_job::events::{Event, RunSummary};
use hetero_proto as pb;
use hetero_proto::client::Client;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_stream::StreamExt;

/// Live display of one job.
struct Display {
    multi: MultiProgress,
    bars: BTreeMap<i32, ProgressBar>,
    tty: bool,
    epochs: usize,
    last_plain: Instant,
}

impl Display {
    fn new(epochs: usize) -> Self {
        let tty = std::io::stderr().is_terminal();
        let target = if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Display {
            multi: MultiProgress::with_draw_target(target),
            bars: BTreeMap::new(),
            tty,
            epochs,
            last_plain: Instant::now() - Duration::from_secs(60),
        }
    }

    fn line(&self, text: String) {
        if self.tty {
            let _ = self.multi.println(text);
        } else {
            println!("{text}");
        }
    }

    fn step(&mut self, rank: i32, epoch: usize, step: usize, steps: usize, loss: f32, rate: f64) {
        let total = (steps * self.epochs) as u64;
        let epochs = self.epochs;
        let bar = self.bars.entry(rank).or_insert_with(|| {
            let bar = self.multi.add(ProgressBar::new(total));
            bar.set_style(
                ProgressStyle::with_template("{prefix:>9} [{bar:30.cyan/blue}] {pos}/{len} steps  {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_prefix(format!("worker {rank}"));
            bar
        });
        bar.set_length(total);
        bar.set_position((epoch * steps + step + 1) as u64);
        let msg = format!("epoch {}/{epochs}  loss {loss:.4}  {rate:.0} samples/s", epoch + 1);
        bar.set_message(msg.clone());
        if !self.tty && rank == 0 && self.last_plain.elapsed() > Duration::from_secs(5) {
            self.last_plain = Instant::now();
            println!("worker 0: step {}/{}  {msg}", epoch * steps + step + 1, total);
        }
    }

    fn finish(&self) {
        for bar in self.bars.values() {
            bar.finish();
        }
    }
}

/// Follows `job_id`'s log until the job ends; returns its final information.
pub async fn follow_job(client: &mut Client, job_id: &str, show_logs: bool) -> Result<pb::JobInfo> {
    let info = client
        .get_job(pb::GetJobRequest { job_id: job_id.into() })
        .await
        .with_context(|| format!("looking up {job_id}"))?
        .into_inner();
    let epochs = JobSpec::from_json(&info.spec_json)
        .map(|s| s.training.epochs)
        .unwrap_or(1);
    let mut display = Display::new(epochs);
    let mut after = 0;
    loop {
        let req = pb::StreamLogsRequest {
            job_id: job_id.into(),
            after_seq: after,
            follow: true,
        };
        match client.stream_logs(req).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                while let Some(entry) = stream.next().await {
                    let Ok(entry) = entry else { break };
                    after = entry.seq;
                    show(&mut display, &entry, show_logs);
                }
            }
            Err(s) => display.line(format!("(log stream interrupted: {}; retrying)", s.message())),
        }
        let info = client
            .get_job(pb::GetJobRequest { job_id: job_id.into() })
            .await?
            .into_inner();
        if matches!(
            pb::JobState::try_from(info.state),
            Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
        ) {
            display.finish();
            return Ok(info);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn show(display: &mut Display, entry: &pb::LogEntry, show_logs: bool) {
    match entry.kind.as_str() {
        "event" => match serde_json::from_str::<Event>(&entry.text) {
            Ok(Event::Step {
                epoch,
                step,
                steps,
                loss,
                samples_per_sec,
            }) => display.step(entry.rank, epoch, step, steps, loss, samples_per_sec),
            Ok(Event::Epoch {
                epoch,
                train_loss,
                test_accuracy,
                elapsed_secs,
                ..
            }) => {
                let acc = test_accuracy
                    .map(|a| format!("  test accuracy {:.2}%", a * 100.0))
                    .unwrap_or_default();
                display.line(format!(
                    "epoch {}/{}  train loss {train_loss:.4}{acc}  ({elapsed_secs:.1} s)",
                    epoch + 1,
                    display.epochs
                ));
            }
            Ok(Event::Rebalanced {
                epoch,
                shares,
                rates,
                within_epoch,
            }) => {
                let measured: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
                display.line(format!(
                    "epoch {}: {}; new shares {}{}",
                    epoch + 1,
                    if within_epoch {
                        "split set from the throughput measured in its first steps"
                    } else {
                        "throughput drifted from the split"
                    },
                    percentages(&shares),
                    if measured.is_empty() {
                        String::new()
                    } else {
                        format!(" (measured {} samples/s)", measured.join(" / "))
                    }
                ))
            }
            Ok(Event::SplitKept { epoch, why }) => display.line(format!("epoch {}: {why}", epoch + 1)),
            Ok(Event::SamplesMoved {
                epoch,
                samples,
                bytes,
                secs,
            }) => display.line(format!(
                "epoch {}: {samples} sample(s) sent to workers that lacked them ({:.1} MB in {secs:.2} s)",
                epoch + 1,
                bytes as f64 / 1e6
            )),
            Ok(Event::Migrated {
                epoch,
                step,
                lost,
                workers,
                shares,
                collapsed,
                ..
            }) => display.line(format!(
                "epoch {}: {}; {workers} worker(s) continue{} from step {step} with shares {}",
                epoch + 1,
                if lost.is_empty() {
                    "lost the parameter server".to_string()
                } else {
                    format!("lost worker rank {lost:?}")
                },
                if collapsed { " as one allreduce ring" } else { "" },
                percentages(&shares)
            )),
            Ok(Event::Rejoined {
                epoch,
                joined,
                workers,
                shares,
                ..
            }) => display.line(format!(
                "epoch {}: worker rank {joined:?} rejoined; {workers} worker(s) with shares {}",
                epoch + 1,
                percentages(&shares)
            )),
            Ok(Event::Checkpointed { epoch, path }) => display.line(format!("checkpoint after epoch {epoch}: {path}")),
            Ok(Event::Done { .. }) | Err(_) => {}
        },
        "state" => display.line(format!("[coordinator] {}", entry.text)),
        _ if show_logs => display.line(format!("[worker {}] {}", entry.rank, entry.text)),
        _ => {}
    }
}

fn percentages(shares: &[f64]) -> String {
    let parts: Vec<String> = shares.iter().map(|s| format!("{:.0}%", s * 100.0)).collect();
    parts.join(" / ")
}

/// Prints how a job ended; `Ok(true)` when it succeeded.
pub fn print_outcome(info: &pb::JobInfo) -> bool {
    let state = job_state_name(info.state);
    let secs = if info.finished_unix_ms > 0 && info.started_unix_ms > 0 {
        (info.finished_unix_ms - info.started_unix_ms) as f64 / 1000.0
    } else {
        0.0
    };
    println!(
        "\njob {} ({}) {state} after {secs:.1} s: {}",
        info.job_id, info.name, info.message
    );
    if let Ok(summary) = serde_json::from_str::<RunSummary>(&info.summary_json) {
        print_summary(&summary);
        println!("summary: {0}/summary.json   loss curve: {0}/loss.svg", info.output_dir);
    }
    for t in info.tasks.iter().filter(|t| t.state == pb::TaskState::Failed as i32) {
        println!("worker rank {} on {}: {}", t.rank, t.agent_id, t.message);
    }
    info.state == pb::JobState::Succeeded as i32
}

/// The run summary as a small table.
pub fn print_summary(s: &RunSummary) {
    if let Some(acc) = s.test_accuracy {
        println!("  test accuracy   {:.2} %", acc * 100.0);
    }
    println!("  train loss      {:.4} → {:.4}", s.first_epoch_loss, s.last_epoch_loss);
    if !s.seconds_to_accuracy.is_empty() {
        let marks: Vec<String> = s
            .seconds_to_accuracy
            .iter()
            .map(|(m, t)| format!("{m} % at {t:.1} s"))
            .collect();
        println!("  time to         {}", marks.join(", "));
    }
    println!(
        "  throughput      {:.0} samples/s over {} worker(s) on {}",
        s.samples_per_sec, s.workers, s.backend
    );
    println!("  wall time       {:.1} s for {} epoch(s)", s.wall_secs, s.epochs);
    if s.moved_samples > 0 {
        println!(
            "  samples moved   {} to workers that lacked them ({:.1} MB, {:.2} s)",
            s.moved_samples,
            s.moved_bytes as f64 / 1e6,
            s.moved_secs
        );
    }
    println!(
        "  {:>6} {:>10} {:>10} {:>10} {:>11}",
        "worker", "samples", "compute s", "comm s", "samples/s"
    );
    for w in &s.per_worker {
        println!(
            "  {:>6} {:>10} {:>10.1} {:>10.1} {:>11.0}",
            w.rank, w.samples, w.compute_secs, w.comm_secs, w.samples_per_sec
        );
    }
}
