//! The small CNN of the Fashion-MNIST main job (the same network as the PyTorch
//! script users compare us with): conv 1→32 3×3, pool, conv 32→64 3×3, pool,
//! fc 3136→128, fc 128→10.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::prelude::*;

use crate::Classifier;

/// Sizes of the CNN.
#[derive(Config, Debug)]
pub struct CnnConfig {
    /// Output classes.
    #[config(default = 10)]
    pub classes: usize,
    /// Width of the hidden fully connected layer.
    #[config(default = 128)]
    pub hidden: usize,
}

/// Two conv/pool stages and two fully connected layers.
#[derive(Module, Debug)]
pub struct Cnn<B: Backend> {
    conv1: Conv2d<B>,
    conv2: Conv2d<B>,
    pool: MaxPool2d,
    fc1: Linear<B>,
    fc2: Linear<B>,
    act: Relu,
}

impl CnnConfig {
    /// Builds the network with random weights on `device`.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Cnn<B> {
        let conv = |i, o| {
            Conv2dConfig::new([i, o], [3, 3])
                .with_padding(PaddingConfig2d::Same)
                .init(device)
        };
        Cnn {
            conv1: conv(1, 32),
            conv2: conv(32, 64),
            pool: MaxPool2dConfig::new([2, 2]).with_strides([2, 2]).init(),
            fc1: LinearConfig::new(64 * 7 * 7, self.hidden).init(device),
            fc2: LinearConfig::new(self.hidden, self.classes).init(device),
            act: Relu::new(),
        }
    }
}

impl<B: Backend> Classifier<B> for Cnn<B> {
    fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        let features = self.convolutions(images);
        self.head(features)
    }

    /// The convolutions: a twentieth of the parameters, most of the compute.
    fn body(&self, images: Tensor<B, 4>) -> Result<Tensor<B, 2>, Tensor<B, 4>> {
        Ok(self.convolutions(images))
    }

    /// The fully connected layers: most of the parameters, little compute.
    fn head(&self, features: Tensor<B, 2>) -> Tensor<B, 2> {
        self.fc2.forward(self.act.forward(self.fc1.forward(features))) // (B, classes)
    }

    fn head_params(&self) -> Option<usize> {
        Some(crate::checkpoint::count(&self.fc1) + crate::checkpoint::count(&self.fc2))
    }
}

impl<B: Backend> Cnn<B> {
    /// # Shapes
    /// - images: `[batch, 1, 28, 28]`
    /// - returns: `[batch, 3136]`
    fn convolutions(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = self.pool.forward(self.act.forward(self.conv1.forward(images))); // (B, 32, 14, 14)
        let x = self.pool.forward(self.act.forward(self.conv2.forward(x))); // (B, 64, 7, 7)
        x.flatten::<2>(1, 3) // (B, 3136)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;

    use super::*;

    #[test]
    fn the_head_over_the_body_is_the_network_and_holds_the_last_parameters() {
        let device = Default::default();
        let model = CnnConfig::new().init::<Flex>(&device);
        let images = Tensor::<Flex, 4>::random([2, 1, 28, 28], burn::tensor::Distribution::Default, &device);
        let whole = model.forward(images.clone());
        let parts = model.head(model.body(images).unwrap());
        whole.into_data().assert_eq(&parts.into_data(), true);
        // Visiting order puts fc1 and fc2 last: the head is the flat tail.
        let flat = crate::checkpoint::flatten(&model);
        let head = model.head_params().unwrap();
        let fc2_bias = model
            .fc2
            .bias
            .as_ref()
            .unwrap()
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(&flat[flat.len() - fc2_bias.len()..], &fc2_bias[..]);
        let fc1_weight = model.fc1.weight.val().into_data().to_vec::<f32>().unwrap();
        assert_eq!(
            &flat[flat.len() - head..flat.len() - head + fc1_weight.len()],
            &fc1_weight[..]
        );
    }

    #[test]
    fn output_shape() {
        let device = Default::default();
        let model = CnnConfig::new().init::<Flex>(&device);
        let out = model.forward(Tensor::zeros([3, 1, 28, 28], &device));
        assert_eq!(out.dims(), [3, 10]);
    }
}
