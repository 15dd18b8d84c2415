//! fp32 AdamW against torch.optim.AdamW: the oracle fixture (adam8bit.safetensors) holds a
//! parameter, three gradients and torch's parameter and moments after each step (lr 1e-3,
//! betas 0.9/0.999, eps 1e-8, weight decay 0.01). Both sides run the same f32 formula; the
//! only difference is operation order inside one update, worth a few ulp of a value ~1, so the
//! bound is 1e-6 relative to the largest magnitude.

mod common;

use common::max_rel_err;
use kiln::io::checkpoint::load_all;
use kiln::optim::adamw::{adamw_step, AdamWConfig};

#[test]
fn three_steps_match_torch_adamw() {
    let f = load_all(&common::repo_file("tests/fixtures/oracle/dev-set/adam8bit.safetensors")).unwrap();
    let n = f["adam.p0"].numel();
    let mut p = f["adam.p0"].f32s().unwrap().to_vec();
    let grads = f["adam.grads"].f32s().unwrap();
    let (want_p, want_m, want_v) = (
        f["adam.torch_fp32.params"].f32s().unwrap(),
        f["adam.torch_fp32.exp_avg"].f32s().unwrap(),
        f["adam.torch_fp32.exp_avg_sq"].f32s().unwrap(),
    );
    let cfg = AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    for s in 0..3 {
        adamw_step(&mut p, &mut m, &mut v, &grads[s * n..(s + 1) * n], &cfg, cfg.lr, s as u64 + 1, true);
        let r = s * n..(s + 1) * n;
        println!(
            "step {}: rel err params {:.1e}, m {:.1e}, v {:.1e}",
            s + 1,
            max_rel_err(&p, &want_p[r.clone()]),
            max_rel_err(&m, &want_m[r.clone()]),
            max_rel_err(&v, &want_v[r.clone()])
        );
        assert!(
            max_rel_err(&p, &want_p[r.clone()]) < 1e-6,
            "step {}: params rel err {}",
            s + 1,
            max_rel_err(&p, &want_p[r.clone()])
        );
        assert!(
            max_rel_err(&m, &want_m[r.clone()]) < 1e-6,
            "step {}: exp_avg rel err {}",
            s + 1,
            max_rel_err(&m, &want_m[r.clone()])
        );
        assert!(
            max_rel_err(&v, &want_v[r.clone()]) < 1e-6,
            "step {}: exp_avg_sq rel err {}",
            s + 1,
            max_rel_err(&v, &want_v[r])
        );
    }
    // the update moved the parameters by a visible amount (so the check has teeth)
    assert!(max_rel_err(&p, f["adam.p0"].f32s().unwrap()) > 1e-4);
}

#[test]
fn model_step_skips_decay_on_vectors_and_frozen_parameters() {
    use kiln::model::{Gpt2Config, Mode, Model};
    let mut model = Model::new_random(Gpt2Config::preset("tiny").unwrap(), 3).unwrap();
    model.params.get_mut("transformer.wpe.weight").unwrap().trainable = false;
    let before = model.clone();
    let ids = kiln::bench::random_tokens(model.config.vocab_size(), 2, 8, 0).unwrap();
    let targets = kiln::data::batch::Batch { input_ids: ids.clone(), labels: None }.targets().unwrap();
    let mut tape = kiln::Tape::new();
    let loss = model.forward(&mut tape, &ids, Some(&targets), Mode::Eval).unwrap().loss.unwrap();
    let grads = tape.backward(&loss).unwrap();
    let mut opt = kiln::optim::AdamW::new(AdamWConfig { weight_decay: 0.5, ..Default::default() });
    opt.step(&mut model.params, &grads, 1e-3).unwrap();
    let changed = |name: &str| {
        before.params.get(name).unwrap().f32s().unwrap() != model.params.get(name).unwrap().f32s().unwrap()
    };
    assert!(!changed("transformer.wpe.weight"), "a frozen parameter moved");
    assert!(changed("transformer.wte.weight"));
    assert!(changed("transformer.h.0.attn.c_attn.bias"));
    // two moments for every trainable scalar, none for the frozen one
    let trainable = model.params.trainable_numel();
    assert_eq!(opt.state_bytes(), 8 * trainable);
}

/// The CUDA AdamW (kernels/adamw.cu) and its host twins against optim::adamw, bit for bit:
/// kernels/adamw.cuh performs torch's f32 operations in the CPU's order with explicitly rounded
/// intrinsics (no FMA contraction on the device; -ffp-contract=off for the host twins), and IEEE
/// f32 +, -, *, / and sqrt are correctly rounded everywhere, so equal inputs give equal bits.
#[cfg(feature = "cuda")]
mod cuda {
    use super::common::{self, rng, uniform};
    use kiln::abi::{AdamWScalars, AdamWTensor};
    use kiln::backend::cuda::adamw::{self as gpu, plan, twin, AdamWParam};
    use kiln::backend::cuda::bf16;
    use kiln::optim::adamw::{adamw_step, adamw_update, AdamWConfig};
    use rand::Rng;

