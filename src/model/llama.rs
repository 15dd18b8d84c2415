//! The Llama family (Touvron et al. 2023; SmolLM2, Llama 3.2) as Hugging Face's LlamaForCausalLM
//! lays it out: pre-norm blocks with RMSNorm, rotary position embeddings (rotate-half), grouped-query
//! attention, a SwiGLU MLP, no biases, nn.Linear weights stored [out, in], lm_head tied to
//! embed_tokens or not. Parameter names are the checkpoint keys.

use super::{ConfigReader, KvCache, Mode, Model, ModelOutput};
use crate::backend::Heads;
use crate::ops::gemm::{self, WeightLayout};
use crate::ops::{attention, elementwise, embedding, lora, nf4, rmsnorm, rope};
use crate::tape::Tape;
use crate::{Error, Result, Tensor};
use serde_json::{json, Value};
use std::path::Path;

/// The hyper-parameters of a Llama, as in a Hugging Face `config.json` (model_type "llama").
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    /// Model width C.
    pub hidden_size: usize,
    /// MLP width F (gate_proj and up_proj: C -> F, down_proj: F -> C).
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads, each serving num_attention_heads / num_key_value_heads query heads.
    pub num_key_value_heads: usize,
    /// Per-head size (hidden_size / num_attention_heads unless config.json says otherwise).
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    /// Base of the rotary frequencies.
    pub rope_theta: f32,
    /// Context length the model was trained for (rotary positions have no table; longer
    /// sequences are refused as for GPT-2).
    pub max_position_embeddings: usize,
    /// lm_head shares embed_tokens' matrix (SmolLM2, Llama 3.2 1B) or has its own.
    pub tie_word_embeddings: bool,
    pub initializer_range: f32,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// The names `LlamaConfig::preset` knows.
pub const PRESETS: &[&str] = &["llama-tiny", "smollm2-135m", "smollm2-360m"];

impl LlamaConfig {
    /// A named size: `smollm2-135m`, `smollm2-360m` (HuggingFaceTB's SmolLM2 shapes, GPT-2's
    /// 49,152-token vocabulary size), or `llama-tiny` (about 1M parameters: tests and CPU demos).
    pub fn preset(name: &str) -> Result<Self> {
        // (C, F, layers, heads, kv heads, vocab, context, theta)
        let (c, f, l, nh, nkv, v, p, theta) = match name {
            "llama-tiny" => (128, 352, 4, 4, 2, 512, 256, 10_000.0),
            "smollm2-135m" => (576, 1536, 30, 9, 3, 49152, 8192, 100_000.0),
            "smollm2-360m" => (960, 2560, 32, 15, 5, 49152, 8192, 100_000.0),
            _ => return Err(Error::unknown("preset", name, PRESETS.join(", "))),
        };
        let (bos, eos) = if name == "llama-tiny" { (v as u32 - 1, v as u32 - 1) } else { (0, 0) };
        Ok(LlamaConfig {
            vocab_size: v,
            hidden_size: c,
            intermediate_size: f,
            num_hidden_layers: l,
            num_attention_heads: nh,
            num_key_value_heads: nkv,
            head_dim: c / nh,
            rms_norm_eps: 1e-5,
            rope_theta: theta,
            max_position_embeddings: p,
            tie_word_embeddings: true,
            initializer_range: 0.02,
            bos_token_id: Some(bos),
            eos_token_id: Some(eos),
        })
    }

    /// The attention's heads.
    pub fn heads(&self) -> Heads {
        Heads { n_head: self.num_attention_heads, n_kv_head: self.num_key_value_heads }
    }

