//! Reductions: the sum of squares behind the global gradient norm used for clipping. Partial sums
//! are taken over fixed-size chunks and added in chunk order, so the result does not depend on
//! how rayon schedules the work: a resumed run reproduces an uninterrupted one bit for bit.

use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// sum of x[i]^2, accumulated in f64.
pub fn sum_squares(x: &[f32]) -> f64 {
    let partial: Vec<f64> = x.par_chunks(CHUNK).map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum()).collect();
    partial.iter().sum()
}

/// x *= s
pub fn scale(x: &mut [f32], s: f32) {
    x.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v *= s));
}
