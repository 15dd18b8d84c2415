//! Ops: each family's semantics, shape checks, forward (dispatched to a backend) and backward
//! rule, side by side. Forward functions take the tape and record a node only when an input
//! needs a gradient.

pub mod attention;
pub mod checkpoint;
pub mod elementwise;
pub mod embedding;
pub mod gemm;
pub mod layernorm;
pub mod lora;
pub mod nf4;
pub mod xent;

use crate::{DType, Error, Result, Tensor};

/// The f32 data of an op's input, or an error that names the op and the input.
pub(crate) fn f32_input<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a [f32]> {
    if t.device() != crate::Device::Cpu {
        return Err(Error::Input(format!("{op} has no GPU path yet: run this model with --device cpu")));
    }
    if t.dtype() != DType::F32 {
        return Err(Error::DType { op, expected: DType::F32, got: t.dtype() });
    }
    t.f32s()
}

/// Checks that `t` has exactly `dims`.
pub(crate) fn expect_dims(op: &'static str, what: &str, t: &Tensor, dims: &[usize]) -> Result<()> {
    if t.dims() != dims {
        return Err(Error::shape(op, format!("{what} has shape {:?}, expected {:?}", t.dims(), dims)));
    }
    Ok(())
}

/// A new f32 tensor shaped like `dims`; `fill` must write every element (the buffer may be a
/// recycled one with stale contents).
pub(crate) fn new_f32(dims: &[usize], fill: impl FnOnce(&mut [f32])) -> Result<Tensor> {
    let mut v = crate::backend::cpu::pool::take(dims.iter().product());
    fill(&mut v);
    Tensor::from_f32(v, dims)
}

/// The CUDA side of the ops: typed access to an input's device buffer and constructors for
/// outputs, with errors that name the op. Each op family dispatches on its input's device and
/// calls `backend::cuda::<family>` from its own file.
#[cfg(feature = "cuda")]
pub(crate) mod dev {
    use crate::backend::cuda::{bf16, cuda, DevBuf};
    use crate::tensor::CudaStorage;
    use crate::{DType, Error, Result, Tensor};

    fn not_cuda(op: &'static str, t: &Tensor) -> Error {
        Error::Input(format!("{op}: an input is on {} while the op runs on cuda:0; move it with to_device", t.device()))
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
}
