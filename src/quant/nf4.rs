//! NF4 (QLoRA's 4-bit NormalFloat), bit for bit as bitsandbytes' `quantize_4bit(quant_type=
//! "nf4")` on the CPU, with its double quantization of the absmax (compress_statistics=True).
//!
//! The flattened (row-major) tensor is cut into blocks of `blocksize` (64 by default). Each
//! block keeps absmax A = max|w| in f32 and, per element, a 4-bit index into the 16-entry
//! `NF4_CODE` table: the entry nearest clamp(w * (1/A), -1, 1), an exact midpoint going to the
//! LOWER index (torch.bucketize over the midpoints). Two codes share a byte, the first element
//! in the HIGH nibble. An element dequantizes to NF4_CODE[code] * A.
//!
//! kiln refuses a tensor whose size is not a multiple of the block size rather than padding it
//! (bitsandbytes pads to an even count and keeps a partial last block): every weight matrix
//! kiln quantizes has such a size, and refusing keeps the format free of a padding convention.
//!
//! Double quantization stores the absmax in 8 bits: offset = mean(absmax) (f32), then
//! absmax - offset is quantized blockwise (blocks of 256, the signed dynamic map), and
//! dequantizes as map[code] * nested_absmax + offset.

use super::blockwise::{self, CodeLut, BLOCKSIZE_8BIT};
use crate::{Error, Result};
use rayon::prelude::*;
use std::any::Any;
use std::sync::{Arc, OnceLock};

/// The 16 NF4 values (bitsandbytes' table, equal to the QLoRA paper's): quantiles of N(0, 1)
/// scaled to [-1, 1], with an exact zero at index 7. The digits are bitsandbytes' (f64 values
/// that round to these f32s), kept so the table can be compared with its source by eye.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// The index of NF4_CODE[7] = 0, given to every element of an all-zero block.
const ZERO_CODE: u8 = 7;

/// bitsandbytes' default NF4 block size.
pub const NF4_BLOCKSIZE: usize = 64;

/// Block sizes bitsandbytes' 4-bit kernels accept (so that its loaders take kiln's files).
pub const NF4_BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// An NF4-quantized tensor (single quantization: f32 absmax).
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4 {
    /// numel/2 bytes, element 2k in the high nibble of byte k, element 2k+1 in the low nibble.
    pub packed: Vec<u8>,
    /// One per block of `blocksize` elements.
    pub absmax: Vec<f32>,
    pub blocksize: usize,
    /// Elements of the original tensor.
    pub numel: usize,
}

/// An absmax vector stored in 8 bits (bitsandbytes' nested quant state).
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuant {
    /// One code per NF4 block, into the signed dynamic map (`blockwise::dynamic_map(true)`).
    pub codes: Vec<u8>,
    /// One per block of 256 codes (the last may be partial).
    pub nested_absmax: Vec<f32>,
    /// The mean of the original absmax, subtracted before quantizing.
    pub offset: f32,
}

/// Checks that `numel` elements can be NF4-quantized in blocks of `blocksize`; the error says
/// what to change.
pub fn check_nf4_size(numel: usize, blocksize: usize) -> Result<()> {
    if !NF4_BLOCKSIZES.contains(&blocksize) {
        return Err(Error::Input(format!(
            "NF4 block size {blocksize} is not supported: use one of {NF4_BLOCKSIZES:?} (bitsandbytes' sizes; 64 is the default)"
        )));
    }
    if numel == 0 || numel % blocksize != 0 {
        return Err(Error::Input(format!(
            "cannot NF4-quantize {numel} elements in blocks of {blocksize}: the size must be a positive multiple of the \
             block size (kiln refuses rather than pads); use a block size that divides {numel}"
        )));
    }
    Ok(())
}

/// The NF4 index of a scaled value s in [-1, 1]: the number of midpoints strictly below s, so
/// an exact midpoint goes to the lower index.
#[inline]
fn nf4_index(s: f32, mids: &[f32; 15]) -> u8 {
    mids.iter().filter(|&&m| m < s).count() as u8
}

/// The 15 midpoints between consecutive NF4 values, in f32 (what the quantization compares with).
pub fn nf4_midpoints() -> [f32; 15] {
    std::array::from_fn(|k| (NF4_CODE[k] + NF4_CODE[k + 1]) / 2.0)
}

