//! PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`, as
//! `PeftModel.save_pretrained` writes them for a GPT-2 LoRA and `PeftModel.from_pretrained`
//! reads them. Tensors are named `base_model.model.<module>.lora_A.weight` [r, in] and
//! `...lora_B.weight` [out, r] (PEFT drops the adapter name "default" when saving); the token
//! embedding's are `base_model.model.transformer.wte.lora_embedding_A` [r, V] and
//! `...lora_embedding_B` [C, r], without a `.weight` suffix.
//!
//! With wte or lm_head among the targets PEFT also saves a copy of the (tied) embedding matrix
//! under `<module>.base_layer.weight` (its save_embedding_layers="auto"), which
//! `from_pretrained` loads over the base model's. kiln reads such copies and requires them to
//! equal the base model's wte (else the adapter was trained on other embeddings); it writes none
//! (PEFT's save_embedding_layers=False), as PEFT needs none to load an adapter onto its base.
//!
//! Loading checks the adapter against the base model before anything is attached: every target
//! must name a layer kiln adapts, every tensor must fit its layer (a mismatch names the model
//! size the adapter was made for), and the file must hold exactly the tensors its config implies.

use super::safetensors::{self as st, SafeFile};
use crate::model::llama::EMBED_TOKENS;
use crate::model::lora::embedding_module;
use crate::model::{Config, Model};
use crate::nn::lora::{self, Lora, LoraConfig, ALL_LINEAR, PEFT_PREFIX};
use crate::nn::ParamStore;
use crate::{Error, Result};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The PEFT release whose adapter_config.json layout kiln writes (the oracle fixtures' version).
pub const PEFT_FORMAT_VERSION: &str = "0.21.2";

/// Reads a PEFT LoRA `adapter_config.json`, rejecting what kiln's LoRA does not implement.
pub fn read_config(path: &Path) -> Result<LoraConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::read(path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::config(path, format!("not valid JSON ({e})")))?;
    config_from_json(&v, path)
}

