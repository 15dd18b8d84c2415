//! AdamW (Loshchilov & Hutter) with decoupled weight decay and fp32 moments, matching
//! torch.optim.AdamW step for step:
//!   p *= 1 - lr * wd
//!   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//!   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

use crate::nn::ParamStore;
use crate::tape::Gradients;
use crate::{Error, Result};
use rayon::prelude::*;
use std::collections::HashMap;

/// AdamW hyper-parameters (torch's defaults but for weight decay, which GPT-2 recipes set).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// One AdamW update of `p` in place, at 1-based step `t`; `decay` turns weight decay on.
/// Shared with the CUDA kernel's host twin, so both sides use this arithmetic.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn adamw_update(
    p: &mut f32,
    m: &mut f32,
    v: &mut f32,
    g: f32,
    lr: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    wd: f32,
    bc1: f32,
    bc2_sqrt: f32,
) {
    *p *= 1.0 - lr * wd;
    *m = b1 * *m + (1.0 - b1) * g;
    *v = b2 * *v + (1.0 - b2) * g * g;
    *p -= (lr / bc1) * *m / ((*v).sqrt() / bc2_sqrt + eps);
}

/// Applies AdamW to one buffer. `t` is the 1-based step count.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    cfg: &AdamWConfig,
    lr: f32,
    t: u64,
    decay: bool,
) {
    let bc1 = 1.0 - cfg.beta1.powi(t as i32);
    let bc2_sqrt = (1.0 - cfg.beta2.powi(t as i32)).sqrt();
    let wd = if decay { cfg.weight_decay } else { 0.0 };
    const CHUNK: usize = 1 << 14;
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| {
            for i in 0..p.len() {
                adamw_update(
                    &mut p[i], &mut m[i], &mut v[i], g[i], lr, cfg.beta1, cfg.beta2, cfg.eps, wd, bc1, bc2_sqrt,
                );
            }
        });
}

/// AdamW over a model's trainable parameters. By GPT-2 practice, weight decay applies only to
/// matrices (2-D and up), never to biases or layernorm weights.
pub struct AdamW {
    pub config: AdamWConfig,
    step: u64,
    state: HashMap<String, (Vec<f32>, Vec<f32>)>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW { config, step: 0, state: HashMap::new() }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Bytes of optimizer state (two f32 moments per trainable scalar once stepped).
    pub fn state_bytes(&self) -> usize {
        self.state.values().map(|(m, v)| 4 * (m.len() + v.len())).sum()
    }

    /// One update at learning rate `lr` of every trainable parameter that has a gradient.
    pub fn step(&mut self, params: &mut ParamStore, grads: &Gradients, lr: f32) -> Result<()> {
        let _t = crate::profile::scope("adamw", crate::profile::Phase::Optimizer);
        self.step += 1;
        for p in params.iter_mut().filter(|p| p.trainable) {
            let Some(g) = grads.get(&p.tensor) else {
                continue;
            };
            let g = g.f32s()?;
            let n = p.tensor.numel();
            if g.len() != n {
                return Err(Error::shape(
                    "adamw",
                    format!("gradient of {} has {} elements, the parameter {n}", p.name, g.len()),
                ));
            }
            let decay = p.tensor.dims().len() >= 2;
            let (m, v) = self.state.entry(p.name.clone()).or_insert_with(|| (vec![0.0; n], vec![0.0; n]));
            adamw_step(p.tensor.f32s_mut()?, m, v, g, &self.config, lr, self.step, decay);
        }
        Ok(())
    }
}
