//! `kiln bench`: timed runs reported as ratios to a ceiling measured in the same process.

use crate::bench;
use crate::io::checkpoint;
use crate::model::{Config, Model};
use crate::{Device, Result};
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Time training steps of a GPT-2 or Llama (forward, backward, fp32 AdamW) against the CPU's sgemm rate.
    TrainStep {
        /// Model size (see `kiln init`); ignored when --model is given.
        #[arg(long, default_value = "gpt2")]
        preset: String,
        /// Time a checkpoint instead of a random preset.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Rows per step.
        #[arg(long, default_value_t = 4)]
        batch: usize,
        /// Tokens per row (at most the model's n_positions).
        #[arg(long, default_value_t = 64)]
        seq: usize,
        /// Timed steps (the median is reported).
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Untimed steps first (allocation and page faults settle).
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Where to run: auto (the GPU if there is one, else the CPU), cpu, cuda (cuda:N), or emu (the
        /// emulated GPU: kiln's CUDA kernels on the CPU, checked); cuda and emu need `--features cuda`.
        #[arg(long, default_value = "auto")]
        device: String,
        /// With --device emu: instead of timing, count one step's kernels on the emulated device
        /// and print the floor under its time on an H200 (each kernel's fewest bytes and its math
        /// at the chip's ceilings). Try --batch 8 --seq 1024 for GPT-2 124M's step.
        #[arg(long)]
        predict: bool,
        /// With --predict: blocks each launch runs (evenly spaced; counters scaled to the whole
        /// grid), 2 to 64; more is slower and closer. 0 runs every block.
        #[arg(long, default_value_t = 8)]
        sample_blocks: u32,
    },
    /// Time every CUDA kernel family against ceilings measured in the same run: cuBLAS for the
    /// matrix kernels, device-to-device copy bandwidth for the memory-bound ones (needs a GPU and
    /// a build with --features cuda).
    Kernels {
        /// cuda (the default): time every kernel on the GPU against its ceiling; emu: run every
        /// kernel on the emulated device and print its memory traffic (sectors moved against the
        /// fewest it could move, bank conflicts, mma and barrier counts).
        #[arg(long, default_value = "cuda")]
        device: String,
    },
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Kernels { device } => crate::backend::cuda::bench::kernels(&device),
        BenchCommand::TrainStep { preset, model, batch, seq, steps, warmup, device, predict, sample_blocks } => {
            let device = device.parse::<Device>()?;
            if predict && !crate::backend::cuda::is_emulated() {
                return Err(crate::Error::Input(
                    "--predict counts a step's kernels on the emulated device: add --device emu".into(),
                ));
            }
            device.ensure_available()?;
            let mut m = match &model {
                Some(dir) => checkpoint::load_model(&crate::io::hub::local_model(dir)?)?,
                None => Model::new_random(Config::preset(&preset)?, 0)?,
            };
            if seq > m.config.n_positions() {
                return Err(crate::Error::SeqTooLong { t: seq, n_positions: m.config.n_positions() });
            }
            let name = model.as_ref().map(|d| d.display().to_string()).unwrap_or(preset);
            if device != Device::Cpu {
                m.to_device(device)?;
                if predict {
                    return predict_train_step(&mut m, &name, batch, seq, sample_blocks);
                }
                return gpu_train_step(&mut m, &name, batch, seq, warmup, steps);
            }
            let threads = rayon::current_num_threads();
            println!(
                "kiln bench train-step: {name}, {} parameters, batch {batch} x seq {seq}, {threads} threads, cpu",
                m.params.numel()
            );
            let (ceiling, each) = bench::sgemm_ceiling();
            for (shape, g) in &each {
                println!("  sgemm {shape:>16}: {g:8.1} GFLOP/s");
            }
            let report = bench::train_step(&mut m, batch, seq, warmup, steps, |i, d| {
                let tag = if i < warmup { "warm-up" } else { "step" };
                eprintln!("  {tag} {:>2}: {:.3} s", i + 1, d.as_secs_f64());
            })?;
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            println!(
                "  step (median of {}): {:.1} ms  = forward {:.1} + backward {:.1} + adamw {:.1} ms",
                report.steps.len(),
                ms(report.median()),
                ms(report.forward),
                ms(report.backward),
                ms(report.optimizer)
            );
            let per_step = report.steps.len() as f64;
            println!("  where a step goes (mean per step):");
            for (op, phase, total, calls) in crate::profile::report() {
                let t = total.as_secs_f64() / per_step;
                let share = 100.0 * t / report.median().as_secs_f64();
                let phase = format!("{phase:?}").to_lowercase();
                println!(
                    "    {op:<12} {phase:<9} {:7.1} ms {share:5.1}%  ({} calls)",
                    t * 1e3,
                    calls / per_step as u64
                );
            }
            println!("  loss: {:.4} -> {:.4}", report.losses[0], report.losses[report.losses.len() - 1]);
            println!("  tokens/s:  {:.1}", report.tokens_per_s());
            println!("  achieved:  {:.1} GFLOP/s ({:.1} GFLOP per step)", report.gflops(), report.flops / 1e9);
            println!("  sgemm:     {ceiling:.1} GFLOP/s (best shape above)");
            println!("  ratio:     {:.0}% of sgemm", 100.0 * report.gflops() / ceiling);
            Ok(())
        }
    }
}

