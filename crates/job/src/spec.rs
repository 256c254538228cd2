//! The job spec's shape, its parser and its validator.
//!
//! ```toml
//! name = "fashion-mnist"
//! [model]     kind = "cnn"                       # cnn | mlp | transformer | custom
//!             d_model, layers, heads, [model.decouple]  # transformer only (`transformer`)
//! [dataset]   kind = "fashion-mnist" | "idx" | "csv" | "image-folder", path = "…",
//!             train_limit, test_limit, split, exchange_fraction, rebalance,
//!             label_column, train_file, test_file, image_shape
//! [preprocess] resize, normalize, crop_padding, horizontal_flip, noise_std
//! [training]  epochs, global_batch_size, optimizer, learning_rate, loss, seed,
//!             strategy, sync_every, staleness, checkpoint_every, resume_from,
//!             stall_after_secs, overlap, exchange_precision
//! [cluster]   workers, backend, threads_per_worker, device, memory_per_worker_mb
//! [scheduling] priority, after, policy
//! [output]    dir
//! [task]      program, params                     # only with model.kind = "custom"
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

use crate::SpecError;
use crate::section::Section;
use crate::transformer::{DISTILL_KEYS, DistillSpec, TRANSFORMER_KEYS, TransformerSpec};

/// A validated job spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Human name of the job.
    pub name: String,
    /// What to train.
    pub model: ModelKind,
    /// The built-in transformer's shape and decoupling, when `model = transformer`.
    #[serde(default)]
    pub transformer: Option<TransformerSpec>,
    /// The teacher and the student's decoupling, when `model = distill`.
    #[serde(default)]
    pub distill: Option<DistillSpec>,
    /// On what.
    pub dataset: DatasetSpec,
    /// How.
    pub training: TrainingSpec,
    /// With how many workers, on which backend.
    pub cluster: ClusterSpec,
    /// Where results go (a job folder is created inside).
    pub output_dir: PathBuf,
    /// When and where the scheduler may start it.
    #[serde(default)]
    pub scheduling: SchedulingSpec,
    /// A user's own training program, when `model = custom`.
    pub task: Option<TaskSpec>,
    /// How images are prepared.
    #[serde(default)]
    pub preprocess: PreprocessSpec,
    /// A model to serve, when the job is inference rather than training.
    #[serde(default)]
    pub inference: Option<InferenceSpec>,
}

/// An inference job: the workers load their parts of `model` under `placement`
/// and rank 0 serves HTTP on `listen` until the job is cancelled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceSpec {
    /// A known model (minilm, smollm2, …), a `.gguf` file or a BERT folder.
    pub model: String,
    /// single, tensor-parallel, pipeline, decoupled(-replicated, -gather), auto
    /// (profiled and planned at start), or a placement file.
    pub placement: String,
    /// Where rank 0 serves the HTTP API.
    pub listen: String,
    /// A file on rank 0's node holding the API key `/v1/…` requests must present
    /// (`Authorization: Bearer …`); none: the API is open.
    #[serde(default)]
    pub api_key_file: Option<String>,
}

/// Image preprocessing: at load time (resize), per sample (normalise) and per
/// training sample (augmentations).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PreprocessSpec {
    /// Resize every image to `(rows, cols)`.
    pub resize: Option<(usize, usize)>,
    /// How pixel values are normalised.
    pub normalize: NormalizeSpec,
    /// Random shifts of up to ± this many pixels (pad and crop).
    pub crop_padding: usize,
    /// Random left–right mirroring.
    pub horizontal_flip: bool,
    /// Gaussian noise of this standard deviation on the normalised input.
    pub noise_std: f64,
}

/// How pixel values `p` become inputs: `(p / 255 − mean) / std`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum NormalizeSpec {
    /// Mean and standard deviation measured on the training set.
    #[default]
    Dataset,
    /// `p / 255` as it is.
    None,
    /// Given values.
    Fixed {
        /// Mean of `p / 255`.
        mean: f64,
        /// Standard deviation of `p / 255`.
        std: f64,
    },
}

/// Built-in models, or a user's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// conv 1→32 3×3, pool, conv 32→64 3×3, pool, fc 3136→128, fc 128→10.
    Cnn,
    /// 784→256→10 with ReLU.
    Mlp,
    /// A small causal transformer language model (needs `dataset.kind = "text"`).
    Transformer,
    /// The program named in `[task]`.
    Custom,
    /// A real model distilled into its decoupled version (needs `dataset.kind =
    /// "text"`).
    Distill,
}

/// The data set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSpec {
    /// Format; only `fashion-mnist` (IDX files) for now.
    pub kind: String,
    /// Folder holding the files (resolved against the spec file's folder).
    pub path: PathBuf,
    /// Use only the first N training samples (0 = all).
    pub train_limit: usize,
    /// Use only the first N test samples (0 = all).
    pub test_limit: usize,
    /// How samples and batches are divided among workers.
    #[serde(default)]
    pub split: SplitKind,
    /// Share of each shard passed to the ring neighbour after every epoch.
    #[serde(default)]
    pub exchange_fraction: f64,
    /// Re-split at epoch boundaries when measured throughput drifts from the split.
    #[serde(default)]
    pub rebalance: bool,
    /// CSV: the column holding the labels.
    #[serde(default = "label")]
    pub label_column: String,
    /// CSV: the training file in `path` (default `train.csv`).
    #[serde(default)]
    pub train_file: Option<String>,
    /// CSV: the test file in `path` (default `test.csv`; absent file: no test set).
    #[serde(default)]
    pub test_file: Option<String>,
    /// CSV: the shape of the image a row's pixels make.
    #[serde(default)]
    pub image_shape: Option<(usize, usize)>,
    /// Text: `byte`, `char`, or the path of a Hugging Face `tokenizer.json`.
    #[serde(default = "byte")]
    pub tokenizer: String,
    /// Text: tokens per training window.
    #[serde(default = "sixty_four")]
    pub context: usize,
    /// Text: the share of the corpus (its end) held out as the test set.
    #[serde(default = "tenth")]
    pub test_fraction: f64,
}

fn byte() -> String {
    "byte".into()
}

fn sixty_four() -> usize {
    64
}

fn tenth() -> f64 {
    0.1
}

fn label() -> String {
    "label".into()
}

/// How a dataset is divided among workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitKind {
    /// Equal shards and local batches.
    #[default]
    Even,
    /// Shards and local batches proportional to each worker's resource-group compute
    /// score, so unlike workers finish a step together.
    Weighted,
}

/// Optimisers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Optimizer {
    /// Adam with burn's defaults (β = 0.9, 0.999).
    Adam,
    /// Plain stochastic gradient descent.
    Sgd,
}

