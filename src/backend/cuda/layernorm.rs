//! Launch wrappers for kernels/layernorm.cu: LayerNorm forward (plain and fused with the residual
//! add) and backward over bf16 device buffers, f32 statistics and parameter gradients, with the
//! names and argument order of `backend::cpu::layernorm`; plus the host twins (`twin`), which CI
//! tests against the CPU backend without a GPU.

use super::tensor::{bf16_in, f32_in, new_bf16, wrap_bf16, wrap_f32};
use super::{bf16, cuda, DevBuf, Kernel, LaunchConfig};
use crate::abi::{KILN_LN_BLOCK_ROWS, KILN_LN_DW_ROWS, KILN_LN_DW_THREADS, KILN_LN_WARPS};
use crate::backend::RowStats;
use crate::{Error, Result, Tensor};

/// Checks every buffer against rows x C (per row) or C (per column); shared with rmsnorm.rs.
pub(super) fn rows_of(
    op: &'static str,
    c: usize,
    rows: usize,
    per_row: &[(&str, usize)],
    per_col: &[(&str, usize)],
) -> Result<()> {
    if c == 0 {
        return Err(Error::Shape { op, msg: "C = 0: a norm needs at least one channel".into() });
    }
    if c > i32::MAX as usize || rows > i32::MAX as usize {
        return Err(Error::Shape {
            op,
            msg: format!("{rows} rows of {c}: the kernels index rows and columns with i32"),
        });
    }
    for &(name, len) in per_row {
        if len != rows * c {
            return Err(Error::Shape {
                op,
                msg: format!("{name} has {len} elements, expected rows * C = {rows} * {c}"),
            });
        }
    }
    for &(name, len) in per_col {
        if len != c {
            return Err(Error::Shape { op, msg: format!("{name} has {len} elements, expected C = {c}") });
        }
    }
    Ok(())
}

