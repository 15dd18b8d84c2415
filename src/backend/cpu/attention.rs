//! Causal self-attention, computed the flash way: for each query row, keys are visited in tiles of
//! `KEY_TILE` with an online softmax (running max and running sum rescaled as each tile arrives),
//! so no T x T score matrix exists; only one log-sum-exp per row is saved. Backward recomputes
//! each score from q, k and that log-sum-exp.
//!
//! Layout (llm.c's): qkv is [B, T, 3C], the c_attn output, with q, k, v side by side and head h
//! at columns h*hd .. (h+1)*hd of each third; out is [B, T, C]; lse is [B, NH, T]. Grouped-query
//! attention (Llama) packs nh query heads, then nkv key heads, then nkv value heads in a row of
//! (nh + 2 nkv) hd, and query head h reads KV head h / (nh / nkv); GPT-2 is nkv = nh.
//! Work is split over (batch, head) pairs, one rayon task each (backward: (batch, KV head)).

use super::{axpy, dot, f32_in, new_f32, SendPtr};
use crate::backend::{qkv_dims, AttnDims, Heads, KvDims};
use crate::{Result, Tensor};
use rayon::prelude::*;

/// Keys per tile of the online softmax.
pub const KEY_TILE: usize = 32;

/// The per-(b, h) views of q, k, v rows in the packed qkv layout: row stride (nh + 2 nkv) hd,
/// query head h at columns h*hd, its KV head g = h / group at C + g*hd (keys) and C + Ckv + g*hd
/// (values).
struct Head<'a> {
    qkv: &'a [f32],
    base: usize,
    l: Layout,
    h: usize,
}

/// The widths of packed qkv for `nh` query heads over `nkv` KV heads of size hd.
#[derive(Clone, Copy)]
struct Layout {
    /// Output (query) width nh * hd.
    c: usize,
    /// Key (and value) width nkv * hd.
    ckv: usize,
    hd: usize,
    /// Query heads per KV head.
    group: usize,
}

impl Layout {
    fn new(c: usize, nh: usize, nkv: usize) -> Self {
        let hd = c / nh;
        Layout { c, ckv: nkv * hd, hd, group: nh / nkv }
    }
    /// The packed row width C + 2 Ckv.
    fn w(&self) -> usize {
        self.c + 2 * self.ckv
    }
}

impl<'a> Head<'a> {
    fn q(&self, t: usize) -> &'a [f32] {
        let o = self.base + t * self.l.w() + self.h * self.l.hd;
        &self.qkv[o..o + self.l.hd]
    }
    fn k(&self, t: usize) -> &'a [f32] {
        let o = self.base + t * self.l.w() + self.l.c + (self.h / self.l.group) * self.l.hd;
        &self.qkv[o..o + self.l.hd]
    }
    fn v(&self, t: usize) -> &'a [f32] {
        let o = self.base + t * self.l.w() + self.l.c + self.l.ckv + (self.h / self.l.group) * self.l.hd;
        &self.qkv[o..o + self.l.hd]
    }
}

/// One step of the online softmax: folds scores `s` (for values `vs`) into the running max `m`,
/// running sum `l` and accumulator `acc`. Shared with the CUDA kernel's host twin.
#[inline]
pub fn online_softmax_update(m: &mut f32, l: &mut f32, acc: &mut [f32], s: &[f32], vs: &[&[f32]]) {
    let tile_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let m_new = m.max(tile_max);
    let correction = (*m - m_new).exp();
    *l *= correction;
    for a in acc.iter_mut() {
        *a *= correction;
    }
    for (&sj, vj) in s.iter().zip(vs) {
        let p = (sj - m_new).exp();
        *l += p;
        axpy(acc, p, vj);
    }
    *m = m_new;
}

/// Panics unless C is a multiple of n_head, n_kv_head divides n_head, and every buffer has its
/// layout's length: the unsafe row writes below rely on all three.
fn assert_layout(op: &str, bufs: &[(&str, usize, usize)], c: usize, nh: usize, nkv: usize) {
    assert!(nh > 0 && c % nh == 0, "{op}: C = {c} must be a multiple of n_head = {nh}");
    assert!(nkv > 0 && nh % nkv == 0, "{op}: n_kv_head = {nkv} must divide n_head = {nh}");
    for &(name, len, want) in bufs {
        assert!(len == want, "{op}: {name} has {len} elements, expected {want}");
    }
}

/// Multi-head attention (GPT-2): `gqa_attention_forward` with one KV head per query head.
pub fn attention_forward(out: &mut [f32], lse: &mut [f32], qkv: &[f32], d: &AttnDims) {
    gqa_attention_forward(out, lse, qkv, d, d.nh)
}

