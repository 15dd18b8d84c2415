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
//! The error budget, for inputs of order 1 (u = 6e-8, the f32 unit roundoff). A central
//! difference with step h errs by
//!   rounding:   dL / h, dL = the change of L due to f32 rounding inside the op's forward;
//!   truncation: h^2 |d3L/dx3| / 6.
//! Outputs that do not depend on the perturbed input come out bit-identical in both runs and
//! cancel, so dL involves only the n outputs that input touches (1 for elementwise ops and
//! embeddings, a row for layernorm, a row or column for gemm), each off by k u |y| (k = the
//! roundings behind one output, ~ sqrt of its reduction length). The errors have random signs,
//! so dL ~ k u sqrt(n) |g| |y| with g the probe's cotangent, while the gradient itself is
//! ~ |g| |dy/dx|. Relative to max|an| rounding is therefore ~ k u sqrt(n) / h <= 3e-4 here
//! (k <= 4, n <= 130, h = 1e-2), and truncation ~ h^2 / 6 times a curvature of order 1-10,
//! <= 2e-4. Measured worst cases are 2e-4 of max|an| (gemm with fused GELU, where the
//! curvature is largest) down to 5e-6 (embedding), so every family uses
//!   |fd - an| <= 1e-6 + 2e-3 max|an|,
//! 10x the worst measured error and well below what a wrong backward gives: deliberately broken
//! backwards (a transpose flag flipped, the bias gradient scaled by 1.003, the D_i term of
//! attention scaled by 0.99, a GELU slope term off by 2%) all fail it. The atol only matters
//! for gradients below 5e-4. xent.rs uses h = 5e-2; its file says why.

#![allow(dead_code)]

pub mod cli;
pub mod sft;

