//! 8-bit blockwise quantization with bitsandbytes' dynamic map, bit for bit as bitsandbytes'
//! CPU kernel does it (the format of AdamW8bit's moments and of NF4's double-quantized absmax).
//!
//! A buffer is cut into blocks of `blocksize` (the last may be partial). Each block keeps its
//! absmax A = max|x| in f32 and one u8 code per element, an index into a 256-entry map of
//! values in [-1, 1]; the element dequantizes to map[code] * A.
//!
//! The code is the map entry nearest x/A, found the way bitsandbytes (>= 0.50) finds it on the
//! CPU: a 65,536-entry table over [-1, 1], built once per map (`CodeLut`), with
//!   lut[i] = #{k : mid_k < -1 + 2i/65535},  mid_k = (map[k] + map[k+1]) / 2
//!   code   = lut[u16(((clamp(x * (1/A), -1, 1) + 1) * 0.5 * 65535 + 0.5))]
//! all in f32. That is nearest-neighbour except for values within one table step (3e-5 of A)
//! of a midpoint, where it may pick the other neighbour; matching bitsandbytes exactly matters
//! because the codes are the optimizer state a checkpoint carries.

use rayon::prelude::*;

/// The block size of bitsandbytes' 8-bit optimizers and of NF4's nested absmax.
pub const BLOCKSIZE_8BIT: usize = 256;

/// Entries of the code table (one per u16 value).
const LUT_LEN: usize = 1 << 16;

/// bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: 256 sorted
/// f32 values, a sign (when `signed`), a decimal exponent 10^-6..10^0, and a linear fraction
/// whose resolution grows with the exponent: the top decade [0.1, 1] has 64 (signed) or 128
/// (unsigned) levels, each lower decade half as many. Signed: +-127 values, 0 and 1.0 (so it
/// spans [-0.993, 1]); unsigned: 254 values, 0 and 1.0.
pub fn dynamic_map(signed: bool) -> Vec<f32> {
    const MAX_EXP_BITS: i32 = 7;
    // bitsandbytes spends one bit on the sign even for the unsigned map, then gives the
    // unsigned map twice the fraction levels per decade instead.
    let non_sign_bits = 7;
    let mut data: Vec<f64> = Vec::with_capacity(256);
    for i in 0..MAX_EXP_BITS {
        let items = if signed { (1usize << (i + non_sign_bits - MAX_EXP_BITS)) + 1 } else { (1usize << (i + 1)) + 1 };
        let bounds = linspace_f32(0.1, 1.0, items);
        // torch multiplies an f32 tensor by a Python float in f32: the scale rounds to f32 first
        let scale = 10f64.powi(i - (MAX_EXP_BITS - 1)) as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push((scale * mean) as f64);
            if signed {
                data.push((-scale * mean) as f64);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    debug_assert_eq!(data.len(), 256);
    data.sort_by(|a, b| a.total_cmp(b));
    data.into_iter().map(|v| v as f32).collect()
}

/// `torch.linspace(start, end, steps)` in f32 on the CPU: the first half counts up from start,
/// the second half down from end. torch's kernel is compiled with FMA contraction, so each
/// value is one fused multiply-add; plain multiply-then-add differs by an ulp in 42 of the 256
/// signed map entries (checked against bitsandbytes' maps in tests/blockwise.rs).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - i - 1) as f32, end) })
        .collect()
}

/// The midpoints between consecutive entries of a sorted map, in f32: a value's code is the
/// number of them below it (`CodeLut`; the CUDA kernels search them directly).
pub fn midpoints(map: &[f32]) -> Vec<f32> {
    map.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect()
}

/// A map with its 65,536-entry code table: build it once per map, then quantize any number of
/// blocks with it.
#[derive(Clone)]
pub struct CodeLut {
    map: Vec<f32>,
    lut: Vec<u8>,
}

impl CodeLut {
    /// Builds the table for `map`, which must be sorted ascending with 2 to 256 entries (as
    /// every bitsandbytes map is); anything else panics, since maps are constants, not input.
    pub fn new(map: &[f32]) -> Self {
        assert!((2..=256).contains(&map.len()), "a code map has 2 to 256 entries, got {}", map.len());
        assert!(map.windows(2).all(|w| w[0] <= w[1]), "the code map must be sorted ascending");
        let mids = midpoints(map);
        let lut = (0..LUT_LEN)
            .map(|i| {
                let grid = -1.0f32 + (2.0f32 * i as f32) / 65535.0f32;
                mids.partition_point(|&m| m < grid) as u8
            })
            .collect();
        CodeLut { map: map.to_vec(), lut }
    }

    pub fn map(&self) -> &[f32] {
        &self.map
    }

    /// The code of each of the 65536 grid points -1 + 2i / 65535 (what `code` indexes), for a
    /// device that quantizes with the same table.
    pub fn lut(&self) -> &[u8] {
        &self.lut
    }

    /// The code of `x` in a block whose absmax has reciprocal `inv_absmax`.
    #[inline]
    pub fn code(&self, x: f32, inv_absmax: f32) -> u8 {
        let s = (x * inv_absmax).clamp(-1.0, 1.0);
        // `as u16` truncates like C's float-to-uint16 (and maps NaN to 0)
        self.lut[((s + 1.0) * 0.5 * 65535.0 + 0.5) as u16 as usize]
    }

    /// Quantizes one block: returns its absmax and writes one code per element. An all-zero
    /// block gets absmax 0 and codes 0 (bitsandbytes leaves it so; it dequantizes to 0).
    #[inline]
    pub fn quantize_block(&self, x: &[f32], codes: &mut [u8]) -> f32 {
        let a = absmax(x);
        if a == 0.0 {
            codes.fill(0);
            return 0.0;
        }
        let inv = 1.0 / a;
        for (c, &v) in codes.iter_mut().zip(x) {
            *c = self.code(v, inv);
        }
        a
    }

    /// Dequantizes one block into `out`.
    #[inline]
    pub fn dequantize_block(&self, codes: &[u8], absmax: f32, out: &mut [f32]) {
        for (o, &c) in out.iter_mut().zip(codes) {
            *o = self.map[c as usize] * absmax;
        }
    }
}

/// max |x|, NaN if any element is NaN (so a NaN in optimizer state is not silently dropped).
#[inline]
pub fn absmax(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, &v| if v.abs() > m || v.is_nan() { v.abs() } else { m })
}

