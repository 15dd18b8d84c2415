//! AdamW8bit against bitsandbytes' AdamW8bit on the CPU (oracle fixture adam8bit.safetensors:
//! a 4096-element parameter, three gradients, bitsandbytes' parameter, codes and absmax after
//! each step; lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.01), the optimizer struct's
//! wiring and checkpoint round trip on a tiny GPT-2, and 100 steps against fp32 AdamW.

mod common;

use kiln::io::checkpoint::load_all;
use kiln::model::{Gpt2Config, Mode, Model};
use kiln::optim::adamw::{adamw_step, AdamWConfig, AdamWScalars};
use kiln::optim::adamw8bit::{adamw8bit_step, adamw8bit_update, AdamW8bit, Maps8bit, MIN_8BIT_SIZE};
use kiln::quant::blockwise::{dynamic_map, num_blocks};
use kiln::{Gradients, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

const CFG: AdamWConfig = AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };

fn count_ne<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

fn bits_ne(a: &[f32], b: &[f32]) -> usize {
    count_ne(&a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), &b.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
}

#[test]
fn three_steps_match_bitsandbytes() {
    let f = load_all(&common::repo_file("tests/fixtures/oracle/dev-set/adam8bit.safetensors")).unwrap();
    let n = f["adam.p0"].numel();
    let nb = num_blocks(n, 256);
    let mut p = f["adam.p0"].f32s().unwrap().to_vec();
    let grads = f["adam.grads"].f32s().unwrap();
    let maps = Maps8bit::default();
    assert_eq!(bits_ne(maps.m.map(), f["adam.bnb8bit.qmap1"].f32s().unwrap()), 0);
    assert_eq!(bits_ne(maps.v.map(), f["adam.bnb8bit.qmap2"].f32s().unwrap()), 0);
    let (mut s1, mut a1, mut s2, mut a2) = (vec![0u8; n], vec![0f32; nb], vec![0u8; n], vec![0f32; nb]);
    let max_abs = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
    for s in 0..3 {
        let sc = AdamWScalars::new(&CFG, CFG.lr, s as u64 + 1, true);
        adamw8bit_step(&mut p, &grads[s * n..(s + 1) * n], &mut s1, &mut a1, &mut s2, &mut a2, &maps, &sc);
        let (r, rb) = (s * n..(s + 1) * n, s * nb..(s + 1) * nb);
        let want_p = &f["adam.bnb8bit.params"].f32s().unwrap()[r.clone()];
        let diff: Vec<f32> = p.iter().zip(want_p).map(|(a, b)| a - b).collect();
        let rel = max_abs(&diff) / max_abs(want_p);
        let (c1, c2) = (
            count_ne(&s1, &f["adam.bnb8bit.state1"].u8s().unwrap()[r.clone()]),
            count_ne(&s2, &f["adam.bnb8bit.state2"].u8s().unwrap()[r.clone()]),
        );
        let (d1, d2) = (
            bits_ne(&a1, &f["adam.bnb8bit.absmax1"].f32s().unwrap()[rb.clone()]),
            bits_ne(&a2, &f["adam.bnb8bit.absmax2"].f32s().unwrap()[rb.clone()]),
        );
        println!(
            "step {}: params max rel err {rel:.1e} ({} of {n} not bit-equal), code mismatches m {c1} v {c2}, \
             absmax mismatches m {d1} v {d2}",
            s + 1,
            bits_ne(&p, want_p)
        );
        assert!(rel < 1e-6, "step {}: params rel err {rel}", s + 1);
        assert_eq!((c1, c2), (0, 0), "step {}: codes differ from bitsandbytes'", s + 1);
        assert_eq!((d1, d2), (0, 0), "step {}: absmax differs from bitsandbytes'", s + 1);
    }
    // the step moved the parameters visibly, so the 1e-6 bound has teeth
    assert!(max_abs(&p.iter().zip(f["adam.p0"].f32s().unwrap()).map(|(a, b)| a - b).collect::<Vec<_>>()) > 1e-3);
}

