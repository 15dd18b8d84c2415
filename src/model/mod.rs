//! Models written directly on the ops: GPT-2 (gpt2.rs) and the Llama family (llama.rs, SmolLM2)
//! behind one `Model`, whose parameters, adapter, NF4 layers, device moves, checkpointing and KV
//! cache are the same for both; what differs (the config, the block, the forward pass) is chosen
//! by `Config`.

pub mod generate;
pub mod gpt2;
pub mod llama;
pub mod lora;

pub use gpt2::Gpt2Config;
pub use llama::LlamaConfig;

use crate::backend::Heads;
use crate::nn::lora::Lora;
use crate::nn::ParamStore;
use crate::ops::gemm::WeightLayout;
use crate::ops::{attention, elementwise, gemm, lora as lora_ops};
use crate::quant::nf4::Nf4Weight;
use crate::tape::Tape;
use crate::{DType, Error, Result, Tensor};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// An f32 as the f64 of its shortest round-tripping decimal (0.1f32 -> 0.1), for JSON.
pub(crate) fn shortest_decimal(x: f32) -> f64 {
    // Display prints the shortest digits that parse back to the same f32
    x.to_string().parse().expect("an f32's decimal form parses")
}

/// The `dtype` entry of a config.json for weights stored in `dtype`.
pub(crate) fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// Typed reads of a config.json object, each error naming the key and the file.
pub(crate) struct ConfigReader<'a> {
    pub obj: &'a serde_json::Map<String, Value>,
    path: &'a Path,
}

impl<'a> ConfigReader<'a> {
    pub fn new(v: &'a Value, path: &'a Path) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| Error::config(path, "the top level must be a JSON object"))?;
        Ok(ConfigReader { obj, path })
    }

    fn get(&self, keys: &[&str]) -> Option<&'a Value> {
        keys.iter().find_map(|k| self.obj.get(*k).filter(|v| !v.is_null()))
    }

    /// A positive integer under the first of `keys` present (aliases), or `default`.
    pub fn int(&self, keys: &[&str], default: Option<usize>) -> Result<usize> {
        match self.get(keys) {
            None => default.ok_or_else(|| Error::config(self.path, format!("missing required key \"{}\"", keys[0]))),
            Some(x) => match x.as_u64() {
                Some(n) if n > 0 => Ok(n as usize),
                _ => Err(Error::config(self.path, format!("\"{}\" must be a positive integer, got {x}", keys[0]))),
            },
        }
    }

    /// A finite number, or `default`.
    pub fn float(&self, key: &str, default: f32) -> Result<f32> {
        match self.get(&[key]) {
            None => Ok(default),
            Some(x) => match x.as_f64().map(|f| f as f32) {
                Some(f) if f.is_finite() => Ok(f),
                _ => Err(Error::config(self.path, format!("\"{key}\" must be a finite number, got {x}"))),
            },
        }
    }

    /// true or false, or `default`.
    pub fn flag(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(&[key]) {
            None => Ok(default),
            Some(x) => {
                x.as_bool().ok_or_else(|| Error::config(self.path, format!("\"{key}\" must be true or false, got {x}")))
            }
        }
    }

    /// A token id, if present and one (a list of ids, as some configs give eos, reads as absent).
    pub fn token(&self, key: &str) -> Option<u32> {
        self.obj.get(key).and_then(|x| x.as_u64()).and_then(|x| u32::try_from(x).ok())
    }
}

/// How `random_params` fills one parameter.
pub(crate) enum Init {
    Const(f32),
    /// N(0, std^2).
    Normal(f32),
}

