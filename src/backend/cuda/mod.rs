//! The CUDA backend (feature `cuda`): one device, one stream, the kernels of kernels/*.cu, and
//! launch wrappers with the same names and argument order as their CPU twins in `backend::cpu`.
//!
//! The device is a `Runtime` (runtime.rs): an NVIDIA GPU through the driver (driver.rs), or the
//! emulated device (emu.rs) that runs the same kernel source on the CPU with a memcheck. One
//! process uses one of them, chosen by `select` before the first use (`--device cuda` or
//! `--device emu`); the wrappers do not know which runs.

use crate::{Error, Result};
pub use half::bf16;
use std::sync::OnceLock;

pub mod adamw;
pub mod adamw8bit;
pub mod attention;
pub mod bench;
pub mod driver;
pub mod elementwise;
pub mod embedding;
pub mod emu;
pub mod gemm;
pub mod layernorm;
pub mod nf4;
pub mod reduce;
pub mod rmsnorm;
pub mod rope;
pub mod runtime;
pub mod tensor;
pub mod tma;
pub mod traffic;
pub mod xent;

pub use runtime::{
    DevBuf, DevView, DevViewMut, DeviceElem, Event, KernelArg, KernelScalar, Launch, LaunchConfig, Properties, Runtime,
    RuntimeKind,
};

pub use tensor::{auto, backend, download, emu, ensure_available, is_emulated, select_driver, upload, CudaStorage};

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// ptxas' resource report (`-Xptxas -v`) for every kernel and architecture, as build.rs kept it.
pub const PTXAS_REPORT: &str = include_str!(concat!(env!("OUT_DIR"), "/ptxas.txt"));

enum Rt {
    Driver(driver::Driver),
    Emu(emu::Emulator),
}

/// The CUDA device kiln runs on: a GPU or the emulated device.
pub struct Cuda {
    rt: Rt,
}

static SELECTED: OnceLock<RuntimeKind> = OnceLock::new();
static CUDA: OnceLock<std::result::Result<Cuda, String>> = OnceLock::new();

/// Chooses the runtime behind the CUDA backend for this process, before its first use. Choosing
/// again the same one is fine; another one is an error.
pub fn select(kind: RuntimeKind) -> Result<()> {
    let chosen = *SELECTED.get_or_init(|| kind);
    if chosen != kind {
        return Err(Error::Cuda(format!(
            "this process already runs the CUDA backend on {}; it cannot switch to {}",
            describe(chosen),
            describe(kind)
        )));
    }
    Ok(())
}

fn describe(k: RuntimeKind) -> &'static str {
    match k {
        RuntimeKind::Driver => "the GPU",
        RuntimeKind::Emulator => "the emulated device",
    }
}

/// The runtime this process chose, if it chose one yet.
pub fn selected() -> Option<RuntimeKind> {
    SELECTED.get().copied()
}

/// Whether an NVIDIA GPU and its driver are present (opens nothing).
pub fn gpu_present() -> bool {
    driver::gpu_present()
}

/// For tests: the GPU where one is present, else the emulated device (KILN_TEST_DEVICE=emu or gpu
/// forces one). Returns which, so the test can say so.
pub fn select_for_tests() -> RuntimeKind {
    let kind = match std::env::var("KILN_TEST_DEVICE").as_deref() {
        Ok("emu") => RuntimeKind::Emulator,
        Ok("gpu") | Ok("cuda") => RuntimeKind::Driver,
        _ if gpu_present() => RuntimeKind::Driver,
        _ => RuntimeKind::Emulator,
    };
    let _ = select(kind);
    *SELECTED.get().unwrap()
}

/// The device, initialised on first use (ordinal 0: pick another GPU with CUDA_VISIBLE_DEVICES).
pub fn cuda() -> Result<&'static Cuda> {
    CUDA.get_or_init(|| {
        let kind = *SELECTED.get_or_init(|| RuntimeKind::Driver);
        match kind {
            RuntimeKind::Driver => driver::open().map(|d| Cuda { rt: Rt::Driver(d) }),
            RuntimeKind::Emulator => Ok(Cuda { rt: Rt::Emu(emu::open()) }),
        }
    })
    .as_ref()
    .map_err(|e| Error::Cuda(e.clone()))
}

