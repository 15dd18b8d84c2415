//! GELU (tanh approximation), residual add and dropout.

use super::{f32_input, new_f32};
use crate::backend::cpu::elementwise as cpu;
use crate::tape::{Op, Tape};
use crate::{Error, Result, Tensor};

pub(crate) struct GeluSaved {
    x: Tensor,
}

pub(crate) struct DropoutSaved {
    mask: Vec<u8>,
    scale: f32,
}

/// GELU with the tanh approximation (GPT-2's "gelu_new").
pub fn gelu(tape: &mut Tape, x: &Tensor) -> Result<Tensor> {
    let _t = crate::profile::scope("gelu", crate::profile::Phase::Forward);
    let xd = f32_input("gelu", x)?;
    let out = new_f32(x.dims(), |o| cpu::gelu_forward(o, xd))?;
    if tape.wants(&[x]) {
        tape.record(Op::Gelu(GeluSaved { x: x.clone() }), &[x], &out);
    }
    Ok(out)
}

pub(crate) fn gelu_backward(s: &GeluSaved, dout: &Tensor) -> Result<Vec<Option<Tensor>>> {
    let (x, g) = (s.x.f32s()?, dout.f32s()?);
    Ok(vec![Some(new_f32(s.x.dims(), |d| cpu::gelu_backward(d, x, g))?)])
}

/// a + b, elementwise, same shapes (the residual connection).
pub fn add(tape: &mut Tape, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        return Err(Error::shape("add", format!("shapes differ: {:?} vs {:?}", a.dims(), b.dims())));
    }
    let _t = crate::profile::scope("add", crate::profile::Phase::Forward);
    let (ad, bd) = (f32_input("add", a)?, f32_input("add", b)?);
    let out = new_f32(a.dims(), |o| cpu::residual_forward(o, ad, bd))?;
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
    let xd = f32_input("dropout", x)?;
    let mut mask = vec![0u8; x.numel()];
    cpu::dropout_mask(&mut mask, seed, p);
    let scale = 1.0 / (1.0 - p);
    let out = new_f32(x.dims(), |o| cpu::dropout_forward(o, xd, &mask, scale))?;
    if tape.wants(&[x]) {
        tape.record(Op::Dropout(DropoutSaved { mask, scale }), &[x], &out);
    }
    Ok(out)
}

pub(crate) fn dropout_backward(s: &DropoutSaved, dout: &Tensor) -> Result<Vec<Option<Tensor>>> {
    let g = dout.f32s()?;
    Ok(vec![Some(new_f32(dout.dims(), |d| cpu::dropout_forward(d, g, &s.mask, s.scale))?)])
}
