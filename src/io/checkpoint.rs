//! Hugging Face checkpoint directories: `config.json` + `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`). kiln reads what transformers writes (with or without the
//! `transformer.` prefix, ignoring the causal-mask buffers and the tied `lm_head.weight`) and
//! writes what transformers reads. Weights that `kiln quantize` stored in NF4 load too:
//! dequantized (`load_model`), or kept in NF4 as QLoRA's base (`load_nf4_base`).

use super::nf4::{self, NF4_SUFFIXES};
use super::safetensors::{self as st, SafeFile};
use crate::model::{Config, Model};
use crate::nn::ParamStore;
use crate::{DType, Error, Result, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

/// Buffers and tied copies that transformers may store and kiln derives instead (a tied lm_head
/// in NF4 included: it spreads over several tensors; an untied one is a parameter, listed by the
/// config, so it is read before this is asked).
fn is_ignored(key: &str) -> bool {
    let key = NF4_SUFFIXES.iter().find_map(|s| key.strip_suffix(s)).unwrap_or(key);
    key == "lm_head.weight"
        || key.ends_with(".attn.bias")
        || key.ends_with(".attn.masked_bias")
        || key.ends_with(".rotary_emb.inv_freq")
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
             AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)",
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

/// Loads a model (GPT-2 or Llama, as config.json says) from a Hugging Face checkpoint directory.
/// Weights stored as bf16 or f16 are
/// converted to f32, and weights stored in NF4 (`kiln quantize`) are dequantized to f32; every
/// tensor's shape is checked against config.json.
pub fn load_model(dir: &Path) -> Result<Model> {
    load(dir, false)
}

/// QLoRA's base: as `load_model`, but the blocks' weight matrices (GPT-2's Conv1D layers, a
/// Llama's linear layers) a checkpoint stores in NF4 stay in NF4
/// (in `Model::nf4`, frozen, their absmax double-quantized as QLoRA's own quantization does), so
/// `Model::quantize_nf4` then quantizes only what the file holds in f32, and a pre-quantized base
/// gives the same codes as quantizing its original on the fly. Other NF4 tensors (embeddings,
/// which QLoRA keeps in f32) are dequantized.
pub fn load_nf4_base(dir: &Path) -> Result<Model> {
    load(dir, true)
}

fn load(dir: &Path, keep_nf4: bool) -> Result<Model> {
    if !dir.is_dir() {
        let why = if dir.exists() { "it is a file, not a checkpoint directory" } else { "no such directory" };
        return Err(Error::read(dir, std::io::Error::new(std::io::ErrorKind::NotFound, why)));
    }
    let config_path = dir.join("config.json");
    let config = Config::from_json_file(&config_path)?;
    let family = config.family();
    let (files, names) = open_weights(dir)?;
    if config.checked_num_params().is_none() {
        return Err(Error::config(
            &config_path,
            format!("describes a {family} too large to count (its parameter count overflows): the file is corrupt"),
        ));
    }
    // A corrupt n_layer must not build millions of shapes: list at most two layers more than the
    // files hold tensors for, so the first missing tensor is still the error.
    let per_layer = config.with_n_layer(1).param_shapes().len() - config.with_n_layer(0).param_shapes().len();
    let listed = config.with_n_layer(config.n_layer().min(names.len() / per_layer + 2));
    let mut params = ParamStore::new();
    let mut used = std::collections::HashSet::new();
    let conv1d: std::collections::HashSet<String> = if keep_nf4 {
        crate::model::lora::block_modules(&listed).into_iter().map(|(m, ..)| format!("{m}.weight")).collect()
    } else {
        Default::default()
    };
    let mut kept = BTreeMap::new();
    for (name, dims) in listed.param_shapes() {
        let short = name.strip_prefix("transformer.").unwrap_or(&name).to_string();
        let Some((key, &fi)) = [&name, &short].into_iter().find_map(|k| names.get_key_value(k.as_str())) else {
            return Err(Error::checkpoint(
                dir,
                format!("model.safetensors has no tensor '{name}': the checkpoint is incomplete or not a {family}, or config.json belongs to another model"),
            ));
        };
        used.insert(key.clone());
        let file = &files[fi];
        if let Some(q) = nf4::read_nf4(file, key)? {
            used.extend(NF4_SUFFIXES.iter().map(|s| format!("{key}{s}")));
            if q.shape != dims {
                return Err(Error::checkpoint(
                    file.path(),
                    format!("NF4 tensor '{key}' has shape {:?} but config.json implies {dims:?}: the weights and config.json do not belong together", q.shape),
                ));
            }
            if conv1d.contains(&name) {
                kept.insert(name, Arc::new(q.into_weight()?));
            } else {
                params.insert(name, Tensor::from_f32(q.dequantize()?, dims.as_slice())?);
            }
            continue;
        }
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
                format!("tensor '{key}' has dtype {stored_dtype}; {family} weights must be F32, BF16 or F16"),
            )
        })?;
        st::check_finite(file.path(), key, &t)?;
        params.insert(name, t);
    }
    let extra: Vec<&String> = names.keys().filter(|k| !used.contains(*k) && !is_ignored(k)).collect();
    if !extra.is_empty() {
        let mut extra: Vec<&str> = extra.into_iter().map(|s| s.as_str()).collect();
        extra.sort();
        extra.truncate(5);
        return Err(Error::checkpoint(
            files[names[extra[0]]].path(),
            format!(
                "holds tensors a {family} of this config.json does not have (e.g. {}): is this another architecture, \
                 or does config.json belong to another model?",
                extra.join(", ")
            ),
        ));
    }
    let nf4 = (!kept.is_empty()).then_some(kept);
    if nf4.is_some() {
        // a base with frozen NF4 layers is frozen throughout, as `Model::quantize_nf4` leaves it
        params.set_trainable(false);
    }
    Ok(Model { config, params, lora: None, nf4, gradient_checkpointing: false })
}

/// Writes `model` to `dir` (created if needed) as config.json + model.safetensors in `dtype`.
/// A directory is a checkpoint once its weights are there: an old model.safetensors is removed
/// first and the new one written last (to a temporary name, then renamed), so a crash leaves the
/// old checkpoint, no checkpoint, or the new one, never weights beside a config they do not fit.
/// Other files in `dir` are left alone.
pub fn save_model(model: &Model, dir: &Path, dtype: DType) -> Result<()> {
    save_model_with(model, dir, dtype, &[])
}

/// `save_model`, with `files` (a tokenizer, generation config) copied into `dir` before the
/// weights are written, so a checkpoint is never without them.
pub fn save_model_with(model: &Model, dir: &Path, dtype: DType, files: &[std::path::PathBuf]) -> Result<()> {
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
