//! QLoRA: the `nf4_linear` op against `lora_linear` / `linear` on the dequantized weight (same f32
//! kernels, so forward and every gradient agree to 1e-6 relative, bit for bit in practice), a
//! quantized GPT-2 against the f32 model on its dequantized weights (equal) and on its original
//! weights (close: NF4's 4-bit error), generation on a QLoRA model, the refusal of a layer whose
//! size is not a multiple of the block size, and `kiln finetune --method qlora` end to end
//! (adapter-only training with 8-bit AdamW by default, a lower loss, a PEFT adapter, an exact
//! resume).

mod common;

use common::max_rel_err_t;

use common::sft::{base_model, config, losses, opts};
use common::{poison_pool, rand_tensor, rng};
use kiln::model::lora;
use kiln::model::{Gpt2Config, Mode, Model};
use kiln::nn::lora::LoraConfig;
use kiln::ops::gemm::{linear, WeightLayout};
use kiln::ops::lora::{lora_linear, LoraAdapter};
use kiln::ops::nf4::{nf4_linear, Nf4Lora};
use kiln::ops::xent::cross_entropy;
use kiln::quant::nf4::{Nf4Weight, NF4_BLOCKSIZE};
use kiln::train::{finetune::finetune, Start};
use kiln::{Tape, Tensor};
use std::sync::Arc;
use std::time::Instant;

/// Both sides run the same f32 GEMMs on the same W; only a different summation order could
/// separate them, and there is none, so 1e-6 leaves room without hiding a wrong rule.
const SAME_MATH: f32 = 1e-6;

/// A random weight [k, n] in NF4 and its dequantized f32 twin.
fn nf4_pair(seed: u64, k: usize, n: usize) -> (Arc<Nf4Weight>, Tensor) {
    let w = rand_tensor(&mut rng(seed), &[k, n], 0.5);
    let q = Nf4Weight::quantize(w.f32s().unwrap(), [k, n], NF4_BLOCKSIZE).unwrap();
    let wd = Tensor::from_f32(q.dequantize().unwrap(), [k, n]).unwrap();
    (Arc::new(q), wd)
}

/// Forward and the gradients of x, A, B and bias through a cross-entropy over y's last axis,
/// for the NF4 op and for the f32 op on the dequantized weight.
fn check_against_f32(m: usize, k: usize, n: usize, r: usize, dropout: f32, lora_on: bool) {
    let mut g = rng(7 + k as u64);
    let (q, wd) = nf4_pair(k as u64 * 31 + n as u64, k, n);
    let x = rand_tensor(&mut g, &[1, m, k], 1.0);
    let a = rand_tensor(&mut g, &[r, k], 0.3);
    let b = rand_tensor(&mut g, &[n, r], 0.3);
    let bias = rand_tensor(&mut g, &[n], 0.1);
    let targets = Tensor::from_i32((0..m as i32).map(|i| (i * 7) % n as i32).collect(), [1, m]).unwrap();
    let run = |quantized: bool| -> Vec<Tensor> {
        let mut tape = Tape::new();
        for t in [&x, &a, &b, &bias] {
            tape.watch(t);
        }
        let y = match (quantized, lora_on) {
            (true, true) => {
                let l = Nf4Lora { a: &a, b: &b, scaling: 1.5, dropout_p: dropout, train: true, seed: 9 };
                nf4_linear(&mut tape, &x, &q, Some(&bias), Some(l)).unwrap()
            }
            (true, false) => nf4_linear(&mut tape, &x, &q, Some(&bias), None).unwrap(),
            (false, true) => lora_linear(
                &mut tape,
                &x,
                &wd,
                WeightLayout::InOut,
                Some(&bias),
                &LoraAdapter { a: &a, b: &b, scaling: 1.5, dropout_p: dropout, train: true, seed: 9 },
            )
            .unwrap(),
            (false, false) => linear(&mut tape, &x, &wd, Some(&bias), WeightLayout::InOut, false).unwrap(),
        };
        let loss = cross_entropy(&mut tape, &y, &targets).unwrap();
        let grads = tape.backward(&loss).unwrap();
        let mut out = vec![y, grads.get(&x).unwrap().clone(), grads.get(&bias).unwrap().clone()];
        if lora_on {
            out.push(grads.get(&a).unwrap().clone());
            out.push(grads.get(&b).unwrap().clone());
        }
        out
    };
    let (got, want) = (run(true), run(false));
    for (what, (g, w)) in ["y", "dx", "dbias", "dA", "dB"].iter().zip(got.iter().zip(&want)) {
        let e = max_rel_err_t(g, w);
        assert!(e <= SAME_MATH, "m {m} k {k} n {n} r {r} p {dropout} lora {lora_on}: {what} differs by {e:e}");
    }
}

