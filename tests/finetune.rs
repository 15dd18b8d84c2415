//! Supervised fine-tuning end to end: the loss on held-out task examples falls, only
//! completions are trained, a resumed run reproduces the uninterrupted one, and the command
//! prints the cost table and refuses what it cannot do.

mod common;

use common::sft::{base_model, config, losses, opts};
use kiln::train::{finetune::finetune, metrics, Start};
use std::process::Command;

#[test]
fn full_finetuning_lowers_the_held_out_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (_, base) = base_model(dir.path(), 64);
    let cfg = config(&base, &dir.path().join("task.jsonl"), &["train.max_steps=60", "train.eval_every=30"]);
    let s = finetune(&cfg, &dir.path().join("run"), &opts(Start::Fresh, None)).unwrap();
    let evals: Vec<f64> =
        metrics::read(&dir.path().join("run/metrics.jsonl")).unwrap().iter().filter_map(|r| r.val_loss).collect();
    assert_eq!(evals.len(), 2);
    let first_loss = metrics::read(&dir.path().join("run/metrics.jsonl")).unwrap()[0].loss.unwrap();
    println!("task loss {first_loss:.3} at step 1 -> validation {:.3} at step 60", s.val_loss.unwrap());
    assert!(s.val_loss.unwrap() < first_loss - 1.0, "60 steps should cut the held-out loss by a nat");
    assert!(s.checkpoint.unwrap().join("model.safetensors").exists());
}

#[test]
fn a_short_finetune_logs_enough_losses_to_draw_a_curve() {
    let dir = tempfile::tempdir().unwrap();
    let (_, base) = base_model(dir.path(), 32);
    let task = dir.path().join("task.jsonl");
    // the default log_every (10) would log 6 of 50 steps; fine-tuning logs every step of them
    let cfg = config(&base, &task, &["train.max_steps=50", "train.log_every=10", "train.eval_every=0"]);
    finetune(&cfg, &dir.path().join("short"), &opts(Start::Fresh, None)).unwrap();
    let steps: Vec<usize> = losses(&dir.path().join("short")).iter().map(|l| l.0).collect();
    assert_eq!(steps, (1..=50).collect::<Vec<_>>(), "a 50-step fine-tune draws {} points", steps.len());
    let toml = std::fs::read_to_string(dir.path().join("short/run.toml")).unwrap();
    assert!(toml.contains("log_every = 1\n"), "run.toml records what was logged:\n{toml}");
    // a value chosen on purpose is kept
    let cfg = config(&base, &task, &["train.max_steps=20", "train.log_every=5", "train.eval_every=0"]);
    finetune(&cfg, &dir.path().join("chosen"), &opts(Start::Fresh, None)).unwrap();
    let steps: Vec<usize> = losses(&dir.path().join("chosen")).iter().map(|l| l.0).collect();
    assert_eq!(steps, [1, 5, 10, 15, 20]);
}

#[test]
fn a_resumed_finetune_matches_the_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let (_, base) = base_model(dir.path(), 64);
    // 240 examples, 216 after the hold-out: at 32 rows a step an epoch lasts 6.75 steps, so the
    // stop at step 7 falls just after an epoch boundary and the resume must reshuffle the same way
    let cfg = config(
        &base,
        &dir.path().join("task.jsonl"),
        &["train.max_steps=12", "train.batch_size=32", "model.dropout=0.1"],
    );
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    finetune(&cfg, &a, &opts(Start::Fresh, None)).unwrap();
    finetune(&cfg, &b, &opts(Start::Fresh, Some(7))).unwrap();
    finetune(&cfg, &b, &opts(Start::Resume, None)).unwrap();
    assert_eq!(losses(&a).len(), 12);
    assert_eq!(losses(&a), losses(&b));
}

