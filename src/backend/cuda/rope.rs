//! Launch wrappers for kernels/rope.cu: rotary embeddings fused with packing q, k and v into the
//! attention's qkv layout (and the backward, unpacking), over bf16 device buffers, with the names
//! and argument order of `backend::cpu::rope`; the device's cos/sin tables; and the host twins
//! (`twin`), which CI tests against the CPU backend without a GPU.

use super::attention::{rope_attention_backward, rope_attention_forward};
use super::tensor::{bf16_in, f32_in, new_bf16, wrap_bf16, wrap_f32};
use super::{bf16, cuda, DevBuf, Kernel, LaunchConfig};
use crate::abi::KILN_ROPE_THREADS;
use crate::backend::cpu::rope::{packed_dims, rope_dims, rope_table};
use crate::backend::{AttnDims, Heads, RopeArgs};
use crate::{Error, Result, Tensor};
use std::sync::{Arc, Mutex};

/// The cos/sin table of one head size and base on the device: [positions, hd] f32, cos of pair i
/// at [p, i] and sin at [p, hd / 2 + i], the CPU's `rope_table` values (so both devices rotate by
/// the same numbers).
pub struct RopeTable {
    pub hd: usize,
    pub theta: f32,
    pub positions: usize,
    pub cs: DevBuf<f32>,
}

/// Tables kept for the process, one per (hd, theta), grown to the longest position asked for:
/// built once per model rather than once per layer and step.
static TABLES: Mutex<Vec<Arc<RopeTable>>> = Mutex::new(Vec::new());

/// The table for (hd, theta) covering positions 0..positions (at least; grown in powers of two
/// so that generation, one position at a time, rebuilds it O(log n) times).
pub fn table(hd: usize, theta: f32, positions: usize) -> Result<Arc<RopeTable>> {
    let mut tables = TABLES.lock().unwrap_or_else(|e| e.into_inner());
    let same = |t: &RopeTable| t.hd == hd && t.theta.to_bits() == theta.to_bits();
    if let Some(t) = tables.iter().find(|t| same(t) && t.positions >= positions) {
        return Ok(t.clone());
    }
    let n = positions.next_power_of_two().max(256);
    let t = Arc::new(RopeTable { hd, theta, positions: n, cs: cuda()?.upload(&host_table(hd, theta, n))? });
    tables.retain(|t| !same(t));
    tables.push(t.clone());
    Ok(t)
}

/// The table's contents for positions 0..n: per position the CPU's cos of each pair, then its sin.
pub fn host_table(hd: usize, theta: f32, n: usize) -> Vec<f32> {
    let (cos, sin) = rope_table(n, hd, theta, 0);
    let h2 = hd / 2;
    let mut cs = Vec::with_capacity(n * hd);
    for p in 0..n {
        cs.extend_from_slice(&cos[p * h2..(p + 1) * h2]);
        cs.extend_from_slice(&sin[p * h2..(p + 1) * h2]);
    }
    cs
}

/// Checks the buffers of one pack or unpack: rows = packed.len() / ((nh + 2 nkv) hd).
fn check(
    op: &'static str,
    packed: usize,
    parts: [usize; 3],
    cs: &RopeTable,
    t: usize,
    offset: usize,
    heads: Heads,
) -> Result<usize> {
    let hd = cs.hd;
    if !heads.is_valid() || hd == 0 || hd % 2 != 0 {
        return Err(Error::shape(op, format!("{heads:?} with head size {hd}: need a grouping and an even head size")));
    }
    let w = heads.packed() * hd;
    let rows = packed / w;
    let want = [rows * heads.n_head * hd, rows * heads.n_kv_head * hd, rows * heads.n_kv_head * hd];
    if packed != rows * w || parts != want || t == 0 || rows % t != 0 {
        return Err(Error::shape(
            op,
            format!("qkv {packed}, q/k/v {parts:?} elements do not make rows of T = {t} for {heads:?}, hd = {hd}"),
        ));
    }
    if offset + t > cs.positions {
        return Err(Error::shape(op, format!("positions up to {} but the table has {}", offset + t, cs.positions)));
    }
    if rows > i32::MAX as usize || (offset + t) * hd > i32::MAX as usize {
        return Err(Error::shape(
            op,
            format!("{rows} rows at positions up to {}: the kernels index with i32", offset + t),
        ));
    }
    Ok(rows)
}

fn row_config(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (KILN_ROPE_THREADS as u32, 1, 1), shared_mem_bytes: 0 }
}

