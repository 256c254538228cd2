//! The built-in task: an image classifier from `hetero-models` trained with
//! cross-entropy on an [`ImageDataset`] (Fashion-MNIST).

use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::backend::AutodiffBackend;
use hetero_data::ImageDataset;
use hetero_data::mnist::Split;
use hetero_job::JobSpec;
use hetero_models::Classifier;

use crate::{Evaluation, Task, TrainError};

/// Fashion-MNIST pixel mean and standard deviation (of x/255 over the training set).
const MEAN: f32 = 0.2860;
const STD: f32 = 0.3530;

/// Images and their labels, on the device.
#[derive(Debug, Clone)]
pub struct ImageBatch<B: Backend> {
    /// `[batch, 1, rows, cols]`, normalised.
    pub images: Tensor<B, 4>,
    /// `[batch]` class indices.
    pub labels: Tensor<B, 1, Int>,
}

/// Turns the images at `indices` into a normalised batch.
pub fn image_batch<B: Backend>(data: &ImageDataset, indices: &[usize], device: &B::Device) -> ImageBatch<B> {
    let n = indices.len();
    let mut pixels = Vec::with_capacity(n * data.rows * data.cols);
    let mut labels = Vec::with_capacity(n);
    for &i in indices {
        pixels.extend(data.image(i).iter().map(|&p| (p as f32 / 255.0 - MEAN) / STD));
        labels.push(data.labels[i] as i64);
    }
    ImageBatch {
        images: Tensor::from_data(TensorData::new(pixels, [n, 1, data.rows, data.cols]), device),
        labels: Tensor::from_data(TensorData::new(labels, [n]), device),
    }
}

/// Builds a freshly initialised model on a device.
type ModelInit<B, M> = Box<dyn Fn(&<B as burn::tensor::backend::BackendTypes>::Device) -> M + Send>;

/// An image classifier `M` trained on an image dataset.
pub struct ImageTask<B: AutodiffBackend, M: AutodiffModule<B>> {
    train: ImageDataset,
    test: ImageDataset,
    init: ModelInit<B, M>,
}

impl<B, M> ImageTask<B, M>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + Classifier<B>,
{
    /// A task over the given data.
    pub fn new(
        train: ImageDataset,
        test: ImageDataset,
        init: impl Fn(&B::Device) -> M + Send + 'static,
    ) -> Self {
        ImageTask {
            train,
            test,
            init: Box::new(init),
        }
    }

    /// The task a job spec describes: loads its dataset (with the spec's limits).
    pub fn from_spec(spec: &JobSpec, init: impl Fn(&B::Device) -> M + Send + 'static) -> Result<Self, TrainError> {
        let dir = &spec.dataset.path;
        let mut train = ImageDataset::load(dir, Split::Train)?;
        let mut test = ImageDataset::load(dir, Split::Test)?;
        if spec.dataset.train_limit > 0 {
            train.truncate(spec.dataset.train_limit);
        }
        if spec.dataset.test_limit > 0 {
            test.truncate(spec.dataset.test_limit);
        }
        if (train.rows, train.cols) != (28, 28) || (test.rows, test.cols) != (28, 28) {
            return Err(TrainError::Config(format!(
                "{}: the built-in models take 28×28 images, the files hold {}×{}",
                dir.display(),
                train.rows,
                train.cols
            )));
        }
        Ok(Self::new(train, test, init))
    }
}

impl<B, M> Task<B> for ImageTask<B, M>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + Classifier<B>,
{
    type Model = M;
    type Batch = ImageBatch<B>;

    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn test_len(&self) -> usize {
        self.test.len()
    }

    fn model(&self, device: &B::Device) -> M {
        (self.init)(device)
    }

    fn train_batch(&self, indices: &[usize], device: &B::Device) -> ImageBatch<B> {
        image_batch(&self.train, indices, device)
    }

    fn test_batch(&self, indices: &[usize], device: &B::Device) -> ImageBatch<B> {
        image_batch(&self.test, indices, device)
    }

    fn loss(&self, model: &M, batch: ImageBatch<B>) -> Tensor<B, 1> {
        let logits = model.forward(batch.images);
        CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits, batch.labels)
    }

    fn evaluate(&self, model: &M, batch: ImageBatch<B>) -> Evaluation {
        let count = batch.labels.dims()[0];
        let logits = model.forward(batch.images);
        let predicted = logits.clone().argmax(1).flatten::<1>(0, 1);
        let correct = predicted
            .equal(batch.labels.clone())
            .int()
            .sum()
            .into_scalar()
            .elem::<f64>();
        let loss = CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits, batch.labels)
            .into_scalar()
            .elem::<f64>();
        Evaluation {
            loss_sum: loss * count as f64,
            correct,
            count: count as f64,
        }
    }
}
