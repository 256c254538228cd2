//! Placements: which workers run which layers, and how — data, not code.
//!
//! A placement is a list of *stages* over the model's blocks, in order. Each stage
//! names a contiguous range of blocks, the workers that run it, and a mode:
//! - `single`: one worker runs the blocks;
//! - `replicated`: every named worker runs the whole blocks (no communication
//!   inside the stage; the activations reach each of them);
//! - `tensor-parallel`: the workers split every block's heads and FFN units
//!   (Megatron style: two all-reduces per block).
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

use std::ops::Range;
use std::path::Path;

use serde::Deserialize;

use crate::InferError;

/// How a stage's workers share its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// One worker runs the blocks.
    Single,
    /// Every worker runs the whole blocks.
    Replicated,
    /// The workers split each block's heads and FFN units.
    TensorParallel,
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
    /// This worker's part of the stage as `(index, of)`: `None` when it has none.
    pub fn part_of(&self, rank: usize) -> Option<(usize, usize)> {
        let index = self.workers.iter().position(|&w| w == rank)?;
        Some(match self.mode {
            Mode::TensorParallel => (index, self.workers.len()),
            Mode::Single | Mode::Replicated => (0, 1),
        })
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StageFile {
    layers: String,
    #[serde(default = "single")]
    mode: Mode,
    workers: Vec<usize>,
}

fn single() -> Mode {
    Mode::Single
}

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
                    layers: hetero_models::checkpoint::span(layers, w, workers),
                    mode: Mode::Single,
                    workers: vec![w],
                })
                .filter(|s| !s.layers.is_empty())
                .collect(),
        }
    }

    /// One of the built-in placements by name over `workers` workers: `single`
    /// (everything on worker 0, the others idle), `tensor-parallel` or `pipeline`.
    pub fn named(name: &str, layers: usize, workers: usize) -> Result<Self, InferError> {
        let p = match name {
            "single" => Placement {
                workers: workers.max(1),
                ..Self::single(layers)
            },
            "tensor-parallel" | "tp" => Self::tensor_parallel(layers, workers),
            "pipeline" | "pp" => Self::pipeline(layers, workers),
            other => {
                return Err(InferError::Placement(format!(
                    "unknown placement {other:?}: use single, tensor-parallel, pipeline, or a placement file"
                )));
            }
        };
        p.check(layers)?;
        Ok(p)
    }

    /// Reads a placement file and checks it against a model of `layers` blocks.
    pub fn load(path: &Path, layers: usize) -> Result<Self, InferError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| InferError::Placement(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text, layers).map_err(|e| match e {
            InferError::Placement(m) => InferError::Placement(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses a placement and checks it against a model of `layers` blocks.
    pub fn parse(text: &str, layers: usize) -> Result<Self, InferError> {
        let file: File = toml::from_str(text).map_err(|e| InferError::Placement(e.to_string()))?;
        let stages = file
            .stages
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                Ok(Stage {
                    layers: parse_range(&s.layers, layers)
                        .map_err(|m| InferError::Placement(format!("stage {i}: layers {:?}: {m}", s.layers)))?,
                    mode: s.mode,
                    workers: s.workers,
                })
            })
            .collect::<Result<Vec<_>, InferError>>()?;
        let p = Placement {
            workers: file.workers,
            stages,
        };
        p.check(layers)?;
        Ok(p)
    }

    /// Checks that the stages cover blocks `0..layers` in order and name only
    /// workers that exist, each once per stage.
    pub fn check(&self, layers: usize) -> Result<(), InferError> {
        let fail = |m: String| Err(InferError::Placement(m));
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
            if s.mode == Mode::Single && s.workers.len() != 1 {
                return fail(format!(
                    "stage {i} is single but names {} workers (use replicated or tensor-parallel)",
                    s.workers.len()
                ));
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
        assert!(Placement::named("single", 6, 1).is_ok());
        let pp = Placement::named("pipeline", 30, 4).unwrap();
        assert_eq!(
            pp.stages.iter().map(|s| s.layers.len()).collect::<Vec<_>>(),
            [7, 8, 7, 8]
        );
        let tp = Placement::named("tensor-parallel", 6, 3).unwrap();
        assert_eq!(tp.stages[0].part_of(2), Some((2, 3)));
        assert_eq!(tp.stages[0].part_of(3), None);
        assert!(
            Placement::named("ring", 6, 2)
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
            6,
        )
        .unwrap();
        assert_eq!(p.stages[0].mode, Mode::TensorParallel);
        assert_eq!(p.stages[1].part_of(2), Some((0, 1)));
    }

    #[test]
    fn bad_placements_say_what_is_wrong() {
        let err = |text: &str| Placement::parse(text, 6).unwrap_err().to_string();
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
}
