//! LoRA and NF4 linear layers composed from a backend's other methods: the trait defaults a
//! backend without fused kernels for them runs, on its own device (on CUDA: kiln's GEMM, cast,
//! dropout and add kernels; nothing goes through the host). The arithmetic is the CPU's
//! (`cpu::lora`): the update goes through the rank-r bottleneck us = scaling * dropout(x) A^T,
//! never a [k, n] matrix. GEMM operands are in the compute dtype (inputs in another dtype, such as
//! the f32 adapter, are cast for each product: r (k + n) elements for the adapter), products
//! accumulate in f32, outputs are in the compute dtype and parameter gradients in f32.
//!
//! The update lands on the base output in the GEMM's epilogue (`gemm_accumulate`), so the forward
//! adds no pass over [m, n].
//!
//! Backward, with G = dout [m, n] and s = scaling (as cpu::lora):
//!   dB = G^T us;  du = s G B;  dA = du^T dropout(x);  dx = G W'^T + dropout(du A)
//! where dropout's mask is redrawn from its seed (`Dropout`), never kept.

use super::{Backend, Dropout, GemmDesc, LoraArgs, Nf4Args, Trans};
use crate::quant::nf4::Nf4Weight;
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

/// A LoRA adapter's operands: A [r, k], B [n, r], the scaling and the input's dropout.
struct Adapter<'a> {
    a: &'a Tensor,
    b: &'a Tensor,
    scaling: f32,
    dropout: Option<Dropout>,
    m: usize,
    n: usize,
    k: usize,
    r: usize,
}

impl Adapter<'_> {
    /// (y + us B^T, us) for the base output y [m, n] of x [m, k] (compute dtype), with
    /// us = scaling * dropout(x) A^T [m, r].
    fn forward(&self, be: &dyn Backend, x: &Tensor, y: Tensor) -> Result<(Tensor, Tensor)> {
        let Adapter { m, n, k, r, .. } = *self;
        let mut us = be.gemm(
            &dropped(be, x, self.dropout)?,
            &compute(be, self.a)?,
            &GemmDesc::nt(m, r, k),
            DType::F32,
            &[m, r],
        )?;
        be.scale(&mut us, self.scaling)?;
        let us = compute(be, &us)?;
        // y += us B^T in the GEMM's epilogue
        let mut y = y;
        be.gemm_accumulate(&mut y, &us, &compute(be, self.b)?, &GemmDesc::nt(m, n, r))?;
        Ok((y, us))
    }

    /// [dropout(du A) (the adapter's share of dx), dA, dB] from g = dout [m, n] (compute dtype),
    /// each only where `needs` asks.
    fn backward(
        &self,
        be: &dyn Backend,
        x: &Tensor,
        us: &Tensor,
        g: &Tensor,
        needs: [bool; 3],
    ) -> Result<[Option<Tensor>; 3]> {
        let Adapter { m, n, k, r, .. } = *self;
        let [need_dx, need_da, need_db] = needs;
        let db = need_db.then(|| be.gemm(g, us, &GemmDesc::tn(n, r, m), DType::F32, &[n, r])).transpose()?;
        if !(need_dx || need_da) {
            return Ok([None, None, db]);
        }
        let mut du = be.gemm(g, &compute(be, self.b)?, &GemmDesc::nn(m, r, n), DType::F32, &[m, r])?;
        be.scale(&mut du, self.scaling)?;
        let du = compute(be, &du)?;
        let da = need_da
            .then(|| be.gemm(&du, &dropped(be, x, self.dropout)?, &GemmDesc::tn(r, k, m), DType::F32, &[r, k]))
            .transpose()?;
        let dx = need_dx
            .then(|| {
                let t = be.gemm(&du, &compute(be, self.a)?, &GemmDesc::nn(m, k, r), be.compute_dtype(), &[m, k])?;
                dropped(be, &t, self.dropout)
            })
            .transpose()?;
        Ok([dx, da, db])
    }
}

/// `base + extra` where both are given.
fn plus(be: &dyn Backend, base: Option<Tensor>, extra: Option<Tensor>) -> Result<Option<Tensor>> {
    match (base, extra) {
        (Some(b), Some(e)) => Ok(Some(be.add(&b, &e)?)),
        (b, e) => Ok(b.or(e)),
    }
}

fn lora_adapter<'a>(args: &LoraArgs<'a>) -> Adapter<'a> {
    let LoraArgs { a, b, scaling, dropout, m, n, k, r, .. } = *args;
    Adapter { a, b, scaling, dropout, m, n, k, r }
}

