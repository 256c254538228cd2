//! Reading a model's tensors out of a checkpoint, whole or as one worker's part.
//!
//! The models here do not know file formats: a loader asks a [`Source`] for a
//! tensor by its checkpoint name and expected shape, and gets its values row-major
//! (safetensors, GGUF and random weights all answer so in `hetero-infer`). The
//! source's error type passes through untouched, so a missing tensor is reported
//! with the file it is missing from.
//!
//! Tensor parallelism (Megatron style) cuts a PyTorch-layout `[out, in]` weight two
//! ways: keeping some output rows (each worker computes some heads or FFN units) or
//! some input columns (each worker computes a partial sum that the group adds).
//! [`span`] says which rows or columns a worker's part is.
//!
//! A training checkpoint holds a model's parameters as one flat buffer in the
//! module tree's order ([`flatten`], [`load_flat`]).

use std::ops::Range;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::nn::{Linear, LinearConfig};
use burn::prelude::*;

/// Where a loader gets tensors: `(name, shape)` → row-major values of that shape.
pub type Source<'a, E> = dyn FnMut(&str, &[usize]) -> Result<Vec<f32>, E> + 'a;

/// A worker's part of a block: the `index`-th of `of` balanced parts.
pub type Part = (usize, usize);

/// The `index`-th of `of` balanced parts of `0..total`: the first parts are one
/// shorter when `total` does not divide (3 heads over 2 workers: `0..1`, `1..3`).
pub fn span(total: usize, index: usize, of: usize) -> Range<usize> {
    total * index / of..total * (index + 1) / of
}

/// `[cols, rows]` from a row-major `[rows, cols]` matrix, laid out contiguously (a
/// transposed *view* would make every matmul copy the weight first).
pub fn transposed<B: Backend>(m: &[f32], rows: usize, cols: usize, device: &B::Device) -> Tensor<B, 2> {
    let mut t = vec![0f32; rows * cols];
    for r in 0..rows {
        for (c, v) in m[r * cols..(r + 1) * cols].iter().enumerate() {
            t[c * rows + r] = *v;
        }
    }
    Tensor::from_data(TensorData::new(t, [cols, rows]), device)
}

/// Output rows `keep` of a row-major `[out, in]` weight (a column split: some
/// heads or units), with the same rows of `bias`, as a burn `Linear`; `None` when
/// `keep` is empty.
pub fn output_rows<B: Backend>(
    w: &[f32],
    bias: Option<&[f32]>,
    inp: usize,
    keep: Range<usize>,
    device: &B::Device,
) -> Option<Linear<B>> {
    if keep.is_empty() {
        return None;
    }
    let rows = keep.len();
    let mut linear = LinearConfig::new(inp, rows).with_bias(bias.is_some()).init(device);
    linear.weight = param(transposed(&w[keep.start * inp..keep.end * inp], rows, inp, device));
    linear.bias = bias.map(|b| param(vector(&b[keep], device)));
    Some(linear)
}

/// Input columns `keep` of a row-major `[out, in]` weight (a row split: a partial
/// sum the group adds), without bias; `None` when `keep` is empty.
pub fn input_columns<B: Backend>(
    w: &[f32],
    out: usize,
    inp: usize,
    keep: Range<usize>,
    device: &B::Device,
) -> Option<Linear<B>> {
    if keep.is_empty() {
        return None;
    }
    let cols = keep.len();
    let mut slice = Vec::with_capacity(out * cols);
    for r in 0..out {
        slice.extend_from_slice(&w[r * inp + keep.start..r * inp + keep.end]);
    }
    let mut linear = LinearConfig::new(cols, out).with_bias(false).init(device);
    linear.weight = param(transposed(&slice, out, cols, device));
    Some(linear)
}

/// A parameter holding `t` as it is (not drawn lazily).
pub fn param<B: Backend, const D: usize>(t: Tensor<B, D>) -> Param<Tensor<B, D>> {
    Param::initialized(ParamId::new(), t)
}

/// A vector (a bias or a norm's scale) as a tensor.
pub fn vector<B: Backend>(v: &[f32], device: &B::Device) -> Tensor<B, 1> {
    Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), device)
}

