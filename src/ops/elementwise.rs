//! GELU (tanh approximation), residual add, dropout, and the f32 -> bf16 cast that feeds a GPU
//! forward pass its bf16 weights from the optimizer's f32 masters. On the GPU the activations
//! are bf16 and the math f32, in `backend::cuda::elementwise`.

#[cfg(feature = "cuda")]
use super::dev;
use super::{f32_input, new_f32};
use crate::backend::cpu::elementwise as cpu;
#[cfg(feature = "cuda")]
use crate::backend::cuda::elementwise as cuda;
use crate::tape::{Op, Tape};
use crate::{Error, Result, Tensor};

pub(crate) struct GeluSaved {
    x: Tensor,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct DropoutSaved {
    /// The CPU's mask; empty on the GPU, whose backward redraws it from `seed`.
    mask: Vec<u8>,
    scale: f32,
    seed: u64,
    p: f32,
}

pub(crate) struct CastSaved {
    from: crate::DType,
}

/// GELU with the tanh approximation (GPT-2's "gelu_new").
pub fn gelu(tape: &mut Tape, x: &Tensor) -> Result<Tensor> {
    let _t = crate::profile::scope("gelu", crate::profile::Phase::Forward);
    let out = match x.device() {
        #[cfg(feature = "cuda")]
        crate::Device::Cuda(_) => {
            let xd = dev::bf16_in("gelu", x)?;
            dev::new_bf16(x.dims(), |o| cuda::gelu_forward(o, xd))?
        }
        _ => {
            let xd = f32_input("gelu", x)?;
            new_f32(x.dims(), |o| cpu::gelu_forward(o, xd))?
        }
    };
    if tape.wants(&[x]) {
        tape.record(Op::Gelu(GeluSaved { x: x.clone() }), &[x], &out);
    }
    Ok(out)
}

pub(crate) fn gelu_backward(s: &GeluSaved, dout: &Tensor) -> Result<Vec<Option<Tensor>>> {
    #[cfg(feature = "cuda")]
    if s.x.device() != crate::Device::Cpu {
        let (x, g) = (dev::bf16_in("gelu backward", &s.x)?, dev::bf16_in("gelu backward", dout)?);
        return Ok(vec![Some(dev::new_bf16(s.x.dims(), |d| cuda::gelu_backward(d, x, g))?)]);
    }
    let (x, g) = (s.x.f32s()?, dout.f32s()?);
    Ok(vec![Some(new_f32(s.x.dims(), |d| cpu::gelu_backward(d, x, g))?)])
}

/// a + b, elementwise, same shapes (the residual connection).
pub fn add(tape: &mut Tape, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        return Err(Error::shape("add", format!("shapes differ: {:?} vs {:?}", a.dims(), b.dims())));
    }
    let _t = crate::profile::scope("add", crate::profile::Phase::Forward);
    let out = match a.device() {
        #[cfg(feature = "cuda")]
        crate::Device::Cuda(_) => {
            let (ad, bd) = (dev::bf16_in("add", a)?, dev::bf16_in("add", b)?);
            dev::new_bf16(a.dims(), |o| cuda::residual_forward(o, ad, bd))?
        }
        _ => {
            let (ad, bd) = (f32_input("add", a)?, f32_input("add", b)?);
            new_f32(a.dims(), |o| cpu::residual_forward(o, ad, bd))?
        }
    };
    if tape.wants(&[a, b]) {
        tape.record(Op::Add, &[a, b], &out);
    }
    Ok(out)
}

/// Zeroes each element with probability `p` and scales the rest by 1 / (1 - p). The identity
/// (no copy, no node) when `p` is 0 or `train` is false. The mask comes from `seed`, so a step
/// can be replayed exactly.
pub fn dropout(tape: &mut Tape, x: &Tensor, p: f32, train: bool, seed: u64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Input(format!("dropout probability {p} must be in [0, 1)")));
    }
    if p == 0.0 || !train {
        return Ok(x.clone());
    }
    let _t = crate::profile::scope("dropout", crate::profile::Phase::Forward);
    let scale = 1.0 / (1.0 - p);
    #[cfg(feature = "cuda")]
    if x.device() != crate::Device::Cpu {
        // The kernel draws the CPU's mask bits per element; backward redraws them from the seed.
        let xd = dev::bf16_in("dropout", x)?;
        let out = dev::new_bf16(x.dims(), |o| cuda::dropout(o, None, xd, seed, p, scale))?;
        if tape.wants(&[x]) {
            tape.record(Op::Dropout(DropoutSaved { mask: Vec::new(), scale, seed, p }), &[x], &out);
        }
        return Ok(out);
    }
    let xd = f32_input("dropout", x)?;
    let mut mask = vec![0u8; x.numel()];
    cpu::dropout_mask(&mut mask, seed, p);
    let out = new_f32(x.dims(), |o| cpu::dropout_forward(o, xd, &mask, scale))?;
    if tape.wants(&[x]) {
        tape.record(Op::Dropout(DropoutSaved { mask, scale, seed, p }), &[x], &out);
    }
    Ok(out)
}

