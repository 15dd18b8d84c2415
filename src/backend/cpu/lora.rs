//! LoRA linear on the CPU: a frozen Conv1D (W [k, n], y = x W + b) plus the low-rank update
//! scaling * dropout(x) A^T B^T, with A [r, k] and B [n, r] as PEFT stores them.
//!
//! The update goes through the rank-r bottleneck u = dropout(x) A^T [m, r] and is never formed as
//! a [k, n] matrix: that costs 2 m r (k + n) flops instead of 2 k n r, and keeps A and B the only
//! tensors that grow with the adapter. Backward with G = dout [m, n] and s = scaling:
//!   du = s G B            [m, r]
//!   dB = s G^T u          [n, r]
//!   dA = du^T dropout(x)  [r, k]
//!   dx = G W^T + dropout'(du A)
//!   dW = x^T G, dbias = sum of G's rows (only when the base is trainable, which LoRA's is not)
//! The `_t` variants take the base weight stored [n, k] (nn.Linear's layout; GPT-2's lm_head is
//! the tied wte [V, C] used that way).
//!
//! LoRA on an embedding (PEFT's lora_embedding_A [r, V], lora_embedding_B [C, r]) adds
//! scaling * A[:, id]^T B^T to the row of each token id: a gather of A's columns into
//! us [m, r] (scaled), then one [m, r] x [r, C] GEMM. Backward with G = dout [m, C]:
//!   dB = G^T us           [C, r]
//!   dA[:, id] += s (G B)[row]   for every row with that id (a scatter-add, in row order)

use super::gemm::{bias_backward, matmul, matmul_forward};
use super::{f32_in, new_f32, pool, take_if, wrap};
use crate::backend::{Dropout, LoraArgs, LoraEmbeddingArgs};
use crate::backend::{GemmDesc, Trans};
use crate::{Result, Tensor};

/// out[m, n] = x @ W + bias + us @ B^T, where `us` [m, r] receives scaling * xd @ A^T (xd is
/// dropout(x), or x itself without dropout). The base product is computed exactly as a plain
/// linear layer computes it, so an all-zero B leaves `out` bit-identical to the base layer.
/// The weight is stored [k, n] (`w_trans` false, Conv1D) or [n, k] (`w_trans` true: nn.Linear,
/// and GPT-2's lm_head, which is wte [V, C] used transposed).
#[allow(clippy::too_many_arguments)]
pub fn lora_forward(
    out: &mut [f32],
    us: &mut [f32],
    x: &[f32],
    xd: &[f32],
    w: &[f32],
    w_trans: bool,
    bias: Option<&[f32]>,
    a: &[f32],
    b: &[f32],
    m: usize,
    n: usize,
    k: usize,
    r: usize,
    scaling: f32,
) {
    matmul_forward(out, None, x, w, bias, &GemmDesc::new(m, n, k, Trans::No, Trans::from_bool(w_trans)));
    matmul(us, xd, a, &GemmDesc::nt(m, r, k), false);
    us.iter_mut().for_each(|v| *v *= scaling);
    matmul(out, us, b, &GemmDesc::nt(m, n, r), true);
}

/// Which gradients `lora_backward` writes; each is skipped when None.
pub struct LoraGrads<'a> {
    pub dx: Option<&'a mut [f32]>,    // [m, k]
    pub dw: Option<&'a mut [f32]>,    // [k, n]
    pub dbias: Option<&'a mut [f32]>, // [n]
    pub da: Option<&'a mut [f32]>,    // [r, k]
    pub db: Option<&'a mut [f32]>,    // [n, r]
}

/// The gradients of `lora_forward`'s inputs from dout [m, n]. `keep` is the dropout mask (1 =
/// kept) with its scale 1 / (1 - p), or None without dropout; `xd` is dropout(x) (x itself
/// without dropout) and `us` what the forward wrote.
/// The weight is stored [k, n] (`w_trans` false) or [n, k] (`w_trans` true; dW is then [n, k]
/// too).
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    grads: LoraGrads,
    dout: &[f32],
    x: &[f32],
    xd: &[f32],
    keep: Option<(&[u8], f32)>,
    w: &[f32],
    w_trans: bool,
    a: &[f32],
    b: &[f32],
    us: &[f32],
    m: usize,
    n: usize,
    k: usize,
    r: usize,
    scaling: f32,
) {
    let g = dout;
    if let Some(db) = grads.db {
        // dB [n, r] = G^T [n, m] @ us [m, r]
        matmul(db, g, us, &GemmDesc::tn(n, r, m), false);
    }
    let mut du = Vec::new();
    if grads.da.is_some() || grads.dx.is_some() {
        // du [m, r] = s G [m, n] @ B [n, r]
        du = pool::take(m * r);
        matmul(&mut du, g, b, &GemmDesc::nn(m, r, n), false);
        du.iter_mut().for_each(|v| *v *= scaling);
    }
    if let Some(da) = grads.da {
        // dA [r, k] = du^T [r, m] @ xd [m, k]
        matmul(da, &du, xd, &GemmDesc::tn(r, k, m), false);
    }
    if let Some(dx) = grads.dx {
        // dx [m, k] = G [m, n] @ W'^T [n, k] (W' = W, or W^T when stored [n, k]), plus
        // du [m, r] @ A [r, k] through the dropout mask
        matmul(dx, g, w, &GemmDesc::new(m, k, n, Trans::No, Trans::from_bool(!w_trans)), false);
        match keep {
            None => matmul(dx, &du, a, &GemmDesc::nn(m, k, r), true),
            Some((mask, keep_scale)) => {
                let mut t = pool::take(m * k);
                matmul(&mut t, &du, a, &GemmDesc::nn(m, k, r), false);
                for ((d, &t), &mk) in dx.iter_mut().zip(&t).zip(mask) {
                    if mk != 0 {
                        *d += t * keep_scale;
                    }
                }
                pool::give(t);
            }
        }
    }
    if let Some(dw) = grads.dw {
        if w_trans {
            // dW [n, k] = G^T [n, m] @ x [m, k]
            matmul(dw, g, x, &GemmDesc::tn(n, k, m), false);
        } else {
            // dW [k, n] = x^T [k, m] @ G [m, n]
            matmul(dw, x, g, &GemmDesc::tn(k, n, m), false);
        }
    }
    if let Some(dbias) = grads.dbias {
        bias_backward(dbias, g, n);
    }
    if !du.is_empty() {
        pool::give(du);
    }
}

