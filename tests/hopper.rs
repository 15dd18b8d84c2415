//! Hopper's asynchronous machinery (kernels/hopper.cuh) against plain computations: wgmma with each
//! swizzle mode, TMA tiled loads with zero fill, mbarriers. On the emulated device these test the
//! emulator's reading of the PTX ISA; on an sm_90 GPU the same kernels test that reading against
//! the hardware (tools/gpu-bundle.sh runs them there).
#![cfg(feature = "cuda")]

mod common;

use kiln::backend::cuda::tma::{Swizzle, Tiled2d};
use kiln::backend::cuda::{bf16, Cuda, Kernel, LaunchConfig};
use rand::Rng;

/// The device, when it has Hopper's instructions (the emulated device does).
fn hopper(test: &str) -> Option<&'static Cuda> {
    let cu = common::gpu(test)?;
    if cu.compute_capability().0 != 9 {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {} is not an sm_90 GPU", cu.name());
        return None;
    }
    Some(cu)
}

fn one_block(threads: u32, smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (1, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem }
}

fn rand_bf16(r: &mut impl Rng, n: usize) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(r.random_range(-2.0f32..2.0))).collect()
}

/// The largest error of `got` (m x n, row-major) against a (m x k) b (n x k)^T summed exactly, as
/// a fraction of the sum of the products' magnitudes.
fn worst_error(got: &[f32], a: &[bf16], b: &[bf16], k: usize) -> f64 {
    let n = b.len() / k;
    let mut worst = 0.0f64;
    for (i, row) in a.chunks(k).enumerate() {
        for (j, col) in b.chunks(k).enumerate() {
            let (mut want, mut mag) = (0.0f64, 0.0f64);
            for (x, y) in row.iter().zip(col) {
                let p = x.to_f64() * y.to_f64();
                want += p;
                mag += p.abs();
            }
            worst = worst.max((got[i * n + j] as f64 - want).abs() / (mag + 1e-30));
        }
    }
    worst
}

#[test]
fn wgmma_multiplies_tiles_in_every_swizzle_mode_and_major_ness() {
    let Some(cu) = hopper("wgmma_multiplies_tiles_in_every_swizzle_mode_and_major_ness") else { return };
    let mut r = common::rng(90);
    let kernels = [
        (64usize, false, Kernel::SelftestWgmmaN64),
        (128, false, Kernel::SelftestWgmmaN128),
        (64, true, Kernel::SelftestWgmmaMnN64),
        (128, true, Kernel::SelftestWgmmaMnN128),
    ];
    for (n, mn_major, kernel) in kernels {
        for swizzle in [0i32, 32, 64, 128] {
            let k = if swizzle == 0 || mn_major { 64 } else { swizzle as usize / 2 };
            let a = rand_bf16(&mut r, 64 * k);
            let b = rand_bf16(&mut r, n * k);
            let (da, db) = (cu.upload(&a).unwrap(), cu.upload(&b).unwrap());
            let mut out = cu.alloc::<f32>(64 * n).unwrap();
            let smem = (1024 + (64 + n) * k * 2) as u32;
            let mut l = cu.launch_builder(kernel);
            l.arg_mut(&mut out).arg(&da).arg(&db).arg(&swizzle).arg(&0i32);
            // SAFETY: out holds 64 x n floats, a 64 x k and b n x k bf16; smem covers both tiles and the alignment.
            unsafe { l.launch(one_block(128, smem)) }.unwrap();
            let worst = worst_error(&cu.download(&out).unwrap(), &a, &b, k);
            let major = if mn_major { "MN-major" } else { "K-major" };
            eprintln!(
                "wgmma m64n{n}k16 {major}, {swizzle}-byte swizzle (0: none), K = {k}: worst error {worst:.2e} of the products' magnitude"
            );
            assert!(
                worst < 1e-5,
                "wgmma N = {n} {major}, swizzle {swizzle}: an element is off by {worst:.2e} of its products' magnitude"
            );
        }
    }
}

