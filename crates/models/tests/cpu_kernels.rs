//! The convolutions of Hetero's CPU backend (flex with the im2col + GEMM forward and
//! backward passes of `vendor/burn-flex/src/ops/conv_gemm.rs`) against an
//! independent formulation: the convolution written as gathered shifted views times
//! one matrix product, built from burn tensor operations so that autodiff derives its
//! gradients from slicing and matmul alone. Values and all three gradients must agree
//! on the main job's layers and on a sweep of shapes, strides, paddings, dilations,
//! groups and batch sizes. The 2×2 max pool's fast path is checked the same way,
//! against a max over a reshaped view (other max pools against ndarray's, and ReLU
//! against a mask); flex's branch-free f32 `exp` and `erf`, and
//! GELU's value and gradient built on them, against f64 references. Softmax and
//! log-softmax, one fused autodiff operation each (`vendor/burn-autodiff`), against
//! the same functions built from their parts; so is attention (flex's fused kernel
//! and burn-backend's fallback backward pass), and linear layers on rank-3 inputs
//! against a batched product with a broadcast weight; layer normalisation (one tracked
//! operation with fused gradients on flex) against its parts; a row broadcast per
//! group (`[g, n, w] + [g, 1, w]`, a grouped layer's bias) against the same sum
//! with the rows materialised.

use burn::backend::{Autodiff, Flex};
use burn::module::Param;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, s};

type B = Autodiff<Flex>;

/// Where the kernel reads: stride, dilation and the padding rule.
struct Geometry {
    stride: [usize; 2],
    dilation: [usize; 2],
    padding: PaddingConfig2d,
}

/// `[top, bottom, left, right]` padding for an input of `[h, w]`.
fn pads(geometry: &Geometry, kernel: [usize; 2], input: [usize; 2]) -> [usize; 4] {
    match &geometry.padding {
        PaddingConfig2d::Valid => [0; 4],
        PaddingConfig2d::Explicit(top, left, bottom, right) => [*top, *bottom, *left, *right],
        PaddingConfig2d::Same => {
            // The total padding that keeps `ceil(size / stride)` outputs, split with
            // the odd one after, as burn and PyTorch do.
            let total = |d: usize| {
                let span = geometry.dilation[d] * (kernel[d] - 1) + 1;
                let out = input[d].div_ceil(geometry.stride[d]);
                ((out - 1) * geometry.stride[d] + span).saturating_sub(input[d])
            };
            let (h, w) = (total(0), total(1));
            [h / 2, h - h / 2, w / 2, w - w / 2]
        }
    }
}

/// The convolution of `x` by `weight` (plus `bias`) as one GEMM over gathered columns.
fn conv2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    geometry: &Geometry,
) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    let [o, c_w, kh, kw] = weight.dims();
    assert_eq!(c, c_w, "input has {c} channels, the weight expects {c_w}");
    let [top, bottom, left, right] = pads(geometry, [kh, kw], [h, w]);
    let ([sh, sw], [dh, dw]) = (geometry.stride, geometry.dilation);
    let (hp, wp) = (h + top + bottom, w + left + right);
    let oh = (hp - dh * (kh - 1) - 1) / sh + 1;
    let ow = (wp - dw * (kw - 1) - 1) / sw + 1;

    // Channels first, so that the columns come out as [c·kh·kw, n·oh·ow] with no copy.
    let x = x.swap_dims(0, 1); // [c, n, h, w]
    let x = if top + bottom + left + right > 0 {
        x.pad((left, right, top, bottom), burn::tensor::ops::PadMode::Constant(0.0))
    } else {
        x
    };
    let mut taps = Vec::with_capacity(kh * kw);
    for i in 0..kh {
        for j in 0..kw {
            let (r, q) = (i * dh, j * dw);
            let view = if sh == 1 && sw == 1 {
                x.clone().slice(s![.., .., r..r + oh, q..q + ow])
            } else {
                x.clone()
                    .slice(s![.., .., r..r + sh * (oh - 1) + 1;sh as isize, q..q + sw * (ow - 1) + 1;sw as isize])
            };
            taps.push(view.unsqueeze_dim::<5>(1)); // [c, 1, n, oh, ow]
        }
    }
    let columns = Tensor::cat(taps, 1).reshape([c * kh * kw, n * oh * ow]);
    let out = weight.reshape([o, c * kh * kw]).matmul(columns); // [o, n·oh·ow]
    let out = match bias {
        Some(b) => out + b.reshape([o, 1]),
        None => out,
    };
    out.reshape([o, n, oh, ow]).swap_dims(0, 1)
}

