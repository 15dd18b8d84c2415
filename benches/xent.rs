//! Fused softmax cross-entropy over GPT-2's vocabulary (256 rows x 50257), forward and
//! backward (in place, as the op runs it), in bytes of logits read (and dlogits written), next to
//! a copy as the ceiling.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln::backend::cpu::xent::{xent_backward, xent_forward};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("xent");
    let (n, v) = (256, 50257);
    let logits: Vec<f32> = (0..n * v).map(|i| ((i * 31) % 1000) as f32 * 0.01).collect();
    let targets: Vec<i32> = (0..n as i32).map(|i| (i * 97) % v as i32).collect();
    let (mut losses, mut lse) = (vec![0f32; n], vec![0f32; n]);
    let mut d = logits.clone();
    g.throughput(Throughput::Bytes((4 * n * v) as u64));
    g.bench_function("copy (ceiling)", |b| b.iter(|| d.copy_from_slice(&logits)));
    g.bench_function("forward", |b| b.iter(|| xent_forward(&mut losses, &mut lse, &logits, &targets, v, v)));
    g.throughput(Throughput::Bytes((8 * n * v) as u64));
    // Each pass turns d's values into the next pass's input: the same work, finite values.
    g.bench_function("backward", |b| b.iter(|| xent_backward(&mut d, &lse, &targets, v, v, 1.0 / n as f32)));
    g.finish();
}

criterion_group! { name = benches; config = Criterion::default().sample_size(10); targets = bench }
criterion_main!(benches);
