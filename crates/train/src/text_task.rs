//! The built-in text task: a causal transformer language model
//! ([`hetero_models::TinyLm`], or its decoupled form when the spec has a
//! `[model.decouple]` table) trained to predict the next token of a corpus
//! (`dataset.kind = "text"`).
//!
//! The corpus's ids are cut into windows of `dataset.context` tokens; the end of the
//! corpus (`dataset.test_fraction`) is the test set. A sample is one window, so the
//! split, the batches and every strategy work on windows as they work on images.
//! Evaluation reports the mean loss per token and the share of next tokens
//! predicted exactly (the summary's "test accuracy").

use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::backend::AutodiffBackend;
use hetero_data::text::{TokenWindows, Tokenizer, read_corpus};
use hetero_job::JobSpec;
use hetero_job::{DecoupleSpec, SubBlockVariant};
use hetero_models::{DecoupledLmConfig, Decoupling, LanguageModel, LanguageModelConfig, TinyLmConfig, Variant};

use crate::image_task::classification_sums;
use crate::{Evaluation, Task, TrainError};

/// Windows of token ids and their next tokens, on the device.
#[derive(Debug, Clone)]
pub struct TokenBatch<B: Backend> {
    /// `[batch, context]` input ids.
    pub inputs: Tensor<B, 2, Int>,
    /// `[batch, context]` next-token ids.
    pub targets: Tensor<B, 2, Int>,
}

fn batch<B: Backend>(windows: &TokenWindows, indices: &[usize], device: &B::Device) -> TokenBatch<B> {
    let (n, t) = (indices.len(), windows.context);
    let mut inputs = Vec::with_capacity(n * t);
    let mut targets = Vec::with_capacity(n * t);
    for &i in indices {
        let (x, y) = windows.window(i);
        inputs.extend(x.iter().map(|&v| v as i64));
        targets.extend(y.iter().map(|&v| v as i64));
    }
    TokenBatch {
        inputs: Tensor::from_data(TensorData::new(inputs, [n, t]), device),
        targets: Tensor::from_data(TensorData::new(targets, [n, t]), device),
    }
}

/// A language model trained on a text corpus.
pub struct TextTask {
    train: TokenWindows,
    test: TokenWindows,
    config: LanguageModelConfig,
}

impl TextTask {
    /// A task over ready windows for a model of `config`.
    pub fn new(train: TokenWindows, test: TokenWindows, config: impl Into<LanguageModelConfig>) -> Self {
        TextTask {
            train,
            test,
            config: config.into(),
        }
    }

    /// The model's shape.
    pub fn config(&self) -> &LanguageModelConfig {
        &self.config
    }

    /// The task a job spec describes: reads the corpus, tokenizes it, holds out its
    /// end for testing, and applies the spec's limits (in windows).
    pub fn from_spec(spec: &JobSpec) -> Result<Self, TrainError> {
        let ds = &spec.dataset;
        let text = read_corpus(&ds.path)?;
        let tokenizer = match ds.tokenizer.as_str() {
            "byte" => Tokenizer::Bytes,
            "char" => Tokenizer::chars_of(&text),
            path => Tokenizer::from_file(std::path::Path::new(path))?,
        };
        let ids = tokenizer.encode(&text)?;
        let cut = ((ids.len() as f64) * (1.0 - ds.test_fraction)) as usize;
        let mut train = TokenWindows {
            ids: ids[..cut].to_vec(),
            context: ds.context,
        };
        let mut test = TokenWindows {
            ids: ids[cut.saturating_sub(1).min(cut)..].to_vec(),
            context: ds.context,
        };
        if ds.train_limit > 0 {
            train.truncate(ds.train_limit);
        }
        if ds.test_limit > 0 {
            test.truncate(ds.test_limit);
        }
        if train.is_empty() {
            return Err(TrainError::Config(format!(
                "{}: {} tokens make no training window of {} tokens",
                ds.path.display(),
                train.ids.len(),
                ds.context
            )));
        }
        let config = model_config(spec, tokenizer.vocab_size())?;
        Ok(Self::new(train, test, config))
    }
}

