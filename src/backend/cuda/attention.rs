//! Launch wrappers for kernels/attention.cu: causal flash attention over GPT-2's packed qkv, with
//! the names and argument order of `backend::cpu::attention`; plus the host twins (`twin`) of the
//! kernels' softmax math, which CI tests without a GPU.
//!
//! Layout as on the CPU: qkv and dqkv [B, T, C + 2 Ckv] (GPT-2's [B, T, 3C]; Ckv = n_kv_head hd
//! with grouped-query heads, the `gqa_` functions), out and dout [B, T, C], lse [B, NH, T].
//! Activations and their gradients are bf16 (dqkv too: every element is written once, as the CPU
//! twin's copy does, never accumulated); lse is f32. The forward has two variants
//! (`AttentionVariant`): tensor cores (mma.sync) at head dims 64 and 128 on sm_80+, CUDA cores
//! otherwise. The backward is deterministic (no atomics), on tensor cores (attention_backward_dkdv_mma
//! and _dq_mma) where the Mma variant applies and its tiles fit, on CUDA cores otherwise.

use super::tensor::{bf16_in, f32_in, new_bf16, wrap_f32, CudaStorage};
use super::{bf16, cuda, DevBuf, Kernel, LaunchConfig};
use crate::abi::{
    KILN_ATTN_KERNEL_DKDV, KILN_ATTN_KERNEL_DKDV_MMA, KILN_ATTN_KERNEL_DQ, KILN_ATTN_KERNEL_DQ_MMA,
    KILN_ATTN_KERNEL_FORWARD, KILN_ATTN_KERNEL_FORWARD_MMA, KILN_ATTN_MAX_HEAD_DIM, KILN_ATTN_MMA_HEAD_DIM,
    KILN_ATTN_MMA_ROWS, KILN_ATTN_TILE, KILN_ATTN_WARPS,
};
use crate::backend::{qkv_dims, AttnDims, Heads, KvDims};
use crate::{Error, Result, Tensor};

/// Shared memory a block gets without opting in.
const DEFAULT_SHARED: usize = 48 * 1024;

/// Checks the sizes and alignment the kernels rely on and returns the head dim. `bufs`: (name,
/// elements, elements expected, device address).
#[allow(clippy::too_many_arguments)]
fn check(
    op: &'static str,
    bufs: &[(&str, usize, usize, u64)],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    nkv: usize,
) -> Result<usize> {
    let shape = |msg: String| Err(Error::Shape { op, msg });
    if nh == 0 || c % nh != 0 {
        return shape(format!("C = {c} must be a multiple of n_head = {nh}"));
    }
    if nkv == 0 || nh % nkv != 0 {
        return shape(format!("n_kv_head = {nkv} must divide n_head = {nh}"));
    }
    let hd = c / nh;
    let max = KILN_ATTN_MAX_HEAD_DIM as usize;
    if hd == 0 || hd % 8 != 0 || hd > max {
        return shape(format!(
            "head dim C / n_head = {hd} is not supported by the CUDA kernels: it must be a multiple of 8 \
             between 8 and {max} (GPT-2 uses 64)"
        ));
    }
    if nh > 65535 || b > 65535 {
        return shape(format!("n_head = {nh} and B = {b} must each be at most 65535 (CUDA grid limits)"));
    }
    if 3 * c > i32::MAX as usize || t > i32::MAX as usize || b.saturating_mul(t).saturating_mul(nh) > i32::MAX as usize
    {
        return shape(format!("B = {b}, T = {t}, C = {c} are too large for the kernels' 32-bit sizes"));
    }
    for &(name, len, want, ptr) in bufs {
        if len != want {
            return shape(format!(
                "{name} has {len} elements, expected {want} for B = {b}, T = {t}, C = {c}, n_head = {nh}, \
                 n_kv_head = {nkv}"
            ));
        }
        // The kernels move rows in 16-byte vectors (cp.async, uint4 loads); head dims are
        // multiples of 8 bf16, so every row stays aligned when the buffer's start is.
        if ptr % 16 != 0 {
            return shape(format!(
                "{name}'s device address {ptr:#x} is not 16-byte aligned, as the kernels' vector loads need"
            ));
        }
    }
    Ok(hd)
}

/// Which forward kernel runs. Both write the same out and lse (same layouts, same math up to
/// rounding), and both stay tested at every shape (tests/attention.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionVariant {
    /// attention_forward: f32 FMAs on CUDA cores, any head dim that is a multiple of 8 up to 128.
    Simt,
    /// attention_forward_mma: mma.sync bf16 tensor cores, 64-row query tiles; head dims 64 and 128, sm_80+.
    Mma,
}

