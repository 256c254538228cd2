//! NVIDIA GPUs seen through NVML (built with the `nvml` feature, which `hetero-cli`'s
//! `cuda` feature turns on): how many there are, their memory, and their live
//! utilisation for heartbeats. NVML is loaded at run time, so a build with the feature
//! still runs — and reports no GPU — on machines without NVIDIA's driver.

use nvml_wrapper::Nvml;

/// NVIDIA GPUs on this machine: (count, memory of each in bytes), if NVML answers.
pub fn discover() -> Option<(u32, u64)> {
    let nvml = Nvml::init().ok()?;
    let count = nvml.device_count().ok()?;
    if count == 0 {
        return None;
    }
    let memory = nvml.device_by_index(0).ok()?.memory_info().ok()?.total;
    Some((count, memory))
}

/// Mean utilisation (0..1) and total memory in use over all NVIDIA GPUs.
pub fn usage() -> Option<(f32, u64)> {
    let nvml = Nvml::init().ok()?;
    let count = nvml.device_count().ok()?;
    let (mut util, mut used) = (0.0f32, 0u64);
    for i in 0..count {
        let d = nvml.device_by_index(i).ok()?;
        util += d.utilization_rates().ok()?.gpu as f32 / 100.0;
        used += d.memory_info().ok()?.used;
    }
    (count > 0).then(|| (util / count as f32, used))
}
