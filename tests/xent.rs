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

/// The CUDA kernels (kernels/xent.cu): host twins against the CPU backend (these run
/// everywhere), and on a GPU each kernel against an f64 reference and the CPU backend at V = 50257
/// (GPT-2's vocabulary, a multiple of nothing), 1000, 13 and 1, rows 1 to 1025, bf16 and f32
/// logits, with NaN-poisoned outputs and a determinism check.
///
/// Tolerances. A row's lse sums V positive terms; in f32 the relative error of that sum, hence
/// the absolute error of lse, depends on the summation order, which differs between the CPU (8
/// lanes, then a serial tail), the twin (1 to 1024 simulated lanes) and the kernel (256 threads,
/// 16-byte groups, a butterfly). The bound is the flash-attention rule: within twice the error
/// the plain f32 implementation (the CPU's logsumexp) makes against f64 on the same rows, or
/// within the CPU test's own allowance 8 u (max|z| + ln V + 1) when that is larger (it covers the
/// final m + ln(s) and the exp's few ulp). The loss adds one subtraction (2 u |loss|). The
/// gradient p * scale (- scale at the target) with p = exp(z - lse) inherits p * dlse from lse,
/// (|z - lse| + 6) u p from the subtraction, the exp (2 ulp = 4 u on the device) and the
/// multiply, 2 u scale at the target, and for bf16 the output rounding u_bf |d|, u_bf = 2^-8.
/// The host twin with fewer than 8 simulated lanes sums in longer chains than the CPU, and its
/// bound grows in proportion (check_forward).
#[cfg(feature = "cuda")]
mod cuda {
    use super::common::{self, max_abs, rng, uniform, U32};
    use kiln::backend::cpu::xent::{self as cpu, IGNORE};
    use kiln::backend::cuda::xent::{self as gpu, twin};
    use kiln::backend::cuda::{bf16, Cuda, DevBuf, DeviceElem};
    use rand::Rng;

    const U_BF: f64 = 1.0 / 256.0;

    fn to_bf(v: &[f32]) -> Vec<bf16> {
        v.iter().map(|&x| bf16::from_f32(x)).collect()
    }
    fn to_f(v: &[bf16]) -> Vec<f32> {
        v.iter().map(|x| x.to_f32()).collect()
    }

    fn poisoned<T: DeviceElem + Copy>(cu: &Cuda, n: usize, nan: T) -> DevBuf<T> {
        cu.upload(&vec![nan; n]).unwrap()
    }

    /// bf16-valued logits uniform in [-4, 4) + offset, and targets with every third IGNORE.
    fn problem(seed: u64, rows: usize, v: usize, offset: f32) -> (Vec<f32>, Vec<i32>) {
        let mut r = rng(seed);
        let z = to_f(&to_bf(&uniform(&mut r, rows * v, 4.0).iter().map(|x| x + offset).collect::<Vec<_>>()));
        let t = (0..rows).map(|i| if i % 3 == 1 { IGNORE } else { r.random_range(0..v as i32) }).collect();
        (z, t)
    }

    fn lse_f64(row: &[f32]) -> f64 {
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
        m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
    }

    /// The lse bound for these logits (module note): max(2 * the CPU's worst error, 8 u (...)).
    fn lse_bound(z: &[f32], v: usize, exact: &[f64]) -> f64 {
        let cpu_err =
            z.chunks(v).zip(exact).map(|(row, &e)| (cpu::logsumexp(row) as f64 - e).abs()).fold(0f64, f64::max);
        (2.0 * cpu_err).max(8.0 * U32 * (max_abs(z) + (v as f64).ln() + 1.0))
    }

