//! Reductions for clipping by global gradient norm. The CPU twin (backend::cpu::reduce) is
//! exercised through the tape's clipping tests; this file checks the CUDA kernels
//! (kernels/reduce.cu) against it: host twins everywhere, the kernels on a GPU.

mod common;

/// Host twins against the CPU backend (these run everywhere) and, on a GPU, the kernels against
/// the twins' replay of their summation order (equal bits, every run) and the CPU.
///
/// Tolerance, derived in kernels/reduce.cuh: each device thread folds at most m = per_thread(n)
/// squares into an f32 sum with one fused multiply-add each, so its partial errs by at most
/// m u of itself (u = 2^-24); everything after is f64 (2^-53 per add, ~20 levels). The CPU sums
/// in f64 throughout (error ~n 2^-53 S, < 1e-9 S here). So |gpu - cpu| <= (m + 1) u S, and no
/// slack is needed on top because the bound is already the worst case.
#[cfg(feature = "cuda")]
mod cuda {
    use super::common::{self, rng, uniform};
    use kiln::backend::cpu::reduce as cpu;
    use kiln::backend::cuda::reduce::{self as gpu, twin};

    const U: f64 = 1.0 / 16_777_216.0;
    const SIZES: [usize; 7] = [1, 7, 97, 1025, 65_536 * 4 + 1, (1 << 20) + 3, 38_597_376 + 5];

    fn bound(xs: &[&[f32]], s: f64) -> f64 {
        let m = xs.iter().map(|x| twin::per_thread(x.len())).max().unwrap_or(0) as f64;
        (m + 1.0) * U * s
    }

    #[test]
    fn twin_grid_and_per_thread() {
        assert_eq!(twin::blocks(0), 0);
        assert_eq!(twin::blocks(1), 1);
        assert_eq!(twin::blocks(256), 1);
        assert_eq!(twin::blocks(257), 2);
        assert_eq!(twin::blocks(1 << 30), kiln::abi::KILN_REDUCE_MAX_BLOCKS as usize);
        assert_eq!(twin::per_thread(257), 1);
        assert_eq!(twin::per_thread(1 << 20), 4);
        assert_eq!(twin::per_thread((1 << 20) + 1), 5);
    }

    #[test]
    fn twin_sum_squares_matches_cpu() {
        let mut all = Vec::new();
        for (k, &n) in SIZES.iter().enumerate() {
            let x = uniform(&mut rng(40 + k as u64), n, 1.0 + k as f32);
            let (got, want) = (twin::sum_squares(&x), cpu::sum_squares(&x));
            let b = bound(&[&x], want);
            assert!((got - want).abs() <= b, "n={n}: twin {got} vs cpu {want} (bound {b:.2e})");
            all.push(x);
        }
        let views: Vec<&[f32]> = all.iter().map(|v| v.as_slice()).chain([&[][..]]).collect();
        let want: f64 = views.iter().map(|x| cpu::sum_squares(x)).sum();
        let got = twin::sum_squares_many(&views);
        let b = bound(&views, want);
        assert!((got - want).abs() <= b, "many: twin {got} vs cpu {want} (bound {b:.2e})");
        assert_eq!(twin::sum_squares_many(&[]), 0.0);
    }

    #[test]
    fn twin_scale_matches_cpu_bits() {
        let x = uniform(&mut rng(50), 1025, 3.0);
        let (mut a, mut b) = (x.clone(), x);
        twin::scale(&mut a, 0.37);
        cpu::scale(&mut b, 0.37);
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
    }

    /// One buffer at a time and all together, twice each: the twin's bits, within the bound of
    /// the CPU, and the same bits on the second run.
    #[test]
    fn gpu_sum_squares_matches_twin_bits_and_repeats() {
        let Some(cu) = common::gpu("reduce gpu_sum_squares_matches_twin_bits_and_repeats") else { return };
        let host: Vec<Vec<f32>> =
            SIZES.iter().enumerate().map(|(k, &n)| uniform(&mut rng(60 + k as u64), n, 1.0 + k as f32)).collect();
        let dev: Vec<_> = host.iter().map(|x| cu.upload(x).unwrap()).collect();
        for (x, d) in host.iter().zip(&dev) {
            let got = gpu::sum_squares(d).unwrap();
            assert_eq!(got.to_bits(), twin::sum_squares(x).to_bits(), "n={}: gpu {got} vs twin", x.len());
            assert_eq!(gpu::sum_squares(d).unwrap().to_bits(), got.to_bits(), "n={}: second run", x.len());
            let want = cpu::sum_squares(x);
            assert!((got - want).abs() <= bound(&[x], want), "n={}: gpu {got} vs cpu {want}", x.len());
        }
        let refs: Vec<_> = dev.iter().collect();
        let views: Vec<&[f32]> = host.iter().map(|v| v.as_slice()).collect();
        let got = gpu::sum_squares_many(&refs).unwrap();
        assert_eq!(got.to_bits(), twin::sum_squares_many(&views).to_bits(), "many: gpu {got} vs twin");
        assert_eq!(gpu::sum_squares_many(&refs).unwrap().to_bits(), got.to_bits(), "many: second run");
        assert_eq!(gpu::sum_squares_many(&[]).unwrap(), 0.0);
    }

    /// x *= s is one f32 multiply: the CPU's bits, every element written (a NaN-free input stays
    /// NaN-free, and a skipped element would keep its unscaled value).
    #[test]
    fn gpu_scale_matches_cpu_bits() {
        let Some(cu) = common::gpu("reduce gpu_scale_matches_cpu_bits") else { return };
        for (k, &n) in SIZES.iter().enumerate() {
            let x = uniform(&mut rng(70 + k as u64), n, 2.0);
            let mut d = cu.upload(&x).unwrap();
            gpu::scale(&mut d, 0.37).unwrap();
            let got = cu.download(&d).unwrap();
            let mut want = x;
            cpu::scale(&mut want, 0.37);
            assert!(got.iter().zip(&want).all(|(p, q)| p.to_bits() == q.to_bits()), "n={n}");
        }
    }
}
