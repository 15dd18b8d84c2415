//! Causal multi-head self-attention over GPT-2's packed qkv (the c_attn output).

use crate::backend::on;
use crate::tape::{Op, Tape};
use crate::{Error, Result, Tensor};

struct Attention {
    qkv: Tensor,
    out: Tensor,
    /// One log-sum-exp per (batch, head, query row), f32 on the op's device: all that backward
    /// keeps of the softmax.
    lse: Tensor,
    n_head: usize,
}

impl Op for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn backward(&self, dout: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let be = on("attention backward", &[dout, &self.qkv])?;
        Ok(vec![Some(be.attention_backward(dout, &self.qkv, &self.out, &self.lse, self.n_head)?)])
    }
}

/// softmax(q k^T / sqrt(hd), causal) v per head. qkv: [B, T, 3C] -> out: [B, T, C].
pub fn attention(tape: &mut Tape, qkv: &Tensor, n_head: usize) -> Result<Tensor> {
    const OP: &str = "attention";
    let _t = crate::profile::scope("attention", crate::profile::Phase::Forward);
    let [_, _, c3] = *qkv.dims() else {
        return Err(Error::shape(OP, format!("qkv must be [B, T, 3C], got {:?}", qkv.dims())));
    };
    if c3 % 3 != 0 || n_head == 0 || (c3 / 3) % n_head != 0 {
        return Err(Error::shape(OP, format!("qkv width {c3} must be 3 x C with C divisible by n_head = {n_head}")));
    }
    let (out, lse) = on(OP, &[qkv])?.attention(qkv, n_head)?;
    if tape.wants(&[qkv]) {
        tape.record(Attention { qkv: qkv.clone(), out: out.clone(), lse, n_head }, &[qkv], &out);
    }
    Ok(out)
}
