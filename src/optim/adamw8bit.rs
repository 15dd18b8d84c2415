//! AdamW with 8-bit blockwise-quantized moments, matching bitsandbytes' AdamW8bit on the CPU
//! step for step (its codes bit for bit; see tests/adamw8bit.rs).
//!
//! A parameter with at least `MIN_8BIT_SIZE` elements keeps m as u8 codes into the signed
//! dynamic map and v as codes into the unsigned one, each with an f32 absmax per block of 256
//! (2 bytes per parameter plus 8 bytes per 256, against fp32 AdamW's 8). Smaller parameters
//! (biases, layernorm weights) keep f32 moments, as bitsandbytes does below min_8bit_size.
//! Each step, per block: dequantize m and v, update them and the parameter, requantize.
//!
//! The update is bitsandbytes' CPU algorithm, in f32 (operation order: `adamw8bit_update`):
//!   m = m b1 + g (1 - b1);  v = v b2 + g g (1 - b2)
//!   p *= 1 - lr wd;  p += -(lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! the same math as `adamw::adamw_update` (torch's AdamW), rounded differently.

use super::adamw::{AdamWConfig, AdamWScalars};
use crate::nn::ParamStore;
use crate::quant::blockwise::{self, CodeLut, BLOCKSIZE_8BIT};
use crate::tape::Gradients;
use crate::{Error, Result, Tensor};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};

/// Parameters with fewer elements keep f32 moments (bitsandbytes' min_8bit_size).
pub const MIN_8BIT_SIZE: usize = 4096;

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