/// A tiny GPT-2 with `wpe` frozen, and gradients of one batch.
fn tiny_model_and_grads() -> (Model, Gradients) {
    let mut model = Model::new_random(Gpt2Config::preset("tiny").unwrap(), 3).unwrap();
    model.params.get_mut("transformer.wpe.weight").unwrap().trainable = false;
    let ids = kiln::bench::random_tokens(model.config.vocab_size(), 2, 8, 0).unwrap();
    let targets = kiln::data::batch::Batch { input_ids: ids.clone(), labels: None }.targets().unwrap();
    let mut tape = kiln::Tape::new();
    let loss = model.forward(&mut tape, &ids, Some(&targets), Mode::Eval).unwrap().loss.unwrap();
    let grads = tape.backward(&loss).unwrap();
    (model, grads)
}

#[test]
fn model_step_equals_the_buffer_function_with_decay_on_matrices_only() {
    let (mut model, grads) = tiny_model_and_grads();
    let cfg = AdamWConfig { weight_decay: 0.5, ..CFG };
    let before = model.clone();
    let mut opt = AdamW8bit::new(cfg);
    for _ in 0..2 {
        opt.step(&mut model.params, &grads, 1e-3).unwrap();
    }
    assert_eq!(opt.steps(), 2);
    let maps = Maps8bit::default();
    let (mut n8, mut n32, mut expect_bytes) = (0, 0, 0);
    for (p0, p) in before.params.iter().zip(model.params.iter()) {
        let got = p.tensor.f32s().unwrap();
        if !p0.trainable {
            assert_eq!(got, p0.tensor.f32s().unwrap(), "{}: a frozen parameter moved", p.name);
            continue;
        }
        // the same two steps by hand, through the per-buffer functions
        let g = grads.get(&p0.tensor).expect("every trainable parameter has a gradient").f32s().unwrap();
        let mut w = p0.tensor.f32s().unwrap().to_vec();
        let n = w.len();
        let decay = p.tensor.dims().len() >= 2;
        if n >= MIN_8BIT_SIZE {
            let nb = num_blocks(n, 256);
            let (mut s1, mut a1, mut s2, mut a2) = (vec![0u8; n], vec![0f32; nb], vec![0u8; n], vec![0f32; nb]);
            for t in 1..=2 {
                let sc = AdamWScalars::new(&cfg, 1e-3, t, decay);
                adamw8bit_step(&mut w, g, &mut s1, &mut a1, &mut s2, &mut a2, &maps, &sc);
            }
            n8 += n;
            expect_bytes += 2 * n + 8 * nb;
        } else {
            let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
            for t in 1..=2 {
                let sc = AdamWScalars::new(&cfg, 1e-3, t, decay);
                for i in 0..n {
                    adamw8bit_update(&mut w[i], &mut m[i], &mut v[i], g[i], &sc);
                }
            }
            n32 += n;
            expect_bytes += 8 * n;
        }
        assert_eq!(bits_ne(got, &w), 0, "{}: the optimizer and the buffer function disagree", p.name);
    }
    assert!(n8 > 0 && n32 > 0, "the tiny model exercises both paths");
    assert_eq!(opt.state_bytes(), expect_bytes);
    let fp32_bytes = 8 * model.params.trainable_numel();
    println!(
        "state: {} bytes for {n8} 8-bit + {n32} f32-moment scalars = {:.3} bytes per scalar, {:.1}% of AdamW's {fp32_bytes}",
        opt.state_bytes(),
        opt.state_bytes() as f64 / (n8 + n32) as f64,
        100.0 * opt.state_bytes() as f64 / fp32_bytes as f64
    );
    // 2 bytes per 8-bit scalar plus 8 per 256; the few small vectors keep 8 bytes each
    assert!(opt.state_bytes() as f64 <= (2.0 + 8.0 / 256.0) * n8 as f64 + 8.0 * n32 as f64);
    assert!((opt.state_bytes() as f64) < 0.3 * fp32_bytes as f64);
}

