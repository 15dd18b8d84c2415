//! `kiln pretrain` and `kiln demo` as a user runs them: Ctrl-C finishes the step, saves and
//! exits cleanly; bad input stops with a clear error; the demo writes what it promises.

mod common;

use common::cli::{fails_after_output, kiln_command, text};

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const SMALL: &[&str] = &[
    "--set",
    "model.n_layer=2",
    "--set",
    "model.n_embd=64",
    "--set",
    "model.n_positions=64",
    "--set",
    "train.seq_len=32",
    "--set",
    "train.batch_size=4",
    "--set",
    "data.builtin_bytes=60000",
    "--set",
    "data.tokenizer_vocab_size=300",
];

#[test]
fn ctrl_c_finishes_the_step_saves_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut child = kiln_command()
        .args(["pretrain", "--out", run.to_str().unwrap(), "--max-steps", "100000", "--set", "train.log_every=1"])
        .args(SMALL)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // wait until training is under way (a few steps logged), then interrupt
    let start = Instant::now();
    while kiln::train::metrics::read(&run.join("metrics.jsonl")).map(|m| m.len()).unwrap_or(0) < 3 {
        assert!(start.elapsed() < Duration::from_secs(120), "training never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The same interrupt, delivered twice at once (as `timeout -s INT` signals the process and then
    // its group, or a terminal signals both `cargo run` and kiln): one interrupt, so a checkpoint.
    for _ in 0..2 {
        let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "kiln did not stop after Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(130), "an interrupted run exits with status 130:\n{t}");
    assert!(t.contains("stopped by an interrupt at step"), "{t}");
    assert!(!t.contains("interrupted again"), "two signals at once are one interrupt:\n{t}");
    let latest = kiln::train::checkpoint::latest(&run).unwrap().expect("a checkpoint was saved on Ctrl-C");
    let logged = kiln::train::metrics::read(&run.join("metrics.jsonl")).unwrap().iter().map(|r| r.step).max().unwrap();
    assert!(
        latest.ends_with(format!("step-{logged:08}")),
        "the checkpoint ({}) is not the last finished step ({logged})",
        latest.display()
    );
    // and the run resumes from it
    let o = kiln_command()
        .args(["pretrain", "--out", run.to_str().unwrap(), "--resume", "--max-steps", &(logged + 2).to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("resuming from step-{logged:08}, {logged}/{} steps done", logged + 2)),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains(&format!("done at step {}", logged + 2)), "{}", text(&o));
}

/// Runs `kiln pretrain` with SMALL and `extra`, returning its output.
fn pretrain(run: &Path, extra: &[&str]) -> Output {
    kiln_command().args(["pretrain", "--out", run.to_str().unwrap()]).args(SMALL).args(extra).output().unwrap()
}

/// The steps metrics.jsonl holds a training loss for, in file order.
fn logged_steps(run: &Path) -> Vec<usize> {
    let m = kiln::train::metrics::read(&run.join("metrics.jsonl")).unwrap();
    m.iter().filter(|r| r.loss.is_some()).map(|r| r.step).collect()
}

#[test]
fn resume_without_a_checkpoint_starts_again_and_keeps_metrics_in_step() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // 6 steps logged, none saved (save_every is larger than the run; --stop-after is not used, so
    // fake the crash by deleting the checkpoint the end of the run writes)
    let o = pretrain(&run, &["--max-steps", "6", "--set", "train.log_every=1", "--set", "train.save_every=100"]);
    assert!(o.status.success(), "{}", text(&o));
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    let o = pretrain(&run, &["--resume", "--max-steps", "4", "--set", "train.log_every=1"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("nothing to resume from") && t.contains("starting from step 1"), "{t}");
    let steps = logged_steps(&run);
    assert_eq!(steps, vec![1, 2, 3, 4], "metrics.jsonl must hold each step once, as the run that exists did them");

    // metrics written after the last checkpoint (a crash before the next save) are dropped on resume
    let o = pretrain(&run, &["--resume", "--max-steps", "8", "--set", "train.log_every=1", "--stop-after", "6"]);
    assert!(o.status.success(), "{}", text(&o));
    let mut m = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    m.push_str("{\"step\":7,\"loss\":1.0,\"elapsed_s\":1.0}\n");
    std::fs::write(run.join("metrics.jsonl"), m).unwrap();
    let o = pretrain(&run, &["--resume", "--max-steps", "8", "--set", "train.log_every=1"]);
    assert!(text(&o).contains("resuming from step-00000006, 6/8 steps done"), "{}", text(&o));
    let steps = logged_steps(&run);
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
}

#[test]
fn a_stop_labels_the_step_of_its_validation_loss() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let o = pretrain(&run, &["--max-steps", "20", "--stop-after", "7", "--set", "train.eval_every=5"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("at step 7:") && t.contains("validation loss") && t.contains(" at step 5 "), "{t}");
}

#[test]
fn a_run_that_cannot_start_leaves_nothing_and_says_so_first() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    for (args, needle) in [
        (vec!["--preset", "gpt5"], "unknown preset"),
        (vec!["--set", "train.lrr=3"], "lrr"),
        (vec!["--tokenizer", "/nonexistent/tokenizer.json"], "/nonexistent/tokenizer.json"),
        (vec!["--data", "/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
        (vec!["--set", "train.seq_len=4096"], "n_positions"),
    ] {
        let o = pretrain(&run, &args);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {t}");
        assert!(o.stdout.is_empty(), "{args:?}: the error must come before any header line:\n{t}");
        let stderr = String::from_utf8_lossy(&o.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: one error line, got:\n{stderr}");
        assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{args:?}: {stderr}");
        assert!(!run.exists(), "{args:?}: a run that could not start left {} behind", run.display());
    }
    // a data file that turns out to be bad while tokenizing: the directory it made is removed too
    std::fs::write(dir.path().join("bad.txt"), b"caf\xe9").unwrap();
    let o = pretrain(&run, &["--data", dir.path().join("bad.txt").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(!run.exists(), "a run that failed before its first step left {} behind", run.display());
}

#[test]
fn progress_without_a_terminal_is_plain_lines() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // stderr is a pipe here, as in a CI log
    let o = pretrain(&run, &["--max-steps", "5"]);
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    for needle in ["training a 300-token byte-level BPE tokenizer", "tokenizing: ", "training: 5/5 steps (100%)"] {
        assert!(err.contains(needle), "stderr lacks '{needle}':\n{err}");
    }
}

#[test]
fn bad_corpora_and_mismatched_models_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    std::fs::write(d.join("empty.txt"), "").unwrap();
    let run = s(&d.join("r1"));
    let mut args = vec!["pretrain", "--out", &run, "--data"];
    let empty = s(&d.join("empty.txt"));
    args.push(&empty);
    fails_after_output(&args, &["empty.txt", "no text"]);
    // a start that failed before its first step does not block the next attempt
    std::fs::write(d.join("ok.txt"), "some words of text, enough to fill a few windows of four tokens. ".repeat(20))
        .unwrap();
    let ok = s(&d.join("ok.txt"));
    let o = kiln_command()
        .args(["pretrain", "--out", &run, "--data", &ok, "--max-steps", "1", "--set", "train.seq_len=4"])
        .args(["--set", "data.tokenizer_vocab_size=260", "--set", "model.n_layer=1", "--set", "model.n_embd=32"])
        .output()
        .unwrap();
    assert!(o.status.success(), "a fresh start after a failed one must not need --overwrite:\n{}", text(&o));

    std::fs::write(d.join("latin1.txt"), b"caf\xe9 au lait").unwrap();
    let latin = s(&d.join("latin1.txt"));
    let run2 = s(&d.join("r2"));
    fails_after_output(&["pretrain", "--out", &run2, "--data", &latin], &["latin1.txt", "UTF-8", "3"]);

    std::fs::write(d.join("short.txt"), "just a few words of text").unwrap();
    let short = s(&d.join("short.txt"));
    let run3 = s(&d.join("r3"));
    let mut a = vec!["pretrain", "--out", &run3, "--data", &short, "--set", "data.val_fraction=0"];
    a.extend(SMALL);
    fails_after_output(&a, &["fewer than one window"]);

    // a model whose vocabulary is smaller than the tokenizer's
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oracle/dev-set/model");
    let init = format!("model.init_from={:?}", model.to_str().unwrap());
    let run4 = s(&d.join("r4"));
    let mut a = vec!["pretrain", "--out", &run4, "--set", &init];
    a.extend(SMALL);
    fails_after_output(&a, &["vocab"]);

    let run5 = s(&d.join("r5"));
    fails_after_output(&["pretrain", "--out", &run5, "--set", "train.lr"], &["section.key=value"]);
    fails_after_output(&["pretrain", "--out", &run5, "--set", "train.learning_rate=3"], &["learning_rate"]);
}

#[test]
fn the_demo_trains_samples_and_writes_its_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("demo");
    let o = kiln_command()
        .args(["demo", "--out", run.to_str().unwrap(), "--steps", "30", "--compare-steps", "10"])
        .args(["--set", "data.builtin_bytes=100000", "--set", "train.eval_every=10"])
        .output()
        .unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for needle in [
        "this machine: sgemm ",
        "before training it answers",
        "after 30 steps it answers",
        "knows where people live",
        "| scratch |",
        "| qlora |",
    ] {
        assert!(t.contains(needle), "demo output lacks '{needle}':\n{t}");
    }
    for f in
        ["metrics.jsonl", "loss.svg", "run.toml", "checkpoints/step-00000030/model.safetensors", "compare/compare.md"]
    {
        assert!(run.join(f).exists(), "the demo did not write {f}");
    }
    let m = kiln::train::metrics::read(&run.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = m.iter().filter_map(|r| r.loss).collect();
    assert!(losses.last().unwrap() < &(losses[0] - 1.0), "30 steps should cut the loss by more than a nat: {losses:?}");
    // the suggested next command is the table's LoRA row: run as printed, it lands on the table's loss
    let line = t.lines().find(|l| l.contains("next, fine-tune it yourself")).expect("a suggested next command");
    let cmd: Vec<&str> = line[line.find("kiln finetune").unwrap()..].split_whitespace().collect();
    let o = kiln_command().args(&cmd[1..]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("compare/compare.json")).unwrap()).unwrap();
    let table =
        rows.as_array().unwrap().iter().find(|r| r["name"] == "lora").unwrap()["final_val_loss"].as_f64().unwrap();
    let out = cmd[cmd.iter().position(|a| *a == "--out").unwrap() + 1];
    let m = kiln::train::metrics::read(&Path::new(out).join("metrics.jsonl")).unwrap();
    let got = m.iter().rev().find_map(|r| r.val_loss).unwrap();
    assert!(
        (got - table).abs() < 1e-9,
        "the suggested command ends at validation loss {got}, the table's LoRA row at {table}"
    );
    // a second demo into the same directory is refused unless --overwrite
    let o = kiln_command().args(["demo", "--out", run.to_str().unwrap(), "--steps", "1"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("--overwrite"));
}

#[test]
fn run_toml_records_the_tokenizer_that_was_built() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // far more tokens than 60 kB of the built-in corpus has merges for
    let o = pretrain(&run, &["--max-steps", "1", "--set", "data.tokenizer_vocab_size=5000"]);
    assert!(o.status.success(), "{}", text(&o));
    let built = kiln::data::tokenizer::Tokenizer::load(&run.join("tokenizer.json")).unwrap().vocab_size();
    assert!(built < 5000, "the test needs a corpus too small for the vocabulary asked ({built})");
    let cfg = kiln::train::RunConfig::load(Some(&run.join("run.toml")), &[]).unwrap();
    assert_eq!(cfg.data.tokenizer_vocab_size, built, "run.toml must record the vocabulary that was built");
    // and the run resumes with its own run.toml
    let o = kiln_command()
        .args(["pretrain", "--out", run.to_str().unwrap(), "--resume", "--max-steps", "2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}
