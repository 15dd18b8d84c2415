//! Rotary position embeddings on q and k, fused with packing q, k and v into the attention's
//! qkv layout (the three projections of a Llama block are separate layers, each with its own
//! adapter, so their outputs meet here), or with the attention itself (`rope_attention`, what a
//! Llama block trains with: on the GPU the attention kernels rotate as they load).

use crate::backend::{on, Heads, RopeArgs};
use crate::tape::{Op, Tape};
use crate::{Result, Tensor};

struct RopeQkv {
    args: RopeArgs,
}

impl Op for RopeQkv {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn backward(&self, dout: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let [dq, dk, dv] = on("rope backward", &[dout])?.rope_unpack(dout, &self.args)?;
        Ok(vec![Some(dq), Some(dk), Some(dv)])
    }
}

/// qkv [B, T, (nh + 2 nkv) hd] = [rope(q) | rope(k) | v] for q [B, T, nh hd] and k, v
/// [B, T, nkv hd], rows of T at positions offset, offset + 1, ...; rotary frequencies
/// theta^(-2i / hd), transformers' rotate-half pairing.
pub fn rope_qkv(
    tape: &mut Tape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: Heads,
    theta: f32,
    offset: usize,
) -> Result<Tensor> {
    const OP: &str = "rope";
    let _t = crate::profile::scope(OP, crate::profile::Phase::Forward);
    crate::backend::cpu::rope::rope_dims(OP, q, k, v, heads)?;
    let args = RopeArgs { heads, theta, offset };
    let out = on(OP, &[q, k, v])?.rope_pack(q, k, v, &args)?;
    if tape.wants(&[q, k, v]) {
        tape.record(RopeQkv { args }, &[q, k, v], &out);
    }
    Ok(out)
}

struct RopeAttention {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    /// One log-sum-exp per (batch, head, query row), f32: all that backward keeps of the softmax.
    lse: Tensor,
    args: RopeArgs,
}

impl Op for RopeAttention {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn backward(&self, dout: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (q, k, v) = (&self.q, &self.k, &self.v);
        let be = on("attention backward", &[dout, q, k, v])?;
        let [dq, dk, dv] = be.rope_attention_backward(dout, q, k, v, &self.out, &self.lse, &self.args)?;
        Ok(vec![Some(dq), Some(dk), Some(dv)])
    }
}

/// Causal attention with rotary embeddings: out [B, T, nh hd] = attention(rope_qkv(q, k, v)) for
/// q [B, T, nh hd] and k, v [B, T, nkv hd] at positions 0..T, as one op. It keeps q, k and v for
/// the backward, not a packed copy; the CUDA backend never makes one.
pub fn rope_attention(tape: &mut Tape, q: &Tensor, k: &Tensor, v: &Tensor, heads: Heads, theta: f32) -> Result<Tensor> {
    const OP: &str = "attention";
    let _t = crate::profile::scope(OP, crate::profile::Phase::Forward);
    crate::backend::cpu::rope::rope_dims(OP, q, k, v, heads)?;
    let args = RopeArgs { heads, theta, offset: 0 };
    let (out, lse) = on(OP, &[q, k, v])?.rope_attention(q, k, v, &args)?;
    if tape.wants(&[q, k, v]) {
        let op = RopeAttention { q: q.clone(), k: k.clone(), v: v.clone(), out: out.clone(), lse, args };
        tape.record(op, &[q, k, v], &out);
    }
    Ok(out)
}
