//! LayerNorm over the last dimension, with affine weight and bias.

#[cfg(feature = "cuda")]
use super::dev;
use super::{expect_dims, f32_input, new_f32};
use crate::backend::cpu::{layernorm as cpu, pool};
#[cfg(feature = "cuda")]
use crate::backend::cuda::layernorm as cuda;
use crate::tape::{Op, Tape};
#[cfg(feature = "cuda")]
use crate::tensor::CudaStorage;
use crate::{Result, Tensor};

pub(crate) struct Saved {
    x: Tensor,
    w: Tensor,
    /// Per-row statistics, f32 on the op's device.
    mean: Tensor,
    rstd: Tensor,
}

/// y = (x - mean) / sqrt(var + eps) * w + b over the last dimension C; w, b: [C].
pub fn layernorm(tape: &mut Tape, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    const OP: &str = "layernorm";
    let _t = crate::profile::scope("layernorm", crate::profile::Phase::Forward);
    let c = x.shape().last();
    expect_dims(OP, "weight", w, &[c])?;
    expect_dims(OP, "bias", b, &[c])?;
    let rows = x.shape().rows();
    let (out, mean, rstd) = match x.device() {
        #[cfg(feature = "cuda")]
        crate::Device::Cuda(_) => {
            let (xd, wd, bd) = (dev::bf16_in(OP, x)?, dev::bf16_in(OP, w)?, dev::bf16_in(OP, b)?);
            let cu = crate::backend::cuda::cuda()?;
            let (mut mean, mut rstd) = (cu.alloc::<f32>(rows)?, cu.alloc::<f32>(rows)?);
            let out =
                dev::new_bf16(x.dims(), |o| cuda::layernorm_forward(o, &mut mean, &mut rstd, xd, wd, bd, c, eps))?;
            (
                out,
                Tensor::from_cuda(CudaStorage::F32(mean), [rows])?,
                Tensor::from_cuda(CudaStorage::F32(rstd), [rows])?,
            )
        }
        _ => {
            let (xd, wd, bd) = (f32_input(OP, x)?, f32_input(OP, w)?, f32_input(OP, b)?);
            let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
            let out = new_f32(x.dims(), |o| cpu::layernorm_forward(o, &mut mean, &mut rstd, xd, wd, bd, c, eps))?;
            (out, Tensor::from_f32(mean, [rows])?, Tensor::from_f32(rstd, [rows])?)
        }
    };
    if tape.wants(&[x, w, b]) {
        tape.record(Op::LayerNorm(Saved { x: x.clone(), w: w.clone(), mean, rstd }), &[x, w, b], &out);
    }
    Ok(out)
}

pub(crate) fn backward(s: &Saved, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
    let c = s.x.shape().last();
    #[cfg(feature = "cuda")]
    if s.x.device() != crate::Device::Cpu {
        const OP: &str = "layernorm backward";
        let cu = crate::backend::cuda::cuda()?;
        let (g, x, w) = (dev::bf16_in(OP, dout)?, dev::bf16_in(OP, &s.x)?, dev::bf16_in(OP, &s.w)?);
        let (mean, rstd) = (dev::f32_in(OP, &s.mean)?, dev::f32_in(OP, &s.rstd)?);
        let mut dx = needs[0].then(|| cu.alloc::<crate::backend::cuda::bf16>(s.x.numel())).transpose()?;
        // dw, db: f32 for the f32 masters (the bf16 cast passes them through).
        let mut dw = needs[1].then(|| cu.alloc::<f32>(c)).transpose()?;
        let mut db = needs[2].then(|| cu.alloc::<f32>(c)).transpose()?;
        cuda::layernorm_backward(dx.as_mut(), dw.as_mut(), db.as_mut(), g, x, w, mean, rstd, c)?;
        return Ok(vec![
            dx.map(|d| Tensor::from_cuda(CudaStorage::BF16(d), s.x.dims())).transpose()?,
            dw.map(|d| Tensor::from_cuda(CudaStorage::F32(d), [c])).transpose()?,
            db.map(|d| Tensor::from_cuda(CudaStorage::F32(d), [c])).transpose()?,
        ]);
    }
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
        s.mean.f32s()?,
        s.rstd.f32s()?,
        c,
    );
    Ok(vec![
        dx.map(|d| Tensor::from_f32(d, s.x.dims())).transpose()?,
        dw.map(|d| Tensor::from_f32(d, [c])).transpose()?,
        db.map(|d| Tensor::from_f32(d, [c])).transpose()?,
    ])
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
    #[cfg(feature = "cuda")]
    if let crate::Device::Cuda(_) = x.device() {
        const OP: &str = "add_layernorm";
        let _t = crate::profile::scope("add_layernorm", crate::profile::Phase::Forward);
        if x.dims() != r.dims() {
            return Err(crate::Error::shape(OP, format!("shapes differ: {:?} vs {:?}", x.dims(), r.dims())));
        }
        let c = x.shape().last();
        expect_dims(OP, "weight", w, &[c])?;
        expect_dims(OP, "bias", b, &[c])?;
        let rows = x.shape().rows();
        let (xd, rd, wd, bd) = (dev::bf16_in(OP, x)?, dev::bf16_in(OP, r)?, dev::bf16_in(OP, w)?, dev::bf16_in(OP, b)?);
        let cu = crate::backend::cuda::cuda()?;
        let (mut mean, mut rstd) = (cu.alloc::<f32>(rows)?, cu.alloc::<f32>(rows)?);
        let mut h = cu.alloc::<crate::backend::cuda::bf16>(x.numel())?;
        let out = dev::new_bf16(x.dims(), |o| {
            cuda::layernorm_residual_forward(&mut h, o, &mut mean, &mut rstd, xd, rd, wd, bd, c, eps)
        })?;
        let s = Tensor::from_cuda(CudaStorage::BF16(h), x.dims())?;
        if tape.wants(&[x, r]) {
            tape.record(Op::Add, &[x, r], &s);
        }
        if tape.wants(&[&s, w, b]) {
            let (mean, rstd) = (
                Tensor::from_cuda(CudaStorage::F32(mean), [rows])?,
                Tensor::from_cuda(CudaStorage::F32(rstd), [rows])?,
            );
            tape.record(Op::LayerNorm(Saved { x: s.clone(), w: w.clone(), mean, rstd }), &[&s, w, b], &out);
        }
        return Ok((s, out));
    }
    let s = super::elementwise::add(tape, x, r)?;
    let y = layernorm(tape, &s, w, b, eps)?;
    Ok((s, y))
}
