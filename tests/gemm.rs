//! matmul / matmul_ex / linear: gradients of A, B and bias against finite differences for every
//! transpose combination, with and without bias and fused GELU, at awkward shapes; the forward
//! against an f64 reference; shape errors.

mod common;

use common::{grad_check, poison_pool, rand_tensor, rng, Objective, Tol, POOLED, U32};
use kiln::ops::gemm::{linear, matmul, matmul_ex, Epilogue, Trans, WeightLayout};

fn ep(gelu: bool) -> Epilogue {
    if gelu {
        Epilogue::Gelu
    } else {
        Epilogue::Plain
    }
}
use kiln::{Error, Tensor};

/// Tolerance. The op is linear in each input (GELU aside), so truncation is zero without GELU and
/// h^2 |gelu'''| / 6 * |g| |B| ~ 2e-5 of the gradient scale with it (|gelu'''| <= 1.2). Rounding:
/// each output is a length-K dot product, k ~ sqrt(K) <= 5 roundings, giving ~1e-5 absolute at
/// h = 1e-2 against max|an| >= 1e-2 here. Measured worst: 1.6e-4 of max|an| (M = 12, K = 1,
/// N = 1 with bias and GELU, where the probe's curvature dominates), 12x under the shared
/// rtol = 2e-3; a flipped transpose flag, or dbias scaled by 1.003, fails it.
const TOL: Tol = Tol { h: 1e-2, atol: 1e-6, rtol: 2e-3 };

/// (M, K, N): a single row, K = 1, N = 1, and sizes that are no multiple of 8.
const SHAPES: [(usize, usize, usize); 3] = [(7, 13, 5), (1, 20, 9), (12, 1, 1)];

#[test]
fn matmul_grads_every_transpose_bias_and_gelu() {
    let mut r = rng(1);
    for (m, k, n) in SHAPES {
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                for with_bias in [false, true] {
                    for gelu in [false, true] {
                        let a_dims = if trans_a { [k, m] } else { [m, k] };
                        let b_dims = if trans_b { [n, k] } else { [k, n] };
                        let mut inputs = vec![rand_tensor(&mut r, &a_dims, 1.0), rand_tensor(&mut r, &b_dims, 1.0)];
                        if with_bias {
                            inputs.push(rand_tensor(&mut r, &[n], 1.0));
                        }
                        let label = format!(
                            "matmul M={m} K={k} N={n} trans_a={trans_a} trans_b={trans_b} \
                             bias={with_bias} gelu={gelu}"
                        );
                        let wrt: Vec<usize> = (0..inputs.len()).collect();
                        grad_check(&label, &inputs, &wrt, Objective::Probe(7), TOL, 48, |t, x| {
                            matmul_ex(
                                t,
                                &x[0],
                                &x[1],
                                x.get(2),
                                Trans::from_bool(trans_a),
                                Trans::from_bool(trans_b),
                                ep(gelu),
                            )
                        });
                    }
                }
            }
        }
    }
}

#[test]
fn linear_grads_with_leading_batch_dims() {
    let mut r = rng(2);
    // [B, T, in]: batch > 1 with T = 7, and batch 1 with T = 1.
    for (x_dims, n) in [([2, 7, 13], 6), ([1, 1, 20], 12)] {
        let c = x_dims[2];
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            for gelu in [false, true] {
                let w_dims = match layout {
                    WeightLayout::InOut => [c, n],
                    WeightLayout::OutIn => [n, c],
                };
                let inputs = [
                    rand_tensor(&mut r, &x_dims, 1.0),
                    rand_tensor(&mut r, &w_dims, 1.0),
                    rand_tensor(&mut r, &[n], 1.0),
                ];
                let label = format!("linear x={x_dims:?} {layout:?} gelu={gelu}");
                grad_check(&label, &inputs, &[0, 1, 2], Objective::Probe(8), TOL, 48, |t, x| {
                    let y = linear(t, &x[0], &x[1], Some(&x[2]), layout, gelu)?;
                    assert_eq!(y.dims(), &[x_dims[0], x_dims[1], n]);
                    Ok(y)
                });
            }
        }
    }
    // Past the pool threshold (x, y, the pre-activation, dx and dw all >= POOLED elements),
    // twice: the second pass takes buffers filled with NaN.
    let (x_dims, n) = ([2, 65, 128], 130);
    assert!(2 * 65 * 128 >= POOLED && 128 * n >= POOLED);
    let inputs =
        [rand_tensor(&mut r, &x_dims, 1.0), rand_tensor(&mut r, &[128, n], 0.3), rand_tensor(&mut r, &[n], 1.0)];
    let passes: Vec<_> = (0..2)
        .map(|pass| {
            if pass == 1 {
                poison_pool(&[2 * 65 * 128, 2 * 65 * n, 128 * n]);
            }
            let label = format!("linear x={x_dims:?} N={n} gelu, pass {pass}");
            grad_check(&label, &inputs, &[0, 1, 2], Objective::Probe(10), TOL, 48, |t, x| {
                linear(t, &x[0], &x[1], Some(&x[2]), WeightLayout::InOut, true)
            })
        })
        .collect();
    assert!(passes[0] == passes[1], "fresh and recycled buffers gave different gradients");
    // Plain matmul on a batched A, B transposed.
    let inputs = [rand_tensor(&mut r, &[3, 7, 12], 1.0), rand_tensor(&mut r, &[5, 12], 1.0)];
    grad_check("matmul A=[3,7,12] B^T", &inputs, &[0, 1], Objective::Probe(9), TOL, 48, |t, x| {
        matmul(t, &x[0], &x[1], Trans::No, Trans::Yes)
    });
}

