//! Launch wrappers for kernels/gemm.cu: matrix multiply with transpose flags, bias, fused GELU and
//! accumulate, bf16 operands and f32 accumulation, with the names and argument order of
//! `backend::cpu::gemm`; plus the host twin of the kernels' epilogue (`twin`), which CI tests
//! without a GPU.
//!
//! Layout as on the CPU: row-major, `a_trans` means A is stored [k, m], `b_trans` that B is stored
//! [n, k]; each matrix's rows lie its pitch apart (`GemmDesc::lda`, `ldb`, `ldc`: dense unless
//! `GemmDesc::pitch` says otherwise), and a buffer holds exactly rows x pitch elements. Outputs are bf16 (activations) or f32 (weight gradients, usually with `accumulate`);
//! the bias is bf16, like the weights it sits beside.

use super::tensor::{bf16_in, new_bf16, new_f32, wrap_bf16};
use super::tma::{Swizzle, TensorMap, Tiled2d};
use super::{bf16, cuda, DevBuf, DeviceElem, Kernel, LaunchConfig};
use crate::abi::{
    KILN_GEMM_ACCUMULATE, KILN_GEMM_BIAS_GROUP, KILN_GEMM_BIAS_LANES, KILN_GEMM_BM, KILN_GEMM_BN, KILN_GEMM_GELU,
    KILN_GEMM_NAIVE_TILE, KILN_GEMM_OUT_F32, KILN_GEMM_SMALL_BM, KILN_GEMM_SMALL_BN, KILN_GEMM_SMALL_THREADS,
    KILN_GEMM_THREADS, KILN_GEMM_WGMMA_BK, KILN_GEMM_WGMMA_BM, KILN_GEMM_WGMMA_BN, KILN_GEMM_WGMMA_SMEM,
    KILN_GEMM_WGMMA_THREADS,
};
use crate::backend::{Epilogue, GemmDesc};
use crate::{DType, Error, Result, Tensor};

// The shared constants as the types used here (cast: the header's generator picks the integer type).
const BM: usize = KILN_GEMM_BM as usize;
const BN: usize = KILN_GEMM_BN as usize;
const THREADS: u32 = KILN_GEMM_THREADS as u32;
const SMALL_BM: usize = KILN_GEMM_SMALL_BM as usize;
const SMALL_BN: usize = KILN_GEMM_SMALL_BN as usize;
const SMALL_THREADS: u32 = KILN_GEMM_SMALL_THREADS as u32;
const NAIVE_TILE: usize = KILN_GEMM_NAIVE_TILE as usize;
const FLAG_OUT_F32: i32 = KILN_GEMM_OUT_F32 as i32;
const FLAG_ACCUMULATE: i32 = KILN_GEMM_ACCUMULATE as i32;
const FLAG_GELU: i32 = KILN_GEMM_GELU as i32;
const WG_BM: usize = KILN_GEMM_WGMMA_BM as usize;
const WG_BN: usize = KILN_GEMM_WGMMA_BN as usize;
const WG_BK: u32 = KILN_GEMM_WGMMA_BK as u32;
const WG_THREADS: u32 = KILN_GEMM_WGMMA_THREADS as u32;
const WG_SMEM: usize = KILN_GEMM_WGMMA_SMEM as usize;

/// Which GEMM kernel runs; `SHIPPED` is the one `matmul` and `matmul_forward` use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmVariant {
    /// The fastest kernel that can run the product: `Wgmma` on an sm_90 device when TMA can read
    /// every operand (see `Wgmma`) and its tiles fill the SMs, otherwise `MmaSync`.
    Best,
    /// wgmma fed by TMA (gemm_wgmma_*, sm_90 only): persistent 128 x 128 tiles, one block per SM at
    /// most on a GPU (one per tile on the emulated device). TMA reads rows that start on 16-byte
    /// boundaries, so an operand whose row pitch is not a multiple of 8 (and K = 0) takes
    /// `MmaSync` instead.
    Wgmma,
    /// Wgmma held to a grid of two blocks, so each block walks many tiles through the same ring
    /// of stages (tests).
    WgmmaTwoBlocks,
    /// mma.sync m16n8k16 tensor cores with cp.async double buffering (sm_80 and later), the tile
    /// picked per call: 128 x 128 (gemm_mma_*) unless that grid has fewer blocks than the GPU has
    /// SMs, then 64 x 64 (gemm_mma_small_*).
    MmaSync,
    /// MmaSync held to 128 x 128 tiles, whatever the shape (tests, benches).
    MmaSyncLarge,
    /// MmaSync held to 64 x 64 tiles, whatever the shape (tests, benches).
    MmaSyncSmall,
    /// gemm_naive: one thread per output, f32 accumulation from global memory; the reference the
    /// tests hold next to the CPU, and the bench's baseline.
    Naive,
}

