//! Ops: each family's semantics, shape checks, forward and backward rule, side by side, written
//! once against the backend traits (`crate::backend`). A forward function picks the backend of
//! its inputs' device, runs, and records a node (the op's saved state, implementing
//! `tape::Op`) only when an input needs a gradient.

pub mod attention;
pub mod checkpoint;
pub mod elementwise;
pub mod embedding;
pub mod gemm;
pub mod layernorm;
pub mod lora;
pub mod nf4;
pub mod rmsnorm;
pub mod rope;
pub mod xent;

use crate::{Error, Result, Tensor};

/// Checks that `t` has exactly `dims`.
pub(crate) fn expect_dims(op: &'static str, what: &str, t: &Tensor, dims: &[usize]) -> Result<()> {
    if t.dims() != dims {
        return Err(Error::shape(op, format!("{what} has shape {:?}, expected {:?}", t.dims(), dims)));
    }
    Ok(())
}