/// One group of a grouped convolution is an ordinary one on its channels.
fn reference<K: Backend>(x: Tensor<K, 4>, conv: &Conv2d<K>, geometry: &Geometry, groups: usize) -> Tensor<K, 4> {
    let weight = conv.weight.val();
    let bias = conv.bias.as_ref().map(|b| b.val());
    let [_, c, _, _] = x.dims();
    let [o, ..] = weight.dims();
    let (cg, og) = (c / groups, o / groups);
    let outs = (0..groups)
        .map(|g| {
            conv2d(
                x.clone().slice(s![.., g * cg..(g + 1) * cg]),
                weight.clone().slice(s![g * og..(g + 1) * og]),
                bias.clone().map(|b| b.slice(s![g * og..(g + 1) * og])),
                geometry,
            )
        })
        .collect();
    Tensor::cat(outs, 1)
}

fn close<K: Backend, const D: usize>(a: Tensor<K, D>, b: Tensor<K, D>, what: &str) {
    let (a, b) = (
        a.into_data().to_vec::<f32>().unwrap(),
        b.into_data().to_vec::<f32>().unwrap(),
    );
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() <= 1e-4 * scale, "{what}[{i}]: {x} vs {y} (scale {scale})");
    }
}

struct Case {
    shape: [usize; 4],
    c_out: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: PaddingConfig2d,
    dilation: [usize; 2],
    groups: usize,
}

/// Output, input gradient, weight gradient and bias gradient agree.
fn check(case: Case) {
    let device = Default::default();
    let Case {
        shape,
        c_out,
        kernel,
        stride,
        padding,
        dilation,
        groups,
    } = case;
    let config = Conv2dConfig::new([shape[1], c_out], kernel)
        .with_stride(stride)
        .with_dilation(dilation)
        .with_padding(padding.clone())
        .with_groups(groups);
    let conv = config.init::<B>(&device);
    // Two parameter sets with the same values, so each side has its own gradients.
    let twin = Conv2d {
        weight: Param::from_tensor(conv.weight.val().detach().require_grad()),
        bias: conv
            .bias
            .as_ref()
            .map(|b| Param::from_tensor(b.val().detach().require_grad())),
        ..conv.clone()
    };
    let geometry = Geometry {
        stride,
        dilation,
        padding,
    };
    let x = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device).require_grad();
    let x_ref = x.clone().detach().require_grad();
    let y = conv.forward(x.clone());
    let y_ref = reference(x_ref.clone(), &twin, &geometry, groups);
    let label = format!("{shape:?}→{c_out} k{kernel:?} s{stride:?} d{dilation:?} g{groups}");
    assert_eq!(y.dims(), y_ref.dims(), "{label}: output shape");
    let probe = Tensor::<B, 4>::random(y_ref.dims(), Distribution::Normal(0.0, 1.0), &device);
    let grads = (y.clone() * probe.clone()).sum().backward();
    let grads_ref = (y_ref.clone() * probe).sum().backward();
    close(y, y_ref, &format!("{label} output"));
    close(
        x.grad(&grads).unwrap(),
        x_ref.grad(&grads_ref).unwrap(),
        &format!("{label} dx"),
    );
    close(
        conv.weight.grad(&grads).unwrap(),
        twin.weight.grad(&grads_ref).unwrap(),
        &format!("{label} dw"),
    );
    let (b, b_ref) = (conv.bias.as_ref().unwrap(), twin.bias.as_ref().unwrap());
    close(
        b.grad(&grads).unwrap(),
        b_ref.grad(&grads_ref).unwrap(),
        &format!("{label} db"),
    );
}