/// out [B, T, C] and lse [B, nh, T] of causal attention over packed qkv [B, T, C + 2 Ckv] whose
/// `nkv` KV heads each serve nh / nkv consecutive query heads.
pub fn gqa_attention_forward(out: &mut [f32], lse: &mut [f32], qkv: &[f32], d: &AttnDims, nkv: usize) {
    let AttnDims { b, t, c, nh } = *d;
    assert!(nkv > 0 && c % nh.max(1) == 0, "attention_forward: C = {c}, n_head = {nh}, n_kv_head = {nkv}");
    let l = Layout::new(c, nh, nkv);
    let bufs = [("out", out.len(), b * t * c), ("lse", lse.len(), b * nh * t), ("qkv", qkv.len(), b * t * l.w())];
    assert_layout("attention_forward", &bufs, c, nh, nkv);
    let hd = l.hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let out_ptr = SendPtr(out.as_mut_ptr());
    lse.par_chunks_mut(t).enumerate().for_each(|(bh, lse_row)| {
        let (bi, h) = (bh / nh, bh % nh);
        let head = Head { qkv, base: bi * t * l.w(), l, h };
        let mut acc = vec![0f32; hd];
        let mut s = [0f32; KEY_TILE];
        let p = out_ptr;
        for (i, lse_i) in lse_row.iter_mut().enumerate() {
            let q = head.q(i);
            let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
            acc.fill(0.0);
            for j0 in (0..=i).step_by(KEY_TILE) {
                let j1 = (j0 + KEY_TILE).min(i + 1);
                let mut vs: [&[f32]; KEY_TILE] = [&[]; KEY_TILE];
                for j in j0..j1 {
                    s[j - j0] = dot(q, head.k(j)) * scale;
                    vs[j - j0] = head.v(j);
                }
                online_softmax_update(&mut m, &mut l, &mut acc, &s[..j1 - j0], &vs[..j1 - j0]);
            }
            *lse_i = m + l.ln();
            let inv = 1.0 / l;
            // SAFETY: out has B * T * C elements and hd * (h + 1) <= C (assert_layout), so the
            // range is in bounds; row (bi, i), columns of head h are written by this task only.
            let o = unsafe { std::slice::from_raw_parts_mut(p.0.add((bi * t + i) * c + h * hd), hd) };
            for (o, a) in o.iter_mut().zip(&acc) {
                *o = a * inv;
            }
        }
    });
}

/// dqkv = d loss / d qkv, given dout [B, T, C] and the forward's out and lse (multi-head).
pub fn attention_backward(dqkv: &mut [f32], dout: &[f32], qkv: &[f32], out: &[f32], lse: &[f32], d: &AttnDims) {
    gqa_attention_backward(dqkv, dout, qkv, out, lse, d, d.nh)
}

/// `attention_backward` over grouped-query heads: one task per (batch, KV head) owns that head's
/// dK and dV, summed over its group's query heads in order, and the group's dQ.
pub fn gqa_attention_backward(
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    out: &[f32],
    lse: &[f32],
    d: &AttnDims,
    nkv: usize,
) {
    let AttnDims { b, t, c, nh } = *d;
    assert!(nkv > 0 && c % nh.max(1) == 0, "attention_backward: C = {c}, n_head = {nh}, n_kv_head = {nkv}");
    let l = Layout::new(c, nh, nkv);
    let bufs = [
        ("dqkv", dqkv.len(), b * t * l.w()),
        ("dout", dout.len(), b * t * c),
        ("qkv", qkv.len(), b * t * l.w()),
        ("out", out.len(), b * t * c),
        ("lse", lse.len(), b * nh * t),
    ];
    assert_layout("attention_backward", &bufs, c, nh, nkv);
    let hd = l.hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let dptr = SendPtr(dqkv.as_mut_ptr());
    (0..b * nkv).into_par_iter().for_each(|bg| {
        let (bi, g) = (bg / nkv, bg % nkv);
        let (mut dk, mut dv) = (vec![0f32; t * hd], vec![0f32; t * hd]);
        let mut dq = vec![0f32; t * hd];
        let p = dptr;
        for h in g * l.group..(g + 1) * l.group {
            let head = Head { qkv, base: bi * t * l.w(), l, h };
            let row = |i: usize| (bi * t + i) * c + h * hd..(bi * t + i) * c + (h + 1) * hd;
            let lse = &lse[(bi * nh + h) * t..(bi * nh + h + 1) * t];
            dq.fill(0.0);
            for i in 0..t {
                let (q, go) = (head.q(i), &dout[row(i)]);
                // D_i = sum_j p_ij dp_ij = dout_i . out_i
                let d_i = dot(go, &out[row(i)]);
                let dq_i = &mut dq[i * hd..(i + 1) * hd];
                for j in 0..=i {
                    let p = (dot(q, head.k(j)) * scale - lse[i]).exp();
                    axpy(&mut dv[j * hd..(j + 1) * hd], p, go);
                    let ds = p * (dot(go, head.v(j)) - d_i) * scale;
                    axpy(dq_i, ds, head.k(j));
                    axpy(&mut dk[j * hd..(j + 1) * hd], ds, q);
                }
            }
            for i in 0..t {
                let o = (bi * t + i) * l.w() + h * hd;
                // SAFETY: dqkv has B * T * (C + 2 Ckv) elements (assert_layout) and h * hd + hd <= C,
                // so the range is in bounds; query head h's columns of batch row bi are this
                // task's alone (h is in its group).
                let dst = unsafe { std::slice::from_raw_parts_mut(p.0.add(o), hd) };
                dst.copy_from_slice(&dq[i * hd..(i + 1) * hd]);
            }
        }
        for i in 0..t {
            let o = (bi * t + i) * l.w() + l.c + g * hd;
            for (off, buf) in [(0, &dk), (l.ckv, &dv)] {
                // SAFETY: o + Ckv + hd <= (bi * t + i + 1) * (C + 2 Ckv) (g < nkv), in bounds by
                // assert_layout; KV head g's key and value columns of batch row bi are this
                // task's alone.
                let dst = unsafe { std::slice::from_raw_parts_mut(p.0.add(o + off), hd) };
                dst.copy_from_slice(&buf[i * hd..(i + 1) * hd]);
            }
        }
    });
}