/// Training hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSpec {
    /// Passes over the training set.
    pub epochs: usize,
    /// Samples per step summed over all workers.
    pub global_batch_size: usize,
    /// Optimiser.
    pub optimizer: Optimizer,
    /// Learning rate.
    pub learning_rate: f64,
    /// Seed for initialisation and data order.
    pub seed: u64,
    /// How workers combine their work.
    #[serde(default)]
    pub strategy: Strategy,
    /// Checkpoint every N epochs (0: never).
    #[serde(default = "one")]
    pub checkpoint_every: usize,
    /// Start from this checkpoint (written by an earlier run) instead of from scratch.
    #[serde(default)]
    pub resume_from: Option<PathBuf>,
    /// A worker whose own work (waits on its peers not counted) finishes no step
    /// for this many seconds is stalled: it ends and the job goes on without it
    /// (0: never).
    #[serde(default = "five_minutes")]
    pub stall_after_secs: u64,
    /// Exchange while computing: the head's gradients while the body's are
    /// computed, for models that split so (the CNN); with local SGD, each
    /// average while the next `sync_every / 2` steps compute.
    #[serde(default = "yes")]
    pub overlap: bool,
    /// How the floats an allreduce or local SGD exchanges travel.
    #[serde(default)]
    pub exchange_precision: ExchangePrecision,
}

/// How the floats workers exchange travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExchangePrecision {
    /// Every bit (f32).
    #[default]
    F32,
    /// bfloat16: half the bytes. Gradients (allreduce) or the models' changes
    /// since the last average (local SGD) are rounded to 8 bits of mantissa.
    Bf16,
}

impl ExchangePrecision {
    /// Every name a spec may give, for messages.
    pub const NAMES: &'static str = "f32, bf16";

    /// The precision a spec names; `None` for an unknown name.
    pub fn from_name(name: &str) -> Option<ExchangePrecision> {
        match name {
            "f32" => Some(ExchangePrecision::F32),
            "bf16" => Some(ExchangePrecision::Bf16),
            _ => None,
        }
    }

    /// The name a spec gives it.
    pub fn name(self) -> &'static str {
        match self {
            ExchangePrecision::F32 => "f32",
            ExchangePrecision::Bf16 => "bf16",
        }
    }
}

fn yes() -> bool {
    true
}

fn five_minutes() -> u64 {
    300
}

fn one() -> usize {
    1
}

/// How workers combine their work into one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Strategy {
    /// One ring allreduce of the gradients over all workers, every step.
    #[default]
    Allreduce,
    /// An allreduce inside each resource group; the group leaders exchange with the
    /// parameter server across groups.
    Hierarchical,
    /// Workers push gradients to a parameter server that holds the global model.
    /// `staleness` 0: synchronous, weighted by sample count; above 0: asynchronous,
    /// no worker more than `staleness` model versions ahead of the slowest.
    ParameterServer {
        /// Most model versions a worker may run ahead of the slowest (0: synchronous).
        staleness: usize,
    },
    /// Each worker steps on its own; the models are averaged every `sync_every` steps.
    LocalSgd {
        /// Local steps between two averages.
        sync_every: usize,
    },
}

impl Strategy {
    /// Every name a spec may give, for messages.
    pub const NAMES: &'static str = "allreduce, hierarchical, parameter-server, local-sgd";

    /// The strategy a spec names, with its `sync_every` (local-sgd, default 8)
    /// and `staleness` (parameter-server, default 0); `None` for an unknown name.
    pub fn from_spec(name: &str, sync_every: Option<usize>, staleness: Option<usize>) -> Option<Strategy> {
        Some(match name {
            "allreduce" => Strategy::Allreduce,
            "hierarchical" => Strategy::Hierarchical,
            "parameter-server" => Strategy::ParameterServer {
                staleness: staleness.unwrap_or(0),
            },
            "local-sgd" => Strategy::LocalSgd {
                sync_every: sync_every.unwrap_or(8),
            },
            _ => return None,
        })
    }

    /// The `[training]` lines of a spec that choose this strategy.
    pub fn spec_lines(self) -> String {
        match self {
            Strategy::LocalSgd { sync_every } => format!("strategy = \"local-sgd\"\nsync_every = {sync_every}\n"),
            Strategy::ParameterServer { staleness } => {
                format!("strategy = \"parameter-server\"\nstaleness = {staleness}\n")
            }
            other => format!("strategy = \"{}\"\n", other.name()),
        }
    }

    /// The name used in specs.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Allreduce => "allreduce",
            Strategy::Hierarchical => "hierarchical",
            Strategy::ParameterServer { .. } => "parameter-server",
            Strategy::LocalSgd { .. } => "local-sgd",
        }
    }

    /// Whether the job needs a parameter server.
    pub fn uses_parameter_server(self) -> bool {
        matches!(self, Strategy::Hierarchical | Strategy::ParameterServer { .. })
    }
}

/// Compute backends a worker can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// The fastest backend this build can drive on the worker's machine.
    Auto,
    /// burn's pure-Rust CPU backend.
    Flex,
    /// burn's ndarray CPU backend (slower; a second, unlike CPU backend).
    Ndarray,
    /// NVIDIA GPUs through burn's CUDA backend (builds with `--features cuda`).
    Cuda,
    /// AMD GPUs through burn's ROCm backend (builds with `--features rocm`).
    Rocm,
    /// Vulkan GPUs through burn's wgpu backend (builds with `--features vulkan`).
    Vulkan,
    /// PyTorch's kernels on the CPU through burn's LibTorch backend (builds with
    /// `--features libtorch`).
    Libtorch,
    /// NVIDIA GPUs through PyTorch's kernels (builds with `--features libtorch`
    /// against a CUDA build of libtorch).
    LibtorchCuda,
}