fn gelu64(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

/// The forward against an f64 reference. Each output is a length-K dot product plus the bias, so
/// f32 accumulation errs by at most (K + 1) u sum_k |a_ik b_kj| + |bias| (the standard gamma_n
/// bound); GELU passes that through with slope <= 1.13 and adds a few ulps of its own.
#[test]
fn matmul_forward_matches_f64_reference() {
    let mut r = rng(3);
    // (130, 40, 128): the output and the GELU pre-activation are pooled buffers, recycled from
    // one transpose combination to the next.
    for (m, k, n) in [(7, 13, 5), (1, 20, 9), (33, 70, 17), (130, 40, 128)] {
        for (trans_a, trans_b, gelu) in
            [(false, false, false), (true, false, true), (false, true, true), (true, true, false)]
        {
            let a = rand_tensor(&mut r, &if trans_a { [k, m] } else { [m, k] }, 1.0);
            let b = rand_tensor(&mut r, &if trans_b { [n, k] } else { [k, n] }, 1.0);
            let bias = rand_tensor(&mut r, &[n], 1.0);
            let mut tape = kiln::Tape::inference();
            let y = matmul_ex(
                &mut tape,
                &a,
                &b,
                Some(&bias),
                Trans::from_bool(trans_a),
                Trans::from_bool(trans_b),
                ep(gelu),
            )
            .unwrap();
            assert_eq!(y.dims(), &[m, n]);
            let (ad, bd, cd) = (a.f32s().unwrap(), b.f32s().unwrap(), bias.f32s().unwrap());
            let at = |i: usize, p: usize| ad[if trans_a { p * m + i } else { i * k + p }] as f64;
            let bt = |p: usize, j: usize| bd[if trans_b { j * k + p } else { p * n + j }] as f64;
            for i in 0..m {
                for (j, &bias_j) in cd.iter().enumerate().take(n) {
                    let (mut s, mut abs) = (bias_j as f64, (bias_j as f64).abs());
                    for p in 0..k {
                        s += at(i, p) * bt(p, j);
                        abs += (at(i, p) * bt(p, j)).abs();
                    }
                    let (want, bound) = if gelu {
                        (gelu64(s), 1.13 * (k + 1) as f64 * U32 * abs + 8.0 * U32 * (1.0 + s.abs()))
                    } else {
                        (s, (k + 1) as f64 * U32 * abs)
                    };
                    let got = y.f32s().unwrap()[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= bound,
                        "M={m} K={k} N={n} ta={trans_a} tb={trans_b} gelu={gelu} [{i},{j}]: \
                         {got} vs {want} (bound {bound:.2e})"
                    );
                }
            }
        }
    }
}

#[test]
fn matmul_rejects_bad_shapes() {
    let mut tape = kiln::Tape::new();
    let t = |d: &[usize]| Tensor::zeros(d);
    let cases: [(&str, kiln::Result<Tensor>); 6] = [
        ("inner dims differ", matmul(&mut tape, &t(&[4, 5]), &t(&[6, 3]), Trans::No, Trans::No)),
        ("inner dims differ, B^T", matmul(&mut tape, &t(&[4, 5]), &t(&[3, 6]), Trans::No, Trans::Yes)),
        ("inner dims differ, A^T", matmul(&mut tape, &t(&[4, 5]), &t(&[5, 3]), Trans::Yes, Trans::No)),
        ("A^T with batch dims", matmul(&mut tape, &t(&[2, 4, 5]), &t(&[4, 3]), Trans::Yes, Trans::No)),
        ("B not 2-D", matmul(&mut tape, &t(&[4, 5]), &t(&[1, 5, 3]), Trans::No, Trans::No)),
        (
            "bias of the wrong length",
            matmul_ex(&mut tape, &t(&[4, 5]), &t(&[5, 3]), Some(&t(&[4])), Trans::No, Trans::No, Epilogue::Plain),
        ),
    ];
    for (what, res) in cases {
        assert!(matches!(res, Err(Error::Shape { .. })), "{what}: {res:?}");
    }
    let ids = Tensor::from_i32(vec![0; 20], [4, 5]).unwrap();
    let res = matmul(&mut tape, &ids, &t(&[5, 3]), Trans::No, Trans::No);
    assert!(matches!(res, Err(Error::DType { .. })), "I32 A: {res:?}");
}

/// rows x cols values laid in rows `pitch` apart, `fill` between them.
fn pad(v: &[f32], cols: usize, pitch: usize, fill: f32) -> Vec<f32> {
    v.chunks(cols.max(1)).flat_map(|r| r.iter().copied().chain(std::iter::repeat_n(fill, pitch - cols))).collect()
}

/// The first `cols` of each `pitch`-long row.
fn unpad(v: &[f32], cols: usize, pitch: usize) -> Vec<f32> {
    v.chunks(pitch).flat_map(|r| r[..cols].to_vec()).collect()
}

/// The CPU GEMM reads A and B from rows wider than their columns and writes C into such rows
/// (`Pitch`): the dense product, within f32 rounding (the crate may block the two differently),
/// with NaN in the operands' padding never read and C's padding never written.
#[test]
fn cpu_matmul_reads_and_writes_padded_rows() {
    use kiln::backend::cpu::gemm as cpu;
    use kiln::backend::{GemmDesc, Pitch};
    let mut r = rng(31);
    let (m, n, k) = (37, 13, 29);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let d = GemmDesc::new(m, n, k, Trans::from_bool(ta), Trans::from_bool(tb));
        let (a, b) = (common::uniform(&mut r, m * k, 1.0), common::uniform(&mut r, k * n, 1.0));
        let mut want = vec![0f32; m * n];
        cpu::matmul(&mut want, &a, &b, &d, false);
        let (aw, bw) = (d.a_stored()[1], d.b_stored()[1]);
        let p = d.with_pitch(Pitch { a: Some(aw + 3), b: Some(bw + 5), c: Some(n + 7) });
        let mut got = vec![7.0f32; m * (n + 7)];
        cpu::matmul(&mut got, &pad(&a, aw, aw + 3, f32::NAN), &pad(&b, bw, bw + 5, f32::NAN), &p, false);
        for (i, (g, w)) in unpad(&got, n, n + 7).iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "ta={ta} tb={tb} [{i}]: {g} vs {w}");
        }
        assert!(got.chunks(n + 7).all(|row| row[n..].iter().all(|&x| x == 7.0)), "ta={ta} tb={tb}: padding written");
        assert!(p.check_pitch("test").is_ok());
        let narrow = d.with_pitch(Pitch { c: Some(n - 1), ..Pitch::default() });
        assert!(matches!(narrow.check_pitch("test"), Err(Error::Shape { .. })), "a pitch under the width is refused");
    }
}

