//! Parameters and gradients as one flat `f32` buffer, the form collectives work on.
//!
//! Every worker visits its model's float parameters in the same order (the module
//! tree's order, fixed by the model's code), so position `i` of the buffer means the
//! same scalar on every worker. A parameter without a gradient contributes zeros, so
//! the layout never depends on what one worker's batch touched.

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::backend::AutodiffBackend;

pub use hetero_models::checkpoint::{count, flatten, load_flat as load};

/// Draws every lazily initialised parameter of `model` now.
///
/// burn creates a module's parameters lazily: the random draw happens when a
/// parameter is first read, not when the module is built.
pub fn materialize<B: Backend, M: Module<B>>(model: &M) {
    hetero_models::checkpoint::draw(model);
}

/// Where each parameter's gradient sits in a flat gradient buffer.
#[derive(Debug, Clone)]
pub struct GradLayout<B: AutodiffBackend> {
    entries: Vec<(ParamId, Vec<usize>, burn::tensor::Device<B::InnerBackend>)>,
}

/// Moves the gradients of `model`'s parameters out of `grads` into one buffer,
/// multiplied by `scale`. Returns the buffer and its layout.
pub fn take_grads<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    scale: f32,
) -> (Vec<f32>, GradLayout<B>) {
    struct Take<'a, B: AutodiffBackend> {
        grads: &'a mut GradientsParams,
        scale: f32,
        flat: Vec<f32>,
        layout: GradLayout<B>,
        device: Option<burn::tensor::Device<B::InnerBackend>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Take<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let shape = param.shape();
            match self.grads.remove::<B::InnerBackend, D>(param.id) {
                Some(g) => {
                    let device = g.device();
                    let data = g.into_data().convert::<f32>();
                    let scale = self.scale;
                    self.flat
                        .extend(data.to_vec::<f32>().expect("f32").into_iter().map(|v| v * scale));
                    self.device.get_or_insert(device.clone());
                    self.layout.entries.push((param.id, shape.to_vec(), device));
                }
                None => {
                    let device = self.device.clone().unwrap_or_else(|| param.val().inner().device());
                    self.flat.extend(std::iter::repeat_n(0.0, shape.num_elements()));
                    self.layout.entries.push((param.id, shape.to_vec(), device));
                }
            }
        }
    }
    let mut t = Take::<B> {
        grads,
        scale,
        flat: Vec::new(),
        layout: GradLayout { entries: Vec::new() },
        device: None,
    };
    model.visit(&mut t);
    (t.flat, t.layout)
}

/// Rebuilds gradients from a flat buffer laid out by [`take_grads`].
pub fn grads_from_flat<B: AutodiffBackend>(layout: &GradLayout<B>, flat: &[f32]) -> GradientsParams {
    fn register<B: Backend, const D: usize>(
        grads: &mut GradientsParams,
        id: ParamId,
        values: Vec<f32>,
        shape: &[usize],
        device: &B::Device,
    ) {
        let t = Tensor::<B, D>::from_data(TensorData::new(values, shape.to_vec()), device);
        grads.register::<B, D>(id, t);
    }
    let mut grads = GradientsParams::new();
    let mut at = 0;
    for (id, shape, device) in &layout.entries {
        let n: usize = shape.iter().product();
        let values = flat[at..at + n].to_vec();
        at += n;
        type I<B> = <B as AutodiffBackend>::InnerBackend;
        match shape.len() {
            1 => register::<I<B>, 1>(&mut grads, *id, values, shape, device),
            2 => register::<I<B>, 2>(&mut grads, *id, values, shape, device),
            3 => register::<I<B>, 3>(&mut grads, *id, values, shape, device),
            4 => register::<I<B>, 4>(&mut grads, *id, values, shape, device),
            5 => register::<I<B>, 5>(&mut grads, *id, values, shape, device),
            6 => register::<I<B>, 6>(&mut grads, *id, values, shape, device),
            d => panic!("parameters of rank {d} are not supported (at most 6)"),
        }
    }
    grads
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use hetero_models::{Classifier, MlpConfig};

    use super::*;

    type B = Autodiff<Flex>;

    #[test]
    fn flatten_load_round_trip() {
        let device = Default::default();
        let a = MlpConfig::new().with_hidden(8).init::<B>(&device);
        let b = MlpConfig::new().with_hidden(8).init::<B>(&device);
        let fa = flatten(&a);
        assert_eq!(fa.len(), count(&a));
        assert_eq!(fa.len(), 784 * 8 + 8 + 8 * 10 + 10);
        let b = load(b, &fa);
        assert_eq!(flatten(&b), fa);
    }

    #[test]
    fn grads_round_trip_through_a_flat_buffer() {
        let device = Default::default();
        let model = MlpConfig::new().with_hidden(4).init::<B>(&device);
        let x = Tensor::<B, 4>::ones([2, 1, 28, 28], &device);
        let loss = model.forward(x).sum();
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        assert_eq!(grads.len(), 4);
        let (flat, layout) = take_grads(&model, &mut grads, 0.5);
        assert!(grads.is_empty());
        assert_eq!(flat.len(), count(&model));
        let mut rebuilt = grads_from_flat(&layout, &flat);
        assert_eq!(rebuilt.len(), 4);
        let (again, _) = take_grads(&model, &mut rebuilt, 2.0);
        assert_eq!(again, flat.iter().map(|v| v * 2.0).collect::<Vec<_>>());
    }
}