fn case(shape: [usize; 4], c_out: usize, kernel: [usize; 2], stride: [usize; 2], padding: PaddingConfig2d) -> Case {
    Case {
        shape,
        c_out,
        kernel,
        stride,
        padding,
        dilation: [1, 1],
        groups: 1,
    }
}

#[test]
fn the_main_jobs_layers_match() {
    check(case([16, 1, 28, 28], 32, [3, 3], [1, 1], PaddingConfig2d::Same));
    check(case([16, 32, 14, 14], 64, [3, 3], [1, 1], PaddingConfig2d::Same));
}

#[test]
fn strides_paddings_dilations_groups_and_odd_shapes_match() {
    check(case(
        [3, 5, 11, 9],
        7,
        [3, 3],
        [2, 2],
        PaddingConfig2d::Explicit(1, 1, 1, 1),
    ));
    check(case([2, 3, 10, 13], 4, [5, 3], [1, 2], PaddingConfig2d::Valid));
    check(Case {
        dilation: [2, 2],
        ..case([1, 2, 12, 12], 3, [3, 3], [1, 1], PaddingConfig2d::Explicit(2, 2, 2, 2))
    });
    check(case([5, 4, 8, 8], 6, [1, 1], [1, 1], PaddingConfig2d::Valid));
    // Stride 1 with as many output columns as input columns (each tap one shifted
    // copy of the plane): fewer output rows than input rows, then more.
    check(case(
        [2, 3, 9, 6],
        4,
        [5, 3],
        [1, 1],
        PaddingConfig2d::Explicit(0, 1, 0, 1),
    ));
    check(case(
        [2, 2, 5, 7],
        3,
        [1, 3],
        [1, 1],
        PaddingConfig2d::Explicit(2, 1, 2, 1),
    ));
    // A one-row image under a 5×5 "same" kernel: most taps read no row at all.
    check(case(
        [2, 2, 1, 6],
        3,
        [5, 5],
        [1, 1],
        PaddingConfig2d::Explicit(2, 2, 2, 2),
    ));
    check(Case {
        dilation: [1, 2],
        ..case([2, 3, 9, 7], 5, [4, 2], [3, 1], PaddingConfig2d::Explicit(2, 1, 2, 1))
    });
    check(Case {
        groups: 2,
        ..case([3, 4, 9, 9], 6, [3, 3], [1, 1], PaddingConfig2d::Explicit(1, 1, 1, 1))
    });
    check(Case {
        groups: 4,
        ..case([2, 4, 7, 8], 4, [3, 2], [2, 1], PaddingConfig2d::Valid)
    });
}

#[test]
fn random_shapes_match() {
    // A fixed-seed sweep over sizes, kernels, strides, paddings and batch sizes.
    let mut state = 0x9e37_79b9_u64;
    let mut next = |m: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % m
    };
    for _ in 0..16 {
        let kernel = [1 + next(4), 1 + next(4)];
        let stride = [1 + next(2), 1 + next(3)];
        let dilation = [1 + next(2), 1 + next(2)];
        // burn's convolution pads symmetrically: top = bottom, left = right.
        let pad = [next(3), next(3)];
        let min = |d: usize| dilation[d] * (kernel[d] - 1) + 1;
        let shape = [1 + next(6), 1 + next(5), min(0) + next(9), min(1) + next(9)];
        let padding = PaddingConfig2d::Explicit(pad[0], pad[1], pad[0], pad[1]);
        check(Case {
            dilation,
            ..case(shape, 1 + next(6), kernel, stride, padding)
        });
    }
}

