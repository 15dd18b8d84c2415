//! Causal multi-head self-attention over GPT-2's packed qkv (the c_attn output).

#[cfg(feature = "cuda")]
use super::dev;
use super::{f32_input, new_f32};
use crate::backend::cpu::attention as cpu;
#[cfg(feature = "cuda")]
use crate::backend::cuda::attention as cuda;
use crate::tape::{Op, Tape};
use crate::{Error, Result, Tensor};

pub(crate) struct Saved {
    qkv: Tensor,
    out: Tensor,
    /// One log-sum-exp per (batch, head, query row), f32 on the op's device: all that backward
    /// keeps of the softmax.
    lse: Tensor,
    n_head: usize,
}

/// softmax(q k^T / sqrt(hd), causal) v per head. qkv: [B, T, 3C] -> out: [B, T, C].
pub fn attention(tape: &mut Tape, qkv: &Tensor, n_head: usize) -> Result<Tensor> {
    const OP: &str = "attention";
    let _t = crate::profile::scope("attention", crate::profile::Phase::Forward);
    let [b, t, c3] = *qkv.dims() else {
        return Err(Error::shape(OP, format!("qkv must be [B, T, 3C], got {:?}", qkv.dims())));
    };
    if c3 % 3 != 0 || n_head == 0 || (c3 / 3) % n_head != 0 {
        return Err(Error::shape(OP, format!("qkv width {c3} must be 3 x C with C divisible by n_head = {n_head}")));
    }
    let c = c3 / 3;
    let (out, lse) = match qkv.device() {
        #[cfg(feature = "cuda")]
        crate::Device::Cuda(_) => {
            let qd = dev::bf16_in(OP, qkv)?;
            let mut lse = crate::backend::cuda::cuda()?.alloc::<f32>(b * n_head * t)?;
            let out = dev::new_bf16(&[b, t, c], |o| cuda::attention_forward(o, &mut lse, qd, b, t, c, n_head))?;
            (out, Tensor::from_cuda(crate::tensor::CudaStorage::F32(lse), [b, n_head, t])?)
        }
        _ => {
            let qd = f32_input(OP, qkv)?;
            let mut lse = vec![0f32; b * n_head * t];
            let out = new_f32(&[b, t, c], |o| cpu::attention_forward(o, &mut lse, qd, b, t, c, n_head))?;
            (out, Tensor::from_f32(lse, [b, n_head, t])?)
        }
    };
    if tape.wants(&[qkv]) {
        tape.record(Op::Attention(Saved { qkv: qkv.clone(), out: out.clone(), lse, n_head }), &[qkv], &out);
    }
    Ok(out)
}

pub(crate) fn backward(s: &Saved, dout: &Tensor) -> Result<Vec<Option<Tensor>>> {
    let [b, t, c3] = *s.qkv.dims() else { unreachable!("checked in forward") };
    #[cfg(feature = "cuda")]
    if s.qkv.device() != crate::Device::Cpu {
        const OP: &str = "attention backward";
        let (g, qkv, out) = (dev::bf16_in(OP, dout)?, dev::bf16_in(OP, &s.qkv)?, dev::bf16_in(OP, &s.out)?);
        let lse = dev::f32_in(OP, &s.lse)?;
        let dqkv =
            dev::new_bf16(&[b, t, c3], |d| cuda::attention_backward(d, g, qkv, out, lse, b, t, c3 / 3, s.n_head))?;
        return Ok(vec![Some(dqkv)]);
    }
    let (g, qkv, out) = (dout.f32s()?, s.qkv.f32s()?, s.out.f32s()?);
    let lse = s.lse.f32s()?;
    let dqkv = new_f32(&[b, t, c3], |d| cpu::attention_backward(d, g, qkv, out, lse, b, t, c3 / 3, s.n_head))?;
    Ok(vec![Some(dqkv)])
}

/// One layer's keys and values for generation: k and v [B, cap, C] for `batch` sequences of up to
/// `capacity` positions, of which the first `len` are filled. The buffers are made by the first
/// `attention_cached` on the device and in the dtype of its qkv (f32 on the CPU, bf16 on the GPU).
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
            let [_, cap, c] = *t.dims() else { unreachable!("a cache buffer is [B, cap, C]") };
            let (row, used) = (cap * c, self.len * c);
            match t.device() {
                #[cfg(feature = "cuda")]
                crate::Device::Cuda(_) => {
                    let cu = crate::backend::cuda::cuda()?;
                    let src = dev::bf16_in("KV cache rows", t)?;
                    dev::new_bf16(&[rows.len(), cap, c], |d| {
                        for (i, &r) in rows.iter().enumerate() {
                            cu.copy_view(
                                &mut d.slice_mut(i * row..i * row + used),
                                &src.slice(r * row..r * row + used),
                            )?;
                        }
                        Ok(())
                    })
                }
                _ => {
                    let src = t.f32s()?;
                    let mut out = vec![0f32; rows.len() * row];
                    for (dst, &r) in out.chunks_exact_mut(row).zip(rows) {
                        dst[..used].copy_from_slice(&src[r * row..r * row + used]);
                    }
                    Tensor::from_f32(out, [rows.len(), cap, c])
                }
            }
        };
        let kv = match &self.kv {
            Some((k, v)) => Some((pick(k)?, pick(v)?)),
            None => None,
        };
        Ok(KvLayer { kv, batch: rows.len(), ..*self })
    }
}

