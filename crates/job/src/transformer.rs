//! The built-in language model's shape in a job spec (`model.kind =
//! "transformer"`), and its optional structure decoupling (`[model.decouple]`,
//! seed 000's decoupled transformer).
//!
//! ```toml
//! [model]
//! kind = "transformer"
//! d_model = 128          # hidden width H
//! layers = 4             # L
//! heads = 4
//! [model.decouple]
//! divisions = 4          # N_d: slices of H, sub-blocks per decoupled layer
//! blocks = 2             # N_b: each block is L/N_b − 1 decoupled layers + 1 original
//! variant = "full-heads" # or "split-heads"
//! ```
//!
//! A decoupling that does not divide the model is refused here, before anything
//! runs, with the values that would fit.

use serde::{Deserialize, Serialize};

use crate::SpecError;
use crate::section::Section;

/// Keys of `[model]` for the built-in transformer.
pub(crate) const TRANSFORMER_KEYS: &[&str] = &["d_model", "layers", "heads", "decouple"];
/// Keys of `[model]` for distillation (`model.kind = "distill"`).
pub(crate) const DISTILL_KEYS: &[&str] = &["teacher", "decouple"];
const DECOUPLE: &[&str] = &["divisions", "blocks", "variant"];

/// The built-in language model's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransformerSpec {
    /// Hidden width.
    pub d_model: usize,
    /// Transformer layers.
    pub layers: usize,
    /// Attention heads per layer.
    pub heads: usize,
    /// Structure decoupling, when the model is to be decoupled.
    pub decouple: Option<DecoupleSpec>,
}

impl Default for TransformerSpec {
    fn default() -> Self {
        TransformerSpec {
            d_model: 64,
            layers: 2,
            heads: 4,
            decouple: None,
        }
    }
}

/// `[model.decouple]`: how the transformer is decoupled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecoupleSpec {
    /// N_d: slices of the hidden width.
    pub divisions: usize,
    /// N_b: blocks of layers, each ending in an original layer.
    pub blocks: usize,
    /// Sub-block attention: all heads, or heads / N_d of them.
    pub variant: SubBlockVariant,
}

/// `model.kind = "distill"`: a real model (the teacher, frozen) distilled into its
/// decoupled version (the student, initialised by slicing the teacher's weights).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DistillSpec {
    /// The teacher: a known model's name (`minilm`), a model folder or a GGUF file.
    pub teacher: String,
    /// How the student is decoupled; checked against the teacher's shape when the
    /// teacher is opened.
    pub decouple: DecoupleSpec,
}

/// A sub-block's attention (see `hetero_models::decouple::Variant`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SubBlockVariant {
    /// Q/K/V map the slice to all heads at full head width.
    FullHeads,
    /// Each sub-block owns heads / N_d of the heads.
    SplitHeads,
}

fn divisors(n: usize) -> String {
    let list: Vec<String> = (1..=n)
        .filter(|d| n.is_multiple_of(*d))
        .map(|d| d.to_string())
        .collect();
    list.join(", ")
}

/// Parses the transformer's keys of `[model]` (all optional).
pub(crate) fn parse(model: &Section) -> Result<TransformerSpec, SpecError> {
    let default = TransformerSpec::default();
    let d_model = model.int("d_model", 1, 4096)?.unwrap_or(default.d_model);
    let layers = model.int("layers", 1, 64)?.unwrap_or(default.layers);
    let heads = model.int("heads", 1, 64)?.unwrap_or(default.heads);
    if !d_model.is_multiple_of(heads) {
        return Err(model.invalid(
            "heads",
            &heads.to_string(),
            &format!("it must divide d_model = {d_model} (one of: {})", divisors(d_model)),
        ));
    }
    let decouple = if model.table.contains_key("decouple") {
        Some(parse_decouple(
            &model.section("decouple", DECOUPLE)?,
            Some((d_model, layers, heads)),
        )?)
    } else {
        None
    };
    Ok(TransformerSpec {
        d_model,
        layers,
        heads,
        decouple,
    })
}

/// Parses `model.kind = "distill"`'s keys of `[model]`.
pub(crate) fn parse_distill(model: &Section) -> Result<DistillSpec, SpecError> {
    let teacher = model
        .string("teacher")?
        .ok_or_else(|| model.missing("teacher", "the model to distil: minilm, a model folder or a .gguf file"))?;
    if teacher.is_empty() || teacher.len() > 4096 || teacher.chars().any(|c| c.is_control()) {
        return Err(model.invalid(
            "teacher",
            &teacher,
            "a model name or path of 1 to 4096 printable characters",
        ));
    }
    if !model.table.contains_key("decouple") {
        return Err(model.missing("decouple", "a [model.decouple] table: how the student is decoupled"));
    }
    let decouple = parse_decouple(&model.section("decouple", DECOUPLE)?, None)?;
    Ok(DistillSpec { teacher, decouple })
}

