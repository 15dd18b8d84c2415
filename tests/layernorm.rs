//! LayerNorm: gradients of x, weight and bias against finite differences at awkward widths, the
//! forward against an f64 reference, and shape errors.

mod common;

use common::{grad_check, max_abs, poison_pool, rand_tensor, rng, uniform, Objective, Tol, POOLED, U32};
use kiln::ops::elementwise::{add, to_compute_dtype};
use kiln::ops::layernorm::{add_layernorm, layernorm};
use kiln::ops::xent::cross_entropy;
use kiln::{Error, Tape, Tensor};

const EPS: f32 = 1e-5;

/// Tolerance. y = (x - mean) rstd w + b: its f32 forward has k ~ sqrt(C) roundings in the row
/// statistics, amplified by |mean| / std when the row is offset (3 / 0.58 ~ 5 in the offset
/// case), so rounding stays near 1e-5 of max|an| at h = 1e-2 (x has std ~ 0.6). Truncation:
/// d3y/dx3 scales as rstd^3 ~ 5, giving h^2 * 5 / 6 ~ 1e-4 of the gradient scale. Measured
/// worst: 7e-5 of max|an|, against the shared rtol = 2e-3; dropping the mean(dxhat) term of dx,
/// or taking dw against x instead of xhat, fails it.
const TOL: Tol = Tol { h: 1e-2, atol: 1e-6, rtol: 2e-3 };

/// x dims and row offset: C = 13 and 20, T = 7, T = 1, batch 1 and > 1, 2-D and 3-D x.
const CASES: [(&[usize], f32); 4] = [(&[1, 7, 13], 0.0), (&[2, 3, 20], 3.0), (&[1, 1, 13], 0.0), (&[5, 9], 0.0)];

fn inputs(r: &mut rand::rngs::StdRng, dims: &[usize], offset: f32) -> [Tensor; 3] {
    let c = *dims.last().unwrap();
    let n = dims.iter().product();
    let x: Vec<f32> = uniform(r, n, 1.0).iter().map(|v| v + offset).collect();
    let w: Vec<f32> = uniform(r, c, 0.5).iter().map(|v| v + 1.0).collect();
    [Tensor::from_f32(x, dims).unwrap(), Tensor::from_f32(w, [c]).unwrap(), rand_tensor(r, &[c], 0.5)]
}

#[test]
fn layernorm_grads_x_weight_bias() {
    let mut r = rng(21);
    for (dims, offset) in CASES {
        let xs = inputs(&mut r, dims, offset);
        let label = format!("layernorm x={dims:?} offset={offset}");
        grad_check(&label, &xs, &[0, 1, 2], Objective::Probe(22), TOL, 48, |t, x| {
            layernorm(t, &x[0], &x[1], &x[2], EPS)
        });
    }
    // y and dx [2, 64, 128] are pooled buffers: the second pass takes ones filled with NaN.
    const { assert!(2 * 64 * 128 >= POOLED) };
    let xs = inputs(&mut r, &[2, 64, 128], 1.0);
    let passes: Vec<_> = (0..2)
        .map(|pass| {
            if pass == 1 {
                poison_pool(&[2 * 64 * 128]);
            }
            let label = format!("layernorm x=[2, 64, 128], pass {pass}");
            grad_check(&label, &xs, &[0, 1, 2], Objective::Probe(22), TOL, 16, |t, x| {
                layernorm(t, &x[0], &x[1], &x[2], EPS)
            })
        })
        .collect();
    assert!(passes[0] == passes[1], "fresh and recycled buffers gave different gradients");
}

/// Only the watched inputs get gradients, and they match the all-watched run.
#[test]
fn layernorm_grads_of_a_subset() {
    let mut r = rng(23);
    let xs = inputs(&mut r, &[2, 7, 12], 0.0);
    let all = grad_check("layernorm all", &xs, &[0, 1, 2], Objective::Probe(24), TOL, 8, |t, x| {
        layernorm(t, &x[0], &x[1], &x[2], EPS)
    });
    for (k, i) in [0, 1, 2].into_iter().enumerate() {
        let one = grad_check("layernorm one", &xs, &[i], Objective::Probe(24), TOL, 8, |t, x| {
            layernorm(t, &x[0], &x[1], &x[2], EPS)
        });
        assert_eq!(one[0], all[k], "input {i} alone");
    }
}