    /// Parses a config object (model_type "llama"); `path` only labels errors. What kiln's Llama
    /// does not compute (biases, rope scaling, sliding windows, another activation) is refused
    /// with the key that asks for it.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let r = ConfigReader::new(v, path)?;
        // transformers 5 moves rope_theta (and the scaling type) under rope_parameters
        let rope = r.obj.get("rope_parameters").filter(|x| !x.is_null());
        if let Some(rp) = rope {
            if !rp.is_object() {
                return Err(Error::config(path, format!("\"rope_parameters\" must be an object, got {rp}")));
            }
        }
        let rope_type =
            |o: &Value| o.get("rope_type").or_else(|| o.get("type")).and_then(|t| t.as_str()).map(String::from);
        if let Some(t) = rope.and_then(rope_type).filter(|t| t != "default") {
            return Err(Error::config(
                path,
                format!("\"rope_parameters\": rope_type \"{t}\" is not supported: kiln computes the default rotary embedding only"),
            ));
        }
        if let Some(s) = r.obj.get("rope_scaling").filter(|x| !x.is_null()) {
            let t = rope_type(s).unwrap_or_else(|| s.to_string());
            if t != "default" {
                return Err(Error::config(
                    path,
                    format!(
                        "\"rope_scaling\" ({t}) is not supported: kiln computes the default rotary embedding only; \
                             a model trained with scaled rotary positions would compute something else"
                    ),
                ));
            }
        }
        let theta = match rope.and_then(|rp| rp.get("rope_theta")).filter(|x| !x.is_null()) {
            Some(x) => x.as_f64().filter(|f| f.is_finite() && *f > 1.0).ok_or_else(|| {
                Error::config(path, format!("\"rope_parameters.rope_theta\" must be a number > 1, got {x}"))
            })? as f32,
            None => r.float("rope_theta", 10_000.0)?,
        };
        if theta <= 1.0 {
            return Err(Error::config(path, format!("\"rope_theta\" = {theta} must be greater than 1")));
        }
        let (c, nh) = (r.int(&["hidden_size"], None)?, r.int(&["num_attention_heads"], None)?);
        let cfg = LlamaConfig {
            vocab_size: r.int(&["vocab_size"], None)?,
            hidden_size: c,
            intermediate_size: r.int(&["intermediate_size"], None)?,
            num_hidden_layers: r.int(&["num_hidden_layers"], None)?,
            num_attention_heads: nh,
            num_key_value_heads: r.int(&["num_key_value_heads"], Some(nh))?,
            head_dim: r.int(&["head_dim"], Some((c / nh).max(1)))?,
            rms_norm_eps: r.float("rms_norm_eps", 1e-6)?,
            rope_theta: theta,
            max_position_embeddings: r.int(&["max_position_embeddings"], None)?,
            tie_word_embeddings: r.flag("tie_word_embeddings", true)?,
            initializer_range: r.float("initializer_range", 0.02)?,
            bos_token_id: r.token("bos_token_id"),
            eos_token_id: r.token("eos_token_id"),
        };
        let act = r.obj.get("hidden_act").and_then(|x| x.as_str()).unwrap_or("silu");
        if act != "silu" {
            return Err(Error::config(
                path,
                format!("\"hidden_act\": \"{act}\" is not supported: kiln's Llama MLP is SwiGLU (\"silu\")"),
            ));
        }
        for (key, why) in [
            ("attention_bias", "biases on q_proj, k_proj, v_proj and o_proj"),
            ("mlp_bias", "biases on gate_proj, up_proj and down_proj"),
            ("use_sliding_window", "sliding-window attention"),
        ] {
            if r.flag(key, false)? {
                return Err(Error::config(
                    path,
                    format!("\"{key}\": true asks for {why}, which kiln's Llama does not have"),
                ));
            }
        }
        if let Some(w) = r.obj.get("sliding_window").filter(|x| !x.is_null()) {
            return Err(Error::config(
                path,
                format!("\"sliding_window\": {w} asks for sliding-window attention, which kiln's Llama does not have; set it to null"),
            ));
        }
        for (key, p) in [("attention_dropout", r.float("attention_dropout", 0.0)?)] {
            if p != 0.0 {
                return Err(Error::config(
                    path,
                    format!("\"{key}\" = {p} is not supported: kiln's attention has no dropout"),
                ));
            }
        }
        if cfg.rms_norm_eps.is_nan() || cfg.rms_norm_eps <= 0.0 {
            return Err(Error::config(path, format!("\"rms_norm_eps\" = {} must be positive", cfg.rms_norm_eps)));
        }
        if !cfg.heads().is_valid() {
            return Err(Error::config(
                path,
                format!(
                    "num_key_value_heads = {} must divide num_attention_heads = {}",
                    cfg.num_key_value_heads, cfg.num_attention_heads
                ),
            ));
        }
        if cfg.head_dim % 2 != 0 {
            return Err(Error::config(path, format!("head_dim = {} must be even (rotary pairs)", cfg.head_dim)));
        }
        Ok(cfg)
    }

    /// The config as transformers 5 writes it (rope_theta under rope_parameters), so
    /// `LlamaForCausalLM.from_pretrained` loads kiln's checkpoints.
    pub fn to_json(&self, dtype: crate::DType) -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": super::shortest_decimal(self.rms_norm_eps),
            "rope_parameters": { "rope_type": "default", "rope_theta": super::shortest_decimal(self.rope_theta) },
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": super::shortest_decimal(self.initializer_range),
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "pretraining_tp": 1,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "use_cache": true,
            "dtype": super::dtype_name(dtype),
        })
    }

    /// Width of the query heads together (the attention output), nh * hd.
    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key heads (and of the value heads), nkv * hd.
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The linear layers of block `i`: (module name, in, out), in transformers' order.
    pub fn linear_modules(&self, i: usize) -> [(String, usize, usize); 7] {
        let (c, f, q, kv) = (self.hidden_size, self.intermediate_size, self.q_width(), self.kv_width());
        let l = format!("model.layers.{i}");
        [
            (format!("{l}.self_attn.q_proj"), c, q),
            (format!("{l}.self_attn.k_proj"), c, kv),
            (format!("{l}.self_attn.v_proj"), c, kv),
            (format!("{l}.self_attn.o_proj"), q, c),
            (format!("{l}.mlp.gate_proj"), c, f),
            (format!("{l}.mlp.up_proj"), c, f),
            (format!("{l}.mlp.down_proj"), f, c),
        ]
    }

    /// Every parameter's Hugging Face name and shape, in transformers' order (Linear weights
    /// [out, in]).
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (c, v) = (self.hidden_size, self.vocab_size);
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, c])];
        for i in 0..self.num_hidden_layers {
            out.extend(self.linear_modules(i).into_iter().map(|(m, fi, fo)| (format!("{m}.weight"), vec![fo, fi])));
            out.push((format!("model.layers.{i}.input_layernorm.weight"), vec![c]));
            out.push((format!("model.layers.{i}.post_attention_layernorm.weight"), vec![c]));
        }
        out.push(("model.norm.weight".to_string(), vec![c]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, c]));
        }
        out
    }

    /// The parameter count without building the shapes, None when it overflows.
    pub fn checked_num_params(&self) -> Option<usize> {
        let [c, f, v, l, q, kv] = [
            self.hidden_size,
            self.intermediate_size,
            self.vocab_size,
            self.num_hidden_layers,
            self.q_width(),
            self.kv_width(),
        ]
        .map(|x| x as u128);
        // per block: q and o (C*Q each), k and v (C*KV each), gate, up, down (C*F each), two norms
        let block =
            (2 * c).checked_mul(q)?.checked_add((2 * c).checked_mul(kv)?)?.checked_add((3 * c).checked_mul(f)?)?
                + 2 * c;
        let heads = if self.tie_word_embeddings { 1 } else { 2 };
        let total = (heads * v).checked_mul(c)?.checked_add(l.checked_mul(block)?)?.checked_add(c)?;
        usize::try_from(total).ok()
    }
}