/// Causal attention of `n` new query rows per sequence against a key/value cache, for generation:
/// query i sits at absolute position past + i and sees cached positions 0..=past + i.
/// q, out: [B, n, C]; k_cache, v_cache: [B, cap, C] (head h at columns h*hd..(h+1)*hd) with rows
/// 0..past + n filled, the new ones included. Tiles and online softmax are attention_forward's, so
/// each row's result is the one the full forward computes from the same q, k and v.
pub fn attention_decode(out: &mut [f32], q: &[f32], k_cache: &[f32], v_cache: &[f32], d: &KvDims, nh: usize) {
    gqa_attention_decode(out, q, k_cache, v_cache, d, nh, nh)
}

/// `attention_decode` with caches of `nkv` KV heads, [B, cap, nkv hd]: query head h reads KV head
/// h / (nh / nkv).
pub fn gqa_attention_decode(
    out: &mut [f32],
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    d: &KvDims,
    nh: usize,
    nkv: usize,
) {
    let KvDims { b, n, past, cap, c } = *d;
    assert!(past + n <= cap, "attention_decode: {past} cached + {n} new rows do not fit a cache of {cap}");
    assert!(nkv > 0 && nh > 0 && c % nh == 0, "attention_decode: C = {c}, n_head = {nh}, n_kv_head = {nkv}");
    let l = Layout::new(c, nh, nkv);
    let bufs = [
        ("out", out.len(), b * n * c),
        ("q", q.len(), b * n * c),
        ("k_cache", k_cache.len(), b * cap * l.ckv),
        ("v_cache", v_cache.len(), b * cap * l.ckv),
    ];
    assert_layout("attention_decode", &bufs, c, nh, nkv);
    let (hd, ckv, group) = (l.hd, l.ckv, l.group);
    let scale = 1.0 / (hd as f32).sqrt();
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..b * nh).into_par_iter().for_each(|bh| {
        let (bi, h) = (bh / nh, bh % nh);
        let g = h / group;
        let kv_row = |j: usize| (bi * cap + j) * ckv + g * hd..(bi * cap + j) * ckv + (g + 1) * hd;
        let mut acc = vec![0f32; hd];
        let mut s = [0f32; KEY_TILE];
        let p = out_ptr;
        for i in 0..n {
            let o = (bi * n + i) * c + h * hd;
            let qi = &q[o..o + hd];
            let pos = past + i;
            let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
            acc.fill(0.0);
            for j0 in (0..=pos).step_by(KEY_TILE) {
                let j1 = (j0 + KEY_TILE).min(pos + 1);
                let mut vs: [&[f32]; KEY_TILE] = [&[]; KEY_TILE];
                for j in j0..j1 {
                    s[j - j0] = dot(qi, &k_cache[kv_row(j)]) * scale;
                    vs[j - j0] = &v_cache[kv_row(j)];
                }
                online_softmax_update(&mut m, &mut l, &mut acc, &s[..j1 - j0], &vs[..j1 - j0]);
            }
            let inv = 1.0 / l;
            // SAFETY: out has B * n * C elements (assert_layout), so o + hd is in bounds; row
            // (bi, i), columns of head h are written by this task only.
            let dst = unsafe { std::slice::from_raw_parts_mut(p.0.add(o), hd) };
            for (d, a) in dst.iter_mut().zip(&acc) {
                *d = a * inv;
            }
        }
    });
}