#[test]
fn the_two_by_two_max_pool_matches_a_max_over_a_reshaped_view() {
    let device = Default::default();
    for shape in [[4usize, 3, 8, 8], [2, 5, 7, 9], [16, 32, 28, 28]] {
        let [n, c, h, w] = shape;
        let (oh, ow) = (h / 2, w / 2);
        let x = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device).require_grad();
        let x_ref = x.clone().detach().require_grad();
        let y = burn::tensor::module::max_pool2d(x.clone(), [2, 2], [2, 2], [0, 0], [1, 1], false);
        let y_ref = x_ref
            .clone()
            .slice(s![.., .., 0..2 * oh, 0..2 * ow])
            .reshape([n, c, oh, 2, ow, 2])
            .max_dim(5)
            .max_dim(3)
            .reshape([n, c, oh, ow]);
        let probe = Tensor::<B, 4>::random([n, c, oh, ow], Distribution::Normal(0.0, 1.0), &device);
        let grads = (y.clone() * probe.clone()).sum().backward();
        let grads_ref = (y_ref.clone() * probe).sum().backward();
        close(y, y_ref, &format!("{shape:?} pool"));
        close(
            x.grad(&grads).unwrap(),
            x_ref.grad(&grads_ref).unwrap(),
            &format!("{shape:?} pool dx"),
        );
    }
}

/// erf in f64: its Maclaurin series up to 3 (f64 keeps the cancellation far below
/// f32's precision there), the asymptotic series of erfc beyond.
fn erf_reference(x: f64) -> f64 {
    let a = x.abs();
    let value = if a <= 3.0 {
        let (mut term, mut sum, mut n) = (a, a, 0.0);
        while term.abs() > 1e-18 * sum.abs() {
            n += 1.0;
            term *= -a * a / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        let z = 1.0 / (2.0 * a * a);
        let erfc = (-a * a).exp() / (a * std::f64::consts::PI.sqrt()) * (1.0 - z + 3.0 * z * z - 15.0 * z * z * z);
        1.0 - erfc
    };
    value.copysign(x)
}

#[test]
fn exp_erf_and_gelu_match_f64_references() {
    let device = Default::default();
    // Enough elements that the vectorised map splits them over threads.
    let mut xs: Vec<f32> = (0..50_001).map(|i| -20.0 + i as f32 * 0.0008).collect();
    xs.extend([-1e4, -100.0, -87.0, 0.0, 1e-6, -1e-6, 1e-30, 80.0, 88.0]);
    let t = Tensor::<B, 1>::from_floats(xs.as_slice(), &device);
    let exp = t.clone().exp().into_data().to_vec::<f32>().unwrap();
    let erf = t.clone().erf().into_data().to_vec::<f32>().unwrap();
    for (i, &x) in xs.iter().enumerate() {
        let want = (x as f64).exp();
        let got = exp[i] as f64;
        if want < 1e-37 {
            assert!(got < 1e-37, "exp({x}) = {got}, want {want}");
        } else {
            assert!((got - want).abs() <= 2.5e-7 * want, "exp({x}) = {got}, want {want}");
        }
        let want = erf_reference(x as f64);
        let got = erf[i] as f64;
        // Relative error near 0 (where erf is small), absolute error elsewhere.
        let bound = if x.abs() < 0.5 { 1e-6 * want.abs() } else { 4e-7 };
        assert!((got - want).abs() <= bound, "erf({x}) = {got}, want {want}");
    }
    assert!(
        Tensor::<B, 1>::from_floats([f32::NAN], &device)
            .exp()
            .into_data()
            .to_vec::<f32>()
            .unwrap()[0]
            .is_nan()
    );

    // GELU and its gradient: 0.5·x·(1 + erf(x/√2)), and Φ(x) + x·φ(x).
    let x = Tensor::<B, 1>::from_floats(xs.as_slice(), &device).require_grad();
    let y = burn::tensor::activation::gelu(x.clone());
    let gradient = y.clone().sum().backward();
    let dy = x.grad(&gradient).unwrap().into_data().to_vec::<f32>().unwrap();
    let y = y.into_data().to_vec::<f32>().unwrap();
    for (i, &x) in xs.iter().enumerate() {
        let x = x as f64;
        let cdf = 0.5 * (1.0 + erf_reference(x / std::f64::consts::SQRT_2));
        let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let (want_y, want_dy) = (x * cdf, cdf + x * pdf);
        assert!(
            (y[i] as f64 - want_y).abs() <= 1e-6 * want_y.abs().max(1.0),
            "gelu({x}) = {}, want {want_y}",
            y[i]
        );
        assert!(
            (dy[i] as f64 - want_dy).abs() <= 1e-6 * want_dy.abs().max(1.0),
            "gelu'({x}) = {}, want {want_dy}",
            dy[i]
        );
    }
}

/// Softmax built from the operations burn's default is made of (max, sub, exp, sum,
/// div), each tracked by autodiff on its own.
fn softmax_by_parts<const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    let shifted = x.clone() - x.detach().max_dim(dim);
    let e = shifted.exp();
    e.clone() / e.sum_dim(dim)
}