/// Parameters of `shapes`, each filled as `init` says for its name; normal draws come from one
/// stream per parameter (its index mixed into `seed`), so initialisation is parallel and
/// order-free, and deterministic in `seed`.
pub(crate) fn random_params(
    shapes: Vec<(String, Vec<usize>)>,
    seed: u64,
    init: impl Fn(&str) -> Init + Sync,
) -> Result<ParamStore> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    use rayon::prelude::*;
    let tensors: Vec<(String, Tensor)> = shapes
        .into_par_iter()
        .enumerate()
        .map(|(i, (name, dims))| {
            let n: usize = dims.iter().product();
            let data = match init(&name) {
                Init::Const(c) => vec![c; n],
                Init::Normal(std) => {
                    let normal = rand_distr::Normal::new(0.0f32, std).expect("a positive standard deviation");
                    let mut rng =
                        rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64);
                    (0..n).map(|_| normal.sample(&mut rng)).collect()
                }
            };
            Tensor::from_f32(data, dims.as_slice()).map(|t| (name, t))
        })
        .collect::<Result<_>>()?;
    let mut params = ParamStore::new();
    for (name, t) in tensors {
        params.insert(name, t);
    }
    Ok(params)
}

/// A model's architecture and sizes: what config.json holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Config {
    Gpt2(Gpt2Config),
    Llama(LlamaConfig),
}

impl From<Gpt2Config> for Config {
    fn from(c: Gpt2Config) -> Self {
        Config::Gpt2(c)
    }
}

impl From<LlamaConfig> for Config {
    fn from(c: LlamaConfig) -> Self {
        Config::Llama(c)
    }
}

/// Every preset name, GPT-2's then Llama's.
pub fn preset_names() -> String {
    gpt2::PRESETS.iter().chain(llama::PRESETS).copied().collect::<Vec<_>>().join(", ")
}

impl Config {
    /// A named size: a GPT-2 (`tiny`, `gpt2`, ...) or a Llama (`llama-tiny`, `smollm2-135m`, ...).
    pub fn preset(name: &str) -> Result<Self> {
        if gpt2::PRESETS.contains(&name) {
            return Gpt2Config::preset(name).map(Config::Gpt2);
        }
        if llama::PRESETS.contains(&name) {
            return LlamaConfig::preset(name).map(Config::Llama);
        }
        Err(Error::unknown("preset", name, preset_names()))
    }

