//! Launch wrappers for kernels/elementwise.cu: GELU, residual add, in-place add and dropout over
//! bf16 device buffers, with the names and argument order of `backend::cpu::elementwise`; plus
//! the host twins of the kernels' per-element math (`twin`), which CI tests without a GPU.

use super::tensor::{bf16_in, f32_in, new_bf16, new_f32, CudaStorage};
use super::{bf16, cuda, DevBuf, Kernel, LaunchConfig};
use crate::abi::KILN_ELEMENTWISE_BLOCK;
use crate::{DType, Error, Result, Tensor};

/// Enough blocks for `threads` threads, at most 8 blocks (2048 threads) per SM: the kernels are
/// grid-stride loops, so a smaller grid just loops more.
fn config(threads: usize, sm_count: usize) -> LaunchConfig {
    let block = KILN_ELEMENTWISE_BLOCK as usize;
    let blocks = threads.div_ceil(block).clamp(1, 8 * sm_count.max(1));
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (block as u32, 1, 1), shared_mem_bytes: 0 }
}

fn same_len(op: &'static str, n: usize, others: &[(&str, usize)]) -> Result<()> {
    for &(name, len) in others {
        if len != n {
            return Err(Error::Shape { op, msg: format!("{name} has {len} elements but the output has {n}") });
        }
    }
    Ok(())
}

/// out = gelu(inp), the tanh approximation, bf16 rounded from the f32 value cpu::gelu computes.
pub fn gelu_forward(out: &mut DevBuf<bf16>, inp: &DevBuf<bf16>) -> Result<()> {
    let n = out.len();
    same_len("cuda::gelu_forward", n, &[("inp", inp.len())])?;
    let cu = cuda()?;
    let n64 = n as i64;
    let mut b = cu.launch_builder(Kernel::ElementwiseGeluForward);
    b.arg(out).arg(inp).arg(&n64);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { b.launch(config(n.div_ceil(8), cu.sm_count())) }?;
    Ok(())
}

/// dinp = dout * gelu'(inp).
pub fn gelu_backward(dinp: &mut DevBuf<bf16>, inp: &DevBuf<bf16>, dout: &DevBuf<bf16>) -> Result<()> {
    let n = dinp.len();
    same_len("cuda::gelu_backward", n, &[("inp", inp.len()), ("dout", dout.len())])?;
    let cu = cuda()?;
    let n64 = n as i64;
    let mut b = cu.launch_builder(Kernel::ElementwiseGeluBackward);
    b.arg(dinp).arg(inp).arg(dout).arg(&n64);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { b.launch(config(n.div_ceil(8), cu.sm_count())) }?;
    Ok(())
}

/// out = silu(gate) * up (cpu::swiglu_forward's f32 value, rounded once to bf16).
pub fn swiglu_forward(out: &mut DevBuf<bf16>, gate: &DevBuf<bf16>, up: &DevBuf<bf16>) -> Result<()> {
    let n = out.len();
    same_len("cuda::swiglu_forward", n, &[("gate", gate.len()), ("up", up.len())])?;
    let cu = cuda()?;
    let n64 = n as i64;
    let mut b = cu.launch_builder(Kernel::ElementwiseSwigluForward);
    b.arg(out).arg(gate).arg(up).arg(&n64);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { b.launch(config(n.div_ceil(8), cu.sm_count())) }?;
    Ok(())
}

/// dgate = (dout * up) * silu'(gate) and dup = dout * silu(gate), in one pass.
pub fn swiglu_backward(
    dgate: &mut DevBuf<bf16>,
    dup: &mut DevBuf<bf16>,
    gate: &DevBuf<bf16>,
    up: &DevBuf<bf16>,
    dout: &DevBuf<bf16>,
) -> Result<()> {
    let n = dgate.len();
    let lens = [("dup", dup.len()), ("gate", gate.len()), ("up", up.len()), ("dout", dout.len())];
    same_len("cuda::swiglu_backward", n, &lens)?;
    let cu = cuda()?;
    let n64 = n as i64;
    let mut b = cu.launch_builder(Kernel::ElementwiseSwigluBackward);
    b.arg(dgate).arg(dup).arg(gate).arg(up).arg(dout).arg(&n64);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { b.launch(config(n.div_ceil(8), cu.sm_count())) }?;
    Ok(())
}

