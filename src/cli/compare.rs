//! `kiln compare`: pre-train then fine-tune versus training on the task alone, and full versus
//! LoRA versus QLoRA fine-tuning, on the built-in world. One table, one plot.

use crate::train::compare::{compare, CompareOptions};
use crate::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct CompareArgs {
    /// Directory for the runs, compare.md, compare.json and compare.svg.
    #[arg(long, default_value = "runs/compare")]
    pub out: PathBuf,
    /// Pre-training steps of the tiny preset on the built-in corpus.
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
    let opts = CompareOptions {
        device,
        pretrain_steps: args.pretrain_steps,
        finetune_steps: args.steps,
        target_loss: args.target_loss,
        methods: args.methods.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        pretrained: args.pretrained,
        progress: true,
        quiet: false,
    };
    compare(&args.out, &opts).map(|_| ())
}
