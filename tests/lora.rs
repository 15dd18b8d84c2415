//! LoRA: the `lora_linear` and `lora_embedding` ops against finite differences and against their
//! composite twins (plain matmuls), GPT-2 + LoRA / rsLoRA / LoRA on wte + lm_head + c_attn
//! against PEFT's fixtures (loss, logits, every adapter gradient), the frozen base, PEFT adapter
//! directories (round trip, file layout), merging (and its refusal for the tied wte / lm_head),
//! generation with an unmerged adapter, PEFT's initialisation, dropout, and every kind of bad
//! input through the API and the `kiln` command line.
//!
//! Tolerances. Against PEFT: the engine core's max |a - b| / (max |b| + 1e-6) < 1e-4 per tensor
//! (tests/gpt2_parity.rs says why; both sides compute in f32 in different orders). Merged vs
//! unmerged and fused vs composite differ only by where the low-rank product is rounded:
//! W + s A^T B^T is rounded once per weight before the GEMM, x A^T B^T once per output after it,
//! each a few f32 roundings of values of order 1: 1e-5 relative leaves 10x room over the ~1e-6
//! observed. The finite-difference checks use tests/common's budget (the op is linear in each
//! input, so only rounding matters).

mod common;

use common::cli::{fails_with, kiln, text};
use common::max_rel_err_t;

use common::{grad_check, poison_pool, rand_tensor, rng, Objective, Tol, POOLED};
use kiln::data::batch::Batch;
use kiln::io::checkpoint::{load_all, load_model, save_model};
use kiln::io::peft::{self, load_adapter, save_adapter};
use kiln::model::lora;
use kiln::model::Mode;
use kiln::nn::lora::LoraConfig;
use kiln::ops::elementwise;
use kiln::ops::gemm::{linear, matmul, Trans, WeightLayout};
use kiln::ops::lora::{lora_embedding, lora_linear, LoraAdapter};
use kiln::{DType, Model, Tape, Tensor};
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oracle/dev-set").join(name)
}

fn base() -> Model {
    load_model(&fixture("model")).unwrap()
}

fn with_adapter(dir: &Path) -> Model {
    let mut m = base();
    load_adapter(&mut m, dir).unwrap();
    m
}

fn batch() -> (Tensor, Tensor) {
    let b = Batch::load(&fixture("batch.safetensors")).unwrap();
    let t = b.targets().unwrap();
    (b.input_ids, t)
}

fn logits(model: &Model) -> Tensor {
    model.forward(&mut Tape::inference(), &batch().0, None, Mode::Eval).unwrap().logits.unwrap()
}

// ------------------------------------------------------------------------------------ the op

/// The op's shapes: (x dims, out, r). A single row, r = 1, sizes that are no multiple of 8.
const SHAPES: [(&[usize], usize, usize); 3] = [(&[2, 7, 13], 6, 3), (&[1, 1, 20], 12, 1), (&[5, 9], 11, 4)];
const FD: Tol = Tol { h: 1e-2, atol: 1e-6, rtol: 2e-3 };

fn op_inputs(seed: u64, x: &[usize], n: usize, r: usize) -> Vec<Tensor> {
    let mut g = rng(seed);
    let k = *x.last().unwrap();
    vec![
        rand_tensor(&mut g, x, 1.0),
        rand_tensor(&mut g, &[k, n], 1.0),
        rand_tensor(&mut g, &[r, k], 1.0),
        rand_tensor(&mut g, &[n, r], 1.0),
        rand_tensor(&mut g, &[n], 1.0),
    ]
}

#[test]
fn lora_linear_grads_match_finite_differences() {
    for (i, &(x, n, r)) in SHAPES.iter().enumerate() {
        // p = 0.3 while training: the mask is a function of the seed, so the forward stays a
        // fixed (piecewise-linear) function that finite differences can probe.
        for (p, train) in [(0.0, false), (0.3, true)] {
            let inputs = op_inputs(10 + i as u64, x, n, r);
            let label = format!("lora_linear x={x:?} out={n} r={r} dropout={p}");
            grad_check(&label, &inputs, &[0, 1, 2, 3, 4], Objective::Probe(3), FD, 48, |t, v| {
                lora_linear(
                    t,
                    &v[0],
                    &v[1],
                    WeightLayout::InOut,
                    Some(&v[4]),
                    &LoraAdapter { a: &v[2], b: &v[3], scaling: 1.7, dropout_p: p, train, seed: 99 },
                )
            });
        }
    }
    // Past the pool threshold, twice: the second pass takes NaN-filled buffers, so an element the
    // op forgets to write shows up.
    let (x, n, r) = ([2, 65, 128], 130, 4);
    assert!(2 * 65 * 128 >= POOLED && 128 * n >= POOLED);
    for pass in 0..2 {
        if pass == 1 {
            poison_pool(&[2 * 65 * 128, 2 * 65 * n, 128 * n]);
        }
        let inputs = op_inputs(20, &x, n, r);
        grad_check("lora_linear pooled", &inputs, &[0, 1, 2, 3, 4], Objective::Probe(4), FD, 24, |t, v| {
            lora_linear(
                t,
                &v[0],
                &v[1],
                WeightLayout::InOut,
                Some(&v[4]),
                &LoraAdapter { a: &v[2], b: &v[3], scaling: 0.5, dropout_p: 0.1, train: true, seed: 7 },
            )
        });
    }
}

