//! The CPU backend: f32 compute over slices, parallel over rows with rayon, GEMM from the `gemm`
//! crate. Each file is one op family and mirrors `kernels/<family>.cu`: same function names, same
//! argument order (outputs first, then inputs, then sizes).

pub mod adamw;
pub mod adamw8bit;
pub mod attention;
pub mod elementwise;
pub mod embedding;
pub mod gemm;
pub mod layernorm;
pub mod lora;
pub mod nf4;
pub mod pool;
pub mod reduce;
pub mod rmsnorm;
pub mod rope;
pub mod xent;

use crate::backend::{AdamW8bitSlot, AdamWSlot, Backend, Optim};
use crate::{DType, Error, Result, Tensor};

/// The CPU backend: f32 everywhere.
pub struct Cpu;

impl Backend for Cpu {
    fn compute_dtype(&self) -> DType {
        DType::F32
    }
    fn device(&self) -> crate::Device {
        crate::Device::Cpu
    }
}

/// The f32 data of an op's input, or an error that names the op.
pub(crate) fn f32_in<'a>(op: &'static str, t: &'a Tensor) -> Result<&'a [f32]> {
    if t.device() != crate::Device::Cpu {
        return Err(Error::DeviceMismatch { op, a: crate::Device::Cpu, b: t.device() });
    }
    if t.dtype() != DType::F32 {
        return Err(Error::DType { op, expected: DType::F32, got: t.dtype() });
    }
    t.f32s()
}

/// A new f32 tensor shaped like `dims`; `fill` must write every element (the buffer may be a
/// recycled one with stale contents).
pub(crate) fn new_f32(dims: &[usize], fill: impl FnOnce(&mut [f32])) -> Result<Tensor> {
    let mut v = pool::take(dims.iter().product());
    fill(&mut v);
    Tensor::from_f32(v, dims)
}

/// A pooled buffer of `len` when `need`, for a gradient that may be skipped.
pub(crate) fn take_if(need: bool, len: usize) -> Option<Vec<f32>> {
    need.then(|| pool::take(len))
}

/// An optional f32 buffer as an optional tensor of `dims`.
pub(crate) fn wrap(d: Option<Vec<f32>>, dims: &[usize]) -> Result<Option<Tensor>> {
    d.map(|d| Tensor::from_f32(d, dims)).transpose()
}

impl Optim for Cpu {
    fn adamw(&self, slots: &mut [AdamWSlot], scalars: &crate::abi::AdamWScalars) -> Result<()> {
        for slot in slots.iter_mut() {
            let mut s = *scalars;
            if !slot.decay {
                s.decay = 1.0;
            }
            let g = f32_in("adamw", slot.g)?;
            adamw::adamw_step(slot.p.f32s_mut()?, slot.m.f32s_mut()?, slot.v.f32s_mut()?, g, &s);
        }
        Ok(())
    }
    fn adamw8bit(&self, slots: &mut [AdamW8bitSlot], scalars: &crate::abi::AdamWScalars) -> Result<()> {
        adamw8bit::step_slots(slots, scalars)
    }
}

/// Rows per rayon task for row-wise ops: large enough that scheduling costs stay small.
pub(crate) fn rows_per_task(cols: usize) -> usize {
    (16384 / cols.max(1)).max(1)
}

/// A raw pointer that may cross threads. Used only where tasks write provably disjoint elements
/// that do not form contiguous chunks (attention heads interleaved within a row).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: every task that shares a SendPtr writes a range of the buffer no other task touches (see each use).
unsafe impl Send for SendPtr {}
// SAFETY: as for Send: the tasks' ranges are disjoint.
unsafe impl Sync for SendPtr {}

/// Dot product with eight independent accumulators, so the compiler can vectorise it.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// y += a * x
#[inline]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}
