//! `hetero infer` and `hetero serve` as a user runs them: worker processes joined by
//! a real data-plane mesh on loopback, the real models (fetched into the model
//! cache on first use), plain HTTP.

mod common;

use std::process::{Command, Output};

use common::{post_json as post, serve};

fn hetero() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hetero"));
    c.env_remove("HETERO_TOKEN");
    c
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_pipeline_of_three_processes_says_paris() {
    let out = hetero()
        .args(["infer", "smollm2", "The capital of France is", "--max-tokens", "3"])
        .args(["--workers", "3", "--placement", "pipeline"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.starts_with(" Paris."), "{stdout}");
    assert!(
        stderr.contains("blocks 0..10 single on [0]; blocks 10..20 single on [1]"),
        "{stderr}"
    );
    assert!(
        stderr.contains("tokens/s") && stderr.contains("ms per token"),
        "{stderr}"
    );
}

#[test]
fn infer_samples_with_a_seed_and_refuses_bad_sampling_before_loading() {
    let sampled = || {
        let out = hetero()
            .args(["infer", "smollm2", "Once upon a time", "--max-tokens", "8"])
            .args(["--temperature", "0.9", "--top-p", "0.95", "--seed", "7"])
            .output()
            .unwrap();
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        stdout
    };
    let first = sampled();
    assert!(!first.trim().is_empty(), "{first:?}");
    assert_eq!(sampled(), first, "the same seed, the same text");
    for (flag, value, says) in [("--temperature", "5", "temperature"), ("--top-p", "0", "top_p")] {
        let out = hetero()
            .args(["infer", "no-such-model", "Hi", flag, value])
            .output()
            .unwrap();
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{stdout}");
        assert!(stderr.contains(says) && !stderr.contains("no-such-model"), "{stderr}");
    }
}

#[test]
fn a_placement_naming_a_missing_worker_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "workers = 2\n[[stage]]\nlayers = \"all\"\nmode = \"tensor-parallel\"\nworkers = [0, 2]\n",
    )
    .unwrap();
    let out = hetero()
        .args(["infer", "minilm", "hello", "--workers", "2", "--placement"])
        .arg(&file)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("bad.toml") && stderr.contains("names worker 2, but the placement has 2 workers"),
        "{stdout}\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn served_embeddings_over_tensor_parallel_workers() {
    let server = serve(&["minilm", "--workers", "2", "--placement", "tensor-parallel"]);
    let (status, body) = post(
        &server.1,
        "/v1/embeddings",
        r#"{"input": ["A man is eating food.", "A man is eating a piece of bread."]}"#,
    );
    assert_eq!(status, 200, "{body}");
    let e = common::embeddings_of(&body);
    assert_eq!(e[0].len(), 384);
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&reply["object"], &reply["data"][1]["object"]),
        (&"list".into(), &"embedding".into()),
        "{body}"
    );
    let cos = common::cosine(&e[0], &e[1]);
    assert!((cos - 0.755).abs() < 0.01, "{cos}");
    // Wrong endpoint and malformed bodies are clear 400s.
    let (status, body) = post(&server.1, "/v1/completions", r#"{"prompt": "hi"}"#);
    assert_eq!(status, 400);
    assert!(body.contains("encoder: use /v1/embeddings"), "{body}");
    let (status, body) = post(&server.1, "/v1/embeddings", r#"{"inputs": 3}"#);
    assert_eq!(status, 400);
    assert!(body.contains("input"), "{body}");
}

#[test]
fn a_served_completion_streams_and_a_dead_worker_is_a_clear_error() {
    let mut server = serve(&["smollm2", "--workers", "2", "--placement", "pipeline"]);
    let (status, body) = post(
        &server.1,
        "/v1/completions",
        r#"{"prompt": "The capital of France is", "max_tokens": 2, "stream": true}"#,
    );
    assert_eq!(status, 200, "{body}");
    // OpenAI's stream: a chunk per piece, a last one with the reason and usage, [DONE].
    let data: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert!(text.starts_with(" Paris"), "{body}");
    let last = chunks.last().unwrap();
    assert_eq!(last["object"], "text_completion", "{body}");
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{body}");
    assert_eq!(last["usage"]["completion_tokens"], 2, "{body}");

    // A whole completion, and a conversation through /v1/chat/completions.
    let (status, body) = post(
        &server.1,
        "/v1/completions",
        r#"{"prompt": "The capital of France is", "max_tokens": 2}"#,
    );
    assert_eq!(status, 200, "{body}");
    let whole: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(whole["choices"][0]["text"].as_str(), Some(text.as_str()), "{body}");
    let usage = &whole["usage"];
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + 2,
        "{body}"
    );
    // One user message is framed as `"chat": true` frames a prompt: greedy decoding
    // then gives the same text.
    let (status, body) = post(
        &server.1,
        "/v1/chat/completions",
        r#"{"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 6}"#,
    );
    assert_eq!(status, 200, "{body}");
    let chat: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(chat["object"], "chat.completion", "{body}");
    let message = &chat["choices"][0]["message"];
    assert_eq!(message["role"], "assistant", "{body}");
    let (status, body) = post(
        &server.1,
        "/v1/completions",
        r#"{"prompt": "What is the capital of France?", "chat": true, "max_tokens": 6}"#,
    );
    assert_eq!(status, 200, "{body}");
    let framed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(message["content"], framed["choices"][0]["text"], "{chat}\n{framed}");
    assert!(message["content"].as_str().is_some_and(|c| !c.is_empty()), "{chat}");
    // A system message is framed too: it replaces the template's default one
    // (SmolLM2's says who it is), so the prompt changes length.
    let (status, body) = post(
        &server.1,
        "/v1/chat/completions",
        r#"{"messages": [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the capital of France?"}], "max_tokens": 2}"#,
    );
    assert_eq!(status, 200, "{body}");
    let with_system: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        with_system["usage"]["prompt_tokens"].as_u64() != chat["usage"]["prompt_tokens"].as_u64(),
        "{with_system}\n{chat}"
    );
    for (request, says) in [
        (r#"{"messages": []}"#, "`messages` is empty"),
        (
            r#"{"messages": [{"role": "robot", "content": "hi"}]}"#,
            "is not system, user or assistant",
        ),
        (r#"{"messages": "hi"}"#, "messages"),
    ] {
        let (status, body) = post(&server.1, "/v1/chat/completions", request);
        assert_eq!(status, 400, "{request}: {body}");
        assert!(body.contains(says), "{request}: {body}");
    }

    // Rank 1 dies: the next request fails with a message naming it; the server lives.
    let front = server.0.id();
    let worker = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let parent = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split(' ').nth(2))
                .and_then(|p| p.parse::<u32>().ok());
            parent == Some(front) && String::from_utf8_lossy(&cmd).contains("infer-worker")
        })
        .expect("the worker process");
    Command::new("kill").args(["-9", &worker.to_string()]).status().unwrap();
    let (status, body) = post(&server.1, "/v1/completions", r#"{"prompt": "Hello", "max_tokens": 2}"#);
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("rank 1"), "{body}");
    assert!(server.0.try_wait().unwrap().is_none(), "the server is still up");
}

