//! LoRA linear: a Conv1D layer (W [in, out], y = x W + b) with PEFT's low-rank update,
//!   y = x W + b + scaling * dropout(x) A^T B^T,   A = lora_A [r, in], B = lora_B [out, r],
//! as one tape node (llm.c granularity); `lora_linear_ex` also takes W stored [out, in] (an
//! nn.Linear, such as GPT-2's lm_head, which is wte [V, C]). Backward computes only what `needs`
//! asks for, so the frozen base weight of a LoRA model costs no dW GEMM and no gradient buffer;
//! the rules are in `src/backend/cpu/lora.rs`.
//!
//! LoRA embedding: the update PEFT adds to an embedding lookup, scaling * A[:, ids]^T B^T with
//! A = lora_embedding_A [r, V], B = lora_embedding_B [C, r] (no dropout: PEFT applies none on
//! this path), as its own node; the caller adds it to the base lookup.

use super::gemm::WeightLayout;
use super::{expect_dims, f32_input, new_f32};
use crate::backend::cpu::{elementwise as cpu_ew, lora as cpu, pool};
use crate::tape::{Op, Tape};
use crate::{Error, Result, Tensor};

pub(crate) struct Saved {
    x: Tensor,
    w: Tensor,
    /// W is stored [out, in] (WeightLayout::OutIn).
    w_trans: bool,
    a: Tensor,
    b: Tensor,
    /// scaling * dropout(x) A^T, [M, r]
    us: Vec<f32>,
    /// The dropout mask (1 = kept) and 1 / (1 - p), when dropout was applied.
    keep: Option<(Vec<u8>, f32)>,
    scaling: f32,
    m: usize,
    n: usize,
    k: usize,
    r: usize,
    has_bias: bool,
}

/// y = x @ w + bias + scaling * dropout(x) @ a^T @ b^T for x [..., in], w [in, out] (Conv1D
/// layout), a [r, in], b [out, r]. Dropout with probability `dropout_p` applies to the adapter's
/// input only, when `train`; its mask is drawn from `seed`. The inputs are recorded in the order
/// x, w, a, b, bias.
#[allow(clippy::too_many_arguments)]
pub fn lora_linear(
    tape: &mut Tape,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scaling: f32,
    dropout_p: f32,
    train: bool,
    seed: u64,
) -> Result<Tensor> {
    lora_linear_ex(tape, x, w, WeightLayout::InOut, bias, a, b, scaling, dropout_p, train, seed)
}

