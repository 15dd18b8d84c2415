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
    t.device().ensure_available()?;
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
