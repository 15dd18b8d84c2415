//! Launch wrappers for kernels/xent.cu: fused softmax cross-entropy over bf16 (or f32) logits on
//! the device, with the names and argument order of `backend::cpu::xent` (the backward works in
//! place, so its `dlogits` holds the logits on entry); plus the host twins (`twin`), which CI tests
//! against the CPU backend without a GPU.

use super::tensor::{bf16_in, f32_in, i32_in, wrap_f32, CudaStorage};
use super::{bf16, cuda, DevBuf, DeviceElem, Kernel, LaunchConfig};
use crate::abi::KILN_XENT_THREADS;
use crate::backend::XentSaved;
use crate::{DType, Error, Result, Tensor};

/// The targets' label for "no target here" (PyTorch's ignore_index), equal to `cpu::xent::IGNORE`.
pub const IGNORE: i32 = crate::abi::KILN_XENT_IGNORE as i32;

fn check(op: &'static str, logits: usize, rows: usize, v: usize, pitch: usize, others: &[(&str, usize)]) -> Result<()> {
    if v == 0 || pitch < v || pitch > i32::MAX as usize || rows > i32::MAX as usize {
        return Err(Error::Shape {
            op,
            msg: format!("V = {v}, pitch {pitch} and {rows} rows: need 0 < V <= pitch, all within i32"),
        });
    }
    if logits != rows * pitch {
        return Err(Error::Shape {
            op,
            msg: format!("logits have {logits} elements, expected rows * pitch = {rows} * {pitch}"),
        });
    }
    for &(name, len) in others {
        if len != rows {
            return Err(Error::Shape { op, msg: format!("{name} has {len} elements, expected one per row ({rows})") });
        }
    }
    Ok(())
}

/// One block per row.
fn config(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (KILN_XENT_THREADS as u32, 1, 1), shared_mem_bytes: 0 }
}

/// The logit types the kernels take: bf16 (what the GPU forward pass makes) and f32 (the CPU
/// twin's type, for comparing the two on the same values).
pub trait Logits: DeviceElem + sealed::Sealed {
    const FORWARD: Kernel;
    const BACKWARD: Kernel;
}
impl Logits for bf16 {
    const FORWARD: Kernel = Kernel::XentForward;
    const BACKWARD: Kernel = Kernel::XentBackward;
}
impl Logits for f32 {
    const FORWARD: Kernel = Kernel::XentForwardF32;
    const BACKWARD: Kernel = Kernel::XentBackwardF32;
}
mod sealed {
    pub trait Sealed {}
    impl Sealed for half::bf16 {}
    impl Sealed for f32 {}
}

/// Each row's lse and loss = lse - logit[target] (0 where the target is IGNORE), the rows of
/// `v` logits lying `pitch` elements apart; rows = targets.len(). Unlike the CPU twin it does not sum the losses (that would wait for the
/// device): `loss_sum` does, when the caller wants the number.
pub fn xent_forward<T: Logits>(
    losses: &mut DevBuf<f32>,
    lse: &mut DevBuf<f32>,
    logits: &DevBuf<T>,
    targets: &DevBuf<i32>,
    v: usize,
    pitch: usize,
) -> Result<()> {
    let rows = targets.len();
    check("cuda::xent_forward", logits.len(), rows, v, pitch, &[("losses", losses.len()), ("lse", lse.len())])?;
    if rows == 0 {
        return Ok(());
    }
    let cu = cuda()?;
    let (v32, p32) = (v as i32, pitch as i32);
    let mut l = cu.launch_builder(T::FORWARD);
    l.arg(losses).arg(lse).arg(logits).arg(targets).arg(&v32).arg(&p32);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { l.launch(config(rows)) }?;
    Ok(())
}

/// (sum of the row losses in row order, in f64; rows whose target is not IGNORE), as the CPU
/// twin's xent_forward returns them. Waits for the device.
pub fn loss_sum(losses: &DevBuf<f32>, targets: &[i32]) -> Result<(f64, usize)> {
    let cu = cuda()?;
    let l = cu.download(losses)?;
    let count = targets.iter().filter(|&&t| t != IGNORE).count();
    Ok((l.iter().take(targets.len()).map(|&x| x as f64).sum(), count))
}