/// The forward against f64. In f32 the mean and the centred variance each err by ~C u |x| (a
/// length-C sum), which moves xhat by ~C u (|mean| + |x|) rstd; times |w| and plus the final
/// multiply-add, 4 C u (|x|max + |mean|) rstd |w| + 4 u (|y| + |b|) bounds every element.
#[test]
fn layernorm_forward_matches_f64_reference() {
    let mut r = rng(25);
    for (dims, offset) in CASES.into_iter().chain([(&[3, 4, 768][..], 10.0)]) {
        let [x, w, b] = inputs(&mut r, dims, offset);
        let y = layernorm(&mut Tape::inference(), &x, &w, &b, EPS).unwrap();
        let c = *dims.last().unwrap();
        let (wd, bd) = (w.f32s().unwrap(), b.f32s().unwrap());
        for (row, (xr, yr)) in x.f32s().unwrap().chunks(c).zip(y.f32s().unwrap().chunks(c)).enumerate() {
            let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
            let rstd = 1.0 / (var + EPS as f64).sqrt();
            let xmax = max_abs(xr);
            for i in 0..c {
                let want = (xr[i] as f64 - mean) * rstd * wd[i] as f64 + bd[i] as f64;
                let bound = 4.0 * c as f64 * U32 * (xmax + mean.abs()) * rstd * wd[i].abs() as f64
                    + 4.0 * U32 * (want.abs() + bd[i].abs() as f64);
                let got = yr[i] as f64;
                assert!(
                    (got - want).abs() <= bound,
                    "x={dims:?} row {row} col {i}: {got} vs {want} (bound {bound:.2e})"
                );
            }
        }
    }
}

#[test]
fn layernorm_rejects_bad_shapes() {
    let mut tape = Tape::new();
    let x = Tensor::zeros([2, 3, 13]);
    let (w, b) = (Tensor::zeros([13]), Tensor::zeros([13]));
    let (w12, b14) = (Tensor::zeros([12]), Tensor::zeros([14]));
    let w2d = Tensor::zeros([1, 13]);
    for (what, res) in [
        ("weight of length 12", layernorm(&mut tape, &x, &w12, &b, EPS)),
        ("bias of length 14", layernorm(&mut tape, &x, &w, &b14, EPS)),
        ("2-D weight", layernorm(&mut tape, &x, &w2d, &b, EPS)),
    ] {
        assert!(matches!(res, Err(Error::Shape { .. })), "{what}: {res:?}");
    }
    let ids = Tensor::from_i32(vec![0; 13], [1, 13]).unwrap();
    let res = layernorm(&mut tape, &ids, &w, &b, EPS);
    assert!(matches!(res, Err(Error::DType { .. })), "I32 x: {res:?}");
}

/// add_layernorm(x, r) and its gradients: given (x + r, layernorm(x + r)) used together (as a
/// block uses them: the sum goes on down the residual stream), the loss through both outputs.
fn add_layernorm_run(fused: bool, xs: &[Tensor; 4], targets: &Tensor) -> (Vec<Tensor>, Vec<Tensor>) {
    let mut tape = Tape::new();
    // Inputs on a device are f32 masters, cast for the forward as a model does.
    for x in xs {
        tape.watch(x);
    }
    let v: Vec<Tensor> = xs.iter().map(|x| to_compute_dtype(&mut tape, x).unwrap()).collect();
    let (s, y) = if fused {
        add_layernorm(&mut tape, &v[0], &v[1], &v[2], &v[3], EPS).unwrap()
    } else {
        let s = add(&mut tape, &v[0], &v[1]).unwrap();
        let y = layernorm(&mut tape, &s, &v[2], &v[3], EPS).unwrap();
        (s, y)
    };
    let logits = add(&mut tape, &s, &y).unwrap();
    let loss = cross_entropy(&mut tape, &logits, targets).unwrap();
    let grads = tape.backward(&loss).unwrap();
    let g = xs.iter().map(|x| grads.get(x).expect("a gradient for every input").clone()).collect();
    (vec![s, y, loss], g)
}