/// A file under the repository root. Looked up at run time first: tools/gpu-bundle.sh runs the
/// test binaries on another machine, from the repository root, where the build machine's
/// CARGO_MANIFEST_DIR does not exist.
pub fn repo_file(rel: &str) -> std::path::PathBuf {
    let candidates = [
        std::env::var_os("CARGO_MANIFEST_DIR").map(std::path::PathBuf::from),
        Some(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
        std::env::current_dir().ok(),
    ];
    let root = candidates.into_iter().flatten().find(|r| r.join(rel).exists());
    root.unwrap_or_else(|| panic!("{rel} not found: run from the repository root")).join(rel)
}

use kiln::ops::{gemm, xent};
use kiln::{Result, Tape, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;

/// The f32 unit roundoff (half an ulp of 1).
pub const U32: f64 = 5.96e-8;

/// The CPU backend recycles f32 buffers of at least this many elements with their stale
/// contents (src/backend/cpu/pool.rs). Each family checks one shape past it twice, the second
/// time after `poison_pool`, so that an element an op forgets to write shows up as NaN.
pub const POOLED: usize = 1 << 14;

/// Parks NaN-filled buffers of each size in kiln's pool (a stack), so that the next buffers of
/// those sizes that ops take are NaN wherever the op does not write.
pub fn poison_pool(sizes: &[usize]) {
    for &n in sizes {
        assert!(n >= POOLED, "{n} elements would not be pooled");
        for _ in 0..4 {
            drop(Tensor::from_f32(vec![f32::NAN; n], [n]).unwrap());
        }
    }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// n values uniform in [-scale, scale).
pub fn uniform(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

/// An f32 tensor of `dims` uniform in [-scale, scale).
pub fn rand_tensor(rng: &mut StdRng, dims: &[usize], scale: f32) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_f32(uniform(rng, n, scale), dims).unwrap()
}

/// max |a - b| / max |b|: the largest error relative to the largest reference value (0 when both
/// are all zeros; any difference from an all-zero reference is huge, not NaN).
pub fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    diff / b.iter().map(|y| y.abs()).fold(0f32, f32::max).max(f32::MIN_POSITIVE)
}

/// `max_rel_err` of two f32 tensors of the same shape.
pub fn max_rel_err_t(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    max_rel_err(a.f32s().unwrap(), b.f32s().unwrap())
}

/// Each parameter's gradient in `g` against the fixture tensor of the same name in `want`: a
/// gradient must exist and be within `tol` (max_rel_err_t), else a panic naming `label` and the
/// parameter. Returns the worst (error, name).
pub fn assert_grads_match<'a>(
    label: &str,
    params: impl IntoIterator<Item = &'a kiln::nn::Param>,
    g: &kiln::Gradients,
    want: &std::collections::BTreeMap<String, Tensor>,
    tol: f32,
) -> (f32, String) {
    let mut worst = (0f32, String::new());
    for p in params {
        let w = want.get(&p.name).unwrap_or_else(|| panic!("{label}: fixture lacks {}", p.name));
        let got = g.get(&p.tensor).unwrap_or_else(|| panic!("{label}: kiln produced no gradient for {}", p.name));
        let e = max_rel_err_t(got, w);
        assert!(e < tol, "{label}: {}: rel err {e}", p.name);
        if e > worst.0 {
            worst = (e, p.name.clone());
        }
    }
    worst
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
        Probe { c, v, r, targets, lead }
    }

    fn on_tape(&self, tape: &mut Tape, y: &Tensor) -> Result<Tensor> {
        let r = Tensor::from_f32(self.r.clone(), [self.c, self.v])?;
        let z = gemm::matmul(tape, y, &r, gemm::Trans::No, gemm::Trans::No)?;
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
        let an = grads.get(&inputs[i]).unwrap_or_else(|| panic!("{label}: no gradient for input {i}"));
        assert_eq!(an.dims(), inputs[i].dims(), "{label}: input {i} grad shape");
        let an = an.f32s().unwrap().to_vec();
        assert!(an.iter().all(|x| x.is_finite()), "{label}: gradient of input {i} is not finite");
        let amax = max_abs(&an);
        assert!(amax > 0.0, "{label}: gradient of input {i} is all zeros");
        let bound = tol.atol + tol.rtol * amax;
        let x0 = inputs[i].f32s().unwrap().to_vec();
        let (mut worst, mut worst_at, mut fd_max) = (0f64, (0, 0.0, 0.0), 0f64);
        for k in sample_coords(x0.len(), samples, &mut pick) {
            let eval = |x: f32| {
                let mut x1 = x0.clone();
                x1[k] = x;
                let mut args = inputs.to_vec();
                args[i] = Tensor::from_f32(x1, inputs[i].dims()).unwrap();
                value(&f(&mut Tape::inference(), &args).unwrap())
            };
            let (xp, xm) = (x0[k] + tol.h, x0[k] - tol.h);
            let fd = (eval(xp) - eval(xm)) / (xp as f64 - xm as f64);
            assert!(fd.is_finite(), "{label}: input {i}, element {k}: the forward is not finite");
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

/// The CUDA device: the GPU where one is present, else the emulated device (KILN_TEST_DEVICE=gpu
/// or emu forces one). Prints which, once per test, to the process's stderr (the harness captures
/// eprintln!). None, after printing why the test is skipped, only when the device cannot start; a
/// skipped test passes without checking anything, so it says so loudly, and tools/gpu-bundle's
/// run.sh fails on any skip.
#[cfg(feature = "cuda")]
#[allow(dead_code)]
pub fn gpu(test: &str) -> Option<&'static kiln::backend::cuda::Cuda> {
    kiln::backend::cuda::select_for_tests();
    match kiln::backend::cuda::cuda() {
        Ok(cu) => {
            use std::io::Write;
            let on = if cu.is_emulated() { "the emulated device" } else { cu.name() };
            let _ = writeln!(std::io::stderr(), "{test}: on {on}");
            Some(cu)
        }
        Err(e) => {
            // Written to the process's stderr directly: the test harness captures eprintln!, and
            // a skip must show in the log even when the test passes.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {e}");
            None
        }
    }
}

/// Host-side helpers of the kernel tests: bf16 conversions, NaN-poisoned device buffers (so an
/// element a kernel fails to write shows), and bitwise comparison.
#[cfg(feature = "cuda")]
pub mod dev {
    use kiln::backend::cuda::{bf16, Cuda, DevBuf, DeviceElem};

    pub fn to_bf(v: &[f32]) -> Vec<bf16> {
        v.iter().map(|&x| bf16::from_f32(x)).collect()
    }
    pub fn to_f(v: &[bf16]) -> Vec<f32> {
        v.iter().map(|x| x.to_f32()).collect()
    }
    /// The values a bf16 buffer holds, as f32 (what the CPU is given).
    pub fn rounded(v: Vec<f32>) -> Vec<f32> {
        to_f(&to_bf(&v))
    }
    pub fn poisoned<T: DeviceElem + Copy>(cu: &Cuda, n: usize, nan: T) -> DevBuf<T> {
        cu.upload(&vec![nan; n]).unwrap()
    }
    pub fn assert_bits(label: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{label}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(g.to_bits() == w.to_bits(), "{label}: element {i}: {g:e} vs {w:e}");
        }
    }
}