/// dlogits = (softmax(logits) - onehot(target)) * scale, in place: `dlogits` holds the logits on
/// entry (the CPU twin's separate `logits` argument), rows of `v` values `pitch` apart, the
/// columns past v untouched; zero rows where the target is IGNORE.
pub fn xent_backward<T: Logits>(
    dlogits: &mut DevBuf<T>,
    lse: &DevBuf<f32>,
    targets: &DevBuf<i32>,
    v: usize,
    pitch: usize,
    scale: f32,
) -> Result<()> {
    let rows = targets.len();
    check("cuda::xent_backward", dlogits.len(), rows, v, pitch, &[("lse", lse.len())])?;
    if rows == 0 {
        return Ok(());
    }
    let cu = cuda()?;
    let (v32, p32) = (v as i32, pitch as i32);
    let mut l = cu.launch_builder(T::BACKWARD);
    l.arg(dlogits).arg(lse).arg(targets).arg(&v32).arg(&p32).arg(&scale);
    // SAFETY: the arguments are the kernel's, in its parameter order, and the buffer lengths checked above are the ones it indexes up to at this launch configuration.
    unsafe { l.launch(config(rows)) }?;
    Ok(())
}

/// The host twins of kernels/xent.cuh (kernels/host/xent.cu), over f32 host arrays.
pub mod twin {
    extern "C" {
        pub fn kiln_host_xent_forward(
            losses: *mut f32,
            lse: *mut f32,
            logits: *const f32,
            targets: *const i32,
            rows: i64,
            v: i64,
            lanes: i32,
        );
        pub fn kiln_host_xent_backward(
            dlogits: *mut f32,
            logits: *const f32,
            lse: *const f32,
            targets: *const i32,
            rows: i64,
            v: i64,
            scale: f32,
        );
    }

    /// lse and losses with the kernels' online recurrence over `lanes` simulated lanes (1..=1024),
    /// merged in lane order; rows = targets.len().
    pub fn xent_forward(losses: &mut [f32], lse: &mut [f32], logits: &[f32], targets: &[i32], v: usize, lanes: i32) {
        let rows = targets.len();
        assert!(losses.len() == rows && lse.len() == rows && logits.len() == rows * v);
        // SAFETY: lengths asserted above.
        unsafe {
            kiln_host_xent_forward(
                losses.as_mut_ptr(),
                lse.as_mut_ptr(),
                logits.as_ptr(),
                targets.as_ptr(),
                rows as i64,
                v as i64,
                lanes,
            )
        }
    }

    /// dlogits from the kernels' per-element formula; rows = targets.len().
    pub fn xent_backward(dlogits: &mut [f32], logits: &[f32], lse: &[f32], targets: &[i32], v: usize, scale: f32) {
        let rows = targets.len();
        assert!(dlogits.len() == rows * v && logits.len() == rows * v && lse.len() == rows);
        // SAFETY: lengths asserted above.
        unsafe {
            kiln_host_xent_backward(
                dlogits.as_mut_ptr(),
                logits.as_ptr(),
                lse.as_ptr(),
                targets.as_ptr(),
                rows as i64,
                v as i64,
                scale,
            )
        }
    }
}

impl crate::backend::CrossEntropy for super::Cuda {
    fn cross_entropy(&self, logits: &Tensor, targets: &Tensor, v: usize) -> Result<XentSaved> {
        const OP: &str = "cross_entropy";
        let (pitch, n) = (logits.shape().last(), logits.shape().rows());
        let td = targets.i32s()?;
        let ld = bf16_in(OP, logits)?;
        let td_dev = self.upload(td)?;
        let (mut losses, mut lse) = (self.alloc::<f32>(n)?, self.alloc::<f32>(n)?);
        xent_forward(&mut losses, &mut lse, ld, &td_dev, v, pitch)?;
        let (sum, count) = loss_sum(&losses, td)?;
        let targets = Tensor::from_cuda(CudaStorage::I32(td_dev), targets.dims())?;
        Ok(XentSaved { sum, count, lse: wrap_f32(lse, &[n])?, targets })
    }

    fn cross_entropy_backward(&self, mut logits: Tensor, saved: &XentSaved, scale: f32, v: usize) -> Result<Tensor> {
        const OP: &str = "cross_entropy backward";
        let pitch = logits.shape().last();
        let (lse, t) = (f32_in(OP, &saved.lse)?, i32_in(OP, &saved.targets)?);
        let dtype = logits.dtype();
        // The kernel turns logits into dlogits in place (cuda_storage_mut copies them first when
        // the tape still shares them).
        match logits.cuda_storage_mut() {
            Some(CudaStorage::BF16(d)) => xent_backward(d, lse, t, v, pitch, scale)?,
            _ => return Err(Error::DType { op: OP, expected: DType::BF16, got: dtype }),
        }
        Ok(logits)
    }
}
