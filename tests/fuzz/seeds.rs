//! Valid seed files, written by kiln's own writers, and checks shared by the targets.

use super::*;

/// A GPT-2 small enough that a case takes microseconds.
pub fn tiny_config() -> Gpt2Config {
    let mut c = Gpt2Config::preset("tiny").unwrap();
    (c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head) = (300, 16, 16, 2, 2);
    c
}

/// Plain English-like text, the same every time.
pub fn corpus_text(words: usize) -> String {
    const WORDS: &[&str] = &["the", "kiln", "fires", "clay", "at", "night", "and", "a", "potter", "waits", "for", "it"];
    const SEPS: &[&str] = &[" ", " ", " ", ", ", ". ", "\n", ".\n\n"];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as usize
    };
    (0..words).map(|_| format!("{}{}", WORDS[next() % WORDS.len()], SEPS[next() % SEPS.len()])).collect()
}

pub struct Seeds {
    pub _dir: tempfile::TempDir,
    /// tiny GPT-2 checkpoints: f32 and bf16 (config.json + model.safetensors + tokenizer.json)
    pub model_f32: PathBuf,
    pub model_bf16: PathBuf,
    /// the f32 model quantized to NF4 by `kiln quantize` (double-quantized absmax)
    pub model_nf4: PathBuf,
    /// a PEFT adapter for model_f32 (c_attn and wte)
    pub adapter: PathBuf,
    pub tokenizer: PathBuf,
    pub vocab_json: Vec<u8>,
    pub merges_txt: Vec<u8>,
    pub token_file: PathBuf,
    pub text: PathBuf,
}

pub fn seeds() -> &'static Seeds {
    static SEEDS: OnceLock<Seeds> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let text = d.join("corpus.txt");
        std::fs::write(&text, corpus_text(3000)).unwrap();
        let tok = train_bpe(std::slice::from_ref(&text), 300, 2).unwrap();
        let tokenizer = d.join("tokenizer.json");
        tok.save(&tokenizer).unwrap();
        let mut config = tiny_config();
        config.vocab_size = tok.id_bound();
        let model = Model::new_random(config, 7).unwrap();
        let (model_f32, model_bf16) = (d.join("model-f32"), d.join("model-bf16"));
        for (dir, dtype) in [(&model_f32, DType::F32), (&model_bf16, DType::BF16)] {
            checkpoint::save_model(&model, dir, dtype).unwrap();
            tok.save(&dir.join("tokenizer.json")).unwrap();
        }
        let model_nf4 = d.join("model-nf4");
        std::fs::create_dir_all(&model_nf4).unwrap();
        std::fs::copy(model_f32.join("config.json"), model_nf4.join("config.json")).unwrap();
        let opts = kiln::io::nf4::Nf4FileOptions { double_quant: true, ..Default::default() };
        kiln::io::nf4::quantize_file_nf4(&model_f32, &model_nf4.join("model.safetensors"), &opts).unwrap();
        let mut tuned = model.clone();
        lora::attach(&mut tuned, LoraConfig::new(2, 4.0, 0.0, &["c_attn", "wte"], false).unwrap(), 3).unwrap();
        let adapter = d.join("adapter");
        peft::save_adapter(&tuned, &adapter).unwrap();
        // GPT-2's vocab.json + merges.txt, taken from the trained tokenizer.json
        let tj: Value = serde_json::from_slice(&std::fs::read(&tokenizer).unwrap()).unwrap();
        let vocab_json = serde_json::to_vec(&tj["model"]["vocab"]).unwrap();
        let mut merges_txt = b"#version: 0.2\n".to_vec();
        for m in tj["model"]["merges"].as_array().unwrap() {
            let line = match m {
                Value::String(s) => s.clone(),
                Value::Array(p) => format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap()),
                _ => panic!("a merge is a string or a pair"),
            };
            merges_txt.extend_from_slice(format!("{line}\n").as_bytes());
        }
        let token_file = d.join("train.tok");
        build_token_file(std::slice::from_ref(&text), &tok, &token_file, false).unwrap();
        Seeds {
            _dir: dir,
            model_f32,
            model_bf16,
            model_nf4,
            adapter,
            tokenizer,
            vocab_json,
            merges_txt,
            token_file,
            text,
        }
    })
}