impl AttentionVariant {
    /// The shipped choice: Mma where it applies (head dim 64 or 128 on sm_80 or newer), Simt otherwise.
    pub fn shipped(hd: usize, compute_capability: (i32, i32)) -> AttentionVariant {
        if Self::Mma.supports(hd, compute_capability) {
            AttentionVariant::Mma
        } else {
            AttentionVariant::Simt
        }
    }

    /// Whether this variant can run at head dim `hd` on a GPU of this compute capability.
    pub fn supports(self, hd: usize, compute_capability: (i32, i32)) -> bool {
        match self {
            AttentionVariant::Simt => true,
            AttentionVariant::Mma => {
                twin::smem_bytes_at(KILN_ATTN_KERNEL_FORWARD_MMA as usize, hd).is_some() && compute_capability >= (8, 0)
            }
        }
    }
}

/// One block of 4 warps per (`rows`-row tile, head, batch) (`nh` heads: query heads, or KV heads
/// for dK/dV), with `kernel`'s dynamic shared memory, raising the kernel's limit when it needs
/// more than the default 48 KB.
#[allow(clippy::too_many_arguments)]
fn config(f: Kernel, kernel: usize, rows: usize, hd: usize, b: usize, t: usize, nh: usize) -> Result<LaunchConfig> {
    let bytes = twin::smem_bytes(kernel, hd);
    let cu = cuda()?;
    if bytes > DEFAULT_SHARED {
        if bytes > cu.max_shared_per_block() {
            return Err(Error::Cuda(format!(
                "attention at head dim {hd} needs {bytes} bytes of shared memory per block; this GPU allows {}",
                cu.max_shared_per_block()
            )));
        }
        cu.set_max_dynamic_shared(f, bytes)?;
    }
    let tiles = t.div_ceil(rows) as u32;
    Ok(LaunchConfig {
        grid_dim: (tiles, nh as u32, b as u32),
        block_dim: (32 * KILN_ATTN_WARPS as u32, 1, 1),
        shared_mem_bytes: bytes as u32,
    })
}

/// out [B, T, C] = causal softmax(q k^T / sqrt(hd)) v per head, and lse [B, NH, T], from qkv
/// [B, T, 3C]: cpu::attention::attention_forward on bf16 device buffers, with the shipped variant.
pub fn attention_forward(
    out: &mut DevBuf<bf16>,
    lse: &mut DevBuf<f32>,
    qkv: &DevBuf<bf16>,
    d: &AttnDims,
) -> Result<()> {
    gqa_attention_forward(out, lse, qkv, d, d.nh)
}

/// `attention_forward` over qkv [B, T, C + 2 Ckv] with `nkv` KV heads, each serving nh / nkv
/// query heads: cpu::attention::gqa_attention_forward on bf16 device buffers.
pub fn gqa_attention_forward(
    out: &mut DevBuf<bf16>,
    lse: &mut DevBuf<f32>,
    qkv: &DevBuf<bf16>,
    d: &AttnDims,
    nkv: usize,
) -> Result<()> {
    // Without a GPU (or with bad sizes) gqa_attention_forward_with reports the error.
    let hd = d.c.checked_div(d.nh).unwrap_or(0);
    let variant = cuda().map_or(AttentionVariant::Simt, |cu| AttentionVariant::shipped(hd, cu.compute_capability()));
    gqa_attention_forward_with(variant, out, lse, qkv, d, nkv)
}

/// attention_forward with a chosen variant (tests and benchmarks run both); a shape error if
/// the variant cannot take this head dim or GPU.
pub fn attention_forward_with(
    variant: AttentionVariant,
    out: &mut DevBuf<bf16>,
    lse: &mut DevBuf<f32>,
    qkv: &DevBuf<bf16>,
    d: &AttnDims,
) -> Result<()> {
    gqa_attention_forward_with(variant, out, lse, qkv, d, d.nh)
}

/// `gqa_attention_forward` with a chosen variant.
pub fn gqa_attention_forward_with(
    variant: AttentionVariant,
    out: &mut DevBuf<bf16>,
    lse: &mut DevBuf<f32>,
    qkv: &DevBuf<bf16>,
    d: &AttnDims,
    nkv: usize,
) -> Result<()> {
    let AttnDims { b, t, c, nh } = *d;
    let w = packed_width(c, nh, nkv);
    let lens = [
        ("out", out.len(), b * t * c, out.ptr()),
        ("lse", lse.len(), b * nh * t, lse.ptr()),
        ("qkv", qkv.len(), b * t * w, qkv.ptr()),
    ];
    let hd = check("cuda::attention_forward", &lens, b, t, c, nh, nkv)?;
    forward(variant, out, lse, Operands::packed(qkv.ptr(), c, kv_width(c, nh, nkv)), None, d, nkv, hd)
}