/// (y [m, n], us [m, r]) of a LoRA linear layer.
pub(crate) fn lora_linear(be: &dyn Backend, args: &LoraArgs) -> Result<(Tensor, Tensor)> {
    let LoraArgs { m, n, k, .. } = *args;
    let desc = GemmDesc::new(m, n, k, Trans::No, Trans::from_bool(args.w_trans));
    let x = compute(be, args.x)?;
    let bias = args.bias.map(|b| compute(be, b)).transpose()?;
    let (y, _) = be.matmul(&x, &compute(be, args.w)?, bias.as_ref(), &desc, &[m, n])?;
    lora_adapter(args).forward(be, &x, y)
}

/// [dx, dW, dA, dB, dbias] of a LoRA linear layer, each only where `needs` asks.
pub(crate) fn lora_linear_backward(
    be: &dyn Backend,
    args: &LoraArgs,
    us: &Tensor,
    dout: &Tensor,
    needs: [bool; 5],
) -> Result<[Option<Tensor>; 5]> {
    let LoraArgs { m, n, k, w_trans, .. } = *args;
    let (g, x) = (compute(be, dout)?, compute(be, args.x)?);
    let [dx_adapter, da, db] = lora_adapter(args).backward(be, &x, us, &g, [needs[0], needs[2], needs[3]])?;
    let dx_base = needs[0]
        .then(|| {
            let desc = GemmDesc::new(m, k, n, Trans::No, Trans::from_bool(!w_trans));
            be.gemm(&g, &compute(be, args.w)?, &desc, be.compute_dtype(), &[m, k])
        })
        .transpose()?;
    let dw = if !needs[1] {
        None
    } else if w_trans {
        Some(be.gemm(&g, &x, &GemmDesc::tn(n, k, m), DType::F32, &[n, k])?)
    } else {
        Some(be.gemm(&x, &g, &GemmDesc::tn(k, n, m), DType::F32, &[k, n])?)
    };
    let dbias = needs[4].then(|| be.bias_grad(&g, n)).transpose()?;
    Ok([plus(be, dx_base, dx_adapter)?, dw, da, db, dbias])
}

/// x [m, k] @ op(W) (+ bias) for an NF4 weight W [in, out]: `trans` false multiplies by W (x has
/// `in` columns), true by W^T (x has `out` columns); the default of `Nf4::nf4_matmul`: W
/// dequantized in the compute dtype for this call only, then the GEMM.
pub(crate) fn nf4_matmul(
    be: &dyn Backend,
    x: &Tensor,
    w: &Nf4Weight,
    bias: Option<&Tensor>,
    trans: bool,
) -> Result<Tensor> {
    let [rows, cols] = w.dims;
    let (k, n) = if trans { (cols, rows) } else { (rows, cols) };
    let m = x.numel() / k.max(1);
    let wd = be.nf4_dequantize(w)?;
    let bias = bias.map(|b| compute(be, b)).transpose()?;
    let desc = GemmDesc::new(m, n, k, Trans::No, Trans::from_bool(trans));
    Ok(be.matmul(&compute(be, x)?, &wd, bias.as_ref(), &desc, &[m, n])?.0)
}

fn nf4_adapter<'a>(args: &Nf4Args<'a>) -> Option<Adapter<'a>> {
    let (a, b, scaling) = args.lora?;
    let Nf4Args { dropout, m, n, k, r, .. } = *args;
    Some(Adapter { a, b, scaling, dropout, m, n, k, r })
}

/// (y [m, n], us [m, r]; an empty us without an adapter) of an NF4 linear layer.
pub(crate) fn nf4_linear(be: &dyn Backend, args: &Nf4Args) -> Result<(Tensor, Tensor)> {
    let x = compute(be, args.x)?;
    let bias = args.bias.map(|b| compute(be, b)).transpose()?;
    let y = be.nf4_matmul(&x, args.w, bias.as_ref(), args.w_trans)?;
    match nf4_adapter(args) {
        Some(ad) => ad.forward(be, &x, y),
        None => Ok((y, be.empty(&[args.m, 0])?)),
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
    let [need_dx, need_da, need_db, need_dbias] = needs;
    let g = compute(be, dout)?;
    let [dx_adapter, da, db] = match nf4_adapter(args) {
        Some(ad) => ad.backward(be, &compute(be, args.x)?, us, &g, [need_dx, need_da, need_db])?,
        None => [None, None, None],
    };
    let dx_base = need_dx.then(|| be.nf4_matmul(&g, args.w, None, !args.w_trans)).transpose()?;
    let dbias = need_dbias.then(|| be.bias_grad(&g, args.n)).transpose()?;
    Ok([plus(be, dx_base, dx_adapter)?, da, db, dbias])
}