/// Training to serving in one path: a distill job's decoupled student, exported
/// from the job's output folder (its spec.json and checkpoint), opens in
/// `hetero infer` and is served over a tensor-parallel pair of workers, which
/// give the same embeddings as one device.
#[test]
fn a_distilled_student_is_exported_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/shakespeare-subset");
    let spec = dir.path().join("distill.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"student\"\n[model]\nkind = \"distill\"\nteacher = \"minilm\"\n\
             [model.decouple]\ndivisions = 2\nblocks = 3\nvariant = \"split-heads\"\n\
             [dataset]\nkind = \"text\"\npath = \"{}\"\ntest_fraction = 0.1\ntrain_limit = 32\ntest_limit = 8\n\
             [training]\nepochs = 1\nglobal_batch_size = 16\nlearning_rate = 0.0005\n\
             [cluster]\nworkers = 2\n[output]\ndir = \"runs\"\n",
            text.display()
        ),
    )
    .unwrap();
    let out = hetero().arg("local").arg(&spec).output().unwrap();
    let (stdout, stderr) = self::text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let run = dir.path().join("runs/job-000001");
    assert!(run.join("spec.json").is_file(), "the job wrote its spec");

    let student = dir.path().join("student");
    let out = hetero()
        .arg("export")
        .arg(&run)
        .arg("--to")
        .arg(&student)
        .output()
        .unwrap();
    let (stdout, stderr) = self::text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("101 tensors"), "{stdout}");
    // A second export into the same folder overwrites nothing.
    let again = hetero()
        .arg("export")
        .arg(&run)
        .arg("--to")
        .arg(&student)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(self::text(&again).1.contains("already holds files"));

    let sentences = ["A man is eating food.", "A man is eating a piece of bread."];
    let out = hetero().arg("infer").arg(&student).args(sentences).output().unwrap();
    let (stdout, stderr) = self::text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let single: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("cosine(0, 1) = "))
        .expect("a cosine line")
        .parse()
        .unwrap();

    let path = student.to_str().unwrap();
    let server = serve(&[path, "--workers", "2", "--placement", "decoupled-gather"]);
    let (status, body) = post(
        &server.1,
        "/v1/embeddings",
        &serde_json::json!({ "input": sentences }).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let e = common::embeddings_of(&body);
    assert_eq!(e[0].len(), 384);
    let served = common::cosine(&e[0], &e[1]);
    assert!((served - single).abs() < 1e-3, "served {served}, one device {single}");
}

