//! Fused softmax cross-entropy: the logits gradient against finite differences of the loss
//! itself, masked (-100) positions, the all-masked batch, the forward against f64, and errors.

mod common;

use common::{grad_check, max_abs, poison_pool, rand_tensor, rng, Objective, Tol, POOLED, U32};
use kiln::ops::xent::{cross_entropy, IGNORE};
use kiln::{Error, Tape, Tensor};
use rand::Rng;

/// Tolerance. The loss is differentiated directly, and it is an f32 scalar: rows are summed in
/// f64, but each row's lse - logit carries a few roundings of |lse| ~ 3 and the mean is rounded
/// to f32 (ulp 2.4e-7 at L ~ 2.5), so dL ~ 5e-7 and rounding is dL / h ~ 1e-5 at h = 5e-2,
/// against max|an| ~ 1 / rows ~ 0.1. The larger step is affordable: the third derivative of a
/// row's lse along one logit is p (1 - p) (1 - 2 p) <= 0.1, giving h^2 * 0.1 / 6 ~ 4e-5 of the
/// gradient scale. Measured worst: 5e-5 of max|an|, against the shared rtol = 2e-3; a gradient
/// that divides by all rows instead of the counted ones is off by the masked fraction.
const TOL: Tol = Tol { h: 5e-2, atol: 1e-6, rtol: 2e-3 };

/// Random targets in [0, V), every `mask_every`-th position replaced by IGNORE.
fn targets(r: &mut rand::rngs::StdRng, lead: &[usize], v: usize, mask_every: usize) -> Tensor {
    let n = lead.iter().product();
    let t: Vec<i32> = (0..n)
        .map(|i| if mask_every > 0 && i % mask_every == 1 { IGNORE } else { r.random_range(0..v as i32) })
        .collect();
    Tensor::from_i32(t, lead).unwrap()
}

/// (logits dims, mask every n-th target; 0 = none).
const CASES: [(&[usize], usize); 4] = [(&[2, 7, 11], 3), (&[1, 1, 5], 0), (&[3, 13], 2), (&[4, 2], 0)];

#[test]
fn cross_entropy_grads_with_masked_positions() {
    let mut r = rng(51);
    for (dims, mask_every) in CASES {
        let (lead, v) = (&dims[..dims.len() - 1], dims[dims.len() - 1]);
        let logits = rand_tensor(&mut r, dims, 2.0);
        let t = targets(&mut r, lead, v, mask_every);
        let label = format!("cross_entropy logits={dims:?} mask_every={mask_every}");
        let g =
            grad_check(&label, &[logits], &[0], Objective::Output, TOL, 48, |tape, x| cross_entropy(tape, &x[0], &t));
        // Masked rows get exactly zero; every other row sums to zero (softmax - onehot).
        for (row, (&tr, gr)) in t.i32s().unwrap().iter().zip(g[0].chunks(v)).enumerate() {
            if tr == IGNORE {
                assert!(gr.iter().all(|&x| x == 0.0), "{label}: masked row {row}: {gr:?}");
            } else {
                let s: f32 = gr.iter().sum();
                assert!(s.abs() <= 1e-6, "{label}: row {row} sums to {s}");
            }
        }
    }
}

/// The loss in f64: the mean over unmasked rows of lse - logit[target].
fn reference(logits: &[f32], targets: &[i32], v: usize) -> f64 {
    let (mut sum, mut n) = (0f64, 0usize);
    for (row, &t) in logits.chunks(v).zip(targets) {
        if t == IGNORE {
            continue;
        }
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
        let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        sum += lse - row[t as usize] as f64;
        n += 1;
    }
    sum / n as f64
}

/// The forward against f64, with logits offset by +80 too (exp would overflow unshifted). Each
/// row's lse - logit has a few roundings of max|z| + ln V; 8 u (max|z| + ln V + 1) bounds it.
/// Changing a masked row's logits leaves the loss bit-for-bit unchanged.
#[test]
fn cross_entropy_forward_matches_f64_and_ignores_masked_rows() {
    let mut r = rng(52);
    for (dims, mask_every) in CASES {
        for offset in [0.0, 80.0] {
            let (lead, v) = (&dims[..dims.len() - 1], dims[dims.len() - 1]);
            let z: Vec<f32> = rand_tensor(&mut r, dims, 3.0).f32s().unwrap().iter().map(|x| x + offset).collect();
            let t = targets(&mut r, lead, v, mask_every);
            let loss = |z: Vec<f32>| {
                let logits = Tensor::from_f32(z, dims).unwrap();
                let y = cross_entropy(&mut Tape::inference(), &logits, &t).unwrap();
                assert_eq!(y.dims(), &[1]);
                y.item().unwrap()
            };
            let got = loss(z.clone());
            let want = reference(&z, t.i32s().unwrap(), v);
            let bound = 8.0 * U32 * (max_abs(&z) + (v as f64).ln() + 1.0);
            assert!(
                (got as f64 - want).abs() <= bound,
                "logits={dims:?} offset={offset}: {got} vs {want} (bound {bound:.2e})"
            );
            let mut z2 = z.clone();
            for (row, &tr) in t.i32s().unwrap().iter().enumerate() {
                if tr == IGNORE {
                    z2[row * v..(row + 1) * v].iter_mut().for_each(|x| *x = -*x * 7.0);
                }
            }
            assert_eq!(loss(z2).to_bits(), got.to_bits(), "logits={dims:?}: masked rows count");
        }
    }
}

