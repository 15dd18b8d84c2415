//! Causal self-attention over packed qkv: gradients against finite differences, exact causality,
//! and the forward against a naive full-softmax reference on both sides of the 32-key tile.

mod common;

use common::{grad_check, max_abs, poison_pool, rand_tensor, rng, Objective, Tol, POOLED, U32};
use kiln::backend::{Attention as _, AttnDims, Heads};
use kiln::ops::attention::{attention, attention_cached, KvLayer};
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
        grad_check(&label, &[qkv], &[0], Objective::Probe(12), TOL, 48, |tape, x| {
            attention(tape, &x[0], Heads::mha(nh))
        });
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
            grad_check(&label, std::slice::from_ref(&qkv), &[0], Objective::Probe(12), TOL, 48, |tape, x| {
                attention(tape, &x[0], Heads::mha(nh))
            })
        })
        .collect();
    assert!(passes[0] == passes[1], "fresh and recycled buffers gave different gradients");
}

fn forward(qkv: &Tensor, nh: usize) -> Vec<f32> {
    attention(&mut Tape::inference(), qkv, Heads::mha(nh)).unwrap().f32s().unwrap().to_vec()
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
        let res = attention(&mut tape, &Tensor::zeros(dims.as_slice()), Heads::mha(nh));
        assert!(matches!(res, Err(Error::Shape { .. })), "{what}: {res:?}");
    }
}

/// The CUDA kernels (kernels/attention.cu): host twins of their softmax math against the CPU
/// backend (run without a GPU), and the kernels against the CPU twins at awkward sizes.
/// The CPU kernel writes output rows through raw pointers; a caller of the public backend function
/// with a buffer too short for the shape must get a panic, not a write past the end.
#[test]
#[should_panic(expected = "out has 255 elements, expected 256")]
fn cpu_backend_attention_rejects_a_short_output_buffer() {
    let (b, t, c, nh) = (1, 4, 64, 2);
    let qkv = vec![0.1f32; b * t * 3 * c];
    let (mut out, mut lse) = (vec![0f32; b * t * c - 1], vec![0f32; b * nh * t]);
    kiln::backend::cpu::attention::attention_forward(&mut out, &mut lse, &qkv, &AttnDims { b, t, c, nh });
}

#[test]
#[should_panic(expected = "dqkv has 767 elements, expected 768")]
fn cpu_backend_attention_backward_rejects_a_short_gradient_buffer() {
    let (b, t, c, nh) = (1, 4, 64, 2);
    let qkv = vec![0.1f32; b * t * 3 * c];
    let (out, dout, lse) = (vec![0.1f32; b * t * c], vec![0.1f32; b * t * c], vec![0f32; b * nh * t]);
    let mut dqkv = vec![0f32; b * t * 3 * c - 1];
    kiln::backend::cpu::attention::attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &AttnDims { b, t, c, nh });
}

/// Feeds qkv [B, T, W] (host f32; W = 3C, or C + 2 Ckv with grouped heads) to attention_cached in
/// chunks of `sizes` positions (summing to T), each chunk made a tensor by `prep` (which puts it
/// on the device under test), and returns the outputs as [B, T, C] host f32.
fn cached_in_chunks(
    qkv: &[f32],
    dims: (usize, usize, usize, Heads),
    sizes: &[usize],
    prep: &dyn Fn(Tensor) -> Tensor,
) -> Vec<f32> {
    let (b, t, c, heads) = dims;
    let w = c / heads.n_head * heads.packed();
    assert_eq!(sizes.iter().sum::<usize>(), t);
    let mut cache = KvLayer::new(b, t);
    let mut out = vec![f32::NAN; b * t * c];
    let mut at = 0;
    for &n in sizes {
        let chunk: Vec<f32> = (0..b).flat_map(|bi| &qkv[(bi * t + at) * w..(bi * t + at + n) * w]).copied().collect();
        let o = attention_cached(
            &mut Tape::inference(),
            &prep(Tensor::from_f32(chunk, [b, n, w]).unwrap()),
            &mut cache,
            heads,
        )
        .unwrap()
        .to_f32_vec()
        .unwrap();
        for bi in 0..b {
            out[(bi * t + at) * c..(bi * t + at + n) * c].copy_from_slice(&o[bi * n * c..(bi + 1) * n * c]);
        }
        at += n;
        assert_eq!(cache.len(), at);
    }
    out
}

/// Chunkings of T = 70 positions: the whole prompt at once, one at a time across the 32-key tile
/// edges, and mixed.
const CHUNKS: [&[usize]; 3] = [&[70], &[1; 70], &[5, 1, 1, 25, 1, 1, 30, 6]];

/// attention_cached, fed any chunking, gives attention's rows bit for bit on the CPU (the same
/// tiles and arithmetic in the same order), at awkward sizes (head dim 5 and 19).
#[test]
fn attention_cached_equals_attention() {
    let mut r = rng(17);
    for (b, c, nh) in [(2, 15, 3), (1, 38, 2)] {
        let t = 70;
        let qkv = rand_tensor(&mut r, &[b, t, 3 * c], 1.5);
        let want = forward(&qkv, nh);
        for sizes in CHUNKS {
            let got = cached_in_chunks(qkv.f32s().unwrap(), (b, t, c, Heads::mha(nh)), sizes, &|x| x);
            assert!(got == want, "B={b} C={c} n_head={nh} chunks {sizes:?}: cached rows differ");
        }
    }
}

