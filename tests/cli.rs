//! The `kiln` command line, run as a user runs it: eval and grads on the oracle fixture, and a
//! clear error with a non-zero exit code (never a panic) for each kind of bad input.

mod common;

use common::cli::{fails_with, kiln, text};

use kiln::io::checkpoint::load_all;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oracle/dev-set").join(name)
}

/// A copy of the fixture model directory that a test may damage.
fn model_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("model").join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn eval_prints_the_oracle_loss() {
    let o = kiln(&["eval", "--model", s(&fixture("model")), "--batch", s(&fixture("batch.safetensors"))]);
    assert!(o.status.success(), "{}", text(&o));
    let want = load_all(&fixture("forward.safetensors")).unwrap()["loss"].item().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let got: f32 = out.split_whitespace().nth(1).and_then(|x| x.parse().ok()).expect("'loss X' on stdout");
    assert!((got - want).abs() < 1e-5, "kiln eval printed {got}, transformers says {want}");
}

#[test]
fn grads_reproduces_the_oracle_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grads.safetensors");
    let o = kiln(&[
        "grads",
        "--model",
        s(&fixture("model")),
        "--batch",
        s(&fixture("batch.safetensors")),
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let got = load_all(&out).unwrap();
    let want = load_all(&fixture("grads.safetensors")).unwrap();
    assert_eq!(got.len(), want.len() + 1, "every gradient plus the loss");
    let loss_want = load_all(&fixture("forward.safetensors")).unwrap()["loss"].item().unwrap();
    assert!((got["loss"].item().unwrap() - loss_want).abs() < 1e-5);
    for (name, w) in &want {
        let g = got.get(name).unwrap_or_else(|| panic!("kiln grads wrote no '{name}'"));
        let (g, w) = (g.f32s().unwrap(), w.f32s().unwrap());
        let diff = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = w.iter().map(|b| b.abs()).fold(0f32, f32::max);
        assert!(diff / (scale + 1e-6) < 1e-4, "{name}: rel err {}", diff / (scale + 1e-6));
    }
}

#[test]
fn init_writes_a_checkpoint_that_eval_reads_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("tiny");
    let o = kiln(&["init", "--preset", "tiny", "--out", s(&m), "--dtype", "bf16"]);
    assert!(o.status.success(), "{}", text(&o));
    let model = kiln::io::checkpoint::load_model(&m).unwrap();
    assert_eq!(model.config, kiln::Config::Gpt2(kiln::Gpt2Config::preset("tiny").unwrap()));
    fails_with(&["init", "--preset", "tiny", "--out", s(&m)], &["already holds a checkpoint", "--overwrite"]);
    fails_with(&["init", "--preset", "gpt5", "--out", s(&m)], &["unknown preset 'gpt5'", "gpt2-medium"]);
}

