//! The models' side of LoRA (nn/lora.rs has the adapters and the format): the modules
//! GPT2LMHeadModel and LlamaForCausalLM have, under the names PEFT gives them, which of them a `LoraConfig` targets (`resolve`),
//! attaching fresh adapters to a model (`attach`) and folding them into its weights (`merged`).

use crate::backend::cpu::lora as cpu_lora;
use crate::model::llama::EMBED_TOKENS;
use crate::model::{Config, Gpt2Config, Model};
use crate::nn::lora::{matches, Lora, LoraConfig, LoraModule, ModuleKind, ALL_LINEAR, LM_HEAD, WTE};
use crate::nn::ParamStore;
use crate::{Error, Result, Tensor};
use rand::{Rng, SeedableRng};

/// GPT-2's Conv1D modules, the layers kiln's LoRA adapts: (full name, in, out), in model order.
pub fn conv1d_modules(cfg: &Gpt2Config) -> Vec<(String, usize, usize)> {
    let (c, f) = (cfg.n_embd, cfg.ffn_dim());
    (0..cfg.n_layer)
        .flat_map(|i| {
            let h = format!("transformer.h.{i}");
            [
                (format!("{h}.attn.c_attn"), c, 3 * c),
                (format!("{h}.attn.c_proj"), c, c),
                (format!("{h}.mlp.c_fc"), c, f),
                (format!("{h}.mlp.c_proj"), f, c),
            ]
        })
        .collect()
}

/// The weight-matrix layers inside the blocks, the ones "all-linear" names: GPT-2's Conv1D layers
/// or a Llama's seven Linear layers, as (full name, kind, in, out) in model order.
pub fn block_modules(cfg: &Config) -> Vec<(String, ModuleKind, usize, usize)> {
    match cfg {
        Config::Gpt2(c) => conv1d_modules(c).into_iter().map(|(m, i, o)| (m, ModuleKind::Conv1d, i, o)).collect(),
        Config::Llama(c) => (0..c.num_hidden_layers)
            .flat_map(|l| c.linear_modules(l))
            .map(|(m, i, o)| (m, ModuleKind::Linear, i, o))
            .collect(),
    }
}

/// The LoRA targets a run's config names when it names none: GPT-2's Conv1D layers.
pub const GPT2_DEFAULT_TARGETS: [&str; 3] = ["c_attn", "c_proj", "c_fc"];

/// A Llama's seven linear layers, the targets of the QLoRA recipe kiln's users follow.
pub const LLAMA_DEFAULT_TARGETS: [&str; 7] =
    ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// `targets`, except that the default (GPT-2's names) on a Llama means its seven linear layers.
pub fn default_targets_for(cfg: &Config, targets: &[String]) -> Vec<String> {
    match cfg {
        Config::Llama(_) if targets.iter().map(String::as_str).eq(GPT2_DEFAULT_TARGETS) => {
            LLAMA_DEFAULT_TARGETS.iter().map(|t| t.to_string()).collect()
        }
        _ => targets.to_vec(),
    }
}

/// The module name of the token embedding: `transformer.wte` or `model.embed_tokens`.
pub fn embedding_module(cfg: &Config) -> &'static str {
    match cfg {
        Config::Gpt2(_) => WTE,
        Config::Llama(_) => EMBED_TOKENS,
    }
}

/// Every layer kiln's LoRA can adapt: (full name, kind, in, out), in model order (the token
/// embedding, the block layers, lm_head), with in and out as `LoraModule` counts them.
pub fn adaptable_modules(cfg: &Config) -> Vec<(String, ModuleKind, usize, usize)> {
    let (v, c) = (cfg.vocab_size(), cfg.n_embd());
    let mut out = vec![(embedding_module(cfg).to_string(), ModuleKind::Embedding, v, c)];
    out.extend(block_modules(cfg));
    out.push((LM_HEAD.to_string(), ModuleKind::LmHead, c, v));
    out
}