/// w[k, n] += scaling * A^T [k, r] @ B^T [r, n]: folds an adapter into its Conv1D weight
/// (PEFT's merge with fan_in_fan_out, W += scaling * (B A)^T).
pub fn lora_merge(w: &mut [f32], a: &[f32], b: &[f32], k: usize, n: usize, r: usize, scaling: f32) {
    let mut delta = pool::take(k * n);
    matmul(&mut delta, a, b, &GemmDesc::tt(k, n, r), false);
    for (w, d) in w.iter_mut().zip(&delta) {
        *w += scaling * d;
    }
    pool::give(delta);
}

/// W [n, k] += scaling * B A for an nn.Linear weight (stored [out, in]), A [r, k], B [n, r]:
/// PEFT's merge for Linear layers.
pub fn lora_merge_linear(w: &mut [f32], a: &[f32], b: &[f32], k: usize, n: usize, r: usize, scaling: f32) {
    let mut delta = pool::take(k * n);
    matmul(&mut delta, b, a, &GemmDesc::nn(n, k, r), false);
    for (w, d) in w.iter_mut().zip(&delta) {
        *w += scaling * d;
    }
    pool::give(delta);
}

/// out[m, c] = us @ B^T, where `us` [m, r] receives scaling * A[:, ids]^T (row i holds column
/// ids[i] of A [r, v], scaled): LoRA's update of an embedding lookup, for B [c, r].
#[allow(clippy::too_many_arguments)]
pub fn lora_embedding_forward(
    out: &mut [f32],
    us: &mut [f32],
    ids: &[i32],
    a: &[f32],
    b: &[f32],
    v: usize,
    c: usize,
    r: usize,
    scaling: f32,
) {
    let m = ids.len();
    for (row, &id) in us.chunks_mut(r).zip(ids) {
        for (j, u) in row.iter_mut().enumerate() {
            *u = scaling * a[j * v + id as usize];
        }
    }
    matmul(out, us, b, &GemmDesc::nt(m, c, r), false);
}

/// The gradients of `lora_embedding_forward`'s A [r, v] and B [c, r] from dout [m, c]; each is
/// skipped when None, and overwritten otherwise. The scatter into dA runs in row order, so it
/// is deterministic.
#[allow(clippy::too_many_arguments)]
pub fn lora_embedding_backward(
    da: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
    dout: &[f32],
    ids: &[i32],
    us: &[f32],
    b: &[f32],
    v: usize,
    c: usize,
    r: usize,
    scaling: f32,
) {
    let m = ids.len();
    if let Some(db) = db {
        // dB [c, r] = G^T [c, m] @ us [m, r]
        matmul(db, dout, us, &GemmDesc::tn(c, r, m), false);
    }
    if let Some(da) = da {
        // du [m, r] = s G [m, c] @ B [c, r], scattered into the columns of dA
        let mut du = pool::take(m * r);
        matmul(&mut du, dout, b, &GemmDesc::nn(m, r, c), false);
        da.fill(0.0);
        for (row, &id) in du.chunks(r).zip(ids) {
            for (j, d) in row.iter().enumerate() {
                da[j * v + id as usize] += scaling * d;
            }
        }
        pool::give(du);
    }
}

/// The mask (1 = kept) and scale 1 / (1 - p) of a dropout over `n` elements, drawn from its seed
/// as `Elementwise::dropout` draws it.
pub(crate) fn mask_of(d: Dropout, n: usize) -> (Vec<u8>, f32) {
    let mut mask = vec![0u8; n];
    super::elementwise::dropout_mask(&mut mask, d.seed, d.p);
    (mask, 1.0 / (1.0 - d.p))
}

