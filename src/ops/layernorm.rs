//! LayerNorm over the last dimension, with affine weight and bias.

use super::{expect_dims, f32_input, new_f32};
use crate::backend::cpu::{layernorm as cpu, pool};
use crate::tape::{Op, Tape};
use crate::{Result, Tensor};

pub(crate) struct Saved {
    x: Tensor,
    w: Tensor,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

/// y = (x - mean) / sqrt(var + eps) * w + b over the last dimension C; w, b: [C].
pub fn layernorm(tape: &mut Tape, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "layernorm";
    let _t = crate::profile::scope("layernorm", crate::profile::Phase::Forward);
    let c = x.shape().last();
    expect_dims(OP, "weight", w, &[c])?;
    expect_dims(OP, "bias", b, &[c])?;
    let (xd, wd, bd) = (f32_input(OP, x)?, f32_input(OP, w)?, f32_input(OP, b)?);
    let rows = x.shape().rows();
    let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
    let out = new_f32(x.dims(), |o| cpu::layernorm_forward(o, &mut mean, &mut rstd, xd, wd, bd, c, eps))?;
    if tape.wants(&[x, w, b]) {
        tape.record(Op::LayerNorm(Saved { x: x.clone(), w: w.clone(), mean, rstd }), &[x, w, b], &out);
    }
    Ok(out)
}

pub(crate) fn backward(s: &Saved, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
    let c = s.x.shape().last();
    let mut dx = needs[0].then(|| pool::take(s.x.numel()));
    let mut dw = needs[1].then(|| vec![0f32; c]);
    let mut db = needs[2].then(|| vec![0f32; c]);
    cpu::layernorm_backward(
        dx.as_deref_mut(),
        dw.as_deref_mut(),
        db.as_deref_mut(),
        dout.f32s()?,
        s.x.f32s()?,
        s.w.f32s()?,
        &s.mean,
        &s.rstd,
        c,
    );
    Ok(vec![
        dx.map(|d| Tensor::from_f32(d, s.x.dims())).transpose()?,
        dw.map(|d| Tensor::from_f32(d, [c])).transpose()?,
        db.map(|d| Tensor::from_f32(d, [c])).transpose()?,
    ])
}
