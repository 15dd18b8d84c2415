//! Pre-training: the loop behind `kiln pretrain` and `kiln demo`. A run lives in one directory:
//!
//! ```text
//! run.toml            the resolved config          metrics.jsonl   one JSON object per log/eval
//! tokenizer.json      the run's tokenizer          loss.svg        the loss curves
//! data/train.tok      token file (and val.tok)     checkpoints/step-NNNNNNNN/  HF checkpoint +
//!                                                  optimizer.safetensors + trainer_state.json
//! ```
//!
//! Everything a step depends on (weights, AdamW moments, step count, the sampler's position, the
//! dropout seed, derived from the step) is in a checkpoint, so a resumed run continues exactly
//! as the uninterrupted one would have. Checkpoints are written to a temporary directory and
//! renamed, so a crash or Ctrl-C never leaves a half-written one behind.

pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod finetune;
pub mod metrics;
pub mod schedule;
pub mod steps;

use crate::data::corpus::{self, TokenFile, WindowSampler};
use crate::data::tokenizer::Tokenizer;
use crate::model::gpt2::{Gpt2, Gpt2Config, Mode};
use crate::optim::{AdamW, AdamWConfig};
use crate::tape::Tape;
use crate::{Error, Result, Tensor};
pub use config::RunConfig;
use std::path::{Path, PathBuf};

/// How to treat a run directory that already holds a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Refuse a directory that holds another run.
    Fresh,
    /// Continue from the latest checkpoint.
    Resume,
    /// Delete kiln's files of the previous run (nothing else) and start again.
    Overwrite,
}

/// Options that are not part of the run's config.
#[derive(Clone, Debug)]
pub struct Options {
    pub start: Start,
    /// Draw a progress bar on the terminal.
    pub progress: bool,
    /// Stop (and save) after this many steps in total, as Ctrl-C would, without changing the
    /// schedule: used to test resume.
    pub stop_after: Option<usize>,
    /// Print nothing but errors (used when a run is one part of a larger command).
    pub quiet: bool,
    /// Where the model trains (`--device`); checkpoints are always written from host copies.
    pub device: crate::Device,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub steps: usize,
    pub last_loss: Option<f64>,
    pub val_loss: Option<f64>,
    /// Median tokens per second over this invocation's steps.
    pub tokens_per_s: f64,
    pub interrupted: bool,
    pub checkpoint: Option<PathBuf>,
}

/// Files a run writes at the top of its directory (an overwrite deletes these and nothing else).
const RUN_FILES: &[&str] = &["run.toml", "tokenizer.json", "metrics.jsonl", "loss.svg"];
const RUN_DIRS: &[&str] = &["checkpoints", "data"];