impl Backend {
    /// The name used in specs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Flex => "flex",
            Backend::Ndarray => "ndarray",
            Backend::Cuda => "cuda",
            Backend::Rocm => "rocm",
            Backend::Vulkan => "vulkan",
            Backend::Libtorch => "libtorch",
            Backend::LibtorchCuda => "libtorch-cuda",
        }
    }

    /// The cargo feature of `hetero-cli` that builds this backend in, if it is optional.
    pub fn cargo_feature(self) -> Option<&'static str> {
        match self {
            Backend::Auto | Backend::Flex | Backend::Ndarray => None,
            Backend::Cuda => Some("cuda"),
            Backend::Rocm => Some("rocm"),
            Backend::Vulkan => Some("vulkan"),
            Backend::Libtorch | Backend::LibtorchCuda => Some("libtorch"),
        }
    }

    /// Every backend name a spec may use.
    pub const ALL: [Backend; 8] = [
        Backend::Auto,
        Backend::Flex,
        Backend::Ndarray,
        Backend::Cuda,
        Backend::Rocm,
        Backend::Vulkan,
        Backend::Libtorch,
        Backend::LibtorchCuda,
    ];

    /// Whether this backend computes on a GPU (one worker per device).
    pub fn is_gpu(self) -> bool {
        matches!(
            self,
            Backend::Cuda | Backend::Rocm | Backend::Vulkan | Backend::LibtorchCuda
        )
    }

    /// Every backend name, comma-separated, for error messages.
    pub fn names() -> String {
        Backend::ALL.map(Backend::name).join(", ")
    }

    /// Parses a backend name.
    pub fn from_name(name: &str) -> Option<Backend> {
        Backend::ALL.into_iter().find(|b| b.name() == name)
    }
}

/// Cluster shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterSpec {
    /// Number of worker processes.
    pub workers: usize,
    /// Backend for every worker.
    pub backend: Backend,
    /// Compute threads per worker (0 = share the machine's cores evenly).
    pub threads_per_worker: usize,
    /// Device kind every worker needs (a resource group of this kind).
    #[serde(default = "default_device")]
    pub device: String,
    /// Memory each worker needs on its device, in MiB (0 = no requirement).
    #[serde(default)]
    pub memory_per_worker_mb: u64,
}

fn default_device() -> String {
    "cpu".into()
}

/// How the scheduler spreads a job's workers over resource groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Spread evenly over every group that has the resource.
    #[default]
    Uniform,
    /// Fill the groups with the most free resources first.
    ResourceState,
}

/// Queue order and dependencies.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SchedulingSpec {
    /// Higher starts first (ties: submission order).
    pub priority: i64,
    /// Jobs that must succeed before this one starts.
    pub after: Vec<String>,
    /// Placement policy.
    pub policy: Policy,
}

/// A user's own training program.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Path of the program (resolved against the spec file's folder).
    pub program: PathBuf,
    /// Free-form parameters handed to the program as JSON.
    pub params: serde_json::Value,
}

const TOP: &[&str] = &[
    "name",
    "inference",
    "model",
    "dataset",
    "training",
    "cluster",
    "output",
    "task",
    "scheduling",
    "preprocess",
];
const MODEL: &[&str] = &["kind", "d_model", "layers", "heads", "decouple", "teacher"];
const DATASET: &[&str] = &[
    "kind",
    "path",
    "train_limit",
    "test_limit",
    "split",
    "exchange_fraction",
    "rebalance",
    "label_column",
    "train_file",
    "test_file",
    "image_shape",
    "tokenizer",
    "context",
    "test_fraction",
];
const PREPROCESS: &[&str] = &["resize", "normalize", "crop_padding", "horizontal_flip", "noise_std"];
/// Dataset formats a spec may name.
pub const DATASET_KINDS: [&str; 5] = ["fashion-mnist", "idx", "csv", "image-folder", "text"];
const TRAINING: &[&str] = &[
    "epochs",
    "global_batch_size",
    "optimizer",
    "learning_rate",
    "loss",
    "seed",
    "strategy",
    "sync_every",
    "staleness",
    "checkpoint_every",
    "resume_from",
    "stall_after_secs",
    "overlap",
    "exchange_precision",
];
const CLUSTER: &[&str] = &[
    "workers",
    "backend",
    "threads_per_worker",
    "device",
    "memory_per_worker_mb",
];
const SCHEDULING: &[&str] = &["priority", "after", "policy"];
const OUTPUT: &[&str] = &["dir"];
const INFERENCE: &[&str] = &["model", "placement", "listen", "api_key_file"];
const TASK: &[&str] = &["program", "params"];

/// Most workers one job may ask for.
pub const MAX_WORKERS: usize = 256;

