//! LoRA linear: a Conv1D layer (W [in, out], y = x W + b) with PEFT's low-rank update,
//!   y = x W + b + scaling * dropout(x) A^T B^T,   A = lora_A [r, in], B = lora_B [out, r],
//! as one tape node (llm.c granularity); `lora_linear` also takes W stored [out, in] (an
//! nn.Linear, such as GPT-2's lm_head, which is wte [V, C]). Backward computes only what `needs`
//! asks for, so the frozen base weight of a LoRA model costs no dW GEMM and no gradient buffer;
//! the rules are in `src/backend/cpu/lora.rs`.
//!
//! LoRA embedding: the update PEFT adds to an embedding lookup, scaling * A[:, ids]^T B^T with
//! A = lora_embedding_A [r, V], B = lora_embedding_B [C, r] (no dropout: PEFT applies none on
//! this path), as its own node; the caller adds it to the base lookup.

use super::expect_dims;
use super::gemm::WeightLayout;
use crate::backend::{on, Dropout, LoraArgs, LoraEmbeddingArgs};
use crate::tape::{Op, Tape};
use crate::{Error, Result, Tensor};

struct LoraLinear {
    x: Tensor,
    w: Tensor,
    /// W is stored [out, in] (WeightLayout::OutIn).
    w_trans: bool,
    a: Tensor,
    b: Tensor,
    bias: Option<Tensor>,
    /// scaling * dropout(x) A^T, [M, r]
    us: Tensor,
    /// The dropout on the adapter's input, when it was applied (its mask is redrawn from the seed).
    dropout: Option<Dropout>,
    scaling: f32,
    m: usize,
    n: usize,
    k: usize,
    r: usize,
}

/// A LoRA adapter as the ops take it: A = lora_A [r, in], B = lora_B [out, r], the scaling, and
/// dropout on the adapter's input with probability `dropout_p`, applied only when `train`, its
/// mask drawn from `seed`.
#[derive(Clone, Copy)]
pub struct LoraAdapter<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scaling: f32,
    pub dropout_p: f32,
    pub train: bool,
    pub seed: u64,
}

/// y = x @ W + bias + scaling * dropout(x) @ A^T @ B^T for x [..., in] and W in `layout`: [in,
/// out] (`InOut`, Conv1D) or [out, in] (`OutIn`, nn.Linear and GPT-2's tied lm_head: y = x @ W^T
/// + bias + the update). The inputs are recorded in the order x, W, A, B, bias.
pub fn lora_linear(
    tape: &mut Tape,
    x: &Tensor,
    w: &Tensor,
    layout: WeightLayout,
    bias: Option<&Tensor>,
    adapter: &LoraAdapter,
) -> Result<Tensor> {
    let LoraAdapter { a, b, scaling, dropout_p, train, seed } = *adapter;
    const OP: &str = "lora_linear";
    let _t = crate::profile::scope(OP, crate::profile::Phase::Forward);
    if !(0.0..1.0).contains(&dropout_p) {
        return Err(Error::dropout("lora_linear: ", dropout_p));
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
    let dropout = dropout_of(train, dropout_p, seed);
    let mut saved = LoraLinear {
        x: x.clone(),
        w: w.clone(),
        w_trans,
        a: a.clone(),
        b: b.clone(),
        bias: bias.cloned(),
        us: Tensor::scalar(0.0),
        dropout,
        scaling,
        m,
        n,
        k,
        r,
    };
    let inputs: Vec<&Tensor> = [Some(x), Some(w), Some(a), Some(b), bias].into_iter().flatten().collect();
    let (y, us) = on(OP, &inputs)?.lora_linear(&saved.args())?;
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

/// The LoRA path's dropout, when it is active. Shared with the NF4 op, whose LoRA path drops its
/// input the same way.
pub(crate) fn dropout_of(train: bool, p: f32, seed: u64) -> Option<Dropout> {
    (train && p > 0.0).then_some(Dropout { p, seed })
}

impl LoraLinear {
    /// The operands as the backend takes them.
    fn args(&self) -> LoraArgs<'_> {
        LoraArgs {
            x: &self.x,
            w: &self.w,
            w_trans: self.w_trans,
            bias: self.bias.as_ref(),
            a: &self.a,
            b: &self.b,
            scaling: self.scaling,
            dropout: self.dropout,
            m: self.m,
            n: self.n,
            k: self.k,
            r: self.r,
        }
    }
}

impl Op for LoraLinear {
    fn name(&self) -> &'static str {
        "lora_linear"
    }
    fn backward(&self, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let has_bias = self.bias.is_some();
        let needs5 = [needs[0], needs[1], needs[2], needs[3], has_bias && needs[4]];
        let be = on("lora_linear backward", &[dout, &self.x])?;
        let [dx, dw, da, db, dbias] = be.lora_linear_backward(&self.args(), &self.us, dout, needs5)?;
        let dx = dx.map(|d| d.reshape(self.x.dims())).transpose()?;
        let mut out = vec![dx, dw, da, db];
        if has_bias {
            out.push(dbias);
        }
        Ok(out)
    }
}

struct LoraEmbedding {
    /// The host ids.
    ids: Tensor,
    a: Tensor,
    b: Tensor,
    /// scaling * A[:, ids]^T, [M, r]
    us: Tensor,
    scaling: f32,
}

impl LoraEmbedding {
    fn args(&self) -> Result<LoraEmbeddingArgs<'_>> {
        let ([r, v], c) = ([self.a.dims()[0], self.a.dims()[1]], self.b.dims()[0]);
        Ok(LoraEmbeddingArgs { ids: self.ids.i32s()?, a: &self.a, b: &self.b, scaling: self.scaling, v, c, r })
    }
}

impl Op for LoraEmbedding {
    fn name(&self) -> &'static str {
        "lora_embedding"
    }
    fn backward(&self, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let be = on("lora_embedding backward", &[dout, &self.b])?;
        Ok(be.lora_embedding_backward(&self.args()?, &self.us, dout, [needs[0], needs[1]])?.into())
    }
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
    let saved = LoraEmbedding { ids: ids.clone(), a: a.clone(), b: b.clone(), us: Tensor::scalar(0.0), scaling };
    let (y, us) = on(OP, &[a, b])?.lora_embedding(&saved.args()?)?;
    let mut out_dims = ids.dims().to_vec();
    out_dims.push(c);
    let out = y.reshape(out_dims)?;
    if tape.wants(&[a, b]) {
        tape.record(LoraEmbedding { us, ..saved }, &[a, b], &out);
    }
    Ok(out)
}
