//! The `kiln` command line.

mod bench;
mod compare;
mod demo;
mod download;
mod finetune;
mod generate;
mod memory;
mod pretrain;
mod quantize;
mod tokenizer;

use crate::data::batch::Batch;
use crate::io::{checkpoint, peft};
use crate::model::{Config, Mode, Model};
use crate::{DType, Device, Error, Result, Tape, Tensor};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Train, study and benchmark GPT-2 and Llama language models: a from-scratch tensor engine in Rust"
)]
struct Cli {
    /// Worker threads for the CPU backend (default: all cores, or RAYON_NUM_THREADS).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a randomly initialised GPT-2 or Llama as a Hugging Face checkpoint directory.
    Init {
        /// Model: tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl (GPT-2), or llama-tiny, smollm2-135m,
        /// smollm2-360m (Llama).
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Output directory (created; an existing checkpoint there is refused unless --overwrite).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the random initialisation (the same seed gives the same weights).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Storage dtype of the weights: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Replace a checkpoint already in --out.
        #[arg(long)]
        overwrite: bool,
    },
    /// Print the mean next-token loss of a batch file under a model.
    Eval {
        /// Hugging Face checkpoint directory (config.json + model.safetensors), or a Hub id (fetched into
        /// the Hugging Face cache unless already there).
        #[arg(long)]
        model: PathBuf,
        /// safetensors with input_ids [B, T] (I64 or I32) and optional labels (-100 = masked).
        #[arg(long)]
        batch: PathBuf,
        /// Where to run: auto (the GPU if there is one, else the CPU), cpu, cuda (cuda:N), or emu (the
        /// emulated GPU: kiln's CUDA kernels on the CPU, checked); cuda and emu need `--features cuda`.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Write the loss and every parameter's gradient (Hugging Face names) to a safetensors file;
    /// with --adapter, the gradients of the adapter's tensors (PEFT names) instead.
    Grads {
        /// Hugging Face checkpoint directory (config.json + model.safetensors), or a Hub id (fetched into
        /// the Hugging Face cache unless already there).
        #[arg(long)]
        model: PathBuf,
        /// safetensors with input_ids [B, T] (I64 or I32) and optional labels (-100 = masked).
        #[arg(long)]
        batch: PathBuf,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) to apply
        /// to the frozen model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Where to run: auto (the GPU if there is one, else the CPU), cpu, cuda (cuda:N), or emu (the
        /// emulated GPU: kiln's CUDA kernels on the CPU, checked); cuda and emu need `--features cuda`.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Fold a LoRA adapter into its base model and write the result as a plain checkpoint.
    Merge {
        /// The base model's Hugging Face checkpoint directory.
        #[arg(long)]
        model: PathBuf,
        /// A PEFT LoRA adapter directory made for that model.
        #[arg(long)]
        adapter: PathBuf,
        /// Output checkpoint directory (created; an existing checkpoint there is refused unless
        /// --overwrite).
        #[arg(long)]
        out: PathBuf,
        /// Storage dtype of the merged weights: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Replace a checkpoint already in --out.
        #[arg(long)]
        overwrite: bool,
    },
    /// The main job: pre-train a tiny GPT-2 (or Llama) on the built-in corpus and show what it learned.
    Demo(demo::DemoArgs),
    /// Pre-train-then-fine-tune vs from scratch, and full vs LoRA vs QLoRA, on the built-in world.
    Compare(compare::CompareArgs),
    /// Supervised fine-tuning of a checkpoint on labelled examples (prompt/completion, Alpaca, chat).
    Finetune(finetune::FinetuneArgs),
    /// Pre-train a GPT-2 or Llama on a corpus (the built-in one by default), with checkpoints and resume.
    Pretrain(pretrain::PretrainArgs),
    /// Generate text (or token ids) from a checkpoint, streamed as it comes.
    Generate(generate::GenerateArgs),
    /// Quantize every 2-D tensor of a safetensors file to NF4, as bitsandbytes stores it.
    Quantize(quantize::QuantizeArgs),
    /// The memory bill of fine-tuning each GPT-2 and SmolLM2 size (full, LoRA, QLoRA) on a GPU or the CPU.
    Memory(memory::MemoryArgs),
    /// Fetch a model or a dataset from the Hugging Face Hub into the standard cache (HF_HOME).
    Download(download::DownloadArgs),
    /// Tokenizers: train a byte-level BPE on your text.
    Tokenizer {
        #[command(subcommand)]
        what: tokenizer::TokenizerCommand,
    },
    /// Benchmarks, reported against a ceiling measured in the same run.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
}

/// Runs the command line and returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run(cli) {
        // An interrupted run saved what it had and stopped early: the status says so, as shells expect.
        Ok(()) if crate::train::steps::interrupt::requested() => 130,
        Ok(()) => 0,
        Err(e) => {
            // one line, whatever the message: the problem and the fix come first in every error
            let msg = e.to_string();
            let line: Vec<&str> = msg.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            eprintln!("error: {}", line.join(" "));
            1
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| Error::Input(format!("cannot start {n} threads: {e}")))?;
    }
    match cli.command {
        Command::Init { preset, out, seed, dtype, overwrite } => {
            init(&preset, &out, seed, DType::parse(&dtype)?, overwrite)
        }
        Command::Eval { model, batch, device } => eval(&model, &batch, device.parse()?),
        Command::Grads { model, batch, out, adapter, device } => {
            grads(&model, &batch, &out, adapter.as_deref(), device.parse()?)
        }
        Command::Merge { model, adapter, out, dtype, overwrite } => {
            merge(&model, &adapter, &out, DType::parse(&dtype)?, overwrite)
        }
        Command::Bench { what } => bench::run(what),
        Command::Pretrain(args) => pretrain::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Finetune(args) => finetune::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Memory(args) => memory::run(args),
        Command::Tokenizer { what } => tokenizer::run(what),
        Command::Download(args) => download::run(args),
        Command::Generate(args) => generate::run(args),
    }
}

