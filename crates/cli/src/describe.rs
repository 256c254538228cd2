//! `hetero models describe SPEC`: what a job spec's language model is — its layers
//! in order (decoupled or original), parameters and multiply-adds of each layer
//! kind and of one sub-block, the whole model's parameters against the original's,
//! and the traffic one request would need placed over N_d devices, decoupled or
//! tensor-parallel.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use burn::backend::Flex;
use burn::module::Module;
use hetero_job::{JobSpec, ModelKind};
use hetero_models::{LanguageModelConfig, LayerKind};
use hetero_train::text_task::TextTask;

/// Prints the description of `spec`'s language model.
pub fn run(spec: &Path) -> Result<ExitCode> {
    // A model file or folder is a natural thing to try here; say where it belongs.
    if spec.is_dir() || spec.extension().is_some_and(|e| e == "gguf" || e == "safetensors") {
        bail!(
            "{} is a model, and describe reads a job spec (a .toml with model.kind = \"transformer\"); \
             for a model's memory under a placement use `hetero infer {} \"…\" --dry-run`",
            spec.display(),
            spec.display()
        );
    }
    let spec = JobSpec::load(spec).with_context(|| format!("reading {}", spec.display()))?;
    if spec.model != ModelKind::Transformer {
        bail!("describe knows the built-in transformer (model.kind = \"transformer\"); this spec trains another model");
    }
    let task = TextTask::from_spec(&spec)?;
    let device = Default::default();
    let (original, decoupled) = match task.config() {
        LanguageModelConfig::Original(c) => (c.clone(), None),
        LanguageModelConfig::Decoupled(c) => (c.original().clone(), Some(c)),
    };
    let t = original.context;
    println!(
        "transformer: width {}, {} layers, {} heads, context {t}, vocabulary {}",
        original.d_model, original.layers, original.heads, original.vocab
    );
    let original_params = original.init::<Flex>(&device).num_params();
    let Some(decoupled) = decoupled else {
        println!(
            "not decoupled ([model.decouple] is absent): {} parameters",
            group(original_params)
        );
        return Ok(ExitCode::SUCCESS);
    };
    let d = decoupled.decoupling();
    let shape = decoupled.shape();
    let costs = decoupled.costs(t);
    let model = decoupled.init::<Flex>(&device);
    let kinds: Vec<&str> = model
        .layer_kinds()
        .iter()
        .map(|k| match k {
            LayerKind::Decoupled => "decoupled",
            LayerKind::Original => "ORIGINAL",
        })
        .collect();
    println!(
        "decoupling: {d}: slices of {}, {} of the {} heads in each sub-block, feed-forward {} → {} → {} \
         (original {} → {} → {})",
        d.slice_width(&shape),
        d.sub_block_heads(&shape),
        shape.heads,
        d.slice_width(&shape),
        decoupled.inner_width(),
        d.slice_width(&shape),
        shape.width,
        4 * shape.width,
        shape.width
    );
    println!("layers: {}", kinds.join(" · "));
    println!();
    println!(
        "{:<22} {:>12} {:>22}",
        "",
        "parameters",
        format!("multiply-adds/token (t={t})")
    );
    println!(
        "{:<22} {:>12} {:>22}",
        "original layer",
        group(costs.original_params),
        group(costs.original_macs)
    );
    println!(
        "{:<22} {:>12} {:>22}",
        "decoupled layer",
        group(costs.decoupled_params),
        group(costs.sub_block_macs * d.divisions)
    );
    println!(
        "{:<22} {:>12} {:>22}",
        "  one sub-block",
        group(costs.decoupled_params / d.divisions),
        group(costs.sub_block_macs)
    );
    let whole = model.num_params();
    println!(
        "{:<22} {:>12}   original {} ({:+.2} %)",
        "whole model",
        group(whole),
        group(original_params),
        100.0 * (whole as f64 / original_params as f64 - 1.0)
    );
    // Traffic over N_d devices for one request of t tokens, f32, per device
    // (ring algorithms): decoupled = one all-gather of the slices per original
    // layer; tensor parallel = two all-reduces per layer.
    let n = d.divisions as f64;
    let activation = (t * shape.width * 4) as f64;
    let gather = activation * (n - 1.0) / n;
    let originals = kinds.iter().filter(|k| **k == "ORIGINAL").count();
    let decoupled_bytes = gather * originals as f64;
    let tensor_parallel_bytes = 2.0 * shape.layers as f64 * 2.0 * gather;
    println!();
    println!(
        "traffic per device for one request of {t} tokens on {} devices: decoupled {} in {} all-gathers; \
         tensor-parallel {} in {} all-reduces ({:.1}× more)",
        d.divisions,
        megabytes(decoupled_bytes),
        originals,
        megabytes(tensor_parallel_bytes),
        2 * shape.layers,
        tensor_parallel_bytes / decoupled_bytes.max(1.0)
    );
    Ok(ExitCode::SUCCESS)
}

fn megabytes(bytes: f64) -> String {
    format!("{:.3} MB", bytes / 1e6)
}

/// `1234567` → `1,234,567`.
fn group(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