/// The variant behind `matmul` and `matmul_forward`.
pub const SHIPPED: GemmVariant = GemmVariant::Best;

mod sealed {
    pub trait Sealed {}
    impl Sealed for half::bf16 {}
    impl Sealed for f32 {}
}

/// An output element type of the GEMM: bf16 or f32.
pub trait GemmOut: DeviceElem + sealed::Sealed {
    /// The KILN_GEMM_OUT_F32 bit for this type.
    const FLAGS: i32;
}
impl GemmOut for bf16 {
    const FLAGS: i32 = 0;
}
impl GemmOut for f32 {
    const FLAGS: i32 = FLAG_OUT_F32;
}

/// Errors unless a buffer holds exactly `need` elements (any length when `need` is 0: the
/// allocator hands out at least one element).
fn check_len(op: &'static str, what: &str, len: usize, need: usize, dims: &str) -> Result<()> {
    if need > 0 && len != need {
        return Err(Error::Shape { op, msg: format!("{what} has {len} elements, expected {dims} = {need}") });
    }
    Ok(())
}

/// Checks the lengths of a product's out and optional pre-activation (m rows of pitch ldc) and
/// bias (n).
fn check_epilogue(
    op: &'static str,
    m: usize,
    ldc: usize,
    n: usize,
    out: usize,
    pre: Option<usize>,
    bias: Option<usize>,
) -> Result<()> {
    check_len(op, "out", out, m * ldc, &format!("{m} x {ldc}"))?;
    if let Some(p) = pre {
        check_len(op, "pre", p, m * ldc, &format!("{m} x {ldc}"))?;
    }
    if let Some(b) = bias {
        check_len(op, "bias", b, n, &format!("{n}"))?;
    }
    Ok(())
}

/// Every size must fit the kernels' i32 indices with room for a tile past the end.
fn check_dims(op: &'static str, m: usize, n: usize, k: usize) -> Result<()> {
    const LIMIT: usize = (i32::MAX as usize) - 4096;
    if m > LIMIT || n > LIMIT || k > LIMIT {
        return Err(Error::Shape { op, msg: format!("m = {m}, n = {n}, k = {k}: each must be below {LIMIT}") });
    }
    // Every grid puts m / tile on grid.y (tile >= 16), which is capped at 65535.
    if m.div_ceil(NAIVE_TILE) > 65535 {
        return Err(Error::Shape {
            op,
            msg: format!("m = {m} rows is more than one launch covers; split the rows into chunks"),
        });
    }
    Ok(())
}

