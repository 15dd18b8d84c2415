//! Launch wrappers for kernels/reduce.cu: the sum of squares behind clipping by global gradient
//! norm (deterministic, over one buffer or many at once) and x *= s, with the names and argument
//! order of `backend::cpu::reduce`; plus the host twins (`twin`), which replay the kernels'
//! summation order on the CPU.

use super::{cuda, DevBuf, Kernel, LaunchConfig};
use crate::abi::KILN_REDUCE_THREADS;
use crate::Result;

/// The launch of a column-sum finish kernel over `cols` columns (kernels/colsum.cuh): one block
/// of 32 x KILN_COLSUM_WARPS threads per 32 columns.
pub(crate) fn colsum_config(cols: usize) -> LaunchConfig {
    let warps = crate::abi::KILN_COLSUM_WARPS as u32;
    LaunchConfig { grid_dim: (cols.div_ceil(32) as u32, 1, 1), block_dim: (32, warps, 1), shared_mem_bytes: 0 }
}

fn blocks(n: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (n, 1, 1), block_dim: (KILN_REDUCE_THREADS as u32, 1, 1), shared_mem_bytes: 0 }
}

/// sum of x[i]^2, returned as f64 (waits for the device). Deterministic; within
/// (twin::per_thread(n) + 1) * 2^-24 relative of the exact sum.
pub fn sum_squares(x: &DevBuf<f32>) -> Result<f64> {
    sum_squares_many(&[x])
}

/// The sum of squares over every buffer of `xs` together (one download for a whole set of
/// gradients): each buffer's per-block partial sums land in its own range of one scratch buffer,
/// which a single block then adds in order. The result depends only on the buffers' contents,
/// lengths and order.
pub fn sum_squares_many(xs: &[&DevBuf<f32>]) -> Result<f64> {
    let counts: Vec<usize> = xs.iter().map(|x| twin::blocks(x.len())).collect();
    let total: usize = counts.iter().sum();
    if total == 0 {
        return Ok(0.0);
    }
    let cu = cuda()?;
    let mut partial = cu.alloc::<f64>(total)?;
    let mut off = 0;
    for (x, &nb) in xs.iter().zip(&counts) {
        if nb == 0 {
            continue;
        }
        let n = x.len() as i64;
        let mut slots = partial.slice_mut(off..off + nb);
        let mut l = cu.launch_builder(Kernel::ReduceSumSquaresPartial);
        l.arg_mut(&mut slots).arg(*x).arg(&n);
        // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
        unsafe { l.launch(blocks(nb as u32)) }?;
        off += nb;
    }
    let mut out = cu.alloc::<f64>(1)?;
    let total32 = total as i32;
    let mut l = cu.launch_builder(Kernel::ReduceSumSquaresFinish);
    l.arg_mut(&mut out).arg(&partial).arg(&total32);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { l.launch(blocks(1)) }?;
    Ok(cu.download(&out)?[0])
}

/// x *= s
pub fn scale(x: &mut DevBuf<f32>, s: f32) -> Result<()> {
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let cu = cuda()?;
    let n64 = n as i64;
    // A grid-stride loop: enough blocks for one 4-element group per thread, capped at 8 per SM.
    let nb = n.div_ceil(4 * KILN_REDUCE_THREADS as usize).clamp(1, 8 * cu.sm_count().max(1));
    let mut l = cu.launch_builder(Kernel::ReduceScale);
    l.arg(x).arg(&s).arg(&n64);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { l.launch(blocks(nb as u32)) }?;
    Ok(())
}

/// The host twins of kernels/reduce.cuh (kernels/host/reduce.cu): the grid the kernels use, and
/// a replay of their summation, which the kernels match bit for bit.
pub mod twin {
    extern "C" {
        pub fn kiln_host_reduce_blocks(n: i64) -> i32;
        pub fn kiln_host_reduce_per_thread(n: i64) -> i64;
        pub fn kiln_host_reduce_sum_squares_partial(partial: *mut f64, x: *const f32, n: i64);
        pub fn kiln_host_reduce_sum_squares_finish(partial: *const f64, n: i32) -> f64;
        pub fn kiln_host_reduce_scale(x: *mut f32, s: f32, n: i64);
    }

    /// Partial sums (blocks) the device writes for a buffer of n elements.
    pub fn blocks(n: usize) -> usize {
        // SAFETY: pure arithmetic.
        unsafe { kiln_host_reduce_blocks(n as i64) as usize }
    }

    /// The most elements one device thread folds in f32 for a buffer of n elements.
    pub fn per_thread(n: usize) -> usize {
        // SAFETY: pure arithmetic.
        unsafe { kiln_host_reduce_per_thread(n as i64) as usize }
    }

    /// `super::sum_squares_many` replayed on the host: the device's bits.
    pub fn sum_squares_many(xs: &[&[f32]]) -> f64 {
        let mut partial = Vec::new();
        for x in xs {
            let start = partial.len();
            partial.resize(start + blocks(x.len()), 0f64);
            // SAFETY: the twin writes blocks(x.len()) partials, the room just made.
            unsafe { kiln_host_reduce_sum_squares_partial(partial[start..].as_mut_ptr(), x.as_ptr(), x.len() as i64) };
        }
        if partial.is_empty() {
            return 0.0;
        }
        // SAFETY: partial holds partial.len() sums.
        unsafe { kiln_host_reduce_sum_squares_finish(partial.as_ptr(), partial.len() as i32) }
    }

    /// `super::sum_squares` replayed on the host.
    pub fn sum_squares(x: &[f32]) -> f64 {
        sum_squares_many(&[x])
    }

    pub fn scale(x: &mut [f32], s: f32) {
        // SAFETY: x has x.len() elements.
        unsafe { kiln_host_reduce_scale(x.as_mut_ptr(), s, x.len() as i64) }
    }
}