    /// Reads a Hugging Face `config.json`: a GPT-2 (model_type "gpt2", or none) or a Llama
    /// (model_type "llama"), refusing what kiln does not implement.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::read(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::config(path, format!("not valid JSON ({e})")))?;
        Self::from_json(&v, path)
    }

    /// Parses a config object; `path` only labels errors.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        match v.get("model_type").and_then(|m| m.as_str()) {
            Some("llama") => LlamaConfig::from_json(v, path).map(Config::Llama),
            None | Some("gpt2") => Gpt2Config::from_json(v, path).map(Config::Gpt2),
            Some(other) => Err(Error::config(
                path,
                format!(
                    "model_type is \"{other}\": kiln reads GPT-2 (\"gpt2\") and Llama-family (\"llama\": SmolLM2, \
                     Llama 3.2) checkpoints"
                ),
            )),
        }
    }

    /// The config as transformers writes it.
    pub fn to_json(&self, dtype: DType) -> Value {
        match self {
            Config::Gpt2(c) => c.to_json(dtype),
            Config::Llama(c) => c.to_json(dtype),
        }
    }

    /// Every parameter's Hugging Face name and shape, in transformers' order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Config::Gpt2(c) => c.param_shapes(),
            Config::Llama(c) => c.param_shapes(),
        }
    }

    /// The parameter count, None when it overflows (a corrupt config).
    pub fn checked_num_params(&self) -> Option<usize> {
        match self {
            Config::Gpt2(c) => c.checked_num_params(),
            Config::Llama(c) => c.checked_num_params(),
        }
    }

    /// Number of parameters (a tied output layer counted once).
    pub fn num_params(&self) -> usize {
        self.param_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// The family's name, for messages: "GPT-2" or "Llama".
    pub fn family(&self) -> &'static str {
        match self {
            Config::Gpt2(_) => "GPT-2",
            Config::Llama(_) => "Llama",
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Config::Gpt2(c) => c.vocab_size,
            Config::Llama(c) => c.vocab_size,
        }
    }

    /// The longest sequence the model takes (GPT-2's learned positions, Llama's
    /// max_position_embeddings).
    pub fn n_positions(&self) -> usize {
        match self {
            Config::Gpt2(c) => c.n_positions,
            Config::Llama(c) => c.max_position_embeddings,
        }
    }

    /// The model width C (the residual stream).
    pub fn n_embd(&self) -> usize {
        match self {
            Config::Gpt2(c) => c.n_embd,
            Config::Llama(c) => c.hidden_size,
        }
    }

    pub fn n_layer(&self) -> usize {
        match self {
            Config::Gpt2(c) => c.n_layer,
            Config::Llama(c) => c.num_hidden_layers,
        }
    }

    /// The same config with `n` layers (what a loader lists before it trusts n_layer).
    pub fn with_n_layer(&self, n: usize) -> Config {
        let mut c = self.clone();
        match &mut c {
            Config::Gpt2(g) => g.n_layer = n,
            Config::Llama(l) => l.num_hidden_layers = n,
        }
        c
    }

    /// The attention's query and KV heads.
    pub fn heads(&self) -> Heads {
        match self {
            Config::Gpt2(c) => Heads::mha(c.n_head),
            Config::Llama(c) => c.heads(),
        }
    }

    /// Width of a KV cache row: C for GPT-2, n_kv_head * head_dim for a Llama.
    pub fn kv_width(&self) -> usize {
        match self {
            Config::Gpt2(c) => c.n_embd,
            Config::Llama(c) => c.kv_width(),
        }
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        match self {
            Config::Gpt2(c) => c.bos_token_id,
            Config::Llama(c) => c.bos_token_id,
        }
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        match self {
            Config::Gpt2(c) => c.eos_token_id,
            Config::Llama(c) => c.eos_token_id,
        }
    }

    /// The prefix of block `i`'s parameter names (with the trailing dot).
    pub fn layer_prefix(&self, i: usize) -> String {
        match self {
            Config::Gpt2(_) => format!("transformer.h.{i}."),
            Config::Llama(_) => format!("model.layers.{i}."),
        }
    }
}

/// The dropout site of lm_head's LoRA input, apart from the model's own sites (0, 1, 2, ...) and
/// the blocks' LoRA sites (2^32 + ...).
const LM_HEAD_LORA_SITE: u64 = 1 << 33;

/// Whether dropout is active. Training takes a seed so that every mask can be replayed.
/// Embedding and residual dropout (embd_pdrop, resid_pdrop) are applied; dropout on the
/// attention probabilities (attn_pdrop) is not: the flash-style attention never forms them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Eval,
    Train { seed: u64 },
}

impl Mode {
    /// (whether dropout is active, the step's seed; 0 in eval).
    pub fn parts(self) -> (bool, u64) {
        match self {
            Mode::Eval => (false, 0),
            Mode::Train { seed } => (true, seed),
        }
    }
}

/// The seed of dropout site `site` in a step seeded `seed`: each site draws its mask from its
/// own stream, so a recomputation (gradient checkpointing) draws the same masks.
pub(crate) fn site_seed(seed: u64, site: u64) -> u64 {
    seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(site)
}

/// What a forward pass returns.
pub struct ModelOutput {
    /// [B, T, V]; None from a training forward with targets, whose classifier and loss are one op
    /// that never hands the logits out (`Model::forward` with `Mode::Eval` returns them).
    pub logits: Option<Tensor>,
    /// Mean cross-entropy over positions with a target, when targets were given.
    pub loss: Option<Tensor>,
}