/// The CUDA GEMM (kernels/gemm.cu): the host twin of its epilogue against the CPU backend (runs
/// everywhere), and the kernels against the CPU backend (skipped without a GPU).
///
/// Tolerance of a kernel output against the CPU's f32 result on the same bf16-rounded inputs. The
/// product of two bf16 values is exact in f32, so the two sides differ only in how the K products
/// (and the bias, the old output) are summed, plus the final rounding:
///   - each f32 sum of K + 2 terms errs by at most (K + 2) u S, S = sum_p |a_ip b_pj| + |bias_j|
///     (+ |old_ij|), the standard gamma bound; the CPU rounds to nearest (u = 2^-24), the tensor
///     cores' f32 accumulation truncates (u = 2^-23, Fasi et al. 2021). Together
///     3 (K + 2) 2^-24 S; we allow 2x that: 3 (K + 2) 2^-23 S.
///   - GELU (the same bits on both sides, elementwise.cuh) passes that through with slope <= 1.13.
///   - a bf16 output is then rounded once: 2^-9 relative; we allow 2^-8 |want|. An f32 output: 0.
///
/// For K = 768 with inputs in [-1, 1], S ~ 192, so the accumulation term is ~0.05 against outputs
/// ~9: a dropped k-tile (error ~2) or a flipped transpose (error ~10) fails it by orders.
#[cfg(feature = "cuda")]
mod cuda {
    use super::common::{self, rng, uniform};
    use kiln::ops::gemm::{GemmDesc, Trans};

    /// The GEMM of a test's loop variables.
    fn desc(m: usize, n: usize, k: usize, ta: bool, tb: bool, gelu: bool) -> GemmDesc {
        GemmDesc {
            m,
            n,
            k,
            a: Trans::from_bool(ta),
            b: Trans::from_bool(tb),
            epilogue: super::ep(gelu),
            pitch: Default::default(),
        }
    }
    use half::bf16;
    use kiln::backend::cpu::gemm as cpu;
    use kiln::backend::cuda::gemm::{self as gpu, twin, GemmOut, GemmVariant};
    use kiln::backend::cuda::{Cuda, DevBuf};
    use rand::rngs::StdRng;

    const U23: f64 = 1.0 / (1u64 << 23) as f64;
    const U24: f64 = 1.0 / (1u64 << 24) as f64;

    /// (M, N, K): one element, sizes no multiple of anything (K = 29 and N = 13 take the
    /// element-wise load path), N = 770 (rows 8-byte aligned only every 4th), GPT-2's QKV
    /// projection at T = 128 (all 16-byte aligned), and M = 1025 with a narrow N.
    const SHAPES: [(usize, usize, usize); 5] =
        [(1, 1, 1), (7, 13, 29), (97, 770, 64), (128, 2304, 768), (1025, 50, 768)];
    /// Both tile sizes of the mma.sync kernel, forced (the automatic choice takes the small one at
    /// every shape here on a GPU with >= 64 SMs), and the naive reference.
    /// The emulated device runs a kernel thousands of times slower than a GPU: there the tests take
    /// the shapes up to (97, 770, 64) (several tiles, ragged edges) and one with four k steps per
    /// tile (both shared stages refilled), not GPT-2's full widths.
    /// (136, 200, 200) is one every layout of the wgmma kernel takes (leading dimensions that are
    /// multiples of 8): 2 x 2 tiles, the last ones ragged, and K in four slices, the last of 8.
    fn shapes(cu: &kiln::backend::cuda::Cuda) -> Vec<(usize, usize, usize)> {
        if cu.is_emulated() {
            vec![(1, 1, 1), (7, 13, 29), (97, 770, 64), (130, 72, 256), (136, 200, 200)]
        } else {
            SHAPES.iter().copied().chain([(136, 200, 200)]).collect()
        }
    }
    /// Every variant the device runs: both mma.sync tiles, the naive reference and, on sm_90 (the
    /// emulated device is one), the wgmma kernel, with its own grid (one block per SM on a GPU, one
    /// per tile on the emulated device) and held to two blocks, which walk several tiles each. Wgmma takes mma.sync's kernels where TMA cannot read an operand (a leading
    /// dimension that is not a multiple of 8), as documented; `wgmma_runs_where_tma_can_read`
    /// checks that it does run its own kernels where it can.
    fn variants(cu: &kiln::backend::cuda::Cuda) -> Vec<GemmVariant> {
        let mut v = vec![GemmVariant::MmaSyncLarge, GemmVariant::MmaSyncSmall, GemmVariant::Naive];
        if gpu::runs_wgmma(cu) {
            v.extend([GemmVariant::Wgmma, GemmVariant::WgmmaTwoBlocks]);
        }
        v
    }
    const TRANSPOSES: [(bool, bool); 4] = [(false, false), (false, true), (true, false), (true, true)];