/// Quantizes `w` (a flattened tensor) to NF4 in blocks of `blocksize`, parallel over blocks.
/// An all-zero block gets absmax 0 and code 7 (the exact zero). Errors if the size is not a
/// multiple of the block size or the block size is not one bitsandbytes supports.
pub fn quantize_nf4(w: &[f32], blocksize: usize) -> Result<Nf4> {
    check_nf4_size(w.len(), blocksize)?;
    let mids = nf4_midpoints();
    let mut packed = vec![0u8; w.len() / 2];
    let mut absmax = vec![0f32; w.len() / blocksize];
    packed.par_chunks_mut(blocksize / 2).zip(w.par_chunks(blocksize)).zip(absmax.par_iter_mut()).for_each(
        |((p, w), a)| {
            *a = blockwise::absmax(w);
            let inv = 1.0 / *a;
            let code = |v: f32| if *a == 0.0 { ZERO_CODE } else { nf4_index((v * inv).clamp(-1.0, 1.0), &mids) };
            for (byte, pair) in p.iter_mut().zip(w.chunks_exact(2)) {
                *byte = (code(pair[0]) << 4) | code(pair[1]);
            }
        },
    );
    Ok(Nf4 { packed, absmax, blocksize, numel: w.len() })
}

/// Dequantizes packed NF4 codes with a given per-block absmax into `out` (f32):
/// out[i] = NF4_CODE[code_i] * absmax[i / blocksize]. Errors if the lengths do not agree.
pub fn dequantize_nf4_into(packed: &[u8], absmax: &[f32], blocksize: usize, out: &mut [f32]) -> Result<()> {
    let n = out.len();
    if blocksize == 0 || blocksize % 2 != 0 || packed.len() * 2 != n || absmax.len() != n.div_ceil(blocksize) {
        return Err(Error::Input(format!(
            "NF4 data does not fit together: {} packed bytes, {} absmax values and block size {blocksize} for {n} \
             elements (expected {} bytes and {} absmax values)",
            packed.len(),
            absmax.len(),
            n.div_ceil(2),
            n.div_ceil(blocksize.max(1))
        )));
    }
    out.par_chunks_mut(blocksize).zip(packed.par_chunks(blocksize / 2)).zip(absmax.par_iter()).for_each(
        |((o, p), &a)| {
            for (pair, &byte) in o.chunks_exact_mut(2).zip(p) {
                pair[0] = NF4_CODE[(byte >> 4) as usize] * a;
                pair[1] = NF4_CODE[(byte & 0xF) as usize] * a;
            }
        },
    );
    Ok(())
}

/// Dequantizes an NF4 tensor to f32 (bitsandbytes' `dequantize_4bit` in float32).
pub fn dequantize_nf4(q: &Nf4) -> Vec<f32> {
    let mut out = vec![0f32; q.numel];
    dequantize_nf4_into(&q.packed, &q.absmax, q.blocksize, &mut out)
        .expect("an Nf4 built by quantize_nf4 is self-consistent");
    out
}

/// The unpacked 4-bit codes, one per element, high nibble first.
pub fn unpack_nf4(packed: &[u8]) -> Vec<u8> {
    packed.iter().flat_map(|&b| [b >> 4, b & 0xF]).collect()
}

impl Nf4 {
    /// Double-quantizes this tensor's absmax as bitsandbytes does for compress_statistics=True.
    pub fn double_quant(&self) -> DoubleQuant {
        double_quantize(&self.absmax)
    }

    /// The dequantized tensor when the absmax is taken from `dq` (what a double-quantized
    /// checkpoint yields).
    pub fn dequantize_with(&self, dq: &DoubleQuant) -> Result<Vec<f32>> {
        let absmax = dq.dequantize();
        let mut out = vec![0f32; self.numel];
        dequantize_nf4_into(&self.packed, &absmax, self.blocksize, &mut out)?;
        Ok(out)
    }
}

/// Quantizes an absmax vector to 8 bits: offset = mean, then absmax - offset blockwise in
/// blocks of 256 with the signed dynamic map. The mean is accumulated in f64 and rounded once;
/// torch's f32 `mean()` can differ from it in the last bit, which shifts the offset (and so
/// possibly a code) by an ulp. No oracle fixture covers double quantization yet.
pub fn double_quantize(absmax: &[f32]) -> DoubleQuant {
    let offset = if absmax.is_empty() {
        0.0
    } else {
        (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32
    };
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let mut codes = vec![0u8; absmax.len()];
    let mut nested_absmax = vec![0f32; blockwise::num_blocks(absmax.len(), BLOCKSIZE_8BIT)];
    let lut = CodeLut::new(&blockwise::dynamic_map(true));
    blockwise::quantize_blockwise_lut(&centred, &lut, BLOCKSIZE_8BIT, &mut codes, &mut nested_absmax);
    DoubleQuant { codes, nested_absmax, offset }
}

impl DoubleQuant {
    /// The absmax it stands for: map[code] * nested_absmax + offset (f32, as bitsandbytes).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.codes.len()];
        let map = blockwise::dynamic_map(true);
        blockwise::dequantize_blockwise(&self.codes, &self.nested_absmax, &map, BLOCKSIZE_8BIT, &mut out);
        for a in &mut out {
            *a += self.offset;
        }
        out
    }
}

