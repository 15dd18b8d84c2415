//! Launch wrappers for kernels/rmsnorm.cu: RMSNorm forward (plain and fused with the residual add)
//! and backward over bf16 device buffers, f32 rstd and weight gradient, with the names and argument
//! order of `backend::cpu::rmsnorm`; plus the host twins (`twin`), which CI tests against the CPU
//! backend without a GPU.

use super::layernorm::{row_config, rows_of};
use super::tensor::{bf16_in, f32_in, new_bf16, wrap_bf16, wrap_f32};
use super::{bf16, cuda, DevBuf, Kernel, LaunchConfig};
use crate::abi::{KILN_LN_DW_ROWS, KILN_LN_DW_THREADS};
use crate::{Result, Tensor};

/// out = w * (x * rstd) per row of C, saving rstd; rows = rstd.len().
pub fn rmsnorm_forward(
    out: &mut DevBuf<bf16>,
    rstd: &mut DevBuf<f32>,
    x: &DevBuf<bf16>,
    w: &DevBuf<bf16>,
    c: usize,
    eps: f32,
) -> Result<()> {
    let rows = rstd.len();
    rows_of("cuda::rmsnorm_forward", c, rows, &[("out", out.len()), ("x", x.len())], &[("w", w.len())])?;
    if rows == 0 {
        return Ok(());
    }
    let cu = cuda()?;
    let (rows32, c32) = (rows as i32, c as i32);
    let mut l = cu.launch_builder(Kernel::RmsnormForward);
    l.arg(out).arg(rstd).arg(x).arg(w).arg(&rows32).arg(&c32).arg(&eps);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { l.launch(row_config(rows)) }?;
    Ok(())
}

/// h = a + r (rounded to bf16), then out = rmsnorm(h) as `rmsnorm_forward`; h is what the
/// backward takes as x. A Llama block's residual add followed by the next sublayer's norm.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_residual_forward(
    h: &mut DevBuf<bf16>,
    out: &mut DevBuf<bf16>,
    rstd: &mut DevBuf<f32>,
    a: &DevBuf<bf16>,
    r: &DevBuf<bf16>,
    w: &DevBuf<bf16>,
    c: usize,
    eps: f32,
) -> Result<()> {
    let rows = rstd.len();
    let per_row = [("h", h.len()), ("out", out.len()), ("a", a.len()), ("r", r.len())];
    rows_of("cuda::rmsnorm_residual_forward", c, rows, &per_row, &[("w", w.len())])?;
    if rows == 0 {
        return Ok(());
    }
    let cu = cuda()?;
    let (rows32, c32) = (rows as i32, c as i32);
    let mut l = cu.launch_builder(Kernel::RmsnormResidualForward);
    l.arg(h).arg(out).arg(rstd).arg(a).arg(r).arg(w).arg(&rows32).arg(&c32).arg(&eps);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { l.launch(row_config(rows)) }?;
    Ok(())
}

