//! Causal self-attention over packed qkv: GPT-2's c_attn output [B, T, 3C], or Llama's rotated
//! q, k, v packed by `rope::rope_qkv` with grouped-query heads [B, T, (nh + 2 nkv) hd].

use crate::backend::{on, Heads};
use crate::tape::{Op, Tape};
use crate::{Error, Result, Tensor};

struct Attention {
    qkv: Tensor,
    out: Tensor,
    /// One log-sum-exp per (batch, head, query row), f32 on the op's device: all that backward
    /// keeps of the softmax.
    lse: Tensor,
    heads: Heads,
}

impl Op for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }
    fn backward(&self, dout: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let be = on("attention backward", &[dout, &self.qkv])?;
        Ok(vec![Some(be.attention_backward(dout, &self.qkv, &self.out, &self.lse, self.heads)?)])
    }
}

/// softmax(q k^T / sqrt(hd), causal) v per query head, each reading its group's KV head.
/// qkv: [B, T, (nh + 2 nkv) hd] -> out: [B, T, nh hd] (GPT-2: [B, T, 3C] -> [B, T, C]).
pub fn attention(tape: &mut Tape, qkv: &Tensor, heads: Heads) -> Result<Tensor> {
    const OP: &str = "attention";
    let _t = crate::profile::scope("attention", crate::profile::Phase::Forward);
    crate::backend::qkv_dims(OP, qkv, heads)?;
    let (out, lse) = on(OP, &[qkv])?.attention(qkv, heads)?;
    if tape.wants(&[qkv]) {
        tape.record(Attention { qkv: qkv.clone(), out: out.clone(), lse, heads }, &[qkv], &out);
    }
    Ok(out)
}

/// One layer's keys and values for generation: k and v [B, cap, Ckv] (the KV heads only) for `batch` sequences of up to
/// `capacity` positions, of which the first `len` are filled. The buffers are made by the first
/// `attention_cached`, on the device and in the compute dtype of its backend.
#[derive(Debug)]
pub struct KvLayer {
    kv: Option<(Tensor, Tensor)>,
    batch: usize,
    cap: usize,
    len: usize,
}

impl KvLayer {
    /// An empty cache for `batch` sequences of up to `capacity` positions.
    pub fn new(batch: usize, capacity: usize) -> Self {
        KvLayer { kv: None, batch, cap: capacity, len: 0 }
    }

    /// Positions cached so far (the same for every sequence).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of sequences (batch rows).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The most positions this cache holds.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// A cache whose row i is a copy of row `rows[i]` of this one (rows may repeat): fans a
    /// prefilled prompt out to several sequences, or drops finished ones. Copies only the filled
    /// positions, on the cache's device.
    pub fn select_rows(&self, rows: &[usize]) -> Result<KvLayer> {
        if let Some(&r) = rows.iter().find(|&&r| r >= self.batch) {
            return Err(Error::Input(format!("row {r} is not in a cache of {} sequences", self.batch)));
        }
        let pick = |t: &Tensor| -> Result<Tensor> {
            let [_, cap, c] = *t.dims() else { unreachable!("a cache buffer is [B, cap, Ckv]") };
            let (row, used) = (cap * c, self.len * c);
            let pieces: Vec<(usize, usize, usize)> =
                rows.iter().enumerate().map(|(i, &r)| (i * row, r * row, used)).collect();
            on("KV cache rows", &[t])?.gather(t, &[rows.len(), cap, c], &pieces)
        };
        let kv = match &self.kv {
            Some((k, v)) => Some((pick(k)?, pick(v)?)),
            None => None,
        };
        Ok(KvLayer { kv, batch: rows.len(), ..*self })
    }
}

/// Causal attention of n new positions per sequence against a KV cache, for generation: appends
/// the keys and values of qkv [B, n, (nh + 2 nkv) hd] at rows len..len + n of `cache`, then
/// attends query i (position len + i) to rows 0..=len + i. out: [B, n, nh hd], each row what
/// `attention` computes for that position over the whole sequence. Inference only: it records
/// nothing, and refuses a tape that wants a gradient through it.
pub fn attention_cached(tape: &mut Tape, qkv: &Tensor, cache: &mut KvLayer, heads: Heads) -> Result<Tensor> {
    const OP: &str = "attention_cached";
    let _t = crate::profile::scope("attention", crate::profile::Phase::Forward);
    let (b, n, c) = crate::backend::qkv_dims(OP, qkv, heads)?;
    if tape.wants(&[qkv]) {
        return Err(Error::Input(format!(
            "{OP} is for generation and has no backward: compute gradients with a forward pass without a KV cache"
        )));
    }
    let (ckv, len, cap) = (c / heads.n_head * heads.n_kv_head, cache.len, cache.cap);
    if b != cache.batch {
        return Err(Error::shape(OP, format!("qkv holds {b} sequences, the KV cache {}", cache.batch)));
    }
    if len + n > cap {
        return Err(Error::Input(format!("{len} cached + {n} new positions exceed the cache's capacity of {cap}")));
    }
    let be = on(OP, &[qkv])?;
    let (k, v) = match &mut cache.kv {
        Some((k, v)) => {
            if k.dims() != [b, cap, ckv] || k.device() != qkv.device() || k.dtype() != qkv.dtype() {
                return Err(Error::Mismatch(format!(
                    "this KV cache holds {:?} {:?} keys on {}, but qkv [B, n, (nh + 2 nkv) hd] = {:?} is {:?} on {}: \
                     it was made for another model or device",
                    k.dims(),
                    k.dtype(),
                    k.device(),
                    qkv.dims(),
                    qkv.dtype(),
                    qkv.device()
                )));
            }
            (k, v)
        }
        slot @ None => {
            let (k, v) = slot.insert((be.empty(&[b, cap, ckv])?, be.empty(&[b, cap, ckv])?));
            (k, v)
        }
    };
    let out = be.attention_cached(qkv, k, v, len, heads)?;
    cache.len += n;
    Ok(out)
}
