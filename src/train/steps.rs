//! The optimisation loop every kind of training shares: learning-rate schedule, micro-batches with
//! gradient accumulation, clipping, the optimizer step, metrics, evaluation, the plot,
//! checkpoints, Ctrl-C and the NaN guard. What differs between pre-training and fine-tuning (where
//! batches come from, how to evaluate, what a checkpoint holds) comes in through `Task`.

use super::config::TrainSection;
use super::metrics::{self, Record};
use super::{schedule, Options, Summary};
use crate::model::{Mode, Model};
use crate::optim::Optimizer;
use crate::tape::{Gradients, Tape};
use crate::{Error, Result, Tensor};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a kind of training supplies to the loop.
pub trait Task {
    /// The next micro-batch: input ids and next-token targets (-100 = no loss), both [B, T].
    fn next_batch(&mut self) -> Result<(Tensor, Tensor)>;
    /// Validation loss, or None when there is nothing to validate on.
    fn evaluate(&mut self, model: &Model) -> Result<Option<f64>>;
    /// Writes a checkpoint after `step` optimizer steps and returns where.
    fn save(&mut self, model: &Model, opt: &dyn Optimizer, step: usize, elapsed_s: f64) -> Result<PathBuf>;
}

/// Where the loop starts and what it reports.
pub struct Spec<'a> {
    pub train: &'a TrainSection,
    pub run_dir: &'a Path,
    pub opts: &'a Options,
    /// Steps already done (a resumed run), and the wall time they took.
    pub start_step: usize,
    pub elapsed0: f64,
    /// The checkpoint the run resumed from, if any.
    pub latest: Option<PathBuf>,
    /// Tokens per micro-batch, for tokens/s.
    pub tokens_per_micro_batch: usize,
    /// The loss plot's title.
    pub title: &'a str,
}

/// Ctrl-C. Signals that arrive together are one interrupt: a terminal's Ctrl-C reaches both
/// `cargo run` and kiln, and `timeout -s INT` signals the process and then its group. The first
/// interrupt finishes the step, saves a checkpoint and stops; one that comes more than
/// `SAME_INTERRUPT` later is a deliberate second one and exits at once, but never in the middle of
/// a checkpoint: it waits for a save under way to finish. Once interrupted, a process stays
/// interrupted (`kiln compare` stops between its runs too) and exits with status 130.
pub mod interrupt {
    use std::sync::{Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    /// Signals closer together than this are the same interrupt.
    pub const SAME_INTERRUPT: Duration = Duration::from_secs(2);
    static FIRST: Mutex<Option<Instant>> = Mutex::new(None);
    /// Held while a checkpoint is written.
    static SAVING: Mutex<()> = Mutex::new(());

    fn lock<T>(m: &'static Mutex<T>) -> MutexGuard<'static, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Installs the handler (once per process).
    pub fn install() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let _ = ctrlc::set_handler(on_signal);
        });
    }

    fn on_signal() {
        let now = Instant::now();
        let mut first = lock(&FIRST);
        match *first {
            None => {
                *first = Some(now);
                eprintln!(
                    "\ninterrupt: finishing this step, saving a checkpoint, then stopping (a second interrupt, 2 s \
                     or more from now, quits without saving this step)"
                );
            }
            Some(t) if now.duration_since(t) < SAME_INTERRUPT => {}
            Some(_) => {
                drop(first);
                let _saving = match SAVING.try_lock() {
                    Ok(g) => g,
                    Err(_) => {
                        eprintln!("interrupted again: finishing the checkpoint being written, then exiting");
                        lock(&SAVING)
                    }
                };
                eprintln!(
                    "interrupted again: exiting now without saving this step; checkpoints already written are intact"
                );
                std::process::exit(130);
            }
        }
    }

    /// Whether this process has been interrupted.
    pub fn requested() -> bool {
        lock(&FIRST).is_some()
    }

    /// Held while a checkpoint is written, so that a second interrupt waits for it.
    pub fn saving() -> MutexGuard<'static, ()> {
        lock(&SAVING)
    }
}

/// The dropout seed of one micro-batch: a function of the run seed and the position in the run,
/// so a resumed run draws the same masks.
fn dropout_seed(seed: u64, step: usize, micro: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((step as u64) << 16) ^ micro as u64
}

