//! Elementwise ops: GELU (tanh approximation, GPT-2's "gelu_new"), residual add, dropout.

use super::{f32_in, new_f32};
use crate::{DType, Result, Tensor};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// sqrt(2 / pi), the constant of the tanh approximation.
const GELU_K: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// e^x for f32 without a libm call, so loops over it vectorise: x = k ln2 + r with |r| <= ln2/2
/// (ln2 split in two parts so k ln2 is exact), e^r by its Taylor series to r^7 (truncation
/// below 2e-9 relative), and 2^k built in the exponent bits. Max relative error about 2 ulp;
/// inputs are clamped to [-87, 88], where e^x stays a normal f32.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    // round to nearest by adding and removing 1.5 * 2^23 (no libm call, vectorises on SSE2)
    const ROUND: f32 = 12_582_912.0;
    let k = (x * LOG2E + ROUND) - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

/// tanh(u) = sign(u) (1 - 2 / (e^{2|u|} + 1)); absolute error below 1e-7, which is what GELU
/// needs (it adds tanh to 1).
#[inline(always)]
pub fn fast_tanh(u: f32) -> f32 {
    let e = fast_exp(2.0 * u.abs().min(20.0));
    (1.0 - 2.0 / (e + 1.0)).copysign(u)
}

/// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
#[inline]
pub fn gelu(x: f32) -> f32 {
    let u = GELU_K * (x + GELU_C * x * x * x);
    0.5 * x * (1.0 + fast_tanh(u))
}

/// d gelu(x) / dx for the tanh approximation.
#[inline]
pub fn gelu_grad(x: f32) -> f32 {
    let u = GELU_K * (x + GELU_C * x * x * x);
    let t = fast_tanh(u);
    let du = GELU_K * (1.0 + 3.0 * GELU_C * x * x);
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
}

pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    out.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).for_each(|(o, i)| {
        for (o, &x) in o.iter_mut().zip(i) {
            *o = gelu(x);
        }
    });
}

/// dinp = dout * gelu'(inp)
pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    dinp.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).zip(dout.par_chunks(CHUNK)).for_each(|((d, i), g)| {
        for ((d, &x), &g) in d.iter_mut().zip(i).zip(g) {
            *d = g * gelu_grad(x);
        }
    });
}

/// sigmoid(g) = 1 / (1 + e^-g), e^x by `fast_exp`: the bits kernels/elementwise.cuh computes.
#[inline]
pub fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-g))
}

/// silu(g) = g * sigmoid(g), torch's SiLU (its exp replaced by `fast_exp`, within 2 ulp).
#[inline]
pub fn silu(g: f32) -> f32 {
    g * sigmoid(g)
}

/// d silu(g) / dg = s (1 + g (1 - s)), s = sigmoid(g).
#[inline]
pub fn silu_grad(g: f32) -> f32 {
    let s = sigmoid(g);
    s * (1.0 + g * (1.0 - s))
}

/// out = silu(gate) * up
pub fn swiglu_forward(out: &mut [f32], gate: &[f32], up: &[f32]) {
    out.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK)).zip(up.par_chunks(CHUNK)).for_each(|((o, g), u)| {
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = silu(g) * u;
        }
    });
}

/// dgate = (dout * up) * silu'(gate), dup = dout * silu(gate). Either output may be skipped.
pub fn swiglu_backward(dgate: Option<&mut [f32]>, dup: Option<&mut [f32]>, gate: &[f32], up: &[f32], dout: &[f32]) {
    if let Some(dgate) = dgate {
        dgate
            .par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
            .zip(dout.par_chunks(CHUNK))
            .for_each(|((d, (g, u)), o)| {
                for (((d, &g), &u), &o) in d.iter_mut().zip(g).zip(u).zip(o) {
                    *d = o * u * silu_grad(g);
                }
            });
    }
    if let Some(dup) = dup {
        dup.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK)).zip(dout.par_chunks(CHUNK)).for_each(|((d, g), o)| {
            for ((d, &g), &o) in d.iter_mut().zip(g).zip(o) {
                *d = o * silu(g);
            }
        });
    }
}

/// out = a + b
pub fn residual_forward(out: &mut [f32], a: &[f32], b: &[f32]) {
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).zip(b.par_chunks(CHUNK)).for_each(|((o, a), b)| {
        for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
            *o = a + b;
        }
    });
}

/// dst += src
pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| {
        for (d, s) in d.iter_mut().zip(s) {
            *d += s;
        }
    });
}

