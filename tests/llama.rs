//! The Llama family beyond the oracle fixture (tests/llama_parity.rs): presets, config.json both
//! ways (transformers 4's top-level rope_theta and 5's rope_parameters), checkpoints in f32 and
//! bf16, single-file and sharded, and the gradients of shapes the fixture does not have (an
//! untied head, 8 query heads over 2 KV heads, head size 8, theta 500000) against finite
//! differences of the loss.

mod common;

use kiln::io::checkpoint::{load_model, save_model};
use kiln::model::Mode;
use kiln::{Config, DType, LlamaConfig, Model, Tape, Tensor};
use std::path::Path;

/// The llama-c shape of make_llama_fixtures.py: untied head, 8 query heads over 2 KV heads.
fn llama_c() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 150,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-6,
        rope_theta: 500_000.0,
        max_position_embeddings: 80,
        tie_word_embeddings: false,
        initializer_range: 0.1,
        bos_token_id: Some(0),
        eos_token_id: Some(149),
    }
}

#[test]
fn presets_have_the_published_sizes() {
    // SmolLM2-135M's and -360M's parameter counts (tied heads): 134,515,008 and 361,821,120
    let n = |p: &str| Config::preset(p).unwrap().num_params();
    assert_eq!(n("smollm2-135m"), 134_515_008);
    assert_eq!(n("smollm2-360m"), 361_821_120);
    for p in ["llama-tiny", "smollm2-135m", "smollm2-360m"] {
        let c = Config::preset(p).unwrap();
        assert_eq!(c.checked_num_params(), Some(c.num_params()), "{p}");
        assert_eq!(c.family(), "Llama");
    }
    assert!(Config::preset("llama-huge").unwrap_err().to_string().contains("smollm2-135m"));
}

/// config.json as the Hub's checkpoints have it (transformers 4: rope_theta at the top level,
/// no head_dim) and as transformers 5 writes it (rope_parameters) read to the same config, and
/// kiln writes the latter.
#[test]
fn config_json_both_layouts() {
    let hub = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000, "rope_scaling": null,
        "tie_word_embeddings": true, "hidden_act": "silu", "attention_bias": false, "mlp_bias": false,
        "bos_token_id": 0, "eos_token_id": 0, "initializer_range": 0.02, "pretraining_tp": 1
    });
    let a = Config::from_json(&hub, Path::new("config.json")).unwrap();
    assert_eq!(a, Config::preset("smollm2-135m").unwrap());
    let written = a.to_json(DType::BF16);
    assert_eq!(written["rope_parameters"]["rope_theta"].as_f64(), Some(100000.0));
    assert_eq!(written["dtype"], "bfloat16");
    assert_eq!(Config::from_json(&written, Path::new("config.json")).unwrap(), a);
}

