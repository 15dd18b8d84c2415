//! RMSNorm: gradients against finite differences, the forward against f64, the fused residual
//! add against add-then-norm, and shape errors.

mod common;

use common::{grad_check, rand_tensor, rng, Objective, Tol};
use kiln::ops::elementwise::add;
use kiln::ops::rmsnorm::{add_rmsnorm, rmsnorm};
use kiln::{Error, Tape, Tensor};

/// Tolerance. Each output is a product of x, w and rstd, one sum of C squares (summed in f64)
/// deep: a few f32 roundings, ~1e-6 of max|an| at h = 1e-2; truncation h^2 |f'''| / 6 with
/// |f'''| of order 1 for rows of unit scale: ~2e-5. A dx without its -x rstd^3 mean(g x) term,
/// or a dw without rstd, is off by > 1e-1 of max|an| here.
const TOL: Tol = Tol { h: 1e-2, atol: 1e-6, rtol: 2e-3 };

#[test]
fn rmsnorm_grads() {
    let mut r = rng(41);
    for dims in [&[1, 5][..], &[2, 3, 16], &[7, 33]] {
        let c = *dims.last().unwrap();
        let x = rand_tensor(&mut r, dims, 1.5);
        let w = rand_tensor(&mut r, &[c], 1.0);
        let label = format!("rmsnorm x={dims:?}");
        grad_check(&label, &[x, w], &[0, 1], Objective::Probe(3), TOL, 48, |t, v| rmsnorm(t, &v[0], &v[1], 1e-5));
    }
}

#[test]
fn rmsnorm_matches_f64() {
    let mut r = rng(42);
    let (rows, c, eps) = (9, 64, 1e-6f32);
    let x = rand_tensor(&mut r, &[rows, c], 3.0);
    let w = rand_tensor(&mut r, &[c], 1.0);
    let y = rmsnorm(&mut Tape::inference(), &x, &w, eps).unwrap();
    let (xs, ws, ys) = (x.f32s().unwrap(), w.f32s().unwrap(), y.f32s().unwrap());
    let mut worst = 0f64;
    for i in 0..rows {
        let row = &xs[i * c..(i + 1) * c];
        let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / c as f64;
        let rs = 1.0 / (ms + eps as f64).sqrt();
        for j in 0..c {
            let want = ws[j] as f64 * row[j] as f64 * rs;
            worst = worst.max((ys[i * c + j] as f64 - want).abs() / want.abs().max(1e-3));
        }
    }
    // three f32 roundings (rsqrt, two products): a few ulps
    assert!(worst < 1e-6, "rmsnorm vs f64: relative error {worst:.3e}");
}

/// add_rmsnorm returns (x + r, rmsnorm(x + r)) and the same gradients as the two ops in turn.
#[test]
fn add_rmsnorm_equals_add_then_rmsnorm() {
    let mut r = rng(43);
    let (x, res, w) =
        (rand_tensor(&mut r, &[2, 5, 24], 1.0), rand_tensor(&mut r, &[2, 5, 24], 1.0), rand_tensor(&mut r, &[24], 1.0));
    let (s, y) = add_rmsnorm(&mut Tape::inference(), &x, &res, &w, 1e-5).unwrap();
    let s2 = add(&mut Tape::inference(), &x, &res).unwrap();
    let y2 = rmsnorm(&mut Tape::inference(), &s2, &w, 1e-5).unwrap();
    assert_eq!(s.f32s().unwrap(), s2.f32s().unwrap());
    assert_eq!(y.f32s().unwrap(), y2.f32s().unwrap());
    grad_check("add_rmsnorm", &[x, res, w], &[0, 1, 2], Objective::Probe(5), TOL, 32, |t, v| {
        let (s, y) = add_rmsnorm(t, &v[0], &v[1], &v[2], 1e-5)?;
        add(t, &s, &y)
    });
}

#[test]
fn rmsnorm_rejects_a_weight_of_the_wrong_width() {
    let e = rmsnorm(&mut Tape::new(), &Tensor::zeros([2, 8]), &Tensor::zeros([7]), 1e-5);
    assert!(matches!(e, Err(Error::Shape { .. })), "{e:?}");
}

