//! GPT-2 (Radford et al. 2019) as Hugging Face's GPT2LMHeadModel lays it out: pre-norm blocks,
//! learned position embeddings, tanh GELU, Conv1D weights stored [in, out], lm_head tied to wte.
//! Parameter names are the checkpoint keys, so loading and saving is a walk over `param_shapes`.

use super::{shortest_decimal, KvCache, Mode, Model, ModelOutput};
use crate::backend::Heads;
use crate::nn::ParamStore;
use crate::ops::gemm::WeightLayout;
use crate::ops::{attention, elementwise, embedding, gemm, layernorm, lora, nf4};
use crate::quant::nf4::Nf4Weight;
use crate::tape::Tape;
use crate::{Error, Result, Tensor};
use serde_json::{json, Value};
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

/// A Conv1D weight [in, out]: f32 in `params`, or NF4 in `Model::nf4` (QLoRA's frozen base).
#[derive(Clone)]
pub(crate) enum Conv1dWeight {
    F32(Tensor),
    Nf4(Arc<Nf4Weight>),
}

/// Parameters initialised as GPT2LMHeadModel initialises them: weights ~ N(0, 0.02), the two
/// residual projections (attn.c_proj, mlp.c_proj) ~ N(0, 0.02 / sqrt(2 n_layer)), biases 0,
/// layernorm weights 1. Deterministic in `seed`.
pub(crate) fn init_params(config: &Gpt2Config, seed: u64) -> Result<ParamStore> {
    let std = config.initializer_range;
    let proj_std = std / (2.0 * config.n_layer as f32).sqrt();
    super::random_params(config.param_shapes(), seed, |name| {
        if name.ends_with(".bias") {
            super::Init::Const(0.0)
        } else if name.contains(".ln_") {
            super::Init::Const(1.0)
        } else if name.ends_with("c_proj.weight") {
            super::Init::Normal(proj_std)
        } else {
            super::Init::Normal(std)
        }
    })
}

impl Model {
    fn gpt2_config(&self) -> &Gpt2Config {
        match &self.config {
            super::Config::Gpt2(c) => c,
            super::Config::Llama(_) => unreachable!("GPT-2 code runs on GPT-2 models only (Model::forward dispatches)"),
        }
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

    fn gpt2_weights(&self, i: usize) -> Result<Block> {
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

    /// Transformer block `i` on the residual stream x [B, T, C] (pre-norm: x + attn(ln_1(x)),
    /// then + mlp(ln_2(x))). Dropout sites draw from `seed`, so a recomputation draws the same masks.
    /// With `cache` (generation), x continues the cached sequences: its keys and values are
    /// appended and its queries attend to everything cached.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gpt2_block(
        &self,
        tape: &mut Tape,
        i: usize,
        x: &Tensor,
        train: bool,
        seed: u64,
        cache: Option<&mut attention::KvLayer>,
    ) -> Result<Tensor> {
        let cfg = self.gpt2_config();
        let eps = cfg.layer_norm_epsilon;
        let site_seed = |site: u64| super::site_seed(seed, site);
        let w = self.gpt2_weights(i)?;
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

    pub(crate) fn gpt2_forward(
        &self,
        tape: &mut Tape,
        ids: &Tensor,
        targets: Option<&Tensor>,
        mode: Mode,
        cache: Option<&mut KvCache>,
    ) -> Result<ModelOutput> {
        let cfg = self.gpt2_config();
        let eps = cfg.layer_norm_epsilon;
        let (train, seed) = mode.parts();
        // Each dropout site draws its mask from its own stream of the step's seed.
        let site_seed = |site: u64| super::site_seed(seed, site);

        let wte = self.p("transformer.wte.weight")?; // [V, C]
        let wpe = self.p("transformer.wpe.weight")?; // [P, C]

        // The position of ids' first column: with a cache, they continue its sequences.
        let past = self.check_cache(cache.as_deref(), ids, targets)?;
        let mut x = embedding::embedding_at(tape, ids, &wte, &wpe, past)?; // [B, T, C]
        x = self.embedding_lora(tape, crate::nn::lora::WTE, ids, x)?;
        x = elementwise::dropout(tape, &x, cfg.embd_pdrop, train, site_seed(0))?;
        let x = self.run_blocks(tape, x, train, seed, cache)?; // [B, T, C], or [B, 1, C] with a cache
        let h = layernorm::layernorm(
            tape,
            &x,
            &self.p("transformer.ln_f.weight")?,
            &self.p("transformer.ln_f.bias")?,
            eps,
        )?;
        self.head_and_loss(tape, &h, &wte, targets, train, site_seed(super::LM_HEAD_LORA_SITE))
    }
}
