//! One training step (forward, backward, fp32 AdamW) on the CPU for the tiny presets of both
//! families, GPT-2 124M and SmolLM2-135M at batch 4 x 64, in FLOP (6 x params x tokens + attention), so criterion's
//! elem/s reads as FLOP/s; the sgemm ceiling of the same run is printed first. `kiln bench
//! train-step` prints the same figures with the ratio and a per-op breakdown.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln::model::{Config, Model};

fn bench(c: &mut Criterion) {
    let (ceiling, _) = kiln::bench::sgemm_ceiling();
    println!("sgemm ceiling: {ceiling:.1} GFLOP/s");
    let mut g = c.benchmark_group("train_step");
    for preset in ["tiny", "llama-tiny", "gpt2", "smollm2-135m"] {
        let cfg = Config::preset(preset).unwrap();
        let mut model = Model::new_random(cfg.clone(), 0).unwrap();
        g.throughput(Throughput::Elements(kiln::bench::train_step_flops(&cfg, 4, 64) as u64));
        g.bench_function(format!("{preset} 4x64"), |b| {
            b.iter(|| kiln::bench::train_step(&mut model, 4, 64, 0, 1, |_, _| {}).unwrap())
        });
    }
    g.finish();
}

criterion_group! { name = benches; config = Criterion::default().sample_size(10); targets = bench }
criterion_main!(benches);