/// The CUDA kernels (kernels/rmsnorm.cu) and their host twins against the CPU backend. Without a
/// GPU they run on the emulated device. Bounds, as tests/layernorm.rs derives them: two f32
/// implementations of a length-C sum differ by at most 2 C u sum|terms|; each bound below is
/// that plus a few u per elementwise operation, propagated through the formula, then the bf16
/// rounding of the output (u_bf of its magnitude), which the plain bf16 result has anyway.
#[cfg(feature = "cuda")]
mod cuda {
    use super::common::dev::{assert_bits, poisoned, rounded, to_bf, to_f};
    use super::common::{self, rng, uniform, U32};
    use kiln::backend::cpu::rmsnorm as cpu;
    use kiln::backend::cuda::rmsnorm::{self as gpu, twin};
    use kiln::backend::cuda::{bf16, Cuda};

    const U_BF: f64 = 1.0 / 256.0;
    const EPS: f32 = 1e-5;
    /// Rows and widths: one row, a partial block of warps, several dw groups; C odd (the scalar
    /// path), SmolLM2-135M's 576 and a width past one 256-column stripe (the 16-byte path with the
    /// row cached in registers, up to KILN_LN_CACHE_C = 2048), and 2304 (the 16-byte path that
    /// walks the row again).
    const SHAPES: [(usize, usize); 7] = [(1, 1), (7, 13), (97, 576), (130, 1000), (5, 2048), (64, 24), (9, 2304)];

    /// x (rows * c, offset by `offset`: an RMS far from the spread) and w ~ 1 +- 0.5, bf16-valued.
    fn inputs(seed: u64, rows: usize, c: usize, offset: f32) -> (Vec<f32>, Vec<f32>) {
        let mut r = rng(seed);
        let x = rounded(uniform(&mut r, rows * c, 1.0).iter().map(|v| v + offset).collect());
        let w = rounded(uniform(&mut r, c, 0.5).iter().map(|v| v + 1.0).collect());
        (x, w)
    }

    /// The twin's forward is the CPU's mean square and the shared formulas: equal bits.
    #[test]
    fn twin_forward_matches_cpu_bits() {
        for (k, &(rows, c)) in SHAPES.iter().enumerate() {
            let (x, w) = inputs(100 + k as u64, rows, c, if k % 2 == 0 { 0.0 } else { 2.0 });
            let (mut o1, mut r1) = (vec![f32::NAN; rows * c], vec![f32::NAN; rows]);
            let (mut o2, mut r2) = (o1.clone(), r1.clone());
            twin::rmsnorm_forward(&mut o1, &mut r1, &x, &w, c, EPS);
            cpu::rmsnorm_forward(&mut o2, &mut r2, &x, &w, c, EPS);
            assert_bits(&format!("twin forward rows={rows} C={c} out"), &o1, &o2);
            assert_bits(&format!("twin forward rows={rows} C={c} rstd"), &r1, &r2);
        }
    }

    /// Per column, sum over rows of |g x rstd|: what the dw bounds scale with.
    fn dw_scale(g: &[f32], x: &[f32], rstd: &[f32], c: usize) -> Vec<f64> {
        let mut s = vec![0f64; c];
        for (r, &rs) in rstd.iter().enumerate() {
            for (i, si) in s.iter_mut().enumerate() {
                *si += (g[r * c + i] as f64 * x[r * c + i] as f64 * rs as f64).abs();
            }
        }
        s
    }

    /// dx: the CPU's formulas and order, equal bits. dw: the kernels' grouping (64-row groups, a
    /// fused multiply-add, g (x rstd)) against the CPU's ((g x) rstd, rows_per_task groups): two
    /// length-rows sums and two roundings a term, |twin - cpu| <= 2 (rows + 2) u sum_r |term_r|.
    #[test]
    fn twin_backward_matches_cpu() {
        for (k, &(rows, c)) in SHAPES.iter().enumerate() {
            let (x, w) = inputs(200 + k as u64, rows, c, 1.0);
            let g = rounded(uniform(&mut rng(300 + k as u64), rows * c, 1.0));
            let (mut y, mut rstd) = (vec![0f32; rows * c], vec![0f32; rows]);
            cpu::rmsnorm_forward(&mut y, &mut rstd, &x, &w, c, EPS);
            let (mut dx1, mut dw1) = (vec![f32::NAN; rows * c], vec![f32::NAN; c]);
            let (mut dx2, mut dw2) = (dx1.clone(), dw1.clone());
            twin::rmsnorm_backward(Some(&mut dx1), Some(&mut dw1), &g, &x, &w, &rstd, c);
            cpu::rmsnorm_backward(Some(&mut dx2), Some(&mut dw2), &g, &x, &w, &rstd, c);
            let label = format!("twin backward rows={rows} C={c}");
            assert_bits(&format!("{label} dx"), &dx1, &dx2);
            let k = 2.0 * (rows as f64 + 2.0) * U32;
            for (col, s) in dw_scale(&g, &x, &rstd, c).into_iter().enumerate() {
                let e = (dw1[col] - dw2[col]).abs() as f64;
                assert!(e <= k * s, "{label} dw[{col}]: {} vs {} (bound {:.2e})", dw1[col], dw2[col], k * s);
            }
        }
    }

