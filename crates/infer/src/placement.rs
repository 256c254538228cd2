//! Placements: which workers run which layers, and how — data, not code.
//!
//! A placement is a list of *stages* over the model's blocks, in order. Each stage
//! names a contiguous range of blocks, the workers that run it, and a mode:
//! - `single`: one worker runs the blocks;
//! - `replicated`: every named worker runs the whole blocks (no communication
//!   inside the stage; the activations reach each of them);
//! - `tensor-parallel`: the workers split every block's heads and FFN units
//!   (Megatron style: two all-reduces per block); a decoupled model's sub-blocks
//!   are spread evenly over them;
//! - `decoupled` (decoupled models only): the workers share each decoupled layer's
//!   N_d sub-blocks — `sub_blocks` says how many each holds (evenly when absent) —
//!   and keep their slices of the hidden state between layers; `original` says how
//!   the stage's original layers run: `replicated` (all-gather the slices, every
//!   worker runs the whole layer), `tensor-parallel` (all-gather, then split the
//!   layer), or `gather` (gather the slices to the stage's first worker, which runs
//!   the layer and scatters the slices back).
//!
//! Pipeline parallelism is several `single` stages on different workers. The
//! embedding runs on the first stage's workers and the output head on the last
//! stage's (split by vocabulary when that stage is tensor-parallel). A file:
//!
//! ```toml
//! workers = 3
//! [[stage]]
//! layers = "0..20"
//! mode = "tensor-parallel"
//! workers = [0, 1]
//! [[stage]]
//! layers = "20..30"
//! workers = [2]
//! ```
//!
//! and a decoupled model (N_d = 4) over three unequal devices:
//!
//! ```toml
//! workers = 3
//! [[stage]]
//! layers = "all"
//! mode = "decoupled"
//! workers = [0, 1, 2]
//! sub_blocks = [2, 1, 1]
//! original = "gather"
//! ```

use std::fmt;
use std::ops::Range;
use std::path::Path;

use hetero_models::LayerKind;
use hetero_models::checkpoint::span;
use serde::{Deserialize, Serialize};

use crate::InferError;

/// How a decoupled stage runs its original layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Original {
    /// All-gather the slices; every worker runs the whole layer.
    Replicated,
    /// All-gather the slices; the workers split the layer.
    TensorParallel,
    /// Gather the slices to the stage's first worker, which runs the layer alone.
    Gather,
}

impl Original {
    /// The name a placement file uses.
    pub fn name(self) -> &'static str {
        match self {
            Original::Replicated => "replicated",
            Original::TensorParallel => "tensor-parallel",
            Original::Gather => "gather",
        }
    }
}

/// How a stage's workers share its blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// One worker runs the blocks.
    Single,
    /// Every worker runs the whole blocks.
    Replicated,
    /// The workers split each block's heads and FFN units.
    TensorParallel,
    /// The workers share a decoupled model's sub-blocks and keep their slices.
    Decoupled {
        /// Sub-blocks of each decoupled layer per worker, in the stage's worker
        /// order; they sum to N_d.
        sub_blocks: Vec<usize>,
        /// How the stage's original layers run.
        original: Original,
    },
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Single => f.write_str("single"),
            Mode::Replicated => f.write_str("replicated"),
            Mode::TensorParallel => f.write_str("tensor-parallel"),
            Mode::Decoupled { sub_blocks, original } => {
                write!(f, "decoupled {sub_blocks:?}, original layers {}", original.name())
            }
        }
    }
}

/// What a placement is checked against: which of the model's blocks are
/// decoupled, and into how many sub-blocks (N_d; 1 for an ordinary model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Each block's kind, in order.
    pub kinds: Vec<LayerKind>,
    /// N_d.
    pub divisions: usize,
}

impl Layout {
    /// An ordinary model of `layers` blocks.
    pub fn plain(layers: usize) -> Self {
        Layout {
            kinds: vec![LayerKind::Original; layers],
            divisions: 1,
        }
    }

    /// Blocks.
    pub fn layers(&self) -> usize {
        self.kinds.len()
    }

