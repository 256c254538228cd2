//! Hetero: flex's side of Hetero's CPU training kernels, which live in
//! `hetero-kernels` (`crates/kernels/src/dense`) as functions on slices. Each
//! function here takes flex's tensors apart into contiguous f32 slices (and
//! strides, where a kernel reads views in place), calls the kernel, and wraps
//! what it returns. The hooks that call these are marked `Hetero` in flex's own
//! files; `vendor/patches/burn-flex.diff` holds all of it (vendor/README.md).

use alloc::vec;
use alloc::vec::Vec;
use burn_backend::DType;
use burn_backend::ops::conv::calculate_conv_output_size;
use burn_backend::ops::{AttentionModuleOptions, ConvOptions};
use burn_std::{Bytes, Shape};
use hetero_kernels::dense::{attention, conv, layer_norm, maps, pool};

use crate::{FlexTensor, Layout};

fn as_f32(t: FlexTensor) -> FlexTensor {
    let t = if t.dtype() == DType::F32 {
        t
    } else {
        <crate::Flex as burn_backend::ops::FloatTensorOps<crate::Flex>>::float_cast(t, burn_backend::FloatDType::F32)
    };
    t.to_contiguous()
}

fn back_to(t: FlexTensor, dtype: DType) -> FlexTensor {
    if dtype == DType::F32 {
        t
    } else {
        <crate::Flex as burn_backend::ops::FloatTensorOps<crate::Flex>>::float_cast(t, dtype.into())
    }
}

fn f32_tensor(data: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(Bytes::from_elems(data), Layout::contiguous(shape), DType::F32)
}

// ---------------------------------------------------------------------------
// Element-wise maps
// ---------------------------------------------------------------------------

/// `kernel` over each element of an f32 tensor.
pub fn map_f32(tensor: FlexTensor, kernel: maps::MapKernel) -> FlexTensor {
    let x = tensor.to_contiguous();
    let shape = x.layout().shape().clone();
    f32_tensor(maps::map(x.storage(), kernel), shape)
}

/// `kernel` over each pair of elements of two f32 tensors of one shape.
pub fn zip_map_f32(a: FlexTensor, b: FlexTensor, kernel: maps::ZipKernel) -> FlexTensor {
    let (a, b) = (a.to_contiguous(), b.to_contiguous());
    let shape = a.layout().shape().clone();
    f32_tensor(maps::zip_map(a.storage(), b.storage(), kernel), shape)
}

/// ReLU of an f32 tensor, in place when it is not shared.
pub fn relu_f32(tensor: FlexTensor) -> FlexTensor {
    let mut x = tensor.to_contiguous();
    drop(tensor); // so that `x` is the only owner when nothing else holds it
    if x.is_unique() && x.layout().start_offset() == 0 {
        let n = x.layout().num_elements();
        maps::update(&mut x.storage_mut::<f32>()[..n], |_, chunk| maps::relu_in_place(chunk));
        return x;
    }
    map_f32(x, maps::relu)
}

/// ReLU's gradient for f32 tensors of one shape, written over the upstream
/// gradient when it is not shared.
pub fn relu_backward_f32(output: FlexTensor, grad: FlexTensor) -> FlexTensor {
    let (output, mut grad) = {
        let (o, g) = (output.to_contiguous(), grad.to_contiguous());
        drop((output, grad)); // so that `g` is the only owner when nothing else holds it
        (o, g)
    };
    let os: &[f32] = output.storage();
    if grad.is_unique() && grad.layout().start_offset() == 0 {
        let n = grad.layout().num_elements();
        maps::update(&mut grad.storage_mut::<f32>()[..n], |start, chunk| {
            maps::relu_grad_in_place(&os[start..start + chunk.len()], chunk)
        });
        return grad;
    }
    zip_map_f32(output, grad, maps::relu_grad)
}

// ---------------------------------------------------------------------------
// Convolution
// ---------------------------------------------------------------------------

fn conv2d_shape(x: &[usize], weight: &[usize], out: [usize; 2], options: &ConvOptions<2>) -> conv::Conv2d {
    conv::Conv2d {
        n: x[0],
        c: x[1],
        h: x[2],
        w: x[3],
        o: weight[0],
        cg: weight[1],
        kh: weight[2],
        kw: weight[3],
        oh: out[0],
        ow: out[1],
        groups: options.groups,
        stride: options.stride,
        padding: options.padding,
        dilation: options.dilation,
    }
}

/// Whether [`conv2d`] handles this convolution: everything but depthwise ones,
/// which flex's own kernel does better than a GEMM of one row.
pub fn conv2d_handles(weight: &FlexTensor, options: &ConvOptions<2>) -> bool {
    let shape = weight.layout().shape();
    options.groups == 1 || shape[1] > 1 || shape[0] / options.groups > 1
}

