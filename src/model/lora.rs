//! GPT-2's side of LoRA (nn/lora.rs has the adapters and the format): the modules GPT2LMHeadModel
//! has, under the names PEFT gives them, which of them a `LoraConfig` targets (`resolve`),
//! attaching fresh adapters to a model (`attach`) and folding them into its weights (`merged`).

use crate::model::gpt2::{Gpt2, Gpt2Config};
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

/// Every layer kiln's LoRA can adapt: (full name, kind, in, out), in model order (wte, the
/// Conv1D layers, lm_head), with in and out as `LoraModule` counts them.
pub fn adaptable_modules(cfg: &Gpt2Config) -> Vec<(String, ModuleKind, usize, usize)> {
    let (v, c) = (cfg.vocab_size, cfg.n_embd);
    let mut out = vec![(WTE.to_string(), ModuleKind::Embedding, v, c)];
    out.extend(conv1d_modules(cfg).into_iter().map(|(m, i, o)| (m, ModuleKind::Conv1d, i, o)));
    out.push((LM_HEAD.to_string(), ModuleKind::LmHead, c, v));
    out
}

/// GPT-2's other modules (as GPT2LMHeadModel names them) and why LoRA does not adapt them here.
fn other_modules(cfg: &Gpt2Config) -> Vec<(String, &'static str)> {
    const WPE: &str = "the position embedding, which kiln's LoRA does not adapt (it adapts transformer.wte, \
                       lm_head and the Conv1D layers c_attn, c_proj, c_fc); leave it out of the targets";
    const NORM: &str = "a LayerNorm, which LoRA does not adapt (PEFT adapts Linear, Conv1D and Embedding layers)";
    const CONTAINER: &str = "a container of several layers, not a layer LoRA can adapt: name the layers inside it \
                             (c_attn, c_proj, c_fc)";
    const NONE: &str = "a layer without weights, which LoRA cannot adapt";
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

/// The modules of a GPT-2 of `model` that `config` targets, each with its rank and scaling, in
/// model order. Errors name a target that matches nothing (listing the names that exist), a
/// target that is not a layer kiln adapts, and a rank above the layer's min(in, out).
pub fn resolve(config: &LoraConfig, model: &Gpt2Config) -> Result<Vec<LoraModule>> {
    config.validate()?;
    let layers = adaptable_modules(model);
    let others = other_modules(model);
    let mut chosen = vec![false; layers.len()];
    let all_linear = config.targets.iter().any(|t| t == ALL_LINEAR);
    if all_linear && config.targets.len() > 1 {
        return Err(Error::Input(format!(
            "target modules {:?}: \"{ALL_LINEAR}\" already names every Conv1D; give it alone or list names",
            config.targets
        )));
    }
    for t in &config.targets {
        if let Some((m, why)) = others.iter().find(|(m, _)| !all_linear && matches(m, t)) {
            return Err(Error::Input(format!("LoRA target '{t}' matches {m}: {why}")));
        }
        let mut found = false;
        for (i, (m, kind, _, _)) in layers.iter().enumerate() {
            // all-linear: the Conv1D layers, not the output layer (PEFT's meaning) nor the embedding
            if (all_linear && *kind == ModuleKind::Conv1d) || (!all_linear && matches(m, t)) {
                chosen[i] = true;
                found = true;
            }
        }
        if !found {
            return Err(Error::Input(format!(
                "LoRA target '{t}' matches no module of this GPT-2. Its modules are transformer.wte, transformer.wpe, \
                 transformer.h.{{0..{}}}.{{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}}, transformer.ln_f \
                 and lm_head; a target names a module or a dot-separated suffix of its name. kiln's LoRA adapts the \
                 Conv1D layers: c_attn, c_proj (attn and mlp), c_fc, or a longer suffix such as attn.c_proj or \
                 h.0.mlp.c_fc; and the token embedding (wte) and the output layer (lm_head)",
                model.n_layer.saturating_sub(1)
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
pub fn attach(model: &mut Gpt2, config: LoraConfig, seed: u64) -> Result<()> {
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
/// merge for Conv1D), every parameter trainable. The model itself is left as it is; NF4 base
/// layers (QLoRA) are dequantized to f32 first. Refuses an adapter on wte or lm_head (see the
/// module doc: the two share one weight).
pub fn merged(model: &Gpt2) -> Result<Gpt2> {
    if let Some(lora) = &model.lora {
        let tied: Vec<&str> =
            lora.modules().iter().filter(|m| m.kind != ModuleKind::Conv1d).map(|m| m.module.as_str()).collect();
        if !tied.is_empty() {
            return Err(Error::Input(format!(
                "cannot merge this adapter: it adapts {}, and GPT-2's transformer.wte and lm_head share one \
                 weight matrix (tied embeddings), so folding the update into that matrix would change the other \
                 layer too and the merged model would compute something else. Use the adapter unmerged instead \
                 (--adapter with generate, grads or eval), or train one without wte and lm_head among its targets",
                tied.join(" and ")
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
            if w.dims() != [m.fan_in, m.fan_out] {
                return Err(Error::shape(
                    "lora merge",
                    format!("{}.weight is {:?}, the adapter expects [{}, {}]", m.module, w.dims(), m.fan_in, m.fan_out),
                ));
            }
            let (a, b) = (ad.a.f32s()?, ad.b.f32s()?);
            crate::backend::cpu::lora::lora_merge(w.f32s_mut()?, a, b, m.fan_in, m.fan_out, m.r, ad.scaling);
        }
    }
    Ok(Gpt2 { config: model.config.clone(), params, lora: None, nf4: None, gradient_checkpointing: false })
}