/// dropout(x) under a mask with its scale, in a pooled buffer (the caller gives it back).
pub(crate) fn dropped_input(x: &[f32], (mask, scale): (&[u8], f32)) -> Vec<f32> {
    let mut d = pool::take(x.len());
    super::elementwise::dropout_forward(&mut d, x, mask, scale);
    d
}

impl crate::backend::Lora for super::Cpu {
    fn lora_linear(&self, args: &LoraArgs) -> Result<(Tensor, Tensor)> {
        const OP: &str = "lora_linear";
        let LoraArgs { m, n, k, r, w_trans, scaling, .. } = *args;
        let (xv, wd, ad, bd) = (f32_in(OP, args.x)?, f32_in(OP, args.w)?, f32_in(OP, args.a)?, f32_in(OP, args.b)?);
        let biasd = args.bias.map(|t| f32_in(OP, t)).transpose()?;
        let keep = args.dropout.map(|d| mask_of(d, m * k));
        let dropped = keep.as_ref().map(|(mask, scale)| dropped_input(xv, (mask, *scale)));
        let xd = dropped.as_deref().unwrap_or(xv);
        let mut us = vec![0f32; m * r];
        let out =
            new_f32(&[m, n], |o| lora_forward(o, &mut us, xv, xd, wd, w_trans, biasd, ad, bd, m, n, k, r, scaling))?;
        if let Some(d) = dropped {
            pool::give(d);
        }
        Ok((out, Tensor::from_f32(us, [m, r])?))
    }

    fn lora_linear_backward(
        &self,
        args: &LoraArgs,
        us: &Tensor,
        dout: &Tensor,
        needs: [bool; 5],
    ) -> Result<[Option<Tensor>; 5]> {
        const OP: &str = "lora_linear backward";
        let LoraArgs { m, n, k, r, .. } = *args;
        let x = f32_in(OP, args.x)?;
        // dA needs dropout(x) again and dx the mask: redrawn rather than kept since the forward.
        let keep = args.dropout.filter(|_| needs[0] || needs[2]).map(|d| mask_of(d, m * k));
        let keep = keep.as_ref().map(|(mask, scale)| (mask.as_slice(), *scale));
        let dropped = keep.filter(|_| needs[2]).map(|k| dropped_input(x, k));
        let (mut dx, mut dw, mut da, mut db) =
            (take_if(needs[0], m * k), take_if(needs[1], k * n), take_if(needs[2], r * k), take_if(needs[3], n * r));
        let mut dbias = needs[4].then(|| vec![0f32; n]);
        let grads = LoraGrads {
            dx: dx.as_deref_mut(),
            dw: dw.as_deref_mut(),
            dbias: dbias.as_deref_mut(),
            da: da.as_deref_mut(),
            db: db.as_deref_mut(),
        };
        let xd = dropped.as_deref().unwrap_or(x);
        let (w, a, b) = (f32_in(OP, args.w)?, f32_in(OP, args.a)?, f32_in(OP, args.b)?);
        let (g, us) = (f32_in(OP, dout)?, f32_in(OP, us)?);
        lora_backward(grads, g, x, xd, keep, w, args.w_trans, a, b, us, m, n, k, r, args.scaling);
        if let Some(d) = dropped {
            pool::give(d);
        }
        Ok([
            wrap(dx, args.x.dims())?,
            wrap(dw, args.w.dims())?,
            wrap(da, args.a.dims())?,
            wrap(db, args.b.dims())?,
            wrap(dbias, &[n])?,
        ])
    }

    fn lora_embedding(&self, args: &LoraEmbeddingArgs) -> Result<(Tensor, Tensor)> {
        const OP: &str = "lora_embedding";
        let LoraEmbeddingArgs { ids, v, c, r, scaling, .. } = *args;
        let (ad, bd) = (f32_in(OP, args.a)?, f32_in(OP, args.b)?);
        let mut us = vec![0f32; ids.len() * r];
        let out = new_f32(&[ids.len(), c], |o| lora_embedding_forward(o, &mut us, ids, ad, bd, v, c, r, scaling))?;
        Ok((out, Tensor::from_f32(us, [ids.len(), r])?))
    }

    fn lora_embedding_backward(
        &self,
        args: &LoraEmbeddingArgs,
        us: &Tensor,
        dout: &Tensor,
        needs: [bool; 2],
    ) -> Result<[Option<Tensor>; 2]> {
        const OP: &str = "lora_embedding backward";
        let LoraEmbeddingArgs { ids, v, c, r, scaling, .. } = *args;
        let mut da = take_if(needs[0], r * v);
        let mut db = take_if(needs[1], c * r);
        let (g, us, b) = (f32_in(OP, dout)?, f32_in(OP, us)?, f32_in(OP, args.b)?);
        lora_embedding_backward(da.as_deref_mut(), db.as_deref_mut(), g, ids, us, b, v, c, r, scaling);
        Ok([wrap(da, &[r, v])?, wrap(db, &[c, r])?])
    }

    fn as_backend(&self) -> &dyn crate::backend::Backend {
        self
    }
}
