//! Fused softmax cross-entropy: logits [..., V] and integer targets [...] -> the mean loss over
//! positions whose target is not -100. A batch with no target at all has loss 0 and zero
//! gradient (PyTorch would return NaN), so a fully masked micro-batch cannot poison a run.

use super::{f32_input, new_f32};
use crate::backend::cpu::xent as cpu;
pub use crate::backend::cpu::xent::IGNORE;
use crate::tape::{Op, Tape};
use crate::{DType, Error, Result, Tensor};

pub(crate) struct Saved {
    logits: Tensor,
    targets: Tensor,
    lse: Vec<f32>,
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
    let ld = f32_input(OP, logits)?;
    let (mut losses, mut lse) = (vec![0f32; n], vec![0f32; n]);
    let (sum, count) = cpu::xent_forward(&mut losses, &mut lse, ld, td, v);
    let loss = Tensor::scalar(if count == 0 { 0.0 } else { (sum / count as f64) as f32 });
    if tape.wants(&[logits]) {
        tape.record(
            Op::CrossEntropy(Saved { logits: logits.clone(), targets: targets.clone(), lse, count }),
            &[logits],
            &loss,
        );
    }
    Ok(loss)
}

pub(crate) fn backward(s: &Saved, dout: &Tensor) -> Result<Vec<Option<Tensor>>> {
    let v = s.logits.shape().last();
    let scale = if s.count == 0 { 0.0 } else { dout.item()? / s.count as f32 };
    let (l, t) = (s.logits.f32s()?, s.targets.i32s()?);
    Ok(vec![Some(new_f32(s.logits.dims(), |d| cpu::xent_backward(d, l, &s.lse, t, v, scale))?)])
}