#[test]
fn fused_softmax_and_log_softmax_match_their_parts_with_gradients() {
    let device = Default::default();
    for (shape, dim) in [
        ([2, 3, 5, 7], 3),
        ([4, 6, 9, 2], 2),
        ([3, 8, 1, 5], 1),
        ([2, 2, 4, 4], 0),
    ] {
        let x0 = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 3.0), &device);
        // A weighting so that the upstream gradient differs per element.
        let w = Tensor::<B, 4>::random(shape, Distribution::Uniform(-1.0, 1.0), &device);
        let what = format!("shape {shape:?} dim {dim}");

        let run = |f: &dyn Fn(Tensor<B, 4>) -> Tensor<B, 4>| {
            let x = x0.clone().detach().require_grad();
            let y = f(x.clone());
            let grads = (y.clone() * w.clone()).sum().backward();
            (y, x.grad(&grads).unwrap())
        };
        let (fused, fused_grad) = run(&|x| burn::tensor::activation::softmax(x, dim));
        let (parts, parts_grad) = run(&|x| softmax_by_parts(x, dim));
        close(fused, parts, &format!("softmax, {what}"));
        close(fused_grad, parts_grad, &format!("softmax gradient, {what}"));

        let (fused, fused_grad) = run(&|x| burn::tensor::activation::log_softmax(x, dim));
        let (parts, parts_grad) = run(&|x| softmax_by_parts(x, dim).log());
        close(fused, parts, &format!("log-softmax, {what}"));
        close(fused_grad, parts_grad, &format!("log-softmax gradient, {what}"));
    }
}