/// Reads every parameter of `module` once, so lazily initialised ones are drawn:
/// burn draws a parameter on first read, and a clone of an undrawn parameter
/// draws its own values, so a module is drawn before any of it is copied.
pub fn draw<B: Backend, M: Module<B>>(module: &M) {
    struct Draw;
    impl<B: Backend> ModuleVisitor<B> for Draw {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Draw);
}

/// All float parameters of `model`, concatenated.
pub fn flatten<B: Backend, M: Module<B>>(model: &M) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl<B: Backend> ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let data = param.val().into_data().convert::<f32>();
            self.0.extend(data.to_vec::<f32>().expect("converted to f32"));
        }
    }
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

/// Number of float scalars in `model`.
pub fn count<B: Backend, M: Module<B>>(model: &M) -> usize {
    struct Count(usize);
    impl<B: Backend> ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0 += param.shape().num_elements();
        }
    }
    let mut c = Count(0);
    model.visit(&mut c);
    c.0
}

/// `model` with its float parameters replaced by `flat` (as produced by [`flatten`]:
/// a training checkpoint's parameters).
/// Parameter ids are kept, so optimiser state stays attached.
///
/// # Panics
/// If `flat` does not have exactly [`count`] elements: that is a programming error.
pub fn load_flat<B: Backend, M: Module<B>>(model: M, flat: &[f32]) -> M {
    struct Load<'a> {
        flat: &'a [f32],
        at: usize,
    }
    impl<B: Backend> ModuleMapper<B> for Load<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let shape = param.shape();
            let n = shape.num_elements();
            let values = self.flat[self.at..self.at + n].to_vec();
            self.at += n;
            param.map(|old| {
                let fresh = Tensor::<B, D>::from_data(TensorData::new(values, shape), &old.device());
                if old.is_require_grad() {
                    fresh.require_grad()
                } else {
                    fresh
                }
            })
        }
    }
    assert_eq!(
        flat.len(),
        count(&model),
        "flat parameter buffer does not fit the model"
    );
    let mut mapper = Load { flat, at: 0 };
    model.map(&mut mapper)
}

/// A tensor as weight files hold it: name, row-major shape (outer first), values.
#[derive(Debug, Clone, PartialEq)]
pub struct Named {
    /// The checkpoint name.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// The values.
    pub values: Vec<f32>,
}

impl Named {
    /// A tensor's values under `name`.
    pub fn of<B: Backend, const D: usize>(name: impl Into<String>, t: Tensor<B, D>) -> Self {
        Named {
            name: name.into(),
            shape: t.dims().to_vec(),
            values: t
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .expect("converted to f32"),
        }
    }
}

/// The path of the parameter being visited: the fields, enum variants and
/// indices that lead to it, joined by dots after `prefix`
/// (`layers.2.Decoupled.query.weight`). burn names each step when it enters it.
struct ModulePath {
    prefix: String,
    steps: Vec<String>,
}

impl ModulePath {
    fn new(prefix: &str) -> Self {
        ModulePath {
            prefix: prefix.to_string(),
            steps: Vec::new(),
        }
    }

    fn name(&self) -> String {
        format!("{}{}", self.prefix, self.steps.join("."))
    }
}

/// Every float parameter of `module` under its path in the module tree (see
/// [`load_named`]), each name after `prefix`: the format-free half of saving a
/// module whose layout no checkpoint convention describes (sub-blocks).
pub fn named<B: Backend, M: Module<B>>(module: &M, prefix: &str) -> Vec<Named> {
    struct Collect(ModulePath, Vec<Named>);
    impl<B: Backend> ModuleVisitor<B> for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.0.steps.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.0.steps.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.1.push(Named::of(self.0.name(), param.val()));
        }
    }
    let mut c = Collect(ModulePath::new(prefix), Vec::new());
    module.visit(&mut c);
    c.1
}

