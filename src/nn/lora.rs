//! LoRA (Hu et al. 2021), laid out as PEFT lays it out, so adapters move between kiln and PEFT
//! unchanged. What follows describes GPT-2's layers; a Llama's are nn.Linear layers (`Linear`,
//! W [out, in], y = x W^T, the same lora_A [r, in] and lora_B [out, r], `fan_in_fan_out: false`),
//! its embedding `model.embed_tokens` and its lm_head tied or untied (model/lora.rs has both
//! families' tables).
//!
//! A targeted Conv1D (W [in, out], y = x W + b) gains lora_A [r, in] and lora_B [out, r]:
//!   y = x W + b + scaling * dropout(x) A^T B^T,   scaling = alpha / r  (rsLoRA: alpha / sqrt(r)).
//! GPT2LMHeadModel's two other layers with a weight matrix can be targeted too, as PEFT adapts
//! them:
//! - `transformer.wte` (nn.Embedding, [V, C]) gains lora_embedding_A [r, V] and
//!   lora_embedding_B [C, r] (saved without a `.weight` suffix), and each token's embedding
//!   gains scaling * A[:, id]^T B^T. PEFT applies no dropout on this path and initialises the
//!   other way round (A = 0, B ~ N(0, 1)).
//! - `lm_head` (nn.Linear(C, V, bias=False), tied to wte) gains lora_A [r, C] and lora_B [V, r]:
//!   logits = h wte^T + scaling * dropout(h) A^T B^T.
//!
//! The position embedding (wpe) is not adapted, and "all-linear" means the Conv1D layers only (as
//! in PEFT, which leaves the output layer out). Targets are module names matched as PEFT matches
//! them: a module is targeted when its full name (e.g. `transformer.h.0.attn.c_attn`) equals a
//! target or ends with "." + target, so "c_proj" adapts both attn.c_proj and mlp.c_proj. The
//! adapter tensors live in their own `ParamStore` under PEFT's saved names
//! (`base_model.model.<module>.lora_A.weight`); attaching freezes every base parameter, so the
//! tape allocates no gradient for them and an optimizer given `Lora::params` keeps no state for
//! them.
//!
//! The models' module tables, resolving targets against them, `attach` and `merged` are in
//! model/lora.rs; this module is the adapters alone.
//!
//! Merging (`model::lora::merged`, `kiln merge`) folds the blocks' adapters into their weights and
//! refuses an adapter on the embedding or lm_head of a model that ties the two to one weight
//! matrix (GPT-2 always; a Llama with tie_word_embeddings): folding either adapter into it would
//! also change the other layer, and the merged model would compute something else. Such an
//! adapter is used unmerged (`--adapter`). An untied Llama's embedding and lm_head adapters merge.

use crate::nn::ParamStore;
use crate::{Error, Result, Tensor};
use std::collections::{BTreeMap, HashMap};

/// The prefix PEFT gives every tensor of a causal-LM adapter (PeftModel.base_model.model).
pub const PEFT_PREFIX: &str = "base_model.model.";

/// PEFT's shorthand for every linear layer except the output layer (GPT-2's Conv1D layers, a
/// Llama's seven linear layers).
pub const ALL_LINEAR: &str = "all-linear";

/// The hyper-parameters of a LoRA adapter, as in PEFT's LoraConfig.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// The rank of every adapter (`rank_pattern` may override it per module).
    pub r: usize,
    /// lora_alpha: the update is scaled by alpha / r (alpha / sqrt(r) with `rslora`).
    pub alpha: f64,
    /// Dropout probability on each adapter's input while training.
    pub dropout: f32,
    /// Module names or name suffixes (c_attn, c_proj, c_fc, attn.c_proj, h.0.mlp.c_fc, wte,
    /// lm_head, ...), or the single entry "all-linear" (every Conv1D).
    pub targets: Vec<String>,
    /// Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023).
    pub rslora: bool,
    /// Per-module rank overrides, keyed by a module name suffix (PEFT's rank_pattern).
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides, keyed by a module name suffix (PEFT's alpha_pattern).
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Where the base model came from, recorded in adapter_config.json for the reader.
    pub base_model: Option<String>,
    /// PEFT's task_type ("CAUSAL_LM" for adapters kiln creates).
    pub task_type: Option<String>,
}

