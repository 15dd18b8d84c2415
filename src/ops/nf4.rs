//! NF4 linear (QLoRA): a Conv1D (W [in, out]) or nn.Linear (W [out, in]) whose frozen weight is
//! double-quantized absmax, optionally with a LoRA adapter on top,
//!   y = x deq(W) + b + scaling * dropout(x) A^T B^T,
//! as one tape node. The node saves the `Arc<Nf4Weight>`, never the dequantized matrix, and
//! dequantizes again in backward for dx; there is no dW. The rules are in
//! `src/backend/cpu/nf4.rs`, which calls the LoRA backend's.

use super::expect_dims;
use crate::backend::{on, Dropout, Nf4Args};
use crate::ops::gemm::WeightLayout;
use crate::quant::nf4::Nf4Weight;
use crate::tape::{Op, Tape};
use crate::{Error, Result, Tensor};
use std::sync::Arc;

/// The LoRA adapter of an NF4 layer: the same as `lora::lora_linear` takes.
pub use super::lora::LoraAdapter as Nf4Lora;

struct Nf4Linear {
    x: Tensor,
    w: Arc<Nf4Weight>,
    /// W is stored [out, in] (an nn.Linear) rather than [in, out] (a Conv1D).
    w_trans: bool,
    bias: Option<Tensor>,
    /// (A, B) when the layer has an adapter.
    ab: Option<(Tensor, Tensor)>,
    /// scaling * dropout(x) A^T, [M, r]
    us: Tensor,
    dropout: Option<Dropout>,
    scaling: f32,
    m: usize,
    n: usize,
    k: usize,
    r: usize,
}

impl Nf4Linear {
    fn args(&self) -> Nf4Args<'_> {
        Nf4Args {
            x: &self.x,
            w: &self.w,
            w_trans: self.w_trans,
            bias: self.bias.as_ref(),
            lora: self.ab.as_ref().map(|(a, b)| (a, b, self.scaling)),
            dropout: self.dropout,
            m: self.m,
            n: self.n,
            k: self.k,
            r: self.r,
        }
    }
}

impl Op for Nf4Linear {
    fn name(&self) -> &'static str {
        "nf4_linear"
    }
    fn backward(&self, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let has_lora = self.ab.is_some();
        let has_bias = self.bias.is_some();
        // needs follows the recorded inputs: x, [A, B], [bias]
        let need_bias = has_bias && needs[if has_lora { 3 } else { 1 }];
        let needs4 = [needs[0], has_lora && needs[1], has_lora && needs[2], need_bias];
        let be = on("nf4_linear backward", &[dout, &self.x])?;
        let [dx, da, db, dbias] = be.nf4_linear_backward(&self.args(), &self.us, dout, needs4)?;
        let mut out = vec![dx.map(|d| d.reshape(self.x.dims())).transpose()?];
        if has_lora {
            out.push(da);
            out.push(db);
        }
        if has_bias {
            out.push(dbias);
        }
        Ok(out)
    }
}

/// y = x @ deq(w) + bias (+ the LoRA update) for x [..., in] and w an NF4 weight [in, out] (a
/// Conv1D). The inputs are recorded in the order x, A, B, bias (those given).
pub fn nf4_linear(
    tape: &mut Tape,
    x: &Tensor,
    w: &Arc<Nf4Weight>,
    bias: Option<&Tensor>,
    lora: Option<Nf4Lora>,
) -> Result<Tensor> {
    nf4_linear_with(tape, x, w, WeightLayout::InOut, bias, lora)
}

/// `nf4_linear` for a weight in either layout: [in, out] (`InOut`, a Conv1D) or [out, in]
/// (`OutIn`, an nn.Linear as bitsandbytes quantizes it: y = x @ deq(w)^T).
pub fn nf4_linear_with(
    tape: &mut Tape,
    x: &Tensor,
    w: &Arc<Nf4Weight>,
    layout: WeightLayout,
    bias: Option<&Tensor>,
    lora: Option<Nf4Lora>,
) -> Result<Tensor> {
    const OP: &str = "nf4_linear";
    let _t = crate::profile::scope(OP, crate::profile::Phase::Forward);
    let w_trans = layout == WeightLayout::OutIn;
    let [k, n] = if w_trans { [w.dims[1], w.dims[0]] } else { w.dims };
    if x.dims().is_empty() || x.shape().last() != k {
        return Err(Error::shape(
            OP,
            format!("x {:?} does not end in the weight's in = {k} (weight {:?})", x.dims(), w.dims),
        ));
    }
    if let Some(bias) = bias {
        expect_dims(OP, "bias", bias, &[n])?;
    }
    let r = match &lora {
        None => 0,
        Some(l) => {
            if !(0.0..1.0).contains(&l.dropout_p) {
                return Err(Error::dropout("nf4_linear: ", l.dropout_p));
            }
            let r = match l.a.dims() {
                &[r, ka] if ka == k && r > 0 => r,
                d => return Err(Error::shape(OP, format!("lora_A has shape {d:?}, expected [r, {k}] with r >= 1"))),
            };
            expect_dims(OP, "lora_B", l.b, &[n, r])?;
            r
        }
    };
    let m = x.shape().rows();
    let dropout = lora.as_ref().and_then(|l| super::lora::dropout_of(l.train, l.dropout_p, l.seed));
    let mut saved = Nf4Linear {
        x: x.clone(),
        w: Arc::clone(w),
        w_trans,
        bias: bias.cloned(),
        ab: lora.as_ref().map(|l| (l.a.clone(), l.b.clone())),
        us: Tensor::scalar(0.0),
        dropout,
        scaling: lora.as_ref().map_or(0.0, |l| l.scaling),
        m,
        n,
        k,
        r,
    };
    let inputs: Vec<&Tensor> =
        [Some(x), lora.as_ref().map(|l| l.a), lora.as_ref().map(|l| l.b), bias].into_iter().flatten().collect();
    let (y, us) = on(OP, &inputs)?.nf4_linear(&saved.args())?;
    let mut out_dims = x.dims().to_vec();
    out_dims.pop();
    out_dims.push(n);
    let out = y.reshape(out_dims)?;
    if tape.wants(&inputs) {
        saved.us = us;
        tape.record(saved, &inputs, &out);
    }
    Ok(out)
}