/// out = a + b (f32 sum, rounded once to bf16).
pub fn residual_forward(out: &mut DevBuf<bf16>, a: &DevBuf<bf16>, b: &DevBuf<bf16>) -> Result<()> {
    let n = out.len();
    same_len("cuda::residual_forward", n, &[("a", a.len()), ("b", b.len())])?;
    let cu = cuda()?;
    let n64 = n as i64;
    let mut l = cu.launch_builder(Kernel::ElementwiseResidualForward);
    l.arg(out).arg(a).arg(b).arg(&n64);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { l.launch(config(n.div_ceil(8), cu.sm_count())) }?;
    Ok(())
}

/// dst += src (f32 sum, rounded once to bf16).
pub fn add_assign(dst: &mut DevBuf<bf16>, src: &DevBuf<bf16>) -> Result<()> {
    let n = dst.len();
    same_len("cuda::add_assign", n, &[("src", src.len())])?;
    let cu = cuda()?;
    let n64 = n as i64;
    let mut b = cu.launch_builder(Kernel::ElementwiseAddAssign);
    b.arg(dst).arg(src).arg(&n64);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { b.launch(config(n.div_ceil(8), cu.sm_count())) }?;
    Ok(())
}

/// dst += src on f32 buffers (gradient accumulation in f32).
pub fn add_assign_f32(dst: &mut DevBuf<f32>, src: &DevBuf<f32>) -> Result<()> {
    let n = dst.len();
    same_len("cuda::add_assign_f32", n, &[("src", src.len())])?;
    let cu = cuda()?;
    let n64 = n as i64;
    let mut b = cu.launch_builder(Kernel::ElementwiseAddAssignF32);
    b.arg(dst).arg(src).arg(&n64);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { b.launch(config(n.div_ceil(4), cu.sm_count())) }?;
    Ok(())
}

/// out = bf16(inp), rounded to nearest even (half::bf16::from_f32's bits).
pub fn cast_f32_to_bf16(out: &mut DevBuf<bf16>, inp: &DevBuf<f32>) -> Result<()> {
    let n = out.len();
    same_len("cuda::cast_f32_to_bf16", n, &[("inp", inp.len())])?;
    let cu = cuda()?;
    let n64 = n as i64;
    let mut b = cu.launch_builder(Kernel::ElementwiseCastF32ToBf16);
    b.arg(out).arg(inp).arg(&n64);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { b.launch(config(n.div_ceil(8), cu.sm_count())) }?;
    Ok(())
}

/// out = f32(inp), exact.
pub fn cast_bf16_to_f32(out: &mut DevBuf<f32>, inp: &DevBuf<bf16>) -> Result<()> {
    let n = out.len();
    same_len("cuda::cast_bf16_to_f32", n, &[("inp", inp.len())])?;
    let cu = cuda()?;
    let n64 = n as i64;
    let mut b = cu.launch_builder(Kernel::ElementwiseCastBf16ToF32);
    b.arg(out).arg(inp).arg(&n64);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { b.launch(config(n.div_ceil(8), cu.sm_count())) }?;
    Ok(())
}

/// mask[i] = 1 if element i survives dropout with drop probability `p` under `seed`, else 0:
/// cpu::dropout_mask's bits.
pub fn dropout_mask(mask: &mut DevBuf<u8>, seed: u64, p: f32) -> Result<()> {
    let n = mask.len();
    let cu = cuda()?;
    let n64 = n as i64;
    let mut b = cu.launch_builder(Kernel::ElementwiseDropoutMask);
    b.arg(mask).arg(&seed).arg(&p).arg(&n64);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { b.launch(config(n, cu.sm_count())) }?;
    Ok(())
}