/// `kiln bench train-step --device cuda`: the step's TFLOP/s against cuBLAS' bf16 GEMM rate at
/// 4096^3 measured in the same run.
fn gpu_train_step(m: &mut Model, name: &str, batch: usize, seq: usize, warmup: usize, steps: usize) -> Result<()> {
    println!(
        "kiln bench train-step: {name}, {} parameters, batch {batch} x seq {seq}, {}",
        m.params.numel(),
        crate::backend::cuda::bench::device_name()?
    );
    let report = bench::train_step(m, batch, seq, warmup, steps, |i, d| {
        let tag = if i < warmup { "warm-up" } else { "step" };
        eprintln!("  {tag} {:>2}: {:.1} ms", i + 1, d.as_secs_f64() * 1e3);
    })?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    println!(
        "  step (median of {}): {:.1} ms  = forward {:.1} + backward {:.1} + adamw {:.1} ms",
        report.steps.len(),
        ms(report.median()),
        ms(report.forward),
        ms(report.backward),
        ms(report.optimizer)
    );
    println!("  loss: {:.4} -> {:.4}", report.losses[0], report.losses[report.losses.len() - 1]);
    println!("  tokens/s:  {:.0}", report.tokens_per_s());
    let achieved = report.gflops() / 1e3;
    println!("  achieved:  {achieved:.1} TFLOP/s ({:.1} GFLOP per step)", report.flops / 1e9);
    match crate::backend::cuda::bench::gemm_ceiling_tflops(4096)? {
        Ok(ceiling) => {
            println!("  cuBLAS bf16 GEMM 4096^3: {ceiling:.1} TFLOP/s");
            println!("  ratio:     {:.0}% of cuBLAS GEMM", 100.0 * achieved / ceiling);
        }
        Err(why) => println!("  no cuBLAS ceiling: {why}"),
    }
    Ok(())
}

/// `kiln bench train-step --device emu --predict`: one step's kernels counted on the emulated
/// device (a sample of each launch's blocks), priced at an H200's ceilings.
fn predict_train_step(m: &mut Model, name: &str, batch: usize, seq: usize, blocks: u32) -> Result<()> {
    println!(
        "kiln bench train-step --predict: {name}, {} parameters, batch {batch} x seq {seq}, counted on the emulated \
         device ({blocks} blocks of each launch, counters scaled to the whole grid)",
        m.params.numel()
    );
    let started = std::time::Instant::now();
    let launches = crate::backend::cuda::bench::count_launches(blocks, || {
        bench::train_step(m, batch, seq, 0, 1, |_, _| {}).map(|_| ())
    })?;
    let p = crate::predict::Prediction::new(
        &launches,
        crate::predict::H200,
        batch * seq,
        bench::train_step_flops(&m.config, batch, seq),
    );
    p.print();
    println!("  ({:.0} s on the emulator)", started.elapsed().as_secs_f64());
    Ok(())
}