/// `[model.decouple]`, checked against `(d_model, layers, heads)` when the model's
/// shape is known here.
fn parse_decouple(section: &Section, shape: Option<(usize, usize, usize)>) -> Result<DecoupleSpec, SpecError> {
    let variant = match section.string("variant")?.as_deref() {
        Some("full-heads") | None => SubBlockVariant::FullHeads,
        Some("split-heads") => SubBlockVariant::SplitHeads,
        Some(other) => return Err(section.invalid("variant", other, "one of: full-heads, split-heads")),
    };
    let divisions = section
        .int("divisions", 1, 64)?
        .ok_or_else(|| section.missing("divisions", "slices of the hidden width, N_d"))?;
    let blocks = section
        .int("blocks", 1, 64)?
        .ok_or_else(|| section.missing("blocks", "blocks of layers, each ending in an original layer, N_b"))?;
    let Some((d_model, layers, heads)) = shape else {
        return Ok(DecoupleSpec {
            divisions,
            blocks,
            variant,
        });
    };
    if !d_model.is_multiple_of(divisions) {
        return Err(section.invalid(
            "divisions",
            &divisions.to_string(),
            &format!("it must divide d_model = {d_model} (one of: {})", divisors(d_model)),
        ));
    }
    if variant == SubBlockVariant::SplitHeads && !heads.is_multiple_of(divisions) {
        return Err(section.invalid(
            "divisions",
            &divisions.to_string(),
            &format!(
                "split-heads gives each sub-block heads / divisions of the {heads} heads: one of {} \
                 (or variant = \"full-heads\")",
                divisors(heads)
            ),
        ));
    }
    if !layers.is_multiple_of(blocks) {
        return Err(section.invalid(
            "blocks",
            &blocks.to_string(),
            &format!("it must divide layers = {layers} (one of: {})", divisors(layers)),
        ));
    }
    Ok(DecoupleSpec {
        divisions,
        blocks,
        variant,
    })
}

#[cfg(test)]
mod tests {
    use crate::{JobSpec, SpecError};

    use super::*;

    fn spec(model: &str) -> Result<JobSpec, SpecError> {
        JobSpec::parse(&format!(
            "[model]\nkind = \"transformer\"\n{model}\n[dataset]\nkind = \"text\"\npath = \"t\"\n"
        ))
    }

    #[test]
    fn the_shape_and_decoupling_are_read_and_default_to_the_small_model() {
        assert_eq!(spec("").unwrap().transformer, Some(TransformerSpec::default()));
        let s = spec("d_model = 128\nlayers = 4\nheads = 8\n[model.decouple]\ndivisions = 4\nblocks = 2\nvariant = \"split-heads\"")
            .unwrap();
        assert_eq!(
            s.transformer,
            Some(TransformerSpec {
                d_model: 128,
                layers: 4,
                heads: 8,
                decouple: Some(DecoupleSpec {
                    divisions: 4,
                    blocks: 2,
                    variant: SubBlockVariant::SplitHeads
                }),
            })
        );
        assert_eq!(JobSpec::from_json(&s.to_json()).unwrap(), s);
    }

    /// A distillation names its teacher and its student's decoupling; either
    /// missing is refused, and transformer keys are not read with it.
    #[test]
    fn a_distillation_needs_a_teacher_and_a_decoupling() {
        let distill = |model: &str| {
            JobSpec::parse(&format!(
                "[model]\nkind = \"distill\"\n{model}\n[dataset]\nkind = \"text\"\npath = \"t\"\n"
            ))
        };
        let s = distill("teacher = \"minilm\"\n[model.decouple]\ndivisions = 2\nblocks = 3\nvariant = \"split-heads\"")
            .unwrap();
        assert_eq!(
            s.distill,
            Some(DistillSpec {
                teacher: "minilm".into(),
                decouple: DecoupleSpec {
                    divisions: 2,
                    blocks: 3,
                    variant: SubBlockVariant::SplitHeads
                }
            })
        );
        assert_eq!(JobSpec::from_json(&s.to_json()).unwrap(), s);
        let e = distill("[model.decouple]\ndivisions = 2\nblocks = 3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.teacher"), "{e}");
        let e = distill("teacher = \"minilm\"").unwrap_err().to_string();
        assert!(e.contains("model.decouple"), "{e}");
        let e = distill("teacher = \"minilm\"\nd_model = 64\n[model.decouple]\ndivisions = 2\nblocks = 3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("d_model"), "{e}");
    }

    #[test]
    fn a_decoupling_that_does_not_divide_the_model_is_refused_with_what_would() {
        let err = |m: &str| spec(m).unwrap_err().to_string();
        let e = err("d_model = 96\n[model.decouple]\ndivisions = 5\nblocks = 1");
        assert!(
            e.contains("model.decouple.divisions") && e.contains("one of: 1, 2, 3, 4, 6, 8, 12"),
            "{e}"
        );
        let e = err("heads = 2\n[model.decouple]\ndivisions = 4\nblocks = 1\nvariant = \"split-heads\"");
        assert!(e.contains("one of 1, 2"), "{e}");
        let e = err("layers = 6\n[model.decouple]\ndivisions = 2\nblocks = 4");
        assert!(
            e.contains("model.decouple.blocks") && e.contains("one of: 1, 2, 3, 6"),
            "{e}"
        );
        let e = err("[model.decouple]\nblocks = 1");
        assert!(e.contains("model.decouple.divisions"), "{e}");
        let e = err("[model.decouple]\ndivisions = 2\nblocks = 1\nvariant = \"half\"");
        assert!(e.contains("full-heads, split-heads"), "{e}");
        let e = err("heads = 3");
        assert!(e.contains("model.heads") && e.contains("divide d_model = 64"), "{e}");
        let e = err("[model.decouple]\ndivisions = 2\nblock = 1");
        assert!(e.contains("model.decouple.block"), "{e}");
    }

    #[test]
    fn only_the_transformer_has_a_shape() {
        let e = JobSpec::parse("[model]\nkind = \"cnn\"\nlayers = 3\n[dataset]\npath = \"d\"\n").unwrap_err();
        assert!(e.to_string().contains("model.layers"), "{e}");
    }
}