fn add_layernorm_inputs(seed: u64, dims: &[usize]) -> ([Tensor; 4], Tensor) {
    let mut r = rng(seed);
    let c = *dims.last().unwrap();
    let [x, w, b] = inputs(&mut r, dims, 1.0);
    let res = rand_tensor(&mut r, dims, 1.0);
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let t: Vec<i32> = (0..rows).map(|i| ((i * 7 + 3) % c) as i32).collect();
    ([x, res, w, b], Tensor::from_i32(t, &dims[..dims.len() - 1]).unwrap())
}

/// On the CPU add_layernorm is add then layernorm: the same bits forward and backward.
#[test]
fn add_layernorm_is_add_then_layernorm_bit_for_bit() {
    for (k, dims) in [&[1, 7, 13][..], &[2, 3, 20], &[5, 9]].into_iter().enumerate() {
        let (xs, targets) = add_layernorm_inputs(70 + k as u64, dims);
        let (out_f, g_f) = add_layernorm_run(true, &xs, &targets);
        let (out_u, g_u) = add_layernorm_run(false, &xs, &targets);
        for (i, (a, b)) in out_f.iter().zip(&out_u).chain(g_f.iter().zip(&g_u)).enumerate() {
            assert!(a.f32s().unwrap() == b.f32s().unwrap(), "{dims:?}: output/gradient {i} differs");
        }
    }
}

/// The CUDA kernels (kernels/layernorm.cu): host twins against the CPU backend (these run
/// everywhere), and on a GPU each kernel against the CPU backend at awkward shapes, forward and
/// backward, with NaN-poisoned outputs and a determinism check.
///
/// Tolerances, all derived from u = 2^-24 (f32) and u_bf = 2^-8 (bf16 round to nearest: a bf16
/// output g differs from its f32 value by at most u_bf |g|). The kernels take bf16 inputs; the
/// CPU gets the same rounded values as f32, so the only differences are (1) the order of the row
/// sums (lane partials and a butterfly vs the CPU's serial loop) and (2) the bf16 rounding of the
/// outputs. A length-C f32 sum errs by at most (C - 1) u sum|terms| in any order, so two
/// implementations differ by at most 2 C u sum|terms|; every bound below is that plus a few u per
/// elementwise operation, propagated through the formula (see each test). These are worst-case
/// bounds: the plain bf16 implementation (the CPU's f32 result rounded to bf16) sits at u_bf |y|,
/// and these allow that plus the f32 terms, which are 1e-4 or less of it at C = 1000.
#[cfg(feature = "cuda")]
mod cuda {
    use super::common::dev::{assert_bits, poisoned, rounded, to_bf, to_f};
    use super::common::{self, max_abs, rng, uniform, U32};
    use kiln::backend::cpu::layernorm as cpu;
    use kiln::backend::cuda::layernorm::{self as gpu, twin};
    use kiln::backend::cuda::{bf16, Cuda};

    const U_BF: f64 = 1.0 / 256.0;
    const EPS: f32 = 1e-5;
    const ROWS: [usize; 4] = [1, 7, 97, 1025];
    /// Odd widths take the scalar path; 768 and 1000 the 16-byte path with the row cached in
    /// registers (C <= KILN_LN_CACHE_C = 2048), 2304 the 16-byte path that walks the row again.
    const COLS: [usize; 5] = [1, 13, 768, 1000, 2304];