/// `rope_attention_forward` with a chosen variant.
#[allow(clippy::too_many_arguments)]
pub fn rope_attention_forward_with(
    variant: AttentionVariant,
    out: &mut DevBuf<bf16>,
    lse: &mut DevBuf<f32>,
    q: &DevBuf<bf16>,
    k: &DevBuf<bf16>,
    v: &DevBuf<bf16>,
    table: &DevBuf<f32>,
    d: &AttnDims,
    nkv: usize,
) -> Result<()> {
    let AttnDims { b, t, c, nh } = *d;
    let ckv = kv_width(c, nh, nkv);
    let lens = [
        ("out", out.len(), b * t * c, out.ptr()),
        ("lse", lse.len(), b * nh * t, lse.ptr()),
        ("q", q.len(), b * t * c, q.ptr()),
        ("k", k.len(), b * t * ckv, k.ptr()),
        ("v", v.len(), b * t * ckv, v.ptr()),
    ];
    let hd = check("cuda::rope_attention_forward", &lens, b, t, c, nh, nkv)?;
    check_table("cuda::rope_attention_forward", table, t, hd)?;
    forward(variant, out, lse, Operands::apart(q, k, v, c, ckv), Some(table), d, nkv, hd)
}

/// out [B, T, C] and lse [B, NH, T] of attention over q [B, T, C], k and v [B, T, Ckv] as three
/// projections give them, q and k rotated by RoPE (positions 0..T, `table` from
/// cuda::rope::table) inside the kernels' loads: equals rope_pack followed by
/// gqa_attention_forward bit for bit, without the packed copy.
#[allow(clippy::too_many_arguments)]
pub fn rope_attention_forward(
    out: &mut DevBuf<bf16>,
    lse: &mut DevBuf<f32>,
    q: &DevBuf<bf16>,
    k: &DevBuf<bf16>,
    v: &DevBuf<bf16>,
    table: &DevBuf<f32>,
    d: &AttnDims,
    nkv: usize,
) -> Result<()> {
    let hd = d.c.checked_div(d.nh).unwrap_or(0);
    let variant = cuda().map_or(AttentionVariant::Simt, |cu| AttentionVariant::shipped(hd, cu.compute_capability()));
    rope_attention_forward_with(variant, out, lse, q, k, v, table, d, nkv)
}

/// Where the kernels find q, k and v (or write dq, dk and dv): device addresses and row strides in
/// elements (kernels/attention.cu's operands).
#[derive(Clone, Copy, Debug)]
struct Operands {
    q: u64,
    k: u64,
    v: u64,
    ldq: usize,
    ldkv: usize,
}

impl Operands {
    /// The three parts of packed rows [q | k | v] of C + 2 Ckv columns, the first at `base`.
    fn packed(base: u64, c: usize, ckv: usize) -> Self {
        let at = |col: usize| base + (col * std::mem::size_of::<bf16>()) as u64;
        Operands { q: base, k: at(c), v: at(c + ckv), ldq: c + 2 * ckv, ldkv: c + 2 * ckv }
    }

    /// Three buffers [.., C], [.., Ckv], [.., Ckv].
    fn apart(q: &DevBuf<bf16>, k: &DevBuf<bf16>, v: &DevBuf<bf16>, c: usize, ckv: usize) -> Self {
        Operands { q: q.ptr(), k: k.ptr(), v: v.ptr(), ldq: c, ldkv: ckv }
    }

    /// Appends q, k, v to a launch (the kernels take them in that order).
    fn args(&self, l: &mut super::runtime::Launch<'_>) {
        l.arg(&self.q).arg(&self.k).arg(&self.v);
    }
}

/// A shape error naming the head dims and GPUs the Mma variant takes, where `variant` cannot run.
fn check_variant(op: &'static str, variant: AttentionVariant, hd: usize) -> Result<()> {
    let (major, minor) = cuda()?.compute_capability();
    if variant.supports(hd, (major, minor)) {
        return Ok(());
    }
    Err(Error::Shape {
        op,
        msg: format!(
            "the {variant:?} kernels need head dim {} or {} on sm_80 or newer; got head dim {hd} on sm_{major}{minor}",
            KILN_ATTN_MMA_HEAD_DIM,
            2 * KILN_ATTN_MMA_HEAD_DIM
        ),
    })
}

/// The RoPE table must hold the positions 0..t at head dim hd ([positions, hd] f32).
fn check_table(op: &'static str, table: &DevBuf<f32>, t: usize, hd: usize) -> Result<()> {
    if table.len() < t * hd || table.ptr() % 16 != 0 {
        return Err(Error::Shape {
            op,
            msg: format!(
                "the RoPE table holds {} values at {:#x}, fewer than the {t} positions x head dim {hd} needed, \
                 or not 16-byte aligned",
                table.len(),
                table.ptr()
            ),
        });
    }
    Ok(())
}

