//! Matrix multiply on the CPU through the `gemm` crate (AVX-512 where the CPU has it), with the
//! bias and GELU epilogues of `kernels/gemm.cu`.
//!
//! Layout: every matrix is row-major. `a_trans` means A is stored [k, m] and used as its transpose,
//! `b_trans` means B is stored [n, k]; the crate takes strides, so a transpose costs nothing.

use super::elementwise::gelu;
use super::{f32_in, new_f32, pool};
use crate::backend::{Epilogue, GemmDesc, Trans};
use crate::{DType, Error, Result, Tensor};
use rayon::prelude::*;

fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// out[m, n] (+)= op(A)[m, k] @ op(B)[k, n] as `g` describes (its epilogue is not applied:
/// `matmul_forward` does that); accumulates into `out` when `accumulate` is true.
pub fn matmul(out: &mut [f32], a: &[f32], b: &[f32], g: &GemmDesc, accumulate: bool) {
    let GemmDesc { m, n, k, .. } = *g;
    let (a_trans, b_trans) = (g.a.is_t(), g.b.is_t());
    let (lda, ldb, ldc) = (g.lda(), g.ldb(), g.ldc());
    let [la, lb, lc] = g.lens();
    if let Err(e) = g.check_pitch("matmul") {
        panic!("{e}");
    }
    assert_eq!(out.len(), lc, "matmul: out has {} elements, expected {m} x {ldc}", out.len());
    assert_eq!(a.len(), la, "matmul: A has {} elements, expected {:?} rows x {lda}", a.len(), g.a_stored()[0]);
    assert_eq!(b.len(), lb, "matmul: B has {} elements, expected {:?} rows x {ldb}", b.len(), g.b_stored()[0]);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return;
    }
    // The gemm crate packs a column-major right-hand side slowly when k is large (measured at
    // GPT-2's backward shapes: 160 vs 380 GFLOP/s for 256x768x3072), so such a B is transposed
    // into a row-major copy first; the copy costs k*n moves against 2*m*n*k flops.
    if b_trans && k >= n && m >= 32 && g.pitch.b.is_none() {
        let mut bt = super::pool::take(k * n);
        transpose(&mut bt, b, n, k);
        matmul(out, a, &bt, &GemmDesc { b: Trans::No, ..*g }, accumulate);
        super::pool::give(bt);
        return;
    }
    // (row stride, column stride) of each operand as seen by the product.
    let (a_rs, a_cs) = if a_trans { (1, lda as isize) } else { (lda as isize, 1) };
    let (b_rs, b_cs) = if b_trans { (1, ldb as isize) } else { (ldb as isize, 1) };
    // SAFETY: the asserts above bound every index the strides can reach.
    // The crate computes dst = alpha * dst + beta * lhs @ rhs (alpha and beta swapped vs BLAS).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism(),
        );
    }
}

/// dst[c, r] = src[r, c] for src [rows, cols], in 32 x 32 tiles so both sides stay in cache.
pub fn transpose(dst: &mut [f32], src: &[f32], rows: usize, cols: usize) {
    const TILE: usize = 32;
    dst.par_chunks_mut(TILE * rows).enumerate().for_each(|(cb, dst)| {
        // dst rows cb*TILE .. are src columns cb*TILE ..
        let c0 = cb * TILE;
        let c1 = (c0 + TILE).min(cols);
        for r0 in (0..rows).step_by(TILE) {
            let r1 = (r0 + TILE).min(rows);
            for c in c0..c1 {
                let d = &mut dst[(c - c0) * rows + r0..(c - c0) * rows + r1];
                for (r, d) in (r0..r1).zip(d) {
                    *d = src[r * cols + c];
                }
            }
        }
    });
}

