//! Finite-difference gradient checks shared by the per-family op tests.
//!
//! The objective. kiln has no reduction op and `Tape::backward` only starts from a scalar, so the
//! plain probe L = sum(y * R) cannot be recorded on a tape. For an op output y [..., C] the checks
//! use the nearest thing the ops offer: L = cross_entropy(y @ R, t), R [C, V] a fixed random
//! matrix and t fixed random targets. Its cotangent dL/dy = (softmax - onehot) R^T / rows is dense
//! and generic (with V = C + 1 it spans every direction of a row, unlike cross_entropy on y
//! alone, whose cotangent rows sum to zero). The taped side runs kiln's matmul and
//! cross_entropy; the finite-difference side evaluates the same L in f64 from the op's f32 output,
//! so L itself adds no rounding. Both extra ops have their own checks in gemm.rs and xent.rs.
//! cross_entropy, already a scalar, is checked directly (`Objective::Output`).
//!
//! The error budget, for inputs of order 1. A central difference with step h errs by
//!   rounding:   |dL| / h, where dL is the change of L caused by f32 rounding inside the op,
//!   truncation: h^2 |d3L/dx3| / 6.
//! With the probe, dL ~ k u |y| |g|_2 (u = 6e-8, g = dL/dy, k = the roundings behind one output,
//! ~ sqrt of its reduction length) and |g|_2 ~ 0.3 sqrt(C / rows) ~ 0.3, while the largest
//! gradient entry is ~ 0.3 / rows ... 0.3. At h = 1e-2 that puts rounding near k * 2e-6 absolute
//! and truncation near 2e-5 times the gradient scale: both far under 1e-3 of max|an|. Each file
//! states its `Tol`; a wrong backward (a missing term, a swapped transpose, a factor off by a
//! few percent) misses by 1e-2 of max|an| or more.

#![allow(dead_code)]

use kiln::ops::{gemm, xent};
use kiln::{Result, Tape, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;

/// The f32 unit roundoff (half an ulp of 1).
pub const U32: f64 = 5.96e-8;

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// n values uniform in [-scale, scale).
pub fn uniform(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
        .collect()
}

/// An f32 tensor of `dims` uniform in [-scale, scale).
pub fn rand_tensor(rng: &mut StdRng, dims: &[usize], scale: f32) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_f32(uniform(rng, n, scale), dims).unwrap()
}

/// The largest absolute value.
pub fn max_abs(v: &[f32]) -> f64 {
    v.iter().fold(0f64, |m, &x| m.max((x as f64).abs()))
}

/// The scalar a check differentiates.
#[derive(Clone, Copy)]
pub enum Objective {
    /// cross_entropy(y @ R, t) with R and t drawn from this seed (see the module note).
    Probe(u64),
    /// The op's output is already the scalar loss.
    Output,
}

/// The probe's fixed R [C, V] and targets for an output of a given shape.
struct Probe {
    c: usize,
    v: usize,
    r: Vec<f32>,
    targets: Vec<i32>,
    lead: Vec<usize>,
}

impl Probe {
    fn new(dims: &[usize], seed: u64) -> Probe {
        let c = *dims.last().expect("the op output has a last dim");
        let lead = dims[..dims.len() - 1].to_vec();
        let v = c + 1;
        let mut rng = rng(seed);
        let r = uniform(&mut rng, c * v, 1.0);
        let rows = lead.iter().product();
        let targets = (0..rows).map(|_| rng.random_range(0..v as i32)).collect();
        Probe {
            c,
            v,
            r,
            targets,
            lead,
        }
    }

    fn on_tape(&self, tape: &mut Tape, y: &Tensor) -> Result<Tensor> {
        let r = Tensor::from_f32(self.r.clone(), [self.c, self.v])?;
        let z = gemm::matmul(tape, y, &r, false, false)?;
        let t = Tensor::from_i32(self.targets.clone(), self.lead.as_slice())?;
        xent::cross_entropy(tape, &z, &t)
    }

    /// The same loss in f64 from the f32 output.
    fn value(&self, y: &[f32]) -> f64 {
        let (c, v) = (self.c, self.v);
        let mut z = vec![0f64; v];
        let mut sum = 0.0;
        for (row, &t) in y.chunks_exact(c).zip(&self.targets) {
            z.fill(0.0);
            for (i, &yi) in row.iter().enumerate() {
                for (j, zj) in z.iter_mut().enumerate() {
                    *zj += yi as f64 * self.r[i * v + j] as f64;
                }
            }
            let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|&x| (x - m).exp()).sum::<f64>().ln();
            sum += lse - z[t as usize];
        }
        sum / self.targets.len() as f64
    }
}