    /// x (rows * c, offset by `offset`), w ~ 1 +- 0.5, b ~ +-0.5, all bf16-valued.
    fn inputs(seed: u64, rows: usize, c: usize, offset: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut r = rng(seed);
        let x = rounded(uniform(&mut r, rows * c, 1.0).iter().map(|v| v + offset).collect());
        let w = rounded(uniform(&mut r, c, 0.5).iter().map(|v| v + 1.0).collect());
        let b = rounded(uniform(&mut r, c, 0.5));
        (x, w, b)
    }

    /// The host twin's forward is the CPU's formulas in the CPU's order: equal bits.
    #[test]
    fn twin_forward_matches_cpu_bits() {
        for (k, (rows, c, off)) in [(1, 1, 0.0), (7, 13, 0.0), (97, 768, 3.0), (5, 1000, 10.0)].into_iter().enumerate()
        {
            let (x, w, b) = inputs(100 + k as u64, rows, c, off);
            let (mut o1, mut m1, mut r1) = (vec![f32::NAN; rows * c], vec![f32::NAN; rows], vec![f32::NAN; rows]);
            let (mut o2, mut m2, mut r2) = (o1.clone(), m1.clone(), r1.clone());
            twin::layernorm_forward(&mut o1, &mut m1, &mut r1, &x, &w, &b, c, EPS);
            cpu::layernorm_forward(&mut o2, &mut m2, &mut r2, &x, &w, &b, c, EPS);
            let label = format!("twin forward rows={rows} C={c}");
            assert_bits(&format!("{label} out"), &o1, &o2);
            assert_bits(&format!("{label} mean"), &m1, &m2);
            assert_bits(&format!("{label} rstd"), &r1, &r2);
        }
    }

    /// dx: the CPU's formulas and order, equal bits. dw, db: the kernels' grouping (64-row groups,
    /// a fused multiply-add) against the CPU's (rows_per_task groups, separate multiplies): two
    /// length-rows sums, each within (rows - 1) u sum|terms|, and a rounding or two per term, so
    /// |twin - cpu| <= 2 (rows + 2) u sum_r |term_r|.
    #[test]
    fn twin_backward_matches_cpu() {
        for (k, (rows, c)) in [(1, 1), (7, 13), (97, 768), (300, 40)].into_iter().enumerate() {
            let (x, w, b) = inputs(200 + k as u64, rows, c, 1.0);
            let g = rounded(uniform(&mut rng(300 + k as u64), rows * c, 1.0));
            let (mut y, mut mean, mut rstd) = (vec![0f32; rows * c], vec![0f32; rows], vec![0f32; rows]);
            cpu::layernorm_forward(&mut y, &mut mean, &mut rstd, &x, &w, &b, c, EPS);
            let (mut dx1, mut dw1, mut db1) = (vec![f32::NAN; rows * c], vec![f32::NAN; c], vec![f32::NAN; c]);
            let (mut dx2, mut dw2, mut db2) = (dx1.clone(), dw1.clone(), db1.clone());
            twin::layernorm_backward(Some(&mut dx1), Some(&mut dw1), Some(&mut db1), &g, &x, &w, &mean, &rstd, c);
            cpu::layernorm_backward(Some(&mut dx2), Some(&mut dw2), Some(&mut db2), &g, &x, &w, &mean, &rstd, c);
            let label = format!("twin backward rows={rows} C={c}");
            assert_bits(&format!("{label} dx"), &dx1, &dx2);
            for col in 0..c {
                let (mut sw, mut sb) = (0f64, 0f64);
                for r in 0..rows {
                    let gi = g[r * c + col] as f64;
                    sw += (gi * (x[r * c + col] as f64 - mean[r] as f64) * rstd[r] as f64).abs();
                    sb += gi.abs();
                }
                let k = 2.0 * (rows as f64 + 2.0) * U32;
                let (ew, eb) = ((dw1[col] - dw2[col]).abs() as f64, (db1[col] - db2[col]).abs() as f64);
                assert!(ew <= k * sw, "{label} dw[{col}]: {} vs {} (bound {:.2e})", dw1[col], dw2[col], k * sw);
                assert!(eb <= k * sb, "{label} db[{col}]: {} vs {} (bound {:.2e})", db1[col], db2[col], k * sb);
            }
        }
    }

