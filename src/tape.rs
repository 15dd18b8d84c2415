//! The autograd tape. Each coarse op (embedding, layernorm, matmul, attention, ...) appends one
//! node holding what its backward needs; `backward` walks the nodes in reverse and hands every
//! node the gradient of its output. Gradients exist only for tensors that lead back to a watched
//! parameter: a frozen parameter is never watched, so nothing is ever allocated for it.
//!
//! The tape knows no arithmetic and no op: each op's saved state and backward rule are one value
//! implementing `Op`, defined next to its forward in `src/ops/<family>.rs`, and the tape holds
//! them as trait objects.

use crate::backend::{self, Backend};
use crate::{DType, Device, Error, Result, Tensor, TensorId};
use std::collections::{HashMap, HashSet};

/// One recorded op: what its forward saved, and its backward rule.
pub trait Op {
    /// The op's name, as shown by `Tape::summary` and the profiler.
    fn name(&self) -> &'static str;
    /// Gradients of the node's inputs, in input order, computed only where `needs[i]` (an entry
    /// may be None where it is not needed).
    fn backward(&self, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>>;
}

struct Node {
    op: Box<dyn Op>,
    inputs: Vec<TensorId>,
    output: TensorId,
}

/// Records ops during a forward pass and runs them backward.
pub struct Tape {
    recording: bool,
    nodes: Vec<Node>,
    /// Tensors whose gradient is wanted: watched parameters and everything computed from them.
    tracked: HashSet<TensorId>,
    watched: HashSet<TensorId>,
}

impl Default for Tape {
    fn default() -> Self {
        Self::new()
    }
}

impl Tape {
    /// A tape that records ops touching watched tensors (training, gradient studies).
    pub fn new() -> Self {
        Tape { recording: true, nodes: Vec::new(), tracked: HashSet::new(), watched: HashSet::new() }
    }

    /// A tape that records nothing: inference keeps no activations alive.
    pub fn inference() -> Self {
        Tape { recording: false, ..Self::new() }
    }

    pub fn is_recording(&self) -> bool {
        self.recording
    }

    /// Asks for the gradient of `t` (a parameter). Unwatched tensors get none.
    pub fn watch(&mut self, t: &Tensor) {
        if self.recording {
            self.tracked.insert(t.id());
            self.watched.insert(t.id());
        }
    }

    /// True when a gradient must flow into `t`.
    pub fn tracks(&self, t: &Tensor) -> bool {
        self.tracked.contains(&t.id())
    }

    /// True when an op over `inputs` must be recorded (some input needs a gradient).
    pub fn wants(&self, inputs: &[&Tensor]) -> bool {
        self.recording && inputs.iter().any(|t| self.tracks(t))
    }

    /// Appends a node; ops call this only when `wants(inputs)` is true.
    pub fn record(&mut self, op: impl Op + 'static, inputs: &[&Tensor], output: &Tensor) {
        self.tracked.insert(output.id());
        self.nodes.push(Node {
            op: Box::new(op),
            inputs: inputs.iter().map(|t| t.id()).collect(),
            output: output.id(),
        });
    }

    /// The number of recorded nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// One line per recorded op, in order (for studying what a forward pass did).
    pub fn summary(&self) -> Vec<&'static str> {
        self.nodes.iter().map(|n| n.op.name()).collect()
    }

    /// Runs backward from a scalar `loss` (d loss / d loss = 1) and returns the gradients of the
    /// watched tensors. The tape is consumed node by node, so saved activations are freed as
    /// backward passes them.
    pub fn backward(&mut self, loss: &Tensor) -> Result<Gradients> {
        if loss.numel() != 1 {
            return Err(Error::shape("backward", format!("the loss must be a scalar, got shape {:?}", loss.shape())));
        }
        self.backward_from(loss, Tensor::from_f32(vec![1.0], loss.shape().clone())?)
    }