const RMS_NORM: &str = "an RMSNorm, which LoRA does not adapt (PEFT adapts Linear, Conv1D and Embedding layers)";
const NONE: &str = "a layer without weights, which LoRA cannot adapt";

/// The model's other modules (as transformers names them) and why LoRA does not adapt them here.
fn other_modules(cfg: &Config) -> Vec<(String, &'static str)> {
    match cfg {
        Config::Gpt2(c) => gpt2_other_modules(c),
        Config::Llama(c) => {
            const CONTAINER: &str = "a container of several layers, not a layer LoRA can adapt: name the layers \
                                     inside it (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)";
            let mut out = vec![
                ("model".to_string(), CONTAINER),
                ("model.layers".to_string(), CONTAINER),
                ("model.rotary_emb".to_string(), NONE),
            ];
            for i in 0..c.num_hidden_layers {
                let l = format!("model.layers.{i}");
                out.extend([
                    (l.clone(), CONTAINER),
                    (format!("{l}.self_attn"), CONTAINER),
                    (format!("{l}.mlp"), CONTAINER),
                    (format!("{l}.mlp.act_fn"), NONE),
                    (format!("{l}.input_layernorm"), RMS_NORM),
                    (format!("{l}.post_attention_layernorm"), RMS_NORM),
                ]);
            }
            out.push(("model.norm".to_string(), RMS_NORM));
            out
        }
    }
}

/// GPT-2's other modules (as GPT2LMHeadModel names them) and why LoRA does not adapt them here.
fn gpt2_other_modules(cfg: &Gpt2Config) -> Vec<(String, &'static str)> {
    const NORM: &str = "a LayerNorm, which LoRA does not adapt (PEFT adapts Linear, Conv1D and Embedding layers)";
    const WPE: &str = "the position embedding, which kiln's LoRA does not adapt (it adapts transformer.wte, \
                       lm_head and the Conv1D layers c_attn, c_proj, c_fc); leave it out of the targets";
    const CONTAINER: &str = "a container of several layers, not a layer LoRA can adapt: name the layers inside it \
                             (c_attn, c_proj, c_fc)";
    let mut out = vec![
        ("transformer".to_string(), CONTAINER),
        ("transformer.wpe".to_string(), WPE),
        ("transformer.drop".to_string(), NONE),
        ("transformer.h".to_string(), CONTAINER),
    ];
    for i in 0..cfg.n_layer {
        let h = format!("transformer.h.{i}");
        out.extend([
            (h.clone(), CONTAINER),
            (format!("{h}.ln_1"), NORM),
            (format!("{h}.attn"), CONTAINER),
            (format!("{h}.attn.attn_dropout"), NONE),
            (format!("{h}.attn.resid_dropout"), NONE),
            (format!("{h}.ln_2"), NORM),
            (format!("{h}.mlp"), CONTAINER),
            (format!("{h}.mlp.act"), NONE),
            (format!("{h}.mlp.dropout"), NONE),
        ]);
    }
    out.push(("transformer.ln_f".to_string(), NORM));
    out
}

