//! `kiln compare`: the experiment the field argues about, on the built-in world. A tiny GPT-2 (or
//! Llama) is pre-trained on the built-in corpus (facts about invented people, in prose); then the built-in
//! task (questions in a Q/A layout the corpus never uses) is learned four ways:
//!
//! - scratch: the same architecture from random initialisation, on the task alone;
//! - full, lora, qlora: fine-tuning the pre-trained model (every weight; adapters; adapters on an
//!   NF4 base).
//!
//! A fifth of the questions are held out. Their answers are facts the pre-trained model read in
//! prose but no fine-tuning example states, so task accuracy on them measures what pre-training
//! contributes beyond the answer format. One table and one plot of the validation curves.

use super::config::RunConfig;
use super::{finetune, metrics, Options, Start};
use crate::data::synthetic::World;
use crate::data::tokenizer::Tokenizer;
use crate::model::generate::{generate, GenerateConfig};
use crate::model::Model;
use crate::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The adapters' learning rate in the comparison (and in the demo's suggested command).
pub const LORA_LR: &str = "3e-3";
/// Rows per step of every run in the comparison.
pub const BATCH: usize = 16;

/// One row of the comparison table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Row {
    pub name: String,
    pub trainable: usize,
    /// Weights + gradients + optimizer state, from the cost table's arithmetic.
    pub train_memory_mb: f64,
    pub ms_per_step: f64,
    /// First evaluated step whose validation loss is at or below the target.
    pub steps_to_target: Option<usize>,
    pub final_val_loss: f64,
    /// Held-out questions answered exactly (first word of the greedy answer).
    pub accuracy: f64,
}

/// Options of a comparison.
pub struct CompareOptions {
    /// The model pre-trained when no `pretrained` checkpoint is given: "tiny" or "llama-tiny".
    pub preset: String,
    pub pretrain_steps: usize,
    pub finetune_steps: usize,
    pub target_loss: f64,
    /// Methods to run, in order; "qlora" is skipped with a note when this build cannot run it.
    pub methods: Vec<String>,
    /// Reuse this pre-trained checkpoint (with tokenizer.json) instead of pre-training.
    pub pretrained: Option<PathBuf>,
    pub progress: bool,
    /// Print only the table and a line per method (each run's own output is suppressed; its
    /// progress still shows when `progress` is set).
    pub quiet: bool,
    /// Where the runs train (pre-training and every method).
    pub device: crate::Device,
}

/// (prompt, completion) pairs.
type Examples = Vec<(String, String)>;

/// Splits the task 80/20 with a fixed shuffle and writes train.jsonl / val.jsonl; returns their
/// paths and the held-out examples.
fn write_task(world: &World, dir: &Path) -> Result<(PathBuf, PathBuf, Examples)> {
    let mut task = world.task();
    task.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));
    let n_val = task.len() / 5;
    let val = task.split_off(task.len() - n_val);
    std::fs::create_dir_all(dir).map_err(|e| Error::write(dir, e))?;
    let jsonl = |xs: &[(String, String)]| -> String {
        xs.iter().map(|(p, c)| serde_json::json!({"prompt": p, "completion": c}).to_string() + "\n").collect()
    };
    let (tp, vp) = (dir.join("task-train.jsonl"), dir.join("task-val.jsonl"));
    crate::io::write_atomic(&tp, |w| std::io::Write::write_all(w, jsonl(&task).as_bytes()))?;
    crate::io::write_atomic(&vp, |w| std::io::Write::write_all(w, jsonl(&val).as_bytes()))?;
    Ok((tp, vp, val))
}

/// The share of `questions` whose greedy answer starts with the expected word.
pub fn accuracy(model: &Model, tok: &Tokenizer, questions: &[(String, String)]) -> Result<f64> {
    let mut right = 0;
    for (prompt, answer) in questions {
        let ids = tok.encode(prompt)?;
        let cfg = GenerateConfig { max_new_tokens: 4, eos_token_id: tok.eos_id(), ..Default::default() };
        let out = generate(model, &ids, &cfg, |_, _| {})?;
        let new: Vec<u32> = out[0][ids.len()..].iter().copied().take_while(|&t| Some(t) != tok.eos_id()).collect();
        let got = tok.decode(&new)?;
        let want = answer.split_whitespace().next().unwrap_or("");
        right += (got.split_whitespace().next() == Some(want)) as usize;
    }
    Ok(right as f64 / questions.len().max(1) as f64)
}

