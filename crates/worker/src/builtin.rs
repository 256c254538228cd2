//! The built-in worker (`hetero worker`): the job spec names one of Hetero's own
//! models (image classifiers, the transformer language model, or a real model's
//! decoupled version distilled from it), trained on the spec's dataset.

use hetero_job::ModelKind;
use hetero_models::{CnnConfig, MlpConfig};
use hetero_train::image_task::ImageTask;
use hetero_train::text_task::TextTask;

use crate::WorkerError;

/// Runs the built-in task the spec in the environment names.
pub fn run() -> Result<(), WorkerError> {
    let setup = crate::WorkerSetup::from_env()?;
    match setup.spec.model {
        ModelKind::Cnn => crate::try_run(|ctx, _| {
            ImageTask::from_spec(&ctx.spec, |d| CnnConfig::new().init(d)).map_err(|e| e.to_string())
        }),
        ModelKind::Mlp => crate::try_run(|ctx, _| {
            ImageTask::from_spec(&ctx.spec, |d| MlpConfig::new().init(d)).map_err(|e| e.to_string())
        }),
        ModelKind::Transformer => crate::try_run(|ctx, _| TextTask::from_spec(&ctx.spec).map_err(|e| e.to_string())),
        ModelKind::Distill => crate::distill::run(&setup.spec),
        ModelKind::Custom => Err(WorkerError::Setup(
            "model.kind = \"custom\" runs the program named in [task], not the built-in worker".into(),
        )),
    }
}
