//! Run configuration: a TOML file in three sections (model, data, train), every key optional
//! with a default, plus `section.key=value` overrides from the command line. The resolved config
//! is written into the run directory, so a run can always be reproduced from what it left.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
#[derive(Default)]
pub struct RunConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub finetune: FinetuneSection,
}

/// Supervised fine-tuning (`kiln finetune`); pre-training ignores this section.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneSection {
    /// full, lora or qlora
    pub method: String,
    /// adamw, adamw8bit, or auto: adamw8bit for qlora, adamw otherwise
    pub optimizer: String,
    /// The examples' format: auto, prompt_completion, alpaca or chat.
    pub format: crate::data::sft::Format,
    /// How chat messages become text.
    pub chat: crate::data::sft::ChatTemplate,
    /// Concatenate short examples into full rows.
    pub pack: bool,
    pub gradient_checkpointing: bool,
    /// LoRA rank, alpha (scaling alpha / r, or alpha / sqrt(r) with rslora), dropout and the
    /// modules it adapts (by name suffix, as PEFT matches them).
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f32,
    pub lora_targets: Vec<String>,
    pub rslora: bool,
}

impl Default for FinetuneSection {
    fn default() -> Self {
        FinetuneSection {
            method: "full".into(),
            optimizer: "auto".into(),
            format: crate::data::sft::Format::Auto,
            chat: crate::data::sft::ChatTemplate::default(),
            pack: false,
            gradient_checkpointing: false,
            lora_r: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.05,
            lora_targets: crate::model::lora::GPT2_DEFAULT_TARGETS.iter().map(|t| t.to_string()).collect(),
            rslora: false,
        }
    }
}

/// The model: a preset size (or a checkpoint to start from), with optional overrides.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl, llama-tiny, smollm2-135m or smollm2-360m
    pub preset: String,
    /// Start from this Hugging Face checkpoint instead of random weights.
    pub init_from: Option<PathBuf>,
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    pub n_embd: Option<usize>,
    pub n_positions: Option<usize>,
    /// Sets embd_pdrop, resid_pdrop and attn_pdrop together.
    pub dropout: Option<f32>,
}

/// The corpus and tokenizer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// Text files, globs, directories, or .jsonl files with a "text" field. Empty: the built-in corpus.
    pub train: Vec<String>,
    /// Held-out files; when empty, the last `val_fraction` of the training tokens.
    pub val: Vec<String>,
    pub val_fraction: f64,
    /// A tokenizer.json (or GPT-2 vocab.json + merges.txt directory); when absent one is trained.
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of a tokenizer trained for this run.
    pub tokenizer_vocab_size: usize,
    /// Size of the built-in corpus, in bytes.
    pub builtin_bytes: usize,
    /// How training windows are drawn: "epoch" (blocks of seq_len + 1 tokens shuffled anew each
    /// epoch, every token trained on once per epoch) or "random" (random offsets, with
    /// replacement).
    pub sampling: String,
}

/// The optimisation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    pub batch_size: usize,
    pub seq_len: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub max_steps: usize,
    pub lr: f64,
    /// The schedule decays to lr * min_lr_ratio.
    pub min_lr_ratio: f64,
    pub warmup_steps: usize,
    /// cosine, linear or constant (after warm-up)
    pub schedule: String,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip gradients to this global norm (0 = off).
    pub grad_clip: f64,
    pub eval_every: usize,
    /// Windows of seq_len + 1 validation tokens per evaluation.
    pub eval_windows: usize,
    pub save_every: usize,
    /// Checkpoints kept (older ones are deleted).
    pub keep_last: usize,
    /// Log the training loss every this many steps (and the first and last). Fine-tuning lowers
    /// the default, 10, so that a short run logs at least 50 losses.
    pub log_every: usize,
    pub seed: u64,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            preset: "tiny".into(),
            init_from: None,
            n_layer: None,
            n_head: None,
            n_embd: None,
            n_positions: None,
            dropout: None,
        }
    }
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            train: vec![],
            val: vec![],
            val_fraction: 0.05,
            tokenizer: None,
            tokenizer_vocab_size: 2048,
            builtin_bytes: 2_000_000,
            sampling: "epoch".into(),
        }
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            batch_size: 8,
            seq_len: 128,
            grad_accum: 1,
            max_steps: 1000,
            lr: 1e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 50,
            schedule: "cosine".into(),
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            eval_every: 100,
            eval_windows: 32,
            save_every: 250,
            keep_last: 2,
            log_every: 10,
            seed: 0,
        }
    }
}

