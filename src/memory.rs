//! Heap accounting for the `kiln` binary: a global allocator that wraps the system's and keeps the
//! peak of live bytes, meaning bytes allocated and not parked in the CPU buffer pool. That is the
//! memory kiln's tensors, gradients and optimizer state actually hold, which the resident peak
//! (VmHWM) overstates by whatever the pool and the system allocator keep around.
//!
//! The binary installs it (src/main.rs); library users and tests that do not get `None`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The counting allocator; install with `#[global_allocator]`.
pub struct CountingAlloc;

static INSTALLED: AtomicBool = AtomicBool::new(false);
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK_LIVE: AtomicUsize = AtomicUsize::new(0);

#[inline]
fn grew(by: usize) {
    let now = CURRENT.fetch_add(by, Ordering::Relaxed) + by;
    let live = now.saturating_sub(crate::backend::cpu::pool::parked_bytes());
    PEAK_LIVE.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every method forwards to the system allocator and only counts bytes.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwards the caller's pointer and layout to the system allocator, under GlobalAlloc's contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwards the caller's pointer and layout to the system allocator, under GlobalAlloc's contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwards the caller's pointer and layout to the system allocator, under GlobalAlloc's contract.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwards the caller's pointer and layout to the system allocator, under GlobalAlloc's contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

impl CountingAlloc {
    /// Marks the allocator as installed; call once from main.
    pub fn install(&self) {
        INSTALLED.store(true, Ordering::Relaxed);
    }
}

/// Starts a new peak measurement from what is live now.
pub fn reset_peak() {
    let live = CURRENT.load(Ordering::Relaxed).saturating_sub(crate::backend::cpu::pool::parked_bytes());
    PEAK_LIVE.store(live, Ordering::Relaxed);
}

/// The peak of live heap bytes since start or the last `reset_peak`, when the binary installed
/// `CountingAlloc`.
pub fn peak_live_bytes() -> Option<usize> {
    INSTALLED.load(Ordering::Relaxed).then(|| PEAK_LIVE.load(Ordering::Relaxed))
}