/// out = inp * mask * scale with a stored 0/1 mask; on dout it is dropout's backward.
pub fn dropout_forward(out: &mut DevBuf<bf16>, inp: &DevBuf<bf16>, mask: &DevBuf<u8>, scale: f32) -> Result<()> {
    let n = out.len();
    same_len("cuda::dropout_forward", n, &[("inp", inp.len()), ("mask", mask.len())])?;
    let cu = cuda()?;
    let n64 = n as i64;
    let mut b = cu.launch_builder(Kernel::ElementwiseDropoutForward);
    b.arg(out).arg(inp).arg(mask).arg(&scale).arg(&n64);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { b.launch(config(n.div_ceil(8), cu.sm_count())) }?;
    Ok(())
}

/// dropout_mask and dropout_forward in one pass, the mask drawn per element and stored only when
/// `mask` is given. Run on dout with the same seed, p and scale it is the backward, no mask needed.
pub fn dropout(
    out: &mut DevBuf<bf16>,
    mask: Option<&mut DevBuf<u8>>,
    inp: &DevBuf<bf16>,
    seed: u64,
    p: f32,
    scale: f32,
) -> Result<()> {
    let n = out.len();
    let mask_len = mask.as_ref().map_or(n, |m| m.len());
    same_len("cuda::dropout", n, &[("inp", inp.len()), ("mask", mask_len)])?;
    let cu = cuda()?;
    let n64 = n as i64;
    let null = 0u64;
    let mut b = cu.launch_builder(Kernel::ElementwiseDropout);
    b.arg(out);
    match mask {
        Some(m) => b.arg(m),
        None => b.arg(&null),
    };
    b.arg(inp).arg(&seed).arg(&p).arg(&scale).arg(&n64);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { b.launch(config(n.div_ceil(8), cu.sm_count())) }?;
    Ok(())
}

/// The per-element math of kernels/elementwise.cuh compiled for the host (kernels/host/
/// elementwise.cu), f32 in and out.
pub mod twin {
    extern "C" {
        pub fn kiln_host_gelu(out: *mut f32, inp: *const f32, n: i64);
        pub fn kiln_host_gelu_grad(out: *mut f32, inp: *const f32, n: i64);
        pub fn kiln_host_gelu_backward(dinp: *mut f32, inp: *const f32, dout: *const f32, n: i64);
        pub fn kiln_host_dropout_mask(mask: *mut u8, seed: u64, p: f32, first: u64, n: i64);
    }

    /// out = kiln_gelu(inp).
    pub fn gelu(out: &mut [f32], inp: &[f32]) {
        assert_eq!(out.len(), inp.len());
        // SAFETY: every slice holds the element count passed (asserted above); the twin touches exactly those elements.
        unsafe { kiln_host_gelu(out.as_mut_ptr(), inp.as_ptr(), out.len() as i64) }
    }

    /// out = kiln_gelu_grad(inp).
    pub fn gelu_grad(out: &mut [f32], inp: &[f32]) {
        assert_eq!(out.len(), inp.len());
        // SAFETY: every slice holds the element count passed (asserted above); the twin touches exactly those elements.
        unsafe { kiln_host_gelu_grad(out.as_mut_ptr(), inp.as_ptr(), out.len() as i64) }
    }

    /// dinp = dout * kiln_gelu_grad(inp), as the backward kernel computes it.
    pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
        assert_eq!(dinp.len(), inp.len());
        assert_eq!(dinp.len(), dout.len());
        // SAFETY: every slice holds the element count passed (asserted above); the twin touches exactly those elements.
        unsafe { kiln_host_gelu_backward(dinp.as_mut_ptr(), inp.as_ptr(), dout.as_ptr(), dinp.len() as i64) }
    }

    /// mask[i] = kiln_dropout_keep(seed, first + i, p) as 0 or 1.
    pub fn dropout_mask(mask: &mut [u8], seed: u64, p: f32, first: u64) {
        // SAFETY: every slice holds the element count passed (asserted above); the twin touches exactly those elements.
        unsafe { kiln_host_dropout_mask(mask.as_mut_ptr(), seed, p, first, mask.len() as i64) }
    }
}

