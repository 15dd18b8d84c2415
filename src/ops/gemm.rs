//! Matrix multiply with transpose flags, optional bias and optional fused GELU; `linear` is the
//! layer-shaped front door to it.
//!
//! C = op(A) @ op(B) (+ bias) (then GELU), where op(A) = A^T when `trans_a`. Backward, with
//! A' = op(A), B' = op(B) and G the gradient of the pre-activation:
//!   dA' = G @ B'^T   (so dA = B' @ G^T when trans_a)
//!   dB' = A'^T @ G   (so dB = G^T @ A' when trans_b)
//!   dbias = sum over rows of G
//! each one GEMM call with the transposes expressed as strides.
//!
//! On the GPU A and B are bf16 and every product accumulates in f32 (backend::cuda::gemm). There
//! op(B) is always a weight (a bf16 cast of an f32 master), so dB and dbias come out in f32 for
//! the master while dA, an activation gradient, stays bf16.

use crate::backend::on;
pub use crate::backend::{Epilogue, GemmDesc, Trans};
use crate::tape::{Op, Tape};
use crate::{DType, Error, Result, Tensor};

/// How a layer's weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// [in, out]: GPT-2's Conv1D (y = x @ W + b).
    InOut,
    /// [out, in]: torch.nn.Linear and the tied lm_head (y = x @ W^T + b).
    OutIn,
}

struct Matmul {
    a: Tensor,
    b: Tensor,
    desc: GemmDesc,
    has_bias: bool,
    /// The pre-activation, when GELU was fused.
    pre: Option<Tensor>,
}

/// C = op(A) @ op(B). Without a transposed A, A may have leading batch dims ([..., K]); a
/// transposed A must be [K, M]. B is [K, N], or [N, K] transposed.
pub fn matmul(tape: &mut Tape, a: &Tensor, b: &Tensor, ta: Trans, tb: Trans) -> Result<Tensor> {
    matmul_ex(tape, a, b, None, ta, tb, Epilogue::Plain)
}

/// y = x @ W + bias for a weight in `layout`, with GELU applied when `gelu`. x: [..., in].
pub fn linear(
    tape: &mut Tape,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    layout: WeightLayout,
    gelu: bool,
) -> Result<Tensor> {
    let epilogue = if gelu { Epilogue::Gelu } else { Epilogue::Plain };
    matmul_ex(tape, x, w, bias, Trans::No, Trans::from_bool(layout == WeightLayout::OutIn), epilogue)
}

/// The full op: epilogue(op(A) @ op(B) + bias).
pub fn matmul_ex(
    tape: &mut Tape,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    ta: Trans,
    tb: Trans,
    epilogue: Epilogue,
) -> Result<Tensor> {
    const OP: &str = "matmul";
    let gelu = epilogue == Epilogue::Gelu;
    let _t = crate::profile::scope(if gelu { "matmul+gelu" } else { "matmul" }, crate::profile::Phase::Forward);
    let (m, k, lead) = if ta.is_t() {
        match *a.dims() {
            [k, m] => (m, k, vec![m]),
            _ => return Err(Error::shape(OP, format!("a transposed A must be 2-D [K, M], got {:?}", a.dims()))),
        }
    } else {
        let k = a.shape().last();
        let mut lead = a.dims().to_vec();
        lead.pop();
        (a.shape().rows(), k, lead)
    };
    let (kb, n) = match (b.dims(), tb) {
        (&[kb, n], Trans::No) => (kb, n),
        (&[n, kb], Trans::Yes) => (kb, n),
        _ => return Err(Error::shape(OP, format!("B must be 2-D, got {:?}", b.dims()))),
    };
    if k != kb {
        let t = |t: Trans| if t.is_t() { "^T" } else { "" };
        return Err(Error::shape(
            OP,
            format!(
                "inner dimensions differ: A {:?}{} and B {:?}{} give {k} vs {kb}",
                a.dims(),
                t(ta),
                b.dims(),
                t(tb)
            ),
        ));
    }
    if let Some(bias) = bias {
        super::expect_dims(OP, "bias", bias, &[n])?;
    }
    let mut out_dims = lead;
    out_dims.push(n);
    let inputs: Vec<&Tensor> = [Some(a), Some(b), bias].into_iter().flatten().collect();
    let desc = GemmDesc { m, n, k, a: ta, b: tb, epilogue, pitch: Default::default() };
    let (out, pre) = on(OP, &inputs)?.matmul(a, b, bias, &desc, &out_dims)?;
    if tape.wants(&inputs) {
        let saved = Matmul { a: a.clone(), b: b.clone(), desc, has_bias: bias.is_some(), pre };
        tape.record(saved, &inputs, &out);
    }
    Ok(out)
}

impl Op for Matmul {
    fn name(&self) -> &'static str {
        if self.pre.is_some() {
            "matmul+gelu"
        } else {
            "matmul"
        }
    }

    fn backward(&self, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let be = on("matmul backward", &[dout, &self.a, &self.b])?;
        let GemmDesc { m, n, k, a: ta, b: tb, .. } = self.desc;
        let g = match &self.pre {
            Some(pre) => be.gelu_backward(pre, dout)?,
            None => dout.clone(),
        };
        let (a, b) = (&self.a, &self.b);
        // dA, an activation's gradient, in the compute dtype; dB and dbias (a weight's) in f32.
        let da = needs[0]
            .then(|| {
                let act = be.compute_dtype();
                if ta.is_t() {
                    // dA [K, M] = B' [K, N] @ G^T [N, M]
                    be.gemm(b, &g, &GemmDesc::new(k, m, n, tb, Trans::Yes), act, a.dims())
                } else {
                    // dA [M, K] = G [M, N] @ B'^T [N, K]
                    be.gemm(&g, b, &GemmDesc::new(m, k, n, Trans::No, tb.flip()), act, a.dims())
                }
            })
            .transpose()?;
        let db = needs[1]
            .then(|| {
                if tb.is_t() {
                    // dB [N, K] = G^T [N, M] @ A' [M, K]
                    be.gemm(&g, a, &GemmDesc::new(n, k, m, Trans::Yes, ta), DType::F32, b.dims())
                } else {
                    // dB [K, N] = A'^T [K, M] @ G [M, N]
                    be.gemm(a, &g, &GemmDesc::new(k, n, m, ta.flip(), Trans::No), DType::F32, b.dims())
                }
            })
            .transpose()?;
        let mut grads = vec![da, db];
        if self.has_bias {
            grads.push(needs[2].then(|| be.bias_grad(&g, n)).transpose()?);
        }
        Ok(grads)
    }
}