/// qkv [rows, (nh + 2 nkv) hd] from q [rows, nh hd], k and v [rows, nkv hd]: q and k rotated by
/// the angles of positions offset + row % t, v copied.
#[allow(clippy::too_many_arguments)]
pub fn rope_pack(
    qkv: &mut DevBuf<bf16>,
    q: &DevBuf<bf16>,
    k: &DevBuf<bf16>,
    v: &DevBuf<bf16>,
    cs: &RopeTable,
    t: usize,
    offset: usize,
    heads: Heads,
) -> Result<()> {
    let rows = check("cuda::rope_pack", qkv.len(), [q.len(), k.len(), v.len()], cs, t, offset, heads)?;
    launch(Kernel::RopePack, [&*qkv, q, k, v], rows, cs, t, offset, heads)
}

/// dq, dk (rotated back) and dv (copied) from dqkv; the backward of `rope_pack`.
#[allow(clippy::too_many_arguments)]
pub fn rope_unpack(
    dq: &mut DevBuf<bf16>,
    dk: &mut DevBuf<bf16>,
    dv: &mut DevBuf<bf16>,
    dqkv: &DevBuf<bf16>,
    cs: &RopeTable,
    t: usize,
    offset: usize,
    heads: Heads,
) -> Result<()> {
    let rows = check("cuda::rope_unpack", dqkv.len(), [dq.len(), dk.len(), dv.len()], cs, t, offset, heads)?;
    launch(Kernel::RopeUnpack, [&*dq, &*dk, &*dv, dqkv], rows, cs, t, offset, heads)
}

/// Launches rope_pack or rope_unpack, whose parameters are four bf16 buffers (those of
/// `rope_pack` or `rope_unpack`, in order) and then the same table and sizes; `check` has
/// measured every buffer against `rows`.
fn launch(
    kernel: Kernel,
    bufs: [&DevBuf<bf16>; 4],
    rows: usize,
    cs: &RopeTable,
    t: usize,
    offset: usize,
    heads: Heads,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let i = |x: usize| x as i32;
    let (t32, off32, hd32, nh32, nkv32) = (i(t), i(offset), i(cs.hd), i(heads.n_head), i(heads.n_kv_head));
    let mut l = cuda()?.launch_builder(kernel);
    for b in bufs {
        l.arg(b);
    }
    l.arg(&cs.cs).arg(&t32).arg(&off32).arg(&hd32).arg(&nh32).arg(&nkv32);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked by the caller are the ones it indexes up to at this launch configuration.
    unsafe { l.launch(row_config(rows)) }?;
    Ok(())
}

/// The host twins of kernels/rope.cuh (kernels/host/rope.cu), over f32 host arrays and a table
/// laid out as the device's ([positions, hd]: cos, then sin).
pub mod twin {
    use crate::backend::Heads;

    extern "C" {
        fn kiln_host_rope_pack(
            qkv: *mut f32,
            q: *const f32,
            k: *const f32,
            v: *const f32,
            cs: *const f32,
            rows: i64,
            t: i64,
            offset: i64,
            hd: i64,
            nh: i64,
            nkv: i64,
        );
        fn kiln_host_rope_unpack(
            dq: *mut f32,
            dk: *mut f32,
            dv: *mut f32,
            dqkv: *const f32,
            cs: *const f32,
            rows: i64,
            t: i64,
            offset: i64,
            hd: i64,
            nh: i64,
            nkv: i64,
        );
    }

    fn rows_of(
        packed: usize,
        parts: [usize; 3],
        cs: &[f32],
        t: usize,
        offset: usize,
        hd: usize,
        heads: Heads,
    ) -> usize {
        let w = heads.packed() * hd;
        let rows = packed / w;
        assert!(packed == rows * w && rows % t == 0);
        assert!(parts == [rows * heads.n_head * hd, rows * heads.n_kv_head * hd, rows * heads.n_kv_head * hd]);
        assert!(cs.len() >= (offset + t) * hd);
        rows
    }