    /// Per-row bounds of the forward statistics between two f32 implementations that differ in
    /// summation order: mean within 2 C u max|x| (+ one rounding of the division); rstd within
    /// 2 (C + 8) u rstd (the centred sum of squares errs by C u of itself, plus 3 u per term for
    /// the subtraction and square, the square root and division add 2 u; halved by the square
    /// root, doubled for two implementations; the mean's own error enters the centred sum only
    /// at second order, delta^2 / var < 1e-6 here).
    fn stat_bounds(xr: &[f32], mean: f32, rstd: f32) -> (f64, f64) {
        let c = xr.len() as f64;
        let dm = 2.0 * c * U32 * max_abs(xr) + 2.0 * U32 * (mean as f64).abs();
        let dr = 2.0 * (c + 8.0) * U32 * rstd as f64;
        (dm, dr)
    }

    /// A forward output against the CPU's f32 value `want`: the f32 difference
    /// |w| (|x - mean| drstd + rstd dmean) + 4 u (|y| + |b|) (the final multiply-add, which the
    /// device may fuse), then the bf16 rounding u_bf (|y| + that).
    #[allow(clippy::too_many_arguments)]
    fn out_bound(want: f32, x: f32, mean: f32, rstd: f32, w: f32, b: f32, dm: f64, dr: f64) -> f64 {
        let f = (w as f64).abs() * ((x as f64 - mean as f64).abs() * dr + rstd as f64 * dm)
            + 4.0 * U32 * ((want as f64).abs() + (b as f64).abs());
        f + U_BF * ((want as f64).abs() + f)
    }

    #[allow(clippy::too_many_arguments)]
    fn check_forward(label: &str, x: &[f32], w: &[f32], b: &[f32], c: usize, got: (&[f32], &[f32], &[f32])) {
        let rows = x.len() / c;
        let (mut y, mut mean, mut rstd) = (vec![0f32; rows * c], vec![0f32; rows], vec![0f32; rows]);
        cpu::layernorm_forward(&mut y, &mut mean, &mut rstd, x, w, b, c, EPS);
        let (gy, gm, gr) = got;
        for r in 0..rows {
            let xr = &x[r * c..(r + 1) * c];
            let (dm, dr) = stat_bounds(xr, mean[r], rstd[r]);
            assert!(
                (gm[r] - mean[r]).abs() as f64 <= dm,
                "{label} row {r}: mean {} vs {} (bound {dm:.2e})",
                gm[r],
                mean[r]
            );
            assert!(
                (gr[r] - rstd[r]).abs() as f64 <= dr,
                "{label} row {r}: rstd {} vs {} (bound {dr:.2e})",
                gr[r],
                rstd[r]
            );
            for i in 0..c {
                let want = y[r * c + i];
                let bound = out_bound(want, xr[i], mean[r], rstd[r], w[i], b[i], dm, dr);
                let g = gy[r * c + i];
                assert!(
                    (g as f64 - want as f64).abs() <= bound,
                    "{label} row {r} col {i}: {g} vs cpu {want} (bound {bound:.2e})"
                );
            }
        }
    }