impl RunConfig {
    /// Reads `path` (if given), applies `section.key=value` overrides, and checks the result.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<RunConfig> {
        let mut table: toml::Table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| Error::read(p, e))?;
                text.parse().map_err(|e: toml::de::Error| {
                    let at = e.span().map(|s| line_col(&text, s.start)).unwrap_or_default();
                    Error::config(p, format!("{at}not valid TOML: {}", e.message().trim()))
                })?
            }
            None => toml::Table::new(),
        };
        for o in overrides {
            set(&mut table, o)?;
        }
        let label = path.unwrap_or(Path::new("(command line)"));
        let cfg: RunConfig = table.try_into().map_err(|e| Error::config(label, one_line(&e)))?;
        cfg.check(label)?;
        Ok(cfg)
    }

    /// The config as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the run config serialises")
    }

    fn check(&self, label: &Path) -> Result<()> {
        let t = &self.train;
        let bad = |msg: String| Err(Error::config(label, msg));
        if t.batch_size == 0 || t.seq_len == 0 || t.grad_accum == 0 {
            return bad("train.batch_size, train.seq_len and train.grad_accum must be at least 1".into());
        }
        if !matches!(t.schedule.as_str(), "cosine" | "linear" | "constant") {
            return bad(format!("train.schedule = \"{}\": use cosine, linear or constant", t.schedule));
        }
        if t.lr.is_nan() || t.lr <= 0.0 || !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return bad("train.lr must be positive and train.min_lr_ratio in [0, 1]".into());
        }
        if self.data.sampling.parse::<crate::data::corpus::Sampling>().is_err() {
            let names = crate::data::corpus::Sampling::NAMES;
            return bad(format!("data.sampling = {:?}: use {names}", self.data.sampling));
        }
        if !(0.0..1.0).contains(&self.data.val_fraction) {
            return bad(format!("data.val_fraction = {} must be in [0, 1)", self.data.val_fraction));
        }
        // NaN and infinities (TOML's nan and inf) are never a setting.
        let tree = toml::Value::try_from(self).map_err(|e| Error::config(label, e.to_string()))?;
        if let Some((key, x)) = non_finite(&tree, "") {
            return bad(format!("{key} = {x} must be a finite number"));
        }
        Ok(())
    }
}

/// "line L, column C: " for a byte offset into `text`.
fn line_col(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {col}: ")
}

/// A config error on one line, the problem and the fix first: an unknown key names its section,
/// the closest valid key and then all of them; a bad value names its key.
fn one_line(e: &toml::de::Error) -> String {
    let msg = e.message().trim();
    // serde's wording, which toml passes on: "unknown field `x`, expected one of `a`, `b`" (or
    // "expected `a` or `b`"), and a following "in `section.key`" line in the error's display
    let shown = e.to_string();
    let place = shown.lines().find_map(|l| l.trim().strip_prefix("in `").and_then(|r| r.strip_suffix('`')));
    let Some(rest) = msg.strip_prefix("unknown field `") else {
        return match place {
            Some(p) => format!("{p}: {msg}"),
            None => msg.to_string(),
        };
    };
    let (key, expected) = rest.split_once('`').unwrap_or((rest, ""));
    let valid: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let hint = closest(key, &valid).map(|k| format!(" Did you mean `{k}`?")).unwrap_or_default();
    match place {
        Some(p) => format!("unknown key `{key}` in [{p}].{hint} The keys of [{p}] are: {}.", valid.join(", ")),
        None => format!("unknown section [{key}].{hint} The sections are: [{}].", valid.join("], [")),
    }
}

/// The valid key nearest to a misspelt one, when it is near (at most a third of it changed).
fn closest<'a>(key: &str, valid: &[&'a str]) -> Option<&'a str> {
    let dist = |a: &str, b: &str| {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for j in 0..b.len() {
                let cur = row[j + 1];
                row[j + 1] = (prev + (ca != b[j]) as usize).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    };
    if let Some(v) = valid.iter().find(|v| key.len() >= 3 && (v.starts_with(key) || key.starts_with(**v))) {
        return Some(v);
    }
    valid
        .iter()
        .map(|v| (dist(key, v), *v))
        .filter(|(d, v)| *d <= key.len().max(v.len()).div_ceil(3))
        .min()
        .map(|(_, v)| v)
}

/// Applies one `section.key=value` override; the value is read as TOML (numbers, booleans,
/// quoted strings, arrays), falling back to a plain string.
fn set(table: &mut toml::Table, kv: &str) -> Result<()> {
    let bad = || Error::Input(format!("override '{kv}' must look like section.key=value, e.g. train.lr=3e-4"));
    let (key, value) = kv.split_once('=').ok_or_else(bad)?;
    let (section, field) = key.trim().split_once('.').ok_or_else(bad)?;
    let value: toml::Value = format!("v = {}", value.trim())
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.trim().to_string()));
    let entry = table.entry(section.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(sec) = entry else { return Err(bad()) };
    sec.insert(field.to_string(), value);
    Ok(())
}

/// The dotted key and value of the first NaN or infinite number in `v`.
fn non_finite(v: &toml::Value, at: &str) -> Option<(String, f64)> {
    match v {
        toml::Value::Float(f) if !f.is_finite() => Some((at.to_string(), *f)),
        toml::Value::Table(t) => {
            t.iter().find_map(|(k, x)| non_finite(x, &format!("{at}{}{k}", if at.is_empty() { "" } else { "." })))
        }
        toml::Value::Array(a) => a.iter().find_map(|x| non_finite(x, at)),
        _ => None,
    }
}