    /// `depth` scales the bound for an implementation whose serial summation chains are longer
    /// than the CPU's (V / 8 per lane): a sum's worst-case rounding grows with its chain length,
    /// so a single-lane twin (chains of V) gets 8 times the bound; the kernel (256 lanes) gets 1.
    fn check_forward(label: &str, z: &[f32], t: &[i32], v: usize, losses: &[f32], lse: &[f32], depth: f64) -> f64 {
        let exact: Vec<f64> = z.chunks(v).map(lse_f64).collect();
        let bound = depth.max(1.0) * lse_bound(z, v, &exact);
        let worst = lse.iter().zip(&exact).map(|(&l, &e)| (l as f64 - e).abs()).fold(0f64, f64::max);
        eprintln!("{label}: worst |lse - f64| = {worst:.2e} ({:.3} of the bound {bound:.2e})", worst / bound);
        for (r, &tr) in t.iter().enumerate() {
            let e = (lse[r] as f64 - exact[r]).abs();
            assert!(e <= bound, "{label} row {r}: lse {} vs f64 {} (bound {bound:.2e})", lse[r], exact[r]);
            if tr == IGNORE {
                assert!(
                    losses[r] == 0.0 && losses[r].is_sign_positive(),
                    "{label} row {r}: ignored, loss {}",
                    losses[r]
                );
            } else {
                let want = exact[r] - z[r * v + tr as usize] as f64;
                let b = bound + 2.0 * U32 * want.abs();
                assert!(
                    (losses[r] as f64 - want).abs() <= b,
                    "{label} row {r}: loss {} vs f64 {want} (bound {b:.2e})",
                    losses[r]
                );
            }
        }
        bound
    }

    /// Gradient bound for one element (module note); `bf` adds the bf16 output rounding.
    #[allow(clippy::too_many_arguments)]
    fn check_backward(label: &str, z: &[f32], t: &[i32], v: usize, scale: f32, dlse: f64, got: &[f32], bf: bool) {
        let s = scale.abs() as f64;
        for (r, &tr) in t.iter().enumerate() {
            let lse = lse_f64(&z[r * v..(r + 1) * v]);
            for j in 0..v {
                let g = got[r * v + j] as f64;
                if tr == IGNORE {
                    assert!(g == 0.0, "{label} row {r} col {j}: ignored row, dlogit {g}");
                    continue;
                }
                let zj = z[r * v + j] as f64;
                let p = (zj - lse).exp();
                let is_t = j == tr as usize;
                let want = (p - if is_t { 1.0 } else { 0.0 }) * scale as f64;
                let mut b = s * (p * (dlse + ((zj - lse).abs() + 6.0) * U32) + if is_t { 2.0 * U32 } else { 0.0 });
                if bf {
                    b += U_BF * (want.abs() + b);
                }
                assert!((g - want).abs() <= b, "{label} row {r} col {j}: {g:e} vs f64 {want:e} (bound {b:.2e})");
            }
        }
    }

    /// The twin's online recurrence (any lane count) against f64 within the same bound the kernels
    /// meet, and its gradient formula; runs without a GPU.
    #[test]
    fn twin_matches_f64_and_cpu() {
        for (k, (rows, v, offset)) in
            [(3, 1, 0.0), (7, 13, 0.0), (5, 1000, 80.0), (3, 50257, 0.0)].into_iter().enumerate()
        {
            let (z, t) = problem(1000 + k as u64, rows, v, offset);
            for lanes in [1, 7, 256] {
                let (mut losses, mut lse) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
                twin::xent_forward(&mut losses, &mut lse, &z, &t, v, lanes);
                let label = format!("twin rows={rows} V={v} offset={offset} lanes={lanes}");
                let dlse = check_forward(&label, &z, &t, v, &losses, &lse, 8.0 / lanes as f64);
                let mut d = vec![f32::NAN; rows * v];
                twin::xent_backward(&mut d, &z, &lse, &t, v, 0.25);
                check_backward(&label, &z, &t, v, 0.25, dlse, &d, false);
                // And the CPU's own gradient, from the CPU's lse, meets the same bound.
                let (mut cl, mut clse) = (vec![0f32; rows], vec![0f32; rows]);
                cpu::xent_forward(&mut cl, &mut clse, &z, &t, v, v);
                d.copy_from_slice(&z);
                cpu::xent_backward(&mut d, &clse, &t, v, v, 0.25);
                check_backward(&format!("{label} (cpu)"), &z, &t, v, 0.25, dlse, &d, false);
            }
        }
    }