/// A language model (GPT-2 or Llama, by its config) with its parameters under Hugging Face names.
#[derive(Clone)]
pub struct Model {
    pub config: Config,
    pub params: ParamStore,
    /// A LoRA adapter on the blocks' weight matrices, the token embedding and lm_head
    /// (`model::lora::attach`, `io::peft::load_adapter`); the forward pass and generation apply it
    /// unmerged.
    pub lora: Option<Lora>,
    /// QLoRA's frozen base: the blocks' weight matrices (by checkpoint name, e.g.
    /// `transformer.h.0.attn.c_attn.weight`, `model.layers.0.self_attn.q_proj.weight`) held in NF4
    /// and absent from `params` (`quantize_nf4`), decoded inside the NF4 op's GEMM.
    pub nf4: Option<BTreeMap<String, Arc<Nf4Weight>>>,
    /// Recompute each block's activations during backward instead of keeping them.
    pub gradient_checkpointing: bool,
}

impl Model {
    /// QLoRA's base: moves every weight matrix of the blocks (GPT-2's Conv1D layers, a Llama's
    /// seven linear layers) from `params` into `nf4` (NF4 in blocks of `blocksize`, absmax
    /// double-quantized), freeing the f32 copies; the embeddings, norms and biases stay f32 and
    /// are frozen. Refuses (naming the layer, changing nothing) when a layer's size is not a
    /// multiple of the block size: kiln does not pad.
    pub fn quantize_nf4(&mut self, blocksize: usize) -> Result<()> {
        let mut done = self.nf4.take().unwrap_or_default();
        let mut todo = Vec::new();
        for (module, kind, fan_in, fan_out) in crate::model::lora::block_modules(&self.config) {
            let name = format!("{module}.weight");
            if done.contains_key(&name) {
                continue;
            }
            let w = self.params.get(&name)?;
            // the weight as stored: a Conv1D's [in, out], an nn.Linear's [out, in] (as bitsandbytes
            // quantizes either)
            let dims = if kind == crate::nn::lora::ModuleKind::Linear { [fan_out, fan_in] } else { [fan_in, fan_out] };
            let q = Nf4Weight::quantize(w.f32s()?, dims, blocksize).map_err(|e| {
                Error::Input(format!(
                    "QLoRA cannot quantize {module} (weight {dims:?}, {} elements) to NF4: {e}",
                    fan_in * fan_out
                ))
            });
            match q {
                Ok(q) => todo.push((name, Arc::new(q))),
                Err(e) => {
                    self.nf4 = (!done.is_empty()).then_some(done);
                    return Err(e);
                }
            }
        }
        let mut kept = ParamStore::new();
        for p in self.params.iter().filter(|p| !todo.iter().any(|(n, _)| *n == p.name)) {
            kept.insert(p.name.clone(), p.tensor.clone());
        }
        kept.set_trainable(false);
        self.params = kept;
        done.extend(todo);
        self.nf4 = Some(done);
        Ok(())
    }

    /// Bytes the base weights occupy: f32 parameters at 4 bytes, NF4 layers at their storage.
    pub fn weight_bytes(&self) -> usize {
        let nf4: usize = self.nf4.iter().flat_map(|q| q.values()).map(|w| w.storage_bytes()).sum();
        4 * self.params.numel() + nf4
    }

    /// Elements of the NF4 layers (parameters that `params` no longer holds).
    pub fn nf4_numel(&self) -> usize {
        self.nf4.iter().flat_map(|q| q.values()).map(|w| w.numel()).sum()
    }

    /// x [..., C] (the embedding of `ids`) plus the LoRA update of the token embedding `module`
    /// (`transformer.wte`, `model.embed_tokens`) when the adapter targets it:
    /// scaling * lora_embedding_A[:, ids]^T lora_embedding_B^T (no dropout, as in PEFT).
    pub(crate) fn embedding_lora(&self, tape: &mut Tape, module: &str, ids: &Tensor, x: Tensor) -> Result<Tensor> {
        match self.lora.as_ref().and_then(|l| l.adapter(module)) {
            None => Ok(x),
            Some(ad) => {
                let delta = lora_ops::lora_embedding(tape, ids, ad.a, ad.b, ad.scaling)?;
                elementwise::add(tape, &x, &delta)
            }
        }
    }

