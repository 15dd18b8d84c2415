//! GELU (tanh approximation), SwiGLU, residual add, dropout, and the cast that feeds a GPU forward pass
//! its bf16 weights from the optimizer's f32 masters.

use crate::backend::on;
use crate::tape::{Op, Tape};
use crate::{DType, Error, Result, Tensor};

struct Gelu {
    x: Tensor,
}

impl Op for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }
    fn backward(&self, dout: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(on("gelu backward", &[&self.x, dout])?.gelu_backward(&self.x, dout)?)])
    }
}

/// GELU with the tanh approximation (GPT-2's "gelu_new").
pub fn gelu(tape: &mut Tape, x: &Tensor) -> Result<Tensor> {
    let _t = crate::profile::scope("gelu", crate::profile::Phase::Forward);
    let out = on("gelu", &[x])?.gelu(x)?;
    if tape.wants(&[x]) {
        tape.record(Gelu { x: x.clone() }, &[x], &out);
    }
    Ok(out)
}

struct Swiglu {
    gate: Tensor,
    up: Tensor,
}

impl Op for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }
    fn backward(&self, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let be = on("swiglu backward", &[&self.gate, &self.up, dout])?;
        Ok(be.swiglu_backward(&self.gate, &self.up, dout, [needs[0], needs[1]])?.into())
    }
}

/// silu(gate) * up, elementwise, same shapes: the Llama MLP's activation (SwiGLU, Shazeer 2020).
pub fn swiglu(tape: &mut Tape, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        return Err(Error::shape("swiglu", format!("gate {:?} and up {:?} differ", gate.dims(), up.dims())));
    }
    let _t = crate::profile::scope("swiglu", crate::profile::Phase::Forward);
    let out = on("swiglu", &[gate, up])?.swiglu(gate, up)?;
    if tape.wants(&[gate, up]) {
        tape.record(Swiglu { gate: gate.clone(), up: up.clone() }, &[gate, up], &out);
    }
    Ok(out)
}

/// The residual add's node (also recorded by `layernorm::add_layernorm`).
pub(super) struct Add;

impl Op for Add {
    fn name(&self) -> &'static str {
        "add"
    }
    fn backward(&self, dout: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(dout.clone()), Some(dout.clone())])
    }
}

/// a + b, elementwise, same shapes (the residual connection).
pub fn add(tape: &mut Tape, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() {
        return Err(Error::shape("add", format!("shapes differ: {:?} vs {:?}", a.dims(), b.dims())));
    }
    let _t = crate::profile::scope("add", crate::profile::Phase::Forward);
    let out = on("add", &[a, b])?.add(a, b)?;
    if tape.wants(&[a, b]) {
        tape.record(Add, &[a, b], &out);
    }
    Ok(out)
}

/// Dropout's backward is dropout under the same mask, which the seed redraws.
struct Dropout {
    p: f32,
    seed: u64,
}

impl Op for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }
    fn backward(&self, dout: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(on("dropout backward", &[dout])?.dropout(dout, self.p, self.seed)?)])
    }
}

/// Zeroes each element with probability `p` and scales the rest by 1 / (1 - p). The identity
/// (no copy, no node) when `p` is 0 or `train` is false. The mask comes from `seed`, so a step
/// can be replayed exactly.
pub fn dropout(tape: &mut Tape, x: &Tensor, p: f32, train: bool, seed: u64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::dropout("", p));
    }
    if p == 0.0 || !train {
        return Ok(x.clone());
    }
    let _t = crate::profile::scope("dropout", crate::profile::Phase::Forward);
    let out = on("dropout", &[x])?.dropout(x, p, seed)?;
    if tape.wants(&[x]) {
        tape.record(Dropout { p, seed }, &[x], &out);
    }
    Ok(out)
}

/// A cast's backward hands the input the gradient in the input's dtype.
struct Cast {
    from: DType,
}

impl Op for Cast {
    fn name(&self) -> &'static str {
        "cast"
    }
    fn backward(&self, dout: &Tensor, _: &[bool]) -> Result<Vec<Option<Tensor>>> {
        if dout.dtype() == self.from {
            return Ok(vec![Some(dout.clone())]);
        }
        Ok(vec![Some(on("cast backward", &[dout])?.cast(dout, self.from)?)])
    }
}

/// `x` in its backend's compute dtype (bf16 on the GPU, from an f32 master weight; the identity
/// on the CPU, where every op computes in f32). Backward hands the master its gradient in the
/// master's dtype, whatever dtype reached the cast.
pub fn to_compute_dtype(tape: &mut Tape, x: &Tensor) -> Result<Tensor> {
    let be = on("cast", &[x])?;
    let to = be.compute_dtype();
    if x.dtype() == to {
        return Ok(x.clone());
    }
    let out = be.cast(x, to)?;
    if tape.wants(&[x]) {
        tape.record(Cast { from: x.dtype() }, &[x], &out);
    }
    Ok(out)
}

/// The last position of each sequence, x [B, T, C] -> [B, 1, C]: the rows generation needs
/// logits for. Inference only: it records nothing, and refuses a tape that wants x's gradient.
pub fn last_position(tape: &mut Tape, x: &Tensor) -> Result<Tensor> {
    const OP: &str = "last_position";
    let [b, t, c] = *x.dims() else {
        return Err(Error::shape(OP, format!("x must be [B, T, C], got {:?}", x.dims())));
    };
    if tape.wants(&[x]) {
        return Err(Error::Input(format!("{OP} is for generation and has no backward")));
    }
    if t == 0 || c == 0 {
        return Err(Error::shape(OP, format!("x {:?} is empty", x.dims())));
    }
    if t == 1 {
        return Ok(x.clone());
    }
    let rows: Vec<(usize, usize, usize)> = (0..b).map(|r| (r * c, (r * t + t - 1) * c, c)).collect();
    on(OP, &[x])?.gather(x, &[b, 1, c], &rows)
}
