//! Kill kiln in the middle of its writes, and check that nothing a user relies on is ever half
//! written. `KILN_CRASH_AT=N` makes kiln SIGKILL itself at the N-th crash point it reaches (every
//! step of an atomic write, of a checkpoint's rename and of pruning: see `kiln::io::crash_point`),
//! so each test walks N = 1, 2, ... until a run gets through all of them. After each kill:
//!
//! - every `step-*` directory is a complete checkpoint that loads (a half-written one is never
//!   taken for a checkpoint), and `--resume` continues from the newest and ends bit for bit where
//!   an uninterrupted run ends, with metrics.jsonl holding each step once;
//! - `kiln merge` and `kiln quantize` leave their output either absent or complete: the old one,
//!   or the new one, never a mixture.
//!
//! Plus real SIGKILLs from outside at arbitrary moments of a pre-training run.

mod common;

use common::cli::{kiln_command, text};

use kiln::train::checkpoint;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn kiln(args: &[&str], crash_at: Option<usize>) -> Output {
    let mut c = kiln_command();
    c.args(args).env("RAYON_NUM_THREADS", "1");
    if let Some(n) = crash_at {
        c.env("KILN_CRASH_AT", n.to_string());
    }
    c.output().unwrap()
}

/// True when the process died of a signal (the crash point's SIGKILL), false when it exited 0;
/// any other ending fails the test.
fn killed(o: &Output, what: &str) -> bool {
    if o.status.success() {
        return false;
    }
    assert_eq!(o.status.code(), None, "{what}: expected a kill or success, got {:?}:\n{}", o.status, text(o));
    true
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

const TINY: &[&str] = &[
    "--set",
    "model.n_layer=1",
    "--set",
    "model.n_embd=32",
    "--set",
    "model.n_head=2",
    "--set",
    "model.n_positions=32",
    "--set",
    "train.seq_len=16",
    "--set",
    "train.batch_size=4",
    "--set",
    "data.builtin_bytes=30000",
    "--set",
    "data.tokenizer_vocab_size=280",
    "--set",
    "train.log_every=1",
    "--set",
    "train.save_every=1",
    "--set",
    "train.keep_last=2",
    "--set",
    "train.eval_every=0",
];

fn pretrain(run: &Path, steps: usize, extra: &[&str], crash_at: Option<usize>) -> Output {
    let mut a = vec!["pretrain", "--out", run.to_str().unwrap(), "--max-steps"];
    let s = steps.to_string();
    a.push(&s);
    a.extend(TINY);
    a.extend(extra);
    kiln(&a, crash_at)
}

/// The `step-*` directories of a run; each must be a complete checkpoint.
fn check_checkpoints(run: &Path, base: Option<&Path>, what: &str) {
    let root = run.join("checkpoints");
    let mut complete = 0;
    for e in std::fs::read_dir(&root).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !name.starts_with("step-") {
            assert!(name.starts_with('.'), "{what}: unexpected entry {name} in checkpoints/");
            continue;
        }
        let base = base.map(|b| kiln::io::checkpoint::load_model(b).unwrap());
        let mut opt = kiln::optim::AdamW::new(kiln::optim::AdamWConfig::default());
        if let Err(e) = checkpoint::load(&p, base, &mut opt) {
            panic!("{what}: {name} is taken for a checkpoint but does not load: {e}");
        }
        complete += 1;
    }
    assert!(complete > 0, "{what}: no complete checkpoint is left");
}

/// Losses by step in metrics.jsonl; each step must appear once.
fn logged_steps(run: &Path) -> Vec<usize> {
    let steps: Vec<usize> = kiln::train::metrics::read(&run.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter(|r| r.loss.is_some())
        .map(|r| r.step)
        .collect();
    steps
}

fn weights(ckpt: &Path) -> Vec<u8> {
    std::fs::read(ckpt.join("model.safetensors")).unwrap()
}

#[test]
fn pretraining_killed_anywhere_in_a_save_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let o = pretrain(&base, 1, &[], None);
    assert!(o.status.success(), "{}", text(&o));
    // the uninterrupted run from there: 3 steps, a save after each
    let reference = tmp.path().join("reference");
    copy_dir(&base, &reference);
    let o = pretrain(&reference, 3, &["--resume"], None);
    assert!(o.status.success(), "{}", text(&o));
    let want = weights(&reference.join("checkpoints/step-00000003"));

    let (mut points, mut mid_save) = (0, 0);
    for n in 1.. {
        let run = tmp.path().join(format!("run{n}"));
        copy_dir(&base, &run);
        let o = pretrain(&run, 3, &["--resume"], Some(n));
        if !killed(&o, "pretrain") {
            break;
        }
        points = n;
        let what = format!("killed at crash point {n}");
        let root = run.join("checkpoints");
        mid_save += std::fs::read_dir(&root)
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".tmp")) as usize;
        check_checkpoints(&run, None, &what);
        let o = pretrain(&run, 3, &["--resume"], None);
        assert!(o.status.success(), "{what}: the resume failed:\n{}", text(&o));
        assert!(text(&o).contains("resuming from step-"), "{what}: {}", text(&o));
        assert_eq!(weights(&root.join("step-00000003")), want, "{what}: the resumed run ended elsewhere");
        assert_eq!(logged_steps(&run), vec![1, 2, 3], "{what}: metrics.jsonl does not match the run");
        let leftovers: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{what}: temporary directories were left after the resume: {leftovers:?}");
        std::fs::remove_dir_all(&run).unwrap();
    }
    eprintln!(
        "pretrain: killed at {points} crash points, {mid_save} of them inside a checkpoint's temporary directory"
    );
    assert!(points >= 20, "two saves should pass many crash points, got {points}");
    assert!(mid_save >= 5, "few kills landed inside a save ({mid_save}): the test no longer exercises it");
}