    fn round_bf16(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
    }

    fn to_bf16(v: &[f32]) -> Vec<bf16> {
        v.iter().map(|&x| bf16::from_f32(x)).collect()
    }

    /// Random bf16-exact values in [-1, 1).
    fn rand_bf16(r: &mut StdRng, n: usize) -> Vec<f32> {
        round_bf16(&uniform(r, n, 1.0))
    }

    /// S[i, j] = sum_p |op(A)_ip op(B)_pj| (+ |bias_j|) (+ |old_ij|): the scale of the rounding error.
    #[allow(clippy::too_many_arguments)]
    fn scale(
        a: &[f32],
        b: &[f32],
        bias: Option<&[f32]>,
        old: Option<&[f32]>,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
    ) -> Vec<f32> {
        let abs = |v: &[f32]| v.iter().map(|x| x.abs()).collect::<Vec<f32>>();
        let mut s = vec![0f32; m * n];
        cpu::matmul(&mut s, &abs(a), &abs(b), &desc(m, n, k, ta, tb, false), false);
        for (idx, s) in s.iter_mut().enumerate() {
            *s += bias.map_or(0.0, |b| b[idx % n].abs()) + old.map_or(0.0, |o| o[idx].abs());
        }
        s
    }

    /// Asserts |got - want| <= round_u |want| + slope 3 (K + 2) 2^-23 S element by element (NaN fails).
    fn check(label: &str, got: &[f32], want: &[f32], s: &[f32], k: usize, round_u: f64, slope: f64) {
        assert_eq!(got.len(), want.len(), "{label}: length");
        let mut worst = 0f64;
        for (idx, ((&g, &w), &s)) in got.iter().zip(want).zip(s).enumerate() {
            let bound = round_u * (w as f64).abs() + slope * 3.0 * (k + 2) as f64 * U23 * s as f64 + 1e-30;
            let err = (g as f64 - w as f64).abs();
            assert!(err <= bound, "{label}: element {idx} = {g}, expected {w} (error {err:.3e}, bound {bound:.3e})");
            worst = worst.max(err / bound);
        }
        println!("{label}: worst error {worst:.3} of the bound");
    }

    /// The output element types, with what the tests need of them.
    trait Out: GemmOut + Copy + Default {
        fn from_f32(x: f32) -> Self;
        fn to_f32(self) -> f32;
        /// The relative rounding allowed for a stored output.
        const ROUND_U: f64;
    }
    impl Out for bf16 {
        fn from_f32(x: f32) -> Self {
            bf16::from_f32(x)
        }
        fn to_f32(self) -> f32 {
            bf16::to_f32(self)
        }
        const ROUND_U: f64 = 1.0 / 256.0;
    }
    impl Out for f32 {
        fn from_f32(x: f32) -> Self {
            x
        }
        fn to_f32(self) -> f32 {
            self
        }
        const ROUND_U: f64 = 0.0;
    }

    fn upload<O: Out>(cu: &Cuda, v: &[f32]) -> DevBuf<O> {
        cu.upload(&v.iter().map(|&x| O::from_f32(x)).collect::<Vec<O>>()).unwrap()
    }

    fn download<O: Out>(cu: &Cuda, d: &DevBuf<O>) -> Vec<f32> {
        cu.download(d).unwrap().into_iter().map(O::to_f32).collect()
    }

    fn nan_buffer<O: Out>(cu: &Cuda, n: usize) -> DevBuf<O> {
        upload(cu, &vec![f32::NAN; n])
    }

    // ---- host twin (no GPU needed) ----

    /// The twin's epilogue on the CPU's product, against cpu::matmul_forward. Without a bias the
    /// two compute the same product and GELU's bits match (elementwise.cuh), so they must agree
    /// exactly; with one, the CPU adds the bias inside the GEMM, so the sum order differs:
    /// (K + 2) u S, times GELU's slope 1.13.
    #[test]
    fn epilogue_twin_matches_cpu_matmul_forward() {
        let mut r = rng(101);
        for (m, n, k) in [(1, 1, 1), (7, 13, 29), (33, 70, 17), (64, 48, 200)] {
            for (ta, tb) in TRANSPOSES {
                for (with_bias, gelu) in [(false, false), (true, false), (false, true), (true, true)] {
                    let a = rand_bf16(&mut r, m * k);
                    let b = rand_bf16(&mut r, k * n);
                    let bias = with_bias.then(|| rand_bf16(&mut r, n));
                    let mut acc = vec![0f32; m * n];
                    cpu::matmul(&mut acc, &a, &b, &desc(m, n, k, ta, tb, false), false);
                    let (mut want, mut want_pre) = (vec![0f32; m * n], vec![0f32; m * n]);
                    cpu::matmul_forward(
                        &mut want,
                        gelu.then_some(&mut want_pre[..]),
                        &a,
                        &b,
                        bias.as_deref(),
                        &desc(m, n, k, ta, tb, false),
                    );
                    let (mut got, mut got_pre) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                    twin::gemm_epilogue(
                        &mut got,
                        gelu.then_some(&mut got_pre[..]),
                        &acc,
                        bias.as_deref(),
                        m,
                        n,
                        true,
                        false,
                        gelu,
                    );
                    let label = format!("twin M={m} N={n} K={k} ta={ta} tb={tb} bias={with_bias} gelu={gelu}");
                    if with_bias {
                        let s = scale(&a, &b, bias.as_deref(), None, m, n, k, ta, tb);
                        for (idx, (&g, &w)) in got.iter().zip(&want).enumerate() {
                            let bound = 1.13 * (k + 2) as f64 * U24 * s[idx] as f64;
                            assert!(((g - w) as f64).abs() <= bound, "{label}: [{idx}] {g} vs {w} (bound {bound:.2e})");
                        }
                    } else {
                        assert_eq!(got, want, "{label}: out");
                    }
                    if gelu && !with_bias {
                        assert_eq!(got_pre, want_pre, "{label}: pre");
                    }
                }
            }
        }
    }