    /// Runs backward from `out` with incoming gradient `dout` (same shape): what a node that
    /// wraps a sub-computation (gradient checkpointing) uses to back-propagate through it.
    pub fn backward_from(&mut self, out: &Tensor, dout: Tensor) -> Result<Gradients> {
        let loss = out;
        if dout.dims() != out.dims() {
            return Err(Error::shape(
                "backward",
                format!("gradient {:?} does not match output {:?}", dout.dims(), out.dims()),
            ));
        }
        if !self.tracks(loss) {
            return Err(Error::NotTracked);
        }
        let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
        grads.insert(loss.id(), dout);
        while let Some(node) = self.nodes.pop() {
            let Some(dout) = grads.remove(&node.output) else {
                continue;
            };
            let needs: Vec<bool> = node.inputs.iter().map(|id| self.tracked.contains(id)).collect();
            let timer = crate::profile::scope(node.op.name(), crate::profile::Phase::Backward);
            let dins = node.op.backward(&dout, &needs)?;
            drop(timer);
            drop(node.op);
            for ((id, din), need) in node.inputs.iter().zip(dins).zip(needs) {
                let Some(din) = din else { continue };
                if !need {
                    continue;
                }
                accumulate(&mut grads, *id, din)?;
            }
        }
        self.tracked.clear();
        grads.retain(|id, _| self.watched.contains(id));
        Ok(Gradients { map: grads })
    }
}

fn accumulate(grads: &mut HashMap<TensorId, Tensor>, id: TensorId, g: Tensor) -> Result<()> {
    let Some(acc) = grads.get_mut(&id) else {
        grads.insert(id, g);
        return Ok(());
    };
    if acc.numel() != g.numel() {
        return Err(Error::shape("backward", format!("gradient sizes differ: {} vs {}", acc.numel(), g.numel())));
    }
    let be = backend::on("backward", &[acc, &g])?;
    // A weight used twice (wte: embedding and lm_head) can collect an f32 and a bf16 gradient on
    // the GPU: the sum is kept in f32.
    let g = if acc.dtype() == g.dtype() { g } else { promote(be, &g)? };
    if acc.dtype() != DType::F32 && g.dtype() == DType::F32 {
        *acc = promote(be, acc)?;
    }
    be.add_assign(acc, &g)
}

/// An f32 copy of `t`, with its tape identity.
fn promote(be: &dyn Backend, t: &Tensor) -> Result<Tensor> {
    if t.dtype() == DType::F32 {
        return Ok(t.clone());
    }
    let mut out = be.cast(t, DType::F32)?;
    out.set_id(t.id());
    Ok(out)
}

/// Gradients of the watched tensors after `Tape::backward`.
#[derive(Debug)]
pub struct Gradients {
    map: HashMap<TensorId, Tensor>,
}

impl Gradients {
    /// An empty set, to accumulate micro-batches into.
    pub fn empty() -> Self {
        Gradients { map: HashMap::new() }
    }

    /// Adds `other` into `self` (gradient accumulation over micro-batches).
    pub fn accumulate(&mut self, other: Gradients) -> Result<()> {
        for (id, g) in other.map {
            accumulate(&mut self.map, id, g)?;
        }
        Ok(())
    }

    /// The global L2 norm over every gradient (what clipping by global norm measures): one
    /// deterministic reduction per device, over its gradients in id order.
    pub fn global_norm(&self) -> Result<f64> {
        let mut ids: Vec<&TensorId> = self.map.keys().collect();
        ids.sort();
        let mut devices: Vec<Device> = self.map.values().map(|g| g.device()).collect();
        devices.sort_by_key(|d| match d {
            Device::Cpu => 0,
            Device::Cuda(i) => 1 + i,
        });
        devices.dedup();
        let mut total = 0.0;
        for device in devices {
            let on_device: Vec<&Tensor> = ids.iter().map(|id| &self.map[id]).filter(|g| g.device() == device).collect();
            total += backend::backend(device)?.sum_squares(&on_device)?;
        }
        Ok(total.sqrt())
    }

    /// Multiplies every gradient by `s`.
    pub fn scale(&mut self, s: f32) -> Result<()> {
        for g in self.map.values_mut() {
            backend::backend(g.device())?.scale(g, s)?;
        }
        Ok(())
    }

    /// Scales the gradients so their global norm is at most `max_norm`; returns the norm before.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.global_norm()?;
        if norm > max_norm && norm.is_finite() {
            // torch.nn.utils.clip_grad_norm_'s factor
            self.scale((max_norm / (norm + 1e-6)) as f32)?;
        }
        Ok(norm)
    }

    /// The gradient of `t`, or None when `t` was not watched or did not influence the loss.
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.map.get(&t.id())
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
