//! `kiln compare` end to end at a small scale: every requested method runs, the table and the
//! plot are written, and pre-training shows in the held-out answers.

#[cfg(feature = "cuda")]
mod common;

use std::process::Command;

#[test]
fn compare_runs_each_method_and_writes_table_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cmp");
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "compare",
            "--out",
            out.to_str().unwrap(),
            "--pretrain-steps",
            "60",
            "--steps",
            "20",
            "--methods",
            "scratch,full,lora",
        ])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{text}");
    let table = std::fs::read_to_string(out.join("compare.md")).unwrap();
    for needle in ["| scratch |", "| full |", "| lora |", "trainable params", "held-out accuracy", "steps to val loss"]
    {
        assert!(table.contains(needle), "the table lacks '{needle}':\n{table}");
    }
    assert!(out.join("compare.svg").exists());
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    // LoRA trains a small fraction of what full fine-tuning trains
    let trainable = |i: usize| rows[i]["trainable"].as_u64().unwrap();
    assert!(trainable(2) * 5 < trainable(1), "{rows:?}");
    for r in rows {
        let v = r["final_val_loss"].as_f64().unwrap();
        assert!(v.is_finite() && v > 0.0, "{r}");
    }
}

/// `kiln compare --device cuda` (or emu, the CUDA kernels emulated, without a GPU): full, LoRA and
/// QLoRA fine-tuning of a small pre-trained model all run on the device and report their rows.
#[cfg(feature = "cuda")]
#[test]
fn compare_runs_every_method_on_the_cuda_backend() {
    let Some(cu) = common::gpu("compare_runs_every_method_on_the_cuda_backend") else { return };
    let device = if cu.is_emulated() { "emu" } else { "cuda" };
    let dir = tempfile::tempdir().unwrap();
    // a small pre-trained model (2 layers of 64) stands in for the tiny preset: the emulator is slow
    let (_, base) = common::sft::base_model(dir.path(), 64);
    let out = dir.path().join("cmp");
    let o = common::cli::kiln_command()
        .args(["compare", "--device", device, "--out", out.to_str().unwrap(), "--pretrained", base.to_str().unwrap()])
        .args(["--steps", "3", "--methods", "full,lora,qlora"])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{text}");
    for needle in ["device memory, measured: peak", "== qlora =="] {
        assert!(text.contains(needle), "the output lacks '{needle}':\n{text}");
    }
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    for r in rows {
        let v = r["final_val_loss"].as_f64().unwrap();
        assert!(v.is_finite() && v > 0.0, "{r}");
    }
}