/// The language model a spec describes: its `[model]` shape, decoupled when it
/// has a `[model.decouple]` table.
pub fn model_config(spec: &JobSpec, vocab: usize) -> Result<LanguageModelConfig, TrainError> {
    let shape = spec.transformer.unwrap_or_default();
    let original = TinyLmConfig::new(vocab, spec.dataset.context)
        .with_d_model(shape.d_model)
        .with_layers(shape.layers)
        .with_heads(shape.heads);
    let Some(decouple) = shape.decouple else {
        return Ok(LanguageModelConfig::Original(original));
    };
    let config =
        DecoupledLmConfig::new(original, decoupling(decouple)).map_err(|e| TrainError::Config(e.to_string()))?;
    Ok(LanguageModelConfig::Decoupled(config))
}

/// The decoupling a spec's `[model.decouple]` table names.
pub fn decoupling(spec: DecoupleSpec) -> Decoupling {
    Decoupling {
        divisions: spec.divisions,
        blocks: spec.blocks,
        variant: match spec.variant {
            SubBlockVariant::FullHeads => Variant::FullHeads,
            SubBlockVariant::SplitHeads => Variant::SplitHeads,
        },
    }
}

impl<B: AutodiffBackend> Task<B> for TextTask {
    type Model = LanguageModel<B>;
    type Batch = TokenBatch<B>;

    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn test_len(&self) -> usize {
        self.test.len()
    }

    fn model(&self, device: &B::Device) -> LanguageModel<B> {
        self.config.init(device)
    }

    fn train_batch(&self, indices: &[usize], device: &B::Device) -> TokenBatch<B> {
        batch(&self.train, indices, device)
    }

    fn test_batch(&self, indices: &[usize], device: &B::Device) -> TokenBatch<B> {
        batch(&self.test, indices, device)
    }

    fn loss(&self, model: &LanguageModel<B>, batch: TokenBatch<B>) -> Tensor<B, 1> {
        let logits = model.forward(batch.inputs);
        let [n, t, v] = logits.dims();
        CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits.reshape([n * t, v]), batch.targets.reshape([n * t]))
    }

    fn evaluate(&self, model: &LanguageModel<B>, batch: TokenBatch<B>) -> Evaluation {
        // Every position is one next-token prediction.
        let logits = model.forward(batch.inputs);
        let [n, t, v] = logits.dims();
        classification_sums(logits.reshape([n * t, v]), batch.targets.reshape([n * t]))
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};

    use super::*;
    use crate::{TrainOptions, train};

    type B = Autodiff<Flex>;

    /// A repetitive text is learnt by the model and by its decoupled form: the
    /// loss falls far below chance (ln 256).
    #[test]
    fn learns_a_repetitive_text() {
        let ids: Vec<u32> = "to be or not to be, that is the question. "
            .repeat(40)
            .bytes()
            .map(u32::from)
            .collect();
        let cut = ids.len() * 9 / 10;
        let windows = |ids: &[u32]| TokenWindows {
            ids: ids.to_vec(),
            context: 16,
        };
        let original = TinyLmConfig::new(256, 16).with_d_model(32);
        let decoupling = Decoupling {
            divisions: 2,
            blocks: 1,
            variant: Variant::SplitHeads,
        };
        let decoupled = DecoupledLmConfig::new(original.clone(), decoupling).unwrap();
        for config in [
            LanguageModelConfig::Original(original),
            LanguageModelConfig::Decoupled(decoupled),
        ] {
            let task = TextTask::new(windows(&ids[..cut]), windows(&ids[cut..]), config);
            let ring = hetero_comm::ring::loopback(1, "t", "k").unwrap().pop().unwrap();
            let options = TrainOptions::new(4, 8, 1).with_optimizer(hetero_job::Optimizer::Adam, 3e-3);
            let summary = train::<B, _>(task, Default::default(), ring, options, &mut |_| {}).unwrap();
            assert!(summary.last_epoch_loss < summary.first_epoch_loss, "{summary:?}");
            assert!(summary.last_epoch_loss < 2.5, "{summary:?}");
            assert!(summary.test_accuracy.unwrap() > 0.3, "{summary:?}");
        }
    }
}