impl JobSpec {
    /// Parses and validates a spec; relative paths stay as written.
    pub fn parse(text: &str) -> Result<JobSpec, SpecError> {
        let root: Table = text
            .parse()
            .map_err(|e: toml::de::Error| SpecError::Syntax(e.to_string()))?;
        let top = Section::new("", &root, TOP)?;
        let name = top.string("name")?.unwrap_or_else(|| "job".into());
        if name.is_empty() || name.len() > 100 || name.chars().any(|c| c.is_control()) {
            return Err(top.invalid("name", &name, "a name is 1 to 100 printable characters"));
        }
        if root.contains_key("inference") {
            return Self::parse_inference(&top, &root);
        }

        let model = top.section("model", MODEL)?;
        let model_kind = match model.string("kind")?.as_deref() {
            Some("cnn") | None => ModelKind::Cnn,
            Some("mlp") => ModelKind::Mlp,
            Some("transformer") => ModelKind::Transformer,
            Some("custom") => ModelKind::Custom,
            Some("distill") => ModelKind::Distill,
            Some(other) => {
                return Err(model.invalid("kind", other, "one of: cnn, mlp, transformer, custom, distill"));
            }
        };
        let only_with = |keys: &[&str], kind: &str| -> Result<(), SpecError> {
            match keys.iter().find(|k| model.table.contains_key(**k)) {
                Some(k) => Err(model.invalid(k, "…", &format!("this key is only read with model.kind = {kind}"))),
                None => Ok(()),
            }
        };
        let (transformer, distill) = match model_kind {
            ModelKind::Transformer => {
                only_with(&["teacher"], "\"distill\"")?;
                (Some(crate::transformer::parse(&model)?), None)
            }
            ModelKind::Distill => {
                only_with(&["d_model", "layers", "heads"], "\"transformer\"")?;
                (None, Some(crate::transformer::parse_distill(&model)?))
            }
            _ => {
                only_with(TRANSFORMER_KEYS, "\"transformer\"")?;
                only_with(DISTILL_KEYS, "\"distill\"")?;
                (None, None)
            }
        };

        let ds = top.section("dataset", DATASET)?;
        let kind = ds.string("kind")?.unwrap_or_else(|| "fashion-mnist".into());
        if !DATASET_KINDS.contains(&kind.as_str()) {
            return Err(ds.invalid("kind", &kind, &format!("one of: {}", DATASET_KINDS.join(", "))));
        }
        let path = ds
            .string("path")?
            .ok_or_else(|| ds.missing("path", "folder with the dataset's files"))?;
        let csv_only = ["label_column", "train_file", "test_file", "image_shape"];
        if kind != "csv"
            && let Some(k) = csv_only.iter().find(|k| ds.table.contains_key(**k))
        {
            return Err(ds.invalid(k, "…", "this key is only read with dataset.kind = \"csv\""));
        }
        let text_only = ["tokenizer", "context", "test_fraction"];
        if kind != "text"
            && let Some(k) = text_only.iter().find(|k| ds.table.contains_key(**k))
        {
            return Err(ds.invalid(k, "…", "this key is only read with dataset.kind = \"text\""));
        }
        match (model_kind, kind == "text") {
            (ModelKind::Transformer, false) => {
                return Err(model.invalid(
                    "kind",
                    "transformer",
                    "a language model: it needs dataset.kind = \"text\"",
                ));
            }
            (ModelKind::Distill, false) => {
                return Err(model.invalid(
                    "kind",
                    "distill",
                    "distillation reads sentences: it needs dataset.kind = \"text\"",
                ));
            }
            (ModelKind::Cnn | ModelKind::Mlp, true) => {
                return Err(model.invalid(
                    "kind",
                    if model_kind == ModelKind::Cnn { "cnn" } else { "mlp" },
                    "an image model; a text dataset needs model.kind = \"transformer\" (or custom)",
                ));
            }
            _ => {}
        }
        let test_fraction = ds.float("test_fraction")?.unwrap_or(0.1);
        if !(0.0..0.9).contains(&test_fraction) {
            return Err(ds.invalid("test_fraction", &test_fraction.to_string(), "a number from 0 to 0.9"));
        }
        let split = match ds.string("split")?.as_deref() {
            Some("even") | None => SplitKind::Even,
            Some("weighted") => SplitKind::Weighted,
            Some(other) => return Err(ds.invalid("split", other, "one of: even, weighted")),
        };
        let exchange_fraction = ds.float("exchange_fraction")?.unwrap_or(0.0);
        if !(0.0..=0.5).contains(&exchange_fraction) {
            return Err(ds.invalid(
                "exchange_fraction",
                &exchange_fraction.to_string(),
                "a number from 0 to 0.5",
            ));
        }
        let dataset = DatasetSpec {
            kind,
            path: PathBuf::from(path),
            train_limit: ds.int("train_limit", 0, usize::MAX)?.unwrap_or(0),
            test_limit: ds.int("test_limit", 0, usize::MAX)?.unwrap_or(0),
            split,
            exchange_fraction,
            rebalance: ds.bool("rebalance")?.unwrap_or(split == SplitKind::Weighted),
            label_column: ds.string("label_column")?.unwrap_or_else(label),
            train_file: ds.string("train_file")?,
            test_file: ds.string("test_file")?,
            image_shape: ds.shape("image_shape")?,
            tokenizer: ds.string("tokenizer")?.unwrap_or_else(byte),
            context: ds.int("context", 2, 4096)?.unwrap_or(64),
            test_fraction,
        };

        let pp = top.section("preprocess", PREPROCESS)?;
        let normalize = match pp.table.get("normalize") {
            None => NormalizeSpec::Dataset,
            Some(Value::String(s)) if s == "dataset" => NormalizeSpec::Dataset,
            Some(Value::String(s)) if s == "none" => NormalizeSpec::None,
            Some(Value::Array(a)) => match a.as_slice() {
                [m, s] => match (m.as_float().or(m.as_integer().map(|i| i as f64)), s.as_float()) {
                    (Some(mean), Some(std)) if std > 0.0 && mean.is_finite() => NormalizeSpec::Fixed { mean, std },
                    _ => return Err(pp.invalid("normalize", "…", "[mean, std] with std > 0")),
                },
                _ => return Err(pp.invalid("normalize", "…", "[mean, std] with std > 0")),
            },
            Some(Value::String(s)) => {
                return Err(pp.invalid("normalize", s, "\"dataset\", \"none\" or [mean, std]"));
            }
            Some(v) => return Err(pp.wrong_type("normalize", "\"dataset\", \"none\" or [mean, std]", v)),
        };
        let noise_std = pp.float("noise_std")?.unwrap_or(0.0);
        if !(0.0..=10.0).contains(&noise_std) {
            return Err(pp.invalid("noise_std", &noise_std.to_string(), "a number from 0 to 10"));
        }
        let preprocess = PreprocessSpec {
            resize: pp.shape("resize")?,
            normalize,
            crop_padding: pp.int("crop_padding", 0, 64)?.unwrap_or(0),
            horizontal_flip: pp.bool("horizontal_flip")?.unwrap_or(false),
            noise_std,
        };

        let tr = top.section("training", TRAINING)?;
        let optimizer = match tr.string("optimizer")?.as_deref() {
            Some("adam") | None => Optimizer::Adam,
            Some("sgd") => Optimizer::Sgd,
            Some(other) => return Err(tr.invalid("optimizer", other, "one of: adam, sgd")),
        };
        if let Some(loss) = tr.string("loss")?
            && loss != "cross-entropy"
        {
            return Err(tr.invalid("loss", &loss, "one of: cross-entropy"));
        }
        let learning_rate = tr.float("learning_rate")?.unwrap_or(1e-3);
        if !(learning_rate.is_finite() && learning_rate > 0.0 && learning_rate <= 10.0) {
            return Err(tr.invalid("learning_rate", &learning_rate.to_string(), "a number in (0, 10]"));
        }
        let sync_every = tr.int("sync_every", 1, 1_000_000)?;
        let staleness = tr.int("staleness", 0, 1000)?;
        let strategy_name = tr.string("strategy")?;
        let strategy = match Strategy::from_spec(strategy_name.as_deref().unwrap_or("allreduce"), sync_every, staleness)
        {
            Some(s) => s,
            None => {
                return Err(tr.invalid(
                    "strategy",
                    strategy_name.as_deref().unwrap_or_default(),
                    &format!("one of: {}", Strategy::NAMES),
                ));
            }
        };
        if sync_every.is_some() && !matches!(strategy, Strategy::LocalSgd { .. }) {
            return Err(tr.invalid(
                "sync_every",
                "…",
                "sync_every is only read with strategy = \"local-sgd\"",
            ));
        }
        if staleness.is_some() && !matches!(strategy, Strategy::ParameterServer { .. }) {
            return Err(tr.invalid(
                "staleness",
                "…",
                "staleness is only read with strategy = \"parameter-server\"",
            ));
        }
        let exchange_precision = match tr.string("exchange_precision")? {
            None => ExchangePrecision::F32,
            Some(name) => ExchangePrecision::from_name(&name).ok_or_else(|| {
                tr.invalid(
                    "exchange_precision",
                    &name,
                    &format!("one of: {}", ExchangePrecision::NAMES),
                )
            })?,
        };
        if exchange_precision != ExchangePrecision::F32 && strategy.uses_parameter_server() {
            return Err(tr.invalid(
                "exchange_precision",
                "bf16",
                "only allreduce and local-sgd exchange at another precision; a parameter server's exchange is f32",
            ));
        }
        let training = TrainingSpec {
            strategy,
            exchange_precision,
            checkpoint_every: tr.int("checkpoint_every", 0, 100_000)?.unwrap_or(1),
            resume_from: tr.string("resume_from")?.map(PathBuf::from),
            stall_after_secs: tr
                .int("stall_after_secs", 0, 7 * 24 * 3600)?
                .map_or(five_minutes(), |s| s as u64),
            overlap: tr.bool("overlap")?.unwrap_or(true),
            epochs: tr.int("epochs", 1, 100_000)?.unwrap_or(1),
            global_batch_size: tr.int("global_batch_size", 1, 1 << 20)?.unwrap_or(128),
            optimizer,
            learning_rate,
            seed: tr.int("seed", 0, usize::MAX)?.unwrap_or(42) as u64,
        };

        let cl = top.section("cluster", CLUSTER)?;
        let backend = match cl.string("backend")? {
            None => Backend::Auto,
            Some(name) => Backend::from_name(&name)
                .ok_or_else(|| cl.invalid("backend", &name, &format!("one of: {}", Backend::names())))?,
        };
        let cluster = ClusterSpec {
            workers: cl.int("workers", 1, MAX_WORKERS)?.unwrap_or(1),
            backend,
            threads_per_worker: cl.int("threads_per_worker", 0, 1024)?.unwrap_or(0),
            device: cl.string("device")?.unwrap_or_else(default_device),
            memory_per_worker_mb: cl.int("memory_per_worker_mb", 0, 1 << 30)?.unwrap_or(0) as u64,
        };
        if cluster.device.is_empty()
            || !cluster
                .device
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(cl.invalid(
                "device",
                &cluster.device,
                "a device kind such as cpu, cuda, vulkan, npu (letters, digits, - and _)",
            ));
        }
        if training.global_batch_size < cluster.workers {
            return Err(tr.invalid(
                "global_batch_size",
                &training.global_batch_size.to_string(),
                &format!(
                    "it must be at least cluster.workers ({}) so every worker gets a sample",
                    cluster.workers
                ),
            ));
        }

