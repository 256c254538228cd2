//! Hugging Face folders made from the two real models — SmolLM2's GGUF written
//! back out as sharded safetensors with its tokenizer and chat template, MiniLM's
//! weights cut into shards — open as the same models: the same logits, the same
//! greedy text, under one device and tensor-parallel; and the local Hugging Face
//! cache resolves a hub name to them.

mod common;

use burn::backend::Flex;
use common::greedy;
use hetero_data::model_fetch::cache_dir;
use hetero_infer::Arch;
use hetero_infer::hf_write::{StoreAs, write_folder};
use hetero_infer::llama::LlamaConfig;
use hetero_infer::models::{self, Model};
use hetero_infer::weights::{RandomWeights, safetensors_bytes};
use hetero_infer::{Output, Placement, Request, Want, run_in_process};

fn open(name: &str) -> Model {
    models::open(name, &cache_dir(), &mut |m| eprintln!("{m}")).unwrap()
}

fn logits(m: &Model, placement: &Placement, prompt: &[u32]) -> Vec<f32> {
    let req = Request::decode(vec![prompt.to_vec()], true, Want::Logits);
    match &run_in_process::<Flex>(&m.arch, m.weights.as_ref(), placement, &[req]).unwrap()[0] {
        Output::Logits(rows) => rows.concat(),
        other => panic!("{other:?}"),
    }
}

/// SmolLM2 written as an F32 folder in three shards is SmolLM2 on the f32 path:
/// bit-equal logits, the same greedy text on one device and over two
/// tensor-parallel workers, the same tokenizer and the same chat template. The
/// query and key rows went out in `transformers`' rotary order and came back.
#[test]
fn smollm2_written_as_a_sharded_folder_is_the_same_model() {
    let gguf = open("smollm2+f32");
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("SmolLM2-135M-Instruct");
    let written = write_folder(&gguf, &folder, StoreAs::F32, 200_000_000, &mut |_| {}).unwrap();
    assert_eq!((written.shards, written.tensors), (3, 272));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("model.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!(
        index["weight_map"]["model.layers.0.self_attn.q_proj.weight"],
        "model-00001-of-00003.safetensors"
    );

    let hf = open(folder.to_str().unwrap());
    assert_eq!(hf.arch, gguf.arch);
    let (t, u) = (gguf.tokenizer().unwrap(), hf.tokenizer().unwrap());
    let prompt = t.encode("The capital of France is", false).unwrap();
    assert_eq!(u.encode("The capital of France is", false).unwrap(), prompt);
    assert_eq!(u.stop, t.stop);
    assert_eq!(u.chat.model_template(), t.chat.model_template());

    let single = Placement::single(30);
    assert_eq!(logits(&hf, &single, &prompt), logits(&gguf, &single, &prompt));
    let text = greedy(&hf, &single, &prompt, 8);
    assert_eq!(text, greedy(&gguf, &single, &prompt, 8));
    assert!(u.decode(&text).unwrap().contains("Paris"), "{:?}", u.decode(&text));
    let parallel = Placement::tensor_parallel(30, 2);
    assert_eq!(greedy(&hf, &parallel, &prompt, 8), text);

    // In bfloat16, as most hub checkpoints are: near, and still Paris.
    let bf16 = dir.path().join("bf16");
    write_folder(&gguf, &bf16, StoreAs::BF16, u64::MAX, &mut |_| {}).unwrap();
    assert!(bf16.join("model.safetensors").is_file());
    let half = open(bf16.to_str().unwrap());
    assert!(u.decode(&greedy(&half, &single, &prompt, 3)).unwrap().contains("Paris"));
}

/// The Hugging Face cache's layout — `models--org--name/refs/main` naming a
/// snapshot whose files are links into `blobs/` — is found by the hub name.
#[test]
fn a_hub_name_opens_the_snapshot_in_the_hugging_face_cache() {
    let gguf = open("smollm2+f32");
    let hub = tempfile::tempdir().unwrap();
    let repo = hub.path().join("models--HuggingFaceTB--SmolLM2-135M-Instruct");
    let written = repo.join("written");
    write_folder(&gguf, &written, StoreAs::F32, 200_000_000, &mut |_| {}).unwrap();
    let snapshot = repo.join("snapshots/0123abcd");
    for dir in ["blobs", "refs", "snapshots/0123abcd"] {
        std::fs::create_dir_all(repo.join(dir)).unwrap();
    }
    for (i, file) in std::fs::read_dir(&written).unwrap().enumerate() {
        let file = file.unwrap();
        let blob = repo.join(format!("blobs/{i:040x}"));
        std::fs::rename(file.path(), &blob).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{i:040x}"), snapshot.join(file.file_name())).unwrap();
    }
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();

    let found = hetero_infer::hf::resolve_in_cache("HuggingFaceTB/SmolLM2-135M-Instruct", hub.path())
        .unwrap()
        .unwrap();
    let hf = models::open_folder(&found).unwrap();
    let prompt = gguf
        .tokenizer()
        .unwrap()
        .encode("The capital of France is", false)
        .unwrap();
    let single = Placement::single(30);
    assert_eq!(greedy(&hf, &single, &prompt, 4), greedy(&gguf, &single, &prompt, 4));
}