#[test]
fn nf4_linear_equals_the_f32_ops_on_the_dequantized_weight() {
    // awkward sizes (k n a multiple of 64 but neither k nor n), with and without the adapter and
    // its dropout
    for &(m, k, n, r) in &[(7, 40, 48, 3), (13, 64, 30, 1), (5, 24, 56, 8)] {
        for lora_on in [true, false] {
            check_against_f32(m, k, n, r, 0.0, lora_on);
        }
        check_against_f32(m, k, n, r, 0.2, true);
    }
    // past the pool threshold, over NaN-filled recycled buffers: every element is written
    poison_pool(&[128 * 192, 150 * 192, 150 * 128]);
    check_against_f32(150, 128, 192, 4, 0.1, true);
    check_against_f32(150, 128, 192, 4, 0.0, false);
}

#[test]
fn nf4_linear_saves_the_quantized_weight_and_refuses_bad_shapes() {
    let (q, _) = nf4_pair(1, 64, 32);
    let x = rand_tensor(&mut rng(2), &[3, 64], 1.0);
    let mut tape = Tape::new();
    tape.watch(&x);
    nf4_linear(&mut tape, &x, &q, None, None).unwrap();
    assert_eq!(tape.summary(), ["nf4_linear"]);
    assert_eq!(Arc::strong_count(&q), 2, "the node holds the NF4 weight, not a dequantized copy");
    let bad = rand_tensor(&mut rng(3), &[3, 32], 1.0);
    let e = nf4_linear(&mut Tape::inference(), &bad, &q, None, None).unwrap_err().to_string();
    assert!(e.contains("nf4_linear") && e.contains("64"), "{e}");
    let a = rand_tensor(&mut rng(4), &[2, 63], 1.0);
    let b = rand_tensor(&mut rng(5), &[32, 2], 1.0);
    let l = Nf4Lora { a: &a, b: &b, scaling: 1.0, dropout_p: 0.0, train: false, seed: 0 };
    let e = nf4_linear(&mut Tape::inference(), &x, &q, None, Some(l)).unwrap_err().to_string();
    assert!(e.contains("lora_A"), "{e}");
}

fn tiny(n_embd: usize, n_inner: Option<usize>) -> Gpt2Config {
    let mut c = Gpt2Config::preset("tiny").unwrap();
    c.n_embd = n_embd;
    c.n_layer = 2;
    c.n_head = 4;
    c.n_inner = n_inner;
    c.vocab_size = 96;
    c.n_positions = 32;
    c
}

/// The same model with every Conv1D weight replaced by its NF4 round trip, in f32.
fn dequantized_twin(f32_model: &Model, q: &Model) -> Model {
    let mut twin = f32_model.clone();
    for (name, w) in q.nf4.as_ref().unwrap() {
        let t = Tensor::from_f32(w.dequantize().unwrap(), w.dims).unwrap();
        twin.params.get_mut(name).unwrap().tensor = t;
    }
    twin
}