/// Fused attention (one tracked operation: the backend's kernel forward,
/// `attention_backward` backward) against burn's attention built from tensor
/// operations, values and the gradients of query, key and value, on inputs that
/// are `swap_dims` views as a transformer passes them.
fn fused_attention_matches_its_parts<K: AutodiffBackend>() {
    use burn::tensor::module::{attention, attention_fallback};
    use burn::tensor::ops::AttentionModuleOptions;
    let device = Default::default();
    // `[batch, heads, seq_q, seq_kv, head_dim, val_dim]`, causal, whether a random
    // mask (different per head, with one query row fully hidden) is added, and an
    // explicit scale (the default is 1/√head_dim).
    let cases = [
        ([2, 3, 7, 7, 5, 4], true, false, None),
        ([3, 4, 64, 64, 16, 16], true, false, None),
        ([2, 2, 5, 9, 16, 8], true, true, Some(0.7)),
        ([2, 2, 9, 4, 8, 8], true, false, None),
        ([1, 4, 33, 17, 20, 17], false, true, None),
        ([2, 1, 3, 40, 3, 33], false, false, None),
        ([2, 3, 20, 37, 48, 16], true, true, None),
        ([1, 2, 70, 70, 16, 16], false, false, None),
        // Causal with 16 more queries than keys: the first two blocks of 8 query
        // rows see no key at all.
        ([2, 3, 20, 4, 16, 16], true, false, None),
        // One query (decoding) and one key.
        ([2, 2, 1, 1, 16, 16], true, false, None),
        ([1, 2, 1, 9, 8, 8], false, false, Some(0.3)),
        // Values wider than keys (two and three register widths), and query
        // lengths that fill whole blocks of 8 rows beside ones that do not.
        ([2, 2, 16, 12, 16, 32], true, true, None),
        ([2, 2, 12, 16, 16, 16], false, false, None),
        ([1, 2, 24, 40, 32, 48], false, true, Some(0.2)),
    ];
    for (dims, causal, with_mask, scale) in cases {
        let [batch, heads, seq_q, seq_kv, head_dim, val_dim] = dims;
        let what = format!("dims {dims:?} causal {causal} mask {with_mask} scale {scale:?}");
        // `[batch, seq, heads, dim]` tensors seen as `[batch, heads, seq, dim]`.
        let input =
            |seq, dim| Tensor::<K, 4>::random([batch, seq, heads, dim], Distribution::Normal(0.0, 1.5), &device);
        let (q0, k0, v0) = (input(seq_q, head_dim), input(seq_kv, head_dim), input(seq_kv, val_dim));
        let w = Tensor::<K, 4>::random(
            [batch, heads, seq_q, val_dim],
            Distribution::Uniform(-1.0, 1.0),
            &device,
        );
        let mask = with_mask.then(|| {
            let hidden =
                Tensor::<K, 4>::random([batch, heads, seq_q, seq_kv], Distribution::Uniform(0.0, 1.0), &device)
                    .lower_elem(0.3);
            // Query row 1 sees nothing: its output and gradients are 0.
            let row = Tensor::<K, 4, Bool>::full([batch, heads, 1, seq_kv], true, &device);
            hidden.slice_assign(s![.., .., 1..2, ..], row)
        });
        let options = AttentionModuleOptions {
            is_causal: causal,
            scale,
            ..Default::default()
        };

        type Attend<K> = fn(
            Tensor<K, 4>,
            Tensor<K, 4>,
            Tensor<K, 4>,
            Option<Tensor<K, 4, Bool>>,
            Option<Tensor<K, 4>>,
            AttentionModuleOptions,
        ) -> Tensor<K, 4>;
        let run = |f: Attend<K>| {
            let [q, k, v] = [&q0, &k0, &v0].map(|t| t.clone().detach().require_grad());
            let y = f(
                q.clone().swap_dims(1, 2),
                k.clone().swap_dims(1, 2),
                v.clone().swap_dims(1, 2),
                mask.clone(),
                None,
                options,
            );
            let grads = (y.clone() * w.clone()).sum().backward();
            (y, [q, k, v].map(|t| t.grad(&grads).unwrap()))
        };
        let (fused, fused_grads) = run(attention::<K>);
        let (parts, parts_grads) = run(attention_fallback::<K>);
        let fused: Tensor<K::InnerBackend, 4> = fused.inner();
        close(fused, parts.inner(), &format!("attention, {what}"));
        for ((a, b), name) in fused_grads.into_iter().zip(parts_grads).zip(["query", "key", "value"]) {
            close(a, b, &format!("attention {name} gradient, {what}"));
        }
    }
}

#[test]
fn fused_attention_on_flex_matches_its_parts_with_gradients() {
    fused_attention_matches_its_parts::<Autodiff<Flex>>();
}

/// A backend without its own kernel (ndarray) goes through burn-backend's
/// `attention_backward_fallback`.
#[test]
fn attention_backward_fallback_matches_its_parts() {
    fused_attention_matches_its_parts::<Autodiff<burn::backend::NdArray>>();
}

/// A linear layer on a rank-3 input (one matrix product over all rows, forward and
/// backward, in `vendor/burn-backend`) against the same product written per batch
/// entry with a broadcast weight: values and the input, weight and bias gradients.
#[test]
fn linear_on_rows_matches_a_batched_product_with_gradients() {
    let device = Default::default();
    for [batch, time, inputs, outputs] in [[2, 3, 5, 4], [4, 7, 16, 33], [1, 1, 3, 2]] {
        let what = format!("x [{batch}, {time}, {inputs}] → {outputs}");
        let x0 = Tensor::<B, 3>::random([batch, time, inputs], Distribution::Normal(0.0, 1.0), &device);
        let w0 = Tensor::<B, 2>::random([inputs, outputs], Distribution::Normal(0.0, 1.0), &device);
        let b0 = Tensor::<B, 1>::random([outputs], Distribution::Normal(0.0, 1.0), &device);
        let up = Tensor::<B, 3>::random([batch, time, outputs], Distribution::Uniform(-1.0, 1.0), &device);
        let run = |f: &dyn Fn(Tensor<B, 3>, Tensor<B, 2>, Tensor<B, 1>) -> Tensor<B, 3>| {
            let x = x0.clone().detach().require_grad();
            let w = w0.clone().detach().require_grad();
            let b = b0.clone().detach().require_grad();
            let y = f(x.clone(), w.clone(), b.clone());
            let grads = (y.clone() * up.clone()).sum().backward();
            (
                y,
                x.grad(&grads).unwrap(),
                w.grad(&grads).unwrap(),
                b.grad(&grads).unwrap(),
            )
        };
        let (y, gx, gw, gb) = run(&|x, w, b| burn::tensor::module::linear(x, w, Some(b)));
        let (ry, rgx, rgw, rgb) = run(&|x, w, b| x.matmul(w.unsqueeze::<3>()) + b.unsqueeze::<3>());
        close(y, ry, &format!("linear, {what}"));
        close(gx, rgx, &format!("linear input gradient, {what}"));
        close(gw, rgw, &format!("linear weight gradient, {what}"));
        close(gb, rgb, &format!("linear bias gradient, {what}"));
    }
}