fn update(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: &AdamWScalars) {
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

/// The moments of one parameter.
#[derive(Clone)]
enum Moments {
    F32 { m: Vec<f32>, v: Vec<f32> },
    Q8 { state1: Vec<u8>, absmax1: Vec<f32>, state2: Vec<u8>, absmax2: Vec<f32> },
}

impl Moments {
    fn zeros(n: usize) -> Self {
        if n < MIN_8BIT_SIZE {
            Moments::F32 { m: vec![0.0; n], v: vec![0.0; n] }
        } else {
            let nb = blockwise::num_blocks(n, BLOCKSIZE_8BIT);
            Moments::Q8 { state1: vec![0; n], absmax1: vec![0.0; nb], state2: vec![0; n], absmax2: vec![0.0; nb] }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Moments::F32 { m, v } => 4 * (m.len() + v.len()),
            Moments::Q8 { state1, absmax1, state2, absmax2 } => {
                state1.len() + state2.len() + 4 * (absmax1.len() + absmax2.len())
            }
        }
    }
}

/// AdamW with 8-bit moments over a model's trainable parameters, with `AdamW`'s interface.
/// Weight decay applies only to matrices (2-D and up), as kiln's AdamW does.
pub struct AdamW8bit {
    pub config: AdamWConfig,
    step: u64,
    state: HashMap<String, Moments>,
    maps: Maps8bit,
}

impl AdamW8bit {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW8bit { config, step: 0, state: HashMap::new(), maps: Maps8bit::default() }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Bytes of optimizer state: 2 per scalar plus 8 per block of 256 for 8-bit parameters,
    /// 8 per scalar for those under `MIN_8BIT_SIZE`.
    pub fn state_bytes(&self) -> usize {
        self.state.values().map(Moments::bytes).sum()
    }

    /// The state as tensors for a checkpoint: `state1.<param>` (U8), `absmax1.<param>`,
    /// `state2.<param>` (U8), `absmax2.<param>` for 8-bit parameters (bitsandbytes' names);
    /// `exp_avg.<param>` and `exp_avg_sq.<param>` (torch's) for the f32 ones.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut names: Vec<&String> = self.state.keys().collect();
        names.sort();
        let mut out = Vec::new();
        for n in names {
            match &self.state[n] {
                Moments::F32 { m, v } => {
                    out.push((format!("exp_avg.{n}"), Tensor::from_f32(m.clone(), [m.len()])?));
                    out.push((format!("exp_avg_sq.{n}"), Tensor::from_f32(v.clone(), [v.len()])?));
                }
                Moments::Q8 { state1, absmax1, state2, absmax2 } => {
                    out.push((format!("state1.{n}"), Tensor::from_u8(state1.clone(), [state1.len()])?));
                    out.push((format!("absmax1.{n}"), Tensor::from_f32(absmax1.clone(), [absmax1.len()])?));
                    out.push((format!("state2.{n}"), Tensor::from_u8(state2.clone(), [state2.len()])?));
                    out.push((format!("absmax2.{n}"), Tensor::from_f32(absmax2.clone(), [absmax2.len()])?));
                }
            }
        }
        Ok(out)
    }

    /// Restores state saved by `state_tensors` and the step count, checking each against the
    /// parameter it belongs to. f32 moments saved by `AdamW` (exp_avg, exp_avg_sq) are accepted
    /// for 8-bit parameters too and quantized, so an fp32 AdamW run can resume in 8 bits.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, step: u64, params: &ParamStore) -> Result<()> {
        self.load_state_all(tensors, step, &[params])
    }

    /// `load_state` over several stores (a base model and its adapter).
    pub fn load_state_all(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        step: u64,
        stores: &[&ParamStore],
    ) -> Result<()> {
        let mut state = HashMap::new();
        for p in stores.iter().flat_map(|s| s.iter()).filter(|p| p.trainable) {
            let n = p.tensor.numel();
            let nb = blockwise::num_blocks(n, BLOCKSIZE_8BIT);
            let get = |kind: &str| tensors.get(&format!("{kind}.{}", p.name));
            let wrong = |kind: &str, got: usize, want: usize| {
                Error::Mismatch(format!(
                    "optimizer state {kind}.{} has {got} elements but the parameter {} needs {want} \
                     ({n} elements): the checkpoint belongs to another model",
                    p.name, p.name
                ))
            };
            let moments = if get("state1").is_some() {
                if n < MIN_8BIT_SIZE {
                    return Err(Error::Mismatch(format!(
                        "optimizer state for {} is 8-bit, but a parameter of {n} elements keeps f32 moments \
                         (under {MIN_8BIT_SIZE}): the checkpoint belongs to another model or optimizer",
                        p.name
                    )));
                }
                let mut parts = Vec::new();
                for (kind, want) in [("state1", n), ("absmax1", nb), ("state2", n), ("absmax2", nb)] {
                    let t = get(kind).ok_or_else(|| {
                        Error::Mismatch(format!(
                            "the checkpoint has state1.{} but no {kind}.{}: its optimizer state is incomplete",
                            p.name, p.name
                        ))
                    })?;
                    if t.numel() != want {
                        return Err(wrong(kind, t.numel(), want));
                    }
                    parts.push(t);
                }
                Moments::Q8 {
                    state1: parts[0].u8s()?.to_vec(),
                    absmax1: parts[1].f32s()?.to_vec(),
                    state2: parts[2].u8s()?.to_vec(),
                    absmax2: parts[3].f32s()?.to_vec(),
                }
            } else if let (Some(m), Some(v)) = (get("exp_avg"), get("exp_avg_sq")) {
                for (kind, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                    if t.numel() != n {
                        return Err(wrong(kind, t.numel(), n));
                    }
                }
                let (m, v) = (m.f32s()?, v.f32s()?);
                match Moments::zeros(n) {
                    Moments::F32 { .. } => Moments::F32 { m: m.to_vec(), v: v.to_vec() },
                    Moments::Q8 { mut state1, mut absmax1, mut state2, mut absmax2 } => {
                        blockwise::quantize_blockwise_lut(m, &self.maps.m, BLOCKSIZE_8BIT, &mut state1, &mut absmax1);
                        blockwise::quantize_blockwise_lut(v, &self.maps.v, BLOCKSIZE_8BIT, &mut state2, &mut absmax2);
                        Moments::Q8 { state1, absmax1, state2, absmax2 }
                    }
                }
            } else {
                continue;
            };
            state.insert(p.name.clone(), moments);
        }
        self.state = state;
        self.step = step;
        Ok(())
    }

    /// One update at learning rate `lr` of every trainable parameter that has a gradient.
    pub fn step(&mut self, params: &mut ParamStore, grads: &Gradients, lr: f64) -> Result<()> {
        self.step_all(&mut [params], grads, lr)
    }

    /// One update of every trainable parameter in several stores (a base model and its adapter):
    /// one optimizer step, so the bias correction advances once.
    pub fn step_all(&mut self, stores: &mut [&mut ParamStore], grads: &Gradients, lr: f64) -> Result<()> {
        let _t = crate::profile::scope("adamw8bit", crate::profile::Phase::Optimizer);
        self.step += 1;
        let (state, config, maps, t) = (&mut self.state, &self.config, &self.maps, self.step);
        super::for_each_update("adamw8bit", stores, grads, |p, g, decay| {
            let s = AdamWScalars::new(config, lr, t, decay);
            let n = g.len();
            let w = p.tensor.f32s_mut()?;
            match state.entry(p.name.clone()).or_insert_with(|| Moments::zeros(n)) {
                Moments::F32 { m, v } => update(w, m, v, g, &s),
                Moments::Q8 { state1, absmax1, state2, absmax2 } => {
                    adamw8bit_step(w, g, state1, absmax1, state2, absmax2, maps, &s);
                }
            }
            Ok(())
        })?;
        Ok(())
    }
}