/// Parses an adapter config object; `path` only labels errors.
pub fn config_from_json(v: &Value, path: &Path) -> Result<LoraConfig> {
    let obj = v.as_object().ok_or_else(|| Error::config(path, "the top level must be a JSON object"))?;
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let bad = |msg: String| Err(Error::config(path, msg));
    match get("peft_type").and_then(|t| t.as_str()) {
        Some("LORA") => {}
        Some(t) => return bad(format!("peft_type is \"{t}\"; kiln reads LoRA adapters (peft_type \"LORA\")")),
        None => return bad("no \"peft_type\": is this a PEFT adapter_config.json?".into()),
    }
    let r = match get("r") {
        None => 8, // LoraConfig's default
        Some(x) => match x.as_u64() {
            Some(r) => r as usize,
            None => return bad(format!("\"r\" must be a non-negative integer, got {x}")),
        },
    };
    let number = |k: &str, default: f64| -> Result<f64> {
        match get(k) {
            None => Ok(default),
            Some(x) => x.as_f64().ok_or_else(|| Error::config(path, format!("\"{k}\" must be a number, got {x}"))),
        }
    };
    let flag = |k: &str| -> Result<bool> {
        match get(k) {
            None => Ok(false),
            Some(x) => {
                x.as_bool().ok_or_else(|| Error::config(path, format!("\"{k}\" must be true or false, got {x}")))
            }
        }
    };
    let targets = match get("target_modules") {
        // PEFT's default for GPT-2 (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
        None => vec!["c_attn".to_string()],
        Some(Value::String(s)) if s == ALL_LINEAR => vec![s.clone()],
        Some(Value::String(s)) => {
            return bad(format!(
                "target_modules is the regular expression \"{s}\"; kiln reads target_modules as a list of module \
                 names (or \"{ALL_LINEAR}\"): rewrite it as a list, e.g. [\"c_attn\", \"c_proj\"]"
            ))
        }
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| {
                t.as_str().map(String::from).ok_or_else(|| {
                    Error::config(path, format!("\"target_modules\" must hold module names (strings), got {t}"))
                })
            })
            .collect::<Result<_>>()?,
        Some(x) => return bad(format!("\"target_modules\" must be a list of module names, got {x}")),
    };
    let unsupported: [(&str, bool, &str); 4] = [
        ("use_dora", flag("use_dora")?, "DoRA adapters are not supported"),
        ("lora_bias", flag("lora_bias")?, "adapters with a bias on lora_B are not supported"),
        ("use_qalora", flag("use_qalora")?, "QA-LoRA adapters are not supported"),
        ("use_bdlora", flag("use_bdlora")?, "block-diagonal LoRA adapters are not supported"),
    ];
    if let Some((k, _, why)) = unsupported.iter().find(|(_, on, _)| *on) {
        return bad(format!("\"{k}\" is true: {why}; kiln reads plain LoRA adapters"));
    }
    if let Some(b) = get("bias").and_then(|b| b.as_str()).filter(|b| *b != "none") {
        return bad(format!(
            "\"bias\" is \"{b}\": the adapter also trains the base model's biases, which kiln's adapters do not \
             hold; use bias \"none\""
        ));
    }
    let non_empty = |x: &Value| match x {
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => true,
    };
    for (k, why) in [
        ("modules_to_save", "the adapter carries full copies of whole modules"),
        ("layers_to_transform", "the adapter covers only some layers"),
        ("layer_replication", "the adapter replicates layers"),
        ("target_parameters", "the adapter targets parameters rather than modules"),
        ("trainable_token_indices", "the adapter trains individual token embeddings"),
        ("exclude_modules", "the adapter excludes modules"),
    ] {
        if get(k).is_some_and(non_empty) {
            return bad(format!(
                "\"{k}\" is set ({why}), which kiln does not support yet; it reads plain LoRA adapters"
            ));
        }
    }
    let pattern = |k: &str| -> Result<BTreeMap<String, f64>> {
        match get(k) {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(key, x)| {
                    x.as_f64()
                        .map(|f| (key.clone(), f))
                        .ok_or_else(|| Error::config(path, format!("\"{k}\".\"{key}\" must be a number, got {x}")))
                })
                .collect(),
            Some(x) => Err(Error::config(path, format!("\"{k}\" must be an object, got {x}"))),
        }
    };
    let mut rank_pattern = BTreeMap::new();
    for (key, f) in pattern("rank_pattern")? {
        if f.fract() != 0.0 || f < 0.0 {
            return bad(format!("\"rank_pattern\".\"{key}\" = {f} must be a non-negative integer"));
        }
        rank_pattern.insert(key, f as usize);
    }
    let cfg = LoraConfig {
        r,
        alpha: number("lora_alpha", 8.0)?,
        dropout: number("lora_dropout", 0.0)? as f32,
        targets,
        rslora: flag("use_rslora")?,
        rank_pattern,
        alpha_pattern: pattern("alpha_pattern")?,
        base_model: get("base_model_name_or_path").and_then(|x| x.as_str()).map(String::from),
        task_type: get("task_type").and_then(|x| x.as_str()).map(String::from),
    };
    cfg.validate().map_err(|e| Error::config(path, e.to_string()))?;
    Ok(cfg)
}