/// KILN_LN_WARPS warps per block, one row at a time each, over the block's KILN_LN_BLOCK_ROWS rows
/// (the norm kernels' launch shape).
pub(super) fn row_config(rows: usize) -> LaunchConfig {
    let warps = KILN_LN_WARPS as usize;
    LaunchConfig {
        grid_dim: (rows.div_ceil(KILN_LN_BLOCK_ROWS as usize).max(1) as u32, 1, 1),
        block_dim: (32 * warps as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// out = (x - mean) * rstd * w + b per row of C, saving mean and rstd; rows = mean.len().
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    out: &mut DevBuf<bf16>,
    mean: &mut DevBuf<f32>,
    rstd: &mut DevBuf<f32>,
    x: &DevBuf<bf16>,
    w: &DevBuf<bf16>,
    b: &DevBuf<bf16>,
    c: usize,
    eps: f32,
) -> Result<()> {
    let rows = mean.len();
    rows_of(
        "cuda::layernorm_forward",
        c,
        rows,
        &[("out", out.len()), ("x", x.len())],
        &[("w", w.len()), ("b", b.len())],
    )?;
    if rstd.len() != rows {
        return Err(Error::Shape {
            op: "cuda::layernorm_forward",
            msg: format!("rstd has {} rows, mean {rows}", rstd.len()),
        });
    }
    if rows == 0 {
        return Ok(());
    }
    let cu = cuda()?;
    let (rows32, c32) = (rows as i32, c as i32);
    let mut l = cu.launch_builder(Kernel::LayernormForward);
    l.arg(out).arg(mean).arg(rstd).arg(x).arg(w).arg(b).arg(&rows32).arg(&c32).arg(&eps);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { l.launch(row_config(rows)) }?;
    Ok(())
}

/// h = a + r (rounded to bf16), then out = layernorm(h) as `layernorm_forward`; h is what the
/// backward takes as x. GPT-2's residual stream followed by the next block's norm, in one pass.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_residual_forward(
    h: &mut DevBuf<bf16>,
    out: &mut DevBuf<bf16>,
    mean: &mut DevBuf<f32>,
    rstd: &mut DevBuf<f32>,
    a: &DevBuf<bf16>,
    r: &DevBuf<bf16>,
    w: &DevBuf<bf16>,
    b: &DevBuf<bf16>,
    c: usize,
    eps: f32,
) -> Result<()> {
    let rows = mean.len();
    let op = "cuda::layernorm_residual_forward";
    rows_of(
        op,
        c,
        rows,
        &[("h", h.len()), ("out", out.len()), ("a", a.len()), ("r", r.len())],
        &[("w", w.len()), ("b", b.len())],
    )?;
    if rstd.len() != rows {
        return Err(Error::Shape { op, msg: format!("rstd has {} rows, mean {rows}", rstd.len()) });
    }
    if rows == 0 {
        return Ok(());
    }
    let cu = cuda()?;
    let (rows32, c32) = (rows as i32, c as i32);
    let mut l = cu.launch_builder(Kernel::LayernormResidualForward);
    l.arg(h).arg(out).arg(mean).arg(rstd).arg(a).arg(r).arg(w).arg(b).arg(&rows32).arg(&c32).arg(&eps);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { l.launch(row_config(rows)) }?;
    Ok(())
}

/// dx (bf16) and dw, db (f32, overwritten, summed over rows in a fixed order: the same bits every
/// run). Any output may be skipped; rows = mean.len().
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dx: Option<&mut DevBuf<bf16>>,
    dw: Option<&mut DevBuf<f32>>,
    db: Option<&mut DevBuf<f32>>,
    dout: &DevBuf<bf16>,
    x: &DevBuf<bf16>,
    w: &DevBuf<bf16>,
    mean: &DevBuf<f32>,
    rstd: &DevBuf<f32>,
    c: usize,
) -> Result<()> {
    let op = "cuda::layernorm_backward";
    let rows = mean.len();
    let mut per_row = vec![("dout", dout.len()), ("x", x.len())];
    if let Some(dx) = &dx {
        per_row.push(("dx", dx.len()));
    }
    let mut per_col = vec![("w", w.len())];
    if let Some(dw) = &dw {
        per_col.push(("dw", dw.len()));
    }
    if let Some(db) = &db {
        per_col.push(("db", db.len()));
    }
    rows_of(op, c, rows, &per_row, &per_col)?;
    if rstd.len() != rows {
        return Err(Error::Shape { op, msg: format!("rstd has {} rows, mean {rows}", rstd.len()) });
    }
    let cu = cuda()?;
    let (rows32, c32) = (rows as i32, c as i32);
    if let Some(dx) = dx {
        if rows > 0 {
            let mut l = cu.launch_builder(Kernel::LayernormBackwardDx);
            l.arg(dx).arg(dout).arg(x).arg(w).arg(mean).arg(rstd).arg(&rows32).arg(&c32);
            // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
            unsafe { l.launch(row_config(rows)) }?;
        }
    }
    if dw.is_none() && db.is_none() {
        return Ok(());
    }
    let groups = rows.div_ceil(KILN_LN_DW_ROWS as usize);
    let threads = KILN_LN_DW_THREADS as usize;
    let stripes = c.div_ceil(threads);
    // Scratch [groups, 2, C] (at least one element: alloc(0) is not a valid pointer to pass).
    let mut partial = cu.alloc::<f32>((groups * 2 * c).max(1))?;
    if groups > 0 {
        let mut l = cu.launch_builder(Kernel::LayernormBackwardDwdbPartial);
        l.arg_mut(&mut partial).arg(dout).arg(x).arg(mean).arg(rstd).arg(&rows32).arg(&c32);
        let cfg = LaunchConfig {
            grid_dim: (groups as u32, stripes as u32, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
        unsafe { l.launch(cfg) }?;
    }
    let groups32 = groups as i32;
    let mut l = cu.launch_builder(Kernel::LayernormBackwardDwdbFinish);
    // A skipped output is a null pointer to the kernel.
    let null: u64 = 0;
    match dw {
        Some(dw) => l.arg(dw),
        None => l.arg(&null),
    };
    match db {
        Some(db) => l.arg(db),
        None => l.arg(&null),
    };
    l.arg(&partial).arg(&groups32).arg(&c32);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { l.launch(super::reduce::colsum_config(2 * c)) }?;
    Ok(())
}

/// The host twins of kernels/layernorm.cuh (kernels/host/layernorm.cu), over f32 host arrays.
pub mod twin {
    extern "C" {
        pub fn kiln_host_layernorm_forward(
            out: *mut f32,
            mean: *mut f32,
            rstd: *mut f32,
            x: *const f32,
            w: *const f32,
            b: *const f32,
            rows: i64,
            c: i64,
            eps: f32,
        );
        pub fn kiln_host_layernorm_backward(
            dx: *mut f32,
            dw: *mut f32,
            db: *mut f32,
            dout: *const f32,
            x: *const f32,
            w: *const f32,
            mean: *const f32,
            rstd: *const f32,
            rows: i64,
            c: i64,
        );
    }

    fn opt_ptr(o: Option<&mut [f32]>) -> *mut f32 {
        o.map_or(std::ptr::null_mut(), |s| s.as_mut_ptr())
    }

    /// The forward with the CPU's serial row sums (the CPU's bits); rows = mean.len().
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward(
        out: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        x: &[f32],
        w: &[f32],
        b: &[f32],
        c: usize,
        eps: f32,
    ) {
        let rows = mean.len();
        assert!(out.len() == rows * c && x.len() == rows * c && rstd.len() == rows && w.len() == c && b.len() == c);
        // SAFETY: every array has the length the twin reads or writes (asserted above).
        unsafe {
            kiln_host_layernorm_forward(
                out.as_mut_ptr(),
                mean.as_mut_ptr(),
                rstd.as_mut_ptr(),
                x.as_ptr(),
                w.as_ptr(),
                b.as_ptr(),
                rows as i64,
                c as i64,
                eps,
            )
        }
    }

    /// dx with the CPU's row sums; dw and db in the kernels' order (their bits). rows = mean.len().
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward(
        dx: Option<&mut [f32]>,
        dw: Option<&mut [f32]>,
        db: Option<&mut [f32]>,
        dout: &[f32],
        x: &[f32],
        w: &[f32],
        mean: &[f32],
        rstd: &[f32],
        c: usize,
    ) {
        let rows = mean.len();
        assert!(dout.len() == rows * c && x.len() == rows * c && rstd.len() == rows && w.len() == c);
        assert!(dx.as_ref().is_none_or(|d| d.len() == rows * c));
        assert!(dw.as_ref().is_none_or(|d| d.len() == c) && db.as_ref().is_none_or(|d| d.len() == c));
        // SAFETY: lengths asserted above; a null output is skipped by the twin.
        unsafe {
            kiln_host_layernorm_backward(
                opt_ptr(dx),
                opt_ptr(dw),
                opt_ptr(db),
                dout.as_ptr(),
                x.as_ptr(),
                w.as_ptr(),
                mean.as_ptr(),
                rstd.as_ptr(),
                rows as i64,
                c as i64,
            )
        }
    }
}

impl crate::backend::Norm for super::Cuda {
    fn layernorm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<(Tensor, RowStats)> {
        const OP: &str = "layernorm";
        let (c, rows) = (x.shape().last(), x.shape().rows());
        let (xd, wd, bd) = (bf16_in(OP, x)?, bf16_in(OP, w)?, bf16_in(OP, b)?);
        let (mut mean, mut rstd) = (self.alloc::<f32>(rows)?, self.alloc::<f32>(rows)?);
        let out = new_bf16(x.dims(), |o| layernorm_forward(o, &mut mean, &mut rstd, xd, wd, bd, c, eps))?;
        Ok((out, RowStats { mean: wrap_f32(mean, &[rows])?, rstd: wrap_f32(rstd, &[rows])? }))
    }

    fn layernorm_backward(
        &self,
        dout: &Tensor,
        x: &Tensor,
        w: &Tensor,
        stats: &RowStats,
        needs: [bool; 3],
    ) -> Result<[Option<Tensor>; 3]> {
        const OP: &str = "layernorm backward";
        let c = x.shape().last();
        let (g, xd, wd) = (bf16_in(OP, dout)?, bf16_in(OP, x)?, bf16_in(OP, w)?);
        let (mean, rstd) = (f32_in(OP, &stats.mean)?, f32_in(OP, &stats.rstd)?);
        let mut dx = needs[0].then(|| self.alloc::<bf16>(x.numel())).transpose()?;
        // dw, db: f32 for the f32 masters (the bf16 cast passes them through).
        let mut dw = needs[1].then(|| self.alloc::<f32>(c)).transpose()?;
        let mut db = needs[2].then(|| self.alloc::<f32>(c)).transpose()?;
        layernorm_backward(dx.as_mut(), dw.as_mut(), db.as_mut(), g, xd, wd, mean, rstd, c)?;
        Ok([
            dx.map(|d| wrap_bf16(d, x.dims())).transpose()?,
            dw.map(|d| wrap_f32(d, &[c])).transpose()?,
            db.map(|d| wrap_f32(d, &[c])).transpose()?,
        ])
    }

    fn add_layernorm(
        &self,
        x: &Tensor,
        r: &Tensor,
        w: &Tensor,
        b: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor, RowStats)> {
        const OP: &str = "add_layernorm";
        let (c, rows) = (x.shape().last(), x.shape().rows());
        let (xd, rd, wd, bd) = (bf16_in(OP, x)?, bf16_in(OP, r)?, bf16_in(OP, w)?, bf16_in(OP, b)?);
        let (mut mean, mut rstd) = (self.alloc::<f32>(rows)?, self.alloc::<f32>(rows)?);
        let mut s = self.alloc::<bf16>(x.numel())?;
        let out = new_bf16(x.dims(), |o| {
            layernorm_residual_forward(&mut s, o, &mut mean, &mut rstd, xd, rd, wd, bd, c, eps)
        })?;
        let stats = RowStats { mean: wrap_f32(mean, &[rows])?, rstd: wrap_f32(rstd, &[rows])? };
        Ok((wrap_bf16(s, x.dims())?, out, stats))
    }
}
