//! The autograd tape. Each coarse op (embedding, layernorm, matmul, attention, ...) appends one
//! node holding what its backward needs; `backward` walks the nodes in reverse and hands every
//! node the gradient of its output. Gradients exist only for tensors that lead back to a watched
//! parameter: a frozen parameter is never watched, so nothing is ever allocated for it.
//!
//! The tape knows no arithmetic: each op's backward rule is a plain function in
//! `src/ops/<family>.rs`, next to its forward, and `Op::backward` only dispatches to it.

use crate::ops::{attention, checkpoint, elementwise, embedding, gemm, layernorm, lora, nf4, xent};
use crate::{Error, Result, Tensor, TensorId};
use std::collections::{HashMap, HashSet};

/// What one node saved for its backward pass.
pub(crate) enum Op {
    Checkpoint(checkpoint::Saved),
    Embedding(embedding::Saved),
    LayerNorm(layernorm::Saved),
    Matmul(gemm::Saved),
    Attention(attention::Saved),
    Gelu(elementwise::GeluSaved),
    Add,
    Dropout(elementwise::DropoutSaved),
    CrossEntropy(xent::Saved),
    Lora(lora::Saved),
    LoraEmbedding(lora::EmbeddingSaved),
    Nf4(nf4::Saved),
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Cast(elementwise::CastSaved),
}

impl Op {
    /// The op's name, as shown by `Tape::summary`.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Checkpoint(_) => "checkpoint",
            Op::Embedding(_) => "embedding",
            Op::LayerNorm(_) => "layernorm",
            Op::Matmul(s) => {
                if s.gelu.is_some() {
                    "matmul+gelu"
                } else {
                    "matmul"
                }
            }
            Op::Attention(_) => "attention",
            Op::Gelu(_) => "gelu",
            Op::Add => "add",
            Op::Dropout(_) => "dropout",
            Op::CrossEntropy(_) => "cross_entropy",
            Op::Lora(_) => "lora_linear",
            Op::LoraEmbedding(_) => "lora_embedding",
            Op::Nf4(_) => "nf4_linear",
            Op::Cast(_) => "cast",
        }
    }

    /// Gradients of the node's inputs, in input order, computed only where `needs[i]`.
    fn backward(&self, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        match self {
            Op::Checkpoint(s) => checkpoint::backward(s, dout, needs),
            Op::Embedding(s) => embedding::backward(s, dout, needs),
            Op::LayerNorm(s) => layernorm::backward(s, dout, needs),
            Op::Matmul(s) => gemm::backward(s, dout, needs),
            Op::Attention(s) => attention::backward(s, dout),
            Op::Gelu(s) => elementwise::gelu_backward(s, dout),
            Op::Add => Ok(vec![Some(dout.clone()), Some(dout.clone())]),
            Op::Dropout(s) => elementwise::dropout_backward(s, dout),
            Op::CrossEntropy(s) => xent::backward(s, dout),
            Op::Lora(s) => lora::backward(s, dout, needs),
            Op::LoraEmbedding(s) => lora::embedding_backward(s, dout, needs),
            Op::Nf4(s) => nf4::backward(s, dout, needs),
            Op::Cast(s) => elementwise::cast_backward(s, dout),
        }
    }
}

struct Node {
    op: Op,
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
    pub(crate) fn wants(&self, inputs: &[&Tensor]) -> bool {
        self.recording && inputs.iter().any(|t| self.tracks(t))
    }

