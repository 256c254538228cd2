//! The optimiser, run by Hetero on flat parameter buffers.
//!
//! Hetero, not the task, owns the optimiser: its state is then a few plain vectors
//! that a checkpoint can save, a migration can hand to a surviving worker and a
//! parameter server can hold — none of which burn's per-tensor optimiser records
//! allow across processes. The arithmetic is burn 0.21's own (`AdamConfig` and
//! `SgdConfig` defaults), so a task trains as it would with burn's optimiser.

use hetero_job::Optimizer as OptimizerKind;
use serde::{Deserialize, Serialize};

const BETA_1: f32 = 0.9;
const BETA_2: f32 = 0.999;
const EPSILON: f32 = 1e-5;

/// Which optimiser, at which learning rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimizerConfig {
    /// Adam or plain SGD.
    pub kind: OptimizerKind,
    /// Step size.
    pub learning_rate: f64,
}

/// An optimiser's state: everything needed to continue exactly where it stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerState {
    /// Steps taken.
    pub time: u64,
    /// Adam's first moments (empty for SGD).
    pub moment_1: Vec<f32>,
    /// Adam's second moments (empty for SGD).
    pub moment_2: Vec<f32>,
}

/// An optimiser over one flat parameter buffer.
#[derive(Debug, Clone)]
pub struct FlatOptimizer {
    config: OptimizerConfig,
    state: OptimizerState,
}

impl FlatOptimizer {
    /// A fresh optimiser for `len` parameters.
    pub fn new(config: OptimizerConfig, len: usize) -> Self {
        let moments = match config.kind {
            OptimizerKind::Adam => len,
            OptimizerKind::Sgd => 0,
        };
        FlatOptimizer {
            config,
            state: OptimizerState {
                time: 0,
                moment_1: vec![0.0; moments],
                moment_2: vec![0.0; moments],
            },
        }
    }

    /// The configuration.
    pub fn config(&self) -> OptimizerConfig {
        self.config
    }

    /// The state, for a checkpoint or a hand-over.
    pub fn state(&self) -> &OptimizerState {
        &self.state
    }

    /// Continues from `state` (saved by [`FlatOptimizer::state`] for the same model).
    pub fn restore(&mut self, state: OptimizerState) -> Result<(), String> {
        if state.moment_1.len() != self.state.moment_1.len() || state.moment_2.len() != self.state.moment_2.len() {
            return Err(format!(
                "optimiser state holds {} moments, the model needs {}",
                state.moment_1.len(),
                self.state.moment_1.len()
            ));
        }
        self.state = state;
        Ok(())
    }

    /// The state as one buffer of floats (for a broadcast): time, then the moments.
    pub fn to_flat(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(2 + self.state.moment_1.len() * 2);
        // The step count is split in two exactly representable halves.
        out.push((self.state.time >> 20) as f32);
        out.push((self.state.time & 0xF_FFFF) as f32);
        out.extend_from_slice(&self.state.moment_1);
        out.extend_from_slice(&self.state.moment_2);
        out
    }

    /// Length of [`FlatOptimizer::to_flat`]'s buffer.
    pub fn flat_len(&self) -> usize {
        2 + self.state.moment_1.len() * 2
    }

    /// Restores a buffer written by [`FlatOptimizer::to_flat`].
    pub fn load_flat(&mut self, flat: &[f32]) {
        assert_eq!(flat.len(), self.flat_len(), "optimiser buffer does not fit");
        let n = self.state.moment_1.len();
        self.state.time = ((flat[0] as u64) << 20) | flat[1] as u64;
        self.state.moment_1.copy_from_slice(&flat[2..2 + n]);
        self.state.moment_2.copy_from_slice(&flat[2 + n..]);
    }

