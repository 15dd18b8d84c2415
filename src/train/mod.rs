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
pub mod memory;
pub mod metrics;
pub mod schedule;
pub mod steps;

use crate::data::corpus::{self, TokenFile, WindowSampler};
use crate::data::tokenizer::Tokenizer;
use crate::model::{Config, Mode, Model};
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
    /// Report progress: a bar on a terminal, plain lines every few seconds elsewhere (even when
    /// `quiet`, which silences everything else).
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
    /// The step `val_loss` was measured at.
    pub val_step: Option<usize>,
    /// Median tokens per second over this invocation's steps.
    pub tokens_per_s: f64,
    pub interrupted: bool,
    pub checkpoint: Option<PathBuf>,
    /// What the run held on the GPU (or the emulated device); None on the CPU.
    pub device_memory: Option<DeviceMemory>,
}

/// Device memory of a run, measured: the high-water mark of the bytes kiln's buffers held at
/// once (every device allocation is counted while it lives), and the parts of it kiln can name.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceMemory {
    pub peak: usize,
    /// The model's weights on the device (f32 masters, the adapter, NF4 weights packed).
    pub weights: usize,
    /// The optimizer's state.
    pub optimizer: usize,
}

impl DeviceMemory {
    /// The rest of the peak: gradients, activations, bf16 copies of the weights and workspace.
    pub fn rest(&self) -> usize {
        self.peak.saturating_sub(self.weights + self.optimizer)
    }

    /// One line: the peak and its parts.
    pub fn describe(&self) -> String {
        let mb = |b: usize| format!("{:.1} MB", b as f64 / 1e6);
        format!(
            "device memory, measured: peak {} = weights {} + optimizer state {} + gradients, activations and workspace {}",
            mb(self.peak),
            mb(self.weights),
            mb(self.optimizer),
            mb(self.rest())
        )
    }
}

