//! Quantized formats of bitsandbytes, reimplemented bit for bit: 8-bit blockwise with the
//! dynamic map (AdamW8bit's moments, NF4's nested absmax) and NF4 with double quantization
//! (QLoRA's base weights). This file also writes NF4 safetensors files the way bitsandbytes
//! and transformers store a 4-bit model (`kiln quantize`).

pub mod blockwise;
pub mod nf4;

use crate::io::safetensors::{self as st, SafeFile};
use crate::{DType, Error, Result, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What `quantize_file_nf4` writes besides the packed codes.
#[derive(Clone, Copy, Debug)]
pub struct Nf4FileOptions {
    /// Elements per absmax (64 is bitsandbytes' default).
    pub blocksize: usize,
    /// Store the absmax in 8 bits (bitsandbytes' compress_statistics / bnb_4bit_use_double_quant).
    pub double_quant: bool,
    /// Also write each dequantized tensor as `NAME.dequant` (in the original dtype).
    pub dequant: bool,
}

impl Default for Nf4FileOptions {
    fn default() -> Self {
        Nf4FileOptions { blocksize: nf4::NF4_BLOCKSIZE, double_quant: false, dequant: false }
    }
}

/// What `quantize_file_nf4` did.
#[derive(Clone, Debug, Default)]
pub struct Nf4FileReport {
    /// The file that was read (a directory's model.safetensors).
    pub input: PathBuf,
    /// Quantized tensors with their shapes.
    pub quantized: Vec<(String, Vec<usize>)>,
    /// Tensors copied unchanged (not 2-D, or not floating point).
    pub copied: Vec<String>,
    /// Bytes of tensor data read and written (the written count excludes `.dequant` copies).
    pub bytes_in: usize,
    pub bytes_out: usize,
}

/// The safetensors file behind `input`: the file itself, or a checkpoint directory's
/// model.safetensors.
pub fn resolve_weights(input: &Path) -> Result<PathBuf> {
    if !input.is_dir() {
        return Ok(input.to_path_buf());
    }
    let single = input.join("model.safetensors");
    if single.exists() {
        Ok(single)
    } else if input.join("model.safetensors.index.json").exists() {
        Err(Error::checkpoint(
            input,
            "is a sharded checkpoint; kiln quantize reads one file: pass each shard's .safetensors file as --in",
        ))
    } else {
        Err(Error::checkpoint(
            input,
            "has no model.safetensors: pass a safetensors file or a Hugging Face checkpoint directory",
        ))
    }
}

/// Reads `input` (a safetensors file or a checkpoint directory) and writes `output` with every
/// 2-D floating-point tensor NF4-quantized under bitsandbytes' Hugging Face names: for a
/// tensor NAME, the packed codes as NAME (U8 [numel/2, 1], first element in the high nibble),
/// `NAME.absmax` (F32, or U8 codes when double-quantized), `NAME.quant_map` (the 16 NF4
/// values), with double quantization `NAME.nested_absmax` and `NAME.nested_quant_map`, and
/// `NAME.quant_state.bitsandbytes__nf4` (U8 bytes of the JSON bitsandbytes writes: quant_type,
/// blocksize, dtype, shape and the nested blocksize, dtype and offset). Other tensors are
/// copied unchanged. The write is atomic.
pub fn quantize_file_nf4(input: &Path, output: &Path, opts: &Nf4FileOptions) -> Result<Nf4FileReport> {
    if !nf4::NF4_BLOCKSIZES.contains(&opts.blocksize) {
        // the same message as for a tensor, without blaming one
        nf4::check_nf4_size(opts.blocksize, opts.blocksize)?;
    }
    let path = resolve_weights(input)?;
    if output.exists() && std::fs::canonicalize(output).ok() == std::fs::canonicalize(&path).ok() {
        return Err(Error::Input(format!(
            "--out {} is the input file; write the quantized model to a new file",
            output.display()
        )));
    }
    let file = SafeFile::open(&path)?;
    let names = file.names();
    if let Some(n) = names.iter().find(|n| n.contains(".quant_state.bitsandbytes__")) {
        return Err(Error::checkpoint(&path, format!("is already quantized ('{n}'); pass the unquantized model")));
    }
    let mut report = Nf4FileReport { input: path.clone(), ..Default::default() };
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut put = |name: String, t: Tensor, counted: bool, report: &mut Nf4FileReport| -> Result<()> {
        if counted {
            report.bytes_out += t.raw_bytes().len();
        }
        if out.insert(name.clone(), t).is_some() {
            return Err(Error::checkpoint(
                &path,
                format!("two outputs are named '{name}': the input already has a tensor with a quantization suffix"),
            ));
        }
        Ok(())
    };
    for name in &names {
        let (dtype, shape) = file.info(name)?;
        let float = ["F32", "BF16", "F16"].contains(&dtype.as_str());
        if shape.len() != 2 || !float {
            let t = file.tensor(name)?;
            report.bytes_in += t.raw_bytes().len();
            put(name.clone(), t, true, &mut report)?;
            report.copied.push(name.clone());
            continue;
        }
        let t = file.tensor_f32(name)?;
        let w = t.f32s()?;
        report.bytes_in += w.len() * DType::parse(&dtype)?.size_in_bytes();
        if let Err(why) = nf4::check_nf4_size(w.len(), opts.blocksize) {
            return Err(Error::checkpoint(&path, format!("tensor '{name}' {shape:?}: {why}")));
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(Error::checkpoint(
                &path,
                format!("tensor '{name}' has a non-finite value ({}) at flat index {i}; NF4 cannot store it", w[i]),
            ));
        }
        let q = nf4::quantize_nf4(w, opts.blocksize)?;
        let n = q.numel;
        put(name.clone(), Tensor::from_u8(q.packed.clone(), [n / 2, 1])?, true, &mut report)?;
        put(format!("{name}.quant_map"), Tensor::from_f32(nf4::NF4_CODE.to_vec(), [16])?, true, &mut report)?;
        let torch_dtype = match dtype.as_str() {
            "BF16" => "bfloat16",
            "F16" => "float16",
            _ => "float32",
        };
        let mut state = format!(
            "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{torch_dtype}\", \"shape\": [{}, {}]",
            opts.blocksize, shape[0], shape[1]
        );
        let deq = if opts.double_quant {
            let dq = q.double_quant();
            let nb = dq.codes.len();
            let nn = dq.nested_absmax.len();
            put(format!("{name}.absmax"), Tensor::from_u8(dq.codes.clone(), [nb])?, true, &mut report)?;
            put(format!("{name}.nested_absmax"), Tensor::from_f32(dq.nested_absmax.clone(), [nn])?, true, &mut report)?;
            let map = blockwise::dynamic_map(true);
            put(format!("{name}.nested_quant_map"), Tensor::from_f32(map, [256])?, true, &mut report)?;
            state += &format!(
                ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                blockwise::BLOCKSIZE_8BIT,
                py_float_repr(dq.offset as f64)
            );
            if opts.dequant {
                Some(q.dequantize_with(&dq)?)
            } else {
                None
            }
        } else {
            put(format!("{name}.absmax"), Tensor::from_f32(q.absmax.clone(), [q.absmax.len()])?, true, &mut report)?;
            opts.dequant.then(|| nf4::dequantize_nf4(&q))
        };
        state.push('}');
        let bytes = state.into_bytes();
        let len = bytes.len();
        put(format!("{name}.quant_state.bitsandbytes__nf4"), Tensor::from_u8(bytes, [len])?, true, &mut report)?;
        if let Some(d) = deq {
            let d = Tensor::from_f32(d, shape.as_slice())?.to_dtype(t_dtype(&dtype))?;
            put(format!("{name}.dequant"), d, false, &mut report)?;
        }
        report.quantized.push((name.clone(), shape));
    }
    let tensors: Vec<(String, Tensor)> = out.into_iter().collect();
    st::save(output, &tensors, &[])?;
    Ok(report)
}

fn t_dtype(safetensors_dtype: &str) -> DType {
    match safetensors_dtype {
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        _ => DType::F32,
    }
}

/// A float as Python's `repr` writes it (what `json.dumps` puts in bitsandbytes' quant state):
/// shortest round-trip digits, scientific below 1e-4 and from 1e16 with a signed, two-digit
/// exponent (`1e-05`, `1.5e+16`).
pub fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    // Rust's Debug picks the same digits and the same switch to scientific notation
    let s = format!("{x:?}");
    match s.split_once('e') {
        None => s,
        Some((mant, exp)) => {
            let (sign, digits) = exp.strip_prefix('-').map_or(("+", exp), |d| ("-", d));
            format!("{mant}e{sign}{digits:0>2}")
        }
    }
}