/// out[m, n] = op(A) @ op(B) + bias, optionally followed by GELU. With `gelu`, `pre` receives
/// the pre-activation (backward needs it) and `out` the activation.
pub fn matmul_forward(
    out: &mut [f32],
    pre: Option<&mut [f32]>,
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    g: &GemmDesc,
) {
    let (n, ldc) = (g.n, g.ldc());
    let bias_then_matmul = |dst: &mut [f32]| {
        if let Some(bias) = bias {
            dst.par_chunks_mut(ldc).for_each(|row| row[..n].copy_from_slice(bias));
        }
        matmul(dst, a, b, g, bias.is_some());
    };
    match pre {
        None => bias_then_matmul(out),
        Some(pre) => {
            bias_then_matmul(pre);
            out.par_chunks_mut(1 << 14).zip(pre.par_chunks(1 << 14)).for_each(|(o, p)| {
                for (o, &x) in o.iter_mut().zip(p) {
                    *o = gelu(x);
                }
            });
        }
    }
}

/// dbias[n] = sum over rows of dout[m, n]
pub fn bias_backward(dbias: &mut [f32], dout: &[f32], n: usize) {
    let rows = dout.len() / n.max(1);
    let per = super::rows_per_task(n).max(64);
    let partial: Vec<Vec<f32>> = dout
        .par_chunks(per * n)
        .map(|chunk| {
            let mut acc = vec![0f32; n];
            for row in chunk.chunks_exact(n) {
                super::axpy(&mut acc, 1.0, row);
            }
            acc
        })
        .collect();
    dbias.fill(0.0);
    for p in &partial {
        super::axpy(dbias, 1.0, p);
    }
    debug_assert!(rows * n == dout.len());
}

impl crate::backend::Matmul for super::Cpu {
    fn matmul(
        &self,
        a: &Tensor,
        b: &Tensor,
        bias: Option<&Tensor>,
        desc: &GemmDesc,
        out_dims: &[usize],
    ) -> Result<(Tensor, Option<Tensor>)> {
        const OP: &str = "matmul";
        let GemmDesc { m, epilogue, .. } = *desc;
        let (ad, bd) = (f32_in(OP, a)?, f32_in(OP, b)?);
        let biasd = bias.map(|t| f32_in(OP, t)).transpose()?;
        let mut pre = (epilogue == Epilogue::Gelu).then(|| pool::take(m * desc.ldc()));
        let out = new_f32(out_dims, |o| matmul_forward(o, pre.as_deref_mut(), ad, bd, biasd, desc))?;
        Ok((out, pre.map(|p| Tensor::from_f32(p, out_dims)).transpose()?))
    }

    fn gemm(&self, a: &Tensor, b: &Tensor, desc: &GemmDesc, dtype: DType, dims: &[usize]) -> Result<Tensor> {
        const OP: &str = "matmul backward";
        if dtype != DType::F32 {
            return Err(Error::DType { op: OP, expected: DType::F32, got: dtype });
        }
        let (ad, bd) = (f32_in(OP, a)?, f32_in(OP, b)?);
        new_f32(dims, |o| matmul(o, ad, bd, desc, false))
    }

    fn bias_grad(&self, g: &Tensor, n: usize) -> Result<Tensor> {
        let mut d = vec![0f32; n];
        bias_backward(&mut d, f32_in("matmul backward", g)?, n);
        Tensor::from_f32(d, [n])
    }

    fn gemm_accumulate(&self, out: &mut Tensor, a: &Tensor, b: &Tensor, desc: &GemmDesc) -> Result<()> {
        const OP: &str = "gemm_accumulate";
        let (ad, bd) = (f32_in(OP, a)?, f32_in(OP, b)?);
        if out.numel() != desc.m * desc.ldc() {
            return Err(Error::shape(
                OP,
                format!(
                    "out has {} elements, the product {} x {} (row pitch {})",
                    out.numel(),
                    desc.m,
                    desc.n,
                    desc.ldc()
                ),
            ));
        }
        matmul(out.f32s_mut()?, ad, bd, desc, true);
        Ok(())
    }
}
