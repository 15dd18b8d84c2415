//! Launch wrapper for kernels/adamw8bit.cu: bitsandbytes' 8-bit AdamW over every trainable
//! tensor in one launch, bit-identical to `backend::cpu::adamw8bit`; the host twin (`twin`) that
//! CI tests without a GPU; the `kiln bench kernels` row.

use super::{cuda, DevBuf, Kernel};
use crate::abi::{Adam8Tensor, AdamWScalars, KILN_ADAM8_BLOCK, KILN_ADAM8_TABLES};
use crate::backend::cpu::adamw8bit::maps;
use crate::backend::{Adam8State, AdamW8bitSlot};
use crate::quant::blockwise::midpoints;
use crate::{Error, Result};
use std::sync::OnceLock;

/// A tensor's moments as the kernel takes them.
pub enum Adam8Moments<'a> {
    /// m and v in f32.
    F32 { m: &'a mut DevBuf<f32>, v: &'a mut DevBuf<f32> },
    /// Codes and per-block absmax of m (signed map) and v (unsigned map).
    Q8 {
        state1: &'a mut DevBuf<u8>,
        absmax1: &'a mut DevBuf<f32>,
        state2: &'a mut DevBuf<u8>,
        absmax2: &'a mut DevBuf<f32>,
    },
}

/// One parameter tensor of the step: f32 weights and gradient of equal length, and its moments.
pub struct Adam8Param<'a> {
    pub p: &'a mut DevBuf<f32>,
    pub g: &'a DevBuf<f32>,
    pub moments: Adam8Moments<'a>,
    /// Whether weight decay applies.
    pub decay: bool,
}

/// The kernel's table on the device (KILN_ADAM8_TABLES floats: `host_tables`), uploaded once per
/// process.
fn tables() -> Result<&'static DevBuf<f32>> {
    static TABLES: OnceLock<DevBuf<f32>> = OnceLock::new();
    if let Some(t) = TABLES.get() {
        return Ok(t);
    }
    let t = cuda()?.upload(&host_tables())?;
    Ok(TABLES.get_or_init(|| t))
}

/// The signed map (m's), the unsigned map (v's), then each map's 255 midpoints padded to 256
/// (with +inf, never read): what kernels/adamw8bit.cuh dequantizes and requantizes with.
pub fn host_tables() -> Vec<f32> {
    let maps = maps();
    let mut t = Vec::with_capacity(KILN_ADAM8_TABLES as usize);
    t.extend_from_slice(maps.m.map());
    t.extend_from_slice(maps.v.map());
    for map in [maps.m.map(), maps.v.map()] {
        assert_eq!(map.len(), 256, "bitsandbytes' dynamic maps have 256 entries");
        t.extend(midpoints(map));
        t.push(f32::INFINITY);
    }
    t
}

/// Sets each descriptor's `block_start` and returns the launch's work items (blocks of 256).
pub fn plan(descs: &mut [Adam8Tensor]) -> i64 {
    let mut start = 0i64;
    for d in descs.iter_mut() {
        d.block_start = start;
        start += (d.n.max(0) as usize).div_ceil(KILN_ADAM8_BLOCK as usize) as i64;
    }
    start
}

/// The descriptor of one parameter, after checking every length against p's.
fn describe(i: usize, q: &mut Adam8Param) -> Result<Adam8Tensor> {
    let n = q.p.len();
    let nb = n.div_ceil(KILN_ADAM8_BLOCK as usize);
    let (s1, s2, a1, a2, lens) = match &mut q.moments {
        Adam8Moments::F32 { m, v } => (m.ptr(), v.ptr(), 0, 0, vec![("m", m.len(), n), ("v", v.len(), n)]),
        Adam8Moments::Q8 { state1, absmax1, state2, absmax2 } => (
            state1.ptr(),
            state2.ptr(),
            absmax1.ptr(),
            absmax2.ptr(),
            vec![
                ("state1", state1.len(), n),
                ("state2", state2.len(), n),
                ("absmax1", absmax1.len(), nb),
                ("absmax2", absmax2.len(), nb),
            ],
        ),
    };
    for (name, len, want) in lens.into_iter().chain([("g", q.g.len(), n)]) {
        if len != want {
            return Err(Error::shape(
                "cuda::adamw8bit_step",
                format!("tensor {i}: {name} has {len} elements but a parameter of {n} needs {want}"),
            ));
        }
    }
    Ok(Adam8Tensor {
        p: q.p.ptr(),
        g: q.g.ptr(),
        state1: s1,
        state2: s2,
        absmax1: a1,
        absmax2: a2,
        n: n as i64,
        block_start: 0,
        decay: q.decay as i32,
        reserved: 0,
    })
}