/// The gradient against its f64 formula (softmax - onehot) / count at logits [16, 1031], a
/// pooled buffer, the second time in a buffer filled with NaN. (Finite differences of an f32
/// loss cannot resolve gradients of ~1 / count over so many rows.) Each element is
/// exp(z - lse) / count with lse carrying a few roundings of |lse| <= max|z| + ln V and exp
/// ~2 ulp of its own; 1 / count and the target's "- 1 / count" round once or twice more. So
/// (8 u (max|z| + ln V + 1) p + 4 u) / count bounds its error.
#[test]
fn cross_entropy_grad_matches_f64_on_recycled_buffers() {
    let mut r = rng(54);
    let (rows, v) = (16, 1031);
    assert!(rows * v >= POOLED);
    let logits = rand_tensor(&mut r, &[rows, v], 4.0);
    let t = targets(&mut r, &[rows], v, 3);
    let grad = |pass: usize| {
        if pass == 1 {
            poison_pool(&[rows * v]);
        }
        let mut tape = Tape::new();
        tape.watch(&logits);
        let loss = cross_entropy(&mut tape, &logits, &t).unwrap();
        tape.backward(&loss).unwrap().get(&logits).unwrap().f32s().unwrap().to_vec()
    };
    let (g0, g1) = (grad(0), grad(1));
    assert!(g0 == g1, "fresh and recycled buffers gave different gradients");
    let (z, td) = (logits.f32s().unwrap(), t.i32s().unwrap());
    let count = td.iter().filter(|&&x| x != IGNORE).count() as f64;
    let zmax = max_abs(z);
    for (row, (zr, &tr)) in z.chunks(v).zip(td).enumerate() {
        let m = zr.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
        let lse = m + zr.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        for (j, &zj) in zr.iter().enumerate() {
            let p = (zj as f64 - lse).exp();
            let (want, bound) = if tr == IGNORE {
                (0.0, 0.0)
            } else {
                let onehot = if j == tr as usize { 1.0 } else { 0.0 };
                ((p - onehot) / count, (8.0 * U32 * (zmax + (v as f64).ln() + 1.0) * p + 4.0 * U32) / count)
            };
            let got = g1[row * v + j] as f64;
            assert!((got - want).abs() <= bound, "row {row} col {j}: {got} vs {want} (bound {bound:.2e})");
        }
    }
}

/// No target at all: loss 0 and a zero gradient (not NaN).
#[test]
fn cross_entropy_all_masked_is_zero() {
    let mut r = rng(53);
    let logits = rand_tensor(&mut r, &[2, 7, 11], 2.0);
    let t = Tensor::from_i32(vec![IGNORE; 14], [2, 7]).unwrap();
    let mut tape = Tape::new();
    tape.watch(&logits);
    let loss = cross_entropy(&mut tape, &logits, &t).unwrap();
    assert_eq!(loss.item().unwrap(), 0.0);
    let grads = tape.backward(&loss).unwrap();
    let g = grads.get(&logits).expect("a gradient for the logits");
    assert_eq!(g.dims(), logits.dims());
    assert!(g.f32s().unwrap().iter().all(|&x| x == 0.0), "{:?}", g.f32s());
}

#[test]
fn cross_entropy_rejects_bad_inputs() {
    let mut tape = Tape::new();
    let logits = Tensor::zeros([2, 7, 11]);
    let t = |v: Vec<i32>, d: &[usize]| Tensor::from_i32(v, d).unwrap();
    for (what, res) in [
        ("target = V", cross_entropy(&mut tape, &logits, &t(vec![11; 14], &[2, 7]))),
        ("target -1", cross_entropy(&mut tape, &logits, &t(vec![-1; 14], &[2, 7]))),
    ] {
        assert!(matches!(res, Err(Error::Input(_))), "{what}: {res:?}");
    }
    for (what, res) in [
        ("targets [2, 6]", cross_entropy(&mut tape, &logits, &t(vec![0; 12], &[2, 6]))),
        ("targets [14]", cross_entropy(&mut tape, &logits, &t(vec![0; 14], &[14]))),
        ("targets [7, 2]", cross_entropy(&mut tape, &logits, &t(vec![0; 14], &[7, 2]))),
    ] {
        assert!(matches!(res, Err(Error::Shape { .. })), "{what}: {res:?}");
    }
    let res = cross_entropy(&mut tape, &logits, &Tensor::zeros([2, 7]));
    assert!(matches!(res, Err(Error::DType { .. })), "f32 targets: {res:?}");
}