/// dx (bf16) and dw (f32, overwritten, summed over rows in a fixed order: the same bits every
/// run). Either output may be skipped; rows = rstd.len().
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dx: Option<&mut DevBuf<bf16>>,
    dw: Option<&mut DevBuf<f32>>,
    dout: &DevBuf<bf16>,
    x: &DevBuf<bf16>,
    w: &DevBuf<bf16>,
    rstd: &DevBuf<f32>,
    c: usize,
) -> Result<()> {
    let op = "cuda::rmsnorm_backward";
    let rows = rstd.len();
    let mut per_row = vec![("dout", dout.len()), ("x", x.len())];
    if let Some(dx) = &dx {
        per_row.push(("dx", dx.len()));
    }
    let mut per_col = vec![("w", w.len())];
    if let Some(dw) = &dw {
        per_col.push(("dw", dw.len()));
    }
    rows_of(op, c, rows, &per_row, &per_col)?;
    let cu = cuda()?;
    let (rows32, c32) = (rows as i32, c as i32);
    if let Some(dx) = dx {
        if rows > 0 {
            let mut l = cu.launch_builder(Kernel::RmsnormBackwardDx);
            l.arg(dx).arg(dout).arg(x).arg(w).arg(rstd).arg(&rows32).arg(&c32);
            // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
            unsafe { l.launch(row_config(rows)) }?;
        }
    }
    let Some(dw) = dw else { return Ok(()) };
    let groups = rows.div_ceil(KILN_LN_DW_ROWS as usize);
    let threads = KILN_LN_DW_THREADS as usize;
    let stripes = c.div_ceil(threads);
    // Scratch [groups, C] (at least one element: alloc(0) is not a valid pointer to pass).
    let mut partial = cu.alloc::<f32>((groups * c).max(1))?;
    if groups > 0 {
        let mut l = cu.launch_builder(Kernel::RmsnormBackwardDwPartial);
        l.arg_mut(&mut partial).arg(dout).arg(x).arg(rstd).arg(&rows32).arg(&c32);
        let cfg = LaunchConfig {
            grid_dim: (groups as u32, stripes as u32, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
        unsafe { l.launch(cfg) }?;
    }
    let groups32 = groups as i32;
    let mut l = cu.launch_builder(Kernel::RmsnormBackwardDwFinish);
    l.arg(dw).arg(&partial).arg(&groups32).arg(&c32);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { l.launch(super::reduce::colsum_config(c)) }?;
    Ok(())
}

/// The host twins of kernels/rmsnorm.cuh (kernels/host/rmsnorm.cu), over f32 host arrays.
pub mod twin {
    extern "C" {
        pub fn kiln_host_rmsnorm_forward(
            out: *mut f32,
            rstd: *mut f32,
            x: *const f32,
            w: *const f32,
            rows: i64,
            c: i64,
            eps: f32,
        );
        pub fn kiln_host_rmsnorm_backward(
            dx: *mut f32,
            dw: *mut f32,
            dout: *const f32,
            x: *const f32,
            w: *const f32,
            rstd: *const f32,
            rows: i64,
            c: i64,
        );
    }

    /// The forward with the CPU's mean square (the CPU's bits); rows = rstd.len().
    pub fn rmsnorm_forward(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], c: usize, eps: f32) {
        let rows = rstd.len();
        assert!(out.len() == rows * c && x.len() == rows * c && w.len() == c);
        // SAFETY: every array has the length the twin reads or writes (asserted above).
        unsafe {
            kiln_host_rmsnorm_forward(
                out.as_mut_ptr(),
                rstd.as_mut_ptr(),
                x.as_ptr(),
                w.as_ptr(),
                rows as i64,
                c as i64,
                eps,
            )
        }
    }

    /// dx with the CPU's row sums; dw in the kernels' order (their bits). rows = rstd.len().
    pub fn rmsnorm_backward(
        dx: Option<&mut [f32]>,
        dw: Option<&mut [f32]>,
        dout: &[f32],
        x: &[f32],
        w: &[f32],
        rstd: &[f32],
        c: usize,
    ) {
        let rows = rstd.len();
        assert!(dout.len() == rows * c && x.len() == rows * c && w.len() == c);
        assert!(dx.as_ref().is_none_or(|d| d.len() == rows * c) && dw.as_ref().is_none_or(|d| d.len() == c));
        let dx = dx.map_or(std::ptr::null_mut(), |s| s.as_mut_ptr());
        let dw = dw.map_or(std::ptr::null_mut(), |s| s.as_mut_ptr());
        // SAFETY: lengths asserted above; a null output is skipped by the twin.
        unsafe {
            kiln_host_rmsnorm_backward(
                dx,
                dw,
                dout.as_ptr(),
                x.as_ptr(),
                w.as_ptr(),
                rstd.as_ptr(),
                rows as i64,
                c as i64,
            )
        }
    }
}

impl crate::backend::RmsNorm for super::Cuda {
    fn rmsnorm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        const OP: &str = "rmsnorm";
        let (c, rows) = (x.shape().last(), x.shape().rows());
        let (xd, wd) = (bf16_in(OP, x)?, bf16_in(OP, w)?);
        let mut rstd = self.alloc::<f32>(rows)?;
        let out = new_bf16(x.dims(), |o| rmsnorm_forward(o, &mut rstd, xd, wd, c, eps))?;
        Ok((out, wrap_f32(rstd, &[rows])?))
    }

    fn rmsnorm_backward(
        &self,
        dout: &Tensor,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        needs: [bool; 2],
    ) -> Result<[Option<Tensor>; 2]> {
        const OP: &str = "rmsnorm backward";
        let c = x.shape().last();
        let (g, xd, wd, rd) = (bf16_in(OP, dout)?, bf16_in(OP, x)?, bf16_in(OP, w)?, f32_in(OP, rstd)?);
        let mut dx = needs[0].then(|| self.alloc::<bf16>(x.numel())).transpose()?;
        // dw in f32 for the f32 master weight (the bf16 cast passes it through).
        let mut dw = needs[1].then(|| self.alloc::<f32>(c)).transpose()?;
        rmsnorm_backward(dx.as_mut(), dw.as_mut(), g, xd, wd, rd, c)?;
        Ok([dx.map(|d| wrap_bf16(d, x.dims())).transpose()?, dw.map(|d| wrap_f32(d, &[c])).transpose()?])
    }

    fn add_rmsnorm(&self, x: &Tensor, r: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor, Tensor)> {
        const OP: &str = "add_rmsnorm";
        let (c, rows) = (x.shape().last(), x.shape().rows());
        let (xd, rd, wd) = (bf16_in(OP, x)?, bf16_in(OP, r)?, bf16_in(OP, w)?);
        let mut rstd = self.alloc::<f32>(rows)?;
        let mut s = self.alloc::<bf16>(x.numel())?;
        let out = new_bf16(x.dims(), |o| rmsnorm_residual_forward(&mut s, o, &mut rstd, xd, rd, wd, c, eps))?;
        Ok((wrap_bf16(s, x.dims())?, out, wrap_f32(rstd, &[rows])?))
    }
}