    fn is_decoupled(&self) -> bool {
        self.kinds.contains(&LayerKind::Decoupled)
    }
}

/// A contiguous range of blocks and who runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// Blocks, `start..end`.
    pub layers: Range<usize>,
    /// How the workers share them.
    pub mode: Mode,
    /// The workers, in the order their parts are numbered.
    pub workers: Vec<usize>,
}

impl Stage {
    /// How the stage's original layers run (a single or replicated stage's
    /// workers each run them whole).
    pub fn originals(&self) -> Original {
        match &self.mode {
            Mode::Single | Mode::Replicated => Original::Replicated,
            Mode::TensorParallel => Original::TensorParallel,
            Mode::Decoupled { original, .. } => *original,
        }
    }

    /// This worker's part of each original layer as `(index, of)`: `None` when
    /// it has none.
    pub fn original_part(&self, rank: usize) -> Option<(usize, usize)> {
        let index = self.workers.iter().position(|&w| w == rank)?;
        match self.originals() {
            Original::TensorParallel => Some((index, self.workers.len())),
            Original::Replicated => Some((0, 1)),
            Original::Gather => (index == 0).then_some((0, 1)),
        }
    }

    /// Which of a decoupled layer's `divisions` sub-blocks each worker holds, in
    /// the stage's worker order: every one on each worker of a single or
    /// replicated stage, a partition of them otherwise (some may be empty).
    pub fn sub_block_ranges(&self, divisions: usize) -> Vec<Range<usize>> {
        let k = self.workers.len();
        let counts = match &self.mode {
            Mode::Single | Mode::Replicated => return vec![0..divisions; k],
            Mode::TensorParallel => even(divisions, k),
            Mode::Decoupled { sub_blocks, .. } => sub_blocks.clone(),
        };
        consecutive(&counts)
    }

    /// The workers that hold the whole hidden state when the stage is done: its
    /// first worker after a gather, else all of them.
    pub fn holders_after(&self) -> Vec<usize> {
        match self.originals() {
            Original::Gather => vec![self.workers[0]],
            Original::Replicated | Original::TensorParallel => self.workers.clone(),
        }
    }

    /// The part of the output head `rank` holds in the last stage: split by
    /// vocabulary when its original layers are tensor-parallel, else the whole
    /// head on the stage's first worker.
    pub fn head_part(&self, rank: usize) -> Option<(usize, usize)> {
        match self.originals() {
            Original::TensorParallel => self.original_part(rank),
            Original::Replicated | Original::Gather => (self.workers[0] == rank).then_some((0, 1)),
        }
    }
}

/// A checked placement of a model of `layers` blocks over `workers` workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Workers in the mesh.
    pub workers: usize,
    /// The stages, in block order, covering every block once.
    pub stages: Vec<Stage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    workers: usize,
    #[serde(rename = "stage")]
    stages: Vec<StageFile>,
}

/// A stage as written: `mode` names one of [`Mode`]'s kinds.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StageFile {
    layers: String,
    #[serde(default = "single")]
    mode: ModeName,
    workers: Vec<usize>,
    sub_blocks: Option<Vec<usize>>,
    original: Option<Original>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum ModeName {
    Single,
    Replicated,
    TensorParallel,
    Decoupled,
}

fn single() -> ModeName {
    ModeName::Single
}

/// The largest number of workers or stages a placement may name: far above any
/// real mesh, low enough that a hostile file cannot make us allocate much.
pub const MAX_WORKERS: usize = 4096;

impl Placement {
    /// Every block on worker 0.
    pub fn single(layers: usize) -> Self {
        Placement {
            workers: 1,
            stages: vec![Stage {
                layers: 0..layers,
                mode: Mode::Single,
                workers: vec![0],
            }],
        }
    }

    /// Every block split over `workers` workers.
    pub fn tensor_parallel(layers: usize, workers: usize) -> Self {
        Placement {
            workers,
            stages: vec![Stage {
                layers: 0..layers,
                mode: Mode::TensorParallel,
                workers: (0..workers).collect(),
            }],
        }
    }

