//! LoRA and NF4 linear layers composed from a backend's other methods: the trait defaults a
//! backend without fused kernels for them runs, on its own device (on CUDA: kiln's GEMM, cast,
//! dropout and add kernels; nothing goes through the host). The arithmetic is the CPU's
//! (`cpu::lora`): the update goes through the rank-r bottleneck us = scaling * dropout(x) A^T,
//! never a [k, n] matrix. GEMM operands are in the compute dtype (inputs in another dtype, such as
//! the f32 adapter, are cast for each product: r (k + n) elements for the adapter), products
//! accumulate in f32, outputs are in the compute dtype and parameter gradients in f32.
//!
//! Backward, with G = dout [m, n] and s = scaling (as cpu::lora):
//!   dB = G^T us;  du = s G B;  dA = du^T dropout(x);  dx = G W'^T + dropout(du A)
//! where dropout's mask is redrawn from its seed (`Dropout`), never kept.

use super::{Backend, Dropout, GemmDesc, LoraArgs, Nf4Args, Trans};
use crate::{DType, Result, Tensor};

/// x with the adapter's dropout applied (x itself without it).
fn dropped(be: &dyn Backend, x: &Tensor, d: Option<Dropout>) -> Result<Tensor> {
    match d {
        Some(Dropout { p, seed }) => be.dropout(x, p, seed),
        None => Ok(x.clone()),
    }
}

/// `t` in the compute dtype.
fn compute(be: &dyn Backend, t: &Tensor) -> Result<Tensor> {
    if t.dtype() == be.compute_dtype() {
        Ok(t.clone())
    } else {
        be.cast(t, be.compute_dtype())
    }
}

/// us = scaling * dropout(x) A^T [m, r], in the compute dtype.
fn bottleneck(
    be: &dyn Backend,
    x: &Tensor,
    a: &Tensor,
    scaling: f32,
    d: Option<Dropout>,
    m: usize,
    k: usize,
) -> Result<Tensor> {
    let r = a.dims()[0];
    let mut us = be.gemm(&dropped(be, x, d)?, &compute(be, a)?, &GemmDesc::nt(m, r, k), DType::F32, &[m, r])?;
    be.scale(&mut us, scaling)?;
    compute(be, &us)
}

/// (y [m, n], us [m, r]) of a LoRA linear layer.
pub(crate) fn lora_linear(be: &dyn Backend, args: &LoraArgs) -> Result<(Tensor, Tensor)> {
    let LoraArgs { m, n, k, r, .. } = *args;
    let desc = GemmDesc::new(m, n, k, Trans::No, Trans::from_bool(args.w_trans));
    let x = compute(be, args.x)?;
    let bias = args.bias.map(|b| compute(be, b)).transpose()?;
    let (y, _) = be.matmul(&x, &compute(be, args.w)?, bias.as_ref(), &desc, &[m, n])?;
    let us = bottleneck(be, &x, args.a, args.scaling, args.dropout, m, k)?;
    let update = be.gemm(&us, &compute(be, args.b)?, &GemmDesc::nt(m, n, r), y.dtype(), &[m, n])?;
    Ok((be.add(&y, &update)?, us))
}

