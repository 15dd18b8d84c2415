//! Token + position embedding: out[b, t] = wte[ids[b, t]] + wpe[t]. The backward scatter-adds
//! rows in a fixed order (parallel over channels, serial over positions), so it is deterministic.

use super::{f32_in, new_f32, take_if, wrap};
use crate::{Result, Tensor};
use rayon::prelude::*;

pub fn embedding_forward(out: &mut [f32], ids: &[i32], wte: &[f32], wpe: &[f32], t: usize, c: usize) {
    out.par_chunks_mut(c).enumerate().for_each(|(row, o)| {
        let id = ids[row] as usize;
        let pos = row % t;
        let (te, pe) = (&wte[id * c..(id + 1) * c], &wpe[pos * c..(pos + 1) * c]);
        for i in 0..c {
            o[i] = te[i] + pe[i];
        }
    });
}

/// dwte[id] += dout[b, t] for every (b, t) with ids[b, t] = id; dwpe[t] += sum over b of dout[b, t].
/// Both outputs are overwritten (zeroed first).
pub fn embedding_backward(
    dwte: Option<&mut [f32]>,
    dwpe: Option<&mut [f32]>,
    dout: &[f32],
    ids: &[i32],
    t: usize,
    c: usize,
) {
    // Split channels into stripes: each task owns a column range of both tables, so the
    // scatter-add needs no atomics and runs in the same order every time.
    const STRIPE: usize = 64;
    let stripes = c.div_ceil(STRIPE);
    let rows = ids.len();
    assert!(dout.len() == rows * c, "embedding_backward: dout has {} elements, expected {rows} x {c}", dout.len());
    if let Some(dwte) = dwte {
        // The unsafe scatter below writes row `id` of dwte: every id must name one.
        let vocab = dwte.len() / c.max(1);
        assert!(
            dwte.len() == vocab * c,
            "embedding_backward: dwte has {} elements, not a multiple of C = {c}",
            dwte.len()
        );
        if let Some(bad) = ids.iter().find(|&&id| id < 0 || id as usize >= vocab) {
            panic!("embedding_backward: token id {bad} is outside the vocabulary of {vocab}");
        }
        dwte.fill(0.0);
        let ptr = super::SendPtr(dwte.as_mut_ptr());
        (0..stripes).into_par_iter().for_each(|s| {
            let (lo, hi) = (s * STRIPE, ((s + 1) * STRIPE).min(c));
            let p = ptr;
            for r in 0..rows {
                let id = ids[r] as usize;
                for i in lo..hi {
                    // SAFETY: 0 <= id < vocab and i < C (checked above), so id * C + i is inside
                    // dwte; column range [lo, hi) belongs to this task alone.
                    unsafe { *p.0.add(id * c + i) += dout[r * c + i] };
                }
            }
        });
    }
    if let Some(dwpe) = dwpe {
        dwpe.fill(0.0);
        for r in 0..rows {
            let pos = r % t;
            super::axpy(&mut dwpe[pos * c..(pos + 1) * c], 1.0, &dout[r * c..(r + 1) * c]);
        }
    }
}

impl crate::backend::Embedding for super::Cpu {
    fn embedding(&self, ids: &[i32], t: usize, wte: &Tensor, wpe: Option<&Tensor>, offset: usize) -> Result<Tensor> {
        const OP: &str = "embedding";
        let c = wte.shape().last();
        let wte_d = f32_in(OP, wte)?;
        let Some(wpe) = wpe else {
            // rotary positions: the token rows alone
            return new_f32(&[ids.len() / t.max(1), t, c], |o| {
                o.par_chunks_mut(c.max(1)).zip(ids).for_each(|(o, &id)| {
                    o.copy_from_slice(&wte_d[id as usize * c..(id as usize + 1) * c]);
                })
            });
        };
        let wpe_d = f32_in(OP, wpe)?;
        let wpe_at = wpe_d
            .get(offset * c..)
            .ok_or_else(|| crate::Error::SeqTooLong { t: offset + t, n_positions: wpe_d.len() / c.max(1) })?;
        new_f32(&[ids.len() / t.max(1), t, c], |o| embedding_forward(o, ids, wte_d, wpe_at, t, c))
    }

    fn embedding_backward(
        &self,
        dout: &Tensor,
        ids: &[i32],
        t: usize,
        [wte_dims, wpe_dims]: [&[usize]; 2],
        needs: [bool; 2],
    ) -> Result<[Option<Tensor>; 2]> {
        let c = wte_dims.last().copied().unwrap_or(1);
        let mut dwte = take_if(needs[0], wte_dims.iter().product());
        let mut dwpe = take_if(needs[1], wpe_dims.iter().product());
        embedding_backward(dwte.as_deref_mut(), dwpe.as_deref_mut(), f32_in("embedding backward", dout)?, ids, t, c);
        Ok([wrap(dwte, wte_dims)?, wrap(dwpe, wpe_dims)?])
    }
}
