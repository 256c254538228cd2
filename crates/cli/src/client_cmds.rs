//! The user's commands against a running coordinator: submit, status, logs,
//! cancel, nodes.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use hetero_cluster::records::{job_state_name, task_state_name};
use hetero_job::JobSpec;
use hetero_proto as pb;
use hetero_proto::client::{Client, connect};
use tokio_stream::StreamExt;

use crate::connection::Connection;
use crate::follow;

fn with_client<T>(conn: &Connection, f: impl AsyncFnOnce(&mut Client) -> Result<T>) -> Result<T> {
    let token = conn.token()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut client = connect(conn.coordinator(), &token).await?;
        f(&mut client).await
    })
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}

/// `hetero submit`.
pub fn submit(conn: &Connection, spec_path: &Path, follow_it: bool) -> Result<ExitCode> {
    // Validate here first: the user sees the error before anything travels.
    JobSpec::load(spec_path).with_context(|| format!("in {}", spec_path.display()))?;
    let text = std::fs::read_to_string(spec_path)?;
    let base = JobSpec::folder_of(spec_path);
    with_client(conn, async |c| {
        let job_id = c
            .submit_job(pb::SubmitJobRequest {
                spec_toml: text,
                base_dir: base.display().to_string(),
            })
            .await
            .map_err(status_error)?
            .into_inner()
            .job_id;
        announce_and_follow(c, &job_id, follow_it).await
    })
}

