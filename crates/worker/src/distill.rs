//! `model.kind = "distill"`: opens the teacher (a known model is fetched into the
//! model cache first), checks the student's decoupling fits it, and reads the
//! corpus as sentences (an encoder) or windows of tokens (a decoder) tokenized by
//! the teacher's tokenizer — the corpus's tail
//! (`dataset.test_fraction`) held out, as `hetero models decouple` holds it out,
//! so the before and after figures are measured on the same sentences.

use hetero_data::model_fetch::cache_dir;
use hetero_data::text::read_corpus;
use hetero_infer::Arch;
use hetero_infer::decoupled::{WINDOW, encode_sentences, held_out, load_llama_pair, sentences};
use hetero_infer::models::{self, Model};
use hetero_job::{DistillSpec, JobSpec};
use hetero_models::bert::BertEncoder;
use hetero_models::decoupled_bert::DecoupledBertConfig;
use hetero_models::decoupled_llama::DecoupledLlamaConfig;
use hetero_train::decoder_distill_task::DecoderDistillTask;
use hetero_train::distill_task::EncoderDistillTask;
use hetero_train::text_task::decoupling;

use crate::WorkerError;
use crate::backend::{SystemBackend, SystemDevice};

/// Test sentences when `dataset.test_limit` does not say.
const TEST_SENTENCES: usize = 256;

/// Test windows of a decoder when `dataset.test_limit` does not say.
const TEST_WINDOWS: usize = 32;

/// Runs the distillation the spec in the environment describes: of an encoder
/// (pooled embeddings) or of a decoder (next-token distributions), as the
/// teacher is.
pub fn run(spec: &JobSpec) -> Result<(), WorkerError> {
    let teacher = open_teacher(spec);
    match teacher.as_ref().map(|(_, model)| &model.arch) {
        Ok(Arch::Llama(_)) => crate::try_run(|ctx, device| decoder_task(&ctx.spec, teacher?, device)),
        Ok(Arch::Bert(_)) => crate::try_run(|ctx, device| encoder_task(&ctx.spec, teacher?, device)),
        Ok(Arch::DecoupledBert(_) | Arch::DecoupledLlama(_)) => {
            crate::try_run(|_, _| -> Result<EncoderDistillTask<SystemBackend>, String> {
                Err("model.teacher is already decoupled: give the original model".into())
            })
        }
        // Reported through the job like any other task error.
        Err(e) => crate::try_run(|_, _| -> Result<EncoderDistillTask<SystemBackend>, String> { Err(e.clone()) }),
    }
}

/// The spec's distillation and its teacher, opened (fetched first if known).
fn open_teacher(spec: &JobSpec) -> Result<(&DistillSpec, Model), String> {
    let distill = spec
        .distill
        .as_ref()
        .ok_or("model.kind = \"distill\" without its [model] teacher and [model.decouple]")?;
    let model = models::open(&distill.teacher, &cache_dir(), &mut |m| eprintln!("{m}"))
        .map_err(|e| format!("model.teacher = {:?}: {e}", distill.teacher))?;
    Ok((distill, model))
}

/// The corpus split as `hetero models decouple` splits it: training text, and the
/// held-out tail.
fn corpus(spec: &JobSpec) -> Result<(String, String), String> {
    let ds = &spec.dataset;
    let text = read_corpus(&ds.path).map_err(|e| e.to_string())?;
    let test_text = held_out(&text, ds.test_fraction).to_string();
    let train_text = text[..text.len() - test_text.len()].to_string();
    Ok((train_text, test_text))
}

fn limit(n: usize, default: usize) -> usize {
    if n > 0 { n } else { default }
}

/// An encoder's distillation, its teacher loaded on `device`.
fn encoder_task(
    spec: &JobSpec,
    (distill, model): (&DistillSpec, Model),
    device: &SystemDevice,
) -> Result<EncoderDistillTask<SystemBackend>, String> {
    let Arch::Bert(c) = &model.arch else {
        return Err(format!("model.teacher = {:?} is not an encoder", distill.teacher));
    };
    let config = DecoupledBertConfig::new(c.clone(), decoupling(distill.decouple))
        .map_err(|e| format!("{e} (the teacher {})", distill.teacher))?;
    let teacher = BertEncoder::<SystemBackend>::load(&mut |n, s| model.weights.expect(n, s), c, device)
        .map_err(|e| e.to_string())?;
    let ds = &spec.dataset;
    let (train_text, test_text) = corpus(spec)?;
    let tokenizer = model.tokenizer().map_err(|e| e.to_string())?;
    let tokenize =
        |sentences: Vec<String>| encode_sentences(tokenizer, &sentences, c.max_positions).map_err(|e| e.to_string());
    let train = tokenize(sentences(&train_text, limit(ds.train_limit, usize::MAX)))?;
    let test = tokenize(sentences(&test_text, limit(ds.test_limit, TEST_SENTENCES)))?;
    if train.is_empty() || test.len() < 3 {
        return Err(format!(
            "{}: {} training and {} held-out sentences of 4 to 40 words; distillation needs some of each",
            ds.path.display(),
            train.len(),
            test.len()
        ));
    }
    Ok(EncoderDistillTask::new(teacher, config, train, test))
}

/// A decoder's distillation on windows of [`WINDOW`] tokens, its teacher loaded
/// on `device`.
fn decoder_task(
    spec: &JobSpec,
    (distill, model): (&DistillSpec, Model),
    device: &SystemDevice,
) -> Result<DecoderDistillTask<SystemBackend>, String> {
    let Arch::Llama(c) = &model.arch else {
        return Err(format!("model.teacher = {:?} is not a decoder", distill.teacher));
    };
    let config = DecoupledLlamaConfig::new(c.clone(), decoupling(distill.decouple))
        .map_err(|e| format!("{e} (the teacher {})", distill.teacher))?;
    let (teacher, student) = load_llama_pair::<SystemBackend>(&mut |n, s| model.weights.expect(n, s), &config, device)
        .map_err(|e| e.to_string())?;
    let ds = &spec.dataset;
    let (train_text, test_text) = corpus(spec)?;
    let tokenizer = model.tokenizer().map_err(|e| e.to_string())?;
    let window = WINDOW.min(c.context);
    let windows = |text: &str, most: usize| -> Result<Vec<Vec<u32>>, String> {
        let ids = tokenizer.encode(text, false).map_err(|e| e.to_string())?;
        Ok(ids.chunks_exact(window).take(most).map(<[u32]>::to_vec).collect())
    };
    let train = windows(&train_text, limit(ds.train_limit, usize::MAX))?;
    let test = windows(&test_text, limit(ds.test_limit, TEST_WINDOWS))?;
    if train.is_empty() || test.is_empty() {
        return Err(format!(
            "{}: {} training and {} held-out windows of {window} tokens; distillation needs some of each",
            ds.path.display(),
            train.len(),
            test.len()
        ));
    }
    Ok(DecoderDistillTask::new(teacher, student, train, test))
}