#[test]
fn a_quantized_gpt2_equals_its_dequantized_twin_and_stays_close_to_f32() {
    let f = Model::new_random(tiny(64, None), 3).unwrap();
    let mut q = f.clone();
    q.quantize_nf4(NF4_BLOCKSIZE).unwrap();
    assert_eq!(q.nf4.as_ref().unwrap().len(), 8);
    assert!(q.params.get("transformer.h.0.attn.c_attn.weight").is_err(), "the f32 copy is dropped");
    assert!(q.params.iter().all(|p| !p.trainable));
    let twin = dequantized_twin(&f, &q);
    let ids = Tensor::from_i32((0..2 * 24).map(|i| i * 37 % 96).collect(), [2, 24]).unwrap();
    let logits = |m: &Model| m.forward(&mut Tape::inference(), &ids, None, Mode::Eval).unwrap().logits.unwrap();
    let (lq, lt, lf) = (logits(&q), logits(&twin), logits(&f));
    assert!(max_rel_err_t(&lq, &lt) <= SAME_MATH, "{:e}", max_rel_err_t(&lq, &lt));
    // The bound is set against the weights' own error: NF4 moves each Conv1D weight by e_w
    // (relative L2, ~0.1 at 4 bits); the logits of a random model move by about as much, and
    // no more than 2 e_w
    let l2 = |v: &mut dyn Iterator<Item = f32>| v.map(|x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let rel = |a: &[f32], b: &[f32]| l2(&mut a.iter().zip(b).map(|(x, y)| x - y)) / l2(&mut b.iter().copied());
    let (mut dw, mut nw) = (0.0, 0.0);
    for name in q.nf4.as_ref().unwrap().keys() {
        let (w, wq) = (f.params.get(name).unwrap().f32s().unwrap(), twin.params.get(name).unwrap().f32s().unwrap());
        dw += l2(&mut w.iter().zip(wq).map(|(x, y)| x - y)).powi(2);
        nw += l2(&mut w.iter().copied()).powi(2);
    }
    let e_w = (dw / nw).sqrt();
    let rel_l2 = rel(lq.f32s().unwrap(), lf.f32s().unwrap());
    println!(
        "NF4 vs f32: weights relative L2 error {e_w:.2e}; logits relative L2 error {rel_l2:.2e}, max-norm {:.2e}",
        max_rel_err_t(&lq, &lf)
    );
    assert!(rel_l2 < 2.0 * e_w, "{rel_l2} vs {e_w}");
    // memory: 4 bytes a Conv1D weight in f32, about 0.52 in NF4
    let conv: usize = lora::block_modules(&f.config).iter().map(|(_, _, i, o)| i * o).sum();
    assert_eq!(q.nf4_numel(), conv);
    let nf4_bytes: usize = lora::block_modules(&f.config)
        .iter()
        .map(|(_, _, i, o)| i * o / 2 + i * o / 64 + 4 * (i * o / 64).div_ceil(256) + 4)
        .sum();
    assert_eq!(q.weight_bytes(), 4 * (f.params.numel() - conv) + nf4_bytes);
    println!("tiny model weights: f32 {} bytes, QLoRA {} bytes", 4 * f.params.numel(), q.weight_bytes());
}

#[test]
fn lora_gradients_on_the_nf4_base_equal_those_on_its_dequantized_twin() {
    let f = Model::new_random(tiny(64, None), 5).unwrap();
    let mut q = f.clone();
    q.quantize_nf4(NF4_BLOCKSIZE).unwrap();
    let mut twin = dequantized_twin(&f, &q);
    let lc = LoraConfig::new(4, 8.0, 0.1, &["all-linear"], false).unwrap();
    lora::attach(&mut q, lc.clone(), 11).unwrap();
    lora::attach(&mut twin, lc, 11).unwrap();
    // B = 0 at the start would hide dA: give both the same non-zero B
    for m in [&mut q, &mut twin] {
        let l = m.lora.as_mut().unwrap();
        let mut g = rng(12);
        for p in l.params.iter_mut().filter(|p| p.name.contains("lora_B")) {
            p.tensor = rand_tensor(&mut g, p.tensor.dims(), 0.05);
        }
    }
    let ids = Tensor::from_i32((0..2 * 16).map(|i| i * 13 % 96).collect(), [2, 16]).unwrap();
    let tgt = Tensor::from_i32((0..2 * 16).map(|i| (i * 13 + 5) % 96).collect(), [2, 16]).unwrap();
    let grads = |m: &Model| {
        let mut tape = Tape::new();
        let out = m.forward(&mut tape, &ids, Some(&tgt), Mode::Train { seed: 4 }).unwrap();
        let loss = out.loss.unwrap();
        let g = tape.backward(&loss).unwrap();
        let l = m.lora.as_ref().unwrap();
        assert_eq!(g.len(), l.params.len(), "only the adapter gets gradients");
        (loss, l.params.iter().map(|p| (p.name.clone(), g.get(&p.tensor).unwrap().clone())).collect::<Vec<_>>())
    };
    let ((lq, gq), (lt, gt)) = (grads(&q), grads(&twin));
    assert!(max_rel_err_t(&lq, &lt) <= SAME_MATH);
    for ((name, a), (_, b)) in gq.iter().zip(&gt) {
        assert!(max_rel_err_t(a, b) <= 1e-5, "{name}: {:e}", max_rel_err_t(a, b));
    }
    // generation runs through the NF4 op too and agrees with the twin
    let cfg = kiln::model::generate::GenerateConfig { max_new_tokens: 8, ..Default::default() };
    let run = |m: &Model| kiln::model::generate::generate(m, &[5, 17, 3], &cfg, |_, _| {}).unwrap();
    assert_eq!(run(&q), run(&twin));
    // merging dequantizes the base and folds the adapter in
    let merged = lora::merged(&q).unwrap();
    assert!(merged.nf4.is_none() && merged.params.get("transformer.h.1.mlp.c_fc.weight").is_ok());
}

#[test]
fn a_layer_not_a_multiple_of_the_block_size_is_refused_by_name() {
    // n_embd 20: c_attn is 20 x 60 = 1200 elements, 18.75 blocks of 64
    let mut m = Model::new_random(tiny(20, None), 0).unwrap();
    let e = m.quantize_nf4(NF4_BLOCKSIZE).unwrap_err().to_string();
    assert!(e.contains("transformer.h.0.attn.c_attn") && e.contains("1200") && e.contains("64"), "{e}");
    assert!(m.nf4.is_none() && m.params.get("transformer.h.0.attn.c_attn.weight").is_ok(), "nothing changed");
    // n_embd 16, n_inner 18: attention fits (768, 256), mlp.c_fc is 16 x 18 = 288
    let mut m = Model::new_random(tiny(16, Some(18)), 0).unwrap();
    let e = m.quantize_nf4(NF4_BLOCKSIZE).unwrap_err().to_string();
    assert!(e.contains("transformer.h.0.mlp.c_fc") && e.contains("288"), "{e}");
    assert!(m.nf4.is_none() && m.params.get("transformer.h.0.attn.c_attn.weight").is_ok(), "nothing changed");
    // n_embd 24: 24 x 72, 24 x 24, 24 x 96 are all whole blocks
    let mut m = Model::new_random(tiny(24, None), 0).unwrap();
    m.quantize_nf4(NF4_BLOCKSIZE).unwrap();
}

#[test]
fn qlora_finetuning_trains_only_the_adapter_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (_, base) = base_model(dir.path(), 64);
    let task = dir.path().join("task.jsonl");
    let method = |m: &str| format!("finetune.method=\"{m}\"");
    let extra = |m: &str| {
        [
            method(m),
            "finetune.optimizer=\"adamw8bit\"".into(),
            "finetune.lora_r=64".into(),
            "finetune.lora_dropout=0.1".into(),
            "train.max_steps=10".into(),
            "train.eval_every=10".into(),
        ]
    };
    let cfg_of = |m: &str| config(&base, &task, &extra(m).iter().map(String::as_str).collect::<Vec<_>>());
    let (a, b, l) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("lora"));
    let t0 = Instant::now();
    let s = finetune(&cfg_of("qlora"), &a, &opts(Start::Fresh, None)).unwrap();
    let t_qlora = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    finetune(&cfg_of("lora"), &l, &opts(Start::Fresh, None)).unwrap();
    let t_lora = t0.elapsed().as_secs_f64();
    println!("10 steps (with one evaluation): qlora {t_qlora:.2} s, lora {t_lora:.2} s");
    let ckpt = s.checkpoint.unwrap();
    assert!(ckpt.join("adapter_config.json").exists() && ckpt.join("adapter_model.safetensors").exists());
    assert!(!ckpt.join("model.safetensors").exists(), "a QLoRA checkpoint holds the adapter, not the base");
    // the adapter is a plain PEFT adapter: it loads onto the f32 base and moved away from B = 0
    let mut m = kiln::io::checkpoint::load_model(&base).unwrap();
    kiln::io::peft::load_adapter(&mut m, &ckpt).unwrap();
    let lora = m.lora.as_ref().unwrap();
    assert!(lora.params.iter().filter(|p| p.name.contains("lora_B")).any(|p| p
        .tensor
        .f32s()
        .unwrap()
        .iter()
        .any(|&x| x != 0.0)));
    // 8-bit optimizer state, for adapter tensors only
    let opt = kiln::io::checkpoint::load_all(&ckpt.join("optimizer.safetensors")).unwrap();
    assert!(!opt.is_empty() && opt.keys().all(|k| k.contains("lora_")), "{:?}", opt.keys().take(3).collect::<Vec<_>>());
    // r = 64 makes lora_A [64, 64] large enough (4096) for 8-bit moments
    assert!(opt.iter().any(|(k, t)| k.starts_with("state1.") && t.dtype() == kiln::DType::U8), "adamw8bit's codes");
    // stop at 4, resume: the same losses
    finetune(&cfg_of("qlora"), &b, &opts(Start::Fresh, Some(4))).unwrap();
    finetune(&cfg_of("qlora"), &b, &opts(Start::Resume, None)).unwrap();
    assert_eq!(losses(&a).len(), 10);
    assert_eq!(losses(&a), losses(&b));
    assert!(losses(&a)[9].1 < losses(&a)[0].1, "{:?}", losses(&a));
    // 4-bit base, same data and adapter init: the losses track LoRA's on the f32 base
    let (lq, ll) = (losses(&a)[0].1, losses(&l)[0].1);
    println!(
        "step-1 loss: qlora {lq:.4}, lora {ll:.4}; step 10: qlora {:.4}, lora {:.4}",
        losses(&a)[9].1,
        losses(&l)[9].1
    );
    assert!((lq - ll).abs() < 0.05 * ll, "{lq} vs {ll}");
}

