//! Gradient checkpointing: a node standing for a whole sub-computation (a transformer block) run
//! without recording. Its backward re-runs the sub-computation on a fresh tape, watching the
//! node's inputs, and back-propagates the incoming gradient through it. Memory: the input is
//! kept, the activations inside are not; time: one extra forward of the block in backward.

use crate::tape::{Op, Tape};
use crate::{Result, Tensor};

/// Re-runs the checkpointed computation on `tape` from its input.
pub type Recompute = Box<dyn Fn(&mut Tape, &Tensor) -> Result<Tensor>>;

pub(crate) struct Saved {
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
    tape.record(Op::Checkpoint(Saved { recompute, x: x.clone(), params }), &refs, out);
}

pub(crate) fn backward(s: &Saved, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
    let mut sub = Tape::new();
    if needs[0] {
        sub.watch(&s.x);
    }
    for (p, &need) in s.params.iter().zip(&needs[1..]) {
        if need {
            sub.watch(p);
        }
    }
    let out = (s.recompute)(&mut sub, &s.x)?;
    let grads = sub.backward_from(&out, dout.clone())?;
    let mut res = vec![needs[0].then(|| grads.get(&s.x).cloned()).flatten()];
    res.extend(s.params.iter().zip(&needs[1..]).map(|(p, &need)| need.then(|| grads.get(p).cloned()).flatten()));
    Ok(res)
}
