//! `kiln memory`: the memory bill of fine-tuning each preset (or a checkpoint's config) by
//! each method, before anything is built or loaded: which fits a card of a given size.

use crate::model::{gpt2, llama, Config};
use crate::nn::lora::LoraConfig;
use crate::train::memory::{Bill, Counts};
use crate::{Error, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct MemoryArgs {
    /// Presets to bill, comma separated (default: every one but the tiny ones); or use --model.
    #[arg(long)]
    pub preset: Option<String>,
    /// A checkpoint directory whose config.json to bill instead of presets.
    #[arg(long, conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// Rows per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per row (at most the model's context).
    #[arg(long, default_value_t = 1024)]
    pub seq: usize,
    /// cuda (bf16 activations and weight copies, what a GPU run holds) or cpu.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Bill activations without gradient checkpointing.
    #[arg(long)]
    pub no_checkpointing: bool,
    /// LoRA rank of the lora and qlora columns.
    #[arg(long, default_value_t = 8)]
    pub lora_r: usize,
    /// LoRA target modules of the lora and qlora columns, comma separated (all-linear: every
    /// weight matrix of the blocks).
    #[arg(long, default_value = "all-linear")]
    pub lora_targets: String,
    /// The card size the last column checks against, in GB (1e9 bytes).
    #[arg(long, default_value_t = 24.0)]
    pub budget_gb: f64,
    /// Also print every line of each bill.
    #[arg(long)]
    pub itemise: bool,
}

/// (column, method, optimizer): full fine-tuning and LoRA with AdamW, QLoRA with 8-bit AdamW.
const COLUMNS: [(&str, &str, &str); 3] = [
    ("full (AdamW)", "full", "adamw"),
    ("LoRA (AdamW)", "lora", "adamw"),
    ("QLoRA (8-bit AdamW)", "qlora", "adamw8bit"),
];

pub fn run(args: MemoryArgs) -> Result<()> {
    let gpu = match args.device.as_str() {
        "cuda" | "gpu" => true,
        "cpu" => false,
        other => return Err(Error::unknown("device for kiln memory", other, "cuda or cpu")),
    };
    let configs: Vec<(String, Config)> = match (&args.model, &args.preset) {
        (Some(dir), _) => {
            let local = crate::io::hub::local_model(dir)?;
            vec![(dir.display().to_string(), Config::from_json_file(&local.join("config.json"))?)]
        }
        (None, Some(list)) => {
            list.split(',').map(|p| Ok((p.trim().to_string(), Config::preset(p.trim())?))).collect::<Result<_>>()?
        }
        (None, None) => gpt2::PRESETS
            .iter()
            .chain(llama::PRESETS)
            .filter(|&&p| !p.contains("tiny"))
            .map(|&p| Ok((p.to_string(), Config::preset(p)?)))
            .collect::<Result<_>>()?,
    };
    let targets: Vec<&str> = args.lora_targets.split(',').collect();
    let lora = LoraConfig::new(args.lora_r, 2.0 * args.lora_r as f64, 0.0, &targets, false)?;
    let ckpt = !args.no_checkpointing;
    println!(
        "kiln memory: the bill of one training step, {} rows x {} tokens, {}, {}; LoRA r={} on {}",
        args.batch,
        args.seq,
        if gpu { "on the GPU (bf16 activations and weight copies)" } else { "on the CPU (f32)" },
        if ckpt { "gradient checkpointing" } else { "no checkpointing" },
        args.lora_r,
        args.lora_targets
    );
    println!("{:<14} {:>11} {:>20} {:>20} {:>20}", "model", "parameters", COLUMNS[0].0, COLUMNS[1].0, COLUMNS[2].0);
    let gb = |b: f64| b / 1e9;
    for (name, config) in &configs {
        let seq = args.seq.min(config.n_positions());
        let (mut cells, mut bills) = (Vec::new(), Vec::new());
        for (_, method, optimizer) in COLUMNS {
            let counts = Counts::planned(config, method, &lora)?;
            let bill = Bill::new(config, counts, (args.batch, seq), optimizer, gpu, ckpt);
            let fits = if bill.total() <= args.budget_gb * 1e9 { "fits" } else { "over" };
            cells.push(format!("{:.2} GB {fits}", gb(bill.total())));
            bills.push(bill);
        }
        println!(
            "{name:<14} {:>10.0}M {:>20} {:>20} {:>20}",
            config.num_params() as f64 / 1e6,
            cells[0],
            cells[1],
            cells[2]
        );
        if args.itemise {
            for ((column, ..), bill) in COLUMNS.iter().zip(&bills) {
                println!("  {name}, {column}:");
                print!("{}", bill.table(args.batch, seq));
            }
        }
    }
    println!(
        "fits / over: within {} GB or not. kiln finetune prints the itemised bill before it trains and the measured \
         peak after.",
        args.budget_gb
    );
    Ok(())
}
