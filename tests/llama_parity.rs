//! Oracle parity: kiln's Llama against PyTorch + transformers 5 + peft on two fixtures made by
//! tools/oracle/make_llama_fixtures.py, each a tiny LlamaForCausalLM with perturbed RMSNorm
//! weights and labels masked on a prefix:
//! - llama-dev (`--config llama-a`): 4 query heads over 2 KV heads of size 16, tied embeddings,
//!   theta 10000;
//! - llama-c (`--config llama-c`): 8 query heads over 2 KV heads of size 8, an untied lm_head,
//!   theta 500000, eps 1e-6, 37 tokens.
//!
//! Each: logits, loss, hidden states, every parameter gradient, the LoRA and rsLoRA adapters'
//! gradients, and a greedy generation. Tolerance as for GPT-2 (tests/gpt2_parity.rs): max
//! |a - b| / (max |b| + 1e-6) < 1e-4 per tensor in f32, where a wrong op is off by O(1).

mod common;

use common::max_rel_err_t;

use kiln::data::batch::Batch;
use kiln::io::checkpoint::{load_all, load_model};
use kiln::io::peft::load_adapter;
use kiln::model::generate::{generate, GenerateConfig};
use kiln::model::Mode;
use kiln::{Config, Tape, Tensor};
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;

/// The two oracle fixtures every parity test runs on.
const FIXTURES: [&str; 2] = ["llama-dev", "llama-c"];

fn fixture(set: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oracle").join(set).join(name)
}

#[test]
fn the_fixture_configs_read_as_llamas() {
    let model = load_model(&fixture("llama-dev", "model")).unwrap();
    let Config::Llama(c) = &model.config else { panic!("read as {:?}", model.config) };
    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (4, 2, 16));
    assert_eq!((c.rope_theta, c.rms_norm_eps, c.tie_word_embeddings), (10_000.0, 1e-5, true));
    assert_eq!(model.params.len(), 1 + 2 * 9 + 1, "embed_tokens, 9 tensors a layer, model.norm; lm_head tied");

    let model = load_model(&fixture("llama-c", "model")).unwrap();
    let Config::Llama(c) = &model.config else { panic!("read as {:?}", model.config) };
    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (8, 2, 8));
    assert_eq!((c.rope_theta, c.rms_norm_eps, c.tie_word_embeddings), (500_000.0, 1e-6, false));
    assert_eq!(model.params.len(), 1 + 2 * 9 + 2, "embed_tokens, 9 tensors a layer, model.norm, lm_head");
}

#[test]
fn logits_loss_and_every_gradient_match_transformers() {
    for set in FIXTURES {
        logits_loss_and_gradients(set);
    }
}

fn logits_loss_and_gradients(set: &str) {
    let model = load_model(&fixture(set, "model")).unwrap();
    let batch = Batch::load(&fixture(set, "batch.safetensors")).unwrap();
    let forward = load_all(&fixture(set, "forward.safetensors")).unwrap();
    let grads = load_all(&fixture(set, "grads.safetensors")).unwrap();

    let mut tape = Tape::new();
    let out = model.forward(&mut tape, &batch.input_ids, Some(&batch.targets().unwrap()), Mode::Eval).unwrap();
    let loss = out.loss.unwrap();
    let (got, want) = (loss.item().unwrap(), forward["loss"].item().unwrap());
    assert!((got - want).abs() / want < TOL, "{set}: loss {got} vs transformers {want}");
    let e = max_rel_err_t(out.logits.as_ref().unwrap(), &forward["logits"]);
    assert!(e < TOL, "{set}: logits rel err {e}");

    let g = tape.backward(&loss).unwrap();
    assert_eq!(grads.len(), model.params.len(), "{set}: fixture and model disagree on the parameter count");
    let worst = common::assert_grads_match(set, model.params.iter(), &g, &grads, TOL);
    println!("{set}: loss {got} (transformers {want}); worst gradient rel err {:.2e} ({})", worst.0, worst.1);
}

/// The residual stream after each block, and after model.norm, equal transformers' hidden
/// states: pins a failure to a block.
#[test]
fn hidden_states_match_transformers() {
    for set in FIXTURES {
        hidden_states(set);
    }
}

fn hidden_states(set: &str) {
    let model = load_model(&fixture(set, "model")).unwrap();
    let batch = Batch::load(&fixture(set, "batch.safetensors")).unwrap();
    let forward = load_all(&fixture(set, "forward.safetensors")).unwrap();
    let tape = &mut Tape::inference();
    let emb = model.params.get("model.embed_tokens.weight").unwrap();
    let mut x = kiln::ops::embedding::token_embedding(tape, &batch.input_ids, emb).unwrap();
    let e = max_rel_err_t(&x, &forward["hidden_states.0"]);
    assert!(e < TOL, "{set}: hidden_states.0 rel err {e}");
    let c = &model.config;
    for i in 0..c.n_layer() {
        x = model.block_output(tape, i, &x).unwrap();
        if i + 1 < c.n_layer() {
            let e = max_rel_err_t(&x, &forward[&format!("hidden_states.{}", i + 1)]);
            assert!(e < TOL, "{set}: hidden_states.{} rel err {e}", i + 1);
        }
    }
    let Config::Llama(lc) = c else { unreachable!() };
    let h =
        kiln::ops::rmsnorm::rmsnorm(tape, &x, model.params.get("model.norm.weight").unwrap(), lc.rms_norm_eps).unwrap();
    let last = format!("hidden_states.{}", c.n_layer());
    let e = max_rel_err_t(&h, &forward[&last]);
    assert!(e < TOL, "{set}: {last} (after model.norm) rel err {e}");
}