/// lora_alpha as PEFT writes it: an integer when it is one (PEFT types it int), else a float.
fn py_number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// The adapter_config.json PEFT writes for `cfg` on a model of `model` (every key PEFT 0.21
/// writes): GPT-2's Conv1D layers are fan_in_fan_out, a Llama's nn.Linear layers are not.
pub fn config_to_json(cfg: &LoraConfig, model: &Config) -> Value {
    let targets = match cfg.targets.as_slice() {
        [t] if t == ALL_LINEAR => json!(ALL_LINEAR),
        ts => json!(ts),
    };
    // PEFT records the model class only for adapters without a task type.
    let auto_mapping = match cfg.task_type {
        None => match model {
            Config::Gpt2(_) => json!({
                "base_model_class": "GPT2LMHeadModel",
                "parent_library": "transformers.models.gpt2.modeling_gpt2"
            }),
            Config::Llama(_) => json!({
                "base_model_class": "LlamaForCausalLM",
                "parent_library": "transformers.models.llama.modeling_llama"
            }),
        },
        Some(_) => Value::Null,
    };
    // 0.05f32 is written as 0.05, not as its f64 widening 0.05000000074505806.
    let dropout: f64 = format!("{}", cfg.dropout).parse().unwrap_or(cfg.dropout as f64);
    json!({
        "alora_invocation_tokens": null,
        "alpha_pattern": cfg.alpha_pattern.iter().map(|(k, &a)| (k.clone(), py_number(a))).collect::<Map<_, _>>(),
        "arrow_config": null,
        "auto_mapping": auto_mapping,
        "base_model_name_or_path": cfg.base_model,
        "bias": "none",
        "corda_config": null,
        "ensure_weight_tying": false,
        "eva_config": null,
        "exclude_modules": null,
        "fan_in_fan_out": matches!(model, Config::Gpt2(_)),
        "inference_mode": true,
        "init_lora_weights": true,
        "kasa_config": null,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "loftq_config": {},
        "lora_alpha": py_number(cfg.alpha),
        "lora_bias": false,
        "lora_dropout": dropout,
        "lora_ga_config": null,
        "megatron_config": null,
        "megatron_core": "megatron.core",
        "modules_to_save": null,
        "monteclora_config": null,
        "peft_type": "LORA",
        "peft_version": PEFT_FORMAT_VERSION,
        "qalora_group_size": 16,
        "r": cfg.r,
        "rank_pattern": cfg.rank_pattern.clone(),
        "revision": null,
        "target_modules": targets,
        "target_parameters": null,
        "task_type": cfg.task_type,
        "trainable_token_indices": null,
        "use_bdlora": null,
        "use_dora": false,
        "use_qalora": false,
        "use_rslora": cfg.rslora,
        "velora_config": null
    })
}

/// Writes `model`'s adapter to `dir` (created if needed) as a PEFT adapter directory, f32
/// tensors. As with a checkpoint's weights, old adapter weights are removed first and the new
/// ones written last (to a temporary name, then renamed), so a crash never pairs them with a
/// config they do not belong to.
pub fn save_adapter(model: &Model, dir: &Path) -> Result<()> {
    let lora = model
        .lora
        .as_ref()
        .ok_or_else(|| Error::Input("this model carries no LoRA adapter to save (attach or load one first)".into()))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::write(dir, e))?;
    let tensors: Vec<_> = lora.params.iter().map(|p| (p.name.clone(), p.tensor.clone())).collect();
    super::remove_if_present(&dir.join(WEIGHTS_FILE))?;
    let text =
        serde_json::to_string_pretty(&config_to_json(&lora.config, &model.config)).expect("a JSON value serialises");
    super::write_atomic(&dir.join(CONFIG_FILE), |w| std::io::Write::write_all(w, text.as_bytes()))?;
    st::save(&dir.join(WEIGHTS_FILE), &tensors, &[])
}

/// The module a PEFT tensor name belongs to and which factor it is ("A" or "B").
fn split_name(name: &str) -> Option<(&str, char)> {
    let rest = name.strip_prefix(PEFT_PREFIX)?;
    for (suffix, factor) in
        [(".lora_A.weight", 'A'), (".lora_B.weight", 'B'), (".lora_embedding_A", 'A'), (".lora_embedding_B", 'B')]
    {
        if let Some(m) = rest.strip_suffix(suffix) {
            return Some((m, factor));
        }
    }
    None
}

/// The n_embd an adapter factor implies, when its shape pins it down.
fn implied_n_embd(module: &str, factor: char, dims: &[usize]) -> Option<usize> {
    match (module, factor, dims) {
        (lora::WTE | EMBED_TOKENS, 'B', &[c, _]) | (lora::LM_HEAD, 'A', &[_, c]) => return Some(c),
        _ => {}
    }
    let llama = module.strip_prefix("model.layers.").and_then(|s| s.split_once('.')).map(|(_, k)| k);
    if let Some(kind) = llama.map(|k| k.strip_prefix("self_attn.").or(k.strip_prefix("mlp.")).unwrap_or(k)) {
        // a Llama's layers: A [r, C] reads the residual stream, o_proj's and down_proj's B writes it
        return match (kind, factor, dims) {
            ("q_proj" | "k_proj" | "v_proj" | "gate_proj" | "up_proj", 'A', &[_, c]) => Some(c),
            ("o_proj" | "down_proj", 'B', &[c, _]) => Some(c),
            _ => None,
        };
    }
    let kind = module.rsplit_once(".h.").map(|(_, s)| s.split_once('.').map_or(s, |(_, k)| k))?;
    match (kind, factor, dims) {
        ("attn.c_attn" | "attn.c_proj" | "mlp.c_fc", 'A', &[_, c]) => Some(c),
        ("attn.c_attn", 'B', &[o, _]) if o % 3 == 0 => Some(o / 3),
        ("attn.c_proj" | "mlp.c_proj", 'B', &[c, _]) => Some(c),
        _ => None,
    }
}

