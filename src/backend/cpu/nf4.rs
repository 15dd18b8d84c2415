//! NF4 linear on the CPU: y = x W + b (+ the LoRA update) with W [k, n] held as NF4 codes and a
//! double-quantized absmax (`quant::nf4::Nf4Weight`). W is dequantized per call into a pooled
//! f32 buffer, used by the same GEMMs as the f32 layer, and given back: only the 4-bit form
//! outlives the call. Backward dequantizes again for dx = G W^T; the base is frozen, so there
//! is no dW. The LoRA arithmetic is `lora::lora_forward` / `lora::lora_backward`, called on the
//! dequantized W, so the two paths cannot drift apart.

use super::gemm::{bias_backward, matmul, matmul_forward};
use super::lora::{dropped_input, mask_of};
use super::lora::{lora_backward, lora_forward, LoraGrads};
use super::{f32_in, new_f32, pool, take_if, wrap};
use crate::backend::GemmDesc;
use crate::backend::Nf4Args;
use crate::quant::nf4::Nf4Weight;
use crate::{Result, Tensor};

/// The adapter of an NF4 layer: A [r, k], B [n, r], the scaling, and xd = dropout(x) (x itself
/// without dropout).
pub struct Nf4Adapter<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub xd: &'a [f32],
    pub r: usize,
    pub scaling: f32,
}

/// The dequantized W [k, n] in a pooled buffer (give it back with `pool::give`).
fn dequantized(w: &Nf4Weight) -> Vec<f32> {
    let mut buf = pool::take(w.numel());
    w.dequantize_into(&mut buf).expect("an Nf4Weight built by Nf4Weight::quantize is self-consistent");
    buf
}

/// out[m, n] = x @ W + bias (+ us @ B^T, `us` [m, r] receiving scaling * xd @ A^T when an
/// adapter is given), with W dequantized from `w` ([k, n], or [n, k] read transposed with
/// `w_trans`).
#[allow(clippy::too_many_arguments)]
pub fn nf4_linear_forward(
    out: &mut [f32],
    us: &mut [f32],
    x: &[f32],
    w: &Nf4Weight,
    w_trans: bool,
    bias: Option<&[f32]>,
    adapter: Option<&Nf4Adapter>,
    m: usize,
    n: usize,
    k: usize,
) {
    let wd = dequantized(w);
    match adapter {
        Some(ad) => lora_forward(out, us, x, ad.xd, &wd, w_trans, bias, ad.a, ad.b, m, n, k, ad.r, ad.scaling),
        None => {
            let desc = if w_trans { GemmDesc::nt(m, n, k) } else { GemmDesc::nn(m, n, k) };
            matmul_forward(out, None, x, &wd, bias, &desc)
        }
    }
    pool::give(wd);
}

/// The gradients of `nf4_linear_forward`'s inputs from dout [m, n] (`grads.dw` must be None: the
/// quantized base is frozen). `keep` is the adapter's dropout mask with its scale.
#[allow(clippy::too_many_arguments)]
pub fn nf4_linear_backward(
    grads: LoraGrads,
    dout: &[f32],
    x: &[f32],
    keep: Option<(&[u8], f32)>,
    w: &Nf4Weight,
    w_trans: bool,
    adapter: Option<&Nf4Adapter>,
    us: &[f32],
    m: usize,
    n: usize,
    k: usize,
) {
    assert!(grads.dw.is_none(), "nf4_linear: the NF4 base weight is frozen and has no gradient");
    if grads.dx.is_none() && grads.da.is_none() && grads.db.is_none() {
        if let Some(dbias) = grads.dbias {
            bias_backward(dbias, dout, n);
        }
        return;
    }
    let wd = dequantized(w);
    match adapter {
        Some(ad) => lora_backward(grads, dout, x, ad.xd, keep, &wd, w_trans, ad.a, ad.b, us, m, n, k, ad.r, ad.scaling),
        None => {
            if let Some(dx) = grads.dx {
                // dx [m, k] = G [m, n] @ W^T [n, k] (W stored [n, k] with w_trans: G @ W)
                let desc = if w_trans { GemmDesc::nn(m, k, n) } else { GemmDesc::nt(m, k, n) };
                matmul(dx, dout, &wd, &desc, false);
            }
            if let Some(dbias) = grads.dbias {
                bias_backward(dbias, dout, n);
            }
        }
    }
    pool::give(wd);
}

