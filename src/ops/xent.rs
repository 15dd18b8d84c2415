//! Fused softmax cross-entropy: logits [..., V] and integer targets [...] -> the mean loss over
//! positions whose target is not -100. A batch with no target at all has loss 0 and zero
//! gradient (PyTorch would return NaN), so a fully masked micro-batch cannot poison a run.

#[cfg(feature = "cuda")]
use super::dev;
use super::{f32_input, new_f32};
use crate::backend::cpu::xent as cpu;
pub use crate::backend::cpu::xent::IGNORE;
#[cfg(feature = "cuda")]
use crate::backend::cuda::xent as cuda;
use crate::tape::{Op, Tape};
use crate::{DType, Error, Result, Tensor};

pub(crate) struct Saved {
    logits: Tensor,
    /// On the logits' device.
    targets: Tensor,
    /// One log-sum-exp per row, f32 on the logits' device.
    lse: Tensor,
    count: usize,
}

/// Mean cross-entropy of `logits` [..., V] against `targets` (I32, the leading dims of logits).
pub fn cross_entropy(tape: &mut Tape, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    const OP: &str = "cross_entropy";
    let _t = crate::profile::scope("cross_entropy", crate::profile::Phase::Forward);
    targets.expect_dtype(OP, DType::I32)?;
    let v = logits.shape().last();
    let n = logits.shape().rows();
    if targets.numel() != n || &logits.dims()[..logits.dims().len() - 1] != targets.dims() {
        return Err(Error::shape(
            OP,
            format!("targets {:?} must match the leading dims of logits {:?}", targets.dims(), logits.dims()),
        ));
    }
    let td = targets.i32s()?;
    if let Some(&bad) = td.iter().find(|&&x| x != IGNORE && (x < 0 || x as usize >= v)) {
        return Err(Error::Input(format!(
            "{OP}: target {bad} is outside the vocabulary (size {v}); use -100 to mask a position"
        )));
    }
    let (sum, count, lse, targets) = match logits.device() {
        #[cfg(feature = "cuda")]
        crate::Device::Cuda(_) => {
            let cu = crate::backend::cuda::cuda()?;
            let ld = dev::bf16_in(OP, logits)?;
            let td_dev = cu.upload(td)?;
            let (mut losses, mut lse) = (cu.alloc::<f32>(n)?, cu.alloc::<f32>(n)?);
            cuda::xent_forward(&mut losses, &mut lse, ld, &td_dev, v)?;
            let (sum, count) = cuda::loss_sum(&losses, td)?;
            let lse = Tensor::from_cuda(crate::tensor::CudaStorage::F32(lse), [n])?;
            (sum, count, lse, Tensor::from_cuda(crate::tensor::CudaStorage::I32(td_dev), targets.dims())?)
        }
        _ => {
            let ld = f32_input(OP, logits)?;
            let (mut losses, mut lse) = (vec![0f32; n], vec![0f32; n]);
            let (sum, count) = cpu::xent_forward(&mut losses, &mut lse, ld, td, v);
            (sum, count, Tensor::from_f32(lse, [n])?, targets.clone())
        }
    };
    // The loss is a host scalar on every device: the loop logs it and checks it for NaN.
    let loss = Tensor::scalar(if count == 0 { 0.0 } else { (sum / count as f64) as f32 });
    if tape.wants(&[logits]) {
        tape.record(Op::CrossEntropy(Saved { logits: logits.clone(), targets, lse, count }), &[logits], &loss);
    }
    Ok(loss)
}

pub(crate) fn backward(s: &Saved, dout: &Tensor) -> Result<Vec<Option<Tensor>>> {
    let v = s.logits.shape().last();
    let scale = if s.count == 0 { 0.0 } else { dout.item()? / s.count as f32 };
    #[cfg(feature = "cuda")]
    if s.logits.device() != crate::Device::Cpu {
        const OP: &str = "cross_entropy backward";
        // The kernel turns logits into dlogits in place; the tape still holds the logits, so this
        // works on a device copy of them.
        let mut dlogits = s.logits.clone().reshape(s.logits.dims())?;
        let (lse, t) = (dev::f32_in(OP, &s.lse)?, dev::i32_in(OP, &s.targets)?);
        match dlogits.cuda_storage_mut() {
            Some(crate::tensor::CudaStorage::BF16(d)) => cuda::xent_backward(d, lse, t, v, scale)?,
            _ => return Err(Error::DType { op: OP, expected: DType::BF16, got: s.logits.dtype() }),
        }
        return Ok(vec![Some(dlogits)]);
    }
    let (l, t, lse) = (s.logits.f32s()?, s.targets.i32s()?, s.lse.f32s()?);
    Ok(vec![Some(new_f32(s.logits.dims(), |d| cpu::xent_backward(d, l, lse, t, v, scale))?)])
}