#[test]
fn the_command_prints_its_cost_and_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let (_, base) = base_model(dir.path(), 64);
    let task = dir.path().join("task.jsonl");
    let run = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap();
    let (b, t, out) = (base.to_str().unwrap(), task.to_str().unwrap(), dir.path().join("run"));
    let o = run(&[
        "finetune",
        "--model",
        b,
        "--data",
        t,
        "--out",
        out.to_str().unwrap(),
        "--max-steps",
        "3",
        "--set",
        "train.batch_size=4",
    ]);
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{text}");
    for needle in [
        "trainable",
        "gradients",
        "optimizer state",
        "activations",
        "with checkpointing",
        "peak memory",
        "done at step 3",
    ] {
        assert!(text.contains(needle), "finetune output lacks '{needle}':\n{text}");
    }
    // The binary's counting allocator reports the live peak next to the resident one; a model
    // plus its optimizer state cannot fit in under a megabyte.
    let live: f64 = text
        .split(" MB live")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("finetune output lacks the live peak:\n{text}"));
    assert!(live > 1.0, "live peak {live} MB is implausibly small:\n{text}");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\"}\n").unwrap();
    let o = run(&[
        "finetune",
        "--model",
        b,
        "--data",
        bad.to_str().unwrap(),
        "--out",
        dir.path().join("r2").to_str().unwrap(),
    ]);
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("bad.jsonl") && e.contains("line 2") && e.contains("\"completion\""), "{e}");
    let o =
        run(&["finetune", "--model", "/nonexistent", "--data", t, "--out", dir.path().join("r3").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent"));
}

#[test]
fn lora_finetuning_trains_only_the_adapter_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (_, base) = base_model(dir.path(), 64);
    let task = dir.path().join("task.jsonl");
    let extra = [
        "finetune.method=\"lora\"",
        "finetune.lora_r=4",
        "finetune.lora_dropout=0.1",
        "train.max_steps=10",
        "train.eval_every=10",
    ];
    let cfg = config(&base, &task, &extra);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let s = finetune(&cfg, &a, &opts(Start::Fresh, None)).unwrap();
    let ckpt = s.checkpoint.unwrap();
    assert!(ckpt.join("adapter_config.json").exists() && ckpt.join("adapter_model.safetensors").exists());
    assert!(!ckpt.join("model.safetensors").exists(), "a LoRA checkpoint holds the adapter, not the frozen base");
    // the adapter loads onto the base with kiln's PEFT reader, and moved away from its B = 0 start
    let mut m = kiln::io::checkpoint::load_model(&base).unwrap();
    kiln::io::peft::load_adapter(&mut m, &ckpt).unwrap();
    let lora = m.lora.as_ref().unwrap();
    assert!(lora.params.iter().filter(|p| p.name.contains("lora_B")).any(|p| p
        .tensor
        .f32s()
        .unwrap()
        .iter()
        .any(|&x| x != 0.0)));
    // optimizer state exists for adapter tensors only
    let opt = kiln::io::checkpoint::load_all(&ckpt.join("optimizer.safetensors")).unwrap();
    assert!(!opt.is_empty() && opt.keys().all(|k| k.contains("lora_")), "{:?}", opt.keys().take(3).collect::<Vec<_>>());
    // stop at 4, resume: the same losses
    finetune(&cfg, &b, &opts(Start::Fresh, Some(4))).unwrap();
    finetune(&cfg, &b, &opts(Start::Resume, None)).unwrap();
    assert_eq!(losses(&a).len(), 10);
    assert_eq!(losses(&a), losses(&b));
    assert!(losses(&a)[9].1 < losses(&a)[0].1);
}

#[test]
fn lora_on_wte_and_lm_head_finetunes_into_a_peft_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let (_, base) = base_model(dir.path(), 64);
    let task = dir.path().join("task.jsonl");
    let extra = [
        "finetune.method=\"lora\"",
        "finetune.lora_r=4",
        "finetune.lora_dropout=0.1",
        "finetune.lora_targets=[\"wte\", \"lm_head\", \"c_attn\"]",
        "train.max_steps=8",
    ];
    let cfg = config(&base, &task, &extra);
    let run = dir.path().join("run");
    let ckpt = finetune(&cfg, &run, &opts(Start::Fresh, None)).unwrap().checkpoint.unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("adapter_config.json")).unwrap()).unwrap();
    let mut targets: Vec<&str> =
        json["target_modules"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    targets.sort();
    assert_eq!(targets, ["c_attn", "lm_head", "wte"]);
    let mut m = kiln::io::checkpoint::load_model(&base).unwrap();
    kiln::io::peft::load_adapter(&mut m, &ckpt).unwrap();
    let lora = m.lora.as_ref().unwrap();
    // both factors that start at zero (lora_embedding_A, lm_head's lora_B) have moved
    for name in ["base_model.model.transformer.wte.lora_embedding_A", "base_model.model.lm_head.lora_B.weight"] {
        assert!(lora.params.get(name).unwrap().f32s().unwrap().iter().any(|&x| x != 0.0), "{name} did not train");
    }
    let l = losses(&run);
    assert_eq!(l.len(), 8);
    assert!(l[7].1 < l[0].1, "{l:?}");
}

#[test]
fn eight_bit_adamw_finetunes_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (_, base) = base_model(dir.path(), 64);
    let cfg = config(&base, &dir.path().join("task.jsonl"), &["finetune.optimizer=\"adamw8bit\"", "train.max_steps=8"]);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    finetune(&cfg, &a, &opts(Start::Fresh, None)).unwrap();
    finetune(&cfg, &b, &opts(Start::Fresh, Some(3))).unwrap();
    finetune(&cfg, &b, &opts(Start::Resume, None)).unwrap();
    assert_eq!(losses(&a), losses(&b));
    assert!(losses(&a)[7].1 < losses(&a)[0].1);
    // the checkpoint holds 8-bit codes for the large tensors
    let ckpt = kiln::train::checkpoint::latest(&a).unwrap().unwrap();
    let state = kiln::io::checkpoint::load_all(&ckpt.join("optimizer.safetensors")).unwrap();
    assert!(
        state.iter().any(|(k, t)| k.starts_with("state1.") && t.dtype() == kiln::DType::U8),
        "{:?}",
        state.keys().take(4).collect::<Vec<_>>()
    );
}

#[test]
fn gradient_checkpointing_changes_memory_not_losses() {
    let dir = tempfile::tempdir().unwrap();
    let (_, base) = base_model(dir.path(), 64);
    let task = dir.path().join("task.jsonl");
    let plain = config(&base, &task, &["train.max_steps=5", "model.dropout=0.1"]);
    let ckpt =
        config(&base, &task, &["train.max_steps=5", "model.dropout=0.1", "finetune.gradient_checkpointing=true"]);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    finetune(&plain, &a, &opts(Start::Fresh, None)).unwrap();
    finetune(&ckpt, &b, &opts(Start::Fresh, None)).unwrap();
    assert_eq!(losses(&a).len(), 5);
    assert_eq!(losses(&a), losses(&b), "checkpointing must not change what is computed");
}
