//! GELU, residual add and dropout: gradients against finite differences, GELU's forward against
//! f64, dropout's identity cases and mask, and input errors.

mod common;

use common::{grad_check, poison_pool, rand_tensor, rng, Objective, Tol, POOLED, U32};
use kiln::ops::elementwise::{add, dropout, gelu};
use kiln::{Error, Tape, Tensor};

/// Tolerance. Each output is one or two roundings of its input (k ~ 1), so rounding is ~1e-6 of
/// max|an| at h = 1e-2; GELU adds truncation h^2 |gelu'''| / 6 <= 2e-5 (|gelu'''| <= 1.2) of
/// the gradient scale, and add and dropout are linear. Measured worst: 1.3e-5 of max|an|,
/// against the shared rtol = 2e-3 (see common). It does not separate the tanh GELU from the erf one
/// (their slopes differ by <= 9e-4); gelu_forward_matches_f64 pins the forward instead. A
/// gelu' without its x (1 - t^2) du term, or a dropout gradient without the 1 / (1 - p), is
/// off by > 1e-1.
const TOL: Tol = Tol { h: 1e-2, atol: 1e-6, rtol: 2e-3 };

#[test]
fn gelu_grads() {
    let mut r = rng(31);
    // Scale 4 reaches both tails, where tanh saturates.
    for dims in [&[7][..], &[2, 7, 13], &[1, 1, 20]] {
        let x = rand_tensor(&mut r, dims, 4.0);
        let label = format!("gelu x={dims:?}");
        grad_check(&label, &[x], &[0], Objective::Probe(32), TOL, 48, |t, x| gelu(t, &x[0]));
    }
    // y and dx [2, 64, 128] are pooled buffers: the second pass takes ones filled with NaN.
    assert!(2 * 64 * 128 >= POOLED);
    let x = rand_tensor(&mut r, &[2, 64, 128], 4.0);
    let passes: Vec<_> = (0..2)
        .map(|pass| {
            if pass == 1 {
                poison_pool(&[2 * 64 * 128]);
            }
            let label = format!("gelu x=[2, 64, 128], pass {pass}");
            grad_check(&label, &[x.clone()], &[0], Objective::Probe(32), TOL, 16, |t, x| gelu(t, &x[0]))
        })
        .collect();
    assert!(passes[0] == passes[1], "fresh and recycled buffers gave different gradients");
}

/// GELU against f64: the tanh approximation costs a few ulps of |x| in f32 (the cube, tanh's
/// own ~2 ulp, the final products), so 8 u (|x| + 1) bounds it.
#[test]
fn gelu_forward_matches_f64() {
    let mut r = rng(33);
    let x = rand_tensor(&mut r, &[4, 257], 6.0);
    let y = gelu(&mut Tape::inference(), &x).unwrap();
    for (&xi, &yi) in x.f32s().unwrap().iter().zip(y.f32s().unwrap()) {
        let v = xi as f64;
        let k = (2.0 / std::f64::consts::PI).sqrt();
        let want = 0.5 * v * (1.0 + (k * (v + 0.044715 * v.powi(3))).tanh());
        let bound = 8.0 * U32 * (v.abs() + 1.0);
        assert!(((yi as f64) - want).abs() <= bound, "gelu({xi}) = {yi}, want {want}");
    }
}

#[test]
fn add_grads() {
    let mut r = rng(34);
    for dims in [&[7, 12][..], &[2, 1, 5], &[3, 7, 13]] {
        let inputs = [rand_tensor(&mut r, dims, 1.0), rand_tensor(&mut r, dims, 1.0)];
        let label = format!("add {dims:?}");
        let g = grad_check(&label, &inputs, &[0, 1], Objective::Probe(35), TOL, 48, |t, x| add(t, &x[0], &x[1]));
        assert_eq!(g[0], g[1], "{label}: both inputs get dout itself");
    }
}

