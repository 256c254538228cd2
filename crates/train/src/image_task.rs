//! The built-in task: an image classifier from `hetero-models` trained with
//! cross-entropy on an [`ImageDataset`] — Fashion-MNIST's IDX files, CSV files or
//! class folders ([`load_images`]) — normalised, and augmented as the spec's
//! `[preprocess]` section says.

use std::sync::atomic::{AtomicU64, Ordering};

use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::backend::AutodiffBackend;
use hetero_data::ImageDataset;
use hetero_data::bundle_cache::{BundleCache, Loaded};
use hetero_data::held::HeldImages;
use hetero_data::mnist::Split;
use hetero_data::preprocess::{self, Augment, Normalize};
use hetero_job::{JobSpec, NormalizeSpec};
use hetero_models::Classifier;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::{Evaluation, Task, TrainError};

/// Fashion-MNIST's pixel mean and standard deviation (of p/255 over the training set).
pub const FASHION_MNIST: Normalize = Normalize {
    mean: 0.2860,
    std: 0.3530,
};

/// Classes the built-in models tell apart.
pub const CLASSES: usize = 10;

/// Images and their labels, on the device.
#[derive(Debug, Clone)]
pub struct ImageBatch<B: Backend> {
    /// `[batch, 1, rows, cols]`, normalised.
    pub images: Tensor<B, 4>,
    /// `[batch]` class indices.
    pub labels: Tensor<B, 1, Int>,
}

/// Turns the images at `indices` into a batch normalised as Fashion-MNIST.
pub fn image_batch<B: Backend>(data: &ImageDataset, indices: &[usize], device: &B::Device) -> ImageBatch<B> {
    prepared_batch(data, indices, &FASHION_MNIST, None, device)
}

