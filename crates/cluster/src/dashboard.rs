//! The coordinator's web dashboard and Prometheus `/metrics`.
//!
//! One self-contained page (`assets/dashboard.html`, compiled into the binary: it
//! works with no internet) polls two JSON endpoints and draws nodes with live
//! utilisation, the job queue, the selected job's loss and throughput charts, its
//! placement (worker → node, group, role) and logs, and the alerts.
//!
//! Routes: `/` the page · `/api/state` nodes, jobs, alerts · `/api/jobs/{id}` chart
//! points and recent log lines · `/metrics` Prometheus text.
//!
//! The dashboard is read-only, and only for holders of the cluster token
//! ([`crate::dashboard_access`]: a login that sets a signed cookie, or a bearer
//! header; the `Host` header checked); the CLI binds it to loopback by default.

use std::fmt::Write;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use hetero_proto as pb;
use serde_json::{Value, json};

use tokio::net::TcpListener;

use crate::ClusterError;
use crate::coordinator::Coordinator;
use crate::dashboard_access::{self, Access};
use crate::records::{job_state_name, task_state_name};
use crate::store::LogKind;

const PAGE: &str = include_str!("../assets/dashboard.html");

/// Serves the web dashboard and Prometheus `/metrics` of `coordinator` on
/// `listener` (plain HTTP, read-only, for holders of the token; `hosts`: the host
/// names it answers to besides IP addresses and `localhost`) until the process ends.
pub async fn serve(coordinator: Coordinator, listener: TcpListener, hosts: Vec<String>) -> Result<(), ClusterError> {
    let access = Access::new(coordinator.token(), &hosts);
    axum::serve(listener, router(coordinator, access))
        .await
        .map_err(|e| ClusterError::io("serving the dashboard", e))
}

/// The dashboard's routes, behind `access`.
pub fn router(coordinator: Coordinator, access: Access) -> Router {
    let login = Router::new()
        .route(
            "/login",
            get(dashboard_access::login_form).post(dashboard_access::login),
        )
        .with_state(access.clone());
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/api/state", get(state))
        .route("/api/jobs/{id}", get(job))
        .route("/metrics", get(metrics))
        .with_state(coordinator)
        .merge(login)
        .layer(axum::middleware::from_fn_with_state(access, dashboard_access::guard))
}

fn group_json(g: &pb::ResourceGroup) -> Value {
    json!({
        "kind": g.kind, "devices": g.devices, "memory_bytes": g.memory_bytes, "slots": g.worker_slots,
        "score": g.score, "speed": g.speed, "gflops": g.gflops,
    })
}

fn job_json(j: &pb::JobInfo) -> Value {
    json!({
        "job_id": j.job_id, "name": j.name, "state": job_state_name(j.state), "message": j.message,
        "workers": j.workers, "submitted_ms": j.submitted_unix_ms, "started_ms": j.started_unix_ms,
        "finished_ms": j.finished_unix_ms,
        "tasks": j.tasks.iter().map(|t| json!({
            "rank": t.rank, "node": t.agent_id, "role": t.role, "state": task_state_name(t.state),
            "loss": t.loss, "samples_per_sec": t.samples_per_sec,
            "message": t.message.lines().next().unwrap_or(""),
        })).collect::<Vec<_>>(),
    })
}