/// A fresh directory for one case, holding copies of `from`'s files.
pub fn case_dir(from: Option<&Path>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    if let Some(src) = from {
        for e in std::fs::read_dir(src).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    dir
}

/// A forward pass on a few tokens, the step every loaded model must survive.
pub fn forward(model: &Model) -> kiln::Result<()> {
    let ids = Tensor::from_i32(vec![1, 2, 3, 4], [1, 4])?;
    let targets = Tensor::from_i32(vec![2, 3, 4, -100], [1, 4])?;
    model.forward(&mut Tape::inference(), &ids, Some(&targets), Mode::Eval).map(|_| ())
}

/// Every float of a TOML tree (a run config) is finite.
pub fn all_finite(v: &toml::Value) -> bool {
    match v {
        toml::Value::Float(f) => f.is_finite(),
        toml::Value::Array(a) => a.iter().all(all_finite),
        toml::Value::Table(t) => t.values().all(all_finite),
        _ => true,
    }
}

/// Writes `data` to `path` and returns its length.
pub fn put(path: &Path, data: &[u8]) -> usize {
    std::fs::write(path, data).unwrap();
    data.len()
}

/// `file`'s bytes after `edits`.
pub fn mutated_st(file: &Path, edits: &[StEdit]) -> Vec<u8> {
    let mut data = std::fs::read(file).unwrap();
    edits.iter().for_each(|e| apply_st(&mut data, e));
    data
}

/// Every parameter of a loaded model (and of its adapter) is finite.
pub fn finite_params(m: &Model) -> bool {
    let lora = m.lora.iter().flat_map(|l| l.params.iter());
    m.params.iter().chain(lora).all(|p| p.tensor.f32s().is_ok_and(|v| v.iter().all(|x| x.is_finite())))
}

/// SFT files in each format: (name, contents).
pub fn sft_seeds() -> Vec<(&'static str, String)> {
    let pc: Vec<Value> =
        (0..4).map(|i| serde_json::json!({"prompt": format!("the kiln {i}?"), "completion": " fires clay."})).collect();
    let alpaca: Vec<Value> = (0..4)
        .map(|i| serde_json::json!({"instruction": "name a kiln", "input": if i % 2 == 0 { "" } else { "clay" }, "output": "a potter's"}))
        .collect();
    let chat: Vec<Value> = (0..4)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": format!("kiln {i}?")},
                {"role": "assistant", "content": "it fires clay"}
            ]})
        })
        .collect();
    let lines = |v: &[Value]| v.iter().map(|x| format!("{x}\n")).collect::<String>();
    vec![
        ("pc.jsonl", lines(&pc)),
        ("alpaca.json", serde_json::to_string_pretty(&alpaca).unwrap()),
        ("chat.jsonl", lines(&chat)),
        ("chat.json", serde_json::to_string_pretty(&chat).unwrap()),
    ]
}

/// A batch file as PyTorch writes one (I64), with labels masked by -100.
pub fn batch_seed_i64() -> Vec<u8> {
    use safetensors::tensor::{serialize, Dtype, TensorView};
    let ids: Vec<u8> = (0..16i64).flat_map(|i| (i * 7 % 300).to_le_bytes()).collect();
    let labels: Vec<u8> = (0..16i64).flat_map(|i| if i % 8 < 3 { -100 } else { i * 7 % 300 }.to_le_bytes()).collect();
    let views = vec![
        ("input_ids", TensorView::new(Dtype::I64, vec![2, 8], &ids).unwrap()),
        ("labels", TensorView::new(Dtype::I64, vec![2, 8], &labels).unwrap()),
    ];
    serialize(views, None).unwrap()
}

/// A run config with every section written out.
pub fn run_toml_seed() -> String {
    let mut cfg = RunConfig::default();
    cfg.data.train = vec!["corpus/*.txt".into()];
    cfg.model.n_layer = Some(2);
    cfg.model.dropout = Some(0.1);
    cfg.to_toml()
}
