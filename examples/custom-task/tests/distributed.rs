//! The user's own training program, unchanged, trained data-parallel by two worker
//! processes of an embedded cluster on the committed Fashion-MNIST subset.

use std::path::Path;
use std::time::{Duration, Instant};

use hetero_cluster::local::LocalCluster;
use hetero_proto as pb;

#[tokio::test]
async fn custom_task_trains_across_two_processes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = tempfile::tempdir().unwrap();
    let spec = format!(
        r#"
name = "custom"
[model]
kind = "custom"
[task]
program = "{program}"
params = {{ hidden = 64, dropout = 0.1 }}
[dataset]
path = "{data}"
train_limit = 2000
test_limit = 500
[training]
epochs = 3
global_batch_size = 50
learning_rate = 0.002
[cluster]
workers = 2
[output]
dir = "{out}"
"#,
        program = env!("CARGO_BIN_EXE_custom-task"),
        data = root.join("data/fashion-mnist-subset").display(),
        out = out.path().display(),
    );
    let cluster = LocalCluster::start(2, "/bin/false".into()).await.unwrap();
    let mut client = cluster.client().await.unwrap();
    let job_id = client
        .submit_job(pb::SubmitJobRequest {
            spec_toml: spec,
            base_dir: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let started = Instant::now();
    let info = loop {
        let info = client
            .get_job(pb::GetJobRequest { job_id: job_id.clone() })
            .await
            .unwrap()
            .into_inner();
        if info.state >= pb::JobState::Succeeded as i32 {
            break info;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "job did not end: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    cluster.shutdown().await;
    assert_eq!(info.state, pb::JobState::Succeeded as i32, "{info:?}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join(&job_id).join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["workers"], 2);
    let first = summary["first_epoch_loss"].as_f64().unwrap();
    let last = summary["last_epoch_loss"].as_f64().unwrap();
    assert!(last < first, "loss did not fall: {first} → {last}");
    assert!(last < 0.8, "loss stayed high: {last}");
    assert!(summary["test_accuracy"].as_f64().unwrap() > 0.65, "{summary}");
    assert_eq!(summary["per_worker"][0]["samples"], summary["per_worker"][1]["samples"]);
}