/// A checkpoint kiln writes (untied head, bf16) loads back with the same config and, rounded to
/// bf16, the same weights; the same tensors split over two shards with an index load too.
#[test]
fn checkpoints_round_trip_single_file_and_sharded() {
    let dir = tempfile::tempdir().unwrap();
    let model = Model::new_random(llama_c(), 3).unwrap();
    assert!(model.params.get("lm_head.weight").is_ok(), "an untied head is a parameter");
    save_model(&model, dir.path(), DType::BF16).unwrap();
    let back = load_model(dir.path()).unwrap();
    assert_eq!(back.config, model.config);
    for p in model.params.iter() {
        let want = p.tensor.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(back.params.get(&p.name).unwrap().f32s().unwrap(), want.f32s().unwrap(), "{}", p.name);
    }
    // shards: the same tensors in two files, named by an index
    let sharded = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join("config.json"), sharded.path().join("config.json")).unwrap();
    let all: Vec<(String, Tensor)> = model.params.iter().map(|p| (p.name.clone(), p.tensor.clone())).collect();
    let (first, second) = all.split_at(all.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        kiln::io::safetensors::save(&sharded.path().join(file), part, &[]).unwrap();
        for (n, _) in part {
            map.insert(n.clone(), file.into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(sharded.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let from_shards = load_model(sharded.path()).unwrap();
    for p in model.params.iter() {
        assert_eq!(from_shards.params.get(&p.name).unwrap().f32s().unwrap(), p.tensor.f32s().unwrap(), "{}", p.name);
    }
}

fn loss_of(model: &Model, ids: &Tensor, targets: &Tensor) -> f64 {
    model.forward(&mut Tape::inference(), ids, Some(targets), Mode::Eval).unwrap().loss.unwrap().item().unwrap() as f64
}

/// Every parameter's gradient against a central difference of the loss along a random
/// direction d of that parameter: (L(p + h d) - L(p - h d)) / 2h = <dL/dp, d> + O(h^2). The f32
/// loss (~5, ulp 4.8e-7) quantizes the difference to steps of ulp / 2h = 1.2e-5 at h = 2e-2,
/// where the truncation measured under 0.1% of the slope (0.4% at h = 5e-2, rounding steps of
/// 2.4e-5 at h = 1e-2). The bound 2e-3 |slope| + 2.5e-5 still catches a wrong rule (off by
/// O(1)) in any of RoPE's frequencies, the GQA grouping, the untied head or SwiGLU.
#[test]
fn gradients_of_an_untied_gqa_shape_match_finite_differences() {
    let mut model = Model::new_random(llama_c(), 5).unwrap();
    // RMSNorm weights away from 1, as the oracle does, so a missing weight shows
    for p in model.params.iter_mut().filter(|p| p.name.ends_with("norm.weight")) {
        let v: Vec<f32> =
            p.tensor.f32s().unwrap().iter().enumerate().map(|(i, x)| x + 0.1 * ((i % 7) as f32 - 3.0) / 3.0).collect();
        p.tensor = Tensor::from_f32(v, p.tensor.dims()).unwrap();
    }
    let ids = kiln::bench::random_tokens(150, 2, 37, 1).unwrap();
    let targets = kiln::bench::random_tokens(150, 2, 37, 2).unwrap();
    let mut tape = Tape::new();
    let loss = model.forward(&mut tape, &ids, Some(&targets), Mode::Eval).unwrap().loss.unwrap();
    let grads = tape.backward(&loss).unwrap();
    let mut rng = common::rng(9);
    let h = 2e-2f32;
    let names: Vec<String> = model.params.iter().map(|p| p.name.clone()).collect();
    assert_eq!(names.len(), 1 + 2 * 9 + 2, "embed_tokens, 9 a layer, model.norm and an untied lm_head");
    for name in names {
        let p = model.params.get(&name).unwrap().clone();
        let d = common::uniform(&mut rng, p.numel(), 1.0);
        let norm = d.iter().map(|x| x * x).sum::<f32>().sqrt();
        let d: Vec<f32> = d.iter().map(|x| x / norm).collect();
        let slope: f64 =
            grads.get(&p).unwrap().f32s().unwrap().iter().zip(&d).map(|(g, x)| *g as f64 * *x as f64).sum();
        let shifted = |s: f32| {
            let mut m = model.clone();
            let v: Vec<f32> = p.f32s().unwrap().iter().zip(&d).map(|(x, y)| x + s * y).collect();
            m.params.get_mut(&name).unwrap().tensor = Tensor::from_f32(v, p.dims()).unwrap();
            loss_of(&m, &ids, &targets)
        };
        let fd = (shifted(h) - shifted(-h)) / (2.0 * h as f64);
        let bound = 2e-3 * slope.abs() + 2.5e-5;
        println!("{name}: finite difference {fd:.6e}, gradient {slope:.6e}");
        assert!((fd - slope).abs() <= bound, "{name}: finite difference {fd:.6e}, gradient {slope:.6e}");
    }
}

/// Generation with the KV cache (KV heads only) gives, at every step, the logits a full forward
/// pass over the whole sequence gives at its last position.
#[test]
fn cached_logits_equal_a_full_forward() {
    let model = Model::new_random(llama_c(), 8).unwrap();
    let ids: Vec<u32> = (0..20).map(|i| (i * 37 % 150) as u32).collect();
    let mut cache = kiln::model::KvCache::new(&model.config, 1, 20).unwrap();
    let mut got = model.forward_cached(&ids[..7], &mut cache).unwrap().f32s().unwrap().to_vec();
    for t in 7..=20 {
        let full = Tensor::from_i32(ids[..t].iter().map(|&x| x as i32).collect(), [1, t]).unwrap();
        let logits = model.forward(&mut Tape::inference(), &full, None, Mode::Eval).unwrap().logits.unwrap();
        let last = &logits.f32s().unwrap()[(t - 1) * 150..t * 150];
        let e = last.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(e < 1e-4, "position {t}: cached logits differ from the full pass by {e}");
        if t < 20 {
            got = model.forward_cached(&ids[t..t + 1], &mut cache).unwrap().f32s().unwrap().to_vec();
        }
    }
    assert_eq!(cache.len(), 20);
}

/// QLoRA on a Llama: the seven linear layers held in NF4 as bitsandbytes stores an nn.Linear
/// ([out, in], blocks of 64), decoded inside the op. The forward and the adapter's gradients
/// equal LoRA's on a base whose weights are those NF4 values decoded to f32 (the same model,
/// computed two ways): a transposed layout or a wrong decode would be off by O(1).
#[test]
fn qlora_equals_lora_on_the_decoded_base() {
    use kiln::nn::lora::LoraConfig;
    let base = Model::new_random(llama_c(), 6).unwrap();
    let lc = LoraConfig::new(
        4,
        8.0,
        0.0,
        &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        true,
    )
    .unwrap();
    let mut q = base.clone();
    q.quantize_nf4(64).unwrap();
    let nf4 = q.nf4.as_ref().unwrap();
    assert_eq!(nf4.len(), 2 * 7, "every linear layer of both blocks in NF4");
    assert_eq!(nf4["model.layers.0.self_attn.k_proj.weight"].dims, [16, 64], "stored [out, in]");
    // the same weights, decoded, as a plain f32 model
    let mut decoded = base.clone();
    for (name, w) in nf4 {
        let dims = decoded.params.get(name).unwrap().dims().to_vec();
        decoded.params.get_mut(name).unwrap().tensor =
            Tensor::from_f32(w.dequantize().unwrap(), dims.as_slice()).unwrap();
    }
    kiln::model::lora::attach(&mut q, lc.clone(), 1).unwrap();
    kiln::model::lora::attach(&mut decoded, lc, 1).unwrap();
    // a non-zero B, so the adapter's path carries signal both ways
    for m in [&mut q, &mut decoded] {
        let lora = m.lora.as_mut().unwrap();
        for (i, p) in lora.params.iter_mut().enumerate().filter(|(_, p)| p.name.contains("lora_B")) {
            let v: Vec<f32> =
                (0..p.tensor.numel()).map(|j| 0.05 * (((i * 31 + j * 17) % 13) as f32 - 6.0) / 6.0).collect();
            p.tensor = Tensor::from_f32(v, p.tensor.dims()).unwrap();
        }
    }
    let ids = kiln::bench::random_tokens(150, 2, 21, 3).unwrap();
    let targets = kiln::bench::random_tokens(150, 2, 21, 4).unwrap();
    let run = |m: &Model| {
        let mut tape = Tape::new();
        let out = m.forward(&mut tape, &ids, Some(&targets), Mode::Eval).unwrap();
        let loss = out.loss.unwrap();
        let g = tape.backward(&loss).unwrap();
        let grads: Vec<Vec<f32>> = m
            .lora
            .as_ref()
            .unwrap()
            .params
            .iter()
            .map(|p| g.get(&p.tensor).unwrap().f32s().unwrap().to_vec())
            .collect();
        (out.logits.unwrap().f32s().unwrap().to_vec(), grads)
    };
    let ((lq, gq), (ld, gd)) = (run(&q), run(&decoded));
    let rel = |a: &[f32], b: &[f32]| {
        let m = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / m.max(1e-6)
    };
    assert!(rel(&lq, &ld) < 1e-5, "logits: {}", rel(&lq, &ld));
    for (a, b) in gq.iter().zip(&gd) {
        assert!(rel(a, b) < 1e-4, "adapter gradient: {}", rel(a, b));
    }
}

/// `kiln finetune` on a Llama: QLoRA with rsLoRA on the default targets (the seven linear layers,
/// NF4 base, 8-bit AdamW) trains only the adapter, lowers the loss, resumes to the same numbers
/// as an uninterrupted run, and writes a PEFT adapter for an nn.Linear model (fan_in_fan_out
/// false, use_rslora, LlamaForCausalLM's module names); LoRA's adapter merged into the base gives
/// the loss the unmerged adapter gives.
#[test]
fn finetuning_a_llama_with_qlora_and_lora() {
    use common::sft::{base_model_of, config, losses, opts};
    use kiln::train::{finetune::finetune, Start};
    let tmp = tempfile::tempdir().unwrap();
    let (_, base) = base_model_of(tmp.path(), "llama-tiny", 64);
    assert!(matches!(load_model(&base).unwrap().config, Config::Llama(_)));
    let task = tmp.path().join("task.jsonl");
    let cfg_of = |m: &str| {
        config(&base, &task, &[&format!("finetune.method=\"{m}\""), "finetune.rslora=true", "train.max_steps=8"])
    };
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let s = finetune(&cfg_of("qlora"), &a, &opts(Start::Fresh, None)).unwrap();
    let la = losses(&a);
    assert!(la.last().unwrap().1 < la[0].1, "QLoRA did not lower the loss: {la:?}");
    finetune(&cfg_of("qlora"), &b, &opts(Start::Fresh, Some(4))).unwrap();
    finetune(&cfg_of("qlora"), &b, &opts(Start::Resume, None)).unwrap();
    assert_eq!(losses(&b), la, "a resumed QLoRA run differs from an uninterrupted one");

    let adapter = s.checkpoint.unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(v["fan_in_fan_out"], false);
    assert_eq!(v["use_rslora"], true);
    let mut targets: Vec<&str> = v["target_modules"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    targets.sort();
    assert_eq!(targets, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]);
    let names = kiln::io::checkpoint::load_all(&adapter.join("adapter_model.safetensors")).unwrap();
    assert_eq!(names.len(), 2 * 7 * 2, "A and B of 7 layers in 2 blocks");
    assert!(names.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"));

    // LoRA, then kiln merge: the merged checkpoint's loss is the adapter's
    let c = tmp.path().join("c");
    let s = finetune(&cfg_of("lora"), &c, &opts(Start::Fresh, None)).unwrap();
    let lora_dir = s.checkpoint.unwrap();
    let merged = tmp.path().join("merged");
    let o = common::cli::kiln_command()
        .args(["merge", "--model"])
        .arg(&base)
        .arg("--adapter")
        .arg(&lora_dir)
        .arg("--out")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(o.status.success(), "kiln merge: {}", String::from_utf8_lossy(&o.stderr));
    let ids = kiln::bench::random_tokens(400, 2, 30, 1).unwrap();
    let mut with_adapter = load_model(&base).unwrap();
    kiln::io::peft::load_adapter(&mut with_adapter, &lora_dir).unwrap();
    let (l1, l2) = (loss_of(&with_adapter, &ids, &ids), loss_of(&load_model(&merged).unwrap(), &ids, &ids));
    assert!((l1 - l2).abs() < 1e-4 * l1.abs(), "merged {l2} vs adapter {l1}");
    assert!((loss_of(&load_model(&base).unwrap(), &ids, &ids) - l1).abs() > 1e-3, "the adapter changed nothing");

    // chat data in SmolLM2-Instruct's layout (--chat chatml), recorded in the run's config
    let chats = tmp.path().join("chat.jsonl");
    let line = r#"{"messages": [{"role": "user", "content": "Where does Tom live?"}, {"role": "assistant", "content": "In Lima."}]}"#;
    std::fs::write(&chats, format!("{line}\n").repeat(20)).unwrap();
    let run = tmp.path().join("chat-run");
    let o = common::cli::kiln_command()
        .args(["finetune", "--method", "lora", "--chat", "chatml", "--max-steps", "2", "--model"])
        .arg(&base)
        .arg("--data")
        .arg(&chats)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    assert!(o.status.success(), "kiln finetune --chat chatml: {}", String::from_utf8_lossy(&o.stderr));
    let toml = std::fs::read_to_string(run.join("run.toml")).unwrap();
    assert!(toml.contains("<|im_start|>assistant") && toml.contains("<|im_end|>"), "{toml}");
}