/// Step and acceptance bound: |fd - an| <= atol + rtol * max|an| (max over the whole gradient).
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub h: f32,
    pub atol: f64,
    pub rtol: f64,
}

/// Coordinates to check: all of them when there are at most `k`, else the first, the last and
/// k - 2 more drawn without replacement.
pub fn sample_coords(n: usize, k: usize, rng: &mut StdRng) -> Vec<usize> {
    if n <= k {
        return (0..n).collect();
    }
    let mut s = BTreeSet::from([0, n - 1]);
    while s.len() < k {
        s.insert(rng.random_range(1..n - 1));
    }
    s.into_iter().collect()
}

/// Checks the tape's gradients of `inputs[i]`, for each i in `wrt`, against central differences
/// of `f` (re-run on an inference tape), at up to `samples` coordinates per input. Panics with
/// the worst coordinate on failure; returns the analytic gradients, in `wrt` order.
pub fn grad_check<F>(
    label: &str,
    inputs: &[Tensor],
    wrt: &[usize],
    objective: Objective,
    tol: Tol,
    samples: usize,
    f: F,
) -> Vec<Vec<f32>>
where
    F: Fn(&mut Tape, &[Tensor]) -> Result<Tensor>,
{
    let mut tape = Tape::new();
    for &i in wrt {
        tape.watch(&inputs[i]);
    }
    let y = f(&mut tape, inputs).unwrap();
    let probe = match objective {
        Objective::Probe(seed) => Some(Probe::new(y.dims(), seed)),
        Objective::Output => None,
    };
    let loss = match &probe {
        Some(p) => p.on_tape(&mut tape, &y).unwrap(),
        None => y.clone(),
    };
    let grads = tape.backward(&loss).unwrap();
    let value = |t: &Tensor| match &probe {
        Some(p) => p.value(t.f32s().unwrap()),
        None => t.item().unwrap() as f64,
    };

    let mut pick = rng(0x5eed ^ inputs.len() as u64);
    let mut out = Vec::new();
    for &i in wrt {
        let an = grads
            .get(&inputs[i])
            .unwrap_or_else(|| panic!("{label}: no gradient for input {i}"));
        assert_eq!(an.dims(), inputs[i].dims(), "{label}: input {i} grad shape");
        let an = an.f32s().unwrap().to_vec();
        let amax = max_abs(&an);
        assert!(amax > 0.0, "{label}: gradient of input {i} is all zeros");
        let bound = tol.atol + tol.rtol * amax;
        let x0 = inputs[i].f32s().unwrap().to_vec();
        let (mut worst, mut worst_at, mut fd_max) = (0f64, (0, 0.0, 0.0), 0f64);
        for k in sample_coords(x0.len(), samples, &mut pick) {
            let mut eval = |x: f32| {
                let mut x1 = x0.clone();
                x1[k] = x;
                let mut args = inputs.to_vec();
                args[i] = Tensor::from_f32(x1, inputs[i].dims()).unwrap();
                value(&f(&mut Tape::inference(), &args).unwrap())
            };
            let (xp, xm) = (x0[k] + tol.h, x0[k] - tol.h);
            let fd = (eval(xp) - eval(xm)) / (xp as f64 - xm as f64);
            let err = (fd - an[k] as f64).abs();
            fd_max = fd_max.max(fd.abs());
            if err > worst {
                (worst, worst_at) = (err, (k, fd, an[k] as f64));
            }
        }
        let (k, fd, a) = worst_at;
        eprintln!(
            "{label}: input {i}: worst |fd - an| = {worst:.2e} at {k} ({:.3} of the bound {bound:.2e}), max|an| = {amax:.2e}",
            worst / bound
        );
        assert!(
            worst <= bound,
            "{label}: input {i}, element {k}: finite difference {fd:.6e} vs tape {a:.6e}: \
             |diff| = {worst:.3e} > {bound:.3e} (max|an| = {amax:.3e}, {tol:?})"
        );
        assert!(
            fd_max > 10.0 * bound,
            "{label}: input {i}: every sampled finite difference is within 10x the tolerance \
             ({fd_max:.3e} vs {bound:.3e}); the check would not see a zero gradient"
        );
        out.push(an);
    }
    out
}
