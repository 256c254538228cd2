//! A real model beside its decoupled version cut from the same weights (seed 000,
//! claims 2–3): weight decoupling's starting point, measured before any training.
//!
//! Both run on one device. The reference is the original model; the decoupled one
//! keeps its embeddings, head and original layers and slices every decoupled layer
//! ([`hetero_models::decoupled_bert`], [`hetero_models::decoupled_llama`]). They
//! are compared on held-out text ([`held_out`]): sentence embeddings for an encoder,
//! next-token distributions for a decoder ([`hetero_models::fidelity`]).

use burn::prelude::*;
use hetero_models::bert::{BertConfig, BertEncoder, mean_pool, padded_ids};
use hetero_models::checkpoint;
use hetero_models::decouple::{Decoupling, LayerKind};
use hetero_models::decoupled_bert::{DecoupledBert, DecoupledBertConfig};
use hetero_models::decoupled_llama::{DecoupledLlama, DecoupledLlamaConfig};
use hetero_models::fidelity::{EmbeddingFidelity, NextTokenFidelity};
use hetero_models::llama::LlamaConfig;

use crate::InferError;
use crate::models::Model;
use crate::runtime::Arch;
use crate::tokenize::TextTokenizer;

/// Tokens per window a decoder is scored on.
pub const WINDOW: usize = 128;

/// Sentences (or windows) run through both models at once.
const BATCH: usize = 8;

/// What was compared, and how close the decoupled model came.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The decoupled model's layers, in order.
    pub kinds: Vec<LayerKind>,
    /// Parameters of one original layer.
    pub original_layer_params: usize,
    /// Parameters of one decoupled layer (all sub-blocks).
    pub decoupled_layer_params: usize,
    /// The feed-forward width of a sub-block, I′.
    pub inner: usize,
    /// Multiply-adds of one original layer per token attending over
    /// [`MACS_OVER`] keys.
    pub original_layer_macs: usize,
    /// The same for one sub-block (a decoupled layer is N_d of them).
    pub sub_block_macs: usize,
    /// The measure.
    pub fidelity: Fidelity,
}

/// The keys a token attends over when multiply-adds are counted.
pub const MACS_OVER: usize = 128;

/// How close the decoupled model is to the original.
#[derive(Debug, Clone, Copy)]
pub enum Fidelity {
    /// An encoder's sentence embeddings.
    Embeddings(EmbeddingFidelity),
    /// A decoder's next-token distributions.
    NextToken(NextTokenFidelity),
}

/// The tail of `text` a job holds out as its test set: its last `fraction`
/// (`dataset.test_fraction`), from a line start.
pub fn held_out(text: &str, fraction: f64) -> &str {
    let mut start = text.len() - (text.len() as f64 * fraction.clamp(0.0, 1.0)) as usize;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let tail = &text[start..];
    tail.find('\n').map_or(tail, |i| &tail[i + 1..])
}

/// Up to `n` sentences of 4 to 40 words from `text`, whitespace collapsed.
pub fn sentences(text: &str, n: usize) -> Vec<String> {
    text.split_inclusive(['.', '!', '?'])
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| (4..=40).contains(&s.split(' ').count()))
        .take(n)
        .collect()
}

/// Each sentence as an encoder's input, `[CLS] … [SEP]`, cut at `max_positions`.
pub fn encode_sentences(
    tokenizer: &TextTokenizer,
    sentences: &[String],
    max_positions: usize,
) -> Result<Vec<Vec<u32>>, InferError> {
    sentences
        .iter()
        .map(|s| {
            let mut ids = tokenizer.encode(s, true)?;
            ids.truncate(max_positions);
            Ok(ids)
        })
        .collect()
}

fn decoupling_error(e: impl std::fmt::Display) -> InferError {
    InferError::Config(e.to_string())
}