#[test]
fn the_command_defaults_qlora_to_adamw8bit_and_names_a_layer_it_cannot_quantize() {
    let dir = tempfile::tempdir().unwrap();
    let (_, base) = base_model(dir.path(), 64);
    let task = dir.path().join("task.jsonl");
    let run = |args: &[&str]| common::cli::kiln_command().args(args).output().unwrap();
    let (b, t, out) = (base.to_str().unwrap(), task.to_str().unwrap(), dir.path().join("run"));
    let common = ["finetune", "--method", "qlora", "--data", t, "--max-steps", "3", "--set", "train.batch_size=4"];
    let o = run(&[&common[..], &["--model", b, "--out", out.to_str().unwrap()]].concat());
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{text}");
    for needle in ["qlora: 8 base layers in NF4", "optimizer adamw8bit", "in NF4", "done at step 3"] {
        assert!(text.contains(needle), "finetune output lacks '{needle}':\n{text}");
    }
    println!("{text}");
    // a base whose c_attn (20 x 60) is not whole blocks of 64: refused, naming the layer
    let odd = tempfile::tempdir().unwrap();
    let (_, base20) = base_model(odd.path(), 20);
    let o =
        run(&[&common[..], &["--model", base20.to_str().unwrap(), "--out", odd.path().join("run").to_str().unwrap()]]
            .concat());
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("transformer.h.0.attn.c_attn") && e.contains("block"), "{e}");
}