/// The fused op against the same update written with plain ops: x W + b + (x A^T)(s B)^T.
#[test]
fn lora_linear_equals_its_composite_twin() {
    let s = 2.5f32;
    for (i, &(x, n, r)) in SHAPES.iter().enumerate() {
        let v = op_inputs(30 + i as u64, x, n, r);
        let bs = Tensor::from_f32(v[3].f32s().unwrap().iter().map(|b| s * b).collect(), [n, r]).unwrap();

        let mut t1 = Tape::new();
        for t in [&v[0], &v[2], &v[3]] {
            t1.watch(t);
        }
        let fused = lora_linear(
            &mut t1,
            &v[0],
            &v[1],
            WeightLayout::InOut,
            Some(&v[4]),
            &LoraAdapter { a: &v[2], b: &v[3], scaling: s, dropout_p: 0.0, train: false, seed: 0 },
        )
        .unwrap();

        let mut t2 = Tape::new();
        for t in [&v[0], &v[2], &bs] {
            t2.watch(t);
        }
        let base = linear(&mut t2, &v[0], &v[1], Some(&v[4]), WeightLayout::InOut, false).unwrap();
        let u = matmul(&mut t2, &v[0], &v[2], Trans::No, Trans::Yes).unwrap();
        let upd = matmul(&mut t2, &u, &bs, Trans::No, Trans::Yes).unwrap();
        let twin = elementwise::add(&mut t2, &base, &upd).unwrap();
        let e = max_rel_err_t(&fused, &twin);
        assert!(e < 1e-5, "forward x={x:?}: rel err {e}");

        // The same scalar objective on both: cross-entropy of the outputs against fixed targets.
        let rows = fused.shape().rows();
        let targets =
            Tensor::from_i32((0..rows).map(|j| (j % n) as i32).collect(), &fused.dims()[..fused.dims().len() - 1])
                .unwrap();
        let l1 = kiln::ops::xent::cross_entropy(&mut t1, &fused, &targets).unwrap();
        let l2 = kiln::ops::xent::cross_entropy(&mut t2, &twin, &targets).unwrap();
        let (g1, g2) = (t1.backward(&l1).unwrap(), t2.backward(&l2).unwrap());
        // d/dB = s * d/d(sB)
        let db2 = g2.get(&bs).unwrap().f32s().unwrap().iter().map(|g| s * g).collect();
        let db2 = Tensor::from_f32(db2, [n, r]).unwrap();
        for (what, a, b) in [
            ("dx", g1.get(&v[0]).unwrap(), g2.get(&v[0]).unwrap()),
            ("dA", g1.get(&v[2]).unwrap(), g2.get(&v[2]).unwrap()),
            ("dB", g1.get(&v[3]).unwrap(), &db2),
        ] {
            let e = max_rel_err_t(a, b);
            assert!(e < 1e-5, "{what} x={x:?}: rel err {e}");
        }
        // Only the watched inputs got gradients: the frozen weight and bias cost nothing.
        assert_eq!(g1.len(), 3);
        assert!(g1.get(&v[1]).is_none() && g1.get(&v[4]).is_none());
    }
}

#[test]
fn lora_linear_rejects_bad_shapes() {
    let v = op_inputs(40, &[3, 8], 5, 2);
    let mut t = Tape::new();
    // the error of lora_linear on v's x and W with adapter (a, b) and dropout p (in training)
    let mut err = |a: &Tensor, b: &Tensor, p: f32| {
        let adapter = LoraAdapter { a, b, scaling: 1.0, dropout_p: p, train: p > 0.0, seed: 0 };
        lora_linear(&mut t, &v[0], &v[1], WeightLayout::InOut, None, &adapter).unwrap_err().to_string()
    };
    let a_bad = Tensor::zeros([2, 7]);
    assert!(err(&a_bad, &v[3], 0.0).contains("lora_A"));
    let b_bad = Tensor::zeros([4, 2]);
    assert!(err(&v[2], &b_bad, 0.0).contains("lora_B"));
    let a0 = Tensor::zeros([0, 8]);
    assert!(err(&a0, &Tensor::zeros([5, 0]), 0.0).contains("r >= 1"));
    assert!(err(&v[2], &v[3], 1.0).contains("[0, 1)"));
}

// ------------------------------------------------------------------------- PEFT parity

fn check_against_peft(name: &str) {
    check_against(name, &fixture(name), &fixture(&format!("{name}_grads.safetensors")));
}

/// kiln's loss, logits and adapter gradients with the adapter in `dir` against PEFT's in `grads`.
fn check_against(name: &str, dir: &Path, grads: &Path) {
    let model = with_adapter(dir);
    let want = load_all(grads).unwrap();
    let (ids, targets) = batch();
    let mut tape = Tape::new();
    let out = model.forward(&mut tape, &ids, Some(&targets), Mode::Eval).unwrap();
    let loss = out.loss.unwrap();
    let (got_loss, want_loss) = (loss.item().unwrap(), want["loss"].item().unwrap());
    let loss_err = (got_loss - want_loss).abs() / want_loss;
    assert!(loss_err < TOL, "{name}: loss {got_loss} vs peft {want_loss}");
    let logits_err = max_rel_err_t(out.logits.as_ref().unwrap(), &want["logits"]);
    assert!(logits_err < TOL, "{name}: logits rel err {logits_err}");

    let g = tape.backward(&loss).unwrap();
    let lora = model.lora.as_ref().unwrap();
    // Every fixture tensor but loss and logits is an adapter gradient; kiln has each one, and
    // nothing else: the frozen base got no gradient buffer.
    assert_eq!(want.len() - 2, lora.params.len(), "{name}: fixture and adapter disagree on the tensor count");
    assert_eq!(g.len(), lora.params.len(), "{name}: only the adapter's tensors may get gradient buffers");
    assert!(model.params.iter().all(|p| !p.trainable && g.get(&p.tensor).is_none()));
    let worst = common::assert_grads_match(name, lora.params.iter(), &g, &want, TOL);
    println!(
        "{name}: loss rel err {loss_err:.2e}, logits {logits_err:.2e}, worst gradient {:.2e} ({})",
        worst.0, worst.1
    );
}

#[test]
fn lora_matches_peft() {
    check_against_peft("lora");
}

#[test]
fn rslora_matches_peft() {
    check_against_peft("rslora");
    let m = with_adapter(&fixture("rslora"));
    let l = m.lora.as_ref().unwrap();
    assert!(l.config.rslora);
    // alpha 8 / sqrt(4), as PEFT's meta.json records
    assert!(l.modules().iter().all(|m| m.scaling == 4.0));
    let plain = with_adapter(&fixture("lora"));
    assert!(plain.lora.as_ref().unwrap().modules().iter().all(|m| m.scaling == 2.0));
}

// ------------------------------------------------------------------------- adapter files