#[test]
fn state_round_trip_resumes_bit_for_bit() {
    let (mut model, grads) = tiny_model_and_grads();
    let mut opt = AdamW8bit::new(CFG);
    for _ in 0..2 {
        opt.step(&mut model.params, &grads, 1e-3).unwrap();
    }
    let saved: BTreeMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
    let w = "transformer.h.0.attn.c_attn.weight";
    assert_eq!(saved[&format!("state1.{w}")].dtype(), kiln::DType::U8);
    assert!(saved.contains_key("exp_avg.transformer.h.0.attn.c_attn.bias"));
    let mut resumed = AdamW8bit::new(CFG);
    resumed.load_state(&saved, opt.steps(), &model.params).unwrap();
    assert_eq!((resumed.steps(), resumed.state_bytes()), (opt.steps(), opt.state_bytes()));
    let mut model2 = model.clone();
    opt.step(&mut model.params, &grads, 1e-3).unwrap();
    resumed.step(&mut model2.params, &grads, 1e-3).unwrap();
    for (a, b) in model.params.iter().zip(model2.params.iter()) {
        assert_eq!(bits_ne(a.tensor.f32s().unwrap(), b.tensor.f32s().unwrap()), 0, "{}", a.name);
    }

    // the same step over the parameters split into two stores (a base model and an adapter)
    let (mut first, mut second) = (kiln::nn::ParamStore::new(), kiln::nn::ParamStore::new());
    for (i, p) in model2.params.iter().enumerate() {
        let store = if i % 2 == 0 { &mut first } else { &mut second };
        store.insert(p.name.clone(), p.tensor.clone());
        store.get_mut(&p.name).unwrap().trainable = p.trainable;
    }
    let mut split = AdamW8bit::new(CFG);
    split.load_state_all(&opt.state_tensors().unwrap().into_iter().collect(), opt.steps(), &[&first, &second]).unwrap();
    opt.step(&mut model.params, &grads, 1e-3).unwrap();
    split.step_all(&mut [&mut first, &mut second], &grads, 1e-3).unwrap();
    assert_eq!(split.steps(), opt.steps());
    for p in model.params.iter() {
        let q = first.get(&p.name).or_else(|_| second.get(&p.name)).unwrap();
        assert_eq!(bits_ne(p.tensor.f32s().unwrap(), q.f32s().unwrap()), 0, "{}: step_all differs", p.name);
    }

    // fp32 AdamW state loads too (quantized for the large parameters)
    let mut fp32 = kiln::optim::AdamW::new(CFG);
    fp32.step(&mut model.params, &grads, 1e-3).unwrap();
    let fp32_state: BTreeMap<String, Tensor> = fp32.state_tensors().unwrap().into_iter().collect();
    let mut from_fp32 = AdamW8bit::new(CFG);
    from_fp32.load_state(&fp32_state, 1, &model.params).unwrap();
    assert_eq!(from_fp32.state_bytes(), opt.state_bytes());

    // a state that does not fit the parameter is refused, naming it
    let mut bad = saved.clone();
    bad.insert(format!("state2.{w}"), Tensor::from_u8(vec![0; 10], [10]).unwrap());
    let err = AdamW8bit::new(CFG).load_state(&bad, 2, &model.params).unwrap_err().to_string();
    assert!(err.contains(w) && err.contains("another model"), "{err}");
    // so is one of the right size in the wrong dtype (codes as f32), when it is loaded
    let mut bad = saved.clone();
    let n = saved[&format!("state1.{w}")].numel();
    bad.insert(format!("state1.{w}"), Tensor::zeros([n]));
    let err = AdamW8bit::new(CFG).load_state(&bad, 2, &model.params).unwrap_err().to_string();
    assert!(err.contains(&format!("state1.{w}")) && err.contains("U8"), "{err}");
}