/// The full GEMM `g` (shape, transposes, epilogue) with `variant`. `pre` receives the
/// pre-activation (only meaningful with a GELU epilogue); `accumulate` adds the product to the
/// old `out` (after the bias, when both are given).
#[allow(clippy::too_many_arguments)]
pub fn matmul_with<O: GemmOut>(
    variant: GemmVariant,
    out: &mut DevBuf<O>,
    pre: Option<&mut DevBuf<O>>,
    a: &DevBuf<bf16>,
    b: &DevBuf<bf16>,
    bias: Option<&DevBuf<bf16>>,
    g: &GemmDesc,
    accumulate: bool,
) -> Result<()> {
    let GemmDesc { m, n, k, .. } = *g;
    let (a_trans, b_trans, gelu) = (g.a.is_t(), g.b.is_t(), g.epilogue == Epilogue::Gelu);
    const OP: &str = "cuda::matmul";
    check_dims(OP, m, n, k)?;
    g.check_pitch(OP)?;
    let (lda, ldb, ldc) = (g.lda(), g.ldb(), g.ldc());
    check_dims(OP, lda, ldb, ldc)?;
    let [la, lb, _] = g.lens();
    check_len(OP, "A", a.len(), la, &format!("{} rows x {lda}", g.a_stored()[0]))?;
    check_len(OP, "B", b.len(), lb, &format!("{} rows x {ldb}", g.b_stored()[0]))?;
    check_epilogue(OP, m, ldc, n, out.len(), pre.as_ref().map(|p| p.len()), bias.map(|b| b.len()))?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let flags = O::FLAGS | if accumulate { FLAG_ACCUMULATE } else { 0 } | if gelu { FLAG_GELU } else { 0 };
    let cu = cuda()?;
    let (mi, ni, ki) = (m as i32, n as i32, k as i32);
    let (lda, ldb, ldc) = (lda as i32, ldb as i32, ldc as i32);
    // A null device pointer switches the bias or the pre-activation off.
    let null: u64 = 0;
    let variant = resolve(variant, runs_wgmma(cu), cu.sm_count(), g, a.ptr(), b.ptr()).map_err(|why| {
        let (major, minor) = cu.compute_capability();
        Error::Cuda(format!(
            "{why}; {} is sm_{major}{minor}, this build has machine code for sm_{{{}}}",
            cu.name(),
            super::ARCHS
        ))
    })?;
    if let GemmVariant::Wgmma | GemmVariant::WgmmaTwoBlocks = variant {
        return matmul_wgmma(variant, out, pre, a, b, bias, g, flags);
    }
    let (kernel, cfg) = match variant {
        GemmVariant::Best | GemmVariant::Wgmma | GemmVariant::WgmmaTwoBlocks | GemmVariant::MmaSync => {
            unreachable!("resolve() returns a kernel")
        }
        GemmVariant::MmaSyncLarge => {
            let kernel = match (a_trans, b_trans) {
                (false, false) => Kernel::GemmMmaNn,
                (false, true) => Kernel::GemmMmaNt,
                (true, false) => Kernel::GemmMmaTn,
                (true, true) => Kernel::GemmMmaTt,
            };
            let grid = (n.div_ceil(BN) as u32, m.div_ceil(BM) as u32, 1);
            (kernel, LaunchConfig { grid_dim: grid, block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })
        }
        GemmVariant::MmaSyncSmall => {
            let kernel = match (a_trans, b_trans) {
                (false, false) => Kernel::GemmMmaSmallNn,
                (false, true) => Kernel::GemmMmaSmallNt,
                (true, false) => Kernel::GemmMmaSmallTn,
                (true, true) => Kernel::GemmMmaSmallTt,
            };
            let grid = (n.div_ceil(SMALL_BN) as u32, m.div_ceil(SMALL_BM) as u32, 1);
            (kernel, LaunchConfig { grid_dim: grid, block_dim: (SMALL_THREADS, 1, 1), shared_mem_bytes: 0 })
        }
        GemmVariant::Naive => {
            let t = NAIVE_TILE;
            let grid = (n.div_ceil(t) as u32, m.div_ceil(t) as u32, 1);
            (
                Kernel::GemmNaive,
                LaunchConfig { grid_dim: grid, block_dim: (t as u32, t as u32, 1), shared_mem_bytes: 0 },
            )
        }
    };
    let (ta, tb) = (a_trans as i32, b_trans as i32);
    let mut l = cu.launch_builder(kernel);
    l.arg(out);
    match pre {
        Some(p) => l.arg(p),
        None => l.arg(&null),
    };
    l.arg(a).arg(b);
    match bias {
        Some(bias) => l.arg(bias),
        None => l.arg(&null),
    };
    l.arg(&mi).arg(&ni).arg(&ki).arg(&lda).arg(&ldb).arg(&ldc);
    if variant == GemmVariant::Naive {
        l.arg(&ta).arg(&tb);
    }
    l.arg(&flags);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

/// Whether `cu` runs the gemm_wgmma_* kernels: the emulated device, or an sm_90 GPU with a build
/// that compiled sm_90a machine code (elsewhere the kernels are compiled to a trap).
pub fn runs_wgmma(cu: &super::Cuda) -> bool {
    cu.is_emulated() || (cu.compute_capability() == (9, 0) && super::ARCHS.split(',').any(|a| a.trim() == "90a"))
}

/// The kernel `matmul_with(variant, ..)` launches for `g` on a device that runs the wgmma kernels
/// or not (`wgmma`: `runs_wgmma`), with `sms` SMs, A and B at device addresses `a_ptr` and `b_ptr`:
/// Wgmma, WgmmaTwoBlocks, MmaSyncLarge, MmaSyncSmall or Naive. Best takes Wgmma on such a device
/// when TMA can read both operands (16-byte aligned rows: leading dimensions that are multiples of
/// 8, and K > 0) and its 128 x 128 tiles fill the SMs; a product with fewer tiles (a narrow layer's
/// weight gradient, long in K) goes to mma.sync, whose 64 x 64 tiles give four times the blocks,
/// until the wgmma kernel splits K. A wgmma variant takes mma.sync where TMA cannot read an
/// operand, and is refused (the reason in the error) elsewhere. MmaSync takes the 128 x 128 tile
/// unless that grid has fewer blocks than the device has SMs.
pub fn resolve(
    variant: GemmVariant,
    wgmma: bool,
    sms: usize,
    g: &GemmDesc,
    a_ptr: u64,
    b_ptr: u64,
) -> std::result::Result<GemmVariant, String> {
    use GemmVariant::*;
    let GemmDesc { m, n, k, .. } = *g;
    // Each operand's row pitch in elements, as stored.
    let (pa, pb) = (g.lda(), g.ldb());
    let tma_ok = k > 0 && a_ptr % 16 == 0 && b_ptr % 16 == 0 && pa % 8 == 0 && pb % 8 == 0;
    let fills = m.div_ceil(WG_BM) * n.div_ceil(WG_BN) >= sms;
    let variant = match variant {
        Wgmma | WgmmaTwoBlocks if !wgmma => {
            return Err(format!(
                "the {variant:?} GEMM needs an sm_90 GPU and sm_90a machine code (KILN_CUDA_ARCHS with 90a): use Best"
            ))
        }
        Best if wgmma && tma_ok && fills => Wgmma,
        Best => MmaSync,
        Wgmma | WgmmaTwoBlocks if !tma_ok => MmaSync,
        v => v,
    };
    Ok(if variant == MmaSync { mma_tile(m, n, sms) } else { variant })
}

/// MmaSync's tile for an m x n output on `sms` SMs: 128 x 128 unless that grid has fewer blocks
/// than the SMs, then 64 x 64 (the NF4 kernels choose the same way).
fn mma_tile(m: usize, n: usize, sms: usize) -> GemmVariant {
    if n.div_ceil(BN) * m.div_ceil(BM) < sms {
        GemmVariant::MmaSyncSmall
    } else {
        GemmVariant::MmaSyncLarge
    }
}

/// The wgmma launch of `matmul_with` (sm_90, operands TMA can read: checked by the caller): the
/// tensor maps of A and B as gemm_wgmma_* loads them (128-byte swizzle; a K-major operand in boxes
/// of 128 rows of 64 k, an MN-major one in boxes of 64 k lines of 64), and a persistent grid.
#[allow(clippy::too_many_arguments)]
fn matmul_wgmma<O: GemmOut>(
    variant: GemmVariant,
    out: &mut DevBuf<O>,
    pre: Option<&mut DevBuf<O>>,
    a: &DevBuf<bf16>,
    b: &DevBuf<bf16>,
    bias: Option<&DevBuf<bf16>>,
    g: &GemmDesc,
    flags: i32,
) -> Result<()> {
    let GemmDesc { m, n, k, .. } = *g;
    let (a_trans, b_trans) = (g.a.is_t(), g.b.is_t());
    let cu = cuda()?;
    // The map of a row-major [rows, cols] operand: K-major when its rows run along K.
    let map = |ptr: u64, [rows, cols]: [usize; 2], pitch: usize, k_major: bool| -> Result<TensorMap> {
        cu.tensor_map_2d(&Tiled2d {
            ptr,
            rows: rows as u64,
            cols: cols as u64,
            pitch: pitch as u64,
            box_rows: if k_major { WG_BM as u32 } else { WG_BK },
            box_cols: 64,
            swizzle: Swizzle::B128,
        })
    };
    let ma = map(a.ptr(), g.a_stored(), g.lda(), !a_trans)?;
    let mb = map(b.ptr(), g.b_stored(), g.ldb(), b_trans)?;
    let kernel = match (a_trans, b_trans) {
        (false, false) => Kernel::GemmWgmmaNn,
        (false, true) => Kernel::GemmWgmmaNt,
        (true, false) => Kernel::GemmWgmmaTn,
        (true, true) => Kernel::GemmWgmmaTt,
    };
    cu.set_max_dynamic_shared(kernel, WG_SMEM)?;
    let tiles = m.div_ceil(WG_BM) * n.div_ceil(WG_BN);
    // One block per SM on a GPU. The emulated device runs blocks one after another on its
    // workers, so there a block per tile costs the same and lets `--predict` sample tiles rather
    // than whole walks of them; WgmmaTwoBlocks keeps the walk under test.
    let blocks = match variant {
        GemmVariant::WgmmaTwoBlocks => 2,
        _ if cu.is_emulated() => tiles,
        _ => cu.sm_count(),
    };
    let cfg = LaunchConfig {
        grid_dim: (tiles.min(blocks) as u32, 1, 1),
        block_dim: (WG_THREADS, 1, 1),
        shared_mem_bytes: WG_SMEM as u32,
    };
    let null: u64 = 0;
    let (mi, ni, ki, ldc) = (m as i32, n as i32, k as i32, g.ldc() as i32);
    let mut l = cu.launch_builder(kernel);
    l.arg(out);
    match pre {
        Some(p) => l.arg(p),
        None => l.arg(&null),
    };
    match bias {
        Some(bias) => l.arg(bias),
        None => l.arg(&null),
    };
    l.arg(&ma).arg(&mb).arg(&mi).arg(&ni).arg(&ki).arg(&ldc).arg(&flags);
    // SAFETY: the arguments are the kernel's, in its parameter order; the maps describe a and b with the lengths the caller checked, and they outlive the launch (the maps are copied into the launch's parameters).
    unsafe { l.launch(cfg) }?;
    Ok(())
}

/// out[m, n] (+)= op(A)[m, k] @ op(B)[k, n] as `g` describes (its epilogue is not applied:
/// `matmul_forward` does that); accumulates into `out` when `accumulate` is true.
pub fn matmul<O: GemmOut>(
    out: &mut DevBuf<O>,
    a: &DevBuf<bf16>,
    b: &DevBuf<bf16>,
    g: &GemmDesc,
    accumulate: bool,
) -> Result<()> {
    matmul_with(SHIPPED, out, None, a, b, None, &GemmDesc { epilogue: Epilogue::Plain, ..*g }, accumulate)
}

/// out[m, n] = op(A) @ op(B) + bias, optionally followed by GELU. With `pre`, GELU is applied and
/// `pre` receives the pre-activation (backward needs it), as cpu::gemm::matmul_forward.
pub fn matmul_forward<O: GemmOut>(
    out: &mut DevBuf<O>,
    pre: Option<&mut DevBuf<O>>,
    a: &DevBuf<bf16>,
    b: &DevBuf<bf16>,
    bias: Option<&DevBuf<bf16>>,
    g: &GemmDesc,
) -> Result<()> {
    let epilogue = if pre.is_some() { Epilogue::Gelu } else { Epilogue::Plain };
    matmul_with(SHIPPED, out, pre, a, b, bias, &GemmDesc { epilogue, ..*g }, false)
}

/// out[m, n] = x[m, k] @ op(W) (+ bias) (then GELU with `pre`), W an NF4 weight on the device,
/// decoded into the GEMM's shared tiles (kernels/gemm.cu, gemm_mma_nf4_*): `g.b` No reads W stored
/// [k, n] (a QLoRA layer's forward, x @ W), Yes reads it stored [n, k] (the input gradient
/// dY @ W^T of a weight [in, out]). Equal bit for bit to `nf4::nf4_dequantize` into bf16 and then
/// `matmul_forward`; W is never materialised.
pub fn matmul_nf4<O: GemmOut>(
    out: &mut DevBuf<O>,
    pre: Option<&mut DevBuf<O>>,
    x: &DevBuf<bf16>,
    w: &super::nf4::DevNf4,
    bias: Option<&DevBuf<bf16>>,
    g: &GemmDesc,
) -> Result<()> {
    matmul_nf4_with(SHIPPED, out, pre, x, w, bias, g)
}

/// `matmul_nf4` with the tile chosen by `variant` (Best or MmaSync: by the grid's size, as
/// `matmul_with`'s mma.sync; MmaSyncLarge or MmaSyncSmall: that one; Naive and the wgmma variants
/// have no NF4 form and are refused).
pub fn matmul_nf4_with<O: GemmOut>(
    variant: GemmVariant,
    out: &mut DevBuf<O>,
    pre: Option<&mut DevBuf<O>>,
    x: &DevBuf<bf16>,
    w: &super::nf4::DevNf4,
    bias: Option<&DevBuf<bf16>>,
    g: &GemmDesc,
) -> Result<()> {
    let GemmDesc { m, n, k, .. } = *g;
    const OP: &str = "cuda::matmul_nf4";
    if g.a.is_t() {
        return Err(Error::Shape { op: OP, msg: "the activation operand is read as stored (not transposed)".into() });
    }
    check_dims(OP, m, n, k)?;
    g.check_pitch(OP)?;
    if g.pitch.b.is_some() {
        return Err(Error::Shape { op: OP, msg: "the NF4 weight is stored dense: it takes no row pitch".into() });
    }
    let (lda, ldc) = (g.lda(), g.ldc());
    check_dims(OP, lda, n, ldc)?;
    check_len(OP, "x", x.len(), m * lda, &format!("{m} x {lda}"))?;
    if w.numel != k * n {
        return Err(Error::Shape {
            op: OP,
            msg: format!("the NF4 weight has {} elements, expected {k} x {n}", w.numel),
        });
    }
    check_epilogue(OP, m, ldc, n, out.len(), pre.as_ref().map(|p| p.len()), bias.map(|b| b.len()))?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let flags = O::FLAGS | if pre.is_some() { FLAG_GELU } else { 0 };
    let cu = cuda()?;
    let small = match variant {
        // No wgmma form of the NF4 kernels yet: Best takes mma.sync's choice of tile.
        GemmVariant::Best | GemmVariant::MmaSync => mma_tile(m, n, cu.sm_count()) == GemmVariant::MmaSyncSmall,
        GemmVariant::MmaSyncSmall => true,
        GemmVariant::MmaSyncLarge => false,
        GemmVariant::Naive | GemmVariant::Wgmma | GemmVariant::WgmmaTwoBlocks => {
            return Err(Error::Shape {
                op: OP,
                msg: format!("{variant:?} has no NF4 form: use an mma.sync variant (or Best)"),
            })
        }
    };
    let (kernel, cfg) = match (small, g.b.is_t()) {
        (false, trans) => (
            if trans { Kernel::GemmMmaNf4Nt } else { Kernel::GemmMmaNf4Nn },
            LaunchConfig {
                grid_dim: (n.div_ceil(BN) as u32, m.div_ceil(BM) as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
        ),
        (true, trans) => (
            if trans { Kernel::GemmMmaSmallNf4Nt } else { Kernel::GemmMmaSmallNf4Nn },
            LaunchConfig {
                grid_dim: (n.div_ceil(SMALL_BN) as u32, m.div_ceil(SMALL_BM) as u32, 1),
                block_dim: (SMALL_THREADS, 1, 1),
                shared_mem_bytes: 0,
            },
        ),
    };
    let null: u64 = 0;
    let (mi, ni, ki, bs) = (m as i32, n as i32, k as i32, w.blocksize as i32);
    let mut l = cu.launch_builder(kernel);
    l.arg(out);
    match pre {
        Some(p) => l.arg(p),
        None => l.arg(&null),
    };
    l.arg(x).arg(&w.packed);
    match &w.absmax_codes {
        Some(c) => l.arg(c),
        None => l.arg(&null),
    };
    l.arg(&w.nested_absmax).arg(&w.tables).arg(&w.offset).arg(&bs);
    match bias {
        Some(bias) => l.arg(bias),
        None => l.arg(&null),
    };
    let (lda, ldc) = (lda as i32, ldc as i32);
    l.arg(&mi).arg(&ni).arg(&ki).arg(&lda).arg(&ldc).arg(&flags);
    // SAFETY: the arguments are the kernel's, in its parameter order; out, pre, x and bias hold the lengths checked above, and the NF4 weight's parts were checked against its k x n elements when it was uploaded (DevNf4::upload), which is every element the tiles decode.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

/// dbias[n] = sum over rows of dout[rows, n], in f32 (overwrites dbias, as the CPU twin):
/// column sums per group of KILN_GEMM_BIAS_GROUP rows, then the groups added in order
/// (deterministic, no atomics; kernels/gemm.cu says how).
pub fn bias_backward(dbias: &mut DevBuf<f32>, dout: &DevBuf<bf16>, n: usize) -> Result<()> {
    const OP: &str = "cuda::bias_backward";
    if n == 0 {
        return Ok(());
    }
    check_len(OP, "dbias", dbias.len(), n, &format!("{n}"))?;
    let rows = dout.len() / n;
    if rows * n != dout.len() || rows > i32::MAX as usize || n > i32::MAX as usize {
        return Err(Error::Shape {
            op: OP,
            msg: format!("dout has {} elements, not a whole number of rows of {n}", dout.len()),
        });
    }
    let groups = rows.div_ceil(KILN_GEMM_BIAS_GROUP as usize);
    if groups > 65535 {
        return Err(Error::Shape {
            op: OP,
            msg: format!("{rows} rows make {groups} groups of {KILN_GEMM_BIAS_GROUP}, over the grid's 65535"),
        });
    }
    let cu = cuda()?;
    let (rows_i, n_i, groups_i) = (rows as i32, n as i32, groups as i32);
    let partial = LaunchConfig {
        grid_dim: (n.div_ceil(256) as u32, groups.max(1) as u32, 1),
        block_dim: (32, KILN_GEMM_BIAS_LANES as u32, 1),
        shared_mem_bytes: 0,
    };
    // One group writes the sums where they belong; more write partials, added in order after.
    let mut part = if groups > 1 { Some(cu.alloc::<f32>(groups * n)?) } else { None };
    let mut l = cu.launch_builder(Kernel::GemmBiasBackwardPartial);
    match part.as_mut() {
        Some(p) => l.arg_mut(p),
        None => l.arg_mut(dbias),
    };
    l.arg(dout).arg(&rows_i).arg(&n_i);
    // SAFETY: the arguments are the kernel's, in its parameter order; dout holds rows x n (checked above) and the output groups x n (allocated here, or dbias of n with one group), the elements this grid touches.
    unsafe { l.launch(partial) }?;
    if let Some(p) = part {
        let finish = super::reduce::colsum_config(n);
        let mut l = cu.launch_builder(Kernel::GemmBiasBackwardFinish);
        l.arg_mut(dbias).arg(&p).arg(&groups_i).arg(&n_i);
        // SAFETY: the arguments are the kernel's, in its parameter order; dbias holds n and the partials groups x n.
        unsafe { l.launch(finish) }?;
    }
    Ok(())
}

/// The host twin of the kernels' epilogue (kernels/host/gemm.cu), for tests without a GPU.
pub mod twin {
    extern "C" {
        fn kiln_host_gemm_epilogue(
            out: *mut f32,
            pre: *mut f32,
            acc: *const f32,
            bias: *const f32,
            m: i64,
            n: i64,
            flags: i32,
        );
    }

    /// What every gemm kernel does to out[m, n] once the f32 products `acc` are known: bias (give
    /// bf16-representable values: the kernels read bf16), the old `out` when `accumulate`, the
    /// pre-activation into `pre`, GELU when `gelu`, and rounding to bf16 unless `out_f32`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_epilogue(
        out: &mut [f32],
        pre: Option<&mut [f32]>,
        acc: &[f32],
        bias: Option<&[f32]>,
        m: usize,
        n: usize,
        out_f32: bool,
        accumulate: bool,
        gelu: bool,
    ) {
        assert_eq!(out.len(), m * n, "gemm_epilogue: out");
        assert_eq!(acc.len(), m * n, "gemm_epilogue: acc");
        if let Some(p) = &pre {
            assert_eq!(p.len(), m * n, "gemm_epilogue: pre");
        }
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "gemm_epilogue: bias");
        }
        use super::{FLAG_ACCUMULATE, FLAG_GELU, FLAG_OUT_F32};
        let flags = if out_f32 { FLAG_OUT_F32 } else { 0 }
            | if accumulate { FLAG_ACCUMULATE } else { 0 }
            | if gelu { FLAG_GELU } else { 0 };
        let pre = pre.map_or(std::ptr::null_mut(), |p| p.as_mut_ptr());
        let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
        // SAFETY: the lengths are checked above; the twin reads acc, bias, and out, and writes
        // out and pre, within m x n (n for bias).
        unsafe { kiln_host_gemm_epilogue(out.as_mut_ptr(), pre, acc.as_ptr(), bias, m as i64, n as i64, flags) }
    }
}

impl crate::backend::Matmul for super::Cuda {
    fn matmul(
        &self,
        a: &Tensor,
        b: &Tensor,
        bias: Option<&Tensor>,
        desc: &GemmDesc,
        out_dims: &[usize],
    ) -> Result<(Tensor, Option<Tensor>)> {
        const OP: &str = "matmul";
        let GemmDesc { m, epilogue, .. } = *desc;
        let (ad, bd) = (bf16_in(OP, a)?, bf16_in(OP, b)?);
        let biasd = bias.map(|t| bf16_in(OP, t)).transpose()?;
        let mut pre = (epilogue == Epilogue::Gelu).then(|| self.alloc::<bf16>(m * desc.ldc())).transpose()?;
        let out = new_bf16(out_dims, |o| matmul_forward(o, pre.as_mut(), ad, bd, biasd, desc))?;
        Ok((out, pre.map(|p| wrap_bf16(p, out_dims)).transpose()?))
    }

    fn gemm(&self, a: &Tensor, b: &Tensor, desc: &GemmDesc, dtype: DType, dims: &[usize]) -> Result<Tensor> {
        const OP: &str = "matmul backward";
        let (ad, bd) = (bf16_in(OP, a)?, bf16_in(OP, b)?);
        match dtype {
            DType::BF16 => new_bf16(dims, |o| matmul(o, ad, bd, desc, false)),
            DType::F32 => new_f32(dims, |o| matmul(o, ad, bd, desc, false)),
            _ => Err(Error::DType { op: OP, expected: DType::F32, got: dtype }),
        }
    }

    fn bias_grad(&self, g: &Tensor, n: usize) -> Result<Tensor> {
        let gd = bf16_in("matmul backward", g)?;
        new_f32(&[n], |d| bias_backward(d, gd, n))
    }

    fn gemm_accumulate(&self, out: &mut Tensor, a: &Tensor, b: &Tensor, desc: &GemmDesc) -> Result<()> {
        const OP: &str = "gemm_accumulate";
        let (ad, bd) = (bf16_in(OP, a)?, bf16_in(OP, b)?);
        match out.cuda_storage_mut() {
            Some(super::CudaStorage::BF16(o)) => matmul(o, ad, bd, desc, true),
            Some(super::CudaStorage::F32(o)) => matmul(o, ad, bd, desc, true),
            _ => Err(Error::Input(format!("{OP}: the output is not a bf16 or f32 tensor on the GPU"))),
        }
    }
}
