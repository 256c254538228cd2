//! The built-in worker (`hetero worker`): the job spec names one of Hetero's own
//! models (image classifiers, the transformer language model, or a real model's
//! decoupled version distilled from it), trained on the spec's dataset.

use hetero_data::bundle_cache::{BundleCache, cache_key};
use hetero_job::{JobSpec, ModelKind, WorkerEnv};
use hetero_models::{CnnConfig, MlpConfig};
use hetero_train::image_task::{ImageFacts, ImageTask};
use hetero_train::text_task::TextTask;

use crate::{Prepared, SystemBackend, SystemDevice, WorkerError};

/// Runs the built-in task the spec in the environment names.
pub fn run() -> Result<(), WorkerError> {
    let setup = crate::WorkerSetup::from_env()?;
    match setup.spec.model {
        ModelKind::Cnn => crate::try_run_prepared(
            |ctx, _| prepare_images(&ctx.spec, |d| CnnConfig::new().init(d)),
            Some(|t: &ImageTask<SystemBackend, _>| t.facts().to_bytes()),
        ),
        ModelKind::Mlp => crate::try_run_prepared(
            |ctx, _| prepare_images(&ctx.spec, |d| MlpConfig::new().init(d)),
            Some(|t: &ImageTask<SystemBackend, _>| t.facts().to_bytes()),
        ),
        ModelKind::Transformer => crate::try_run(|ctx, _| prepare_text(&ctx.spec)),
        ModelKind::Distill => crate::distill::run(&setup.spec),
        ModelKind::Custom => Err(WorkerError::Setup(
            "model.kind = \"custom\" runs the program named in [task], not the built-in worker".into(),
        )),
    }
}

/// A text task from the corpus's files: on a host told to read no dataset, or
/// without the corpus's folder, from the files the coordinator sends when it
/// serves them (`--serve-data`). Text cannot travel between workers.
fn prepare_text(spec: &JobSpec) -> Result<TextTask, String> {
    let told = std::env::var_os(WorkerEnv::NO_LOCAL_DATA).is_some_and(|v| v == "1");
    if told || !spec.dataset.path.exists() {
        if let Some(folder) = crate::fetch_data::from_coordinator()? {
            let mut fetched = spec.clone();
            fetched.dataset.path = folder;
            return TextTask::from_spec(&fetched).map_err(|e| format!("the corpus the coordinator sent: {e}"));
        }
        if told {
            return Err(
                "this agent reads no dataset from disk, and a text corpus cannot travel between workers: \
                 serve it from the coordinator (hetero coordinator --serve-data DIR)"
                    .into(),
            );
        }
    }
    TextTask::from_spec(spec).map_err(|e| e.to_string())
}

/// An image task from the dataset's files, or — on a host told to read no
/// dataset (`--no-local-data`) or without the dataset's folder — from the
/// files the coordinator sends when it serves them (`--serve-data`), else one to
/// build from the facts a worker that read the files sends.
fn prepare_images<M>(
    spec: &JobSpec,
    init: impl Fn(&SystemDevice) -> M + Send + 'static,
) -> Result<Prepared<ImageTask<SystemBackend, M>>, String>
where
    M: burn::module::AutodiffModule<SystemBackend> + hetero_models::Classifier<SystemBackend>,
{
    let told = std::env::var_os(WorkerEnv::NO_LOCAL_DATA).is_some_and(|v| v == "1");
    let path = &spec.dataset.path;
    if !told && path.exists() {
        return ImageTask::from_spec(spec, init).map(Prepared::Ready).map_err(|e| {
            format!(
                "{e} (a host without the dataset's files can take part in an allreduce or local-sgd job: \
                 remove the folder there, or start its agent with --no-local-data)"
            )
        });
    }
    // The ring route remains when the coordinator cannot send the files.
    match crate::fetch_data::from_coordinator() {
        Ok(Some(folder)) => {
            let mut fetched = spec.clone();
            fetched.dataset.path = folder;
            return ImageTask::from_spec(&fetched, init)
                .map(Prepared::Ready)
                .map_err(|e| format!("the dataset the coordinator sent: {e}"));
        }
        Ok(None) => {}
        Err(e) => eprintln!("{e}; taking the samples from the other workers instead"),
    }
    eprintln!(
        "no dataset read here ({}): waiting for the dataset's facts and samples from the other workers",
        if told {
            "this agent reads no dataset from disk".to_string()
        } else {
            format!("{} does not exist on this host", path.display())
        }
    );
    let spec = spec.clone();
    Ok(Prepared::FromPeers(Box::new(move |bytes| {
        let facts = ImageFacts::from_bytes(bytes)?;
        // What the built-in models take, and no more than the spec asks for.
        if (facts.rows, facts.cols) != (28, 28) {
            return Err(format!(
                "images of {}×{}: the built-in models take 28×28",
                facts.rows, facts.cols
            ));
        }
        let ds = &spec.dataset;
        for (what, n, limit) in [
            ("training", facts.train_len, ds.train_limit),
            ("test", facts.test_len, ds.test_limit),
        ] {
            if limit > 0 && n > limit {
                return Err(format!("{n} {what} images where the spec asks for at most {limit}"));
            }
        }
        let task = ImageTask::from_facts(facts, &spec, init);
        let Some(root) = std::env::var_os(WorkerEnv::DATA_CACHE) else {
            return Ok(task);
        };
        // Everything that decides the images: how they are read and prepared, and
        // the contents' fingerprint in the facts.
        let description = [
            bytes.to_vec(),
            serde_json::to_vec(&spec.dataset).unwrap_or_default(),
            serde_json::to_vec(&spec.preprocess).unwrap_or_default(),
        ]
        .concat();
        let dir = std::path::PathBuf::from(root).join(cache_key(&spec.dataset.path, &description));
        hetero_job::cache_space::mark_used(&dir);
        let (task, loaded) = task.with_cache(BundleCache::new(&dir));
        if loaded.images > 0 {
            eprintln!(
                "{} image(s) taken from this host's cache ({})",
                loaded.images,
                dir.display()
            );
        }
        for why in loaded.damaged {
            eprintln!("part of the cache was not used: {why}");
        }
        Ok(task)
    })))
}