impl LoraConfig {
    /// A config from the values a fine-tuning command takes (`--r 8 --alpha 16 --dropout 0.05
    /// --targets c_attn,c_proj --rslora`); checks each value.
    pub fn new<S: AsRef<str>>(r: usize, alpha: f64, dropout: f32, targets: &[S], rslora: bool) -> Result<Self> {
        let cfg = LoraConfig {
            r,
            alpha,
            dropout,
            targets: targets.iter().map(|t| t.as_ref().trim().to_string()).filter(|t| !t.is_empty()).collect(),
            rslora,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            base_model: None,
            task_type: Some("CAUSAL_LM".into()),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Splits a comma-separated target list ("c_attn,c_proj").
    pub fn parse_targets(list: &str) -> Vec<String> {
        list.split(',').map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect()
    }

    /// Checks the values that do not depend on the model.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Input(msg));
        if self.r == 0 {
            return bad("LoRA rank r = 0: the rank must be at least 1 (8 or 16 are common choices)".into());
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, &r)| r == 0) {
            return bad(format!("rank_pattern gives '{k}' rank 0: every rank must be at least 1"));
        }
        for (what, a) in std::iter::once(("lora_alpha", self.alpha))
            .chain(self.alpha_pattern.values().map(|&a| ("alpha_pattern", a)))
        {
            if !(a.is_finite() && a > 0.0) {
                return bad(format!("{what} = {a} must be a positive number (the update is scaled by alpha / r)"));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("LoRA dropout {} must be in [0, 1)", self.dropout));
        }
        if self.targets.is_empty() {
            return bad(format!("no LoRA target modules given: name some, e.g. c_attn,c_proj,c_fc (or {ALL_LINEAR})"));
        }
        for key in self.rank_pattern.keys().chain(self.alpha_pattern.keys()) {
            if !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
                return bad(format!(
                    "rank_pattern / alpha_pattern key '{key}' is a regular expression; kiln matches these keys as \
                     module names or name suffixes (like h.0.attn.c_attn): rewrite it as one"
                ));
            }
        }
        Ok(())
    }

    /// The rank of `module` (a full module name).
    pub fn rank_of(&self, module: &str) -> usize {
        self.rank_pattern.iter().find(|(k, _)| matches(module, k)).map_or(self.r, |(_, &r)| r)
    }

    /// The alpha of `module` (a full module name).
    pub fn alpha_of(&self, module: &str) -> f64 {
        self.alpha_pattern.iter().find(|(k, _)| matches(module, k)).map_or(self.alpha, |(_, &a)| a)
    }

    /// The factor on the update: alpha / r, or alpha / sqrt(r) with rsLoRA (computed in f64 and
    /// rounded once, as PEFT's Python float is).
    pub fn scaling(&self, r: usize, alpha: f64) -> f32 {
        let d = if self.rslora { (r as f64).sqrt() } else { r as f64 };
        (alpha / d) as f32
    }
}

/// PEFT's rule: `target` names `module` when it is the full name or a dot-separated suffix of it.
pub(crate) fn matches(module: &str, target: &str) -> bool {
    module == target || module.strip_suffix(target).is_some_and(|head| head.ends_with('.'))
}

