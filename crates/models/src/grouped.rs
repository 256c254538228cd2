//! Layers applied to N independent groups at once: the sub-blocks of a decoupled
//! layer (see [`crate::decouple`]).
//!
//! A decoupled layer's N_d sub-blocks have the same shapes, so their weights are
//! stacked along a first "group" axis and the group axis is carried through every
//! operation: one batched matrix product does what N_d small ones would, and group
//! `i` of every parameter is exactly sub-block `i` — what a device that holds only
//! some sub-blocks loads. Nothing here ever mixes groups.
//!
//! Activations are `[groups, batch, time, width]`.

use burn::module::{Param, ParamId};
use burn::nn::Initializer;
use burn::prelude::*;
use burn::tensor::TensorPrimitive;

/// One linear map per group: `y[g] = x[g] · weight[g] + bias[g]` (llama's have
/// no bias).
#[derive(Module, Debug)]
pub struct GroupedLinear<B: Backend> {
    /// `[groups, inputs, outputs]`.
    pub weight: Param<Tensor<B, 3>>,
    /// `[groups, outputs]`.
    pub bias: Option<Param<Tensor<B, 2>>>,
}

impl<B: Backend> GroupedLinear<B> {
    /// Freshly initialised as burn's `Linear` would initialise each group.
    pub fn new(groups: usize, inputs: usize, outputs: usize, device: &B::Device) -> Self {
        let init = Initializer::KaimingUniform {
            gain: 1.0 / 3f64.sqrt(),
            fan_out_only: false,
        };
        GroupedLinear {
            weight: init.init_with([groups, inputs, outputs], Some(inputs), Some(outputs), device),
            bias: Some(init.init_with([groups, outputs], Some(inputs), Some(outputs), device)),
        }
    }

    /// As [`GroupedLinear::new`], without a bias.
    pub fn without_bias(groups: usize, inputs: usize, outputs: usize, device: &B::Device) -> Self {
        GroupedLinear {
            bias: None,
            ..Self::new(groups, inputs, outputs, device)
        }
    }

    /// From given tensors (`[groups, inputs, outputs]` and `[groups, outputs]`).
    pub fn from_tensors(weight: Tensor<B, 3>, bias: Option<Tensor<B, 2>>) -> Self {
        GroupedLinear {
            weight: Param::initialized(ParamId::new(), weight),
            bias: bias.map(|b| Param::initialized(ParamId::new(), b)),
        }
    }

    /// # Shapes
    /// - x: `[groups, batch, time, inputs]`
    /// - returns: `[groups, batch, time, outputs]`
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [groups, batch, time, inputs] = x.dims();
        let [_, _, outputs] = self.weight.dims();
        let mut y = x.reshape([groups, batch * time, inputs]).matmul(self.weight.val());
        if let Some(bias) = &self.bias {
            y = y + bias.val().reshape([groups, 1, outputs]);
        }
        y.reshape([groups, batch, time, outputs])
    }
}

/// Layer normalisation of each group's features, with each group's own scale and
/// shift.
#[derive(Module, Debug)]
pub struct GroupedNorm<B: Backend> {
    /// `[groups, width]`.
    pub gamma: Param<Tensor<B, 2>>,
    /// `[groups, width]`.
    pub beta: Param<Tensor<B, 2>>,
    epsilon: f64,
}

impl<B: Backend> GroupedNorm<B> {
    /// Scale 1 and shift 0, as burn's `LayerNorm` starts (epsilon 1e-5).
    pub fn new(groups: usize, width: usize, device: &B::Device) -> Self {
        Self::from_tensors(
            Tensor::ones([groups, width], device),
            Tensor::zeros([groups, width], device),
            1e-5,
        )
    }

    /// From given scales and shifts (`[groups, width]` each).
    pub fn from_tensors(gamma: Tensor<B, 2>, beta: Tensor<B, 2>, epsilon: f64) -> Self {
        GroupedNorm {
            gamma: Param::initialized(ParamId::new(), gamma),
            beta: Param::initialized(ParamId::new(), beta),
            epsilon,
        }
    }

    /// Sets the epsilon added to the variance.
    pub fn set_epsilon(&mut self, epsilon: f64) {
        self.epsilon = epsilon;
    }