/// Runs optimizer steps from `spec.start_step` to `train.max_steps` (or until Ctrl-C or
/// `opts.stop_after`), saving, evaluating and logging as configured.
pub fn run(model: &mut Model, opt: &mut dyn Optimizer, task: &mut dyn Task, spec: &Spec) -> Result<Summary> {
    let t = spec.train;
    interrupt::install();
    let bar = crate::progress::Progress::new(
        spec.opts.progress,
        "training",
        "steps",
        t.max_steps as u64,
        "{bar:30.cyan/blue} {pos}/{len} steps | {msg} | {elapsed_precise} elapsed, {eta} left",
    );
    bar.set_position(spec.start_step as u64);
    let metrics_path = spec.run_dir.join("metrics.jsonl");
    let tokens_per_step = spec.tokens_per_micro_batch * t.grad_accum;
    let clock = Instant::now();
    let mut rates = Vec::new();
    let mut summary = Summary {
        run_dir: spec.run_dir.to_path_buf(),
        steps: spec.start_step,
        last_loss: None,
        val_loss: None,
        val_step: None,
        tokens_per_s: 0.0,
        interrupted: false,
        checkpoint: spec.latest.clone(),
        device_memory: None,
    };
    // The device's high-water mark starts at what the model (and restored state) holds now.
    let backend = crate::backend::backend(model.device())?;
    backend.reset_peak_memory();
    let mut last_saved = spec.latest.as_ref().map(|_| spec.start_step);

    for step in spec.start_step..t.max_steps {
        if interrupt::requested() {
            summary.interrupted = true;
            break;
        }
        let t0 = Instant::now();
        let lr = schedule::lr_at(step, t.max_steps, t.lr, t.min_lr_ratio, t.warmup_steps, &t.schedule);
        let mut grads = Gradients::empty();
        let mut loss_sum = 0.0;
        for micro in 0..t.grad_accum {
            let (ids, tgt) = task.next_batch()?;
            let mut tape = Tape::new();
            let mode = Mode::Train { seed: dropout_seed(t.seed, step, micro) };
            let loss = model.forward(&mut tape, &ids, Some(&tgt), mode)?.loss.expect("targets given");
            loss_sum += loss.item()? as f64;
            grads.accumulate(tape.backward(&loss)?)?;
        }
        if t.grad_accum > 1 {
            grads.scale(1.0 / t.grad_accum as f32)?;
        }
        let loss = loss_sum / t.grad_accum as f64;
        let norm = if t.grad_clip > 0.0 { grads.clip_global_norm(t.grad_clip)? } else { grads.global_norm()? };
        if !loss.is_finite() || !norm.is_finite() {
            bar.abandon();
            let what = if loss.is_finite() {
                format!("the gradient norm became {norm}")
            } else {
                format!("the loss became {loss}")
            };
            let kept = match &summary.checkpoint {
                Some(c) => format!("the last good checkpoint, {}, is intact", c.display()),
                None => "no checkpoint had been written yet".to_string(),
            };
            return Err(Error::Input(format!(
                "training stopped at step {}: {what}; nothing was saved from this step and {kept}. Lower train.lr, raise train.warmup_steps or set train.grad_clip.",
                step + 1
            )));
        }
        opt.step_all(&mut model.stores_mut(), &grads, lr)?;
        drop(grads);
        let done = step + 1;
        let rate = tokens_per_step as f64 / t0.elapsed().as_secs_f64();
        rates.push(rate);
        summary.steps = done;
        summary.last_loss = Some(loss);
        bar.set_message(format!("loss {loss:.4} | lr {lr:.2e} | {rate:.0} tok/s"));
        bar.set_position(done as u64);
        let elapsed = spec.elapsed0 + clock.elapsed().as_secs_f64();
        let mut records = vec![];
        if done % t.log_every.max(1) == 0 || done == t.max_steps || done == spec.start_step + 1 {
            records.push(Record {
                loss: Some(loss),
                lr: Some(lr),
                grad_norm: Some(norm),
                tokens_per_s: Some(rate),
                ..blank(done, elapsed)
            });
        }
        let eval_now = (t.eval_every > 0 && done % t.eval_every == 0) || done == t.max_steps;
        if eval_now {
            if let Some(v) = task.evaluate(model)? {
                summary.val_loss = Some(v);
                summary.val_step = Some(done);
                say(
                    spec.opts.quiet,
                    &bar,
                    format!("step {done:>6}: train loss {loss:.4}, validation loss {v:.4} (perplexity {:.2})", v.exp()),
                );
                records.push(Record { val_loss: Some(v), val_ppl: Some(v.exp()), ..blank(done, elapsed) });
            }
        }
        metrics::append(&metrics_path, &records)?;
        if eval_now {
            metrics::plot(&metrics::read(&metrics_path)?, &spec.run_dir.join("loss.svg"), spec.title)?;
        }
        let stop = interrupt::requested() || spec.opts.stop_after == Some(done);
        if (t.save_every > 0 && done % t.save_every == 0) || done == t.max_steps || stop {
            let _saving = interrupt::saving();
            summary.checkpoint = Some(task.save(model, opt, done, elapsed)?);
            last_saved = Some(done);
        }
        if stop {
            summary.interrupted = interrupt::requested();
            break;
        }
    }
    if summary.interrupted {
        bar.abandon();
    } else {
        bar.finish();
    }
    if last_saved != Some(summary.steps) && summary.steps > spec.start_step {
        let elapsed = spec.elapsed0 + clock.elapsed().as_secs_f64();
        let _saving = interrupt::saving();
        summary.checkpoint = Some(task.save(model, opt, summary.steps, elapsed)?);
    }
    metrics::plot(&metrics::read(&metrics_path)?, &spec.run_dir.join("loss.svg"), spec.title)?;
    if !rates.is_empty() {
        rates.sort_by(|a, b| a.total_cmp(b));
        summary.tokens_per_s = rates[rates.len() / 2];
    }
    if let Some((_, peak)) = backend.memory_use() {
        let on_device =
            |t: &Tensor| if t.device() == model.device() { t.numel() * t.dtype().size_in_bytes() } else { 0 };
        let weights = model.stores().iter().flat_map(|s| s.iter()).map(|p| on_device(&p.tensor)).sum::<usize>()
            + model.nf4_device_bytes();
        summary.device_memory = Some(super::DeviceMemory { peak, weights, optimizer: opt.state_bytes() });
        if !spec.opts.quiet {
            println!("  {}", summary.device_memory.as_ref().map(|m| m.describe()).unwrap_or_default());
        }
    }
    Ok(summary)
}

/// Prints above the progress bar, or plainly when there is none.
fn say(quiet: bool, bar: &crate::progress::Progress, msg: String) {
    if !quiet {
        bar.println(&msg);
    }
}

fn blank(step: usize, elapsed_s: f64) -> Record {
    Record { step, loss: None, lr: None, grad_norm: None, tokens_per_s: None, val_loss: None, val_ppl: None, elapsed_s }
}