    /// Blocks in `workers` balanced contiguous ranges, one worker each.
    pub fn pipeline(layers: usize, workers: usize) -> Self {
        Placement {
            workers,
            stages: (0..workers)
                .map(|w| Stage {
                    layers: span(layers, w, workers),
                    mode: Mode::Single,
                    workers: vec![w],
                })
                .filter(|s| !s.layers.is_empty())
                .collect(),
        }
    }

    /// One decoupled stage over every block and `workers` workers, the sub-blocks
    /// even, original layers run as `original`.
    pub fn decoupled(layout: &Layout, workers: usize, original: Original) -> Self {
        Placement {
            workers,
            stages: vec![Stage {
                layers: 0..layout.layers(),
                mode: Mode::Decoupled {
                    sub_blocks: even(layout.divisions, workers),
                    original,
                },
                workers: (0..workers).collect(),
            }],
        }
    }

    /// One of the built-in placements by name over `workers` workers: `single`
    /// (everything on worker 0, the others idle), `tensor-parallel`, `pipeline`,
    /// and for decoupled models `decoupled` (original layers tensor-parallel),
    /// `decoupled-replicated` and `decoupled-gather`.
    pub fn named(name: &str, layout: &Layout, workers: usize) -> Result<Self, InferError> {
        let layers = layout.layers();
        let p = match name {
            "single" => Placement {
                workers: workers.max(1),
                ..Self::single(layers)
            },
            "tensor-parallel" | "tp" => Self::tensor_parallel(layers, workers),
            "pipeline" | "pp" => Self::pipeline(layers, workers),
            "decoupled" => Self::decoupled(layout, workers, Original::TensorParallel),
            "decoupled-replicated" => Self::decoupled(layout, workers, Original::Replicated),
            "decoupled-gather" => Self::decoupled(layout, workers, Original::Gather),
            other => {
                return Err(InferError::Placement(format!(
                    "unknown placement {other:?}: use single, tensor-parallel, pipeline, decoupled, \
                     decoupled-replicated, decoupled-gather, or a placement file"
                )));
            }
        };
        p.check(layout)?;
        Ok(p)
    }

