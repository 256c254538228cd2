//! The compute device a worker runs on, chosen at run time through burn's
//! `Dispatch` backend: one binary drives whichever backends it was built with.
//!
//! Every build drives `flex` (burn's pure-Rust CPU backend, with AVX-512 kernels
//! picked at run time) and `ndarray` (burn's older CPU backend: an unlike second
//! backend for heterogeneous tests). GPU backends join with cargo features `cuda`,
//! `rocm` and `vulkan`, and PyTorch's own kernels (`libtorch` on the CPU,
//! `libtorch-cuda` on NVIDIA GPUs) with the feature `libtorch`. A worker asked for a
//! backend its build lacks fails with a message saying how to build it.

use burn::{Dispatch, DispatchDevice};
use hetero_job::Backend;

/// The backend every worker computes with.
pub type SystemBackend = Dispatch;
/// A device of [`SystemBackend`].
pub type SystemDevice = DispatchDevice;

/// The autodiff device for `backend` (device `index` for GPUs), and its name. `auto`
/// is the fastest CPU backend this build drives (`flex`). A backend this build was
/// compiled without is an error that says how to get it.
pub fn device(backend: Backend, index: usize) -> Result<(SystemDevice, &'static str), String> {
    let missing = |backend: Backend| {
        Err(format!(
            "this build does not drive {}: rebuild with `cargo build --release -p hetero-cli --features {}`",
            backend.name(),
            backend.cargo_feature().unwrap_or_default()
        ))
    };
    let _ = index; // used only by GPU backends
    let inner = match backend {
        Backend::Auto | Backend::Flex => DispatchDevice::Flex(burn::backend::flex::FlexDevice),
        Backend::Ndarray => DispatchDevice::NdArray(burn::backend::ndarray::NdArrayDevice::Cpu),
        #[cfg(feature = "cuda")]
        Backend::Cuda => DispatchDevice::Cuda(burn::backend::cuda::CudaDevice { index }),
        #[cfg(feature = "rocm")]
        Backend::Rocm => DispatchDevice::Rocm(burn::backend::rocm::RocmDevice { index }),
        #[cfg(feature = "vulkan")]
        Backend::Vulkan => DispatchDevice::Vulkan(burn::backend::wgpu::WgpuDevice::DiscreteGpu(index)),
        #[cfg(feature = "libtorch")]
        Backend::Libtorch => DispatchDevice::LibTorch(burn::backend::libtorch::LibTorchDevice::Cpu),
        #[cfg(feature = "libtorch")]
        Backend::LibtorchCuda => DispatchDevice::LibTorch(burn::backend::libtorch::LibTorchDevice::Cuda(index)),
        #[allow(unreachable_patterns)]
        other => return missing(other),
    };
    let name = if backend == Backend::Auto {
        "flex"
    } else {
        backend.name()
    };
    Ok((DispatchDevice::autodiff(inner), name))
}

/// The backends this build drives, fastest CPU backend first.
pub fn compiled() -> Vec<Backend> {
    let mut out = vec![Backend::Flex, Backend::Ndarray];
    if cfg!(feature = "cuda") {
        out.push(Backend::Cuda);
    }
    if cfg!(feature = "rocm") {
        out.push(Backend::Rocm);
    }
    if cfg!(feature = "vulkan") {
        out.push(Backend::Vulkan);
    }
    if cfg!(feature = "libtorch") {
        out.extend([Backend::Libtorch, Backend::LibtorchCuda]);
    }
    out
}

/// The backend a worker runs on: the job's choice, unless it said `auto` and its
/// agent's group names one (`HETERO_BACKEND`), which lets one job mix backends.
pub fn choose(job: Backend, group: Option<&str>) -> Result<Backend, String> {
    match (job, group) {
        (Backend::Auto, Some(name)) => {
            Backend::from_name(name).ok_or_else(|| format!("HETERO_BACKEND={name:?} is not a backend name"))
        }
        (b, _) => Ok(b),
    }
}