    /// One step: `params -= lr · update(grads)`.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32]) {
        assert_eq!(params.len(), grads.len(), "gradient buffer does not fit the parameters");
        let lr = self.config.learning_rate as f32;
        self.state.time += 1;
        match self.config.kind {
            OptimizerKind::Sgd => {
                for (p, g) in params.iter_mut().zip(grads) {
                    *p -= lr * g;
                }
            }
            OptimizerKind::Adam => {
                let time = self.state.time.min(i32::MAX as u64) as i32;
                let correction_2 = (1.0 - BETA_2.powi(time)).sqrt();
                let factor = correction_2 / (1.0 - BETA_1.powi(time));
                let epsilon = EPSILON * correction_2;
                let first = time == 1;
                let s = &mut self.state;
                for (((p, g), m), v) in params.iter_mut().zip(grads).zip(&mut s.moment_1).zip(&mut s.moment_2) {
                    // burn starts the moments at the first gradient, not at zero.
                    if first {
                        *m = g * (1.0 - BETA_1);
                        *v = g * g * (1.0 - BETA_2);
                    } else {
                        *m = BETA_1 * *m + (1.0 - BETA_1) * g;
                        *v = BETA_2 * *v + (1.0 - BETA_2) * g * g;
                    }
                    *p -= lr * (*m * factor / (v.sqrt() + epsilon));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::module::AutodiffModule;
    use burn::optim::{AdamConfig, GradientsParams, Optimizer, SgdConfig};
    use burn::prelude::*;
    use hetero_models::{Classifier, MlpConfig};

    use super::*;
    use crate::params;

    type B = Autodiff<Flex>;

    fn grads_of(model: &hetero_models::Mlp<B>, seed: f32) -> GradientsParams {
        let x = Tensor::<B, 4>::ones([3, 1, 28, 28], &Default::default()).mul_scalar(seed);
        let loss = model.forward(x).powf_scalar(2.0).mean();
        GradientsParams::from_grads(loss.backward(), model)
    }

    /// Three steps of our optimiser land where three steps of burn's land.
    #[test]
    fn matches_burns_optimisers() {
        for kind in [OptimizerKind::Adam, OptimizerKind::Sgd] {
            let model = MlpConfig::new().with_hidden(6).init::<B>(&Default::default());
            let mut ours_params = params::flatten(&model);
            let mut ours = FlatOptimizer::new(
                OptimizerConfig {
                    kind,
                    learning_rate: 0.01,
                },
                ours_params.len(),
            );
            let mut theirs = model.clone();
            let mut ours_model = model.clone();
            let mut adam = AdamConfig::new().init::<B, hetero_models::Mlp<B>>();
            let mut sgd = SgdConfig::new().init::<B, hetero_models::Mlp<B>>();
            for s in 0..3 {
                let seed = 0.5 + s as f32;
                let g = grads_of(&theirs, seed);
                theirs = match kind {
                    OptimizerKind::Adam => adam.step(0.01, theirs, g),
                    OptimizerKind::Sgd => sgd.step(0.01, theirs, g),
                };
                let mut g = grads_of(&ours_model, seed);
                let (flat, _) = params::take_grads(&ours_model, &mut g, 1.0);
                ours.step(&mut ours_params, &flat);
                ours_model = params::load(ours_model, &ours_params);
            }
            let expected = params::flatten(&theirs.valid());
            let worst = expected
                .iter()
                .zip(&ours_params)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-6, "{kind:?}: max difference {worst}");
        }
    }

    #[test]
    fn state_survives_a_flat_round_trip() {
        let config = OptimizerConfig {
            kind: OptimizerKind::Adam,
            learning_rate: 0.1,
        };
        let mut a = FlatOptimizer::new(config, 4);
        let mut p = vec![1.0, 2.0, 3.0, 4.0];
        a.step(&mut p, &[0.1, -0.2, 0.3, 0.0]);
        a.step(&mut p, &[0.1, 0.2, 0.3, 0.4]);
        let mut b = FlatOptimizer::new(config, 4);
        b.load_flat(&a.to_flat());
        assert_eq!(a.state(), b.state());
        let mut wrong = FlatOptimizer::new(config, 3);
        assert!(wrong.restore(a.state().clone()).is_err());
    }
}
