//! Gradient checkpointing: a node standing for a whole sub-computation (a transformer block) run
//! without recording. Its backward re-runs the sub-computation on a fresh tape, watching the
//! node's inputs, and back-propagates the incoming gradient through it. Memory: the input is
//! kept, the activations inside are not; time: one extra forward of the block in backward.

use crate::tape::{Op, Tape};
use crate::{Result, Tensor};

/// Re-runs the checkpointed computation on `tape` from its input.
pub type Recompute = Box<dyn Fn(&mut Tape, &Tensor) -> Result<Tensor>>;

struct Checkpoint {
    recompute: Recompute,
    x: Tensor,
    /// The parameters the computation reads that need gradients, in input order after x.
    params: Vec<Tensor>,
}

/// Records a checkpoint node: inputs x and `params`, output `out` (already computed).
pub fn record(tape: &mut Tape, recompute: Recompute, x: &Tensor, params: Vec<Tensor>, out: &Tensor) {
    let mut inputs: Vec<&Tensor> = vec![x];
    inputs.extend(params.iter());
    let inputs: Vec<Tensor> = inputs.into_iter().cloned().collect();
    let refs: Vec<&Tensor> = inputs.iter().collect();
    tape.record(Checkpoint { recompute, x: x.clone(), params }, &refs, out);
}

impl Op for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpoint"
    }
    fn backward(&self, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let mut sub = Tape::new();
        if needs[0] {
            sub.watch(&self.x);
        }
        for (p, &need) in self.params.iter().zip(&needs[1..]) {
            if need {
                sub.watch(p);
            }
        }
        let out = (self.recompute)(&mut sub, &self.x)?;
        let grads = sub.backward_from(&out, dout.clone())?;
        let mut res = vec![needs[0].then(|| grads.get(&self.x).cloned()).flatten()];
        res.extend(self.params.iter().zip(&needs[1..]).map(|(p, &need)| need.then(|| grads.get(p).cloned()).flatten()));
        Ok(res)
    }
}
