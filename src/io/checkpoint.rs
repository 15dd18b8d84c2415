//! Hugging Face checkpoint directories: `config.json` + `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`). kiln reads what transformers writes (with or without the
//! `transformer.` prefix, ignoring the causal-mask buffers and the tied `lm_head.weight`) and
//! writes what transformers reads.

use super::safetensors::{self as st, SafeFile};
use crate::model::gpt2::{Gpt2, Gpt2Config};
use crate::nn::ParamStore;
use crate::{DType, Error, Result, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Buffers and tied copies that transformers may store and kiln derives instead.
fn is_ignored(key: &str) -> bool {
    key == "lm_head.weight" || key.ends_with(".attn.bias") || key.ends_with(".attn.masked_bias")
}

/// Opens the weight files of `dir`: one file, or the shards of an index.
fn open_weights(dir: &Path) -> Result<(Vec<SafeFile>, HashMap<String, usize>)> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<SafeFile> = if single.exists() {
        vec![SafeFile::open(&single)?]
    } else if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::read(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::config(&index, format!("not valid JSON ({e})")))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::config(&index, "no \"weight_map\" object"))?;
        let mut shards: Vec<String> = map.values().filter_map(|s| s.as_str().map(String::from)).collect();
        shards.sort();
        shards.dedup();
        shards.iter().map(|s| SafeFile::open(&dir.join(s))).collect::<Result<_>>()?
    } else if dir.join("pytorch_model.bin").exists() {
        return Err(Error::checkpoint(
            dir,
            "holds only pytorch_model.bin; kiln reads safetensors. Convert it with transformers: \
             GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)",
        ));
    } else {
        return Err(Error::checkpoint(dir, "has no model.safetensors: is this a Hugging Face checkpoint directory?"));
    };
    let mut names = HashMap::new();
    for (i, f) in files.iter().enumerate() {
        for n in f.names() {
            names.insert(n, i);
        }
    }
    Ok((files, names))
}

/// Loads a GPT-2 from a Hugging Face checkpoint directory. Weights stored as bf16 or f16 are
/// converted to f32; every tensor's shape is checked against config.json.
pub fn load_gpt2(dir: &Path) -> Result<Gpt2> {
    if !dir.is_dir() {
        let why = if dir.exists() { "it is a file, not a checkpoint directory" } else { "no such directory" };
        return Err(Error::read(dir, std::io::Error::new(std::io::ErrorKind::NotFound, why)));
    }
    let config = Gpt2Config::from_json_file(&dir.join("config.json"))?;
    let (files, names) = open_weights(dir)?;
    let mut params = ParamStore::new();
    let mut used = std::collections::HashSet::new();
    for (name, dims) in config.param_shapes() {
        let short = name.strip_prefix("transformer.").unwrap_or(&name).to_string();
        let Some((key, &fi)) = [&name, &short].into_iter().find_map(|k| names.get_key_value(k.as_str())) else {
            return Err(Error::checkpoint(
                dir,
                format!("model.safetensors has no tensor '{name}': the checkpoint is incomplete or not a GPT-2"),
            ));
        };
        used.insert(key.clone());
        let file = &files[fi];
        let (stored_dtype, stored_dims) = file.info(key)?;
        if stored_dims != dims {
            return Err(Error::checkpoint(
                file.path(),
                format!("tensor '{key}' has shape {stored_dims:?} but config.json implies {dims:?}: the weights and config.json do not belong together"),
            ));
        }
        let t = file.tensor_f32(key).map_err(|_| {
            Error::checkpoint(
                file.path(),
                format!("tensor '{key}' has dtype {stored_dtype}; GPT-2 weights must be F32, BF16 or F16"),
            )
        })?;
        params.insert(name, t);
    }
    let extra: Vec<&String> = names.keys().filter(|k| !used.contains(*k) && !is_ignored(k)).collect();
    if !extra.is_empty() {
        let mut extra: Vec<&str> = extra.into_iter().map(|s| s.as_str()).collect();
        extra.sort();
        extra.truncate(5);
        return Err(Error::checkpoint(
            dir,
            format!(
                "holds tensors a GPT-2 of this config does not have (e.g. {}): is this another architecture?",
                extra.join(", ")
            ),
        ));
    }
    Ok(Gpt2 { config, params, lora: None, nf4: None, gradient_checkpointing: false })
}

/// Writes `model` to `dir` (created if needed) as config.json + model.safetensors in `dtype`.
/// A directory is a checkpoint once its weights are there: an old model.safetensors is removed
/// first and the new one written last (to a temporary name, then renamed), so a crash leaves the
/// old checkpoint, no checkpoint, or the new one, never weights beside a config they do not fit.
/// Other files in `dir` are left alone.
pub fn save_gpt2(model: &Gpt2, dir: &Path, dtype: DType) -> Result<()> {
    save_gpt2_with(model, dir, dtype, &[])
}

/// `save_gpt2`, with `files` (a tokenizer, generation config) copied into `dir` before the
/// weights are written, so a checkpoint is never without them.
pub fn save_gpt2_with(model: &Gpt2, dir: &Path, dtype: DType, files: &[std::path::PathBuf]) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::Input(format!("checkpoints are written as f32, bf16 or f16, not {dtype:?}")));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::write(dir, e))?;
    let tensors: Vec<(String, Tensor)> =
        model.params.iter().map(|p| p.tensor.to_dtype(dtype).map(|t| (p.name.clone(), t))).collect::<Result<_>>()?;
    let weights = dir.join("model.safetensors");
    super::remove_if_present(&weights)?;
    let config = serde_json::to_string_pretty(&model.config.to_json(dtype)).expect("a JSON value serialises");
    super::write_atomic(&dir.join("config.json"), |w| std::io::Write::write_all(w, config.as_bytes()))?;
    for f in files {
        let dst = dir.join(f.file_name().ok_or_else(|| Error::read(f, std::io::ErrorKind::InvalidInput.into()))?);
        let bytes = std::fs::read(f).map_err(|e| Error::read(f, e))?;
        super::write_atomic(&dst, |w| std::io::Write::write_all(w, &bytes))?;
    }
    st::save(&weights, &tensors, &[])
}

/// Loads every tensor of a safetensors file as f32 (float) or i32 (integer), by name.
pub fn load_all(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let f = SafeFile::open(path)?;
    f.names().into_iter().map(|n| f.tensor(&n).map(|t| (n, t))).collect()
}