/// `kiln bench kernels` rows: each kernel on 2^26 elements (128 MB a bf16 buffer, several times
/// the L2), GB/s counting every byte read and written once, against device-to-device copy.
pub fn bench(cu: &super::Cuda, copy: f64) -> Result<Vec<super::bench::Row>> {
    use super::bench::{random_bf16, random_f32, time_ms, Row};
    let n = 1usize << 26;
    let shape = "n = 2^26".to_string();
    let a = random_bf16(cu, n, 11)?;
    let b = random_bf16(cu, n, 12)?;
    let mut out = cu.alloc::<bf16>(n)?;
    let mut mask = cu.alloc::<u8>(n)?;
    let af = random_f32(cu, n, 13)?;
    let mut bf = random_f32(cu, n, 14)?;
    let mut rows = Vec::new();
    let mut row = |kernel: &str, bytes_per_elem: f64, ms: f64| {
        let gbs = bytes_per_elem * n as f64 / (ms * 1e-3) / 1e9;
        rows.push(Row {
            kernel: kernel.to_string(),
            shape: shape.clone(),
            ms,
            achieved: gbs,
            unit: "GB/s",
            ceiling: copy,
            ceiling_name: "d2d copy".to_string(),
            target: Some(0.7),
        });
    };
    let (w, r) = (3, 20);
    row("gelu_forward", 4.0, time_ms(cu, w, r, || gelu_forward(&mut out, &a))?);
    row("gelu_backward", 6.0, time_ms(cu, w, r, || gelu_backward(&mut out, &a, &b))?);
    row("swiglu_forward", 6.0, time_ms(cu, w, r, || swiglu_forward(&mut out, &a, &b))?);
    let mut out2 = cu.alloc::<bf16>(n)?;
    row("swiglu_backward", 10.0, time_ms(cu, w, r, || swiglu_backward(&mut out, &mut out2, &a, &b, &a))?);
    row("residual_forward", 6.0, time_ms(cu, w, r, || residual_forward(&mut out, &a, &b))?);
    row("add_assign", 6.0, time_ms(cu, w, r, || add_assign(&mut out, &a))?);
    row("add_assign_f32", 12.0, time_ms(cu, w, r, || add_assign_f32(&mut bf, &af))?);
    let mut outf = cu.alloc::<f32>(n)?;
    row("cast_f32_to_bf16", 6.0, time_ms(cu, w, r, || cast_f32_to_bf16(&mut out, &af))?);
    row("cast_bf16_to_f32", 6.0, time_ms(cu, w, r, || cast_bf16_to_f32(&mut outf, &a))?);
    row("dropout_mask", 1.0, time_ms(cu, w, r, || dropout_mask(&mut mask, 7, 0.1))?);
    row("dropout_forward", 5.0, time_ms(cu, w, r, || dropout_forward(&mut out, &a, &mask, 1.0 / 0.9))?);
    row("dropout (+mask)", 5.0, time_ms(cu, w, r, || dropout(&mut out, Some(&mut mask), &a, 7, 0.1, 1.0 / 0.9))?);
    row("dropout (no mask)", 4.0, time_ms(cu, w, r, || dropout(&mut out, None, &a, 7, 0.1, 1.0 / 0.9))?);
    Ok(rows)
}