/// Prints a new job's id and, when asked, follows it to its end.
async fn announce_and_follow(c: &mut Client, job_id: &str, follow_it: bool) -> Result<ExitCode> {
    println!("{job_id}");
    if !follow_it {
        return Ok(ExitCode::SUCCESS);
    }
    let info = follow::follow_job(c, job_id, true).await?;
    Ok(if follow::print_outcome(&info) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `hetero resume JOB`.
pub fn resume(conn: &Connection, job: &str, follow_it: bool) -> Result<ExitCode> {
    with_client(conn, async |c| {
        let job_id = c
            .resume_job(pb::ResumeJobRequest { job_id: job.into() })
            .await
            .map_err(status_error)?
            .into_inner()
            .job_id;
        eprintln!("{job} resumes as {job_id}");
        announce_and_follow(c, &job_id, follow_it).await
    })
}

fn fmt_time(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    format!("{:02}:{:02}:{:02} UTC", (secs / 3600) % 24, (secs / 60) % 60, secs % 60)
}

/// `hetero status [JOB]`.
pub fn status(conn: &Connection, job: Option<&str>) -> Result<ExitCode> {
    with_client(conn, async |c| {
        match job {
            Some(id) => {
                let j = c
                    .get_job(pb::GetJobRequest { job_id: id.into() })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                println!("job        {} ({})", j.job_id, j.name);
                println!("state      {}: {}", job_state_name(j.state), j.message);
                println!(
                    "submitted  {}   started {}   finished {}",
                    fmt_time(j.submitted_unix_ms),
                    fmt_time(j.started_unix_ms),
                    fmt_time(j.finished_unix_ms)
                );
                println!("output     {}", j.output_dir);
                for (i, line) in j.topology.iter().enumerate() {
                    println!("{}{line}", if i == 0 { "topology   " } else { "           " });
                }
                println!(
                    "{:>6}  {:<10} {:<22} {:<10} {:>8} {:>10}  message",
                    "rank", "node", "role", "state", "loss", "samples/s"
                );
                for t in &j.tasks {
                    let first_line = t.message.lines().next().unwrap_or("");
                    println!(
                        "{:>6}  {:<10} {:<22} {:<10} {:>8.4} {:>10.0}  {first_line}",
                        t.rank,
                        t.agent_id,
                        t.role,
                        task_state_name(t.state),
                        t.loss,
                        t.samples_per_sec
                    );
                }
                if let Ok(s) = serde_json::from_str::<hetero_job::events::RunSummary>(&j.summary_json) {
                    follow::print_summary(&s);
                }
            }
            None => {
                let jobs = c
                    .list_jobs(pb::ListJobsRequest {})
                    .await
                    .map_err(status_error)?
                    .into_inner()
                    .jobs;
                println!("{:<12} {:<24} {:<10} {:>7}  message", "job", "name", "state", "workers");
                for j in jobs {
                    println!(
                        "{:<12} {:<24} {:<10} {:>7}  {}",
                        j.job_id,
                        j.name,
                        job_state_name(j.state),
                        j.workers,
                        j.message
                    );
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `hetero logs JOB [--follow]`.
pub fn logs(conn: &Connection, job: &str, follow_it: bool) -> Result<ExitCode> {
    with_client(conn, async |c| {
        let mut stream = c
            .stream_logs(pb::StreamLogsRequest {
                job_id: job.into(),
                after_seq: 0,
                follow: follow_it,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        while let Some(entry) = stream.next().await {
            let e = entry.map_err(status_error)?;
            let who = if e.rank < 0 {
                "coordinator".to_string()
            } else {
                format!("worker {}", e.rank)
            };
            println!(
                "{} [{who}] {}{}",
                fmt_time(e.unix_ms),
                if e.kind == "event" { "event " } else { "" },
                e.text
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `hetero cancel JOB`.
pub fn cancel(conn: &Connection, job: &str) -> Result<ExitCode> {
    with_client(conn, async |c| {
        let r = c
            .cancel_job(pb::CancelJobRequest { job_id: job.into() })
            .await
            .map_err(status_error)?
            .into_inner();
        println!("{job}: {}", job_state_name(r.state));
        Ok(ExitCode::SUCCESS)
    })
}

/// `hetero alerts`.
pub fn alerts(conn: &Connection) -> Result<ExitCode> {
    with_client(conn, async |c| {
        let alerts = c
            .list_alerts(pb::ListAlertsRequest { after_id: 0 })
            .await
            .map_err(status_error)?
            .into_inner();
        println!(
            "{:>4}  {:<12} {:<9} {:<12} message",
            "id", "time", "severity", "subject"
        );
        for a in alerts.alerts {
            println!(
                "{:>4}  {:<12} {:<9} {:<12} {}",
                a.id,
                fmt_time(a.unix_ms),
                a.severity,
                a.subject,
                a.message
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `hetero nodes`.
pub fn nodes(conn: &Connection, set_score: Option<&str>) -> Result<ExitCode> {
    with_client(conn, async |c| {
        if let Some(arg) = set_score {
            let parsed = arg.split_once('=').and_then(|(target, score)| {
                let (node, kind) = target.split_once('/')?;
                Some((node.to_string(), kind.to_string(), score.parse::<f32>().ok()?))
            });
            let Some((agent_id, kind, score)) = parsed else {
                anyhow::bail!("--set-score {arg:?}: expected NODE/KIND=SCORE, e.g. node-1/cpu=120");
            };
            c.set_group_score(pb::SetGroupScoreRequest { agent_id, kind, score })
                .await
                .map_err(status_error)?;
        }
        let nodes = c
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map_err(status_error)?
            .into_inner()
            .nodes;
        println!(
            "{:<10} {:<16} {:<8} {:<6} {:>7} {:>10} {:>7} {:>11} {:>7} {:>6}",
            "node", "host", "status", "kind", "devices", "memory", "busy", "util / mem", "score", "speed"
        );
        for n in nodes {
            for g in &n.groups {
                let usage = n
                    .usage
                    .iter()
                    .find(|u| u.kind == g.kind)
                    .map(|u| {
                        format!(
                            "{:.0}% / {:.1}GB",
                            u.utilization * 100.0,
                            u.memory_used_bytes as f64 / 1e9
                        )
                    })
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<10} {:<16} {:<8} {:<6} {:>7} {:>8.1}GB {:>3}/{:<3} {:>11} {:>7.1} {:>6.2}",
                    n.agent_id,
                    n.hostname,
                    n.status,
                    g.kind,
                    g.devices,
                    g.memory_bytes as f64 / 1e9,
                    n.busy_slots,
                    g.worker_slots,
                    usage,
                    g.score,
                    g.speed
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
