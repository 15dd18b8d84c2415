//! NF4 checkpoints on disk, as bitsandbytes and transformers store a 4-bit model: `kiln quantize`
//! writes them (`quantize_file_nf4`) and checkpoint loading reads them back (`read_nf4`), so a
//! pre-quantized checkpoint loads in `kiln eval`, `generate` and `finetune --method qlora`. The
//! formats themselves (NF4 with double quantization, 8-bit blockwise) are in quant/.

use super::safetensors::{self as st, SafeFile};
use crate::quant::{blockwise, nf4};
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
    /// Copy GPT-2's embeddings (wte, wpe, an untied lm_head) unchanged, as QLoRA and
    /// transformers' `load_in_4bit` leave them.
    pub keep_embeddings: bool,
    /// Where the quantization runs (the codes are the same bits on every device).
    pub device: crate::Device,
}

impl Default for Nf4FileOptions {
    fn default() -> Self {
        Nf4FileOptions {
            blocksize: nf4::NF4_BLOCKSIZE,
            double_quant: false,
            dequant: false,
            keep_embeddings: false,
            device: crate::Device::Cpu,
        }
    }
}

/// What `quantize_file_nf4` did.
#[derive(Clone, Debug, Default)]
pub struct Nf4FileReport {
    /// The file that was read (a directory's model.safetensors).
    pub input: PathBuf,
    /// Quantized tensors with their shapes.
    pub quantized: Vec<(String, Vec<usize>)>,
    /// Tensors copied unchanged (not 2-D, not floating point, or kept embeddings).
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
            report.bytes_out += t.raw_bytes()?.len();
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
        if shape.len() != 2 || !float || (opts.keep_embeddings && is_embedding(name)) {
            let t = file.tensor(name)?;
            report.bytes_in += t.raw_bytes()?.len();
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
        let q = crate::backend::backend(opts.device)?.nf4_quantize(&t.to_device(opts.device)?, opts.blocksize)?;
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

/// GPT-2's embedding matrices (with or without the `transformer.` prefix), and lm_head.
fn is_embedding(name: &str) -> bool {
    let base = name.strip_prefix("transformer.").unwrap_or(name);
    matches!(base, "wte.weight" | "wpe.weight" | "lm_head.weight")
}

fn t_dtype(safetensors_dtype: &str) -> DType {
    match safetensors_dtype {
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        _ => DType::F32,
    }
}

/// The suffixes of the tensors that hold NAME's NF4 form beside NAME itself (the packed codes),
/// and `.dequant`, the inspection copy `--dequant` adds.
pub const NF4_SUFFIXES: [&str; 6] =
    [".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4", ".dequant"];

/// The absmax of a stored NF4 tensor: f32, or double-quantized to 8 bits.
#[derive(Clone, Debug, PartialEq)]
pub enum StoredAbsmax {
    F32(Vec<f32>),
    Double(nf4::DoubleQuant),
}

/// One tensor's NF4 form as `quantize_file_nf4` (or bitsandbytes) stores it, read back.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredNf4 {
    /// numel/2 bytes, the first element in the high nibble.
    pub packed: Vec<u8>,
    pub absmax: StoredAbsmax,
    pub blocksize: usize,
    /// The original tensor's shape (from the quant state).
    pub shape: Vec<usize>,
}

impl StoredNf4 {
    /// The f32 values it stands for, NF4_CODE[code] * absmax (a double-quantized absmax
    /// dequantized first): what `--dequant` writes for an f32 tensor.
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        let dq;
        let absmax = match &self.absmax {
            StoredAbsmax::F32(a) => a.as_slice(),
            StoredAbsmax::Double(d) => {
                dq = d.dequantize();
                dq.as_slice()
            }
        };
        let mut out = vec![0f32; self.shape.iter().product()];
        nf4::dequantize_nf4_into(&self.packed, absmax, self.blocksize, &mut out)?;
        Ok(out)
    }

    /// QLoRA's form of a weight stored [in, out] (GPT-2's Conv1D layout, which both
    /// `quantize_file_nf4` and `Model::quantize_nf4` quantize as it is): the same codes, and the
    /// absmax double-quantized as `Nf4Weight::quantize` does unless it already is, so the result
    /// equals quantizing the original weight on the fly, bit for bit.
    pub fn into_weight(self) -> Result<nf4::Nf4Weight> {
        let dims = match self.shape[..] {
            [i, o] => [i, o],
            _ => return Err(Error::Input(format!("an NF4 weight must be 2-D, not {:?}", self.shape))),
        };
        let absmax = match self.absmax {
            StoredAbsmax::F32(a) => nf4::double_quantize(&a),
            StoredAbsmax::Double(d) => d,
        };
        Ok(nf4::Nf4Weight { packed: self.packed, absmax, blocksize: self.blocksize, dims, device: Default::default() })
    }
}

