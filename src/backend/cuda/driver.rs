//! The NVIDIA driver runtime (through cudarc, the only code in kiln that talks to the driver).
//!
//! cudarc loads libcuda at run time, so a binary built with the feature starts anywhere; `open`
//! checks for the driver before touching it (cudarc panics without one). Device memory comes from
//! the driver's stream-ordered pool (cuMemAllocAsync) with its release threshold raised to
//! "never", so a freed buffer stays in the pool and a training step after the first allocates
//! without cudaMalloc.

use super::runtime::{Event, LaunchConfig, Mem, Properties, Runtime, RuntimeKind};
use super::{Kernel, ARCHS, FATBINS};
use crate::{Error, Result};
use cudarc::driver::{sys, CudaContext, CudaFunction, CudaModule, CudaStream, DevicePtr, DriverError};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

pub struct Driver {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<Kernel, CudaFunction>,
    _modules: Vec<Arc<CudaModule>>,
    props: Properties,
}

/// Whether the driver library is present and sees at least one GPU (starts nothing else).
pub fn gpu_present() -> bool {
    // SAFETY: only looks for the driver library; nothing is called in it.
    if !unsafe { sys::is_culib_present() } {
        return false;
    }
    matches!(CudaContext::device_count(), Ok(n) if n >= 1)
}

pub fn open() -> std::result::Result<Driver, String> {
    // cudarc panics on a missing libcuda; ask first.
    // SAFETY: only looks for the driver library; nothing is called in it.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA device: the NVIDIA driver library (libcuda.so) was not found on this machine. \
                    Run on a machine with an NVIDIA GPU and driver, use --device emu for the emulated GPU, \
                    or --device cpu."
            .into());
    }
    let n = CudaContext::device_count().map_err(|e| format!("no CUDA device: the driver did not start ({e})"))?;
    if n < 1 {
        return Err("no CUDA device: the driver found no GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)".into());
    }
    let ctx = CudaContext::new(0).map_err(|e| format!("cannot open CUDA device 0: {e}"))?;
    // One stream: cudarc's cross-stream event tracking has nothing to order.
    // SAFETY: called right after the context is created, before any stream or event uses it.
    unsafe { ctx.disable_event_tracking() };
    let attr = |a| ctx.attribute(a).map_err(|e| format!("cannot query CUDA device 0: {e}"));
    use sys::CUdevice_attribute as A;
    let sm_count = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
    let max_shared_per_block = attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
    let compute_capability = (
        attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
    );
    let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
    keep_pool_memory(&ctx);
    let stream = ctx.default_stream();
    let mut modules = Vec::new();
    let mut functions = HashMap::new();
    for (family, image) in FATBINS {
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec())).map_err(|e| {
            format!(
                "cannot load the {family} kernels on {name} (compute capability {}.{}): {e}. This kiln was built \
                 with machine code for sm_{{{ARCHS}}}; rebuild with KILN_CUDA_ARCHS including this GPU's.",
                compute_capability.0, compute_capability.1
            )
        })?;
        for k in Kernel::ALL.iter().filter(|k| k.family() == *family) {
            let f = module
                .load_function(k.name())
                .map_err(|e| format!("kernel {} missing from the {family} fatbin: {e}", k.name()))?;
            functions.insert(*k, f);
        }
        modules.push(module);
    }
    let props = Properties { name, sm_count, max_shared_per_block, compute_capability };
    Ok(Driver { ctx, stream, functions, _modules: modules, props })
}

/// Raises the default memory pool's release threshold so freed memory stays cached in the pool
/// instead of going back to the driver at every synchronisation.
fn keep_pool_memory(ctx: &CudaContext) {
    // SAFETY: the context is current on this thread, and the driver writes `pool` before it is read.
    unsafe {
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS {
            let mut threshold: u64 = u64::MAX;
            let _ = sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut std::ffi::c_void,
            );
        }
    }
}

fn oom(e: DriverError, bytes: usize) -> Error {
    if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::Cuda(format!(
            "out of GPU memory allocating {:.1} MB. Use a smaller batch or sequence length, \
             --gradient-checkpointing, or a GPU with more memory.",
            bytes as f64 / 1e6
        ))
    } else {
        Error::Cuda(format!("CUDA allocation of {bytes} bytes failed: {e}"))
    }
}

fn copy_err(what: &str, e: DriverError) -> Error {
    Error::Cuda(format!("CUDA {what} failed: {e}"))
}