/// MiniLM's weights cut into two shards with an index are MiniLM.
#[test]
fn minilm_in_shards_is_minilm() {
    let minilm = open("minilm");
    let source = minilm.weights.path().parent().unwrap().to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(source.join(f), folder.join(f)).unwrap();
    }
    let names: Vec<String> = minilm.arch.tensor_shapes().into_keys().collect();
    let mut weight_map = serde_json::Map::new();
    for (part, names) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", part + 1);
        let tensors: Vec<_> = names.iter().map(|n| (n, minilm.weights.read(n).unwrap())).collect();
        let bytes = safetensors_bytes(
            tensors
                .iter()
                .map(|(n, t)| (n.as_str(), t.shape.as_slice(), t.values.as_slice())),
        );
        std::fs::write(folder.join(&file), bytes).unwrap();
        for n in names {
            weight_map.insert(n.clone(), file.clone().into());
        }
    }
    std::fs::write(
        folder.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    let sharded = models::open_folder(folder).unwrap();
    let tokenizer = minilm.tokenizer().unwrap();
    let ids = vec![tokenizer.encode("bread is food", true).unwrap()];
    let run = |m: &Model| {
        let req = Request::embed(&ids);
        run_in_process::<Flex>(&m.arch, m.weights.as_ref(), &Placement::single(6), &[req]).unwrap()
    };
    assert_eq!(run(&sharded), run(&minilm));
}

/// A folder whose configuration this decoder would run wrongly, or whose index
/// points outside it, is refused naming the file and the key.
#[test]
fn a_folder_it_cannot_run_is_refused_by_name() {
    let gguf = open("smollm2+f32");
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("m");
    write_folder(&gguf, &folder, StoreAs::BF16, 100_000_000, &mut |_| {}).unwrap();
    let config = std::fs::read_to_string(folder.join("config.json")).unwrap();
    let err = |folder: &std::path::Path| models::open_folder(folder).unwrap_err().to_string();

    std::fs::write(
        folder.join("config.json"),
        config.replace(
            "\"rope_scaling\": null",
            "\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0}",
        ),
    )
    .unwrap();
    let e = err(&folder);
    assert!(e.contains("config.json") && e.contains("rope_scaling llama3"), "{e}");
    std::fs::write(
        folder.join("config.json"),
        config.replace("\"num_hidden_layers\": 30", "\"num_hidden_layers\": 31"),
    )
    .unwrap();
    let e = err(&folder);
    assert!(e.contains("model.layers.30.") && e.contains("missing"), "{e}");
    std::fs::write(folder.join("config.json"), &config).unwrap();

    let index_path = folder.join("model.safetensors.index.json");
    let index = std::fs::read_to_string(&index_path).unwrap();
    std::fs::write(
        &index_path,
        index.replacen("model-00001-of-00003", "../../etc/passwd", 1),
    )
    .unwrap();
    let e = err(&folder);
    assert!(e.contains("a file name in the index's folder"), "{e}");
    std::fs::write(&index_path, &index).unwrap();
    assert!(models::open_folder(&folder).is_ok());
}

/// A decoder whose query, key and value projections add biases (Qwen2's layout)
/// goes out as a `qwen2` folder — biases reordered with their rows — and comes
/// back the same model: bit-equal logits on one device, and over two
/// tensor-parallel workers (each adding its rows' biases) the same up to rounding.
#[test]
fn a_decoder_with_attention_biases_goes_out_as_qwen2_and_comes_back() {
    let c = LlamaConfig {
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        ffn: 128,
        vocab: 49152,
        context: 256,
        rope_base: 1e6,
        eps: 1e-6,
        separate_head: false,
        attention_bias: true,
    };
    let original = Model {
        arch: Arch::Llama(c.clone()),
        weights: Box::new(RandomWeights::new(c.tensor_shapes(), 3)),
        tokenizer: open("smollm2").tokenizer.take(),
        name: "qwen2-shaped".into(),
    };
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("q");
    write_folder(&original, &folder, StoreAs::F32, u64::MAX, &mut |_| {}).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "qwen2");
    let back = models::open_folder(&folder).unwrap();
    assert_eq!(back.arch, original.arch);
    let prompt = [1, 500, 9000, 17, 42];
    let one = logits(&original, &Placement::single(2), &prompt);
    assert_eq!(logits(&back, &Placement::single(2), &prompt), one);
    let parallel = logits(&back, &Placement::tensor_parallel(2, 2), &prompt);
    let worst = one
        .iter()
        .zip(&parallel)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "{worst}");
}
