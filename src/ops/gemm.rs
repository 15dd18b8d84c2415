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

#[cfg(feature = "cuda")]
use super::dev;
use super::{f32_input, new_f32};
use crate::backend::cpu::{elementwise as cpu_ew, gemm as cpu, pool};
#[cfg(feature = "cuda")]
use crate::backend::cuda::{bf16, gemm as cuda};
use crate::tape::{Op, Tape};
#[cfg(feature = "cuda")]
use crate::tensor::CudaStorage;
use crate::{Error, Result, Tensor};

/// How a layer's weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// [in, out]: GPT-2's Conv1D (y = x @ W + b).
    InOut,
    /// [out, in]: torch.nn.Linear and the tied lm_head (y = x @ W^T + b).
    OutIn,
}

pub(crate) struct Saved {
    a: Tensor,
    b: Tensor,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    has_bias: bool,
    /// The pre-activation, when GELU was fused.
    pub(crate) gelu: Option<Tensor>,
}

/// C = op(A) @ op(B). Without `trans_a`, A may have leading batch dims ([..., K]); with it A must
/// be [K, M]. B is [K, N], or [N, K] with `trans_b`.
pub fn matmul(tape: &mut Tape, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool) -> Result<Tensor> {
    matmul_ex(tape, a, b, None, trans_a, trans_b, false)
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
    matmul_ex(tape, x, w, bias, false, layout == WeightLayout::OutIn, gelu)
}