/// A plain 8-bit AdamW for comparison: f64 arithmetic, each moment rounded to the exactly
/// nearest map entry of its block (no lookup table, no f32), the same algorithm otherwise.
struct Plain8bit {
    m: Vec<f64>,
    v: Vec<f64>,
    map_m: Vec<f64>,
    map_v: Vec<f64>,
}

impl Plain8bit {
    fn new(n: usize) -> Self {
        let f = |s| dynamic_map(s).into_iter().map(|x| x as f64).collect();
        Plain8bit { m: vec![0.0; n], v: vec![0.0; n], map_m: f(true), map_v: f(false) }
    }

    fn round(x: &mut [f64], map: &[f64]) {
        for blk in x.chunks_mut(256) {
            let a = blk.iter().fold(0f64, |m, v| m.max(v.abs()));
            if a == 0.0 {
                continue;
            }
            for v in blk.iter_mut() {
                let s = *v / a;
                let k = map.partition_point(|&c| c < s).min(map.len() - 1);
                let best = if k > 0 && (s - map[k - 1]).abs() <= (map[k] - s).abs() { k - 1 } else { k };
                *v = map[best] * a;
            }
        }
    }

    fn step(&mut self, p: &mut [f64], g: &[f64], cfg: &AdamWConfig, t: i32) {
        for i in 0..p.len() {
            self.m[i] = cfg.beta1 * self.m[i] + (1.0 - cfg.beta1) * g[i];
            self.v[i] = cfg.beta2 * self.v[i] + (1.0 - cfg.beta2) * g[i] * g[i];
            let denom = self.v[i].sqrt() / (1.0 - cfg.beta2.powi(t)).sqrt() + cfg.eps;
            p[i] -= cfg.lr / (1.0 - cfg.beta1.powi(t)) * self.m[i] / denom;
        }
        Self::round(&mut self.m, &self.map_m);
        Self::round(&mut self.v, &self.map_v);
    }
}

