//! `kiln bench kernels`: every kernel family timed on the GPU, each figure next to a ceiling
//! measured in the same run (METHOD.md's two numbers):
//! - matrix-bound kernels (GEMM, attention) against cuBLAS' bf16 GEMM with f32 compute at the same
//!   shape (cuBLAS is the benchmark baseline only; the training path never calls it);
//! - memory-bound kernels against a device-to-device copy of a buffer far larger than L2,
//!   counting bytes read plus bytes written for both.
//!
//! Timing: CUDA events around each repetition after warm-up, median reported; inputs are random
//! (never zeros, which can run faster than real data) and each memory-bound kernel's working set
//! is several times the L2 so repetitions do not measure the cache.

use super::gemm::GemmVariant;
use super::{bf16, cuda, Cuda, DevBuf, DeviceElem};
use crate::backend::AttnDims;
use crate::backend::GemmDesc;
use crate::{Error, Result};
use rand::{Rng, SeedableRng};

/// One line of the table.
pub struct Row {
    pub kernel: String,
    pub shape: String,
    pub ms: f64,
    /// TFLOP/s or GB/s, per `unit`.
    pub achieved: f64,
    pub unit: &'static str,
    /// The ceiling's figure in the same unit, and what it is.
    pub ceiling: f64,
    pub ceiling_name: String,
    /// The target ratio the CUDA issue sets, if any.
    pub target: Option<f64>,
}

impl Row {
    pub fn ratio(&self) -> f64 {
        self.achieved / self.ceiling
    }
}

/// Median milliseconds of `reps` runs of `f`, timed with events after `warmup` untimed runs.
pub fn time_ms(cu: &Cuda, warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    cu.sync()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let start = cu.event()?;
        f()?;
        let end = cu.event()?;
        times.push(cu.elapsed_ms(&start, &end)? as f64);
    }
    cu.sync()?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Uniform values in [-1, 1) on the device.
pub fn random_bf16(cu: &Cuda, n: usize, seed: u64) -> Result<DevBuf<bf16>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let h: Vec<bf16> = (0..n).map(|_| bf16::from_f32(rng.random::<f32>() * 2.0 - 1.0)).collect();
    cu.upload(&h)
}

/// Uniform values in [-1, 1) on the device.
pub fn random_f32(cu: &Cuda, n: usize, seed: u64) -> Result<DevBuf<f32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let h: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
    cu.upload(&h)
}

/// Device-to-device copy bandwidth in GB/s (bytes read + bytes written), on `bytes`-sized buffers.
pub fn copy_bandwidth(cu: &Cuda, bytes: usize) -> Result<f64> {
    let n = bytes / 4;
    let src = random_f32(cu, n, 1)?;
    let mut dst = cu.alloc::<f32>(n)?;
    let ms = time_ms(cu, 3, 20, || cu.copy(&mut dst, &src))?;
    Ok(2.0 * (n * 4) as f64 / (ms * 1e-3) / 1e9)
}

/// cuBLAS bf16 GEMM (f32 compute) in TFLOP/s for row-major C[m,n] = A[m,k] B[k,n], or None (with
/// the reason) when libcublas cannot be loaded here.
pub fn cublas_tflops(cu: &Cuda, m: usize, n: usize, k: usize) -> Result<std::result::Result<f64, String>> {
    use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t as Op, cudaDataType};
    use cudarc::cublas::CudaBlas;
    let Some(drv) = cu.driver() else {
        return Ok(Err("cuBLAS runs on a GPU only (this is the emulated device)".into()));
    };
    // SAFETY: only looks for the driver library; nothing is called in it.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Ok(Err("libcublas not found (put its directory on LD_LIBRARY_PATH)".into()));
    }
    let blas = CudaBlas::new(drv.stream().clone()).map_err(|e| Error::Cuda(format!("cuBLAS init failed: {e}")))?;
    let a = random_bf16(cu, m * k, 2)?;
    let b = random_bf16(cu, k * n, 3)?;
    let c = cu.alloc::<bf16>(m * n)?;
    // Row-major C = A B is column-major C^T = B^T A^T: pass B first. bf16 data, f32 compute.
    let (alpha, beta) = (1f32, 0f32);
    let ms = time_ms(cu, 3, 20, || {
        // SAFETY: a, b and c hold m * k, k * n and m * n bf16 elements, the shapes passed to cuBLAS.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                Op::CUBLAS_OP_N,
                Op::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const std::ffi::c_void,
                b.ptr() as *const std::ffi::c_void,
                cudaDataType::CUDA_R_16BF,
                n as i32,
                a.ptr() as *const std::ffi::c_void,
                cudaDataType::CUDA_R_16BF,
                k as i32,
                &beta as *const f32 as *const std::ffi::c_void,
                c.ptr() as *mut std::ffi::c_void,
                cudaDataType::CUDA_R_16BF,
                n as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::Cuda(format!("cuBLAS gemm failed: {e}")))
    })?;
    Ok(Ok(2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12))
}

