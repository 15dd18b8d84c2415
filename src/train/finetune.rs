//! Supervised fine-tuning: a pre-trained checkpoint, a labelled dataset (src/data/sft.rs), the
//! shared step loop (steps.rs). Examples are visited in a shuffled order per epoch, drawn from
//! the run seed, so (epoch, position) is the data's whole state and a resume is exact. Before
//! training, the cost of the method is printed: parameters, trainable parameters and the bytes of
//! weights, gradients, optimizer state and activations.

use super::config::RunConfig;
use super::{checkpoint, steps, Options, Start, Summary};
use crate::data::sft::{self, SftData};
use crate::data::tokenizer::Tokenizer;
use crate::model::{Mode, Model};
use crate::nn::lora::LoraConfig;
use crate::optim::{AdamW, AdamW8bit, AdamWConfig, Optimizer};
use crate::quant::nf4::NF4_BLOCKSIZE;
use crate::tape::Tape;
use crate::{Error, Result, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the data stands: the epoch (its shuffle) and the next example's index in it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SftPosition {
    pub epoch: u64,
    pub next: usize,
}

/// The shuffled order of `n` examples in `epoch`.
fn order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    idx
}

struct SftTask {
    run_dir: PathBuf,
    tok: Tokenizer,
    train: SftData,
    val: SftData,
    seed: u64,
    pos: SftPosition,
    perm: Vec<usize>,
    batch: usize,
    pad: u32,
    keep_last: usize,
}

impl steps::Task for SftTask {
    fn next_batch(&mut self) -> Result<(Tensor, Tensor)> {
        let mut rows = Vec::with_capacity(self.batch);
        while rows.len() < self.batch {
            if self.pos.next >= self.perm.len() {
                self.pos = SftPosition { epoch: self.pos.epoch + 1, next: 0 };
                self.perm = order(self.seed, self.pos.epoch, self.train.rows.len());
            }
            rows.push(&self.train.rows[self.perm[self.pos.next]]);
            self.pos.next += 1;
        }
        sft::batch(&rows, self.pad)
    }

    fn evaluate(&mut self, model: &Model) -> Result<Option<f64>> {
        if self.val.rows.is_empty() {
            return Ok(None);
        }
        evaluate_rows(model, &self.val, self.batch, self.pad).map(Some)
    }

    fn save(&mut self, model: &Model, opt: &dyn Optimizer, step: usize, elapsed_s: f64) -> Result<PathBuf> {
        let data = serde_json::to_value(&self.pos).expect("the position serialises");
        checkpoint::save(
            &self.run_dir,
            model,
            &self.tok,
            opt,
            &checkpoint::TrainerState { step, data, elapsed_s },
            self.keep_last,
        )
    }
}

/// Mean loss per trained token over `data`'s rows.
pub fn evaluate_rows(model: &Model, data: &SftData, batch: usize, pad: u32) -> Result<f64> {
    let (mut sum, mut count) = (0.0, 0usize);
    let rows: Vec<&(Vec<u32>, Vec<i32>)> = data.rows.iter().collect();
    for chunk in rows.chunks(batch.max(1)) {
        let (ids, tgt) = sft::batch(chunk, pad)?;
        let n = tgt.i32s()?.iter().filter(|&&t| t != crate::ops::xent::IGNORE).count();
        if n == 0 {
            continue;
        }
        let loss = model.forward(&mut Tape::inference(), &ids, Some(&tgt), Mode::Eval)?.loss.expect("targets given");
        sum += loss.item()? as f64 * n as f64;
        count += n;
    }
    Ok(if count == 0 { f64::NAN } else { sum / count as f64 })
}

/// Peak resident memory of this process so far (Linux: VmHWM), in bytes.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// Training losses a fine-tuning run logs at least (fewer steps: every one), so that its plot
/// shows a curve: pre-training's default of every 10 steps draws 5 points for a 50-step run.
pub const MIN_LOGGED: usize = 50;

/// `cfg` with the default `train.log_every` (10) lowered to max_steps / MIN_LOGGED, at least 1;
/// any other value is one a user chose, and is kept.
fn log_often(cfg: &RunConfig) -> RunConfig {
    let mut c = cfg.clone();
    let default = super::config::TrainSection::default().log_every;
    if c.train.log_every == default {
        c.train.log_every = (c.train.max_steps / MIN_LOGGED).clamp(1, default);
    }
    c
}