    /// A bf16 output is the f32 epilogue rounded to nearest-even: exactly half's from_f32, ties
    /// included, for the output and the pre-activation.
    #[test]
    fn epilogue_twin_rounds_bf16_to_nearest_even() {
        let mut r = rng(102);
        let (m, n) = (9, 37);
        let mut acc = uniform(&mut r, m * n, 4.0);
        // Ties: 1 + 2^-8 lies halfway between bf16 1 and 1 + 2^-7 (even: 1); 1 + 3 2^-8 halfway
        // between 1 + 2^-7 and 1 + 2^-6 (even: 1 + 2^-6); and their negatives.
        acc[..4].copy_from_slice(&[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -1.0 - 1.0 / 256.0, -1.0 - 3.0 / 256.0]);
        let bias = rand_bf16(&mut r, n);
        for (with_bias, gelu) in [(false, false), (true, true)] {
            let b = with_bias.then_some(&bias[..]);
            let (mut f, mut f_pre) = (vec![0f32; m * n], vec![0f32; m * n]);
            twin::gemm_epilogue(&mut f, Some(&mut f_pre), &acc, b, m, n, true, false, gelu);
            let (mut h, mut h_pre) = (vec![0f32; m * n], vec![0f32; m * n]);
            twin::gemm_epilogue(&mut h, Some(&mut h_pre), &acc, b, m, n, false, false, gelu);
            assert_eq!(h, round_bf16(&f), "bias={with_bias} gelu={gelu}: out");
            assert_eq!(h_pre, round_bf16(&f_pre), "bias={with_bias} gelu={gelu}: pre");
        }
        let mut h = vec![0f32; m * n];
        twin::gemm_epilogue(&mut h, None, &acc, None, m, n, false, false, false);
        assert_eq!(&h[..4], &[1.0, 1.0 + 4.0 / 256.0, -1.0, -1.0 - 4.0 / 256.0]);
    }

    /// Accumulate: the twin adds the product to the old output as cpu::matmul(accumulate) does,
    /// up to the sum order, (K + 2) u S with S including |old|.
    #[test]
    fn epilogue_twin_accumulates_like_cpu_matmul() {
        let mut r = rng(103);
        for (m, n, k) in [(1, 1, 1), (7, 13, 29), (40, 33, 96)] {
            for (ta, tb) in TRANSPOSES {
                let a = rand_bf16(&mut r, m * k);
                let b = rand_bf16(&mut r, k * n);
                let old = uniform(&mut r, m * n, 3.0);
                let mut acc = vec![0f32; m * n];
                cpu::matmul(&mut acc, &a, &b, &desc(m, n, k, ta, tb, false), false);
                let mut want = old.clone();
                cpu::matmul(&mut want, &a, &b, &desc(m, n, k, ta, tb, false), true);
                let mut got = old.clone();
                twin::gemm_epilogue(&mut got, None, &acc, None, m, n, true, true, false);
                let s = scale(&a, &b, None, Some(&old), m, n, k, ta, tb);
                for (idx, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    let bound = (k + 2) as f64 * U24 * s[idx] as f64;
                    assert!(((g - w) as f64).abs() <= bound, "M={m} N={n} K={k} ta={ta} tb={tb} [{idx}]: {g} vs {w}");
                }
            }
        }
    }

    // ---- kernels (GPU) ----

    /// One forward case on the GPU with `variant`, out and pre in O, against cpu::matmul_forward.
    #[allow(clippy::too_many_arguments)]
    fn forward_case<O: Out>(
        cu: &Cuda,
        r: &mut StdRng,
        variant: GemmVariant,
        (m, n, k): (usize, usize, usize),
        ta: bool,
        tb: bool,
        with_bias: bool,
        gelu: bool,
    ) {
        let a = rand_bf16(r, m * k);
        let b = rand_bf16(r, k * n);
        let bias = with_bias.then(|| rand_bf16(r, n));
        let (mut want, mut want_pre) = (vec![0f32; m * n], vec![0f32; m * n]);
        cpu::matmul_forward(
            &mut want,
            gelu.then_some(&mut want_pre[..]),
            &a,
            &b,
            bias.as_deref(),
            &desc(m, n, k, ta, tb, false),
        );
        let s = scale(&a, &b, bias.as_deref(), None, m, n, k, ta, tb);

        let (da, db) = (cu.upload(&to_bf16(&a)).unwrap(), cu.upload(&to_bf16(&b)).unwrap());
        let dbias = bias.as_ref().map(|v| cu.upload(&to_bf16(v)).unwrap());
        let mut out = nan_buffer::<O>(cu, m * n);
        let mut pre = gelu.then(|| nan_buffer::<O>(cu, m * n));
        gpu::matmul_with(
            variant,
            &mut out,
            pre.as_mut(),
            &da,
            &db,
            dbias.as_ref(),
            &desc(m, n, k, ta, tb, gelu),
            false,
        )
        .unwrap();
        cu.sync().unwrap();
        let label = format!(
            "{variant:?} {} M={m} N={n} K={k} ta={ta} tb={tb} bias={with_bias} gelu={gelu}",
            std::any::type_name::<O>()
        );
        check(&label, &download(cu, &out), &want, &s, k, O::ROUND_U, if gelu { 1.13 } else { 1.0 });
        if let Some(pre) = &pre {
            check(&format!("{label} pre"), &download(cu, pre), &want_pre, &s, k, O::ROUND_U, 1.0);
        }
    }