/// The module name of the token embedding.
pub const EMBED_TOKENS: &str = "model.embed_tokens";

/// Parameters initialised as LlamaForCausalLM initialises them: every Linear and the embedding
/// ~ N(0, initializer_range), RMSNorm weights 1. Deterministic in `seed`.
pub(crate) fn init_params(config: &LlamaConfig, seed: u64) -> Result<crate::nn::ParamStore> {
    let std = config.initializer_range;
    super::random_params(config.param_shapes(), seed, |name| {
        if name.ends_with("norm.weight") {
            super::Init::Const(1.0)
        } else {
            super::Init::Normal(std)
        }
    })
}

impl Model {
    fn llama_config(&self) -> &LlamaConfig {
        match &self.config {
            super::Config::Llama(c) => c,
            super::Config::Gpt2(_) => unreachable!("Llama code runs on Llama models only (Model::forward dispatches)"),
        }
    }

    /// The Linear `module` (weight [out, in], no bias) on x [..., in]: through the LoRA op when
    /// the adapter targets it (dropout on its input from `seed` when `train`).
    fn linear(&self, tape: &mut Tape, module: &str, x: &Tensor, train: bool, seed: u64) -> Result<Tensor> {
        let name = format!("{module}.weight");
        let adapter = self.lora.as_ref().and_then(|l| Some((l.adapter(module)?, l.config.dropout)));
        if let Some(w) = self.nf4.as_ref().and_then(|q| q.get(&name)) {
            // QLoRA's frozen base, decoded inside the GEMM
            let ad = adapter.map(|(ad, p)| nf4::Nf4Lora {
                a: ad.a,
                b: ad.b,
                scaling: ad.scaling,
                dropout_p: p,
                train,
                seed,
            });
            return nf4::nf4_linear_with(tape, x, w, WeightLayout::OutIn, None, ad);
        }
        let w = self.params.get(&name)?;
        match adapter {
            None => gemm::linear(tape, x, w, None, WeightLayout::OutIn, false),
            Some((ad, p)) => lora::lora_linear(
                tape,
                x,
                w,
                WeightLayout::OutIn,
                None,
                &lora::LoraAdapter { a: ad.a, b: ad.b, scaling: ad.scaling, dropout_p: p, train, seed },
            ),
        }
    }