impl crate::backend::Attention for super::Cpu {
    fn attention(&self, qkv: &Tensor, heads: Heads) -> Result<(Tensor, Tensor)> {
        const OP: &str = "attention";
        let (b, t, c) = qkv_dims(OP, qkv, heads)?;
        let (qd, nh) = (f32_in(OP, qkv)?, heads.n_head);
        let mut lse = vec![0f32; b * nh * t];
        let d = AttnDims { b, t, c, nh };
        let out = new_f32(&[b, t, c], |o| gqa_attention_forward(o, &mut lse, qd, &d, heads.n_kv_head))?;
        Ok((out, Tensor::from_f32(lse, [b, nh, t])?))
    }

    fn attention_backward(
        &self,
        dout: &Tensor,
        qkv: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        heads: Heads,
    ) -> Result<Tensor> {
        const OP: &str = "attention backward";
        let (b, t, c) = qkv_dims(OP, qkv, heads)?;
        let (g, q, o, l) = (f32_in(OP, dout)?, f32_in(OP, qkv)?, f32_in(OP, out)?, f32_in(OP, lse)?);
        let d = AttnDims { b, t, c, nh: heads.n_head };
        new_f32(qkv.dims(), |dq| gqa_attention_backward(dq, g, q, o, l, &d, heads.n_kv_head))
    }

    fn attention_cached(
        &self,
        qkv: &Tensor,
        k: &mut Tensor,
        v: &mut Tensor,
        len: usize,
        heads: Heads,
    ) -> Result<Tensor> {
        const OP: &str = "attention_cached";
        let (b, n, c) = qkv_dims(OP, qkv, heads)?;
        let ckv = c / heads.n_head * heads.n_kv_head;
        let cap = k.dims().get(1).copied().unwrap_or(0);
        if len + n > cap || k.numel() != b * cap * ckv || v.numel() != k.numel() {
            let msg = format!("{len} cached + {n} new positions do not fit caches {:?}", k.dims());
            return Err(crate::Error::shape(OP, msg));
        }
        let qkv_d = f32_in(OP, qkv)?;
        let mut q = vec![0f32; b * n * c];
        let d = KvDims { b, n, past: len, cap, c };
        gqa_attention_cache_append(&mut q, k.f32s_mut()?, v.f32s_mut()?, qkv_d, &d, ckv);
        let (kd, vd) = (f32_in(OP, k)?, f32_in(OP, v)?);
        let (nh, nkv) = (heads.n_head, heads.n_kv_head);
        new_f32(&[b, n, c], |o| gqa_attention_decode(o, &q, kd, vd, &d, nh, nkv))
    }
}

/// Splits qkv [B, n, 3C] of n new positions per sequence for `attention_decode`: q [B, n, C], and
/// the k and v thirds into rows len..len + n of k_cache and v_cache [B, cap, C] (other rows are
/// left as they are).
pub fn attention_cache_append(q: &mut [f32], k_cache: &mut [f32], v_cache: &mut [f32], qkv: &[f32], d: &KvDims) {
    gqa_attention_cache_append(q, k_cache, v_cache, qkv, d, d.c)
}

/// `attention_cache_append` for packed qkv [B, n, C + 2 Ckv] and caches [B, cap, Ckv].
pub fn gqa_attention_cache_append(
    q: &mut [f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    qkv: &[f32],
    d: &KvDims,
    ckv: usize,
) {
    let KvDims { b, n, past: len, cap, c } = *d;
    assert!(len + n <= cap, "attention_cache_append: {len} cached + {n} new rows do not fit a cache of {cap}");
    let w = c + 2 * ckv;
    let bufs = [
        ("q", q.len(), b * n * c),
        ("k_cache", k_cache.len(), b * cap * ckv),
        ("v_cache", v_cache.len(), b * cap * ckv),
        ("qkv", qkv.len(), b * n * w),
    ];
    assert_layout("attention_cache_append", &bufs, c, 1, 1);
    for (row, (src, qr)) in qkv.chunks_exact(w).zip(q.chunks_exact_mut(c)).enumerate() {
        let dst = ((row / n) * cap + len + row % n) * ckv;
        qr.copy_from_slice(&src[..c]);
        k_cache[dst..dst + ckv].copy_from_slice(&src[c..c + ckv]);
        v_cache[dst..dst + ckv].copy_from_slice(&src[c + ckv..]);
    }
}