/// Runs the comparison into `dir` and returns the table's rows.
pub fn compare(dir: &Path, opts: &CompareOptions) -> Result<Vec<Row>> {
    let wall = Instant::now();
    std::fs::create_dir_all(dir).map_err(|e| Error::write(dir, e))?;
    let world = crate::data::synthetic::default_corpus(0).0;
    let (train_task, val_task, held_out) = write_task(&world, &dir.join("data"))?;
    let run_opts =
        |start| Options { start, progress: opts.progress, stop_after: None, quiet: opts.quiet, device: opts.device };

    // 1. the pre-trained model
    let pretrained = match &opts.pretrained {
        Some(p) => p.clone(),
        None => {
            println!(
                "pre-training the {} preset on the built-in corpus ({} steps) ...",
                opts.preset, opts.pretrain_steps
            );
            let cfg = super::demo_config(opts.pretrain_steps, &[format!("model.preset=\"{}\"", opts.preset)])?;
            let s = super::pretrain(&cfg, &dir.join("pretrain"), &run_opts(Start::Overwrite))?;
            if s.interrupted {
                println!("interrupted: the comparison stops after pre-training ({})", s.describe());
                return Ok(vec![]);
            }
            let ckpt = s.checkpoint.ok_or_else(|| Error::Input("pre-training saved no checkpoint".into()))?;
            std::fs::copy(dir.join("pretrain/tokenizer.json"), ckpt.join("tokenizer.json"))
                .map_err(|e| Error::write(&ckpt, e))?;
            ckpt
        }
    };
    let tok = Tokenizer::load(&pretrained.join("tokenizer.json"))?;
    let base = crate::io::checkpoint::load_model(&pretrained)?;
    // the same architecture, randomly initialised, for the from-scratch run
    let scratch_dir = dir.join("scratch-init");
    let scratch = Model::new_random(base.config.clone(), 1)?;
    crate::io::checkpoint::save_model(&scratch, &scratch_dir, crate::DType::F32)?;
    tok.save(&scratch_dir.join("tokenizer.json"))?;

    let mut rows = vec![];
    let mut curves = vec![];
    for method in &opts.methods {
        let (init, ft_method, lr) = match method.as_str() {
            "scratch" => (&scratch_dir, "full", "1e-3"),
            "full" => (&pretrained, "full", "3e-4"),
            "lora" => (&pretrained, "lora", LORA_LR),
            "qlora" => (&pretrained, "qlora", LORA_LR),
            other => return Err(Error::Input(format!("unknown method \"{other}\": use scratch, full, lora or qlora"))),
        };
        let o: Vec<String> = vec![
            format!("model.init_from={}", toml::Value::String(init.display().to_string())),
            format!("data.train=[{}]", toml::Value::String(train_task.display().to_string())),
            format!("data.val=[{}]", toml::Value::String(val_task.display().to_string())),
            format!("finetune.method=\"{ft_method}\""),
            format!("train.lr={lr}"),
            format!("train.max_steps={}", opts.finetune_steps),
            format!("train.batch_size={BATCH}"),
            "train.warmup_steps=10".into(),
            "train.eval_every=25".into(),
            "train.save_every=0".into(),
            "model.dropout=0.0".into(),
        ];
        let cfg = RunConfig::load(None, &o)?;
        if opts.quiet {
            println!("  {method}: {} steps ...", opts.finetune_steps);
        } else {
            println!("\n== {method} ==");
        }
        let run_dir = dir.join(method);
        let s = match finetune::finetune(&cfg, &run_dir, &run_opts(Start::Overwrite)) {
            Ok(s) => s,
            Err(e) if method == "qlora" => {
                println!("  skipped: {e}");
                continue;
            }
            Err(e) => return Err(e),
        };
        if s.interrupted {
            println!("interrupted: the comparison stops at {method} ({})", s.describe());
            break;
        }
        let records = metrics::read(&run_dir.join("metrics.jsonl"))?;
        let val: Vec<(usize, f64)> = records.iter().filter_map(|r| r.val_loss.map(|v| (r.step, v))).collect();
        // the model as trained: a plain checkpoint, or the base with the saved adapter
        let ckpt = s.checkpoint.clone().ok_or_else(|| Error::Input(format!("{method}: no checkpoint")))?;
        let trained = if ckpt.join("adapter_config.json").exists() {
            let mut m = crate::io::checkpoint::load_model(init)?;
            crate::io::peft::load_adapter(&mut m, &ckpt)?;
            m
        } else {
            crate::io::checkpoint::load_model(&ckpt)?
        };
        let trainable = match &trained.lora {
            Some(l) => l.params.numel(),
            None => trained.params.numel(),
        };
        // weights (NF4 for QLoRA's Conv1D matrices: 4 bits plus ~1 byte of absmax per 64),
        // gradients (f32) and optimizer state (AdamW 8 bytes, 8-bit AdamW ~2.03 per parameter)
        let conv: usize = base
            .params
            .iter()
            .filter(|p| p.tensor.dims().len() == 2 && !p.name.contains(".wte.") && !p.name.contains(".wpe."))
            .map(|p| p.tensor.numel())
            .sum();
        let weights_bytes = if ft_method == "qlora" {
            4.0 * (base.params.numel() - conv) as f64 + conv as f64 * (0.5 + 1.0 / 64.0)
        } else {
            4.0 * base.params.numel() as f64
        };
        let opt_bytes = if ft_method == "qlora" { 2.0 + 8.0 / 256.0 } else { 8.0 };
        let train_memory_mb = (weights_bytes + (4.0 + opt_bytes) * trainable as f64) / 1e6;
        let ms_per_step = {
            let steps: Vec<&metrics::Record> = records.iter().filter(|r| r.loss.is_some()).collect();
            match (steps.first(), steps.last()) {
                (Some(a), Some(b)) if b.step > a.step => 1e3 * (b.elapsed_s - a.elapsed_s) / (b.step - a.step) as f64,
                _ => f64::NAN,
            }
        };
        let acc = accuracy(&trained, &tok, &held_out)?;
        rows.push(Row {
            name: method.clone(),
            trainable,
            train_memory_mb,
            ms_per_step,
            steps_to_target: val.iter().find(|(_, v)| *v <= opts.target_loss).map(|(s, _)| *s),
            final_val_loss: s.val_loss.unwrap_or(f64::NAN),
            accuracy: acc,
        });
        curves.push((method.clone(), val.iter().map(|&(s, v)| (s as f64, v)).collect::<Vec<_>>()));
    }
    metrics::plot_runs(
        &curves,
        &dir.join("compare.svg"),
        "kiln compare: held-out task loss",
        "validation loss (nats/token)",
    )?;
    let table = render(&rows, opts.target_loss);
    crate::io::write_atomic(&dir.join("compare.md"), |w| std::io::Write::write_all(w, table.as_bytes()))?;
    let json = serde_json::to_string_pretty(&rows).expect("rows serialise");
    crate::io::write_atomic(&dir.join("compare.json"), |w| std::io::Write::write_all(w, json.as_bytes()))?;
    println!("\n{table}");
    println!(
        "wall time {:.0} s; table {}/compare.md, plot {}/compare.svg",
        wall.elapsed().as_secs_f64(),
        dir.display(),
        dir.display()
    );
    Ok(rows)
}

/// The table as Markdown.
pub fn render(rows: &[Row], target: f64) -> String {
    let mut s = format!(
        "| method | trainable params | train memory | ms/step | steps to val loss <= {target} | final val loss | held-out accuracy |\n|---|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.1} MB | {:.1} | {} | {:.3} | {:.0}% |\n",
            r.name,
            r.trainable,
            r.train_memory_mb,
            r.ms_per_step,
            r.steps_to_target.map(|s| s.to_string()).unwrap_or_else(|| "not reached".into()),
            r.final_val_loss,
            100.0 * r.accuracy
        ));
    }
    s
}