    /// Block `i` on the residual stream x [B, T, C]: x + o_proj(attn(rope(q, k), v)) over
    /// input_layernorm(x), then + down_proj(silu(gate_proj(h)) * up_proj(h)) over
    /// post_attention_layernorm. With `cache`, x continues the cached sequences.
    pub(crate) fn llama_block(
        &self,
        tape: &mut Tape,
        i: usize,
        x: &Tensor,
        train: bool,
        seed: u64,
        cache: Option<&mut attention::KvLayer>,
    ) -> Result<Tensor> {
        let cfg = self.llama_config();
        let eps = cfg.rms_norm_eps;
        let l = format!("model.layers.{i}");
        let p = |s: &str| self.params.get(&format!("{l}.{s}")).cloned();
        // the seven linear layers' LoRA dropout sites, apart from every other block's
        let lin = |tape: &mut Tape, k: u64, name: &str, x: &Tensor| {
            let site = super::site_seed(seed, (1 << 32) + 8 * i as u64 + k);
            self.linear(tape, &format!("{l}.{name}"), x, train, site)
        };
        let h = rmsnorm::rmsnorm(tape, x, &p("input_layernorm.weight")?, eps)?;
        let q = lin(tape, 0, "self_attn.q_proj", &h)?; // [B, T, nh hd]
        let k = lin(tape, 1, "self_attn.k_proj", &h)?; // [B, T, nkv hd]
        let v = lin(tape, 2, "self_attn.v_proj", &h)?;
        let a = match cache {
            None => rope::rope_attention(tape, &q, &k, &v, cfg.heads(), cfg.rope_theta)?,
            Some(kv) => {
                let qkv = rope::rope_qkv(tape, &q, &k, &v, cfg.heads(), cfg.rope_theta, kv.len())?;
                attention::attention_cached(tape, &qkv, kv, cfg.heads())?
            }
        };
        let a = lin(tape, 3, "self_attn.o_proj", &a)?;
        let (x, h) = rmsnorm::add_rmsnorm(tape, x, &a, &p("post_attention_layernorm.weight")?, eps)?;
        let g = lin(tape, 4, "mlp.gate_proj", &h)?; // [B, T, F]
        let u = lin(tape, 5, "mlp.up_proj", &h)?;
        let m = elementwise::swiglu(tape, &g, &u)?;
        let m = lin(tape, 6, "mlp.down_proj", &m)?;
        elementwise::add(tape, &x, &m)
    }

    /// The Llama forward pass (see `Model::forward_with`).
    pub(crate) fn llama_forward(
        &self,
        tape: &mut Tape,
        ids: &Tensor,
        targets: Option<&Tensor>,
        mode: Mode,
        cache: Option<&mut KvCache>,
    ) -> Result<ModelOutput> {
        let cfg = self.llama_config();
        let (train, seed) = mode.parts();
        let past = self.check_cache(cache.as_deref(), ids, targets)?;
        if past + ids.dims().get(1).copied().unwrap_or(0) > cfg.max_position_embeddings {
            return Err(Error::SeqTooLong { t: past + ids.dims()[1], n_positions: cfg.max_position_embeddings });
        }
        let emb = self.params.get(&format!("{EMBED_TOKENS}.weight"))?.clone(); // [V, C]
        let mut x = embedding::token_embedding(tape, ids, &emb)?; // [B, T, C]
        x = self.embedding_lora(tape, EMBED_TOKENS, ids, x)?;
        let x = self.run_blocks(tape, x, train, seed, cache)?; // [B, T, C], or [B, 1, C] with a cache
        let h = rmsnorm::rmsnorm(tape, &x, self.params.get("model.norm.weight")?, cfg.rms_norm_eps)?;
        let head = if cfg.tie_word_embeddings { emb } else { self.params.get("lm_head.weight")?.clone() };
        let site = super::site_seed(seed, super::LM_HEAD_LORA_SITE);
        self.head_and_loss(tape, &h, &head, targets, train, site)
    }
}