/// A decoder's decoupled version is distilled as a job (KL of next-token
/// distributions, windows of the teacher's tokens), exported as one GGUF file,
/// and run.
#[test]
fn a_decoder_is_distilled_as_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/shakespeare-subset");
    let spec = dir.path().join("distill.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"student\"\n[model]\nkind = \"distill\"\nteacher = \"smollm2\"\n\
             [model.decouple]\ndivisions = 3\nblocks = 15\nvariant = \"split-heads\"\n\
             [dataset]\nkind = \"text\"\npath = \"{}\"\ntest_fraction = 0.1\ntrain_limit = 2\ntest_limit = 1\n\
             [training]\nepochs = 1\nglobal_batch_size = 2\nlearning_rate = 0.0001\n\
             [cluster]\nworkers = 2\n[output]\ndir = \"runs\"\n",
            text.display()
        ),
    )
    .unwrap();
    let out = hetero().arg("local").arg(&spec).output().unwrap();
    let (stdout, stderr) = self::text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let run = dir.path().join("runs/job-000001");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let agreement = summary["test_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&agreement), "{summary}");
    let student = dir.path().join("student");
    let out = hetero()
        .arg("export")
        .arg(&run)
        .arg("--to")
        .arg(&student)
        .output()
        .unwrap();
    let (stdout, stderr) = self::text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(student.join("model.gguf").is_file());
    // The exported student generates, with the teacher's tokenizer, on a
    // tensor-parallel pair as on one device.
    let generate = |placement: &[&str]| {
        let out = hetero()
            .arg("infer")
            .arg(&student)
            .args(["The capital of France is", "--max-tokens", "3"])
            .args(placement)
            .output()
            .unwrap();
        let (stdout, stderr) = self::text(&out);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        stdout
    };
    assert_eq!(
        generate(&[]),
        generate(&["--workers", "2", "--placement", "tensor-parallel"])
    );
}

/// `--dry-run` prints each worker's weights and KV cache under the placement and
/// loads nothing; a placement that does not fit `--max-memory` is refused, naming
/// the worker and both numbers, by the dry run and by the real run before any
/// worker starts.
#[test]
fn a_dry_run_shows_each_workers_memory_and_a_placement_that_does_not_fit_is_refused() {
    let out = hetero()
        .args([
            "serve",
            "smollm2",
            "--dry-run",
            "--workers",
            "2",
            "--placement",
            "tensor-parallel",
        ])
        .args(["--batch", "4", "--context", "1024"])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("embed, 0..30 (1/2), head") && stdout.contains("0..30 (2/2)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("KV cache for 4 sequence(s) of 1024 positions"),
        "{stdout}"
    );
    assert!(
        stdout.contains("quantized blocks") && stdout.contains("fits"),
        "{stdout}"
    );
    // SmolLM2: 3 key/value heads of 64 → 1 and 2 per worker; 30 layers, K and V, f32.
    assert!(
        stdout.contains(&format!("{:.1} MiB", (4 * 1024 * 30 * 2 * 64 * 4) as f64 / 1048576.0)),
        "{stdout}"
    );

    for args in [
        &["serve", "smollm2+f32", "--dry-run"][..],
        &["infer", "smollm2+f32", "The capital of France is"][..],
    ] {
        let out = hetero()
            .args(args)
            .args([
                "--max-memory",
                "300",
                "--workers",
                "2",
                "--placement",
                "tensor-parallel",
            ])
            .output()
            .unwrap();
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{stdout}");
        assert!(
            stderr.contains("worker 0 would hold") && stderr.contains("--max-memory allows 300.0 MiB"),
            "{stderr}"
        );
        assert!(!stdout.contains("Paris"), "{stdout}");
    }
}

