//! Causal flash attention on the CPU, forward and backward, at GPT-2 124M's width (C = 768,
//! 12 heads) for T = 64 and T = 1024. Throughput is in FLOP (4 C per causal (query, key) pair
//! forward, twice that backward).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln::backend::cpu::attention::{attention_backward, attention_forward};
use kiln::backend::AttnDims;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    let (nh, ch) = (12, 768);
    for (b, t) in [(4, 64), (1, 1024)] {
        let qkv: Vec<f32> = (0..b * t * 3 * ch).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let (mut out, mut lse) = (vec![0f32; b * t * ch], vec![0f32; b * nh * t]);
        let pairs = (b * t * (t + 1) / 2) as u64;
        g.throughput(Throughput::Elements(4 * ch as u64 * pairs));
        g.bench_function(BenchmarkId::new("forward", format!("B{b} T{t}")), |x| {
            x.iter(|| attention_forward(&mut out, &mut lse, &qkv, &AttnDims { b, t, c: ch, nh }))
        });
        let dout = vec![0.01f32; b * t * ch];
        let mut dqkv = vec![0f32; qkv.len()];
        g.throughput(Throughput::Elements(8 * ch as u64 * pairs));
        g.bench_function(BenchmarkId::new("backward", format!("B{b} T{t}")), |x| {
            x.iter(|| attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &AttnDims { b, t, c: ch, nh }))
        });
    }
    g.finish();
}

criterion_group! { name = benches; config = Criterion::default().sample_size(10); targets = bench }
criterion_main!(benches);
