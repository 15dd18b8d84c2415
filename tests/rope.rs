//! Rotary position embeddings fused with packing q, k, v: the forward against a direct f64
//! formula (transformers' rotate-half convention), gradients against finite differences, offsets
//! (a row at position p is rotated the same whether it comes first or after p cached rows), and
//! shape errors.

mod common;

use common::{grad_check, rand_tensor, rng, Objective, Tol};
use kiln::backend::Heads;
use kiln::ops::rope::rope_qkv;
use kiln::{Error, Tape, Tensor};

/// Tolerance. A rotation is linear, so the finite difference has no truncation error: only
/// rounding of one product-sum per output, ~1e-6 of max|an| at h = 1e-2. A backward that rotates
/// forward instead of back is off by the sine terms, > 1e-1.
const TOL: Tol = Tol { h: 1e-2, atol: 1e-6, rtol: 2e-3 };

#[test]
fn rope_matches_the_rotate_half_formula() {
    let mut r = rng(51);
    let (b, t, nh, nkv, hd, theta, offset) = (2, 9, 4, 2, 8, 10_000f32, 3);
    let heads = Heads { n_head: nh, n_kv_head: nkv };
    let q = rand_tensor(&mut r, &[b, t, nh * hd], 1.0);
    let k = rand_tensor(&mut r, &[b, t, nkv * hd], 1.0);
    let v = rand_tensor(&mut r, &[b, t, nkv * hd], 1.0);
    let qkv = rope_qkv(&mut Tape::inference(), &q, &k, &v, heads, theta, offset).unwrap();
    let w = (nh + 2 * nkv) * hd;
    assert_eq!(qkv.dims(), &[b, t, w]);
    let (qs, ks, vs, out) = (q.f32s().unwrap(), k.f32s().unwrap(), v.f32s().unwrap(), qkv.f32s().unwrap());
    let h2 = hd / 2;
    let mut worst = 0f64;
    for row in 0..b * t {
        let pos = (offset + row % t) as f64;
        let rot = |x: &[f32], i: usize| -> f64 {
            let f = (theta as f64).powf(-((2 * (i % h2)) as f64) / hd as f64);
            let (c, s) = ((pos * f).cos(), (pos * f).sin());
            if i < h2 {
                x[i] as f64 * c - x[i + h2] as f64 * s
            } else {
                x[i] as f64 * c + x[i - h2] as f64 * s
            }
        };
        for h in 0..nh {
            let x = &qs[row * nh * hd + h * hd..][..hd];
            for i in 0..hd {
                worst = worst.max((out[row * w + h * hd + i] as f64 - rot(x, i)).abs());
            }
        }
        for g in 0..nkv {
            let x = &ks[row * nkv * hd + g * hd..][..hd];
            for i in 0..hd {
                worst = worst.max((out[row * w + nh * hd + g * hd + i] as f64 - rot(x, i)).abs());
            }
        }
        let vr = &out[row * w + (nh + nkv) * hd..(row + 1) * w];
        assert_eq!(vr, &vs[row * nkv * hd..(row + 1) * nkv * hd], "v is copied unrotated");
    }
    // inputs of scale 1: a few f32 roundings of the angle (pos * inv_freq in f32) and products
    assert!(worst < 2e-5, "rope vs f64: {worst:.3e}");
}

#[test]
fn rope_grads() {
    let mut r = rng(52);
    for (b, t, nh, nkv, hd) in [(1, 5, 2, 1, 4), (2, 7, 4, 2, 6), (1, 3, 3, 3, 2)] {
        let heads = Heads { n_head: nh, n_kv_head: nkv };
        let q = rand_tensor(&mut r, &[b, t, nh * hd], 1.0);
        let k = rand_tensor(&mut r, &[b, t, nkv * hd], 1.0);
        let v = rand_tensor(&mut r, &[b, t, nkv * hd], 1.0);
        let label = format!("rope B={b} T={t} nh={nh} nkv={nkv} hd={hd}");
        grad_check(&label, &[q, k, v], &[0, 1, 2], Objective::Probe(7), TOL, 32, |tape, x| {
            rope_qkv(tape, &x[0], &x[1], &x[2], heads, 500_000.0, 2)
        });
    }
}

/// Rows fed later, after `offset` cached positions, are rotated exactly as the same rows of a
/// full pass: what generation with a KV cache relies on.
#[test]
fn rope_offset_continues_the_sequence() {
    let mut r = rng(53);
    let (t, split, nh, hd) = (12, 5, 2, 8);
    let heads = Heads::mha(nh);
    let q = rand_tensor(&mut r, &[1, t, nh * hd], 1.0);
    let full = rope_qkv(&mut Tape::inference(), &q, &q, &q, heads, 10_000.0, 0).unwrap();
    let tail = Tensor::from_f32(q.f32s().unwrap()[split * nh * hd..].to_vec(), [1, t - split, nh * hd]).unwrap();
    let late = rope_qkv(&mut Tape::inference(), &tail, &tail, &tail, heads, 10_000.0, split).unwrap();
    let w = 3 * nh * hd;
    assert_eq!(&full.f32s().unwrap()[split * w..], late.f32s().unwrap());
}

#[test]
fn rope_rejects_bad_shapes() {
    let heads = Heads { n_head: 4, n_kv_head: 2 };
    let z = |d: &[usize]| Tensor::zeros(d);
    for (q, k, what) in [
        (z(&[1, 3, 32]), z(&[1, 3, 8]), "k narrower than n_kv_head heads"),
        (z(&[1, 3, 12]), z(&[1, 3, 6]), "odd head size"),
        (z(&[3, 32]), z(&[3, 16]), "2-D"),
        (z(&[1, 3, 32]), z(&[1, 4, 16]), "T differs"),
    ] {
        let e = rope_qkv(&mut Tape::new(), &q, &k, &k, heads, 1e4, 0);
        assert!(matches!(e, Err(Error::Shape { .. })), "{what}: {e:?}");
    }
    let bad = Heads { n_head: 4, n_kv_head: 3 };
    let e = rope_qkv(&mut Tape::new(), &z(&[1, 3, 32]), &z(&[1, 3, 24]), &z(&[1, 3, 24]), bad, 1e4, 0);
    assert!(matches!(e, Err(Error::Shape { .. })), "3 KV heads for 4 query heads: {e:?}");
}
