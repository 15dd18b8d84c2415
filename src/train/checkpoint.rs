//! Training checkpoints: `checkpoints/step-NNNNNNNN/` holds a Hugging Face checkpoint (f32, so a
//! resume is exact) with its tokenizer, the AdamW moments (`optimizer.safetensors`) and
//! `trainer_state.json` (step, the data position as its task records it, elapsed time). A checkpoint is written into a
//! hidden temporary directory and renamed into place; only then are older ones pruned.

use crate::data::tokenizer::Tokenizer;
use crate::io::checkpoint::{load_all, load_model, save_model};
use crate::model::Model;
use crate::optim::Optimizer;
use crate::{DType, Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where a run stands, beyond its weights and optimizer moments.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Where the data stands (pre-training: the window sampler), as the task serialises it.
    pub data: serde_json::Value,
    pub elapsed_s: f64,
}

/// A checkpoint read back.
pub struct Loaded {
    pub model: Model,
    pub data: serde_json::Value,
    pub step: usize,
    pub elapsed_s: f64,
}

fn checkpoints(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let dir = run_dir.join("checkpoints");
    if !dir.exists() {
        return Ok(vec![]);
    }
    let mut out = vec![];
    for e in std::fs::read_dir(&dir).map_err(|e| Error::read(&dir, e))? {
        let e = e.map_err(|e| Error::read(&dir, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(step) = name.strip_prefix("step-").and_then(|s| s.parse::<usize>().ok()) {
            if e.path().join("trainer_state.json").exists() {
                out.push((step, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint of a run, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(checkpoints(run_dir)?.pop().map(|(_, p)| p))
}

/// The checkpoint `--resume` continues from, said aloud ("resuming from step-00000141, 141/300
/// steps done"). With none (the run stopped before its first save), the run starts again from
/// step 1 and metrics.jsonl is emptied to match, so it never holds steps no checkpoint has.
/// Temporary directories left by a save that was killed are removed.
pub fn resume_point(run_dir: &Path, max_steps: usize, quiet: bool) -> Result<Option<PathBuf>> {
    let root = run_dir.join("checkpoints");
    if let Ok(entries) = std::fs::read_dir(&root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let latest = checkpoints(run_dir)?.pop();
    let metrics = run_dir.join("metrics.jsonl");
    match &latest {
        Some((step, dir)) => {
            super::metrics::truncate_after(&metrics, *step)?;
            if !quiet {
                let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                println!("resuming from {name}, {step}/{max_steps} steps done");
            }
        }
        None => {
            let had = super::metrics::read(&metrics)?.iter().map(|r| r.step).max();
            super::metrics::truncate_after(&metrics, 0)?;
            if !quiet {
                let lost =
                    had.map(|s| format!(" (metrics.jsonl held steps up to {s}; cleared to match)")).unwrap_or_default();
                println!(
                    "nothing to resume from: {} has no complete checkpoint yet{lost}; starting from step 1",
                    run_dir.display()
                );
            }
        }
    }
    Ok(latest.map(|(_, p)| p))
}

/// Writes a checkpoint for `state.step` and keeps the newest `keep_last` (at least one).
pub fn save(
    run_dir: &Path,
    model: &Model,
    tok: &Tokenizer,
    opt: &dyn Optimizer,
    state: &TrainerState,
    keep_last: usize,
) -> Result<PathBuf> {
    let root = run_dir.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(|e| Error::write(&root, e))?;
    let name = format!("step-{:08}", state.step);
    let (tmp, dest) = (root.join(format!(".{name}.tmp")), root.join(&name));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::write(&tmp, e))?;
    }
    // With an adapter attached the base is frozen and unchanged: the checkpoint is the adapter.
    if model.lora.is_some() {
        crate::io::peft::save_adapter(model, &tmp)?;
    } else {
        save_model(model, &tmp, DType::F32)?;
    }
    tok.save(&tmp.join("tokenizer.json"))?;
    crate::io::safetensors::save(
        &tmp.join("optimizer.safetensors"),
        &opt.state_tensors()?,
        &[("producer", "kiln AdamW")],
    )?;
    let json = serde_json::to_string_pretty(state).expect("the trainer state serialises");
    crate::io::write_atomic(&tmp.join("trainer_state.json"), |w| std::io::Write::write_all(w, json.as_bytes()))?;
    crate::io::crash_point();
    if dest.exists() {
        discard(&dest)?;
    }
    std::fs::rename(&tmp, &dest).map_err(|e| Error::write(&dest, e))?;
    crate::io::crash_point();
    let all = checkpoints(run_dir)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep_last.max(1))) {
        let _ = discard(old);
    }
    Ok(dest)
}

/// Deletes a checkpoint directory: first renamed to a hidden name (atomic), then removed, so a
/// kill in the middle of the removal never leaves a half-deleted directory that looks like a
/// checkpoint. The next resume removes what is left.
fn discard(dir: &Path) -> Result<()> {
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let hidden = dir.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::rename(dir, &hidden).map_err(|e| Error::write(dir, e))?;
    crate::io::crash_point();
    std::fs::remove_dir_all(&hidden).map_err(|e| Error::write(&hidden, e))?;
    crate::io::crash_point();
    Ok(())
}

/// Reads a checkpoint, restoring the optimizer's moments and step into `opt`. A checkpoint that
/// holds an adapter (adapter_config.json) is applied to `base`, which must then be given.
pub fn load(dir: &Path, base: Option<Model>, opt: &mut dyn Optimizer) -> Result<Loaded> {
    let model = if dir.join("adapter_config.json").exists() {
        let mut base =
            base.ok_or_else(|| Error::checkpoint(dir, "holds an adapter; its base model is needed to resume"))?;
        base.lora = None;
        crate::io::peft::load_adapter(&mut base, dir)?;
        base
    } else {
        load_model(dir)?
    };
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::read(&path, e))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| Error::malformed(&path, "checkpoint file", format!("{e}")))?;
    let moments = load_all(&dir.join("optimizer.safetensors"))?;
    opt.load_state_all(&moments, state.step as u64, &model.stores())?;
    Ok(Loaded { model, data: state.data, step: state.step, elapsed_s: state.elapsed_s })
}