    /// The device forward against the CPU's. rstd: the f32 sum of C squares (all positive) is
    /// within (C + 1) u of itself, the f64 one within u; the division, eps, square root and
    /// reciprocal add 4 u; the square root halves the sum's share. So |drstd| <= (C + 8) u rstd.
    /// y = w (x rstd): |w x| drstd, plus 3 u |y| for the two products, then the bf16 rounding.
    fn check_forward(label: &str, x: &[f32], w: &[f32], c: usize, got: (&[f32], &[f32])) {
        let rows = x.len() / c;
        let (mut y, mut rstd) = (vec![0f32; rows * c], vec![0f32; rows]);
        cpu::rmsnorm_forward(&mut y, &mut rstd, x, w, c, EPS);
        let (gy, gr) = got;
        for r in 0..rows {
            let dr = (c as f64 + 8.0) * U32 * rstd[r] as f64;
            assert!(
                (gr[r] - rstd[r]).abs() as f64 <= dr,
                "{label} row {r}: rstd {} vs {} (bound {dr:.2e})",
                gr[r],
                rstd[r]
            );
            for i in 0..c {
                let want = y[r * c + i] as f64;
                let f = (w[i] as f64 * x[r * c + i] as f64).abs() * dr + 3.0 * U32 * want.abs();
                let bound = f + U_BF * (want.abs() + f);
                let g = gy[r * c + i] as f64;
                assert!((g - want).abs() <= bound, "{label} row {r} col {i}: {g} vs cpu {want} (bound {bound:.2e})");
            }
        }
    }

    #[test]
    fn gpu_forward_matches_cpu() {
        let Some(cu) = common::gpu("rmsnorm gpu_forward_matches_cpu") else { return };
        for (k, &(rows, c)) in SHAPES.iter().enumerate() {
            let offset = if k % 2 == 0 { 0.0 } else { 3.0 };
            let (x, w) = inputs(400 + k as u64, rows, c, offset);
            let (dx, dw) = (cu.upload(&to_bf(&x)).unwrap(), cu.upload(&to_bf(&w)).unwrap());
            let (mut out, mut rstd) = (poisoned(cu, rows * c, bf16::NAN), poisoned(cu, rows, f32::NAN));
            gpu::rmsnorm_forward(&mut out, &mut rstd, &dx, &dw, c, EPS).unwrap();
            let (y, r) = (to_f(&cu.download(&out).unwrap()), cu.download(&rstd).unwrap());
            check_forward(&format!("gpu forward rows={rows} C={c} offset={offset}"), &x, &w, c, (&y, &r));
        }
    }

    /// h = bf16(a + r) equals the CPU's f32 sum rounded to bf16 bit for bit; out and rstd as the
    /// plain forward of that h.
    #[test]
    fn gpu_residual_forward_matches_cpu() {
        let Some(cu) = common::gpu("rmsnorm gpu_residual_forward_matches_cpu") else { return };
        for (k, &(rows, c)) in SHAPES.iter().enumerate() {
            let (a, w) = inputs(500 + k as u64, rows, c, 1.0);
            let res = rounded(uniform(&mut rng(600 + k as u64), rows * c, 1.0));
            let h_want: Vec<bf16> = a.iter().zip(&res).map(|(&p, &q)| bf16::from_f32(p + q)).collect();
            let up = |v: &[f32]| cu.upload(&to_bf(v)).unwrap();
            let (da, dr, dw) = (up(&a), up(&res), up(&w));
            let (mut h, mut out) = (poisoned(cu, rows * c, bf16::NAN), poisoned(cu, rows * c, bf16::NAN));
            let mut rstd = poisoned(cu, rows, f32::NAN);
            gpu::rmsnorm_residual_forward(&mut h, &mut out, &mut rstd, &da, &dr, &dw, c, EPS).unwrap();
            let label = format!("gpu residual forward rows={rows} C={c}");
            for (i, (g, want)) in cu.download(&h).unwrap().iter().zip(&h_want).enumerate() {
                assert!(g.to_bits() == want.to_bits(), "{label}: h[{i}] = {g} vs {want}");
            }
            let (y, r) = (to_f(&cu.download(&out).unwrap()), cu.download(&rstd).unwrap());
            check_forward(&label, &to_f(&h_want), &w, c, (&y, &r));
        }
    }

