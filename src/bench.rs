//! Benchmark harness shared by `kiln bench` and the criterion benches: the sgemm ceiling, FLOP
//! counts and a timed GPT-2 training step. Figures are always reported next to a ceiling
//! measured in the same process, so a number means the same on any machine.

use crate::backend::GemmDesc;
use crate::model::{Config, Mode, Model};
use crate::optim::{AdamW, AdamWConfig};
use crate::{Result, Tape, Tensor};
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

/// Achieved GFLOP/s of the CPU backend's sgemm at [m, k] x [k, n], best of `reps` runs after one
/// warm-up.
pub fn sgemm_gflops(m: usize, n: usize, k: usize, reps: usize) -> f64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let a: Vec<f32> = (0..m * k).map(|_| rng.random::<f32>() - 0.5).collect();
    let b: Vec<f32> = (0..k * n).map(|_| rng.random::<f32>() - 0.5).collect();
    let mut c = vec![0f32; m * n];
    crate::backend::cpu::gemm::matmul(&mut c, &a, &b, &GemmDesc::nn(m, n, k), false);
    let best = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            crate::backend::cpu::gemm::matmul(&mut c, &a, &b, &GemmDesc::nn(m, n, k), false);
            t.elapsed()
        })
        .min()
        .unwrap_or(Duration::from_secs(1));
    2.0 * (m * n * k) as f64 / best.as_secs_f64() / 1e9
}

/// The sgemm ceiling: the best of a square 1024^3 product and GPT-2 124M's MLP shape.
pub fn sgemm_ceiling() -> (f64, Vec<(String, f64)>) {
    let shapes = [(1024, 1024, 1024), (768, 3072, 768)];
    let each: Vec<(String, f64)> =
        shapes.iter().map(|&(m, n, k)| (format!("{m}x{n}x{k}"), sgemm_gflops(m, n, k, 5))).collect();
    let best = each.iter().map(|(_, g)| *g).fold(0.0, f64::max);
    (best, each)
}

/// FLOPs of one training step (forward + backward) on `b` x `t` tokens: 6 per parameter per
/// token (2 forward, 4 backward), plus causal attention: q.k and p.v cost 2 * C FLOPs each per
/// (query, key) pair with key <= query, t(t+1)/2 pairs per sequence and layer, times 3 for
/// forward and backward (C here is the width of the query heads, n_head * head_dim). GPT-2's
/// wpe counts in the parameters though it is a lookup (0.6% of 124M), as does an embedding
/// table that is not also the output layer.
pub fn train_step_flops(config: &Config, b: usize, t: usize) -> f64 {
    let tokens = (b * t) as f64;
    let params = config.num_params() as f64;
    let pairs = (t * (t + 1) / 2) as f64;
    let q_width = match config {
        Config::Gpt2(c) => c.n_embd,
        Config::Llama(c) => c.q_width(),
    };
    let attention = 3.0 * 4.0 * q_width as f64 * pairs * b as f64 * config.n_layer() as f64;
    6.0 * params * tokens + attention
}

/// Timings of a training step.
pub struct TrainStepReport {
    pub params: usize,
    pub tokens: usize,
    /// Wall time of each timed step (forward, backward, AdamW).
    pub steps: Vec<Duration>,
    pub forward: Duration,
    pub backward: Duration,
    pub optimizer: Duration,
    pub flops: f64,
    pub losses: Vec<f32>,
}

impl TrainStepReport {
    /// The median step time.
    pub fn median(&self) -> Duration {
        let mut s = self.steps.clone();
        s.sort();
        s[s.len() / 2]
    }
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.median().as_secs_f64()
    }
    pub fn gflops(&self) -> f64 {
        self.flops / self.median().as_secs_f64() / 1e9
    }
}

/// A random batch of `b` rows of `t` token ids below `vocab`.
pub fn random_tokens(vocab: usize, b: usize, t: usize, seed: u64) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Tensor::from_i32((0..b * t).map(|_| rng.random_range(0..vocab as i32)).collect(), [b, t])
}

/// Runs `warmup` untimed and `steps` timed training steps of `model` on random tokens; the
/// forward/backward/optimizer split is the mean over the timed steps.
pub fn train_step(
    model: &mut Model,
    b: usize,
    t: usize,
    warmup: usize,
    steps: usize,
    mut on_step: impl FnMut(usize, Duration),
) -> Result<TrainStepReport> {
    let cfg = model.config.clone();
    let ids = random_tokens(cfg.vocab_size(), b, t, 1)?;
    let targets = crate::data::batch::Batch { input_ids: ids.clone(), labels: None }.targets()?;
    let mut opt = AdamW::new(AdamWConfig { lr: 1e-4, ..Default::default() });
    let mut report = TrainStepReport {
        params: cfg.num_params(),
        tokens: b * t,
        steps: vec![],
        forward: Duration::ZERO,
        backward: Duration::ZERO,
        optimizer: Duration::ZERO,
        flops: train_step_flops(&cfg, b, t),
        losses: vec![],
    };
    for i in 0..warmup + steps.max(1) {
        if i == warmup {
            crate::profile::reset();
            crate::profile::enable(true);
        }
        let t0 = Instant::now();
        let mut tape = Tape::new();
        let out = model.forward(&mut tape, &ids, Some(&targets), Mode::Train { seed: i as u64 })?;
        let loss = out.loss.expect("targets were given");
        settle(model)?;
        let t1 = Instant::now();
        let grads = tape.backward(&loss)?;
        settle(model)?;
        let t2 = Instant::now();
        opt.step(&mut model.params, &grads, 1e-4)?;
        drop(grads);
        settle(model)?;
        let t3 = Instant::now();
        if i >= warmup {
            report.steps.push(t3 - t0);
            report.forward += t1 - t0;
            report.backward += t2 - t1;
            report.optimizer += t3 - t2;
            report.losses.push(loss.item()?);
        }
        on_step(i, t3 - t0);
    }
    crate::profile::enable(false);
    let n = report.steps.len() as u32;
    report.forward /= n;
    report.backward /= n;
    report.optimizer /= n;
    Ok(report)
}

/// Waits for the model's device, so host clocks time finished work (a no-op on the CPU).
fn settle(model: &Model) -> Result<()> {
    crate::backend::backend(model.device())?.sync()
}