    #[test]
    fn gpu_forward_matches_cpu() {
        let Some(cu) = common::gpu("layernorm gpu_forward_matches_cpu") else { return };
        for (k, (&rows, &c)) in ROWS.iter().flat_map(|r| COLS.iter().map(move |c| (r, c))).enumerate() {
            let offset = if k % 2 == 0 { 0.0 } else { 3.0 };
            let (x, w, b) = inputs(400 + k as u64, rows, c, offset);
            let (dx, dw, db) =
                (cu.upload(&to_bf(&x)).unwrap(), cu.upload(&to_bf(&w)).unwrap(), cu.upload(&to_bf(&b)).unwrap());
            let mut out = poisoned(cu, rows * c, bf16::NAN);
            let (mut mean, mut rstd) = (poisoned(cu, rows, f32::NAN), poisoned(cu, rows, f32::NAN));
            gpu::layernorm_forward(&mut out, &mut mean, &mut rstd, &dx, &dw, &db, c, EPS).unwrap();
            let y = to_f(&cu.download(&out).unwrap());
            let (m, r) = (cu.download(&mean).unwrap(), cu.download(&rstd).unwrap());
            check_forward(&format!("gpu forward rows={rows} C={c} offset={offset}"), &x, &w, &b, c, (&y, &m, &r));
        }
    }

    /// h = bf16(a + r) equals the CPU's f32 sum rounded to bf16 bit for bit (one f32 add, one
    /// round to nearest even on both sides); out, mean, rstd as the plain forward of that h.
    #[test]
    fn gpu_residual_forward_matches_cpu() {
        let Some(cu) = common::gpu("layernorm gpu_residual_forward_matches_cpu") else { return };
        for (k, (&rows, &c)) in ROWS.iter().flat_map(|r| COLS.iter().map(move |c| (r, c))).enumerate() {
            let (a, w, b) = inputs(500 + k as u64, rows, c, 1.0);
            let res = rounded(uniform(&mut rng(600 + k as u64), rows * c, 1.0));
            let h_want: Vec<bf16> = a.iter().zip(&res).map(|(&p, &q)| bf16::from_f32(p + q)).collect();
            let up = |v: &[f32]| cu.upload(&to_bf(v)).unwrap();
            let (da, dr, dw, db) = (up(&a), up(&res), up(&w), up(&b));
            let (mut h, mut out) = (poisoned(cu, rows * c, bf16::NAN), poisoned(cu, rows * c, bf16::NAN));
            let (mut mean, mut rstd) = (poisoned(cu, rows, f32::NAN), poisoned(cu, rows, f32::NAN));
            gpu::layernorm_residual_forward(&mut h, &mut out, &mut mean, &mut rstd, &da, &dr, &dw, &db, c, EPS)
                .unwrap();
            let hg = cu.download(&h).unwrap();
            let label = format!("gpu residual forward rows={rows} C={c}");
            for (i, (g, want)) in hg.iter().zip(&h_want).enumerate() {
                assert!(g.to_bits() == want.to_bits(), "{label}: h[{i}] = {g} vs {want}");
            }
            let y = to_f(&cu.download(&out).unwrap());
            let (m, r) = (cu.download(&mean).unwrap(), cu.download(&rstd).unwrap());
            check_forward(&label, &to_f(&h_want), &w, &b, c, (&y, &m, &r));
        }
    }

    struct Grads {
        dx: Vec<f32>,
        dw: Vec<f32>,
        db: Vec<f32>,
    }

    #[allow(clippy::too_many_arguments)]
    fn run_backward(cu: &Cuda, g: &[f32], x: &[f32], w: &[f32], mean: &[f32], rstd: &[f32], c: usize) -> Grads {
        let rows = mean.len();
        let up = |v: &[f32]| cu.upload(&to_bf(v)).unwrap();
        let (dg, dxin, dw_in) = (up(g), up(x), up(w));
        let (dm, dr) = (cu.upload(mean).unwrap(), cu.upload(rstd).unwrap());
        let mut dx = poisoned(cu, rows * c, bf16::NAN);
        let (mut dw, mut db) = (poisoned(cu, c, f32::NAN), poisoned(cu, c, f32::NAN));
        gpu::layernorm_backward(Some(&mut dx), Some(&mut dw), Some(&mut db), &dg, &dxin, &dw_in, &dm, &dr, c).unwrap();
        Grads { dx: to_f(&cu.download(&dx).unwrap()), dw: cu.download(&dw).unwrap(), db: cu.download(&db).unwrap() }
    }

