//! The user's own training program, unchanged, trained data-parallel by two worker
//! processes of an embedded cluster on the committed Fashion-MNIST subset.

use std::path::Path;
use std::time::Duration;

use hetero_cluster::local::LocalCluster;
use hetero_proto as pb;
use hetero_proto::client;

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
    let job_id = client::submit(&mut client, &spec, "").await.unwrap();
    let info = client::wait_for(&mut client, &job_id, Duration::from_secs(300), client::has_ended)
        .await
        .unwrap();
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
