//! Rotary position embeddings fused with packing q, k, v: the forward against a direct f64
//! formula (transformers' rotate-half convention), gradients against finite differences, offsets
//! (a row at position p is rotated the same whether it comes first or after p cached rows), and
//! shape errors. Fused with the attention (`rope_attention`): equal to packing then attending, on
//! the CPU and through the CUDA backend, where no packing kernel runs.

mod common;

use common::{grad_check, rand_tensor, rng, Objective, Tol};
use kiln::backend::Heads;
use kiln::ops::attention::attention;
use kiln::ops::rope::{rope_attention, rope_qkv};
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

/// rope_attention (one op, keeping q, k and v) equals attention over rope_qkv's packed rows, in
/// its output and in the gradients of q, k and v, bit for bit: the CPU backend computes it that
/// way, and the op's backward must route each gradient to its input.
#[test]
fn rope_attention_equals_rope_qkv_then_attention() {
    let mut r = rng(54);
    for (b, t, nh, nkv, hd) in [(2, 9, 4, 2, 8), (1, 13, 6, 3, 16)] {
        let heads = Heads { n_head: nh, n_kv_head: nkv };
        let q = rand_tensor(&mut r, &[b, t, nh * hd], 1.0);
        let k = rand_tensor(&mut r, &[b, t, nkv * hd], 1.0);
        let v = rand_tensor(&mut r, &[b, t, nkv * hd], 1.0);
        let dout = rand_tensor(&mut r, &[b, t, nh * hd], 1.0);
        let run = |fused: bool| {
            let mut tape = Tape::new();
            [&q, &k, &v].iter().for_each(|x| tape.watch(x));
            let out = if fused {
                rope_attention(&mut tape, &q, &k, &v, heads, 10_000.0).unwrap()
            } else {
                let qkv = rope_qkv(&mut tape, &q, &k, &v, heads, 10_000.0, 0).unwrap();
                attention(&mut tape, &qkv, heads).unwrap()
            };
            let g = tape.backward_from(&out, dout.clone()).unwrap();
            let grads: Vec<Vec<f32>> =
                [&q, &k, &v].iter().map(|x| g.get(x).unwrap().f32s().unwrap().to_vec()).collect();
            (out.f32s().unwrap().to_vec(), grads)
        };
        let ((o1, g1), (o2, g2)) = (run(false), run(true));
        assert_eq!(o1, o2, "nh={nh} nkv={nkv} hd={hd}: outputs differ");
        for (name, a, b) in [("dq", &g1[0], &g2[0]), ("dk", &g1[1], &g2[1]), ("dv", &g1[2], &g2[2])] {
            assert_eq!(a, b, "nh={nh} nkv={nkv} hd={hd}: {name} differs");
        }
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

/// The CUDA kernels (kernels/rope.cu) and their host twins against the CPU backend; without a GPU
/// they run on the emulated device.
#[cfg(feature = "cuda")]
mod cuda {
    use super::common::dev::{rounded, to_bf, to_f};
    use super::common::{self, rng, uniform, U32};
    use kiln::backend::cpu::rope as cpu;
    use kiln::backend::cuda::rope::{self as gpu, twin};
    use kiln::backend::cuda::{bf16, Cuda, DevBuf};
    use kiln::backend::Heads;

    const U_BF: f64 = 1.0 / 256.0;

    /// (B, T, n_head, n_kv_head, hd, theta, offset): SmolLM2-135M's heads; a group of 2 at an
    /// offset; hd = 6 (hd % 4 != 0: the one-pair path, an odd v width per KV head); hd = 128 MHA;
    /// positions past the first table (256) so that it grows.
    const CASES: [(usize, usize, usize, usize, usize, f32, usize); 5] = [
        (2, 5, 9, 3, 64, 100_000.0, 0),
        (1, 7, 4, 2, 8, 10_000.0, 3),
        (2, 3, 2, 1, 6, 10_000.0, 1),
        (1, 4, 2, 2, 128, 500_000.0, 0),
        (1, 3, 2, 1, 16, 10_000.0, 300),
    ];

    struct Case {
        t: usize,
        hd: usize,
        theta: f32,
        offset: usize,
        heads: Heads,
        /// q, k, v (forward) or dqkv (backward), bf16-valued.
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        g: Vec<f32>,
    }

    fn case(seed: u64, c: (usize, usize, usize, usize, usize, f32, usize)) -> Case {
        let (b, t, nh, nkv, hd, theta, offset) = c;
        let mut r = rng(seed);
        let rows = b * t;
        let heads = Heads { n_head: nh, n_kv_head: nkv };
        Case {
            t,
            hd,
            theta,
            offset,
            heads,
            q: rounded(uniform(&mut r, rows * nh * hd, 1.0)),
            k: rounded(uniform(&mut r, rows * nkv * hd, 1.0)),
            v: rounded(uniform(&mut r, rows * nkv * hd, 1.0)),
            g: rounded(uniform(&mut r, rows * heads.packed() * hd, 1.0)),
        }
    }

    fn cpu_table(c: &Case) -> (Vec<f32>, Vec<f32>) {
        cpu::rope_table(c.t, c.hd, c.theta, c.offset)
    }

    /// The twins rotate with the CPU's table and formulas in the CPU's order: equal bits.
    #[test]
    fn twins_match_cpu_bits() {
        for (i, &shape) in CASES.iter().enumerate() {
            let c = case(10 + i as u64, shape);
            let cs = gpu::host_table(c.hd, c.theta, c.offset + c.t);
            let (cos, sin) = cpu_table(&c);
            let mut want = vec![0f32; c.g.len()];
            cpu::rope_pack(&mut want, &c.q, &c.k, &c.v, c.t, c.hd, c.heads, (&cos, &sin));
            let mut got = vec![f32::NAN; c.g.len()];
            twin::rope_pack(&mut got, &c.q, &c.k, &c.v, &cs, c.t, c.offset, c.hd, c.heads);
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "twin pack, case {i}");
            let mut w = [vec![0f32; c.q.len()], vec![0f32; c.k.len()], vec![0f32; c.v.len()]];
            let [w0, w1, w2] = &mut w;
            cpu::rope_unpack(w0, w1, w2, &c.g, c.t, c.hd, c.heads, (&cos, &sin));
            let mut gt = [vec![f32::NAN; c.q.len()], vec![f32::NAN; c.k.len()], vec![f32::NAN; c.v.len()]];
            let [g0, g1, g2] = &mut gt;
            twin::rope_unpack(g0, g1, g2, &c.g, &cs, c.t, c.offset, c.hd, c.heads);
            for (part, (a, b)) in gt.iter().zip(&w).enumerate() {
                assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "twin unpack part {part}, case {i}");
            }
        }
    }

    /// Each rotated element a c -+ b s may be fused into one multiply-add on the device (its
    /// error moves by 2 u (|a c| + |b s|)), then rounds to bf16 (u_bf of the value); copied
    /// elements equal the input bit for bit. `pairs` gives, per output element, |a c| + |b s|
    /// (0 for a copy).
    fn check(label: &str, got: &[f32], want: &[f32], scale: &[f64]) {
        for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
            let f = 2.0 * U32 * s;
            let bound = f + U_BF * (w.abs() as f64 + f);
            assert!((g as f64 - w as f64).abs() <= bound, "{label}: element {i}: {g} vs cpu {w} (bound {bound:.2e})");
        }
    }

    /// Per element of one rotated head run x (rows of heads of hd), |a c| + |b s| of its formula.
    fn scales(x: &[f32], hd: usize, t: usize, row_width: usize, cos: &[f32], sin: &[f32]) -> Vec<f64> {
        let h2 = hd / 2;
        (0..x.len())
            .map(|j| {
                let (row, col) = (j / row_width, j % row_width);
                let (base, i) = (j - col % hd, col % hd % h2);
                let p = row % t;
                let (c, s) = (cos[p * h2 + i] as f64, sin[p * h2 + i] as f64);
                let (a, b) = (x[base + i] as f64, x[base + i + h2] as f64);
                (a * c).abs() + (b * s).abs() + (b * c).abs() + (a * s).abs()
            })
            .collect()
    }

    fn up(cu: &Cuda, v: &[f32]) -> DevBuf<bf16> {
        cu.upload(&to_bf(v)).unwrap()
    }

    /// The emulator counts launches for the whole process: tests that launch rope kernels hold
    /// this while they run, so that one test's launch list holds only its own kernels.
    static LAUNCHES: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn gpu_pack_and_unpack_match_cpu() {
        let _one = LAUNCHES.lock().unwrap_or_else(|e| e.into_inner());
        let Some(cu) = common::gpu("rope gpu_pack_and_unpack_match_cpu") else { return };
        for (i, &shape) in CASES.iter().enumerate() {
            let c = case(20 + i as u64, shape);
            let (cos, sin) = cpu_table(&c);
            let (nh, nkv, hd) = (c.heads.n_head, c.heads.n_kv_head, c.hd);
            let table = gpu::table(hd, c.theta, c.offset + c.t).unwrap();
            assert!(table.positions >= c.offset + c.t);
            let label = format!("case {i} {shape:?}");

            let mut want = vec![0f32; c.g.len()];
            cpu::rope_pack(&mut want, &c.q, &c.k, &c.v, c.t, hd, c.heads, (&cos, &sin));
            let mut qkv = cu.upload(&vec![bf16::NAN; c.g.len()]).unwrap();
            gpu::rope_pack(&mut qkv, &up(cu, &c.q), &up(cu, &c.k), &up(cu, &c.v), &table, c.t, c.offset, c.heads)
                .unwrap();
            let got = to_f(&cu.download(&qkv).unwrap());
            // The scale of each packed element: the rotated q, k parts from their inputs, v exact.
            let w = c.heads.packed() * hd;
            let (sq, sk) = (scales(&c.q, hd, c.t, nh * hd, &cos, &sin), scales(&c.k, hd, c.t, nkv * hd, &cos, &sin));
            let scale: Vec<f64> = (0..c.g.len())
                .map(|j| {
                    let (row, col) = (j / w, j % w);
                    if col < nh * hd {
                        sq[row * nh * hd + col]
                    } else if col < (nh + nkv) * hd {
                        sk[row * nkv * hd + col - nh * hd]
                    } else {
                        0.0
                    }
                })
                .collect();
            check(&format!("{label} pack"), &got, &want, &scale);

            let mut w3 = [vec![0f32; c.q.len()], vec![0f32; c.k.len()], vec![0f32; c.v.len()]];
            let [w0, w1, w2] = &mut w3;
            cpu::rope_unpack(w0, w1, w2, &c.g, c.t, hd, c.heads, (&cos, &sin));
            let nan = |n: usize| cu.upload(&vec![bf16::NAN; n]).unwrap();
            let (mut dq, mut dk, mut dv) = (nan(c.q.len()), nan(c.k.len()), nan(c.v.len()));
            gpu::rope_unpack(&mut dq, &mut dk, &mut dv, &up(cu, &c.g), &table, c.t, c.offset, c.heads).unwrap();
            // The gradient's parts as separate runs, for their scales.
            let rows = c.g.len() / w;
            let part = |lo: usize, width: usize| -> Vec<f32> {
                (0..rows).flat_map(|r| c.g[r * w + lo..r * w + lo + width].to_vec()).collect()
            };
            let gq = scales(&part(0, nh * hd), hd, c.t, nh * hd, &cos, &sin);
            let gk = scales(&part(nh * hd, nkv * hd), hd, c.t, nkv * hd, &cos, &sin);
            let gv = vec![0f64; c.v.len()];
            for (name, (buf, (want, scale))) in
                ["dq", "dk", "dv"].iter().zip([&dq, &dk, &dv].into_iter().zip(w3.iter().zip([&gq, &gk, &gv])))
            {
                check(&format!("{label} unpack {name}"), &to_f(&cu.download(buf).unwrap()), want, scale);
            }
        }
    }

    /// The device table holds the CPU's numbers, and a longer request grows it in place of the
    /// shorter one.
    #[test]
    fn gpu_table_is_the_cpu_table_and_grows() {
        let Some(cu) = common::gpu("rope gpu_table_is_the_cpu_table_and_grows") else { return };
        let small = gpu::table(10, 1234.0, 5).unwrap();
        assert_eq!(small.positions, 256);
        assert_eq!(cu.download(&small.cs).unwrap(), gpu::host_table(10, 1234.0, 256));
        let big = gpu::table(10, 1234.0, 700).unwrap();
        assert_eq!(big.positions, 1024);
        let again = gpu::table(10, 1234.0, 3).unwrap();
        assert!(std::sync::Arc::ptr_eq(&big, &again), "a shorter request reuses the grown table");
        let (cos, sin) = cpu::rope_table(1, 10, 1234.0, 999);
        let host = cu.download(&big.cs).unwrap();
        assert_eq!(&host[999 * 10..999 * 10 + 5], &cos[..]);
        assert_eq!(&host[999 * 10 + 5..1000 * 10], &sin[..]);
    }

    /// rope_attention through the tape on the CUDA backend: output and the gradients of q, k and v
    /// against the CPU's within bf16's error (2e-2 of the norm, as tests/backend.rs derives; a
    /// rotation the wrong way is off by O(1)), and the attention kernels rotated on load: no
    /// rope_pack or rope_unpack kernel ran (checked where the device is emulated).
    #[test]
    fn rope_attention_on_the_device_rotates_in_the_attention_kernels() {
        use kiln::ops::attention::attention;
        use kiln::ops::rope::{rope_attention, rope_qkv};
        use kiln::{Device, Tape, Tensor};
        let Some(cu) = common::gpu("rope rope_attention_on_the_device_rotates_in_the_attention_kernels") else {
            return;
        };
        let _one = LAUNCHES.lock().unwrap_or_else(|e| e.into_inner());
        let rel = |a: &Tensor, b: &Tensor| -> f64 {
            let (a, b) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
            let num: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
            (num / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().max(1e-30)).sqrt()
        };
        let (b, t, heads, hd) = (2, 45, Heads { n_head: 6, n_kv_head: 2 }, 16);
        let mut r = rng(55);
        let host: Vec<Tensor> = [heads.n_head, heads.n_kv_head, heads.n_kv_head, heads.n_head]
            .iter()
            .map(|&n| common::rand_tensor(&mut r, &[b, t, n * hd], 1.0))
            .collect();
        let run = |x: &[Tensor], fused: bool| {
            let mut tape = Tape::new();
            x[..3].iter().for_each(|x| tape.watch(x));
            let out = if fused {
                rope_attention(&mut tape, &x[0], &x[1], &x[2], heads, 10_000.0).unwrap()
            } else {
                let qkv = rope_qkv(&mut tape, &x[0], &x[1], &x[2], heads, 10_000.0, 0).unwrap();
                attention(&mut tape, &qkv, heads).unwrap()
            };
            let g = tape.backward_from(&out, x[3].clone()).unwrap();
            let grads: Vec<Tensor> = x[..3].iter().map(|x| g.get(x).unwrap().clone()).collect();
            (out, grads)
        };
        let (want, want_g) = run(&host, false);
        let to_dev = |x: &Tensor| {
            let x = x.to_device(Device::Cuda(0)).unwrap();
            kiln::ops::elementwise::to_compute_dtype(&mut Tape::inference(), &x).unwrap()
        };
        let dev: Vec<Tensor> = host.iter().map(to_dev).collect();
        if let Some(e) = cu.emulator() {
            e.take_stats();
        }
        let (got, got_g) = run(&dev, true);
        let e = rel(&got, &want);
        assert!(e < 2e-2, "output off by {e:.2e}");
        for (name, g, w) in
            [("dq", &got_g[0], &want_g[0]), ("dk", &got_g[1], &want_g[1]), ("dv", &got_g[2], &want_g[2])]
        {
            assert_eq!(g.device(), Device::Cuda(0));
            let e = rel(g, w);
            println!("rope_attention on the device: {name} off by {e:.2e}");
            assert!(e < 2e-2, "{name} off by {e:.2e}");
        }
        if let Some(e) = cu.emulator() {
            let ran: Vec<&str> = e.take_stats().iter().map(|(k, _, _)| k.name()).collect();
            assert!(ran.iter().any(|k| k.starts_with("attention_forward")), "no attention forward ran: {ran:?}");
            for k in ["attention_backward_dq", "attention_backward_dkdv"] {
                assert!(ran.contains(&k), "{k} did not run: {ran:?}");
            }
            assert!(!ran.iter().any(|k| k.starts_with("rope_")), "a packing kernel ran: {ran:?}");
        }
        // Rows starting at another position: the fused kernels rotate from position 0, so the
        // backend packs first there; the same output and gradients as the CPU's.
        let args = kiln::backend::RopeArgs { heads, theta: 10_000.0, offset: 5 };
        let (cpu, gpu) =
            (kiln::backend::backend(Device::Cpu).unwrap(), kiln::backend::backend(Device::Cuda(0)).unwrap());
        let (want, want_lse) = cpu.rope_attention(&host[0], &host[1], &host[2], &args).unwrap();
        let (got, got_lse) = gpu.rope_attention(&dev[0], &dev[1], &dev[2], &args).unwrap();
        assert!(rel(&got, &want) < 2e-2, "offset 5: output off by {:.2e}", rel(&got, &want));
        let want_g =
            cpu.rope_attention_backward(&host[3], &host[0], &host[1], &host[2], &want, &want_lse, &args).unwrap();
        let got_g = gpu.rope_attention_backward(&dev[3], &dev[0], &dev[1], &dev[2], &got, &got_lse, &args).unwrap();
        for (i, (g, w)) in got_g.iter().zip(&want_g).enumerate() {
            assert!(rel(g, w) < 2e-2, "offset 5: gradient {i} off by {:.2e}", rel(g, w));
        }
    }
}