    /// Every transpose combination, with and without bias and GELU, bf16 output, every variant,
    /// at every shape; then f32 output with bias and GELU.
    #[test]
    fn gemm_forward_matches_cpu_every_transpose_bias_gelu() {
        let Some(cu) = common::gpu("gemm_forward_matches_cpu_every_transpose_bias_gelu") else { return };
        let mut r = rng(201);
        for variant in variants(cu) {
            for shape in shapes(cu) {
                for (ta, tb) in TRANSPOSES {
                    for (with_bias, gelu) in [(false, false), (true, false), (false, true), (true, true)] {
                        forward_case::<bf16>(cu, &mut r, variant, shape, ta, tb, with_bias, gelu);
                    }
                    forward_case::<f32>(cu, &mut r, variant, shape, ta, tb, true, true);
                }
            }
        }
    }

    /// matmul into f32 with and without accumulate (the weight-gradient path), every transpose;
    /// K = 0 included (accumulate leaves out as it was, otherwise zeros).
    #[test]
    fn gemm_matmul_f32_accumulate_matches_cpu() {
        let Some(cu) = common::gpu("gemm_matmul_f32_accumulate_matches_cpu") else { return };
        let mut r = rng(202);
        let shapes = shapes(cu).into_iter().chain([(5, 9, 0)]);
        for variant in variants(cu) {
            for (m, n, k) in shapes.clone() {
                for (ta, tb) in TRANSPOSES {
                    for accumulate in [false, true] {
                        let a = rand_bf16(&mut r, m * k);
                        let b = rand_bf16(&mut r, k * n);
                        let old = uniform(&mut r, m * n, 3.0);
                        let mut want = old.clone();
                        cpu::matmul(&mut want, &a, &b, &desc(m, n, k, ta, tb, false), accumulate);
                        let s = scale(&a, &b, None, accumulate.then_some(&old[..]), m, n, k, ta, tb);
                        let (da, db) = (cu.upload(&to_bf16(&a)).unwrap(), cu.upload(&to_bf16(&b)).unwrap());
                        // Without accumulate the old contents must not matter: NaN.
                        let mut out: DevBuf<f32> =
                            if accumulate { cu.upload(&old).unwrap() } else { nan_buffer(cu, m * n) };
                        gpu::matmul_with(
                            variant,
                            &mut out,
                            None,
                            &da,
                            &db,
                            None,
                            &desc(m, n, k, ta, tb, false),
                            accumulate,
                        )
                        .unwrap();
                        let label =
                            format!("{variant:?} matmul f32 M={m} N={n} K={k} ta={ta} tb={tb} accumulate={accumulate}");
                        check(&label, &download(cu, &out), &want, &s, k, 0.0, 1.0);
                    }
                }
            }
        }
    }

    /// The products ops::gemm::backward forms, through the shipped `matmul` wrapper with the same
    /// flags: dA and dB (f32) from bf16 operands and a bf16 gradient G, for every forward
    /// transpose combination.
    #[test]
    fn gemm_backward_products_match_cpu() {
        let Some(cu) = common::gpu("gemm_backward_products_match_cpu") else { return };
        let mut r = rng(203);
        for (m, n, k) in [(97, 770, 64), (1025, 50, 768), (7, 13, 29)] {
            for (ta, tb) in TRANSPOSES {
                let a = rand_bf16(&mut r, m * k);
                let b = rand_bf16(&mut r, k * n);
                let g = rand_bf16(&mut r, m * n);
                let (da_dev, db_dev, g_dev) = (
                    cu.upload(&to_bf16(&a)).unwrap(),
                    cu.upload(&to_bf16(&b)).unwrap(),
                    cu.upload(&to_bf16(&g)).unwrap(),
                );
                // dA: (out, lhs, rhs, rows, cols, inner, lhs^T, rhs^T) exactly as ops::gemm::backward.
                let da_args = if ta {
                    (&b, &g, &db_dev, &g_dev, k, m, n, tb, true)
                } else {
                    (&g, &b, &g_dev, &db_dev, m, k, n, false, !tb)
                };
                let db_args = if tb {
                    (&g, &a, &g_dev, &da_dev, n, k, m, true, ta)
                } else {
                    (&a, &g, &da_dev, &g_dev, k, n, m, !ta, false)
                };
                for (what, (x, y, dx, dy, rows, cols, inner, tx, ty)) in [("dA", da_args), ("dB", db_args)] {
                    let mut want = vec![0f32; rows * cols];
                    cpu::matmul(&mut want, x, y, &desc(rows, cols, inner, tx, ty, false), false);
                    let s = scale(x, y, None, None, rows, cols, inner, tx, ty);
                    let mut out = nan_buffer::<f32>(cu, rows * cols);
                    gpu::matmul(&mut out, dx, dy, &desc(rows, cols, inner, tx, ty, false), false).unwrap();
                    let label = format!("backward {what} M={m} N={n} K={k} ta={ta} tb={tb}");
                    check(&label, &download(cu, &out), &want, &s, inner, 0.0, 1.0);
                }
            }
        }
    }

