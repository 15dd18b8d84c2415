//! Fused softmax cross-entropy: logits [..., V] and integer targets [...] -> the mean loss over
//! positions whose target is not -100. A batch with no target at all has loss 0 and zero
//! gradient (PyTorch would return NaN), so a fully masked micro-batch cannot poison a run.
//!
//! `classifier_loss` is the classifier (lm_head) and the loss as one op, what a training step
//! runs: its logits live only inside the op, in rows padded to `backend::padded_vocab(V)` (50257
//! -> 50304 for GPT-2) so the classifier's three GEMMs read and write them in aligned rows (the
//! wgmma GEMM's TMA loads need 16-byte-aligned rows); the backward turns them into dlogits in
//! place, with no copy. The padding columns are never read, and nothing outside the op sees them.

use std::cell::RefCell;

pub use crate::backend::cpu::xent::IGNORE;
use crate::backend::{on, padded_vocab, GemmDesc, Pitch, XentSaved};
use crate::tape::{Op, Tape};
use crate::{DType, Error, Result, Tensor};

struct CrossEntropy {
    logits: Tensor,
    saved: XentSaved,
}

/// The gradient's scale: the incoming gradient over the counted positions (0 with none).
fn scale(dout: &Tensor, saved: &XentSaved) -> Result<f32> {
    Ok(if saved.count == 0 { 0.0 } else { dout.item()? / saved.count as f32 })
}

impl Op for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross_entropy"
    }
    fn backward(&self, dout: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let be = on("cross_entropy backward", &[&self.logits])?;
        let v = self.logits.shape().last();
        // The tape's logits stay as they are: the backend copies them before working in place.
        Ok(vec![Some(be.cross_entropy_backward(self.logits.clone(), &self.saved, scale(dout, &self.saved)?, v)?)])
    }
}

/// Errors unless `targets` (I32 on the host) has the leading `dims` and each is in [0, v) or
/// IGNORE.
fn check_targets(op: &'static str, targets: &Tensor, dims: &[usize], v: usize) -> Result<()> {
    targets.expect_dtype(op, DType::I32)?;
    if targets.dims() != dims {
        return Err(Error::shape(
            op,
            format!("targets {:?} must be the leading dims {dims:?} of the input", targets.dims()),
        ));
    }
    if let Some(&bad) = targets.i32s()?.iter().find(|&&x| x != IGNORE && (x < 0 || x as usize >= v)) {
        return Err(Error::Input(format!(
            "{op}: target {bad} is outside the vocabulary (size {v}); use -100 to mask a position"
        )));
    }
    Ok(())
}

/// The mean loss as the host scalar every device returns (the loop logs it and checks it for
/// NaN).
fn mean_loss(saved: &XentSaved) -> Tensor {
    let (sum, count) = (saved.sum, saved.count);
    Tensor::scalar(if count == 0 { 0.0 } else { (sum / count as f64) as f32 })
}

/// Mean cross-entropy of `logits` [..., V] against `targets` (I32 on the host, the leading dims
/// of logits).
pub fn cross_entropy(tape: &mut Tape, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    const OP: &str = "cross_entropy";
    let _t = crate::profile::scope("cross_entropy", crate::profile::Phase::Forward);
    let v = logits.shape().last();
    check_targets(OP, targets, &logits.dims()[..logits.dims().len() - 1], v)?;
    let saved = on(OP, &[logits])?.cross_entropy(logits, targets, v)?;
    let loss = mean_loss(&saved);
    if tape.wants(&[logits]) {
        tape.record(CrossEntropy { logits: logits.clone(), saved }, &[logits], &loss);
    }
    Ok(loss)
}

struct ClassifierLoss {
    h: Tensor,
    w: Tensor,
    /// [rows, padded V]; taken (and turned into dlogits in place) by the backward.
    logits: RefCell<Option<Tensor>>,
    saved: XentSaved,
}

impl Op for ClassifierLoss {
    fn name(&self) -> &'static str {
        "classifier_loss"
    }
    fn backward(&self, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        const OP: &str = "classifier_loss backward";
        let (h, w) = (&self.h, &self.w);
        let be = on(OP, &[h, w])?;
        let logits = self.logits.borrow_mut().take().ok_or_else(|| {
            Error::Input(format!("{OP}: the logits were already turned into their gradient (backward ran twice)"))
        })?;
        let (n, vp) = (logits.shape().rows(), logits.shape().last());
        let (v, c) = (w.dims()[0], w.dims()[1]);
        let dl = be.cross_entropy_backward(logits, &self.saved, scale(dout, &self.saved)?, v)?;
        let pitch = Pitch { a: Some(vp), ..Pitch::default() };
        // dH [n, C] = dL [n, V] @ W [V, C], in the compute dtype (an activation's gradient).
        let dh = needs[0]
            .then(|| be.gemm(&dl, w, &GemmDesc::nn(n, c, v).with_pitch(pitch), be.compute_dtype(), h.dims()))
            .transpose()?;
        // dW [V, C] = dL^T [V, n] @ H [n, C], in f32 (a weight's).
        let dw = needs[1]
            .then(|| be.gemm(&dl, h, &GemmDesc::tn(v, c, n).with_pitch(pitch), DType::F32, w.dims()))
            .transpose()?;
        Ok(vec![dh, dw])
    }
}

/// Mean cross-entropy of the classifier h [..., C] @ w^T (w [V, C], an lm_head or a tied token
/// embedding) against `targets` (I32 on the host, the leading dims of h): `cross_entropy` of
/// `gemm::linear(h, w)` without a logits tensor anyone else sees, its rows padded to
/// `padded_vocab(V)` so all three GEMMs take aligned rows, and its gradient made in place.
pub fn classifier_loss(tape: &mut Tape, h: &Tensor, w: &Tensor, targets: &Tensor) -> Result<Tensor> {
    const OP: &str = "classifier_loss";
    let _t = crate::profile::scope(OP, crate::profile::Phase::Forward);
    let (v, c) = match w.dims() {
        &[v, c] if h.shape().last() == c => (v, c),
        d => {
            return Err(Error::shape(
                OP,
                format!("weight {d:?} must be [V, C] with C = the input's last dim {:?}", h.dims()),
            ))
        }
    };
    check_targets(OP, targets, &h.dims()[..h.dims().len() - 1], v)?;
    let n = h.shape().rows();
    let vp = padded_vocab(v);
    let be = on(OP, &[h, w])?;
    let desc = GemmDesc::nt(n, v, c).with_pitch(Pitch { c: Some(vp), ..Pitch::default() });
    let (logits, _) = be.matmul(h, w, None, &desc, &[n, vp])?;
    let saved = be.cross_entropy(&logits, targets, v)?;
    let loss = mean_loss(&saved);
    if tape.wants(&[h, w]) {
        let op = ClassifierLoss { h: h.clone(), w: w.clone(), logits: RefCell::new(Some(logits)), saved };
        tape.record(op, &[h, w], &loss);
    }
    Ok(loss)
}