/// LoRA and QLoRA fine-tuning on the CUDA backend (the GPU, or the emulated device) against the
/// same runs on the CPU: 10 steps of `finetune` from the same base, data, adapter initialisation
/// and dropout masks, with 8-bit AdamW and fp32 AdamW, gradient checkpointing on one of them.
///
/// Tolerance. The device runs the base's forward and backward in bf16 (f32 accumulation), the CPU
/// in f32; tests/gpt2_cuda.rs derives 1e-2 of the loss for one such step of a 2-layer model (and
/// allows it). Over 10 steps the adapters' trajectories also part, where bf16 noise flips the
/// sign of a near-zero gradient and so Adam's step: each such weight moves by 2 lr at most, rarely,
/// and the loss by far less than the step's own bound. So 1e-2 of the loss at every step; the
/// CPU's loss must fall by more than 4 times that over the run, so a device run whose adapter did
/// not train (or trained another way) cannot pass.
#[cfg(feature = "cuda")]
#[test]
fn lora_and_qlora_finetuning_on_the_device_track_the_cpu_for_10_steps() {
    let Some(cu) = common::gpu("qlora::lora_and_qlora_finetuning_on_the_device_track_the_cpu_for_10_steps") else {
        return;
    };
    let device_flag = if cu.is_emulated() { "emu" } else { "cuda" };
    const TOL: f64 = 1e-2;
    let dir = tempfile::tempdir().unwrap();
    let (_, base) = base_model(dir.path(), 64);
    let task = dir.path().join("task.jsonl");
    for (method, optimizer, checkpointing) in
        [("lora", "adamw", false), ("qlora", "adamw8bit", true), ("lora", "adamw8bit", false)]
    {
        let extra = [
            format!("finetune.method=\"{method}\""),
            format!("finetune.optimizer=\"{optimizer}\""),
            format!("finetune.gradient_checkpointing={checkpointing}"),
            "finetune.lora_r=64".into(), // lora_A [64, 64]: 8-bit moments for the adapter's matrices
            "finetune.lora_dropout=0.1".into(),
            "train.max_steps=10".into(),
            "train.eval_every=0".into(),
            "train.lr=1e-2".into(),
        ];
        let cfg = config(&base, &task, &extra.iter().map(String::as_str).collect::<Vec<_>>());
        let label = format!("{method} + {optimizer}{}", if checkpointing { " (checkpointed)" } else { "" });
        let run = |device: kiln::Device| {
            let out = dir.path().join(format!("{method}-{optimizer}-{device}"));
            let o = kiln::train::Options { device, ..opts(Start::Fresh, None) };
            let t0 = Instant::now();
            let s = finetune(&cfg, &out, &o).unwrap_or_else(|e| panic!("{label} on {device}: {e}"));
            (losses(&out), s, t0.elapsed().as_secs_f64())
        };
        let (cpu, _, t_cpu) = run(kiln::Device::Cpu);
        let (dev, s, t_dev) = run(kiln::Device::Cuda(0));
        assert_eq!((cpu.len(), dev.len()), (10, 10), "{label}: ten logged steps each");
        let worst = cpu.iter().zip(&dev).map(|((_, c), (_, d))| ((d - c) / c).abs()).fold(0.0, f64::max);
        println!(
            "{label}: CPU {:.4} -> {:.4} ({t_cpu:.1} s), device {:.4} -> {:.4} ({t_dev:.1} s), worst step {worst:.2e}",
            cpu[0].1, cpu[9].1, dev[0].1, dev[9].1
        );
        assert!(worst < TOL, "{label}: the device's losses {dev:?} leave the CPU's {cpu:?} by {worst:.2e}");
        assert!(cpu[9].1 < cpu[0].1 * (1.0 - 4.0 * TOL), "{label}: the CPU run must train: {cpu:?}");
        // the device's measured peak holds at least the weights and optimizer state kiln can name
        let mem = s.device_memory.expect("a device run measures its device memory");
        println!("{label}: {}", mem.describe());
        assert!(mem.weights > 0 && mem.optimizer > 0 && mem.rest() > 0, "{label}: {mem:?}");
        assert!(mem.peak >= mem.weights + mem.optimizer, "{label}: {mem:?}");
        // the device run saved a PEFT adapter on the host; `kiln generate --adapter` with it
        // gives the same greedy tokens on the device as on the CPU
        let ckpt = s.checkpoint.expect("a checkpoint at the last step");
        assert!(ckpt.join("adapter_model.safetensors").exists(), "{label}: {ckpt:?}");
        let gen = |device: &str| {
            let (b, a) = (base.to_str().unwrap(), ckpt.to_str().unwrap());
            let args = ["generate", "--model", b, "--adapter", a, "--prompt-ids", "5,17,3,60,2", "--device", device];
            let o = common::cli::kiln_command()
                .args(args)
                .args(["--max-new-tokens", "16", "--ignore-eos"])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8(o.stdout).unwrap()
        };
        let on_cpu = gen("cpu");
        assert_eq!(on_cpu.trim().split(',').count(), 21, "{on_cpu}");
        assert_eq!(gen(device_flag), on_cpu, "{label}: greedy tokens with the adapter, device vs CPU");
    }
}