/// Turns the images at `indices` into a batch normalised by `normalize` and, when
/// given, augmented with draws from the generator.
pub fn prepared_batch<B: Backend>(
    data: &ImageDataset,
    indices: &[usize],
    normalize: &Normalize,
    mut augment: Option<(&Augment, &mut StdRng)>,
    device: &B::Device,
) -> ImageBatch<B> {
    let n = indices.len();
    let size = data.rows * data.cols;
    let mut pixels = Vec::with_capacity(n * size);
    let mut labels = Vec::with_capacity(n);
    let background = normalize.apply(0);
    for &i in indices {
        let start = pixels.len();
        pixels.extend(data.image(i).iter().map(|&p| normalize.apply(p)));
        if let Some((a, rng)) = augment.as_mut() {
            a.apply(&mut pixels[start..start + size], data.rows, data.cols, background, rng);
        }
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
    /// The training and test images, and which of them this worker holds.
    images: HeldImages,
    /// Where the images received from other workers are kept on this host.
    cache: Option<BundleCache>,
    init: ModelInit<B, M>,
    normalize: Normalize,
    augment: Augment,
    seed: u64,
    /// Training batches made so far (each draws fresh augmentations).
    draws: AtomicU64,
}

impl<B, M> ImageTask<B, M>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + Classifier<B>,
{
    /// A task over the given data.
    pub fn new(train: ImageDataset, test: ImageDataset, init: impl Fn(&B::Device) -> M + Send + 'static) -> Self {
        Self::from_held(HeldImages::complete(train, test), init)
    }

    /// A task over `images`, of which this worker may hold only some: the others
    /// are sent to it by workers that hold them before it needs them.
    pub fn from_held(images: HeldImages, init: impl Fn(&B::Device) -> M + Send + 'static) -> Self {
        ImageTask {
            images,
            cache: None,
            init: Box::new(init),
            normalize: FASHION_MNIST,
            augment: Augment::default(),
            seed: 0,
            draws: AtomicU64::new(0),
        }
    }

    /// This task with `normalize`, and `augment` applied to training samples with
    /// draws seeded from `seed`.
    pub fn with_preprocessing(mut self, normalize: Normalize, augment: Augment, seed: u64) -> Self {
        self.normalize = normalize;
        self.augment = augment;
        self.seed = seed;
        self
    }

    /// The task a job spec describes: loads its dataset (with the spec's limits) and
    /// prepares images as its `[preprocess]` section says.
    pub fn from_spec(spec: &JobSpec, init: impl Fn(&B::Device) -> M + Send + 'static) -> Result<Self, TrainError> {
        let (train, test) = load_images(spec)?;
        if (train.rows, train.cols) != (28, 28) {
            return Err(TrainError::Config(format!(
                "{}: the built-in models take 28×28 images, the dataset holds {}×{} (set preprocess.resize = [28, 28])",
                spec.dataset.path.display(),
                train.rows,
                train.cols
            )));
        }
        if let Some(bad) = train
            .labels
            .iter()
            .chain(&test.labels)
            .find(|&&l| l as usize >= CLASSES)
        {
            return Err(TrainError::Config(format!(
                "{}: label {bad} is outside the {CLASSES} classes the built-in models tell apart",
                spec.dataset.path.display()
            )));
        }
        let p = &spec.preprocess;
        let normalize = match p.normalize {
            NormalizeSpec::Dataset => Normalize::of(&train),
            NormalizeSpec::None => Normalize::IDENTITY,
            NormalizeSpec::Fixed { mean, std } => Normalize {
                mean: mean as f32,
                std: std as f32,
            },
        };
        Ok(Self::new(train, test, init).with_preprocessing(normalize, augment_of(spec), spec.training.seed))
    }

    /// What a worker without the dataset's files needs to build this task.
    pub fn facts(&self) -> ImageFacts {
        ImageFacts {
            train_len: self.images.train.len(),
            test_len: self.images.test.len(),
            rows: self.images.train.rows,
            cols: self.images.train.cols,
            mean: self.normalize.mean,
            std: self.normalize.std,
            fingerprint: self.images.fingerprint(),
        }
    }

    /// The task of `spec` on a machine without its dataset's files, from `facts` a
    /// worker that read them sent: it holds no image yet, and receives the ones it
    /// needs from the workers that hold them before it needs them.
    pub fn from_facts(facts: ImageFacts, spec: &JobSpec, init: impl Fn(&B::Device) -> M + Send + 'static) -> Self {
        let images = HeldImages::empty(facts.train_len, facts.test_len, facts.rows, facts.cols);
        let normalize = Normalize {
            mean: facts.mean,
            std: facts.std,
        };
        Self::from_held(images, init).with_preprocessing(normalize, augment_of(spec), spec.training.seed)
    }
}

impl<B, M> ImageTask<B, M>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + Classifier<B>,
{
    /// This task keeping the images it receives in `cache`, after taking in the
    /// ones already there (a worker started again on this host); says what it
    /// loaded.
    pub fn with_cache(mut self, cache: BundleCache) -> (Self, Loaded) {
        let loaded = cache.load_into(&mut self.images, CLASSES);
        self.cache = Some(cache);
        (self, loaded)
    }
}

/// The training augmentations a spec asks for.
fn augment_of(spec: &JobSpec) -> Augment {
    let p = &spec.preprocess;
    Augment {
        crop_padding: p.crop_padding,
        horizontal_flip: p.horizontal_flip,
        noise_std: p.noise_std as f32,
    }
}

/// What a worker on a machine without an image dataset's files needs to build
/// its task: the sets' sizes, the images' shape and the normalisation (which a
/// worker with the files computed from them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageFacts {
    /// Training images.
    pub train_len: usize,
    /// Test images.
    pub test_len: usize,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
    /// Normalisation mean.
    pub mean: f32,
    /// Normalisation standard deviation.
    pub std: f32,
    /// A checksum of every label and pixel ([`HeldImages::fingerprint`]): two
    /// copies of a dataset that differ, differ here.
    pub fingerprint: u32,
}

/// Bytes of [`ImageFacts::to_bytes`].
const FACTS_LEN: usize = 44;

/// Most images of one set a worker accepts facts for (the buffers are allocated
/// from them).
const MAX_IMAGES: usize = 1 << 26;