#[test]
fn save_then_load_is_exact_and_the_layout_is_peft_s() {
    for name in ["lora", "rslora"] {
        let model = with_adapter(&fixture(name));
        let dir = tempfile::tempdir().unwrap();
        save_adapter(&model, dir.path()).unwrap();

        // Same tensor names, shapes, dtypes and bytes as the file PEFT wrote.
        let ours = kiln::io::safetensors::SafeFile::open(&dir.path().join(peft::WEIGHTS_FILE)).unwrap();
        let theirs =
            kiln::io::safetensors::SafeFile::open(&fixture(&format!("{name}/adapter_model.safetensors"))).unwrap();
        assert_eq!(ours.names(), theirs.names());
        for n in theirs.names() {
            assert_eq!(ours.info(&n).unwrap(), theirs.info(&n).unwrap(), "{n}");
            assert_eq!(
                ours.tensor(&n).unwrap().raw_bytes().unwrap(),
                theirs.tensor(&n).unwrap().raw_bytes().unwrap(),
                "{n}"
            );
        }
        assert_eq!(ours.metadata().unwrap().get("format").map(String::as_str), Some("pt"));

        // Every key PEFT wrote, with the values that define the adapter.
        let read =
            |p: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
        let (ours, theirs) =
            (read(&dir.path().join(peft::CONFIG_FILE)), read(&fixture(&format!("{name}/adapter_config.json"))));
        for key in theirs.as_object().unwrap().keys() {
            assert!(ours.get(key).is_some(), "{name}: adapter_config.json lacks '{key}'");
        }
        for key in [
            "peft_type",
            "r",
            "lora_alpha",
            "lora_dropout",
            "use_rslora",
            "fan_in_fan_out",
            "bias",
            "task_type",
            "use_dora",
            "modules_to_save",
        ] {
            assert_eq!(ours[key], theirs[key], "{name}: '{key}'");
        }
        let set = |v: &serde_json::Value| {
            let mut t: Vec<String> = v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
            t.sort();
            t
        };
        assert_eq!(set(&ours["target_modules"]), set(&theirs["target_modules"]));

        // ... and it loads back to the same adapter.
        let again = with_adapter(dir.path());
        let (a, b) = (model.lora.as_ref().unwrap(), again.lora.as_ref().unwrap());
        assert_eq!(a.config, b.config);
        assert_eq!(a.modules(), b.modules());
        for (p, q) in a.params.iter().zip(b.params.iter()) {
            assert_eq!(p.name, q.name);
            assert_eq!(p.tensor.f32s().unwrap(), q.tensor.f32s().unwrap());
        }
    }
}

#[test]
fn a_fresh_adapter_is_saved_with_its_config() {
    let mut model = base();
    let cfg = LoraConfig::new(8, 16.0, 0.05, &["c_attn", "attn.c_proj"], true).unwrap();
    lora::attach(&mut model, cfg.clone(), 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&model, dir.path()).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(peft::CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(json["r"], 8);
    assert_eq!(json["lora_alpha"], 16);
    assert_eq!(json["lora_dropout"], 0.05);
    assert_eq!(json["use_rslora"], true);
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["peft_type"], "LORA");
    let again = with_adapter(dir.path());
    let l = again.lora.as_ref().unwrap();
    assert_eq!(l.config, cfg);
    // c_attn and attn.c_proj of both layers, not mlp.c_proj
    let names: Vec<&str> = l.modules().iter().map(|m| m.module.as_str()).collect();
    assert_eq!(
        names,
        [
            "transformer.h.0.attn.c_attn",
            "transformer.h.0.attn.c_proj",
            "transformer.h.1.attn.c_attn",
            "transformer.h.1.attn.c_proj"
        ]
    );
    assert!(l.modules().iter().all(|m| m.scaling == (16.0 / 8f64.sqrt()) as f32));
}

// ------------------------------------------------------------------------------ merging