#[test]
fn pretraining_killed_from_outside_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("reference");
    let o = pretrain(&reference, 12, &[], None);
    assert!(o.status.success(), "{}", text(&o));
    let want = weights(&reference.join("checkpoints/step-00000012"));
    for (i, delay_ms) in [150u64, 400, 650, 900, 1150].into_iter().enumerate() {
        let run = tmp.path().join(format!("run{i}"));
        let mut a =
            vec!["pretrain".to_string(), "--out".into(), run.display().to_string(), "--max-steps".into(), "12".into()];
        a.extend(TINY.iter().map(|s| s.to_string()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(&a)
            .env("RAYON_NUM_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // start timing once the first checkpoint exists, so each delay lands in training
        let t0 = Instant::now();
        while checkpoint::latest(&run).ok().flatten().is_none() && child.try_wait().unwrap().is_none() {
            assert!(t0.elapsed() < Duration::from_secs(60), "training never saved");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        child.wait().unwrap();
        let what = format!("SIGKILL {delay_ms} ms after the first save");
        check_checkpoints(&run, None, &what);
        let o = pretrain(&run, 12, &["--resume"], None);
        assert!(o.status.success(), "{what}: {}", text(&o));
        assert_eq!(weights(&run.join("checkpoints/step-00000012")), want, "{what}: the resumed run ended elsewhere");
        assert_eq!(logged_steps(&run), (1..=12).collect::<Vec<_>>(), "{what}");
    }
}

/// A base checkpoint with its tokenizer, and a fine-tuning task for it.
fn base_and_task(tmp: &Path) -> (PathBuf, PathBuf) {
    let run = tmp.join("pre");
    let o = pretrain(&run, 2, &[], None);
    assert!(o.status.success(), "{}", text(&o));
    let base = run.join("checkpoints/step-00000002");
    let task = tmp.join("task.jsonl");
    let lines: String = (0..24)
        .map(|i| serde_json::json!({"prompt": format!("Where does person {i} live?"), "completion": format!(" In town {}.", i % 5)}).to_string() + "\n")
        .collect();
    std::fs::write(&task, lines).unwrap();
    (base, task)
}

#[test]
fn lora_fine_tuning_killed_anywhere_in_a_save_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, task) = base_and_task(tmp.path());
    let finetune = |run: &Path, steps: &str, resume: bool, crash_at: Option<usize>| {
        let mut a = vec!["finetune", "--model", base.to_str().unwrap(), "--data", task.to_str().unwrap()];
        a.extend(["--out", run.to_str().unwrap(), "--method", "lora", "--max-steps", steps]);
        a.extend(["--set", "train.save_every=1", "--set", "train.batch_size=4", "--set", "train.log_every=1"]);
        a.extend(["--set", "train.eval_every=0", "--set", "train.seq_len=32"]);
        if resume {
            a.push("--resume");
        }
        kiln(&a, crash_at)
    };
    let first = tmp.path().join("first");
    let o = finetune(&first, "1", false, None);
    assert!(o.status.success(), "{}", text(&o));
    let reference = tmp.path().join("reference");
    copy_dir(&first, &reference);
    assert!(finetune(&reference, "3", true, None).status.success());
    let adapter = |run: &Path| std::fs::read(run.join("checkpoints/step-00000003/adapter_model.safetensors")).unwrap();
    let want = adapter(&reference);
    let mut points = 0;
    for n in 1.. {
        let run = tmp.path().join(format!("run{n}"));
        copy_dir(&first, &run);
        if !killed(&finetune(&run, "3", true, Some(n)), "finetune") {
            break;
        }
        points = n;
        let what = format!("finetune killed at crash point {n}");
        check_checkpoints(&run, Some(&base), &what);
        let o = finetune(&run, "3", true, None);
        assert!(o.status.success(), "{what}: {}", text(&o));
        assert_eq!(adapter(&run), want, "{what}: the resumed run ended elsewhere");
        assert_eq!(logged_steps(&run), vec![1, 2, 3], "{what}");
        std::fs::remove_dir_all(&run).unwrap();
    }
    assert!(points >= 20, "two adapter saves should pass many crash points, got {points}");
}

#[test]
fn merge_and_quantize_killed_anywhere_leave_old_or_new_never_half() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, task) = base_and_task(tmp.path());
    let ft = tmp.path().join("ft");
    let a = ["finetune", "--model", base.to_str().unwrap(), "--data", task.to_str().unwrap(), "--out"];
    let o = kiln(
        &[&a[..], &[ft.to_str().unwrap(), "--method", "lora", "--max-steps", "2", "--set", "train.seq_len=32"]]
            .concat(),
        None,
    );
    assert!(o.status.success(), "{}", text(&o));
    let adapter = checkpoint::latest(&ft).unwrap().unwrap();
    let merge = |out: &Path, crash_at: Option<usize>| {
        let args = ["merge", "--model", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap()];
        kiln(&[&args[..], &["--out", out.to_str().unwrap(), "--overwrite"]].concat(), crash_at)
    };
    let reference = tmp.path().join("merged");
    assert!(merge(&reference, None).status.success());
    let load = |dir: &Path| kiln::io::checkpoint::load_model(dir);
    let new = weights(&reference);
    let old = weights(&base);
    // into a new directory, and over an existing checkpoint (the base's weights)
    for over_old in [false, true] {
        let mut points = 0;
        for n in 1.. {
            let out = tmp.path().join(format!("out-{over_old}-{n}"));
            if over_old {
                copy_dir(&base, &out);
            }
            if !killed(&merge(&out, Some(n)), "merge") {
                break;
            }
            points = n;
            let what = format!("merge (over a checkpoint: {over_old}) killed at crash point {n}");
            if out.join("model.safetensors").exists() {
                let m = load(&out)
                    .unwrap_or_else(|e| panic!("{what}: the output is taken for a checkpoint but does not load: {e}"));
                let w = weights(&out);
                assert!(w == new || w == old, "{what}: the weights are neither the old nor the new ones");
                assert!(out.join("tokenizer.json").exists(), "{what}: weights without their tokenizer");
                assert!(m.config.n_layer() == 1);
                if w == new {
                    assert_eq!(
                        std::fs::read(out.join("config.json")).unwrap(),
                        std::fs::read(reference.join("config.json")).unwrap(),
                        "{what}: new weights beside another config.json"
                    );
                }
            } else {
                assert!(load(&out).is_err(), "{what}: a directory without weights loaded");
            }
        }
        assert!(points >= 4, "merge passes several crash points, got {points}");
    }

    // quantize: the output file is absent or complete
    let q_ref = tmp.path().join("q.safetensors");
    let q = |out: &Path, crash_at: Option<usize>| {
        kiln(&["quantize", "--in", reference.to_str().unwrap(), "--out", out.to_str().unwrap()], crash_at)
    };
    assert!(q(&q_ref, None).status.success());
    let want = std::fs::read(&q_ref).unwrap();
    let mut points = 0;
    for n in 1.. {
        let out = tmp.path().join(format!("q{n}.safetensors"));
        if !killed(&q(&out, Some(n)), "quantize") {
            break;
        }
        points = n;
        if out.exists() {
            assert_eq!(std::fs::read(&out).unwrap(), want, "quantize killed at crash point {n} left a partial file");
        }
    }
    assert!(points >= 3, "quantize passes several crash points, got {points}");

    // quantize into a checkpoint directory, over an existing checkpoint: old, none, or new
    let qdir_ref = tmp.path().join("qdir");
    let qd = |out: &Path, crash_at: Option<usize>| {
        kiln(
            &["quantize", "--in", reference.to_str().unwrap(), "--out", out.to_str().unwrap(), "--overwrite"],
            crash_at,
        )
    };
    assert!(qd(&qdir_ref, None).status.success());
    let (new, new_config) = (weights(&qdir_ref), std::fs::read(qdir_ref.join("config.json")).unwrap());
    let mut points = 0;
    for n in 1.. {
        let out = tmp.path().join(format!("qdir{n}"));
        copy_dir(&base, &out);
        if !killed(&qd(&out, Some(n)), "quantize") {
            break;
        }
        points = n;
        let what = format!("quantize into a checkpoint directory killed at crash point {n}");
        if out.join("model.safetensors").exists() {
            let w = weights(&out);
            assert!(w == new || w == old, "{what}: the weights are neither the old nor the new ones");
            if w == new {
                assert_eq!(std::fs::read(out.join("config.json")).unwrap(), new_config, "{what}: mismatched config");
            }
            load(&out).unwrap_or_else(|e| panic!("{what}: the output does not load: {e}"));
        }
    }
    assert!(points >= 3, "quantize passes several crash points, got {points}");
}
