//! Rotary embeddings on the CUDA backend. No kernel yet: the CPU reference runs on host copies
//! and the results move back in bf16, until kernels/rope.cu exists.

use crate::backend::cpu::Cpu;
use crate::backend::{via_host, RopeArgs};
use crate::{DType, Result, Tensor};

impl crate::backend::Rope for super::Cuda {
    fn rope_pack(&self, q: &Tensor, k: &Tensor, v: &Tensor, args: &RopeArgs) -> Result<Tensor> {
        let [y] = via_host(self, &[q, k, v], [DType::BF16], |h| Ok([Some(Cpu.rope_pack(&h[0], &h[1], &h[2], args)?)]))?;
        Ok(y.expect("computed"))
    }

    fn rope_unpack(&self, dqkv: &Tensor, args: &RopeArgs) -> Result<[Tensor; 3]> {
        let [dq, dk, dv] = via_host(self, &[dqkv], [DType::BF16; 3], |h| Ok(Cpu.rope_unpack(&h[0], args)?.map(Some)))?;
        Ok([dq.expect("computed"), dk.expect("computed"), dv.expect("computed")])
    }
}