    /// dx against the CPU: per row, the two row means m1 = mean(g w), m2 = mean(g w xhat) differ
    /// between the implementations by dm1 <= 2 u (sum|g w| + |m1|) and
    /// dm2 <= 2 u (sum|g w xhat| (1 + 3 / C) + |m2|) (length-C sums, the products' roundings);
    /// then dx = rstd (g w - m1 - xhat m2) moves by rstd (dm1 + |xhat| dm2) plus 4 u of its terms,
    /// and the bf16 rounding adds u_bf |dx|. dw, db: equal bits to the host twin (same order,
    /// same fused multiply-add), and within the twin test's bound of the CPU.
    #[test]
    fn gpu_backward_matches_cpu_and_twin_and_repeats() {
        let Some(cu) = common::gpu("layernorm gpu_backward_matches_cpu_and_twin_and_repeats") else { return };
        for (k, (&rows, &c)) in ROWS.iter().flat_map(|r| COLS.iter().map(move |c| (r, c))).enumerate() {
            let (x, w, b) = inputs(700 + k as u64, rows, c, if k % 2 == 0 { 0.0 } else { 3.0 });
            let g = rounded(uniform(&mut rng(800 + k as u64), rows * c, 1.0));
            let (mut y, mut mean, mut rstd) = (vec![0f32; rows * c], vec![0f32; rows], vec![0f32; rows]);
            cpu::layernorm_forward(&mut y, &mut mean, &mut rstd, &x, &w, &b, c, EPS);
            let got = run_backward(cu, &g, &x, &w, &mean, &rstd, c);
            let label = format!("gpu backward rows={rows} C={c}");

            let mut dx = vec![0f32; rows * c];
            cpu::layernorm_backward(Some(&mut dx), None, None, &g, &x, &w, &mean, &rstd, c);
            for r in 0..rows {
                let (mut m1, mut m2, mut a1, mut a2) = (0f64, 0f64, 0f64, 0f64);
                for i in 0..c {
                    let dxhat = g[r * c + i] as f64 * w[i] as f64;
                    let xhat = (x[r * c + i] as f64 - mean[r] as f64) * rstd[r] as f64;
                    m1 += dxhat / c as f64;
                    m2 += dxhat * xhat / c as f64;
                    a1 += dxhat.abs();
                    a2 += (dxhat * xhat).abs();
                }
                let dm1 = 2.0 * U32 * (a1 + m1.abs());
                let dm2 = 2.0 * U32 * (a2 * (1.0 + 3.0 / c as f64) + m2.abs());
                let rs = rstd[r] as f64;
                for i in 0..c {
                    let xhat = (x[r * c + i] as f64 - mean[r] as f64) * rs;
                    let gw = g[r * c + i] as f64 * w[i] as f64;
                    let want = dx[r * c + i] as f64;
                    let f = rs * (dm1 + xhat.abs() * dm2) + 4.0 * U32 * rs * (gw.abs() + m1.abs() + (xhat * m2).abs());
                    let bound = f + U_BF * (want.abs() + f);
                    let gdx = got.dx[r * c + i] as f64;
                    assert!(
                        (gdx - want).abs() <= bound,
                        "{label} dx row {r} col {i}: {gdx} vs cpu {want} (bound {bound:.2e})"
                    );
                }
            }

            let (mut tw, mut tb) = (vec![f32::NAN; c], vec![f32::NAN; c]);
            twin::layernorm_backward(None, Some(&mut tw), Some(&mut tb), &g, &x, &w, &mean, &rstd, c);
            assert_bits(&format!("{label} dw vs twin"), &got.dw, &tw);
            assert_bits(&format!("{label} db vs twin"), &got.db, &tb);

            let again = run_backward(cu, &g, &x, &w, &mean, &rstd, c);
            assert_bits(&format!("{label} dx, second run"), &again.dx, &got.dx);
            assert_bits(&format!("{label} dw, second run"), &again.dw, &got.dw);
            assert_bits(&format!("{label} db, second run"), &again.db, &got.db);
        }
    }