/// The full op: op(A) @ op(B) + bias, then GELU when `gelu`.
pub fn matmul_ex(
    tape: &mut Tape,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    trans_a: bool,
    trans_b: bool,
    gelu: bool,
) -> Result<Tensor> {
    const OP: &str = "matmul";
    let _t = crate::profile::scope(if gelu { "matmul+gelu" } else { "matmul" }, crate::profile::Phase::Forward);
    let (m, k, lead) = if trans_a {
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
    let (kb, n) = match (b.dims(), trans_b) {
        (&[kb, n], false) => (kb, n),
        (&[n, kb], true) => (kb, n),
        _ => return Err(Error::shape(OP, format!("B must be 2-D, got {:?}", b.dims()))),
    };
    if k != kb {
        return Err(Error::shape(
            OP,
            format!(
                "inner dimensions differ: A {:?}{} and B {:?}{} give {k} vs {kb}",
                a.dims(),
                if trans_a { "^T" } else { "" },
                b.dims(),
                if trans_b { "^T" } else { "" }
            ),
        ));
    }
    if let Some(bias) = bias {
        super::expect_dims(OP, "bias", bias, &[n])?;
    }
    let mut out_dims = lead;
    out_dims.push(n);
    let (out, pre) = match a.device() {
        #[cfg(feature = "cuda")]
        crate::Device::Cuda(_) => {
            let (ad, bd) = (dev::bf16_in(OP, a)?, dev::bf16_in(OP, b)?);
            let biasd = bias.map(|t| dev::bf16_in(OP, t)).transpose()?;
            let mut pre = gelu.then(|| crate::backend::cuda::cuda()?.alloc::<bf16>(m * n)).transpose()?;
            let out = dev::new_bf16(&out_dims, |o| {
                cuda::matmul_forward(o, pre.as_mut(), ad, bd, biasd, m, n, k, trans_a, trans_b)
            })?;
            (out, pre.map(|p| Tensor::from_cuda(CudaStorage::BF16(p), out_dims.as_slice())).transpose()?)
        }
        _ => {
            let (ad, bd) = (f32_input(OP, a)?, f32_input(OP, b)?);
            let biasd = bias.map(|t| f32_input(OP, t)).transpose()?;
            let mut pre = gelu.then(|| pool::take(m * n));
            let out = new_f32(&out_dims, |o| {
                cpu::matmul_forward(o, pre.as_deref_mut(), ad, bd, biasd, m, n, k, trans_a, trans_b)
            })?;
            (out, pre.map(|p| Tensor::from_f32(p, out_dims.as_slice())).transpose()?)
        }
    };
    let inputs: Vec<&Tensor> = [Some(a), Some(b), bias].into_iter().flatten().collect();
    if tape.wants(&inputs) {
        let saved =
            Saved { a: a.clone(), b: b.clone(), m, n, k, trans_a, trans_b, has_bias: bias.is_some(), gelu: pre };
        tape.record(Op::Matmul(saved), &inputs, &out);
    }
    Ok(out)
}

pub(crate) fn backward(s: &Saved, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
    #[cfg(feature = "cuda")]
    if dout.device() != crate::Device::Cpu {
        return backward_cuda(s, dout, needs);
    }
    let (m, n, k) = (s.m, s.n, s.k);
    let gelu_grad = match &s.gelu {
        Some(pre) => {
            let (pre, go) = (pre.f32s()?, dout.f32s()?);
            Some(new_f32(&[m, n], |d| cpu_ew::gelu_backward(d, pre, go))?)
        }
        None => None,
    };
    let g: &[f32] = match &gelu_grad {
        Some(t) => t.f32s()?,
        None => dout.f32s()?,
    };
    let (a, b) = (s.a.f32s()?, s.b.f32s()?);
    let da = needs[0].then(|| {
        let mut d = pool::take(m * k);
        if s.trans_a {
            // dA [K, M] = B' [K, N] @ G^T [N, M]
            cpu::matmul(&mut d, b, g, k, m, n, s.trans_b, true, false);
        } else {
            // dA [M, K] = G [M, N] @ B'^T [N, K]
            cpu::matmul(&mut d, g, b, m, k, n, false, !s.trans_b, false);
        }
        d
    });
    let db = needs[1].then(|| {
        let mut d = pool::take(k * n);
        if s.trans_b {
            // dB [N, K] = G^T [N, M] @ A' [M, K]
            cpu::matmul(&mut d, g, a, n, k, m, true, s.trans_a, false);
        } else {
            // dB [K, N] = A'^T [K, M] @ G [M, N]
            cpu::matmul(&mut d, a, g, k, n, m, !s.trans_a, false, false);
        }
        d
    });
    let mut grads = vec![
        da.map(|d| Tensor::from_f32(d, s.a.dims())).transpose()?,
        db.map(|d| Tensor::from_f32(d, s.b.dims())).transpose()?,
    ];
    if s.has_bias {
        let dbias = needs[2].then(|| {
            let mut d = vec![0f32; n];
            cpu::bias_backward(&mut d, g, n);
            d
        });
        grads.push(dbias.map(|d| Tensor::from_f32(d, [n])).transpose()?);
    }
    Ok(grads)
}

/// The GPU backward: the same three products as the CPU's, bf16 operands with f32 accumulation.
#[cfg(feature = "cuda")]
fn backward_cuda(s: &Saved, dout: &Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
    const OP: &str = "matmul backward";
    let (m, n, k) = (s.m, s.n, s.k);
    let cu = crate::backend::cuda::cuda()?;
    let gelu_grad = match &s.gelu {
        Some(pre) => {
            let (pre, go) = (dev::bf16_in(OP, pre)?, dev::bf16_in(OP, dout)?);
            Some(dev::new_bf16(&[m, n], |d| crate::backend::cuda::elementwise::gelu_backward(d, pre, go))?)
        }
        None => None,
    };
    let g = dev::bf16_in(OP, gelu_grad.as_ref().unwrap_or(dout))?;
    let (a, b) = (dev::bf16_in(OP, &s.a)?, dev::bf16_in(OP, &s.b)?);
    let da = if needs[0] {
        let mut d = cu.alloc::<bf16>(m * k)?;
        if s.trans_a {
            cuda::matmul(&mut d, b, g, k, m, n, s.trans_b, true, false)?;
        } else {
            cuda::matmul(&mut d, g, b, m, k, n, false, !s.trans_b, false)?;
        }
        Some(Tensor::from_cuda(CudaStorage::BF16(d), s.a.dims())?)
    } else {
        None
    };
    let db = if needs[1] {
        let mut d = cu.alloc::<f32>(k * n)?;
        if s.trans_b {
            cuda::matmul(&mut d, g, a, n, k, m, true, s.trans_a, false)?;
        } else {
            cuda::matmul(&mut d, a, g, k, n, m, !s.trans_a, false, false)?;
        }
        Some(Tensor::from_cuda(CudaStorage::F32(d), s.b.dims())?)
    } else {
        None
    };
    let mut grads = vec![da, db];
    if s.has_bias {
        let dbias = if needs[2] {
            let mut d = cu.alloc::<f32>(n)?;
            cuda::bias_backward(&mut d, g, n)?;
            Some(Tensor::from_cuda(CudaStorage::F32(d), [n])?)
        } else {
            None
        };
        grads.push(dbias);
    }
    Ok(grads)
}
