//! Structure decoupling as data (seed 000, module 1; DeTransformer).
//!
//! A transformer of `L` layers and width `H` is *decoupled* by two numbers:
//! `divisions` (N_d) cuts the hidden state into N_d contiguous slices of `H / N_d`,
//! and `blocks` (N_b) groups the layers into N_b blocks of `L / N_b`. Each block is
//! `L / N_b − 1` *decoupled* layers followed by one *original* layer:
//!
//! ```text
//!  embedding ─┬ slice 0 ─ sub-block ─ sub-block ─┐                ┌ slice 0 ─ …
//!  (width H)  ├ slice 1 ─ sub-block ─ sub-block ─┼ original layer ┼ slice 1 ─ …
//!             └ slice 2 ─ sub-block ─ sub-block ─┘  (all of H)    └ slice 2 ─ …
//!               └──── L/N_b − 1 decoupled layers ┘
//! ```
//!
//! Sub-block `i` of a decoupled layer reads and writes slice `i` only, so a device
//! holding it needs nothing from any other device until the next original layer:
//! one gather per block instead of tensor parallelism's two all-reduces per layer.
//! The last layer is always original (it is the last of the last block).
//!
//! This module knows only the layout (which layer is which, how wide a slice is,
//! how many heads a sub-block has) and refuses a decoupling that does not divide the
//! model; the burn modules that compute it are in [`crate::decoupled_lm`] and
//! [`crate::grouped`].

use std::fmt;

/// What a sub-block's attention looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Q, K and V map the slice to *all* heads at full head width, as
    /// DeTransformer's trained model does: attention costs N_d times the original
    /// layer's, the feed-forward stays about as wide as the original.
    FullHeads,
    /// Each sub-block owns `heads / N_d` of the heads: attention costs what the
    /// original's does (and a decoder's KV cache is split N_d ways), and the
    /// feed-forward grows to keep the parameter count.
    SplitHeads,
}

impl Variant {
    /// The name a job spec or command line uses.
    pub fn name(self) -> &'static str {
        match self {
            Variant::FullHeads => "full-heads",
            Variant::SplitHeads => "split-heads",
        }
    }

    /// The variant a name stands for.
    pub fn from_name(name: &str) -> Option<Variant> {
        match name {
            "full-heads" => Some(Variant::FullHeads),
            "split-heads" => Some(Variant::SplitHeads),
            _ => None,
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The shape of the original model a decoupling applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// Transformer layers (L).
    pub layers: usize,
    /// Hidden width (H).
    pub width: usize,
    /// Attention heads (query heads for grouped-query attention).
    pub heads: usize,
    /// Key/value heads (equal to `heads` without grouped-query attention).
    pub kv_heads: usize,
}

/// Whether a layer of a decoupled model works on slices or on the whole width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// N_d independent sub-blocks, one per slice.
    Decoupled,
    /// The ordinary layer over the concatenated slices.
    Original,
}

/// A decoupling: how many slices, how many blocks, which sub-block variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoupling {
    /// N_d: slices of the hidden width (and sub-blocks per decoupled layer).
    pub divisions: usize,
    /// N_b: blocks of layers, each ending in an original layer.
    pub blocks: usize,
    /// What a sub-block's attention looks like.
    pub variant: Variant,
}

/// A decoupling that does not fit the model: names the key, its value and what
/// would fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("decouple.{key} = {value} does not fit this model: {fits}")]
pub struct DecouplingError {
    /// `divisions` or `blocks`.
    pub key: &'static str,
    /// The value given.
    pub value: usize,
    /// What would fit, in words, with the values that divide.
    pub fits: String,
}

/// The divisors of `n` from 1 to `n`, for error messages.
fn divisors(n: usize) -> String {
    let list: Vec<String> = (1..=n)
        .filter(|d| n.is_multiple_of(*d))
        .map(|d| d.to_string())
        .collect();
    list.join(", ")
}