/// Measured matmul throughput of `backend` with this process's threads, in GFLOP/s: the
/// capability profile an agent reports when it registers.
pub fn measure_gflops(backend: Backend) -> f32 {
    use burn::prelude::*;
    let Ok((device, _)) = device(backend, 0) else {
        return 0.0;
    };
    let n = 256;
    let a = Tensor::<SystemBackend, 2>::ones([n, n], &device);
    let b = Tensor::<SystemBackend, 2>::ones([n, n], &device);
    let _ = a.clone().matmul(b.clone()).into_data(); // warm-up
    let started = std::time::Instant::now();
    let mut rounds = 0u32;
    while started.elapsed() < std::time::Duration::from_millis(300) {
        let _ = a.clone().matmul(b.clone()).into_data();
        rounds += 1;
    }
    let flops = 2.0 * (n * n * n) as f64 * rounds as f64;
    (flops / started.elapsed().as_secs_f64() / 1e9) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_backends_are_always_there() {
        assert_eq!(device(Backend::Auto, 0).unwrap().1, "flex");
        assert_eq!(device(Backend::Ndarray, 0).unwrap().1, "ndarray");
    }

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn a_missing_gpu_backend_says_how_to_build_it() {
        let err = device(Backend::Cuda, 0).err().unwrap();
        assert!(err.contains("--features cuda"), "{err}");
    }

    #[test]
    #[cfg(not(feature = "libtorch"))]
    fn a_missing_libtorch_says_which_feature_builds_it() {
        let err = device(Backend::LibtorchCuda, 0).err().unwrap();
        assert!(
            err.contains("libtorch-cuda") && err.contains("--features libtorch"),
            "{err}"
        );
    }

    #[test]
    #[cfg(feature = "libtorch")]
    fn libtorch_computes_what_flex_computes() {
        use burn::tensor::{Int, Tensor};
        let run = |backend| {
            let (device, _) = device(backend, 0).unwrap();
            let a = Tensor::<SystemBackend, 1, Int>::arange(0..48, &device)
                .float()
                .reshape([6, 8])
                .div_scalar(7.0);
            let b = a.clone().transpose().sin();
            // `a` is read again after its transpose went through `sin`: an in-place
            // op on a view must not change it (vendor/burn-tch).
            let y = burn::tensor::activation::softmax(a.matmul(b), 1);
            y.into_data().to_vec::<f32>().unwrap()
        };
        let (flex, torch) = (run(Backend::Flex), run(Backend::Libtorch));
        for (f, t) in flex.iter().zip(&torch) {
            assert!((f - t).abs() < 1e-5, "{flex:?}\n{torch:?}");
        }
        assert!(compiled().contains(&Backend::Libtorch));
    }

    /// Attention through the dispatch backend on `backend`, on one of
    /// [`ATTENTION_CASES`] (`[seq_q, seq_kv]`, causal, masked, softcap): the output
    /// and the gradients of query, key and value.
    fn attention_on(backend: Backend, ([seq_q, seq_kv], causal, masked, softcap): AttentionCase) -> [Vec<f32>; 4] {
        use burn::tensor::module::attention;
        use burn::tensor::ops::AttentionModuleOptions;
        use burn::tensor::{Bool, Tensor, TensorData};
        let (batch, heads, dim) = (2, 2, 8);
        let (device, _) = device(backend, 0).unwrap();
        let tensor = |seq: usize, salt: usize| {
            let shape = [batch, heads, seq, dim];
            let data: Vec<f32> = (0..shape.iter().product())
                .map(|i: usize| ((i * 7 + salt * 13) % 23) as f32 / 7.0 - 1.5)
                .collect();
            Tensor::<SystemBackend, 4>::from_data(TensorData::new(data, shape), &device).require_grad()
        };
        let (q, k, v) = (tensor(seq_q, 1), tensor(seq_kv, 2), tensor(seq_kv, 3));
        // Every third key hidden, and all of query row 0's.
        let mask = masked.then(|| {
            let hidden: Vec<bool> = (0..batch * heads * seq_q * seq_kv)
                .map(|i| i % 3 == 0 || (i / seq_kv) % seq_q == 0)
                .collect();
            let shape = [batch, heads, seq_q, seq_kv];
            Tensor::<SystemBackend, 4, Bool>::from_data(TensorData::new(hidden, shape), &device)
        });
        let options = AttentionModuleOptions {
            is_causal: causal,
            softcap,
            ..Default::default()
        };
        let y = attention(q.clone(), k.clone(), v.clone(), mask, None, options);
        let grads = (y.clone() * tensor(seq_q, 4).detach()).sum().backward();
        let vec = |t: Tensor<SystemBackend, 4>| t.into_data().to_vec::<f32>().unwrap();
        let [dq, dk, dv] = [q, k, v].map(|t| vec(t.grad(&grads).unwrap()));
        [vec(y), dq, dk, dv]
    }

    type AttentionCase = ([usize; 2], bool, bool, Option<f64>);

    /// Causal with as many, more (decoding after a cache) and fewer keys than
    /// queries, masks (one query row sees nothing), both, and a softcap.
    const ATTENTION_CASES: [AttentionCase; 6] = [
        ([6, 6], true, false, None),
        ([1, 5], true, false, None),
        ([3, 7], true, true, None),
        ([5, 3], true, false, None),
        ([4, 6], false, true, None),
        ([4, 4], true, true, Some(2.0)),
    ];

    fn attention_agrees(a: Backend, b: Backend) {
        for case in ATTENTION_CASES {
            let (x, y) = (attention_on(a, case), attention_on(b, case));
            for ((x, y), what) in x.iter().zip(&y).zip(["output", "dq", "dk", "dv"]) {
                let worst = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
                assert!(
                    worst < 1e-4,
                    "{what} of {case:?} on {a:?} and {b:?}: off by {worst}\n{x:?}\n{y:?}"
                );
            }
        }
    }

    /// A masked attention trains through the dispatch backend (its autodiff
    /// wrapper once refused the mask as "on the wrong device": vendor/burn-dispatch),
    /// and flex's fused kernel agrees with ndarray's attention built from parts.
    #[test]
    fn attention_with_masks_agrees_on_flex_and_ndarray() {
        attention_agrees(Backend::Flex, Backend::Ndarray);
    }

    /// PyTorch's attention called through burn means what burn's does: a bool mask
    /// hides keys (PyTorch's attends them), and a causal mask with more keys than
    /// queries is aligned at the bottom-right, so a decoding query sees the cache
    /// (PyTorch aligns it top-left): vendor/burn-tch.
    #[test]
    #[cfg(feature = "libtorch")]
    fn libtorch_attention_means_what_flex_attention_means() {
        attention_agrees(Backend::Flex, Backend::Libtorch);
    }

    #[test]
    fn auto_takes_the_group_backend() {
        assert_eq!(choose(Backend::Auto, Some("ndarray")).unwrap(), Backend::Ndarray);
        assert_eq!(choose(Backend::Flex, Some("ndarray")).unwrap(), Backend::Flex);
        assert_eq!(choose(Backend::Auto, None).unwrap(), Backend::Auto);
        assert!(choose(Backend::Auto, Some("tpu")).is_err());
    }
}