        let sc = top.section("scheduling", SCHEDULING)?;
        let policy = match sc.string("policy")?.as_deref() {
            Some("uniform") | None => Policy::Uniform,
            Some("resource-state") => Policy::ResourceState,
            Some(other) => return Err(sc.invalid("policy", other, "one of: uniform, resource-state")),
        };
        let priority = match sc.table.get("priority") {
            None => 0,
            Some(Value::Integer(i)) if (-1000..=1000).contains(i) => *i,
            Some(Value::Integer(i)) => {
                return Err(SpecError::InvalidValue {
                    key: "scheduling.priority".into(),
                    value: i.to_string(),
                    allowed: "an integer from -1000 to 1000".into(),
                });
            }
            Some(v) => return Err(sc.wrong_type("priority", "an integer", v)),
        };
        let after = match sc.table.get("after") {
            None => vec![],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) if !s.is_empty() => Ok(s.clone()),
                    other => Err(sc.wrong_type("after", "an array of job ids", other)),
                })
                .collect::<Result<_, _>>()?,
            Some(v) => return Err(sc.wrong_type("after", "an array of job ids", v)),
        };
        let scheduling = SchedulingSpec {
            priority,
            after,
            policy,
        };

        let out = top.section("output", OUTPUT)?;
        let output_dir = PathBuf::from(out.string("dir")?.unwrap_or_else(|| "runs".into()));

        let task = match (model_kind, root.contains_key("task")) {
            (ModelKind::Custom, true) => {
                let t = top.section("task", TASK)?;
                let program = t
                    .string("program")?
                    .ok_or_else(|| t.missing("program", "path of your training program"))?;
                let params = match t.table.get("params") {
                    None => serde_json::Value::Object(Default::default()),
                    Some(Value::Table(p)) => {
                        serde_json::to_value(p).map_err(|e| t.invalid("params", "…", &e.to_string()))?
                    }
                    Some(v) => return Err(t.wrong_type("params", "a table", v)),
                };
                Some(TaskSpec {
                    program: PathBuf::from(program),
                    params,
                })
            }
            (ModelKind::Custom, false) => {
                return Err(SpecError::Missing {
                    key: "task.program".into(),
                    what: "model.kind = \"custom\" needs the program that holds your training code".into(),
                });
            }
            (_, true) => {
                return Err(SpecError::InvalidValue {
                    key: "task".into(),
                    value: "[task]".into(),
                    allowed: "a [task] section is only read when model.kind = \"custom\"".into(),
                });
            }
            (_, false) => None,
        };

        Ok(JobSpec {
            name,
            model: model_kind,
            transformer,
            distill,
            dataset,
            training,
            cluster,
            output_dir,
            scheduling,
            task,
            preprocess,
            inference: None,
        })
    }

    /// An inference job: `[inference]` with `[cluster]`, `[scheduling]` and
    /// `[output]`, which are checked as for training (the training sections have no
    /// place in it).
    fn parse_inference(top: &Section, root: &Table) -> Result<JobSpec, SpecError> {
        for k in ["model", "dataset", "training", "preprocess", "task"] {
            if root.contains_key(k) {
                return Err(SpecError::InvalidValue {
                    key: k.into(),
                    value: format!("[{k}]"),
                    allowed: "an inference job ([inference]) has no training sections".into(),
                });
            }
        }
        let inf = top.section("inference", INFERENCE)?;
        let model = inf.string("model")?.filter(|m| !m.is_empty()).ok_or_else(|| {
            inf.missing(
                "model",
                "the model to serve: minilm, smollm2, a .gguf file or a BERT folder",
            )
        })?;
        let listen = inf.string("listen")?.unwrap_or_else(|| "127.0.0.1:8000".into());
        if listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(inf.invalid("listen", &listen, "an address such as 0.0.0.0:8000"));
        }
        // Read by rank 0 on its own node, so relative to nothing the submitter knows.
        let api_key_file = inf.string("api_key_file")?;
        if let Some(p) = &api_key_file
            && !std::path::Path::new(p).is_absolute()
        {
            return Err(inf.invalid("api_key_file", p, "an absolute path on rank 0's node"));
        }
        let inference = InferenceSpec {
            model,
            placement: inf.string("placement")?.unwrap_or_else(|| "single".into()),
            listen,
            api_key_file,
        };
        // The rest is checked by the training parser, with placeholder training
        // sections that no inference worker reads.
        let mut rest = root.clone();
        rest.remove("inference");
        let mut dataset = Table::new();
        dataset.insert("path".into(), Value::String(".".into()));
        rest.insert("dataset".into(), Value::Table(dataset));
        let mut training = Table::new();
        training.insert("global_batch_size".into(), Value::Integer(MAX_WORKERS as i64));
        rest.insert("training".into(), Value::Table(training));
        let text = toml::to_string(&rest).map_err(|e| SpecError::Syntax(e.to_string()))?;
        let mut spec = JobSpec::parse(&text)?;
        spec.inference = Some(inference);
        Ok(spec)
    }

    /// Reads and parses a spec file; relative paths are resolved against its folder.
    pub fn load(path: &Path) -> Result<JobSpec, SpecError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SpecError::Syntax(format!("cannot read {}: {e}", path.display())))?;
        let mut spec = JobSpec::parse(&text)?;
        spec.resolve_paths(&JobSpec::folder_of(path));
        Ok(spec)
    }

    /// The folder a spec file's relative paths start from, made absolute: its
    /// parent, or the current folder for a bare file name (`spec.toml`).
    pub fn folder_of(path: &Path) -> PathBuf {
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::path::absolute(parent).unwrap_or_else(|_| parent.to_path_buf())
    }

    /// Makes relative paths absolute against `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = normalize(&base.join(&*p));
            }
        };
        resolve(&mut self.dataset.path);
        resolve(&mut self.output_dir);
        if let Some(inf) = &mut self.inference {
            // A model or placement named by a path (not a known name) is a file.
            for p in [&mut inf.model, &mut inf.placement] {
                let path = Path::new(p.as_str());
                if path.is_relative() && (p.contains('/') || p.ends_with(".gguf") || p.ends_with(".toml")) {
                    *p = normalize(&base.join(path)).display().to_string();
                }
            }
        }
        if let Some(r) = &mut self.training.resume_from {
            resolve(r);
        }
        if !matches!(self.dataset.tokenizer.as_str(), "byte" | "char") {
            let mut t = PathBuf::from(&self.dataset.tokenizer);
            resolve(&mut t);
            self.dataset.tokenizer = t.display().to_string();
        }
        if let Some(task) = &mut self.task {
            resolve(&mut task.program);
        }
    }

    /// The spec as JSON, the form it travels in between processes.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a spec always serialises")
    }

    /// Reads the JSON form written by [`JobSpec::to_json`].
    pub fn from_json(text: &str) -> Result<JobSpec, SpecError> {
        serde_json::from_str(text).map_err(|e| SpecError::Syntax(format!("spec JSON: {e}")))
    }
}

