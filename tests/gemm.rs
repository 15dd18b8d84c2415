//! matmul / matmul_ex / linear: gradients of A, B and bias against finite differences for every
//! transpose combination, with and without bias and fused GELU, at awkward shapes; the forward
//! against an f64 reference; shape errors.

mod common;

use common::{grad_check, poison_pool, rand_tensor, rng, Objective, Tol, POOLED, U32};
use kiln::ops::gemm::{linear, matmul, matmul_ex, WeightLayout};
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
                            matmul_ex(t, &x[0], &x[1], x.get(2), trans_a, trans_b, gelu)
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
        matmul(t, &x[0], &x[1], false, true)
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
            let y = matmul_ex(&mut tape, &a, &b, Some(&bias), trans_a, trans_b, gelu).unwrap();
            assert_eq!(y.dims(), &[m, n]);
            let (ad, bd, cd) = (a.f32s().unwrap(), b.f32s().unwrap(), bias.f32s().unwrap());
            let at = |i: usize, p: usize| ad[if trans_a { p * m + i } else { i * k + p }] as f64;
            let bt = |p: usize, j: usize| bd[if trans_b { j * k + p } else { p * n + j }] as f64;
            for i in 0..m {
                for j in 0..n {
                    let (mut s, mut abs) = (cd[j] as f64, (cd[j] as f64).abs());
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
        ("inner dims differ", matmul(&mut tape, &t(&[4, 5]), &t(&[6, 3]), false, false)),
        ("inner dims differ, B^T", matmul(&mut tape, &t(&[4, 5]), &t(&[3, 6]), false, true)),
        ("inner dims differ, A^T", matmul(&mut tape, &t(&[4, 5]), &t(&[5, 3]), true, false)),
        ("A^T with batch dims", matmul(&mut tape, &t(&[2, 4, 5]), &t(&[4, 3]), true, false)),
        ("B not 2-D", matmul(&mut tape, &t(&[4, 5]), &t(&[1, 5, 3]), false, false)),
        (
            "bias of the wrong length",
            matmul_ex(&mut tape, &t(&[4, 5]), &t(&[5, 3]), Some(&t(&[4])), false, false, false),
        ),
    ];
    for (what, res) in cases {
        assert!(matches!(res, Err(Error::Shape { .. })), "{what}: {res:?}");
    }
    let ids = Tensor::from_i32(vec![0; 20], [4, 5]).unwrap();
    let res = matmul(&mut tape, &ids, &t(&[5, 3]), false, false);
    assert!(matches!(res, Err(Error::DType { .. })), "I32 A: {res:?}");
}
