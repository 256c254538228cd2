//! The web dashboard in a real browser (Debian's headless Chromium): a stranger gets
//! the login form; the login link loads the page, which shows the node, and a
//! running job's loss chart grows between two looks; `/metrics` wants the token and
//! a host name the dashboard answers to. A screenshot is
//! kept in `target/tmp/dashboard.png` as the test's artifact.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hetero_cluster::local::LocalCluster;
use hetero_proto as pb;

fn chromium(args: &[&str], profile: &Path) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
        ])
        .args([
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("chromium must be installed (apt-get install chromium; .ci/run does it)");
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn polyline_points(dom: &str, chart: &str) -> usize {
    let Some(start) = dom.find(&format!("id=\"{chart}\"")) else {
        return 0;
    };
    let rest = &dom[start..];
    let Some(p) = rest.find("points=\"") else { return 0 };
    let pts = &rest[p + 8..];
    pts[..pts.find('"').unwrap_or(0)].split_whitespace().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_nodes_and_a_live_loss_chart() {
    let dir = tempfile::tempdir().unwrap();
    // A training program that reports a falling loss, one step every 100 ms.
    let program = dir.path().join("train.sh");
    let mut body = String::from("#!/bin/sh\n");
    for step in 0..150 {
        let loss = 2.3 / (1.0 + step as f64 / 10.0);
        body.push_str(&format!(
            "echo '@hetero-event {{\"type\":\"step\",\"epoch\":0,\"step\":{step},\"steps\":150,\"loss\":{loss:.4},\"samples_per_sec\":{}}}'\nsleep 0.1\n",
            500 + step
        ));
    }
    std::fs::write(&program, body).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();

    let cluster = LocalCluster::start(1, "/bin/false".into()).await.unwrap();
    let mut client = cluster.client().await.unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/fashion-mnist-subset");
    let spec = format!(
        "name = \"chart\"\n[model]\nkind = \"custom\"\n[task]\nprogram = \"{}\"\n[dataset]\npath = \"{}\"\n",
        program.display(),
        data.display()
    );
    let job = hetero_proto::client::submit(&mut client, &spec, "").await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let look = |url: String, profile: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || chromium(&["--virtual-time-budget=3000", "--dump-dom", &url], &profile))
    };
    // A browser without the token gets the login form, not the cluster.
    let plain = format!("http://{}/", cluster.dashboard);
    let stranger = look(plain, dir.path().join("stranger")).await.unwrap();
    assert!(
        stranger.contains("Cluster token") && !stranger.contains("node-1"),
        "{stranger}"
    );

    // The login link sets the session and the page loads.
    let url = cluster.dashboard_link();
    let profile = dir.path().join("chromium");
    let first = look(url.clone(), profile.clone()).await.unwrap();
    assert!(first.contains("node-1"), "the node is not shown:\n{first}");
    assert!(
        first.contains(&job) && first.contains("running"),
        "the job is not shown:\n{first}"
    );
    let n1 = polyline_points(&first, "loss-chart");
    assert!(n1 >= 2, "no loss chart drawn:\n{first}");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let second = look(url.clone(), profile.clone()).await.unwrap();
    let n2 = polyline_points(&second, "loss-chart");
    assert!(n2 > n1, "the chart did not update: {n1} then {n2} points");
    assert!(polyline_points(&second, "rate-chart") >= 2);

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let shot_arg = format!("--screenshot={}", shot.display());
    let p = profile.clone();
    tokio::task::spawn_blocking(move || {
        chromium(
            &["--virtual-time-budget=3000", "--window-size=1200,1000", &shot_arg, &url],
            &p,
        )
    })
    .await
    .unwrap();
    assert!(
        std::fs::metadata(&shot).map(|m| m.len() > 10_000).unwrap_or(false),
        "no screenshot at {}",
        shot.display()
    );

    // Prometheus metrics name the node and the running worker — to a scraper that
    // sends the token, on a host name the dashboard answers to.
    let get = |host: &'static str, token: Option<String>| {
        let addr = cluster.dashboard.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            let auth = token
                .map(|t| format!("Authorization: Bearer {t}\r\n"))
                .unwrap_or_default();
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n"
            )
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
    };
    let anonymous = get("127.0.0.1", None).await.unwrap();
    assert!(anonymous.starts_with("HTTP/1.1 401"), "{anonymous}");
    let rebound = get("evil.example.com", Some(cluster.token.clone())).await.unwrap();
    assert!(rebound.starts_with("HTTP/1.1 421"), "{rebound}");
    let metrics = get("localhost", Some(cluster.token.clone())).await.unwrap();
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("hetero_node_up{node=\"node-1\"} 1"), "{metrics}");
    assert!(
        metrics.contains(&format!("hetero_worker_loss{{job=\"{job}\",rank=\"0\"}}")),
        "{metrics}"
    );
    client.cancel_job(pb::CancelJobRequest { job_id: job }).await.unwrap();
    cluster.shutdown().await;
}