    /// Awkward sizes around the 4096-element chunk: a single element, one short of a chunk, an
    /// empty tensor, one past a chunk, and several chunks plus a ragged tail.
    const SIZES: [usize; 6] = [1, 4095, 0, 4097, 3 * 4096 + 77, 70_001];

    fn assert_bits(label: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{label}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(g.to_bits() == w.to_bits(), "{label}: element {i}: got {g:e}, want {w:e}");
        }
    }

    /// A parameter, moments as after some steps (v >= 0), and a gradient, with some exact zeros
    /// and large values mixed in.
    fn state(seed: u64, n: usize) -> [Vec<f32>; 4] {
        let mut r = rng(seed);
        let p = uniform(&mut r, n, 1.0);
        let m = uniform(&mut r, n, 1e-2);
        let v: Vec<f32> = uniform(&mut r, n, 1e-4).iter().map(|x| x.abs()).collect();
        let mut g = uniform(&mut r, n, 1.0);
        for gi in g.iter_mut() {
            match r.random_range(0..20) {
                0 => *gi = 0.0,
                1 => *gi *= 1e4,
                2 => *gi *= 1e-6,
                _ => {}
            }
        }
        [p, m, v, g]
    }

    #[test]
    fn twin_update_is_bit_exact() {
        let cfg = AdamWConfig::default();
        for (t, lr, decay) in [(1u64, 1e-3, true), (2, 6e-4, false), (10, 3e-4, true), (1000, 1e-5, true)] {
            let s = AdamWScalars::new(&cfg, lr, t, decay);
            let [mut p, mut m, mut v, g] = state(t, 100_003);
            // element 0: everything zero (the denominator is eps alone)
            (p[0], m[0], v[0]) = (0.0, 0.0, 0.0);
            let (mut p2, mut m2, mut v2) = (p.clone(), m.clone(), v.clone());
            twin::adamw_update(&mut p, &mut m, &mut v, &g, &s);
            for i in 0..g.len() {
                adamw_update(&mut p2[i], &mut m2[i], &mut v2[i], g[i], &s);
            }
            let label = format!("t={t} lr={lr} decay={decay}");
            assert_bits(&format!("p {label}"), &p, &p2);
            assert_bits(&format!("m {label}"), &m, &m2);
            assert_bits(&format!("v {label}"), &v, &v2);
        }
    }

    /// The kernel's work split run on the host (kiln_host_adamw_step walks every work item and
    /// thread the kernel would) over descriptors pointing at host memory: 3 steps over tensors of
    /// awkward sizes, decay mixed, bf16 copies on some, against adamw_step per tensor.
    #[test]
    fn twin_multi_tensor_walk_matches_adamw_step() {
        let cfg = AdamWConfig { weight_decay: 0.1, ..Default::default() };
        let mut twin_state: Vec<[Vec<f32>; 4]> =
            SIZES.iter().enumerate().map(|(i, &n)| state(100 + i as u64, n)).collect();
        let mut cpu_state = twin_state.clone();
        let mut copies: Vec<Vec<bf16>> = SIZES.iter().map(|&n| vec![bf16::NAN; n]).collect();
        for t in 1..=3u64 {
            let lr = 1e-3 / t as f64;
            for (i, st) in twin_state.iter_mut().enumerate() {
                st[3] = uniform(&mut rng(1000 * t + i as u64), SIZES[i], 1.0);
            }
            let mut descs: Vec<AdamWTensor> = twin_state
                .iter_mut()
                .zip(copies.iter_mut())
                .enumerate()
                .map(|(i, ([p, m, v, g], c))| AdamWTensor {
                    p: p.as_mut_ptr() as u64,
                    m: m.as_mut_ptr() as u64,
                    v: v.as_mut_ptr() as u64,
                    g: g.as_ptr() as u64,
                    p_bf16: if i % 2 == 0 { c.as_mut_ptr() as u64 } else { 0 },
                    n: p.len() as i64,
                    chunk_start: -1,
                    decay: (i % 3 != 1) as i32,
                    reserved: 0,
                })
                .collect();
            let work_items = plan(&mut descs);
            let s = AdamWScalars::new(&cfg, lr, t, true);
            // SAFETY: every descriptor points at live host vectors of its n elements, and work_items is plan's count for them.
            unsafe { twin::adamw_step(&descs, work_items, s) };
            for (i, ([p, m, v, g], tw)) in cpu_state.iter_mut().zip(&twin_state).enumerate() {
                g.clone_from(&tw[3]);
                adamw_step(p, m, v, g, &cfg, lr, t, i % 3 != 1);
                let label = format!("step {t}, tensor {i} (n = {})", p.len());
                assert_bits(&format!("p {label}"), &tw[0], p);
                assert_bits(&format!("m {label}"), &tw[1], m);
                assert_bits(&format!("v {label}"), &tw[2], v);
                if i % 2 == 0 {
                    let want: Vec<u16> = p.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
                    let got: Vec<u16> = copies[i].iter().map(|x| x.to_bits()).collect();
                    assert!(got == want, "bf16 copy {label}");
                }
            }
        }
    }

    #[test]
    fn plan_counts_chunks() {
        let mut d: Vec<AdamWTensor> =
            [4096i64, 0, 1, 4097, 8192].iter().map(|&n| AdamWTensor { n, ..Default::default() }).collect();
        assert_eq!(plan(&mut d), 6, "1 + 0 + 1 + 2 + 2 chunks");
        let starts: Vec<i64> = d.iter().map(|x| x.chunk_start).collect();
        assert_eq!(starts, [0, 1, 1, 2, 4]);
    }

    /// The kernel: 5 tensors of awkward sizes (one empty among them), 3 steps, decay on some, a
    /// bf16 copy on some, against adamw_step on the CPU, bit for bit; plus the single-buffer
    /// wrapper.
    #[test]
    fn gpu_multi_tensor_three_steps_bit_exact() {
        let Some(cu) = common::gpu("adamw::cuda::gpu_multi_tensor_three_steps_bit_exact") else { return };
        let cfg = AdamWConfig { weight_decay: 0.1, ..Default::default() };
        let sizes = [1usize, 4095, 0, 4097, 3 * 4096 + 77, 1 << 20 | 3];
        let mut cpu_state: Vec<[Vec<f32>; 4]> =
            sizes.iter().enumerate().map(|(i, &n)| state(200 + i as u64, n)).collect();
        let mut dev: Vec<_> = cpu_state
            .iter()
            .map(|[p, m, v, _]| (cu.upload(p).unwrap(), cu.upload(m).unwrap(), cu.upload(v).unwrap()))
            .collect();
        let mut copies: Vec<_> = sizes.iter().map(|&n| cu.upload(&vec![bf16::NAN; n.max(1)]).unwrap()).collect();
        for t in 1..=3u64 {
            let lr = 1e-3 / t as f64;
            for (i, st) in cpu_state.iter_mut().enumerate() {
                st[3] = uniform(&mut rng(2000 * t + i as u64), sizes[i], 1.0);
            }
            let grads: Vec<_> = cpu_state.iter().map(|st| cu.upload(&st[3]).unwrap()).collect();
            let mut params: Vec<AdamWParam> = dev
                .iter_mut()
                .zip(copies.iter_mut())
                .zip(&grads)
                .enumerate()
                .filter(|(i, _)| sizes[*i] > 0) // cu.upload of nothing is a 1-element buffer
                .map(|(i, (((p, m, v), c), g))| AdamWParam {
                    p,
                    m,
                    v,
                    g,
                    p_bf16: if i % 2 == 0 { Some(c) } else { None },
                    decay: i % 3 != 1,
                })
                .collect();
            gpu::adamw_step_multi(&mut params, &AdamWScalars::new(&cfg, lr, t, true)).unwrap();
            drop(params);
            for (i, ([p, m, v, g], (pd, md, vd))) in cpu_state.iter_mut().zip(&dev).enumerate() {
                if sizes[i] == 0 {
                    continue;
                }
                adamw_step(p, m, v, g, &cfg, lr, t, i % 3 != 1);
                let label = format!("step {t}, tensor {i} (n = {})", p.len());
                assert_bits(&format!("p {label}"), &cu.download(pd).unwrap(), p);
                assert_bits(&format!("m {label}"), &cu.download(md).unwrap(), m);
                assert_bits(&format!("v {label}"), &cu.download(vd).unwrap(), v);
                if i % 2 == 0 {
                    let want: Vec<u16> = p.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
                    let got: Vec<u16> = cu.download(&copies[i]).unwrap().iter().map(|x| x.to_bits()).collect();
                    assert!(got == want, "bf16 copy {label}");
                }
            }
        }

        // the single-buffer wrapper, optim::adamw::adamw_step's signature
        let [mut p, mut m, mut v, g] = state(300, 97);
        let (mut pd, mut md, mut vd, gd) =
            (cu.upload(&p).unwrap(), cu.upload(&m).unwrap(), cu.upload(&v).unwrap(), cu.upload(&g).unwrap());
        gpu::adamw_step(&mut pd, &mut md, &mut vd, &gd, &AdamWScalars::new(&cfg, 1e-3, 7, true)).unwrap();
        adamw_step(&mut p, &mut m, &mut v, &g, &cfg, 1e-3, 7, true);
        assert_bits("single p", &cu.download(&pd).unwrap(), &p);
        assert_bits("single m", &cu.download(&md).unwrap(), &m);
        assert_bits("single v", &cu.download(&vd).unwrap(), &v);
    }
}
