//! The CUDA backend's side of `Tensor`: its buffers (`CudaStorage`), copies to and from the host,
//! typed access to an op's inputs and constructors for its outputs, with errors that name the
//! op; and what `Device` asks of the CUDA backend.

use super::{bf16, cuda, select, DevBuf, RuntimeKind};
use crate::tensor::CpuStorage;
use crate::{DType, Device, Error, Result, Tensor};

/// A CUDA buffer of one dtype. Cloning copies on the device.
#[derive(Clone)]
pub enum CudaStorage {
    F32(DevBuf<f32>),
    BF16(DevBuf<bf16>),
    U8(DevBuf<u8>),
    I32(DevBuf<i32>),
}

impl CudaStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CudaStorage::F32(_) => DType::F32,
            CudaStorage::BF16(_) => DType::BF16,
            CudaStorage::U8(_) => DType::U8,
            CudaStorage::I32(_) => DType::I32,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            CudaStorage::F32(d) => d.len(),
            CudaStorage::BF16(d) => d.len(),
            CudaStorage::U8(d) => d.len(),
            CudaStorage::I32(d) => d.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The CUDA backend, opened on first use.
pub fn backend() -> Result<&'static dyn crate::backend::Backend> {
    Ok(cuda()?)
}

/// A device copy of a host buffer (f16, which the GPU path does not compute in, becomes bf16).
pub fn upload(c: &CpuStorage) -> Result<CudaStorage> {
    let cu = cuda()?;
    Ok(match c {
        CpuStorage::F32(v) => CudaStorage::F32(cu.upload(v)?),
        CpuStorage::BF16(v) => CudaStorage::BF16(cu.upload(v)?),
        CpuStorage::F16(v) => {
            CudaStorage::BF16(cu.upload(&v.iter().map(|x| bf16::from_f32(x.to_f32())).collect::<Vec<_>>())?)
        }
        CpuStorage::U8(v) => CudaStorage::U8(cu.upload(v)?),
        CpuStorage::I32(v) => CudaStorage::I32(cu.upload(v)?),
    })
}

/// A host copy of a device buffer (waits for the device).
pub fn download(c: &CudaStorage) -> Result<CpuStorage> {
    let cu = cuda()?;
    Ok(match c {
        CudaStorage::F32(d) => CpuStorage::F32(cu.download(d)?),
        CudaStorage::BF16(d) => CpuStorage::BF16(cu.download(d)?),
        CudaStorage::U8(d) => CpuStorage::U8(cu.download(d)?),
        CudaStorage::I32(d) => CpuStorage::I32(cu.download(d)?),
    })
}

/// Checks that `cuda:ordinal` can be used: kiln drives one device, cuda:0.
pub fn ensure_available(ordinal: usize) -> Result<()> {
    if ordinal != 0 {
        return Err(Error::Input(format!(
            "cuda:{ordinal}: kiln drives one GPU, cuda:0. Select another with CUDA_VISIBLE_DEVICES={ordinal} and \
             --device cuda"
        )));
    }
    cuda().map(|_| ())
}

/// Whether this process runs the CUDA backend on the emulated device.
pub fn is_emulated() -> bool {
    super::selected() == Some(RuntimeKind::Emulator)
}

/// `--device cuda`: this process's CUDA backend runs on the GPU.
pub fn select_driver() -> Result<()> {
    select(RuntimeKind::Driver)
}

/// `--device auto`: the GPU when one is present, else the CPU; says which on stderr.
pub fn auto() -> Device {
    if super::gpu_present() && select(RuntimeKind::Driver).is_ok() {
        if let Ok(cu) = cuda() {
            eprintln!("device: the GPU ({}); --device cpu to run on the CPU", cu.name());
            return Device::Cuda(0);
        }
    }
    // Said to a person at a terminal; in scripts and logs the CPU is what `auto` always meant.
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        eprintln!("device: the CPU (no NVIDIA GPU found); --device emu runs kiln's CUDA kernels emulated");
    }
    Device::Cpu
}

/// `--device emu`: kiln's CUDA kernels on the emulated device.
pub fn emu() -> Result<Device> {
    select(RuntimeKind::Emulator)?;
    Ok(Device::Cuda(0))
}

fn not_cuda(op: &'static str, t: &Tensor) -> Error {
    Error::DeviceMismatch { op, a: Device::Cuda(0), b: t.device() }
}

/// A bf16 CUDA input.
pub fn bf16_in<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a DevBuf<bf16>> {
    match t.cuda_storage() {
        Some(CudaStorage::BF16(d)) => Ok(d),
        Some(_) => Err(Error::DType { op, expected: DType::BF16, got: t.dtype() }),
        None => Err(not_cuda(op, t)),
    }
}
/// An f32 CUDA input.
pub fn f32_in<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a DevBuf<f32>> {
    match t.cuda_storage() {
        Some(CudaStorage::F32(d)) => Ok(d),
        Some(_) => Err(Error::DType { op, expected: DType::F32, got: t.dtype() }),
        None => Err(not_cuda(op, t)),
    }
}
/// An i32 CUDA input (token ids, targets).
pub fn i32_in<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a DevBuf<i32>> {
    match t.cuda_storage() {
        Some(CudaStorage::I32(d)) => Ok(d),
        Some(_) => Err(Error::DType { op, expected: DType::I32, got: t.dtype() }),
        None => Err(not_cuda(op, t)),
    }
}
/// A new bf16 CUDA tensor of `dims`; `fill` must write every element.
pub fn new_bf16(dims: &[usize], fill: impl FnOnce(&mut DevBuf<bf16>) -> Result<()>) -> Result<Tensor> {
    let mut d = cuda()?.alloc::<bf16>(dims.iter().product())?;
    fill(&mut d)?;
    Tensor::from_cuda(CudaStorage::BF16(d), dims)
}
/// A new f32 CUDA tensor of `dims`; `fill` must write every element.
pub fn new_f32(dims: &[usize], fill: impl FnOnce(&mut DevBuf<f32>) -> Result<()>) -> Result<Tensor> {
    let mut d = cuda()?.alloc::<f32>(dims.iter().product())?;
    fill(&mut d)?;
    Tensor::from_cuda(CudaStorage::F32(d), dims)
}
/// A tensor over an f32 buffer.
pub fn wrap_f32(d: DevBuf<f32>, dims: &[usize]) -> Result<Tensor> {
    Tensor::from_cuda(CudaStorage::F32(d), dims)
}
/// A tensor over a bf16 buffer.
pub fn wrap_bf16(d: DevBuf<bf16>, dims: &[usize]) -> Result<Tensor> {
    Tensor::from_cuda(CudaStorage::BF16(d), dims)
}