/// Max pools that are not 2×2 windows — overlapping 3×3 windows with stride 2 and
/// padding, whose output has the 2×2 pool's shape on even inputs — keep flex's
/// general path: values and input gradients against ndarray's max pool.
#[test]
fn overlapping_max_pools_match_ndarray_with_gradients() {
    type N = Autodiff<burn::backend::NdArray>;
    let device = Default::default();
    for (shape, kernel, stride, padding) in [
        ([2usize, 3, 8, 8], [3, 3], [2, 2], [1, 1]),
        ([3, 2, 9, 7], [3, 3], [2, 2], [1, 1]),
        ([2, 4, 10, 10], [2, 2], [1, 1], [0, 0]),
    ] {
        let what = format!("{shape:?} kernel {kernel:?} stride {stride:?} padding {padding:?}");
        let x0 = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let x = x0.clone().require_grad();
        let xn = Tensor::<N, 4>::from_data(x0.to_data(), &Default::default()).require_grad();
        let y = burn::tensor::module::max_pool2d(x.clone(), kernel, stride, padding, [1, 1], false);
        let yn = burn::tensor::module::max_pool2d(xn.clone(), kernel, stride, padding, [1, 1], false);
        let probe = Tensor::<B, 4>::random(y.dims(), Distribution::Normal(0.0, 1.0), &device);
        let probe_n = Tensor::<N, 4>::from_data(probe.to_data(), &Default::default());
        let grads = (y.clone() * probe).sum().backward();
        let grads_n = (yn.clone() * probe_n).sum().backward();
        let to_flex = |t: Tensor<burn::backend::NdArray, 4>| Tensor::<Flex, 4>::from_data(t.into_data(), &device);
        close(y.inner(), to_flex(yn.inner()), &format!("{what} pool"));
        close(
            x.grad(&grads).unwrap(),
            to_flex(xn.grad(&grads_n).unwrap()),
            &format!("{what} pool dx"),
        );
    }
}

/// ReLU and its gradient (vectorised, in place when the tensor is not shared)
/// against `max(0)` and a mask, and a shared input is left as it was.
#[test]
fn relu_matches_a_mask_and_leaves_shared_inputs_alone() {
    let device = Default::default();
    for len in [7usize, 1000, 70_000] {
        let x0 = Tensor::<B, 1>::random([len], Distribution::Normal(0.0, 1.0), &device);
        let before = x0.to_data();
        let x = x0.clone().require_grad();
        let y = burn::tensor::activation::relu(x.clone());
        let up = Tensor::<B, 1>::random([len], Distribution::Normal(0.0, 1.0), &device);
        let grads = (y.clone() * up.clone()).sum().backward();
        let positive = x0.clone().greater_elem(0.0).float();
        close(y, x0.clone() * positive.clone(), &format!("relu of {len}"));
        // A fresh, unshared tensor is rectified in place.
        let fresh = burn::tensor::activation::relu(x0.clone().mul_scalar(1.0));
        close(fresh, x0.clone() * positive.clone(), &format!("relu in place of {len}"));
        close(
            x.grad(&grads).unwrap(),
            (up * positive).inner(),
            &format!("relu gradient of {len}"),
        );
        x0.to_data().assert_eq(&before, true);
    }
}