/// 100 steps on f(p) = sum_i h_i (p_i - t_i)^2 / 2 (8192 parameters, 32 blocks), from p = 0,
/// lr 1e-3, against fp32 AdamW (kiln's, torch's arithmetic).
///
/// What 8 bits cost. Each step requantizes m and v; an element's error is at most half the map
/// gap around it times its block's absmax A (plus one table step, 3e-5 A). In the top decade
/// of the maps (|x| >= A/10) that is 0.9/128 = 1/142 of A for m (signed map) and 1/284 for v
/// (unsigned: twice the levels). Here h_i is in [0.8, 1.2] and |t_i| in [0.6, 1], and in 100
/// steps of at most ~lr each p moves by <= 0.1, so |g_i| = h_i |p_i - t_i| lies in [0.4, 1.2]:
/// every m is within rho = 3 of its block's largest and every v within rho^2 = 9, all in the
/// top decade. One rounding is then at most rho/142 = 2.1% of m and rho^2/284 = 3.2% of v. m
/// keeps a rounding error alive for about 1/(1-b1) = 10 steps (an element whose per-step change
/// is under half a gap sticks at its code), so its error is at most 10 roundings, 21%; v's
/// elements keep their ratios within a block over these steps (v grows like (1-b2^t) g^2 with
/// g nearly constant), so its error stays one rounding, 3.2%, which sqrt halves. The update
/// m/sqrt(v) is therefore off by at most ~23% of itself, and |m/sqrt(v)| (bias-corrected) is at
/// most the ratio of the largest to the smallest |g_i| seen, (0.4 + 0.12)/0.4 = 1.3, so after T
/// steps |p8 - p32| <= T lr 1.3 * 0.23 = 0.03. That bound is a worst case; the sharp check is
/// the flash-attention rule (STYLE.md): kiln's error against fp32 must stay within 2x that of
/// the plain 8-bit implementation above, which rounds to the exactly nearest code in f64. Each
/// step also checks the one-rounding bound (1/142 + a table step) directly.
#[test]
fn hundred_steps_stay_near_fp32_adamw() {
    let (n, steps) = (8192, 100);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let h: Vec<f32> = (0..n).map(|_| 0.8 + 0.4 * rng.random::<f32>()).collect();
    let t: Vec<f32> = (0..n)
        .map(|_| {
            let a = 0.6 + 0.4 * rng.random::<f32>();
            if rng.random::<bool>() {
                a
            } else {
                -a
            }
        })
        .collect();
    let cfg = AdamWConfig { weight_decay: 0.0, ..CFG };
    let grad = |p: &[f32]| -> Vec<f32> { (0..n).map(|i| h[i] * (p[i] - t[i])).collect() };
    let maps = Maps8bit::default();
    let nb = num_blocks(n, 256);
    let (mut p8, mut p32, mut pp) = (vec![0f32; n], vec![0f32; n], vec![0f64; n]);
    let (mut s1, mut a1, mut s2, mut a2) = (vec![0u8; n], vec![0f32; nb], vec![0u8; n], vec![0f32; nb]);
    let (mut m32, mut v32) = (vec![0f32; n], vec![0f32; n]);
    let mut plain = Plain8bit::new(n);
    let deq = |codes: &[u8], absmax: &[f32], map: &[f32]| -> Vec<f64> {
        (0..n).map(|i| map[codes[i] as usize] as f64 * absmax[i / 256] as f64).collect()
    };
    let one_rounding = 0.9 / 128.0 + 2.0 / 65535.0;
    let mut worst_rounding = 0f64;
    for step in 1..=steps {
        let g8 = grad(&p8);
        let (m_prev, v_prev) = (deq(&s1, &a1, maps.m.map()), deq(&s2, &a2, maps.v.map()));
        adamw8bit_step(
            &mut p8,
            &g8,
            &mut s1,
            &mut a1,
            &mut s2,
            &mut a2,
            &maps,
            &AdamWScalars::new(&cfg, cfg.lr, step, false),
        );
        let (m_new, v_new) = (deq(&s1, &a1, maps.m.map()), deq(&s2, &a2, maps.v.map()));
        for i in 0..n {
            let gi = g8[i] as f64;
            let m_exact = cfg.beta1 * m_prev[i] + (1.0 - cfg.beta1) * gi;
            let v_exact = cfg.beta2 * v_prev[i] + (1.0 - cfg.beta2) * gi * gi;
            let (am, av) = (a1[i / 256] as f64, a2[i / 256] as f64);
            let (em, ev) = ((m_new[i] - m_exact).abs() / am, (v_new[i] - v_exact).abs() / av);
            worst_rounding = worst_rounding.max(em).max(ev);
            assert!(em <= one_rounding + 1e-6 && ev <= one_rounding + 1e-6, "step {step}, element {i}: {em} {ev}");
        }
        let g32 = grad(&p32);
        adamw_step(&mut p32, &mut m32, &mut v32, &g32, &cfg, cfg.lr, step, false);
        let gp: Vec<f64> = (0..n).map(|i| h[i] as f64 * (pp[i] - t[i] as f64)).collect();
        plain.step(&mut pp, &gp, &cfg, step as i32);
    }
    let max_diff = |a: &dyn Fn(usize) -> f64| (0..n).map(a).fold(0f64, f64::max);
    let err_kiln = max_diff(&|i| (p8[i] as f64 - p32[i] as f64).abs());
    let err_plain = max_diff(&|i| (pp[i] - p32[i] as f64).abs());
    let moved = max_diff(&|i| (p32[i] as f64).abs());
    let rho: f64 = 1.2 / 0.4;
    let bound = steps as f64 * cfg.lr * 1.3 * (10.0 * rho / 142.0 + rho * rho / 284.0 / 2.0);
    println!(
        "after {steps} steps: max|p8 - p32| = {err_kiln:.2e} (plain 8-bit: {err_plain:.2e}), worst-case bound {bound:.2e}, \
         parameters moved up to {moved:.2e}; worst single rounding {worst_rounding:.5} of the block absmax (bound {one_rounding:.5})"
    );
    assert!(moved > 3.0 * bound, "the problem must move the parameters well past the tolerance");
    assert!(err_kiln <= bound, "8-bit AdamW drifted {err_kiln:e} from fp32 AdamW, over the bound {bound:e}");
    assert!(err_kiln <= 2.0 * err_plain, "kiln's 8-bit error {err_kiln:e} is over twice a plain 8-bit's {err_plain:e}");
}

