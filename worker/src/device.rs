//! Chooses where models run: CUDA when the machine has it, else the CPU.
//!
//! Rust links with `--as-needed`, so `libtorch_cuda.so` is dropped from the binary and
//! tch would never see a GPU. Loading it by hand before the first tch call keeps one
//! binary for CPU and GPU machines: on a machine without CUDA the load just fails.

use tch::Device;

#[derive(Debug, thiserror::Error)]
#[error("CUDA was required (worker.device = \"cuda\") but is not available on this machine")]
pub struct CudaUnavailable;

/// Resolves the `worker.device` setting (`auto`, `cpu` or `cuda`) to a device.
pub fn select(preference: &str) -> Result<Device, CudaUnavailable> {
    if preference == "cpu" {
        tracing::info!(device = "cpu", "running models on the CPU (configured)");
        return Ok(Device::Cpu);
    }
    load_cuda_libraries();
    let device = if tch::Cuda::is_available() { Device::Cuda(0) } else { Device::Cpu };
    match (preference, device) {
        ("cuda", Device::Cpu) => Err(CudaUnavailable),
        (_, Device::Cuda(_)) => {
            tracing::info!(device = "cuda:0", gpus = tch::Cuda::device_count(), "running models on CUDA");
            Ok(device)
        }
        _ => {
            tracing::info!(device = "cpu", "CUDA not available; running models on the CPU");
            Ok(device)
        }
    }
}

#[allow(unsafe_code)]
fn load_cuda_libraries() {
    for lib in ["libtorch_cuda.so", "libtorch.so"] {
        let name = std::ffi::CString::new(lib).expect("static library name. This is a bug.");
        // SAFETY: dlopen with a valid C string; the handle is kept for the process lifetime.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            tracing::debug!(lib, "not loaded; CUDA unavailable");
        }
    }
}