/// Bytes of `n` elements of `T`.
pub fn bytes_of<T: DeviceElem>(n: usize) -> f64 {
    (n * std::mem::size_of::<T>()) as f64
}

/// Prints the table, ratios and targets included.
pub fn print_table(rows: &[Row]) {
    println!(
        "{:<26} {:<22} {:>9} {:>14} {:>28} {:>7} {:>7}",
        "kernel", "shape", "ms", "achieved", "ceiling (same run)", "ratio", "target"
    );
    for r in rows {
        let target = r
            .target
            .map_or(String::new(), |t| format!("{:.0}%{}", 100.0 * t, if r.ratio() >= t { "" } else { " MISS" }));
        println!(
            "{:<26} {:<22} {:>9.3} {:>9.1} {:<4} {:>15.1} {:<12} {:>6.0}% {:>7}",
            r.kernel,
            r.shape,
            r.ms,
            r.achieved,
            r.unit,
            r.ceiling,
            r.ceiling_name,
            100.0 * r.ratio(),
            target
        );
    }
}

/// Runs every benchmark and prints the table.
pub fn run() -> Result<()> {
    let cu = cuda()?;
    let (maj, min) = cu.compute_capability();
    println!("kiln bench kernels: {} (sm_{maj}{min}, {} SMs)", cu.name(), cu.sm_count());
    let copy = copy_bandwidth(cu, 1 << 30)?;
    println!("  device-to-device copy: {copy:.0} GB/s (1 GiB, read + write)");
    let mut rows = Vec::new();
    for f in [
        gemm_rows,
        bias_rows,
        attention_rows,
        layernorm_rows,
        rmsnorm_rows,
        rope_rows,
        super::elementwise::bench,
        embedding_rows,
        xent_rows,
        super::adamw::bench,
        super::adamw8bit::bench,
        reduce_rows,
        nf4_rows,
        linear_rows,
    ] {
        // One family's failure is reported and the others still run.
        match f(cu, copy) {
            Ok(r) => rows.extend(r),
            Err(e) => println!("  FAILED: {e}"),
        }
    }
    print_table(&rows);
    let missed: Vec<&Row> = rows.iter().filter(|r| r.target.is_some_and(|t| r.ratio() < t)).collect();
    println!(
        "{} of {} rows with a target meet it",
        rows.iter().filter(|r| r.target.is_some()).count() - missed.len(),
        rows.iter().filter(|r| r.target.is_some()).count()
    );
    Ok(())
}