/// Launches a forward kernel on checked operands (`table`: RoPE on load).
#[allow(clippy::too_many_arguments)]
fn forward(
    variant: AttentionVariant,
    out: &mut DevBuf<bf16>,
    lse: &mut DevBuf<f32>,
    ops: Operands,
    table: Option<&DevBuf<f32>>,
    d: &AttnDims,
    nkv: usize,
    hd: usize,
) -> Result<()> {
    let AttnDims { b, t, c, nh } = *d;
    let cu = cuda()?;
    check_variant("cuda::attention_forward", variant, hd)?;
    if b * t == 0 {
        return Ok(());
    }
    let (kernel, which, rows) = match variant {
        AttentionVariant::Simt => (Kernel::AttentionForward, KILN_ATTN_KERNEL_FORWARD, KILN_ATTN_TILE),
        AttentionVariant::Mma => (Kernel::AttentionForwardMma, KILN_ATTN_KERNEL_FORWARD_MMA, KILN_ATTN_MMA_ROWS),
    };
    let cfg = config(kernel, which as usize, rows as usize, hd, b, t, nh)?;
    let (b32, t32, c32, nh32, nkv32) = (b as i32, t as i32, c as i32, nh as i32, nkv as i32);
    let (ldq, ldkv) = (ops.ldq as i32, ops.ldkv as i32);
    let cs = table.map_or(0u64, |x| x.ptr());
    let mut l = cu.launch_builder(kernel);
    l.arg_mut(out).arg_mut(lse);
    ops.args(&mut l);
    l.arg(&cs).arg(&b32).arg(&t32).arg(&c32).arg(&nh32).arg(&nkv32).arg(&ldq).arg(&ldkv);
    // SAFETY: the arguments are the kernel's, in its parameter order; every caller measured the buffers (check, check_table) against the sizes it indexes up to at this launch configuration.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

/// dqkv [B, T, 3C] (overwritten, all of it) from dout [B, T, C] and the forward's qkv, out and
/// lse: cpu::attention::attention_backward on bf16 device buffers. Takes a B x NH x T f32 scratch
/// buffer for D = rowsum(dout * out).
pub fn attention_backward(
    dqkv: &mut DevBuf<bf16>,
    dout: &DevBuf<bf16>,
    qkv: &DevBuf<bf16>,
    out: &DevBuf<bf16>,
    lse: &DevBuf<f32>,
    d: &AttnDims,
) -> Result<()> {
    gqa_attention_backward(dqkv, dout, qkv, out, lse, d, d.nh)
}

/// `attention_backward` with `nkv` KV heads: dK and dV of a KV head sum over its group of query
/// heads in a fixed order (cpu::attention::gqa_attention_backward on bf16 device buffers).
#[allow(clippy::too_many_arguments)]
pub fn gqa_attention_backward(
    dqkv: &mut DevBuf<bf16>,
    dout: &DevBuf<bf16>,
    qkv: &DevBuf<bf16>,
    out: &DevBuf<bf16>,
    lse: &DevBuf<f32>,
    d: &AttnDims,
    nkv: usize,
) -> Result<()> {
    let hd = d.c.checked_div(d.nh).unwrap_or(0);
    gqa_attention_backward_with(backward_variant(hd), dqkv, dout, qkv, out, lse, d, nkv)
}

/// The shipped backward: tensor cores where the forward's are used and the backward's larger tiles
/// (Q, dO, K and V together) fit the GPU's shared memory (not at head dim 128 on sm_86/89's 99 KB),
/// CUDA cores otherwise.
fn backward_variant(hd: usize) -> AttentionVariant {
    let Ok(cu) = cuda() else { return AttentionVariant::Simt };
    let fits = [KILN_ATTN_KERNEL_DQ_MMA, KILN_ATTN_KERNEL_DKDV_MMA]
        .iter()
        .all(|&k| twin::smem_bytes_at(k as usize, hd).is_some_and(|b| b <= cu.max_shared_per_block()));
    match AttentionVariant::shipped(hd, cu.compute_capability()) {
        AttentionVariant::Mma if fits => AttentionVariant::Mma,
        _ => AttentionVariant::Simt,
    }
}

/// `gqa_attention_backward` with a chosen variant (tests and benchmarks run both); a shape error if
/// the variant cannot take this head dim or GPU.
#[allow(clippy::too_many_arguments)]
pub fn gqa_attention_backward_with(
    variant: AttentionVariant,
    dqkv: &mut DevBuf<bf16>,
    dout: &DevBuf<bf16>,
    qkv: &DevBuf<bf16>,
    out: &DevBuf<bf16>,
    lse: &DevBuf<f32>,
    d: &AttnDims,
    nkv: usize,
) -> Result<()> {
    let AttnDims { b, t, c, nh } = *d;
    let w = packed_width(c, nh, nkv);
    let lens = [
        ("dqkv", dqkv.len(), b * t * w, dqkv.ptr()),
        ("dout", dout.len(), b * t * c, dout.ptr()),
        ("qkv", qkv.len(), b * t * w, qkv.ptr()),
        ("out", out.len(), b * t * c, out.ptr()),
        ("lse", lse.len(), b * nh * t, lse.ptr()),
    ];
    let hd = check("cuda::attention_backward", &lens, b, t, c, nh, nkv)?;
    let ckv = kv_width(c, nh, nkv);
    let (grads, ops) = (Operands::packed(dqkv.ptr(), c, ckv), Operands::packed(qkv.ptr(), c, ckv));
    backward(variant, grads, dout, ops, None, out, lse, d, nkv, hd)
}

/// [dq, dk, dv] of `rope_attention_forward` (each overwritten, all of it; dq and dk rotated back)
/// from dout and the forward's q, k, v, out and lse: equals gqa_attention_backward over
/// rope_pack's qkv followed by rope_unpack, bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn rope_attention_backward(
    [dq, dk, dv]: [&mut DevBuf<bf16>; 3],
    dout: &DevBuf<bf16>,
    [q, k, v]: [&DevBuf<bf16>; 3],
    table: &DevBuf<f32>,
    out: &DevBuf<bf16>,
    lse: &DevBuf<f32>,
    d: &AttnDims,
    nkv: usize,
) -> Result<()> {
    let AttnDims { b, t, c, nh } = *d;
    let ckv = kv_width(c, nh, nkv);
    let lens = [
        ("dq", dq.len(), b * t * c, dq.ptr()),
        ("dk", dk.len(), b * t * ckv, dk.ptr()),
        ("dv", dv.len(), b * t * ckv, dv.ptr()),
        ("dout", dout.len(), b * t * c, dout.ptr()),
        ("q", q.len(), b * t * c, q.ptr()),
        ("k", k.len(), b * t * ckv, k.ptr()),
        ("v", v.len(), b * t * ckv, v.ptr()),
        ("out", out.len(), b * t * c, out.ptr()),
        ("lse", lse.len(), b * nh * t, lse.ptr()),
    ];
    let hd = check("cuda::rope_attention_backward", &lens, b, t, c, nh, nkv)?;
    check_table("cuda::rope_attention_backward", table, t, hd)?;
    let (grads, ops) = (Operands::apart(dq, dk, dv, c, ckv), Operands::apart(q, k, v, c, ckv));
    backward(backward_variant(hd), grads, dout, ops, Some(table), out, lse, d, nkv, hd)
}