/// The number of blocks of `blocksize` that cover `n` elements (the last may be partial).
pub fn num_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

fn check_lens(n: usize, blocksize: usize, codes: usize, absmax: usize) {
    assert!(blocksize > 0, "blocksize must be positive");
    assert_eq!(codes, n, "one code per element: {n} elements but {codes} codes");
    let nb = num_blocks(n, blocksize);
    assert_eq!(absmax, nb, "{n} elements in blocks of {blocksize} need {nb} absmax values, got {absmax}");
}

/// Quantizes `x` blockwise with bitsandbytes' CPU rule, writing `codes` (one per element) and
/// `absmax` (one per block, the last block may be partial). Builds the map's table on each
/// call; hold a `CodeLut` and call `quantize_blockwise_lut` to reuse it.
/// Panics if the output lengths do not fit `x`.
pub fn quantize_blockwise(x: &[f32], map: &[f32], blocksize: usize, codes: &mut [u8], absmax: &mut [f32]) {
    quantize_blockwise_lut(x, &CodeLut::new(map), blocksize, codes, absmax)
}

/// `quantize_blockwise` with a prebuilt table, parallel over blocks.
pub fn quantize_blockwise_lut(x: &[f32], lut: &CodeLut, blocksize: usize, codes: &mut [u8], absmax: &mut [f32]) {
    check_lens(x.len(), blocksize, codes.len(), absmax.len());
    codes.par_chunks_mut(blocksize).zip(x.par_chunks(blocksize)).zip(absmax.par_iter_mut()).for_each(|((c, x), a)| {
        *a = lut.quantize_block(x, c);
    });
}

/// The inverse of `quantize_blockwise`: out[i] = map[codes[i]] * absmax[i / blocksize] in f32.
/// Panics if the lengths do not fit.
pub fn dequantize_blockwise(codes: &[u8], absmax: &[f32], map: &[f32], blocksize: usize, out: &mut [f32]) {
    check_lens(codes.len(), blocksize, out.len(), absmax.len());
    assert!(map.len() == 256 || codes.iter().all(|&c| (c as usize) < map.len()), "a code points past the map");
    out.par_chunks_mut(blocksize).zip(codes.par_chunks(blocksize)).zip(absmax.par_iter()).for_each(|((o, c), &a)| {
        for (o, &c) in o.iter_mut().zip(c) {
            *o = map[c as usize] * a;
        }
    });
}
