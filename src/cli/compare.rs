//! `kiln compare`: pre-train then fine-tune versus training on the task alone, and full versus
//! LoRA versus QLoRA fine-tuning, on the built-in world, for one model family or both (GPT-2 and
//! Llama side by side). One table, one plot per family.

use crate::train::compare::{compare, render, CompareOptions};
use crate::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct CompareArgs {
    /// Directory for the runs, compare.md, compare.json and compare.svg.
    #[arg(long, default_value = "runs/compare")]
    pub out: PathBuf,
    /// Model families, comma separated: gpt2 (the tiny GPT-2), llama (a tiny Llama), or both.
    #[arg(long, default_value = "gpt2")]
    pub models: String,
    /// Pre-training steps of each tiny preset on the built-in corpus.
    #[arg(long, default_value_t = 1200)]
    pub pretrain_steps: usize,
    /// Reuse a pre-trained checkpoint (with its tokenizer.json), e.g. the demo's.
    #[arg(long)]
    pub pretrained: Option<PathBuf>,
    /// Fine-tuning steps of each method.
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    /// The validation loss whose first crossing the table reports.
    #[arg(long, default_value_t = 1.0)]
    pub target_loss: f64,
    /// Methods, comma separated: scratch, full, lora, qlora.
    #[arg(long, default_value = "scratch,full,lora,qlora")]
    pub methods: String,
    /// Where every run trains: cpu, cuda, emu, or auto (the GPU when there is one).
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn run(args: CompareArgs) -> Result<()> {
    let device = args.device.parse::<crate::Device>()?;
    device.ensure_available()?;
    let families: Vec<&str> = args.models.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let presets = families
        .iter()
        .map(|f| match *f {
            "gpt2" => Ok("tiny"),
            "llama" => Ok("llama-tiny"),
            other => Err(crate::Error::unknown("model family", other, "gpt2, llama")),
        })
        .collect::<Result<Vec<_>>>()?;
    if presets.is_empty() || (args.pretrained.is_some() && presets.len() > 1) {
        return Err(crate::Error::Input(
            "--models names one family or both (gpt2,llama); with --pretrained, the checkpoint is the one model".into(),
        ));
    }
    let mut all = Vec::new();
    for (family, preset) in families.iter().zip(&presets) {
        let opts = CompareOptions {
            preset: preset.to_string(),
            device,
            pretrain_steps: args.pretrain_steps,
            finetune_steps: args.steps,
            target_loss: args.target_loss,
            methods: args.methods.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
            pretrained: args.pretrained.clone(),
            progress: true,
            quiet: false,
        };
        let dir = if presets.len() > 1 { args.out.join(family) } else { args.out.clone() };
        for mut row in compare(&dir, &opts)? {
            row.name = format!("{family} {}", row.name);
            all.push(row);
        }
    }
    if presets.len() > 1 {
        let table = render(&all, args.target_loss);
        crate::io::write_atomic(&args.out.join("compare.md"), |w| std::io::Write::write_all(w, table.as_bytes()))?;
        println!("\nboth families:\n{table}\ntable {}/compare.md", args.out.display());
    }
    Ok(())
}