/// `hetero models convert` writes SmolLM2 as a Hugging Face folder; laid out as
/// the Hugging Face cache keeps it, `hetero infer org/name` finds it by its hub
/// name and says what the GGUF's f32 path says.
#[test]
fn a_converted_folder_in_the_hugging_face_cache_is_served_by_its_hub_name() {
    let hub = tempfile::tempdir().unwrap();
    let snapshot = hub
        .path()
        .join("models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/c0ffee");
    let out = hetero()
        .args([
            "models",
            "convert",
            "smollm2",
            "--to",
            snapshot.to_str().unwrap(),
            "--shard-mb",
            "300",
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("272 tensors in 2 safetensors file(s)"), "{stdout}");
    std::fs::create_dir_all(hub.path().join("models--HuggingFaceTB--SmolLM2-135M-Instruct/refs")).unwrap();
    std::fs::write(
        hub.path()
            .join("models--HuggingFaceTB--SmolLM2-135M-Instruct/refs/main"),
        "c0ffee",
    )
    .unwrap();

    let run = |model: &str| {
        let out = hetero()
            .env("HF_HUB_CACHE", hub.path())
            .args(["infer", model, "The capital of France is", "--max-tokens", "6"])
            .output()
            .unwrap();
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{model}: {stdout}\n{stderr}");
        stdout
    };
    let by_name = run("HuggingFaceTB/SmolLM2-135M-Instruct");
    assert!(by_name.starts_with(" Paris."), "{by_name}");
    assert_eq!(by_name, run("smollm2+f32"));

    let out = hetero()
        .env("HF_HUB_CACHE", hub.path())
        .args(["infer", "HuggingFaceTB/SmolLM2-135M-Instruct@v9", "Hi"])
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert!(
        !out.status.success() && stderr.contains("no snapshot for revision v9"),
        "{stderr}"
    );
}

/// A LeaderWorkerSet's worker: no `--rank`, it takes its rank from
/// `LWS_WORKER_INDEX`, and the mesh is given by host names (as pods' DNS
/// names are), resolved by each rank.
#[test]
fn a_worker_placed_by_a_leaderworkerset_takes_its_rank_from_it_and_host_names_form_the_mesh() {
    let port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let mesh = format!("localhost:{},localhost:{}", port(), port());
    let mut worker = hetero()
        .args([
            "infer-worker",
            "smollm2",
            "--placement",
            "tensor-parallel",
            "--mesh",
            &mesh,
        ])
        .env("HETERO_TOKEN", "lws-test-token")
        .env("LWS_LEADER_ADDRESS", "localhost")
        .env("LWS_WORKER_INDEX", "1")
        .env("LWS_GROUP_SIZE", "2")
        .spawn()
        .unwrap();
    let out = hetero()
        .args(["infer", "smollm2", "The capital of France is", "--max-tokens", "3"])
        .args(["--placement", "tensor-parallel", "--mesh", &mesh])
        .env("HETERO_TOKEN", "lws-test-token")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    let _ = worker.kill();
    let _ = worker.wait();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.starts_with(" Paris."), "{stdout}");
}

#[test]
fn an_infer_worker_that_cannot_tell_its_rank_says_how_to_give_it() {
    let out = hetero()
        .args(["infer-worker", "smollm2", "--mesh", "localhost:1,localhost:2"])
        .env("HETERO_TOKEN", "t")
        .env_remove("LWS_WORKER_INDEX")
        .env_remove("SLURM_PROCID")
        .env_remove("OMPI_COMM_WORLD_RANK")
        .env_remove("JOB_COMPLETION_INDEX")
        .env_remove("HETERO_RANK")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("no --rank, and no rank for this process"), "{stderr}");
}