    /// The classifier over h [B, T, C] with weight `w` [V, C], and the loss when `targets` are
    /// given. A training step (`train`, targets, no adapter on lm_head) runs the fused
    /// `xent::classifier_loss`, which keeps the logits to itself (`logits` is then None);
    /// otherwise the logits [B, T, V] and, with targets, their cross-entropy.
    pub(crate) fn head_and_loss(
        &self,
        tape: &mut Tape,
        h: &Tensor,
        w: &Tensor,
        targets: Option<&Tensor>,
        train: bool,
        seed: u64,
    ) -> Result<ModelOutput> {
        let adapted = self.lora.as_ref().is_some_and(|l| l.adapter(crate::nn::lora::LM_HEAD).is_some());
        if let (Some(t), true, false) = (targets, train, adapted) {
            let loss = crate::ops::xent::classifier_loss(tape, h, w, t)?;
            return Ok(ModelOutput { logits: None, loss: Some(loss) });
        }
        let logits = self.lm_head(tape, h, w, train, seed)?;
        let loss = targets.map(|t| crate::ops::xent::cross_entropy(tape, &logits, t)).transpose()?;
        Ok(ModelOutput { logits: Some(logits), loss })
    }

    /// The output layer on h [..., C]: logits [..., V] = h @ wte^T (lm_head is tied to wte), plus
    /// the LoRA update scaling * dropout(h) A^T B^T when the adapter targets `lm_head` (dropout
    /// from `seed` when `train`).
    pub(crate) fn lm_head(&self, tape: &mut Tape, h: &Tensor, wte: &Tensor, train: bool, seed: u64) -> Result<Tensor> {
        let adapter = self.lora.as_ref().and_then(|l| Some((l.adapter(crate::nn::lora::LM_HEAD)?, l.config.dropout)));
        match adapter {
            None => gemm::linear(tape, h, wte, None, WeightLayout::OutIn, false),
            Some((ad, p)) => lora_ops::lora_linear(
                tape,
                h,
                wte,
                WeightLayout::OutIn,
                None,
                &lora_ops::LoraAdapter { a: ad.a, b: ad.b, scaling: ad.scaling, dropout_p: p, train, seed },
            ),
        }
    }

    /// The parameter stores: the base model's, then the adapter's when one is attached.
    pub fn stores(&self) -> Vec<&ParamStore> {
        let mut v = vec![&self.params];
        if let Some(l) = &self.lora {
            v.push(&l.params);
        }
        v
    }

    /// `stores`, mutably (what an optimizer steps).
    pub fn stores_mut(&mut self) -> Vec<&mut ParamStore> {
        let mut v = vec![&mut self.params];
        if let Some(l) = &mut self.lora {
            v.push(&mut l.params);
        }
        v
    }

    /// A randomly initialised model of `config`, as transformers initialises one (see
    /// `Gpt2Config` and `LlamaConfig`). Deterministic in `seed`.
    pub fn new_random(config: impl Into<Config>, seed: u64) -> Result<Self> {
        let config = config.into();
        let params = match &config {
            Config::Gpt2(c) => gpt2::init_params(c, seed)?,
            Config::Llama(c) => llama::init_params(c, seed)?,
        };
        Ok(Model { config, params, lora: None, nf4: None, gradient_checkpointing: false })
    }

    /// Block `i` of this architecture on the residual stream x [B, T, C].
    fn block(
        &self,
        tape: &mut Tape,
        i: usize,
        x: &Tensor,
        train: bool,
        seed: u64,
        cache: Option<&mut attention::KvLayer>,
    ) -> Result<Tensor> {
        match self.config {
            Config::Gpt2(_) => self.gpt2_block(tape, i, x, train, seed, cache),
            Config::Llama(_) => self.llama_block(tape, i, x, train, seed, cache),
        }
    }

