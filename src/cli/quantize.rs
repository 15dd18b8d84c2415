//! `kiln quantize`: write a model's weight matrices in bitsandbytes' NF4 format, under the
//! names transformers uses for a 4-bit checkpoint. The work is `io::nf4::quantize_file_nf4`.
//! `--out` names one safetensors file, or a checkpoint directory (config.json and the tokenizer
//! copied beside the NF4 model.safetensors) that `kiln eval`, `generate` and
//! `finetune --method qlora` load (`io::checkpoint`).
//!
//! Every 2-D tensor is quantized in the layout it is stored in (GPT-2's Conv1D weights stay
//! [in, out]; the embeddings are included), so the codes equal bitsandbytes' `quantize_4bit` on
//! that tensor. transformers' 4-bit loading transposes Conv1D weights to Linear's [out, in] and
//! keeps embeddings and lm_head in 16 bits: its blocks differ, which is why this file is a record of
//! the format rather than a checkpoint transformers loads in 4 bits.

use crate::io::nf4::{self, Nf4FileOptions};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

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
    #[arg(long = "in", value_name = "FILE|DIR")]
    pub input: PathBuf,
    /// A .safetensors file, or else a checkpoint directory (from a checkpoint directory --in:
    /// config.json and tokenizer files copied) that kiln eval, generate and finetune --method
    /// qlora load. Written atomically; must differ from --in.
    #[arg(long, value_name = "FILE|DIR")]
    pub out: PathBuf,
    /// Replace a checkpoint already in the --out directory.
    #[arg(long)]
    pub overwrite: bool,
    /// Leave the embeddings (wte, wpe) as they are, as QLoRA and transformers' load_in_4bit do:
    /// then finetune --method qlora from --out trains exactly as from --in.
    #[arg(long)]
    pub keep_embeddings: bool,
    /// Store each block's absmax in 8 bits as well (bitsandbytes' bnb_4bit_use_double_quant).
    #[arg(long)]
    pub double_quant: bool,
    /// Also write every dequantized matrix as NAME.dequant, to inspect the rounding.
    #[arg(long)]
    pub dequant: bool,
    /// Elements per absmax: 32, 64, 128, ..., 4096; every matrix's size must be a multiple of it.
    #[arg(long, default_value_t = 64)]
    pub blocksize: usize,
    /// Where to quantize: cpu, cuda (kiln's NF4 kernel: the same bits), emu, or auto (the GPU when
    /// there is one).
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let QuantFormat::Nf4 = args.format;
    let device = args.device.parse::<crate::Device>()?;
    device.ensure_available()?;
    let opts = Nf4FileOptions {
        device,
        blocksize: args.blocksize,
        double_quant: args.double_quant,
        dequant: args.dequant,
        keep_embeddings: args.keep_embeddings,
    };
    let t0 = std::time::Instant::now();
    let to_dir = args.out.extension().is_none_or(|e| e != "safetensors");
    let r = if to_dir {
        quantize_checkpoint(&args.input, &args.out, &opts, args.overwrite)?
    } else {
        nf4::quantize_file_nf4(&args.input, &args.out, &opts)?
    };
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
    if to_dir {
        println!(
            "wrote the checkpoint {} (kiln eval, generate and finetune --method qlora load it)",
            args.out.display()
        );
    } else {
        println!("wrote {}", args.out.display());
    }
    Ok(())
}

/// Writes the NF4 form of checkpoint directory `input` into directory `out`, with its
/// config.json and tokenizer files: a checkpoint `io::checkpoint` loads.
fn quantize_checkpoint(input: &Path, out: &Path, opts: &Nf4FileOptions, overwrite: bool) -> Result<nf4::Nf4FileReport> {
    if !input.join("config.json").is_file() {
        return Err(Error::Input(format!(
            "--out {} is a directory, which needs a checkpoint directory with config.json as --in ({} is not one); \
             to write one file instead, name it --out FILE.safetensors",
            out.display(),
            input.display()
        )));
    }
    let same = matches!((input.canonicalize(), out.canonicalize()), (Ok(a), Ok(b)) if a == b);
    if same {
        return Err(Error::Input(format!(
            "--out {} is the input directory; write the quantized checkpoint to a new directory",
            out.display()
        )));
    }
    if out.join("model.safetensors").exists() && !overwrite {
        return Err(Error::Input(format!(
            "{} already holds a checkpoint; pass --overwrite to replace it",
            out.display()
        )));
    }
    nf4::resolve_weights(input)?;
    let created = !out.exists();
    std::fs::create_dir_all(out).map_err(|e| Error::write(out, e))?;
    // The weights are quantized under a temporary name first, so a refused tensor leaves nothing
    // behind, and renamed into place after config.json: a directory with model.safetensors in it
    // always has the config that belongs to it.
    let partial = out.join(format!(".model.safetensors.{}.partial", std::process::id()));
    let result = (|| {
        let report = nf4::quantize_file_nf4(input, &partial, opts)?;
        // an old checkpoint here stops being one before its config is replaced
        crate::io::remove_if_present(&out.join("model.safetensors"))?;
        for name in std::iter::once("config.json").chain(super::MODEL_SIDE_FILES.iter().copied()) {
            let src = input.join(name);
            if src.is_file() {
                let bytes = std::fs::read(&src).map_err(|e| Error::read(&src, e))?;
                crate::io::write_atomic(&out.join(name), |w| std::io::Write::write_all(w, &bytes))?;
            }
        }
        let dst = out.join("model.safetensors");
        std::fs::rename(&partial, &dst).map_err(|e| Error::write(&dst, e))?;
        Ok(report)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
        if created {
            let _ = std::fs::remove_dir(out);
        }
    }
    result
}
