//! Launch wrappers for kernels/embedding.cu: token + position embedding over bf16 tables, with the
//! names and argument order of `backend::cpu::embedding`, and a deterministic backward (no
//! atomics: the token rows are grouped by id on the host, `Buckets`); plus the host twins
//! (`twin`), which CI tests against the CPU backend without a GPU.

use super::tensor::{bf16_in, new_bf16, wrap_f32};
use super::{bf16, cuda, DevBuf, Kernel, LaunchConfig};
use crate::abi::{KILN_EMB_THREADS, KILN_EMB_WARPS};
use crate::{Error, Result, Tensor};

/// The rows of a batch grouped by token id: bucket b is token `ids[b]` (ascending), found at rows
/// `rows[start[b] .. start[b + 1]]` (ascending). Ids outside [0, vocab) are left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    pub ids: Vec<i32>,
    pub start: Vec<i32>,
    pub rows: Vec<i32>,
}

impl Buckets {
    /// Groups `ids` (one per row) by value: a sort of (id, row) pairs, which are distinct, so the
    /// result is the same whatever sort is used.
    pub fn new(ids: &[i32], vocab: usize) -> Buckets {
        let mut pairs: Vec<(i32, i32)> = ids
            .iter()
            .enumerate()
            .filter(|(_, &id)| id >= 0 && (id as usize) < vocab)
            .map(|(r, &id)| (id, r as i32))
            .collect();
        pairs.sort_unstable();
        let mut b = Buckets { ids: Vec::new(), start: Vec::new(), rows: Vec::with_capacity(pairs.len()) };
        for (k, &(id, row)) in pairs.iter().enumerate() {
            if b.ids.last() != Some(&id) {
                b.ids.push(id);
                b.start.push(k as i32);
            }
            b.rows.push(row);
        }
        b.start.push(pairs.len() as i32);
        b
    }
}

/// Checks the sizes the embedding kernels index with: a table of rows of C, and a position table
/// (where there is one) of at least T rows.
fn check(
    op: &'static str,
    rows: usize,
    t: usize,
    c: usize,
    table: (&str, usize),
    wpe: Option<(&str, usize)>,
) -> Result<()> {
    if t == 0 || c == 0 {
        return Err(Error::Shape { op, msg: format!("T = {t}, C = {c}: both must be positive") });
    }
    if rows > i32::MAX as usize || c > i32::MAX as usize || t > i32::MAX as usize {
        return Err(Error::Shape { op, msg: format!("{rows} rows, T = {t}, C = {c}: the kernels index with i32") });
    }
    if table.1 % c != 0 || table.1 / c > i32::MAX as usize {
        return Err(Error::Shape {
            op,
            msg: format!("{} has {} elements: not rows of C = {c} (or too many)", table.0, table.1),
        });
    }
    if let Some((name, len)) = wpe {
        if len % c != 0 || len < t * c {
            return Err(Error::Shape { op, msg: format!("{name} has {len} elements: need [>= T, C] = [{t}, {c}]") });
        }
    }
    Ok(())
}

/// out[r] = wte[ids[r]] + wpe[r % t] (f32 add, rounded to bf16); rows = ids.len(). An id outside
/// the table gives a NaN row (the op checks ids first; the kernel never reads out of bounds).
pub fn embedding_forward(
    out: &mut DevBuf<bf16>,
    ids: &DevBuf<i32>,
    wte: &DevBuf<bf16>,
    wpe: &DevBuf<bf16>,
    t: usize,
    c: usize,
) -> Result<()> {
    embedding_forward_at(out, ids, wte, wpe, 0, t, c)
}