    /// # Shapes
    /// - x: `[groups, batch, time, width]`, normalised over `width`
    /// - returns: the same shape
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [groups, _, _, width] = x.dims();
        // The backend's fused normalisation (flex has a kernel for it and for its
        // gradient) with a unit scale; each group's own scale and shift follow.
        let unit = Tensor::<B, 1>::ones([width], &x.device());
        let normalised = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(B::layer_norm(
            x.into_primitive().tensor(),
            unit.into_primitive().tensor(),
            None,
            self.epsilon,
        )));
        normalised * self.gamma.val().reshape([groups, 1, 1, width]) + self.beta.val().reshape([groups, 1, 1, width])
    }
}

/// Root-mean-square normalisation of each group's features (llama's RMSNorm), with
/// each group's own scale.
#[derive(Module, Debug)]
pub struct GroupedRmsNorm<B: Backend> {
    /// `[groups, width]`.
    pub gamma: Param<Tensor<B, 2>>,
    epsilon: f64,
}

impl<B: Backend> GroupedRmsNorm<B> {
    /// From given scales (`[groups, width]`).
    pub fn from_tensor(gamma: Tensor<B, 2>, epsilon: f64) -> Self {
        GroupedRmsNorm {
            gamma: Param::initialized(ParamId::new(), gamma),
            epsilon,
        }
    }

    /// # Shapes
    /// - x: `[groups, batch, time, width]`, normalised over `width`
    /// - returns: the same shape
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [groups, _, _, width] = x.dims();
        // As burn's `RmsNorm`: x / sqrt(mean(x²) + ε), then the scale.
        let rms = (x.clone().square().mean_dim(3) + self.epsilon).sqrt();
        (x / rms) * self.gamma.val().reshape([groups, 1, 1, width])
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::nn::{LayerNormConfig, LinearConfig, RmsNormConfig};
    use burn::tensor::Distribution;

    use super::*;

    type B = Flex;

    /// Group `g` of a grouped layer computes exactly what burn's layer with group
    /// `g`'s parameters computes on group `g`'s input.
    #[test]
    fn each_group_is_an_ordinary_layer_on_its_own_input() {
        let device = Default::default();
        let x = Tensor::<B, 4>::random([3, 2, 5, 4], Distribution::Normal(0.0, 1.0), &device);
        let linear = GroupedLinear::<B>::new(3, 4, 6, &device);
        let norm = GroupedNorm::<B>::from_tensors(
            Tensor::random([3, 4], Distribution::Normal(1.0, 0.5), &device),
            Tensor::random([3, 4], Distribution::Normal(0.0, 0.5), &device),
            1e-5,
        );
        let (y, z) = (linear.forward(x.clone()), norm.forward(x.clone()));
        let r = GroupedRmsNorm::<B>::from_tensor(norm.gamma.val(), 1e-5).forward(x.clone());
        for g in 0..3 {
            let xg = x.clone().slice([g..g + 1]).squeeze_dim::<3>(0);
            let mut one = LinearConfig::new(4, 6).init::<B>(&device);
            one.weight = Param::initialized(ParamId::new(), linear.weight.val().slice([g..g + 1]).squeeze_dim(0));
            one.bias = Some(Param::initialized(
                ParamId::new(),
                linear.bias.as_ref().unwrap().val().slice([g..g + 1]).squeeze_dim(0),
            ));
            let mut ln = LayerNormConfig::new(4).init::<B>(&device);
            ln.gamma = Param::initialized(ParamId::new(), norm.gamma.val().slice([g..g + 1]).squeeze_dim(0));
            ln.beta = Some(Param::initialized(
                ParamId::new(),
                norm.beta.val().slice([g..g + 1]).squeeze_dim(0),
            ));
            let close = |a: Tensor<B, 3>, b: Tensor<B, 3>| (a - b).abs().max().into_scalar() < 1e-5;
            assert!(close(
                y.clone().slice([g..g + 1]).squeeze_dim(0),
                one.forward(xg.clone())
            ));
            assert!(close(
                z.clone().slice([g..g + 1]).squeeze_dim(0),
                ln.forward(xg.clone())
            ));
            let mut rms = RmsNormConfig::new(4).init::<B>(&device);
            rms.gamma = Param::initialized(ParamId::new(), norm.gamma.val().slice([g..g + 1]).squeeze_dim(0));
            assert!(close(r.clone().slice([g..g + 1]).squeeze_dim(0), rms.forward(xg)));
        }
    }
}