/// Rows for GEMM at 4096^3 and at GPT-2 124M's training shapes (B x T = 8192 tokens), each
/// against cuBLAS at the same shape.
pub fn gemm_rows(cu: &Cuda, _copy: f64) -> Result<Vec<Row>> {
    let shapes: [(&str, usize, usize, usize); 5] = [
        ("square", 4096, 4096, 4096),
        ("c_attn", 8192, 2304, 768),
        ("mlp.c_fc", 8192, 3072, 768),
        ("mlp.c_proj", 8192, 768, 3072),
        ("lm_head", 8192, 50257, 768),
    ];
    let mut rows = Vec::new();
    for (what, m, n, k) in shapes {
        let a = random_bf16(cu, m * k, 11)?;
        let b = random_bf16(cu, k * n, 12)?;
        let mut c = cu.alloc::<bf16>(m * n)?;
        let ms = time_ms(cu, 3, 20, || super::gemm::matmul(&mut c, &a, &b, &GemmDesc::nn(m, n, k), false))?;
        let tflops = 2.0 * (m * n * k) as f64 / (ms * 1e-3) / 1e12;
        let (ceiling, name) = match cublas_tflops(cu, m, n, k)? {
            Ok(t) => (t, "cuBLAS".to_string()),
            Err(why) => {
                println!("  gemm {what}: {why}");
                (f64::NAN, "cuBLAS n/a".to_string())
            }
        };
        rows.push(Row {
            kernel: format!("gemm ({what})"),
            shape: format!("{m}x{n}x{k}"),
            ms,
            achieved: tflops,
            unit: "TF/s",
            ceiling,
            ceiling_name: name,
            target: Some(0.95),
        });
    }
    // The backward layouts at 4096^3 (dX = dY W^T reads B stored [n, k]; dW = X^T dY reads A
    // stored [k, m]), against cuBLAS' rate for the forward layout; and on sm_90 the mma.sync kernel
    // that Best replaces there, so one run shows what wgmma gains.
    let (ceiling, ceiling_name) = (rows[0].ceiling, format!("{} nn", rows[0].ceiling_name));
    let s = 4096;
    let a = random_bf16(cu, s * s, 11)?;
    let b = random_bf16(cu, s * s, 12)?;
    let mut c = cu.alloc::<bf16>(s * s)?;
    let mut extra = vec![
        ("gemm (square, dX layout nt)", GemmVariant::Best, GemmDesc::nt(s, s, s)),
        ("gemm (square, dW layout tn)", GemmVariant::Best, GemmDesc::tn(s, s, s)),
    ];
    if super::gemm::runs_wgmma(cu) {
        extra.push(("gemm mma.sync (square)", GemmVariant::MmaSync, GemmDesc::nn(s, s, s)));
    }
    for (what, variant, g) in extra {
        let ms = time_ms(cu, 3, 20, || super::gemm::matmul_with(variant, &mut c, None, &a, &b, None, &g, false))?;
        rows.push(Row {
            kernel: what.into(),
            shape: format!("{s}x{s}x{s}"),
            ms,
            achieved: 2.0 * (s * s * s) as f64 / (ms * 1e-3) / 1e12,
            unit: "TF/s",
            ceiling,
            ceiling_name: ceiling_name.clone(),
            target: Some(0.95),
        });
    }
    Ok(rows)
}

