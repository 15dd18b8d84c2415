//! Causal self-attention, computed the flash way: for each query row, keys are visited in tiles of
//! `KEY_TILE` with an online softmax (running max and running sum rescaled as each tile arrives),
//! so no T x T score matrix exists; only one log-sum-exp per row is saved. Backward recomputes
//! each score from q, k and that log-sum-exp.
//!
//! Layout (llm.c's): qkv is [B, T, 3C], the c_attn output, with q, k, v side by side and head h
//! at columns h*hd .. (h+1)*hd of each third; out is [B, T, C]; lse is [B, NH, T].
//! Work is split over (batch, head) pairs, one rayon task each.

use super::{axpy, dot, f32_in, new_f32, SendPtr};
use crate::backend::{qkv_dims, AttnDims, KvDims};
use crate::{Result, Tensor};
use rayon::prelude::*;

/// Keys per tile of the online softmax.
pub const KEY_TILE: usize = 32;

/// The per-(b, h) views of q, k, v rows in the packed qkv layout.
struct Head<'a> {
    qkv: &'a [f32],
    base: usize,
    c: usize,
    hd: usize,
    h: usize,
}

impl<'a> Head<'a> {
    fn q(&self, t: usize) -> &'a [f32] {
        let o = self.base + t * 3 * self.c + self.h * self.hd;
        &self.qkv[o..o + self.hd]
    }
    fn k(&self, t: usize) -> &'a [f32] {
        let o = self.base + t * 3 * self.c + self.c + self.h * self.hd;
        &self.qkv[o..o + self.hd]
    }
    fn v(&self, t: usize) -> &'a [f32] {
        let o = self.base + t * 3 * self.c + 2 * self.c + self.h * self.hd;
        &self.qkv[o..o + self.hd]
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

/// Panics unless C is a multiple of n_head and every buffer has its layout's length: the unsafe
/// row writes below rely on both.
fn assert_layout(op: &str, bufs: &[(&str, usize, usize)], c: usize, nh: usize) {
    assert!(nh > 0 && c % nh == 0, "{op}: C = {c} must be a multiple of n_head = {nh}");
    for &(name, len, want) in bufs {
        assert!(len == want, "{op}: {name} has {len} elements, expected {want}");
    }
}

