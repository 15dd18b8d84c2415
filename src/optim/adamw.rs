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
    let s = AdamWScalars::new(cfg, lr, t, decay);
    const CHUNK: usize = 1 << 14;
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| {
            for i in 0..p.len() {
                adamw_update(&mut p[i], &mut m[i], &mut v[i], g[i], &s);
            }
        });
}

/// AdamW over a model's trainable parameters. By GPT-2 practice, weight decay applies only to
/// matrices (2-D and up), never to biases or layernorm weights.
pub struct AdamW {
    pub config: AdamWConfig,
    step: u64,
    state: HashMap<String, (Vec<f32>, Vec<f32>)>,
    /// The moments of parameters that live on the GPU (one multi-tensor launch per step).
    #[cfg(feature = "cuda")]
    gpu_state: HashMap<String, (crate::backend::cuda::DevBuf<f32>, crate::backend::cuda::DevBuf<f32>)>,
}

impl AdamW {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW {
            config,
            step: 0,
            state: HashMap::new(),
            #[cfg(feature = "cuda")]
            gpu_state: HashMap::new(),
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Bytes of optimizer state (two f32 moments per trainable scalar once stepped).
    pub fn state_bytes(&self) -> usize {
        let cpu: usize = self.state.values().map(|(m, v)| 4 * (m.len() + v.len())).sum();
        #[cfg(feature = "cuda")]
        let cpu = cpu + self.gpu_state.values().map(|(m, v)| 4 * (m.len() + v.len())).sum::<usize>();
        cpu
    }

    /// The moments as tensors named `exp_avg.<param>` and `exp_avg_sq.<param>` (torch's names),
    /// for saving with a checkpoint.
    pub fn state_tensors(&self) -> Result<Vec<(String, crate::Tensor)>> {
        let mut names: Vec<&String> = self.state.keys().collect();
        #[cfg(feature = "cuda")]
        names.extend(self.gpu_state.keys());
        names.sort();
        let mut out = Vec::with_capacity(2 * names.len());
        for n in names {
            #[cfg(feature = "cuda")]
            if let Some((m, v)) = self.gpu_state.get(n) {
                let cu = crate::backend::cuda::cuda()?;
                out.push((format!("exp_avg.{n}"), crate::Tensor::from_f32(cu.download(m)?, [m.len()])?));
                out.push((format!("exp_avg_sq.{n}"), crate::Tensor::from_f32(cu.download(v)?, [v.len()])?));
                continue;
            }
            let (m, v) = &self.state[n];
            out.push((format!("exp_avg.{n}"), crate::Tensor::from_f32(m.clone(), [m.len()])?));
            out.push((format!("exp_avg_sq.{n}"), crate::Tensor::from_f32(v.clone(), [v.len()])?));
        }
        Ok(out)
    }

    /// Restores moments saved by `state_tensors` and the step count, checking each against the
    /// parameter it belongs to.
    pub fn load_state(
        &mut self,
        tensors: &std::collections::BTreeMap<String, crate::Tensor>,
        step: u64,
        params: &ParamStore,
    ) -> Result<()> {
        self.load_state_all(tensors, step, &[params])
    }

    /// `load_state` over several stores (a base model and its adapter).
    pub fn load_state_all(
        &mut self,
        tensors: &std::collections::BTreeMap<String, crate::Tensor>,
        step: u64,
        stores: &[&ParamStore],
    ) -> Result<()> {
        self.state.clear();
        #[cfg(feature = "cuda")]
        self.gpu_state.clear();
        for p in stores.iter().flat_map(|s| s.iter()).filter(|p| p.trainable) {
            let (Some(m), Some(v)) =
                (tensors.get(&format!("exp_avg.{}", p.name)), tensors.get(&format!("exp_avg_sq.{}", p.name)))
            else {
                continue;
            };
            if m.numel() != p.tensor.numel() || v.numel() != p.tensor.numel() {
                return Err(Error::Input(format!(
                    "optimizer state for {} has {} elements but the parameter has {}: the checkpoint belongs to another model",
                    p.name,
                    m.numel(),
                    p.tensor.numel()
                )));
            }
            self.state.insert(p.name.clone(), (m.f32s()?.to_vec(), v.f32s()?.to_vec()));
        }
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
        let _t = crate::profile::scope("adamw", crate::profile::Phase::Optimizer);
        self.step += 1;
        #[cfg(feature = "cuda")]
        if stores.iter().flat_map(|s| s.iter()).any(|p| p.trainable && p.tensor.device() != crate::Device::Cpu) {
            return self.step_gpu(stores, grads, lr);
        }
        let (state, config, t) = (&mut self.state, &self.config, self.step);
        super::for_each_update("adamw", stores, grads, |p, g, decay| {
            let n = g.len();
            let (m, v) = state.entry(p.name.clone()).or_insert_with(|| (vec![0.0; n], vec![0.0; n]));
            adamw_step(p.tensor.f32s_mut()?, m, v, g, config, lr, t, decay);
            Ok(())
        })?;
        Ok(())
    }
}

#[cfg(feature = "cuda")]
impl AdamW {
    /// The GPU step: every trainable parameter that has a gradient in one multi-tensor launch.
    /// Moments restored from a checkpoint (host copies) are uploaded on first use.
    fn step_gpu(&mut self, stores: &mut [&mut ParamStore], grads: &Gradients, lr: f64) -> Result<()> {
        use crate::backend::cuda::{adamw::adamw_step_multi, adamw::AdamWParam, cuda};
        use crate::tensor::CudaStorage;
        let cu = cuda()?;
        let mut params: Vec<&mut crate::nn::Param> = Vec::new();
        for p in stores.iter_mut().flat_map(|s| s.iter_mut()).filter(|p| p.trainable) {
            let Some(g) = grads.get(&p.tensor) else { continue };
            if g.numel() != p.tensor.numel() {
                return Err(Error::Input(format!(
                    "adamw: gradient of {} has {} elements, the parameter {}",
                    p.name,
                    g.numel(),
                    p.tensor.numel()
                )));
            }
            if !self.gpu_state.contains_key(&p.name) {
                let moments = match self.state.remove(&p.name) {
                    Some((m, v)) => (cu.upload(&m)?, cu.upload(&v)?),
                    None => (cu.zeros::<f32>(p.tensor.numel())?, cu.zeros::<f32>(p.tensor.numel())?),
                };
                self.gpu_state.insert(p.name.clone(), moments);
            }
            params.push(p);
        }
        // Gradients are looked up before the parameters are borrowed mutably (a write may give a
        // parameter tensor a new identity).
        let gs: Vec<&crate::Tensor> = params.iter().map(|p| grads.get(&p.tensor).expect("checked above")).collect();
        let mut moments: HashMap<&str, (&mut _, &mut _)> =
            self.gpu_state.iter_mut().map(|(k, (m, v))| (k.as_str(), (m, v))).collect();
        let mut work = Vec::with_capacity(params.len());
        for (p, g) in params.into_iter().zip(gs) {
            let decay = p.tensor.dims().len() >= 2;
            let g = crate::ops::dev::f32_in("adamw", g)?;
            let (m, v) = moments.remove(p.name.as_str()).expect("inserted above");
            let name = p.name.clone();
            let Some(CudaStorage::F32(w)) = p.tensor.cuda_storage_mut() else {
                return Err(Error::Input(format!("adamw: {name} is not an f32 parameter on the GPU")));
            };
            work.push(AdamWParam { p: w, m, v, g, p_bf16: None, decay });
        }
        adamw_step_multi(&mut work, &AdamWScalars::new(&self.config, lr, self.step, true))
    }
}
