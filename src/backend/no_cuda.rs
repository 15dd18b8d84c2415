//! The CUDA backend's stand-in in a build without the `cuda` feature: the same outward surface
//! as `backend/cuda`, where a CUDA buffer cannot exist (`CudaStorage` has no values) and every
//! request for the device says how to get a build that has it.

use super::Backend;
use crate::tensor::CpuStorage;
use crate::{DType, Device, Error, Result};

/// A CUDA buffer: none can exist in this build.
#[derive(Clone)]
pub enum CudaStorage {}

impl CudaStorage {
    pub fn dtype(&self) -> DType {
        match *self {}
    }
    pub fn len(&self) -> usize {
        match *self {}
    }
    pub fn is_empty(&self) -> bool {
        match *self {}
    }
}

/// The CUDA backend: not built.
pub fn backend() -> Result<&'static dyn Backend> {
    Err(Error::CudaNotBuilt(0))
}

/// Copies a host buffer to the device: not built.
pub fn upload(_: &CpuStorage) -> Result<CudaStorage> {
    Err(Error::CudaNotBuilt(0))
}

/// Copies a device buffer to the host: no device buffer exists in this build.
pub fn download(s: &CudaStorage) -> Result<CpuStorage> {
    match *s {}
}

/// Whether `cuda:ordinal` can be used: never in this build.
pub fn ensure_available(ordinal: usize) -> Result<()> {
    Err(Error::CudaNotBuilt(ordinal))
}

/// Whether the CUDA device is the emulated one: there is none.
pub fn is_emulated() -> bool {
    false
}

/// `--device cuda`: refused when the device is first used (`ensure_available`), with the fix.
pub fn select_driver() -> Result<()> {
    Ok(())
}

/// `--device auto`: a build without CUDA has only the CPU, and nothing to say about it.
pub fn auto() -> Device {
    Device::Cpu
}

/// `--device emu`: the emulated device runs kiln's CUDA kernels, which this build lacks.
pub fn emu() -> Result<Device> {
    Err(Error::Input(
        "--device emu needs kiln built with its CUDA kernels: run tools/install-cuda.sh (nvcc and the CUDA \
         headers, no GPU needed), then cargo build --release --features cuda"
            .into(),
    ))
}

/// The CUDA benchmarks: not built.
pub mod bench {
    use crate::{Error, Result};

    /// `kiln bench kernels`: not built.
    pub fn kernels(_device: &str) -> Result<()> {
        Err(Error::CudaNotBuilt(0))
    }
    /// The CUDA device's name: not built.
    pub fn device_name() -> Result<String> {
        Err(Error::CudaNotBuilt(0))
    }
    /// Counting launches on the emulated device: not built.
    pub fn count_launches(_blocks: u32, _run: impl FnOnce() -> Result<()>) -> Result<Vec<crate::predict::Launch>> {
        Err(Error::CudaNotBuilt(0))
    }
    /// cuBLAS' GEMM rate: not built.
    pub fn gemm_ceiling_tflops(_n: usize) -> Result<std::result::Result<f64, String>> {
        Err(Error::CudaNotBuilt(0))
    }
}