#[test]
fn merged_forward_equals_the_unmerged_one() {
    for name in ["lora", "rslora"] {
        let model = with_adapter(&fixture(name));
        let merged = lora::merged(&model).unwrap();
        assert!(merged.lora.is_none() && merged.params.iter().all(|p| p.trainable));
        let (a, b) = (logits(&merged), logits(&model));
        let e = max_rel_err_t(&a, &b);
        assert!(e < 1e-5, "{name}: merged vs unmerged logits rel err {e}");
        println!("{name}: merged vs unmerged logits rel err {e:.2e}");
        // the adapter changes the model: merging did something
        assert!(max_rel_err_t(&logits(&base()), &b) > 1e-3);
        // W' = W + s A^T B^T, checked on one weight in f64
        let m = &model.lora.as_ref().unwrap().modules()[2];
        let ad = model.lora.as_ref().unwrap().adapter(&m.module).unwrap();
        let w0 = model.params.get(&format!("{}.weight", m.module)).unwrap().f32s().unwrap();
        let w1 = merged.params.get(&format!("{}.weight", m.module)).unwrap().f32s().unwrap();
        let (am, bm) = (ad.a.f32s().unwrap(), ad.b.f32s().unwrap());
        for (i, j) in [(0, 0), (m.fan_in - 1, m.fan_out - 1), (7, 3)] {
            let d: f64 = (0..m.r).map(|q| am[q * m.fan_in + i] as f64 * bm[j * m.r + q] as f64).sum();
            let want = w0[i * m.fan_out + j] as f64 + ad.scaling as f64 * d;
            assert!((w1[i * m.fan_out + j] as f64 - want).abs() < 1e-6, "{} [{i}, {j}]", m.module);
        }
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn kiln_merge_writes_a_plain_checkpoint_and_generate_agrees_with_the_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    // a base directory with a tokenizer.json beside the weights, which merge must carry over
    let base_dir = tmp.path().join("base");
    std::fs::create_dir(&base_dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("model").join(f), base_dir.join(f)).unwrap();
    }
    std::fs::write(base_dir.join("tokenizer.json"), "{\"stand-in\": true}").unwrap();
    let merged_dir = tmp.path().join("merged");
    let adapter = fixture("lora");
    let o = kiln(&["merge", "--model", s(&base_dir), "--adapter", s(&adapter), "--out", s(&merged_dir)]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(merged_dir.join("tokenizer.json")).unwrap(), b"{\"stand-in\": true}");
    let merged = load_model(&merged_dir).unwrap();
    let e = max_rel_err_t(&logits(&merged), &logits(&with_adapter(&adapter)));
    assert!(e < 1e-5, "kiln merge output vs unmerged adapter: logits rel err {e}");

    // Greedy decoding with the adapter unmerged equals greedy decoding on the merged checkpoint.
    let gen = |model: &Path, adapter: Option<&Path>| {
        let mut args = vec![
            "generate",
            "--model",
            s(model),
            "--prompt-ids",
            "5,17,3,60,2",
            "--max-new-tokens",
            "20",
            "--ignore-eos",
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", s(a)]);
        }
        let o = kiln(&args);
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    let with = gen(&base_dir, Some(&adapter));
    assert_eq!(with, gen(&merged_dir, None), "greedy with --adapter vs on the merged checkpoint");
    assert_eq!(with.trim().split(',').count(), 25);

    // and the same through the library: the KV-cached path with the adapter against the merged one
    let cfg = kiln::model::generate::GenerateConfig { max_new_tokens: 20, ..Default::default() };
    let run = |m: &Model| kiln::model::generate::generate(m, &[5, 17, 3, 60, 2], &cfg, |_, _| {}).unwrap();
    assert_eq!(run(&with_adapter(&adapter)), run(&merged));

    // bf16 output, and refusals: an existing checkpoint, the base directory itself
    let o = kiln(&[
        "merge",
        "--model",
        s(&base_dir),
        "--adapter",
        s(&adapter),
        "--out",
        s(&merged_dir),
        "--dtype",
        "bf16",
        "--overwrite",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    fails_with(
        &["merge", "--model", s(&base_dir), "--adapter", s(&adapter), "--out", s(&merged_dir)],
        &["already holds a checkpoint", "--overwrite"],
    );
    fails_with(
        &["merge", "--model", s(&base_dir), "--adapter", s(&adapter), "--out", s(&base_dir), "--overwrite"],
        &["base model's directory", "another --out"],
    );
}

/// `kiln grads --adapter` on the oracle batch writes exactly the fixture's names minus logits (the
/// loss and every adapter gradient, nothing of the base), each within TOL of the fixture.
fn grads_cli_matches(adapter: &Path, want: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("g.safetensors");
    let o = kiln(&[
        "grads",
        "--model",
        s(&fixture("model")),
        "--batch",
        s(&fixture("batch.safetensors")),
        "--adapter",
        s(adapter),
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let got = load_all(&out).unwrap();
    let want = load_all(want).unwrap();
    let mut names: Vec<&String> = want.keys().filter(|k| *k != "logits").collect();
    names.sort();
    assert_eq!(got.keys().collect::<Vec<_>>(), names);
    for (n, g) in &got {
        let e = max_rel_err_t(g, &want[n]);
        assert!(e < TOL, "{n}: rel err {e}");
    }
}

#[test]
fn kiln_grads_with_an_adapter_writes_peft_names() {
    grads_cli_matches(&fixture("rslora"), &fixture("rslora_grads.safetensors"));
}

// ------------------------------------------------------------- initialisation and dropout

#[test]
fn a_fresh_adapter_is_peft_initialised_and_changes_nothing() {
    let mut model = base();
    let before = logits(&model);
    let cfg = LoraConfig::new(8, 16.0, 0.05, &LoraConfig::parse_targets("c_attn, c_proj,c_fc"), false).unwrap();
    lora::attach(&mut model, cfg, 11).unwrap();
    let l = model.lora.as_ref().unwrap();
    // c_proj names both attn.c_proj and mlp.c_proj: 4 modules per layer, 2 layers
    assert_eq!(l.modules().len(), 8);
    assert_eq!(l.params.len(), 16);
    assert!(l.modules().iter().all(|m| m.r == 8 && m.scaling == 2.0));
    for m in l.modules() {
        let ad = l.adapter(&m.module).unwrap();
        assert_eq!(ad.a.dims(), [8, m.fan_in]);
        assert_eq!(ad.b.dims(), [m.fan_out, 8]);
        assert!(ad.b.f32s().unwrap().iter().all(|&b| b == 0.0), "{}: lora_B must start at zero", m.module);
        // kaiming_uniform(a = sqrt(5)) on [r, in] is U(-1/sqrt(in), 1/sqrt(in))
        let a = ad.a.f32s().unwrap();
        let bound = 1.0 / (m.fan_in as f32).sqrt();
        assert!(a.iter().all(|x| x.abs() <= bound), "{}: lora_A outside +-1/sqrt(in)", m.module);
        let n = a.len() as f64;
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let want_var = (bound as f64).powi(2) / 3.0;
        // n >= 384 draws: the mean's standard error is bound / sqrt(3n) <= 0.03 bound, the
        // variance's about 0.9 want_var / sqrt(n) <= 5%; 5 standard errors each
        assert!(mean.abs() < 0.15 * bound as f64, "{}: mean {mean}", m.module);
        assert!((var / want_var - 1.0).abs() < 0.25, "{}: variance {var} vs {want_var}", m.module);
        assert!(a.iter().fold(0f32, |mx, x| mx.max(x.abs())) > 0.9 * bound);
    }
    // B = 0: the logits are bit-identical to the base model's
    let after = logits(&model);
    assert_eq!(after.f32s().unwrap(), before.f32s().unwrap());
    assert!(model.params.iter().all(|p| !p.trainable));
    assert_eq!(model.params.trainable_numel(), 0);
    // the same seed gives the same adapter; another seed another one
    let again = |seed| {
        let mut m = base();
        lora::attach(&mut m, LoraConfig::new(8, 16.0, 0.0, &["c_attn"], false).unwrap(), seed).unwrap();
        m.lora.unwrap().params.iter().next().unwrap().tensor.f32s().unwrap().to_vec()
    };
    assert_eq!(again(5), again(5));
    assert_ne!(again(5), again(6));
    // one more attach is refused
    let err = lora::attach(&mut model, LoraConfig::new(4, 8.0, 0.0, &["c_fc"], false).unwrap(), 0).unwrap_err();
    assert!(err.to_string().contains("already carries"), "{err}");
}

#[test]
fn adapter_dropout_is_seeded_and_only_in_training() {
    let mut model = with_adapter(&fixture("lora"));
    // The model's own dropout off, so that only the adapter's remains.
    let kiln::Config::Gpt2(c) = &mut model.config else { panic!("a GPT-2 fixture") };
    (c.embd_pdrop, c.resid_pdrop) = (0.0, 0.0);
    let (ids, targets) = batch();
    let run = |m: &Model, mode| {
        m.forward(&mut Tape::inference(), &ids, Some(&targets), mode).unwrap().loss.unwrap().item().unwrap()
    };
    let eval = run(&model, Mode::Eval);
    assert_eq!(eval, run(&model, Mode::Train { seed: 1 }), "dropout 0: training equals eval");
    model.lora.as_mut().unwrap().config.dropout = 0.5;
    assert_eq!(eval, run(&model, Mode::Eval), "no dropout in eval");
    let t1 = run(&model, Mode::Train { seed: 1 });
    assert_ne!(t1, eval);
    assert_eq!(t1, run(&model, Mode::Train { seed: 1 }), "the same seed gives the same masks");
    assert_ne!(t1, run(&model, Mode::Train { seed: 2 }));
    // and backward through it yields every adapter gradient
    let mut tape = Tape::new();
    let loss = model.forward(&mut tape, &ids, Some(&targets), Mode::Train { seed: 1 }).unwrap().loss.unwrap();
    let g = tape.backward(&loss).unwrap();
    assert_eq!(g.len(), 16);
}

// -------------------------------------------------------------------------------- bad input

fn err_of(r: kiln::Result<()>) -> String {
    r.unwrap_err().to_string()
}

fn attach_err(r: usize, targets: &[&str]) -> String {
    let mut m = base();
    match LoraConfig::new(r, 8.0, 0.0, targets, false) {
        Err(e) => e.to_string(),
        Ok(cfg) => err_of(lora::attach(&mut m, cfg, 0)),
    }
}

#[test]
fn bad_configs_are_rejected_by_the_api() {
    let cases: &[(usize, &[&str], &[&str])] = &[
        (0, &["c_attn"], &["r = 0", "at least 1"]),
        (64, &["c_attn"], &["r = 64", "larger than", "transformer.h.0.attn.c_attn", "48 -> 144", "r <= 48"]),
        (49, &["mlp.c_proj"], &["r = 49", "192 -> 48"]),
        (4, &["q_proj"], &["'q_proj' matches no module", "transformer.wte", "mlp.c_proj", "c_attn, c_proj", "c_fc"]),
        (4, &["h.7.attn.c_attn"], &["matches no module", "transformer.h.{0..1}"]),
        (4, &["wpe"], &["transformer.wpe", "position embedding", "does not adapt"]),
        (49, &["wte"], &["r = 49", "transformer.wte", "96 tokens x 48", "r <= 48"]),
        (49, &["lm_head"], &["r = 49", "lm_head", "48 -> 96", "r <= 48"]),
        (4, &["ln_1"], &["LayerNorm"]),
        (4, &["attn"], &["container"]),
        (4, &[], &["no LoRA target"]),
        (4, &["all-linear", "c_fc"], &["all-linear"]),
    ];
    for (r, targets, needles) in cases {
        let e = attach_err(*r, targets);
        for n in *needles {
            assert!(e.contains(n), "r = {r}, targets {targets:?}: the error should mention '{n}': {e}");
        }
    }
    assert!(LoraConfig::new(4, 8.0, 1.0, &["c_fc"], false).unwrap_err().to_string().contains("[0, 1)"));
    assert!(LoraConfig::new(4, f64::NAN, 0.0, &["c_fc"], false).unwrap_err().to_string().contains("lora_alpha"));
    // the ones that do match, each adapting the layers its name ends
    let modules = |t: &[&str]| {
        let mut m = base();
        lora::attach(&mut m, LoraConfig::new(4, 8.0, 0.0, t, false).unwrap(), 0).unwrap();
        m.lora.unwrap().modules().iter().map(|m| m.module.clone()).collect::<Vec<_>>()
    };
    assert_eq!(modules(&["h.1.mlp.c_fc"]), ["transformer.h.1.mlp.c_fc"]);
    assert_eq!(modules(&["mlp.c_proj"]), ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]);
    assert_eq!(modules(&["all-linear"]).len(), 8);
}

/// A copy of a fixture adapter with its config edited by `edit`.
fn adapter_with(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture(name).join(peft::WEIGHTS_FILE), dir.path().join(peft::WEIGHTS_FILE)).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join(peft::CONFIG_FILE)).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.path().join(peft::CONFIG_FILE), cfg.to_string()).unwrap();
    dir
}

/// `kiln grads` on the fixture model and batch with `adapter`, expected to fail.
fn grads_fails(model: &Path, adapter: &Path, needles: &[&str]) -> String {
    let out = tempfile::tempdir().unwrap();
    let out = out.path().join("g.safetensors");
    fails_with(
        &[
            "grads",
            "--model",
            s(model),
            "--batch",
            s(&fixture("batch.safetensors")),
            "--adapter",
            s(adapter),
            "--out",
            s(&out),
        ],
        needles,
    )
}

#[test]
fn bad_adapters_are_rejected_by_the_cli() {
    let model = fixture("model");
    let edit = |f: fn(&mut serde_json::Value)| adapter_with("lora", f);

    // a target that matches nothing lists the names that exist
    let d = edit(|c| c["target_modules"] = serde_json::json!(["c_attn", "q_proj"]));
    grads_fails(
        &model,
        d.path(),
        &["adapter_config.json", "'q_proj' matches no module", "transformer.h.{0..1}", "c_fc"],
    );
    // rank 0
    let d = edit(|c| c["r"] = 0.into());
    grads_fails(&model, d.path(), &["adapter_config.json", "r = 0"]);
    // a config whose rank disagrees with its tensors
    let d = edit(|c| c["r"] = 3.into());
    grads_fails(&model, d.path(), &["rank 4", "r = 3"]);
    // embedding targets and other PEFT features kiln does not implement
    let d = edit(|c| c["target_modules"] = serde_json::json!(["c_attn", "wpe"]));
    grads_fails(&model, d.path(), &["wpe", "position embedding"]);
    let d = edit(|c| c["use_dora"] = true.into());
    grads_fails(&model, d.path(), &["use_dora", "DoRA"]);
    let d = edit(|c| c["peft_type"] = "IA3".into());
    grads_fails(&model, d.path(), &["IA3", "LORA"]);
    let d = edit(|c| c["target_modules"] = ".*attn.*".into());
    grads_fails(&model, d.path(), &["regular expression", "list"]);
    let d = edit(|c| c["bias"] = "all".into());
    grads_fails(&model, d.path(), &["bias", "none"]);
    // targets that name fewer modules than the file holds
    let d = edit(|c| c["target_modules"] = serde_json::json!(["c_attn", "c_fc"]));
    grads_fails(&model, d.path(), &["c_proj", "do not name"]);

    // a rank larger than the layer: r = 64 on n_embd 48 (tensors and config agree)
    let d = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("lora").join(peft::CONFIG_FILE)).unwrap()).unwrap();
    cfg["r"] = 64.into();
    cfg["target_modules"] = serde_json::json!(["c_attn"]);
    std::fs::write(d.path().join(peft::CONFIG_FILE), cfg.to_string()).unwrap();
    let tensors: Vec<(String, Tensor)> = (0..2)
        .flat_map(|i| {
            let m = format!("base_model.model.transformer.h.{i}.attn.c_attn");
            [
                (format!("{m}.lora_A.weight"), Tensor::zeros([64, 48])),
                (format!("{m}.lora_B.weight"), Tensor::zeros([144, 64])),
            ]
        })
        .collect();
    kiln::io::safetensors::save(&d.path().join(peft::WEIGHTS_FILE), &tensors, &[]).unwrap();
    grads_fails(&model, d.path(), &["r = 64", "larger than", "48 -> 144"]);

    // missing or unreadable files
    grads_fails(&model, Path::new("/nonexistent/adapter"), &["/nonexistent/adapter"]);
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("lora").join(peft::CONFIG_FILE), d.path().join(peft::CONFIG_FILE)).unwrap();
    grads_fails(&model, d.path(), &["adapter_model.safetensors"]);
    let d = edit(|_| {});
    std::fs::write(d.path().join(peft::CONFIG_FILE), "{ not json").unwrap();
    grads_fails(&model, d.path(), &["adapter_config.json", "not valid JSON"]);
    let d = edit(|_| {});
    let w = d.path().join(peft::WEIGHTS_FILE);
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    grads_fails(&model, d.path(), &["adapter_model.safetensors", "truncated or corrupt"]);
}

