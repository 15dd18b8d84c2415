//! Fused softmax cross-entropy: logits [..., V] and integer targets [...] -> the mean loss over
//! positions whose target is not -100. A batch with no target at all has loss 0 and zero
//! gradient (PyTorch would return NaN), so a fully masked micro-batch cannot poison a run.

pub use crate::backend::cpu::xent::IGNORE;
use crate::backend::{on, XentSaved};
use crate::tape::{Op, Tape};
use crate::{DType, Error, Result, Tensor};

struct CrossEntropy {
    logits: Tensor,
    saved: XentSaved,
}

impl Op for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }
    fn backward(&self, dout: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let count = self.saved.count;
        let scale = if count == 0 { 0.0 } else { dout.item()? / count as f32 };
        let be = on("cross_entropy backward", &[&self.logits])?;
        Ok(vec![Some(be.cross_entropy_backward(&self.logits, &self.saved, scale)?)])
    }
}

/// Mean cross-entropy of `logits` [..., V] against `targets` (I32 on the host, the leading dims
/// of logits).
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
    let saved = on(OP, &[logits])?.cross_entropy(logits, targets)?;
    // The loss is a host scalar on every device: the loop logs it and checks it for NaN.
    let (sum, count) = (saved.sum, saved.count);
    let loss = Tensor::scalar(if count == 0 { 0.0 } else { (sum / count as f64) as f32 });
    if tape.wants(&[logits]) {
        tape.record(CrossEntropy { logits: logits.clone(), saved }, &[logits], &loss);
    }
    Ok(loss)
}