/// [dx, dW, dA, dB, dbias] of a LoRA linear layer, each only where `needs` asks.
pub(crate) fn lora_linear_backward(
    be: &dyn Backend,
    args: &LoraArgs,
    us: &Tensor,
    dout: &Tensor,
    needs: [bool; 5],
) -> Result<[Option<Tensor>; 5]> {
    let LoraArgs { m, n, k, r, w_trans, .. } = *args;
    let (g, ct) = (compute(be, dout)?, be.compute_dtype());
    let x = compute(be, args.x)?;
    let db = needs[3].then(|| be.gemm(&g, us, &GemmDesc::tn(n, r, m), DType::F32, &[n, r])).transpose()?;
    let du = if needs[0] || needs[2] {
        let mut du = be.gemm(&g, &compute(be, args.b)?, &GemmDesc::nn(m, r, n), DType::F32, &[m, r])?;
        be.scale(&mut du, args.scaling)?;
        Some(compute(be, &du)?)
    } else {
        None
    };
    let da = match (&du, needs[2]) {
        (Some(du), true) => {
            let xd = dropped(be, &x, args.dropout)?;
            Some(be.gemm(du, &xd, &GemmDesc::tn(r, k, m), DType::F32, &[r, k])?)
        }
        _ => None,
    };
    let dx = match (&du, needs[0]) {
        (Some(du), true) => {
            let desc = GemmDesc::new(m, k, n, Trans::No, Trans::from_bool(!w_trans));
            let base = be.gemm(&g, &compute(be, args.w)?, &desc, ct, &[m, k])?;
            let through = be.gemm(du, &compute(be, args.a)?, &GemmDesc::nn(m, k, r), ct, &[m, k])?;
            Some(be.add(&base, &dropped(be, &through, args.dropout)?)?)
        }
        _ => None,
    };
    let dw = if !needs[1] {
        None
    } else if w_trans {
        Some(be.gemm(&g, &x, &GemmDesc::tn(n, k, m), DType::F32, &[n, k])?)
    } else {
        Some(be.gemm(&x, &g, &GemmDesc::tn(k, n, m), DType::F32, &[k, n])?)
    };
    let dbias = needs[4].then(|| be.bias_grad(&g, n)).transpose()?;
    Ok([dx, dw, da, db, dbias])
}

/// The LoRA operands of an NF4 layer over its dequantized weight `wd` [k, n].
fn as_lora<'a>(args: &Nf4Args<'a>, wd: &'a Tensor) -> Option<LoraArgs<'a>> {
    let (a, b, scaling) = args.lora?;
    let Nf4Args { x, bias, dropout, m, n, k, r, .. } = *args;
    Some(LoraArgs { x, w: wd, w_trans: false, bias, a, b, scaling, dropout, m, n, k, r })
}

/// (y [m, n], us [m, r]; an empty us without an adapter) of an NF4 linear layer: the weight
/// dequantized in the compute dtype for this call only.
pub(crate) fn nf4_linear(be: &dyn Backend, args: &Nf4Args) -> Result<(Tensor, Tensor)> {
    let wd = be.nf4_dequantize(args.w)?;
    match as_lora(args, &wd) {
        Some(l) => lora_linear(be, &l),
        None => {
            let Nf4Args { m, n, k, .. } = *args;
            let bias = args.bias.map(|b| compute(be, b)).transpose()?;
            let (y, _) = be.matmul(&compute(be, args.x)?, &wd, bias.as_ref(), &GemmDesc::nn(m, n, k), &[m, n])?;
            Ok((y, be.empty(&[m, 0])?))
        }
    }
}

/// [dx, dA, dB, dbias] of an NF4 linear layer (the base is frozen: no dW).
pub(crate) fn nf4_linear_backward(
    be: &dyn Backend,
    args: &Nf4Args,
    us: &Tensor,
    dout: &Tensor,
    needs: [bool; 4],
) -> Result<[Option<Tensor>; 4]> {
    let Nf4Args { m, n, k, .. } = *args;
    let [need_dx, need_da, need_db, need_dbias] = needs;
    if !(need_dx || need_da || need_db) {
        let dbias = need_dbias.then(|| be.bias_grad(&compute(be, dout)?, n)).transpose()?;
        return Ok([None, None, None, dbias]);
    }
    let wd = be.nf4_dequantize(args.w)?;
    match as_lora(args, &wd) {
        Some(l) => {
            let [dx, _, da, db, dbias] =
                lora_linear_backward(be, &l, us, dout, [need_dx, false, need_da, need_db, need_dbias])?;
            Ok([dx, da, db, dbias])
        }
        None => {
            let g = compute(be, dout)?;
            let dx =
                need_dx.then(|| be.gemm(&g, &wd, &GemmDesc::nt(m, k, n), be.compute_dtype(), &[m, k])).transpose()?;
            let dbias = need_dbias.then(|| be.bias_grad(&g, n)).transpose()?;
            Ok([dx, None, None, dbias])
        }
    }
}