    /// Column sums of a bf16 dY against cpu::bias_backward on the same values. Both sum in f32:
    /// the CPU in at most `rows` steps, the kernels in at most 16 (a row lane's share of a group
    /// of 64) + 4 (the lanes) + rows / 64 + 1 (the groups); so
    /// |err| <= (rows + rows / 64 + 22) u sum_i |dY_ij|. Widths that are multiples of 8 take the
    /// 16-byte path (2304, 776), the others the 2-byte one; 1025 and 4100 rows end in a partial
    /// group; a second run is bit-identical (no atomics).
    #[test]
    fn gemm_bias_backward_matches_cpu() {
        let Some(cu) = common::gpu("gemm_bias_backward_matches_cpu") else { return };
        let mut r = rng(204);
        for rows in [1, 7, 64, 97, 1025, 4100] {
            for n in [1, 50, 770, 776, 2304] {
                if rows * n > 3_000_000 {
                    continue;
                }
                let dy = rand_bf16(&mut r, rows * n);
                let mut want = vec![0f32; n];
                cpu::bias_backward(&mut want, &dy, n);
                let dy_dev = cu.upload(&to_bf16(&dy)).unwrap();
                let mut got_dev = nan_buffer::<f32>(cu, n);
                gpu::bias_backward(&mut got_dev, &dy_dev, n).unwrap();
                let got = download(cu, &got_dev);
                let mut again_dev = nan_buffer::<f32>(cu, n);
                gpu::bias_backward(&mut again_dev, &dy_dev, n).unwrap();
                let again = download(cu, &again_dev);
                assert!(
                    got.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "rows={rows} n={n}: not deterministic"
                );
                for j in 0..n {
                    let s: f64 = (0..rows).map(|i| dy[i * n + j].abs() as f64).sum();
                    let bound = (rows + rows / 64 + 22) as f64 * U24 * s;
                    let err = (got[j] as f64 - want[j] as f64).abs();
                    assert!(err <= bound, "rows={rows} n={n} [{j}]: {} vs {} (bound {bound:.2e})", got[j], want[j]);
                }
            }
        }
    }

    /// Which kernel each variant launches (`gpu::resolve`, what `matmul_with` asks): Best takes
    /// wgmma on sm_90 for GPT-2's large products, mma.sync where TMA cannot read an operand (the
    /// vocabulary of 50257 as a leading dimension, a misaligned address, K = 0), where 128 x 128
    /// tiles would leave SMs idle, and on other GPUs; a forced wgmma variant is refused off sm_90.
    #[test]
    fn variants_resolve_to_the_kernel_each_shape_allows() {
        use GemmVariant::*;
        // Whether the device runs the wgmma kernels (gpu::runs_wgmma: sm_90 with sm_90a code).
        let (h100, a100) = (true, false);
        let g = |m, n, k, ta, tb| desc(m, n, k, ta, tb, false);
        let cases = [
            (Best, h100, g(8192, 2304, 768, false, false), 0, Wgmma),
            (Best, h100, g(8192, 768, 3072, false, true), 0, Wgmma),
            (Best, h100, g(3072, 768, 8192, true, false), 0, Wgmma),
            // c_proj's weight gradient: 36 tiles of 128 x 128 for 132 SMs.
            (Best, h100, g(768, 768, 8192, true, false), 0, MmaSyncSmall),
            // lm_head's input gradient reads dlogits [8192, 50257]: rows not 16-byte aligned.
            (Best, h100, g(8192, 768, 50257, false, false), 0, MmaSyncLarge),
            (Best, h100, g(8192, 2304, 768, false, false), 8, MmaSyncLarge),
            (Best, a100, g(8192, 2304, 768, false, false), 0, MmaSyncLarge),
            (Wgmma, h100, g(136, 200, 200, true, true), 0, Wgmma),
            (WgmmaTwoBlocks, h100, g(136, 200, 200, false, false), 0, WgmmaTwoBlocks),
            (Wgmma, h100, g(7, 13, 29, false, false), 0, MmaSyncSmall),
            (Wgmma, h100, g(5, 9, 0, false, false), 0, MmaSyncSmall),
            (MmaSync, h100, g(8192, 2304, 768, false, false), 0, MmaSyncLarge),
            (Naive, h100, g(8192, 2304, 768, false, false), 0, Naive),
        ];
        for (variant, wg, d, misalign, want) in cases {
            let got = gpu::resolve(variant, wg, 132, &d, 1 << 20, (1 << 21) + misalign).unwrap();
            assert_eq!(got, want, "{variant:?} (wgmma device: {wg}) for {d:?} (B misaligned by {misalign})");
        }
        let e = gpu::resolve(Wgmma, a100, 84, &g(256, 256, 256, false, false), 0, 0).unwrap_err();
        assert!(e.contains("sm_90a") && e.contains("Best"), "{e}");
    }

    /// The wgmma variant runs its own kernels for every layout TMA can read (the emulated device
    /// counts the kernels it ran), with the shipped epilogue's results.
    #[test]
    fn wgmma_runs_where_tma_can_read() {
        let Some(cu) = common::gpu("wgmma_runs_where_tma_can_read") else { return };
        let Some(emu) = cu.emulator() else {
            eprintln!("SKIPPED wgmma_runs_where_tma_can_read: counts launches on the emulated device only");
            return;
        };
        let mut r = rng(205);
        let (m, n, k) = (136, 200, 200);
        for (ta, tb) in TRANSPOSES {
            let a = rand_bf16(&mut r, m * k);
            let b = rand_bf16(&mut r, k * n);
            let (da, db) = (cu.upload(&to_bf16(&a)).unwrap(), cu.upload(&to_bf16(&b)).unwrap());
            let mut out = nan_buffer::<f32>(cu, m * n);
            let d = desc(m, n, k, ta, tb, false);
            gpu::matmul_with(GemmVariant::Wgmma, &mut out, None, &da, &db, None, &d, false).unwrap();
            cu.sync().unwrap();
            let want = format!("gemm_wgmma_{}{}", if ta { "t" } else { "n" }, if tb { "t" } else { "n" });
            // Other tests of this binary launch GEMMs concurrently: look for ours among them.
            let ran: Vec<&str> = emu.take_stats().iter().map(|(kernel, _, _)| kernel.name()).collect();
            assert!(ran.contains(&want.as_str()), "ta={ta} tb={tb}: expected {want} among {ran:?}");
            let mut want_out = vec![0f32; m * n];
            cpu::matmul(&mut want_out, &a, &b, &d, false);
            let s = scale(&a, &b, None, None, m, n, k, ta, tb);
            check(&format!("wgmma ta={ta} tb={tb}"), &download(cu, &out), &want_out, &s, k, 0.0, 1.0);
        }
    }