impl Summary {
    /// One line for the end of a run: where it stopped, the last losses (the validation loss
    /// with the step it was measured at), speed and the checkpoint.
    pub fn describe(&self) -> String {
        let val = match (self.val_loss, self.val_step) {
            (Some(v), Some(s)) => format!("validation loss {v:.4} at step {s} (perplexity {:.2})", v.exp()),
            _ => "no validation loss".into(),
        };
        let ckpt = self.checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into());
        format!(
            "{} at step {}: train loss {}, {val}, {:.0} tokens/s; checkpoint {ckpt}",
            if self.interrupted { "stopped by an interrupt" } else { "done" },
            self.steps,
            self.last_loss.map(|l| format!("{l:.4}")).unwrap_or_else(|| "-".into()),
            self.tokens_per_s,
        )
    }
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
        Start::Fresh if has_run => Err(Error::RunExists(run_dir.to_path_buf())),
        Start::Resume if !has_run => Err(Error::NoRun(run_dir.to_path_buf())),
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
pub fn run_tokenizer(
    cfg: &RunConfig,
    run_dir: &Path,
    train_files: &[PathBuf],
    given: Option<Tokenizer>,
    progress: bool,
) -> Result<Tokenizer> {
    let saved = run_dir.join("tokenizer.json");
    if saved.exists() {
        return Tokenizer::from_file(&saved);
    }
    let tok = match (given, &cfg.data.tokenizer) {
        (Some(t), _) => t,
        (None, Some(p)) => Tokenizer::load(p)?,
        (None, None) => {
            let what = format!("training a {}-token byte-level BPE tokenizer", cfg.data.tokenizer_vocab_size);
            let _ticker = crate::progress::Ticker::new(progress, &what);
            crate::data::tokenizer::train_bpe(train_files, cfg.data.tokenizer_vocab_size, 2)?
        }
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
pub fn model_config(cfg: &RunConfig, tok: &Tokenizer) -> Result<Config> {
    let mut c = base_model_config(cfg)?;
    let (v, eos) = (tok.id_bound(), tok.eos_id());
    match &mut c {
        Config::Gpt2(c) => (c.vocab_size, c.eos_token_id, c.bos_token_id) = (v, eos, eos),
        Config::Llama(c) => (c.vocab_size, c.eos_token_id, c.bos_token_id) = (v, eos, eos),
    }
    Ok(c)
}

/// The preset with the run's overrides, before a tokenizer sets the vocabulary.
fn base_model_config(cfg: &RunConfig) -> Result<Config> {
    let m = &cfg.model;
    let mut config = Config::preset(&m.preset)?;
    match &mut config {
        Config::Gpt2(c) => {
            c.n_layer = m.n_layer.unwrap_or(c.n_layer);
            c.n_head = m.n_head.unwrap_or(c.n_head);
            c.n_embd = m.n_embd.unwrap_or(c.n_embd);
            c.n_positions = m.n_positions.unwrap_or(c.n_positions);
            if let Some(p) = m.dropout {
                (c.embd_pdrop, c.resid_pdrop, c.attn_pdrop) = (p, p, p);
            }
        }
        Config::Llama(c) => {
            if m.dropout.is_some_and(|p| p != 0.0) {
                return Err(Error::Input(format!(
                    "model.dropout: the {} preset is a Llama, which has no dropout; leave model.dropout out",
                    m.preset
                )));
            }
            c.num_hidden_layers = m.n_layer.unwrap_or(c.num_hidden_layers);
            let heads = m.n_head.unwrap_or(c.num_attention_heads);
            // the grouping (query heads per KV head) stays the preset's where the new count allows
            let group = c.num_attention_heads / c.num_key_value_heads;
            c.num_key_value_heads = if heads % group == 0 { heads / group } else { heads };
            c.num_attention_heads = heads;
            c.hidden_size = m.n_embd.unwrap_or(c.hidden_size);
            c.head_dim = c.hidden_size / heads.max(1);
            c.max_position_embeddings = m.n_positions.unwrap_or(c.max_position_embeddings);
        }
    }
    let (c, h) = (config.n_embd(), config.heads().n_head);
    if h == 0 || c % h != 0 || (matches!(config, Config::Llama(_)) && (c / h) % 2 != 0) {
        return Err(Error::Input(format!(
            "model.n_embd = {c} is not divisible by model.n_head = {h}{}",
            if matches!(config, Config::Llama(_)) { " into heads of an even size (rotary pairs)" } else { "" }
        )));
    }
    Ok(config)
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
pub fn evaluate(model: &Model, file: &TokenFile, starts: &[usize], batch: usize, seq: usize) -> Result<f64> {
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in starts.chunks(batch.max(1)) {
        let (ids, tgt) = windows_batch(file, chunk, seq)?;
        let loss = model.forward(&mut Tape::inference(), &ids, Some(&tgt), Mode::Eval)?.loss.expect("targets given");
        sum += loss.item()? as f64 * chunk.len() as f64;
        n += chunk.len();
    }
    Ok(if n == 0 { f64::NAN } else { sum / n as f64 })
}

/// What can be checked before a run touches the disk: the preset and model shape (or the
/// checkpoint it starts from), the data and validation files, the tokenizer and the context. A
/// run that cannot start fails here, before its directory exists. Returns the configured
/// tokenizer, loaded.
pub fn check_start(cfg: &RunConfig) -> Result<Option<Tokenizer>> {
    let n_positions = match &cfg.model.init_from {
        Some(dir) => {
            if !dir.join("config.json").is_file() {
                return Err(Error::checkpoint(
                    dir,
                    "model.init_from has no config.json: give a Hugging Face checkpoint directory",
                ));
            }
            Config::from_json_file(&dir.join("config.json"))?.n_positions()
        }
        None => base_model_config(cfg)?.n_positions(),
    };
    if cfg.train.seq_len > n_positions {
        return Err(Error::Input(format!(
            "train.seq_len = {} is longer than the model's context (n_positions = {n_positions}); lower \
             train.seq_len or raise model.n_positions",
            cfg.train.seq_len
        )));
    }
    if !cfg.data.train.is_empty() {
        corpus::expand_inputs(&cfg.data.train)?;
    }
    corpus::expand_inputs(&cfg.data.val)?;
    cfg.data.tokenizer.as_deref().map(Tokenizer::load).transpose()
}

/// Runs (or resumes) pre-training as configured, writing everything into `run_dir`. A run that
/// fails before its first step leaves no directory behind (when it made the directory).
pub fn pretrain(cfg: &RunConfig, run_dir: &Path, opts: &Options) -> Result<Summary> {
    let given_tok = check_start(cfg)?;
    let created = !run_dir.exists();
    let result = prepare_dir(run_dir, opts.start)
        .and_then(|()| {
            if !opts.quiet {
                println!("{}", header(cfg, run_dir));
            }
            setup_pretrain(cfg, run_dir, opts, given_tok)
        })
        .and_then(|p| p.run(cfg, run_dir, opts));
    forget_failed_start(run_dir, created, &result);
    result
}

/// The line a pre-training run starts with.
fn header(cfg: &RunConfig, run_dir: &Path) -> String {
    let t = &cfg.train;
    format!(
        "kiln pretrain: {} preset, batch {} x {} tokens x {} accumulation, {} steps, lr {:.1e} ({}), run directory {}",
        cfg.model.preset,
        t.batch_size,
        t.seq_len,
        t.grad_accum,
        t.max_steps,
        t.lr,
        t.schedule,
        run_dir.display()
    )
}

/// Removes a run directory that this invocation made when the run failed before any step was
/// logged or saved: a start that failed leaves nothing behind. Anything else stays.
pub(crate) fn forget_failed_start<T>(run_dir: &Path, created: bool, result: &Result<T>) {
    let trained = run_dir.join("metrics.jsonl").exists() || run_dir.join("checkpoints").exists();
    if result.is_err() && created && !trained {
        let _ = std::fs::remove_dir_all(run_dir);
    }
}

/// A pre-training run ready for its first step.
struct Prepared {
    model: Model,
    opt: AdamW,
    tok: Tokenizer,
    train_file: TokenFile,
    val_file: Option<TokenFile>,
    sampler: WindowSampler,
    eval_starts: Vec<usize>,
    start_step: usize,
    elapsed0: f64,
    latest: Option<PathBuf>,
}

fn setup_pretrain(cfg: &RunConfig, run_dir: &Path, opts: &Options, given_tok: Option<Tokenizer>) -> Result<Prepared> {
    if opts.start == Start::Resume {
        let stored = RunConfig::load(Some(&run_dir.join("run.toml")), &[])?;
        // the run's tokenizer is reused, so the vocabulary size asked for no longer matters
        let asked = config::DataSection { tokenizer_vocab_size: stored.data.tokenizer_vocab_size, ..cfg.data.clone() };
        if stored.model != cfg.model || stored.data != asked {
            return Err(Error::Mismatch(format!(
                "{} was started with a different [model] or [data] config; resume with the same ones (only [train] may change)",
                run_dir.display()
            )));
        }
    }
    let write_config = |cfg: &RunConfig| {
        crate::io::write_atomic(&run_dir.join("run.toml"), |w| std::io::Write::write_all(w, cfg.to_toml().as_bytes()))
    };
    write_config(cfg)?;
    let t = &cfg.train;

    let inputs = train_inputs(cfg, run_dir)?;
    let tok = run_tokenizer(cfg, run_dir, &inputs, given_tok, opts.progress)?;
    if cfg.data.tokenizer.is_none() && tok.vocab_size() != cfg.data.tokenizer_vocab_size {
        // record the vocabulary the trainer built (it stops early on a small corpus), not the request
        let mut built = cfg.clone();
        built.data.tokenizer_vocab_size = tok.vocab_size();
        write_config(&built)?;
    }
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

    // model, optimizer and position: from the latest checkpoint, or new
    let adam = AdamWConfig { lr: t.lr, beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay };
    let mut opt = AdamW::new(adam);
    let latest =
        if opts.start == Start::Resume { checkpoint::resume_point(run_dir, t.max_steps, opts.quiet)? } else { None };
    let (mut model, sampler, start_step, elapsed0) = match &latest {
        Some(dir) => {
            let s = checkpoint::load(dir, None, &mut opt)?;
            let sampler: WindowSampler = serde_json::from_value(s.data).map_err(|e| {
                Error::checkpoint(dir, format!("trainer_state.json: the data position is unreadable ({e})"))
            })?;
            // The state's mode is what the run does; a state from before data.sampling existed
            // (random offsets) meets a run.toml without the key, read as the default.
            if sampler.mode.name() != cfg.data.sampling {
                let mut actual = RunConfig::load(Some(&run_dir.join("run.toml")), &[])?;
                actual.data.sampling = sampler.mode.name().into();
                write_config(&actual)?;
                if !opts.quiet {
                    println!(
                        "note: {} draws windows with data.sampling = \"{}\"; run.toml now says so",
                        dir.display(),
                        sampler.mode.name()
                    );
                }
            }
            (s.model, sampler, s.step, s.elapsed_s)
        }
        None => {
            let model = match &cfg.model.init_from {
                Some(dir) => crate::io::checkpoint::load_model(dir)?,
                None => Model::new_random(model_config(cfg, &tok)?, t.seed)?,
            };
            let mode = cfg.data.sampling.parse()?;
            (model, WindowSampler::new(t.seed, train_range.clone(), mode), 0, 0.0)
        }
    };
    corpus::check_vocab(&train_file, model.config.vocab_size())?;
    model.to_device(opts.device)?;
    if t.seq_len > model.config.n_positions() {
        return Err(Error::SeqTooLong { t: t.seq_len, n_positions: model.config.n_positions() });
    }
    let eval_starts = corpus::eval_windows(val_range.clone(), t.seq_len, t.eval_windows);
    Ok(Prepared { model, opt, tok, train_file, val_file, sampler, eval_starts, start_step, elapsed0, latest })
}

impl Prepared {
    fn run(self, cfg: &RunConfig, run_dir: &Path, opts: &Options) -> Result<Summary> {
        let t = &cfg.train;
        let Prepared {
            mut model,
            mut opt,
            tok,
            train_file,
            val_file,
            sampler,
            eval_starts,
            start_step,
            elapsed0,
            latest,
        } = self;
        let mut task = PretrainTask {
            run_dir: run_dir.to_path_buf(),
            tok,
            train_file: &train_file,
            val_file: val_file.as_ref().unwrap_or(&train_file),
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
    fn evaluate(&mut self, model: &Model) -> Result<Option<f64>> {
        if self.eval_starts.is_empty() {
            return Ok(None);
        }
        evaluate(model, self.val_file, &self.eval_starts, self.batch, self.seq).map(Some)
    }
    fn save(
        &mut self,
        model: &Model,
        opt: &dyn crate::optim::Optimizer,
        step: usize,
        elapsed_s: f64,
    ) -> Result<PathBuf> {
        let data = serde_json::to_value(&self.sampler).expect("the sampler serialises");
        let state = checkpoint::TrainerState { step, data, elapsed_s };
        checkpoint::save(&self.run_dir, model, &self.tok, opt, &state, self.keep_last)
    }
}
