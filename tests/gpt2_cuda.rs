//! A GPT-2 training step on CUDA against the same step on the CPU: loss, every parameter
//! gradient, and the parameters after one AdamW step. Needs a GPU (skips visibly without one).
//!
//! Tolerance. The GPU runs the forward and backward in bf16 with f32 accumulation; the CPU in f32.
//! Each bf16 rounding perturbs a value by at most u = 2^-8 relative (u/sqrt(3) as a root mean
//! square for uniform rounding error). A 2-layer block stack rounds every activation about 12
//! times per layer on the way forward and again on the way back, so independent errors add up to
//! about sqrt(2 * 2 * 12) * 3.9e-3 / 1.7 = 1.6e-2 of a tensor's norm. The tests allow 4e-2 for a
//! gradient's relative norm error (2.5x that estimate), and 1e-2 for the loss, a mean over every
//! token in which errors average out. A wrong kernel (a missed tile, a transposed operand, a
//! dropped bias) moves these by O(1).
#![cfg(feature = "cuda")]

mod common;

use kiln::model::Mode;
use kiln::optim::{AdamW, AdamWConfig};
use kiln::{Device, Gpt2Config, Model, Tape, Tensor};

/// A 2-layer GPT-2 without dropout of the given sizes.
fn config(vocab_size: usize, n_positions: usize, n_embd: usize, n_head: usize) -> Gpt2Config {
    Gpt2Config {
        vocab_size,
        n_positions,
        n_embd,
        n_layer: 2,
        n_head,
        n_inner: None,
        layer_norm_epsilon: 1e-5,
        embd_pdrop: 0.0,
        resid_pdrop: 0.0,
        attn_pdrop: 0.0,
        initializer_range: 0.02,
        bos_token_id: None,
        eos_token_id: None,
    }
}

/// A small GPT-2 with awkward sizes: head dim 16, vocabulary 97, T = 33 (crosses a 32-key tile).
fn model() -> Model {
    Model::new_random(config(97, 64, 64, 4), 7).unwrap()
}

fn batch() -> (Tensor, Tensor) {
    let ids = kiln::bench::random_tokens(97, 2, 33, 3).unwrap();
    let targets = kiln::bench::random_tokens(97, 2, 33, 4).unwrap();
    (ids, targets)
}

/// ‖a − b‖ / ‖b‖ in f64.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn a_cuda_train_step_matches_the_cpu_step() {
    let Some(_) = common::gpu("a_cuda_train_step_matches_the_cpu_step") else { return };
    let (ids, targets) = batch();
    let cpu_model = model();
    let mut gpu_model = model();
    gpu_model.to_device(Device::Cuda(0)).unwrap();

    let mut tape = Tape::new();
    let out = cpu_model.forward(&mut tape, &ids, Some(&targets), Mode::Train { seed: 1 }).unwrap();
    let cpu_loss = out.loss.unwrap();
    let cpu_grads = tape.backward(&cpu_loss).unwrap();

    let mut tape = Tape::new();
    let out = gpu_model.forward(&mut tape, &ids, Some(&targets), Mode::Train { seed: 1 }).unwrap();
    let gpu_loss = out.loss.unwrap();
    let gpu_grads = tape.backward(&gpu_loss).unwrap();

    let (lc, lg) = (cpu_loss.item().unwrap(), gpu_loss.item().unwrap());
    assert!(lg.is_finite(), "GPU loss {lg}");
    assert!(((lg - lc) / lc).abs() < 1e-2, "loss: GPU {lg} vs CPU {lc}");

    let mut worst = (0.0, String::new());
    for (pc, pg) in cpu_model.params.iter().zip(gpu_model.params.iter()) {
        let gc = cpu_grads.get(&pc.tensor).unwrap_or_else(|| panic!("no CPU gradient for {}", pc.name));
        let gg = gpu_grads.get(&pg.tensor).unwrap_or_else(|| panic!("no GPU gradient for {}", pg.name));
        assert_eq!(gg.device(), Device::Cuda(0), "{}", pg.name);
        assert_eq!(gg.dtype(), kiln::DType::F32, "{}: master gradients are f32", pg.name);
        let e = rel_err(&gg.to_f32_vec().unwrap(), &gc.to_f32_vec().unwrap());
        println!("{:<40} {e:.2e}", pc.name);
        if e > worst.0 {
            worst = (e, pc.name.clone());
        }
    }
    assert!(worst.0 < 4e-2, "worst gradient relative error {:.2e} at {}", worst.0, worst.1);

    // One AdamW step on each side from the same gradients' directions.
    let cfg = AdamWConfig { lr: 1e-3, ..Default::default() };
    let mut cpu_model = cpu_model;
    let (mut oc, mut og) = (AdamW::new(cfg), AdamW::new(cfg));
    oc.step(&mut cpu_model.params, &cpu_grads, 1e-3).unwrap();
    og.step(&mut gpu_model.params, &gpu_grads, 1e-3).unwrap();
    for (pc, pg) in cpu_model.params.iter().zip(gpu_model.params.iter()) {
        assert_eq!(pg.tensor.device(), Device::Cuda(0));
        let (a, b) = (pg.tensor.to_f32_vec().unwrap(), pc.tensor.to_f32_vec().unwrap());
        // Adam's first step moves each weight by about lr * sign(g): compare the step taken.
        let before = model();
        let p0 = before.params.get(&pc.name).unwrap().to_f32_vec().unwrap();
        let step_c: Vec<f32> = b.iter().zip(&p0).map(|(x, y)| x - y).collect();
        let step_g: Vec<f32> = a.iter().zip(&p0).map(|(x, y)| x - y).collect();
        // Where a gradient is near zero its sign is noise in bf16: allow a tenth of steps to flip.
        let e = rel_err(&step_g, &step_c);
        assert!(e < 0.65, "{}: AdamW step differs by {e:.2e} of its norm", pc.name);
    }
}