    fn run_backward(
        cu: &Cuda,
        g: &[f32],
        x: &[f32],
        w: &[f32],
        rstd: &[f32],
        c: usize,
        needs: [bool; 2],
    ) -> (Vec<f32>, Vec<f32>) {
        let rows = rstd.len();
        let up = |v: &[f32]| cu.upload(&to_bf(v)).unwrap();
        let (dg, dxin, dwin, dr) = (up(g), up(x), up(w), cu.upload(rstd).unwrap());
        let mut dx = poisoned(cu, rows * c, bf16::NAN);
        let mut dw = poisoned(cu, c, f32::NAN);
        gpu::rmsnorm_backward(needs[0].then_some(&mut dx), needs[1].then_some(&mut dw), &dg, &dxin, &dwin, &dr, c)
            .unwrap();
        (to_f(&cu.download(&dx).unwrap()), cu.download(&dw).unwrap())
    }

    /// dx against the CPU: the row mean m = mean(g w x rstd) differs between the two by
    /// dm <= 2 u (sum|g w x rstd| (1 + 3 / C) + |m|); dx = rstd (g w - x rstd m) then moves by
    /// rstd |x rstd| dm plus 4 u of its terms, and the bf16 rounding adds u_bf |dx|. dw: equal
    /// bits to the host twin, and the same bits on a second run; each output may be skipped alone.
    #[test]
    fn gpu_backward_matches_cpu_and_twin_and_repeats() {
        let Some(cu) = common::gpu("rmsnorm gpu_backward_matches_cpu_and_twin_and_repeats") else { return };
        for (k, &(rows, c)) in SHAPES.iter().enumerate() {
            let (x, w) = inputs(700 + k as u64, rows, c, if k % 2 == 0 { 0.0 } else { 3.0 });
            let g = rounded(uniform(&mut rng(800 + k as u64), rows * c, 1.0));
            let (mut y, mut rstd) = (vec![0f32; rows * c], vec![0f32; rows]);
            cpu::rmsnorm_forward(&mut y, &mut rstd, &x, &w, c, EPS);
            let (gdx, gdw) = run_backward(cu, &g, &x, &w, &rstd, c, [true, true]);
            let label = format!("gpu backward rows={rows} C={c}");
            let mut dx = vec![0f32; rows * c];
            cpu::rmsnorm_backward(Some(&mut dx), None, &g, &x, &w, &rstd, c);
            for r in 0..rows {
                let rs = rstd[r] as f64;
                let (mut m, mut a) = (0f64, 0f64);
                for i in 0..c {
                    let t = g[r * c + i] as f64 * w[i] as f64 * x[r * c + i] as f64 * rs;
                    m += t / c as f64;
                    a += t.abs();
                }
                let dm = 2.0 * U32 * (a * (1.0 + 3.0 / c as f64) + m.abs());
                for i in 0..c {
                    let (gw, xr) = (g[r * c + i] as f64 * w[i] as f64, x[r * c + i] as f64 * rs);
                    let want = dx[r * c + i] as f64;
                    let f = rs * xr.abs() * dm + 4.0 * U32 * rs * (gw.abs() + (xr * m).abs());
                    let bound = f + U_BF * (want.abs() + f);
                    let got = gdx[r * c + i] as f64;
                    assert!(
                        (got - want).abs() <= bound,
                        "{label} dx row {r} col {i}: {got} vs cpu {want} (bound {bound:.2e})"
                    );
                }
            }
            let mut tw = vec![f32::NAN; c];
            twin::rmsnorm_backward(None, Some(&mut tw), &g, &x, &w, &rstd, c);
            assert_bits(&format!("{label} dw vs twin"), &gdw, &tw);
            let (again_dx, again_dw) = run_backward(cu, &g, &x, &w, &rstd, c, [true, true]);
            assert_bits(&format!("{label} dx, second run"), &again_dx, &gdx);
            assert_bits(&format!("{label} dw, second run"), &again_dw, &gdw);
            if k == 2 {
                let (only_dx, untouched_dw) = run_backward(cu, &g, &x, &w, &rstd, c, [true, false]);
                assert_bits(&format!("{label} dx alone"), &only_dx, &gdx);
                assert!(untouched_dw.iter().all(|v| v.is_nan()), "{label}: dw written though not asked for");
                let (untouched_dx, only_dw) = run_backward(cu, &g, &x, &w, &rstd, c, [false, true]);
                assert_bits(&format!("{label} dw alone"), &only_dw, &gdw);
                assert!(untouched_dx.iter().all(|v| v.is_nan()), "{label}: dx written though not asked for");
            }
        }
    }