async fn state(State(c): State<Coordinator>) -> Json<Value> {
    let (nodes, jobs, alerts) = c.snapshot();
    Json(json!({
        "nodes": nodes.iter().map(|n| json!({
            "node": n.agent_id, "host": n.hostname, "status": n.status, "busy": n.busy_slots,
            "groups": n.groups.iter().map(group_json).collect::<Vec<_>>(),
            "usage": n.usage.iter().map(|u| json!({
                "kind": u.kind, "utilization": u.utilization, "memory_used_bytes": u.memory_used_bytes,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "jobs": jobs.iter().map(job_json).collect::<Vec<_>>(),
        "alerts": alerts,
    }))
}

async fn job(State(c): State<Coordinator>, Path(id): Path<String>) -> Response {
    match c.job_detail(&id, 2000) {
        None => (StatusCode::NOT_FOUND, format!("no job {id}")).into_response(),
        Some((history, logs)) => {
            // Progress events are drawn as charts; the log pane shows the rest.
            let mut logs: Vec<_> = logs.into_iter().filter(|l| l.kind != LogKind::Event).collect();
            let keep = logs.len().saturating_sub(200);
            logs.drain(..keep);
            Json(json!({
            "history": history.iter().map(|(s, l, r)| json!([s, l, r])).collect::<Vec<_>>(),
            "logs": logs.iter().map(|l| json!({"rank": l.rank, "kind": l.kind.name(), "text": l.text})).collect::<Vec<_>>(),
            }))
            .into_response()
        }
    }
}

/// Prometheus text exposition of the cluster's state.
async fn metrics(State(c): State<Coordinator>) -> Response {
    let (nodes, jobs, alerts) = c.snapshot();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP hetero_node_up Whether a node is alive (1), suspect (0.5) or dead (0)."
    );
    let _ = writeln!(out, "# TYPE hetero_node_up gauge");
    for n in &nodes {
        let up = match n.status.as_str() {
            "alive" => 1.0,
            "suspect" => 0.5,
            _ => 0.0,
        };
        let _ = writeln!(out, "hetero_node_up{{node=\"{}\"}} {up}", n.agent_id);
    }
    let _ = writeln!(
        out,
        "# HELP hetero_device_utilization Device utilisation (0..1) from the last heartbeat."
    );
    let _ = writeln!(out, "# TYPE hetero_device_utilization gauge");
    for n in &nodes {
        for u in &n.usage {
            let _ = writeln!(
                out,
                "hetero_device_utilization{{node=\"{}\",kind=\"{}\"}} {}",
                n.agent_id, u.kind, u.utilization
            );
        }
    }
    let _ = writeln!(out, "# HELP hetero_group_score Compute score of a resource group.");
    let _ = writeln!(out, "# TYPE hetero_group_score gauge");
    for n in &nodes {
        for g in &n.groups {
            let _ = writeln!(
                out,
                "hetero_group_score{{node=\"{}\",kind=\"{}\"}} {}",
                n.agent_id, g.kind, g.score
            );
        }
    }
    let _ = writeln!(out, "# HELP hetero_jobs Jobs by state.");
    let _ = writeln!(out, "# TYPE hetero_jobs gauge");
    for state in ["queued", "running", "succeeded", "failed", "cancelled"] {
        let count = jobs.iter().filter(|j| job_state_name(j.state) == state).count();
        let _ = writeln!(out, "hetero_jobs{{state=\"{state}\"}} {count}");
    }
    let _ = writeln!(out, "# HELP hetero_worker_loss Latest training loss a worker reported.");
    let _ = writeln!(out, "# TYPE hetero_worker_loss gauge");
    let _ = writeln!(
        out,
        "# HELP hetero_worker_samples_per_second Latest throughput a worker reported."
    );
    let _ = writeln!(out, "# TYPE hetero_worker_samples_per_second gauge");
    for j in jobs.iter().filter(|j| j.state == pb::JobState::Running as i32) {
        for t in &j.tasks {
            let labels = format!("job=\"{}\",rank=\"{}\"", j.job_id, t.rank);
            let _ = writeln!(out, "hetero_worker_loss{{{labels}}} {}", t.loss);
            let _ = writeln!(
                out,
                "hetero_worker_samples_per_second{{{labels}}} {}",
                t.samples_per_sec
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP hetero_alerts_total Alerts raised (the latest 50 are kept here)."
    );
    let _ = writeln!(out, "# TYPE hetero_alerts_total gauge");
    let _ = writeln!(out, "hetero_alerts_total {}", alerts.first().map_or(0, |a| a.id));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
