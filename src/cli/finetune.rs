//! `kiln finetune`: supervised fine-tuning of a Hugging Face checkpoint on labelled examples.

use crate::train::{self, Options, RunConfig, Start};
use crate::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct FinetuneArgs {
    /// The pre-trained base: a Hugging Face checkpoint directory (kiln's or transformers'), or a Hub id.
    #[arg(long)]
    pub model: PathBuf,
    /// Examples: JSON lines or a JSON array, as prompt/completion, Alpaca or chat messages.
    #[arg(long, num_args = 1..)]
    pub data: Vec<String>,
    /// Held-out examples (default: data.val_fraction of --data).
    #[arg(long, num_args = 1..)]
    pub val_data: Vec<String>,
    /// Run directory for checkpoints, metrics.jsonl and loss.svg.
    #[arg(long)]
    pub out: PathBuf,
    /// full, lora or qlora.
    #[arg(long, default_value = "full")]
    pub method: String,
    /// A TOML run config (the [finetune] section holds method, optimizer, format, chat, pack).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The examples' format: auto, prompt_completion, alpaca or chat.
    #[arg(long)]
    pub format: Option<String>,
    /// How chat messages become text: kiln (<|user|> headers) or chatml (<|im_start|>role ...
    /// <|im_end|>, as SmolLM2-Instruct's tokenizer has it); the config's [finetune.chat] sets
    /// each piece.
    #[arg(long)]
    pub chat: Option<String>,
    /// Concatenate short examples into full rows.
    #[arg(long)]
    pub pack: bool,
    /// Tokenizer, when the base model's directory has no tokenizer.json.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Peak learning rate (sets train.lr).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Total optimizer steps of the run (sets train.max_steps; with --resume, where it now ends).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// adamw (fp32 moments) or adamw8bit (bitsandbytes' blockwise 8-bit moments; the default
    /// for --method qlora).
    #[arg(long)]
    pub optimizer: Option<String>,
    /// LoRA rank (--method lora or qlora).
    #[arg(long)]
    pub r: Option<usize>,
    /// LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with --rslora).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Dropout on the LoRA path's input.
    #[arg(long)]
    pub lora_dropout: Option<f32>,
    /// Modules LoRA adapts, comma separated (default: GPT-2's c_attn, c_proj, c_fc; a Llama's q_proj,
    /// k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; also the embedding and lm_head).
    #[arg(long)]
    pub targets: Option<String>,
    /// rsLoRA scaling, alpha / sqrt(r).
    #[arg(long)]
    pub rslora: bool,
    /// Recompute each block's activations in backward instead of keeping them.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Any config key: --set train.lr=5e-5 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue the run in --out from its latest checkpoint (optimizer, schedule and data position).
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Replace the run in --out (deletes its checkpoints and metrics, nothing else).
    #[arg(long)]
    pub overwrite: bool,
    /// Where to train: auto (the GPU if there is one, else the CPU), cpu, cuda (cuda:N), or emu (the
    /// emulated GPU: kiln's CUDA kernels on the CPU, checked); cuda and emu need `--features cuda`.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn list(xs: &[String]) -> String {
    toml::Value::Array(xs.iter().map(|s| toml::Value::String(s.clone())).collect()).to_string()
}

pub fn run(args: FinetuneArgs) -> Result<()> {
    let device = args.device.parse::<crate::Device>()?;
    device.ensure_available()?;
    let stored = args.out.join("run.toml");
    let file = args.config.clone().or_else(|| (args.resume && stored.exists()).then_some(stored));
    // fine-tuning defaults: a small learning rate for full fine-tuning; adapters start from zero
    // and carry few parameters, so PEFT users run them an order of magnitude higher (1e-3 here;
    // the demo's tiny model learns its task fastest at 3e-3, as `kiln compare` shows); a short
    // warm-up; the model's context
    let lr = if args.method == "full" { "5e-5" } else { "1e-3" };
    let mut o = vec![
        format!("train.lr={lr}"),
        "train.warmup_steps=10".into(),
        "train.seq_len=1024".into(),
        "train.max_steps=200".into(),
    ];
    if file.is_some() {
        o.clear();
    }
    let model = crate::io::hub::local_model(&args.model)?;
    o.push(format!("model.init_from={}", quoted(&model.display().to_string())));
    o.push(format!("finetune.method={}", quoted(&args.method)));
    if !args.data.is_empty() {
        o.push(format!("data.train={}", list(&args.data)));
    }
    if !args.val_data.is_empty() {
        o.push(format!("data.val={}", list(&args.val_data)));
    }
    if let Some(f) = &args.format {
        o.push(format!("finetune.format={}", quoted(f)));
    }
    if let Some(name) = &args.chat {
        let t = crate::data::sft::ChatTemplate::named(name)?;
        let table = toml::Value::try_from(&t).map_err(|e| crate::Error::Input(format!("chat template: {e}")))?;
        o.push(format!("finetune.chat={table}"));
    }
    if args.pack {
        o.push("finetune.pack=true".into());
    }
    if let Some(opt) = &args.optimizer {
        o.push(format!("finetune.optimizer={}", quoted(opt)));
    }
    if let Some(r) = args.r {
        o.push(format!("finetune.lora_r={r}"));
    }
    if let Some(a) = args.alpha {
        o.push(format!("finetune.lora_alpha={a:?}"));
    }
    if let Some(d) = args.lora_dropout {
        o.push(format!("finetune.lora_dropout={d:?}"));
    }
    if let Some(t) = &args.targets {
        o.push(format!("finetune.lora_targets={}", list(&crate::nn::lora::LoraConfig::parse_targets(t))));
    }
    if args.rslora {
        o.push("finetune.rslora=true".into());
    }
    if args.gradient_checkpointing {
        o.push("finetune.gradient_checkpointing=true".into());
    }
    if let Some(t) = &args.tokenizer {
        o.push(format!("data.tokenizer={}", quoted(&t.display().to_string())));
    }
    if let Some(n) = args.max_steps {
        o.push(format!("train.max_steps={n}"));
    }
    if let Some(lr) = args.lr {
        o.push(format!("train.lr={lr:?}"));
    }
    o.extend(args.set.iter().cloned());
    let cfg = RunConfig::load(file.as_deref(), &o)?;
    let start = match (args.resume, args.overwrite) {
        (true, _) => Start::Resume,
        (_, true) => Start::Overwrite,
        _ => Start::Fresh,
    };
    println!(
        "kiln finetune: {} fine-tuning of {} on {}, {} steps, lr {:.1e}, run directory {}",
        cfg.finetune.method,
        args.model.display(),
        cfg.data.train.join(", "),
        cfg.train.max_steps,
        cfg.train.lr,
        args.out.display()
    );
    let opts = Options { start, progress: true, stop_after: None, quiet: false, device };
    let s = train::finetune::finetune(&cfg, &args.out, &opts)?;
    println!("{}; metrics {d}/metrics.jsonl; plot {d}/loss.svg", s.describe(), d = args.out.display());
    Ok(())
}