/// Reads `name`'s NF4 form from `file`, or None when `name` has no quant state (a plain tensor).
/// Every part is checked against the quant state (dtype, length, the NF4 and dynamic tables,
/// finite absmax) before it is used, and a bad part is named.
pub fn read_nf4(file: &SafeFile, name: &str) -> Result<Option<StoredNf4>> {
    let state_name = format!("{name}.quant_state.bitsandbytes__nf4");
    if !file.contains(&state_name) {
        return Ok(None);
    }
    let bad = |what: String| {
        Error::checkpoint(
            file.path(),
            format!("NF4 tensor '{name}': {what}; quantize the original model again with kiln quantize"),
        )
    };
    let part = |suffix: &str, dtype: &str, len: usize| -> Result<Tensor> {
        let n = format!("{name}{suffix}");
        if !file.contains(&n) {
            return Err(bad(format!("its part '{n}' is missing")));
        }
        let (d, shape) = file.info(&n)?;
        let numel = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
        if d != dtype || numel != Some(len) {
            return Err(bad(format!("its part '{n}' is {d} {shape:?}; expected {dtype} with {len} elements")));
        }
        file.tensor(&n)
    };
    let bytes = file.tensor(&state_name)?;
    let state = match bytes.u8s().ok().and_then(|b| std::str::from_utf8(b).ok()).map(serde_json::from_str) {
        Some(Ok(serde_json::Value::Object(m))) => m,
        _ => return Err(bad("its quant state is not a JSON object in U8 bytes".into())),
    };
    let get = |k: &str| state.get(k).filter(|v| !v.is_null());
    match get("quant_type").and_then(|v| v.as_str()) {
        Some("nf4") => {}
        other => return Err(bad(format!("quant_type is {other:?}; kiln reads \"nf4\" (not fp4)"))),
    }
    let blocksize = get("blocksize").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    let shape: Option<Vec<usize>> = get("shape")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|d| d.as_u64().map(|d| d as usize)).collect());
    let shape = match (shape, get("shape").and_then(|v| v.as_array()).map(|a| a.len())) {
        (Some(s), Some(n)) if s.len() == n && n > 0 => s,
        _ => return Err(bad(format!("its quant state has no valid \"shape\" ({:?})", get("shape")))),
    };
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| bad(format!("its shape {shape:?} is too large")))?;
    nf4::check_nf4_size(numel, blocksize).map_err(|e| bad(e.to_string()))?;
    let packed = part("", "U8", numel / 2)?.u8s()?.to_vec();
    let map = part(".quant_map", "F32", 16)?;
    if map.f32s()?.iter().zip(&nf4::NF4_CODE).any(|(a, b)| a.to_bits() != b.to_bits()) {
        return Err(bad("its quant_map is not the NF4 table".into()));
    }
    let blocks = numel / blocksize;
    let finite = |t: &Tensor, what: &str| -> Result<Vec<f32>> {
        let v = t.f32s()?.to_vec();
        match v.iter().position(|x| !x.is_finite()) {
            Some(i) => Err(bad(format!("its {what} holds a non-finite value ({}) at index {i}", v[i]))),
            None => Ok(v),
        }
    };
    let double = get("nested_blocksize").is_some() || file.contains(&format!("{name}.nested_absmax"));
    let absmax = if double {
        if get("nested_blocksize").and_then(|v| v.as_u64()) != Some(blockwise::BLOCKSIZE_8BIT as u64) {
            return Err(bad(format!(
                "its nested_blocksize is {:?}; bitsandbytes uses {}",
                get("nested_blocksize"),
                blockwise::BLOCKSIZE_8BIT
            )));
        }
        let offset = get("nested_offset").and_then(|v| v.as_f64()).filter(|o| o.is_finite());
        let offset = offset.ok_or_else(|| bad("its quant state has no finite \"nested_offset\"".into()))? as f32;
        let codes = part(".absmax", "U8", blocks)?.u8s()?.to_vec();
        let nested = finite(
            &part(".nested_absmax", "F32", blockwise::num_blocks(blocks, blockwise::BLOCKSIZE_8BIT))?,
            "nested_absmax",
        )?;
        let nmap = part(".nested_quant_map", "F32", 256)?;
        if nmap.f32s()?.iter().zip(&blockwise::dynamic_map(true)).any(|(a, b)| a.to_bits() != b.to_bits()) {
            return Err(bad("its nested_quant_map is not bitsandbytes' signed dynamic map".into()));
        }
        StoredAbsmax::Double(nf4::DoubleQuant { codes, nested_absmax: nested, offset })
    } else {
        StoredAbsmax::F32(finite(&part(".absmax", "F32", blocks)?, "absmax")?)
    };
    Ok(Some(StoredNf4 { packed, absmax, blocksize, shape }))
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