#[test]
fn a_cuda_model_trains_and_saves_a_host_checkpoint() {
    let Some(_) = common::gpu("a_cuda_model_trains_and_saves_a_host_checkpoint") else { return };
    let (ids, targets) = batch();
    let mut m = model();
    m.to_device(Device::Cuda(0)).unwrap();
    let mut opt = AdamW::new(AdamWConfig { lr: 3e-3, ..Default::default() });
    let mut losses = Vec::new();
    for step in 0..30 {
        let mut tape = Tape::new();
        let out = m.forward(&mut tape, &ids, Some(&targets), Mode::Train { seed: step }).unwrap();
        let loss = out.loss.unwrap();
        let mut grads = tape.backward(&loss).unwrap();
        let norm = grads.clip_global_norm(1.0).unwrap();
        assert!(norm.is_finite());
        opt.step(&mut m.params, &grads, 3e-3).unwrap();
        losses.push(loss.item().unwrap());
    }
    // Memorising one batch: the loss must fall well below its start (ln 97 = 4.57).
    assert!(losses[29] < 0.5 * losses[0], "losses {losses:?}");
    let dir = tempfile::tempdir().unwrap();
    kiln::io::checkpoint::save_model(&m, dir.path(), kiln::DType::F32).unwrap();
    let back = kiln::io::checkpoint::load_model(dir.path()).unwrap();
    assert_eq!(back.device(), Device::Cpu);
    let mut tape = Tape::inference();
    let l = back.forward(&mut tape, &ids, Some(&targets), Mode::Eval).unwrap().loss.unwrap().item().unwrap();
    assert!((l - losses[29]).abs() < 0.1 * losses[29] + 0.05, "reloaded loss {l} vs last GPU loss {}", losses[29]);
}

/// `kiln grads --device emu` (the CUDA kernels, emulated) against `kiln grads --device cpu` on a
/// checkpoint with shapes none of the kernel tests use: vocabulary 211, head dim 32 (3 heads of a
/// 96-wide model), T = 45, batch 3. Loss and every gradient within the bf16 tolerance derived at
/// the top of this file.
#[test]
fn kiln_grads_on_the_emulated_device_matches_the_cpu() {
    use kiln::io::checkpoint::load_all;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(211, 48, 96, 3);
    let m = Model::new_random(cfg, 11).unwrap();
    let model_dir = dir.path().join("model");
    kiln::io::checkpoint::save_model(&m, &model_dir, kiln::DType::F32).unwrap();
    let ids = kiln::bench::random_tokens(211, 3, 45, 5).unwrap();
    let batch = dir.path().join("batch.safetensors");
    kiln::io::safetensors::save(&batch, &[("input_ids".to_string(), ids)], &[]).unwrap();
    let run = |device: &str| {
        let out = dir.path().join(format!("grads-{device}.safetensors"));
        let o = common::cli::kiln_command()
            .args(["grads", "--device", device, "--model"])
            .arg(&model_dir)
            .arg("--batch")
            .arg(&batch)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "kiln grads --device {device}: {}", String::from_utf8_lossy(&o.stderr));
        load_all(&out).unwrap()
    };
    let (cpu, emu) = (run("cpu"), run("emu"));
    assert_eq!(cpu.len(), emu.len());
    let (lc, le) = (cpu["loss"].f32s().unwrap()[0], emu["loss"].f32s().unwrap()[0]);
    assert!(((lc - le) / lc).abs() < 1e-2, "loss: cpu {lc}, emu {le}");
    for (name, c) in &cpu {
        let e = rel_err(emu[name].f32s().unwrap(), c.f32s().unwrap());
        eprintln!("{name}: relative error {e:.2e}");
        assert!(e < 4e-2, "{name}: the emulated device's gradient differs by {e:.2e} of its norm");
    }
}