/// `lora_linear` for a weight in either layout: [in, out] (`InOut`, Conv1D) or [out, in]
/// (`OutIn`, nn.Linear and GPT-2's tied lm_head: y = x @ w^T + bias + the update).
#[allow(clippy::too_many_arguments)]
pub fn lora_linear_ex(
    tape: &mut Tape,
    x: &Tensor,
    w: &Tensor,
    layout: WeightLayout,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scaling: f32,
    dropout_p: f32,
    train: bool,
    seed: u64,
) -> Result<Tensor> {
    const OP: &str = "lora_linear";
    let _t = crate::profile::scope(OP, crate::profile::Phase::Forward);
    if !(0.0..1.0).contains(&dropout_p) {
        return Err(Error::Input(format!("{OP}: dropout probability {dropout_p} must be in [0, 1)")));
    }
    let w_trans = layout == WeightLayout::OutIn;
    let (k, n) = match (w.dims(), w_trans) {
        (&[k, n], false) => (k, n),
        (&[n, k], true) => (k, n),
        _ => {
            let want = if w_trans { "[out, in]" } else { "[in, out]" };
            return Err(Error::shape(OP, format!("the weight must be 2-D {want}, got {:?}", w.dims())));
        }
    };
    if x.dims().is_empty() || x.shape().last() != k {
        return Err(Error::shape(
            OP,
            format!("x {:?} does not end in the weight's in = {k} (weight {:?})", x.dims(), w.dims()),
        ));
    }
    let r = match a.dims() {
        &[r, ka] if ka == k && r > 0 => r,
        _ => return Err(Error::shape(OP, format!("lora_A has shape {:?}, expected [r, {k}] with r >= 1", a.dims()))),
    };
    expect_dims(OP, "lora_B", b, &[n, r])?;
    if let Some(bias) = bias {
        expect_dims(OP, "bias", bias, &[n])?;
    }
    let m = x.shape().rows();
    let (xv, wd, ad, bd) = (f32_input(OP, x)?, f32_input(OP, w)?, f32_input(OP, a)?, f32_input(OP, b)?);
    let biasd = bias.map(|t| f32_input(OP, t)).transpose()?;

    let keep = dropout_keep(train, dropout_p, seed, m * k);
    let dropped = keep.as_ref().map(|k| dropped_input(xv, k));
    let xd = dropped.as_deref().unwrap_or(xv);
    let mut us = vec![0f32; m * r];
    let mut out_dims = x.dims().to_vec();
    out_dims.pop();
    out_dims.push(n);
    let out =
        new_f32(&out_dims, |o| cpu::lora_forward(o, &mut us, xv, xd, wd, w_trans, biasd, ad, bd, m, n, k, r, scaling))?;
    if let Some(d) = dropped {
        pool::give(d);
    }
    let inputs: Vec<&Tensor> = [Some(x), Some(w), Some(a), Some(b), bias].into_iter().flatten().collect();
    if tape.wants(&inputs) {
        let saved = Saved {
            x: x.clone(),
            w: w.clone(),
            w_trans,
            a: a.clone(),
            b: b.clone(),
            us,
            keep,
            scaling,
            m,
            n,
            k,
            r,
            has_bias: bias.is_some(),
        };
        tape.record(Op::Lora(saved), &inputs, &out);
    }
    Ok(out)
}

/// The LoRA path's dropout mask and scale for `n` input elements, when dropout is active.
/// Shared with the NF4 op, whose LoRA path drops its input the same way.
pub(crate) fn dropout_keep(train: bool, p: f32, seed: u64, n: usize) -> Option<(Vec<u8>, f32)> {
    (train && p > 0.0).then(|| {
        let mut mask = vec![0u8; n];
        cpu_ew::dropout_mask(&mut mask, seed, p);
        (mask, 1.0 / (1.0 - p))
    })
}

/// dropout(x) under a saved mask, in a pooled buffer (the caller gives it back).
pub(crate) fn dropped_input(x: &[f32], (mask, scale): &(Vec<u8>, f32)) -> Vec<f32> {
    let mut d = pool::take(x.len());
    cpu_ew::dropout_forward(&mut d, x, mask, *scale);
    d
}

pub(crate) fn backward(s: &Saved, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
    let (m, n, k, r) = (s.m, s.n, s.k, s.r);
    let x = s.x.f32s()?;
    // dA needs dropout(x) again: rebuilt from the mask rather than kept alive since the forward.
    let dropped = s.keep.as_ref().filter(|_| needs[2]).map(|k| dropped_input(x, k));
    let need_bias = s.has_bias && needs[4];
    let take = |need: bool, len: usize| need.then(|| pool::take(len));
    let (mut dx, mut dw, mut da, mut db) =
        (take(needs[0], m * k), take(needs[1], k * n), take(needs[2], r * k), take(needs[3], n * r));
    let mut dbias = need_bias.then(|| vec![0f32; n]);
    let grads = cpu::LoraGrads {
        dx: dx.as_deref_mut(),
        dw: dw.as_deref_mut(),
        dbias: dbias.as_deref_mut(),
        da: da.as_deref_mut(),
        db: db.as_deref_mut(),
    };
    let keep = s.keep.as_ref().map(|(mask, scale)| (mask.as_slice(), *scale));
    let xd = dropped.as_deref().unwrap_or(x);
    cpu::lora_backward(
        grads,
        dout.f32s()?,
        x,
        xd,
        keep,
        s.w.f32s()?,
        s.w_trans,
        s.a.f32s()?,
        s.b.f32s()?,
        &s.us,
        m,
        n,
        k,
        r,
        s.scaling,
    );
    if let Some(d) = dropped {
        pool::give(d);
    }
    let wrap = |d: Option<Vec<f32>>, dims: &[usize]| d.map(|d| Tensor::from_f32(d, dims)).transpose();
    let mut out = vec![wrap(dx, s.x.dims())?, wrap(dw, s.w.dims())?, wrap(da, s.a.dims())?, wrap(db, s.b.dims())?];
    if s.has_bias {
        out.push(wrap(dbias, &[n])?);
    }
    Ok(out)
}