    /// Forward and in-place backward on the device, bf16 and f32 logits, each run twice with
    /// equal bits, against f64 and (through lse_bound) the CPU.
    #[test]
    fn gpu_forward_backward_match_f64_and_repeat() {
        let Some(cu) = common::gpu("xent gpu_forward_backward_match_f64_and_repeat") else { return };
        let mut shapes: Vec<(usize, usize)> = [1, 7, 97, 1025].iter().flat_map(|&r| [(r, 1000), (r, 50257)]).collect();
        shapes.extend([(7, 1), (7, 13)]);
        for (k, &(rows, v)) in shapes.iter().enumerate() {
            let offset = if k % 3 == 2 { 80.0 } else { 0.0 };
            let (z, t) = problem(2000 + k as u64, rows, v, offset);
            let scale = 1.0 / rows as f32;
            let dt = cu.upload(&t).unwrap();
            for f32_logits in [false, true] {
                let label = format!("gpu rows={rows} V={v} offset={offset} f32={f32_logits}");
                let run = || -> (Vec<f32>, Vec<f32>, Vec<f32>) {
                    let (mut losses, mut lse) = (poisoned(cu, rows, f32::NAN), poisoned(cu, rows, f32::NAN));
                    let d = if f32_logits {
                        let mut dz = cu.upload(&z).unwrap();
                        gpu::xent_forward(&mut losses, &mut lse, &dz, &dt, v, v).unwrap();
                        gpu::xent_backward(&mut dz, &lse, &dt, v, v, scale).unwrap();
                        cu.download(&dz).unwrap()
                    } else {
                        let mut dz = cu.upload(&to_bf(&z)).unwrap();
                        gpu::xent_forward(&mut losses, &mut lse, &dz, &dt, v, v).unwrap();
                        gpu::xent_backward(&mut dz, &lse, &dt, v, v, scale).unwrap();
                        to_f(&cu.download(&dz).unwrap())
                    };
                    (cu.download(&losses).unwrap(), cu.download(&lse).unwrap(), d)
                };
                let (losses, lse, d) = run();
                let dlse = check_forward(&label, &z, &t, v, &losses, &lse, 1.0);
                check_backward(&label, &z, &t, v, scale, dlse, &d, !f32_logits);
                let (l2, lse2, d2) = run();
                let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same(&losses, &l2) && same(&lse, &lse2) && same(&d, &d2), "{label}: second run differs");
                // The loss sum, as the CPU twin returns it.
                let (sum, count) = gpu::loss_sum(&cu.upload(&losses).unwrap(), &t).unwrap();
                assert_eq!(count, t.iter().filter(|&&x| x != IGNORE).count(), "{label}: count");
                assert_eq!(sum, losses.iter().map(|&l| l as f64).sum::<f64>(), "{label}: sum");
            }
        }
    }

    /// Rows lying `pitch` > V elements apart (the classifier's padded logits) give the bits of the
    /// dense rows, and the padding between them is neither read (NaN there changes nothing) nor
    /// written; CPU and device alike.
    #[test]
    fn padded_rows_equal_dense_rows_and_keep_their_padding() {
        let pad = |z: &[f32], v: usize, pitch: usize, fill: f32| -> Vec<f32> {
            z.chunks(v).flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(fill, pitch - v))).collect()
        };
        let unpad =
            |z: &[f32], v: usize, pitch: usize| -> Vec<f32> { z.chunks(pitch).flat_map(|r| r[..v].to_vec()).collect() };
        let same =
            |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        for (k, (rows, v)) in [(5, 1000), (3, 50257), (4, 13)].into_iter().enumerate() {
            let pitch = kiln::backend::padded_vocab(v);
            let (mut z, t) = problem(4000 + k as u64, rows, v, 0.0);
            let label = format!("rows={rows} V={v} pitch={pitch}");
            // CPU.
            let (mut l1, mut s1, mut l2, mut s2) =
                (vec![0f32; rows], vec![0f32; rows], vec![0f32; rows], vec![0f32; rows]);
            let r1 = cpu::xent_forward(&mut l1, &mut s1, &z, &t, v, v);
            let mut zp = pad(&z, v, pitch, f32::NAN);
            let r2 = cpu::xent_forward(&mut l2, &mut s2, &zp, &t, v, pitch);
            assert!(r1 == r2 && same(&l1, &l2) && same(&s1, &s2), "cpu forward {label}");
            cpu::xent_backward(&mut z, &s1, &t, v, v, 0.5);
            cpu::xent_backward(&mut zp, &s2, &t, v, pitch, 0.5);
            assert!(same(&z, &unpad(&zp, v, pitch)), "cpu backward {label}");
            assert!(zp.chunks(pitch).all(|r| r[v..].iter().all(|x| x.is_nan())), "cpu padding written {label}");
            // Device, bf16 logits.
            let Some(cu) = common::gpu("xent padded_rows_equal_dense_rows_and_keep_their_padding") else { continue };
            let (z, _) = problem(4000 + k as u64, rows, v, 0.0);
            let dt = cu.upload(&t).unwrap();
            let run = |logits: Vec<f32>, p: usize| {
                let mut dz = cu.upload(&to_bf(&logits)).unwrap();
                let (mut losses, mut lse) = (poisoned(cu, rows, f32::NAN), poisoned(cu, rows, f32::NAN));
                gpu::xent_forward(&mut losses, &mut lse, &dz, &dt, v, p).unwrap();
                gpu::xent_backward(&mut dz, &lse, &dt, v, p, 0.5).unwrap();
                (cu.download(&losses).unwrap(), cu.download(&lse).unwrap(), to_f(&cu.download(&dz).unwrap()))
            };
            let (la, sa, da) = run(z.clone(), v);
            let (lb, sb, db) = run(pad(&z, v, pitch, f32::NAN), pitch);
            assert!(same(&la, &lb) && same(&sa, &sb), "gpu forward {label}");
            assert!(same(&da, &unpad(&db, v, pitch)), "gpu backward {label}");
            assert!(db.chunks(pitch).all(|r| r[v..].iter().all(|x| x.is_nan())), "gpu padding written {label}");
        }
    }

    /// A target outside [0, V) that is not IGNORE is never dereferenced: NaN loss and NaN row.
    #[test]
    fn gpu_bad_target_is_nan_not_a_fault() {
        let Some(cu) = common::gpu("xent gpu_bad_target_is_nan_not_a_fault") else { return };
        let (rows, v) = (3, 1000);
        let (z, mut t) = problem(3000, rows, v, 0.0);
        t[0] = v as i32;
        t[2] = -1;
        let dt = cu.upload(&t).unwrap();
        let mut dz = cu.upload(&to_bf(&z)).unwrap();
        let (mut losses, mut lse) = (poisoned(cu, rows, 0f32), poisoned(cu, rows, 0f32));
        gpu::xent_forward(&mut losses, &mut lse, &dz, &dt, v, v).unwrap();
        gpu::xent_backward(&mut dz, &lse, &dt, v, v, 1.0).unwrap();
        let (l, d) = (cu.download(&losses).unwrap(), to_f(&cu.download(&dz).unwrap()));
        assert!(l[0].is_nan() && l[1] == 0.0 && l[2].is_nan(), "{l:?}");
        assert!(
            d[..v].iter().all(|x| x.is_nan())
                && d[v..2 * v].iter().all(|&x| x == 0.0)
                && d[2 * v..].iter().all(|x| x.is_nan())
        );
    }

    /// The kernel's ignore label is the CPU's.
    #[test]
    fn ignore_label_agrees() {
        assert_eq!(gpu::IGNORE, IGNORE);
    }
}