/// Causal attention forward and backward at B=8, H=12, T=1024, D=64, against cuBLAS' rate at
/// 4096^3 (the GEMM ceiling). FLOPs count the causal half: 4·B·H·D·T(T+1)/2 forward (Q Kᵀ and
/// P V), 2.5 times that backward (five products).
pub fn attention_rows(cu: &Cuda, _copy: f64) -> Result<Vec<Row>> {
    let (b, h, t, d) = (8usize, 12usize, 1024usize, 64usize);
    let c = h * d;
    let ceiling = cublas_tflops(cu, 4096, 4096, 4096)?.unwrap_or(f64::NAN);
    let qkv = random_bf16(cu, b * t * 3 * c, 21)?;
    let mut out = cu.alloc::<bf16>(b * t * c)?;
    let mut lse = cu.alloc::<f32>(b * h * t)?;
    let fwd_ms = time_ms(cu, 3, 20, || {
        super::attention::attention_forward(&mut out, &mut lse, &qkv, &AttnDims { b, t, c, nh: h })
    })?;
    let dout = random_bf16(cu, b * t * c, 22)?;
    let mut dqkv = cu.alloc::<bf16>(b * t * 3 * c)?;
    let bwd_ms = time_ms(cu, 3, 20, || {
        super::attention::attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &AttnDims { b, t, c, nh: h })
    })?;
    // The CUDA-core backward at the same shape, which the tensor-core one replaced.
    let simt_bwd_ms = time_ms(cu, 1, 5, || {
        let dims = AttnDims { b, t, c, nh: h };
        let simt = super::attention::AttentionVariant::Simt;
        super::attention::gqa_attention_backward_with(simt, &mut dqkv, &dout, &qkv, &out, &lse, &dims, h)
    })?;
    let fwd_flops = 4.0 * (b * h * d) as f64 * (t * (t + 1) / 2) as f64;
    let shape = format!("B{b} H{h} T{t} D{d}");
    let row = |kernel: &str, ms: f64, flops: f64, target| Row {
        kernel: kernel.to_string(),
        shape: shape.clone(),
        ms,
        achieved: flops / (ms * 1e-3) / 1e12,
        unit: "TF/s",
        ceiling,
        ceiling_name: "cuBLAS 4096^3".into(),
        target,
    };
    let mut rows = vec![
        row("attention forward", fwd_ms, fwd_flops, Some(0.40)),
        row("attention backward", bwd_ms, 2.5 * fwd_flops, None),
        row("attention backward, CUDA cores", simt_bwd_ms, 2.5 * fwd_flops, None),
    ];
    // Grouped-query heads at SmolLM2-360M's grouping (15 query heads over 5 KV heads of 64): the
    // same FLOPs per query head, a third of the K and V bytes.
    let (h, kv) = (15usize, 5usize);
    let c = h * d;
    let w = (h + 2 * kv) * d;
    let dims = AttnDims { b, t, c, nh: h };
    let qkv = random_bf16(cu, b * t * w, 23)?;
    let mut out = cu.alloc::<bf16>(b * t * c)?;
    let mut lse = cu.alloc::<f32>(b * h * t)?;
    let fwd_ms = time_ms(cu, 3, 20, || super::attention::gqa_attention_forward(&mut out, &mut lse, &qkv, &dims, kv))?;
    let dout = random_bf16(cu, b * t * c, 24)?;
    let mut dqkv = cu.alloc::<bf16>(b * t * w)?;
    let bwd_ms =
        time_ms(cu, 3, 20, || super::attention::gqa_attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &dims, kv))?;
    let fwd_flops = 4.0 * (b * h * d) as f64 * (t * (t + 1) / 2) as f64;
    let shape = format!("B{b} H{h}/KV{kv} T{t} D{d}");
    // The same heads as a Llama block trains them: q, k and v from three buffers, RoPE applied as
    // the kernels load (and undone as the backward stores), no packed copy. Against the rows
    // above, the cost of the rotation; the rope + qkv pack rows are the pass it replaces.
    let (q, k, v) =
        (random_bf16(cu, b * t * c, 25)?, random_bf16(cu, b * t * kv * d, 26)?, random_bf16(cu, b * t * kv * d, 27)?);
    let table = super::rope::table(d, 100_000.0, t)?;
    let rope_fwd_ms = time_ms(cu, 3, 20, || {
        super::attention::rope_attention_forward(&mut out, &mut lse, &q, &k, &v, &table.cs, &dims, kv)
    })?;
    let (mut dq, mut dk, mut dv) =
        (cu.alloc::<bf16>(b * t * c)?, cu.alloc::<bf16>(b * t * kv * d)?, cu.alloc::<bf16>(b * t * kv * d)?);
    let rope_bwd_ms = time_ms(cu, 3, 20, || {
        let grads = [&mut dq, &mut dk, &mut dv];
        super::attention::rope_attention_backward(grads, &dout, [&q, &k, &v], &table.cs, &out, &lse, &dims, kv)
    })?;
    for (kernel, ms, flops, target) in [
        ("attention forward gqa", fwd_ms, fwd_flops, Some(0.40)),
        ("attention backward gqa", bwd_ms, 2.5 * fwd_flops, None),
        ("attention forward gqa, rope on load", rope_fwd_ms, fwd_flops, Some(0.40)),
        ("attention backward gqa, rope on load", rope_bwd_ms, 2.5 * fwd_flops, None),
    ] {
        rows.push(Row { shape: shape.clone(), ..row(kernel, ms, flops, target) });
    }
    Ok(rows)
}

/// A memory-bound row: `bytes` moved (read + written once) in `ms`, against the copy bandwidth.
pub fn bandwidth_row(kernel: &str, shape: String, ms: f64, bytes: f64, copy: f64) -> Row {
    Row {
        kernel: kernel.to_string(),
        shape,
        ms,
        achieved: bytes / (ms * 1e-3) / 1e9,
        unit: "GB/s",
        ceiling: copy,
        ceiling_name: "d2d copy".into(),
        target: Some(0.70),
    }
}

