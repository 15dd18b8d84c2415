//! Causal multi-head self-attention over GPT-2's packed qkv (the c_attn output).

#[cfg(feature = "cuda")]
use super::dev;
use super::{f32_input, new_f32};
use crate::backend::cpu::attention as cpu;
#[cfg(feature = "cuda")]
use crate::backend::cuda::attention as cuda;
use crate::tape::{Op, Tape};
use crate::{Error, Result, Tensor};

pub(crate) struct Saved {
    qkv: Tensor,
    out: Tensor,
    /// One log-sum-exp per (batch, head, query row), f32 on the op's device: all that backward
    /// keeps of the softmax.
    lse: Tensor,
    n_head: usize,
}

/// softmax(q k^T / sqrt(hd), causal) v per head. qkv: [B, T, 3C] -> out: [B, T, C].
pub fn attention(tape: &mut Tape, qkv: &Tensor, n_head: usize) -> Result<Tensor> {
    const OP: &str = "attention";
    let _t = crate::profile::scope("attention", crate::profile::Phase::Forward);
    let [b, t, c3] = *qkv.dims() else {
        return Err(Error::shape(OP, format!("qkv must be [B, T, 3C], got {:?}", qkv.dims())));
    };
    if c3 % 3 != 0 || n_head == 0 || (c3 / 3) % n_head != 0 {
        return Err(Error::shape(OP, format!("qkv width {c3} must be 3 x C with C divisible by n_head = {n_head}")));
    }
    let c = c3 / 3;
    let (out, lse) = match qkv.device() {
        #[cfg(feature = "cuda")]
        crate::Device::Cuda(_) => {
            let qd = dev::bf16_in(OP, qkv)?;
            let mut lse = crate::backend::cuda::cuda()?.alloc::<f32>(b * n_head * t)?;
            let out = dev::new_bf16(&[b, t, c], |o| cuda::attention_forward(o, &mut lse, qd, b, t, c, n_head))?;
            (out, Tensor::from_cuda(crate::tensor::CudaStorage::F32(lse), [b, n_head, t])?)
        }
        _ => {
            let qd = f32_input(OP, qkv)?;
            let mut lse = vec![0f32; b * n_head * t];
            let out = new_f32(&[b, t, c], |o| cpu::attention_forward(o, &mut lse, qd, b, t, c, n_head))?;
            (out, Tensor::from_f32(lse, [b, n_head, t])?)
        }
    };
    if tape.wants(&[qkv]) {
        tape.record(Op::Attention(Saved { qkv: qkv.clone(), out: out.clone(), lse, n_head }), &[qkv], &out);
    }
    Ok(out)
}

pub(crate) fn backward(s: &Saved, dout: &Tensor) -> Result<Vec<Option<Tensor>>> {
    let [b, t, c3] = *s.qkv.dims() else { unreachable!("checked in forward") };
    #[cfg(feature = "cuda")]
    if s.qkv.device() != crate::Device::Cpu {
        const OP: &str = "attention backward";
        let (g, qkv, out) = (dev::bf16_in(OP, dout)?, dev::bf16_in(OP, &s.qkv)?, dev::bf16_in(OP, &s.out)?);
        let lse = dev::f32_in(OP, &s.lse)?;
        let dqkv =
            dev::new_bf16(&[b, t, c3], |d| cuda::attention_backward(d, g, qkv, out, lse, b, t, c3 / 3, s.n_head))?;
        return Ok(vec![Some(dqkv)]);
    }
    let (g, qkv, out) = (dout.f32s()?, s.qkv.f32s()?, s.out.f32s()?);
    let lse = s.lse.f32s()?;
    let dqkv = new_f32(&[b, t, c3], |d| cpu::attention_backward(d, g, qkv, out, lse, b, t, c3 / 3, s.n_head))?;
    Ok(vec![Some(dqkv)])
}
