//! Weight decoupling by distillation (seed 000, claim 2), for decoders (SmolLM2):
//! the student is the teacher's decoupled version ([`DecoupledLlama`]), sliced
//! from the teacher's weights, and learns the teacher's next-token distribution
//! at every position of windows of text. The teacher is frozen: it runs without
//! autodiff, once per batch.
//!
//! A sample is a window of token ids. The loss is the Kullback–Leibler
//! divergence `KL(teacher ‖ student)` of the next-token distributions, averaged
//! over positions. Evaluation reports the mean divergence per position and, as
//! the summary's "accuracy", top-1 agreement with the teacher (the share of
//! positions where both pick the same next token).

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use hetero_models::checkpoint::trainable;
use hetero_models::decoupled_llama::DecoupledLlama;

use crate::{Evaluation, Task};

/// Windows of token ids with the teacher's next-token log-probabilities.
#[derive(Debug, Clone)]
pub struct WindowBatch<B: Backend> {
    /// `[batch, window]`.
    pub ids: Tensor<B, 2, Int>,
    /// `[batch, window, vocab]`: the teacher's log-probabilities.
    pub targets: Tensor<B, 3>,
}

/// A decoupled decoder distilled from its original.
pub struct DecoderDistillTask<B: AutodiffBackend> {
    teacher: DecoupledLlama<B::InnerBackend>,
    /// The sliced student, the starting point of every worker.
    student: DecoupledLlama<B>,
    train: Vec<Vec<u32>>,
    test: Vec<Vec<u32>>,
}

impl<B: AutodiffBackend> DecoderDistillTask<B> {
    /// A task that distils `teacher` (every layer original) into `student` (its
    /// decoupled version, sliced from it) on `train` and `test` windows of token
    /// ids, all of one length.
    pub fn new(
        teacher: DecoupledLlama<B>,
        student: DecoupledLlama<B>,
        train: Vec<Vec<u32>>,
        test: Vec<Vec<u32>>,
    ) -> Self {
        DecoderDistillTask {
            teacher: teacher.valid(),
            student,
            train,
            test,
        }
    }

    fn batch(&self, rows: &[&Vec<u32>], device: &B::Device) -> WindowBatch<B> {
        let window = rows.first().map_or(0, |r| r.len());
        let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().map(|&t| i64::from(t))).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [rows.len(), window]), device);
        let logits = self.teacher.forward(ids.clone().inner(), &mut self.teacher.caches());
        WindowBatch {
            ids,
            targets: Tensor::from_inner(log_softmax(logits, 2)),
        }
    }
}

/// `KL(p ‖ q)` per position from log-probabilities `p`, `q` (`[batch, seq,
/// vocab]`): `[batch, seq]`.
fn divergence<B: Backend>(p: Tensor<B, 3>, q: Tensor<B, 3>) -> Tensor<B, 2> {
    let [batch, seq, _] = p.dims();
    (p.clone().exp() * (p - q)).sum_dim(2).reshape([batch, seq])
}

impl<B: AutodiffBackend> Task<B> for DecoderDistillTask<B> {
    type Model = DecoupledLlama<B>;
    type Batch = WindowBatch<B>;

    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn test_len(&self) -> usize {
        self.test.len()
    }

    /// The sliced student (the same for every seed, so every worker starts from
    /// it), every parameter its own leaf.
    fn model(&self, _device: &B::Device) -> DecoupledLlama<B> {
        trainable(self.student.clone())
    }

    fn train_batch(&self, indices: &[usize], device: &B::Device) -> WindowBatch<B> {
        let rows: Vec<&Vec<u32>> = indices.iter().map(|&i| &self.train[i]).collect();
        self.batch(&rows, device)
    }

    fn test_batch(&self, indices: &[usize], device: &B::Device) -> WindowBatch<B> {
        let rows: Vec<&Vec<u32>> = indices.iter().map(|&i| &self.test[i]).collect();
        self.batch(&rows, device)
    }

    fn loss(&self, model: &DecoupledLlama<B>, batch: WindowBatch<B>) -> Tensor<B, 1> {
        let student = log_softmax(model.forward(batch.ids, &mut model.caches()), 2);
        divergence(batch.targets, student).mean()
    }