/// `classifier_loss` (the classifier and the loss as one op, its logits in padded rows, its
/// backward in place) equals `linear` then `cross_entropy`: the loss and the gradients of the
/// input and the weight, on the CPU and (when there is one) the GPU, with masked positions.
#[test]
fn classifier_loss_equals_linear_then_cross_entropy() {
    use kiln::ops::gemm::{linear, WeightLayout};
    use kiln::ops::xent::classifier_loss;
    let mut r = rng(77);
    let (b, t, c, v) = (2, 9, 64, 300);
    let h = rand_tensor(&mut r, &[b, t, c], 1.0);
    let w = rand_tensor(&mut r, &[v, c], 0.5);
    let tg = targets(&mut r, &[b, t], v, 4);
    #[allow(unused_mut)]
    let mut devices = vec![kiln::Device::Cpu];
    #[cfg(feature = "cuda")]
    if common::gpu("classifier_loss_equals_linear_then_cross_entropy (GPU half)").is_some() {
        devices.push(kiln::Device::Cuda(0));
    }
    for dev in devices {
        // The device computes in bf16: its tensors are the CPU's values rounded to bf16.
        let on = |x: &Tensor| match dev {
            kiln::Device::Cpu => x.clone(),
            _ => x.to_dtype(kiln::DType::BF16).unwrap().to_device(dev).unwrap(),
        };
        let (h, w) = (on(&h), on(&w));
        let run = |fused: bool| {
            let mut tape = Tape::new();
            tape.watch(&h);
            tape.watch(&w);
            let loss = if fused {
                classifier_loss(&mut tape, &h, &w, &tg).unwrap()
            } else {
                let logits = linear(&mut tape, &h, &w, None, WeightLayout::OutIn, false).unwrap();
                cross_entropy(&mut tape, &logits, &tg).unwrap()
            };
            let g = tape.backward(&loss).unwrap();
            let grad = |x: &Tensor| g.get(x).unwrap().to_device(kiln::Device::Cpu).unwrap().to_f32_vec().unwrap();
            (loss.item().unwrap(), grad(&h), grad(&w))
        };
        let (l1, dh1, dw1) = run(true);
        let (l2, dh2, dw2) = run(false);
        // The GPU's input gradient is bf16 (one rounding, 2^-9); everything else is f32.
        let tol = if dev == kiln::Device::Cpu { 1e-5 } else { 4e-3 };
        assert!((l1 - l2).abs() <= 1e-6 * l2.abs(), "{dev:?}: loss {l1} vs {l2}");
        for (what, a, b) in [("dh", &dh1, &dh2), ("dw", &dw1, &dw2)] {
            let scale = max_abs(b) as f32;
            let err = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(scale > 0.0 && err <= tol * scale, "{dev:?} {what}: max error {err} against scale {scale}");
        }
    }
}

/// A classifier weight that is not [V, C] with the input's C, or targets outside the vocabulary,
/// are errors that say so.
#[test]
fn classifier_loss_rejects_bad_inputs() {
    use kiln::ops::xent::classifier_loss;
    let mut tape = Tape::new();
    let h = Tensor::zeros([2, 3, 8]);
    let ok = Tensor::from_i32(vec![0; 6], [2, 3]).unwrap();
    let e = classifier_loss(&mut tape, &h, &Tensor::zeros([10, 7]), &ok);
    assert!(matches!(e, Err(Error::Shape { .. })), "{e:?}");
    let e = classifier_loss(&mut tape, &h, &Tensor::zeros([10, 8]), &Tensor::from_i32(vec![10; 6], [2, 3]).unwrap());
    assert!(matches!(&e, Err(Error::Input(m)) if m.contains("outside the vocabulary")), "{e:?}");
    let e = classifier_loss(&mut tape, &h, &Tensor::zeros([10, 8]), &Tensor::from_i32(vec![0; 3], [3]).unwrap());
    assert!(matches!(e, Err(Error::Shape { .. })), "{e:?}");
}
