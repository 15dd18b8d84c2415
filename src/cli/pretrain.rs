//! `kiln pretrain`: train a GPT-2 or Llama from random initialisation (or a checkpoint) on a corpus.

use crate::train::{self, Options, RunConfig, Start};
use crate::{Error, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct PretrainArgs {
    /// Run directory: checkpoints, metrics.jsonl, loss.svg, tokenizer and token files go here.
    #[arg(long)]
    pub out: PathBuf,
    /// A TOML run config ([model], [data], [train] sections; every key optional).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model size: tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl (GPT-2), llama-tiny, smollm2-135m,
    /// smollm2-360m (Llama); overrides model.preset.
    #[arg(long)]
    pub preset: Option<String>,
    /// Training text: files, globs, directories, .jsonl with a "text" field, .parquet with a "text"
    /// column, or a Hub dataset id as id[:subset[/split]] (default: the built-in corpus).
    #[arg(long, num_args = 1..)]
    pub data: Vec<String>,
    /// Held-out text for validation (default: the last data.val_fraction of the training tokens).
    #[arg(long, num_args = 1..)]
    pub val_data: Vec<String>,
    /// A tokenizer.json, or a directory with GPT-2's vocab.json + merges.txt (default: train one).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Peak learning rate (sets train.lr).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Total optimizer steps of the run (sets train.max_steps; with --resume, where it now ends).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Any config key: --set train.lr=3e-4 --set model.n_layer=6 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue the run in --out from its latest checkpoint.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Replace the run in --out (deletes its checkpoints, metrics and token files).
    #[arg(long)]
    pub overwrite: bool,
    /// Stop after this many steps in total, saving a checkpoint, as Ctrl-C would.
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Where to train: auto (the GPU if there is one, else the CPU), cpu, cuda (cuda:N), or emu (the
    /// emulated GPU: kiln's CUDA kernels on the CPU, checked); cuda and emu need `--features cuda`.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl PretrainArgs {
    /// The run config: the file (or, on --resume without --config, the run's own run.toml),
    /// then the flags, then --set overrides.
    pub fn run_config(&self) -> Result<RunConfig> {
        let stored = self.out.join("run.toml");
        let file = match (&self.config, self.resume) {
            (Some(c), _) => Some(c.clone()),
            (None, true) if stored.exists() => Some(stored),
            _ => None,
        };
        let mut overrides = vec![];
        if let Some(p) = &self.preset {
            overrides.push(format!("model.preset=\"{p}\""));
        }
        if !self.data.is_empty() {
            overrides.push(format!("data.train={}", toml_list(&self.data)));
        }
        if !self.val_data.is_empty() {
            overrides.push(format!("data.val={}", toml_list(&self.val_data)));
        }
        if let Some(t) = &self.tokenizer {
            overrides.push(format!("data.tokenizer={}", toml::Value::String(t.display().to_string())));
        }
        if let Some(n) = self.max_steps {
            overrides.push(format!("train.max_steps={n}"));
        }
        if let Some(lr) = self.lr {
            overrides.push(format!("train.lr={lr:?}"));
        }
        overrides.extend(self.set.iter().cloned());
        RunConfig::load(file.as_deref(), &overrides)
    }
}

fn toml_list(xs: &[String]) -> String {
    toml::Value::Array(xs.iter().map(|s| toml::Value::String(s.clone())).collect()).to_string()
}

pub fn run(args: PretrainArgs) -> Result<()> {
    let device = args.device.parse::<crate::Device>()?;
    device.ensure_available()?;
    let cfg = args.run_config()?;
    let start = match (args.resume, args.overwrite) {
        (true, _) => Start::Resume,
        (_, true) => Start::Overwrite,
        _ => Start::Fresh,
    };
    let opts = Options { start, progress: true, stop_after: args.stop_after, quiet: false, device };
    let s = train::pretrain(&cfg, &args.out, &opts)?;
    println!("{}; metrics {d}/metrics.jsonl; plot {d}/loss.svg", s.describe(), d = args.out.display());
    if s.steps == 0 {
        return Err(Error::Input(
            "no step was run: train.max_steps is at or below the checkpoint's step; raise it with --max-steps".into(),
        ));
    }
    Ok(())
}