/// `kiln memory` plans without building: its counts for each method equal those of the model
/// built that way (tiny preset: full, LoRA on the default targets, QLoRA's NF4 base plus the
/// adapter), and its table says which GPT-2 sizes fit a 24 GB card.
#[test]
fn the_memory_plan_counts_what_the_built_model_holds() {
    use kiln::train::memory::Counts;
    let config = kiln::Config::preset("tiny").unwrap();
    let lc = LoraConfig::new(8, 16.0, 0.0, &["c_attn", "c_proj", "c_fc"], false).unwrap();
    let mut m = Model::new_random(config.clone(), 0).unwrap();
    m.params.set_trainable(true);
    assert_eq!(Counts::planned(&config, "full", &lc).unwrap(), Counts::of(&m));
    let mut m = Model::new_random(config.clone(), 0).unwrap();
    lora::attach(&mut m, lc.clone(), 0).unwrap();
    assert_eq!(Counts::planned(&config, "lora", &lc).unwrap(), Counts::of(&m));
    let mut q = Model::new_random(config.clone(), 0).unwrap();
    q.quantize_nf4(NF4_BLOCKSIZE).unwrap();
    lora::attach(&mut q, lc.clone(), 0).unwrap();
    let planned = Counts::planned(&config, "qlora", &lc).unwrap();
    assert_eq!(planned, Counts::of(&q));
    assert!(planned.nf4_params > 0 && planned.nf4_bytes * 7 < 4 * planned.nf4_params);
    // the optimizer state the bill counts is what 8-bit AdamW holds after a step, to the byte: at
    // r = 64 lora_A [64, 128] is 8-bit, lora_B of c_proj [128, 64] too; every bias stays f32
    for r in [8, 64] {
        let lc = LoraConfig::new(r, 16.0, 0.0, &["c_attn", "c_proj", "c_fc"], false).unwrap();
        let mut q = Model::new_random(config.clone(), 0).unwrap();
        q.quantize_nf4(NF4_BLOCKSIZE).unwrap();
        lora::attach(&mut q, lc, 0).unwrap();
        let ids = Tensor::from_i32((0..64).map(|i| i % 500).collect(), [2, 32]).unwrap();
        let mut tape = Tape::new();
        let loss = q.forward(&mut tape, &ids, Some(&ids), Mode::Eval).unwrap().loss.unwrap();
        let grads = tape.backward(&loss).unwrap();
        let mut opt = kiln::optim::AdamW8bit::new(kiln::optim::AdamWConfig::default());
        opt.step_all(&mut q.stores_mut(), &grads, 1e-3).unwrap();
        let counts = Counts::of(&q);
        let billed = kiln::train::memory::optimizer_state("adamw8bit", &counts);
        assert_eq!(billed, opt.state_bytes() as f64, "r = {r}: {counts:?}");
    }

    let o = common::cli::kiln(&["memory", "--budget-gb", "24"]);
    let text = common::cli::text(&o);
    assert!(o.status.success(), "{text}");
    let row =
        |name: &str| text.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{text}"));
    // GPT-2 XL: 1.5B parameters do not fit 24 GB with fp32 AdamW, and do in 4 bits with an adapter
    let xl: Vec<&str> = row("gpt2-xl").split_whitespace().collect();
    assert_eq!((xl[4], xl[10]), ("over", "fits"), "{text}");
    assert!(row("gpt2").contains("fits"), "{text}");
}
