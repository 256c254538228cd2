//! `hetero export RUN --to DIR`: the decoupled model a distill job trained,
//! written as a model folder (safetensors, config, tokenizer, decoupling) that
//! `hetero infer DIR` and `hetero serve DIR` run under any placement.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use hetero_job::{CHECKPOINT_FILE, JobSpec, ModelKind, SPEC_FILE};
use hetero_serve::InferBackend;
use hetero_serve::placing::open_model;
use hetero_train::checkpoint::Checkpoint;

/// What `hetero export` was asked.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// A distill job's output folder (e.g. runs/job-000001: its checkpoint.bin and
    /// spec.json), or a checkpoint file (then give --spec).
    pub source: PathBuf,
    /// The new model folder.
    #[arg(long)]
    pub to: PathBuf,
    /// The job's spec, when the source is a checkpoint file or a folder without
    /// spec.json (jobs before spec.json was written).
    #[arg(long)]
    pub spec: Option<PathBuf>,
}

/// Reads the checkpoint and its job's spec, opens the teacher, writes the folder.
pub fn run(args: &ExportArgs) -> Result<ExitCode> {
    let (checkpoint, spec) = locate(&args.source, args.spec.as_deref())?;
    let spec = read_spec(&spec)?;
    let Some(distill) = spec.distill.as_ref().filter(|_| spec.model == ModelKind::Distill) else {
        bail!(
            "job {:?} has model.kind = {:?}: only a distill job's decoupled student can be exported yet",
            spec.name,
            spec.model
        );
    };
    let decoupling = hetero_train::text_task::decoupling(distill.decouple);
    let trained = Checkpoint::load(&checkpoint)
        .with_context(|| format!("reading the student's checkpoint {}", checkpoint.display()))?;
    let teacher = open_model(&distill.teacher)?;
    eprintln!(
        "exporting {} (epoch {} of job {:?}): {} decoupled {decoupling}",
        checkpoint.display(),
        trained.epoch,
        spec.name,
        distill.teacher
    );
    let written = hetero_infer::export::export::<InferBackend>(
        &teacher,
        decoupling,
        Some(&trained.params),
        &args.to,
        &Default::default(),
    )?;
    println!(
        "wrote {}: {} tensors, {} parameters, {:.1} MB; run it with `hetero infer {0} \"…\"` or `hetero serve {0}`",
        written.dir.display(),
        written.tensors,
        written.parameters,
        written.bytes as f64 / 1e6
    );
    Ok(ExitCode::SUCCESS)
}

/// The checkpoint file and the spec file `source` (and `--spec`) point at.
fn locate(source: &Path, spec: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    let (checkpoint, beside) = if source.is_dir() {
        (source.join(CHECKPOINT_FILE), Some(source.join(SPEC_FILE)))
    } else if source.is_file() {
        (source.to_path_buf(), None)
    } else {
        bail!(
            "{} is neither a job's output folder nor a checkpoint file (a job prints its folder when it ends)",
            source.display()
        );
    };
    if !checkpoint.is_file() {
        bail!(
            "{} holds no {CHECKPOINT_FILE}: the job has not finished an epoch yet",
            source.display()
        );
    }
    let spec = match (spec, beside) {
        (Some(given), _) => given.to_path_buf(),
        (None, Some(beside)) if beside.is_file() => beside,
        _ => bail!(
            "no {SPEC_FILE} beside {}: give the job's spec with --spec",
            checkpoint.display()
        ),
    };
    Ok((checkpoint, spec))
}

/// A spec as a job wrote it ([`SPEC_FILE`], JSON) or as a user wrote it (TOML).
fn read_spec(path: &Path) -> Result<JobSpec> {
    if path.extension().is_some_and(|e| e == "json") {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        return serde_json::from_str(&text).with_context(|| format!("{} is not a job's spec.json", path.display()));
    }
    Ok(JobSpec::load(path)?)
}