/// Removes `.` and `dir/..` pairs without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "fmnist"
[model]
kind = "cnn"
[dataset]
path = "data/fashion-mnist"
train_limit = 3000
[training]
epochs = 2
global_batch_size = 96
optimizer = "adam"
learning_rate = 0.001
[cluster]
workers = 3
"#;

    fn with(extra: &str) -> Result<JobSpec, SpecError> {
        JobSpec::parse(&format!("{GOOD}\n{extra}"))
    }

    fn edit(from: &str, to: &str) -> Result<JobSpec, SpecError> {
        assert!(GOOD.contains(from));
        JobSpec::parse(&GOOD.replace(from, to))
    }

    #[test]
    fn good_spec_parses_with_defaults() {
        let s = JobSpec::parse(GOOD).unwrap();
        assert_eq!(s.cluster.workers, 3);
        assert_eq!(s.training.global_batch_size, 96);
        assert_eq!(s.model, ModelKind::Cnn);
        assert_eq!(s.cluster.backend, Backend::Auto);
        assert_eq!(s.training.seed, 42);
        assert_eq!(s.output_dir, PathBuf::from("runs"));
        assert_eq!(JobSpec::from_json(&s.to_json()).unwrap(), s);
    }

    #[test]
    fn an_inference_job_has_its_own_section_and_no_training_ones() {
        let s = JobSpec::parse(
            "name = \"serve\"\n[inference]\nmodel = \"smollm2\"\nplacement = \"pipeline\"\n\
             listen = \"0.0.0.0:8000\"\n[cluster]\nworkers = 3\n",
        )
        .unwrap();
        let inf = s.inference.as_ref().unwrap();
        assert_eq!((inf.model.as_str(), inf.placement.as_str()), ("smollm2", "pipeline"));
        assert_eq!(s.cluster.workers, 3);
        assert_eq!(JobSpec::from_json(&s.to_json()).unwrap(), s);
        let with_training = JobSpec::parse("[inference]\nmodel = \"minilm\"\n[training]\nepochs = 2\n").unwrap_err();
        assert!(
            with_training.to_string().contains("no training sections"),
            "{with_training}"
        );
        let no_model = JobSpec::parse("[inference]\nplacement = \"single\"\n").unwrap_err();
        assert!(no_model.to_string().contains("inference.model"), "{no_model}");
        let bad = JobSpec::parse("[inference]\nmodel = \"minilm\"\nlisten = \"here\"\n").unwrap_err();
        assert!(bad.to_string().contains("inference.listen"), "{bad}");
        let typo = JobSpec::parse("[inference]\nmodel = \"minilm\"\nplacment = \"pipeline\"\n").unwrap_err();
        assert!(typo.to_string().contains("placment"), "{typo}");
        let keyed = JobSpec::parse("[inference]\nmodel = \"minilm\"\napi_key_file = \"/etc/hetero/key\"\n").unwrap();
        assert_eq!(
            keyed.inference.unwrap().api_key_file.as_deref(),
            Some("/etc/hetero/key")
        );
        let relative = JobSpec::parse("[inference]\nmodel = \"minilm\"\napi_key_file = \"key\"\n").unwrap_err();
        assert!(relative.to_string().contains("inference.api_key_file"), "{relative}");
    }

    #[test]
    fn a_bare_file_name_resolves_against_the_current_folder() {
        let here = std::env::current_dir().unwrap();
        assert_eq!(JobSpec::folder_of(Path::new("spec.toml")), here);
        assert_eq!(JobSpec::folder_of(Path::new("examples/a.toml")), here.join("examples"));
        assert_eq!(JobSpec::folder_of(Path::new("/jobs/a.toml")), PathBuf::from("/jobs"));
    }

    #[test]
    fn backend_names_round_trip() {
        for b in Backend::ALL {
            assert_eq!(Backend::from_name(b.name()), Some(b));
        }
        assert_eq!(Backend::from_name("tpu"), None);
        assert_eq!(
            edit("workers = 3", "workers = 3\nbackend = \"cuda\"")
                .unwrap()
                .cluster
                .backend,
            Backend::Cuda
        );
    }

    #[test]
    fn syntax_error() {
        assert!(matches!(JobSpec::parse("name = "), Err(SpecError::Syntax(_))));
    }

    #[test]
    fn unknown_key_names_key_and_alternatives() {
        let err = edit("epochs = 2", "epoch = 2").unwrap_err();
        assert!(
            matches!(&err, SpecError::UnknownKey { key, allowed } if key == "training.epoch" && allowed.contains(&"epochs".to_string()))
        );
        assert!(err.to_string().contains("training.epoch"));
        let err = with("[extra]\nx = 1").unwrap_err();
        assert!(matches!(err, SpecError::UnknownKey { key, .. } if key == "extra"));
    }

    #[test]
    fn wrong_type() {
        let err = edit("workers = 3", "workers = \"three\"").unwrap_err();
        assert_eq!(
            err,
            SpecError::WrongType {
                key: "cluster.workers".into(),
                expected: "an integer".into(),
                found: "the string \"three\"".into()
            }
        );
    }

    #[test]
    fn out_of_range_values() {
        let err = edit("workers = 3", "workers = 0").unwrap_err();
        assert!(matches!(&err, SpecError::InvalidValue { key, value, .. } if key == "cluster.workers" && value == "0"));
        let err = edit("epochs = 2", "epochs = -1").unwrap_err();
        assert!(matches!(err, SpecError::InvalidValue { key, .. } if key == "training.epochs"));
        let err = edit("learning_rate = 0.001", "learning_rate = -0.1").unwrap_err();
        assert!(matches!(err, SpecError::InvalidValue { key, .. } if key == "training.learning_rate"));
        let err = edit("global_batch_size = 96", "global_batch_size = 2").unwrap_err();
        assert!(err.to_string().contains("at least cluster.workers (3)"), "{err}");
    }

    #[test]
    fn unknown_enum_values_list_the_choices() {
        let err = edit("kind = \"cnn\"", "kind = \"resnet\"").unwrap_err();
        assert_eq!(
            err.to_string(),
            "`model.kind` = \"resnet\" is not allowed; one of: cnn, mlp, transformer, custom, distill"
        );
        let err = edit("optimizer = \"adam\"", "optimizer = \"lion\"").unwrap_err();
        assert!(matches!(err, SpecError::InvalidValue { key, .. } if key == "training.optimizer"));
        let err = with("[output]\ndir = 3").unwrap_err();
        assert!(matches!(err, SpecError::WrongType { key, .. } if key == "output.dir"));
    }

    #[test]
    fn scheduling_and_requirements() {
        let s = with("[scheduling]\npriority = 5\nafter = [\"job-000001\"]\npolicy = \"resource-state\"").unwrap();
        assert_eq!(s.scheduling.priority, 5);
        assert_eq!(s.dataset.split, SplitKind::Even);
        let w = edit("train_limit = 3000", "train_limit = 3000\nsplit = \"weighted\"").unwrap();
        assert_eq!(w.dataset.split, SplitKind::Weighted);
        let err = edit("train_limit = 3000", "train_limit = 3000\nsplit = \"random\"").unwrap_err();
        assert!(matches!(err, SpecError::InvalidValue { key, .. } if key == "dataset.split"));
        assert_eq!(s.scheduling.after, vec!["job-000001".to_string()]);
        assert_eq!(s.scheduling.policy, Policy::ResourceState);
        assert_eq!(s.cluster.device, "cpu");
        let err = with("[scheduling]\npolicy = \"random\"").unwrap_err();
        assert!(matches!(err, SpecError::InvalidValue { key, .. } if key == "scheduling.policy"));
        let err = with("[scheduling]\nafter = \"job-1\"").unwrap_err();
        assert!(matches!(err, SpecError::WrongType { key, .. } if key == "scheduling.after"));
        let err = with("[scheduling]\npriority = 99999").unwrap_err();
        assert!(matches!(err, SpecError::InvalidValue { key, .. } if key == "scheduling.priority"));
        let err = edit("workers = 3", "workers = 3\ndevice = \"g p u\"").unwrap_err();
        assert!(matches!(err, SpecError::InvalidValue { key, .. } if key == "cluster.device"));
    }

    #[test]
    fn missing_dataset_path() {
        let err = edit("path = \"data/fashion-mnist\"", "").unwrap_err();
        assert!(matches!(err, SpecError::Missing { key, .. } if key == "dataset.path"));
    }

    #[test]
    fn custom_task_needs_a_program_and_task_needs_custom() {
        let err = edit("kind = \"cnn\"", "kind = \"custom\"").unwrap_err();
        assert!(matches!(err, SpecError::Missing { key, .. } if key == "task.program"));
        let err = with("[task]\nprogram = \"x\"").unwrap_err();
        assert!(matches!(err, SpecError::InvalidValue { key, .. } if key == "task"));
        let s = JobSpec::parse(&format!(
            "{}\n[task]\nprogram = \"bin/mine\"\nparams = {{ hidden = 64 }}",
            GOOD.replace("kind = \"cnn\"", "kind = \"custom\"")
        ))
        .unwrap();
        let task = s.task.unwrap();
        assert_eq!(task.params["hidden"], 64);
    }

    #[test]
    fn relative_paths_resolve_against_the_spec_folder() {
        let mut s = JobSpec::parse(GOOD).unwrap();
        s.resolve_paths(Path::new("/specs/examples"));
        assert_eq!(s.dataset.path, PathBuf::from("/specs/examples/data/fashion-mnist"));
        let mut s = JobSpec::parse(&GOOD.replace("data/fashion-mnist", "../data/./x")).unwrap();
        s.resolve_paths(Path::new("/specs/examples"));
        assert_eq!(s.dataset.path, PathBuf::from("/specs/data/x"));
        assert_eq!(s.output_dir, PathBuf::from("/specs/examples/runs"));
    }

    #[test]
    fn strategies_and_their_knobs() {
        let s = edit("epochs = 2", "epochs = 2\nstrategy = \"local-sgd\"\nsync_every = 4").unwrap();
        assert_eq!(s.training.strategy, Strategy::LocalSgd { sync_every: 4 });
        let s = edit(
            "epochs = 2",
            "epochs = 2\nstrategy = \"parameter-server\"\nstaleness = 2",
        )
        .unwrap();
        assert_eq!(s.training.strategy, Strategy::ParameterServer { staleness: 2 });
        assert!(s.training.strategy.uses_parameter_server());
        let s = edit("epochs = 2", "epochs = 2\nstrategy = \"hierarchical\"").unwrap();
        assert_eq!(s.training.strategy, Strategy::Hierarchical);
        assert_eq!(JobSpec::parse(GOOD).unwrap().training.strategy, Strategy::Allreduce);
        let err = edit("epochs = 2", "epochs = 2\nstrategy = \"gossip\"").unwrap_err();
        assert!(matches!(err, SpecError::InvalidValue { key, .. } if key == "training.strategy"));
        let err = edit("epochs = 2", "epochs = 2\nsync_every = 4").unwrap_err();
        assert!(err.to_string().contains("local-sgd"), "{err}");
        let s = JobSpec::from_json(&s.to_json()).unwrap();
        assert_eq!(s.training.strategy, Strategy::Hierarchical);
    }

    #[test]
    fn exchange_precision_is_f32_unless_bf16_is_asked_where_it_applies() {
        assert_eq!(
            JobSpec::parse(GOOD).unwrap().training.exchange_precision,
            ExchangePrecision::F32
        );
        let s = edit("epochs = 2", "epochs = 2\nexchange_precision = \"bf16\"").unwrap();
        assert_eq!(s.training.exchange_precision, ExchangePrecision::Bf16);
        let back = JobSpec::from_json(&s.to_json()).unwrap();
        assert_eq!(back.training.exchange_precision, ExchangePrecision::Bf16);
        let err = edit("epochs = 2", "epochs = 2\nexchange_precision = \"fp8\"").unwrap_err();
        assert!(err.to_string().contains("one of: f32, bf16"), "{err}");
        let err = edit(
            "epochs = 2",
            "epochs = 2\nexchange_precision = \"bf16\"\nstrategy = \"parameter-server\"",
        )
        .unwrap_err();
        assert!(err.to_string().contains("parameter server's exchange is f32"), "{err}");
    }

    #[test]
    fn overlap_is_on_unless_turned_off() {
        assert!(JobSpec::parse(GOOD).unwrap().training.overlap);
        let s = edit("epochs = 2", "epochs = 2\noverlap = false").unwrap();
        assert!(!s.training.overlap);
        assert!(!JobSpec::from_json(&s.to_json()).unwrap().training.overlap);
        let err = edit("epochs = 2", "epochs = 2\noverlap = 1").unwrap_err();
        assert!(matches!(err, SpecError::WrongType { key, .. } if key == "training.overlap"));
    }

    #[test]
    fn exchange_and_rebalance() {
        let s = JobSpec::parse(GOOD).unwrap();
        assert_eq!((s.dataset.exchange_fraction, s.dataset.rebalance), (0.0, false));
        let s = edit("[dataset]", "[dataset]\nsplit = \"weighted\"\nexchange_fraction = 0.1").unwrap();
        assert_eq!((s.dataset.exchange_fraction, s.dataset.rebalance), (0.1, true));
        let err = edit("[dataset]", "[dataset]\nexchange_fraction = 0.9").unwrap_err();
        assert!(matches!(err, SpecError::InvalidValue { key, .. } if key == "dataset.exchange_fraction"));
        let err = edit("[dataset]", "[dataset]\nrebalance = \"yes\"").unwrap_err();
        assert!(matches!(err, SpecError::WrongType { key, .. } if key == "dataset.rebalance"));
    }

    #[test]
    fn datasets_and_preprocessing() {
        let s = edit(
            "[dataset]",
            "[dataset]\nkind = \"csv\"\nlabel_column = \"y\"\nimage_shape = [28, 28]",
        )
        .unwrap();
        assert_eq!((s.dataset.kind.as_str(), s.dataset.label_column.as_str()), ("csv", "y"));
        assert_eq!(s.dataset.image_shape, Some((28, 28)));
        let err = edit("[dataset]", "[dataset]\nlabel_column = \"y\"").unwrap_err();
        assert!(
            err.to_string().contains("only read with dataset.kind = \"csv\""),
            "{err}"
        );
        let err = edit("[dataset]", "[dataset]\nkind = \"parquet\"").unwrap_err();
        assert!(err.to_string().contains("image-folder"), "{err}");

        let s = with("[preprocess]\nresize = [32, 32]\nnormalize = [0.5, 0.25]\ncrop_padding = 2\nhorizontal_flip = true\nnoise_std = 0.1").unwrap();
        assert_eq!(s.preprocess.resize, Some((32, 32)));
        assert_eq!(s.preprocess.normalize, NormalizeSpec::Fixed { mean: 0.5, std: 0.25 });
        assert_eq!((s.preprocess.crop_padding, s.preprocess.horizontal_flip), (2, true));
        assert_eq!(JobSpec::from_json(&s.to_json()).unwrap(), s);
        assert_eq!(JobSpec::parse(GOOD).unwrap().preprocess, PreprocessSpec::default());
        for (bad, key) in [
            ("resize = [0, 28]", "preprocess.resize"),
            ("resize = 28", "preprocess.resize"),
            ("normalize = \"zscore\"", "preprocess.normalize"),
            ("normalize = [0.5, 0]", "preprocess.normalize"),
            ("noise_std = -1", "preprocess.noise_std"),
            ("crop = 2", "preprocess.crop"),
        ] {
            let err = with(&format!("[preprocess]\n{bad}")).unwrap_err();
            assert!(err.to_string().contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn text_datasets_need_the_transformer() {
        let text = GOOD.replace("kind = \"cnn\"", "kind = \"transformer\"").replace(
            "[dataset]",
            "[dataset]\nkind = \"text\"\ncontext = 32\ntokenizer = \"char\"",
        );
        let text = text.replace("train_limit = 3000\n", "");
        let s = JobSpec::parse(&text).unwrap();
        assert_eq!(
            (s.model, s.dataset.context, s.dataset.tokenizer.as_str()),
            (ModelKind::Transformer, 32, "char")
        );
        let err = JobSpec::parse(&GOOD.replace("kind = \"cnn\"", "kind = \"transformer\"")).unwrap_err();
        assert!(err.to_string().contains("needs dataset.kind = \"text\""), "{err}");
        let err = edit("[dataset]", "[dataset]\nkind = \"text\"").unwrap_err();
        assert!(err.to_string().contains("model.kind = \"transformer\""), "{err}");
        let err = edit("[dataset]", "[dataset]\ncontext = 8").unwrap_err();
        assert!(
            err.to_string().contains("only read with dataset.kind = \"text\""),
            "{err}"
        );
        let mut s = JobSpec::parse(&text.replace("\"char\"", "\"tok/tokenizer.json\"")).unwrap();
        s.resolve_paths(Path::new("/specs"));
        assert_eq!(s.dataset.tokenizer, "/specs/tok/tokenizer.json");
    }
}
