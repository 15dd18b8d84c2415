//! Elementwise ops: GELU (tanh approximation, GPT-2's "gelu_new"), residual add, dropout.

use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// sqrt(2 / pi), the constant of the tanh approximation.
const GELU_K: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
#[inline]
pub fn gelu(x: f32) -> f32 {
    let u = GELU_K * (x + GELU_C * x * x * x);
    0.5 * x * (1.0 + u.tanh())
}

/// d gelu(x) / dx for the tanh approximation.
#[inline]
pub fn gelu_grad(x: f32) -> f32 {
    let u = GELU_K * (x + GELU_C * x * x * x);
    let t = u.tanh();
    let du = GELU_K * (1.0 + 3.0 * GELU_C * x * x);
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
}

pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    out.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK))
        .for_each(|(o, i)| {
            for (o, &x) in o.iter_mut().zip(i) {
                *o = gelu(x);
            }
        });
}

/// dinp = dout * gelu'(inp)
pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    dinp.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK))
        .zip(dout.par_chunks(CHUNK))
        .for_each(|((d, i), g)| {
            for ((d, &x), &g) in d.iter_mut().zip(i).zip(g) {
                *d = g * gelu_grad(x);
            }
        });
}

/// out = a + b
pub fn residual_forward(out: &mut [f32], a: &[f32], b: &[f32]) {
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .zip(b.par_chunks(CHUNK))
        .for_each(|((o, a), b)| {
            for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                *o = a + b;
            }
        });
}

/// dst += src
pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| {
            for (d, s) in d.iter_mut().zip(s) {
                *d += s;
            }
        });
}

/// out = x * mask * scale, where mask holds 0 or 1 (kept elements) and scale = 1 / (1 - p).
pub fn dropout_forward(out: &mut [f32], inp: &[f32], mask: &[u8], scale: f32) {
    out.par_chunks_mut(CHUNK)
        .zip(inp.par_chunks(CHUNK))
        .zip(mask.par_chunks(CHUNK))
        .for_each(|((o, i), m)| {
            for ((o, &x), &m) in o.iter_mut().zip(i).zip(m) {
                *o = if m != 0 { x * scale } else { 0.0 };
            }
        });
}