/// The demo's run config: the tiny preset on 2 MB of the built-in corpus.
pub fn demo_config(steps: usize, extra: &[String]) -> Result<RunConfig> {
    let mut o: Vec<String> = [
        "model.preset=\"tiny\"",
        "model.n_positions=128",
        "model.dropout=0.0",
        "data.tokenizer_vocab_size=1024",
        "data.builtin_bytes=2000000",
        "train.batch_size=16",
        "train.seq_len=128",
        "train.lr=2e-3",
        "train.warmup_steps=50",
        "train.eval_every=200",
        "train.save_every=400",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    o.push(format!("train.max_steps={steps}"));
    o.extend(extra.iter().cloned());
    RunConfig::load(None, &o)
}

/// Creates (or checks, or clears) a run directory according to `start`.
pub fn prepare_dir(run_dir: &Path, start: Start) -> Result<()> {
    std::fs::create_dir_all(run_dir).map_err(|e| Error::write(run_dir, e))?;
    let probe = run_dir.join(".kiln-write-test");
    std::fs::write(&probe, b"").map_err(|e| Error::write(run_dir, e))?;
    let _ = std::fs::remove_file(&probe);
    // A run.toml with neither metrics nor checkpoints is a start that failed before its first
    // step (bad data, a mismatched model): a fresh start clears it rather than refusing.
    let started = run_dir.join("run.toml").exists();
    let has_run = started && (run_dir.join("metrics.jsonl").exists() || run_dir.join("checkpoints").exists());
    let start = if start == Start::Fresh && started && !has_run { Start::Overwrite } else { start };
    match start {
        Start::Fresh if has_run => Err(Error::Input(format!(
            "{} already holds a run: pass --resume to continue it, --overwrite to replace it, or choose another --out",
            run_dir.display()
        ))),
        Start::Resume if !has_run => Err(Error::Input(format!(
            "{} holds no run to resume (no run.toml); start one without --resume",
            run_dir.display()
        ))),
        Start::Overwrite => {
            for f in RUN_FILES {
                let _ = std::fs::remove_file(run_dir.join(f));
            }
            for d in RUN_DIRS {
                let p = run_dir.join(d);
                if p.exists() {
                    std::fs::remove_dir_all(&p).map_err(|e| Error::write(&p, e))?;
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The tokenizer of a run: given, reused (resume), or trained on the training files.
pub fn run_tokenizer(cfg: &RunConfig, run_dir: &Path, train_files: &[PathBuf]) -> Result<Tokenizer> {
    let saved = run_dir.join("tokenizer.json");
    if saved.exists() {
        return Tokenizer::from_file(&saved);
    }
    let tok = match &cfg.data.tokenizer {
        Some(p) => Tokenizer::load(p)?,
        None => crate::data::tokenizer::train_bpe(train_files, cfg.data.tokenizer_vocab_size, 2)?,
    };
    tok.save(&saved)?;
    Ok(tok)
}

/// The training files: the configured ones, or the built-in corpus written into the run. The
/// built-in corpus is JSON lines, one paragraph per document, so every paragraph ends with the
/// end-of-text token and the model learns to emit it (a fine-tuned adapter that must stop after
/// an answer cannot learn that through a frozen, tied embedding the base never trained).
pub fn train_inputs(cfg: &RunConfig, run_dir: &Path) -> Result<Vec<PathBuf>> {
    if !cfg.data.train.is_empty() {
        return corpus::expand_inputs(&cfg.data.train);
    }
    let path = run_dir.join("data").join("builtin.jsonl");
    if !path.exists() {
        std::fs::create_dir_all(run_dir.join("data")).map_err(|e| Error::write(run_dir, e))?;
        let (_, text) = crate::data::synthetic::default_corpus(cfg.data.builtin_bytes);
        let lines: String = text
            .split("\n\n")
            .filter(|p| !p.trim().is_empty())
            .map(|p| serde_json::json!({ "text": p }).to_string() + "\n")
            .collect();
        crate::io::write_atomic(&path, |w| std::io::Write::write_all(w, lines.as_bytes()))?;
    }
    Ok(vec![path])
}

fn token_file(inputs: &[PathBuf], tok: &Tokenizer, path: &Path, progress: bool) -> Result<TokenFile> {
    if path.exists() {
        return TokenFile::open(path);
    }
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new("."))).map_err(|e| Error::write(path, e))?;
    corpus::build_token_file(inputs, tok, path, progress)
}

/// The model config a run trains: the preset (or init checkpoint) with the run's overrides and
/// the tokenizer's vocabulary.
pub fn model_config(cfg: &RunConfig, tok: &Tokenizer) -> Result<Gpt2Config> {
    let m = &cfg.model;
    let mut c = Gpt2Config::preset(&m.preset)?;
    c.vocab_size = tok.id_bound();
    c.n_layer = m.n_layer.unwrap_or(c.n_layer);
    c.n_head = m.n_head.unwrap_or(c.n_head);
    c.n_embd = m.n_embd.unwrap_or(c.n_embd);
    c.n_positions = m.n_positions.unwrap_or(c.n_positions);
    if let Some(p) = m.dropout {
        (c.embd_pdrop, c.resid_pdrop, c.attn_pdrop) = (p, p, p);
    }
    c.eos_token_id = tok.eos_id();
    c.bos_token_id = tok.eos_id();
    if c.n_embd % c.n_head != 0 {
        return Err(Error::Input(format!(
            "model.n_embd = {} is not divisible by model.n_head = {}",
            c.n_embd, c.n_head
        )));
    }
    Ok(c)
}

/// Input ids and next-token targets [B, T] for windows of seq+1 tokens starting at `starts`.
pub fn windows_batch(file: &TokenFile, starts: &[usize], seq: usize) -> Result<(Tensor, Tensor)> {
    let (mut ids, mut tgt) = (Vec::with_capacity(starts.len() * seq), Vec::with_capacity(starts.len() * seq));
    for &s in starts {
        let w = file.tokens(s..s + seq + 1);
        ids.extend(w[..seq].iter().map(|&x| x as i32));
        tgt.extend(w[1..].iter().map(|&x| x as i32));
    }
    Ok((Tensor::from_i32(ids, [starts.len(), seq])?, Tensor::from_i32(tgt, [starts.len(), seq])?))
}

/// Mean loss over the evaluation windows (deterministic: the same windows every time).
pub fn evaluate(model: &Gpt2, file: &TokenFile, starts: &[usize], batch: usize, seq: usize) -> Result<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in starts.chunks(batch.max(1)) {
        let (ids, tgt) = windows_batch(file, chunk, seq)?;
        let loss = model.forward(&mut Tape::inference(), &ids, Some(&tgt), Mode::Eval)?.loss.expect("targets given");
        sum += loss.item()? as f64 * chunk.len() as f64;
        n += chunk.len();
    }
    Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
}

/// Runs (or resumes) pre-training as configured, writing everything into `run_dir`.
pub fn pretrain(cfg: &RunConfig, run_dir: &Path, opts: &Options) -> Result<Summary> {
    prepare_dir(run_dir, opts.start)?;
    if opts.start == Start::Resume {
        let stored = RunConfig::load(Some(&run_dir.join("run.toml")), &[])?;
        if stored.model != cfg.model || stored.data != cfg.data {
            return Err(Error::Input(format!(
                "{} was started with a different [model] or [data] config; resume with the same ones (only [train] may change)",
                run_dir.display()
            )));
        }
    }
    crate::io::write_atomic(&run_dir.join("run.toml"), |w| std::io::Write::write_all(w, cfg.to_toml().as_bytes()))?;
    let t = &cfg.train;

    let inputs = train_inputs(cfg, run_dir)?;
    let tok = run_tokenizer(cfg, run_dir, &inputs)?;
    let train_file = token_file(&inputs, &tok, &run_dir.join("data").join("train.tok"), opts.progress)?;
    let (train_range, val_file, val_range) = if cfg.data.val.is_empty() {
        let (a, b) = corpus::split(train_file.len(), cfg.data.val_fraction);
        (a, None, b)
    } else {
        let vf = token_file(
            &corpus::expand_inputs(&cfg.data.val)?,
            &tok,
            &run_dir.join("data").join("val.tok"),
            opts.progress,
        )?;
        let n = vf.len();
        (0..train_file.len(), Some(vf), 0..n)
    };
    let val_file = val_file.as_ref().unwrap_or(&train_file);

    // model, optimizer and position: from the latest checkpoint, or new
    let adam = AdamWConfig { lr: t.lr, beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay };
    let mut opt = AdamW::new(adam);
    let latest = if opts.start == Start::Resume { checkpoint::latest(run_dir)? } else { None };
    let (mut model, sampler, start_step, elapsed0) = match &latest {
        Some(dir) => {
            let s = checkpoint::load(dir, None, &mut opt)?;
            metrics::truncate_after(&run_dir.join("metrics.jsonl"), s.step)?;
            let sampler = serde_json::from_value(s.data).map_err(|e| {
                Error::checkpoint(dir, format!("trainer_state.json: the data position is unreadable ({e})"))
            })?;
            (s.model, sampler, s.step, s.elapsed_s)
        }
        None => {
            let model = match &cfg.model.init_from {
                Some(dir) => crate::io::checkpoint::load_gpt2(dir)?,
                None => Gpt2::new_random(model_config(cfg, &tok)?, t.seed)?,
            };
            (model, WindowSampler::new(t.seed, train_range.clone()), 0, 0.0)
        }
    };
    corpus::check_vocab(&train_file, model.config.vocab_size)?;
    model.to_device(opts.device)?;
    if t.seq_len > model.config.n_positions {
        return Err(Error::SeqTooLong { t: t.seq_len, n_positions: model.config.n_positions });
    }
    let eval_starts = corpus::eval_windows(val_range.clone(), t.seq_len, t.eval_windows);

    let mut task = PretrainTask {
        run_dir: run_dir.to_path_buf(),
        tok,
        train_file: &train_file,
        val_file,
        sampler,
        eval_starts,
        batch: t.batch_size,
        seq: t.seq_len,
        keep_last: t.keep_last,
    };
    let spec = steps::Spec {
        train: t,
        run_dir,
        opts,
        start_step,
        elapsed0,
        latest,
        tokens_per_micro_batch: t.batch_size * t.seq_len,
        title: "kiln pretrain: loss",
    };
    steps::run(&mut model, &mut opt, &mut task, &spec)
}

/// Pre-training's data, evaluation and checkpoints, for the shared step loop.
struct PretrainTask<'a> {
    run_dir: PathBuf,
    tok: Tokenizer,
    train_file: &'a TokenFile,
    val_file: &'a TokenFile,
    sampler: WindowSampler,
    eval_starts: Vec<usize>,
    batch: usize,
    seq: usize,
    keep_last: usize,
}

impl steps::Task for PretrainTask<'_> {
    fn next_batch(&mut self) -> Result<(Tensor, Tensor)> {
        self.sampler.next_batch(self.train_file, self.batch, self.seq)
    }
    fn evaluate(&mut self, model: &Gpt2) -> Result<Option<f64>> {
        if self.eval_starts.is_empty() {
            return Ok(None);
        }
        evaluate(model, self.val_file, &self.eval_starts, self.batch, self.seq).map(Some)
    }
    fn save(
        &mut self,
        model: &Gpt2,
        opt: &dyn crate::optim::Optimizer,
        step: usize,
        elapsed_s: f64,
    ) -> Result<PathBuf> {
        let data = serde_json::to_value(&self.sampler).expect("the sampler serialises");
        let state = checkpoint::TrainerState { step, data, elapsed_s };
        checkpoint::save(&self.run_dir, model, &self.tok, opt, &state, self.keep_last)
    }
}