impl ImageFacts {
    /// The facts as one message (little-endian).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(FACTS_LEN);
        for v in [self.train_len, self.test_len, self.rows, self.cols] {
            out.extend_from_slice(&(v as u64).to_le_bytes());
        }
        out.extend_from_slice(&self.mean.to_le_bytes());
        out.extend_from_slice(&self.std.to_le_bytes());
        out.extend_from_slice(&self.fingerprint.to_le_bytes());
        out
    }

    /// Reads [`ImageFacts::to_bytes`]; refuses another length, sizes past what
    /// this worker would allocate and normalisations that are not numbers.
    pub fn from_bytes(bytes: &[u8]) -> Result<ImageFacts, String> {
        if bytes.len() != FACTS_LEN {
            return Err(format!(
                "the dataset's facts are {} bytes, not {FACTS_LEN}",
                bytes.len()
            ));
        }
        let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("eight bytes"));
        let float = |at: usize| f32::from_le_bytes(bytes[at..at + 4].try_into().expect("four bytes"));
        let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        let f = ImageFacts {
            train_len: size(word(0)),
            test_len: size(word(1)),
            rows: size(word(2)),
            cols: size(word(3)),
            mean: float(32),
            std: float(36),
            fingerprint: u32::from_le_bytes(bytes[40..44].try_into().expect("four bytes")),
        };
        if f.train_len > MAX_IMAGES || f.test_len > MAX_IMAGES {
            return Err(format!(
                "{} training and {} test images is past {MAX_IMAGES}",
                f.train_len, f.test_len
            ));
        }
        if !(1..=4096).contains(&f.rows) || !(1..=4096).contains(&f.cols) {
            return Err(format!("images of {}×{} pixels", f.rows, f.cols));
        }
        if (f.train_len + f.test_len).saturating_mul(f.rows * f.cols) > 1 << 34 {
            return Err("the images would take more than 16 GiB".into());
        }
        if !(f.mean.is_finite() && f.std.is_finite() && f.std > 0.0) {
            return Err(format!("a normalisation of mean {} and deviation {}", f.mean, f.std));
        }
        Ok(f)
    }
}

/// An empty test set for images shaped like `train`'s.
fn no_images_like(train: &ImageDataset) -> ImageDataset {
    ImageDataset {
        pixels: vec![],
        labels: vec![],
        rows: train.rows,
        cols: train.cols,
    }
}

/// Cross-entropy and correct predictions summed over `[n, classes]` logits with
/// their `[n]` labels.
pub fn classification_sums<B: Backend>(logits: Tensor<B, 2>, labels: Tensor<B, 1, Int>) -> Evaluation {
    let count = labels.dims()[0] as f64;
    let correct = logits
        .clone()
        .argmax(1)
        .flatten::<1>(0, 1)
        .equal(labels.clone())
        .int()
        .sum()
        .into_scalar()
        .elem::<f64>();
    let loss = CrossEntropyLossConfig::new()
        .init(&logits.device())
        .forward(logits, labels)
        .into_scalar()
        .elem::<f64>();
    Evaluation {
        loss_sum: loss * count,
        correct,
        count,
    }
}

/// The training and test images a spec names, limited and resized as it says.
/// Without a test set (a CSV dataset with no test file) the test set is empty.
pub fn load_images(spec: &JobSpec) -> Result<(ImageDataset, ImageDataset), TrainError> {
    let ds = &spec.dataset;
    let dir = &ds.path;
    let (mut train, mut test) = match ds.kind.as_str() {
        "csv" => {
            let file = |name: &Option<String>, default: &str| dir.join(name.as_deref().unwrap_or(default));
            let train = hetero_data::csv::load(&file(&ds.train_file, "train.csv"), &ds.label_column, ds.image_shape)?;
            let test_path = file(&ds.test_file, "test.csv");
            let test = if test_path.exists() || ds.test_file.is_some() {
                hetero_data::csv::load(&test_path, &ds.label_column, ds.image_shape)?
            } else {
                no_images_like(&train)
            };
            (train, test)
        }
        "image-folder" => {
            let classes = hetero_data::folder::classes(&dir.join("train"))?;
            let shape = spec.preprocess.resize;
            let train = hetero_data::folder::load(&dir.join("train"), &classes, shape)?;
            let test = if dir.join("test").is_dir() {
                hetero_data::folder::load(&dir.join("test"), &classes, Some((train.rows, train.cols)))?
            } else {
                no_images_like(&train)
            };
            (train, test)
        }
        _ => (
            ImageDataset::load(dir, Split::Train)?,
            ImageDataset::load(dir, Split::Test)?,
        ),
    };
    if ds.train_limit > 0 {
        train.truncate(ds.train_limit);
    }
    if ds.test_limit > 0 {
        test.truncate(ds.test_limit);
    }
    if let Some((rows, cols)) = spec.preprocess.resize {
        train = preprocess::resize(&train, rows, cols);
        test = preprocess::resize(&test, rows, cols);
    }
    if (test.rows, test.cols) != (train.rows, train.cols) && !test.is_empty() {
        return Err(TrainError::Config(format!(
            "{}: training images are {}×{} but test images {}×{} (set preprocess.resize)",
            dir.display(),
            train.rows,
            train.cols,
            test.rows,
            test.cols
        )));
    }
    Ok((train, test))
}