/// Loads the PEFT LoRA adapter in `dir` onto `model`, whose base parameters are frozen. The
/// adapter must have been made for this model's architecture and size.
pub fn load_adapter(model: &mut Model, dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        let why = if dir.exists() { "it is a file, not an adapter directory" } else { "no such directory" };
        return Err(Error::read(dir, std::io::Error::new(std::io::ErrorKind::NotFound, why)));
    }
    if model.lora.is_some() {
        return Err(Error::Input("this model already carries a LoRA adapter: merge it (kiln merge) first".into()));
    }
    let cfg = read_config(&dir.join(CONFIG_FILE))?;
    let wpath = dir.join(WEIGHTS_FILE);
    if !wpath.exists() {
        let msg = if dir.join("adapter_model.bin").exists() {
            "holds only adapter_model.bin; kiln reads safetensors. Convert it with PEFT: \
             PeftModel.from_pretrained(base, dir).save_pretrained(dir, safe_serialization=True)"
        } else {
            "has no adapter_model.safetensors: is this a PEFT adapter directory?"
        };
        return Err(Error::checkpoint(dir, msg));
    }
    let file = SafeFile::open(&wpath)?;
    let mc = model.config.clone();
    let layers: HashMap<String, (usize, usize)> =
        crate::model::lora::adaptable_modules(&mc).into_iter().map(|(m, _, i, o)| (m, (i, o))).collect();

    // The base check first: tensors that do not fit this model say which model they were made for.
    let mut stored: HashMap<(String, char), (String, Vec<usize>)> = HashMap::new();
    let mut max_layer = None;
    for name in file.names() {
        if let Some(module) = name.strip_prefix(PEFT_PREFIX).and_then(|n| n.strip_suffix(".base_layer.weight")) {
            if module == embedding_module(&mc) || module == lora::LM_HEAD {
                check_embedding_copy(model, module, &file, &wpath, &name)?;
                continue;
            }
        }
        let Some((module, factor)) = split_name(&name) else {
            let what = if name.contains("lora_magnitude_vector") {
                "a DoRA magnitude vector, which kiln does not support"
            } else {
                "not a tensor of a PEFT LoRA adapter (base_model.model.<module>.lora_A.weight / lora_B.weight)"
            };
            return Err(Error::checkpoint(&wpath, format!("tensor '{name}' is {what}")));
        };
        let layer = ["transformer.h.", "model.layers."]
            .iter()
            .find_map(|p| module.strip_prefix(p))
            .and_then(|s| s.split('.').next()?.parse::<usize>().ok());
        max_layer = max_layer.max(layer);
        let (_, dims) = file.info(&name)?;
        let Some(&(fan_in, fan_out)) = layers.get(module) else {
            let msg = match layer {
                Some(l) if l >= mc.n_layer() => format!(
                    "holds '{name}' for layer {l}: the adapter was made for a model with more layers, this model has \
                     n_layer = {}. Load the adapter onto the base model it was trained from",
                    mc.n_layer()
                ),
                _ => format!(
                    "holds '{name}', but {module} is not a layer of this {} that kiln's LoRA adapts (the blocks' \
                     weight matrices, {} and lm_head): the adapter was made for another architecture (or targets \
                     a module kiln does not adapt)",
                    mc.family(),
                    embedding_module(&mc)
                ),
            };
            return Err(Error::checkpoint(&wpath, msg));
        };
        let fits = match (factor, dims.as_slice()) {
            ('A', &[_, i]) => i == fan_in,
            ('B', &[o, _]) => o == fan_out,
            _ => false,
        };
        if !fits {
            let implied = implied_n_embd(module, factor, &dims).filter(|&c| c != mc.n_embd());
            let why = match implied {
                Some(c) => {
                    format!("the adapter was made for a model with n_embd {c}, this model has n_embd {}", mc.n_embd())
                }
                None => "the adapter was made for a model of another size".to_string(),
            };
            return Err(Error::checkpoint(
                &wpath,
                format!(
                    "tensor '{name}' has shape {dims:?}, which does not fit {module} of this model ({fan_in} -> \
                     {fan_out}): {why}. Load the adapter onto the base model it was trained from"
                ),
            ));
        }
        stored.insert((module.to_string(), factor), (name.clone(), dims));
    }

    let modules =
        crate::model::lora::resolve(&cfg, &mc).map_err(|e| Error::checkpoint(&dir.join(CONFIG_FILE), e.to_string()))?;
    let mut params = ParamStore::new();
    for m in &modules {
        for (factor, name) in [('A', m.a_name()), ('B', m.b_name())] {
            let Some((found, dims)) = stored.remove(&(m.module.clone(), factor)) else {
                let hint = match max_layer {
                    Some(l) if l + 1 < mc.n_layer() => format!(
                        ": the adapter was made for a model with n_layer = {}, this model has n_layer = {}",
                        l + 1,
                        mc.n_layer()
                    ),
                    _ => ": the file is incomplete or belongs to another adapter_config.json".to_string(),
                };
                return Err(Error::checkpoint(
                    &wpath,
                    format!("has no tensor '{name}', which target_modules imply{hint}"),
                ));
            };
            if found != name {
                return Err(Error::checkpoint(
                    &wpath,
                    format!("holds '{found}' where PEFT names the tensor of {} '{name}'", m.module),
                ));
            }
            let r = if factor == 'A' { dims[0] } else { dims[1] };
            if r != m.r {
                return Err(Error::checkpoint(
                    &wpath,
                    format!("tensor '{name}' has rank {r} but adapter_config.json says r = {} for {}", m.r, m.module),
                ));
            }
            let t = file.tensor_f32(&name)?;
            st::check_finite(&wpath, &name, &t)?;
            params.insert(name.clone(), t);
        }
    }
    if let Some(((module, _), _)) = stored.iter().next() {
        return Err(Error::checkpoint(
            &wpath,
            format!("holds tensors for {module}, which the target_modules of adapter_config.json do not name"),
        ));
    }
    model.lora = Some(Lora::new(cfg, modules, params)?);
    model.params.set_trainable(false);
    Ok(())
}