impl crate::backend::Elementwise for super::Cuda {
    fn gelu(&self, x: &Tensor) -> Result<Tensor> {
        let xd = bf16_in("gelu", x)?;
        new_bf16(x.dims(), |o| gelu_forward(o, xd))
    }
    fn gelu_backward(&self, x: &Tensor, dout: &Tensor) -> Result<Tensor> {
        let (xd, g) = (bf16_in("gelu backward", x)?, bf16_in("gelu backward", dout)?);
        new_bf16(x.dims(), |d| gelu_backward(d, xd, g))
    }
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (ad, bd) = (bf16_in("add", a)?, bf16_in("add", b)?);
        new_bf16(a.dims(), |o| residual_forward(o, ad, bd))
    }
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let (g, u) = (bf16_in("swiglu", gate)?, bf16_in("swiglu", up)?);
        new_bf16(gate.dims(), |o| swiglu_forward(o, g, u))
    }
    fn swiglu_backward(
        &self,
        gate: &Tensor,
        up: &Tensor,
        dout: &Tensor,
        needs: [bool; 2],
    ) -> Result<[Option<Tensor>; 2]> {
        const OP: &str = "swiglu backward";
        let (g, u, o) = (bf16_in(OP, gate)?, bf16_in(OP, up)?, bf16_in(OP, dout)?);
        // one kernel writes both gradients; one the tape does not want is dropped
        let mut dup = self.alloc::<bf16>(gate.numel())?;
        let dgate = new_bf16(gate.dims(), |dg| swiglu_backward(dg, &mut dup, g, u, o))?;
        let dup = super::tensor::wrap_bf16(dup, gate.dims())?;
        Ok([needs[0].then_some(dgate), needs[1].then_some(dup)])
    }
    fn dropout(&self, x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
        // The kernel draws the CPU's mask bits per element, so backward redraws them from the seed.
        let xd = bf16_in("dropout", x)?;
        new_bf16(x.dims(), |o| dropout(o, None, xd, seed, p, 1.0 / (1.0 - p)))
    }
    fn cast(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        match (x.dtype(), dtype) {
            (from, to) if from == to => Ok(x.clone()),
            (DType::F32, DType::BF16) => {
                let xd = f32_in("cast to bf16", x)?;
                new_bf16(x.dims(), |o| cast_f32_to_bf16(o, xd))
            }
            (DType::BF16, DType::F32) => {
                let xd = bf16_in("cast to f32", x)?;
                new_f32(x.dims(), |o| cast_bf16_to_f32(o, xd))
            }
            (from, to) => Err(Error::Input(format!(
                "the CUDA backend casts between f32 and bf16 only, not {from:?} to {to:?}; copy the tensor to the \
                 CPU (to_device) for other conversions"
            ))),
        }
    }
    fn add_assign(&self, acc: &mut Tensor, x: &Tensor) -> Result<()> {
        let (want, got) = (acc.dtype(), x.dtype());
        match (acc.cuda_storage_mut(), x.cuda_storage()) {
            (Some(CudaStorage::BF16(dst)), Some(CudaStorage::BF16(src))) => add_assign(dst, src),
            (Some(CudaStorage::F32(dst)), Some(CudaStorage::F32(src))) => add_assign_f32(dst, src),
            _ => Err(Error::Input(format!("backward: cannot add a {got:?} gradient into a {want:?} one on the GPU"))),
        }
    }
    fn sum_squares(&self, xs: &[&Tensor]) -> Result<f64> {
        if xs.is_empty() {
            return Ok(0.0);
        }
        let bufs = xs.iter().map(|t| f32_in("global norm", t)).collect::<Result<Vec<_>>>()?;
        super::reduce::sum_squares_many(&bufs)
    }
    fn scale(&self, x: &mut Tensor, s: f32) -> Result<()> {
        match x.cuda_storage_mut() {
            Some(CudaStorage::F32(d)) => super::reduce::scale(d, s),
            _ => Err(Error::Input("scaling gradients: GPU gradients of parameters are f32".into())),
        }
    }
    fn empty(&self, dims: &[usize]) -> Result<Tensor> {
        Tensor::from_cuda(CudaStorage::BF16(self.alloc::<bf16>(dims.iter().product())?), dims)
    }
    fn gather(&self, src: &Tensor, dims: &[usize], pieces: &[(usize, usize, usize)]) -> Result<Tensor> {
        fn copy<T: super::DeviceElem>(
            cu: &super::Cuda,
            src: &DevBuf<T>,
            n: usize,
            pieces: &[(usize, usize, usize)],
        ) -> Result<DevBuf<T>> {
            crate::backend::check_pieces("gather", src.len(), n, pieces)?;
            let mut out = cu.alloc::<T>(n)?;
            for &(d, s, len) in pieces {
                cu.copy_view(&mut out.slice_mut(d..d + len), &src.slice(s..s + len))?;
            }
            Ok(out)
        }
        let n = dims.iter().product();
        let storage = match src.cuda_storage() {
            Some(CudaStorage::BF16(s)) => CudaStorage::BF16(copy(self, s, n, pieces)?),
            Some(CudaStorage::F32(s)) => CudaStorage::F32(copy(self, s, n, pieces)?),
            _ => return Err(Error::DType { op: "gather", expected: DType::BF16, got: src.dtype() }),
        };
        Tensor::from_cuda(storage, dims)
    }
}