/// A conv2d's output, as im2col + GEMM.
pub fn conv2d(x: FlexTensor, weight: FlexTensor, bias: Option<FlexTensor>, options: &ConvOptions<2>) -> FlexTensor {
    let dtype = x.dtype();
    let (x, weight) = (as_f32(x), as_f32(weight));
    let bias = bias.map(as_f32);
    let (xs, ws) = (x.layout().shape(), weight.layout().shape());
    let out = |i: usize| calculate_conv_output_size(ws[2 + i], options.stride[i], options.padding[i], options.dilation[i], xs[2 + i]);
    let g = conv2d_shape(xs, ws, [out(0), out(1)], options);
    let y = g.forward(x.storage(), weight.storage(), bias.as_ref().map(|b| b.storage()));
    back_to(f32_tensor(y, Shape::from(vec![g.n, g.o, g.oh, g.ow])), dtype)
}

/// The gradient of a conv2d's weight.
pub fn conv2d_weight_backward(x: FlexTensor, weight: FlexTensor, grad: FlexTensor, options: &ConvOptions<2>) -> FlexTensor {
    let dtype = weight.dtype();
    let (x, grad) = (as_f32(x), as_f32(grad));
    let gs = grad.layout().shape();
    let g = conv2d_shape(x.layout().shape(), weight.layout().shape(), [gs[2], gs[3]], options);
    let dw = g.weight_grad(x.storage(), grad.storage());
    back_to(f32_tensor(dw, Shape::from(vec![g.o, g.cg, g.kh, g.kw])), dtype)
}

/// The gradient of a conv2d's input.
pub fn conv2d_x_backward(x: FlexTensor, weight: FlexTensor, grad: FlexTensor, options: &ConvOptions<2>) -> FlexTensor {
    let dtype = x.dtype();
    let (weight, grad) = (as_f32(weight), as_f32(grad));
    let gs = grad.layout().shape();
    let g = conv2d_shape(x.layout().shape(), weight.layout().shape(), [gs[2], gs[3]], options);
    let dx = g.input_grad(weight.storage(), grad.storage());
    back_to(f32_tensor(dx, Shape::from(vec![g.n, g.c, g.h, g.w])), dtype)
}

/// The gradient of a conv2d's bias: the output gradient summed over batch and
/// positions, read in place (burn's default first copies it channels-first).
pub fn conv2d_bias_backward(_x: FlexTensor, bias: FlexTensor, grad: FlexTensor) -> FlexTensor {
    let dtype = bias.dtype();
    let grad = as_f32(grad);
    let shape = grad.layout().shape();
    let db = conv::bias_grad(grad.storage(), shape[0], shape[1], shape[2] * shape[3]);
    back_to(f32_tensor(db, bias.layout().shape().clone()), dtype)
}

// ---------------------------------------------------------------------------
// Max pool 2×2
// ---------------------------------------------------------------------------

/// The 2×2, stride-2 max pool of an f32 `[n, c, h, w]` tensor: outputs and flat
/// `h·w` indices, as the general path gives them.
pub fn max_pool2d_2x2_f32(x: FlexTensor) -> (FlexTensor, FlexTensor) {
    let x = x.to_contiguous();
    let shape = x.layout().shape();
    let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    let (output, indices) = pool::max_pool_2x2(x.storage(), n * c, h, w);
    let out_shape = Shape::from(vec![n, c, h / 2, w / 2]);
    (
        f32_tensor(output, out_shape.clone()),
        FlexTensor::new(Bytes::from_elems(indices), Layout::contiguous(out_shape), DType::I64),
    )
}

/// The gradient of [`max_pool2d_2x2_f32`]; `None` when the shapes are not a
/// non-empty 2×2 pool's or an index lies outside its window (the caller then
/// scatters in general).
pub fn max_pool2d_2x2_backward_f32(x: &FlexTensor, grad: &FlexTensor, indices: &FlexTensor) -> Option<FlexTensor> {
    let shape = x.layout().shape();
    let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    if grad.layout().shape().to_vec() != [n, c, h / 2, w / 2] || indices.dtype() != DType::I64 || grad.dtype() != DType::F32 {
        return None;
    }
    let (grad, indices) = (grad.to_contiguous(), indices.to_contiguous());
    let dx = pool::max_unpool_2x2(grad.storage(), indices.storage(), n * c, h, w)?;
    Some(f32_tensor(dx, shape.clone()))
}

// ---------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------

/// Whether the fused kernels handle these arguments: f32, 4-D, no additive bias
/// and no softcap, and a score tile that fits.
pub fn attention_handles(
    query: &FlexTensor,
    key: &FlexTensor,
    value: &FlexTensor,
    has_bias: bool,
    options: &AttentionModuleOptions,
) -> bool {
    let four_d = |t: &FlexTensor| t.layout().num_dims() == 4;
    [query, key, value]
        .iter()
        .all(|t| t.dtype() == DType::F32 && four_d(t))
        && !has_bias
        && options.softcap.is_none()
        && attention::fits(query.layout().shape()[2], key.layout().shape()[2])
}

