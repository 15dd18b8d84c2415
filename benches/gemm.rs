//! GEMM at GPT-2 124M's shapes for a 4 x 64 batch (M = 256 tokens), forward and the two
//! backward products, against the square 1024^3 sgemm ceiling. Throughput is in FLOP, so
//! criterion's "elem/s" reads as FLOP/s.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kiln::backend::cpu::gemm::matmul;
use kiln::backend::{GemmDesc, Trans};

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm");
    let shapes = [
        ("ceiling 1024^3", 1024, 1024, 1024, false, false),
        ("c_attn fwd", 256, 2304, 768, false, false),
        ("c_fc fwd", 256, 3072, 768, false, false),
        ("c_fc dX (G W^T)", 256, 768, 3072, false, true),
        ("c_fc dW (X^T G)", 768, 3072, 256, true, false),
        ("lm_head fwd", 256, 50257, 768, false, true),
    ];
    for (name, m, n, k, ta, tb) in shapes {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        g.bench_function(BenchmarkId::new(name, format!("{m}x{n}x{k}")), |bch| {
            bch.iter(|| {
                matmul(&mut out, &a, &b, &GemmDesc::new(m, n, k, Trans::from_bool(ta), Trans::from_bool(tb)), false)
            })
        });
    }
    g.finish();
}

criterion_group! { name = benches; config = Criterion::default().sample_size(10); targets = bench }
criterion_main!(benches);