/// p = 0 and train = false are the identity: the same values, nothing recorded, and the gradient
/// passes straight through.
#[test]
fn dropout_identity_cases() {
    let mut r = rng(36);
    let x = rand_tensor(&mut r, &[2, 7, 13], 1.0);
    for (p, train) in [(0.0, true), (0.5, false), (0.0, false)] {
        let mut tape = Tape::new();
        tape.watch(&x);
        let y = dropout(&mut tape, &x, p, train, 99).unwrap();
        assert_eq!(y.f32s().unwrap(), x.f32s().unwrap(), "p={p} train={train}");
        assert!(tape.is_empty(), "p={p} train={train} recorded {:?}", tape.summary());
        let label = format!("dropout p={p} train={train}");
        grad_check(&label, &[x.clone()], &[0], Objective::Probe(37), TOL, 24, |t, x| dropout(t, &x[0], p, train, 99));
    }
}

/// p = 0.5 in training: every output is 0 or 2 x, about half are kept, the gradient is exactly
/// mask * 2 * dout, and the mask is a function of the seed alone.
#[test]
fn dropout_mask_and_grads() {
    let mut r = rng(38);
    let dims = [2, 7, 13];
    let x = rand_tensor(&mut r, &dims, 1.0);
    let run = |seed: u64| {
        let y = dropout(&mut Tape::inference(), &x, 0.5, true, seed).unwrap();
        y.f32s().unwrap().to_vec()
    };
    let y = run(5);
    let xd = x.f32s().unwrap();
    let kept: Vec<bool> = y
        .iter()
        .zip(xd)
        .map(|(&yi, &xi)| {
            assert!(yi == 2.0 * xi || yi == 0.0, "dropout gave {yi} for {xi}");
            yi != 0.0
        })
        .collect();
    let frac = kept.iter().filter(|&&k| k).count() as f64 / kept.len() as f64;
    // 182 draws: the kept fraction has sd 0.037, so [0.3, 0.7] is > 5 sd wide.
    assert!((0.3..=0.7).contains(&frac), "kept fraction {frac}");
    assert_eq!(run(5), y, "the same seed must give the same mask");
    assert_ne!(run(6), y, "another seed should give another mask");

    let dx = grad_check("dropout p=0.5", &[x.clone()], &[0], Objective::Probe(39), TOL, 48, |t, x| {
        dropout(t, &x[0], 0.5, true, 5)
    });
    // dout: the probe's gradient at the dropout output, taken with that output as a leaf.
    let y_leaf = Tensor::from_f32(y.clone(), dims).unwrap();
    let dout = grad_check("probe", &[y_leaf], &[0], Objective::Probe(39), TOL, 8, |_, x| Ok(x[0].clone()));
    for (i, (&g, &d)) in dx[0].iter().zip(&dout[0]).enumerate() {
        let want = if kept[i] { 2.0 * d } else { 0.0 };
        assert_eq!(g, want, "element {i}: kept={} dout={d}", kept[i]);
    }
}

#[test]
fn elementwise_rejects_bad_inputs() {
    let mut tape = Tape::new();
    let x = Tensor::zeros([2, 7]);
    let res = add(&mut tape, &x, &Tensor::zeros([7, 2]));
    assert!(matches!(res, Err(Error::Shape { .. })), "add [2,7] + [7,2]: {res:?}");
    let res = add(&mut tape, &x, &Tensor::zeros([2, 7, 1]));
    assert!(matches!(res, Err(Error::Shape { .. })), "add [2,7] + [2,7,1]: {res:?}");
    for p in [1.0, 1.5, -0.1, f32::NAN] {
        let res = dropout(&mut tape, &x, p, true, 0);
        assert!(res.is_err(), "dropout p={p}: {res:?}");
    }
    let ids = Tensor::from_i32(vec![0; 14], [2, 7]).unwrap();
    let res = gelu(&mut tape, &ids);
    assert!(matches!(res, Err(Error::DType { .. })), "gelu on I32: {res:?}");
}