/// LayerNorm forward and backward over GPT-2's 8192 x 768 activations.
pub fn layernorm_rows(cu: &Cuda, copy: f64) -> Result<Vec<Row>> {
    let (rows, c) = (8192usize, 768usize);
    let x = random_bf16(cu, rows * c, 31)?;
    let w = random_bf16(cu, c, 32)?;
    let bias = random_bf16(cu, c, 33)?;
    let mut out = cu.alloc::<bf16>(rows * c)?;
    let (mut mean, mut rstd) = (cu.alloc::<f32>(rows)?, cu.alloc::<f32>(rows)?);
    let f = time_ms(cu, 3, 50, || {
        super::layernorm::layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &bias, c, 1e-5)
    })?;
    let dout = random_bf16(cu, rows * c, 34)?;
    let mut dx = cu.alloc::<bf16>(rows * c)?;
    let (mut dw, mut db) = (cu.alloc::<f32>(c)?, cu.alloc::<f32>(c)?);
    let bw = time_ms(cu, 3, 50, || {
        super::layernorm::layernorm_backward(
            Some(&mut dx),
            Some(&mut dw),
            Some(&mut db),
            &dout,
            &x,
            &w,
            &mean,
            &rstd,
            c,
        )
    })?;
    let act = bytes_of::<bf16>(rows * c);
    let shape = format!("{rows}x{c}");
    Ok(vec![
        bandwidth_row("layernorm forward", shape.clone(), f, 2.0 * act + bytes_of::<f32>(2 * rows), copy),
        bandwidth_row("layernorm backward", shape, bw, 3.0 * act + bytes_of::<f32>(2 * rows), copy),
    ])
}

/// RMSNorm forward (plain and fused with the residual add) and backward over SmolLM2-360M's
/// 8192 x 960 activations.
pub fn rmsnorm_rows(cu: &Cuda, copy: f64) -> Result<Vec<Row>> {
    use super::rmsnorm::{rmsnorm_backward, rmsnorm_forward, rmsnorm_residual_forward};
    let (rows, c) = (8192usize, 960usize);
    let x = random_bf16(cu, rows * c, 35)?;
    let r = random_bf16(cu, rows * c, 36)?;
    let w = random_bf16(cu, c, 37)?;
    let (mut out, mut h) = (cu.alloc::<bf16>(rows * c)?, cu.alloc::<bf16>(rows * c)?);
    let mut rstd = cu.alloc::<f32>(rows)?;
    let f = time_ms(cu, 3, 50, || rmsnorm_forward(&mut out, &mut rstd, &x, &w, c, 1e-5))?;
    let fr = time_ms(cu, 3, 50, || rmsnorm_residual_forward(&mut h, &mut out, &mut rstd, &x, &r, &w, c, 1e-5))?;
    let mut dx = cu.alloc::<bf16>(rows * c)?;
    let mut dw = cu.alloc::<f32>(c)?;
    let bw = time_ms(cu, 3, 50, || rmsnorm_backward(Some(&mut dx), Some(&mut dw), &r, &x, &w, &rstd, c))?;
    let (act, stat) = (bytes_of::<bf16>(rows * c), bytes_of::<f32>(rows));
    let shape = format!("{rows}x{c}");
    Ok(vec![
        bandwidth_row("rmsnorm forward", shape.clone(), f, 2.0 * act + stat, copy),
        bandwidth_row("rmsnorm + residual forward", shape.clone(), fr, 4.0 * act + stat, copy),
        bandwidth_row("rmsnorm backward", shape, bw, 3.0 * act + stat, copy),
    ])
}

/// RoPE fused with the qkv packing and its backward at SmolLM2-360M's heads (15 query over 5 KV
/// heads of 64) and 8192 tokens.
pub fn rope_rows(cu: &Cuda, copy: f64) -> Result<Vec<Row>> {
    use super::rope::{rope_pack, rope_unpack, table};
    let (b, t, heads, hd) = (4usize, 2048usize, crate::backend::Heads { n_head: 15, n_kv_head: 5 }, 64usize);
    let rows = b * t;
    let (c, ckv) = (heads.n_head * hd, heads.n_kv_head * hd);
    let q = random_bf16(cu, rows * c, 38)?;
    let kv = random_bf16(cu, rows * ckv, 39)?;
    let mut qkv = cu.alloc::<bf16>(rows * heads.packed() * hd)?;
    let cs = table(hd, 100_000.0, t)?;
    let f = time_ms(cu, 3, 50, || rope_pack(&mut qkv, &q, &kv, &kv, &cs, t, 0, heads))?;
    let (mut dq, mut dk, mut dv) =
        (cu.alloc::<bf16>(rows * c)?, cu.alloc::<bf16>(rows * ckv)?, cu.alloc::<bf16>(rows * ckv)?);
    let bw = time_ms(cu, 3, 50, || rope_unpack(&mut dq, &mut dk, &mut dv, &qkv, &cs, t, 0, heads))?;
    let bytes = 2.0 * bytes_of::<bf16>(rows * heads.packed() * hd);
    let shape = format!("{rows}x(15+2x5)x{hd}");
    Ok(vec![
        bandwidth_row("rope + qkv pack", shape.clone(), f, bytes, copy),
        bandwidth_row("rope + qkv unpack (backward)", shape, bw, bytes, copy),
    ])
}

