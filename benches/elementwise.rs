//! GELU forward/backward, residual add and dropout over GPT-2 124M's MLP activation
//! (256 x 3072), in bytes moved, next to a plain copy as the bandwidth ceiling.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln::backend::cpu::elementwise::*;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("elementwise");
    let n = 256 * 3072;
    let x: Vec<f32> = (0..n).map(|i| (i % 101) as f32 * 0.05 - 2.5).collect();
    let mut y = vec![0f32; n];
    let mut d = vec![0f32; n];
    let mut mask = vec![0u8; n];
    g.throughput(Throughput::Bytes((8 * n) as u64));
    g.bench_function("copy (ceiling)", |b| b.iter(|| y.copy_from_slice(&x)));
    g.bench_function("gelu forward", |b| b.iter(|| gelu_forward(&mut y, &x)));
    g.throughput(Throughput::Bytes((12 * n) as u64));
    g.bench_function("gelu backward", |b| b.iter(|| gelu_backward(&mut d, &x, &y)));
    g.bench_function("residual add", |b| b.iter(|| residual_forward(&mut d, &x, &y)));
    g.throughput(Throughput::Bytes(n as u64));
    g.bench_function("dropout mask", |b| b.iter(|| dropout_mask(&mut mask, 7, 0.1)));
    g.finish();
}

criterion_group! { name = benches; config = Criterion::default().sample_size(20); targets = bench }
criterion_main!(benches);
