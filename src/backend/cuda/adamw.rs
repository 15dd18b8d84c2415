//! Launch wrappers for kernels/adamw.cu: fp32 AdamW over every parameter tensor in one launch,
//! bit-identical to `optim::adamw::adamw_step`; plus the host twins (`twin`) that CI tests
//! without a GPU.

use super::{bf16, cuda, DevBuf, Kernel};
use crate::abi::{AdamWScalars, AdamWTensor, KILN_ADAMW_BLOCK, KILN_ADAMW_CHUNK};
use crate::{Error, Result};

/// One parameter tensor of a multi-tensor step: f32 master weights, moments and gradient of equal
/// length, and optionally the bf16 copy of the weights that the forward reads, refreshed in the
/// same pass.
pub struct AdamWParam<'a> {
    pub p: &'a mut DevBuf<f32>,
    pub m: &'a mut DevBuf<f32>,
    pub v: &'a mut DevBuf<f32>,
    pub g: &'a DevBuf<f32>,
    pub p_bf16: Option<&'a mut DevBuf<bf16>>,
    /// Whether weight decay applies (GPT-2 practice: matrices yes, biases and norms no).
    pub decay: bool,
}

/// Sets each descriptor's `chunk_start` (the chunks of the tensors before it) and returns the
/// launch's work items, the total number of chunks.
pub fn plan(descs: &mut [AdamWTensor]) -> i64 {
    let mut start = 0i64;
    for d in descs.iter_mut() {
        d.chunk_start = start;
        start += (d.n.max(0) as usize).div_ceil(KILN_ADAMW_CHUNK as usize) as i64;
    }
    start
}

/// Scalars of a typical step (torch's defaults, lr 1e-4, step 10) for benchmarks and the traffic
/// table, where the values do not matter.
pub fn typical_scalars() -> AdamWScalars {
    let (lr, b1, b2, t) = (1e-4f64, 0.9f64, 0.999f64, 10);
    AdamWScalars {
        decay: (1.0 - lr * 0.01) as f32,
        beta1: b1 as f32,
        one_minus_beta1: (1.0 - b1) as f32,
        beta2: b2 as f32,
        one_minus_beta2: (1.0 - b2) as f32,
        step_size: (lr / (1.0 - b1.powi(t))) as f32,
        bc2_sqrt: (1.0 - b2.powi(t)).sqrt() as f32,
        eps: 1e-8,
    }
}

/// One AdamW update of one buffer with the step's scalars `s` (optim::adamw builds them with
/// `AdamWScalars::new(config, lr, t, decay)`, weight decay folded into `s.decay`): the bits of
/// optim::adamw::adamw_step.
pub fn adamw_step(
    p: &mut DevBuf<f32>,
    m: &mut DevBuf<f32>,
    v: &mut DevBuf<f32>,
    g: &DevBuf<f32>,
    s: &AdamWScalars,
) -> Result<()> {
    // s.decay is already 1 for a buffer without weight decay, so the tensor's flag can stay set.
    adamw_step_multi(&mut [AdamWParam { p, m, v, g, p_bf16: None, decay: true }], s)
}

/// One AdamW step of every tensor of `params` in one launch (the bias correction is the same for
/// all). `s` holds the step's scalars with weight decay (`AdamWScalars::new(.., true)`); a tensor
/// whose `decay` is false skips it.
pub fn adamw_step_multi(params: &mut [AdamWParam], s: &AdamWScalars) -> Result<()> {
    if params.is_empty() {
        return Ok(());
    }
    let cu = cuda()?;
    let mut descs = Vec::with_capacity(params.len());
    for (i, q) in params.iter_mut().enumerate() {
        let n = q.p.len();
        let lens = [("m", q.m.len()), ("v", q.v.len()), ("g", q.g.len())];
        let bf = q.p_bf16.as_ref().map(|b| ("p_bf16", b.len()));
        for (name, len) in lens.into_iter().chain(bf) {
            if len != n {
                return Err(Error::Shape {
                    op: "cuda::adamw_step",
                    msg: format!("tensor {i}: {name} has {len} elements but the parameter has {n}"),
                });
            }
        }
        let (p, m, v, g) = (q.p.ptr(), q.m.ptr(), q.v.ptr(), q.g.ptr());
        let p_bf16 = q.p_bf16.as_ref().map_or(0, |b| b.ptr());
        descs.push(AdamWTensor { p, m, v, g, p_bf16, n: n as i64, chunk_start: 0, decay: q.decay as i32, reserved: 0 });
    }
    let work_items = plan(&mut descs);
    if work_items > 0 {
        let table = cu.upload(&descs)?;
        let s = *s;
        // SAFETY: the table was built above from live buffers of n elements each, and work_items counts its chunks (plan).
        unsafe { adamw_step_table(&table, work_items, s) }?;
    }
    Ok(())
}