#[test]
fn tma_loads_boxes_with_zero_fill_in_every_swizzle_mode() {
    let Some(cu) = hopper("tma_loads_boxes_with_zero_fill_in_every_swizzle_mode") else { return };
    let (rows, cols, pitch) = (37u64, 100u64, 104u64);
    let host: Vec<bf16> = (0..rows * pitch).map(|i| bf16::from_f32((i % 997) as f32 + 1.0)).collect();
    let t = cu.upload(&host).unwrap();
    for swizzle in [Swizzle::None, Swizzle::B32, Swizzle::B64, Swizzle::B128] {
        let box_cols = if swizzle == Swizzle::None { 24 } else { swizzle.bytes() / 2 };
        let box_rows = 16u32;
        let map = cu.tensor_map_2d(&Tiled2d { ptr: t.ptr(), rows, cols, pitch, box_rows, box_cols, swizzle }).unwrap();
        // Inside, across the right and bottom edges, and starting before the first row and column.
        for (c0, c1) in [(8i32, 4i32), (90, 30), (-5, -3)] {
            let n = (box_rows * box_cols) as usize;
            let mut out = cu.alloc::<bf16>(n).unwrap();
            let mut l = cu.launch_builder(Kernel::SelftestTma);
            let (br, bc, sw) = (box_rows as i32, box_cols as i32, swizzle.bytes() as i32);
            l.arg_mut(&mut out).arg(&map).arg(&c0).arg(&c1).arg(&br).arg(&bc).arg(&sw).arg(&1i32);
            // SAFETY: out holds the box; the map describes t, which outlives the launch.
            unsafe { l.launch(one_block(128, 2048 + n as u32 * 2)) }.unwrap();
            let got = cu.download(&out).unwrap();
            for (i, g) in got.iter().enumerate() {
                let (y, x) = (c1 as i64 + (i / box_cols as usize) as i64, c0 as i64 + (i % box_cols as usize) as i64);
                let inside = (0..rows as i64).contains(&y) && (0..cols as i64).contains(&x);
                let want = if inside { host[(y as u64 * pitch + x as u64) as usize] } else { bf16::ZERO };
                assert_eq!(g.to_bits(), want.to_bits(), "{swizzle:?} box at ({c0}, {c1}): element ({y}, {x})");
            }
        }
    }
}

#[test]
fn tensor_maps_refuse_what_the_copy_engine_cannot_do() {
    let Some(cu) = hopper("tensor_maps_refuse_what_the_copy_engine_cannot_do") else { return };
    let t = cu.zeros::<bf16>(64 * 64).unwrap();
    let base =
        Tiled2d { ptr: t.ptr(), rows: 64, cols: 64, pitch: 64, box_rows: 8, box_cols: 64, swizzle: Swizzle::B128 };
    cu.tensor_map_2d(&base).unwrap();
    let cases = [
        (Tiled2d { ptr: t.ptr() + 2, ..base }, "not 16-byte aligned"),
        (Tiled2d { pitch: 60, ..base }, "row pitch of 60"),
        (Tiled2d { pitch: 68, ..base }, "multiple of 8"),
        (Tiled2d { box_rows: 300, ..base }, "1 to 256"),
        (Tiled2d { box_cols: 12, swizzle: Swizzle::None, ..base }, "multiple of 16"),
        (Tiled2d { box_cols: 128, ..base }, "wider than the 128-byte swizzle"),
    ];
    for (bad, says) in cases {
        let e = cu.tensor_map_2d(&bad).unwrap_err().to_string();
        assert!(e.contains(says), "{bad:?}: the error does not say {says:?}: {e}");
    }
}

#[test]
fn a_tma_and_wgmma_pipeline_multiplies_with_ragged_edges() {
    let Some(cu) = hopper("a_tma_and_wgmma_pipeline_multiplies_with_ragged_edges") else { return };
    let mut r = common::rng(91);
    // Two blocks each way, the last ones past M and N, and K = 200: four 64-wide slices through
    // two stages (each mbarrier completes two phases), the last slice partly past the tensor.
    let (m, n, k) = (100usize, 200usize, 200usize);
    let a = rand_bf16(&mut r, m * k);
    let b = rand_bf16(&mut r, n * k);
    let (da, db) = (cu.upload(&a).unwrap(), cu.upload(&b).unwrap());
    let map = |ptr: u64, rows: usize, box_rows: u32| {
        let t = Tiled2d {
            ptr,
            rows: rows as u64,
            cols: k as u64,
            pitch: k as u64,
            box_rows,
            box_cols: 64,
            swizzle: Swizzle::B128,
        };
        cu.tensor_map_2d(&t).unwrap()
    };
    let (ma, mb) = (map(da.ptr(), m, 64), map(db.ptr(), n, 128));
    let mut out = cu.alloc::<f32>(m * n).unwrap();
    let smem = 32 + 1024 + 2 * (64 + 128) * 64 * 2;
    cu.set_max_dynamic_shared(Kernel::SelftestTmaWgmma, smem).unwrap();
    let mut l = cu.launch_builder(Kernel::SelftestTmaWgmma);
    let (m32, n32, k32) = (m as i32, n as i32, k as i32);
    l.arg_mut(&mut out).arg(&ma).arg(&mb).arg(&m32).arg(&n32).arg(&k32);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(128) as u32, m.div_ceil(64) as u32, 1),
        block_dim: (160, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: out holds m x n floats; the maps describe a (m x k) and b (n x k), which outlive the launch.
    unsafe { l.launch(cfg) }.unwrap();
    let worst = worst_error(&cu.download(&out).unwrap(), &a, &b, k);
    eprintln!("TMA + wgmma pipeline, {m} x {n} x {k}: worst error {worst:.2e} of the products' magnitude");
    assert!(worst < 1e-5, "an element is off by {worst:.2e} of its products' magnitude");
}
