//! Learning-rate schedules: linear warm-up from 0, then cosine, linear or constant to the end.

/// The learning rate at 0-based `step` of `max_steps`.
pub fn lr_at(step: usize, max_steps: usize, lr: f64, min_lr_ratio: f64, warmup: usize, schedule: &str) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let min_lr = lr * min_lr_ratio;
    let span = max_steps.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        "cosine" => min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos()),
        "linear" => lr - (lr - min_lr) * progress,
        _ => lr,
    }
}