#[test]
fn an_adapter_for_another_base_model_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = fixture("lora");
    // wider: n_embd 128 (the tiny preset) against the adapter's 48
    let wide = tmp.path().join("wide");
    let o = kiln(&["init", "--preset", "tiny", "--out", s(&wide)]);
    assert!(o.status.success(), "{}", text(&o));
    fails_with(
        &["generate", "--model", s(&wide), "--adapter", s(&adapter), "--prompt-ids", "1,2"],
        &["made for a model with n_embd 48, this model has n_embd 128", "base model it was trained from"],
    );
    fails_with(
        &["merge", "--model", s(&wide), "--adapter", s(&adapter), "--out", s(&tmp.path().join("m"))],
        &["n_embd 48", "n_embd 128"],
    );
    // deeper and shallower than the adapter's 2 layers, same width
    for (n_layer, needles) in [(3, &["n_layer = 2", "n_layer = 3"][..]), (1, &["layer 1", "n_layer = 1"][..])] {
        let cfg = base().config.with_n_layer(n_layer);
        let dir = tmp.path().join(format!("layers{n_layer}"));
        save_model(&Model::new_random(cfg, 0).unwrap(), &dir, DType::F32).unwrap();
        grads_fails(&dir, &adapter, needles);
        let mut m = load_model(&dir).unwrap();
        let e = err_of(load_adapter(&mut m, &adapter));
        assert!(needles.iter().all(|n| e.contains(n)), "{e}");
        assert!(m.lora.is_none() && m.params.iter().all(|p| p.trainable), "a failed load leaves the model as it was");
    }
}