/// dwte[id] = sum of dout rows with that token, dwpe[pos] = sum over rows r with r % t = pos, both
/// f32 and overwritten (zero where nothing adds), in the CPU's order, so the same bits every run.
/// `ids` are the host copy of the batch's token ids (rows = ids.len()): the backward groups them
/// by value on the host (`Buckets`) instead of sorting or using atomics on the device.
pub fn embedding_backward(
    dwte: Option<&mut DevBuf<f32>>,
    dwpe: Option<&mut DevBuf<f32>>,
    dout: &DevBuf<bf16>,
    ids: &[i32],
    t: usize,
    c: usize,
) -> Result<()> {
    let op = "cuda::embedding_backward";
    let rows = ids.len();
    if dout.len() != rows * c {
        return Err(Error::Shape {
            op,
            msg: format!("dout has {} elements, expected rows * C = {rows} * {c}", dout.len()),
        });
    }
    let cu = cuda()?;
    let threads = KILN_EMB_THREADS as usize;
    let (rows32, t32, c32) = (rows as i32, t as i32, c as i32);
    if let Some(dwte) = dwte {
        check(op, rows, t, c, ("dwte", dwte.len()), None)?;
        let vocab = dwte.len() / c;
        cu.memset_zeros(&mut dwte.slice_mut(..))?;
        let b = Buckets::new(ids, vocab);
        if !b.ids.is_empty() {
            let (bids, bstart, brows) = (cu.upload(&b.ids)?, cu.upload(&b.start)?, cu.upload(&b.rows)?);
            let vocab32 = vocab as i32;
            let cfg = LaunchConfig {
                grid_dim: (b.ids.len() as u32, c.div_ceil(threads) as u32, 1),
                block_dim: (threads as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut l = cu.launch_builder(Kernel::EmbeddingBackwardWte);
            l.arg(dwte).arg(dout).arg(&bids).arg(&bstart).arg(&brows).arg(&c32).arg(&vocab32);
            // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
            unsafe { l.launch(cfg) }?;
        }
    }
    if let Some(dwpe) = dwpe {
        check(op, rows, t, c, ("t * c", t * c), Some(("dwpe", dwpe.len())))?;
        if dwpe.len() > t * c {
            cu.memset_zeros(&mut dwpe.slice_mut(t * c..))?;
        }
        let mut l = cu.launch_builder(Kernel::EmbeddingBackwardWpe);
        l.arg(dwpe).arg(dout).arg(&rows32).arg(&t32).arg(&c32);
        // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
        unsafe { l.launch(super::grid_1d(t * c, threads as u32)) }?;
    }
    Ok(())
}

/// `embedding_forward` at positions offset..offset + t (generation after `offset` cached
/// positions): out[r] = wte[ids[r]] + wpe[offset + r % t]. The kernel reads wpe from row `offset`
/// on; nothing else changes.
#[allow(clippy::too_many_arguments)]
pub fn embedding_forward_at(
    out: &mut DevBuf<bf16>,
    ids: &DevBuf<i32>,
    wte: &DevBuf<bf16>,
    wpe: &DevBuf<bf16>,
    offset: usize,
    t: usize,
    c: usize,
) -> Result<()> {
    let op = "cuda::embedding_forward";
    let rows = ids.len();
    check(op, rows, t, c, ("wte", wte.len()), Some(("wpe", wpe.len())))?;
    if wpe.len() < (offset + t) * c || out.len() != rows * c {
        return Err(Error::Shape {
            op,
            msg: format!(
                "wpe has {} elements (need {} x C = {c} for positions {offset}..{}), out {} (need rows * C = {})",
                wpe.len(),
                offset + t,
                offset + t,
                out.len(),
                rows * c
            ),
        });
    }
    if rows == 0 {
        return Ok(());
    }
    let cu = cuda()?;
    let (rows32, t32, c32, vocab32) = (rows as i32, t as i32, c as i32, (wte.len() / c) as i32);
    let cfg = forward_config(rows);
    let wpe_at = wpe.slice(offset * c..);
    let mut l = cu.launch_builder(Kernel::EmbeddingForward);
    l.arg(out).arg(ids).arg(wte).arg(&wpe_at).arg(&rows32).arg(&t32).arg(&c32).arg(&vocab32);
    // SAFETY: the arguments are the kernel's, in its parameter order; wpe_at holds t rows of C (checked above), all the kernel reads from it, and the other lengths are embedding_forward's.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

/// out[r] = wte[ids[r]], copied bit for bit: the token rows alone, for models whose positions
/// enter in the attention (rotary embeddings). The forward kernel with no position table.
pub fn token_embedding_forward(out: &mut DevBuf<bf16>, ids: &DevBuf<i32>, wte: &DevBuf<bf16>, c: usize) -> Result<()> {
    let op = "cuda::token_embedding_forward";
    let rows = ids.len();
    check(op, rows, 1, c, ("wte", wte.len()), None)?;
    if out.len() != rows * c {
        return Err(Error::Shape { op, msg: format!("out has {} elements, need rows * C = {}", out.len(), rows * c) });
    }
    if rows == 0 {
        return Ok(());
    }
    let (rows32, c32, vocab32, one) = (rows as i32, c as i32, (wte.len() / c) as i32, 1i32);
    let null: u64 = 0;
    let mut l = cuda()?.launch_builder(Kernel::EmbeddingForward);
    l.arg(out).arg(ids).arg(wte).arg(&null).arg(&rows32).arg(&one).arg(&c32).arg(&vocab32);
    // SAFETY: the arguments are the kernel's, in its parameter order; a null wpe is never read (the kernel copies token rows), and the other lengths are checked above.
    unsafe { l.launch(forward_config(rows)) }?;
    Ok(())
}

/// One warp per output row, KILN_EMB_WARPS rows per block.
fn forward_config(rows: usize) -> LaunchConfig {
    let warps = KILN_EMB_WARPS as usize;
    LaunchConfig {
        grid_dim: (rows.div_ceil(warps) as u32, 1, 1),
        block_dim: (32 * warps as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The host twins of the embedding kernels (kernels/host/embedding.cu), over f32 host arrays.
pub mod twin {
    use super::Buckets;

    extern "C" {
        pub fn kiln_host_embedding_forward(
            out: *mut f32,
            ids: *const i32,
            wte: *const f32,
            wpe: *const f32,
            rows: i64,
            t: i64,
            c: i64,
            vocab: i64,
        );
        pub fn kiln_host_embedding_backward_wte(
            dwte: *mut f32,
            dout: *const f32,
            bucket_ids: *const i32,
            bucket_start: *const i32,
            bucket_rows: *const i32,
            n_buckets: i64,
            c: i64,
            vocab: i64,
        );
        pub fn kiln_host_embedding_backward_wpe(dwpe: *mut f32, dout: *const f32, rows: i64, t: i64, c: i64);
    }

    /// out[r] = wte[ids[r]] + wpe[r % t]; NaN rows for ids outside the table.
    pub fn embedding_forward(out: &mut [f32], ids: &[i32], wte: &[f32], wpe: &[f32], t: usize, c: usize) {
        let rows = ids.len();
        assert!(t > 0 && c > 0 && out.len() == rows * c && wte.len() % c == 0 && wpe.len() >= t * c);
        // SAFETY: lengths asserted above; the twin reads wte only at valid ids.
        unsafe {
            kiln_host_embedding_forward(
                out.as_mut_ptr(),
                ids.as_ptr(),
                wte.as_ptr(),
                wpe.as_ptr(),
                rows as i64,
                t as i64,
                c as i64,
                (wte.len() / c) as i64,
            )
        }
    }

    /// The device backward replayed: dwte zeroed then filled from `Buckets`, dwpe zeroed then
    /// summed, as `super::embedding_backward` does.
    pub fn embedding_backward(
        dwte: Option<&mut [f32]>,
        dwpe: Option<&mut [f32]>,
        dout: &[f32],
        ids: &[i32],
        t: usize,
        c: usize,
    ) {
        let rows = ids.len();
        assert!(t > 0 && c > 0 && dout.len() == rows * c);
        if let Some(dwte) = dwte {
            assert!(dwte.len() % c == 0);
            let vocab = dwte.len() / c;
            dwte.fill(0.0);
            let b = Buckets::new(ids, vocab);
            // SAFETY: bucket rows are < rows and bucket ids < vocab (Buckets::new filters).
            unsafe {
                kiln_host_embedding_backward_wte(
                    dwte.as_mut_ptr(),
                    dout.as_ptr(),
                    b.ids.as_ptr(),
                    b.start.as_ptr(),
                    b.rows.as_ptr(),
                    b.ids.len() as i64,
                    c as i64,
                    vocab as i64,
                )
            }
        }
        if let Some(dwpe) = dwpe {
            assert!(dwpe.len() >= t * c);
            dwpe.fill(0.0);
            // SAFETY: dwpe has at least t * c elements, dout rows * c.
            unsafe {
                kiln_host_embedding_backward_wpe(dwpe.as_mut_ptr(), dout.as_ptr(), rows as i64, t as i64, c as i64)
            }
        }
    }
}

impl crate::backend::Embedding for super::Cuda {
    fn embedding(&self, ids: &[i32], t: usize, wte: &Tensor, wpe: Option<&Tensor>, offset: usize) -> Result<Tensor> {
        const OP: &str = "embedding";
        let c = wte.shape().last();
        // ids stay on the host too (the op checked them there, and the backward groups them there).
        let ids_d = self.upload(ids)?;
        let wte_d = bf16_in(OP, wte)?;
        let dims = [ids.len() / t.max(1), t, c];
        match wpe {
            Some(wpe) => {
                let wpe_d = bf16_in(OP, wpe)?;
                new_bf16(&dims, |o| embedding_forward_at(o, &ids_d, wte_d, wpe_d, offset, t, c))
            }
            None => new_bf16(&dims, |o| token_embedding_forward(o, &ids_d, wte_d, c)),
        }
    }

    fn embedding_backward(
        &self,
        dout: &Tensor,
        ids: &[i32],
        t: usize,
        [wte_dims, wpe_dims]: [&[usize]; 2],
        needs: [bool; 2],
    ) -> Result<[Option<Tensor>; 2]> {
        // f32 gradients for the f32 master weights (the bf16 cast passes them through).
        let c = wte_dims.last().copied().unwrap_or(1);
        let g = bf16_in("embedding backward", dout)?;
        let mut dwte = needs[0].then(|| self.alloc::<f32>(wte_dims.iter().product())).transpose()?;
        let mut dwpe = needs[1].then(|| self.alloc::<f32>(wpe_dims.iter().product())).transpose()?;
        embedding_backward(dwte.as_mut(), dwpe.as_mut(), g, ids, t, c)?;
        Ok([dwte.map(|d| wrap_f32(d, wte_dims)).transpose()?, dwpe.map(|d| wrap_f32(d, wpe_dims)).transpose()?])
    }
}
