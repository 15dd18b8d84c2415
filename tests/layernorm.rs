//! LayerNorm: gradients of x, weight and bias against finite differences at awkward widths, the
//! forward against an f64 reference, and shape errors.

mod common;

use common::{grad_check, max_abs, poison_pool, rand_tensor, rng, uniform, Objective, Tol, POOLED, U32};
use kiln::ops::layernorm::layernorm;
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
    assert!(2 * 64 * 128 >= POOLED);
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
