//! The device runtime under the CUDA backend: device memory, copies, memset, events, kernel launch
//! and device properties, with two implementations: the NVIDIA driver (`driver.rs`, through
//! cudarc, the only code that talks to the driver) and the emulated device (`emu.rs`, kiln's
//! kernels compiled for the host). The launch wrappers of every op family build a `Launch` and do
//! not know which one runs.

use super::Kernel;
use crate::{Error, Result};
use std::ffi::c_void;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid_dim: (u32, u32, u32),
    pub block_dim: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

/// What a device reports about itself.
#[derive(Clone, Debug)]
pub struct Properties {
    pub name: String,
    pub sm_count: usize,
    /// The most dynamic shared memory one block may opt in to, in bytes.
    pub max_shared_per_block: usize,
    pub compute_capability: (i32, i32),
}

/// Which implementation runs the CUDA backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeKind {
    /// An NVIDIA GPU through the driver.
    Driver,
    /// The emulated device: kiln's kernels on the CPU, every access checked.
    Emulator,
}

/// A timing mark on the device's stream.
pub enum Event {
    Driver(cudarc::driver::CudaEvent),
    Emu(std::time::Instant),
}

/// One device allocation (its address, and for the emulated device its size); freed on drop.
/// Every allocation is counted while it lives (`memory_use`).
pub enum Mem {
    Driver(cudarc::driver::CudaSlice<u8>, u64),
    Emu(u64, usize),
}

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

impl Mem {
    /// Counts a new allocation (the runtimes call this as they create one).
    pub(crate) fn counted(self) -> Self {
        let now = LIVE.fetch_add(self.bytes(), Ordering::Relaxed) + self.bytes();
        PEAK.fetch_max(now, Ordering::Relaxed);
        self
    }
    pub fn ptr(&self) -> u64 {
        match self {
            Mem::Driver(_, p) | Mem::Emu(p, _) => *p,
        }
    }
    pub fn bytes(&self) -> usize {
        match self {
            Mem::Driver(s, _) => s.len(),
            Mem::Emu(_, b) => *b,
        }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        LIVE.fetch_sub(self.bytes(), Ordering::Relaxed);
        if let Mem::Emu(p, _) = self {
            super::emu::free(*p);
        }
    }
}

/// Device memory that kiln's buffers hold now, and the most they held at once since the last
/// `reset_peak` (the high-water mark of what kiln asked the pool for; the driver's pool may keep
/// more in reserve), in bytes.
pub fn memory_use() -> (usize, usize) {
    (LIVE.load(Ordering::Relaxed), PEAK.load(Ordering::Relaxed))
}

/// Starts a new high-water mark at what is live now.
pub fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// The operations the CUDA backend needs from a device. All work runs in order on one stream.
pub trait Runtime: Send + Sync {
    fn kind(&self) -> RuntimeKind;
    fn properties(&self) -> &Properties;
    /// `bytes` of device memory, zeroed or not.
    fn alloc(&self, bytes: usize, zero: bool) -> Result<Mem>;
    fn htod(&self, dst: u64, src: &[u8]) -> Result<()>;
    /// Waits for the stream, then copies.
    fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()>;
    fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;
    fn memset(&self, dst: u64, byte: u8, bytes: usize) -> Result<()>;
    /// Launches `k`; `args[i]` points at the i-th argument's value (cuLaunchKernel's kernelParams).
    ///
    /// # Safety
    /// The arguments must be the kernel's, in order, and every device pointer among them valid for
    /// what the kernel does with it at this launch configuration.
    unsafe fn launch(&self, k: Kernel, cfg: &LaunchConfig, args: &mut [*mut c_void]) -> Result<()>;
    /// Lets `k` use up to `bytes` of dynamic shared memory (above the 48 KB default).
    fn set_max_dynamic_shared(&self, k: Kernel, bytes: usize) -> Result<()>;
    /// Waits for every launched kernel; a kernel's asynchronous fault surfaces here.
    fn sync(&self) -> Result<()>;
    fn event(&self) -> Result<Event>;
    fn elapsed_ms(&self, start: &Event, end: &Event) -> Result<f32>;
}

/// Element types device buffers hold.
pub trait DeviceElem: bytemuck::Pod + Default + Send + Sync + 'static {}
impl<T: bytemuck::Pod + Default + Send + Sync + 'static> DeviceElem for T {}

/// `len` elements of T in device memory, owned.
pub struct DevBuf<T> {
    mem: Mem,
    len: usize,
    _t: PhantomData<T>,
}

/// A borrowed range of a device buffer.
#[derive(Clone, Copy)]
pub struct DevView<'a, T> {
    ptr: u64,
    len: usize,
    _t: PhantomData<&'a T>,
}

/// A mutably borrowed range of a device buffer.
pub struct DevViewMut<'a, T> {
    ptr: u64,
    len: usize,
    _t: PhantomData<&'a mut T>,
}

fn range(r: impl RangeBounds<usize>, len: usize) -> (usize, usize) {
    let start = match r.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match r.end_bound() {
        Bound::Included(&e) => e + 1,
        Bound::Excluded(&e) => e,
        Bound::Unbounded => len,
    };
    assert!(start <= end && end <= len, "device slice {start}..{end} out of range for {len} elements");
    (start, end)
}