/// Checks PEFT's copy of an embedding matrix (`<module>.base_layer.weight`, written when an
/// adapter targets the token embedding or lm_head) against the base model's: PEFT would load the
/// copy over the base weights, so a copy that differs means the adapter belongs to other
/// embeddings. A tied lm_head's matrix is the token embedding's.
fn check_embedding_copy(model: &Model, module: &str, file: &SafeFile, wpath: &Path, name: &str) -> Result<()> {
    let own = format!("{module}.weight");
    let base = if model.params.get(&own).is_ok() { own } else { format!("{}.weight", embedding_module(&model.config)) };
    let wte = model.params.get(&base)?;
    let (_, dims) = file.info(name)?;
    if dims != wte.dims() {
        return Err(Error::checkpoint(
            wpath,
            format!(
                "holds '{name}' of shape {dims:?} (PEFT's copy of the embedding matrix), but this model's \
                 {base} is {:?}: the adapter was made for a model of another size. Load the adapter onto \
                 the base model it was trained from",
                wte.dims()
            ),
        ));
    }
    let copy = file.tensor_f32(name)?;
    if copy.f32s()? != wte.f32s()? {
        return Err(Error::checkpoint(
            wpath,
            format!(
                "holds '{name}', PEFT's copy of the embedding matrix, and it differs from this model's \
                 {base}: the adapter was trained on other (resized or retrained) embeddings, which kiln \
                 does not load from an adapter. Load it onto the base model it was trained from"
            ),
        ));
    }
    Ok(())
}