// ----------------------------------------------------------- LoRA on wte and lm_head

fn embedding_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft-embedding").join(name)
}

/// lora_embedding (inputs A [r, V], B [C, r]) and lora_linear with the weight stored
/// [out, in] (lm_head's layout), against finite differences at small, awkward sizes. The ids
/// repeat, so the scatter into dA must accumulate.
#[test]
fn embedding_and_lm_head_lora_grads_match_finite_differences() {
    for (i, &(b, t, v, c, r)) in
        [(2usize, 5usize, 7usize, 6usize, 3usize), (1, 9, 4, 11, 1), (3, 4, 13, 5, 4)].iter().enumerate()
    {
        let mut g = rng(60 + i as u64);
        let inputs = vec![rand_tensor(&mut g, &[r, v], 1.0), rand_tensor(&mut g, &[c, r], 1.0)];
        let ids = Tensor::from_i32((0..b * t).map(|j| ((j * 5 + i) % v) as i32).collect(), [b, t]).unwrap();
        let label = format!("lora_embedding ids [{b}, {t}] V={v} C={c} r={r}");
        grad_check(&label, &inputs, &[0, 1], Objective::Probe(5), FD, 48, |tape, x| {
            lora_embedding(tape, &ids, &x[0], &x[1], 1.3)
        });
    }
    // lm_head: x [.., C], W = wte [V, C] (OutIn), A [r, C], B [V, r]; no bias, with and without dropout
    for (i, &(x, n, r)) in SHAPES.iter().enumerate() {
        for (p, train) in [(0.0, false), (0.3, true)] {
            let mut inputs = op_inputs(70 + i as u64, x, n, r);
            let k = *x.last().unwrap();
            inputs[1] = rand_tensor(&mut rng(80 + i as u64), &[n, k], 1.0);
            let label = format!("lora_linear OutIn x={x:?} out={n} r={r} dropout={p}");
            grad_check(&label, &inputs[..4], &[0, 1, 2, 3], Objective::Probe(3), FD, 48, |t, v| {
                lora_linear(
                    t,
                    &v[0],
                    &v[1],
                    WeightLayout::OutIn,
                    None,
                    &LoraAdapter { a: &v[2], b: &v[3], scaling: 1.7, dropout_p: p, train, seed: 99 },
                )
            });
        }
    }
}

