//! Token + position embedding, GPT-2's first op: [B, T] ids -> [B, T, C].

use crate::backend::on;
use crate::tape::{Op, Tape};
use crate::{Error, Result, Tensor};

struct Embedding {
    /// The host ids.
    ids: Tensor,
    wte_dims: Vec<usize>,
    wpe_dims: Vec<usize>,
}

impl Op for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }
    fn backward(&self, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let be = on("embedding backward", &[dout])?;
        let (ids, t) = (self.ids.i32s()?, self.ids.dims()[1]);
        let dims = [self.wte_dims.as_slice(), self.wpe_dims.as_slice()];
        Ok(be.embedding_backward(dout, ids, t, dims, [needs[0], needs[1]])?.into())
    }
}

/// out[b, t] = wte[ids[b, t]] + wpe[t]. ids: I32 [B, T] on the host; wte: [V, C]; wpe: [P, C]
/// with T <= P.
pub fn embedding(tape: &mut Tape, ids: &Tensor, wte: &Tensor, wpe: &Tensor) -> Result<Tensor> {
    const OP: &str = "embedding";
    let _t = crate::profile::scope("embedding", crate::profile::Phase::Forward);
    let (idv, t) = check(ids, wte, wpe, 0)?;
    let out = on(OP, &[wte, wpe])?.embedding(idv, t, wte, wpe, 0)?;
    if tape.wants(&[wte, wpe]) {
        let saved = Embedding { ids: ids.clone(), wte_dims: wte.dims().to_vec(), wpe_dims: wpe.dims().to_vec() };
        tape.record(saved, &[wte, wpe], &out);
    }
    Ok(out)
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
    let (idv, t) = check(ids, wte, wpe, offset)?;
    on(OP, &[wte, wpe])?.embedding(idv, t, wte, wpe, offset)
}

/// The host ids and T of an embedding at positions offset..offset + T, checked against the tables.
fn check<'a>(ids: &'a Tensor, wte: &Tensor, wpe: &Tensor, offset: usize) -> Result<(&'a [i32], usize)> {
    const OP: &str = "embedding";
    let idv = ids.i32s()?;
    let [_, t] = *ids.dims() else {
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
    Ok((idv, t))
}