/// A tensor's storage read through its own strides.
fn strided(tensor: &FlexTensor) -> attention::Strided<'_> {
    let layout = tensor.layout();
    let (s, shape) = (layout.strides(), layout.shape());
    attention::Strided {
        data: tensor.storage(),
        start: layout.start_offset() as isize,
        strides: [s[0], s[1], s[2], s[3]],
        shape: [shape[0], shape[1], shape[2], shape[3]],
    }
}

/// The mask as contiguous u8 `[seq_q, seq_kv]` tiles with per-batch and per-head steps.
fn broadcast_mask(mask: Option<FlexTensor>, query: &FlexTensor, key: &FlexTensor) -> Option<(FlexTensor, usize, usize)> {
    mask.map(|m| {
        let q = query.layout().shape();
        let target = [q[0], q[1], q[2], key.layout().shape()[2]];
        let b = super::attention::broadcast_attn_mask_bias(m, target, "mask");
        (b.tensor, b.batch_step, b.head_step)
    })
}

fn mask_of(mask: &Option<(FlexTensor, usize, usize)>) -> Option<attention::Mask<'_>> {
    mask.as_ref().map(|(m, batch_step, head_step)| attention::Mask {
        hidden: m.bytes(),
        batch_step: *batch_step,
        head_step: *head_step,
    })
}

/// A `[batch, heads, seq, dim]` view of data laid out as `[batch, seq, heads, dim]`.
fn heads_view(data: Vec<f32>, like: &FlexTensor, seq: usize, dim: usize) -> FlexTensor {
    let shape = like.layout().shape();
    let (batch, heads) = (shape[0], shape[1]);
    let strides = vec![(seq * heads * dim) as isize, dim as isize, (heads * dim) as isize, 1];
    FlexTensor::new(
        Bytes::from_elems(data),
        Layout::new(Shape::from(vec![batch, heads, seq, dim]), strides, 0),
        DType::F32,
    )
}

/// softmax(mask(Q·Kᵗ·scale))·V through the fused kernel.
pub fn attention_forward(
    query: FlexTensor,
    key: FlexTensor,
    value: FlexTensor,
    mask: Option<FlexTensor>,
    options: AttentionModuleOptions,
) -> FlexTensor {
    let mask = broadcast_mask(mask, &query, &key);
    let out = attention::forward(
        strided(&query),
        strided(&key),
        strided(&value),
        mask_of(&mask),
        options.scale,
        options.is_causal,
    );
    let (seq_q, val_dim) = (query.layout().shape()[2], value.layout().shape()[3]);
    heads_view(out, &query, seq_q, val_dim)
}

/// The gradients of [`attention_forward`] with respect to query, key and value.
pub fn attention_backward(
    query: FlexTensor,
    key: FlexTensor,
    value: FlexTensor,
    mask: Option<FlexTensor>,
    output: FlexTensor,
    grad: FlexTensor,
    options: AttentionModuleOptions,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let mask = broadcast_mask(mask, &query, &key);
    let (dq, dk, dv) = attention::backward(
        strided(&query),
        strided(&key),
        strided(&value),
        mask_of(&mask),
        strided(&output),
        strided(&grad),
        options.scale,
        options.is_causal,
    );
    let (q, k, v) = (query.layout().shape(), key.layout().shape(), value.layout().shape());
    (
        heads_view(dq, &query, q[2], q[3]),
        heads_view(dk, &query, k[2], k[3]),
        heads_view(dv, &query, v[2], v[3]),
    )
}

// ---------------------------------------------------------------------------
// Layer norm
// ---------------------------------------------------------------------------

/// The input's, γ's and β's gradients for output gradient `grad`, or `None` when
/// the tensors are not all f32 of matching shapes (the caller then falls back).
pub fn layer_norm_backward(
    tensor: &FlexTensor,
    gamma: &FlexTensor,
    epsilon: f64,
    grad: &FlexTensor,
) -> Option<(FlexTensor, FlexTensor, FlexTensor)> {
    let shape = tensor.layout().shape().clone();
    let d = *shape.last()?;
    let all_f32 = [tensor, gamma, grad].iter().all(|t| t.dtype() == DType::F32);
    if !all_f32 || d == 0 || grad.layout().shape() != &shape || gamma.layout().shape().to_vec() != [d] {
        return None;
    }
    let (x, gamma, grad) = (tensor.to_contiguous(), gamma.to_contiguous(), grad.to_contiguous());
    let n = shape.num_elements();
    let xs: &[f32] = x.storage();
    let gs: &[f32] = grad.storage();
    let (dx, dgamma, dbeta) = layer_norm::backward(&xs[..n], gamma.storage(), epsilon as f32, &gs[..n]);
    let vector = |values: Vec<f32>| f32_tensor(values, gamma.layout().shape().clone());
    Some((f32_tensor(dx, shape), vector(dgamma), vector(dbeta)))
}
