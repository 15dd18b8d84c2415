//! The CUDA backend (feature `cuda`): one device, one stream, the kernels of kernels/*.cu loaded
//! from fatbins embedded at build time, and launch wrappers with the same names and argument
//! order as their CPU twins in `backend::cpu`.
//!
//! cudarc loads libcuda at run time, so a binary built with the feature starts anywhere; `cuda()`
//! checks for the driver before touching it (cudarc panics without one) and turns every missing
//! piece into an error that says what is missing. Device memory comes from the driver's
//! stream-ordered pool (cuMemAllocAsync) with its release threshold raised to "never", so a freed
//! buffer stays in the pool and a training step after the first allocates without cudaMalloc.

use crate::{Error, Result};
use cudarc::driver::sys;
pub use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr,
    DevicePtrMut, DeviceRepr, DriverError, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
pub use half::bf16;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

pub mod adamw;
pub mod attention;
pub mod bench;
pub mod elementwise;
pub mod embedding;
pub mod gemm;
pub mod layernorm;
pub mod reduce;
pub mod xent;

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// ptxas' resource report (`-Xptxas -v`) for every kernel and architecture, as build.rs kept it.
pub const PTXAS_REPORT: &str = include_str!(concat!(env!("OUT_DIR"), "/ptxas.txt"));

/// The CUDA device kiln runs on: its context, its one stream and every kernel, loaded.
pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<Kernel, CudaFunction>,
    _modules: Vec<Arc<CudaModule>>,
    name: String,
    sm_count: usize,
    max_shared_per_block: usize,
    compute_capability: (i32, i32),
}

/// The device, initialised on first use (ordinal 0: pick another GPU with CUDA_VISIBLE_DEVICES).
pub fn cuda() -> Result<&'static Cuda> {
    static CUDA: OnceLock<std::result::Result<Cuda, String>> = OnceLock::new();
    CUDA.get_or_init(init).as_ref().map_err(|e| Error::Cuda(e.clone()))
}

fn init() -> std::result::Result<Cuda, String> {
    // cudarc panics on a missing libcuda; ask first.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA device: the NVIDIA driver library (libcuda.so) was not found on this machine. \
                    Run on a machine with an NVIDIA GPU and driver, or use --device cpu."
            .into());
    }
    let n = CudaContext::device_count().map_err(|e| format!("no CUDA device: the driver did not start ({e})"))?;
    if n < 1 {
        return Err("no CUDA device: the driver found no GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)".into());
    }
    let ctx = CudaContext::new(0).map_err(|e| format!("cannot open CUDA device 0: {e}"))?;
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
    Ok(Cuda { ctx, stream, functions, _modules: modules, name, sm_count, max_shared_per_block, compute_capability })
}

/// Raises the default memory pool's release threshold so freed memory stays cached in the pool
/// instead of going back to the driver at every synchronisation.
fn keep_pool_memory(ctx: &CudaContext) {
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

impl Cuda {
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The one stream every kiln kernel runs on, in order.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// A loaded kernel.
    pub fn func(&self, k: Kernel) -> &CudaFunction {
        // init() loads every Kernel or fails, so the entry exists.
        &self.functions[&k]
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }
    /// The most dynamic shared memory one block may opt in to, in bytes.
    pub fn max_shared_per_block(&self) -> usize {
        self.max_shared_per_block
    }
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }
    /// `n` uninitialised elements.
    pub fn alloc<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        unsafe { self.stream.alloc::<T>(n.max(1)) }.map_err(|e| oom(e, n * std::mem::size_of::<T>()))
    }
    /// `n` zeroed elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(|e| oom(e, n * std::mem::size_of::<T>()))
    }
    /// A device copy of `host`.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            return self.alloc(0);
        }
        self.stream.clone_htod(host).map_err(|e| oom(e, std::mem::size_of_val(host)))
    }
    /// A host copy of `d` (waits for the stream).
    pub fn download<T: DeviceRepr + Clone + Default>(&self, d: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(d).map_err(|e| Error::Cuda(format!("device-to-host copy failed: {e}")))
    }
    /// Waits for every launched kernel; a kernel's asynchronous fault surfaces here.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| Error::Cuda(format!("a CUDA kernel failed: {e}")))
    }
    /// An event with timing enabled, recorded now on the stream.
    pub fn event(&self) -> Result<CudaEvent> {
        self.stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| Error::Cuda(format!("cannot record a CUDA event: {e}")))
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
        Error::Cuda(format!("CUDA allocation or copy of {bytes} bytes failed: {e}"))
    }
}

/// `ceil(n / block)` blocks of `block` threads, no dynamic shared memory.
pub fn grid_1d(n: usize, block: u32) -> LaunchConfig {
    let blocks = n.div_ceil(block as usize).max(1) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// A failed launch as kiln's error.
pub fn launch_err(e: DriverError) -> Error {
    Error::Cuda(format!("kernel launch failed: {e}"))
}
