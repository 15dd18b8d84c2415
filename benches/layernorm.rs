//! LayerNorm forward and backward over 256 rows of C = 768 (GPT-2 124M, 4 x 64 tokens), in
//! bytes moved (read x, write y; backward reads x and dy, writes dx), against a plain copy of
//! the same bytes measured in the same run as the memory-bandwidth ceiling.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln::backend::cpu::layernorm::{layernorm_backward, layernorm_forward};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("layernorm");
    let (n, ch) = (256, 768);
    let x: Vec<f32> = (0..n * ch).map(|i| (i % 97) as f32 * 0.01).collect();
    let (w, bias) = (vec![1.1f32; ch], vec![0.1f32; ch]);
    let (mut y, mut mean, mut rstd) = (vec![0f32; n * ch], vec![0f32; n], vec![0f32; n]);
    g.throughput(Throughput::Bytes((2 * 4 * n * ch) as u64));
    let mut copy = vec![0f32; n * ch];
    g.bench_function("copy (ceiling)", |b| b.iter(|| copy.copy_from_slice(&x)));
    g.bench_function("forward", |b| {
        b.iter(|| layernorm_forward(&mut y, &mut mean, &mut rstd, &x, &w, &bias, ch, 1e-5))
    });
    let mut dx = vec![0f32; n * ch];
    let (mut dw, mut db) = (vec![0f32; ch], vec![0f32; ch]);
    g.throughput(Throughput::Bytes((3 * 4 * n * ch) as u64));
    g.bench_function("backward", |b| {
        b.iter(|| layernorm_backward(Some(&mut dx), Some(&mut dw), Some(&mut db), &y, &x, &w, &mean, &rstd, ch))
    });
    g.finish();
}

criterion_group! { name = benches; config = Criterion::default().sample_size(20); targets = bench }
criterion_main!(benches);