#[test]
fn bench_train_step_reports_the_ratio_to_sgemm() {
    let o = kiln(&[
        "bench",
        "train-step",
        "--preset",
        "tiny",
        "--batch",
        "2",
        "--seq",
        "16",
        "--steps",
        "1",
        "--warmup",
        "0",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for needle in ["tokens/s", "GFLOP/s", "% of sgemm", "matmul"] {
        assert!(t.contains(needle), "bench output lacks '{needle}':\n{t}");
    }
}

/// `--predict` prices kernels the emulated device counted; on any other device it says so.
#[test]
fn bench_predict_needs_the_emulated_device() {
    fails_with(&["bench", "train-step", "--preset", "tiny", "--predict"], &["--predict", "--device emu"]);
}

/// `kiln bench train-step --device emu --predict` prints each kernel's floor and the step's, with
/// llm.c's published rate beside it, and says it is a floor.
#[test]
#[cfg(feature = "cuda")]
fn bench_predict_prints_the_step_floor() {
    let o = kiln(&[
        "bench",
        "train-step",
        "--preset",
        "tiny",
        "--batch",
        "2",
        "--seq",
        "32",
        "--device",
        "emu",
        "--predict",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for needle in ["attention_backward_dkdv", "gemm_mma", "step floor:", "tokens/s", "llm.c", "not a measurement"] {
        assert!(t.contains(needle), "predict output lacks '{needle}':\n{t}");
    }
    let floor_ms: f64 = t
        .lines()
        .find_map(|l| l.trim().strip_prefix("step floor: "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no step floor in:\n{t}"));
    assert!(floor_ms > 0.0 && floor_ms.is_finite(), "{t}");
}

#[test]
fn missing_files_are_named() {
    let batch = fixture("batch.safetensors");
    fails_with(&["eval", "--model", "/nonexistent/model", "--batch", s(&batch)], &["/nonexistent/model"]);
    let m = fixture("model");
    fails_with(
        &["eval", "--model", s(&m), "--batch", "/nonexistent/batch.safetensors"],
        &["/nonexistent/batch.safetensors", "exists"],
    );
    let empty = tempfile::tempdir().unwrap();
    fails_with(&["eval", "--model", s(empty.path()), "--batch", s(&batch)], &["config.json"]);
}

#[test]
fn malformed_configs_are_rejected_with_the_reason() {
    let batch = fixture("batch.safetensors");
    let cases: &[(&str, &[&str])] = &[
        ("{ not json", &["config.json", "not valid JSON"]),
        (r#"{"model_type": "gpt2", "vocab_size": 96, "n_embd": 48, "n_layer": 2, "n_head": 4}"#, &["n_positions"]),
        (
            r#"{"vocab_size": -3, "n_positions": 32, "n_embd": 48, "n_layer": 2, "n_head": 4}"#,
            &["vocab_size", "positive integer"],
        ),
        (
            r#"{"vocab_size": 96, "n_positions": 32, "n_embd": 48, "n_layer": 2, "n_head": 4, "activation_function": "relu"}"#,
            &["activation_function", "relu", "gelu_new"],
        ),
        (
            r#"{"vocab_size": 96, "n_positions": 32, "n_embd": 48, "n_layer": 2, "n_head": 5}"#,
            &["not divisible by n_head"],
        ),
        (r#"{"model_type": "mistral", "vocab_size": 96}"#, &["model_type", "mistral", "llama"]),
        (r#"{"model_type": "llama", "vocab_size": 96}"#, &["missing required key", "hidden_size"]),
        (
            r#"{"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64, "attention_bias": true}"#,
            &["attention_bias", "biases"],
        ),
        (
            r#"{"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#,
            &["rope_scaling", "yarn"],
        ),
        (
            r#"{"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 3, "max_position_embeddings": 64}"#,
            &["num_key_value_heads = 3", "divide"],
        ),
        (
            r#"{"vocab_size": 96, "n_positions": 32, "n_embd": 48, "n_layer": 2, "n_head": 4, "scale_attn_by_inverse_layer_idx": true}"#,
            &["scale_attn_by_inverse_layer_idx"],
        ),
    ];
    for (config, needles) in cases {
        let dir = model_copy();
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        fails_with(&["eval", "--model", s(dir.path()), "--batch", s(&batch)], needles);
    }
}

#[test]
fn truncated_or_corrupt_safetensors_are_rejected() {
    let batch = fixture("batch.safetensors");
    let dir = model_copy();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(
        &["eval", "--model", s(dir.path()), "--batch", s(&batch)],
        &["model.safetensors", "truncated or corrupt"],
    );
    let mut bad = bytes.clone();
    bad[10] = b'#'; // inside the JSON header
    std::fs::write(&path, &bad).unwrap();
    fails_with(
        &["eval", "--model", s(dir.path()), "--batch", s(&batch)],
        &["model.safetensors", "truncated or corrupt"],
    );
    std::fs::write(&path, b"").unwrap();
    fails_with(&["eval", "--model", s(dir.path()), "--batch", s(&batch)], &["model.safetensors"]);
}

/// Rewrites the fixture model with one tensor replaced.
fn model_with(name: &str, t: kiln::Tensor) -> tempfile::TempDir {
    let dir = model_copy();
    let mut all: Vec<(String, kiln::Tensor)> =
        load_all(&fixture("model/model.safetensors")).unwrap().into_iter().collect();
    for (n, v) in all.iter_mut() {
        if n == name {
            *v = t.clone();
        }
    }
    kiln::io::safetensors::save(&dir.path().join("model.safetensors"), &all, &[]).unwrap();
    dir
}

#[test]
fn tensors_that_do_not_match_the_config_are_rejected() {
    let batch = fixture("batch.safetensors");
    let wrong_shape = model_with("transformer.h.1.mlp.c_fc.weight", kiln::Tensor::zeros([48, 190]));
    fails_with(
        &["eval", "--model", s(wrong_shape.path()), "--batch", s(&batch)],
        &["transformer.h.1.mlp.c_fc.weight", "[48, 190]", "[48, 192]"],
    );
    let wrong_dtype = model_with("transformer.ln_f.bias", kiln::Tensor::from_i32(vec![0; 48], [48]).unwrap());
    fails_with(
        &["eval", "--model", s(wrong_dtype.path()), "--batch", s(&batch)],
        &["transformer.ln_f.bias", "I32", "F32, BF16 or F16"],
    );
}

fn batch_file(dir: &Path, ids: Vec<i32>, b: usize, t: usize) -> PathBuf {
    let p = dir.join("batch.safetensors");
    let ids = kiln::Tensor::from_i32(ids, [b, t]).unwrap();
    kiln::io::safetensors::save(&p, &[("input_ids".into(), ids)], &[]).unwrap();
    p
}

#[test]
fn bad_batches_are_rejected() {
    let m = fixture("model");
    let dir = tempfile::tempdir().unwrap();
    let mut ids = vec![1; 2 * 8];
    ids[11] = 96;
    let p = batch_file(dir.path(), ids, 2, 8);
    fails_with(&["eval", "--model", s(&m), "--batch", s(&p)], &["token id 96", "row 1, position 3", "vocab_size = 96"]);
    let p = batch_file(dir.path(), vec![1; 40], 1, 40);
    fails_with(&["eval", "--model", s(&m), "--batch", s(&p)], &["40 tokens", "n_positions = 32"]);
    let p = dir.path().join("nobatch.safetensors");
    kiln::io::safetensors::save(&p, &[("tokens".into(), kiln::Tensor::from_i32(vec![1; 4], [1, 4]).unwrap())], &[])
        .unwrap();
    fails_with(&["eval", "--model", s(&m), "--batch", s(&p)], &["input_ids"]);
}

#[test]
#[cfg(not(feature = "cuda"))]
fn cuda_without_the_feature_is_a_clear_error() {
    let o = fails_with(
        &["eval", "--model", s(&fixture("model")), "--batch", s(&fixture("batch.safetensors")), "--device", "cuda"],
        &["built without CUDA", "--features cuda"],
    );
    assert!(!o.contains("loss"), "nothing should run on an unavailable device");
}

/// A binary built with the feature starts on a machine without a GPU and says so plainly.
#[test]
#[cfg(feature = "cuda")]
fn cuda_without_a_gpu_is_a_clear_error() {
    if kiln::backend::cuda::cuda().is_ok() {
        println!("a GPU is present: the no-GPU message cannot be checked here");
        return;
    }
    let o = fails_with(
        &["eval", "--model", s(&fixture("model")), "--batch", s(&fixture("batch.safetensors")), "--device", "cuda"],
        &["no CUDA device"],
    );
    assert!(!o.contains("loss"), "nothing should run on an unavailable device");
    fails_with(&["bench", "kernels"], &["no CUDA device"]);
}
