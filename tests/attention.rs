//! Causal self-attention over packed qkv: gradients against finite differences, exact causality,
//! and the forward against a naive full-softmax reference on both sides of the 32-key tile.

mod common;

use common::{grad_check, max_abs, poison_pool, rand_tensor, rng, Objective, Tol, POOLED, U32};
use kiln::ops::attention::attention;
use kiln::{Error, Tape, Tensor};

/// Tolerance. Each output is a softmax-weighted mean of values whose scores are length-hd dots,
/// so its f32 forward carries a few roundings (k ~ sqrt(hd) + log T); at h = 1e-2 that is
/// ~1e-5 of max|an|. Truncation is h^2 |L'''| / 6 with |L'''| of order max|an| for scores of
/// order 1: ~2e-5. Measured worst: 1.4e-5 of max|an|. The shared rtol = 2e-3 (see common) is
/// loose here, yet scaling the D_i = dout . out term by 0.99, or dv by 1.01, already fails it.
const TOL: Tol = Tol { h: 1e-2, atol: 1e-6, rtol: 2e-3 };

/// (B, T, C, n_head): head dims 4, 5, 4, 4; T = 7, T = 1, and T = 40 past one key tile.
const SHAPES: [(usize, usize, usize, usize); 4] = [(1, 7, 12, 3), (2, 5, 20, 4), (2, 1, 12, 3), (1, 40, 8, 2)];

#[test]
fn attention_grads() {
    let mut r = rng(11);
    for (b, t, c, nh) in SHAPES {
        let qkv = rand_tensor(&mut r, &[b, t, 3 * c], 1.5);
        let label = format!("attention B={b} T={t} C={c} n_head={nh}");
        grad_check(&label, &[qkv], &[0], Objective::Probe(12), TOL, 48, |tape, x| attention(tape, &x[0], nh));
    }
    // dqkv [1, 64, 288] is a pooled buffer: the second pass takes one filled with NaN.
    let (t, c, nh) = (64, 96, 3);
    assert!(t * 3 * c >= POOLED);
    let qkv = rand_tensor(&mut r, &[1, t, 3 * c], 1.5);
    let passes: Vec<_> = (0..2)
        .map(|pass| {
            if pass == 1 {
                poison_pool(&[t * 3 * c]);
            }
            let label = format!("attention B=1 T={t} C={c} n_head={nh}, pass {pass}");
            grad_check(&label, &[qkv.clone()], &[0], Objective::Probe(12), TOL, 48, |tape, x| {
                attention(tape, &x[0], nh)
            })
        })
        .collect();
    assert!(passes[0] == passes[1], "fresh and recycled buffers gave different gradients");
}

fn forward(qkv: &Tensor, nh: usize) -> Vec<f32> {
    attention(&mut Tape::inference(), qkv, nh).unwrap().f32s().unwrap().to_vec()
}

/// Perturbing the key and value (or the query) at position j leaves every earlier output
/// bit-for-bit unchanged, and the other batch row as well; it does change output j.
#[test]
fn attention_is_causal() {
    let mut r = rng(13);
    for (b, t, c, nh, js) in [(2, 7, 12, 3, vec![0, 3, 6]), (2, 70, 8, 2, vec![31, 32, 33, 69])] {
        let qkv = rand_tensor(&mut r, &[b, t, 3 * c], 1.0);
        let base = forward(&qkv, nh);
        for j in js {
            // Part 1 = keys, 2 = values (both must not reach back), 0 = queries (only row j).
            for part in [0, 1, 2] {
                let mut x = qkv.f32s().unwrap().to_vec();
                for ch in 0..c {
                    x[j * 3 * c + part * c + ch] += 0.5;
                }
                let got = forward(&Tensor::from_f32(x, [b, t, 3 * c]).unwrap(), nh);
                for i in 0..b * t {
                    let row = |v: &[f32]| v[i * c..(i + 1) * c].to_vec();
                    let same = row(&got) == row(&base);
                    let (bi, ti) = (i / t, i % t);
                    let must_stay = bi != 0 || ti < j || (part == 0 && ti != j);
                    if must_stay {
                        assert!(same, "T={t}: part {part} at position {j} changed output row {ti} of batch {bi}");
                    }
                    if bi == 0 && ti == j && (part == 2 || j > 0) {
                        // (Row 0 attends to one key, with weight 1 whatever q and k are.)
                        assert!(!same, "T={t}: part {part} at position {j} did not change row {j}");
                    }
                }
            }
        }
    }
}