    #[allow(clippy::too_many_arguments)]
    pub fn rope_pack(
        qkv: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        cs: &[f32],
        t: usize,
        offset: usize,
        hd: usize,
        heads: Heads,
    ) {
        let rows = rows_of(qkv.len(), [q.len(), k.len(), v.len()], cs, t, offset, hd, heads);
        let n = |x: usize| x as i64;
        // SAFETY: every array has the length the twin reads or writes (asserted in rows_of).
        unsafe {
            kiln_host_rope_pack(
                qkv.as_mut_ptr(),
                q.as_ptr(),
                k.as_ptr(),
                v.as_ptr(),
                cs.as_ptr(),
                n(rows),
                n(t),
                n(offset),
                n(hd),
                n(heads.n_head),
                n(heads.n_kv_head),
            )
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn rope_unpack(
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        dqkv: &[f32],
        cs: &[f32],
        t: usize,
        offset: usize,
        hd: usize,
        heads: Heads,
    ) {
        let rows = rows_of(dqkv.len(), [dq.len(), dk.len(), dv.len()], cs, t, offset, hd, heads);
        let n = |x: usize| x as i64;
        // SAFETY: every array has the length the twin reads or writes (asserted in rows_of).
        unsafe {
            kiln_host_rope_unpack(
                dq.as_mut_ptr(),
                dk.as_mut_ptr(),
                dv.as_mut_ptr(),
                dqkv.as_ptr(),
                cs.as_ptr(),
                n(rows),
                n(t),
                n(offset),
                n(hd),
                n(heads.n_head),
                n(heads.n_kv_head),
            )
        }
    }
}

impl crate::backend::Rope for super::Cuda {
    fn rope_pack(&self, q: &Tensor, k: &Tensor, v: &Tensor, args: &RopeArgs) -> Result<Tensor> {
        const OP: &str = "rope";
        let (b, t, hd) = rope_dims(OP, q, k, v, args.heads)?;
        let (qd, kd, vd) = (bf16_in(OP, q)?, bf16_in(OP, k)?, bf16_in(OP, v)?);
        let cs = table(hd, args.theta, args.offset + t)?;
        new_bf16(&[b, t, args.heads.packed() * hd], |o| rope_pack(o, qd, kd, vd, &cs, t, args.offset, args.heads))
    }

    fn rope_unpack(&self, dqkv: &Tensor, args: &RopeArgs) -> Result<[Tensor; 3]> {
        const OP: &str = "rope backward";
        let heads = args.heads;
        let (b, t, hd) = packed_dims(OP, dqkv, heads)?;
        let (c, ckv) = (heads.n_head * hd, heads.n_kv_head * hd);
        let g = bf16_in(OP, dqkv)?;
        let cs = table(hd, args.theta, args.offset + t)?;
        let (mut dq, mut dk, mut dv) =
            (self.alloc::<bf16>(b * t * c)?, self.alloc::<bf16>(b * t * ckv)?, self.alloc::<bf16>(b * t * ckv)?);
        rope_unpack(&mut dq, &mut dk, &mut dv, g, &cs, t, args.offset, heads)?;
        Ok([wrap_bf16(dq, &[b, t, c])?, wrap_bf16(dk, &[b, t, ckv])?, wrap_bf16(dv, &[b, t, ckv])?])
    }

    /// The attention kernels rotate q and k as they load them (kernels/attention.cu, "RoPE on
    /// load"): no packed copy is made. Positions start at 0 there; another offset packs first.
    fn rope_attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, args: &RopeArgs) -> Result<(Tensor, Tensor)> {
        const OP: &str = "attention";
        if args.offset != 0 {
            return crate::backend::pack_then_attend(self, q, k, v, args);
        }
        let (b, t, hd) = rope_dims(OP, q, k, v, args.heads)?;
        let (nh, nkv) = (args.heads.n_head, args.heads.n_kv_head);
        let (qd, kd, vd) = (bf16_in(OP, q)?, bf16_in(OP, k)?, bf16_in(OP, v)?);
        let cs = table(hd, args.theta, t)?;
        let mut lse = self.alloc::<f32>(b * nh * t)?;
        let d = AttnDims { b, t, c: nh * hd, nh };
        let out = new_bf16(&[b, t, nh * hd], |o| rope_attention_forward(o, &mut lse, qd, kd, vd, &cs.cs, &d, nkv))?;
        Ok((out, wrap_f32(lse, &[b, nh, t])?))
    }

    fn rope_attention_backward(
        &self,
        dout: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        args: &RopeArgs,
    ) -> Result<[Tensor; 3]> {
        const OP: &str = "attention backward";
        if args.offset != 0 {
            return crate::backend::pack_then_attend_backward(self, dout, [q, k, v], out, lse, args);
        }
        let (b, t, hd) = rope_dims(OP, q, k, v, args.heads)?;
        let (nh, nkv) = (args.heads.n_head, args.heads.n_kv_head);
        let (c, ckv) = (nh * hd, nkv * hd);
        let (qd, kd, vd) = (bf16_in(OP, q)?, bf16_in(OP, k)?, bf16_in(OP, v)?);
        let (g, o, l) = (bf16_in(OP, dout)?, bf16_in(OP, out)?, f32_in(OP, lse)?);
        let cs = table(hd, args.theta, t)?;
        let (mut dq, mut dk, mut dv) =
            (self.alloc::<bf16>(b * t * c)?, self.alloc::<bf16>(b * t * ckv)?, self.alloc::<bf16>(b * t * ckv)?);
        let d = AttnDims { b, t, c, nh };
        rope_attention_backward([&mut dq, &mut dk, &mut dv], g, [qd, kd, vd], &cs.cs, o, l, &d, nkv)?;
        Ok([wrap_bf16(dq, &[b, t, c])?, wrap_bf16(dk, &[b, t, ckv])?, wrap_bf16(dv, &[b, t, ckv])?])
    }
}