    /// Block `i` alone on the residual stream x [B, T, C], in eval mode: the hidden state after
    /// it, as transformers' `output_hidden_states` reports them (for studying a model block by
    /// block).
    pub fn block_output(&self, tape: &mut Tape, i: usize, x: &Tensor) -> Result<Tensor> {
        if i >= self.config.n_layer() {
            return Err(Error::Input(format!("block {i} does not exist: the model has {}", self.config.n_layer())));
        }
        self.block(tape, i, x, false, 0, None)
    }

    /// Block `i` as the forward pass runs it: against the cache's layer i in generation, with
    /// gradient checkpointing when the model asks for it and the tape records.
    fn run_block(
        &self,
        tape: &mut Tape,
        i: usize,
        x: &Tensor,
        train: bool,
        seed: u64,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        match cache {
            Some(kv) => self.block(tape, i, x, train, seed, Some(&mut kv.layers[i])),
            None if self.gradient_checkpointing && tape.is_recording() => {
                self.checkpointed_block(tape, i, x, train, seed)
            }
            None => self.block(tape, i, x, train, seed, None),
        }
    }

    /// Every block in turn on x [B, T, C] (`run_block`), then, with a cache (generation), only each
    /// sequence's last position [B, 1, C]: all lm_head needs there.
    fn run_blocks(
        &self,
        tape: &mut Tape,
        mut x: Tensor,
        train: bool,
        seed: u64,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        for i in 0..self.config.n_layer() {
            x = self.run_block(tape, i, &x, train, seed, cache.as_deref_mut())?;
        }
        match cache {
            Some(_) => elementwise::last_position(tape, &x),
            None => Ok(x),
        }
    }

    /// The position ids' first column starts at: 0, or the cache's length when they continue
    /// it (a forward pass with a cache takes no targets).
    fn check_cache(&self, cache: Option<&KvCache>, ids: &Tensor, targets: Option<&Tensor>) -> Result<usize> {
        match cache {
            Some(_) if targets.is_some() => {
                Err(Error::Input("a forward pass with a KV cache computes no loss: give no targets".into()))
            }
            Some(kv) => kv.check(&self.config, ids.dims()),
            None => Ok(0),
        }
    }

    fn forward_compute(
        &self,
        tape: &mut Tape,
        ids: &Tensor,
        targets: Option<&Tensor>,
        mode: Mode,
        cache: Option<&mut KvCache>,
    ) -> Result<ModelOutput> {
        match self.config {
            Config::Gpt2(_) => self.gpt2_forward(tape, ids, targets, mode, cache),
            Config::Llama(_) => self.llama_forward(tape, ids, targets, mode, cache),
        }
    }

    /// Block `i` with gradient checkpointing: run without keeping activations, and record one
    /// node whose backward re-runs the block on a fresh tape (same dropout masks) and
    /// back-propagates through it. Costs one more block forward in backward; saves every
    /// activation inside the block.
    fn checkpointed_block(&self, tape: &mut Tape, i: usize, x: &Tensor, train: bool, seed: u64) -> Result<Tensor> {
        let out = self.block(&mut Tape::inference(), i, x, train, seed, None)?;
        let base = self.config.layer_prefix(i);
        let adapter = format!("{}{base}", crate::nn::lora::PEFT_PREFIX);
        let params: Vec<Tensor> = self
            .stores()
            .iter()
            .flat_map(|s| s.iter())
            .filter(|p| (p.name.starts_with(&base) || p.name.starts_with(&adapter)) && tape.tracks(&p.tensor))
            .map(|p| p.tensor.clone())
            .collect();
        let mut inputs: Vec<&Tensor> = vec![x];
        inputs.extend(params.iter());
        if tape.wants(&inputs) {
            // the recomputation owns a (cheap, Arc-sharing) copy of the model
            let model = self.clone();
            let recompute = move |t: &mut Tape, x: &Tensor| model.block(t, i, x, train, seed, None);
            crate::ops::checkpoint::record(tape, Box::new(recompute), x, params.clone(), &out);
        }
        Ok(out)
    }