/// The 8-bit AdamW kernel (kernels/adamw8bit.cu): its host twin and the kernel on the device,
/// against the CPU step, bit for bit, over tensors of awkward sizes on both sides of
/// MIN_8BIT_SIZE (f32 moments below it), 3 steps, decay mixed, with an all-zero block.
#[cfg(feature = "cuda")]
mod cuda {
    use super::common::{self, rng, uniform};
    use super::{adamw8bit_step, adamw8bit_update, bits_ne, count_ne, Maps8bit, CFG, MIN_8BIT_SIZE};
    use kiln::abi::{Adam8Tensor, AdamWScalars};
    use kiln::backend::cuda::adamw8bit::{adamw8bit_step_multi, plan, twin, Adam8Moments, Adam8Param};
    use kiln::quant::blockwise::num_blocks;

    const SIZES: [usize; 8] = [1, 255, 0, 257, 4096, 3 * 4096 + 77, 70_001, 300];

    /// Codes and absmax of m, then of v.
    type Q8 = (Vec<u8>, Vec<f32>, Vec<u8>, Vec<f32>);

    /// A parameter's weights and moments as the CPU keeps them.
    #[derive(Clone)]
    struct Host {
        p: Vec<f32>,
        /// (m, v) for f32 moments, or (codes1, absmax1, codes2, absmax2) for 8-bit ones.
        f32m: Option<(Vec<f32>, Vec<f32>)>,
        q8: Option<Q8>,
    }

    fn fresh(i: usize, n: usize) -> Host {
        let p = uniform(&mut rng(500 + i as u64), n, 1.0);
        if n < MIN_8BIT_SIZE {
            Host { p, f32m: Some((vec![0.0; n], vec![0.0; n])), q8: None }
        } else {
            let nb = num_blocks(n, 256);
            Host { p, f32m: None, q8: Some((vec![0; n], vec![0.0; nb], vec![0; n], vec![0.0; nb])) }
        }
    }

    /// Step t's gradient of tensor i: uniform, with its first block all zero at step 1 (so that
    /// block's moments stay zero: codes 0, absmax 0) and a few large and tiny values.
    fn grad(t: u64, i: usize, n: usize) -> Vec<f32> {
        let mut g = uniform(&mut rng(1000 * t + i as u64), n, 1.0);
        if t == 1 {
            g.iter_mut().take(256).for_each(|x| *x = 0.0);
        }
        for (k, x) in g.iter_mut().enumerate() {
            match k % 97 {
                3 => *x *= 1e4,
                5 => *x *= 1e-6,
                _ => {}
            }
        }
        g
    }

    fn cpu_step(h: &mut Host, g: &[f32], s: &AdamWScalars, maps: &Maps8bit) {
        if let Some((m, v)) = &mut h.f32m {
            for i in 0..g.len() {
                adamw8bit_update(&mut h.p[i], &mut m[i], &mut v[i], g[i], s);
            }
        }
        if let Some((c1, a1, c2, a2)) = &mut h.q8 {
            adamw8bit_step(&mut h.p, g, c1, a1, c2, a2, maps, s);
        }
    }