/// Fine-tunes `cfg.model.init_from` on `cfg.data.train` (SFT files) into `run_dir`.
pub fn finetune(cfg: &RunConfig, run_dir: &Path, opts: &Options) -> Result<Summary> {
    let created = !run_dir.exists();
    let result = finetune_in(cfg, run_dir, opts);
    super::forget_failed_start(run_dir, created, &result);
    result
}

fn finetune_in(cfg: &RunConfig, run_dir: &Path, opts: &Options) -> Result<Summary> {
    let cfg = &log_often(cfg);
    let f = &cfg.finetune;
    match f.method.as_str() {
        "full" | "lora" | "qlora" => {}
        other => return Err(Error::unknown("method", other, "full, lora or qlora")),
    }
    // QLoRA's usual optimizer keeps 8-bit moments; "auto" picks it for qlora, AdamW otherwise
    let optimizer = match (f.optimizer.as_str(), f.method.as_str()) {
        ("auto", "qlora") => "adamw8bit",
        ("auto", _) => "adamw",
        (o @ ("adamw" | "adamw8bit"), _) => o,
        (other, _) => return Err(Error::unknown("optimizer", other, "adamw, adamw8bit or auto")),
    };
    let base = cfg
        .model
        .init_from
        .as_ref()
        .ok_or_else(|| Error::Input("fine-tuning needs a base model: pass --model DIR".into()))?;
    if cfg.data.train.is_empty() {
        return Err(Error::Input("fine-tuning needs examples: pass --data FILE (JSON lines or a JSON array)".into()));
    }
    let t = &cfg.train;

    let tok_path = cfg.data.tokenizer.clone().unwrap_or_else(|| base.join("tokenizer.json"));
    let tok = Tokenizer::load(&tok_path).map_err(|e| {
        Error::Input(format!(
            "{e} (fine-tuning reads the base model's tokenizer.json; pass --tokenizer FILE if it lives elsewhere)"
        ))
    })?;
    // QLoRA: the base's Conv1D weights go to NF4 now, before anything else holds their f32 copies
    // (a layer whose size is not a multiple of the block size is refused by name); those a
    // pre-quantized checkpoint (`kiln quantize`) stores in NF4 are taken as they are.
    let adapter = matches!(f.method.as_str(), "lora" | "qlora");
    let (mut model, prequantized) = if f.method == "qlora" {
        let mut m = crate::io::checkpoint::load_nf4_base(base)?;
        let stored = m.nf4.as_ref().map_or(0, |q| q.len());
        m.quantize_nf4(NF4_BLOCKSIZE)?;
        (m, stored)
    } else {
        (crate::io::checkpoint::load_model(base)?, 0)
    };
    if tok.id_bound() > model.config.vocab_size() {
        return Err(Error::Mismatch(format!(
            "the tokenizer's vocabulary ({}) does not fit the model's vocab_size ({}): use the base model's own tokenizer",
            tok.id_bound(),
            model.config.vocab_size()
        )));
    }
    // train.seq_len caps the context; the model's n_positions caps it too
    let ctx = t.seq_len.min(model.config.n_positions());
    let load = |inputs: &[String]| -> Result<Vec<sft::Example>> {
        let mut all = vec![];
        for p in crate::data::corpus::expand_inputs(inputs)? {
            all.extend(sft::load_examples(&p, f.format, &f.chat)?);
        }
        Ok(all)
    };
    let mut examples = load(&cfg.data.train)?;
    let mut val_examples = if cfg.data.val.is_empty() { vec![] } else { load(&cfg.data.val)? };
    if cfg.data.val.is_empty() && cfg.data.val_fraction > 0.0 && examples.len() > 1 {
        // hold out the tail of a fixed shuffle
        let perm = order(t.seed ^ 0xfeed, 0, examples.len());
        let n_val = ((examples.len() as f64 * cfg.data.val_fraction).round() as usize).clamp(1, examples.len() - 1);
        let mut shuffled: Vec<sft::Example> = perm.iter().map(|&i| examples[i].clone()).collect();
        val_examples = shuffled.split_off(examples.len() - n_val);
        examples = shuffled;
    }
    let eos = tok.eos_id().or(model.config.eos_token_id());
    let train = sft::tokenize(&examples, &tok, ctx, eos, f.pack)?;
    let val = sft::tokenize(&val_examples, &tok, ctx, eos, false)?;
    if !opts.quiet {
        println!(
        "  data: {} training examples ({} rows{}), {} validation; {} trained tokens; {} examples cut to {ctx} tokens ({} tokens cut)",
        train.examples,
        train.rows.len(),
        if f.pack { ", packed" } else { "" },
        val.examples,
        train.trained_tokens,
        train.truncated_examples,
        train.truncated_tokens
    );
    }

    // Everything above only read: a run that cannot start fails before its directory exists.
    super::prepare_dir(run_dir, opts.start)?;
    crate::io::write_atomic(&run_dir.join("run.toml"), |w| std::io::Write::write_all(w, cfg.to_toml().as_bytes()))?;

    let adam = AdamWConfig { lr: t.lr, beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay };
    let mut opt: Box<dyn Optimizer> = match optimizer {
        "adamw8bit" => Box::new(AdamW8bit::new(adam)),
        _ => Box::new(AdamW::new(adam)),
    };
    let latest =
        if opts.start == Start::Resume { checkpoint::resume_point(run_dir, t.max_steps, opts.quiet)? } else { None };
    let (mut pos, start_step, elapsed0) = match &latest {
        Some(dir) => {
            let base = adapter.then(|| model.clone());
            let s = checkpoint::load(dir, base, opt.as_mut())?;
            model = s.model;
            let pos: SftPosition = serde_json::from_value(s.data).map_err(|e| {
                Error::checkpoint(dir, format!("trainer_state.json: the data position is unreadable ({e})"))
            })?;
            (pos, s.step, s.elapsed_s)
        }
        None => {
            if adapter {
                let targets = crate::model::lora::default_targets_for(&model.config, &f.lora_targets);
                let lc = LoraConfig::new(f.lora_r, f.lora_alpha, f.lora_dropout, &targets, f.rslora)?;
                crate::model::lora::attach(&mut model, lc, t.seed)?;
            }
            (SftPosition::default(), 0, 0.0)
        }
    };
    if f.method == "full" {
        model.params.set_trainable(true);
    }
    if f.method == "qlora" && !opts.quiet {
        let layers = model.nf4.as_ref().map_or(0, |q| q.len());
        let mut sizes: Vec<usize> = model.nf4.iter().flat_map(|q| q.values()).map(|w| w.blocksize).collect();
        sizes.sort();
        sizes.dedup();
        let sizes = sizes.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(", ");
        let stored =
            if prequantized > 0 { format!(", {prequantized} as the checkpoint stores them") } else { "".into() };
        println!(
            "  qlora: {layers} base layers in NF4 (blocks of {sizes}, absmax double-quantized{stored}), optimizer {optimizer}"
        );
    }
    model.gradient_checkpointing = f.gradient_checkpointing;
    model.to_device(opts.device)?;
    if !opts.quiet {
        let gpu = opts.device != crate::Device::Cpu;
        let counts = super::memory::Counts::of(&model);
        let ckpt = f.gradient_checkpointing;
        let bill = super::memory::Bill::new(&model.config, counts, (t.batch_size, ctx), optimizer, gpu, ckpt);
        print!("{}", bill.table(t.batch_size, ctx));
    }
    let perm = order(t.seed, pos.epoch, train.rows.len());
    pos.next = pos.next.min(perm.len());
    let tokens_per_row = train.rows.iter().map(|r| r.0.len()).sum::<usize>() / train.rows.len().max(1);
    let mut task = SftTask {
        run_dir: run_dir.to_path_buf(),
        pad: eos.unwrap_or(0),
        tok,
        train,
        val,
        seed: t.seed,
        pos,
        perm,
        batch: t.batch_size,
        keep_last: t.keep_last,
    };
    let spec = steps::Spec {
        train: t,
        run_dir,
        opts,
        start_step,
        elapsed0,
        latest,
        tokens_per_micro_batch: t.batch_size * tokens_per_row,
        title: "kiln finetune: loss",
    };
    let summary = steps::run(&mut model, opt.as_mut(), &mut task, &spec)?;
    if !opts.quiet {
        // Resident counts what the pool and the system allocator keep; live counts what kiln's
        // tensors, gradients and optimizer state hold (the `kiln` binary's counting allocator).
        let resident = peak_rss().map_or("unknown".to_string(), |b| format!("{:.1} MB", b as f64 / 1e6));
        match crate::memory::peak_live_bytes() {
            Some(live) => {
                println!(
                    "  peak memory: {resident} resident, {:.1} MB live (heap in use, pool excluded)",
                    live as f64 / 1e6
                )
            }
            None => println!("  peak memory (resident): {resident}"),
        }
    }
    Ok(summary)
}
