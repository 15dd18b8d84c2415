//! NF4 linear (QLoRA): a Conv1D whose frozen weight W [in, out] is stored in NF4 with a
//! double-quantized absmax, optionally with a LoRA adapter on top,
//!   y = x deq(W) + b + scaling * dropout(x) A^T B^T,
//! as one tape node. The node saves the `Arc<Nf4Weight>`, never the dequantized matrix, and
//! dequantizes again in backward for dx; there is no dW. The rules are in
//! `src/backend/cpu/nf4.rs`, which calls the LoRA backend's.

use super::{expect_dims, f32_input, new_f32};
use crate::backend::cpu::{lora::LoraGrads, nf4 as cpu, pool};
use crate::quant::nf4::Nf4Weight;
use crate::tape::{Op, Tape};
use crate::{Error, Result, Tensor};
use std::sync::Arc;

/// The LoRA adapter of an NF4 layer, as `lora::lora_linear` takes it.
#[derive(Clone, Copy)]
pub struct Nf4Lora<'a> {
    pub a: &'a Tensor, // [r, in]
    pub b: &'a Tensor, // [out, r]
    pub scaling: f32,
    /// Dropout on the adapter's input, applied only when `train`; the mask is drawn from `seed`.
    pub dropout_p: f32,
    pub train: bool,
    pub seed: u64,
}

pub(crate) struct Saved {
    x: Tensor,
    w: Arc<Nf4Weight>,
    /// (A, B) when the layer has an adapter.
    ab: Option<(Tensor, Tensor)>,
    /// scaling * dropout(x) A^T, [M, r]
    us: Vec<f32>,
    keep: Option<(Vec<u8>, f32)>,
    scaling: f32,
    m: usize,
    n: usize,
    k: usize,
    r: usize,
    has_bias: bool,
}

/// y = x @ deq(w) + bias (+ the LoRA update) for x [..., in] and w an NF4 weight [in, out]. The
/// inputs are recorded in the order x, A, B, bias (those given).
pub fn nf4_linear(
    tape: &mut Tape,
    x: &Tensor,
    w: &Arc<Nf4Weight>,
    bias: Option<&Tensor>,
    lora: Option<Nf4Lora>,
) -> Result<Tensor> {
    const OP: &str = "nf4_linear";
    let _t = crate::profile::scope(OP, crate::profile::Phase::Forward);
    let [k, n] = w.dims;
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
                return Err(Error::Input(format!("{OP}: dropout probability {} must be in [0, 1)", l.dropout_p)));
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
    let xv = f32_input(OP, x)?;
    let biasd = bias.map(|t| f32_input(OP, t)).transpose()?;
    let ab = lora.as_ref().map(|l| Ok::<_, Error>((f32_input(OP, l.a)?, f32_input(OP, l.b)?))).transpose()?;

    let keep = lora.as_ref().and_then(|l| super::lora::dropout_keep(l.train, l.dropout_p, l.seed, m * k));
    let dropped = keep.as_ref().map(|k| super::lora::dropped_input(xv, k));
    let scaling = lora.as_ref().map_or(0.0, |l| l.scaling);
    let adapter = ab.map(|(a, b)| cpu::Nf4Adapter { a, b, xd: dropped.as_deref().unwrap_or(xv), r, scaling });
    let mut us = vec![0f32; m * r];
    let mut out_dims = x.dims().to_vec();
    out_dims.pop();
    out_dims.push(n);
    let out = new_f32(&out_dims, |o| cpu::nf4_linear_forward(o, &mut us, xv, w, biasd, adapter.as_ref(), m, n, k))?;
    if let Some(d) = dropped {
        pool::give(d);
    }
    let inputs: Vec<&Tensor> =
        [Some(x), lora.as_ref().map(|l| l.a), lora.as_ref().map(|l| l.b), bias].into_iter().flatten().collect();
    if tape.wants(&inputs) {
        let saved = Saved {
            x: x.clone(),
            w: Arc::clone(w),
            ab: lora.as_ref().map(|l| (l.a.clone(), l.b.clone())),
            us,
            keep,
            scaling,
            m,
            n,
            k,
            r,
            has_bias: bias.is_some(),
        };
        tape.record(Op::Nf4(saved), &inputs, &out);
    }
    Ok(out)
}

pub(crate) fn backward(s: &Saved, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
    let (m, n, k, r) = (s.m, s.n, s.k, s.r);
    let x = s.x.f32s()?;
    let has_lora = s.ab.is_some();
    // needs follows the recorded inputs: x, [A, B], [bias]
    let (need_x, need_a, need_b) = (needs[0], has_lora && needs[1], has_lora && needs[2]);
    let need_bias = s.has_bias && needs[if has_lora { 3 } else { 1 }];
    let dropped = s.keep.as_ref().filter(|_| need_a).map(|k| super::lora::dropped_input(x, k));
    let take = |need: bool, len: usize| need.then(|| pool::take(len));
    let (mut dx, mut da, mut db) = (take(need_x, m * k), take(need_a, r * k), take(need_b, n * r));
    let mut dbias = need_bias.then(|| vec![0f32; n]);
    let grads = LoraGrads {
        dx: dx.as_deref_mut(),
        dw: None,
        dbias: dbias.as_deref_mut(),
        da: da.as_deref_mut(),
        db: db.as_deref_mut(),
    };
    let ab = s.ab.as_ref().map(|(a, b)| Ok::<_, Error>((a.f32s()?, b.f32s()?))).transpose()?;
    let adapter = ab.map(|(a, b)| cpu::Nf4Adapter { a, b, xd: dropped.as_deref().unwrap_or(x), r, scaling: s.scaling });
    let keep = s.keep.as_ref().map(|(mask, scale)| (mask.as_slice(), *scale));
    cpu::nf4_linear_backward(grads, dout.f32s()?, x, keep, &s.w, adapter.as_ref(), &s.us, m, n, k);
    if let Some(d) = dropped {
        pool::give(d);
    }
    let wrap = |d: Option<Vec<f32>>, dims: &[usize]| d.map(|d| Tensor::from_f32(d, dims)).transpose();
    let mut out = vec![wrap(dx, s.x.dims())?];
    if has_lora {
        out.push(wrap(da, &[r, k])?);
        out.push(wrap(db, &[n, r])?);
    }
    if s.has_bias {
        out.push(wrap(dbias, &[n])?);
    }
    Ok(out)
}