fn init(preset: &str, out: &Path, seed: u64, dtype: DType, overwrite: bool) -> Result<()> {
    let config = Config::preset(preset)?;
    if out.join("model.safetensors").exists() && !overwrite {
        return Err(Error::Input(format!(
            "{} already holds a checkpoint; pass --overwrite to replace it",
            out.display()
        )));
    }
    let model = Model::new_random(config, seed)?;
    checkpoint::save_model(&model, out, dtype)?;
    println!(
        "wrote a random {preset} {} ({} parameters, {dtype:?}) to {}",
        model.config.family(),
        model.params.numel(),
        out.display()
    );
    Ok(())
}

/// Loads the model (with `adapter` on it) and batch and runs the forward pass on `tape`.
fn forward(
    model_dir: &Path,
    adapter: Option<&Path>,
    batch_path: &Path,
    device: Device,
    tape: &mut Tape,
) -> Result<(Model, Batch, Tensor)> {
    device.ensure_available()?;
    let model_dir = &crate::io::hub::local_model(model_dir)?;
    let mut model = checkpoint::load_model(model_dir)?;
    if let Some(dir) = adapter {
        peft::load_adapter(&mut model, dir)?;
    }
    model.to_device(device)?;
    let batch = Batch::load(batch_path)?;
    batch
        .validate(model.config.vocab_size(), model.config.n_positions())
        .map_err(|e| Error::Input(format!("{}: {e}", batch_path.display())))?;
    let targets = batch.targets()?;
    let out = model.forward(tape, &batch.input_ids, Some(&targets), Mode::Eval)?;
    let loss = out.loss.expect("targets were given");
    Ok((model, batch, loss))
}

fn eval(model_dir: &Path, batch_path: &Path, device: Device) -> Result<()> {
    let (_, batch, loss) = forward(model_dir, None, batch_path, device, &mut Tape::inference())?;
    let (b, t) = batch.dims();
    let loss = loss.item()?;
    println!("loss {loss:.6}  (perplexity {:.3}, batch {b} x {t})", loss.exp());
    Ok(())
}

fn grads(model_dir: &Path, batch_path: &Path, out: &Path, adapter: Option<&Path>, device: Device) -> Result<()> {
    let mut tape = Tape::new();
    let (model, _, loss) = forward(model_dir, adapter, batch_path, device, &mut tape)?;
    let grads = tape.backward(&loss)?;
    let mut tensors = vec![("loss".to_string(), loss.clone())];
    // With an adapter the base is frozen: only the adapter's tensors are trainable.
    let adapter_params = model.lora.iter().flat_map(|l| l.params.iter());
    for p in model.params.iter().chain(adapter_params).filter(|p| p.trainable) {
        let g = grads.get(&p.tensor).cloned().unwrap_or_else(|| Tensor::zeros(p.tensor.dims()));
        tensors.push((p.name.clone(), g));
    }
    crate::io::safetensors::save(out, &tensors, &[("producer", "kiln grads")])?;
    println!("loss {:.6}; wrote {} gradients to {}", loss.item()?, tensors.len() - 1, out.display());
    Ok(())
}

/// Files of a Hugging Face model directory besides the weights and config.json, copied next to a
/// merged checkpoint so that it tokenizes and generates like its base.
const MODEL_SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
];

fn merge(model_dir: &Path, adapter: &Path, out: &Path, dtype: DType, overwrite: bool) -> Result<()> {
    let model_dir = &crate::io::hub::local_model(model_dir)?;
    let same = |a: &Path, b: &Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b);
    if same(model_dir, out) {
        return Err(Error::Input(format!(
            "--out {} is the base model's directory: merging there would replace the base weights; choose \
             another --out",
            out.display()
        )));
    }
    if out.join("model.safetensors").exists() && !overwrite {
        return Err(Error::Input(format!(
            "{} already holds a checkpoint; pass --overwrite to replace it",
            out.display()
        )));
    }
    let mut model = checkpoint::load_model(model_dir)?;
    peft::load_adapter(&mut model, adapter)?;
    let merged = crate::model::lora::merged(&model)?;
    let side: Vec<PathBuf> = MODEL_SIDE_FILES.iter().map(|f| model_dir.join(f)).filter(|p| p.is_file()).collect();
    checkpoint::save_model_with(&merged, out, dtype, &side)?;
    let lora = model.lora.as_ref().expect("the adapter was loaded");
    println!(
        "merged {} ({} adapted layers, {} adapter parameters) into {}; wrote {dtype:?} weights to {}",
        adapter.display(),
        lora.modules().len(),
        lora.params.numel(),
        model_dir.display(),
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every flag of every command says what it does in `kiln help <command>`.
    #[test]
    fn every_flag_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    missing.push(format!("{path} --{}", arg.get_long().unwrap_or(id)));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &path, missing);
            }
        }
        let mut missing = vec![];
        walk(&super::Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "flags without help text:\n{}", missing.join("\n"));
    }
}