/// Launches the three backward kernels on checked operands (`grads` written, `table`: RoPE), dK/dV
/// and dQ on tensor cores when `variant` is Mma.
#[allow(clippy::too_many_arguments)]
fn backward(
    variant: AttentionVariant,
    grads: Operands,
    dout: &DevBuf<bf16>,
    ops: Operands,
    table: Option<&DevBuf<f32>>,
    out: &DevBuf<bf16>,
    lse: &DevBuf<f32>,
    d: &AttnDims,
    nkv: usize,
    hd: usize,
) -> Result<()> {
    let AttnDims { b, t, c, nh } = *d;
    if b * t == 0 {
        return Ok(());
    }
    let cu = cuda()?;
    check_variant("cuda::attention_backward", variant, hd)?;
    let (b32, t32, c32, nh32, nkv32) = (b as i32, t as i32, c as i32, nh as i32, nkv as i32);
    let mut dsum = cu.alloc::<f32>(b * nh * t)?;

    // One warp per (b, t, h), 4 warps per block.
    let warps_per_block = KILN_ATTN_WARPS as usize;
    let pre = LaunchConfig {
        grid_dim: ((b * t * nh).div_ceil(warps_per_block) as u32, 1, 1),
        block_dim: (32 * warps_per_block as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut l = cu.launch_builder(Kernel::AttentionBackwardPreprocess);
    l.arg_mut(&mut dsum).arg(dout).arg(out).arg(&b32).arg(&t32).arg(&c32).arg(&nh32);
    // SAFETY: the arguments are the kernel's, in its parameter order; every caller measured dout and out (check) for these sizes, and dsum is allocated here for B x NH x T.
    unsafe { l.launch(pre) }?;

    // dK, dV (key tiles) and dQ (query tiles) write disjoint columns (of dqkv when packed).
    let (ldq, ldkv) = (ops.ldq as i32, ops.ldkv as i32);
    let cs = table.map_or(0u64, |x| x.ptr());
    let launches = match variant {
        AttentionVariant::Simt => [
            (Kernel::AttentionBackwardDkdv, KILN_ATTN_KERNEL_DKDV, KILN_ATTN_TILE, nkv),
            (Kernel::AttentionBackwardDq, KILN_ATTN_KERNEL_DQ, KILN_ATTN_TILE, nh),
        ],
        AttentionVariant::Mma => [
            (Kernel::AttentionBackwardDkdvMma, KILN_ATTN_KERNEL_DKDV_MMA, KILN_ATTN_MMA_ROWS, nkv),
            (Kernel::AttentionBackwardDqMma, KILN_ATTN_KERNEL_DQ_MMA, KILN_ATTN_MMA_ROWS, nh),
        ],
    };
    for (kernel, which, rows, heads) in launches {
        let cfg = config(kernel, which as usize, rows as usize, hd, b, t, heads)?;
        let mut l = cu.launch_builder(kernel);
        if matches!(kernel, Kernel::AttentionBackwardDkdv | Kernel::AttentionBackwardDkdvMma) {
            l.arg(&grads.k).arg(&grads.v);
        } else {
            l.arg(&grads.q);
        }
        l.arg(dout);
        ops.args(&mut l);
        l.arg(&cs).arg(lse).arg(&dsum).arg(&b32).arg(&t32).arg(&c32).arg(&nh32).arg(&nkv32).arg(&ldq).arg(&ldkv);
        // SAFETY: the arguments are the kernel's, in its parameter order; every caller measured the buffers (check, check_table) against the sizes it indexes up to at this launch configuration.
        unsafe { l.launch(cfg) }?;
    }
    Ok(())
}

/// Host twins of kernels/attention.cuh, compiled for the CPU (kernels/host/attention.cu).
pub mod twin {
    extern "C" {
        pub fn kiln_host_attention_online_softmax_update(
            m: *mut f32,
            l: *mut f32,
            acc: *mut f32,
            s: *const f32,
            v: *const f32,
            n: i32,
            hd: i32,
        );
        pub fn kiln_host_attention_lse(lse: *mut f32, m: *const f32, l: *const f32, n: i64);
        pub fn kiln_host_attention_prob(p: *mut f32, s: *const f32, lse: *const f32, n: i64);
        pub fn kiln_host_attention_dscore(ds: *mut f32, p: *const f32, dp: *const f32, d: *const f32, n: i64);
        pub fn kiln_host_attention_smem_bytes(kernel: i32, hd: i32) -> i32;
    }

    /// The kernels' online-softmax step: folds scores `s` (values `v`, s.len() rows of acc.len())
    /// into the running max `m`, sum `l` and accumulator `acc`, as cpu::attention::online_softmax_update.
    pub fn online_softmax_update(m: &mut f32, l: &mut f32, acc: &mut [f32], s: &[f32], v: &[f32]) {
        assert_eq!(v.len(), s.len() * acc.len(), "v must hold s.len() rows of acc.len() values");
        // SAFETY: every slice holds the element count passed (asserted above); the twin touches exactly those elements.
        unsafe {
            kiln_host_attention_online_softmax_update(
                m,
                l,
                acc.as_mut_ptr(),
                s.as_ptr(),
                v.as_ptr(),
                s.len() as i32,
                acc.len() as i32,
            )
        }
    }

    /// lse = m + ln(l), elementwise: what the forward stores per row.
    pub fn lse(lse: &mut [f32], m: &[f32], l: &[f32]) {
        assert!(m.len() == lse.len() && l.len() == lse.len());
        // SAFETY: every slice holds the element count passed (asserted above); the twin touches exactly those elements.
        unsafe { kiln_host_attention_lse(lse.as_mut_ptr(), m.as_ptr(), l.as_ptr(), lse.len() as i64) }
    }

    /// p = exp(s - lse), elementwise: the backward's recomputed probability of a scaled score.
    pub fn prob(p: &mut [f32], s: &[f32], lse: &[f32]) {
        assert!(s.len() == p.len() && lse.len() == p.len());
        // SAFETY: every slice holds the element count passed (asserted above); the twin touches exactly those elements.
        unsafe { kiln_host_attention_prob(p.as_mut_ptr(), s.as_ptr(), lse.as_ptr(), p.len() as i64) }
    }

    /// ds = p * (dp - d), elementwise: the softmax backward before the 1/sqrt(hd) scale.
    pub fn dscore(ds: &mut [f32], p: &[f32], dp: &[f32], d: &[f32]) {
        assert!(p.len() == ds.len() && dp.len() == ds.len() && d.len() == ds.len());
        // SAFETY: every slice holds the element count passed (asserted above); the twin touches exactly those elements.
        unsafe { kiln_host_attention_dscore(ds.as_mut_ptr(), p.as_ptr(), dp.as_ptr(), d.as_ptr(), ds.len() as i64) }
    }

    /// Bytes of dynamic shared memory the kernel (KILN_ATTN_KERNEL_*) needs at head dim `hd`
    /// (the Mma forward takes only hd = 64).
    pub fn smem_bytes(kernel: usize, hd: usize) -> usize {
        smem_bytes_at(kernel, hd).unwrap_or_else(|| panic!("attention kernel {kernel} does not run at head dim {hd}"))
    }

    /// `smem_bytes`, or None where the kernel does not take head dim `hd`.
    pub fn smem_bytes_at(kernel: usize, hd: usize) -> Option<usize> {
        // SAFETY: plain integers in and out.
        let bytes = unsafe { kiln_host_attention_smem_bytes(kernel as i32, hd as i32) };
        (bytes > 0).then_some(bytes as usize)
    }
}

impl crate::backend::Attention for super::Cuda {
    fn attention(&self, qkv: &Tensor, heads: Heads) -> Result<(Tensor, Tensor)> {
        const OP: &str = "attention";
        let (b, t, c) = qkv_dims(OP, qkv, heads)?;
        let (nh, nkv) = (heads.n_head, heads.n_kv_head);
        let qd = bf16_in(OP, qkv)?;
        let mut lse = self.alloc::<f32>(b * nh * t)?;
        let d = AttnDims { b, t, c, nh };
        let out = new_bf16(&[b, t, c], |o| gqa_attention_forward(o, &mut lse, qd, &d, nkv))?;
        Ok((out, wrap_f32(lse, &[b, nh, t])?))
    }

    fn attention_backward(
        &self,
        dout: &Tensor,
        qkv: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        heads: Heads,
    ) -> Result<Tensor> {
        const OP: &str = "attention backward";
        let (b, t, c) = qkv_dims(OP, qkv, heads)?;
        let (g, q, o, l) = (bf16_in(OP, dout)?, bf16_in(OP, qkv)?, bf16_in(OP, out)?, f32_in(OP, lse)?);
        let d = AttnDims { b, t, c, nh: heads.n_head };
        new_bf16(qkv.dims(), |dq| gqa_attention_backward(dq, g, q, o, l, &d, heads.n_kv_head))
    }

    fn attention_cached(
        &self,
        qkv: &Tensor,
        k: &mut Tensor,
        v: &mut Tensor,
        len: usize,
        heads: Heads,
    ) -> Result<Tensor> {
        const OP: &str = "attention_cached";
        let (b, n, c) = qkv_dims(OP, qkv, heads)?;
        let (nh, nkv) = (heads.n_head, heads.n_kv_head);
        let ckv = kv_width(c, nh, nkv);
        let cap = k.dims().get(1).copied().unwrap_or(0);
        let qkv_d = bf16_in(OP, qkv)?;
        let mut q = self.alloc::<bf16>(b * n * c)?;
        let got = k.dtype();
        let (Some(CudaStorage::BF16(kd)), Some(CudaStorage::BF16(vd))) = (k.cuda_storage_mut(), v.cuda_storage_mut())
        else {
            return Err(Error::DType { op: OP, expected: crate::DType::BF16, got });
        };
        let d = KvDims { b, n, past: len, cap, c };
        gqa_attention_cache_append(&mut q, kd, vd, qkv_d, &d, ckv)?;
        new_bf16(&[b, n, c], |o| gqa_attention_decode(o, &q, kd, vd, &d, nh, nkv))
    }
}

/// Columns of the keys (or the values) of nkv heads of C / nh: Ckv.
fn kv_width(c: usize, nh: usize, nkv: usize) -> usize {
    c.checked_div(nh).unwrap_or(0) * nkv
}

/// Columns of a packed qkv row: C of queries, then Ckv of keys and Ckv of values.
fn packed_width(c: usize, nh: usize, nkv: usize) -> usize {
    c + 2 * kv_width(c, nh, nkv)
}

/// Checks a KV-cache launch: the shapes and alignment `check` wants, and len + n <= cap within the
/// kernels' 32-bit sizes.
fn check_cache(op: &'static str, n: usize, len: usize, cap: usize) -> Result<()> {
    if len + n > cap || cap > i32::MAX as usize {
        return Err(Error::Shape { op, msg: format!("{len} cached + {n} new positions do not fit a cache of {cap}") });
    }
    Ok(())
}

/// q [B, n, C] and rows len..len + n of k_cache, v_cache [B, cap, C] from qkv [B, n, 3C]:
/// cpu::attention::attention_cache_append on bf16 device buffers.
pub fn attention_cache_append(
    q: &mut DevBuf<bf16>,
    k_cache: &mut DevBuf<bf16>,
    v_cache: &mut DevBuf<bf16>,
    qkv: &DevBuf<bf16>,
    d: &KvDims,
) -> Result<()> {
    gqa_attention_cache_append(q, k_cache, v_cache, qkv, d, d.c)
}

/// `attention_cache_append` for packed qkv [B, n, C + 2 Ckv] and caches [B, cap, Ckv].
pub fn gqa_attention_cache_append(
    q: &mut DevBuf<bf16>,
    k_cache: &mut DevBuf<bf16>,
    v_cache: &mut DevBuf<bf16>,
    qkv: &DevBuf<bf16>,
    d: &KvDims,
    ckv: usize,
) -> Result<()> {
    let KvDims { b, n, past: len, cap, c } = *d;
    const OP: &str = "cuda::attention_cache_append";
    let lens = [
        ("q", q.len(), b * n * c, q.ptr()),
        ("k_cache", k_cache.len(), b * cap * ckv, k_cache.ptr()),
        ("v_cache", v_cache.len(), b * cap * ckv, v_cache.ptr()),
        ("qkv", qkv.len(), b * n * (c + 2 * ckv), qkv.ptr()),
    ];
    if c == 0 || c % 8 != 0 || ckv == 0 || ckv % 8 != 0 {
        return Err(Error::Shape {
            op: OP,
            msg: format!("C = {c} and Ckv = {ckv} must be positive multiples of 8 (16-byte rows)"),
        });
    }
    for &(name, len, want, ptr) in &lens {
        if len != want || ptr % 16 != 0 {
            return Err(Error::Shape {
                op: OP,
                msg: format!("{name} has {len} elements at {ptr:#x}, expected {want}, 16-byte aligned"),
            });
        }
    }
    check_cache(OP, n, len, cap)?;
    let chunks = b * n * (c + 2 * ckv) / 8;
    if chunks == 0 {
        return Ok(());
    }
    if b * cap * ckv > i32::MAX as usize || c + 2 * ckv > i32::MAX as usize {
        return Err(Error::Shape {
            op: OP,
            msg: format!("a cache of [{b}, {cap}, {ckv}] is too large for the kernel"),
        });
    }
    let cu = cuda()?;
    let (b32, n32, len32, cap32, c32, ckv32) = (b as i32, n as i32, len as i32, cap as i32, c as i32, ckv as i32);
    let mut l = cu.launch_builder(Kernel::AttentionCacheAppend);
    l.arg_mut(q)
        .arg_mut(k_cache)
        .arg_mut(v_cache)
        .arg(qkv)
        .arg(&b32)
        .arg(&n32)
        .arg(&len32)
        .arg(&cap32)
        .arg(&c32)
        .arg(&ckv32);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { l.launch(super::grid_1d(chunks, 256)) }?;
    Ok(())
}

/// out [B, n, C]: query i of q [B, n, C] (at position past + i) against rows 0..=past + i of
/// k_cache, v_cache [B, cap, C]: cpu::attention::attention_decode on bf16 device buffers.
pub fn attention_decode(
    out: &mut DevBuf<bf16>,
    q: &DevBuf<bf16>,
    k_cache: &DevBuf<bf16>,
    v_cache: &DevBuf<bf16>,
    d: &KvDims,
    nh: usize,
) -> Result<()> {
    gqa_attention_decode(out, q, k_cache, v_cache, d, nh, nh)
}

/// `attention_decode` against caches [B, cap, Ckv] of `nkv` KV heads; query head h reads KV head
/// h / (nh / nkv).
pub fn gqa_attention_decode(
    out: &mut DevBuf<bf16>,
    q: &DevBuf<bf16>,
    k_cache: &DevBuf<bf16>,
    v_cache: &DevBuf<bf16>,
    d: &KvDims,
    nh: usize,
    nkv: usize,
) -> Result<()> {
    let KvDims { b, n, past, cap, c } = *d;
    const OP: &str = "cuda::attention_decode";
    let ckv = kv_width(c, nh, nkv);
    let lens = [
        ("out", out.len(), b * n * c, out.ptr()),
        ("q", q.len(), b * n * c, q.ptr()),
        ("k_cache", k_cache.len(), b * cap * ckv, k_cache.ptr()),
        ("v_cache", v_cache.len(), b * cap * ckv, v_cache.ptr()),
    ];
    check(OP, &lens, b, n, c, nh, nkv)?;
    check_cache(OP, n, past, cap)?;
    if b * n == 0 {
        return Ok(());
    }
    if n > u32::MAX as usize || b * cap * c > i32::MAX as usize {
        return Err(Error::Shape { op: OP, msg: format!("n = {n} and a cache of [{b}, {cap}, {c}] are too large") });
    }
    let cu = cuda()?;
    let cfg = LaunchConfig { grid_dim: (n as u32, nh as u32, b as u32), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    let (b32, n32, past32, cap32, c32) = (b as i32, n as i32, past as i32, cap as i32, c as i32);
    let (nh32, nkv32) = (nh as i32, nkv as i32);
    let mut l = cu.launch_builder(Kernel::AttentionDecode);
    l.arg_mut(out).arg(q).arg(k_cache).arg(v_cache).arg(&b32).arg(&n32).arg(&past32).arg(&cap32).arg(&c32);
    l.arg(&nh32).arg(&nkv32);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { l.launch(cfg) }?;
    Ok(())
}
