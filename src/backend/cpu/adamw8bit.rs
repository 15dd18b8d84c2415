//! 8-bit AdamW on the CPU: bitsandbytes' per-element update on dequantized moments and its
//! blockwise step (dequantize a block of 256, update, requantize), bit for bit with bitsandbytes'
//! AdamW8bit on the oracle fixture (tests/adamw8bit.rs). The CUDA kernel (kernels/adamw8bit.cu)
//! repeats this arithmetic and equals it bit for bit.

use crate::abi::AdamWScalars;
use crate::backend::{Adam8State, AdamW8bitSlot};
use crate::quant::blockwise::{self, CodeLut, BLOCKSIZE_8BIT};
use crate::Result;
use rayon::prelude::*;
use std::sync::OnceLock;

/// The code maps of the two moments with their lookup tables, built once per optimizer.
#[derive(Clone)]
pub struct Maps8bit {
    /// Signed dynamic map, for m (bitsandbytes' qmap1).
    pub m: CodeLut,
    /// Unsigned dynamic map, for v (qmap2).
    pub v: CodeLut,
}

impl Default for Maps8bit {
    fn default() -> Self {
        Maps8bit { m: CodeLut::new(&blockwise::dynamic_map(true)), v: CodeLut::new(&blockwise::dynamic_map(false)) }
    }
}

/// The maps, built once per process (every optimizer and device uses the same two).
pub fn maps() -> &'static Maps8bit {
    static MAPS: OnceLock<Maps8bit> = OnceLock::new();
    MAPS.get_or_init(Maps8bit::default)
}

/// One element's update on (dequantized) moments, in the order bitsandbytes' CPU optimizer
/// computes it with torch ops (`m.mul_(b1).add_(g, alpha=1-b1)`, `v.mul_(b2).addcmul_(g, g,
/// value=1-b2)`, `p.addcdiv_(m, denom, value=-step_size)`): torch's vectorized add-with-alpha
/// is a fused multiply-add, and so (by compiler contraction) is addcmul's final add. This order
/// reproduces bitsandbytes' codes and absmax bit for bit on the oracle fixture, and its
/// parameters but one of 12,288 values (off by an ulp); torch AdamW's order
/// (`adamw::adamw_update`) or unfused arithmetic would not.
#[inline(always)]
pub fn adamw8bit_update(p: &mut f32, m: &mut f32, v: &mut f32, g: f32, s: &AdamWScalars) {
    *m = g.mul_add(s.one_minus_beta1, *m * s.beta1);
    *v = (s.one_minus_beta2 * g).mul_add(g, *v * s.beta2);
    let denom = v.sqrt() / s.bc2_sqrt + s.eps;
    *p *= s.decay;
    *p += (-s.step_size * *m) / denom;
}

/// Updates a range of parameters and their (f32 or dequantized) moments in place.
#[inline(always)]
fn update_range(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: &AdamWScalars) {
    for i in 0..p.len() {
        adamw8bit_update(&mut p[i], &mut m[i], &mut v[i], g[i], s);
    }
}

/// `update_range` compiled with hardware FMA: without it `mul_add` is a call into libm per
/// element. Same results either way (a fused multiply-add is exactly rounded).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn update_range_fma(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: &AdamWScalars) {
    update_range(p, m, v, g, s)
}

pub(crate) fn update(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: &AdamWScalars) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports FMA, checked just above.
        return unsafe { update_range_fma(p, m, v, g, s) };
    }
    update_range(p, m, v, g, s)
}

/// One AdamW8bit step of a buffer: `state1`/`absmax1` hold m (codes into `maps.m`, one absmax
/// per block of 256), `state2`/`absmax2` hold v. Parallel over blocks; each block is
/// dequantized, updated and requantized in one pass. Fresh state is codes 0 with absmax 0.
/// Panics if the lengths do not fit `p`.
#[allow(clippy::too_many_arguments)]
pub fn adamw8bit_step(
    p: &mut [f32],
    g: &[f32],
    state1: &mut [u8],
    absmax1: &mut [f32],
    state2: &mut [u8],
    absmax2: &mut [f32],
    maps: &Maps8bit,
    s: &AdamWScalars,
) {
    let n = p.len();
    let nb = blockwise::num_blocks(n, BLOCKSIZE_8BIT);
    assert!(g.len() == n && state1.len() == n && state2.len() == n, "adamw8bit_step: buffer lengths differ");
    assert!(absmax1.len() == nb && absmax2.len() == nb, "adamw8bit_step: {n} elements need {nb} absmax values");
    const B: usize = BLOCKSIZE_8BIT;
    p.par_chunks_mut(B)
        .zip(g.par_chunks(B))
        .zip(state1.par_chunks_mut(B))
        .zip(state2.par_chunks_mut(B))
        .zip(absmax1.par_iter_mut())
        .zip(absmax2.par_iter_mut())
        .for_each(|(((((p, g), c1), c2), a1), a2)| {
            let (mut m, mut v) = ([0f32; B], [0f32; B]);
            let (m, v) = (&mut m[..p.len()], &mut v[..p.len()]);
            maps.m.dequantize_block(c1, *a1, m);
            maps.v.dequantize_block(c2, *a2, v);
            update(p, m, v, g, s);
            *a1 = maps.m.quantize_block(m, c1);
            *a2 = maps.v.quantize_block(v, c2);
        });
}

/// One step of every slot (`backend::Optim::adamw8bit` on the CPU).
pub(crate) fn step_slots(slots: &mut [AdamW8bitSlot], scalars: &AdamWScalars) -> Result<()> {
    for slot in slots.iter_mut() {
        let mut s = *scalars;
        if !slot.decay {
            s.decay = 1.0;
        }
        let g = super::f32_in("adamw8bit", slot.g)?;
        let p = slot.p.f32s_mut()?;
        match &mut slot.state {
            Adam8State::F32 { m, v } => update(p, m.f32s_mut()?, v.f32s_mut()?, g, &s),
            Adam8State::Q8 { state1, absmax1, state2, absmax2 } => adamw8bit_step(
                p,
                g,
                state1.u8s_mut()?,
                absmax1.f32s_mut()?,
                state2.u8s_mut()?,
                absmax2.f32s_mut()?,
                maps(),
                &s,
            ),
        }
    }
    Ok(())
}