/// PEFT's LoRA and rsLoRA adapters on the seven targets: kiln's loss, logits and every adapter
/// gradient (PEFT's names) equal peft's.
#[test]
fn lora_and_rslora_gradients_match_peft() {
    for (set, kind) in FIXTURES.into_iter().flat_map(|set| [(set, "lora"), (set, "rslora")]) {
        let mut model = load_model(&fixture(set, "model")).unwrap();
        load_adapter(&mut model, &fixture(set, kind)).unwrap();
        let batch = Batch::load(&fixture(set, "batch.safetensors")).unwrap();
        let want = load_all(&fixture(set, &format!("{kind}_grads.safetensors"))).unwrap();
        let mut tape = Tape::new();
        let out = model.forward(&mut tape, &batch.input_ids, Some(&batch.targets().unwrap()), Mode::Eval).unwrap();
        let loss = out.loss.unwrap();
        let (got, wl) = (loss.item().unwrap(), want["loss"].item().unwrap());
        assert!((got - wl).abs() / wl < TOL, "{set} {kind}: loss {got} vs peft {wl}");
        let e = max_rel_err_t(out.logits.as_ref().unwrap(), &want["logits"]);
        assert!(e < TOL, "{set} {kind}: logits rel err {e}");
        let g = tape.backward(&loss).unwrap();
        let lora = model.lora.as_ref().unwrap();
        assert_eq!(lora.params.len(), want.len() - 2, "{set} {kind}: adapter tensors vs the fixture's gradients");
        let (worst, _) = common::assert_grads_match(kind, lora.params.iter(), &g, &want, TOL);
        // the base stays frozen: no gradient buffer for any of its tensors
        assert!(
            model.params.iter().all(|p| g.get(&p.tensor).is_none()),
            "{set} {kind}: a base parameter got a gradient"
        );
        println!("{set} {kind}: loss {got} (peft {wl}); worst adapter gradient rel err {worst:.2e}");
    }
}

/// Greedy decoding with the KV cache (only the KV heads cached) equals transformers'
/// `generate(do_sample=False)` token for token.
#[test]
fn greedy_generation_matches_transformers() {
    for set in FIXTURES {
        greedy_generation(set);
    }
}

fn greedy_generation(set: &str) {
    let model = load_model(&fixture(set, "model")).unwrap();
    let want = load_all(&fixture(set, "generate.safetensors")).unwrap();
    let ids = |t: &Tensor| -> Vec<u32> { t.i32s().unwrap().iter().map(|&x| x as u32).collect() };
    let prompt = ids(&want["prompt"]);
    let output = ids(&want["output"]);
    let cfg = GenerateConfig { max_new_tokens: output.len() - prompt.len(), ..GenerateConfig::default() };
    assert!(!cfg.do_sample && cfg.eos_token_id.is_none(), "greedy, never stopping early, as the fixture was made");
    let got = generate(&model, &prompt, &cfg, |_, _| {}).unwrap();
    assert_eq!(got[0], output, "{set}: kiln's prompt + greedy tokens differ from transformers'");
}

/// `kiln grads --device emu` (the CUDA backend over the emulated device) against
/// `--device cpu` on each fixture, with and without the LoRA adapter: the loss within 1e-2 and
/// every gradient within 4e-2 of its norm, the bf16 tolerance tests/gpt2_cuda.rs derives (a
/// 2-layer stack rounding each activation to bf16 about a dozen times per layer each way).
#[cfg(feature = "cuda")]
#[test]
fn kiln_grads_on_the_emulated_device_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let rel_err = |a: &[f32], b: &[f32]| {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den.max(1e-30)).sqrt()
    };
    for (set, adapter) in FIXTURES.into_iter().flat_map(|set| [(set, None), (set, Some("lora"))]) {
        let run = |device: &str| {
            let out = dir.path().join(format!("grads-{set}-{device}-{adapter:?}.safetensors"));
            let mut cmd = common::cli::kiln_command();
            cmd.args(["grads", "--device", device, "--model"]).arg(fixture(set, "model"));
            cmd.arg("--batch").arg(fixture(set, "batch.safetensors")).arg("--out").arg(&out);
            if let Some(a) = adapter {
                cmd.arg("--adapter").arg(fixture(set, a));
            }
            let o = cmd.output().unwrap();
            assert!(o.status.success(), "kiln grads --device {device}: {}", String::from_utf8_lossy(&o.stderr));
            load_all(&out).unwrap()
        };
        let (cpu, emu) = (run("cpu"), run("emu"));
        assert_eq!(cpu.len(), emu.len());
        let (lc, le) = (cpu["loss"].f32s().unwrap()[0], emu["loss"].f32s().unwrap()[0]);
        assert!(((lc - le) / lc).abs() < 1e-2, "{set} {adapter:?} loss: cpu {lc}, emu {le}");
        let mut worst = 0f64;
        for (name, c) in &cpu {
            let e = rel_err(emu[name].f32s().unwrap(), c.f32s().unwrap());
            assert!(
                e < 4e-2,
                "{set} {adapter:?} {name}: the emulated device's gradient differs by {e:.2e} of its norm"
            );
            worst = worst.max(e);
        }
        println!("{set} adapter {adapter:?}: loss cpu {lc} emu {le}; worst gradient relative error {worst:.2e}");
    }
}
