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
