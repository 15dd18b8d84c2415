//! The emulated CUDA device (`--device emu`): kiln's own kernels/*.cu, compiled by build.rs a
//! second time for the host, launched by the same wrappers that launch them on a GPU. The
//! emulator (kernels/emu/runtime.cpp, described in kernels/emu/README.md) runs every CUDA thread
//! as a fiber and every block on the CPU's cores, checks every memory access of the kernels
//! (bounds, uninitialised reads, alignment, shared-memory size, barriers) and counts the memory
//! traffic each launch moves. It is slow, a few thousand times slower than a GPU, and exact about
//! what the kernels do.

use super::runtime::{Event, LaunchConfig, Mem, Properties, Runtime, RuntimeKind};
use super::Kernel;
use crate::{Error, Result};
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::Mutex;

/// Counters of one emulated launch (kernels/emu/runtime.cpp's KilnEmuStats).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LaunchStats {
    /// Warp-level global memory requests, the 32-byte sectors they touched (distinct per
    /// request), and the bytes the threads asked for.
    pub global_requests: u64,
    pub global_sectors: u64,
    pub global_bytes: u64,
    /// Distinct sectors read plus distinct sectors written over the launch: the fewest the kernel
    /// could move.
    pub unique_sectors: u64,
    /// Warp-level shared memory requests, the wavefronts they took and the conflict-free count.
    pub shared_requests: u64,
    pub shared_wavefronts: u64,
    pub shared_ideal: u64,
    pub mma: u64,
    pub barriers: u64,
    pub blocks: u64,
    pub threads: u64,
    /// Floating-point operations the threads declared on CUDA cores (KILN_FLOPS in common.cuh).
    pub flops: u64,
    /// Blocks that ran: all of them, or a sample (`Emulator::sample`), whose counters above are
    /// scaled to the whole grid.
    pub run_blocks: u64,
}

impl LaunchStats {
    fn add(&mut self, o: &LaunchStats) {
        self.global_requests += o.global_requests;
        self.global_sectors += o.global_sectors;
        self.global_bytes += o.global_bytes;
        self.unique_sectors += o.unique_sectors;
        self.shared_requests += o.shared_requests;
        self.shared_wavefronts += o.shared_wavefronts;
        self.shared_ideal += o.shared_ideal;
        self.mma += o.mma;
        self.barriers += o.barriers;
        self.blocks += o.blocks;
        self.threads += o.threads;
        self.flops += o.flops;
        self.run_blocks += o.run_blocks;
    }
}

unsafe extern "C" {
    fn kiln_emu_error() -> *const c_char;
    fn kiln_emu_last_stats(out: *mut LaunchStats);
    fn kiln_emu_malloc(n: usize, zero: i32) -> u64;
    fn kiln_emu_free(p: u64);
    fn kiln_emu_htod(dst: u64, src: *const c_void, n: usize) -> i32;
    fn kiln_emu_dtoh(dst: *mut c_void, src: u64, n: usize) -> i32;
    fn kiln_emu_dtod(dst: u64, src: u64, n: usize) -> i32;
    fn kiln_emu_memset(dst: u64, byte: i32, n: usize) -> i32;
    fn kiln_emu_set_sample(blocks: u32);
    #[allow(clippy::too_many_arguments)]
    fn kiln_emu_tensor_map_encode_tiled(
        out: *mut c_void,
        elem: u32,
        rank: u32,
        addr: u64,
        dims: *const u64,
        strides: *const u64,
        boxes: *const u32,
        estrides: *const u32,
        swizzle: u32,
    ) -> i32;
    #[allow(clippy::too_many_arguments)]
    fn kiln_emu_launch(
        name: *const c_char,
        entry: unsafe extern "C" fn(*mut *mut c_void),
        bound: u32,
        gx: u32,
        gy: u32,
        gz: u32,
        bx: u32,
        by: u32,
        bz: u32,
        smem: u32,
        smem_optin: u32,
        args: *mut *mut c_void,
    ) -> i32;
}