    fn evaluate(&self, model: &DecoupledLlama<B>, batch: WindowBatch<B>) -> Evaluation {
        let student = log_softmax(model.forward(batch.ids, &mut model.caches()), 2);
        let [rows, seq, _] = student.dims();
        let agreeing = student
            .clone()
            .argmax(2)
            .equal(batch.targets.clone().argmax(2))
            .int()
            .sum()
            .into_scalar()
            .elem::<i64>();
        let loss_sum = divergence(batch.targets, student).sum().into_scalar().elem::<f32>();
        Evaluation {
            loss_sum: f64::from(loss_sum),
            correct: agreeing as f64,
            count: (rows * seq) as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use hetero_models::decouple::{Decoupling, Variant};
    use hetero_models::decoupled_llama::DecoupledLlamaConfig;
    use hetero_models::llama::LlamaConfig;

    use super::*;
    use crate::{TrainOptions, train};

    type B = Autodiff<Flex>;

    /// A llama of 4 layers, width 32, random weights drawn as a checkpoint would be.
    fn pair(device: &Device<B>) -> (DecoupledLlama<B>, DecoupledLlama<B>) {
        let c = LlamaConfig {
            hidden: 32,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            ffn: 48,
            vocab: 40,
            context: 32,
            rope_base: 10_000.0,
            eps: 1e-5,
            separate_head: false,
            attention_bias: false,
        };
        let shapes = c.tensor_shapes();
        let mut seed = 3u64;
        let mut source = |name: &str, shape: &[usize]| -> Result<Vec<f32>, std::convert::Infallible> {
            assert_eq!(shapes[name], shape);
            let n = shape.iter().product::<usize>();
            let scale = shape.len() == 1;
            Ok((0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let u = (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                    if scale { 1.0 + 0.1 * u } else { 0.5 * u }
                })
                .collect())
        };
        let config = DecoupledLlamaConfig::new(
            c,
            Decoupling {
                divisions: 2,
                blocks: 2,
                variant: Variant::SplitHeads,
            },
        )
        .unwrap();
        let Ok(pair) = DecoupledLlama::pair_from(&mut source, &config, 32, device);
        pair
    }

    /// A model compared with itself diverges by nothing and agrees everywhere.
    #[test]
    fn the_teacher_against_itself_diverges_by_nothing() {
        let device = Default::default();
        let (teacher, _) = pair(&device);
        let task = DecoderDistillTask::<B>::new(teacher.clone(), teacher, vec![], vec![vec![1, 5, 9, 2, 7, 3]]);
        let e = task.evaluate(&task.model(&device), task.test_batch(&[0], &device));
        assert!(e.loss_sum.abs() < 1e-4, "{}", e.loss_sum);
        assert_eq!((e.correct, e.count), (6.0, 6.0));
    }

    /// Distillation through Hetero's trainer brings the sliced student's
    /// next-token distributions closer to the teacher's on held-out windows.
    #[test]
    fn distillation_moves_the_student_towards_the_teacher() {
        let device = Default::default();
        let (teacher, student) = pair(&device);
        let window = |i: usize| -> Vec<u32> { (0..12).map(|j| ((i * 7 + j * j * 3) % 40) as u32).collect() };
        let task = DecoderDistillTask::<B>::new(
            teacher,
            student,
            (0..64).map(window).collect(),
            (64..80).map(window).collect(),
        );
        let test: Vec<usize> = (0..task.test_len()).collect();
        let before = task.evaluate(&task.model(&device), task.test_batch(&test, &device));
        let before = before.loss_sum / before.count;
        let ring = hetero_comm::ring::loopback(1, "t", "k").unwrap().pop().unwrap();
        let options = TrainOptions::new(6, 16, 1).with_optimizer(hetero_job::Optimizer::Adam, 3e-3);
        let summary = train::<B, _>(task, device, ring, options, &mut |_| {}).unwrap();
        let after = summary.test_loss.unwrap();
        assert!(
            after < before * 0.8,
            "divergence from the teacher: {before} before, {after} after"
        );
    }
}