/// The dropout mask bit of element `i` under `seed`: kept when a counter-based hash of (seed, i)
/// clears the threshold. Any element can be drawn independently, in any order, on any thread:
/// the same rule a CUDA kernel applies per thread.
#[inline(always)]
pub fn dropout_keep(seed: u64, i: u64, p: f32) -> bool {
    // splitmix64's finaliser over the element's counter.
    let mut z = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    // the top 24 bits as a uniform in [0, 1)
    ((z >> 40) as f32) * (1.0 / (1u64 << 24) as f32) >= p
}

/// mask[i] = dropout_keep(seed, i, p) as 0 or 1.
pub fn dropout_mask(mask: &mut [u8], seed: u64, p: f32) {
    mask.par_chunks_mut(CHUNK).enumerate().for_each(|(c, m)| {
        let base = (c * CHUNK) as u64;
        for (j, m) in m.iter_mut().enumerate() {
            *m = dropout_keep(seed, base + j as u64, p) as u8;
        }
    });
}

/// out = x * mask * scale, where mask holds 0 or 1 (kept elements) and scale = 1 / (1 - p).
pub fn dropout_forward(out: &mut [f32], inp: &[f32], mask: &[u8], scale: f32) {
    out.par_chunks_mut(CHUNK).zip(inp.par_chunks(CHUNK)).zip(mask.par_chunks(CHUNK)).for_each(|((o, i), m)| {
        for ((o, &x), &m) in o.iter_mut().zip(i).zip(m) {
            *o = if m != 0 { x * scale } else { 0.0 };
        }
    });
}

impl crate::backend::Elementwise for super::Cpu {
    fn gelu(&self, x: &Tensor) -> Result<Tensor> {
        let xd = f32_in("gelu", x)?;
        new_f32(x.dims(), |o| gelu_forward(o, xd))
    }
    fn gelu_backward(&self, x: &Tensor, dout: &Tensor) -> Result<Tensor> {
        let (xd, g) = (f32_in("gelu backward", x)?, f32_in("gelu backward", dout)?);
        new_f32(x.dims(), |d| gelu_backward(d, xd, g))
    }
    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (ad, bd) = (f32_in("add", a)?, f32_in("add", b)?);
        new_f32(a.dims(), |o| residual_forward(o, ad, bd))
    }
    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let (g, u) = (f32_in("swiglu", gate)?, f32_in("swiglu", up)?);
        new_f32(gate.dims(), |o| swiglu_forward(o, g, u))
    }
    fn swiglu_backward(
        &self,
        gate: &Tensor,
        up: &Tensor,
        dout: &Tensor,
        needs: [bool; 2],
    ) -> Result<[Option<Tensor>; 2]> {
        const OP: &str = "swiglu backward";
        let (g, u, o) = (f32_in(OP, gate)?, f32_in(OP, up)?, f32_in(OP, dout)?);
        let mut dg = super::take_if(needs[0], gate.numel());
        let mut du = super::take_if(needs[1], gate.numel());
        swiglu_backward(dg.as_deref_mut(), du.as_deref_mut(), g, u, o);
        Ok([super::wrap(dg, gate.dims())?, super::wrap(du, gate.dims())?])
    }
    fn dropout(&self, x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
        let xd = f32_in("dropout", x)?;
        let mut mask = vec![0u8; x.numel()];
        dropout_mask(&mut mask, seed, p);
        new_f32(x.dims(), |o| dropout_forward(o, xd, &mask, 1.0 / (1.0 - p)))
    }
    fn cast(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        x.to_dtype(dtype)
    }
    fn add_assign(&self, acc: &mut Tensor, x: &Tensor) -> Result<()> {
        let src = f32_in("backward", x)?;
        add_assign(acc.f32s_mut()?, src);
        Ok(())
    }
    fn sum_squares(&self, xs: &[&Tensor]) -> Result<f64> {
        let mut total = 0.0;
        for x in xs {
            total += super::reduce::sum_squares(f32_in("global norm", x)?);
        }
        Ok(total)
    }
    fn scale(&self, x: &mut Tensor, s: f32) -> Result<()> {
        super::reduce::scale(x.f32s_mut()?, s);
        Ok(())
    }
    fn empty(&self, dims: &[usize]) -> Result<Tensor> {
        Ok(Tensor::zeros(dims))
    }
    fn gather(&self, src: &Tensor, dims: &[usize], pieces: &[(usize, usize, usize)]) -> Result<Tensor> {
        let s = f32_in("gather", src)?;
        let mut out = vec![0f32; dims.iter().product()];
        crate::backend::check_pieces("gather", s.len(), out.len(), pieces)?;
        for &(d, from, len) in pieces {
            out[d..d + len].copy_from_slice(&s[from..from + len]);
        }
        Tensor::from_f32(out, dims)
    }
}