fn last_error() -> String {
    // SAFETY: the runtime returns a NUL-terminated string it owns until the next call.
    unsafe { CStr::from_ptr(kiln_emu_error()) }.to_string_lossy().into_owned()
}

/// The emulator's cuTensorMapEncodeTiled (kernels/emu/runtime.cpp) for a bf16 tensor of `rank`
/// dimensions: `dims`, `boxes` and `estrides` have `rank` entries, `strides` (bytes) one fewer.
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode_tensor_map(
    out: &mut [u64; 16],
    rank: u32,
    addr: u64,
    dims: &[u64],
    strides: &[u64],
    boxes: &[u32],
    estrides: &[u32],
    swizzle: u32,
) -> Result<()> {
    let r = rank as usize;
    assert!(
        dims.len() == r && boxes.len() == r && estrides.len() == r && strides.len() + 1 == r,
        "tensor map arrays of rank {rank}"
    );
    // SAFETY: out is 128 writable bytes; the arrays hold `rank` (strides rank - 1) entries, checked above.
    let rc = unsafe {
        kiln_emu_tensor_map_encode_tiled(
            out.as_mut_ptr() as *mut c_void,
            2,
            rank,
            addr,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            estrides.as_ptr(),
            swizzle,
        )
    };
    if rc != 0 {
        return Err(Error::Cuda(last_error()));
    }
    Ok(())
}

pub(crate) fn free(p: u64) {
    // SAFETY: the emulator checks every device range itself and reports a bad one as an error; host pointers and lengths come from live slices.
    unsafe { kiln_emu_free(p) }
}

/// The emulated device. Its properties are an H100/H200's (sm_90), so the wrappers choose the
/// same kernels and launch shapes they would on one.
pub struct Emulator {
    props: Properties,
    names: HashMap<Kernel, CString>,
    optin: Mutex<HashMap<Kernel, u32>>,
    /// Per kernel: the launches and their summed counters, for `kiln bench kernels --device emu`.
    stats: Mutex<HashMap<Kernel, (u64, LaunchStats)>>,
    /// Every launch in order, while `record` is on (the predicted step needs each launch's own
    /// grid and counters, not their sums).
    log: Mutex<Option<Vec<(Kernel, LaunchStats)>>>,
}

pub fn open() -> Emulator {
    let names = Kernel::ALL.iter().map(|k| (*k, CString::new(k.name()).unwrap())).collect();
    Emulator {
        props: Properties {
            name: "emulated sm_90 (kiln's kernels on the CPU)".into(),
            sm_count: 132,
            max_shared_per_block: 232_448,
            compute_capability: (9, 0),
        },
        names,
        optin: Mutex::new(HashMap::new()),
        stats: Mutex::new(HashMap::new()),
        log: Mutex::new(None),
    }
}

fn check(rc: i32) -> Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::Cuda(last_error()))
    }
}

impl Emulator {
    /// Counters summed per kernel since the last `take_stats`, and clears them.
    pub fn take_stats(&self) -> Vec<(Kernel, u64, LaunchStats)> {
        let mut m = self.stats.lock().unwrap();
        let mut v: Vec<_> = m.drain().map(|(k, (n, s))| (k, n, s)).collect();
        v.sort_by_key(|(k, _, _)| k.name());
        v
    }

    /// Starts keeping every launch's counters in order (`true`), or stops and returns those kept.
    pub fn record(&self, on: bool) -> Vec<(Kernel, LaunchStats)> {
        let mut log = self.log.lock().unwrap();
        let kept = log.take().unwrap_or_default();
        if on {
            *log = Some(Vec::new());
        }
        kept
    }

    /// From now on, each launch of more than `blocks` blocks runs only `blocks` of them (evenly
    /// spaced, the first and last among them; 2 to 64) and reports its counters scaled to the whole grid,
    /// the distinct sectors estimated (kernels/emu/runtime.cpp's kiln_emu_set_sample). The skipped
    /// blocks write nothing, so results are garbage and the uninitialised-read checks are off: for
    /// counting a step too large to run whole. `None` runs every block again, checked.
    pub fn sample(&self, blocks: Option<u32>) {
        // SAFETY: a plain setter; the emulator takes its memory lock, so no launch is running.
        unsafe { kiln_emu_set_sample(blocks.unwrap_or(0)) }
    }
}

