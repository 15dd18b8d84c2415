//! Rotary position embeddings (Su et al. 2021) in transformers' rotate-half convention, fused
//! with packing q, k and v into the attention's qkv layout. For a head vector x of size hd and
//! h2 = hd / 2, dimension i < h2 pairs with i + h2 at angle pos * theta^(-2i / hd):
//!   y[i]      = x[i] cos - x[i + h2] sin
//!   y[i + h2] = x[i + h2] cos + x[i] sin
//! The angles are computed as transformers does (inverse frequencies in f32, pos * inv_freq one
//! f32 product), their cos and sin in f64 and rounded once. Backward rotates by the negative
//! angle (a rotation's inverse is its transpose).

use super::{f32_in, new_f32};
use crate::backend::{Heads, RopeArgs};
use crate::{Error, Result, Tensor};
use rayon::prelude::*;

/// cos and sin [T, hd / 2] of positions offset..offset + t.
pub fn rope_table(t: usize, hd: usize, theta: f32, offset: usize) -> (Vec<f32>, Vec<f32>) {
    let h2 = hd / 2;
    let inv: Vec<f32> = (0..h2).map(|i| 1.0 / theta.powf((2 * i) as f32 / hd as f32)).collect();
    let (mut cos, mut sin) = (Vec::with_capacity(t * h2), Vec::with_capacity(t * h2));
    for p in offset..offset + t {
        for &f in &inv {
            let a = (p as f32 * f) as f64;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (cos, sin)
}

/// Rotates one head vector: y = R(angle) x, or R(-angle) x with `inverse`.
#[inline]
fn rotate(y: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32], inverse: bool) {
    let h2 = x.len() / 2;
    let s = if inverse { -1.0 } else { 1.0 };
    for i in 0..h2 {
        let (a, b, c, sn) = (x[i], x[i + h2], cos[i], s * sin[i]);
        y[i] = a * c - b * sn;
        y[i + h2] = b * c + a * sn;
    }
}

/// qkv [B, T, (nh + 2 nkv) hd] from q [B, T, nh hd], k, v [B, T, nkv hd]: q and k rotated.
#[allow(clippy::too_many_arguments)]
pub fn rope_pack(
    qkv: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    hd: usize,
    heads: Heads,
    cs: (&[f32], &[f32]),
) {
    let (c, ckv) = (heads.n_head * hd, heads.n_kv_head * hd);
    let w = c + 2 * ckv;
    let rows = qkv.len() / w;
    assert!(qkv.len() == rows * w && q.len() == rows * c && k.len() == rows * ckv && v.len() == rows * ckv);
    let h2 = hd / 2;
    qkv.par_chunks_mut(w).enumerate().for_each(|(r, out)| {
        let p = r % t;
        let (cos, sin) = (&cs.0[p * h2..(p + 1) * h2], &cs.1[p * h2..(p + 1) * h2]);
        let (oq, rest) = out.split_at_mut(c);
        let (ok, ov) = rest.split_at_mut(ckv);
        for (y, x) in oq.chunks_exact_mut(hd).zip(q[r * c..(r + 1) * c].chunks_exact(hd)) {
            rotate(y, x, cos, sin, false);
        }
        for (y, x) in ok.chunks_exact_mut(hd).zip(k[r * ckv..(r + 1) * ckv].chunks_exact(hd)) {
            rotate(y, x, cos, sin, false);
        }
        ov.copy_from_slice(&v[r * ckv..(r + 1) * ckv]);
    });
}

/// dq, dk, dv from dqkv: the q and k parts rotated back.
#[allow(clippy::too_many_arguments)]
pub fn rope_unpack(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dqkv: &[f32],
    t: usize,
    hd: usize,
    heads: Heads,
    cs: (&[f32], &[f32]),
) {
    let (c, ckv) = (heads.n_head * hd, heads.n_kv_head * hd);
    let w = c + 2 * ckv;
    let rows = dqkv.len() / w;
    assert!(dqkv.len() == rows * w && dq.len() == rows * c && dk.len() == rows * ckv && dv.len() == rows * ckv);
    let h2 = hd / 2;
    dq.par_chunks_mut(c).zip(dk.par_chunks_mut(ckv).zip(dv.par_chunks_mut(ckv))).enumerate().for_each(
        |(r, (dq, (dk, dv)))| {
            let p = r % t;
            let (cos, sin) = (&cs.0[p * h2..(p + 1) * h2], &cs.1[p * h2..(p + 1) * h2]);
            let g = &dqkv[r * w..(r + 1) * w];
            for (y, x) in dq.chunks_exact_mut(hd).zip(g[..c].chunks_exact(hd)) {
                rotate(y, x, cos, sin, true);
            }
            for (y, x) in dk.chunks_exact_mut(hd).zip(g[c..c + ckv].chunks_exact(hd)) {
                rotate(y, x, cos, sin, true);
            }
            dv.copy_from_slice(&g[c + ckv..]);
        },
    );
}

/// (B, T, hd) of q [B, T, nh hd], k and v [B, T, nkv hd] with an even hd, or why not.
pub(crate) fn rope_dims(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: Heads,
) -> Result<(usize, usize, usize)> {
    let bad = || {
        Error::shape(
            op,
            format!(
                "q {:?}, k {:?}, v {:?} must be [B, T, n_head hd], [B, T, n_kv_head hd] twice, with an even head size, \
                 for {} query and {} KV heads",
                q.dims(),
                k.dims(),
                v.dims(),
                heads.n_head,
                heads.n_kv_head
            ),
        )
    };
    let (&[b, t, c], &[b2, t2, ckv]) = (q.dims(), k.dims()) else { return Err(bad()) };
    if !heads.is_valid() || c % heads.n_head != 0 || (b2, t2) != (b, t) || v.dims() != k.dims() {
        return Err(bad());
    }
    let hd = c / heads.n_head;
    if hd % 2 != 0 || ckv != heads.n_kv_head * hd {
        return Err(bad());
    }
    Ok((b, t, hd))
}

/// (B, T, hd) of a packed qkv (or its gradient) [B, T, (nh + 2 nkv) hd] with an even hd, or why not.
pub(crate) fn packed_dims(op: &'static str, qkv: &Tensor, heads: Heads) -> Result<(usize, usize, usize)> {
    let &[b, t, w] = qkv.dims() else {
        return Err(Error::shape(op, format!("dqkv must be [B, T, W], got {:?}", qkv.dims())));
    };
    if !heads.is_valid() || w % heads.packed() != 0 || (w / heads.packed()) % 2 != 0 {
        return Err(Error::shape(op, format!("dqkv width {w} is not (n_head + 2 n_kv_head) x an even head size")));
    }
    Ok((b, t, w / heads.packed()))
}

impl crate::backend::Rope for super::Cpu {
    fn rope_pack(&self, q: &Tensor, k: &Tensor, v: &Tensor, args: &RopeArgs) -> Result<Tensor> {
        const OP: &str = "rope";
        let (b, t, hd) = rope_dims(OP, q, k, v, args.heads)?;
        let (qd, kd, vd) = (f32_in(OP, q)?, f32_in(OP, k)?, f32_in(OP, v)?);
        let (cos, sin) = rope_table(t, hd, args.theta, args.offset);
        let w = args.heads.packed() * hd;
        new_f32(&[b, t, w], |o| rope_pack(o, qd, kd, vd, t, hd, args.heads, (&cos, &sin)))
    }

    fn rope_unpack(&self, dqkv: &Tensor, args: &RopeArgs) -> Result<[Tensor; 3]> {
        const OP: &str = "rope backward";
        let heads = args.heads;
        let (b, t, hd) = packed_dims(OP, dqkv, heads)?;
        let (c, ckv) = (heads.n_head * hd, heads.n_kv_head * hd);
        let g = f32_in(OP, dqkv)?;
        let (cos, sin) = rope_table(t, hd, args.theta, args.offset);
        let (mut dq, mut dk, mut dv) = (vec![0f32; b * t * c], vec![0f32; b * t * ckv], vec![0f32; b * t * ckv]);
        rope_unpack(&mut dq, &mut dk, &mut dv, g, t, hd, heads, (&cos, &sin));
        Ok([Tensor::from_f32(dq, [b, t, c])?, Tensor::from_f32(dk, [b, t, ckv])?, Tensor::from_f32(dv, [b, t, ckv])?])
    }
}