    fn assert_same(label: &str, got: &Host, want: &Host) {
        assert_eq!(bits_ne(&got.p, &want.p), 0, "{label}: p");
        if let (Some((gm, gv)), Some((wm, wv))) = (&got.f32m, &want.f32m) {
            assert_eq!(bits_ne(gm, wm) + bits_ne(gv, wv), 0, "{label}: f32 moments");
        }
        if let (Some((g1, ga1, g2, ga2)), Some((w1, wa1, w2, wa2))) = (&got.q8, &want.q8) {
            assert_eq!(count_ne(g1, w1), 0, "{label}: codes of m");
            assert_eq!(count_ne(g2, w2), 0, "{label}: codes of v");
            assert_eq!(bits_ne(ga1, wa1) + bits_ne(ga2, wa2), 0, "{label}: absmax");
        }
    }

    /// The kernel finds a code by binary search over the map's midpoints instead of CodeLut's
    /// 65536-entry table: every grid point of both maps gets the table's code.
    #[test]
    fn the_midpoint_search_equals_the_cpus_table_at_every_grid_point() {
        let maps = Maps8bit::default();
        for (signed, lut) in [(true, maps.m.lut()), (false, maps.v.lut())] {
            let off = (0..65536u32).filter(|&q| twin::grid_code(q, signed) != lut[q as usize]).count();
            assert_eq!(off, 0, "signed map {signed}: {off} grid points get another code");
        }
    }

    #[test]
    fn plan_counts_blocks() {
        let mut d: Vec<Adam8Tensor> =
            [256i64, 0, 1, 257, 4096].iter().map(|&n| Adam8Tensor { n, ..Default::default() }).collect();
        assert_eq!(plan(&mut d), 20, "1 + 0 + 1 + 2 + 16 blocks");
        assert_eq!(d.iter().map(|x| x.block_start).collect::<Vec<_>>(), [0, 1, 1, 2, 4]);
    }

    /// kiln_host_adamw8bit_step walks every work item and thread the kernel would, over
    /// descriptors pointing at host memory.
    #[test]
    fn twin_three_steps_match_the_cpu_bit_for_bit() {
        let maps = Maps8bit::default();
        let mut twin_state: Vec<Host> = SIZES.iter().enumerate().map(|(i, &n)| fresh(i, n)).collect();
        let mut cpu_state = twin_state.clone();
        for t in 1..=3u64 {
            let lr = 1e-3 / t as f64;
            let grads: Vec<Vec<f32>> = SIZES.iter().enumerate().map(|(i, &n)| grad(t, i, n)).collect();
            let mut descs: Vec<Adam8Tensor> = twin_state
                .iter_mut()
                .zip(&grads)
                .enumerate()
                .map(|(i, (h, g))| {
                    let (s1, s2, a1, a2) = match (&mut h.f32m, &mut h.q8) {
                        (Some((m, v)), _) => (m.as_mut_ptr() as u64, v.as_mut_ptr() as u64, 0, 0),
                        (_, Some((c1, a1, c2, a2))) => (
                            c1.as_mut_ptr() as u64,
                            c2.as_mut_ptr() as u64,
                            a1.as_mut_ptr() as u64,
                            a2.as_mut_ptr() as u64,
                        ),
                        _ => unreachable!(),
                    };
                    Adam8Tensor {
                        p: h.p.as_mut_ptr() as u64,
                        g: g.as_ptr() as u64,
                        state1: s1,
                        state2: s2,
                        absmax1: a1,
                        absmax2: a2,
                        n: h.p.len() as i64,
                        block_start: -1,
                        decay: (i % 3 != 1) as i32,
                        reserved: 0,
                    }
                })
                .collect();
            let work_items = plan(&mut descs);
            // SAFETY: every descriptor points at live host vectors of its lengths, and work_items is plan's count for them.
            unsafe { twin::adamw8bit_step(&descs, work_items, AdamWScalars::new(&CFG, lr, t, true)) };
            for (i, (h, g)) in cpu_state.iter_mut().zip(&grads).enumerate() {
                cpu_step(h, g, &AdamWScalars::new(&CFG, lr, t, i % 3 != 1), &maps);
                assert_same(&format!("twin, step {t}, tensor {i} (n = {})", SIZES[i]), &twin_state[i], h);
            }
        }
        let zero_block = &cpu_state[4].q8.as_ref().unwrap().1;
        assert!(zero_block[0] != 0.0, "the all-zero block of step 1 has moments after step 2");
    }

