//! Token + position embedding, GPT-2's first op: [B, T] ids -> [B, T, C]; the token embedding
//! alone for models whose positions are rotary (Llama).

use crate::backend::on;
use crate::tape::{Op, Tape};
use crate::{Error, Result, Tensor};

struct Embedding {
    /// The host ids.
    ids: Tensor,
    wte_dims: Vec<usize>,
    /// None for a token embedding alone (`token_embedding`).
    wpe_dims: Option<Vec<usize>>,
}

impl Op for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }
    fn backward(&self, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let be = on("embedding backward", &[dout])?;
        let (ids, t) = (self.ids.i32s()?, self.ids.dims()[1]);
        match &self.wpe_dims {
            Some(wpe) => Ok(be.embedding_backward(dout, ids, t, [&self.wte_dims, wpe], [needs[0], needs[1]])?.into()),
            None => {
                let [dwte, _] = be.embedding_backward(dout, ids, t, [&self.wte_dims, &[0, 0]], [needs[0], false])?;
                Ok(vec![dwte])
            }
        }
    }
}

/// out[b, t] = wte[ids[b, t]] + wpe[t]. ids: I32 [B, T] on the host; wte: [V, C]; wpe: [P, C]
/// with T <= P.
pub fn embedding(tape: &mut Tape, ids: &Tensor, wte: &Tensor, wpe: &Tensor) -> Result<Tensor> {
    const OP: &str = "embedding";
    let _t = crate::profile::scope("embedding", crate::profile::Phase::Forward);
    let (idv, t) = check(ids, wte, Some(wpe), 0)?;
    let out = on(OP, &[wte, wpe])?.embedding(idv, t, wte, Some(wpe), 0)?;
    if tape.wants(&[wte, wpe]) {
        let saved = Embedding { ids: ids.clone(), wte_dims: wte.dims().to_vec(), wpe_dims: Some(wpe.dims().to_vec()) };
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
    let (idv, t) = check(ids, wte, Some(wpe), offset)?;
    on(OP, &[wte, wpe])?.embedding(idv, t, wte, Some(wpe), offset)
}

/// out[b, t] = wte[ids[b, t]]: the token embedding of a model with rotary positions (Llama), the
/// same at any position. ids: I32 [B, T] on the host; wte: [V, C].
pub fn token_embedding(tape: &mut Tape, ids: &Tensor, wte: &Tensor) -> Result<Tensor> {
    const OP: &str = "embedding";
    let _t = crate::profile::scope("embedding", crate::profile::Phase::Forward);
    let (idv, t) = check(ids, wte, None, 0)?;
    let out = on(OP, &[wte])?.embedding(idv, t, wte, None, 0)?;
    if tape.wants(&[wte]) {
        tape.record(Embedding { ids: ids.clone(), wte_dims: wte.dims().to_vec(), wpe_dims: None }, &[wte], &out);
    }
    Ok(out)
}

/// The host ids and T of an embedding at positions offset..offset + T, checked against the tables
/// (the token table alone without `wpe`).
fn check<'a>(ids: &'a Tensor, wte: &Tensor, wpe: Option<&Tensor>, offset: usize) -> Result<(&'a [i32], usize)> {
    const OP: &str = "embedding";
    let idv = ids.i32s()?;
    let [_, t] = *ids.dims() else {
        return Err(Error::shape(OP, format!("ids must be [B, T], got {:?}", ids.dims())));
    };
    let (v, c) = match (wte.dims(), wpe.map(Tensor::dims)) {
        (&[v, c], None | Some(&[_, _])) => (v, c),
        (_, None) => {
            return Err(Error::shape(OP, format!("the token table must be [V, C], got {:?}", wte.dims())));
        }
        (_, Some(p)) => {
            return Err(Error::shape(OP, format!("wte {:?} and wpe {p:?} must both be 2-D", wte.dims())));
        }
    };
    if let Some(&[p, c2]) = wpe.map(Tensor::dims) {
        if c != c2 {
            return Err(Error::shape(OP, format!("wte {:?} and wpe [{p}, {c2}] differ in width", wte.dims())));
        }
        if offset + t > p {
            return Err(Error::SeqTooLong { t: offset + t, n_positions: p });
        }
    }
    if let Some(i) = idv.iter().position(|&id| id < 0 || id as usize >= v) {
        return Err(Error::TokenOutOfRange { id: idv[i] as i64, row: i / t, pos: offset + i % t, vocab: v });
    }
    Ok((idv, t))
}