    /// Reads a placement file and checks it against the model's layout.
    pub fn load(path: &Path, layout: &Layout) -> Result<Self, InferError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| InferError::Placement(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text, layout).map_err(|e| match e {
            InferError::Placement(m) => InferError::Placement(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses a placement and checks it against the model's layout.
    pub fn parse(text: &str, layout: &Layout) -> Result<Self, InferError> {
        let file: File = toml::from_str(text).map_err(|e| InferError::Placement(e.to_string()))?;
        if file.workers > MAX_WORKERS || file.stages.len() > MAX_WORKERS.max(layout.layers()) {
            return Err(InferError::Placement(format!(
                "{} workers and {} stages: at most {MAX_WORKERS} of each",
                file.workers,
                file.stages.len()
            )));
        }
        let stages = file
            .stages
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let fail = |m: String| InferError::Placement(format!("stage {i}: {m}"));
                let layers =
                    parse_range(&s.layers, layout.layers()).map_err(|m| fail(format!("layers {:?}: {m}", s.layers)))?;
                if s.mode != ModeName::Decoupled && (s.sub_blocks.is_some() || s.original.is_some()) {
                    return Err(fail(format!(
                        "sub_blocks and original belong to a decoupled stage, not a {:?} one",
                        s.mode
                    )));
                }
                let mode = match s.mode {
                    ModeName::Single => Mode::Single,
                    ModeName::Replicated => Mode::Replicated,
                    ModeName::TensorParallel => Mode::TensorParallel,
                    ModeName::Decoupled => Mode::Decoupled {
                        sub_blocks: s.sub_blocks.unwrap_or_else(|| {
                            let k = s.workers.len().max(1);
                            even(layout.divisions, k)
                        }),
                        original: s.original.unwrap_or(Original::TensorParallel),
                    },
                };
                Ok(Stage {
                    layers,
                    mode,
                    workers: s.workers,
                })
            })
            .collect::<Result<Vec<_>, InferError>>()?;
        let p = Placement {
            workers: file.workers,
            stages,
        };
        p.check(layout)?;
        Ok(p)
    }

    /// The placement as a file [`Placement::parse`] reads back.
    pub fn to_toml(&self) -> String {
        let mut out = format!("workers = {}\n", self.workers);
        for s in &self.stages {
            let (mode, extra) = match &s.mode {
                Mode::Single => ("single", String::new()),
                Mode::Replicated => ("replicated", String::new()),
                Mode::TensorParallel => ("tensor-parallel", String::new()),
                Mode::Decoupled { sub_blocks, original } => (
                    "decoupled",
                    format!("sub_blocks = {sub_blocks:?}\noriginal = \"{}\"\n", original.name()),
                ),
            };
            out += &format!(
                "\n[[stage]]\nlayers = \"{}..{}\"\nmode = \"{mode}\"\nworkers = {:?}\n{extra}",
                s.layers.start, s.layers.end, s.workers
            );
        }
        out
    }

    /// Checks that the stages cover the model's blocks in order, name only
    /// workers that exist, each once per stage, and that a decoupled stage's
    /// sub-blocks add up to the model's N_d.
    pub fn check(&self, layout: &Layout) -> Result<(), InferError> {
        let fail = |m: String| Err(InferError::Placement(m));
        let layers = layout.layers();
        if self.workers == 0 {
            return fail("no workers".into());
        }
        if self.stages.is_empty() {
            return fail("no stages".into());
        }
        let mut next = 0;
        for (i, s) in self.stages.iter().enumerate() {
            if s.layers.start != next {
                return fail(format!(
                    "stage {i} starts at block {} but block {next} is the next one to place",
                    s.layers.start
                ));
            }
            if s.layers.is_empty() {
                return fail(format!("stage {i} holds no blocks"));
            }
            next = s.layers.end;
            if s.workers.is_empty() {
                return fail(format!("stage {i} names no workers"));
            }
            if let Some(w) = s.workers.iter().find(|&&w| w >= self.workers) {
                return fail(format!(
                    "stage {i} names worker {w}, but the placement has {} workers (0..{})",
                    self.workers,
                    self.workers - 1
                ));
            }
            let mut sorted = s.workers.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != s.workers.len() {
                return fail(format!("stage {i} names a worker twice: {:?}", s.workers));
            }
            match &s.mode {
                Mode::Single if s.workers.len() != 1 => {
                    return fail(format!(
                        "stage {i} is single but names {} workers (use replicated or tensor-parallel)",
                        s.workers.len()
                    ));
                }
                Mode::Decoupled { sub_blocks, .. } => {
                    if !layout.is_decoupled() {
                        return fail(format!("stage {i} is decoupled, but the model has no decoupled layers"));
                    }
                    if sub_blocks.len() != s.workers.len() {
                        return fail(format!(
                            "stage {i}: sub_blocks {sub_blocks:?} names {} counts for {} workers",
                            sub_blocks.len(),
                            s.workers.len()
                        ));
                    }
                    let sum = sub_blocks.iter().try_fold(0usize, |a, &n| a.checked_add(n));
                    if sum != Some(layout.divisions) {
                        return fail(format!(
                            "stage {i}: sub_blocks {sub_blocks:?} must add up to the {} sub-blocks \
                             of each decoupled layer",
                            layout.divisions
                        ));
                    }
                }
                _ => {}
            }
        }
        if next != layers {
            return fail(format!(
                "the stages end at block {next}, but the model has {layers} blocks"
            ));
        }
        Ok(())
    }
}

/// `divisions` sub-blocks over `workers` as evenly as they go, the first workers
/// taking one more (the first is the front, and a gather's root).
pub fn even(divisions: usize, workers: usize) -> Vec<usize> {
    (0..workers)
        .map(|i| divisions / workers + usize::from(i < divisions % workers))
        .collect()
}

/// Consecutive ranges of the lengths `counts`, from 0.
pub fn consecutive(counts: &[usize]) -> Vec<Range<usize>> {
    counts
        .iter()
        .scan(0, |at, &n| {
            *at += n;
            Some(*at - n..*at)
        })
        .collect()
}

fn parse_range(text: &str, layers: usize) -> Result<Range<usize>, String> {
    if text == "all" {
        return Ok(0..layers);
    }
    let (a, b) = text
        .split_once("..")
        .ok_or("expected START..END (END exclusive) or \"all\"")?;
    let a: usize = a.trim().parse().map_err(|_| format!("{a:?} is not a block number"))?;
    let b: usize = b.trim().parse().map_err(|_| format!("{b:?} is not a block number"))?;
    if b > layers {
        return Err(format!("the model has {layers} blocks"));
    }
    if a >= b {
        return Err("an empty range".into());
    }
    Ok(a..b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_placements_check() {
        assert!(Placement::named("single", &Layout::plain(6), 1).is_ok());
        let pp = Placement::named("pipeline", &Layout::plain(30), 4).unwrap();
        assert_eq!(
            pp.stages.iter().map(|s| s.layers.len()).collect::<Vec<_>>(),
            [7, 8, 7, 8]
        );
        let tp = Placement::named("tensor-parallel", &Layout::plain(6), 3).unwrap();
        assert_eq!(tp.stages[0].original_part(2), Some((2, 3)));
        assert_eq!(tp.stages[0].original_part(3), None);
        assert!(
            Placement::named("ring", &Layout::plain(6), 2)
                .unwrap_err()
                .to_string()
                .contains("unknown placement")
        );
    }

    #[test]
    fn a_file_mixes_modes() {
        let p = Placement::parse(
            "workers = 3\n[[stage]]\nlayers = \"0..4\"\nmode = \"tensor-parallel\"\nworkers = [0, 1]\n\
             [[stage]]\nlayers = \"4..6\"\nworkers = [2]\n",
            &Layout::plain(6),
        )
        .unwrap();
        assert_eq!(p.stages[0].mode, Mode::TensorParallel);
        assert_eq!(p.stages[1].original_part(2), Some((0, 1)));
    }

    #[test]
    fn bad_placements_say_what_is_wrong() {
        let err = |text: &str| Placement::parse(text, &Layout::plain(6)).unwrap_err().to_string();
        let missing = err("workers = 2\n[[stage]]\nlayers = \"all\"\nmode = \"tensor-parallel\"\nworkers = [0, 2]\n");
        assert!(
            missing.contains("names worker 2, but the placement has 2 workers"),
            "{missing}"
        );
        let gap = err(
            "workers = 2\n[[stage]]\nlayers = \"0..3\"\nworkers = [0]\n[[stage]]\nlayers = \"4..6\"\nworkers = [1]\n",
        );
        assert!(gap.contains("stage 1 starts at block 4 but block 3"), "{gap}");
        let short = err("workers = 1\n[[stage]]\nlayers = \"0..5\"\nworkers = [0]\n");
        assert!(short.contains("end at block 5, but the model has 6"), "{short}");
        let over = err("workers = 1\n[[stage]]\nlayers = \"0..9\"\nworkers = [0]\n");
        assert!(over.contains("the model has 6 blocks"), "{over}");
        let two = err("workers = 2\n[[stage]]\nlayers = \"all\"\nworkers = [0, 1]\n");
        assert!(two.contains("single but names 2 workers"), "{two}");
        let mode = err("workers = 1\n[[stage]]\nlayers = \"all\"\nmode = \"sideways\"\nworkers = [0]\n");
        assert!(mode.contains("sideways"), "{mode}");
    }

    /// A decoupled model of 6 blocks (N_b = 2: decoupled, decoupled, original,
    /// twice) cut into 4 sub-blocks.
    fn decoupled_layout() -> Layout {
        use LayerKind::{Decoupled as D, Original as O};
        Layout {
            kinds: vec![D, D, O, D, D, O],
            divisions: 4,
        }
    }

    #[test]
    fn a_decoupled_stage_shares_sub_blocks_and_runs_original_layers_its_way() {
        let layout = decoupled_layout();
        let p = Placement::parse(
            "workers = 3\n[[stage]]\nlayers = \"all\"\nmode = \"decoupled\"\nworkers = [2, 0, 1]\n\
             sub_blocks = [2, 0, 2]\noriginal = \"gather\"\n",
            &layout,
        )
        .unwrap();
        let s = &p.stages[0];
        assert_eq!(s.sub_block_ranges(4), [0..2, 2..2, 2..4]);
        assert_eq!(
            s.original_part(2),
            Some((0, 1)),
            "the first worker runs original layers"
        );
        assert_eq!(s.original_part(0), None);
        assert_eq!(s.holders_after(), [2]);
        assert_eq!(s.head_part(2), Some((0, 1)));
        // Written back, it reads the same.
        assert_eq!(Placement::parse(&p.to_toml(), &layout).unwrap(), p);
        // Without sub_blocks they are even; without original, tensor-parallel.
        let even = Placement::parse(
            "workers = 3\n[[stage]]\nlayers = \"all\"\nmode = \"decoupled\"\nworkers = [0, 1, 2]\n",
            &layout,
        )
        .unwrap();
        assert_eq!(even, Placement::named("decoupled", &layout, 3).unwrap());
        assert_eq!(even.stages[0].sub_block_ranges(4), [0..2, 2..3, 3..4]);
        assert_eq!(super::even(3, 4), [1, 1, 1, 0], "the first workers take the sub-blocks");
        assert_eq!(even.stages[0].original_part(1), Some((1, 3)));
        assert_eq!(even.stages[0].head_part(1), Some((1, 3)));
        // A tensor-parallel stage of a decoupled model spreads sub-blocks evenly too.
        let tp = Placement::named("tensor-parallel", &layout, 3).unwrap();
        assert_eq!(tp.stages[0].sub_block_ranges(4), even.stages[0].sub_block_ranges(4));
        assert_eq!(Placement::single(6).stages[0].sub_block_ranges(4), vec![0..4]);
        for p in [
            tp,
            Placement::pipeline(6, 4),
            Placement::named("decoupled-replicated", &layout, 2).unwrap(),
        ] {
            assert_eq!(Placement::parse(&p.to_toml(), &layout).unwrap(), p);
        }
    }

    #[test]
    fn a_wrong_decoupled_stage_names_the_stage_and_key() {
        let layout = decoupled_layout();
        let err = |text: &str, layout: &Layout| Placement::parse(text, layout).unwrap_err().to_string();
        let stage = "workers = 2\n[[stage]]\nlayers = \"all\"\nmode = \"decoupled\"\nworkers = [0, 1]\n";
        let sum = err(&format!("{stage}sub_blocks = [3, 2]\n"), &layout);
        assert!(
            sum.contains("stage 0: sub_blocks [3, 2] must add up to the 4 sub-blocks"),
            "{sum}"
        );
        let count = err(&format!("{stage}sub_blocks = [4]\n"), &layout);
        assert!(count.contains("names 1 counts for 2 workers"), "{count}");
        let huge = err(&format!("{stage}sub_blocks = [18446744073709551615, 5]\n"), &layout);
        assert!(huge.contains("must add up"), "{huge}");
        let plain = err(stage, &Layout::plain(6));
        assert!(
            plain.contains("stage 0 is decoupled, but the model has no decoupled layers"),
            "{plain}"
        );
        let stray = err(
            "workers = 2\n[[stage]]\nlayers = \"all\"\nmode = \"tensor-parallel\"\nworkers = [0, 1]\n\
             original = \"gather\"\n",
            &layout,
        );
        assert!(
            stray.contains("stage 0: sub_blocks and original belong to a decoupled stage"),
            "{stray}"
        );
        let how = err(&format!("{stage}original = \"sideways\"\n"), &layout);
        assert!(how.contains("sideways"), "{how}");
        let named = Placement::named("decoupled", &Layout::plain(6), 2)
            .unwrap_err()
            .to_string();
        assert!(named.contains("no decoupled layers"), "{named}");
    }
}
