//! Hugging Face checkpoint directories: kiln reads what transformers writes (the oracle model,
//! the Hub's prefix-less names and buffers, shards) and writes files with transformers' layout:
//! same tensor names, shapes and dtypes, the `format: pt` header, and a config.json that
//! parses back to the same config. (tools/check_transformers.py loads kiln's output in
//! transformers itself, where torch is installed.)

use kiln::io::checkpoint::{load_all, load_model, save_model};
use kiln::io::safetensors::{save, SafeFile};
use kiln::model::{Gpt2Config, Mode, Model};
use kiln::{DType, Tape, Tensor};
use std::path::{Path, PathBuf};

fn fixture_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oracle/dev-set/model")
}

fn logits(model: &Model) -> Vec<f32> {
    let ids = kiln::bench::random_tokens(model.config.vocab_size(), 2, 9, 5).unwrap();
    model.forward(&mut Tape::inference(), &ids, None, Mode::Eval).unwrap().logits.unwrap().f32s().unwrap().to_vec()
}

#[test]
fn kiln_writes_what_transformers_wrote() {
    let model = load_model(&fixture_model()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_model(&model, dir.path(), DType::F32).unwrap();
    let (ours, theirs) = (
        SafeFile::open(&dir.path().join("model.safetensors")).unwrap(),
        SafeFile::open(&fixture_model().join("model.safetensors")).unwrap(),
    );
    assert_eq!(ours.names(), theirs.names(), "tensor names differ from transformers'");
    for n in theirs.names() {
        assert_eq!(ours.info(&n).unwrap(), theirs.info(&n).unwrap(), "{n}: dtype or shape differs");
    }
    assert_eq!(
        ours.metadata().unwrap().get("format").map(String::as_str),
        Some("pt"),
        "transformers requires format=pt"
    );
    // every tensor round-trips bit for bit
    let (a, b) = (
        load_all(&dir.path().join("model.safetensors")).unwrap(),
        load_all(&fixture_model().join("model.safetensors")).unwrap(),
    );
    for (n, t) in &b {
        assert_eq!(a[n].f32s().unwrap(), t.f32s().unwrap(), "{n} changed on the way through kiln");
    }
    // config.json: transformers' keys, and it parses back to the same config
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "gpt2");
    assert_eq!(cfg["architectures"][0], "GPT2LMHeadModel");
    assert_eq!(cfg["activation_function"], "gelu_new");
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(kiln::Config::from_json_file(&dir.path().join("config.json")).unwrap(), model.config);
}

#[test]
fn half_precision_checkpoints_round_trip() {
    let model = Model::new_random(Gpt2Config::preset("tiny").unwrap(), 7).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let dir = tempfile::tempdir().unwrap();
        save_model(&model, dir.path(), dtype).unwrap();
        let f = SafeFile::open(&dir.path().join("model.safetensors")).unwrap();
        let stored = f.info("transformer.wte.weight").unwrap().0;
        assert_eq!(stored, format!("{dtype:?}"));
        let back = load_model(dir.path()).unwrap();
        for p in model.params.iter() {
            // loading converts to f32; the values are the rounded originals exactly
            let want = p.tensor.to_dtype(dtype).unwrap().to_f32_vec().unwrap();
            assert_eq!(back.params.get(&p.name).unwrap().f32s().unwrap(), want.as_slice(), "{} ({dtype:?})", p.name);
        }
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["dtype"], if dtype == DType::BF16 { "bfloat16" } else { "float16" });
    }
}