    /// The kernel (on the GPU, or the emulated device with its memcheck) in one launch over all
    /// tensors, 3 steps.
    #[test]
    fn gpu_three_steps_match_the_cpu_bit_for_bit() {
        let Some(cu) = common::gpu("adamw8bit::cuda::gpu_three_steps_match_the_cpu_bit_for_bit") else { return };
        let maps = Maps8bit::default();
        let sizes: Vec<usize> = SIZES.iter().copied().filter(|&n| n > 0).chain([1 << 20 | 3]).collect();
        let mut cpu_state: Vec<Host> = sizes.iter().enumerate().map(|(i, &n)| fresh(i, n)).collect();
        // (p, state1 as f32 or u8, ...): two buffers of each type per tensor, unused ones empty
        struct Dev {
            p: kiln::backend::cuda::DevBuf<f32>,
            m: Option<(kiln::backend::cuda::DevBuf<f32>, kiln::backend::cuda::DevBuf<f32>)>,
            q: Option<[kiln::backend::cuda::DevBuf<u8>; 2]>,
            a: Option<[kiln::backend::cuda::DevBuf<f32>; 2]>,
        }
        let mut dev: Vec<Dev> = cpu_state
            .iter()
            .map(|h| Dev {
                p: cu.upload(&h.p).unwrap(),
                m: h.f32m.as_ref().map(|(m, v)| (cu.upload(m).unwrap(), cu.upload(v).unwrap())),
                q: h.q8.as_ref().map(|(c1, _, c2, _)| [cu.upload(c1).unwrap(), cu.upload(c2).unwrap()]),
                a: h.q8.as_ref().map(|(_, a1, _, a2)| [cu.upload(a1).unwrap(), cu.upload(a2).unwrap()]),
            })
            .collect();
        for t in 1..=3u64 {
            let lr = 1e-3 / t as f64;
            let grads: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &n)| grad(t, i, n)).collect();
            let dg: Vec<_> = grads.iter().map(|g| cu.upload(g).unwrap()).collect();
            let mut params: Vec<Adam8Param> = dev
                .iter_mut()
                .zip(&dg)
                .enumerate()
                .map(|(i, (d, g))| {
                    let moments = match (&mut d.m, &mut d.q, &mut d.a) {
                        (Some((m, v)), _, _) => Adam8Moments::F32 { m, v },
                        (_, Some([c1, c2]), Some([a1, a2])) => {
                            Adam8Moments::Q8 { state1: c1, absmax1: a1, state2: c2, absmax2: a2 }
                        }
                        _ => unreachable!(),
                    };
                    Adam8Param { p: &mut d.p, g, moments, decay: i % 3 != 1 }
                })
                .collect();
            adamw8bit_step_multi(&mut params, &AdamWScalars::new(&CFG, lr, t, true)).unwrap();
            drop(params);
            for (i, (h, g)) in cpu_state.iter_mut().zip(&grads).enumerate() {
                cpu_step(h, g, &AdamWScalars::new(&CFG, lr, t, i % 3 != 1), &maps);
                let d = &dev[i];
                let got = Host {
                    p: cu.download(&d.p).unwrap(),
                    f32m: d.m.as_ref().map(|(m, v)| (cu.download(m).unwrap(), cu.download(v).unwrap())),
                    q8: d.q.as_ref().zip(d.a.as_ref()).map(|([c1, c2], [a1, a2])| {
                        (
                            cu.download(c1).unwrap(),
                            cu.download(a1).unwrap(),
                            cu.download(c2).unwrap(),
                            cu.download(a2).unwrap(),
                        )
                    }),
                };
                assert_same(&format!("device, step {t}, tensor {i} (n = {})", sizes[i]), &got, h);
            }
        }
    }
}
