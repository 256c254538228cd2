//! Where a step's activations are between two layers, and how they move.
//!
//! ## Design
//! Between layers the hidden state `[batch, seq, hidden]` is either *whole* on a
//! set of holders, or *sliced*: cut into N_d slices along the hidden width
//! (sub-block `i` of a decoupled layer reads and writes slice `i` only), each
//! worker of a stage keeping the slices of the sub-blocks it holds. The moves:
//! - whole → sliced is free for a holder (it narrows its copy); a worker that
//!   holds nothing gets just its slices from a holder (a scatter);
//! - sliced → whole on every worker of the stage is an all-gather
//!   ([`Mesh::all_gather`]: each slice crosses each link once);
//! - sliced → whole on one worker is a gather ([`Mesh::gather`]);
//! - whole → whole elsewhere is a copy from a holder to each worker that lacks it
//!   (a pipeline hand-off, or the fan-out to a tensor-parallel group).
//!
//! Every worker tracks the same [`Held`] — who holds what — derived from the
//! placement and the request's shape only, so every send meets its receive.

use std::ops::Range;
use std::time::Instant;

use burn::prelude::*;
use hetero_comm::Mesh;
use hetero_models::sub_blocks::{from_slices, to_slices};

use crate::InferError;
use crate::runtime::Timing;

/// The hidden state between two layers, as one worker sees it.
pub(crate) enum Held<B: Backend> {
    /// Whole on `holders`; `x` is this worker's copy (`None` if it is not one).
    Whole {
        /// This worker's copy.
        x: Option<Tensor<B, 3>>,
        /// The workers that hold it.
        holders: Vec<usize>,
    },
    /// Cut into N_d slices: worker `workers[i]` holds slices `ranges[i]`.
    Sliced {
        /// This worker's slices `[n, batch, seq, hidden / N_d]` (`None` when it
        /// holds none).
        mine: Option<Tensor<B, 4>>,
        /// The workers holding slices, in the order of their ranges.
        workers: Vec<usize>,
        /// Each worker's slices: all of them on each (a replicated stage), or a
        /// partition in ascending order.
        ranges: Vec<Range<usize>>,
    },
}

/// What moving activations needs: the mesh, the step's shape, and the clock
/// that communication time goes on.
pub(crate) struct Exchange<'a, B: Backend> {
    pub mesh: &'a mut Mesh,
    /// `[batch, seq, hidden]`.
    pub dims: [usize; 3],
    /// N_d (1 for an ordinary model).
    pub divisions: usize,
    pub timing: &'a mut Timing,
    pub device: &'a B::Device,
}