/// The modules of a model of `model`'s config that `config` targets, each with its rank and
/// scaling, in model order. Errors name a target that matches nothing (listing the names that
/// exist), a target that is not a layer kiln adapts, and a rank above the layer's min(in, out).
pub fn resolve(config: &LoraConfig, model: &Config) -> Result<Vec<LoraModule>> {
    config.validate()?;
    let layers = adaptable_modules(model);
    let others = other_modules(model);
    let mut chosen = vec![false; layers.len()];
    let all_linear = config.targets.iter().any(|t| t == ALL_LINEAR);
    if all_linear && config.targets.len() > 1 {
        return Err(Error::Input(format!(
            "target modules {:?}: \"{ALL_LINEAR}\" already names every linear layer; give it alone or list names",
            config.targets
        )));
    }
    for t in &config.targets {
        if let Some((m, why)) = others.iter().find(|(m, _)| !all_linear && matches(m, t)) {
            return Err(Error::Input(format!("LoRA target '{t}' matches {m}: {why}")));
        }
        let mut found = false;
        for (i, (m, kind, _, _)) in layers.iter().enumerate() {
            // all-linear: the block layers, not the output layer (PEFT's meaning) nor the embedding
            let in_block = matches!(kind, ModuleKind::Conv1d | ModuleKind::Linear);
            if (all_linear && in_block) || (!all_linear && matches(m, t)) {
                chosen[i] = true;
                found = true;
            }
        }
        if !found {
            if let Config::Llama(c) = model {
                return Err(Error::Input(format!(
                    "LoRA target '{t}' matches no module of this Llama. Its modules are model.embed_tokens, \
                     model.layers.{{0..{}}}.{{input_layernorm, self_attn.{{q,k,v,o}}_proj, post_attention_layernorm, \
                     mlp.{{gate,up,down}}_proj}}, model.norm and lm_head; a target names a module or a dot-separated \
                     suffix of its name. kiln's LoRA adapts the seven linear layers (q_proj, k_proj, v_proj, o_proj, \
                     gate_proj, up_proj, down_proj, or {ALL_LINEAR}), embed_tokens and lm_head",
                    c.num_hidden_layers.saturating_sub(1)
                )));
            }
            return Err(Error::Input(format!(
                "LoRA target '{t}' matches no module of this GPT-2. Its modules are transformer.wte, transformer.wpe, \
                 transformer.h.{{0..{}}}.{{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}}, transformer.ln_f \
                 and lm_head; a target names a module or a dot-separated suffix of its name. kiln's LoRA adapts the \
                 Conv1D layers: c_attn, c_proj (attn and mlp), c_fc, or a longer suffix such as attn.c_proj or \
                 h.0.mlp.c_fc; and the token embedding (wte) and the output layer (lm_head)",
                model.n_layer().saturating_sub(1)
            )));
        }
    }
    let mut out = Vec::new();
    for ((module, kind, fan_in, fan_out), _) in layers.into_iter().zip(chosen).filter(|(_, c)| *c) {
        let r = config.rank_of(&module);
        let limit = fan_in.min(fan_out);
        if r > limit {
            let what = match kind {
                ModuleKind::Embedding => format!("{fan_in} tokens x {fan_out}"),
                _ => format!("{fan_in} -> {fan_out}"),
            };
            return Err(Error::Input(format!(
                "LoRA rank r = {r} is larger than {module} ({what}): a rank above min(in, out) = \
                 {limit} adds parameters but cannot add expressiveness; use r <= {limit}"
            )));
        }
        let scaling = config.scaling(r, config.alpha_of(&module));
        out.push(LoraModule { module, kind, r, fan_in, fan_out, scaling });
    }
    Ok(out)
}

/// Attaches fresh adapters to `model` as PEFT initialises them (lora_A ~ kaiming_uniform(a =
/// sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)); lora_B = 0; on the embedding the other way round,
/// lora_embedding_A = 0 and lora_embedding_B ~ N(0, 1): either way the model's outputs do not
/// change) and freezes every base parameter. Deterministic in `seed`.
pub fn attach(model: &mut Model, config: LoraConfig, seed: u64) -> Result<()> {
    if model.lora.is_some() {
        return Err(Error::Input("this model already carries a LoRA adapter: merge it (kiln merge) first".into()));
    }
    let modules = resolve(&config, &model.config)?;
    let mut params = ParamStore::new();
    for (i, m) in modules.iter().enumerate() {
        let bound = 1.0 / (m.fan_in as f32).sqrt();
        // One stream per adapted module, so the draws do not depend on thread or module order.
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64);
        if m.kind == ModuleKind::Embedding {
            let normal = rand_distr::Normal::new(0f32, 1.0).expect("a positive standard deviation");
            let b: Vec<f32> =
                (0..m.fan_out * m.r).map(|_| rand_distr::Distribution::sample(&normal, &mut rng)).collect();
            params.insert(m.a_name(), Tensor::zeros([m.r, m.fan_in]));
            params.insert(m.b_name(), Tensor::from_f32(b, [m.fan_out, m.r])?);
        } else {
            let a: Vec<f32> = (0..m.r * m.fan_in).map(|_| rng.random_range(-bound..bound)).collect();
            params.insert(m.a_name(), Tensor::from_f32(a, [m.r, m.fan_in])?);
            params.insert(m.b_name(), Tensor::zeros([m.fan_out, m.r]));
        }
    }
    model.lora = Some(Lora::new(config, modules, params)?);
    model.params.set_trainable(false);
    Ok(())
}