/// What kind of layer an adapted module is; it decides the tensor names, the initialisation and
/// where the forward pass applies the update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleKind {
    /// A Conv1D, W [in, out] (GPT-2's layers).
    Conv1d,
    /// An nn.Linear, W [out, in] (a Llama's q/k/v/o_proj and gate/up/down_proj).
    Linear,
    /// GPT-2's token embedding `transformer.wte`, W [V, C]: in = V, out = C.
    Embedding,
    /// GPT-2's lm_head, an nn.Linear(C, V) whose weight is wte [V, C]: in = C, out = V.
    LmHead,
}

/// One adapted layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraModule {
    /// The module's full name, e.g. `transformer.h.0.attn.c_attn`.
    pub module: String,
    pub kind: ModuleKind,
    pub r: usize,
    /// A is [r, fan_in] and B [fan_out, r]; for the embedding fan_in = V and fan_out = C.
    pub fan_in: usize,
    pub fan_out: usize,
    pub scaling: f32,
}

impl LoraModule {
    /// PEFT's saved name of lora_A [r, in] (lora_embedding_A [r, V] for the embedding).
    pub fn a_name(&self) -> String {
        match self.kind {
            ModuleKind::Embedding => format!("{PEFT_PREFIX}{}.lora_embedding_A", self.module),
            _ => format!("{PEFT_PREFIX}{}.lora_A.weight", self.module),
        }
    }
    /// PEFT's saved name of lora_B [out, r] (lora_embedding_B [C, r] for the embedding).
    pub fn b_name(&self) -> String {
        match self.kind {
            ModuleKind::Embedding => format!("{PEFT_PREFIX}{}.lora_embedding_B", self.module),
            _ => format!("{PEFT_PREFIX}{}.lora_B.weight", self.module),
        }
    }
}

/// The module names of GPT-2's token embedding and output layer, as GPT2LMHeadModel names them.
pub const WTE: &str = "transformer.wte";
pub const LM_HEAD: &str = "lm_head";

/// The adapter of one module, as the forward pass uses it.
pub struct Adapter<'a> {
    pub a: &'a Tensor, // [r, in]
    pub b: &'a Tensor, // [out, r]
    pub scaling: f32,
}

/// A LoRA adapter attached to a model: its config, its modules and their tensors.
#[derive(Clone, Debug)]
pub struct Lora {
    pub config: LoraConfig,
    /// lora_A and lora_B of every adapted module under PEFT's saved names, in model order: what an
    /// optimizer steps and what adapter_model.safetensors holds.
    pub params: ParamStore,
    modules: Vec<LoraModule>,
    index: HashMap<String, usize>,
}

impl Lora {
    /// An adapter over `modules` whose tensors are in `params` (checked: every module's A and B
    /// with the right shapes, and nothing else).
    pub fn new(config: LoraConfig, modules: Vec<LoraModule>, params: ParamStore) -> Result<Self> {
        for m in &modules {
            for (name, dims) in [(m.a_name(), [m.r, m.fan_in]), (m.b_name(), [m.fan_out, m.r])] {
                let t = params.get(&name)?;
                if t.dims() != dims {
                    return Err(Error::shape("lora", format!("{name} has shape {:?}, expected {dims:?}", t.dims())));
                }
            }
        }
        if params.len() != 2 * modules.len() {
            return Err(Error::Mismatch(format!(
                "a LoRA adapter over {} modules holds {} tensors, expected {}",
                modules.len(),
                params.len(),
                2 * modules.len()
            )));
        }
        let index = modules.iter().enumerate().map(|(i, m)| (m.module.clone(), i)).collect();
        Ok(Lora { config, params, modules, index })
    }

    /// The adapted modules, in model order.
    pub fn modules(&self) -> &[LoraModule] {
        &self.modules
    }

    /// The adapter of the module called `module` (full name), if it has one.
    pub fn adapter(&self, module: &str) -> Option<Adapter<'_>> {
        let m = &self.modules[*self.index.get(module)?];
        Some(Adapter {
            a: self.params.get(&m.a_name()).ok()?,
            b: self.params.get(&m.b_name()).ok()?,
            scaling: m.scaling,
        })
    }
}
