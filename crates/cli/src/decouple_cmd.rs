//! `hetero models decouple MODEL`: a real model (MiniLM, SmolLM2, or a model
//! folder / GGUF file of their families) beside its decoupled version cut from the
//! same weights, before any training — weight decoupling's "before" row. Prints
//! the layers, the parameter counts, and how close the decoupled model is on
//! held-out text: mean embedding cosine and the Spearman correlation of pairwise
//! similarities for an encoder; perplexity and top-1 next-token agreement for a
//! decoder.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use hetero_infer::decoupled::{self, Fidelity, WINDOW};
use hetero_models::decouple::{Decoupling, LayerKind, Variant};

use hetero_serve::InferBackend;
use hetero_serve::placing::open_model;

/// What `hetero models decouple` was asked.
#[derive(Debug, Clone, clap::Args)]
pub struct DecoupleArgs {
    /// minilm, smollm2, a .gguf file or a model folder.
    pub model: String,
    /// N_d: slices of the hidden width (sub-blocks per decoupled layer).
    #[arg(long, default_value_t = 2)]
    pub divisions: usize,
    /// N_b: blocks of layers, each ending in an original layer.
    #[arg(long, default_value_t = 2)]
    pub blocks: usize,
    /// full-heads or split-heads.
    #[arg(long, default_value = "split-heads")]
    pub variant: String,
    /// A folder of .txt files; its tail is the held-out text.
    #[arg(long, default_value = "data/shakespeare")]
    pub text: std::path::PathBuf,
    /// The share of the text held out (a distill job's dataset.test_fraction).
    #[arg(long, default_value_t = 0.1)]
    pub test_fraction: f64,
    /// A checkpoint of the decoupled model trained by a distill job (its
    /// checkpoint.bin): compare that instead of the sliced, untrained one.
    #[arg(long)]
    pub checkpoint: Option<std::path::PathBuf>,
    /// Sentences (encoder) or windows of 128 tokens (decoder) to compare on.
    #[arg(long, default_value_t = 64)]
    pub samples: usize,
    /// Also write the decoupled model compared (sliced, or --checkpoint's) as a
    /// model folder that `hetero infer` and `hetero serve` run (encoders).
    #[arg(long)]
    pub export: Option<std::path::PathBuf>,
}

/// Runs the comparison and prints it.
pub fn run(args: &DecoupleArgs) -> Result<ExitCode> {
    let variant = Variant::from_name(&args.variant)
        .with_context(|| format!("--variant {:?}: choose full-heads or split-heads", args.variant))?;
    let decoupling = Decoupling {
        divisions: args.divisions,
        blocks: args.blocks,
        variant,
    };
    let text = read_text(&args.text)?;
    let trained = match &args.checkpoint {
        Some(path) => Some(
            hetero_train::checkpoint::Checkpoint::load(path)
                .with_context(|| format!("reading the student's checkpoint {}", path.display()))?
                .params,
        ),
        None => None,
    };
    let model = open_model(&args.model)?;
    let started = Instant::now();
    let comparison = decoupled::compare::<InferBackend>(
        &model,
        decoupling,
        trained.as_deref(),
        decoupled::held_out(&text, args.test_fraction),
        args.samples,
        &Default::default(),
        &mut |done, of| eprint!("\rcomparing: {done}/{of}   "),
    )?;
    eprintln!();
    let kinds: Vec<&str> = comparison
        .kinds
        .iter()
        .map(|k| match k {
            LayerKind::Decoupled => "d",
            LayerKind::Original => "O",
        })
        .collect();
    println!("{}: decoupled {decoupling}", args.model);
    println!(
        "layers ({} decoupled, d; {} original, O): {}",
        kinds.iter().filter(|k| **k == "d").count(),
        kinds.iter().filter(|k| **k == "O").count(),
        kinds.join(" ")
    );
    let (o, d) = (comparison.original_layer_params, comparison.decoupled_layer_params);
    println!(
        "parameters: original layer {o}, decoupled layer {d} ({:+.2} %), sub-block feed-forward width I' = {}",
        100.0 * (d as f64 / o as f64 - 1.0),
        comparison.inner
    );
    let (om, sm) = (comparison.original_layer_macs, comparison.sub_block_macs);
    let n = decoupling.divisions;
    println!(
        "multiply-adds per token (attending over {} keys): original layer {om}, one sub-block {sm} \
         ({:.3} of the original's; a decoupled layer's {n} sub-blocks {:.3})",
        decoupled::MACS_OVER,
        sm as f64 / om as f64,
        (n * sm) as f64 / om as f64
    );
    let which = match &args.checkpoint {
        Some(path) => format!("trained ({})", path.display()),
        None => "sliced from the original, before any training".into(),
    };
    println!(
        "{which}, on the held-out {} % of {}:",
        100.0 * args.test_fraction,
        args.text.display()
    );
    match comparison.fidelity {
        Fidelity::Embeddings(f) => {
            println!("{:<12} {:>12} {:>10}", "sentences", "mean cosine", "spearman");
            println!("{:<12} {:>12.4} {:>10.4}", f.sentences, f.mean_cosine, f.spearman);
        }
        Fidelity::NextToken(f) => {
            println!(
                "{} tokens in windows of {WINDOW}; top-1 agreement {:.2} %",
                f.tokens,
                100.0 * f.agreement()
            );
            println!("{:<12} {:>12}", "", "perplexity");
            println!("{:<12} {:>12.3}", "original", f.reference_perplexity());
            println!("{:<12} {:>12.3}", "decoupled", f.perplexity());
        }
    }
    println!("({:.1} s)", started.elapsed().as_secs_f64());
    if let Some(dir) = &args.export {
        let written = hetero_infer::export::export::<InferBackend>(
            &model,
            decoupling,
            trained.as_deref(),
            dir,
            &Default::default(),
        )?;
        println!(
            "wrote {}: {} tensors, {} parameters",
            written.dir.display(),
            written.tensors,
            written.parameters
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn read_text(dir: &Path) -> Result<String> {
    hetero_data::text::read_corpus(dir).with_context(|| format!("reading the text in {}", dir.display()))
}
