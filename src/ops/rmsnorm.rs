//! RMSNorm over the last dimension (Llama's norm): y = w * x / sqrt(mean(x^2) + eps), no mean
//! subtracted, no bias.

use super::expect_dims;
use crate::backend::on;
use crate::tape::{Op, Tape};
use crate::{Result, Tensor};

struct RmsNorm {
    x: Tensor,
    w: Tensor,
    /// 1 / rms per row, f32 on the op's device.
    rstd: Tensor,
}

impl Op for RmsNorm {
    fn name(&self) -> &'static str {
        "rmsnorm"
    }
    fn backward(&self, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let be = on("rmsnorm backward", &[dout, &self.x])?;
        Ok(be.rmsnorm_backward(dout, &self.x, &self.w, &self.rstd, [needs[0], needs[1]])?.into())
    }
}

/// y = w * x / sqrt(mean(x^2) + eps) over the last dimension C; w: [C].
pub fn rmsnorm(tape: &mut Tape, x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "rmsnorm";
    let _t = crate::profile::scope(OP, crate::profile::Phase::Forward);
    expect_dims(OP, "weight", w, &[x.shape().last()])?;
    let (out, rstd) = on(OP, &[x, w])?.rmsnorm(x, w, eps)?;
    if tape.wants(&[x, w]) {
        tape.record(RmsNorm { x: x.clone(), w: w.clone(), rstd }, &[x, w], &out);
    }
    Ok(out)
}

/// The residual add and the RMSNorm that follows it (a Llama block's x + attn, then
/// post_attention_layernorm): returns (s, rmsnorm(s)) with s = x + r, in one pass where the
/// backend has a fused kernel. The tape gets an add and an RMSNorm node, so backward is theirs.
pub fn add_rmsnorm(tape: &mut Tape, x: &Tensor, r: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    const OP: &str = "add_rmsnorm";
    let _t = crate::profile::scope(OP, crate::profile::Phase::Forward);
    if x.dims() != r.dims() {
        return Err(crate::Error::shape(OP, format!("shapes differ: {:?} vs {:?}", x.dims(), r.dims())));
    }
    expect_dims(OP, "weight", w, &[x.shape().last()])?;
    let (s, out, rstd) = on(OP, &[x, r, w])?.add_rmsnorm(x, r, w, eps)?;
    if tape.wants(&[x, r]) {
        tape.record(super::elementwise::Add, &[x, r], &s);
    }
    if tape.wants(&[&s, w]) {
        tape.record(RmsNorm { x: s.clone(), w: w.clone(), rstd }, &[&s, w], &out);
    }
    Ok((s, out))
}