pub(crate) struct EmbeddingSaved {
    ids: Tensor,
    a_dims: [usize; 2],
    b: Tensor,
    /// scaling * A[:, ids]^T, [M, r]
    us: Vec<f32>,
    scaling: f32,
}

/// scaling * A[:, ids]^T @ B^T, [..., C]: LoRA's update of an embedding lookup (PEFT's
/// `embedding(ids, lora_embedding_A^T) @ lora_embedding_B^T * scaling`). ids: I32 of any shape
/// with values in [0, V); a: lora_embedding_A [r, V]; b: lora_embedding_B [C, r]. The inputs are
/// recorded in the order a, b.
pub fn lora_embedding(tape: &mut Tape, ids: &Tensor, a: &Tensor, b: &Tensor, scaling: f32) -> Result<Tensor> {
    const OP: &str = "lora_embedding";
    let _t = crate::profile::scope(OP, crate::profile::Phase::Forward);
    let idv = ids.i32s()?;
    let (r, v) = match *a.dims() {
        [r, v] if r > 0 => (r, v),
        _ => {
            return Err(Error::shape(
                OP,
                format!("lora_embedding_A has shape {:?}, expected [r, vocab] with r >= 1", a.dims()),
            ))
        }
    };
    let c = match *b.dims() {
        [c, rb] if rb == r => c,
        _ => return Err(Error::shape(OP, format!("lora_embedding_B has shape {:?}, expected [C, {r}]", b.dims()))),
    };
    if let Some(i) = idv.iter().position(|&id| id < 0 || id as usize >= v) {
        let t = ids.dims().last().copied().unwrap_or(1).max(1);
        return Err(Error::TokenOutOfRange { id: idv[i] as i64, row: i / t, pos: i % t, vocab: v });
    }
    let (ad, bd) = (f32_input(OP, a)?, f32_input(OP, b)?);
    let mut us = vec![0f32; idv.len() * r];
    let mut out_dims = ids.dims().to_vec();
    out_dims.push(c);
    let out = new_f32(&out_dims, |o| cpu::lora_embedding_forward(o, &mut us, idv, ad, bd, v, c, r, scaling))?;
    if tape.wants(&[a, b]) {
        let saved = EmbeddingSaved { ids: ids.clone(), a_dims: [r, v], b: b.clone(), us, scaling };
        tape.record(Op::LoraEmbedding(saved), &[a, b], &out);
    }
    Ok(out)
}

pub(crate) fn embedding_backward(s: &EmbeddingSaved, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
    let ([r, v], c) = (s.a_dims, s.b.dims()[0]);
    let mut da = needs[0].then(|| pool::take(r * v));
    let mut db = needs[1].then(|| pool::take(c * r));
    cpu::lora_embedding_backward(
        da.as_deref_mut(),
        db.as_deref_mut(),
        dout.f32s()?,
        s.ids.i32s()?,
        &s.us,
        s.b.f32s()?,
        v,
        c,
        r,
        s.scaling,
    );
    Ok(vec![da.map(|d| Tensor::from_f32(d, [r, v])).transpose()?, db.map(|d| Tensor::from_f32(d, [c, r])).transpose()?])
}