/// Enough of a float type to write the reference once for f32 and f64.
trait Real: Copy + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self> {
    fn of(x: f32) -> Self;
    fn to64(self) -> f64;
    fn exp(self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
    fn max(self, o: Self) -> Self;
}
macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            fn of(x: f32) -> Self {
                x as $t
            }
            fn to64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn sub(self, o: Self) -> Self {
                self - o
            }
            fn div(self, o: Self) -> Self {
                self / o
            }
            fn max(self, o: Self) -> Self {
                <$t>::max(self, o)
            }
        }
    };
}
real!(f32);
real!(f64);

/// The textbook computation: all scores of a row, the causal mask, a max-shifted softmax, then
/// the weighted sum of values.
fn naive<R: Real>(qkv: &[f32], b: usize, t: usize, c: usize, nh: usize) -> Vec<f64> {
    let hd = c / nh;
    let scale = R::of(1.0 / (hd as f32).sqrt());
    let at = |bi: usize, ti: usize, part: usize, h: usize, d: usize| {
        R::of(qkv[(bi * t + ti) * 3 * c + part * c + h * hd + d])
    };
    let mut out = vec![0f64; b * t * c];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let s: Vec<R> = (0..=i)
                    .map(|j| {
                        let dot = (0..hd).fold(R::of(0.0), |a, d| a + at(bi, i, 0, h, d) * at(bi, j, 1, h, d));
                        dot * scale
                    })
                    .collect();
                let m = s.iter().fold(s[0], |a, &x| a.max(x));
                let p: Vec<R> = s.iter().map(|&x| x.sub(m).exp()).collect();
                let l = p.iter().fold(R::of(0.0), |a, &x| a + x);
                for d in 0..hd {
                    let acc = (0..=i).fold(R::of(0.0), |a, j| a + p[j] * at(bi, j, 2, h, d));
                    out[(bi * t + i) * c + h * hd + d] = acc.div(l).to64();
                }
            }
        }
    }
    out
}

/// The forward against the f64 reference. Tolerance (flash-attention's rule): kiln's error may
/// be at most twice the error of the same naive algorithm run in f32, plus a floor of 8 u
/// max|out| for cases where the naive f32 result happens to be exact (T = 1 returns v itself).
#[test]
fn attention_forward_matches_naive_reference() {
    let mut r = rng(17);
    for (b, t, c, nh) in [(2, 1, 12, 3), (1, 7, 20, 4), (2, 70, 12, 3), (1, 70, 8, 1)] {
        let qkv = rand_tensor(&mut r, &[b, t, 3 * c], 2.0);
        let got = forward(&qkv, nh);
        let x = qkv.f32s().unwrap();
        let want = naive::<f64>(x, b, t, c, nh);
        let err = |v: &[f64]| v.iter().zip(&want).fold(0f64, |m, (a, w)| m.max((a - w).abs()));
        let got64: Vec<f64> = got.iter().map(|&v| v as f64).collect();
        let (e_kiln, e_naive) = (err(&got64), err(&naive::<f32>(x, b, t, c, nh)));
        let bound = 2.0 * e_naive + 8.0 * U32 * max_abs(&got);
        eprintln!("B={b} T={t} C={c} nh={nh}: kiln err {e_kiln:.2e}, naive f32 err {e_naive:.2e}");
        assert!(
            e_kiln <= bound,
            "B={b} T={t} C={c} n_head={nh}: max error {e_kiln:.3e} > {bound:.3e} (naive f32: {e_naive:.3e})"
        );
    }
}

#[test]
fn attention_rejects_bad_shapes() {
    let mut tape = Tape::new();
    for (dims, nh, what) in [
        (vec![1, 4, 30], 3, "C = 10 not divisible by 3 heads"),
        (vec![1, 4, 31], 1, "width not a multiple of 3"),
        (vec![4, 36], 3, "qkv not 3-D"),
        (vec![1, 4, 36], 0, "zero heads"),
    ] {
        let res = attention(&mut tape, &Tensor::zeros(dims.as_slice()), nh);
        assert!(matches!(res, Err(Error::Shape { .. })), "{what}: {res:?}");
    }
}