impl<B, M> Task<B> for ImageTask<B, M>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + Classifier<B>,
{
    type Model = M;
    type Batch = ImageBatch<B>;

    fn train_len(&self) -> usize {
        self.images.train.len()
    }

    fn test_len(&self) -> usize {
        self.images.test.len()
    }

    fn model(&self, device: &B::Device) -> M {
        (self.init)(device)
    }

    fn train_batch(&self, indices: &[usize], device: &B::Device) -> ImageBatch<B> {
        if self.augment.is_identity() {
            return prepared_batch(&self.images.train, indices, &self.normalize, None, device);
        }
        // Fresh draws for every batch, reproducible from the seed.
        let draw = self.draws.fetch_add(1, Ordering::Relaxed);
        let first = indices.first().copied().unwrap_or(0) as u64;
        let mut rng = StdRng::seed_from_u64(self.seed ^ draw.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (first << 20));
        prepared_batch(
            &self.images.train,
            indices,
            &self.normalize,
            Some((&self.augment, &mut rng)),
            device,
        )
    }

    fn test_batch(&self, indices: &[usize], device: &B::Device) -> ImageBatch<B> {
        prepared_batch(&self.images.test, indices, &self.normalize, None, device)
    }

    fn loss(&self, model: &M, batch: ImageBatch<B>) -> Tensor<B, 1> {
        let logits = model.forward(batch.images);
        CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits, batch.labels)
    }

    fn evaluate(&self, model: &M, batch: ImageBatch<B>) -> Evaluation {
        classification_sums(model.forward(batch.images), batch.labels)
    }

    fn head_params(&self, model: &M) -> Option<usize> {
        model.head_params()
    }

    fn staged_loss(&self, model: &M, batch: ImageBatch<B>) -> Result<crate::Staged<B>, ImageBatch<B>> {
        let ImageBatch { images, labels } = batch;
        let features = model.body(images).map_err(|images| ImageBatch {
            images,
            labels: labels.clone(),
        })?;
        let leaf = features.clone().detach().require_grad();
        let logits = model.head(leaf.clone());
        let loss = CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits, labels);
        Ok(crate::Staged { features, leaf, loss })
    }

    fn presence(&self) -> Option<Vec<f32>> {
        (!self.images.is_complete()).then(|| self.images.presence_words())
    }

    fn pack_samples(&self, ids: &[usize]) -> Result<Vec<u8>, usize> {
        self.images.pack(ids)
    }

    fn unpack_samples(&mut self, bundle: &[u8]) -> Result<usize, String> {
        let n = self.images.unpack(bundle, CLASSES).map_err(|e| e.to_string())?;
        if let Some(cache) = &mut self.cache
            && let Err(e) = cache.append(bundle)
        {
            // Training goes on without it: the images would only be received again.
            eprintln!(
                "cannot keep received images in {}: {e}; not caching them any more",
                cache.dir().display()
            );
            self.cache = None;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_read_back_and_every_cut_or_absurd_one_is_refused() {
        let f = ImageFacts {
            train_len: 60_000,
            test_len: 10_000,
            rows: 28,
            cols: 28,
            mean: 0.286,
            std: 0.353,
            fingerprint: 0xdead_beef,
        };
        let bytes = f.to_bytes();
        assert_eq!(ImageFacts::from_bytes(&bytes), Ok(f));
        for cut in 0..bytes.len() {
            assert!(ImageFacts::from_bytes(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let with = |edit: &dyn Fn(&mut ImageFacts)| {
            let mut g = f;
            edit(&mut g);
            ImageFacts::from_bytes(&g.to_bytes())
        };
        assert!(with(&|g| g.train_len = usize::MAX).is_err());
        assert!(with(&|g| g.rows = 0).is_err());
        assert!(with(&|g| (g.rows, g.cols, g.train_len) = (4096, 4096, 2000)).is_err());
        assert!(with(&|g| g.std = f32::NAN).is_err());
    }
}
