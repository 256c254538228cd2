//! Weight decoupling by distillation (seed 000, claim 2), for sentence encoders:
//! the student is the teacher's decoupled version ([`DecoupledBert`]), initialised
//! by slicing the teacher's weights, and learns to give every sentence the
//! teacher's embedding. The teacher is frozen: it runs without autodiff, once per
//! batch, and only the student's parameters are trained.
//!
//! A sample is one sentence (token ids, `[CLS] … [SEP]`). The loss is the mean of
//! `1 − cos(student, teacher)` over the batch's mean-pooled embeddings: on
//! unit-normalised embeddings it is half their squared distance, and it is what
//! retrieval and clustering see. Evaluation reports the mean loss and, as the
//! summary's "accuracy", the mean cosine to the teacher.

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::backend::AutodiffBackend;
use hetero_models::bert::{BertEncoder, padded_ids};
use hetero_models::checkpoint::trainable;
use hetero_models::decoupled_bert::{DecoupledBert, DecoupledBertConfig};

use crate::{Evaluation, Task};

/// Sentences of token ids, padded into one batch, with the teacher's embeddings.
#[derive(Debug, Clone)]
pub struct SentenceBatch<B: Backend> {
    /// `[batch, seq]`, padded with 0 after each row's length.
    pub ids: Tensor<B, 2, Int>,
    /// Real tokens of each row.
    pub lengths: Vec<usize>,
    /// `[batch, hidden]`: the teacher's unit-normalised embeddings.
    pub targets: Tensor<B, 2>,
}

/// A decoupled encoder distilled from its original.
pub struct EncoderDistillTask<B: AutodiffBackend> {
    teacher: BertEncoder<B::InnerBackend>,
    /// The teacher on the training backend, the student's raw material.
    sliced_from: BertEncoder<B>,
    config: DecoupledBertConfig,
    train: Vec<Vec<u32>>,
    test: Vec<Vec<u32>>,
}

impl<B: AutodiffBackend> EncoderDistillTask<B> {
    /// A task that distils `teacher` into its decoupled version of `config`, on
    /// `train` and `test` sentences (token ids, none empty).
    pub fn new(
        teacher: BertEncoder<B>,
        config: DecoupledBertConfig,
        train: Vec<Vec<u32>>,
        test: Vec<Vec<u32>>,
    ) -> Self {
        EncoderDistillTask {
            teacher: teacher.valid(),
            sliced_from: teacher,
            config,
            train,
            test,
        }
    }

    fn batch(&self, rows: &[&[u32]], device: &B::Device) -> SentenceBatch<B> {
        let (ids, lengths) = padded_ids::<B, _>(rows, device);
        let hidden = self.teacher.forward(ids.clone().inner(), &lengths);
        let targets = Tensor::from_inner(pooled(hidden, &lengths));
        SentenceBatch { ids, lengths, targets }
    }
}

/// sentence-transformers' embedding as a tensor: the mean of each row's real
/// tokens, unit-normalised.
///
/// # Shapes
/// - x: `[batch, seq, hidden]`; `lengths[b]` of row `b` are real tokens
/// - returns: `[batch, hidden]`
pub fn pooled<B: Backend>(x: Tensor<B, 3>, lengths: &[usize]) -> Tensor<B, 2> {
    let [batch, seq, hidden] = x.dims();
    let keep: Vec<f32> = lengths
        .iter()
        .flat_map(|&n| (0..seq).map(move |j| if j < n { 1.0 } else { 0.0 }))
        .collect();
    let keep = Tensor::<B, 2>::from_data(TensorData::new(keep, [batch, seq]), &x.device());
    let counts = keep.clone().sum_dim(1).clamp_min(1.0);
    let mean = (x * keep.unsqueeze_dim::<3>(2)).sum_dim(1).reshape([batch, hidden]) / counts;
    let norm = mean.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    mean / norm
}

/// `1 − cos` per row of two unit-normalised `[batch, hidden]` tensors: `[batch]`.
fn cosine_distance<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 1> {
    let [batch, _] = a.dims();
    (a * b).sum_dim(1).reshape([batch]).neg() + 1.0
}

impl<B: AutodiffBackend> Task<B> for EncoderDistillTask<B> {
    type Model = DecoupledBert<B>;
    type Batch = SentenceBatch<B>;

    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn test_len(&self) -> usize {
        self.test.len()
    }

    /// The student before training: the teacher's weights, sliced (the same for
    /// every seed, so every worker starts from the same student), every parameter
    /// its own leaf.
    fn model(&self, _device: &B::Device) -> DecoupledBert<B> {
        trainable(DecoupledBert::sliced_from(&self.sliced_from, &self.config))
    }