/// Opens `model`'s original and decoupled versions on `device` and compares them
/// on `samples` sentences (encoder) or windows of [`WINDOW`] tokens (decoder) of
/// `text` (a corpus's [`held_out`] tail). With `trained`, the decoupled model's
/// parameters are those (a training checkpoint's flat buffer, in the module
/// tree's order) instead of the sliced ones. `progress` hears each batch.
pub fn compare<B: Backend>(
    model: &Model,
    decoupling: Decoupling,
    trained: Option<&[f32]>,
    text: &str,
    samples: usize,
    device: &B::Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Comparison, InferError> {
    let tokenizer = model.tokenizer()?;
    let source = &mut |name: &str, shape: &[usize]| model.weights.expect(name, shape);
    match &model.arch {
        Arch::Bert(c) => {
            let config = DecoupledBertConfig::new(c.clone(), decoupling).map_err(decoupling_error)?;
            let original = BertEncoder::<B>::load(source, c, device)?;
            let decoupled = with_trained(DecoupledBert::sliced_from(&original, &config), trained)?;
            let fidelity = compare_encoders(&original, &decoupled, c, tokenizer, text, samples, device, progress)?;
            Ok(Comparison {
                kinds: decoupled.layer_kinds(),
                original_layer_params: config.original_layer_params(),
                decoupled_layer_params: config.sub_blocks().params(),
                inner: config.sub_blocks().inner,
                original_layer_macs: config.original_layer_macs(MACS_OVER),
                sub_block_macs: config.sub_blocks().macs(MACS_OVER),
                fidelity: Fidelity::Embeddings(fidelity),
            })
        }
        Arch::DecoupledBert(_) | Arch::DecoupledLlama(_) => Err(InferError::Config(format!(
            "{} is already decoupled: compare the original model it was exported from",
            model.name
        ))),
        Arch::Llama(c) => {
            let config = DecoupledLlamaConfig::new(c.clone(), decoupling).map_err(decoupling_error)?;
            let (original, decoupled) = load_llama_pair::<B>(source, &config, device)?;
            let decoupled = with_trained(decoupled, trained)?;
            let fidelity = compare_decoders(&original, &decoupled, c, tokenizer, text, samples, device, progress)?;
            Ok(Comparison {
                kinds: decoupled.layer_kinds(),
                original_layer_params: config.original_layer_params(),
                decoupled_layer_params: config.sub_blocks().params(),
                inner: config.sub_blocks().inner,
                original_layer_macs: config.original_layer_macs(MACS_OVER),
                sub_block_macs: config.sub_blocks().macs(MACS_OVER),
                fidelity: Fidelity::NextToken(fidelity),
            })
        }
    }
}

/// `model` with the `trained` parameters, if given and if they fit.
pub(crate) fn with_trained<B: Backend, M: Module<B>>(model: M, trained: Option<&[f32]>) -> Result<M, InferError> {
    let Some(flat) = trained else { return Ok(model) };
    let expected = checkpoint::count(&model);
    if flat.len() != expected {
        return Err(InferError::Config(format!(
            "the trained parameters are {} values, but this decoupling of the model has {expected}: \
             a checkpoint of another model or decoupling",
            flat.len()
        )));
    }
    Ok(checkpoint::load_flat(model, flat))
}

/// The original decoder (every layer original, same code path) and its decoupled
/// version, sharing the embeddings, head and original layers' weights.
pub fn load_llama_pair<B: Backend>(
    source: &mut checkpoint::Source<'_, InferError>,
    config: &DecoupledLlamaConfig,
    device: &B::Device,
) -> Result<(DecoupledLlama<B>, DecoupledLlama<B>), InferError> {
    DecoupledLlama::pair_from(source, config, WINDOW.max(1024), device)
}

/// Sentence embeddings of both encoders on `samples` held-out sentences.
#[allow(clippy::too_many_arguments)]
fn compare_encoders<B: Backend>(
    original: &BertEncoder<B>,
    decoupled: &DecoupledBert<B>,
    c: &BertConfig,
    tokenizer: &TextTokenizer,
    text: &str,
    samples: usize,
    device: &B::Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EmbeddingFidelity, InferError> {
    let sentences = sentences(text, samples);
    if sentences.len() < 3 {
        return Err(InferError::Request(format!(
            "the text has {} sentences of 4 to 40 words; at least 3 are needed",
            sentences.len()
        )));
    }
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for batch in sentences.chunks(BATCH) {
        let rows = encode_sentences(tokenizer, batch, c.max_positions)?;
        let (ids, lengths) = padded_ids::<B, _>(&rows, device);
        theirs.extend(mean_pool(original.forward(ids.clone(), &lengths), &lengths));
        ours.extend(mean_pool(decoupled.forward(ids, &lengths), &lengths));
        progress(ours.len(), sentences.len());
    }
    Ok(EmbeddingFidelity::of(&ours, &theirs))
}

/// Next-token distributions of both decoders on `samples` held-out windows.
#[allow(clippy::too_many_arguments)]
fn compare_decoders<B: Backend>(
    original: &DecoupledLlama<B>,
    decoupled: &DecoupledLlama<B>,
    c: &LlamaConfig,
    tokenizer: &TextTokenizer,
    text: &str,
    samples: usize,
    device: &B::Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<NextTokenFidelity, InferError> {
    let ids = tokenizer.encode(text, false)?;
    let window = WINDOW.min(c.context);
    let windows: Vec<&[u32]> = ids.chunks_exact(window).take(samples).collect();
    if windows.is_empty() {
        return Err(InferError::Request(format!(
            "the text has {} tokens; a window needs {window}",
            ids.len()
        )));
    }
    let mut fidelity = NextTokenFidelity::default();
    let mut done = 0;
    for batch in windows.chunks(BATCH / 2) {
        let rows: Vec<Vec<u32>> = batch.iter().map(|w| w.to_vec()).collect();
        let ids = crate::bert::ids_tensor::<B>(&rows, c.vocab, device)?;
        let reference = original.forward(ids.clone(), &mut original.caches());
        let logits = decoupled.forward(ids.clone(), &mut decoupled.caches());
        fidelity.add(logits, reference, ids);
        done += batch.len();
        progress(done, windows.len());
    }
    Ok(fidelity)
}