/// select_rows copies the filled positions of the rows asked for (repeats allowed) and the copies
/// carry on as those rows would; bad rows, capacity overflow and a tape that wants a gradient are
/// refused, changing nothing.
#[test]
fn attention_cache_rows_and_refusals() {
    let (b, t, c, nh) = (2, 40, 12, 3);
    let qkv = rand_tensor(&mut rng(19), &[b, t, 3 * c], 1.5);
    let want = forward(&qkv, nh);
    let q = qkv.f32s().unwrap();
    let rows_of = |bi: usize, from: usize, to: usize| q[(bi * t + from) * 3 * c..(bi * t + to) * 3 * c].to_vec();
    let mut cache = KvLayer::new(b, t);
    let first: Vec<f32> = (0..b).flat_map(|bi| rows_of(bi, 0, 33)).collect();
    attention_cached(
        &mut Tape::inference(),
        &Tensor::from_f32(first, [b, 33, 3 * c]).unwrap(),
        &mut cache,
        Heads::mha(nh),
    )
    .unwrap();
    let mut picked = cache.select_rows(&[1, 1, 0]).unwrap();
    assert_eq!((picked.batch(), picked.len(), picked.capacity()), (3, 33, t));
    let rest: Vec<f32> = [1, 1, 0].iter().flat_map(|&bi| rows_of(bi, 33, t)).collect();
    let out = attention_cached(
        &mut Tape::inference(),
        &Tensor::from_f32(rest, [3, t - 33, 3 * c]).unwrap(),
        &mut picked,
        Heads::mha(nh),
    )
    .unwrap();
    for (i, &bi) in [1, 1, 0].iter().enumerate() {
        let got = &out.f32s().unwrap()[i * (t - 33) * c..(i + 1) * (t - 33) * c];
        assert!(got == &want[(bi * t + 33) * c..(bi + 1) * t * c], "row {i} (was {bi})");
    }
    assert!(cache.select_rows(&[2]).unwrap_err().to_string().contains("row 2"));
    let one = |n: usize| Tensor::from_f32(vec![0.5; b * n * 3 * c], [b, n, 3 * c]).unwrap();
    let e = attention_cached(&mut Tape::inference(), &one(8), &mut cache, Heads::mha(nh)).unwrap_err().to_string();
    assert!(e.contains("capacity of 40"), "{e}");
    let mut tape = Tape::new();
    let x = one(1);
    tape.watch(&x);
    let e = attention_cached(&mut tape, &x, &mut cache, Heads::mha(nh)).unwrap_err().to_string();
    assert!(e.contains("no backward"), "{e}");
    let e = attention_cached(
        &mut Tape::inference(),
        &rand_tensor(&mut rng(1), &[3, 1, 3 * c], 1.0),
        &mut cache,
        Heads::mha(nh),
    );
    assert!(matches!(e, Err(Error::Shape { .. })), "{e:?}");
    assert_eq!(cache.len(), 33);
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::common::{self, max_abs, rng, uniform, U32};
    use kiln::backend::cpu::attention as cpu;
    use kiln::backend::cuda::attention::{self as gpu, twin, AttentionVariant};
    use kiln::backend::cuda::{bf16, Cuda, DevBuf};
    use kiln::backend::{AttnDims, Heads};
    use kiln::ops::attention::{attention_cached, KvLayer};
    use kiln::{Error, Tensor};
    use rand::Rng;

    /// The bf16 unit roundoff (half an ulp of 1): 8 significant bits.
    const U_BF16: f64 = 1.0 / 256.0;

    fn bf(x: f32) -> f32 {
        bf16::from_f32(x).to_f32()
    }

    fn to_bf16(v: &[f32]) -> Vec<bf16> {
        v.iter().map(|&x| bf16::from_f32(x)).collect()
    }

    fn to_f32(v: &[bf16]) -> Vec<f32> {
        v.iter().map(|x| x.to_f32()).collect()
    }

    /// Largest |a - b|; NaN anywhere (an unwritten, poisoned element) gives infinity.
    fn max_diff(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).fold(0f64, |m, (&x, &y)| {
            let d = (x as f64 - y as f64).abs();
            if d.is_nan() {
                f64::INFINITY
            } else {
                m.max(d)
            }
        })
    }

    // ---- host twins (no GPU needed) ----

    /// The twin's online-softmax step against cpu::attention::online_softmax_update over chains of
    /// tiles of every length 1..=32, with masked (-inf) scores after the first tile as the kernel
    /// passes them, and score jumps that move the max up (rescale < 1) and not at all (rescale 1).
    /// Same operations in the same order (the twin is built with -ffp-contract=off), so the only
    /// possible difference is expf vs Rust's exp, both within 1 ulp: allow 4 u relative to the
    /// largest magnitude involved. In practice they agree bit for bit.
    #[test]
    fn online_softmax_twin_matches_cpu() {
        let mut r = rng(71);
        let mut exact = true;
        for hd in [1, 8, 64, 96] {
            let (mut m0, mut l0, mut a0) = (f32::NEG_INFINITY, 0f32, vec![0f32; hd]);
            let (mut m1, mut l1, mut a1) = (f32::NEG_INFINITY, 0f32, vec![0f32; hd]);
            for (step, n) in (1..=32).chain([32, 5, 1]).enumerate() {
                let shift = if step % 3 == 1 { 6.0 } else { 0.0 };
                let mut s: Vec<f32> = uniform(&mut r, n, 4.0).iter().map(|x| x + shift).collect();
                if step > 0 {
                    for x in s.iter_mut() {
                        if r.random::<f32>() < 0.25 {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
                let v = uniform(&mut r, n * hd, 1.0);
                let rows: Vec<&[f32]> = v.chunks_exact(hd).collect();
                cpu::online_softmax_update(&mut m0, &mut l0, &mut a0, &s, &rows);
                twin::online_softmax_update(&mut m1, &mut l1, &mut a1, &s, &v);
                assert_eq!(m0, m1, "hd {hd} step {step}: running max");
                let tol = 4.0 * U32 * (l0 as f64);
                assert!((l0 as f64 - l1 as f64).abs() <= tol, "hd {hd} step {step}: sum {l0} vs {l1}");
                let e = max_diff(&a0, &a1);
                assert!(e <= 4.0 * U32 * l0 as f64, "hd {hd} step {step}: accumulator off by {e:.3e}");
                exact &= l0 == l1 && a0 == a1;
            }
        }
        eprintln!("online softmax twin bit-identical to the CPU: {exact}");
    }

    /// lse = m + ln l, p = exp(s - lse) and dS = p (dP - D) against the formulas written out in
    /// Rust: equal up to the 1-ulp difference allowed between two libm's exp and ln.
    #[test]
    fn elementwise_twins_match_formulas() {
        let mut r = rng(72);
        let n = 4096;
        let m = uniform(&mut r, n, 8.0);
        let l: Vec<f32> = uniform(&mut r, n, 1.0).iter().map(|x| 1.0 + 500.0 * (x + 1.0)).collect();
        let mut lse = vec![0f32; n];
        twin::lse(&mut lse, &m, &l);
        for i in 0..n {
            let want = m[i] + l[i].ln();
            assert!((lse[i] - want).abs() <= 2.0 * f32::EPSILON * want.abs().max(1.0), "lse {i}: {} vs {want}", lse[i]);
        }
        let s: Vec<f32> = uniform(&mut r, n, 6.0).iter().map(|x| x - 3.0).collect();
        let mut p = vec![0f32; n];
        twin::prob(&mut p, &s, &lse);
        for i in 0..n {
            let want = (s[i] - lse[i]).exp();
            assert!((p[i] - want).abs() <= 2.0 * f32::EPSILON * want, "prob {i}: {} vs {want}", p[i]);
        }
        let (dp, d) = (uniform(&mut r, n, 2.0), uniform(&mut r, n, 2.0));
        let mut ds = vec![0f32; n];
        twin::dscore(&mut ds, &p, &dp, &d);
        for i in 0..n {
            assert_eq!(ds[i], p[i] * (dp[i] - d[i]), "dscore {i}");
        }
    }

    /// The shared-memory sizes the wrappers launch with, written out: at GPT-2's hd = 64 every
    /// kernel fits the default 48 KB; at hd = 128 the backward needs the opt-in limit.
    #[test]
    fn smem_sizes() {
        use kiln::abi::{KILN_ATTN_KERNEL_DKDV as DKDV, KILN_ATTN_KERNEL_DQ as DQ, KILN_ATTN_KERNEL_FORWARD as FWD};
        let (fwd, dkdv, dq) = (FWD as usize, DKDV as usize, DQ as usize);
        // Forward: Q f32 32 x hd, K and V bf16 32 x (hd + 8), P f32 4 x 8 x 32.
        assert_eq!(twin::smem_bytes(fwd, 64), 32 * 64 * 4 + 2 * 32 * 72 * 2 + 4096);
        // Backward: two f32 tiles, two padded bf16 tiles, P.
        assert_eq!(twin::smem_bytes(dkdv, 64), 2 * 32 * 64 * 4 + 2 * 32 * 72 * 2 + 4096);
        assert_eq!(twin::smem_bytes(dq, 64), twin::smem_bytes(dkdv, 64));
        assert!(twin::smem_bytes(dkdv, 64) <= 48 * 1024 && twin::smem_bytes(fwd, 128) <= 48 * 1024);
        assert_eq!(twin::smem_bytes(dkdv, 128), 54272);
        // The tensor-core forward (hd = 64 and 128): Q, and K and V twice, each 64 x (hd + 8) bf16;
        // at 128 past the default 48 KB, within every sm_80+ GPU's opt-in limit (99 KB or more).
        let mma = kiln::abi::KILN_ATTN_KERNEL_FORWARD_MMA as usize;
        assert_eq!(twin::smem_bytes(mma, 64), 5 * 64 * 72 * 2);
        assert!(twin::smem_bytes(mma, 64) <= 48 * 1024);
        assert_eq!(twin::smem_bytes(mma, 128), 5 * 64 * 136 * 2);
        assert!(twin::smem_bytes(mma, 128) <= 99 * 1024);
        assert!([32, 96, 40].iter().all(|&hd| twin::smem_bytes_at(mma, hd).is_none()));
        // The tensor-core dQ: dO beside Q, six tiles; at 128 (104448 bytes) past sm_86/89's 99 KB,
        // where the shipped backward keeps dQ on CUDA cores.
        let dq_mma = kiln::abi::KILN_ATTN_KERNEL_DQ_MMA as usize;
        assert_eq!(twin::smem_bytes(dq_mma, 64), 6 * 64 * 72 * 2);
        assert_eq!(twin::smem_bytes(dq_mma, 128), 6 * 64 * 136 * 2);
        assert!(twin::smem_bytes(dq_mma, 128) > 99 * 1024);
        assert!([32, 96, 40].iter().all(|&hd| twin::smem_bytes_at(dq_mma, hd).is_none()));
        // The tensor-core dK/dV: K, V, and Q and dO twice, plus two buffers of 64 lse and 64 D.
        let dkdv_mma = kiln::abi::KILN_ATTN_KERNEL_DKDV_MMA as usize;
        assert_eq!(twin::smem_bytes(dkdv_mma, 64), 6 * 64 * 72 * 2 + 4 * 64 * 4);
        assert_eq!(twin::smem_bytes(dkdv_mma, 128), 6 * 64 * 136 * 2 + 4 * 64 * 4);
        assert!([32, 96, 40].iter().all(|&hd| twin::smem_bytes_at(dkdv_mma, hd).is_none()));
    }

    /// The shipped forward: tensor cores exactly where they apply (hd = 64 or 128 on sm_80+).
    #[test]
    fn shipped_variant() {
        use AttentionVariant::{Mma, Simt};
        for hd in [64, 128] {
            assert_eq!(AttentionVariant::shipped(hd, (8, 0)), Mma);
            assert_eq!(AttentionVariant::shipped(hd, (9, 0)), Mma);
            assert_eq!(AttentionVariant::shipped(hd, (7, 5)), Simt);
        }
        for hd in [32, 40, 96, 120] {
            assert_eq!(AttentionVariant::shipped(hd, (9, 0)), Simt, "hd {hd}");
            assert!(!Mma.supports(hd, (9, 0)) && Simt.supports(hd, (9, 0)));
        }
    }

    // ---- kernels vs the CPU (skip without a GPU) ----

    /// The plain bf16 implementation the tolerance is measured against (flash-attention's rule):
    /// bf16 inputs, scores and softmax in f32, the normalised P rounded to bf16 before P V, the
    /// output rounded to bf16. Returns out [B, T, C].
    fn plain_forward(qkv: &[f32], b: usize, t: usize, c: usize, nh: usize) -> Vec<f32> {
        let hd = c / nh;
        let scale = 1.0 / (hd as f32).sqrt();
        let at = |bi: usize, ti: usize, part: usize, h: usize| {
            let o = (bi * t + ti) * 3 * c + part * c + h * hd;
            &qkv[o..o + hd]
        };
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let mut out = vec![0f32; b * t * c];
        for bi in 0..b {
            for h in 0..nh {
                for i in 0..t {
                    let s: Vec<f32> = (0..=i).map(|j| dot(at(bi, i, 0, h), at(bi, j, 1, h)) * scale).collect();
                    let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                    let l: f32 = e.iter().sum();
                    let o = &mut out[(bi * t + i) * c + h * hd..][..hd];
                    for (j, ej) in e.iter().enumerate() {
                        let p = bf(ej / l);
                        for (od, vd) in o.iter_mut().zip(at(bi, j, 2, h)) {
                            *od += p * vd;
                        }
                    }
                    o.iter_mut().for_each(|x| *x = bf(*x));
                }
            }
        }
        out
    }

    /// The plain bf16 backward: bf16 inputs and bf16 out (so D = rowsum(dO * O) sees a rounded
    /// O), P and dS in f32 and rounded to bf16 before the products dV = P^T dO, dQ = dS K,
    /// dK = dS^T Q, which accumulate in f32 and are rounded to bf16. lse is the f32 reference's.
    #[allow(clippy::too_many_arguments)]
    fn plain_backward(
        dout: &[f32],
        qkv: &[f32],
        out: &[f32],
        lse: &[f32],
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Vec<f32> {
        let hd = c / nh;
        let scale = 1.0 / (hd as f32).sqrt();
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let mut dqkv = vec![0f32; b * t * 3 * c];
        for bi in 0..b {
            for h in 0..nh {
                let row = |ti: usize, part: usize| (bi * t + ti) * 3 * c + part * c + h * hd;
                let orow = |ti: usize| (bi * t + ti) * c + h * hd;
                for i in 0..t {
                    let go = &dout[orow(i)..][..hd];
                    let o: Vec<f32> = out[orow(i)..][..hd].iter().map(|&x| bf(x)).collect();
                    let d_i = dot(go, &o);
                    let q = qkv[row(i, 0)..][..hd].to_vec();
                    for j in 0..=i {
                        let (k, v) = (&qkv[row(j, 1)..][..hd], &qkv[row(j, 2)..][..hd]);
                        let p = (dot(&q, k) * scale - lse[(bi * nh + h) * t + i]).exp();
                        let ds = bf(p * (dot(go, v) - d_i) * scale);
                        let p = bf(p);
                        for d in 0..hd {
                            dqkv[row(j, 2) + d] += p * go[d];
                            dqkv[row(i, 0) + d] += ds * qkv[row(j, 1) + d];
                            dqkv[row(j, 1) + d] += ds * q[d];
                        }
                    }
                }
            }
        }
        dqkv.iter_mut().for_each(|x| *x = bf(*x));
        dqkv
    }

    /// The q, k or v third of every row of a [B, T, 3C] buffer.
    fn part(v: &[f32], c: usize, p: usize) -> Vec<f32> {
        v.chunks_exact(3 * c).flat_map(|r| r[p * c..(p + 1) * c].to_vec()).collect()
    }

    fn nan_bf16(cu: &Cuda, n: usize) -> DevBuf<bf16> {
        cu.upload(&vec![bf16::NAN; n]).unwrap()
    }

    /// The kernel's error may be at most twice the plain bf16 implementation's plus a floor of
    /// U_BF16 max|ref|: rounding an exact result to bf16 alone costs up to that, and where the
    /// plain result happens to be exact (T = 1 returns v itself) the floor is all there is.
    /// `f32_floor` is an absolute term for f32-level differences that the plain implementation,
    /// computing them exactly like the CPU, does not have (see check_shape).
    fn check_bf16(what: &str, got: &[f32], plain: &[f32], want: &[f32], f32_floor: f64) {
        let (e_k, e_p) = (max_diff(got, want), max_diff(plain, want));
        let bound = 2.0 * e_p + U_BF16 * max_abs(want) + f32_floor;
        eprintln!("{what}: kernel err {e_k:.3e}, plain bf16 err {e_p:.3e}, bound {bound:.3e}");
        assert!(e_k <= bound, "{what}: max error {e_k:.3e} > {bound:.3e} (plain bf16: {e_p:.3e})");
    }

    /// Forward (out and lse) and backward (dq, dk, dv) against the CPU twins, on inputs rounded to
    /// bf16 for both, with every output poisoned with NaN before the launch. lse is f32 on both
    /// sides and never rounded to bf16, so it gets an f32 bound: scores are length-hd dots (CPU
    /// and kernel sum in different orders: up to ~hd u |s| apart, at most 64 u for these inputs),
    /// the sum of up to T exps in the kernel takes 2-ulp device expf and per-lane partial sums
    /// (<= 32 + 5 + 2 roundings), and m + ln l one more: 256 u (1 + max|lse|) covers all of it
    /// with room, and is still far below what a missing key or a wrong scale moves lse by.
    ///
    /// `variant` picks the forward and the backward (on tensor cores for Mma, which rounds P and
    /// dS to bf16 before the dV, dQ and dK products, as the plain reference does); the backward
    /// runs from that forward's out and lse.
    /// The Mma forward rounds the unnormalised P (each row's largest entry is 1) to bf16 before
    /// P V, as the plain reference rounds the normalised P: the same relative rounding, so the
    /// same 2x-plain bound applies to it.
    fn check_shape(cu: &Cuda, variant: AttentionVariant, b: usize, t: usize, nh: usize, hd: usize, seed: u64) {
        let c = nh * hd;
        let label = format!("{variant:?} B={b} T={t} nh={nh} hd={hd}");
        let mut r = rng(seed);
        let qkv = to_bf16(&uniform(&mut r, b * t * 3 * c, 2.0));
        let dout = to_bf16(&uniform(&mut r, b * t * c, 1.0));
        let (qkv_r, dout_r) = (to_f32(&qkv), to_f32(&dout));

        // The f32 reference.
        let (mut out_ref, mut lse_ref) = (vec![0f32; b * t * c], vec![0f32; b * nh * t]);
        cpu::attention_forward(&mut out_ref, &mut lse_ref, &qkv_r, &AttnDims { b, t, c, nh });
        let mut dqkv_ref = vec![0f32; b * t * 3 * c];
        cpu::attention_backward(&mut dqkv_ref, &dout_r, &qkv_r, &out_ref, &lse_ref, &AttnDims { b, t, c, nh });

        // The kernels; the backward takes the forward's own bf16 out and f32 lse.
        let qkv_d = cu.upload(&qkv).unwrap();
        let dout_d = cu.upload(&dout).unwrap();
        let mut out_d = nan_bf16(cu, b * t * c);
        let mut lse_d = cu.upload(&vec![f32::NAN; b * nh * t]).unwrap();
        gpu::attention_forward_with(variant, &mut out_d, &mut lse_d, &qkv_d, &AttnDims { b, t, c, nh }).unwrap();
        let backward = |dqkv: &mut DevBuf<bf16>| {
            let d = AttnDims { b, t, c, nh };
            gpu::gqa_attention_backward_with(variant, dqkv, &dout_d, &qkv_d, &out_d, &lse_d, &d, nh).unwrap()
        };
        let mut dqkv_d = nan_bf16(cu, b * t * 3 * c);
        backward(&mut dqkv_d);
        cu.sync().unwrap();
        let out_k = to_f32(&cu.download(&out_d).unwrap());
        let lse_k = cu.download(&lse_d).unwrap();
        let dqkv_k = to_f32(&cu.download(&dqkv_d).unwrap());

        check_bf16(&format!("{label} out"), &out_k, &plain_forward(&qkv_r, b, t, c, nh), &out_ref, 0.0);
        let e_lse = max_diff(&lse_k, &lse_ref);
        let lse_bound = 256.0 * U32 * (1.0 + max_abs(&lse_ref));
        eprintln!("{label} lse: kernel err {e_lse:.3e}, bound {lse_bound:.3e}");
        assert!(e_lse <= lse_bound, "{label} lse: max error {e_lse:.3e} > {lse_bound:.3e}");

        // dS = P (dP - D) cancels where one key holds all of a row's weight (T = 1: dP = D and
        // dq = dk = 0 exactly on the CPU and in the plain version, which form both dots alike).
        // The kernel forms D and dP as f32 dots of length hd in different orders, so there it is
        // off by up to ~hd u |dO| |V|: 64 u of the gradient's scale, max|dqkv| over all parts.
        let f32_floor = 64.0 * U32 * max_abs(&dqkv_ref);
        let plain = plain_backward(&dout_r, &qkv_r, &out_ref, &lse_ref, b, t, c, nh);
        for (p, name) in ["dq", "dk", "dv"].iter().enumerate() {
            let want = part(&dqkv_ref, c, p);
            check_bf16(&format!("{label} {name}"), &part(&dqkv_k, c, p), &part(&plain, c, p), &want, f32_floor);
        }

        // Deterministic: no atomics, fixed summation order, so a second run is bit-identical.
        let mut dqkv2 = nan_bf16(cu, b * t * 3 * c);
        backward(&mut dqkv2);
        let mut out2 = nan_bf16(cu, b * t * c);
        gpu::attention_forward_with(variant, &mut out2, &mut lse_d, &qkv_d, &AttnDims { b, t, c, nh }).unwrap();
        let same = |x: &DevBuf<bf16>, y: &DevBuf<bf16>| {
            let (x, y) = (cu.download(x).unwrap(), cu.download(y).unwrap());
            x.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits())
        };
        assert!(same(&dqkv_d, &dqkv2), "{label}: the backward is not deterministic");
        assert!(same(&out_d, &out2), "{label}: the forward is not deterministic");
    }

    /// The plain bf16 references against the f32 CPU twins (no GPU needed): each within a few
    /// bf16 roundoffs of the result's scale, so that "2x the plain error" cannot turn vacuous
    /// through a broken reference, and not exact either (they do round where a bf16 version would).
    #[test]
    fn plain_bf16_references_are_close_not_exact() {
        for (k, (b, t, nh, hd)) in [(2, 7, 3, 64), (1, 97, 2, 64), (1, 45, 2, 40)].into_iter().enumerate() {
            let c = nh * hd;
            let mut r = rng(300 + k as u64);
            let qkv: Vec<f32> = uniform(&mut r, b * t * 3 * c, 2.0).iter().map(|&x| bf(x)).collect();
            let dout: Vec<f32> = uniform(&mut r, b * t * c, 1.0).iter().map(|&x| bf(x)).collect();
            let (mut out, mut lse) = (vec![0f32; b * t * c], vec![0f32; b * nh * t]);
            cpu::attention_forward(&mut out, &mut lse, &qkv, &AttnDims { b, t, c, nh });
            let mut dqkv = vec![0f32; b * t * 3 * c];
            cpu::attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &AttnDims { b, t, c, nh });
            let plain_out = plain_forward(&qkv, b, t, c, nh);
            let plain = plain_backward(&dout, &qkv, &out, &lse, b, t, c, nh);
            let mut pairs = vec![("out", plain_out, out)];
            for (p, name) in ["dq", "dk", "dv"].into_iter().enumerate() {
                pairs.push((name, part(&plain, c, p), part(&dqkv, c, p)));
            }
            for (name, got, want) in pairs {
                let (e, scale) = (max_diff(&got, &want), max_abs(&want));
                eprintln!("B={b} T={t} nh={nh} hd={hd} {name}: plain bf16 err {e:.3e} of max {scale:.3e}");
                assert!(
                    e > 0.0 && e <= 4.0 * U_BF16 * scale,
                    "{name}: plain bf16 error {e:.3e} (max|ref| {scale:.3e})"
                );
            }
        }
    }

    /// GPT-2's head dim 64 at T = 1 (one key), 7 and 97 (partial tiles), 1025 (33 tiles, the last
    /// with one row; 17 Mma tiles of 64), 64 with 12 heads; then the generic path at hd = 32, 40
    /// (16-byte rows fall in two banks), 96 and 128 (backward over 48 KB of shared memory). Both
    /// forward variants at every shape: where the Mma one does not apply, it must refuse.
    /// The default attention_forward must pick the shipped variant and match it bit for bit.
    #[test]
    fn kernels_match_cpu() {
        let Some(cu) = common::gpu("attention kernels_match_cpu") else { return };
        let shapes = [
            (1, 1, 1, 64),
            (2, 7, 3, 64),
            (1, 97, 2, 64),
            (1, 1025, 2, 64),
            (2, 64, 12, 64),
            (2, 97, 3, 32),
            (1, 45, 2, 40),
            (1, 70, 2, 96),
            (2, 33, 1, 128),
        ];
        let cc = cu.compute_capability();
        for (k, (b, t, nh, hd)) in shapes.into_iter().enumerate() {
            for variant in [AttentionVariant::Simt, AttentionVariant::Mma] {
                if variant.supports(hd, cc) {
                    check_shape(cu, variant, b, t, nh, hd, 100 + k as u64);
                } else {
                    let c = nh * hd;
                    let qkv = cu.upload(&vec![bf16::ZERO; b * t * 3 * c]).unwrap();
                    let mut out = cu.alloc::<bf16>(b * t * c).unwrap();
                    let mut lse = cu.alloc::<f32>(b * nh * t).unwrap();
                    let res = gpu::attention_forward_with(variant, &mut out, &mut lse, &qkv, &AttnDims { b, t, c, nh });
                    assert!(matches!(res, Err(Error::Shape { .. })), "{variant:?} at hd {hd}: {res:?}");
                }
            }
            // The default entry point runs the shipped variant.
            let (c, shipped) = (nh * hd, AttentionVariant::shipped(hd, cc));
            let mut r = rng(200 + k as u64);
            let qkv = cu.upload(&to_bf16(&uniform(&mut r, b * t * 3 * c, 2.0))).unwrap();
            let (mut o1, mut o2) = (nan_bf16(cu, b * t * c), nan_bf16(cu, b * t * c));
            let mut lse = cu.alloc::<f32>(b * nh * t).unwrap();
            gpu::attention_forward(&mut o1, &mut lse, &qkv, &AttnDims { b, t, c, nh }).unwrap();
            gpu::attention_forward_with(shipped, &mut o2, &mut lse, &qkv, &AttnDims { b, t, c, nh }).unwrap();
            let (o1, o2) = (cu.download(&o1).unwrap(), cu.download(&o2).unwrap());
            assert!(o1.iter().zip(&o2).all(|(x, y)| x.to_bits() == y.to_bits()), "hd {hd}: default is not {shipped:?}");
        }
    }

    /// Grouped-query heads on the kernels (each KV head read in place by its group): forward and
    /// backward against the f32 CPU reference of MHA over the repeated KV heads (equal to the CPU's
    /// GQA: tests gqa_equals_mha_over_repeated_kv_heads), with dK and dV summed over each group,
    /// under check_shape's bounds (the plain bf16 reference's dK, dV summed likewise); both
    /// forward variants where they apply, and a second backward bit for bit.
    fn check_gqa_shape(cu: &Cuda, variant: AttentionVariant, b: usize, t: usize, heads: Heads, hd: usize, seed: u64) {
        let (nh, nkv) = (heads.n_head, heads.n_kv_head);
        let (c, w) = (nh * hd, heads.packed() * hd);
        let label = format!("{variant:?} B={b} T={t} nh={nh} nkv={nkv} hd={hd}");
        let mut r = rng(seed);
        let qkv = to_bf16(&uniform(&mut r, b * t * w, 2.0));
        let dout = to_bf16(&uniform(&mut r, b * t * c, 1.0));
        let (qkv_r, dout_r) = (to_f32(&qkv), to_f32(&dout));
        let mha = super::repeat_kv(&qkv_r, heads, hd);
        let d = AttnDims { b, t, c, nh };

        let (mut out_ref, mut lse_ref) = (vec![0f32; b * t * c], vec![0f32; b * nh * t]);
        cpu::attention_forward(&mut out_ref, &mut lse_ref, &mha, &d);
        let mut dmha = vec![0f32; b * t * 3 * c];
        cpu::attention_backward(&mut dmha, &dout_r, &mha, &out_ref, &lse_ref, &d);
        let dqkv_ref = super::sum_repeated_kv(&dmha, heads, hd);
        let plain = super::sum_repeated_kv(&plain_backward(&dout_r, &mha, &out_ref, &lse_ref, b, t, c, nh), heads, hd);

        let qkv_d = cu.upload(&qkv).unwrap();
        let dout_d = cu.upload(&dout).unwrap();
        let mut out_d = nan_bf16(cu, b * t * c);
        let mut lse_d = cu.upload(&vec![f32::NAN; b * nh * t]).unwrap();
        gpu::gqa_attention_forward_with(variant, &mut out_d, &mut lse_d, &qkv_d, &d, nkv).unwrap();
        let mut dqkv_d = nan_bf16(cu, b * t * w);
        gpu::gqa_attention_backward_with(variant, &mut dqkv_d, &dout_d, &qkv_d, &out_d, &lse_d, &d, nkv).unwrap();
        let out_k = to_f32(&cu.download(&out_d).unwrap());
        let lse_k = cu.download(&lse_d).unwrap();
        let dqkv_k = to_f32(&cu.download(&dqkv_d).unwrap());

        check_bf16(&format!("{label} out"), &out_k, &plain_forward(&mha, b, t, c, nh), &out_ref, 0.0);
        let e_lse = max_diff(&lse_k, &lse_ref);
        let lse_bound = 256.0 * U32 * (1.0 + max_abs(&lse_ref));
        assert!(e_lse <= lse_bound, "{label} lse: max error {e_lse:.3e} > {lse_bound:.3e}");
        // check_shape's f32 floor, times the group size for the summed dK, dV.
        let f32_floor = 64.0 * heads.group() as f64 * U32 * max_abs(&dqkv_ref);
        let cols = |v: &[f32], lo: usize, n: usize| -> Vec<f32> {
            v.chunks_exact(w).flat_map(|r| r[lo..lo + n].to_vec()).collect()
        };
        for (name, lo, n) in [("dq", 0, c), ("dk", c, nkv * hd), ("dv", c + nkv * hd, nkv * hd)] {
            let want = cols(&dqkv_ref, lo, n);
            check_bf16(&format!("{label} {name}"), &cols(&dqkv_k, lo, n), &cols(&plain, lo, n), &want, f32_floor);
        }
        let mut again = nan_bf16(cu, b * t * w);
        gpu::gqa_attention_backward_with(variant, &mut again, &dout_d, &qkv_d, &out_d, &lse_d, &d, nkv).unwrap();
        let (x, y) = (cu.download(&dqkv_d).unwrap(), cu.download(&again).unwrap());
        assert!(
            x.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{label}: the backward is not deterministic"
        );
    }

    /// SmolLM2-135M's grouping (9 query heads over 3 KV heads of 64), groups of 2 and 4, head
    /// dims 64 (both forwards), 32 and 128 (over 48 KB of shared memory in the backward), partial
    /// tiles and several key tiles.
    #[test]
    fn gqa_kernels_match_cpu() {
        let Some(cu) = common::gpu("attention gqa_kernels_match_cpu") else { return };
        let cc = cu.compute_capability();
        let shapes = [(2, 37, 4, 2, 64), (1, 97, 9, 3, 64), (2, 33, 4, 1, 32), (1, 70, 4, 2, 128)];
        for (k, (b, t, nh, nkv, hd)) in shapes.into_iter().enumerate() {
            for variant in [AttentionVariant::Simt, AttentionVariant::Mma] {
                if variant.supports(hd, cc) {
                    check_gqa_shape(cu, variant, b, t, Heads { n_head: nh, n_kv_head: nkv }, hd, 500 + k as u64);
                }
            }
        }
    }

    /// RoPE on load: rope_attention_forward and rope_attention_backward (q, k and v as three
    /// buffers, rotated inside the attention kernels) equal rope_pack + the packed attention +
    /// rope_unpack on the same device bit for bit: out, lse, dq, dk and dv. Both forward variants
    /// where they apply; head dims 8 (pairs inside one 16-byte chunk), 16, 64 (SmolLM2-135M's 9
    /// over 3 heads) and 128; partial tiles and several key tiles; theta 10^4 to 5 x 10^5.
    #[test]
    fn rope_attention_kernels_equal_rope_pack_then_attention() {
        use kiln::backend::cuda::rope as rope_gpu;
        let Some(cu) = common::gpu("attention rope_attention_kernels_equal_rope_pack_then_attention") else { return };
        let cc = cu.compute_capability();
        let shapes = [
            (2, 37, 8, 2, 8, 500_000.0),
            (1, 70, 4, 2, 16, 10_000.0),
            (1, 97, 9, 3, 64, 100_000.0),
            (1, 70, 4, 1, 128, 500_000.0),
        ];
        for (n, (b, t, nh, nkv, hd, theta)) in shapes.into_iter().enumerate() {
            let heads = Heads { n_head: nh, n_kv_head: nkv };
            let (c, ckv, w) = (nh * hd, nkv * hd, heads.packed() * hd);
            let d = AttnDims { b, t, c, nh };
            let mut r = rng(900 + n as u64);
            let mut up = |len: usize, scale: f32| cu.upload(&to_bf16(&uniform(&mut r, len, scale))).unwrap();
            let (q, k, v, dout) = (up(b * t * c, 2.0), up(b * t * ckv, 2.0), up(b * t * ckv, 2.0), up(b * t * c, 1.0));
            let table = rope_gpu::table(hd, theta, t).unwrap();
            for variant in [AttentionVariant::Simt, AttentionVariant::Mma] {
                if !variant.supports(hd, cc) {
                    continue;
                }
                let label = format!("{variant:?} B={b} T={t} nh={nh} nkv={nkv} hd={hd}");
                // unfused: pack (rotating), attend over the packed rows, unpack (rotating back)
                let mut qkv = nan_bf16(cu, b * t * w);
                rope_gpu::rope_pack(&mut qkv, &q, &k, &v, &table, t, 0, heads).unwrap();
                let (mut out1, mut lse1) = (nan_bf16(cu, b * t * c), cu.upload(&vec![f32::NAN; b * nh * t]).unwrap());
                gpu::gqa_attention_forward_with(variant, &mut out1, &mut lse1, &qkv, &d, nkv).unwrap();
                let mut dqkv = nan_bf16(cu, b * t * w);
                gpu::gqa_attention_backward(&mut dqkv, &dout, &qkv, &out1, &lse1, &d, nkv).unwrap();
                let (mut dq1, mut dk1, mut dv1) =
                    (nan_bf16(cu, b * t * c), nan_bf16(cu, b * t * ckv), nan_bf16(cu, b * t * ckv));
                rope_gpu::rope_unpack(&mut dq1, &mut dk1, &mut dv1, &dqkv, &table, t, 0, heads).unwrap();
                // fused
                let (mut out2, mut lse2) = (nan_bf16(cu, b * t * c), cu.upload(&vec![f32::NAN; b * nh * t]).unwrap());
                gpu::rope_attention_forward_with(variant, &mut out2, &mut lse2, &q, &k, &v, &table.cs, &d, nkv)
                    .unwrap();
                let (mut dq2, mut dk2, mut dv2) =
                    (nan_bf16(cu, b * t * c), nan_bf16(cu, b * t * ckv), nan_bf16(cu, b * t * ckv));
                let grads = [&mut dq2, &mut dk2, &mut dv2];
                gpu::rope_attention_backward(grads, &dout, [&q, &k, &v], &table.cs, &out2, &lse2, &d, nkv).unwrap();

                let bits =
                    |x: &DevBuf<bf16>| -> Vec<u16> { cu.download(x).unwrap().iter().map(|y| y.to_bits()).collect() };
                for (name, a, b) in [("out", &out1, &out2), ("dq", &dq1, &dq2), ("dk", &dk1, &dk2), ("dv", &dv1, &dv2)]
                {
                    let (x, y) = (bits(a), bits(b));
                    let diff = x.iter().zip(&y).filter(|(p, q)| p != q).count();
                    assert_eq!(
                        diff,
                        0,
                        "{label} {name}: {diff} of {} elements differ from rope_pack + attention",
                        x.len()
                    );
                    let nans = y.iter().filter(|&&u| bf16::from_bits(u).is_nan()).count();
                    assert_eq!(nans, 0, "{label} {name}: {nans} elements left unwritten (NaN)");
                }
                let (l1, l2) = (cu.download(&lse1).unwrap(), cu.download(&lse2).unwrap());
                assert!(l1.iter().zip(&l2).all(|(p, q)| p.to_bits() == q.to_bits()), "{label} lse differs");
            }
        }
    }

    /// attention_cached with grouped heads on the device (caches of the KV heads only, the append
    /// and decode kernels) against the CPU's f32 attention, with check_bf16's bound, fed in every
    /// chunking of CHUNKS.
    #[test]
    fn gqa_attention_cached_kernels_match_cpu() {
        let Some(_) = common::gpu("attention gqa_attention_cached_kernels_match_cpu") else { return };
        let to_dev = |x: Tensor| -> Tensor {
            let x = x.to_device(kiln::Device::Cuda(0)).unwrap();
            kiln::ops::elementwise::to_compute_dtype(&mut kiln::Tape::inference(), &x).unwrap()
        };
        for (k, (b, nh, nkv, hd)) in [(2, 4, 2, 16), (1, 9, 3, 64), (1, 4, 1, 128)].into_iter().enumerate() {
            let heads = Heads { n_head: nh, n_kv_head: nkv };
            let (t, c) = (70, nh * hd);
            let qkv: Vec<f32> =
                uniform(&mut rng(600 + k as u64), b * t * heads.packed() * hd, 2.0).iter().map(|&x| bf(x)).collect();
            let mha = super::repeat_kv(&qkv, heads, hd);
            let (mut want, mut lse) = (vec![0f32; b * t * c], vec![0f32; b * nh * t]);
            cpu::attention_forward(&mut want, &mut lse, &mha, &AttnDims { b, t, c, nh });
            let plain = plain_forward(&mha, b, t, c, nh);
            for sizes in super::CHUNKS {
                let got = super::cached_in_chunks(&qkv, (b, t, c, heads), sizes, &to_dev);
                let label = format!("gqa cached B={b} nh={nh} nkv={nkv} hd={hd} {} chunks", sizes.len());
                check_bf16(&label, &got, &plain, &want, 0.0);
            }
        }
    }

    /// Head dims the kernels cannot take are refused with a shape error, before any launch.
    #[test]
    fn kernels_refuse_unsupported_head_dims() {
        let Some(cu) = common::gpu("attention kernels_refuse_unsupported_head_dims") else { return };
        for (c, nh) in [(36, 3), (272, 1), (30, 4)] {
            let (b, t) = (1, 4);
            let qkv = cu.upload(&vec![bf16::ZERO; b * t * 3 * c]).unwrap();
            let mut out = cu.alloc::<bf16>(b * t * c).unwrap();
            let mut lse = cu.alloc::<f32>(b * nh * t).unwrap();
            let res = gpu::attention_forward(&mut out, &mut lse, &qkv, &AttnDims { b, t, c, nh });
            assert!(matches!(res, Err(Error::Shape { .. })), "C = {c}, n_head = {nh}: {res:?}");
        }
    }

    /// attention_cached on the device (cache append + decode kernels) against the f32 CPU
    /// reference, with flash-attention's bound: at most twice the plain bf16 implementation's
    /// error plus one bf16 rounding of the result, at GPT-2's head dim 64, the generic path
    /// (16, 40, 128), one and several batch rows, every chunking of CHUNKS; and select_rows on
    /// the device, whose copies carry on as the rows they copy.
    #[test]
    fn attention_cached_kernels_match_cpu() {
        let Some(_) = common::gpu("attention attention_cached_kernels_match_cpu") else { return };
        let to_dev = |x: Tensor| -> Tensor {
            let x = x.to_device(kiln::Device::Cuda(0)).unwrap();
            kiln::ops::elementwise::to_compute_dtype(&mut kiln::Tape::inference(), &x).unwrap()
        };
        let start = std::time::Instant::now();
        for (k, (b, nh, hd)) in [(2, 4, 16), (1, 2, 64), (2, 1, 40), (1, 1, 128)].into_iter().enumerate() {
            let (t, c) = (70, nh * hd);
            let qkv: Vec<f32> = uniform(&mut rng(400 + k as u64), b * t * 3 * c, 2.0).iter().map(|&x| bf(x)).collect();
            let (mut want, mut lse) = (vec![0f32; b * t * c], vec![0f32; b * nh * t]);
            cpu::attention_forward(&mut want, &mut lse, &qkv, &AttnDims { b, t, c, nh });
            let plain = plain_forward(&qkv, b, t, c, nh);
            for sizes in super::CHUNKS {
                let got = super::cached_in_chunks(&qkv, (b, t, c, Heads::mha(nh)), sizes, &to_dev);
                check_bf16(&format!("cached B={b} nh={nh} hd={hd} {} chunks", sizes.len()), &got, &plain, &want, 0.0);
            }
        }
        // Rows 1, 1, 0 of a 2-row cache after 33 positions carry on as those rows.
        let (b, t, nh, hd) = (2, 40, 2, 16);
        let c = nh * hd;
        let qkv: Vec<f32> = uniform(&mut rng(450), b * t * 3 * c, 2.0).iter().map(|&x| bf(x)).collect();
        let (mut want, mut lse) = (vec![0f32; b * t * c], vec![0f32; b * nh * t]);
        cpu::attention_forward(&mut want, &mut lse, &qkv, &AttnDims { b, t, c, nh });
        let plain = plain_forward(&qkv, b, t, c, nh);
        let rows_of = |bi: usize, from: usize, to: usize| qkv[(bi * t + from) * 3 * c..(bi * t + to) * 3 * c].to_vec();
        let mut cache = KvLayer::new(b, t);
        let first: Vec<f32> = (0..b).flat_map(|bi| rows_of(bi, 0, 33)).collect();
        let tape = &mut kiln::Tape::inference();
        attention_cached(
            tape,
            &to_dev(Tensor::from_f32(first, [b, 33, 3 * c]).unwrap()),
            &mut cache,
            kiln::backend::Heads::mha(nh),
        )
        .unwrap();
        let mut picked = cache.select_rows(&[1, 1, 0]).unwrap();
        let rest: Vec<f32> = [1, 1, 0].iter().flat_map(|&bi| rows_of(bi, 33, t)).collect();
        let out = attention_cached(
            tape,
            &to_dev(Tensor::from_f32(rest, [3, t - 33, 3 * c]).unwrap()),
            &mut picked,
            kiln::backend::Heads::mha(nh),
        )
        .unwrap()
        .to_f32_vec()
        .unwrap();
        for (i, &bi) in [1, 1, 0].iter().enumerate() {
            let rows = (bi * t + 33) * c..(bi + 1) * t * c;
            let got = &out[i * (t - 33) * c..(i + 1) * (t - 33) * c];
            check_bf16(&format!("selected row {i} (was {bi})"), got, &plain[rows.clone()], &want[rows], 0.0);
        }
        eprintln!("attention_cached on the device: {:.2} s", start.elapsed().as_secs_f64());
    }
}

/// Grouped-query attention: gradients against finite differences (dK and dV sum over each KV
/// head's group of query heads), at group sizes 2 and 4 and awkward head sizes.
#[test]
fn gqa_attention_grads() {
    let mut r = rng(61);
    for (b, t, nh, nkv, hd) in [(1, 7, 4, 2, 3), (2, 5, 4, 1, 4), (1, 40, 6, 3, 2)] {
        let heads = Heads { n_head: nh, n_kv_head: nkv };
        let qkv = rand_tensor(&mut r, &[b, t, (nh + 2 * nkv) * hd], 1.5);
        let label = format!("gqa attention B={b} T={t} nh={nh} nkv={nkv} hd={hd}");
        grad_check(&label, &[qkv], &[0], Objective::Probe(12), TOL, 48, |tape, x| attention(tape, &x[0], heads));
    }
}

/// Packed GQA rows [q | k | v] of `heads` as MHA rows [q | k repeated | v repeated]: each KV head
/// repeated for every query head of its group (transformers' repeat_kv).
fn repeat_kv(qkv: &[f32], heads: Heads, hd: usize) -> Vec<f32> {
    let (nh, c, ckv) = (heads.n_head, heads.n_head * hd, heads.n_kv_head * hd);
    let mut mha = Vec::with_capacity(qkv.len() / (c + 2 * ckv) * 3 * c);
    for row in qkv.chunks_exact(c + 2 * ckv) {
        mha.extend_from_slice(&row[..c]);
        for part in [&row[c..c + ckv], &row[c + ckv..]] {
            for h in 0..nh {
                mha.extend_from_slice(&part[(h / heads.group()) * hd..(h / heads.group() + 1) * hd]);
            }
        }
    }
    mha
}

/// The gradient of packed GQA rows from that of their `repeat_kv` rows: dQ as is, dK and dV of a
/// KV head the sums over its group's repeated heads (in group order, f32).
fn sum_repeated_kv(dmha: &[f32], heads: Heads, hd: usize) -> Vec<f32> {
    let (nkv, c, ckv) = (heads.n_kv_head, heads.n_head * hd, heads.n_kv_head * hd);
    let mut g = Vec::with_capacity(dmha.len() / (3 * c) * (c + 2 * ckv));
    for row in dmha.chunks_exact(3 * c) {
        g.extend_from_slice(&row[..c]);
        for p in [1, 2] {
            for kv in 0..nkv {
                for i in 0..hd {
                    g.push((0..heads.group()).map(|j| row[p * c + (kv * heads.group() + j) * hd + i]).sum());
                }
            }
        }
    }
    g
}

/// GQA equals multi-head attention over K and V heads repeated for every query head of their
/// group (transformers' repeat_kv): the forward bit for bit (the same dots in the same order),
/// dQ bit for bit, and dK, dV the sums of the repeated heads' gradients.
#[test]
fn gqa_equals_mha_over_repeated_kv_heads() {
    let mut r = rng(62);
    let (b, t, nh, nkv, hd) = (2, 37, 6, 2, 8);
    let (c, ckv) = (nh * hd, nkv * hd);
    let gqa = rand_tensor(&mut r, &[b, t, c + 2 * ckv], 1.5);
    let mha = repeat_kv(gqa.f32s().unwrap(), Heads { n_head: nh, n_kv_head: nkv }, hd);
    let mha = Tensor::from_f32(mha, [b, t, 3 * c]).unwrap();
    let dout = rand_tensor(&mut r, &[b, t, c], 1.0);
    let run = |x: &Tensor, heads: Heads| {
        let cpu = kiln::backend::cpu::Cpu;
        let (out, lse) = cpu.attention(x, heads).unwrap();
        let d = cpu.attention_backward(&dout, x, &out, &lse, heads).unwrap();
        (out.f32s().unwrap().to_vec(), d.f32s().unwrap().to_vec())
    };
    let (y1, d1) = run(&gqa, Heads { n_head: nh, n_kv_head: nkv });
    let (y2, d2) = run(&mha, Heads::mha(nh));
    assert!(y1 == y2, "GQA forward differs from MHA over repeated heads");
    let summed = sum_repeated_kv(&d2, Heads { n_head: nh, n_kv_head: nkv }, hd);
    let mut worst = 0f32;
    for (row1, row2) in d1.chunks_exact(c + 2 * ckv).zip(summed.chunks_exact(c + 2 * ckv)) {
        assert!(row1[..c] == row2[..c], "dQ differs");
        worst = row1[c..].iter().zip(&row2[c..]).fold(worst, |m, (x, y)| m.max((x - y).abs()));
    }
    // the group's contributions summed in another order: a few f32 roundings of values ~1
    assert!(worst < 1e-5, "dK/dV vs the sum over repeated heads: {worst:.3e}");
}

/// attention_cached over grouped heads (caches of the KV heads only) gives attention's rows bit
/// for bit, fed in any chunking.
#[test]
fn gqa_attention_cached_equals_attention() {
    let mut r = rng(63);
    let (b, t, nh, nkv, hd) = (2, 70, 4, 2, 6);
    let heads = Heads { n_head: nh, n_kv_head: nkv };
    let (c, w) = (nh * hd, (nh + 2 * nkv) * hd);
    let qkv = rand_tensor(&mut r, &[b, t, w], 1.5);
    let want = attention(&mut Tape::inference(), &qkv, heads).unwrap().f32s().unwrap().to_vec();
    for sizes in CHUNKS {
        let mut cache = KvLayer::new(b, t);
        let (mut at, q) = (0, qkv.f32s().unwrap());
        for &n in sizes {
            let chunk: Vec<f32> = (0..b).flat_map(|bi| &q[(bi * t + at) * w..(bi * t + at + n) * w]).copied().collect();
            let x = Tensor::from_f32(chunk, [b, n, w]).unwrap();
            let o = attention_cached(&mut Tape::inference(), &x, &mut cache, heads).unwrap();
            for bi in 0..b {
                let got = &o.f32s().unwrap()[bi * n * c..(bi + 1) * n * c];
                assert!(got == &want[(bi * t + at) * c..(bi * t + at + n) * c], "chunks {sizes:?} at {at}");
            }
            at += n;
        }
    }
}