impl Runtime for Emulator {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Emulator
    }
    fn properties(&self) -> &Properties {
        &self.props
    }
    fn alloc(&self, bytes: usize, zero: bool) -> Result<Mem> {
        // SAFETY: the emulator checks every device range itself and reports a bad one as an error; host pointers and lengths come from live slices.
        let p = unsafe { kiln_emu_malloc(bytes, zero as i32) };
        if p == 0 {
            return Err(Error::Cuda(format!(
                "the emulated device cannot allocate {:.1} MB (host memory or its address range is exhausted)",
                bytes as f64 / 1e6
            )));
        }
        Ok(Mem::Emu(p, bytes).counted())
    }
    fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        // SAFETY: the emulator checks every device range itself and reports a bad one as an error; host pointers and lengths come from live slices.
        check(unsafe { kiln_emu_htod(dst, src.as_ptr() as *const c_void, src.len()) })
    }
    fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        // SAFETY: the emulator checks every device range itself and reports a bad one as an error; host pointers and lengths come from live slices.
        check(unsafe { kiln_emu_dtoh(dst.as_mut_ptr() as *mut c_void, src, dst.len()) })
    }
    fn dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // SAFETY: the emulator checks every device range itself and reports a bad one as an error; host pointers and lengths come from live slices.
        check(unsafe { kiln_emu_dtod(dst, src, bytes) })
    }
    fn memset(&self, dst: u64, byte: u8, bytes: usize) -> Result<()> {
        // SAFETY: the emulator checks every device range itself and reports a bad one as an error; host pointers and lengths come from live slices.
        check(unsafe { kiln_emu_memset(dst, byte as i32, bytes) })
    }
    unsafe fn launch(&self, k: Kernel, cfg: &LaunchConfig, args: &mut [*mut c_void]) -> Result<()> {
        let (entry, bound) = k.emu_entry();
        let optin = self.optin.lock().unwrap().get(&k).copied().unwrap_or(0);
        let (g, b) = (cfg.grid_dim, cfg.block_dim);
        // SAFETY: the emulator checks every device range itself and reports a bad one as an error; host pointers and lengths come from live slices.
        let rc = unsafe {
            kiln_emu_launch(
                self.names[&k].as_ptr(),
                entry,
                bound(),
                g.0,
                g.1,
                g.2,
                b.0,
                b.1,
                b.2,
                cfg.shared_mem_bytes,
                optin,
                args.as_mut_ptr(),
            )
        };
        let mut s = LaunchStats::default();
        // SAFETY: the emulator checks every device range itself and reports a bad one as an error; host pointers and lengths come from live slices.
        unsafe { kiln_emu_last_stats(&mut s) };
        if rc == 0 {
            let mut m = self.stats.lock().unwrap();
            let e = m.entry(k).or_default();
            e.0 += 1;
            e.1.add(&s);
            if let Some(log) = self.log.lock().unwrap().as_mut() {
                log.push((k, s));
            }
        }
        check(rc)
    }
    fn set_max_dynamic_shared(&self, k: Kernel, bytes: usize) -> Result<()> {
        if bytes > self.props.max_shared_per_block {
            return Err(Error::Cuda(format!(
                "cannot give kernel {} {bytes} bytes of dynamic shared memory: sm_90 allows at most {}",
                k.name(),
                self.props.max_shared_per_block
            )));
        }
        self.optin.lock().unwrap().insert(k, bytes as u32);
        Ok(())
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn event(&self) -> Result<Event> {
        Ok(Event::Emu(std::time::Instant::now()))
    }
    fn elapsed_ms(&self, start: &Event, end: &Event) -> Result<f32> {
        match (start, end) {
            (Event::Emu(a), Event::Emu(b)) => Ok(b.duration_since(*a).as_secs_f32() * 1e3),
            _ => Err(Error::Cuda("event timing: events of another runtime".into())),
        }
    }
}
