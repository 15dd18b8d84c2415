//! GELU, residual add and dropout: gradients against finite differences, GELU's forward against
//! f64, dropout's identity cases and mask, and input errors.

mod common;

use common::{grad_check, poison_pool, rand_tensor, rng, Objective, Tol, POOLED, U32};
use kiln::ops::elementwise::{add, dropout, gelu, swiglu};
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
    const { assert!(2 * 64 * 128 >= POOLED) };
    let x = rand_tensor(&mut r, &[2, 64, 128], 4.0);
    let passes: Vec<_> = (0..2)
        .map(|pass| {
            if pass == 1 {
                poison_pool(&[2 * 64 * 128]);
            }
            let label = format!("gelu x=[2, 64, 128], pass {pass}");
            grad_check(&label, std::slice::from_ref(&x), &[0], Objective::Probe(32), TOL, 16, |t, x| gelu(t, &x[0]))
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
        grad_check(&label, std::slice::from_ref(&x), &[0], Objective::Probe(37), TOL, 24, |t, x| {
            dropout(t, &x[0], p, train, 99)
        });
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

    let dx = grad_check("dropout p=0.5", std::slice::from_ref(&x), &[0], Objective::Probe(39), TOL, 48, |t, x| {
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

/// The CUDA kernels (kernels/elementwise.cu) and their host twins against the CPU backend.
///
/// Why most checks are bit-exact: kernels/elementwise.cuh repeats cpu::gelu / gelu_grad operation
/// for operation with explicitly rounded f32 intrinsics (no FMA contraction on the device; the
/// host twins are built with -ffp-contract=off), and residual add, add_assign and dropout are a
/// single f32 operation per element. IEEE f32 +, -, *, / are correctly rounded on both sides, so
/// the f32 values agree exactly, and bf16 outputs are the round-to-nearest-even of equal f32
/// values. Any difference is therefore a bug (wrong index, missed element, a contracted FMA), not
/// rounding, and a tolerance would only hide it.
#[cfg(feature = "cuda")]
mod cuda {
    use super::common::{self, rng, uniform, U32};
    use kiln::backend::cpu::elementwise as cpu;
    use kiln::backend::cuda::elementwise::{self as gpu, twin};
    use kiln::backend::cuda::{bf16, grid_1d, Cuda, Kernel};

    const SIZES: [usize; 5] = [1, 7, 97, 1025, (1 << 20) + 3];

    /// Inputs that cover GELU's regions: a dense sweep of [-12, 12] (both saturated tails and
    /// the transition), random values, and the special points.
    fn gelu_inputs() -> Vec<f32> {
        let mut x: Vec<f32> = (0..=240_000).map(|i| -12.0 + i as f32 * 1e-4).collect();
        x.extend(uniform(&mut rng(71), 100_000, 6.0));
        x.extend([0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8, 20.0, -20.0, 50.0, -50.0, 1e4, -1e4, 3e38, -3e38]);
        x
    }

    fn gelu_f64(x: f64) -> f64 {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        0.5 * x * (1.0 + (k * (x + 0.044715 * x.powi(3))).tanh())
    }

    fn gelu_grad_f64(x: f64) -> f64 {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        let t = (k * (x + 0.044715 * x.powi(3))).tanh();
        0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x)
    }

    fn assert_bits_eq(label: &str, got: &[f32], want: &[f32], inp: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(g.to_bits() == w.to_bits(), "{label}: element {i} (x = {:e}): got {g:e}, want {w:e}", inp[i]);
        }
    }

    /// The host twin of GELU equals cpu::gelu bit for bit (see the module note), and both meet
    /// the CPU test's bound against f64, 8 u (|x| + 1) (gelu_forward_matches_f64 derives it; measured:
    /// 0.17 of it at worst): the twin achieves exactly what the CPU achieves.
    #[test]
    fn twin_gelu_matches_cpu_bits_and_f64() {
        let x = gelu_inputs();
        let mut got = vec![f32::NAN; x.len()];
        twin::gelu(&mut got, &x);
        let want: Vec<f32> = x.iter().map(|&v| cpu::gelu(v)).collect();
        assert_bits_eq("twin gelu vs cpu::gelu", &got, &want, &x);
        let mut worst = 0f64;
        for (&xi, &yi) in x.iter().zip(&got) {
            if xi.abs() > 1e3 {
                continue; // x^3 overflows f32 there in both; equal bits are checked above
            }
            let bound = 8.0 * U32 * (xi.abs() as f64 + 1.0);
            let err = (yi as f64 - gelu_f64(xi as f64)).abs();
            worst = worst.max(err / bound);
            assert!(err <= bound, "gelu({xi:e}) = {yi:e}, f64 {:e}", gelu_f64(xi as f64));
        }
        eprintln!("twin gelu: worst error vs f64 = {worst:.3} of 8 u (|x| + 1)");
    }

    /// The same for the derivative and for the backward's product dout * gelu'(x). The f64 bound
    /// 16 u (x^2 + 1): gelu' = 0.5 (1 + t) + 0.5 x (1 - t^2) du sums ~15 roundings of terms up to
    /// 1 + 0.1 x^2 in size, and tanh's own absolute error (< 1e-7, about 2 u) enters times
    /// 0.5 + |x t du| <= 1 + 0.1 x^2; 16 u (x^2 + 1) covers both (measured: 0.11 of it at worst).
    #[test]
    fn twin_gelu_grad_matches_cpu_bits_and_f64() {
        let x = gelu_inputs();
        let mut got = vec![f32::NAN; x.len()];
        twin::gelu_grad(&mut got, &x);
        let want: Vec<f32> = x.iter().map(|&v| cpu::gelu_grad(v)).collect();
        assert_bits_eq("twin gelu_grad vs cpu::gelu_grad", &got, &want, &x);
        let mut worst = 0f64;
        for (&xi, &gi) in x.iter().zip(&got) {
            if xi.abs() > 1e3 {
                continue;
            }
            let bound = 16.0 * U32 * (xi as f64 * xi as f64 + 1.0);
            let err = (gi as f64 - gelu_grad_f64(xi as f64)).abs();
            worst = worst.max(err / bound);
            assert!(err <= bound, "gelu'({xi:e}) = {gi:e}, f64 {:e}", gelu_grad_f64(xi as f64));
        }
        eprintln!("twin gelu_grad: worst error vs f64 = {worst:.3} of 16 u (x^2 + 1)");
        let dout = uniform(&mut rng(72), x.len(), 2.0);
        let mut dx = vec![f32::NAN; x.len()];
        twin::gelu_backward(&mut dx, &x, &dout);
        let mut want = vec![f32::NAN; x.len()];
        cpu::gelu_backward(&mut want, &x, &dout);
        assert_bits_eq("twin gelu_backward vs cpu::gelu_backward", &dx, &want, &x);
    }

    /// The dropout mask rule equals cpu::dropout_keep bit for bit: 2^21 consecutive indices from
    /// several starting points (0, around 2^32 and 2^40, the top of u64 where i + 1 wraps), at
    /// several drop probabilities including the extremes, under three seeds; 88M draws in all.
    #[test]
    fn twin_dropout_keep_is_bit_exact() {
        let n = 1usize << 21;
        let mut mask = vec![0xAAu8; n];
        for seed in [0u64, 5, 0xDEAD_BEEF_0123_4567] {
            for p in [0.0f32, 1e-7, 0.1, 0.5, 0.9, 0.999_999_9] {
                for first in [0u64, (1 << 32) - 1000, 1 << 40, u64::MAX - n as u64 + 1] {
                    twin::dropout_mask(&mut mask, seed, p, first);
                    for (j, &m) in mask.iter().enumerate() {
                        let i = first.wrapping_add(j as u64);
                        let want = cpu::dropout_keep(seed, i, p) as u8;
                        assert_eq!(m, want, "seed {seed} p {p} index {i}");
                    }
                }
                if p == 0.5 {
                    let kept = mask.iter().filter(|&&m| m == 1).count() as f64 / n as f64;
                    // 2^21 draws: sd 3.5e-4, so 0.5 +- 0.005 is > 10 sd
                    assert!((kept - 0.5).abs() < 5e-3, "seed {seed}: kept fraction {kept}");
                }
            }
        }
        let mut cpu_mask = vec![0xAAu8; 4097];
        cpu::dropout_mask(&mut cpu_mask, 9, 0.3);
        let mut mask = vec![0xAAu8; 4097];
        twin::dropout_mask(&mut mask, 9, 0.3, 0);
        assert_eq!(mask, cpu_mask, "cpu::dropout_mask");
    }

    // ---- GPU: every kernel against the CPU backend at SIZES ----

    fn round_bf16(x: &[f32]) -> Vec<f32> {
        x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
    }

    fn to_bf16(x: &[f32]) -> Vec<bf16> {
        x.iter().map(|&v| bf16::from_f32(v)).collect()
    }

    /// A device buffer of n NaNs: any element a kernel does not write fails the comparison.
    fn poisoned(cu: &Cuda, n: usize) -> kiln::backend::cuda::DevBuf<bf16> {
        cu.upload(&vec![bf16::NAN; n]).unwrap()
    }

    /// Bit equality of a kernel's bf16 output with the CPU's f32 result rounded to bf16.
    fn check_bf16(label: &str, got: &[bf16], want_f32: &[f32]) {
        assert_eq!(got.len(), want_f32.len(), "{label}: length");
        for (i, (&g, &w)) in got.iter().zip(want_f32).enumerate() {
            let w = bf16::from_f32(w);
            assert!(g.to_bits() == w.to_bits(), "{label}: element {i} of {}: got {g}, want {w}", got.len());
        }
    }

    #[test]
    fn gpu_gelu_forward_backward() {
        let Some(cu) = common::gpu("elementwise::cuda::gpu_gelu_forward_backward") else { return };
        let mut r = rng(81);
        for n in SIZES {
            // scale 6 reaches both saturated tails
            let x = round_bf16(&uniform(&mut r, n, 6.0));
            let dout = round_bf16(&uniform(&mut r, n, 2.0));
            let (xd, dd) = (cu.upload(&to_bf16(&x)).unwrap(), cu.upload(&to_bf16(&dout)).unwrap());
            let mut y = poisoned(cu, n);
            gpu::gelu_forward(&mut y, &xd).unwrap();
            let mut want = vec![0f32; n];
            cpu::gelu_forward(&mut want, &x);
            check_bf16(&format!("gelu_forward n={n}"), &cu.download(&y).unwrap(), &want);
            let mut dx = poisoned(cu, n);
            gpu::gelu_backward(&mut dx, &xd, &dd).unwrap();
            cpu::gelu_backward(&mut want, &x, &dout);
            check_bf16(&format!("gelu_backward n={n}"), &cu.download(&dx).unwrap(), &want);
        }
    }

    /// The scalar path: views one element into the buffers are 2 bytes off 16-byte alignment, so
    /// the kernels skip the vector loop and do every element one by one.
    #[test]
    fn gpu_gelu_unaligned() {
        let Some(cu) = common::gpu("elementwise::cuda::gpu_gelu_unaligned") else { return };
        let mut r = rng(82);
        for n in [1usize, 97, 1025, 100_003] {
            let x = round_bf16(&uniform(&mut r, n + 1, 6.0));
            let xd = cu.upload(&to_bf16(&x)).unwrap();
            let mut y = poisoned(cu, n + 1);
            {
                let xv = xd.slice(1..);
                let mut yv = y.slice_mut(1..);
                let n64 = n as i64;
                let mut b = cu.launch_builder(Kernel::ElementwiseGeluForward);
                b.arg_mut(&mut yv).arg(&xv).arg(&n64);
                // SAFETY: gelu_forward's arguments in order; both views hold n elements.
                unsafe { b.launch(grid_1d(n, 256)) }.unwrap();
            }
            let got = cu.download(&y).unwrap();
            assert!(got[0].is_nan(), "n={n}: the element before the view was written");
            let want: Vec<f32> = x[1..].iter().map(|&v| cpu::gelu(v)).collect();
            check_bf16(&format!("gelu_forward unaligned n={n}"), &got[1..], &want);
        }
    }

    #[test]
    fn gpu_residual_forward_and_add_assign() {
        let Some(cu) = common::gpu("elementwise::cuda::gpu_residual_forward_and_add_assign") else { return };
        let mut r = rng(83);
        for n in SIZES {
            let a = round_bf16(&uniform(&mut r, n, 3.0));
            let b = round_bf16(&uniform(&mut r, n, 3.0));
            let (ad, bd) = (cu.upload(&to_bf16(&a)).unwrap(), cu.upload(&to_bf16(&b)).unwrap());
            let mut out = poisoned(cu, n);
            gpu::residual_forward(&mut out, &ad, &bd).unwrap();
            let mut want = vec![0f32; n];
            cpu::residual_forward(&mut want, &a, &b);
            check_bf16(&format!("residual_forward n={n}"), &cu.download(&out).unwrap(), &want);

            let mut dst = cu.upload(&to_bf16(&a)).unwrap();
            gpu::add_assign(&mut dst, &bd).unwrap();
            let mut want = a.clone();
            cpu::add_assign(&mut want, &b);
            check_bf16(&format!("add_assign n={n}"), &cu.download(&dst).unwrap(), &want);

            // f32: unrounded inputs, exact f32 sums expected
            let (a, b) = (uniform(&mut r, n, 3.0), uniform(&mut r, n, 3.0));
            let mut dst = cu.upload(&a).unwrap();
            gpu::add_assign_f32(&mut dst, &cu.upload(&b).unwrap()).unwrap();
            let mut want = a.clone();
            cpu::add_assign(&mut want, &b);
            assert_bits_eq(&format!("add_assign_f32 n={n}"), &cu.download(&dst).unwrap(), &want, &a);
        }
    }

    /// The casts between f32 masters and the bf16 forward: exact against half's conversions
    /// (round to nearest even one way, exact the other).
    #[test]
    fn gpu_casts() {
        let Some(cu) = common::gpu("elementwise::cuda::gpu_casts") else { return };
        let mut r = rng(85);
        for n in SIZES {
            let mut x = uniform(&mut r, n, 3.0);
            // values exactly halfway between two bf16 exercise the ties-to-even rule
            for (i, xi) in x.iter_mut().enumerate().step_by(5) {
                *xi = f32::from_bits((xi.to_bits() & 0xFFFF_0000) | if i % 2 == 0 { 0x8000 } else { 0x7FFF });
            }
            let mut out = poisoned(cu, n);
            gpu::cast_f32_to_bf16(&mut out, &cu.upload(&x).unwrap()).unwrap();
            let got: Vec<u16> = cu.download(&out).unwrap().iter().map(|v| v.to_bits()).collect();
            let want: Vec<u16> = x.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
            assert!(got == want, "cast_f32_to_bf16 n={n}");

            let xb = to_bf16(&x);
            let mut outf = cu.upload(&vec![f32::NAN; n]).unwrap();
            gpu::cast_bf16_to_f32(&mut outf, &cu.upload(&xb).unwrap()).unwrap();
            let want: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
            assert_bits_eq(&format!("cast_bf16_to_f32 n={n}"), &cu.download(&outf).unwrap(), &want, &x);
        }
    }

    #[test]
    fn gpu_dropout_mask_forward_and_fused() {
        let Some(cu) = common::gpu("elementwise::cuda::gpu_dropout_mask_forward_and_fused") else { return };
        let mut r = rng(84);
        for n in SIZES {
            for (seed, p) in [(3u64, 0.1f32), (0xFEED_F00D_1234_5678, 0.5), (77, 0.9)] {
                let scale = 1.0 / (1.0 - p);
                let label = format!("n={n} seed={seed} p={p}");
                let mut want_mask = vec![0u8; n];
                cpu::dropout_mask(&mut want_mask, seed, p);
                let mut mask = cu.upload(&vec![0xAAu8; n]).unwrap();
                gpu::dropout_mask(&mut mask, seed, p).unwrap();
                assert!(cu.download(&mask).unwrap() == want_mask, "dropout_mask {label}");

                let x = round_bf16(&uniform(&mut r, n, 2.0));
                let xd = cu.upload(&to_bf16(&x)).unwrap();
                let mut want = vec![0f32; n];
                cpu::dropout_forward(&mut want, &x, &want_mask, scale);
                let mut out = poisoned(cu, n);
                gpu::dropout_forward(&mut out, &xd, &mask, scale).unwrap();
                check_bf16(&format!("dropout_forward {label}"), &cu.download(&out).unwrap(), &want);

                // fused, storing the mask
                let mut out = poisoned(cu, n);
                let mut mask2 = cu.upload(&vec![0xAAu8; n]).unwrap();
                gpu::dropout(&mut out, Some(&mut mask2), &xd, seed, p, scale).unwrap();
                check_bf16(&format!("dropout (fused) {label}"), &cu.download(&out).unwrap(), &want);
                assert!(cu.download(&mask2).unwrap() == want_mask, "dropout (fused) mask {label}");

                // fused without a mask, on dout: the backward
                let dout = round_bf16(&uniform(&mut r, n, 2.0));
                let dd = cu.upload(&to_bf16(&dout)).unwrap();
                cpu::dropout_forward(&mut want, &dout, &want_mask, scale);
                let mut dx = poisoned(cu, n);
                gpu::dropout(&mut dx, None, &dd, seed, p, scale).unwrap();
                check_bf16(&format!("dropout backward {label}"), &cu.download(&dx).unwrap(), &want);
            }
        }
    }

    /// SwiGLU's kernels equal the CPU bit for bit (kernels/elementwise.cuh repeats cpu::silu and
    /// silu_grad with fast_exp), forward and both gradients, at SIZES and on the scalar path (a
    /// view one element off 16-byte alignment); inputs reach silu's saturated tails.
    #[test]
    fn gpu_swiglu_forward_backward() {
        let Some(cu) = common::gpu("elementwise::cuda::gpu_swiglu_forward_backward") else { return };
        let mut r = rng(86);
        for n in SIZES {
            let g = round_bf16(&uniform(&mut r, n, 12.0));
            let u = round_bf16(&uniform(&mut r, n, 3.0));
            let o = round_bf16(&uniform(&mut r, n, 2.0));
            let (gd, ud, od) =
                (cu.upload(&to_bf16(&g)).unwrap(), cu.upload(&to_bf16(&u)).unwrap(), cu.upload(&to_bf16(&o)).unwrap());
            let mut y = poisoned(cu, n);
            gpu::swiglu_forward(&mut y, &gd, &ud).unwrap();
            let mut want = vec![0f32; n];
            cpu::swiglu_forward(&mut want, &g, &u);
            check_bf16(&format!("swiglu_forward n={n}"), &cu.download(&y).unwrap(), &want);
            let (mut dg, mut du) = (poisoned(cu, n), poisoned(cu, n));
            gpu::swiglu_backward(&mut dg, &mut du, &gd, &ud, &od).unwrap();
            let (mut wg, mut wu) = (vec![0f32; n], vec![0f32; n]);
            cpu::swiglu_backward(Some(&mut wg), Some(&mut wu), &g, &u, &o);
            check_bf16(&format!("swiglu_backward dgate n={n}"), &cu.download(&dg).unwrap(), &wg);
            check_bf16(&format!("swiglu_backward dup n={n}"), &cu.download(&du).unwrap(), &wu);
        }
        // the scalar path
        let n = 1025;
        let g = round_bf16(&uniform(&mut r, n + 1, 12.0));
        let u = round_bf16(&uniform(&mut r, n + 1, 3.0));
        let (gd, ud) = (cu.upload(&to_bf16(&g)).unwrap(), cu.upload(&to_bf16(&u)).unwrap());
        let mut y = poisoned(cu, n + 1);
        {
            let (gv, uv, mut yv) = (gd.slice(1..), ud.slice(1..), y.slice_mut(1..));
            let n64 = n as i64;
            let mut b = cu.launch_builder(Kernel::ElementwiseSwigluForward);
            b.arg_mut(&mut yv).arg(&gv).arg(&uv).arg(&n64);
            // SAFETY: swiglu_forward's arguments in order; every view holds n elements.
            unsafe { b.launch(grid_1d(n, 256)) }.unwrap();
        }
        let got = cu.download(&y).unwrap();
        assert!(got[0].is_nan(), "the element before the view was written");
        let mut want = vec![0f32; n];
        cpu::swiglu_forward(&mut want, &g[1..], &u[1..]);
        check_bf16("swiglu_forward unaligned", &got[1..], &want);
    }

    #[test]
    fn gpu_wrappers_reject_mismatched_lengths() {
        let Some(cu) = common::gpu("elementwise::cuda::gpu_wrappers_reject_mismatched_lengths") else { return };
        let a = poisoned(cu, 8);
        let mut out = poisoned(cu, 9);
        assert!(matches!(gpu::gelu_forward(&mut out, &a), Err(kiln::Error::Shape { .. })));
        assert!(matches!(gpu::residual_forward(&mut out, &a, &a), Err(kiln::Error::Shape { .. })));
        assert!(matches!(gpu::swiglu_forward(&mut out, &a, &a), Err(kiln::Error::Shape { .. })));
    }
}

/// SwiGLU: gradients of both inputs against finite differences (truncation h^2 |silu'''| / 6 <=
/// 2e-5 of the gradient scale), the forward against f64, and mismatched shapes refused.
#[test]
fn swiglu_grads_and_forward() {
    let mut r = rng(37);
    for dims in [&[9][..], &[2, 5, 11]] {
        let (g, u) = (rand_tensor(&mut r, dims, 4.0), rand_tensor(&mut r, dims, 2.0));
        let label = format!("swiglu {dims:?}");
        grad_check(&label, &[g.clone(), u.clone()], &[0, 1], Objective::Probe(33), TOL, 48, |t, x| {
            swiglu(t, &x[0], &x[1])
        });
        let y = swiglu(&mut Tape::inference(), &g, &u).unwrap();
        for ((&y, &g), &u) in y.f32s().unwrap().iter().zip(g.f32s().unwrap()).zip(u.f32s().unwrap()) {
            let want = g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64;
            assert!((y as f64 - want).abs() <= 4.0 * U32 * want.abs().max(1e-6), "swiglu({g}, {u}) = {y}, want {want}");
        }
    }
    let e = swiglu(&mut Tape::new(), &Tensor::zeros([3]), &Tensor::zeros([4]));
    assert!(matches!(e, Err(Error::Shape { .. })), "{e:?}");
}