#[test]
fn f32_round_trip_is_exact() {
    let model = Model::new_random(Gpt2Config::preset("tiny").unwrap(), 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_model(&model, dir.path(), DType::F32).unwrap();
    let back = load_model(dir.path()).unwrap();
    assert_eq!(back.config, model.config);
    assert_eq!(logits(&back), logits(&model));
}

#[test]
fn hub_layout_without_prefix_with_buffers_and_lm_head_loads() {
    // The Hub's gpt2 stores "h.0.attn.c_attn.weight" (no "transformer."), the causal-mask
    // buffers "h.N.attn.bias", and sometimes a copy of lm_head.weight.
    let model = load_model(&fixture_model()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture_model().join("config.json"), dir.path().join("config.json")).unwrap();
    let mut tensors: Vec<(String, Tensor)> = model
        .params
        .iter()
        .map(|p| (p.name.strip_prefix("transformer.").unwrap().to_string(), p.tensor.clone()))
        .collect();
    tensors.push(("h.0.attn.bias".into(), Tensor::zeros([1, 1, 32, 32])));
    tensors.push(("lm_head.weight".into(), model.params.get("transformer.wte.weight").unwrap().clone()));
    save(&dir.path().join("model.safetensors"), &tensors, &[]).unwrap();
    assert_eq!(logits(&load_model(dir.path()).unwrap()), logits(&model));
}

#[test]
fn sharded_checkpoints_load() {
    let model = load_model(&fixture_model()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture_model().join("config.json"), dir.path().join("config.json")).unwrap();
    let all: Vec<(String, Tensor)> = model.params.iter().map(|p| (p.name.clone(), p.tensor.clone())).collect();
    let (a, b) = all.split_at(all.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", a), ("model-00002-of-00002.safetensors", b)] {
        save(&dir.path().join(file), part, &[]).unwrap();
        for (n, _) in part {
            map.insert(n.clone(), file.into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_eq!(logits(&load_model(dir.path()).unwrap()), logits(&model));
}

#[test]
fn unknown_tensors_and_missing_tensors_are_errors() {
    let model = load_model(&fixture_model()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture_model().join("config.json"), dir.path().join("config.json")).unwrap();
    let mut tensors: Vec<(String, Tensor)> = model.params.iter().map(|p| (p.name.clone(), p.tensor.clone())).collect();
    tensors.push(("transformer.h.0.attn.q_proj.weight".into(), Tensor::zeros([4])));
    save(&dir.path().join("model.safetensors"), &tensors, &[]).unwrap();
    let e = load_model(dir.path()).err().expect("an unknown tensor must be refused").to_string();
    assert!(e.contains("q_proj"), "{e}");
    tensors.truncate(3);
    save(&dir.path().join("model.safetensors"), &tensors, &[]).unwrap();
    let e = load_model(dir.path()).err().expect("a missing tensor must be refused").to_string();
    assert!(e.contains("has no tensor") && e.contains("transformer."), "{e}");
}

#[test]
fn a_failed_write_leaves_the_previous_file_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, b"the last good checkpoint").unwrap();
    let r = kiln::io::write_atomic(&path, |w| {
        std::io::Write::write_all(w, b"half of a new chec")?;
        Err(std::io::Error::other("disk full"))
    });
    let e = r.expect_err("the write must report the failure").to_string();
    assert!(e.contains("model.safetensors") && e.contains("disk full"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"the last good checkpoint");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "the temporary file must be removed: {leftovers:?}");
}

#[test]
fn configs_accept_generic_names_and_defaults() {
    let v = serde_json::json!({"model_type": "gpt2", "vocab_size": 10, "max_position_embeddings": 8,
        "hidden_size": 12, "num_hidden_layers": 1, "num_attention_heads": 3, "n_inner": 20});
    let c = Gpt2Config::from_json(&v, Path::new("config.json")).unwrap();
    assert_eq!((c.n_positions, c.n_embd, c.n_layer, c.n_head, c.ffn_dim()), (8, 12, 1, 3, 20));
    assert_eq!(c.layer_norm_epsilon, 1e-5);
    let model = Model::new_random(c, 0).unwrap();
    assert_eq!(model.params.get("transformer.h.0.mlp.c_fc.weight").unwrap().dims(), &[12, 20]);
    assert_eq!(Gpt2Config::preset("gpt2").unwrap().num_params(), 124_439_808, "GPT-2 small's published size");
    assert_eq!(Gpt2Config::preset("gpt2-medium").unwrap().num_params(), 354_823_168);
}

#[test]
fn initialisation_follows_gpt2() {
    let c = Gpt2Config::preset("tiny").unwrap();
    let m = Model::new_random(c.clone(), 0).unwrap();
    let std = |name: &str| {
        let v = m.params.get(name).unwrap().f32s().unwrap();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32).sqrt()
    };
    let proj = 0.02 / (2.0 * c.n_layer as f32).sqrt();
    assert!((std("transformer.wte.weight") - 0.02).abs() < 0.001);
    assert!((std("transformer.h.0.mlp.c_fc.weight") - 0.02).abs() < 0.001);
    assert!((std("transformer.h.1.attn.c_proj.weight") - proj).abs() < 0.1 * proj);
    assert!((std("transformer.h.1.mlp.c_proj.weight") - proj).abs() < 0.1 * proj);
    assert!(m.params.get("transformer.h.0.ln_1.weight").unwrap().f32s().unwrap().iter().all(|&x| x == 1.0));
    assert!(m.params.get("transformer.h.0.attn.c_attn.bias").unwrap().f32s().unwrap().iter().all(|&x| x == 0.0));
    // deterministic in the seed, different across seeds
    assert_eq!(logits(&Model::new_random(c.clone(), 0).unwrap()), logits(&m));
    assert_ne!(logits(&Model::new_random(c, 1).unwrap()), logits(&m));
}

/// The float keys of config.json as f64, as a JSON reader sees them.
fn json_floats(path: &Path) -> Vec<(&'static str, f64)> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    ["layer_norm_epsilon", "embd_pdrop", "resid_pdrop", "attn_pdrop", "initializer_range"]
        .into_iter()
        .map(|k| (k, v[k].as_f64().unwrap_or_else(|| panic!("{k} is not a number in {}", path.display()))))
        .collect()
}

#[test]
fn config_json_holds_the_values_given_not_their_f32_roundings() {
    // `kiln init` with the defaults: the file says 1e-05 and 0.1, not 9.999999747e-06 and 0.10000000149
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["init", "--preset", "tiny", "--out", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let written = json_floats(&dir.path().join("config.json"));
    let want = [
        ("layer_norm_epsilon", 1e-5),
        ("embd_pdrop", 0.1),
        ("resid_pdrop", 0.1),
        ("attn_pdrop", 0.1),
        ("initializer_range", 0.02),
    ];
    assert_eq!(written, want, "{}", std::fs::read_to_string(dir.path().join("config.json")).unwrap());

    // transformers' config.json, read and written by kiln, keeps every float as transformers wrote it
    let theirs = fixture_model().join("config.json");
    let model = load_model(&fixture_model()).unwrap();
    save_model(&model, dir.path(), DType::F32).unwrap();
    assert_eq!(json_floats(&dir.path().join("config.json")), json_floats(&theirs));
    // and values that are not f32-exact survive a read and a write too
    let kiln::Config::Gpt2(mut c) = model.config.clone() else { panic!("a GPT-2 fixture") };
    (c.layer_norm_epsilon, c.resid_pdrop, c.initializer_range) = (1e-6, 0.15, 0.037);
    let v = c.to_json(DType::F32);
    assert_eq!(v["layer_norm_epsilon"].as_f64(), Some(1e-6));
    assert_eq!(v["resid_pdrop"].as_f64(), Some(0.15));
    assert_eq!(v["initializer_range"].as_f64(), Some(0.037));
    assert_eq!(Gpt2Config::from_json(&v, Path::new("config.json")).unwrap(), c);
}