    /// Logits for `ids` (I32 [B, T]) and, with `targets` (I32 [B, T], -100 = no target), the
    /// mean loss. Trainable parameters (the adapter's too) are watched on `tape`, so
    /// `tape.backward(loss)` yields their gradients. A `Mode::Train` forward with targets returns
    /// the loss alone (its classifier and loss are one op, `xent::classifier_loss`); `Mode::Eval`
    /// returns the logits as well.
    pub fn forward(&self, tape: &mut Tape, ids: &Tensor, targets: Option<&Tensor>, mode: Mode) -> Result<ModelOutput> {
        self.forward_with(tape, ids, targets, mode, None)
    }

    /// `forward`, optionally continuing the sequences held in a KV cache (generation): `ids`
    /// [B, T] are then positions len..len + T of the cache's B sequences, their keys and values
    /// are appended to it, and the logits are those of each sequence's last new position only,
    /// [B, 1, V] (all generation needs: lm_head is the widest GEMM). The cache is inference only:
    /// a tape that wants gradients through it is refused.
    pub fn forward_with(
        &self,
        tape: &mut Tape,
        ids: &Tensor,
        targets: Option<&Tensor>,
        mode: Mode,
        cache: Option<&mut KvCache>,
    ) -> Result<ModelOutput> {
        let adapter = self.lora.iter().flat_map(|l| l.params.iter());
        for p in self.params.iter().chain(adapter).filter(|p| p.trainable) {
            tape.watch(&p.tensor);
        }
        let device = self.device();
        if device == crate::Device::Cpu {
            return self.forward_compute(tape, ids, targets, mode, cache);
        }
        // On the GPU the parameters are f32 masters and the forward pass runs in bf16: a view of
        // the model over bf16 casts, recorded on the tape so each master gets an f32 gradient.
        // A LoRA adapter stays in f32 (as PEFT keeps it under bf16 compute); NF4 weights stay
        // packed, decoded inside the NF4 op's GEMM.
        let mut view = self.clone();
        for p in view.params.iter_mut() {
            p.tensor = crate::ops::elementwise::to_compute_dtype(tape, &p.tensor)?;
        }
        // ids and targets stay on the host: the embedding and loss check them there and upload.
        view.forward_compute(tape, ids, targets, mode, cache)
    }

    /// The device holding the parameters.
    pub fn device(&self) -> crate::Device {
        self.params.iter().next().map(|p| p.tensor.device()).unwrap_or_default()
    }

    /// Moves every parameter, the adapter's too, to `device` (f32 masters; the GPU forward casts
    /// the base's to bf16). NF4 weights get a copy of their packed form in the device's memory
    /// (the host keeps its own, for saving).
    pub fn to_device(&mut self, device: crate::Device) -> Result<()> {
        device.ensure_available()?;
        for store in self.stores_mut() {
            for p in store.iter_mut() {
                p.tensor = p.tensor.to_dtype(crate::DType::F32)?.to_device(device)?;
            }
        }
        let backend = crate::backend::backend(device)?;
        for w in self.nf4.iter().flat_map(|q| q.values()) {
            backend.nf4_to_device(w)?;
        }
        Ok(())
    }

    /// Bytes of NF4 weights held in a device's memory (their packed form).
    pub fn nf4_device_bytes(&self) -> usize {
        self.nf4.iter().flat_map(|q| q.values()).filter(|w| w.device.is_made()).map(|w| w.storage_bytes()).sum()
    }
}

/// Keys and values of every layer at the positions seen so far, for a batch of sequences that
/// advance together: what lets generation feed one new token per step instead of the whole
/// sequence (`Model::forward_with`). The buffers live where the model runs (f32 on the CPU, bf16
/// on the GPU).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<attention::KvLayer>,
    /// The width of a cached key row (the KV heads'), checked against the model it serves.
    width: usize,
}

