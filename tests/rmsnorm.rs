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