/// The bias gradient (column sums of dY) at GPT-2 124M's three bias widths over 8192 tokens:
/// memory-bound, it reads dY once.
pub fn bias_rows(cu: &Cuda, copy: f64) -> Result<Vec<Row>> {
    let rows = 8192usize;
    let mut out = Vec::new();
    for (what, n) in [("c_proj", 768usize), ("c_attn", 2304), ("c_fc", 3072)] {
        let dy = random_bf16(cu, rows * n, 40 + n as u64)?;
        let mut db = cu.alloc::<f32>(n)?;
        let ms = time_ms(cu, 3, 50, || super::gemm::bias_backward(&mut db, &dy, n))?;
        let bytes = bytes_of::<bf16>(rows * n) + bytes_of::<f32>(n);
        out.push(bandwidth_row(&format!("bias backward ({what})"), format!("{rows}x{n}"), ms, bytes, copy));
    }
    Ok(out)
}

/// Token + position embedding forward and its deterministic backward at 8192 tokens of GPT-2.
pub fn embedding_rows(cu: &Cuda, copy: f64) -> Result<Vec<Row>> {
    let (b, t, c, v) = (8usize, 1024usize, 768usize, 50257usize);
    let rows = b * t;
    let mut rng = rand::rngs::StdRng::seed_from_u64(41);
    let ids_h: Vec<i32> = (0..rows).map(|_| rng.random_range(0..v as i32)).collect();
    let ids = cu.upload(&ids_h)?;
    let wte = random_bf16(cu, v * c, 42)?;
    let wpe = random_bf16(cu, t * c, 43)?;
    let mut out = cu.alloc::<bf16>(rows * c)?;
    let f = time_ms(cu, 3, 50, || super::embedding::embedding_forward(&mut out, &ids, &wte, &wpe, t, c))?;
    let dout = random_bf16(cu, rows * c, 44)?;
    let (mut dwte, mut dwpe) = (cu.alloc::<f32>(v * c)?, cu.alloc::<f32>(t * c)?);
    let bw = time_ms(cu, 3, 20, || {
        super::embedding::embedding_backward(Some(&mut dwte), Some(&mut dwpe), &dout, &ids_h, t, c)
    })?;
    let shape = format!("{rows} tokens, C {c}");
    let act = bytes_of::<bf16>(rows * c);
    Ok(vec![
        bandwidth_row("embedding forward", shape.clone(), f, 3.0 * act, copy),
        // reads dout once, writes all of dwte and dwpe (f32, zeros included)
        bandwidth_row("embedding backward", shape, bw, act + bytes_of::<f32>((v + t) * c), copy),
    ])
}

/// Fused softmax cross-entropy over GPT-2's vocabulary at 8192 rows, in the padded rows the
/// classifier gives it (`padded_vocab`).
pub fn xent_rows(cu: &Cuda, copy: f64) -> Result<Vec<Row>> {
    let (rows, v) = (8192usize, 50257usize);
    let vp = crate::backend::padded_vocab(v);
    let logits = random_bf16(cu, rows * vp, 51)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(52);
    let targets = cu.upload(&(0..rows).map(|_| rng.random_range(0..v as i32)).collect::<Vec<_>>())?;
    let (mut losses, mut lse) = (cu.alloc::<f32>(rows)?, cu.alloc::<f32>(rows)?);
    let f = time_ms(cu, 3, 20, || super::xent::xent_forward(&mut losses, &mut lse, &logits, &targets, v, vp))?;
    let mut d = logits.try_clone()?;
    // In place: each repetition turns the previous result into new "logits"; the work is the same.
    let bw = time_ms(cu, 3, 20, || super::xent::xent_backward(&mut d, &lse, &targets, v, vp, 1.0 / rows as f32))?;
    let shape = format!("{rows}x{v} (rows of {vp})");
    let l = bytes_of::<bf16>(rows * v);
    Ok(vec![
        bandwidth_row("xent forward", shape.clone(), f, l, copy),
        bandwidth_row("xent backward (in place)", shape, bw, 2.0 * l, copy),
    ])
}