/// Greatest common divisor.
fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl Decoupling {
    /// Checks that this decoupling divides `shape`: N_d divides the width (and, for
    /// `split-heads`, the heads and key/value heads), N_b divides the layers.
    pub fn check(&self, shape: &ModelShape) -> Result<(), DecouplingError> {
        let d = self.divisions;
        if d == 0 || !shape.width.is_multiple_of(d) {
            return Err(DecouplingError {
                key: "divisions",
                value: d,
                fits: format!(
                    "it must divide the width {} (one of: {})",
                    shape.width,
                    divisors(shape.width)
                ),
            });
        }
        if self.variant == Variant::SplitHeads && !(shape.heads.is_multiple_of(d) && shape.kv_heads.is_multiple_of(d)) {
            let common = gcd(gcd(shape.width, shape.heads), shape.kv_heads);
            return Err(DecouplingError {
                key: "divisions",
                value: d,
                fits: format!(
                    "split-heads gives each sub-block heads/divisions of the {} heads ({} key/value heads); \
                     one of: {} (or variant = \"full-heads\")",
                    shape.heads,
                    shape.kv_heads,
                    divisors(common)
                ),
            });
        }
        let b = self.blocks;
        if b == 0 || !shape.layers.is_multiple_of(b) {
            return Err(DecouplingError {
                key: "blocks",
                value: b,
                fits: format!(
                    "it must divide the {} layers (one of: {})",
                    shape.layers,
                    divisors(shape.layers)
                ),
            });
        }
        Ok(())
    }

    /// The kind of each of `layers` layers: every `layers / blocks`-th is original,
    /// the last among them.
    pub fn layer_kinds(&self, layers: usize) -> Vec<LayerKind> {
        let per_block = layers / self.blocks.max(1);
        (0..layers)
            .map(|l| {
                if per_block == 0 || (l + 1).is_multiple_of(per_block) {
                    LayerKind::Original
                } else {
                    LayerKind::Decoupled
                }
            })
            .collect()
    }

    /// Width of one slice.
    pub fn slice_width(&self, shape: &ModelShape) -> usize {
        shape.width / self.divisions
    }

    /// Query heads of one sub-block.
    pub fn sub_block_heads(&self, shape: &ModelShape) -> usize {
        match self.variant {
            Variant::FullHeads => shape.heads,
            Variant::SplitHeads => shape.heads / self.divisions,
        }
    }

    /// Key/value heads of one sub-block.
    pub fn sub_block_kv_heads(&self, shape: &ModelShape) -> usize {
        match self.variant {
            Variant::FullHeads => shape.kv_heads,
            Variant::SplitHeads => shape.kv_heads / self.divisions,
        }
    }
}

impl fmt::Display for Decoupling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} divisions × {} blocks, {}",
            self.divisions, self.blocks, self.variant
        )
    }
}

/// The feed-forward inner width I′ that makes a decoupled layer hold as many
/// parameters as an original one, given that a decoupled layer holds
/// `fixed + per_unit × I′` parameters: the nearest whole width, at least 1.
pub fn matching_inner_width(original_layer: usize, fixed: usize, per_unit: usize) -> usize {
    let free = original_layer.saturating_sub(fixed) as f64;
    ((free / per_unit as f64).round() as usize).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINILM: ModelShape = ModelShape {
        layers: 6,
        width: 384,
        heads: 12,
        kv_heads: 12,
    };

    #[test]
    fn every_block_ends_in_an_original_layer_and_so_does_the_model() {
        use LayerKind::*;
        let d = |blocks| Decoupling {
            divisions: 4,
            blocks,
            variant: Variant::FullHeads,
        };
        assert_eq!(
            d(2).layer_kinds(6),
            [Decoupled, Decoupled, Original, Decoupled, Decoupled, Original]
        );
        assert_eq!(d(1).layer_kinds(6).iter().filter(|k| **k == Original).count(), 1);
        assert_eq!(d(6).layer_kinds(6), [Original; 6]);
        assert_eq!(d(3).layer_kinds(6).last(), Some(&Original));
    }

    #[test]
    fn a_decoupling_that_does_not_divide_the_model_names_what_would() {
        let ok = Decoupling {
            divisions: 4,
            blocks: 3,
            variant: Variant::SplitHeads,
        };
        assert_eq!(ok.check(&MINILM), Ok(()));
        assert_eq!((ok.slice_width(&MINILM), ok.sub_block_heads(&MINILM)), (96, 3));

        let width = Decoupling { divisions: 5, ..ok }.check(&MINILM).unwrap_err();
        assert_eq!((width.key, width.value), ("divisions", 5));
        assert!(width.to_string().contains("divide the width 384"), "{width}");

        let heads = Decoupling { divisions: 8, ..ok }.check(&MINILM).unwrap_err();
        assert!(heads.to_string().contains("one of: 1, 2, 3, 4, 6, 12"), "{heads}");
        let full = Decoupling {
            divisions: 8,
            variant: Variant::FullHeads,
            ..ok
        };
        assert_eq!(full.check(&MINILM), Ok(()));

        let blocks = Decoupling { blocks: 4, ..ok }.check(&MINILM).unwrap_err();
        assert_eq!(blocks.key, "blocks");
        assert!(blocks.to_string().contains("one of: 1, 2, 3, 6"), "{blocks}");
        assert_eq!(Decoupling { blocks: 0, ..ok }.check(&MINILM).unwrap_err().key, "blocks");
        assert_eq!(
            Decoupling { divisions: 0, ..ok }.check(&MINILM).unwrap_err().key,
            "divisions"
        );
    }

    #[test]
    fn the_inner_width_balances_the_parameter_count() {
        // BERT-Base, N_d = 4, split heads: DeTransformer's earlier variant used 4224.
        let h = 768;
        let s = h / 4;
        let original = 4 * (h * h + h) + 2 * h * 3072 + 3072 + h + 4 * h;
        let fixed = 4 * (4 * (s * s + s) + s + 4 * s);
        let inner = matching_inner_width(original, fixed, 4 * (2 * s + 1));
        assert!((4200..4250).contains(&inner), "{inner}");
    }
}
