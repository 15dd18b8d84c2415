//! Fine-tuning test fixtures shared by tests/finetune.rs, tests/qlora.rs and tests/llama.rs: a small
//! random GPT-2 (or Llama)
//! with a tokenizer trained on the built-in world, the world's Q/A task, and a fast run config.

use kiln::data::synthetic::World;
use kiln::model::Model;
use kiln::train::{Options, RunConfig, Start};
use std::path::Path;

/// A small random GPT-2 with a tokenizer trained on the world's text, saved as a checkpoint.
pub fn base_model(dir: &Path, n_embd: usize) -> (World, std::path::PathBuf) {
    base_model_of(dir, "tiny", n_embd)
}

/// `base_model` of a preset's family (tiny: GPT-2, llama-tiny: Llama), 2 layers of `n_embd`.
pub fn base_model_of(dir: &Path, preset: &str, n_embd: usize) -> (World, std::path::PathBuf) {
    let (world, text) = kiln::data::synthetic::default_corpus(120_000);
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, text).unwrap();
    let tok = kiln::data::tokenizer::train_bpe(&[corpus], 400, 2).unwrap();
    let sets = [
        format!("model.preset={preset:?}"),
        "model.n_layer=2".into(),
        format!("model.n_embd={n_embd}"),
        "model.n_positions=64".into(),
    ];
    let cfg = RunConfig::load(None, &sets).unwrap();
    let model = Model::new_random(kiln::train::model_config(&cfg, &tok).unwrap(), 0).unwrap();
    let m = dir.join("base");
    kiln::io::checkpoint::save_model(&model, &m, kiln::DType::F32).unwrap();
    tok.save(&m.join("tokenizer.json")).unwrap();
    std::fs::write(dir.join("task.jsonl"), world.task_jsonl()).unwrap();
    (world, m)
}

pub fn config(base: &Path, data: &Path, extra: &[&str]) -> RunConfig {
    let mut o = vec![
        format!("model.init_from={:?}", base.to_str().unwrap()),
        format!("data.train=[{:?}]", data.to_str().unwrap()),
        "data.val_fraction=0.1".into(),
        "train.batch_size=8".into(),
        "train.seq_len=64".into(),
        "train.lr=3e-3".into(),
        "train.warmup_steps=5".into(),
        "train.log_every=1".into(),
        "train.save_every=0".into(),
    ];
    o.extend(extra.iter().map(|s| s.to_string()));
    RunConfig::load(None, &o).unwrap()
}

pub fn opts(start: Start, stop_after: Option<usize>) -> Options {
    Options { start, progress: false, stop_after, quiet: true, device: kiln::Device::Cpu }
}

/// (step, training loss) of every logged step of a run.
pub fn losses(run_dir: &Path) -> Vec<(usize, f64)> {
    kiln::train::metrics::read(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r| r.loss.map(|l| (r.step, l)))
        .collect()
}