/// Both new paths against plain computations: lora_embedding against s A[:, id]^T B^T summed in
/// f64 (1e-5 absolute on outputs of order 1), lora_linear(OutIn, W^T) against
/// lora_linear(InOut, W) with the same dropout mask (outputs and gradients, 1e-5 relative: the
/// same products in another memory layout).
#[test]
fn embedding_and_lm_head_lora_equal_their_composite_twins() {
    let (v, c, r, s) = (9usize, 5usize, 3usize, 2.5f32);
    let mut g = rng(90);
    let (a, b) = (rand_tensor(&mut g, &[r, v], 1.0), rand_tensor(&mut g, &[c, r], 1.0));
    let ids = Tensor::from_i32(vec![3, 0, 8, 3, 3, 1], [2, 3]).unwrap();
    let got = lora_embedding(&mut Tape::inference(), &ids, &a, &b, s).unwrap();
    assert_eq!(got.dims(), [2, 3, c]);
    let (ad, bd, idv, gd) = (a.f32s().unwrap(), b.f32s().unwrap(), ids.i32s().unwrap(), got.f32s().unwrap());
    for (row, &id) in idv.iter().enumerate() {
        for o in 0..c {
            let want: f64 =
                (0..r).map(|j| ad[j * v + id as usize] as f64 * bd[o * r + j] as f64).sum::<f64>() * s as f64;
            assert!((gd[row * c + o] as f64 - want).abs() < 1e-5, "row {row}, channel {o}");
        }
    }
    // a token id outside [0, V) is refused, as the embedding refuses it
    let bad = Tensor::from_i32(vec![9], [1, 1]).unwrap();
    assert!(lora_embedding(&mut Tape::inference(), &bad, &a, &b, s).unwrap_err().to_string().contains("9"));
    assert!(lora_embedding(&mut Tape::inference(), &ids, &a, &Tensor::zeros([c, r + 1]), s).is_err());

    for (i, &(x, n, r)) in SHAPES.iter().enumerate() {
        let vv = op_inputs(100 + i as u64, x, n, r);
        let k = *x.last().unwrap();
        let w = vv[1].f32s().unwrap();
        let wt: Vec<f32> = (0..n * k).map(|j| w[(j % k) * n + j / k]).collect(); // [n, k]
        let wt = Tensor::from_f32(wt, [n, k]).unwrap();
        let mut t1 = Tape::new();
        let mut t2 = Tape::new();
        for t in [&vv[0], &vv[2], &vv[3]] {
            t1.watch(t);
            t2.watch(t);
        }
        let y1 = lora_linear(
            &mut t1,
            &vv[0],
            &wt,
            WeightLayout::OutIn,
            None,
            &LoraAdapter { a: &vv[2], b: &vv[3], scaling: s, dropout_p: 0.2, train: true, seed: 5 },
        )
        .unwrap();
        let y2 = lora_linear(
            &mut t2,
            &vv[0],
            &vv[1],
            WeightLayout::InOut,
            None,
            &LoraAdapter { a: &vv[2], b: &vv[3], scaling: s, dropout_p: 0.2, train: true, seed: 5 },
        )
        .unwrap();
        assert!(max_rel_err_t(&y1, &y2) < 1e-5, "forward x={x:?}");
        let rows = y1.shape().rows();
        let targets =
            Tensor::from_i32((0..rows).map(|j| (j % n) as i32).collect(), &y1.dims()[..y1.dims().len() - 1]).unwrap();
        let l1 = kiln::ops::xent::cross_entropy(&mut t1, &y1, &targets).unwrap();
        let l2 = kiln::ops::xent::cross_entropy(&mut t2, &y2, &targets).unwrap();
        let (g1, g2) = (t1.backward(&l1).unwrap(), t2.backward(&l2).unwrap());
        for (what, t) in [("dx", &vv[0]), ("dA", &vv[2]), ("dB", &vv[3])] {
            let e = max_rel_err_t(g1.get(t).unwrap(), g2.get(t).unwrap());
            assert!(e < 1e-5, "{what} x={x:?}: rel err {e}");
        }
        assert!(g1.get(&wt).is_none(), "the frozen weight gets no gradient");
    }
}

#[test]
fn embedding_and_lm_head_lora_match_peft() {
    check_against("wte+lm_head+c_attn", &embedding_fixture("adapter"), &embedding_fixture("grads.safetensors"));
    let m = with_adapter(&embedding_fixture("adapter"));
    let l = m.lora.as_ref().unwrap();
    let kinds: Vec<(&str, kiln::nn::lora::ModuleKind)> =
        l.modules().iter().map(|m| (m.module.as_str(), m.kind)).collect();
    assert_eq!(
        kinds,
        [
            ("transformer.wte", kiln::nn::lora::ModuleKind::Embedding),
            ("transformer.h.0.attn.c_attn", kiln::nn::lora::ModuleKind::Conv1d),
            ("transformer.h.1.attn.c_attn", kiln::nn::lora::ModuleKind::Conv1d),
            ("lm_head", kiln::nn::lora::ModuleKind::LmHead)
        ]
    );
    // the adapter matters: without it the logits differ
    assert!(max_rel_err_t(&logits(&base()), &logits(&m)) > 1e-3);
}

#[test]
fn embedding_and_lm_head_adapters_save_load_and_keep_peft_s_layout() {
    let model = with_adapter(&embedding_fixture("adapter"));
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&model, dir.path()).unwrap();
    // PEFT's names and bytes, less its copies of the tied embedding matrix (base_layer.weight)
    let ours = kiln::io::safetensors::SafeFile::open(&dir.path().join(peft::WEIGHTS_FILE)).unwrap();
    let theirs =
        kiln::io::safetensors::SafeFile::open(&embedding_fixture("adapter/adapter_model.safetensors")).unwrap();
    let mut want: Vec<String> = theirs.names().into_iter().filter(|n| !n.ends_with(".base_layer.weight")).collect();
    let mut got = ours.names();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert!(got.contains(&"base_model.model.transformer.wte.lora_embedding_A".to_string()));
    assert!(got.contains(&"base_model.model.lm_head.lora_B.weight".to_string()));
    for n in &want {
        assert_eq!(ours.info(n).unwrap(), theirs.info(n).unwrap(), "{n}");
        assert_eq!(ours.tensor(n).unwrap().raw_bytes().unwrap(), theirs.tensor(n).unwrap().raw_bytes().unwrap(), "{n}");
    }
    let read = |p: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap() };
    let json = read(&dir.path().join(peft::CONFIG_FILE));
    let mut t: Vec<&str> = json["target_modules"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
    t.sort();
    assert_eq!(t, ["c_attn", "lm_head", "wte"]);
    // loads back to the same adapter, and to the same logits
    let again = with_adapter(dir.path());
    let (a, b) = (model.lora.as_ref().unwrap(), again.lora.as_ref().unwrap());
    assert_eq!(a.modules(), b.modules());
    for (p, q) in a.params.iter().zip(b.params.iter()) {
        assert_eq!((&p.name, p.tensor.f32s().unwrap()), (&q.name, q.tensor.f32s().unwrap()));
    }
    assert_eq!(logits(&model).f32s().unwrap(), logits(&again).f32s().unwrap());

    // PEFT's copy of the embedding matrix must be this base model's wte
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(embedding_fixture("adapter").join(peft::CONFIG_FILE), copy.path().join(peft::CONFIG_FILE)).unwrap();
    let mut tensors: Vec<(String, Tensor)> = theirs
        .names()
        .into_iter()
        .map(|n| {
            let t = theirs.tensor_f32(&n).unwrap();
            (n, t)
        })
        .collect();
    let i = tensors.iter().position(|(n, _)| n == "base_model.model.transformer.wte.base_layer.weight").unwrap();
    let mut w = tensors[i].1.f32s().unwrap().to_vec();
    w[5] += 1.0;
    tensors[i].1 = Tensor::from_f32(w, tensors[i].1.dims()).unwrap();
    kiln::io::safetensors::save(&copy.path().join(peft::WEIGHTS_FILE), &tensors, &[]).unwrap();
    let e = err_of(load_adapter(&mut base(), copy.path()));
    assert!(e.contains("transformer.wte.base_layer.weight") && e.contains("differs"), "{e}");
}