    /// Through the tape on the device: add_rmsnorm (the fused kernel) against add then rmsnorm
    /// (two kernels), forward and backward (a cross-entropy of s + y, as a block uses both). The
    /// sum is one f32 add rounded to bf16 on both paths (bit for bit); the rest may differ by a
    /// bf16 rounding, u_bf of each tensor's scale.
    #[test]
    fn add_rmsnorm_on_the_device_matches_add_then_rmsnorm() {
        use kiln::ops::elementwise::{add, to_compute_dtype};
        use kiln::ops::rmsnorm::{add_rmsnorm, rmsnorm};
        use kiln::ops::xent::cross_entropy;
        use kiln::{Device, Tape, Tensor};
        let Some(_) = common::gpu("rmsnorm add_rmsnorm_on_the_device_matches_add_then_rmsnorm") else { return };
        for (k, dims) in [&[2, 7, 64][..], &[1, 33, 40], &[3, 13]].into_iter().enumerate() {
            let c = *dims.last().unwrap();
            let rows: usize = dims[..dims.len() - 1].iter().product();
            let mut r = rng(90 + k as u64);
            let dev = |v: Vec<f32>, d: &[usize]| Tensor::from_f32(v, d).unwrap().to_device(Device::Cuda(0)).unwrap();
            let xs = [
                dev(uniform(&mut r, rows * c, 1.0), dims),
                dev(uniform(&mut r, rows * c, 1.0), dims),
                dev(uniform(&mut r, c, 0.5).iter().map(|v| v + 1.0).collect(), &[c]),
            ];
            let t: Vec<i32> = (0..rows).map(|i| ((i * 7 + 3) % c) as i32).collect();
            let targets = Tensor::from_i32(t, &dims[..dims.len() - 1]).unwrap();
            let run = |fused: bool| -> Vec<Vec<f32>> {
                let mut tape = Tape::new();
                for x in &xs {
                    tape.watch(x);
                }
                let v: Vec<Tensor> = xs.iter().map(|x| to_compute_dtype(&mut tape, x).unwrap()).collect();
                let (s, y) = if fused {
                    add_rmsnorm(&mut tape, &v[0], &v[1], &v[2], EPS).unwrap()
                } else {
                    let s = add(&mut tape, &v[0], &v[1]).unwrap();
                    let y = rmsnorm(&mut tape, &s, &v[2], EPS).unwrap();
                    (s, y)
                };
                let logits = add(&mut tape, &s, &y).unwrap();
                let loss = cross_entropy(&mut tape, &logits, &targets).unwrap();
                let grads = tape.backward(&loss).unwrap();
                [&s, &y, &loss]
                    .into_iter()
                    .chain(xs.iter().map(|x| grads.get(x).expect("a gradient for every input")))
                    .map(|v| v.to_f32_vec().unwrap())
                    .collect()
            };
            let (f, u) = (run(true), run(false));
            for (name, (a, b)) in ["sum", "normed", "loss", "dx", "dr", "dw"].iter().zip(f.iter().zip(&u)) {
                let e = a.iter().zip(b).fold(0f64, |m, (p, q)| m.max((p - q).abs() as f64));
                let bound = if *name == "sum" { 0.0 } else { U_BF * super::common::max_abs(b) };
                eprintln!("add_rmsnorm {dims:?} {name}: max diff {e:.3e}, bound {bound:.3e}");
                assert!(e <= bound, "{dims:?} {name}: fused and unfused differ by {e:.3e} > {bound:.3e}");
            }
        }
    }
}
