//! Token + position embedding, GPT-2's first op: [B, T] ids -> [B, T, C].

use super::{f32_input, new_f32};
use crate::backend::cpu::{embedding as cpu, pool};
use crate::tape::{Op, Tape};
use crate::{Error, Result, Tensor};

pub(crate) struct Saved {
    ids: Tensor,
    wte_dims: Vec<usize>,
    wpe_dims: Vec<usize>,
}

/// out[b, t] = wte[ids[b, t]] + wpe[t]. ids: I32 [B, T]; wte: [V, C]; wpe: [P, C] with T <= P.
pub fn embedding(tape: &mut Tape, ids: &Tensor, wte: &Tensor, wpe: &Tensor) -> Result<Tensor> {
    const OP: &str = "embedding";
    let _t = crate::profile::scope("embedding", crate::profile::Phase::Forward);
    let idv = ids.i32s()?;
    let [b, t] = *ids.dims() else {
        return Err(Error::shape(OP, format!("ids must be [B, T], got {:?}", ids.dims())));
    };
    let (&[v, c], &[p, c2]) = (wte.dims(), wpe.dims()) else {
        return Err(Error::shape(OP, format!("wte {:?} and wpe {:?} must both be 2-D", wte.dims(), wpe.dims())));
    };
    if c != c2 {
        return Err(Error::shape(OP, format!("wte {:?} and wpe {:?} differ in width", wte.dims(), wpe.dims())));
    }
    if t > p {
        return Err(Error::SeqTooLong { t, n_positions: p });
    }
    if let Some(i) = idv.iter().position(|&id| id < 0 || id as usize >= v) {
        return Err(Error::TokenOutOfRange { id: idv[i] as i64, row: i / t, pos: i % t, vocab: v });
    }
    let (wte_d, wpe_d) = (f32_input(OP, wte)?, f32_input(OP, wpe)?);
    let out = new_f32(&[b, t, c], |o| cpu::embedding_forward(o, idv, wte_d, wpe_d, t, c))?;
    if tape.wants(&[wte, wpe]) {
        let saved = Saved { ids: ids.clone(), wte_dims: wte.dims().to_vec(), wpe_dims: wpe.dims().to_vec() };
        tape.record(Op::Embedding(saved), &[wte, wpe], &out);
    }
    Ok(out)
}

pub(crate) fn backward(s: &Saved, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
    let (ids, g) = (s.ids.i32s()?, dout.f32s()?);
    let (t, c) = (s.ids.dims()[1], s.wte_dims[1]);
    let mut dwte = needs[0].then(|| pool::take(s.wte_dims.iter().product()));
    let mut dwpe = needs[1].then(|| pool::take(s.wpe_dims.iter().product()));
    cpu::embedding_backward(dwte.as_deref_mut(), dwpe.as_deref_mut(), g, ids, t, c);
    Ok(vec![
        dwte.map(|d| Tensor::from_f32(d, s.wte_dims.as_slice())).transpose()?,
        dwpe.map(|d| Tensor::from_f32(d, s.wpe_dims.as_slice())).transpose()?,
    ])
}