impl crate::backend::Nf4 for super::Cpu {
    fn nf4_dequantize(&self, w: &Nf4Weight) -> Result<Tensor> {
        Tensor::from_f32(w.dequantize()?, w.dims)
    }

    fn nf4_linear(&self, args: &Nf4Args) -> Result<(Tensor, Tensor)> {
        const OP: &str = "nf4_linear";
        let Nf4Args { m, n, k, r, .. } = *args;
        let xv = f32_in(OP, args.x)?;
        let biasd = args.bias.map(|t| f32_in(OP, t)).transpose()?;
        let ab = args.lora.map(|(a, b, s)| Ok::<_, crate::Error>((f32_in(OP, a)?, f32_in(OP, b)?, s))).transpose()?;
        let keep = args.dropout.map(|d| mask_of(d, m * k));
        let dropped = keep.as_ref().map(|(mask, scale)| dropped_input(xv, (mask, *scale)));
        let adapter = ab.map(|(a, b, scaling)| Nf4Adapter { a, b, xd: dropped.as_deref().unwrap_or(xv), r, scaling });
        let mut us = vec![0f32; m * r];
        let out = new_f32(&[m, n], |o| {
            nf4_linear_forward(o, &mut us, xv, args.w, args.w_trans, biasd, adapter.as_ref(), m, n, k)
        })?;
        if let Some(d) = dropped {
            pool::give(d);
        }
        Ok((out, Tensor::from_f32(us, [m, r])?))
    }

    fn nf4_linear_backward(
        &self,
        args: &Nf4Args,
        us: &Tensor,
        dout: &Tensor,
        needs: [bool; 4],
    ) -> Result<[Option<Tensor>; 4]> {
        const OP: &str = "nf4_linear backward";
        let Nf4Args { m, n, k, r, .. } = *args;
        let x = f32_in(OP, args.x)?;
        let keep = args.dropout.filter(|_| needs[0] || needs[1]).map(|d| mask_of(d, m * k));
        let keep = keep.as_ref().map(|(mask, scale)| (mask.as_slice(), *scale));
        let dropped = keep.filter(|_| needs[1]).map(|k| dropped_input(x, k));
        let (mut dx, mut da, mut db) = (take_if(needs[0], m * k), take_if(needs[1], r * k), take_if(needs[2], n * r));
        let mut dbias = needs[3].then(|| vec![0f32; n]);
        let grads = LoraGrads {
            dx: dx.as_deref_mut(),
            dw: None,
            dbias: dbias.as_deref_mut(),
            da: da.as_deref_mut(),
            db: db.as_deref_mut(),
        };
        let ab = args.lora.map(|(a, b, s)| Ok::<_, crate::Error>((f32_in(OP, a)?, f32_in(OP, b)?, s))).transpose()?;
        let adapter = ab.map(|(a, b, scaling)| Nf4Adapter { a, b, xd: dropped.as_deref().unwrap_or(x), r, scaling });
        let (g, us) = (f32_in(OP, dout)?, f32_in(OP, us)?);
        nf4_linear_backward(grads, g, x, keep, args.w, args.w_trans, adapter.as_ref(), us, m, n, k);
        if let Some(d) = dropped {
            pool::give(d);
        }
        Ok([wrap(dx, args.x.dims())?, wrap(da, &[r, k])?, wrap(db, &[n, r])?, wrap(dbias, &[n])?])
    }
}