    fn train_batch(&self, indices: &[usize], device: &B::Device) -> SentenceBatch<B> {
        let rows: Vec<&[u32]> = indices.iter().map(|&i| self.train[i].as_slice()).collect();
        self.batch(&rows, device)
    }

    fn test_batch(&self, indices: &[usize], device: &B::Device) -> SentenceBatch<B> {
        let rows: Vec<&[u32]> = indices.iter().map(|&i| self.test[i].as_slice()).collect();
        self.batch(&rows, device)
    }

    fn loss(&self, model: &DecoupledBert<B>, batch: SentenceBatch<B>) -> Tensor<B, 1> {
        let student = pooled(model.forward(batch.ids, &batch.lengths), &batch.lengths);
        cosine_distance(student, batch.targets).mean()
    }

    fn evaluate(&self, model: &DecoupledBert<B>, batch: SentenceBatch<B>) -> Evaluation {
        let count = batch.lengths.len() as f64;
        let student = pooled(model.forward(batch.ids, &batch.lengths), &batch.lengths);
        let loss_sum = f64::from(
            cosine_distance(student, batch.targets)
                .sum()
                .into_scalar()
                .elem::<f32>(),
        );
        Evaluation {
            loss_sum,
            correct: count - loss_sum,
            count,
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use hetero_models::bert::{BertConfig, mean_pool};
    use hetero_models::decouple::{Decoupling, Variant};

    use super::*;
    use crate::{TrainOptions, train};

    type B = Autodiff<Flex>;

    /// A BERT of 4 layers, width 32, random weights drawn as a checkpoint would be.
    fn teacher(device: &Device<B>) -> (BertConfig, BertEncoder<B>) {
        let mut c = BertConfig::mini_lm();
        (c.hidden, c.layers, c.heads, c.intermediate, c.vocab, c.max_positions) = (32, 4, 4, 64, 60, 32);
        let shapes = c.tensor_shapes();
        let mut seed = 1u64;
        let mut source = |name: &str, shape: &[usize]| -> Result<Vec<f32>, std::convert::Infallible> {
            assert_eq!(shapes[name], shape);
            let n = shape.iter().product::<usize>();
            let ones = name.ends_with("LayerNorm.weight");
            Ok((0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let u = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    if ones { 1.0 + 0.1 * u } else { 0.4 * u }
                })
                .collect())
        };
        let Ok(encoder) = BertEncoder::load(&mut source, &c, device);
        (c, encoder)
    }

    /// The pooled tensor is `mean_pool`'s embedding, padding left out.
    #[test]
    fn pooled_is_the_served_embedding() {
        let device = Default::default();
        let x = Tensor::<Flex, 3>::random([2, 5, 6], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
        let lengths = [5, 3];
        let want = mean_pool(x.clone(), &lengths).concat();
        let got = pooled(x, &lengths).into_data().to_vec::<f32>().unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    /// Distillation through Hetero's trainer brings the sliced student closer to
    /// the teacher on held-out sentences than it started.
    #[test]
    fn distillation_moves_the_student_towards_the_teacher() {
        let device = Default::default();
        let (c, encoder) = teacher(&device);
        let config = DecoupledBertConfig::new(
            c,
            Decoupling {
                divisions: 2,
                blocks: 2,
                variant: Variant::SplitHeads,
            },
        )
        .unwrap();
        let sentence = |i: usize| -> Vec<u32> {
            let mut row = vec![1];
            row.extend((0..4 + i % 7).map(|j| (2 + (i * 7 + j * 3) % 57) as u32));
            row.push(59);
            row
        };
        let task = EncoderDistillTask::<B>::new(
            encoder,
            config,
            (0..96).map(sentence).collect(),
            (96..128).map(sentence).collect(),
        );
        let test: Vec<usize> = (0..task.test_len()).collect();
        let before = task.evaluate(&task.model(&device), task.test_batch(&test, &device));
        let before = before.loss_sum / before.count;
        let ring = hetero_comm::ring::loopback(1, "t", "k").unwrap().pop().unwrap();
        let options = TrainOptions::new(6, 16, 1).with_optimizer(hetero_job::Optimizer::Adam, 1e-3);
        let summary = train::<B, _>(task, device, ring, options, &mut |_| {}).unwrap();
        let after = summary.test_loss.unwrap();
        assert!(
            after < before * 0.8,
            "distance to the teacher: {before} before, {after} after"
        );
    }
}
