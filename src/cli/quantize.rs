//! `kiln quantize`: write a model's weight matrices in bitsandbytes' NF4 format, under the
//! names transformers uses for a 4-bit checkpoint. The work is `quant::quantize_file_nf4`.
//!
//! Every 2-D tensor is quantized in the layout it is stored in (GPT-2's Conv1D weights stay
//! [in, out]; the embeddings are included), so the codes equal bitsandbytes' `quantize_4bit` on
//! that tensor. transformers' 4-bit loading transposes Conv1D weights to Linear's [out, in] and
//! keeps embeddings and lm_head in 16 bits: its blocks differ, which is why this file is a record of
//! the format rather than a checkpoint transformers loads in 4 bits.

use crate::quant::{self, Nf4FileOptions};
use crate::Result;
use std::path::PathBuf;

/// Quantized formats `kiln quantize` writes.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum QuantFormat {
    /// bitsandbytes' 4-bit NormalFloat (QLoRA), bit for bit.
    Nf4,
}

#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// The quantized format.
    #[arg(long, value_enum, default_value = "nf4")]
    pub format: QuantFormat,
    /// A safetensors file, or a checkpoint directory holding model.safetensors (F32, BF16 or F16).
    #[arg(long = "in", value_name = "FILE")]
    pub input: PathBuf,
    /// Output safetensors file (written atomically; must differ from --in).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Store each block's absmax in 8 bits as well (bitsandbytes' bnb_4bit_use_double_quant).
    #[arg(long)]
    pub double_quant: bool,
    /// Also write every dequantized matrix as NAME.dequant, to inspect the rounding.
    #[arg(long)]
    pub dequant: bool,
    /// Elements per absmax: 32, 64, 128, ..., 4096; every matrix's size must be a multiple of it.
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let QuantFormat::Nf4 = args.format;
    let opts = Nf4FileOptions { blocksize: args.blocksize, double_quant: args.double_quant, dequant: args.dequant };
    let t0 = std::time::Instant::now();
    let r = quant::quantize_file_nf4(&args.input, &args.out, &opts)?;
    let size = |b: usize| match b {
        b if b >= 1 << 30 => format!("{:.2} GB", b as f64 / 1e9),
        b if b >= 1 << 20 => format!("{:.1} MB", b as f64 / 1e6),
        b => format!("{:.1} kB", b as f64 / 1e3),
    };
    println!(
        "NF4 (block size {}{}): quantized {} matrices, copied {} other tensors, {} -> {} in {:.1} s",
        opts.blocksize,
        if opts.double_quant { ", double-quantized absmax" } else { "" },
        r.quantized.len(),
        r.copied.len(),
        size(r.bytes_in),
        size(r.bytes_out),
        t0.elapsed().as_secs_f64()
    );
    if r.quantized.is_empty() {
        println!("note: {} has no 2-D floating-point tensor, so nothing was quantized", r.input.display());
    }
    println!("wrote {}", args.out.display());
    Ok(())
}
