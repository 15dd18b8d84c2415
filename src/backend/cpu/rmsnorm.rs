//! RMSNorm over the last dimension, one row per task, as transformers' LlamaRMSNorm computes it:
//! y = w * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps), saving rstd for backward. The mean of
//! squares is summed in f64 (PyTorch's reduction is near-exact; an f32 running sum over 2048
//! columns is not).

use super::{f32_in, new_f32, take_if, wrap};
use crate::{Result, Tensor};
use rayon::prelude::*;

/// 1 / sqrt(mean(x^2) + eps) of one row.
#[inline]
pub fn row_rstd(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64;
    1.0 / ((ms as f32) + eps).sqrt()
}

pub fn rmsnorm_forward(out: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], c: usize, eps: f32) {
    out.par_chunks_mut(c).zip(x.par_chunks(c)).zip(rstd.par_iter_mut()).with_min_len(super::rows_per_task(c)).for_each(
        |((o, x), r)| {
            let rs = row_rstd(x, eps);
            *r = rs;
            for i in 0..c {
                o[i] = w[i] * (x[i] * rs);
            }
        },
    );
}

/// dx = rstd * (g - xhat * mean(g * xhat)) with g = dout * w and xhat = x * rstd;
/// dw = sum over rows of dout * xhat. Either output may be skipped.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    c: usize,
) {
    if let Some(dx) = dx {
        dx.par_chunks_mut(c)
            .zip(dout.par_chunks(c).zip(x.par_chunks(c)))
            .zip(rstd.par_iter())
            .with_min_len(super::rows_per_task(c))
            .for_each(|((dx, (g, x)), &rs)| {
                let mut mean_gx = 0.0f32;
                for i in 0..c {
                    mean_gx += g[i] * w[i] * x[i] * rs;
                }
                mean_gx /= c as f32;
                for i in 0..c {
                    dx[i] = rs * (g[i] * w[i] - x[i] * rs * mean_gx);
                }
            });
    }
    let Some(dw) = dw else { return };
    let rows = rstd.len();
    let per = super::rows_per_task(c).max(32);
    let partial: Vec<Vec<f32>> = (0..rows.div_ceil(per))
        .into_par_iter()
        .map(|t| {
            let mut pw = vec![0f32; c];
            for r in t * per..((t + 1) * per).min(rows) {
                let (g, x) = (&dout[r * c..(r + 1) * c], &x[r * c..(r + 1) * c]);
                for i in 0..c {
                    pw[i] += g[i] * x[i] * rstd[r];
                }
            }
            pw
        })
        .collect();
    dw.fill(0.0);
    for pw in &partial {
        super::axpy(dw, 1.0, pw);
    }
}

impl crate::backend::RmsNorm for super::Cpu {
    fn rmsnorm(&self, x: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        const OP: &str = "rmsnorm";
        let (c, rows) = (x.shape().last(), x.shape().rows());
        let (xd, wd) = (f32_in(OP, x)?, f32_in(OP, w)?);
        let mut rstd = vec![0f32; rows];
        let out = new_f32(x.dims(), |o| rmsnorm_forward(o, &mut rstd, xd, wd, c, eps))?;
        Ok((out, Tensor::from_f32(rstd, [rows])?))
    }

    fn rmsnorm_backward(
        &self,
        dout: &Tensor,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        needs: [bool; 2],
    ) -> Result<[Option<Tensor>; 2]> {
        const OP: &str = "rmsnorm backward";
        let c = x.shape().last();
        let mut dx = take_if(needs[0], x.numel());
        let mut dw = needs[1].then(|| vec![0f32; c]);
        let (g, xd, wd, rd) = (f32_in(OP, dout)?, f32_in(OP, x)?, f32_in(OP, w)?, f32_in(OP, rstd)?);
        rmsnorm_backward(dx.as_deref_mut(), dw.as_deref_mut(), g, xd, wd, rd, c);
        Ok([wrap(dx, x.dims())?, wrap(dw, &[c])?])
    }
}