impl<B: Backend> Exchange<'_, B> {
    fn rank(&self) -> usize {
        self.mesh.rank()
    }

    /// Values in one slice.
    fn per_slice(&self) -> usize {
        let [batch, seq, d] = self.dims;
        batch * seq * (d / self.divisions)
    }

    fn slices_tensor(&self, values: Vec<f32>, n: usize) -> Tensor<B, 4> {
        let [batch, seq, d] = self.dims;
        Tensor::from_data(
            TensorData::new(values, [n, batch, seq, d / self.divisions]),
            self.device,
        )
    }

    /// The hidden state from all N_d slices, concatenated in order.
    fn whole_from(&self, all: Vec<f32>) -> Tensor<B, 3> {
        from_slices(self.slices_tensor(all, self.divisions))
    }

    /// The activations sliced as `ranges` over `workers` say.
    pub fn sliced(&mut self, held: Held<B>, workers: &[usize], ranges: &[Range<usize>]) -> Result<Held<B>, InferError> {
        let held = match held {
            Held::Sliced {
                mine,
                workers: w,
                ranges: r,
            } if w == workers && r == ranges => {
                return Ok(Held::Sliced {
                    mine,
                    workers: w,
                    ranges: r,
                });
            }
            // Sliced another way (another stage's split): whole again first.
            sliced @ Held::Sliced { .. } => self.whole(sliced, workers)?,
            whole => whole,
        };
        let Held::Whole { x, holders } = held else {
            unreachable!("made whole above")
        };
        let clock = Instant::now();
        let me = self.rank();
        let cut = |x: &Tensor<B, 3>, range: &Range<usize>| {
            to_slices(x.clone(), self.divisions).narrow(0, range.start, range.len())
        };
        // Workers without a copy receive their slices from a holder, round-robin.
        let mut mine = None;
        let needers = workers
            .iter()
            .zip(ranges)
            .filter(|(w, r)| !holders.contains(w) && !r.is_empty());
        for (j, (&w, range)) in needers.enumerate() {
            let source = holders[j % holders.len()];
            if me == source {
                let x = x.as_ref().expect("a holder holds the activations");
                self.mesh.send(w, &flat(cut(x, range)))?;
            } else if me == w {
                let mut values = vec![0f32; range.len() * self.per_slice()];
                self.mesh.recv(source, &mut values)?;
                mine = Some(self.slices_tensor(values, range.len()));
            }
        }
        if let (Some(x), Some(i)) = (&x, workers.iter().position(|&w| w == me))
            && !ranges[i].is_empty()
        {
            mine = Some(cut(x, &ranges[i]));
        }
        self.timing.communication += clock.elapsed();
        Ok(Held::Sliced {
            mine,
            workers: workers.to_vec(),
            ranges: ranges.to_vec(),
        })
    }

    /// The activations whole on every worker of `to`.
    pub fn whole(&mut self, held: Held<B>, to: &[usize]) -> Result<Held<B>, InferError> {
        let clock = Instant::now();
        let me = self.rank();
        let held = match held {
            Held::Sliced { mine, workers, ranges } if ranges.iter().all(|r| r.len() == self.divisions) => {
                // Every slice holder holds them all (a replicated stage).
                Held::Whole {
                    x: mine.map(from_slices),
                    holders: workers,
                }
            }
            Held::Sliced { mine, workers, ranges } => {
                let sizes: Vec<usize> = ranges.iter().map(|r| r.len() * self.per_slice()).collect();
                let values = mine.map(flat).unwrap_or_default();
                let member = workers.contains(&me);
                if same_set(&workers, to) {
                    let all = match member {
                        true => Some(self.mesh.all_gather(&workers, &values, &sizes)?),
                        false => None,
                    };
                    Held::Whole {
                        x: all.map(|all| self.whole_from(all)),
                        holders: workers,
                    }
                } else {
                    let root = if workers.contains(&to[0]) { to[0] } else { workers[0] };
                    let all = match member {
                        true => self.mesh.gather(&workers, root, &values, &sizes)?,
                        false => None,
                    };
                    Held::Whole {
                        x: all.map(|all| self.whole_from(all)),
                        holders: vec![root],
                    }
                }
            }
            whole => whole,
        };
        let Held::Whole { x, holders } = held else {
            unreachable!("made whole above")
        };
        // Copies to the workers of `to` that lack one; holders outside `to` drop theirs.
        let needers: Vec<usize> = to.iter().copied().filter(|w| !holders.contains(w)).collect();
        let mut x = x;
        let mut sent = None;
        for (j, &w) in needers.iter().enumerate() {
            let source = holders[j % holders.len()];
            if me == source {
                let values = sent.get_or_insert_with(|| flat(x.clone().expect("a holder holds the activations")));
                self.mesh.send(w, values)?;
            } else if me == w {
                let mut values = vec![0f32; self.dims.iter().product()];
                self.mesh.recv(source, &mut values)?;
                x = Some(Tensor::from_data(TensorData::new(values, self.dims), self.device));
            }
        }
        self.timing.communication += clock.elapsed();
        Ok(Held::Whole {
            x: x.filter(|_| to.contains(&me)),
            holders: to.to_vec(),
        })
    }

    /// `t` summed over `group` (a tensor-parallel layer's partial results); `t`
    /// itself outside one.
    pub fn reduce(&mut self, group: &[usize], t: Tensor<B, 3>) -> Result<Tensor<B, 3>, InferError> {
        if group.is_empty() {
            return Ok(t);
        }
        let clock = Instant::now();
        let dims = t.dims();
        let mut v = flat(t);
        self.mesh.allreduce_sum(group, &mut v)?;
        self.timing.communication += clock.elapsed();
        Ok(Tensor::from_data(TensorData::new(v, dims), self.device))
    }

    /// `v` summed over `group` in place (as [`Exchange::reduce`], for the flat
    /// buffers of the quantized path); untouched outside one.
    pub fn reduce_slice(&mut self, group: &[usize], v: &mut [f32]) -> Result<(), InferError> {
        if group.is_empty() {
            return Ok(());
        }
        let clock = Instant::now();
        self.mesh.allreduce_sum(group, v)?;
        self.timing.communication += clock.elapsed();
        Ok(())
    }
}

/// A tensor's values, row-major.
pub(crate) fn flat<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().expect("f32 activations")
}

fn same_set(a: &[usize], b: &[usize]) -> bool {
    a.len() == b.len() && a.iter().all(|w| b.contains(w))
}
