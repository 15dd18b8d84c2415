//! AdamW (Loshchilov & Hutter) with decoupled weight decay and fp32 moments, matching
//! torch.optim.AdamW step for step:
//!   p *= 1 - lr * wd
//!   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//!   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

use crate::backend::{backend, AdamWSlot};
use crate::nn::ParamStore;
use crate::tape::Gradients;
use crate::{Device, Error, Result, Tensor};
use std::collections::HashMap;

/// AdamW hyper-parameters. Kept in f64, as PyTorch keeps them (Python floats), so that the
/// per-step scalars below round to the same f32 values as torch's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// The f32 scalars of one step, computed in f64 like torch computes them from Python floats. The
/// struct is defined in kernels/kiln_kernels.h and generated for Rust, so the AdamW kernel and
/// this update read the same layout.
pub use crate::abi::AdamWScalars;

impl AdamWScalars {
    /// The scalars for 1-based step `t` at learning rate `lr`.
    pub fn new(cfg: &AdamWConfig, lr: f64, t: u64, decay: bool) -> Self {
        let t = t as i32;
        AdamWScalars {
            decay: if decay { (1.0 - lr * cfg.weight_decay) as f32 } else { 1.0 },
            beta1: cfg.beta1 as f32,
            one_minus_beta1: (1.0 - cfg.beta1) as f32,
            beta2: cfg.beta2 as f32,
            one_minus_beta2: (1.0 - cfg.beta2) as f32,
            step_size: (lr / (1.0 - cfg.beta1.powi(t))) as f32,
            bc2_sqrt: (1.0 - cfg.beta2.powi(t)).sqrt() as f32,
            eps: cfg.eps as f32,
        }
    }
}

pub use crate::backend::cpu::adamw::adamw_update;

/// Applies AdamW to one buffer at 1-based step `t`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    cfg: &AdamWConfig,
    lr: f64,
    t: u64,
    decay: bool,
) {
    crate::backend::cpu::adamw::adamw_step(p, m, v, g, &AdamWScalars::new(cfg, lr, t, decay));
}

/// AdamW over a model's trainable parameters. By GPT-2 practice, weight decay applies only to
/// matrices (2-D and up), never to biases or layernorm weights.
pub struct AdamW {
    pub config: AdamWConfig,
    step: u64,
    /// The two moments of each parameter that has stepped, f32 [numel] on the parameter's
    /// device (moments restored from a checkpoint move there on their first step).
    state: HashMap<String, (Tensor, Tensor)>,
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
        self.state.values().map(|(m, v)| 4 * (m.numel() + v.numel())).sum()
    }

    /// The moments as tensors named `exp_avg.<param>` and `exp_avg_sq.<param>` (torch's names),
    /// for saving with a checkpoint (host copies).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut names: Vec<&String> = self.state.keys().collect();
        names.sort();
        let mut out = Vec::with_capacity(2 * names.len());
        for n in names {
            let (m, v) = &self.state[n];
            out.push((format!("exp_avg.{n}"), m.to_device(Device::Cpu)?));
            out.push((format!("exp_avg_sq.{n}"), v.to_device(Device::Cpu)?));
        }
        Ok(out)
    }

    /// Restores moments saved by `state_tensors` and the step count, checking each against the
    /// parameter it belongs to.
    pub fn load_state(
        &mut self,
        tensors: &std::collections::BTreeMap<String, Tensor>,
        step: u64,
        params: &ParamStore,
    ) -> Result<()> {
        self.load_state_all(tensors, step, &[params])
    }

    /// `load_state` over several stores (a base model and its adapter).
    pub fn load_state_all(
        &mut self,
        tensors: &std::collections::BTreeMap<String, Tensor>,
        step: u64,
        stores: &[&ParamStore],
    ) -> Result<()> {
        self.state.clear();
        for p in stores.iter().flat_map(|s| s.iter()).filter(|p| p.trainable) {
            let (Some(m), Some(v)) =
                (tensors.get(&format!("exp_avg.{}", p.name)), tensors.get(&format!("exp_avg_sq.{}", p.name)))
            else {
                continue;
            };
            if m.numel() != p.tensor.numel() || v.numel() != p.tensor.numel() {
                return Err(Error::Mismatch(format!(
                    "optimizer state for {} has {} elements but the parameter has {}: the checkpoint belongs to another model",
                    p.name,
                    m.numel(),
                    p.tensor.numel()
                )));
            }
            let moment = |t: &Tensor| Tensor::from_f32(t.f32s()?.to_vec(), [t.numel()]);
            self.state.insert(p.name.clone(), (moment(m)?, moment(v)?));
        }
        self.step = step;
        Ok(())
    }

    /// One update at learning rate `lr` of every trainable parameter that has a gradient.
    pub fn step(&mut self, params: &mut ParamStore, grads: &Gradients, lr: f64) -> Result<()> {
        self.step_all(&mut [params], grads, lr)
    }

    /// One update of every trainable parameter in several stores (a base model and its adapter):
    /// one optimizer step, so the bias correction advances once. Each device's parameters go to
    /// its backend together (on the GPU, one multi-tensor launch).
    pub fn step_all(&mut self, stores: &mut [&mut ParamStore], grads: &Gradients, lr: f64) -> Result<()> {
        let _t = crate::profile::scope("adamw", crate::profile::Phase::Optimizer);
        self.step += 1;
        // Each gradient is looked up before its parameter is written (a write may give a parameter
        // tensor a new identity).
        let mut params: Vec<(&mut crate::nn::Param, &Tensor)> = Vec::new();
        for p in stores.iter_mut().flat_map(|s| s.iter_mut()).filter(|p| p.trainable) {
            let Some(g) = grads.get(&p.tensor) else { continue };
            if g.numel() != p.tensor.numel() {
                return Err(Error::shape(
                    "adamw",
                    format!("gradient of {} has {} elements, the parameter {}", p.name, g.numel(), p.tensor.numel()),
                ));
            }
            let device = p.tensor.device();
            let (m, v) = match self.state.remove(&p.name) {
                Some((m, v)) => (m.to_device(device)?, v.to_device(device)?),
                None => {
                    let zeros = || Tensor::zeros([p.tensor.numel()]).to_device(device);
                    (zeros()?, zeros()?)
                }
            };
            self.state.insert(p.name.clone(), (m, v));
            params.push((p, g));
        }
        let mut moments: HashMap<&str, &mut (Tensor, Tensor)> =
            self.state.iter_mut().map(|(k, mv)| (k.as_str(), mv)).collect();
        let mut by_device: Vec<(Device, Vec<AdamWSlot>)> = Vec::new();
        for (p, g) in params {
            let decay = p.tensor.dims().len() >= 2;
            let Some((m, v)) = moments.remove(p.name.as_str()).map(|mv| (&mut mv.0, &mut mv.1)) else {
                // two trainable parameters share a name: the second finds the first's moments taken
                return Err(Error::Input(format!("adamw: two trainable parameters are named {}", p.name)));
            };
            let device = p.tensor.device();
            let slot = AdamWSlot { p: &mut p.tensor, m, v, g, decay };
            match by_device.iter_mut().find(|(d, _)| *d == device) {
                Some((_, slots)) => slots.push(slot),
                None => by_device.push((device, vec![slot])),
            }
        }
        let scalars = AdamWScalars::new(&self.config, lr, self.step, true);
        for (device, mut slots) in by_device {
            backend(device)?.adamw(&mut slots, &scalars)?;
        }
        Ok(())
    }
}
