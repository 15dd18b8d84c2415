//! GPT-2 (Radford et al. 2019) as Hugging Face's GPT2LMHeadModel lays it out: pre-norm blocks,
//! learned position embeddings, tanh GELU, Conv1D weights stored [in, out], lm_head tied to wte.
//! Parameter names are the checkpoint keys, so loading and saving is a walk over `param_shapes`.

use crate::backend::Heads;
use crate::nn::lora::Lora;
use crate::nn::ParamStore;
use crate::ops::gemm::WeightLayout;
use crate::ops::{attention, elementwise, embedding, gemm, layernorm, lora, nf4, xent};
use crate::quant::nf4::Nf4Weight;
use crate::tape::Tape;
use crate::{Error, Result, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// The hyper-parameters of a GPT-2, as in a Hugging Face `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    /// Context length: the number of learned positions.
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// MLP width; None means 4 * n_embd.
    pub n_inner: Option<usize>,
    pub layer_norm_epsilon: f32,
    pub embd_pdrop: f32,
    pub resid_pdrop: f32,
    pub attn_pdrop: f32,
    pub initializer_range: f32,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// An f32 as the f64 of its shortest round-tripping decimal (0.1f32 -> 0.1), for JSON.
fn shortest_decimal(x: f32) -> f64 {
    // Display prints the shortest digits that parse back to the same f32
    x.to_string().parse().expect("an f32's decimal form parses")
}

/// The names `Gpt2Config::preset` knows.
pub const PRESETS: &[&str] = &["tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"];

impl Gpt2Config {
    /// A named size: `gpt2` (124M), `gpt2-medium` (355M), `gpt2-large`, `gpt2-xl`, or `tiny`
    /// (about 0.9M parameters: for tests and CPU demos).
    pub fn preset(name: &str) -> Result<Self> {
        let (n_embd, n_layer, n_head, vocab_size, n_positions) = match name {
            "tiny" => (128, 4, 4, 512, 256),
            "gpt2" => (768, 12, 12, 50257, 1024),
            "gpt2-medium" => (1024, 24, 16, 50257, 1024),
            "gpt2-large" => (1280, 36, 20, 50257, 1024),
            "gpt2-xl" => (1600, 48, 25, 50257, 1024),
            _ => return Err(Error::unknown("preset", name, PRESETS.join(", "))),
        };
        let eos = (vocab_size - 1) as u32;
        Ok(Gpt2Config {
            vocab_size,
            n_positions,
            n_embd,
            n_layer,
            n_head,
            n_inner: None,
            layer_norm_epsilon: 1e-5,
            embd_pdrop: 0.1,
            resid_pdrop: 0.1,
            attn_pdrop: 0.1,
            initializer_range: 0.02,
            bos_token_id: Some(eos),
            eos_token_id: Some(eos),
        })
    }

    /// The MLP's hidden width.
    pub fn ffn_dim(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Reads a Hugging Face `config.json`, rejecting what kiln's GPT-2 does not implement.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::read(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::config(path, format!("not valid JSON ({e})")))?;
        Self::from_json(&v, path)
    }

    /// Parses a config object; `path` only labels errors.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| Error::config(path, "the top level must be a JSON object"))?;
        if let Some(mt) = obj.get("model_type") {
            if mt.as_str() != Some("gpt2") {
                return Err(Error::config(
                    path,
                    format!("model_type is {mt}, but kiln reads GPT-2 configs (model_type \"gpt2\")"),
                ));
            }
        }
        // GPT2Config's attribute_map: the generic names are accepted too.
        let get = |keys: &[&str]| keys.iter().find_map(|k| obj.get(*k).filter(|v| !v.is_null()));
        let int = |keys: &[&str], default: Option<usize>| -> Result<usize> {
            match get(keys) {
                None => default.ok_or_else(|| Error::config(path, format!("missing required key \"{}\"", keys[0]))),
                Some(x) => match x.as_u64() {
                    Some(n) if n > 0 => Ok(n as usize),
                    _ => Err(Error::config(path, format!("\"{}\" must be a positive integer, got {x}", keys[0]))),
                },
            }
        };
        let float = |key: &str, default: f32| -> Result<f32> {
            match obj.get(key).filter(|v| !v.is_null()) {
                None => Ok(default),
                Some(x) => match x.as_f64().map(|f| f as f32) {
                    Some(f) if f.is_finite() => Ok(f),
                    _ => Err(Error::config(path, format!("\"{key}\" must be a finite number, got {x}"))),
                },
            }
        };
        let flag = |key: &str, default: bool| -> Result<bool> {
            match obj.get(key).filter(|v| !v.is_null()) {
                None => Ok(default),
                Some(x) => {
                    x.as_bool().ok_or_else(|| Error::config(path, format!("\"{key}\" must be true or false, got {x}")))
                }
            }
        };
        let token =
            |key: &str| -> Option<u32> { obj.get(key).and_then(|x| x.as_u64()).and_then(|x| u32::try_from(x).ok()) };

        let cfg = Gpt2Config {
            vocab_size: int(&["vocab_size"], None)?,
            n_positions: int(&["n_positions", "max_position_embeddings", "n_ctx"], None)?,
            n_embd: int(&["n_embd", "hidden_size"], None)?,
            n_layer: int(&["n_layer", "num_hidden_layers"], None)?,
            n_head: int(&["n_head", "num_attention_heads"], None)?,
            n_inner: match obj.get("n_inner").filter(|v| !v.is_null()) {
                None => None,
                Some(_) => Some(int(&["n_inner"], None)?),
            },
            layer_norm_epsilon: float("layer_norm_epsilon", 1e-5)?,
            embd_pdrop: float("embd_pdrop", 0.1)?,
            resid_pdrop: float("resid_pdrop", 0.1)?,
            attn_pdrop: float("attn_pdrop", 0.1)?,
            initializer_range: float("initializer_range", 0.02)?,
            bos_token_id: token("bos_token_id"),
            eos_token_id: token("eos_token_id"),
        };
        let act = obj.get("activation_function").and_then(|x| x.as_str()).unwrap_or("gelu_new");
        if !matches!(act, "gelu_new" | "gelu_pytorch_tanh") {
            return Err(Error::config(
                path,
                format!("activation_function \"{act}\" is not supported: kiln's GPT-2 uses the tanh GELU (\"gelu_new\"); set it to \"gelu_new\" or convert the model"),
            ));
        }
        let unsupported = [
            ("scale_attn_weights", true, "attention scores are always scaled by 1/sqrt(head_dim)"),
            ("scale_attn_by_inverse_layer_idx", false, "per-layer attention scaling is not implemented"),
            ("add_cross_attention", false, "cross-attention (encoder-decoder use) is not implemented"),
            ("tie_word_embeddings", true, "kiln's lm_head is tied to wte"),
        ];
        for (key, want, why) in unsupported {
            if flag(key, want)? != want {
                return Err(Error::config(
                    path,
                    format!("\"{key}\": {} is not supported ({why}); set it to {want}", !want),
                ));
            }
        }
        for (key, p) in
            [("embd_pdrop", cfg.embd_pdrop), ("resid_pdrop", cfg.resid_pdrop), ("attn_pdrop", cfg.attn_pdrop)]
        {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::config(path, format!("\"{key}\" = {p} must be in [0, 1)")));
            }
        }
        if cfg.layer_norm_epsilon.is_nan() || cfg.layer_norm_epsilon <= 0.0 {
            return Err(Error::config(
                path,
                format!("\"layer_norm_epsilon\" = {} must be positive", cfg.layer_norm_epsilon),
            ));
        }
        if cfg.n_embd % cfg.n_head != 0 {
            return Err(Error::config(
                path,
                format!("n_embd = {} is not divisible by n_head = {}", cfg.n_embd, cfg.n_head),
            ));
        }
        Ok(cfg)
    }

    /// The config as Hugging Face writes it, so transformers loads kiln's checkpoints. Floats are
    /// written as the shortest decimal that reads back to the same f32 (1e-05, 0.1), the value
    /// the user gave, not the f32's exact binary value widened to f64 (0.10000000149011612).
    pub fn to_json(&self, dtype: crate::DType) -> Value {
        json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "layer_norm_epsilon": shortest_decimal(self.layer_norm_epsilon),
            "embd_pdrop": shortest_decimal(self.embd_pdrop),
            "resid_pdrop": shortest_decimal(self.resid_pdrop),
            "attn_pdrop": shortest_decimal(self.attn_pdrop),
            "initializer_range": shortest_decimal(self.initializer_range),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "scale_attn_weights": true,
            "scale_attn_by_inverse_layer_idx": false,
            "reorder_and_upcast_attn": false,
            "tie_word_embeddings": true,
            "use_cache": true,
            "dtype": match dtype {
                crate::DType::BF16 => "bfloat16",
                crate::DType::F16 => "float16",
                _ => "float32",
            },
        })
    }

    /// Every parameter's Hugging Face name and shape, in transformers' order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (c, f, v, p) = (self.n_embd, self.ffn_dim(), self.vocab_size, self.n_positions);
        let mut out = vec![
            ("transformer.wte.weight".to_string(), vec![v, c]),
            ("transformer.wpe.weight".to_string(), vec![p, c]),
        ];
        for i in 0..self.n_layer {
            let h = format!("transformer.h.{i}");
            out.extend([
                (format!("{h}.ln_1.weight"), vec![c]),
                (format!("{h}.ln_1.bias"), vec![c]),
                (format!("{h}.attn.c_attn.weight"), vec![c, 3 * c]),
                (format!("{h}.attn.c_attn.bias"), vec![3 * c]),
                (format!("{h}.attn.c_proj.weight"), vec![c, c]),
                (format!("{h}.attn.c_proj.bias"), vec![c]),
                (format!("{h}.ln_2.weight"), vec![c]),
                (format!("{h}.ln_2.bias"), vec![c]),
                (format!("{h}.mlp.c_fc.weight"), vec![c, f]),
                (format!("{h}.mlp.c_fc.bias"), vec![f]),
                (format!("{h}.mlp.c_proj.weight"), vec![f, c]),
                (format!("{h}.mlp.c_proj.bias"), vec![c]),
            ]);
        }
        out.push(("transformer.ln_f.weight".to_string(), vec![c]));
        out.push(("transformer.ln_f.bias".to_string(), vec![c]));
        out
    }

    /// `num_params` computed without building the shapes, None when it overflows: a config read
    /// from a file is checked with it before its shapes are computed.
    pub fn checked_num_params(&self) -> Option<usize> {
        let [c, v, p, l] = [self.n_embd, self.vocab_size, self.n_positions, self.n_layer].map(|x| x as u128);
        let f = self.n_inner.map_or(4 * c, |f| f as u128);
        // per block: ln_1 and ln_2 (2C each), c_attn (C*3C + 3C), attn c_proj (C*C + C), c_fc (C*F + F),
        // mlp c_proj (F*C + C); products are checked in u128
        let block = (c * c).checked_mul(4)?.checked_add(c.checked_mul(f)?.checked_mul(2)?)?.checked_add(9 * c + f)?;
        let total = (v + p).checked_mul(c)?.checked_add(l.checked_mul(block)?)?.checked_add(2 * c)?;
        usize::try_from(total).ok()
    }

    /// Number of parameters (wte counted once: lm_head shares it).
    pub fn num_params(&self) -> usize {
        self.param_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
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

/// What a forward pass returns.
pub struct Gpt2Output {
    /// [B, T, V]
    pub logits: Tensor,
    /// Mean cross-entropy over positions with a target, when targets were given.
    pub loss: Option<Tensor>,
}

/// One transformer block's weights (shapes with C = n_embd, F = ffn_dim).
struct Block {
    ln_1_w: Tensor,           // [C]
    ln_1_b: Tensor,           // [C]
    c_attn_w: Conv1dWeight,   // [C, 3C]
    c_attn_b: Tensor,         // [3C]
    c_proj_w: Conv1dWeight,   // [C, C]
    c_proj_b: Tensor,         // [C]
    ln_2_w: Tensor,           // [C]
    ln_2_b: Tensor,           // [C]
    c_fc_w: Conv1dWeight,     // [C, F]
    c_fc_b: Tensor,           // [F]
    mlp_proj_w: Conv1dWeight, // [F, C]
    mlp_proj_b: Tensor,       // [C]
}

/// A Conv1D weight [in, out]: f32 in `params`, or NF4 in `Gpt2::nf4` (QLoRA's frozen base).
#[derive(Clone)]
pub(crate) enum Conv1dWeight {
    F32(Tensor),
    Nf4(Arc<Nf4Weight>),
}

/// A GPT-2 language model with its parameters under Hugging Face names.
#[derive(Clone)]
pub struct Gpt2 {
    pub config: Gpt2Config,
    pub params: ParamStore,
    /// A LoRA adapter on the Conv1D layers, wte and lm_head (`nn::lora::attach`,
    /// `io::peft::load_adapter`); the forward pass and generation apply it unmerged.
    pub lora: Option<Lora>,
    /// QLoRA's frozen base: Conv1D weights (by checkpoint name, e.g.
    /// `transformer.h.0.attn.c_attn.weight`) held in NF4 and absent from `params`
    /// (`quantize_nf4`). The forward pass dequantizes them per call.
    pub nf4: Option<BTreeMap<String, Arc<Nf4Weight>>>,
    /// Recompute each block's activations during backward instead of keeping them.
    pub gradient_checkpointing: bool,
}

impl Gpt2 {
    /// A randomly initialised model, as GPT2LMHeadModel initialises one: weights ~ N(0, 0.02),
    /// the two residual projections (attn.c_proj, mlp.c_proj) ~ N(0, 0.02 / sqrt(2 n_layer)),
    /// biases 0, layernorm weights 1. Deterministic in `seed`.
    pub fn new_random(config: Gpt2Config, seed: u64) -> Result<Self> {
        let std = config.initializer_range;
        let proj_std = std / (2.0 * config.n_layer as f32).sqrt();
        let tensors: Vec<(String, Tensor)> = config
            .param_shapes()
            .into_par_iter()
            .enumerate()
            .map(|(i, (name, dims))| {
                let n: usize = dims.iter().product();
                let data = if name.ends_with(".bias") {
                    vec![0.0; n]
                } else if name.contains(".ln_") {
                    vec![1.0; n]
                } else {
                    let s = if name.ends_with("c_proj.weight") { proj_std } else { std };
                    let normal = Normal::new(0.0f32, s).expect("a positive standard deviation");
                    // One stream per parameter, so initialisation is parallel and order-free.
                    let mut rng =
                        rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64);
                    (0..n).map(|_| normal.sample(&mut rng)).collect()
                };
                Tensor::from_f32(data, dims.as_slice()).map(|t| (name, t))
            })
            .collect::<Result<_>>()?;
        let mut params = ParamStore::new();
        for (name, t) in tensors {
            params.insert(name, t);
        }
        Ok(Gpt2 { config, params, lora: None, nf4: None, gradient_checkpointing: false })
    }

    fn p(&self, name: &str) -> Result<Tensor> {
        self.params.get(name).cloned()
    }

    /// The Conv1D weight called `name`: its NF4 form when quantized, else the f32 parameter.
    pub(crate) fn conv1d_weight(&self, name: &str) -> Result<Conv1dWeight> {
        match self.nf4.as_ref().and_then(|q| q.get(name)) {
            Some(q) => Ok(Conv1dWeight::Nf4(Arc::clone(q))),
            None => self.p(name).map(Conv1dWeight::F32),
        }
    }

    fn block(&self, i: usize) -> Result<Block> {
        let h = |s: &str| self.p(&format!("transformer.h.{i}.{s}"));
        let w = |s: &str| self.conv1d_weight(&format!("transformer.h.{i}.{s}"));
        Ok(Block {
            ln_1_w: h("ln_1.weight")?,
            ln_1_b: h("ln_1.bias")?,
            c_attn_w: w("attn.c_attn.weight")?,
            c_attn_b: h("attn.c_attn.bias")?,
            c_proj_w: w("attn.c_proj.weight")?,
            c_proj_b: h("attn.c_proj.bias")?,
            ln_2_w: h("ln_2.weight")?,
            ln_2_b: h("ln_2.bias")?,
            c_fc_w: w("mlp.c_fc.weight")?,
            c_fc_b: h("mlp.c_fc.bias")?,
            mlp_proj_w: w("mlp.c_proj.weight")?,
            mlp_proj_b: h("mlp.c_proj.bias")?,
        })
    }

    /// QLoRA's base: moves every Conv1D weight from `params` into `nf4` (NF4 in blocks of
    /// `blocksize`, absmax double-quantized), freeing the f32 copies; wte, wpe, the layernorms
    /// and the biases stay f32 and are frozen. Refuses (naming the layer, changing nothing) when
    /// a layer's size is not a multiple of the block size: kiln does not pad.
    pub fn quantize_nf4(&mut self, blocksize: usize) -> Result<()> {
        let mut done = self.nf4.take().unwrap_or_default();
        let mut todo = Vec::new();
        for (module, fan_in, fan_out) in crate::model::lora::conv1d_modules(&self.config) {
            let name = format!("{module}.weight");
            if done.contains_key(&name) {
                continue;
            }
            let w = self.params.get(&name)?;
            let q = Nf4Weight::quantize(w.f32s()?, [fan_in, fan_out], blocksize).map_err(|e| {
                Error::Input(format!(
                    "QLoRA cannot quantize {module} (weight [{fan_in}, {fan_out}], {} elements) to NF4: {e}",
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

    /// The Conv1D `module` (weight [in, out], bias [out]): x @ W + b, GELU'd when `gelu`; through
    /// the LoRA op when the model's adapter targets the module (dropout on the adapter's input
    /// from `seed` when `train`).
    #[allow(clippy::too_many_arguments)]
    fn conv1d(
        &self,
        tape: &mut Tape,
        module: &str,
        x: &Tensor,
        w: &Conv1dWeight,
        b: &Tensor,
        gelu: bool,
        train: bool,
        seed: u64,
    ) -> Result<Tensor> {
        let adapter = self.lora.as_ref().and_then(|l| Some((l.adapter(module)?, l.config.dropout)));
        let y = match (w, adapter) {
            (Conv1dWeight::F32(w), None) => return gemm::linear(tape, x, w, Some(b), WeightLayout::InOut, gelu),
            (Conv1dWeight::F32(w), Some((ad, p))) => lora::lora_linear(
                tape,
                x,
                w,
                WeightLayout::InOut,
                Some(b),
                &lora::LoraAdapter { a: ad.a, b: ad.b, scaling: ad.scaling, dropout_p: p, train, seed },
            )?,
            (Conv1dWeight::Nf4(w), ad) => {
                let ad =
                    ad.map(|(ad, p)| nf4::Nf4Lora { a: ad.a, b: ad.b, scaling: ad.scaling, dropout_p: p, train, seed });
                nf4::nf4_linear(tape, x, w, Some(b), ad)?
            }
        };
        if gelu {
            elementwise::gelu(tape, &y)
        } else {
            Ok(y)
        }
    }

    /// x [..., C] (the embedding of `ids`) plus the LoRA update of `transformer.wte` when the
    /// adapter targets it: scaling * lora_embedding_A[:, ids]^T lora_embedding_B^T (no dropout,
    /// as in PEFT).
    pub(crate) fn wte_lora(&self, tape: &mut Tape, ids: &Tensor, x: Tensor) -> Result<Tensor> {
        match self.lora.as_ref().and_then(|l| l.adapter(crate::nn::lora::WTE)) {
            None => Ok(x),
            Some(ad) => {
                let delta = lora::lora_embedding(tape, ids, ad.a, ad.b, ad.scaling)?;
                elementwise::add(tape, &x, &delta)
            }
        }
    }

    /// The output layer on h [..., C]: logits [..., V] = h @ wte^T (lm_head is tied to wte), plus
    /// the LoRA update scaling * dropout(h) A^T B^T when the adapter targets `lm_head` (dropout
    /// from `seed` when `train`).
    pub(crate) fn lm_head(&self, tape: &mut Tape, h: &Tensor, wte: &Tensor, train: bool, seed: u64) -> Result<Tensor> {
        let adapter = self.lora.as_ref().and_then(|l| Some((l.adapter(crate::nn::lora::LM_HEAD)?, l.config.dropout)));
        match adapter {
            None => gemm::linear(tape, h, wte, None, WeightLayout::OutIn, false),
            Some((ad, p)) => lora::lora_linear(
                tape,
                h,
                wte,
                WeightLayout::OutIn,
                None,
                &lora::LoraAdapter { a: ad.a, b: ad.b, scaling: ad.scaling, dropout_p: p, train, seed },
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

    /// Transformer block `i` on the residual stream x [B, T, C] (pre-norm: x + attn(ln_1(x)),
    /// then + mlp(ln_2(x))). Dropout sites draw from `seed`, so a recomputation draws the same masks.
    /// With `cache` (generation), x continues the cached sequences: its keys and values are
    /// appended and its queries attend to everything cached.
    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        tape: &mut Tape,
        i: usize,
        x: &Tensor,
        train: bool,
        seed: u64,
        cache: Option<&mut attention::KvLayer>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let eps = cfg.layer_norm_epsilon;
        let site_seed = |site: u64| seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(site);
        let w = self.block(i)?;
        // A Conv1D of this block; the LoRA dropout sites (k = 0..3) are apart from the model's own.
        let conv1d = |tape: &mut Tape, k: u64, name: &str, x: &Tensor, w: &Conv1dWeight, b: &Tensor, gelu: bool| {
            let seed = site_seed((1 << 32) + 4 * i as u64 + k);
            self.conv1d(tape, &format!("transformer.h.{i}.{name}"), x, w, b, gelu, train, seed)
        };
        let h = layernorm::layernorm(tape, x, &w.ln_1_w, &w.ln_1_b, eps)?;
        let qkv = conv1d(tape, 0, "attn.c_attn", &h, &w.c_attn_w, &w.c_attn_b, false)?; // [B, T, 3C]
        let a = match cache {
            None => attention::attention(tape, &qkv, Heads::mha(cfg.n_head))?, // [B, T, C]
            Some(kv) => attention::attention_cached(tape, &qkv, kv, Heads::mha(cfg.n_head))?,
        };
        let a = conv1d(tape, 1, "attn.c_proj", &a, &w.c_proj_w, &w.c_proj_b, false)?;
        let a = elementwise::dropout(tape, &a, cfg.resid_pdrop, train, site_seed(2 * i as u64 + 1))?;
        // x + a and ln_2 of it in one pass on the GPU.
        let (x, h) = layernorm::add_layernorm(tape, x, &a, &w.ln_2_w, &w.ln_2_b, eps)?;
        let f = conv1d(tape, 2, "mlp.c_fc", &h, &w.c_fc_w, &w.c_fc_b, true)?; // [B, T, F]
        let m = conv1d(tape, 3, "mlp.c_proj", &f, &w.mlp_proj_w, &w.mlp_proj_b, false)?;
        let m = elementwise::dropout(tape, &m, cfg.resid_pdrop, train, site_seed(2 * i as u64 + 2))?;
        elementwise::add(tape, &x, &m)
    }

    /// Block `i` with gradient checkpointing: run without keeping activations, and record one
    /// node whose backward re-runs the block on a fresh tape (same dropout masks) and
    /// back-propagates through it. Costs one more block forward in backward; saves every
    /// activation inside the block.
    fn checkpointed_block(&self, tape: &mut Tape, i: usize, x: &Tensor, train: bool, seed: u64) -> Result<Tensor> {
        let out = self.block_forward(&mut Tape::inference(), i, x, train, seed, None)?;
        let (base, adapter) = (format!("transformer.h.{i}."), format!("base_model.model.transformer.h.{i}."));
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
            let recompute = move |t: &mut Tape, x: &Tensor| model.block_forward(t, i, x, train, seed, None);
            crate::ops::checkpoint::record(tape, Box::new(recompute), x, params.clone(), &out);
        }
        Ok(out)
    }

    /// Logits for `ids` (I32 [B, T]) and, with `targets` (I32 [B, T], -100 = no target), the
    /// mean loss. Trainable parameters (the adapter's too) are watched on `tape`, so
    /// `tape.backward(loss)` yields their gradients.
    pub fn forward(&self, tape: &mut Tape, ids: &Tensor, targets: Option<&Tensor>, mode: Mode) -> Result<Gpt2Output> {
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
    ) -> Result<Gpt2Output> {
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

    fn forward_compute(
        &self,
        tape: &mut Tape,
        ids: &Tensor,
        targets: Option<&Tensor>,
        mode: Mode,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Gpt2Output> {
        let cfg = &self.config;
        let eps = cfg.layer_norm_epsilon;
        let (train, seed) = match mode {
            Mode::Eval => (false, 0),
            Mode::Train { seed } => (true, seed),
        };
        // Each dropout site draws its mask from its own stream of the step's seed.
        let site_seed = |site: u64| seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(site);

        let wte = self.p("transformer.wte.weight")?; // [V, C]
        let wpe = self.p("transformer.wpe.weight")?; // [P, C]

        // The position of ids' first column: with a cache, they continue its sequences.
        let past = match cache.as_deref() {
            Some(_) if targets.is_some() => {
                return Err(Error::Input("a forward pass with a KV cache computes no loss: give no targets".into()))
            }
            Some(kv) => kv.check(cfg, ids.dims())?,
            None => 0,
        };
        let mut x = embedding::embedding_at(tape, ids, &wte, &wpe, past)?; // [B, T, C]
        x = self.wte_lora(tape, ids, x)?;
        x = elementwise::dropout(tape, &x, cfg.embd_pdrop, train, site_seed(0))?;
        for i in 0..cfg.n_layer {
            x = match cache.as_deref_mut() {
                Some(kv) => self.block_forward(tape, i, &x, train, seed, Some(&mut kv.layers[i]))?,
                None if self.gradient_checkpointing && tape.is_recording() => {
                    self.checkpointed_block(tape, i, &x, train, seed)?
                }
                None => self.block_forward(tape, i, &x, train, seed, None)?,
            };
        }
        if cache.is_some() {
            x = elementwise::last_position(tape, &x)?; // [B, 1, C]
        }
        let h = layernorm::layernorm(
            tape,
            &x,
            &self.p("transformer.ln_f.weight")?,
            &self.p("transformer.ln_f.bias")?,
            eps,
        )?;
        let logits = self.lm_head(tape, &h, &wte, train, site_seed(LM_HEAD_LORA_SITE))?; // [B, T, V]
        let loss = targets.map(|t| xent::cross_entropy(tape, &logits, t)).transpose()?;
        Ok(Gpt2Output { logits, loss })
    }
}

/// Keys and values of every layer at the positions seen so far, for a batch of sequences that
/// advance together: what lets generation feed one new token per step instead of the whole
/// sequence (`Gpt2::forward_with`). The buffers live where the model runs (f32 on the CPU, bf16
/// on the GPU).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<attention::KvLayer>,
    n_embd: usize,
}

impl KvCache {
    /// An empty cache for `batch` sequences of up to `capacity` tokens (at most n_positions).
    pub fn new(config: &Gpt2Config, batch: usize, capacity: usize) -> Result<Self> {
        if capacity > config.n_positions {
            return Err(Error::SeqTooLong { t: capacity, n_positions: config.n_positions });
        }
        if batch == 0 {
            return Err(Error::Input("a KV cache needs at least one sequence".into()));
        }
        let layers = (0..config.n_layer).map(|_| attention::KvLayer::new(batch, capacity)).collect();
        Ok(KvCache { layers, n_embd: config.n_embd })
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
        Ok(KvCache { layers, n_embd: self.n_embd })
    }

    /// Checks that ids of `dims` [B, T] can continue this cache's sequences in a model of
    /// `config`, and returns the position they start at.
    fn check(&self, config: &Gpt2Config, dims: &[usize]) -> Result<usize> {
        if self.n_embd != config.n_embd || self.layers.len() != config.n_layer {
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

impl Gpt2 {
    /// The model as its forward pass runs: on the GPU with the parameters cast to bf16 once
    /// (generation reuses it for every token rather than casting at each call), on the CPU a cheap
    /// copy (tensors are shared). For inference: its parameters are not the masters.
    pub fn inference_copy(&self) -> Result<Gpt2> {
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
        let logits = self.forward_with(&mut Tape::inference(), &ids, None, Mode::Eval, Some(cache))?.logits;
        let v = self.config.vocab_size;
        Tensor::from_f32(logits.to_f32_vec()?, [b, v])
    }
}
