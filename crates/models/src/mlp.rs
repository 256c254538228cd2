//! A two-layer perceptron: 784 → hidden → 10 with ReLU. Cheap to train, which makes
//! it the model of the fast end-to-end tests.

use burn::nn::{Linear, LinearConfig, Relu};
use burn::prelude::*;

use crate::Classifier;

/// Sizes of the MLP.
#[derive(Config, Debug)]
pub struct MlpConfig {
    /// Input features (28·28 for Fashion-MNIST).
    #[config(default = 784)]
    pub inputs: usize,
    /// Hidden width.
    #[config(default = 256)]
    pub hidden: usize,
    /// Output classes.
    #[config(default = 10)]
    pub classes: usize,
}

/// `inputs → hidden → classes`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    fc1: Linear<B>,
    fc2: Linear<B>,
    act: Relu,
}

impl MlpConfig {
    /// Builds the network with random weights on `device`.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Mlp<B> {
        Mlp {
            fc1: LinearConfig::new(self.inputs, self.hidden).init(device),
            fc2: LinearConfig::new(self.hidden, self.classes).init(device),
            act: Relu::new(),
        }
    }
}

impl<B: Backend> Classifier<B> for Mlp<B> {
    fn forward(&self, images: Tensor<B, 4>) -> Tensor<B, 2> {
        let x = images.flatten::<2>(1, 3); // (B, 784)
        self.fc2.forward(self.act.forward(self.fc1.forward(x)))
    }
}
