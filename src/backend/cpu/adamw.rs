//! AdamW on the CPU: torch.optim.AdamW's per-element update, and a step over one buffer.

use crate::abi::AdamWScalars;
use rayon::prelude::*;

/// One AdamW update of a single element, in torch's operation order (m by lerp, v by
/// mul-then-addcmul, p by addcdiv). The CUDA kernel's host twin uses this same function.
#[inline]
pub fn adamw_update(p: &mut f32, m: &mut f32, v: &mut f32, g: f32, s: &AdamWScalars) {
    *p *= s.decay;
    *m += s.one_minus_beta1 * (g - *m);
    *v = *v * s.beta2 + s.one_minus_beta2 * g * g;
    let denom = v.sqrt() / s.bc2_sqrt + s.eps;
    *p += -s.step_size * (*m / denom);
}

/// `adamw_update` over every element of one parameter, in parallel chunks.
pub fn adamw_step(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: &AdamWScalars) {
    const CHUNK: usize = 1 << 14;
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| {
            for i in 0..p.len() {
                adamw_update(&mut p[i], &mut m[i], &mut v[i], g[i], s);
            }
        });
}
