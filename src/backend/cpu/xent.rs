//! Fused softmax cross-entropy over rows of logits [N, V]: one pass finds each row's max and
//! log-sum-exp, the loss of a row is lse - logit[target]; rows whose target is `IGNORE` (-100)
//! count for nothing. Backward writes dlogits = (softmax - onehot) * scale from the saved lse,
//! without keeping the probabilities.

use super::elementwise::fast_exp;
use super::f32_in;
use crate::backend::XentSaved;
use crate::{Result, Tensor};
use rayon::prelude::*;

/// The label that marks a position without a target (PyTorch's ignore_index).
pub const IGNORE: i32 = crate::abi::KILN_XENT_IGNORE as i32;

/// log sum exp of a row, computed stably (max first). Eight independent lanes for the max and
/// the sum let the loops vectorise; fast_exp keeps libm out of the inner loop.
#[inline]
pub fn logsumexp(row: &[f32]) -> f32 {
    let mut mx = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks.clone() {
        for i in 0..8 {
            mx[i] = mx[i].max(c[i]);
        }
    }
    let m = tail.iter().copied().fold(mx.iter().copied().fold(f32::NEG_INFINITY, f32::max), f32::max);
    let mut acc = [0f32; 8];
    for c in chunks {
        for i in 0..8 {
            acc[i] += fast_exp(c[i] - m);
        }
    }
    let s = acc.iter().sum::<f32>() + tail.iter().map(|&x| fast_exp(x - m)).sum::<f32>();
    m + s.ln()
}

/// Writes each row's lse and loss (0 for ignored rows) from logits whose rows of `v` values lie
/// `pitch` elements apart; returns (sum of losses, counted rows). The sum runs serially in row
/// order, so it is the same however the rows were scheduled.
pub fn xent_forward(
    losses: &mut [f32],
    lse: &mut [f32],
    logits: &[f32],
    targets: &[i32],
    v: usize,
    pitch: usize,
) -> (f64, usize) {
    losses.par_iter_mut().zip(lse.par_iter_mut()).zip(logits.par_chunks(pitch).zip(targets.par_iter())).for_each(
        |((loss, lse), (row, &tgt))| {
            let row = &row[..v];
            *lse = logsumexp(row);
            *loss = if tgt == IGNORE { 0.0 } else { *lse - row[tgt as usize] };
        },
    );
    let count = targets.iter().filter(|&&t| t != IGNORE).count();
    (losses.iter().map(|&l| l as f64).sum(), count)
}

/// dlogits[r] = (softmax(logits[r]) - onehot(target[r])) * scale, in place (`z` holds the logits
/// on entry, rows of `v` values `pitch` apart; the columns past v are left alone); zero for
/// ignored rows.
pub fn xent_backward(z: &mut [f32], lse: &[f32], targets: &[i32], v: usize, pitch: usize, scale: f32) {
    z.par_chunks_mut(pitch).zip(lse.par_iter().zip(targets.par_iter())).for_each(|(d, (&lse, &tgt))| {
        let d = &mut d[..v];
        if tgt == IGNORE {
            d.fill(0.0);
            return;
        }
        for x in d.iter_mut() {
            *x = fast_exp(*x - lse) * scale;
        }
        d[tgt as usize] -= scale;
    });
}

impl crate::backend::CrossEntropy for super::Cpu {
    fn cross_entropy(&self, logits: &Tensor, targets: &Tensor, v: usize) -> Result<XentSaved> {
        let (pitch, n) = (logits.shape().last(), logits.shape().rows());
        let (ld, td) = (f32_in("cross_entropy", logits)?, targets.i32s()?);
        let (mut losses, mut lse) = (vec![0f32; n], vec![0f32; n]);
        let (sum, count) = xent_forward(&mut losses, &mut lse, ld, td, v, pitch);
        Ok(XentSaved { sum, count, lse: Tensor::from_f32(lse, [n])?, targets: targets.clone() })
    }

    fn cross_entropy_backward(&self, mut logits: Tensor, saved: &XentSaved, scale: f32, v: usize) -> Result<Tensor> {
        const OP: &str = "cross_entropy backward";
        let pitch = logits.shape().last();
        let (t, lse) = (saved.targets.i32s()?, f32_in(OP, &saved.lse)?);
        xent_backward(logits.f32s_mut()?, lse, t, v, pitch, scale);
        Ok(logits)
    }
}