/// `module` with every float parameter read from `source` under the name
/// [`named`] gives it, at the shape `module` has: a module built at the right
/// shape (random or zero) filled from a file. The first tensor the source
/// refuses (missing, wrong shape) is the error.
pub fn load_named<B: Backend, M: Module<B>, E>(module: M, prefix: &str, source: &mut Source<'_, E>) -> Result<M, E> {
    struct Fill<'a, 'b, E> {
        path: ModulePath,
        source: &'a mut Source<'b, E>,
        error: Option<E>,
    }
    impl<B: Backend, E> ModuleMapper<B> for Fill<'_, '_, E> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.steps.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.steps.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            if self.error.is_some() {
                return param;
            }
            let shape = param.shape();
            match (self.source)(&self.path.name(), shape.as_slice()) {
                Ok(values) => param.map(|old| Tensor::from_data(TensorData::new(values, shape), &old.device())),
                Err(e) => {
                    self.error = Some(e);
                    param
                }
            }
        }
    }
    let mut fill = Fill {
        path: ModulePath::new(prefix),
        source,
        error: None,
    };
    let module = module.map(&mut fill);
    match fill.error {
        Some(e) => Err(e),
        None => Ok(module),
    }
}

/// `module` with every float parameter cut to `groups` along its first axis: a
/// device's share of stacked sub-blocks ([`crate::sub_blocks`]), whose every
/// parameter has the group axis first.
pub fn narrow_groups<B: Backend, M: Module<B>>(module: M, groups: Range<usize>) -> M {
    struct Narrow(Range<usize>);
    impl<B: Backend> ModuleMapper<B> for Narrow {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let r = self.0.clone();
            param.map(|t| t.narrow(0, r.start, r.len()))
        }
    }
    module.map(&mut Narrow(groups))
}

/// `module` with every float parameter a leaf of its own that takes a gradient.
///
/// Weights read from a file, or cut out of another model's, are plain tensors: on an
/// autodiff backend they take no gradient, and a slice of another model's parameter
/// would pass its gradient back to that parameter. A model built so and then
/// trained (a distillation's student) goes through this first.
pub fn trainable<B: Backend, M: Module<B>>(module: M) -> M {
    struct Leaves;
    impl<B: Backend> ModuleMapper<B> for Leaves {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let id = param.id;
            Param::initialized(id, param.val().detach().require_grad())
        }
    }
    module.map(&mut Leaves)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_cover_everything_once_even_when_uneven() {
        for (total, of) in [(12, 5), (3, 2), (1536, 3), (2, 3)] {
            let parts: Vec<_> = (0..of).map(|i| span(total, i, of)).collect();
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts[of - 1].end, total);
            assert!(parts.windows(2).all(|w| w[0].end == w[1].start));
        }
        assert_eq!(span(3, 0, 2), 0..1);
    }

    #[test]
    fn row_and_column_parts_make_up_the_whole() {
        use burn::backend::Flex;
        let device = Default::default();
        let (out, inp) = (5, 4);
        let w: Vec<f32> = (0..out * inp).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..out).map(|i| i as f32).collect();
        let x = Tensor::<Flex, 3>::from_data(
            TensorData::new((0..8).map(|i| i as f32 * 0.1).collect(), [1, 2, inp]),
            &device,
        );
        let rows = |keep| output_rows::<Flex>(&w, Some(&b), inp, keep, &device).unwrap();
        let whole = rows(0..out).forward(x.clone());
        // Output rows: the parts side by side are the whole.
        let joined = Tensor::cat(vec![rows(0..2).forward(x.clone()), rows(2..5).forward(x.clone())], 2);
        assert!((whole.clone() - joined).abs().max().into_scalar() < 1e-6);
        // Input columns: the partial sums add up to the whole (without bias).
        let cols = |keep| input_columns::<Flex>(&w, out, inp, keep, &device).unwrap();
        let a = cols(0..1).forward(x.clone().slice([0..1, 0..2, 0..1]));
        let c = cols(1..4).forward(x.slice([0..1, 0..2, 1..4]));
        let sum = a + c + vector::<Flex>(&b, &device).unsqueeze();
        assert!((whole - sum).abs().max().into_scalar() < 1e-5);
        assert!(output_rows::<Flex>(&w, None, inp, 3..3, &device).is_none());
    }
}
