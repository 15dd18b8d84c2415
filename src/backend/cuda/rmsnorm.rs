//! RMSNorm on the CUDA backend. No kernel yet: the CPU reference runs on host copies and the
//! results move back (bf16 activations, f32 rstd and weight gradient), so Llama models run on
//! the device, slowly, until kernels/rmsnorm.cu exists.

use crate::backend::cpu::Cpu;
use crate::backend::via_host;
use crate::{DType, Result, Tensor};

impl crate::backend::RmsNorm for super::Cuda {
    fn rmsnorm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        let [y, rstd] = via_host(self, &[x, w], [DType::BF16, DType::F32], |h| {
            let (y, rstd) = Cpu.rmsnorm(&h[0], &h[1], eps)?;
            Ok([Some(y), Some(rstd)])
        })?;
        Ok((y.expect("computed"), rstd.expect("computed")))
    }

    fn rmsnorm_backward(
        &self,
        dout: &Tensor,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        needs: [bool; 2],
    ) -> Result<[Option<Tensor>; 2]> {
        via_host(self, &[dout, x, w, rstd], [DType::BF16, DType::F32], |h| {
            Cpu.rmsnorm_backward(&h[0], &h[1], &h[2], &h[3], needs)
        })
    }
}