    /// Each output may be skipped alone (a null pointer to the kernel), and what is computed
    /// does not change.
    #[test]
    fn gpu_backward_skips_outputs() {
        let Some(cu) = common::gpu("layernorm gpu_backward_skips_outputs") else { return };
        let (rows, c) = (97, 768);
        let (x, w, b) = inputs(900, rows, c, 0.0);
        let g = rounded(uniform(&mut rng(901), rows * c, 1.0));
        let (mut y, mut mean, mut rstd) = (vec![0f32; rows * c], vec![0f32; rows], vec![0f32; rows]);
        cpu::layernorm_forward(&mut y, &mut mean, &mut rstd, &x, &w, &b, c, EPS);
        let all = run_backward(cu, &g, &x, &w, &mean, &rstd, c);
        let up = |v: &[f32]| cu.upload(&to_bf(v)).unwrap();
        let (dg, dxin, dw_in) = (up(&g), up(&x), up(&w));
        let (dm, dr) = (cu.upload(&mean).unwrap(), cu.upload(&rstd).unwrap());
        let mut dw = poisoned(cu, c, f32::NAN);
        gpu::layernorm_backward(None, Some(&mut dw), None, &dg, &dxin, &dw_in, &dm, &dr, c).unwrap();
        assert_bits("dw alone", &cu.download(&dw).unwrap(), &all.dw);
        let mut db = poisoned(cu, c, f32::NAN);
        gpu::layernorm_backward(None, None, Some(&mut db), &dg, &dxin, &dw_in, &dm, &dr, c).unwrap();
        assert_bits("db alone", &cu.download(&db).unwrap(), &all.db);
        let mut dx = poisoned(cu, rows * c, bf16::NAN);
        gpu::layernorm_backward(Some(&mut dx), None, None, &dg, &dxin, &dw_in, &dm, &dr, c).unwrap();
        assert_bits("dx alone", &to_f(&cu.download(&dx).unwrap()), &all.dx);
    }

    /// add_layernorm on the device (the fused residual + layernorm kernel) against add then
    /// layernorm on the device, forward and backward (the tape gets the same add and layernorm
    /// nodes, so backward runs the same kernels on the fused forward's outputs). The sum is one f32
    /// add rounded to bf16 on both paths (bit for bit); the statistics may differ in f32
    /// summation order, so the normalised output may differ by a bf16 rounding: U_BF of its
    /// scale, and the gradients (f32 masters, bf16 activations) by as much of theirs.
    #[test]
    fn add_layernorm_on_the_device_matches_add_then_layernorm() {
        let Some(_) = common::gpu("layernorm add_layernorm_on_the_device_matches_add_then_layernorm") else { return };
        let dev = |x: &kiln::Tensor| x.to_device(kiln::Device::Cuda(0)).unwrap();
        for (k, dims) in [&[2, 7, 64][..], &[1, 33, 40], &[3, 12]].into_iter().enumerate() {
            let (xs, targets) = super::add_layernorm_inputs(80 + k as u64, dims);
            let xs = [dev(&xs[0]), dev(&xs[1]), dev(&xs[2]), dev(&xs[3])];
            let (out_f, g_f) = super::add_layernorm_run(true, &xs, &targets);
            let (out_u, g_u) = super::add_layernorm_run(false, &xs, &targets);
            let names = ["sum", "normed", "loss", "dx", "dr", "dw", "db"];
            for (name, (a, b)) in names.iter().zip(out_f.iter().zip(&out_u).chain(g_f.iter().zip(&g_u))) {
                let (a, b) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
                let e = a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64));
                let bound = if *name == "sum" { 0.0 } else { U_BF * max_abs(&b) };
                eprintln!("add_layernorm {dims:?} {name}: max diff {e:.3e}, bound {bound:.3e}");
                assert!(e <= bound, "{dims:?} {name}: fused and unfused differ by {e:.3e} > {bound:.3e}");
            }
        }
    }
}
