//! LayerNorm over the last dimension, one row per task: y = (x - mean) * rstd * w + b, saving
//! mean and rstd (1 / sqrt(var + eps), biased variance as PyTorch uses) for backward.

use super::{f32_in, new_f32, take_if, wrap};
use crate::backend::RowStats;
use crate::{Result, Tensor};
use rayon::prelude::*;

/// Mean and variance of one row, two passes (one for the mean, one for the centred squares).
#[inline]
pub fn row_stats(x: &[f32]) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, var)
}

#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    x: &[f32],
    w: &[f32],
    b: &[f32],
    c: usize,
    eps: f32,
) {
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .with_min_len(super::rows_per_task(c))
        .for_each(|((o, x), (m, r))| {
            let (mu, var) = row_stats(x);
            let rs = 1.0 / (var + eps).sqrt();
            *m = mu;
            *r = rs;
            for i in 0..c {
                o[i] = (x[i] - mu) * rs * w[i] + b[i];
            }
        });
}

/// dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dout * w;
/// dw = sum over rows of dout * xhat, db = sum over rows of dout. Any output may be skipped.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
) {
    if let Some(dx) = dx {
        dx.par_chunks_mut(c)
            .zip(dout.par_chunks(c).zip(x.par_chunks(c)))
            .zip(mean.par_iter().zip(rstd.par_iter()))
            .with_min_len(super::rows_per_task(c))
            .for_each(|((dx, (g, x)), (&mu, &rs))| {
                let mut mean_dxhat = 0.0f32;
                let mut mean_dxhat_xhat = 0.0f32;
                for i in 0..c {
                    let xhat = (x[i] - mu) * rs;
                    let dxhat = g[i] * w[i];
                    mean_dxhat += dxhat;
                    mean_dxhat_xhat += dxhat * xhat;
                }
                mean_dxhat /= c as f32;
                mean_dxhat_xhat /= c as f32;
                for i in 0..c {
                    let xhat = (x[i] - mu) * rs;
                    dx[i] = rs * (g[i] * w[i] - mean_dxhat - xhat * mean_dxhat_xhat);
                }
            });
    }
    if dw.is_none() && db.is_none() {
        return;
    }
    let rows = mean.len();
    let per = super::rows_per_task(c).max(32);
    let partial: Vec<(Vec<f32>, Vec<f32>)> = (0..rows.div_ceil(per))
        .into_par_iter()
        .map(|t| {
            let (mut pw, mut pb) = (vec![0f32; c], vec![0f32; c]);
            for r in t * per..((t + 1) * per).min(rows) {
                let (g, x) = (&dout[r * c..(r + 1) * c], &x[r * c..(r + 1) * c]);
                for i in 0..c {
                    pw[i] += g[i] * (x[i] - mean[r]) * rstd[r];
                    pb[i] += g[i];
                }
            }
            (pw, pb)
        })
        .collect();
    if let Some(dw) = dw {
        dw.fill(0.0);
        for (pw, _) in &partial {
            super::axpy(dw, 1.0, pw);
        }
    }
    if let Some(db) = db {
        db.fill(0.0);
        for (_, pb) in &partial {
            super::axpy(db, 1.0, pb);
        }
    }
}

impl crate::backend::Norm for super::Cpu {
    fn layernorm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<(Tensor, RowStats)> {
        const OP: &str = "layernorm";
        let (c, rows) = (x.shape().last(), x.shape().rows());
        let (xd, wd, bd) = (f32_in(OP, x)?, f32_in(OP, w)?, f32_in(OP, b)?);
        let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
        let out = new_f32(x.dims(), |o| layernorm_forward(o, &mut mean, &mut rstd, xd, wd, bd, c, eps))?;
        Ok((out, RowStats { mean: Tensor::from_f32(mean, [rows])?, rstd: Tensor::from_f32(rstd, [rows])? }))
    }

    fn layernorm_backward(
        &self,
        dout: &Tensor,
        x: &Tensor,
        w: &Tensor,
        stats: &RowStats,
        needs: [bool; 3],
    ) -> Result<[Option<Tensor>; 3]> {
        const OP: &str = "layernorm backward";
        let c = x.shape().last();
        let mut dx = take_if(needs[0], x.numel());
        let mut dw = needs[1].then(|| vec![0f32; c]);
        let mut db = needs[2].then(|| vec![0f32; c]);
        layernorm_backward(
            dx.as_deref_mut(),
            dw.as_deref_mut(),
            db.as_deref_mut(),
            f32_in(OP, dout)?,
            f32_in(OP, x)?,
            f32_in(OP, w)?,
            f32_in(OP, &stats.mean)?,
            f32_in(OP, &stats.rstd)?,
            c,
        );
        Ok([wrap(dx, x.dims())?, wrap(dw, &[c])?, wrap(db, &[c])?])
    }
}
