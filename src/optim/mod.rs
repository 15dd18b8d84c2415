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