pub fn attention_forward(out: &mut [f32], lse: &mut [f32], qkv: &[f32], d: &AttnDims) {
    let AttnDims { b, t, c, nh } = *d;
    let bufs = [("out", out.len(), b * t * c), ("lse", lse.len(), b * nh * t), ("qkv", qkv.len(), b * t * 3 * c)];
    assert_layout("attention_forward", &bufs, c, nh);
    let hd = c / nh;
    let scale = 1.0 / (hd as f32).sqrt();
    let out_ptr = SendPtr(out.as_mut_ptr());
    lse.par_chunks_mut(t).enumerate().for_each(|(bh, lse_row)| {
        let (bi, h) = (bh / nh, bh % nh);
        let head = Head { qkv, base: bi * t * 3 * c, c, hd, h };
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

/// dqkv = d loss / d qkv, given dout [B, T, C] and the forward's out and lse.
pub fn attention_backward(dqkv: &mut [f32], dout: &[f32], qkv: &[f32], out: &[f32], lse: &[f32], d: &AttnDims) {
    let AttnDims { b, t, c, nh } = *d;
    let bufs = [
        ("dqkv", dqkv.len(), b * t * 3 * c),
        ("dout", dout.len(), b * t * c),
        ("qkv", qkv.len(), b * t * 3 * c),
        ("out", out.len(), b * t * c),
        ("lse", lse.len(), b * nh * t),
    ];
    assert_layout("attention_backward", &bufs, c, nh);
    let hd = c / nh;
    let scale = 1.0 / (hd as f32).sqrt();
    let dptr = SendPtr(dqkv.as_mut_ptr());
    (0..b * nh).into_par_iter().for_each(|bh| {
        let (bi, h) = (bh / nh, bh % nh);
        let head = Head { qkv, base: bi * t * 3 * c, c, hd, h };
        let row = |i: usize| (bi * t + i) * c + h * hd..(bi * t + i) * c + (h + 1) * hd;
        let lse = &lse[bh * t..(bh + 1) * t];
        let (mut dq, mut dk, mut dv) = (vec![0f32; t * hd], vec![0f32; t * hd], vec![0f32; t * hd]);
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
        let p = dptr;
        for i in 0..t {
            let o = bi * t * 3 * c + i * 3 * c + h * hd;
            for (part, buf) in [(0, &dq), (1, &dk), (2, &dv)] {
                // SAFETY: dqkv has B * T * 3C elements (assert_layout), so o + 2C + hd is in bounds;
                // the q/k/v columns of head h in batch row bi belong to this task alone.
                let dst = unsafe { std::slice::from_raw_parts_mut(p.0.add(o + part * c), hd) };
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
    let KvDims { b, n, past, cap, c } = *d;
    assert!(past + n <= cap, "attention_decode: {past} cached + {n} new rows do not fit a cache of {cap}");
    let bufs = [
        ("out", out.len(), b * n * c),
        ("q", q.len(), b * n * c),
        ("k_cache", k_cache.len(), b * cap * c),
        ("v_cache", v_cache.len(), b * cap * c),
    ];
    assert_layout("attention_decode", &bufs, c, nh);
    let hd = c / nh;
    let scale = 1.0 / (hd as f32).sqrt();
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..b * nh).into_par_iter().for_each(|bh| {
        let (bi, h) = (bh / nh, bh % nh);
        let kv_row = |j: usize| (bi * cap + j) * c + h * hd..(bi * cap + j) * c + (h + 1) * hd;
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
    fn attention(&self, qkv: &Tensor, n_head: usize) -> Result<(Tensor, Tensor)> {
        const OP: &str = "attention";
        let (b, t, c) = qkv_dims(OP, qkv, n_head)?;
        let qd = f32_in(OP, qkv)?;
        let mut lse = vec![0f32; b * n_head * t];
        let out = new_f32(&[b, t, c], |o| attention_forward(o, &mut lse, qd, &AttnDims { b, t, c, nh: n_head }))?;
        Ok((out, Tensor::from_f32(lse, [b, n_head, t])?))
    }

    fn attention_backward(
        &self,
        dout: &Tensor,
        qkv: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        n_head: usize,
    ) -> Result<Tensor> {
        const OP: &str = "attention backward";
        let (b, t, c) = qkv_dims(OP, qkv, n_head)?;
        let (g, q, o, l) = (f32_in(OP, dout)?, f32_in(OP, qkv)?, f32_in(OP, out)?, f32_in(OP, lse)?);
        new_f32(qkv.dims(), |d| attention_backward(d, g, q, o, l, &AttnDims { b, t, c, nh: n_head }))
    }

    fn attention_cached(
        &self,
        qkv: &Tensor,
        k: &mut Tensor,
        v: &mut Tensor,
        len: usize,
        n_head: usize,
    ) -> Result<Tensor> {
        const OP: &str = "attention_cached";
        let (b, n, c) = qkv_dims(OP, qkv, n_head)?;
        let cap = k.dims().get(1).copied().unwrap_or(0);
        if len + n > cap || k.numel() != b * cap * c || v.numel() != k.numel() {
            let msg = format!("{len} cached + {n} new positions do not fit caches {:?}", k.dims());
            return Err(crate::Error::shape(OP, msg));
        }
        let qkv_d = f32_in(OP, qkv)?;
        let mut q = vec![0f32; b * n * c];
        attention_cache_append(&mut q, k.f32s_mut()?, v.f32s_mut()?, qkv_d, &KvDims { b, n, past: len, cap, c });
        let (kd, vd) = (f32_in(OP, k)?, f32_in(OP, v)?);
        new_f32(&[b, n, c], |o| attention_decode(o, &q, kd, vd, &KvDims { b, n, past: len, cap, c }, n_head))
    }
}

/// Splits qkv [B, n, 3C] of n new positions per sequence for `attention_decode`: q [B, n, C], and
/// the k and v thirds into rows len..len + n of k_cache and v_cache [B, cap, C] (other rows are
/// left as they are).
pub fn attention_cache_append(q: &mut [f32], k_cache: &mut [f32], v_cache: &mut [f32], qkv: &[f32], d: &KvDims) {
    let KvDims { b, n, past: len, cap, c } = *d;
    assert!(len + n <= cap, "attention_cache_append: {len} cached + {n} new rows do not fit a cache of {cap}");
    let bufs = [
        ("q", q.len(), b * n * c),
        ("k_cache", k_cache.len(), b * cap * c),
        ("v_cache", v_cache.len(), b * cap * c),
        ("qkv", qkv.len(), b * n * 3 * c),
    ];
    assert_layout("attention_cache_append", &bufs, c, 1);
    for (row, (src, qr)) in qkv.chunks_exact(3 * c).zip(q.chunks_exact_mut(c)).enumerate() {
        let dst = ((row / n) * cap + len + row % n) * c;
        qr.copy_from_slice(&src[..c]);
        k_cache[dst..dst + c].copy_from_slice(&src[c..2 * c]);
        v_cache[dst..dst + c].copy_from_slice(&src[2 * c..]);
    }
}