impl Driver {
    /// cuTensorMapEncodeTiled for a bf16 tensor (no interleave, 128-byte L2 promotion, zeros
    /// outside the tensor); the arguments were checked by `Tiled2d::check`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn encode_tensor_map(
        &self,
        out: &mut super::tma::TensorMap,
        addr: u64,
        dims: &[u64],
        strides: &[u64],
        boxes: &[u32],
        estrides: &[u32],
        swizzle: super::tma::Swizzle,
    ) -> Result<()> {
        use super::tma::Swizzle;
        use sys::CUtensorMapSwizzle_enum as S;
        let sw = match swizzle {
            Swizzle::None => S::CU_TENSOR_MAP_SWIZZLE_NONE,
            Swizzle::B32 => S::CU_TENSOR_MAP_SWIZZLE_32B,
            Swizzle::B64 => S::CU_TENSOR_MAP_SWIZZLE_64B,
            Swizzle::B128 => S::CU_TENSOR_MAP_SWIZZLE_128B,
        };
        self.ctx.bind_to_thread().map_err(|e| copy_err("context", e))?;
        // SAFETY: out is a CUtensorMap's 128 bytes (same layout: 16 u64, 64-byte aligned); the
        // arrays hold dims.len() entries (strides one fewer), as the rank passed says.
        let rc = unsafe {
            sys::cuTensorMapEncodeTiled(
                out as *mut super::tma::TensorMap as *mut sys::CUtensorMap,
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                dims.len() as u32,
                addr as *mut c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                estrides.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sw,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        rc.result().map_err(|e| Error::Cuda(format!("cuTensorMapEncodeTiled failed: {e}")))
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl Runtime for Driver {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Driver
    }
    fn properties(&self) -> &Properties {
        &self.props
    }
    fn alloc(&self, bytes: usize, zero: bool) -> Result<Mem> {
        let n = bytes.max(1);
        // SAFETY: uninitialised device memory is never read before a kernel or copy writes it (the emulated device checks this).
        let s = if zero { self.stream.alloc_zeros::<u8>(n) } else { unsafe { self.stream.alloc::<u8>(n) } }
            .map_err(|e| oom(e, bytes))?;
        let ptr = s.device_ptr(&self.stream).0;
        Ok(Mem::Driver(s, ptr).counted())
    }
    fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| copy_err("context", e))?;
        // SAFETY: the caller's DevBuf owns dst for src.len() bytes; the copy completes before the host slice can change (one stream, synchronised before any host reuse).
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| copy_err("host-to-device copy", e))?;
        // The source is the caller's memory: finish before it can change.
        self.sync()
    }
    fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| copy_err("context", e))?;
        // SAFETY: src is a live device range of dst.len() bytes; dtoh is followed by a stream synchronise before dst is read.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| copy_err("device-to-host copy", e))?;
        self.sync()
    }
    fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| copy_err("context", e))?;
        // SAFETY: both ranges are live device memory of `bytes` bytes, owned by the caller's buffers.
        unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .map_err(|e| copy_err("device copy", e))
    }
    fn memset(&self, dst: u64, byte: u8, bytes: usize) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| copy_err("context", e))?;
        // SAFETY: dst is a live device range of `bytes` bytes owned by the caller's buffer.
        unsafe { cudarc::driver::result::memset_d8_async(dst, byte, bytes, self.stream.cu_stream()) }
            .map_err(|e| copy_err("memset", e))
    }
    unsafe fn launch(&self, k: Kernel, cfg: &LaunchConfig, args: &mut [*mut c_void]) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| copy_err("context", e))?;
        let f = self.functions[&k].cu_function();
        // SAFETY: the caller guarantees the arguments (Runtime::launch's contract); f belongs to this context.
        unsafe {
            cudarc::driver::result::launch_kernel(
                f,
                cfg.grid_dim,
                cfg.block_dim,
                cfg.shared_mem_bytes,
                self.stream.cu_stream(),
                args,
            )
        }
        .map_err(|e| super::runtime::launch_failed(k, e))
    }
    fn set_max_dynamic_shared(&self, k: Kernel, bytes: usize) -> Result<()> {
        use sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        self.functions[&k].set_attribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32).map_err(|e| {
            Error::Cuda(format!("cannot give kernel {} {bytes} bytes of dynamic shared memory: {e}", k.name()))
        })
    }
    fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| Error::Cuda(format!("a CUDA kernel failed: {e}")))
    }
    fn event(&self) -> Result<Event> {
        self.stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map(Event::Driver)
            .map_err(|e| Error::Cuda(format!("cannot record a CUDA event: {e}")))
    }
    fn elapsed_ms(&self, start: &Event, end: &Event) -> Result<f32> {
        match (start, end) {
            (Event::Driver(a), Event::Driver(b)) => {
                a.elapsed_ms(b).map_err(|e| Error::Cuda(format!("event timing failed: {e}")))
            }
            _ => Err(Error::Cuda("event timing: events of another runtime".into())),
        }
    }
}
