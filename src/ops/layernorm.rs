//! LayerNorm over the last dimension, with affine weight and bias.

use super::expect_dims;
use crate::backend::{on, RowStats};
use crate::tape::{Op, Tape};
use crate::{Result, Tensor};

struct LayerNorm {
    x: Tensor,
    w: Tensor,
    /// Per-row statistics, f32 on the op's device.
    stats: RowStats,
}

impl Op for LayerNorm {
    fn name(&self) -> &'static str {
        "layernorm"
    }
    fn backward(&self, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let be = on("layernorm backward", &[dout, &self.x])?;
        let grads = be.layernorm_backward(dout, &self.x, &self.w, &self.stats, [needs[0], needs[1], needs[2]])?;
        Ok(grads.into())
    }
}

/// y = (x - mean) / sqrt(var + eps) * w + b over the last dimension C; w, b: [C].
pub fn layernorm(tape: &mut Tape, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "layernorm";
    let _t = crate::profile::scope("layernorm", crate::profile::Phase::Forward);
    let c = x.shape().last();
    expect_dims(OP, "weight", w, &[c])?;
    expect_dims(OP, "bias", b, &[c])?;
    let (out, stats) = on(OP, &[x, w, b])?.layernorm(x, w, b, eps)?;
    if tape.wants(&[x, w, b]) {
        tape.record(LayerNorm { x: x.clone(), w: w.clone(), stats }, &[x, w, b], &out);
    }
    Ok(out)
}

/// The residual add and the layer norm that follows it (GPT-2's x + attn, then ln_2): returns
/// (s, layernorm(s)) with s = x + r. On the GPU one fused kernel reads x and r once and writes
/// both; on the CPU it is `add` then `layernorm`, bit for bit. The tape gets the same two nodes
/// as that pair (an add, then a layer norm over s with the statistics the kernel saved), so
/// backward is theirs.
pub fn add_layernorm(
    tape: &mut Tape,
    x: &Tensor,
    r: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "add_layernorm";
    let _t = crate::profile::scope(OP, crate::profile::Phase::Forward);
    if x.dims() != r.dims() {
        return Err(crate::Error::shape(OP, format!("shapes differ: {:?} vs {:?}", x.dims(), r.dims())));
    }
    let c = x.shape().last();
    expect_dims(OP, "weight", w, &[c])?;
    expect_dims(OP, "bias", b, &[c])?;
    let (s, out, stats) = on(OP, &[x, r, w, b])?.add_layernorm(x, r, w, b, eps)?;
    if tape.wants(&[x, r]) {
        tape.record(super::elementwise::Add, &[x, r], &s);
    }
    if tape.wants(&[&s, w, b]) {
        tape.record(LayerNorm { x: s.clone(), w: w.clone(), stats }, &[&s, w, b], &out);
    }
    Ok((s, out))
}
