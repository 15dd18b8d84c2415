//! The inputs fuzzing found, one each, as plain tests: each failed before its fix.

use super::*;

/// The error `load` gives for `file`, after `check`'s no-panic, heap and naming checks.
fn load_error<T>(file: &Path, load: impl FnOnce() -> kiln::Result<T>) -> String {
    let len = std::fs::metadata(file).map_or(0, |m| m.len() as usize);
    let mut msg = None;
    if let Err(e) = check(file, len, || load().inspect_err(|e| msg = Some(e.to_string()))) {
        panic!("{e}");
    }
    msg.unwrap_or_else(|| panic!("{} loaded; it should have been refused", file.display()))
}

/// Writes `value` over the first element of tensor `name` in a safetensors file (F32 data).
fn poke_f32(file: &Path, name: &str, value: f32) {
    let (header, mut data) = st_split(&std::fs::read(file).unwrap()).unwrap();
    let start = header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    data[start..start + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(file, st_join(&header, &data)).unwrap();
}

/// A copy of the f32 seed model with one key of config.json set to `value`.
fn model_with_config(key: &str, value: Value) -> tempfile::TempDir {
    let dir = case_dir(Some(&seeds().model_f32));
    let path = dir.path().join("config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    cfg[key] = value;
    std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    dir
}

#[test]
fn a_config_json_larger_than_its_weights_is_refused_before_allocating() {
    let _serial = serial();
    // Before: 1.2 million parameter shapes were built (160 MB) before any was looked up.
    let dir = model_with_config("n_layer", 100_000.into());
    let msg = load_error(&dir.path().join("config.json"), || checkpoint::load_model(dir.path()));
    assert!(msg.contains("has no tensor 'transformer.h.2.ln_1.weight'"), "{msg}");
    // and sizes whose parameter count overflows are refused before any shape is computed
    let dir = model_with_config("n_embd", (1u64 << 63).into());
    let msg = load_error(&dir.path().join("config.json"), || checkpoint::load_model(dir.path()));
    assert!(msg.contains("overflows"), "{msg}");
}

#[test]
fn weights_a_config_json_does_not_have_are_named_by_their_file() {
    let _serial = serial();
    // Before: only the directory was named.
    let dir = model_with_config("n_layer", 1.into());
    let msg = load_error(&dir.path().join("model.safetensors"), || checkpoint::load_model(dir.path()));
    assert!(msg.contains("transformer.h.1.") && msg.contains("config.json"), "{msg}");
}

#[test]
fn a_config_json_float_beyond_f32_is_refused() {
    let _serial = serial();
    // Before: 1e300 became an infinite layer_norm_epsilon, and every layer norm output 0.
    let dir = model_with_config("layer_norm_epsilon", serde_json::json!(1e300));
    let msg = load_error(&dir.path().join("config.json"), || checkpoint::load_model(dir.path()));
    assert!(msg.contains("layer_norm_epsilon"), "{msg}");
}

#[test]
fn non_finite_weights_are_refused_with_their_tensor() {
    let _serial = serial();
    // Before: a NaN weight loaded, and every loss and logit computed from it was NaN.
    let dir = case_dir(Some(&seeds().model_f32));
    let file = dir.path().join("model.safetensors");
    poke_f32(&file, "transformer.h.0.attn.c_attn.weight", f32::NAN);
    let msg = load_error(&file, || checkpoint::load_model(dir.path()));
    assert!(msg.contains("transformer.h.0.attn.c_attn.weight") && msg.contains("NaN"), "{msg}");

    let dir = case_dir(Some(&seeds().adapter));
    let file = dir.path().join(peft::WEIGHTS_FILE);
    let name = "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight";
    poke_f32(&file, name, f32::INFINITY);
    let mut model = checkpoint::load_model(&seeds().model_f32).unwrap();
    let msg = load_error(&file, || peft::load_adapter(&mut model, dir.path()));
    assert!(msg.contains(name) && msg.contains("inf"), "{msg}");
}

#[test]
fn a_json_syntax_error_inside_the_decoder_of_tokenizer_json_is_an_error() {
    let _serial = serial();
    // Before: the tokenizers crate panicked ("Helper") on a syntax error inside "decoder".
    let dir = case_dir(None);
    let path = dir.path().join("tokenizer.json");
    let text = std::fs::read_to_string(&seeds().tokenizer).unwrap();
    let at = text.find("\"decoder\": {").expect("the seed has a decoder") + "\"decoder\": {".len();
    std::fs::write(&path, format!("{}]{}", &text[..at], &text[at..])).unwrap();
    let msg = load_error(&path, || Tokenizer::load(&path));
    assert!(msg.contains("not valid JSON"), "{msg}");
}

#[test]
fn a_token_file_id_outside_its_vocabulary_is_refused() {
    let _serial = serial();
    // Before: the file opened, and the id failed later as a "batch" token out of range, or not at
    // all when it fell outside the windows drawn.
    let dir = case_dir(None);
    let path = dir.path().join("train.tok");
    let mut data = std::fs::read(&seeds().token_file).unwrap();
    data[32 + 2 * 5..][..2].copy_from_slice(&0xfffeu16.to_le_bytes());
    std::fs::write(&path, data).unwrap();
    let msg = load_error(&path, || TokenFile::open(&path));
    assert!(msg.contains("65534") && msg.contains("position 5"), "{msg}");
}

#[test]
fn a_negative_token_id_in_a_batch_file_is_refused_naming_the_file() {
    let _serial = serial();
    // Before: the error came from the model ("token id -1 at batch row 0 ...") without the file.
    let dir = case_dir(None);
    let path = dir.path().join("batch.safetensors");
    let ids = Tensor::from_i32(vec![5, -1, 7, 8], [2, 2]).unwrap();
    kst::save(&path, &[("input_ids".into(), ids)], &[]).unwrap();
    let msg = load_error(&path, || Batch::load(&path));
    assert!(msg.contains("'input_ids' holds -1 at row 0, position 1"), "{msg}");
}

#[test]
fn nan_and_infinity_in_a_run_config_are_refused() {
    let _serial = serial();
    // Before: `weight_decay = nan` and `--set model.dropout=inf` were accepted.
    let dir = case_dir(None);
    let path = dir.path().join("run.toml");
    std::fs::write(&path, "[train]\nweight_decay = nan\n").unwrap();
    let msg = load_error(&path, || RunConfig::load(Some(&path), &[]));
    assert!(msg.contains("train.weight_decay"), "{msg}");
    let msg = RunConfig::load(None, &["model.dropout=inf".into()]).unwrap_err().to_string();
    assert!(msg.contains("model.dropout"), "{msg}");
}

#[test]
fn the_closed_form_parameter_count_matches_the_shapes() {
    let _serial = serial();
    for name in kiln::model::gpt2::PRESETS {
        let c = Gpt2Config::preset(name).unwrap();
        assert_eq!(c.checked_num_params(), Some(c.num_params()), "{name}");
    }
    let mut c = tiny_config();
    c.n_inner = Some(40);
    assert_eq!(c.checked_num_params(), Some(c.num_params()));
    c.n_layer = usize::MAX;
    assert_eq!(c.checked_num_params(), None);
}

#[test]
fn inconsistent_bpe_files_are_errors_not_panics() {
    let _serial = serial();
    // Before: the tokenizers crate panicked on both (a length underflow, a buffer overrun).
    let dir = case_dir(None);
    let path = dir.path().join("tokenizer.json");
    let mut tj: Value = serde_json::from_slice(&std::fs::read(&seeds().tokenizer).unwrap()).unwrap();
    tj["model"]["continuing_subword_prefix"] = "a prefix longer than any token".into();
    std::fs::write(&path, serde_json::to_vec(&tj).unwrap()).unwrap();
    let msg = load_error(&path, || Tokenizer::load(&path));
    assert!(msg.contains("fails on it"), "{msg}");
    // through the binary: one error line, and no panic message from the default hook before it
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["pretrain", "--out", dir.path().join("run").to_str().unwrap(), "--tokenizer", path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.lines().count() == 1 && err.starts_with("error: ") && !err.contains("panicked"), "{err}");

    let dir = case_dir(None);
    let (vocab, merges) = (dir.path().join("vocab.json"), dir.path().join("merges.txt"));
    std::fs::write(&vocab, r#"{"ab": 0, "cd": 1}"#).unwrap();
    std::fs::write(&merges, "#version: 0.2\nab cd\n").unwrap();
    let msg = load_error(&merges, || Tokenizer::load(dir.path()));
    assert!(msg.contains("needs the token 'abcd'") && msg.contains("vocab.json"), "{msg}");
}