/// Launches the kernel on an uploaded descriptor table (planned by `plan`), for callers that keep
/// one table across steps. `s` is the step's scalars with decay; tensors whose descriptor clears
/// `decay` get none.
///
/// # Safety
/// Every address in the table must point at live device memory of the descriptor's length
/// (f32 for p, m, v, g; bf16 for a non-zero p_bf16), no two tensors may share memory, and nothing
/// else may use these buffers while the kernel runs.
pub unsafe fn adamw_step_table(table: &DevBuf<AdamWTensor>, work_items: i64, s: AdamWScalars) -> Result<()> {
    let cu = cuda()?;
    // 3 blocks of 256 fit an SM at ~80 registers a thread; 4 per SM keeps every SM busy while
    // the grid-stride loop covers the rest.
    let cfg = super::grid_stride(cu, work_items as usize, 1, KILN_ADAMW_BLOCK as u32, 4);
    let n_tensors = table.len() as i32;
    let mut b = cu.launch_builder(Kernel::AdamwStep);
    b.arg(table).arg(&n_tensors).arg(&work_items).arg(&s);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// kernels/adamw.cuh compiled for the host (kernels/host/adamw.cu).
pub mod twin {
    use crate::abi::{AdamWScalars, AdamWTensor};

    extern "C" {
        pub fn kiln_host_adamw_update(
            p: *mut f32,
            m: *mut f32,
            v: *mut f32,
            g: *const f32,
            s: *const AdamWScalars,
            n: i64,
        );
        pub fn kiln_host_adamw_step(tensors: *const AdamWTensor, n_tensors: i32, work_items: i64, s: AdamWScalars);
    }

    /// kiln_adamw_update on every element.
    pub fn adamw_update(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: &AdamWScalars) {
        let n = p.len();
        assert!(m.len() == n && v.len() == n && g.len() == n, "adamw twin: lengths differ");
        // SAFETY: every slice holds the element count passed (asserted above); the twin touches exactly those elements.
        unsafe { kiln_host_adamw_update(p.as_mut_ptr(), m.as_mut_ptr(), v.as_mut_ptr(), g.as_ptr(), s, n as i64) }
    }

    /// The kernel simulated on the host, every work item and thread in turn, over descriptors
    /// planned by `super::plan`.
    ///
    /// # Safety
    /// The descriptors' addresses must point at live host memory of their lengths, no two
    /// tensors sharing memory.
    pub unsafe fn adamw_step(descs: &[AdamWTensor], work_items: i64, s: AdamWScalars) {
        kiln_host_adamw_step(descs.as_ptr(), descs.len() as i32, work_items, s)
    }
}

/// `kiln bench kernels` row: one step over GPT-2 124M's parameter tensors (~124M f32 elements, bf16
/// copies of the matrices), GB/s counting p, m, v, g read and p, m, v (and the copy) written once,
/// against device-to-device copy. The descriptor upload is inside the timing, as in training.
pub fn bench(cu: &super::Cuda, copy: f64) -> Result<Vec<super::bench::Row>> {
    use super::bench::{random_f32, time_ms, Row};
    let (c, l, vocab, ctx) = (768usize, 12usize, 50257usize, 1024usize);
    // (elements, is a matrix): wte, wpe, then per layer ln_1, attn (c_attn, c_proj), ln_2, mlp, then ln_f.
    let mut shapes = vec![(vocab * c, true), (ctx * c, true)];
    for _ in 0..l {
        shapes.extend([(c, false), (c, false), (c * 3 * c, true), (3 * c, false), (c * c, true), (c, false)]);
        shapes.extend([(c, false), (c, false), (c * 4 * c, true), (4 * c, false), (4 * c * c, true), (c, false)]);
    }
    shapes.extend([(c, false), (c, false)]);
    let mut bufs = Vec::with_capacity(shapes.len());
    for (i, &(n, matrix)) in shapes.iter().enumerate() {
        let s = 4 * i as u64;
        // v is a second moment: non-negative, ~g^2 (1 - beta2) in size.
        let v: Vec<f32> = cu.download(&random_f32(cu, n, s + 2)?)?.iter().map(|x| x.abs() * 1e-4).collect();
        let copy = if matrix { Some(cu.alloc::<bf16>(n)?) } else { None };
        bufs.push((
            random_f32(cu, n, s)?,
            random_f32(cu, n, s + 1)?,
            cu.upload(&v)?,
            random_f32(cu, n, s + 3)?,
            copy,
            matrix,
        ));
    }
    let total: usize = shapes.iter().map(|s| s.0).sum();
    let bytes: usize = shapes.iter().map(|&(n, m)| n * (28 + if m { 2 } else { 0 })).sum();
    let s = typical_scalars();
    let ms = time_ms(cu, 3, 20, || {
        let mut params: Vec<AdamWParam> = bufs
            .iter_mut()
            .map(|(p, m, v, g, c, decay)| AdamWParam { p, m, v, g, p_bf16: c.as_mut(), decay: *decay })
            .collect();
        adamw_step_multi(&mut params, &s)
    })?;
    Ok(vec![Row {
        kernel: "adamw_step".to_string(),
        shape: format!("GPT-2 124M, {} tensors, {:.1}M", shapes.len(), total as f64 / 1e6),
        ms,
        achieved: bytes as f64 / (ms * 1e-3) / 1e9,
        unit: "GB/s",
        ceiling: copy,
        ceiling_name: "d2d copy".to_string(),
        target: Some(0.7),
    }])
}

impl crate::backend::Optim for super::Cuda {
    fn adamw(&self, slots: &mut [crate::backend::AdamWSlot], s: &AdamWScalars) -> Result<()> {
        let mut work = Vec::with_capacity(slots.len());
        for slot in slots.iter_mut() {
            let g = super::tensor::f32_in("adamw", slot.g)?;
            let (p, m, v) =
                (f32_mut(slot.p, "parameter")?, f32_mut(slot.m, "first moment")?, f32_mut(slot.v, "second moment")?);
            work.push(AdamWParam { p, m, v, g, p_bf16: None, decay: slot.decay });
        }
        adamw_step_multi(&mut work, s)
    }
    fn adamw8bit(&self, slots: &mut [crate::backend::AdamW8bitSlot], s: &AdamWScalars) -> Result<()> {
        super::adamw8bit::step_slots(slots, s)
    }
}

use super::adamw8bit::f32_mut;
