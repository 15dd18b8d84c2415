//! The emulated device's checks against deliberate breaks: each fault is caught and the error says
//! where (kernel, block, thread, and the source line, shared array or allocation offset). The
//! faults are switched on by launch arguments of kernels/selftest.cu, or made by launching a real
//! kernel the wrong way from Rust, as a broken wrapper would. Every test here runs on the
//! emulated device, GPU or not: it tests the emulator itself.
#![cfg(feature = "cuda")]

use kiln::abi::{
    KILN_ATTN_KERNEL_FORWARD_MMA, KILN_ATTN_MMA_HEAD_DIM, KILN_ATTN_MMA_ROWS, KILN_ATTN_WARPS, KILN_LN_BLOCK_ROWS,
    KILN_LN_WARPS,
};
use kiln::backend::cuda::{self, attention, bf16, tma, Cuda, Kernel, LaunchConfig, RuntimeKind};

fn emu(test: &str) -> &'static Cuda {
    cuda::select(RuntimeKind::Emulator).unwrap();
    let cu = cuda::cuda().unwrap();
    assert!(cu.is_emulated());
    eprintln!("{test}: on the emulated device");
    cu
}

fn blocks(grid: u32, block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// The error's text, which must contain every one of `parts`.
fn fault_says(r: kiln::Result<()>, parts: &[&str]) -> String {
    let msg = match r {
        Ok(()) => panic!("the deliberate fault was not caught"),
        Err(e) => e.to_string(),
    };
    for p in parts {
        assert!(msg.contains(p), "the fault message does not say {p:?}:\n{msg}");
    }
    eprintln!("caught: {msg}");
    msg
}

fn rotate(cu: &Cuda, x: &cuda::DevBuf<f32>, out: &mut cuda::DevBuf<f32>, barrier: i32) -> kiln::Result<()> {
    let mut l = cu.launch_builder(Kernel::SelftestRotate);
    l.arg(out).arg(x).arg(&barrier);
    // SAFETY: the emulated device checks every access before it happens and turns the deliberate fault into this launch's error.
    unsafe { l.launch(blocks(2, 128)) }
}

#[test]
fn a_missing_barrier_is_a_shared_memory_race() {
    let cu = emu("a_missing_barrier_is_a_shared_memory_race");
    let host: Vec<f32> = (0..256).map(|i| i as f32).collect();
    let x = cu.upload(&host).unwrap();
    let mut out = cu.alloc::<f32>(256).unwrap();
    // With the barrier: correct, and no hazard reported.
    rotate(cu, &x, &mut out, 1).unwrap();
    let got = cu.download(&out).unwrap();
    for (i, &v) in got.iter().enumerate() {
        let (blk, t) = (i / 128, i % 128);
        assert_eq!(v, (blk * 128 + (t + 1) % 128) as f32, "element {i}");
    }
    // Without it: thread t reads s[t + 1] in the phase thread t + 1 writes it.
    let msg = fault_says(
        rotate(cu, &x, &mut out, 0),
        &["shared-memory race", "kernel selftest_rotate", "shared array s", "with no barrier between"],
    );
    // Both blocks race, each on its own worker: whichever reports first is named.
    assert!(msg.contains("block (0, 0, 0)") || msg.contains("block (1, 0, 0)"), "{msg}");
    assert!(msg.contains("write after read") || msg.contains("read after write"), "{msg}");
}

#[test]
fn an_out_of_bounds_store_names_the_thread_and_the_allocation() {
    let cu = emu("an_out_of_bounds_store_names_the_thread_and_the_allocation");
    let n = 200;
    let mut out = cu.alloc::<i32>(n).unwrap();
    let fill = |out: &mut cuda::DevBuf<i32>, overrun: i32| {
        let mut l = cu.launch_builder(Kernel::SelftestFill);
        l.arg(out).arg(&(n as i32)).arg(&overrun);
        // SAFETY: the emulated device checks every access before it happens and turns the deliberate fault into this launch's error.
        unsafe { l.launch(blocks(4, 64)) }
    };
    fill(&mut out, 0).unwrap();
    assert_eq!(cu.download(&out).unwrap(), (0..n as i32).collect::<Vec<_>>());
    // Element 200 is the first past the end: block 3, thread 8.
    fault_says(
        fill(&mut out, 1),
        &[
            "out-of-bounds global store",
            "kernel selftest_fill",
            "block (3, 0, 0), thread (8, 0, 0)",
            "past the end of allocation",
        ],
    );
}

/// A launch with one argument too few or too many is refused before it starts, naming the
/// kernel and both counts (build.rs reads each kernel's parameter count from its declaration).
#[test]
fn a_launch_with_the_wrong_argument_count_is_refused() {
    let cu = emu("a_launch_with_the_wrong_argument_count_is_refused");
    assert_eq!(Kernel::SelftestFill.params(), 3);
    // A parameter list given as a macro (kernels/gemm.cu's KILN_GEMM_NF4_PARAMS) is counted expanded.
    assert_eq!(Kernel::GemmMmaNf4Nn.params(), 16);
    assert!(Kernel::ALL.iter().all(|k| k.params() > 0), "every kernel takes arguments");
    let mut out = cu.alloc::<i32>(64).unwrap();
    for extra in [false, true] {
        let mut l = cu.launch_builder(Kernel::SelftestFill);
        l.arg_mut(&mut out).arg(&64i32);
        if extra {
            l.arg(&0i32).arg(&0i32);
        }
        // SAFETY: the count check refuses the launch before any argument reaches the kernel.
        let e = unsafe { l.launch(blocks(1, 64)) }.unwrap_err().to_string();
        let n = if extra { 4 } else { 2 };
        assert!(
            e.contains("selftest_fill") && e.contains(&format!("given {n} arguments")) && e.contains("declares 3"),
            "{e}"
        );
    }
}

#[test]
fn a_barrier_not_reached_by_every_thread_names_both_lines() {
    let cu = emu("a_barrier_not_reached_by_every_thread_names_both_lines");
    let x = cu.upload(&vec![1.0f32; 256]).unwrap();
    let mut out = cu.alloc::<f32>(1).unwrap();
    let sum = |out: &mut cuda::DevBuf<f32>, split: i32| {
        let mut l = cu.launch_builder(Kernel::SelftestBlockSum);
        l.arg(out).arg(&x).arg(&split);
        // SAFETY: the emulated device checks every access before it happens and turns the deliberate fault into this launch's error.
        unsafe { l.launch(blocks(1, 256)) }
    };
    sum(&mut out, 0).unwrap();
    assert_eq!(cu.download(&out).unwrap(), vec![256.0]);
    fault_says(
        sum(&mut out, 1),
        &["__syncthreads at", "selftest.cu:", "kernel selftest_block_sum", "every thread must reach the same barrier"],
    );
}

#[test]
fn reading_memory_nothing_wrote_is_a_fault() {
    let cu = emu("reading_memory_nothing_wrote_is_a_fault");
    let x = cu.alloc::<f32>(256).unwrap();
    let mut out = cu.alloc::<f32>(256).unwrap();
    fault_says(
        rotate(cu, &x, &mut out, 1),
        &["uninitialised global load", "kernel selftest_rotate", "nothing has written"],
    );
}

/// A wrapper that launches one block too few leaves rows unwritten; the download that reads them
/// fails and names the unwritten byte range (here the last rows of layernorm's output).
#[test]
fn a_grid_one_block_short_leaves_rows_that_the_download_names() {
    let cu = emu("a_grid_one_block_short_leaves_rows_that_the_download_names");
    let (rows, c) = (40usize, 64usize);
    let (warps, per_block) = (KILN_LN_WARPS as usize, KILN_LN_BLOCK_ROWS as usize);
    let x: Vec<bf16> = (0..rows * c).map(|i| bf16::from_f32((i % 7) as f32 - 3.0)).collect();
    let (x, w, b) =
        (cu.upload(&x).unwrap(), cu.upload(&vec![bf16::ONE; c]).unwrap(), cu.upload(&vec![bf16::ZERO; c]).unwrap());
    let run = |grid: usize| {
        let mut out = cu.alloc::<bf16>(rows * c).unwrap();
        let mut mean = cu.alloc::<f32>(rows).unwrap();
        let mut rstd = cu.alloc::<f32>(rows).unwrap();
        let mut l = cu.launch_builder(Kernel::LayernormForward);
        l.arg_mut(&mut out)
            .arg_mut(&mut mean)
            .arg_mut(&mut rstd)
            .arg(&x)
            .arg(&w)
            .arg(&b)
            .arg(&(rows as i32))
            .arg(&(c as i32))
            .arg(&1e-5f32);
        // SAFETY: the emulated device checks every access before it happens and turns the deliberate fault into this launch's error.
        unsafe {
            l.launch(LaunchConfig {
                grid_dim: (grid as u32, 1, 1),
                block_dim: (32 * warps as u32, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .unwrap();
        cu.download(&out).map(|_| ())
    };
    let full = rows.div_ceil(per_block);
    run(full).unwrap();
    let first_unwritten = (full - 1) * per_block * c * 2;
    fault_says(
        run(full - 1),
        &["reads bytes nothing has written", &format!("offsets {first_unwritten}..{}", rows * c * 2)],
    );
}

/// attention_forward_mma copies q, k and v tiles with 16-byte cp.async: qkv one bf16 off its
/// allocation's start is caught at the first copy.
#[test]
fn a_misaligned_pointer_is_caught_at_the_access() {
    let cu = emu("a_misaligned_pointer_is_caught_at_the_access");
    let (b, t, nh) = (1usize, 64usize, 2usize);
    let c = nh * KILN_ATTN_MMA_HEAD_DIM as usize;
    let n = b * t * 3 * c;
    let host: Vec<bf16> = (0..n + 8).map(|i| bf16::from_f32(((i % 13) as f32 - 6.0) / 8.0)).collect();
    let qkv = cu.upload(&host).unwrap();
    let mut out = cu.alloc::<bf16>(b * t * c).unwrap();
    let mut lse = cu.alloc::<f32>(b * nh * t).unwrap();
    let smem = attention::twin::smem_bytes(KILN_ATTN_KERNEL_FORWARD_MMA as usize, KILN_ATTN_MMA_HEAD_DIM as usize);
    cu.set_max_dynamic_shared(Kernel::AttentionForwardMma, smem).unwrap();
    let cfg = LaunchConfig {
        grid_dim: (t.div_ceil(KILN_ATTN_MMA_ROWS as usize) as u32, nh as u32, b as u32),
        block_dim: (32 * KILN_ATTN_WARPS as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let (b32, t32, c32, nh32, ld) = (b as i32, t as i32, c as i32, nh as i32, 3 * c as i32);
    let launch = |at: usize, out: &mut cuda::DevBuf<bf16>, lse: &mut cuda::DevBuf<f32>| {
        // q, k and v: the three parts of the packed rows, no RoPE table
        let (q, k, v) = (qkv.slice(at..at + n), qkv.slice(at + c..at + n), qkv.slice(at + 2 * c..at + n));
        let mut l = cu.launch_builder(Kernel::AttentionForwardMma);
        l.arg(out).arg(lse).arg(&q).arg(&k).arg(&v).arg(&0u64);
        l.arg(&b32).arg(&t32).arg(&c32).arg(&nh32).arg(&nh32).arg(&ld).arg(&ld);
        // SAFETY: the emulated device checks every access before it happens and turns the deliberate fault into this launch's error.
        unsafe { l.launch(cfg) }
    };
    launch(8, &mut out, &mut lse).unwrap();
    fault_says(
        launch(1, &mut out, &mut lse),
        &["kernel attention_forward_mma", "cp.async global source", "is not 16-byte aligned"],
    );
}

#[test]
fn an_mbarrier_phase_that_never_completes_is_a_deadlock() {
    let cu = emu("an_mbarrier_phase_that_never_completes_is_a_deadlock");
    let host = vec![bf16::from_f32(1.0); 64 * 64];
    let t = cu.upload(&host).unwrap();
    let map = cu
        .tensor_map_2d(&tma::Tiled2d {
            ptr: t.ptr(),
            rows: 64,
            cols: 64,
            pitch: 64,
            box_rows: 8,
            box_cols: 64,
            swizzle: tma::Swizzle::B128,
        })
        .unwrap();
    let mut out = cu.alloc::<bf16>(8 * 64).unwrap();
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 4096 };
    let launch = |out: &mut cuda::DevBuf<bf16>, arrive: i32| {
        let mut l = cu.launch_builder(Kernel::SelftestTma);
        l.arg_mut(out).arg(&map).arg(&0i32).arg(&0i32).arg(&8i32).arg(&64i32).arg(&128i32).arg(&arrive);
        // SAFETY: the emulated device checks every access before it happens and turns the deliberate fault into this launch's error.
        unsafe { l.launch(cfg) }
    };
    launch(&mut out, 1).unwrap();
    assert!(cu.download(&out).unwrap().iter().all(|v| v.to_f32() == 1.0));
    // Nobody arrives and no copy completes: every thread waits for phase 0 forever.
    fault_says(
        launch(&mut out, 0),
        &[
            "kernel selftest_tma",
            "mbarrier deadlock",
            "128 thread(s) wait for the phase of parity 0",
            "1 of 1 arrivals pending",
        ],
    );
}

#[test]
fn shared_memory_a_wgmma_reads_must_not_change_before_it_retires() {
    let cu = emu("shared_memory_a_wgmma_reads_must_not_change_before_it_retires");
    let a = cu.upload(&vec![bf16::from_f32(0.5); 64 * 64]).unwrap();
    let b = cu.upload(&vec![bf16::from_f32(0.25); 64 * 64]).unwrap();
    let mut out = cu.alloc::<f32>(64 * 64).unwrap();
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 1024 + 128 * 64 * 2 };
    let launch = |out: &mut cuda::DevBuf<f32>, clobber: i32| {
        let mut l = cu.launch_builder(Kernel::SelftestWgmmaN64);
        l.arg_mut(out).arg(&a).arg(&b).arg(&0i32).arg(&clobber);
        // SAFETY: the emulated device checks every access before it happens and turns the deliberate fault into this launch's error.
        unsafe { l.launch(cfg) }
    };
    launch(&mut out, 0).unwrap();
    assert!(cu.download(&out).unwrap().iter().all(|&v| v == 64.0 * 0.125));
    // Thread 0 stores into the A tile between issuing the wgmma and waiting for it.
    fault_says(
        launch(&mut out, 1),
        &["kernel selftest_wgmma_n64", "shared memory of wgmma number 0 of warpgroup 0 changed", "wgmma.wait_group"],
    );
}