impl<T> DevBuf<T> {
    pub(crate) fn from_mem(mem: Mem, len: usize) -> Self {
        DevBuf { mem, len, _t: PhantomData }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The device address of element 0.
    pub fn ptr(&self) -> u64 {
        self.mem.ptr()
    }
    pub fn num_bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
    pub fn slice(&self, r: impl RangeBounds<usize>) -> DevView<'_, T> {
        let (s, e) = range(r, self.len);
        DevView { ptr: self.ptr() + (s * std::mem::size_of::<T>()) as u64, len: e - s, _t: PhantomData }
    }
    pub fn slice_mut(&mut self, r: impl RangeBounds<usize>) -> DevViewMut<'_, T> {
        let (s, e) = range(r, self.len);
        DevViewMut { ptr: self.ptr() + (s * std::mem::size_of::<T>()) as u64, len: e - s, _t: PhantomData }
    }
}

impl<T: DeviceElem> DevBuf<T> {
    /// A device copy.
    pub fn try_clone(&self) -> Result<Self> {
        let cu = super::cuda()?;
        let mut d = cu.alloc::<T>(self.len)?;
        cu.copy(&mut d, self)?;
        Ok(d)
    }
}

/// A device copy; panics if the device cannot make one (use `try_clone` to handle that).
impl<T: DeviceElem> Clone for DevBuf<T> {
    fn clone(&self) -> Self {
        self.try_clone().unwrap_or_else(|e| panic!("copying a device buffer failed: {e}"))
    }
}

impl<T> DevView<'_, T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl<T> DevViewMut<'_, T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

/// A value a kernel takes: device memory (passed as its address) or a plain scalar or struct.
pub trait KernelArg {
    /// The argument's bytes, as the kernel's parameter holds them.
    fn bytes(&self) -> Vec<u8>;
}

/// Plain values passed by value.
///
/// # Safety
/// The type must be `repr(C)` (or primitive) with the layout of the kernel parameter it is
/// passed as: its bytes are copied into the launch's argument list as they are.
pub unsafe trait KernelScalar: Copy {}
// SAFETY: a primitive is passed by value with the same bytes the kernel's parameter holds.
unsafe impl KernelScalar for i32 {}
// SAFETY: a primitive is passed by value with the same bytes the kernel's parameter holds.
unsafe impl KernelScalar for u32 {}
// SAFETY: a primitive is passed by value with the same bytes the kernel's parameter holds.
unsafe impl KernelScalar for i64 {}
// SAFETY: a primitive is passed by value with the same bytes the kernel's parameter holds.
unsafe impl KernelScalar for u64 {}
// SAFETY: a primitive is passed by value with the same bytes the kernel's parameter holds.
unsafe impl KernelScalar for f32 {}
// SAFETY: a primitive is passed by value with the same bytes the kernel's parameter holds.
unsafe impl KernelScalar for f64 {}

impl<T: KernelScalar> KernelArg for T {
    fn bytes(&self) -> Vec<u8> {
        let p = self as *const T as *const u8;
        // SAFETY: T is plain data of size_of::<T>() bytes (KernelScalar's contract).
        unsafe { std::slice::from_raw_parts(p, std::mem::size_of::<T>()) }.to_vec()
    }
}
impl<T> KernelArg for DevBuf<T> {
    fn bytes(&self) -> Vec<u8> {
        self.ptr().to_ne_bytes().to_vec()
    }
}
impl<T> KernelArg for DevView<'_, T> {
    fn bytes(&self) -> Vec<u8> {
        self.ptr.to_ne_bytes().to_vec()
    }
}
impl<T> KernelArg for DevViewMut<'_, T> {
    fn bytes(&self) -> Vec<u8> {
        self.ptr.to_ne_bytes().to_vec()
    }
}

/// One kernel launch being put together: `cu.launch_builder(k).arg(&out).arg(&n).launch(cfg)`.
pub struct Launch<'a> {
    rt: &'a dyn Runtime,
    kernel: Kernel,
    // Each argument in its own 8-byte-aligned storage, as kernelParams points at them.
    args: Vec<Vec<u64>>,
}

impl<'a> Launch<'a> {
    pub(crate) fn new(rt: &'a dyn Runtime, kernel: Kernel) -> Self {
        Launch { rt, kernel, args: Vec::new() }
    }
    pub fn arg<A: KernelArg + ?Sized>(&mut self, a: &A) -> &mut Self {
        let b = a.bytes();
        let mut words = vec![0u64; b.len().div_ceil(8).max(1)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..b.len()].copy_from_slice(&b);
        self.args.push(words);
        self
    }
    /// An argument the kernel writes, borrowed mutably so that nothing else holds it meanwhile.
    pub fn arg_mut<A: KernelArg + ?Sized>(&mut self, a: &mut A) -> &mut Self {
        self.arg(&*a)
    }
    /// Launches the kernel.
    ///
    /// # Safety
    /// As `Runtime::launch`: the arguments are the kernel's and the configuration is one the
    /// kernel handles.
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<()> {
        // A wrong count would hand the kernel garbage (or read past kernelParams): refuse it here,
        // where the message can name the kernel.
        if self.args.len() != self.kernel.params() {
            let (n, want) = (self.args.len(), self.kernel.params());
            return Err(launch_failed(self.kernel, format!("given {n} arguments, but it declares {want} parameters")));
        }
        let mut ptrs: Vec<*mut c_void> = self.args.iter_mut().map(|a| a.as_mut_ptr() as *mut c_void).collect();
        // SAFETY: the caller of this unsafe fn guarantees the arguments (Launch::launch's contract).
        unsafe { self.rt.launch(self.kernel, &cfg, &mut ptrs) }
    }
}

/// A launch failure as kiln's error.
pub fn launch_failed(k: Kernel, msg: impl std::fmt::Display) -> Error {
    Error::Cuda(format!("kernel {} failed to launch: {msg}", k.name()))
}