/// The bytes an `Nf4Weight` of `numel` elements in blocks of `blocksize` holds (its
/// `storage_bytes`): the codes, one 8-bit absmax a block, one f32 scale per 256 of those, and
/// the offset.
pub fn nf4_storage_bytes(numel: usize, blocksize: usize) -> usize {
    let blocks = numel.div_ceil(blocksize.max(1));
    numel.div_ceil(2) + blocks + 4 * blocks.div_ceil(BLOCKSIZE_8BIT) + 4
}

/// A copy of a weight that a device backend keeps beside it (its packed form in device memory),
/// opaque here: quant knows no backend. Made once, on first use; clones of the weight share it;
/// it takes no part in comparing weights.
#[derive(Clone, Default)]
pub struct DeviceCopy(Arc<OnceLock<Arc<dyn Any + Send + Sync>>>);

impl DeviceCopy {
    /// The copy, if one of type T was made.
    pub fn get<T: Any + Send + Sync>(&self) -> Option<Arc<T>> {
        self.0.get().and_then(|a| Arc::clone(a).downcast::<T>().ok())
    }

    /// The copy, made by `make` if there is none yet.
    pub fn get_or_make<T: Any + Send + Sync>(&self, make: impl FnOnce() -> Result<T>) -> Result<Arc<T>> {
        if let Some(t) = self.get() {
            return Ok(t);
        }
        let made: Arc<dyn Any + Send + Sync> = Arc::new(make()?);
        // another thread may have made one meanwhile: the first one stays
        let _ = self.0.set(made);
        self.get().ok_or_else(|| Error::Input("the weight's device copy is of another kind".into()))
    }

    /// Whether a copy was made.
    pub fn is_made(&self) -> bool {
        self.0.get().is_some()
    }
}

impl PartialEq for DeviceCopy {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for DeviceCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_made() { "DeviceCopy(made)" } else { "DeviceCopy(none)" })
    }
}

/// A Conv1D weight [in, out] as QLoRA keeps it: the row-major tensor's NF4 codes (two a byte)
/// and its absmax double-quantized to 8 bits, bitsandbytes' `Linear4bit` storage with
/// compress_statistics=True. The f32 weight is never kept: `dequantize_into` rebuilds it.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Weight {
    /// numel/2 bytes, as `Nf4::packed`.
    pub packed: Vec<u8>,
    /// One 8-bit absmax per block of `blocksize` elements.
    pub absmax: DoubleQuant,
    pub blocksize: usize,
    /// [in, out]
    pub dims: [usize; 2],
    /// The packed form in a device's memory, once a device backend has used the weight.
    pub device: DeviceCopy,
}

impl Nf4Weight {
    /// Quantizes `w` (row-major, `dims` = [in, out]); errors if in * out is not a multiple of
    /// `blocksize` (kiln refuses rather than pads).
    pub fn quantize(w: &[f32], dims: [usize; 2], blocksize: usize) -> Result<Self> {
        if w.len() != dims[0] * dims[1] {
            return Err(Error::Input(format!("NF4: {} values do not make a {dims:?} weight", w.len())));
        }
        let q = quantize_nf4(w, blocksize)?;
        let absmax = q.double_quant();
        Ok(Nf4Weight { packed: q.packed, absmax, blocksize, dims, device: DeviceCopy::default() })
    }

    pub fn numel(&self) -> usize {
        self.dims[0] * self.dims[1]
    }

    /// Bytes held: the codes, the 8-bit absmax, the f32 nested absmax and the offset (about
    /// 0.5 + 1/64 + 4/(64 * 256) bytes a weight at block size 64, against 4 in f32).
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + self.absmax.codes.len() + 4 * self.absmax.nested_absmax.len() + 4
    }

    /// Writes the f32 weight [in, out] into `out` (numel values): the absmax first (numel / 64
    /// values), then NF4_CODE[code] * absmax per element.
    pub fn dequantize_into(&self, out: &mut [f32]) -> Result<()> {
        let absmax = self.absmax.dequantize();
        dequantize_nf4_into(&self.packed, &absmax, self.blocksize, out)
    }

    /// The f32 weight [in, out] this stands for.
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.numel()];
        self.dequantize_into(&mut out)?;
        Ok(out)
    }
}
