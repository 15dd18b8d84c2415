//! Optimizers: AdamW with fp32 moments, and AdamW8bit with bitsandbytes' blockwise 8-bit moments.
//! The training loop sees either through `Optimizer`.

pub mod adamw;
pub mod adamw8bit;
pub use adamw::{AdamW, AdamWConfig, AdamWScalars};
pub use adamw8bit::AdamW8bit;

use crate::nn::ParamStore;
use crate::tape::Gradients;
use crate::{Result, Tensor};
use std::collections::BTreeMap;

/// Calls `update(param, gradient, decay)` for every trainable parameter of `stores` that has a
/// gradient, after checking the sizes agree. By GPT-2 practice weight decay applies only to
/// matrices (2-D and up), never to biases or layernorm weights. Both optimizers step through this.
pub(crate) fn for_each_update(
    op: &'static str,
    stores: &mut [&mut ParamStore],
    grads: &Gradients,
    mut update: impl FnMut(&mut crate::nn::Param, &[f32], bool) -> Result<()>,
) -> Result<()> {
    for p in stores.iter_mut().flat_map(|s| s.iter_mut()).filter(|p| p.trainable) {
        let Some(g) = grads.get(&p.tensor) else {
            continue;
        };
        let g = g.f32s()?;
        if g.len() != p.tensor.numel() {
            return Err(crate::Error::shape(
                op,
                format!("gradient of {} has {} elements, the parameter {}", p.name, g.len(), p.tensor.numel()),
            ));
        }
        let decay = p.tensor.dims().len() >= 2;
        update(p, g, decay)?;
    }
    Ok(())
}

/// What the training loop and checkpoints need from an optimizer.
pub trait Optimizer {
    /// One update of every trainable parameter in `stores` that has a gradient.
    fn step_all(&mut self, stores: &mut [&mut ParamStore], grads: &Gradients, lr: f64) -> Result<()>;
    /// The state as named tensors, for a checkpoint.
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>>;
    /// Restores what `state_tensors` saved, and the step count.
    fn load_state_all(&mut self, tensors: &BTreeMap<String, Tensor>, step: u64, stores: &[&ParamStore]) -> Result<()>;
    /// Bytes of state held now.
    fn state_bytes(&self) -> usize;
}

macro_rules! impl_optimizer {
    ($t:ty) => {
        impl Optimizer for $t {
            fn step_all(&mut self, stores: &mut [&mut ParamStore], grads: &Gradients, lr: f64) -> Result<()> {
                <$t>::step_all(self, stores, grads, lr)
            }
            fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
                <$t>::state_tensors(self)
            }
            fn load_state_all(
                &mut self,
                tensors: &BTreeMap<String, Tensor>,
                step: u64,
                stores: &[&ParamStore],
            ) -> Result<()> {
                <$t>::load_state_all(self, tensors, step, stores)
            }
            fn state_bytes(&self) -> usize {
                <$t>::state_bytes(self)
            }
        }
    };
}
impl_optimizer!(AdamW);
impl_optimizer!(AdamW8bit);