    /// Every variant reads A and B from padded rows and writes C and the pre-activation into
    /// padded rows (`Pitch`), every transpose, with bias and GELU: the CPU's dense product within
    /// the kernels' bound, NaN in the operands' padding never read, the output's padding (NaN)
    /// never written. Pitches that are multiples of 8 (the classifier's case) let the wgmma
    /// kernel take a shape whose dense widths it could not read (N = 13, K = 29); odd ones take
    /// mma.sync's element-wise loads.
    #[test]
    fn gemm_reads_and_writes_padded_rows_every_variant() {
        use kiln::backend::Pitch;
        let Some(cu) = common::gpu("gemm_reads_and_writes_padded_rows_every_variant") else { return };
        let mut r = rng(206);
        for variant in variants(cu) {
            for (m, n, k, extra) in [(37, 13, 29, 3), (136, 13, 29, 8), (130, 72, 136, 24)] {
                for (ta, tb) in TRANSPOSES {
                    let d = desc(m, n, k, ta, tb, true);
                    let (aw, bw) = (d.a_stored()[1], d.b_stored()[1]);
                    let up = |w: usize| if extra % 8 == 0 { w.next_multiple_of(8) + extra } else { w + extra };
                    let (pa, pb, pc) = (up(aw), up(bw), up(n));
                    let p = d.with_pitch(Pitch { a: Some(pa), b: Some(pb), c: Some(pc) });
                    let (a, b, bias) = (rand_bf16(&mut r, m * k), rand_bf16(&mut r, k * n), rand_bf16(&mut r, n));
                    let (mut want, mut want_pre) = (vec![0f32; m * n], vec![0f32; m * n]);
                    cpu::matmul_forward(
                        &mut want,
                        Some(&mut want_pre[..]),
                        &a,
                        &b,
                        Some(&bias),
                        &desc(m, n, k, ta, tb, false),
                    );
                    let s = scale(&a, &b, Some(&bias), None, m, n, k, ta, tb);
                    let da = cu.upload(&to_bf16(&super::pad(&a, aw, pa, f32::NAN))).unwrap();
                    let db = cu.upload(&to_bf16(&super::pad(&b, bw, pb, f32::NAN))).unwrap();
                    let dbias = cu.upload(&to_bf16(&bias)).unwrap();
                    let (mut out, mut pre) = (nan_buffer::<bf16>(cu, m * pc), nan_buffer::<bf16>(cu, m * pc));
                    gpu::matmul_with(variant, &mut out, Some(&mut pre), &da, &db, Some(&dbias), &p, false).unwrap();
                    cu.sync().unwrap();
                    let label = format!("{variant:?} padded M={m} N={n} K={k} pitches {pa} {pb} {pc} ta={ta} tb={tb}");
                    for (what, got, want) in
                        [("out", download(cu, &out), &want), ("pre", download(cu, &pre), &want_pre)]
                    {
                        check(
                            &format!("{label} {what}"),
                            &super::unpad(&got, n, pc),
                            want,
                            &s,
                            k,
                            <bf16 as Out>::ROUND_U,
                            1.13,
                        );
                        assert!(
                            got.chunks(pc).all(|row| row[n..].iter().all(|x| x.is_nan())),
                            "{label}: {what} padding written"
                        );
                    }
                }
            }
        }
    }

    /// Wrong lengths are errors, not out-of-bounds launches.
    #[test]
    fn gemm_rejects_wrong_lengths() {
        let Some(cu) = common::gpu("gemm_rejects_wrong_lengths") else { return };
        let a: DevBuf<bf16> = cu.upload(&to_bf16(&[1.0; 12])).unwrap();
        let b: DevBuf<bf16> = cu.upload(&to_bf16(&[1.0; 20])).unwrap();
        let mut out: DevBuf<f32> = cu.zeros(15).unwrap();
        assert!(gpu::matmul(&mut out, &a, &b, &GemmDesc::nn(3, 5, 4), false).is_ok());
        assert!(gpu::matmul(&mut out, &a, &b, &GemmDesc::nn(3, 5, 5), false).is_err(), "K too large for A");
        assert!(gpu::matmul(&mut out, &a, &b, &GemmDesc::nn(4, 5, 3), false).is_err(), "out too small");
        let short_bias: DevBuf<bf16> = cu.upload(&to_bf16(&[0.0; 4])).unwrap();
        let r = gpu::matmul_forward(&mut out, None, &a, &b, Some(&short_bias), &GemmDesc::nn(3, 5, 4));
        assert!(r.is_err(), "bias of the wrong length");
        let mut dbias: DevBuf<f32> = cu.zeros(5).unwrap();
        let dy: DevBuf<bf16> = cu.upload(&to_bf16(&[0.0; 14])).unwrap();
        assert!(gpu::bias_backward(&mut dbias, &dy, 5).is_err(), "14 is no whole number of rows of 5");
        cu.sync().unwrap();
    }
}