/// Layer normalisation, one tracked operation in `vendor/burn-autodiff` (flex's
/// fused gradients, or burn-backend's `layer_norm_backward_fallback` elsewhere),
/// against the same normalisation written with tensor operations: values and the
/// input, γ and β gradients, on rows of several widths (below, at and above a
/// 16-lane block; more rows than one block of 64) with an offset mean.
fn layer_norm_matches_its_parts<K: AutodiffBackend>() {
    let device = Default::default();
    for shape in [[3usize, 5, 7], [2, 33, 64], [4, 40, 16]] {
        let d = shape[2];
        let what = format!("layer norm of {shape:?}");
        let x0 = Tensor::<K, 3>::random(shape, Distribution::Normal(3.0, 2.0), &device);
        let gamma0 = Tensor::<K, 1>::random([d], Distribution::Normal(1.0, 0.5), &device);
        let beta0 = Tensor::<K, 1>::random([d], Distribution::Normal(0.0, 0.5), &device);
        let up = Tensor::<K, 3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let epsilon = 1e-5;
        let run = |fused: bool| {
            let x = x0.clone().detach().require_grad();
            let gamma = gamma0.clone().detach().require_grad();
            let beta = beta0.clone().detach().require_grad();
            let y = if fused {
                let out = K::layer_norm(
                    x.clone().into_primitive().tensor(),
                    gamma.clone().into_primitive().tensor(),
                    Some(beta.clone().into_primitive().tensor()),
                    epsilon,
                );
                Tensor::<K, 3>::from_primitive(burn::tensor::TensorPrimitive::Float(out))
            } else {
                let mean = x.clone().mean_dim(2);
                let centered = x.clone() - mean;
                let var = centered.clone().powi_scalar(2).mean_dim(2);
                centered / (var + epsilon).sqrt() * gamma.clone().unsqueeze::<3>() + beta.clone().unsqueeze::<3>()
            };
            let grads = (y.clone() * up.clone()).sum().backward();
            (
                y.inner(),
                x.grad(&grads).unwrap(),
                gamma.grad(&grads).unwrap(),
                beta.grad(&grads).unwrap(),
            )
        };
        let (y, gx, gg, gb) = run(true);
        let (ry, rgx, rgg, rgb) = run(false);
        close(y, ry, &what);
        close(gx, rgx, &format!("{what}: input gradient"));
        close(gg, rgg, &format!("{what}: γ gradient"));
        close(gb, rgb, &format!("{what}: β gradient"));
    }
}

#[test]
fn fused_layer_norm_on_flex_matches_its_parts_with_gradients() {
    layer_norm_matches_its_parts::<Autodiff<Flex>>();
}

#[test]
fn layer_norm_backward_fallback_matches_its_parts() {
    layer_norm_matches_its_parts::<Autodiff<burn::backend::NdArray>>();
}

/// flex's broadcast of one row per group (each group's bias over its tokens, in
/// every element-wise op) against the same op on rows repeated into a contiguous
/// tensor, including rows at an offset (a slice) and a broadcast middle axis.
#[test]
fn per_group_rows_broadcast_like_materialised_rows() {
    let device = Default::default();
    let x = Tensor::<Flex, 3>::random([3, 5, 7], Distribution::Normal(0.0, 1.0), &device);
    let table = Tensor::<Flex, 2>::random([4, 7], Distribution::Normal(1.0, 0.5), &device);
    let rows = table.slice([1..4]).reshape([3, 1, 7]);
    let repeated = rows.clone().repeat_dim(1, 5);
    type Op = fn(Tensor<Flex, 3>, Tensor<Flex, 3>) -> Tensor<Flex, 3>;
    let ops: [(&str, Op); 4] = [
        ("add", |a, b| a + b),
        ("sub", |a, b| a - b),
        ("mul", |a, b| a * b),
        ("div", |a, b| a / b),
    ];
    for (name, op) in ops {
        close(op(x.clone(), rows.clone()), op(x.clone(), repeated.clone()), name);
    }
}
