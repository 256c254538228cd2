//! A user's own training code, run distributed by Hetero without a change.
//!
//! Everything below `main` is what one would write for a single machine with burn:
//! a model (a two-hidden-layer perceptron with dropout), how to batch the data and
//! the loss. Implementing [`Task`] is the only contact with Hetero;
//! `hetero_worker::run` does the rest (rendezvous, ring, gradient aggregation, the
//! optimiser named by `training.optimizer`, progress, summary). A job spec names
//! this program:
//!
//! ```toml
//! [model]
//! kind = "custom"
//! [task]
//! program = "../target/release/custom-task"
//! params = { hidden = 128, dropout = 0.1 }
//! ```

use std::process::ExitCode;

use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig, Relu};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use hetero_data::ImageDataset;
use hetero_data::mnist::Split;
use hetero_train::image_task::{ImageBatch, image_batch};
use hetero_train::{Evaluation, Task, TaskContext};

fn main() -> ExitCode {
    hetero_worker::run(|ctx, _device| MyTask::new(ctx))
}

/// The user's model.
#[derive(Module, Debug)]
pub struct DeepMlp<B: Backend> {
    fc1: Linear<B>,
    fc2: Linear<B>,
    out: Linear<B>,
    dropout: Dropout,
    act: Relu,
}

impl<B: Backend> DeepMlp<B> {
    fn new(hidden: usize, dropout: f64, device: &B::Device) -> Self {
        DeepMlp {
            fc1: LinearConfig::new(784, hidden).init(device),
            fc2: LinearConfig::new(hidden, hidden).init(device),
            out: LinearConfig::new(hidden, 10).init(device),
            dropout: DropoutConfig::new(dropout).init(),
            act: Relu::new(),
        }
    }

    /// `[batch, 1, 28, 28]` → `[batch, 10]`.
    fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = images.flatten::<2>(1, 3);
        let x = self.dropout.forward(self.act.forward(self.fc1.forward(x)));
        let x = self.dropout.forward(self.act.forward(self.fc2.forward(x)));
        self.out.forward(x)
    }
}

/// The user's task: data, model, loss.
pub struct MyTask<B: AutodiffBackend> {
    train: ImageDataset,
    test: ImageDataset,
    hidden: usize,
    dropout: f64,
    backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> MyTask<B> {
    fn new(ctx: &TaskContext) -> Result<Self, String> {
        let spec = &ctx.spec;
        let params = spec.task.as_ref().map(|t| t.params.clone()).unwrap_or_default();
        let hidden = params.get("hidden").and_then(|v| v.as_u64()).unwrap_or(128) as usize;
        let dropout = params.get("dropout").and_then(|v| v.as_f64()).unwrap_or(0.1);
        if !(0.0..1.0).contains(&dropout) {
            return Err(format!("task.params.dropout = {dropout} must be in [0, 1)"));
        }
        let mut train = ImageDataset::load(&spec.dataset.path, Split::Train).map_err(|e| e.to_string())?;
        let mut test = ImageDataset::load(&spec.dataset.path, Split::Test).map_err(|e| e.to_string())?;
        if spec.dataset.train_limit > 0 {
            train.truncate(spec.dataset.train_limit);
        }
        if spec.dataset.test_limit > 0 {
            test.truncate(spec.dataset.test_limit);
        }
        Ok(MyTask {
            train,
            test,
            hidden,
            dropout,
            backend: std::marker::PhantomData,
        })
    }
}

impl<B: AutodiffBackend> Task<B> for MyTask<B> {
    type Model = DeepMlp<B>;
    type Batch = ImageBatch<B>;

    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn test_len(&self) -> usize {
        self.test.len()
    }

    fn model(&self, device: &B::Device) -> DeepMlp<B> {
        DeepMlp::new(self.hidden, self.dropout, device)
    }

    fn train_batch(&self, indices: &[usize], device: &B::Device) -> ImageBatch<B> {
        image_batch(&self.train, indices, device)
    }

    fn test_batch(&self, indices: &[usize], device: &B::Device) -> ImageBatch<B> {
        image_batch(&self.test, indices, device)
    }

    fn loss(&self, model: &DeepMlp<B>, batch: ImageBatch<B>) -> Tensor<B, 1> {
        let logits = model.forward(batch.images);
        CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits, batch.labels)
    }

    fn evaluate(&self, model: &DeepMlp<B>, batch: ImageBatch<B>) -> Evaluation {
        // Dropout is off in evaluation: burn disables it on the inner (non-autodiff) model.
        let model = model.valid();
        let images = batch.images.inner();
        let labels = batch.labels.inner();
        hetero_train::image_task::classification_sums(model.forward(images), labels)
    }
}