pub(crate) fn dropout_backward(s: &DropoutSaved, dout: &Tensor) -> Result<Vec<Option<Tensor>>> {
    #[cfg(feature = "cuda")]
    if dout.device() != crate::Device::Cpu {
        let g = dev::bf16_in("dropout backward", dout)?;
        return Ok(vec![Some(dev::new_bf16(dout.dims(), |d| cuda::dropout(d, None, g, s.seed, s.p, s.scale))?)]);
    }
    let g = dout.f32s()?;
    Ok(vec![Some(new_f32(dout.dims(), |d| cpu::dropout_forward(d, g, &s.mask, s.scale))?)])
}

/// `x` in bf16 on the GPU (from an f32 master weight): the identity on the CPU, where every op
/// computes in f32. Backward hands the master an f32 gradient whatever dtype reached the cast.
pub fn to_compute_dtype(tape: &mut Tape, x: &Tensor) -> Result<Tensor> {
    if x.device() == crate::Device::Cpu || x.dtype() == crate::DType::BF16 {
        return Ok(x.clone());
    }
    #[cfg(feature = "cuda")]
    {
        let xd = dev::f32_in("cast to bf16", x)?;
        let out = dev::new_bf16(x.dims(), |o| cuda::cast_f32_to_bf16(o, xd))?;
        if tape.wants(&[x]) {
            tape.record(Op::Cast(CastSaved { from: x.dtype() }), &[x], &out);
        }
        Ok(out)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = tape;
        Err(Error::CudaNotBuilt(0))
    }
}

pub(crate) fn cast_backward(s: &CastSaved, dout: &Tensor) -> Result<Vec<Option<Tensor>>> {
    if dout.dtype() == s.from {
        return Ok(vec![Some(dout.clone())]);
    }
    #[cfg(feature = "cuda")]
    {
        let g = dev::bf16_in("cast backward", dout)?;
        Ok(vec![Some(dev::new_f32(dout.dims(), |d| cuda::cast_bf16_to_f32(d, g))?)])
    }
    #[cfg(not(feature = "cuda"))]
    Err(Error::Input(format!("cast backward: a {:?} gradient for a {:?} input", dout.dtype(), s.from)))
}

/// The last position of each sequence, x [B, T, C] -> [B, 1, C]: the rows generation needs
/// logits for. Inference only: it records nothing, and refuses a tape that wants x's gradient.
pub fn last_position(tape: &mut Tape, x: &Tensor) -> Result<Tensor> {
    const OP: &str = "last_position";
    let [b, t, c] = *x.dims() else {
        return Err(Error::shape(OP, format!("x must be [B, T, C], got {:?}", x.dims())));
    };
    if tape.wants(&[x]) {
        return Err(Error::Input(format!("{OP} is for generation and has no backward")));
    }
    if t == 0 || c == 0 {
        return Err(Error::shape(OP, format!("x {:?} is empty", x.dims())));
    }
    if t == 1 {
        return Ok(x.clone());
    }
    match x.device() {
        #[cfg(feature = "cuda")]
        crate::Device::Cuda(_) => {
            let cu = crate::backend::cuda::cuda()?;
            let xd = dev::bf16_in(OP, x)?;
            dev::new_bf16(&[b, 1, c], |o| {
                for r in 0..b {
                    let at = (r * t + t - 1) * c;
                    cu.copy_view(&mut o.slice_mut(r * c..(r + 1) * c), &xd.slice(at..at + c))?;
                }
                Ok(())
            })
        }
        _ => {
            let xd = f32_input(OP, x)?;
            new_f32(&[b, 1, c], |o| {
                for (r, dst) in o.chunks_exact_mut(c).enumerate() {
                    dst.copy_from_slice(&xd[(r * t + t - 1) * c..(r * t + t) * c]);
                }
            })
        }
    }
}