    /// Appends a node; ops call this only when `wants(inputs)` is true.
    pub(crate) fn record(&mut self, op: Op, inputs: &[&Tensor], output: &Tensor) {
        self.tracked.insert(output.id());
        self.nodes.push(Node { op, inputs: inputs.iter().map(|t| t.id()).collect(), output: output.id() });
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
            return Err(Error::Input(
                "backward: the loss does not depend on any watched parameter (was the forward pass run on this tape?)"
                    .into(),
            ));
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
    match grads.get_mut(&id) {
        None => {
            grads.insert(id, g);
        }
        Some(acc) => {
            if acc.numel() != g.numel() {
                return Err(Error::shape(
                    "backward",
                    format!("gradient sizes differ: {} vs {}", acc.numel(), g.numel()),
                ));
            }
            #[cfg(feature = "cuda")]
            if acc.device() != crate::Device::Cpu {
                return accumulate_cuda(acc, &g);
            }
            crate::backend::cpu::elementwise::add_assign(acc.f32s_mut()?, g.f32s()?);
        }
    }
    Ok(())
}

/// acc += g on the GPU: bf16 activation gradients and f32 parameter gradients alike.
#[cfg(feature = "cuda")]
fn accumulate_cuda(acc: &mut Tensor, g: &Tensor) -> Result<()> {
    use crate::backend::cuda::elementwise;
    use crate::tensor::CudaStorage;
    let (got, want) = (g.dtype(), acc.dtype());
    // A weight used twice (wte: embedding and lm_head) can collect an f32 and a bf16 gradient:
    // the sum is kept in f32.
    if want == crate::DType::BF16 && got == crate::DType::F32 {
        let mut promoted = to_f32_cuda(acc)?;
        accumulate_cuda(&mut promoted, g)?;
        *acc = promoted;
        return Ok(());
    }
    if want == crate::DType::F32 && got == crate::DType::BF16 {
        return accumulate_cuda(acc, &to_f32_cuda(g)?);
    }
    match (acc.cuda_storage_mut(), g.cuda_storage()) {
        (Some(CudaStorage::BF16(dst)), Some(CudaStorage::BF16(src))) => elementwise::add_assign(dst, src),
        (Some(CudaStorage::F32(dst)), Some(CudaStorage::F32(src))) => elementwise::add_assign_f32(dst, src),
        _ => Err(Error::Input(format!(
            "backward: cannot add a {got:?} gradient on {} into a {want:?} one on the GPU",
            g.device()
        ))),
    }
}

/// An f32 copy of a bf16 GPU tensor (same tape identity).
#[cfg(feature = "cuda")]
fn to_f32_cuda(t: &Tensor) -> Result<Tensor> {
    let src = crate::ops::dev::bf16_in("backward", t)?;
    let mut out = crate::ops::dev::new_f32(t.dims(), |d| crate::backend::cuda::elementwise::cast_bf16_to_f32(d, src))?;
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

    /// The global L2 norm over every gradient (what clipping by global norm measures).
    pub fn global_norm(&self) -> Result<f64> {
        let mut ids: Vec<&TensorId> = self.map.keys().collect();
        ids.sort();
        let mut total = 0.0;
        #[cfg(feature = "cuda")]
        let mut on_gpu = Vec::new();
        for id in ids {
            let g = &self.map[id];
            #[cfg(feature = "cuda")]
            if g.device() != crate::Device::Cpu {
                on_gpu.push(crate::ops::dev::f32_in("global norm", g)?);
                continue;
            }
            total += crate::backend::cpu::reduce::sum_squares(g.f32s()?);
        }
        #[cfg(feature = "cuda")]
        if !on_gpu.is_empty() {
            // One deterministic reduction over every GPU gradient, in id order.
            total += crate::backend::cuda::reduce::sum_squares_many(&on_gpu)?;
        }
        Ok(total.sqrt())
    }

    /// Multiplies every gradient by `s`.
    pub fn scale(&mut self, s: f32) -> Result<()> {
        for g in self.map.values_mut() {
            #[cfg(feature = "cuda")]
            if g.device() != crate::Device::Cpu {
                match g.cuda_storage_mut() {
                    Some(crate::tensor::CudaStorage::F32(d)) => crate::backend::cuda::reduce::scale(d, s)?,
                    _ => return Err(Error::Input("scaling gradients: GPU gradients of parameters are f32".into())),
                }
                continue;
            }
            crate::backend::cpu::reduce::scale(g.f32s_mut()?, s);
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