/// The global-norm reduction over GPT-2 124M's gradient (one f32 buffer of 124M elements).
pub fn reduce_rows(cu: &Cuda, copy: f64) -> Result<Vec<Row>> {
    let n = 124_439_808usize;
    let g = random_f32(cu, n, 61)?;
    let ms = time_ms(cu, 3, 20, || super::reduce::sum_squares(&g).map(|_| ()))?;
    let mut x = random_f32(cu, n, 62)?;
    let sc = time_ms(cu, 3, 20, || super::reduce::scale(&mut x, 0.999))?;
    Ok(vec![
        bandwidth_row("reduce sum of squares", format!("{n}"), ms, bytes_of::<f32>(n), copy),
        bandwidth_row("reduce scale", format!("{n}"), sc, 2.0 * bytes_of::<f32>(n), copy),
    ])
}

/// NF4 dequantization of GPT-2 124M's largest weight (c_fc, [768, 3072]) to f32 and to bf16,
/// against copy bandwidth: it reads the packed codes (n/2 bytes) and the 8-bit absmax (n/64) and
/// writes 4n or 2n.
pub fn nf4_rows(cu: &Cuda, copy: f64) -> Result<Vec<Row>> {
    let dims = [768usize, 3072usize];
    let n = dims[0] * dims[1];
    let w = crate::quant::nf4::Nf4Weight::quantize(&cu.download(&random_f32(cu, n, 63)?)?, dims, 64)?;
    let d = super::nf4::DevNf4::upload(&w)?;
    let mut out = cu.alloc::<f32>(n)?;
    let ms = time_ms(cu, 3, 20, || super::nf4::nf4_dequantize(&mut out, &d))?;
    let mut out16 = cu.alloc::<bf16>(n)?;
    let ms16 = time_ms(cu, 3, 20, || super::nf4::nf4_dequantize(&mut out16, &d))?;
    let read = (n / 2 + n / 64) as f64;
    let shape = format!("{}x{}", dims[0], dims[1]);
    // Issue 12's target for the dequantization: 85% of copy bandwidth.
    Ok(vec![
        Row {
            target: Some(0.85),
            ..bandwidth_row("nf4 dequantize (to f32)", shape.clone(), ms, read + bytes_of::<f32>(n), copy)
        },
        Row {
            target: Some(0.85),
            ..bandwidth_row("nf4 dequantize (to bf16)", shape, ms16, read + bytes_of::<bf16>(n), copy)
        },
    ])
}

/// Rows for the QLoRA and LoRA linear layers at GPT-2 124M's training shapes (B x T = 8192
/// tokens), each against kiln's own bf16 GEMM of the base weight at the same shape, timed in the
/// same run: `linear_rows_at` with those shapes.
pub fn linear_rows(cu: &Cuda, _copy: f64) -> Result<Vec<Row>> {
    linear_rows_at(
        cu,
        &[("c_attn", 8192, 2304, 768), ("mlp.c_fc", 8192, 3072, 768), ("mlp.c_proj", 8192, 768, 3072)],
        16,
    )
}

