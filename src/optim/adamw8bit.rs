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
use crate::backend::{backend, Adam8State, AdamW8bitSlot};
use crate::nn::ParamStore;
use crate::quant::blockwise::{self, BLOCKSIZE_8BIT};
use crate::tape::Gradients;
use crate::{DType, Device, Error, Result, Tensor};
use std::collections::{BTreeMap, HashMap};

pub use crate::backend::cpu::adamw8bit::{adamw8bit_step, adamw8bit_update, maps, Maps8bit};

/// Parameters with fewer elements keep f32 moments (bitsandbytes' min_8bit_size).
pub const MIN_8BIT_SIZE: usize = 4096;

/// The moments of one parameter, on its device.
#[derive(Clone)]
enum Moments {
    F32 { m: Tensor, v: Tensor },
    Q8 { state1: Tensor, absmax1: Tensor, state2: Tensor, absmax2: Tensor },
}

impl Moments {
    /// Fresh state for `n` elements (8-bit codes 0 with absmax 0 decode to zeros) on the host.
    fn zeros(n: usize) -> Result<Self> {
        Ok(if n < MIN_8BIT_SIZE {
            Moments::F32 { m: Tensor::zeros([n]), v: Tensor::zeros([n]) }
        } else {
            let nb = blockwise::num_blocks(n, BLOCKSIZE_8BIT);
            let codes = || Tensor::from_u8(vec![0; n], [n]);
            Moments::Q8 {
                state1: codes()?,
                absmax1: Tensor::zeros([nb]),
                state2: codes()?,
                absmax2: Tensor::zeros([nb]),
            }
        })
    }

    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Moments::F32 { m, v } => vec![m, v],
            Moments::Q8 { state1, absmax1, state2, absmax2 } => vec![state1, absmax1, state2, absmax2],
        }
    }

    fn bytes(&self) -> usize {
        self.tensors().iter().map(|t| t.numel() * t.dtype().size_in_bytes()).sum()
    }

    /// The state on `device` (moved there once, on its first step after a load).
    fn into_device(self, device: Device) -> Result<Self> {
        if self.tensors().iter().all(|t| t.device() == device) {
            return Ok(self);
        }
        Ok(match self {
            Moments::F32 { m, v } => Moments::F32 { m: m.to_device(device)?, v: v.to_device(device)? },
            Moments::Q8 { state1, absmax1, state2, absmax2 } => Moments::Q8 {
                state1: state1.to_device(device)?,
                absmax1: absmax1.to_device(device)?,
                state2: state2.to_device(device)?,
                absmax2: absmax2.to_device(device)?,
            },
        })
    }

    fn slot(&mut self) -> Adam8State<'_> {
        match self {
            Moments::F32 { m, v } => Adam8State::F32 { m, v },
            Moments::Q8 { state1, absmax1, state2, absmax2 } => Adam8State::Q8 { state1, absmax1, state2, absmax2 },
        }
    }
}

/// AdamW with 8-bit moments over a model's trainable parameters, with `AdamW`'s interface.
/// Weight decay applies only to matrices (2-D and up), as kiln's AdamW does.
pub struct AdamW8bit {
    pub config: AdamWConfig,
    step: u64,
    /// Each stepped parameter's moments, on the parameter's device.
    state: HashMap<String, Moments>,
}

