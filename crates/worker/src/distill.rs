//! `model.kind = "distill"`: opens the teacher (a known model is fetched into the
//! model cache first), checks the student's decoupling fits it, and reads the
//! corpus as sentences tokenized by the teacher's tokenizer — the corpus's tail
//! (`dataset.test_fraction`) held out, as `hetero models decouple` holds it out,
//! so the before and after figures are measured on the same sentences.

use hetero_data::model_fetch::cache_dir;
use hetero_data::text::read_corpus;
use hetero_infer::Arch;
use hetero_infer::decoupled::{encode_sentences, held_out, sentences};
use hetero_infer::models;
use hetero_job::JobSpec;
use hetero_models::bert::BertEncoder;
use hetero_models::decoupled_bert::DecoupledBertConfig;
use hetero_train::distill_task::EncoderDistillTask;
use hetero_train::text_task::decoupling;

use crate::backend::{SystemBackend, SystemDevice};

/// Test sentences when `dataset.test_limit` does not say.
const TEST_SENTENCES: usize = 256;

/// The distillation a spec describes, its teacher loaded on `device`.
pub fn task(spec: &JobSpec, device: &SystemDevice) -> Result<EncoderDistillTask<SystemBackend>, String> {
    let distill = spec
        .distill
        .as_ref()
        .ok_or("model.kind = \"distill\" without its [model] teacher and [model.decouple]")?;
    let model = models::open(&distill.teacher, &cache_dir(), &mut |m| eprintln!("{m}"))
        .map_err(|e| format!("model.teacher = {:?}: {e}", distill.teacher))?;
    let Arch::Bert(c) = &model.arch else {
        return Err(format!(
            "model.teacher = {:?} is a decoder; distillation is built for encoders (minilm, or a BERT folder)",
            distill.teacher
        ));
    };
    let config = DecoupledBertConfig::new(c.clone(), decoupling(distill.decouple))
        .map_err(|e| format!("{e} (the teacher {})", distill.teacher))?;
    let teacher = BertEncoder::<SystemBackend>::load(&mut |n, s| model.weights.expect(n, s), c, device)
        .map_err(|e| e.to_string())?;
    let ds = &spec.dataset;
    let text = read_corpus(&ds.path).map_err(|e| e.to_string())?;
    let test_text = held_out(&text, ds.test_fraction);
    let train_text = &text[..text.len() - test_text.len()];
    let tokenizer = model.tokenizer().map_err(|e| e.to_string())?;
    let tokenize =
        |sentences: Vec<String>| encode_sentences(tokenizer, &sentences, c.max_positions).map_err(|e| e.to_string());
    let limit = |n: usize, default: usize| if n > 0 { n } else { default };
    let train = tokenize(sentences(train_text, limit(ds.train_limit, usize::MAX)))?;
    let test = tokenize(sentences(test_text, limit(ds.test_limit, TEST_SENTENCES)))?;
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