impl KvCache {
    /// An empty cache for `batch` sequences of up to `capacity` tokens (at most n_positions).
    pub fn new(config: &Config, batch: usize, capacity: usize) -> Result<Self> {
        if capacity > config.n_positions() {
            return Err(Error::SeqTooLong { t: capacity, n_positions: config.n_positions() });
        }
        if batch == 0 {
            return Err(Error::Input("a KV cache needs at least one sequence".into()));
        }
        let layers = (0..config.n_layer()).map(|_| attention::KvLayer::new(batch, capacity)).collect();
        Ok(KvCache { layers, width: config.kv_width() })
    }

    /// Positions cached so far (the same for every sequence).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of sequences (batch rows).
    pub fn batch(&self) -> usize {
        self.layers.first().map_or(0, |l| l.batch())
    }

    /// The most positions this cache holds.
    pub fn capacity(&self) -> usize {
        self.layers.first().map_or(0, |l| l.capacity())
    }

    /// A cache whose row i is a copy of row `rows[i]` of this one (rows may repeat): fans a
    /// prefilled prompt out to several sequences, or drops finished ones.
    pub fn select_rows(&self, rows: &[usize]) -> Result<Self> {
        let layers = self.layers.iter().map(|l| l.select_rows(rows)).collect::<Result<_>>()?;
        Ok(KvCache { layers, width: self.width })
    }

    /// Checks that ids of `dims` [B, T] can continue this cache's sequences in a model of
    /// `config`, and returns the position they start at.
    fn check(&self, config: &Config, dims: &[usize]) -> Result<usize> {
        if self.width != config.kv_width() || self.layers.len() != config.n_layer() {
            return Err(Error::Input("this KV cache was made for a model of another size".into()));
        }
        let (b, past, cap) = (self.batch(), self.len(), self.capacity());
        match *dims {
            [rows, t] if rows == b && t > 0 => {
                if past + t > cap {
                    return Err(Error::Input(format!(
                        "{past} cached + {t} new positions exceed the cache's capacity of {cap}"
                    )));
                }
                Ok(past)
            }
            _ => Err(Error::Input(format!(
                "ids {dims:?} do not continue a KV cache of {b} sequences: give [{b}, n >= 1]"
            ))),
        }
    }
}

impl Model {
    /// The model as its forward pass runs: on the GPU with the parameters cast to bf16 once
    /// (generation reuses it for every token rather than casting at each call), on the CPU a cheap
    /// copy (tensors are shared). For inference: its parameters are not the masters.
    pub fn inference_copy(&self) -> Result<Model> {
        let mut view = self.clone();
        if self.device() != crate::Device::Cpu {
            let tape = &mut Tape::inference();
            for p in view.params.iter_mut() {
                p.tensor = elementwise::to_compute_dtype(tape, &p.tensor)?;
            }
        }
        Ok(view)
    }

    /// Feeds the next `n` tokens of each of the cache's B sequences (`ids`: [B, n], row-major),
    /// appends their keys and values to `cache`, and returns the logits at each sequence's last
    /// new position as f32 on the host, [B, V]: `forward_with` a cache, for generation.
    pub fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let b = cache.batch();
        if ids.is_empty() || ids.len() % b != 0 {
            return Err(Error::Input(format!("{} token ids do not split into {b} sequences of n >= 1", ids.len())));
        }
        let n = ids.len() / b;
        let ids = Tensor::from_i32(ids.iter().map(|&id| id.min(i32::MAX as u32) as i32).collect(), [b, n])?;
        let logits =
            self.forward_with(&mut Tape::inference(), &ids, None, Mode::Eval, Some(cache))?.logits.expect("no targets");
        let v = self.config.vocab_size();
        Tensor::from_f32(logits.to_f32_vec()?, [b, v])
    }
}