/// One 8-bit AdamW step of every tensor of `params` in one launch. `s` holds the step's scalars
/// with weight decay (`AdamWScalars::new(.., true)`); a tensor whose `decay` is false skips it.
pub fn adamw8bit_step_multi(params: &mut [Adam8Param], s: &AdamWScalars) -> Result<()> {
    let mut descs = params.iter_mut().enumerate().map(|(i, q)| describe(i, q)).collect::<Result<Vec<_>>>()?;
    let work_items = plan(&mut descs);
    if work_items == 0 {
        return Ok(());
    }
    let cu = cuda()?;
    let tables = tables()?;
    let table = cu.upload(&descs)?;
    // Enough blocks of 256 to fill every SM several times; the grid-stride loop covers the rest.
    let cfg = super::grid_stride(cu, work_items as usize, 1, KILN_ADAM8_BLOCK as u32, 8);
    let n_tensors = descs.len() as i32;
    let mut b = cu.launch_builder(Kernel::Adamw8bitStep);
    b.arg(&table).arg(&n_tensors).arg(&work_items).arg(tables).arg(s);
    // SAFETY: the table describes live buffers whose lengths `describe` checked (p, g, state of n
    // elements, absmax of ceil(n / 256)); work_items counts their blocks (plan); `tables` holds the
    // KILN_ADAM8_TABLES floats the kernel copies.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// kernels/adamw8bit.cuh compiled for the host (kernels/host/adamw8bit.cu).
pub mod twin {
    use crate::abi::{Adam8Tensor, AdamWScalars};

    extern "C" {
        fn kiln_host_adamw8bit_step(
            tensors: *const Adam8Tensor,
            n_tensors: i32,
            work_items: i64,
            tables: *const f32,
            s: AdamWScalars,
        );
        fn kiln_host_adam8_grid_code(q: u32, mids: *const f32) -> u8;
    }

    /// The kernel simulated on the host over descriptors planned by `super::plan`.
    ///
    /// # Safety
    /// The descriptors' addresses must point at live host memory of their lengths (as
    /// `super::describe` checks for device buffers), no two tensors sharing memory.
    pub unsafe fn adamw8bit_step(descs: &[Adam8Tensor], work_items: i64, s: AdamWScalars) {
        let tables = super::host_tables();
        kiln_host_adamw8bit_step(descs.as_ptr(), descs.len() as i32, work_items, tables.as_ptr(), s)
    }

    /// The kernel's code of grid point q (< 65536) for the first moment's map (`signed`) or the
    /// second's: what CodeLut's table holds at q.
    pub fn grid_code(q: u32, signed: bool) -> u8 {
        let tables = super::host_tables();
        let mids = &tables[if signed { 512 } else { 768 }..];
        assert!(q < 65536);
        // SAFETY: mids holds 256 floats, of which the search reads indices below 255.
        unsafe { kiln_host_adam8_grid_code(q, mids.as_ptr()) }
    }
}

/// `kiln bench kernels` row: one 8-bit step over GPT-2 124M's matrices (~124M elements), GB/s
/// counting p, g and the codes read, p and the codes written (the absmax add 1/32 more), against
/// device-to-device copy.
pub fn bench(cu: &super::Cuda, copy: f64) -> Result<Vec<super::bench::Row>> {
    use super::bench::{random_f32, time_ms, Row};
    let (c, l, vocab, ctx) = (768usize, 12usize, 50257usize, 1024usize);
    let mut shapes = vec![vocab * c, ctx * c];
    for _ in 0..l {
        shapes.extend([c * 3 * c, c * c, c * 4 * c, 4 * c * c]);
    }
    let mut bufs = Vec::with_capacity(shapes.len());
    for (i, &n) in shapes.iter().enumerate() {
        let nb = n.div_ceil(KILN_ADAM8_BLOCK as usize);
        let g = random_f32(cu, n, 2 * i as u64 + 1)?;
        bufs.push((
            random_f32(cu, n, 2 * i as u64)?,
            g,
            cu.zeros::<u8>(n)?,
            cu.zeros(nb)?,
            cu.zeros::<u8>(n)?,
            cu.zeros(nb)?,
        ));
    }
    let total: usize = shapes.iter().sum();
    let bytes = total as f64 * (4.0 + 4.0 + 2.0 + 4.0 + 2.0);
    let s = super::adamw::typical_scalars();
    let ms = time_ms(cu, 3, 20, || {
        let mut params: Vec<Adam8Param> = bufs
            .iter_mut()
            .map(|(p, g, state1, absmax1, state2, absmax2)| Adam8Param {
                p,
                g,
                moments: Adam8Moments::Q8 { state1, absmax1, state2, absmax2 },
                decay: true,
            })
            .collect();
        adamw8bit_step_multi(&mut params, &s)
    })?;
    Ok(vec![Row {
        kernel: "adamw8bit_step".to_string(),
        shape: format!("GPT-2 124M matrices, {} tensors, {:.1}M", shapes.len(), total as f64 / 1e6),
        ms,
        achieved: bytes / (ms * 1e-3) / 1e9,
        unit: "GB/s",
        ceiling: copy,
        ceiling_name: "d2d copy".to_string(),
        target: Some(0.85),
    }])
}

/// The Optim backend's 8-bit step: the slots' tensors as the kernel's buffers.
pub(crate) fn step_slots(slots: &mut [AdamW8bitSlot], s: &AdamWScalars) -> Result<()> {
    use super::tensor::f32_in;
    let mut work = Vec::with_capacity(slots.len());
    for slot in slots.iter_mut() {
        let g = f32_in("adamw8bit", slot.g)?;
        let p = f32_mut(slot.p, "parameter")?;
        let moments = match &mut slot.state {
            Adam8State::F32 { m, v } => {
                Adam8Moments::F32 { m: f32_mut(m, "first moment")?, v: f32_mut(v, "second moment")? }
            }
            Adam8State::Q8 { state1, absmax1, state2, absmax2 } => Adam8Moments::Q8 {
                state1: u8_mut(state1, "first moment's codes")?,
                absmax1: f32_mut(absmax1, "first moment's absmax")?,
                state2: u8_mut(state2, "second moment's codes")?,
                absmax2: f32_mut(absmax2, "second moment's absmax")?,
            },
        };
        work.push(Adam8Param { p, g, moments, decay: slot.decay });
    }
    adamw8bit_step_multi(&mut work, s)
}

pub(crate) fn f32_mut<'a>(t: &'a mut crate::Tensor, what: &str) -> Result<&'a mut DevBuf<f32>> {
    match t.cuda_storage_mut() {
        Some(super::CudaStorage::F32(d)) => Ok(d),
        _ => Err(Error::Input(format!("the optimizer's {what} is not an f32 tensor on the GPU"))),
    }
}

fn u8_mut<'a>(t: &'a mut crate::Tensor, what: &str) -> Result<&'a mut DevBuf<u8>> {
    match t.cuda_storage_mut() {
        Some(super::CudaStorage::U8(d)) => Ok(d),
        _ => Err(Error::Input(format!("the optimizer's {what} is not a u8 tensor on the GPU"))),
    }
}