/// Causal attention of n new positions per sequence against a KV cache, for generation: appends
/// the keys and values of qkv [B, n, 3C] at rows len..len + n of `cache`, then attends query i
/// (position len + i) to rows 0..=len + i. out: [B, n, C], each row what `attention` computes for
/// that position over the whole sequence. Inference only: it records nothing, and refuses a tape
/// that wants a gradient through it.
pub fn attention_cached(tape: &mut Tape, qkv: &Tensor, cache: &mut KvLayer, n_head: usize) -> Result<Tensor> {
    const OP: &str = "attention_cached";
    let _t = crate::profile::scope("attention", crate::profile::Phase::Forward);
    let [b, n, c3] = *qkv.dims() else {
        return Err(Error::shape(OP, format!("qkv must be [B, n, 3C], got {:?}", qkv.dims())));
    };
    if c3 == 0 || c3 % 3 != 0 || n_head == 0 || (c3 / 3) % n_head != 0 {
        return Err(Error::shape(OP, format!("qkv width {c3} must be 3 x C with C divisible by n_head = {n_head}")));
    }
    if tape.wants(&[qkv]) {
        return Err(Error::Input(format!(
            "{OP} is for generation and has no backward: compute gradients with a forward pass without a KV cache"
        )));
    }
    let (c, len, cap) = (c3 / 3, cache.len, cache.cap);
    if b != cache.batch {
        return Err(Error::shape(OP, format!("qkv holds {b} sequences, the KV cache {}", cache.batch)));
    }
    if len + n > cap {
        return Err(Error::Input(format!("{len} cached + {n} new positions exceed the cache's capacity of {cap}")));
    }
    let (k, v) = match &mut cache.kv {
        Some((k, v)) => {
            if k.dims() != [b, cap, c] || k.device() != qkv.device() || k.dtype() != qkv.dtype() {
                return Err(Error::Input(format!(
                    "this KV cache holds {:?} {:?} keys on {}, but qkv [B, n, 3C] = {:?} is {:?} on {}: \
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
            let buf = || -> Result<Tensor> {
                match qkv.device() {
                    #[cfg(feature = "cuda")]
                    crate::Device::Cuda(_) => {
                        let d = crate::backend::cuda::cuda()?.alloc::<crate::backend::cuda::bf16>(b * cap * c)?;
                        Tensor::from_cuda(crate::tensor::CudaStorage::BF16(d), [b, cap, c])
                    }
                    _ => Tensor::from_f32(vec![0f32; b * cap * c], [b, cap, c]),
                }
            };
            let (k, v) = slot.insert((buf()?, buf()?));
            (k, v)
        }
    };
    let out = match qkv.device() {
        #[cfg(feature = "cuda")]
        crate::Device::Cuda(_) => {
            use crate::tensor::CudaStorage;
            let qkv_d = dev::bf16_in(OP, qkv)?;
            let mut q = crate::backend::cuda::cuda()?.alloc::<crate::backend::cuda::bf16>(b * n * c)?;
            let (Some(CudaStorage::BF16(kd)), Some(CudaStorage::BF16(vd))) =
                (k.cuda_storage_mut(), v.cuda_storage_mut())
            else {
                unreachable!("checked above: the cache is bf16 on the device of qkv");
            };
            cuda::attention_cache_append(&mut q, kd, vd, qkv_d, b, n, len, cap, c)?;
            dev::new_bf16(&[b, n, c], |o| cuda::attention_decode(o, &q, kd, vd, b, n, len, cap, c, n_head))?
        }
        _ => {
            let qkv_d = f32_input(OP, qkv)?;
            let mut q = vec![0f32; b * n * c];
            cpu::attention_cache_append(&mut q, k.f32s_mut()?, v.f32s_mut()?, qkv_d, b, n, len, cap, c);
            let (kd, vd) = (k.f32s()?, v.f32s()?);
            new_f32(&[b, n, c], |o| cpu::attention_decode(o, &q, kd, vd, b, n, len, cap, c, n_head))?
        }
    };
    cache.len += n;
    Ok(out)
}