/// A plain model with the adapter folded into the base weights (W += scaling * A^T B^T, PEFT's
/// merge for Conv1D; W += scaling * B A for nn.Linear), every parameter trainable. The model itself is left as it is; NF4 base
/// layers (QLoRA) are dequantized to f32 first. Refuses an adapter on wte or lm_head (see the
/// module doc: the two share one weight).
pub fn merged(model: &Model) -> Result<Model> {
    if let Some(lora) = &model.lora {
        let tied = match &model.config {
            Config::Gpt2(_) => true,
            Config::Llama(c) => c.tie_word_embeddings,
        };
        let outer: Vec<&str> = lora
            .modules()
            .iter()
            .filter(|m| matches!(m.kind, ModuleKind::Embedding | ModuleKind::LmHead))
            .map(|m| m.module.as_str())
            .collect();
        if tied && !outer.is_empty() {
            return Err(Error::Input(format!(
                "cannot merge this adapter: it adapts {}, and this model's token embedding and lm_head share one \
                 weight matrix (tied embeddings), so folding the update into that matrix would change the other \
                 layer too and the merged model would compute something else. Use the adapter unmerged instead \
                 (--adapter with generate, grads or eval), or train one without the embedding and lm_head among \
                 its targets",
                outer.join(" and ")
            )));
        }
    }
    let mut params = match &model.nf4 {
        None => model.params.clone(),
        Some(q) => {
            let mut all = ParamStore::new();
            for (name, dims) in model.config.param_shapes() {
                match q.get(&name) {
                    Some(w) => all.insert(name, Tensor::from_f32(w.dequantize()?, dims.as_slice())?),
                    None => all.insert(name.clone(), model.params.get(&name)?.clone()),
                }
            }
            all
        }
    };
    params.set_trainable(true);
    if let Some(lora) = &model.lora {
        for m in lora.modules() {
            let ad = lora.adapter(&m.module).ok_or_else(|| Error::Input(format!("no adapter for {}", m.module)))?;
            let w = &mut params.get_mut(&format!("{}.weight", m.module))?.tensor;
            // Conv1D weights and embedding tables are stored [in, out], nn.Linear weights [out, in]
            let out_in = matches!(m.kind, ModuleKind::Linear | ModuleKind::LmHead);
            let want = if out_in { [m.fan_out, m.fan_in] } else { [m.fan_in, m.fan_out] };
            if w.dims() != want {
                return Err(Error::shape(
                    "lora merge",
                    format!("{}.weight is {:?}, the adapter expects {want:?}", m.module, w.dims()),
                ));
            }
            let (a, b) = (ad.a.f32s()?, ad.b.f32s()?);
            let merge = if out_in { cpu_lora::lora_merge_linear } else { cpu_lora::lora_merge };
            merge(w.f32s_mut()?, a, b, m.fan_in, m.fan_out, m.r, ad.scaling);
        }
    }
    Ok(Model { config: model.config.clone(), params, lora: None, nf4: None, gradient_checkpointing: false })
}