impl Cuda {
    fn rt(&self) -> &dyn Runtime {
        match &self.rt {
            Rt::Driver(d) => d,
            Rt::Emu(e) => e,
        }
    }
    pub fn kind(&self) -> RuntimeKind {
        self.rt().kind()
    }
    pub fn is_emulated(&self) -> bool {
        self.kind() == RuntimeKind::Emulator
    }
    /// The driver runtime, when this is a GPU (for the vendor baselines of `kiln bench`).
    pub fn driver(&self) -> Option<&driver::Driver> {
        match &self.rt {
            Rt::Driver(d) => Some(d),
            Rt::Emu(_) => None,
        }
    }
    /// The emulated device, when this is one (for its counters).
    pub fn emulator(&self) -> Option<&emu::Emulator> {
        match &self.rt {
            Rt::Emu(e) => Some(e),
            Rt::Driver(_) => None,
        }
    }
    pub fn name(&self) -> &str {
        &self.rt().properties().name
    }
    pub fn sm_count(&self) -> usize {
        self.rt().properties().sm_count
    }
    /// The most dynamic shared memory one block may opt in to, in bytes.
    pub fn max_shared_per_block(&self) -> usize {
        self.rt().properties().max_shared_per_block
    }
    pub fn compute_capability(&self) -> (i32, i32) {
        self.rt().properties().compute_capability
    }
    /// `n` uninitialised elements (on the emulated device: poisoned, and reading them is a fault).
    pub fn alloc<T: DeviceElem>(&self, n: usize) -> Result<DevBuf<T>> {
        Ok(DevBuf::from_mem(self.rt().alloc(n * std::mem::size_of::<T>(), false)?, n))
    }
    /// `n` zeroed elements.
    pub fn zeros<T: DeviceElem>(&self, n: usize) -> Result<DevBuf<T>> {
        Ok(DevBuf::from_mem(self.rt().alloc(n * std::mem::size_of::<T>(), true)?, n))
    }
    /// A device copy of `host`.
    pub fn upload<T: DeviceElem>(&self, host: &[T]) -> Result<DevBuf<T>> {
        let d = self.alloc::<T>(host.len())?;
        if !host.is_empty() {
            self.rt().htod(d.ptr(), bytemuck::cast_slice(host))?;
        }
        Ok(d)
    }
    /// A host copy of `d` (waits for the stream).
    pub fn download<T: DeviceElem>(&self, d: &DevBuf<T>) -> Result<Vec<T>> {
        self.download_view(&d.slice(..))
    }
    /// A host copy of a view (waits for the stream).
    pub fn download_view<T: DeviceElem>(&self, d: &DevView<'_, T>) -> Result<Vec<T>> {
        let mut v = vec![T::default(); d.len()];
        if !v.is_empty() {
            self.rt().dtoh(bytemuck::cast_slice_mut(&mut v), d.ptr())?;
        }
        Ok(v)
    }
    /// dst = src, device to device (same length).
    pub fn copy<T: DeviceElem>(&self, dst: &mut DevBuf<T>, src: &DevBuf<T>) -> Result<()> {
        if dst.len() != src.len() {
            return Err(Error::Cuda(format!("device copy of {} elements into {}", src.len(), dst.len())));
        }
        self.rt().dtod(dst.ptr(), src.ptr(), src.num_bytes())
    }
    /// Zeroes a range of a buffer.
    pub fn memset_zeros<T: DeviceElem>(&self, d: &mut DevViewMut<'_, T>) -> Result<()> {
        self.rt().memset(d.ptr(), 0, d.len() * std::mem::size_of::<T>())
    }
    /// A launch of kernel `k`, to give arguments to.
    pub fn launch_builder(&self, k: Kernel) -> Launch<'_> {
        Launch::new(self.rt(), k)
    }
    /// Lets `k` use up to `bytes` of dynamic shared memory (above the 48 KB default).
    pub fn set_max_dynamic_shared(&self, k: Kernel, bytes: usize) -> Result<()> {
        self.rt().set_max_dynamic_shared(k, bytes)
    }
    /// Waits for every launched kernel; a kernel's asynchronous fault surfaces here.
    pub fn sync(&self) -> Result<()> {
        self.rt().sync()
    }
    /// A timing mark, recorded now on the stream.
    pub fn event(&self) -> Result<Event> {
        self.rt().event()
    }
    /// Milliseconds between two marks (waits for the second).
    pub fn elapsed_ms(&self, start: &Event, end: &Event) -> Result<f32> {
        self.rt().elapsed_ms(start, end)
    }
}

/// A grid-stride launch over `items` work items, `per_block` of them per block of `block`
/// threads: enough blocks for every item, but at most `per_sm` per SM (the kernel's loop covers
/// the rest, so a huge launch does not pay block scheduling for nothing). At least one block.
pub fn grid_stride(cu: &Cuda, items: usize, per_block: usize, block: u32, per_sm: usize) -> LaunchConfig {
    let blocks = items.div_ceil(per_block.max(1)).clamp(1, per_sm * cu.sm_count().max(1));
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// `ceil(n / block)` blocks of `block` threads, no dynamic shared memory.
pub fn grid_1d(n: usize, block: u32) -> LaunchConfig {
    let blocks = n.div_ceil(block as usize).max(1) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

impl crate::backend::Backend for Cuda {
    fn compute_dtype(&self) -> crate::DType {
        crate::DType::BF16
    }
    fn device(&self) -> crate::Device {
        crate::Device::Cuda(0)
    }
    fn sync(&self) -> Result<()> {
        Cuda::sync(self)
    }
    fn memory_use(&self) -> Option<(usize, usize)> {
        Some(runtime::memory_use())
    }
    fn reset_peak_memory(&self) {
        runtime::reset_peak()
    }
}

// No fused LoRA kernel yet: the trait's defaults compose LoRA from the GEMM, cast, dropout and add
// kernels; the NF4 layer's base product is the fused NF4 GEMM (nf4.rs overrides nf4_matmul).
impl crate::backend::Lora for Cuda {
    fn as_backend(&self) -> &dyn crate::backend::Backend {
        self
    }
}

impl Cuda {
    /// dst = src for two ranges of equal length, device to device: rows of a KV cache, one
    /// position of each sequence in a batch.
    pub fn copy_view<T: DeviceElem>(&self, dst: &mut DevViewMut<'_, T>, src: &DevView<'_, T>) -> Result<()> {
        if dst.len() != src.len() {
            return Err(Error::Cuda(format!("device copy of {} elements into {}", src.len(), dst.len())));
        }
        if src.is_empty() {
            return Ok(());
        }
        self.rt().dtod(dst.ptr(), src.ptr(), src.len() * std::mem::size_of::<T>())
    }
}