/// For each (name, m, n, k): the NF4 linear layer forward as training runs it (the weight resident
/// in 4 bits and decoded inside the fused GEMM's tile loads: issue 12's target is 90% of the plain
/// GEMM), and the LoRA linear forward at rank `r` (base GEMM, the rank-r bottleneck and its
/// update; no target), both against the bf16 GEMM x @ W alone. TF/s count the base product's
/// 2mnk flops.
pub fn linear_rows_at(cu: &Cuda, shapes: &[(&str, usize, usize, usize)], r: usize) -> Result<Vec<Row>> {
    use super::tensor::{wrap_bf16, wrap_f32};
    use crate::backend::{Lora, LoraArgs, Nf4, Nf4Args};
    let mut rows = Vec::new();
    for &(what, m, n, k) in shapes {
        let x = wrap_bf16(random_bf16(cu, m * k, 31)?, &[m, k])?;
        let w_f32 = cu.download(&random_f32(cu, k * n, 32)?)?;
        let w = wrap_bf16(random_bf16(cu, k * n, 33)?, &[k, n])?;
        let mut c = cu.alloc::<bf16>(m * n)?;
        let (xd, wd) = (super::tensor::bf16_in("bench", &x)?, super::tensor::bf16_in("bench", &w)?);
        let gemm_ms = time_ms(cu, 3, 20, || super::gemm::matmul(&mut c, xd, wd, &GemmDesc::nn(m, n, k), false))?;
        let flops = 2.0 * (m * n * k) as f64;
        let ceiling = flops / (gemm_ms * 1e-3) / 1e12;
        let q = crate::quant::nf4::Nf4Weight::quantize(&w_f32, [k, n], 64)?;
        cu.nf4_to_device(&q)?;
        let args = Nf4Args { x: &x, w: &q, w_trans: false, bias: None, lora: None, dropout: None, m, n, k, r: 0 };
        let nf4_ms = time_ms(cu, 3, 20, || cu.nf4_linear(&args).map(|_| ()))?;
        let a = wrap_f32(random_f32(cu, r * k, 34)?, &[r, k])?;
        let b = wrap_f32(random_f32(cu, n * r, 35)?, &[n, r])?;
        let largs = LoraArgs {
            x: &x,
            w: &w,
            w_trans: false,
            bias: None,
            a: &a,
            b: &b,
            scaling: 2.0,
            dropout: None,
            m,
            n,
            k,
            r,
        };
        let lora_ms = time_ms(cu, 3, 20, || cu.lora_linear(&largs).map(|_| ()))?;
        let row = |kernel: String, ms: f64, target| Row {
            kernel,
            shape: format!("{m}x{n}x{k}"),
            ms,
            achieved: flops / (ms * 1e-3) / 1e12,
            unit: "TF/s",
            ceiling,
            ceiling_name: "kiln bf16 gemm".into(),
            target,
        };
        rows.push(row(format!("nf4 linear ({what})"), nf4_ms, Some(0.9)));
        rows.push(row(format!("lora r={r} linear ({what})"), lora_ms, None));
    }
    Ok(rows)
}

/// `kiln bench kernels --device <device>`: every kernel timed against its ceiling on the GPU
/// (`cuda`), or its memory traffic on the emulated device (`emu`).
pub fn kernels(device: &str) -> Result<()> {
    match device {
        "emu" => {
            super::select(super::RuntimeKind::Emulator)?;
            super::traffic::run().map(|_| ())
        }
        "cuda" | "cuda:0" => {
            super::select(super::RuntimeKind::Driver)?;
            run()
        }
        other => Err(crate::Error::unknown("device for kiln bench kernels", other, "cuda or emu")),
    }
}

/// The CUDA device's name, for a benchmark's header.
pub fn device_name() -> Result<String> {
    Ok(super::cuda()?.name().to_string())
}

/// cuBLAS' bf16 GEMM rate at n^3 in TFLOP/s, the train step's ceiling; the inner error says why
/// there is none (no GPU, no cuBLAS).
pub fn gemm_ceiling_tflops(n: usize) -> Result<std::result::Result<f64, String>> {
    cublas_tflops(super::cuda()?, n, n, n)
}

/// Sampling and the launch log stay on only while a prediction runs, whatever it returns.
struct Counting<'a>(&'a super::emu::Emulator);

impl Drop for Counting<'_> {
    fn drop(&mut self) {
        self.0.sample(None);
        self.0.record(false);
    }
}

/// Runs `run` on the emulated device with every launch of more than `blocks` blocks sampled
/// (`Emulator::sample`) and returns each launch's counters, scaled to its whole grid: what
/// `kiln bench train-step --predict` prices. The results `run` computes are garbage.
pub fn count_launches(blocks: u32, run: impl FnOnce() -> Result<()>) -> Result<Vec<crate::predict::Launch>> {
    let cu = cuda()?;
    let Some(emu) = cu.emulator() else {
        return Err(Error::Input("--predict counts kernels on the emulated device: add --device emu".into()));
    };
    let guard = Counting(emu);
    emu.record(true);
    emu.sample(Some(blocks));
    run()?;
    let log = emu.record(false);
    drop(guard);
    Ok(log
        .into_iter()
        .map(|(k, s)| crate::predict::Launch {
            kernel: k.name(),
            blocks: s.blocks,
            run_blocks: s.run_blocks,
            moved_bytes: 32.0 * s.global_sectors as f64,
            fewest_bytes: 32.0 * s.unique_sectors as f64,
            tensor_flops: crate::predict::MMA_FLOPS * s.mma as f64,
            core_flops: s.flops as f64,
        })
        .collect())
}
