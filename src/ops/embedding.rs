//! Token + position embedding, GPT-2's first op: [B, T] ids -> [B, T, C].

#[cfg(feature = "cuda")]
use super::dev;
use super::{f32_input, new_f32};
use crate::backend::cpu::{embedding as cpu, pool};
#[cfg(feature = "cuda")]
use crate::backend::cuda::embedding as cuda;
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
    let out = match wte.device() {
        #[cfg(feature = "cuda")]
        crate::Device::Cuda(_) => {
            // ids stay on the host (checked above, and the backward groups them there).
            let ids_d = crate::backend::cuda::cuda()?.upload(idv)?;
            let (wte_d, wpe_d) = (dev::bf16_in(OP, wte)?, dev::bf16_in(OP, wpe)?);
            dev::new_bf16(&[b, t, c], |o| cuda::embedding_forward(o, &ids_d, wte_d, wpe_d, t, c))?
        }
        _ => {
            let (wte_d, wpe_d) = (f32_input(OP, wte)?, f32_input(OP, wpe)?);
            new_f32(&[b, t, c], |o| cpu::embedding_forward(o, idv, wte_d, wpe_d, t, c))?
        }
    };
    if tape.wants(&[wte, wpe]) {
        let saved = Saved { ids: ids.clone(), wte_dims: wte.dims().to_vec(), wpe_dims: wpe.dims().to_vec() };
        tape.record(Op::Embedding(saved), &[wte, wpe], &out);
    }
    Ok(out)
}

pub(crate) fn backward(s: &Saved, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
    let ids = s.ids.i32s()?;
    let (t, c) = (s.ids.dims()[1], s.wte_dims[1]);
    #[cfg(feature = "cuda")]
    if dout.device() != crate::Device::Cpu {
        // f32 gradients for the f32 master weights (the bf16 cast passes them through).
        let g = dev::bf16_in("embedding backward", dout)?;
        let cu = crate::backend::cuda::cuda()?;
        let mut dwte = needs[0].then(|| cu.alloc::<f32>(s.wte_dims.iter().product())).transpose()?;
        let mut dwpe = needs[1].then(|| cu.alloc::<f32>(s.wpe_dims.iter().product())).transpose()?;
        cuda::embedding_backward(dwte.as_mut(), dwpe.as_mut(), g, ids, t, c)?;
        let wrap = |d: crate::backend::cuda::DevBuf<f32>, dims: &[usize]| {
            Tensor::from_cuda(crate::tensor::CudaStorage::F32(d), dims)
        };
        return Ok(vec![
            dwte.map(|d| wrap(d, &s.wte_dims)).transpose()?,
            dwpe.map(|d| wrap(d, &s.wpe_dims)).transpose()?,
        ]);
    }
    let g = dout.f32s()?;
    let mut dwte = needs[0].then(|| pool::take(s.wte_dims.iter().product()));
    let mut dwpe = needs[1].then(|| pool::take(s.wpe_dims.iter().product()));
    cpu::embedding_backward(dwte.as_deref_mut(), dwpe.as_deref_mut(), g, ids, t, c);
    Ok(vec![
        dwte.map(|d| Tensor::from_f32(d, s.wte_dims.as_slice())).transpose()?,
        dwpe.map(|d| Tensor::from_f32(d, s.wpe_dims.as_slice())).transpose()?,
    ])
}

/// `embedding` at positions offset..offset + T: out[b, t] = wte[ids[b, t]] + wpe[offset + t], what
/// generation feeds after `offset` cached positions. offset = 0 is `embedding` itself; past 0 it
/// is inference only (it records nothing, and refuses a tape that wants wte's or wpe's gradient).
pub fn embedding_at(tape: &mut Tape, ids: &Tensor, wte: &Tensor, wpe: &Tensor, offset: usize) -> Result<Tensor> {
    if offset == 0 {
        return embedding(tape, ids, wte, wpe);
    }
    const OP: &str = "embedding";
    let _t = crate::profile::scope("embedding", crate::profile::Phase::Forward);
    if tape.wants(&[wte, wpe]) {
        return Err(Error::Input(format!(
            "{OP} at position offset {offset} is for generation with a KV cache and has no backward: \
             compute gradients with a forward pass from position 0"
        )));
    }
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
    if offset + t > p {
        return Err(Error::SeqTooLong { t: offset + t, n_positions: p });
    }
    if let Some(i) = idv.iter().position(|&id| id < 0 || id as usize >= v) {
        return Err(Error::TokenOutOfRange { id: idv[i] as i64, row: i / t, pos: offset + i % t, vocab: v });
    }
    match wte.device() {
        #[cfg(feature = "cuda")]
        crate::Device::Cuda(_) => {
            let ids_d = crate::backend::cuda::cuda()?.upload(idv)?;
            let (wte_d, wpe_d) = (dev::bf16_in(OP, wte)?, dev::bf16_in(OP, wpe)?);
            dev::new_bf16(&[b, t, c], |o| cuda::embedding_forward_at(o, &ids_d, wte_d, wpe_d, offset, t, c))
        }
        _ => {
            let (wte_d, wpe_d) = (f32_input(OP, wte)?, f32_input(OP, wpe)?);
            new_f32(&[b, t, c], |o| cpu::embedding_forward(o, idv, wte_d, &wpe_d[offset * c..], t, c))
        }
    }
}