#[test]
fn a_fresh_embedding_and_lm_head_adapter_is_peft_initialised_and_trains_both_factors() {
    let mut model = base();
    let before = logits(&model);
    let cfg = LoraConfig::new(4, 8.0, 0.1, &LoraConfig::parse_targets("wte,lm_head,c_attn"), false).unwrap();
    lora::attach(&mut model, cfg, 2).unwrap();
    let l = model.lora.as_ref().unwrap();
    assert_eq!(l.modules().len(), 4);
    let wte = l.adapter("transformer.wte").unwrap();
    assert_eq!((wte.a.dims(), wte.b.dims()), (&[4usize, 96][..], &[48usize, 4][..]));
    // PEFT: lora_embedding_A = 0, lora_embedding_B ~ N(0, 1)
    assert!(wte.a.f32s().unwrap().iter().all(|&x| x == 0.0));
    let bv = wte.b.f32s().unwrap();
    let var = bv.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / bv.len() as f64;
    assert!((var - 1.0).abs() < 0.3, "lora_embedding_B variance {var}"); // 192 draws: sd of the estimate ~0.1
                                                                         // lm_head as a Linear: lora_A uniform within 1/sqrt(C), lora_B = 0
    let head = l.adapter("lm_head").unwrap();
    assert_eq!((head.a.dims(), head.b.dims()), (&[4usize, 48][..], &[96usize, 4][..]));
    assert!(
        head.a.f32s().unwrap().iter().all(|&x| x.abs() <= 1.0 / 48f32.sqrt())
            && head.a.f32s().unwrap().iter().any(|&x| x != 0.0)
    );
    assert!(head.b.f32s().unwrap().iter().all(|&x| x == 0.0));
    // the model computes what it did
    assert_eq!(logits(&model).f32s().unwrap(), before.f32s().unwrap());
    // training mode (adapter dropout 0.1 on lm_head's input) back-propagates into every adapter
    // tensor and no base one; the gradients of the zero factors are nonzero
    let (ids, targets) = batch();
    let mut tape = Tape::new();
    let loss = model.forward(&mut tape, &ids, Some(&targets), Mode::Train { seed: 3 }).unwrap().loss.unwrap();
    let g = tape.backward(&loss).unwrap();
    let l = model.lora.as_ref().unwrap();
    assert_eq!(g.len(), l.params.len());
    for name in ["base_model.model.transformer.wte.lora_embedding_A", "base_model.model.lm_head.lora_B.weight"] {
        let t = g.get(l.params.get(name).unwrap()).unwrap();
        assert!(t.f32s().unwrap().iter().any(|&x| x != 0.0), "{name}: zero gradient");
    }
    // all-linear keeps its meaning: the Conv1D layers only
    let mut m = base();
    lora::attach(&mut m, LoraConfig::new(4, 8.0, 0.0, &["all-linear"], false).unwrap(), 0).unwrap();
    assert!(m.lora.unwrap().modules().iter().all(|m| m.kind == kiln::nn::lora::ModuleKind::Conv1d));
}

#[test]
fn an_adapter_on_wte_or_lm_head_is_not_merged() {
    for targets in [&["wte"][..], &["lm_head"], &["c_attn", "wte", "lm_head"]] {
        let mut m = base();
        lora::attach(&mut m, LoraConfig::new(4, 8.0, 0.0, targets, false).unwrap(), 0).unwrap();
        let e = lora::merged(&m).err().expect("merging must be refused").to_string();
        for n in ["cannot merge", "tied", "--adapter"] {
            assert!(e.contains(n), "{targets:?}: the error should mention '{n}': {e}");
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    fails_with(
        &["merge", "--model", s(&fixture("model")), "--adapter", s(&embedding_fixture("adapter")), "--out", s(&out)],
        &["cannot merge", "transformer.wte and lm_head", "share one weight", "--adapter"],
    );
    assert!(!out.join("model.safetensors").exists(), "a refused merge writes nothing");
}

#[test]
fn grads_and_generate_take_an_embedding_and_lm_head_adapter() {
    let adapter = embedding_fixture("adapter");
    grads_cli_matches(&adapter, &embedding_fixture("grads.safetensors"));

    // Generation: the KV-cached path applies both adapters as the full forward pass does.
    // Greedy decoding step by step through `forward` (no cache) is the reference.
    let model = with_adapter(&adapter);
    let prompt = [5u32, 17, 3, 60, 2];
    let mut seq: Vec<u32> = prompt.to_vec();
    for _ in 0..12 {
        let ids = Tensor::from_i32(seq.iter().map(|&x| x as i32).collect(), [1, seq.len()]).unwrap();
        let lg = model.forward(&mut Tape::inference(), &ids, None, Mode::Eval).unwrap().logits.unwrap();
        let v = model.config.vocab_size();
        let last = &lg.f32s().unwrap()[(seq.len() - 1) * v..];
        let best = (0..v).max_by(|&a, &b| last[a].total_cmp(&last[b])).unwrap();
        seq.push(best as u32);
    }
    let cfg = kiln::model::generate::GenerateConfig { max_new_tokens: 12, eos_token_id: None, ..Default::default() };
    let run = |m: &Model| kiln::model::generate::generate(m, &prompt, &cfg, |_, _| {}).unwrap().remove(0);
    let cached = run(&model);
    assert_eq!(cached, seq, "KV-cached greedy vs full-forward greedy");
    assert_ne!(cached, run(&base()), "the adapter changes what is generated");
    // and the command line
    let o = kiln(&[
        "generate",
        "--model",
        s(&fixture("model")),
        "--prompt-ids",
        "5,17,3,60,2",
        "--max-new-tokens",
        "12",
        "--ignore-eos",
        "--adapter",
        s(&adapter),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let printed: Vec<u32> =
        String::from_utf8(o.stdout).unwrap().trim().split(',').map(|x| x.trim().parse().unwrap()).collect();
    assert_eq!(printed, seq);
}