impl AdamW8bit {
    pub fn new(config: AdamWConfig) -> Self {
        AdamW8bit { config, step: 0, state: HashMap::new() }
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
            let kinds: &[&str] = match &self.state[n] {
                Moments::F32 { .. } => &["exp_avg", "exp_avg_sq"],
                Moments::Q8 { .. } => &["state1", "absmax1", "state2", "absmax2"],
            };
            for (kind, t) in kinds.iter().zip(self.state[n].tensors()) {
                out.push((format!("{kind}.{n}"), t.to_device(Device::Cpu)?));
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
            let wrong_dtype = |kind: &str, t: &Tensor, want: DType| -> Result<()> {
                if t.dtype() == want {
                    return Ok(());
                }
                Err(Error::Mismatch(format!(
                    "optimizer state {kind}.{} is {:?}, but 8-bit AdamW keeps it as {want:?}: the checkpoint's optimizer \
                     state was written by another tool or is damaged",
                    p.name,
                    t.dtype()
                )))
            };
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
                for (kind, want, dtype) in [
                    ("state1", n, DType::U8),
                    ("absmax1", nb, DType::F32),
                    ("state2", n, DType::U8),
                    ("absmax2", nb, DType::F32),
                ] {
                    let t = get(kind).ok_or_else(|| {
                        Error::Mismatch(format!(
                            "the checkpoint has state1.{} but no {kind}.{}: its optimizer state is incomplete",
                            p.name, p.name
                        ))
                    })?;
                    if t.numel() != want {
                        return Err(wrong(kind, t.numel(), want));
                    }
                    wrong_dtype(kind, t, dtype)?;
                    parts.push(t);
                }
                let host = |t: &Tensor| t.to_device(Device::Cpu);
                Moments::Q8 {
                    state1: host(parts[0])?,
                    absmax1: host(parts[1])?,
                    state2: host(parts[2])?,
                    absmax2: host(parts[3])?,
                }
            } else if let (Some(m), Some(v)) = (get("exp_avg"), get("exp_avg_sq")) {
                for (kind, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                    if t.numel() != n {
                        return Err(wrong(kind, t.numel(), n));
                    }
                    wrong_dtype(kind, t, DType::F32)?;
                }
                let (m, v) = (m.to_device(Device::Cpu)?, v.to_device(Device::Cpu)?);
                match Moments::zeros(n)? {
                    Moments::F32 { .. } => Moments::F32 { m, v },
                    Moments::Q8 { mut state1, mut absmax1, mut state2, mut absmax2 } => {
                        let q = |x: &Tensor, lut, codes: &mut Tensor, absmax: &mut Tensor| -> Result<()> {
                            let (codes, absmax) = (codes.u8s_mut()?, absmax.f32s_mut()?);
                            blockwise::quantize_blockwise_lut(x.f32s()?, lut, BLOCKSIZE_8BIT, codes, absmax);
                            Ok(())
                        };
                        q(&m, &maps().m, &mut state1, &mut absmax1)?;
                        q(&v, &maps().v, &mut state2, &mut absmax2)?;
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
        // As AdamW: each gradient is looked up before its parameter is written, the state moves
        // to the parameter's device, and each device's parameters step in one backend call.
        let mut params: Vec<(&mut crate::nn::Param, &Tensor)> = Vec::new();
        for p in stores.iter_mut().flat_map(|s| s.iter_mut()).filter(|p| p.trainable) {
            let Some(g) = grads.get(&p.tensor) else { continue };
            let n = p.tensor.numel();
            if g.numel() != n {
                return Err(Error::shape(
                    "adamw8bit",
                    format!("gradient of {} has {} elements, the parameter {n}", p.name, g.numel()),
                ));
            }
            let moments = match self.state.remove(&p.name) {
                Some(m) => m,
                None => Moments::zeros(n)?,
            };
            self.state.insert(p.name.clone(), moments.into_device(p.tensor.device())?);
            params.push((p, g));
        }
        let mut moments: HashMap<&str, &mut Moments> = self.state.iter_mut().map(|(k, m)| (k.as_str(), m)).collect();
        let mut by_device: Vec<(Device, Vec<AdamW8bitSlot>)> = Vec::new();
        for (p, g) in params {
            let decay = p.tensor.dims().len() >= 2;
            let Some(state) = moments.remove(p.name.as_str()) else {
                return Err(Error::Input(format!("adamw8bit: two trainable parameters are named {}", p.name)));
            };
            let device = p.tensor.device();
            let slot = AdamW8bitSlot { p: &mut p.tensor, g, state: state.slot(), decay };
            match by_device.iter_mut().find(|(d, _)| *d == device) {
                Some((_, slots)) => slots.push(slot),
                None => by_device.push((device, vec![slot])),
            }
        }
        let scalars = AdamWScalars::new(&self.config, lr, self.step, true);
        for (device, mut slots) in by_device {
            backend(device)?.adamw8bit(&mut slots, &scalars)?;
        }
        Ok(())
    }
}
