//! `kiln bench kernels --device emu`: what a profiler would say about memory traffic, without a
//! GPU. Every kernel family runs once at a small training-like shape on the emulated device,
//! which counts per launch the 32-byte sectors the warps' global requests touch against the
//! fewest the kernel could move (each input sector read once, each output sector written once),
//! shared-memory wavefronts against the conflict-free count, mma.sync instructions and barriers.
//! A sector ratio near 1 means the kernel's accesses are coalesced and it reads nothing twice, so
//! it can run at copy bandwidth; a kernel far above 1 cannot, whatever the GPU.

use super::bench::{random_bf16, random_f32};
use super::{
    attention, bf16, cuda, elementwise, embedding, gemm, layernorm, reduce, rmsnorm, rope, xent, Cuda, Kernel,
};
use crate::backend::AttnDims;
use crate::backend::{GemmDesc, Trans};
use crate::{Error, Result};

/// Runs every family once and prints the table; returns the rows (kernel, launches, counters).
pub fn run() -> Result<Vec<(Kernel, u64, super::emu::LaunchStats)>> {
    let cu = cuda()?;
    let Some(emu) = cu.emulator() else {
        return Err(Error::Input(
            "the traffic table comes from the emulated device: run kiln bench kernels --device emu".into(),
        ));
    };
    println!("kiln bench kernels --device emu: memory traffic of every kernel, counted by the emulated device");
    let _ = emu.take_stats();
    let started = std::time::Instant::now();
    workload(cu)?;
    let rows = emu.take_stats();
    println!(
        "{:<36} {:>5} {:>11} {:>11} {:>7} {:>9} {:>9} {:>8} {:>8}",
        "kernel", "runs", "sectors", "fewest", "ratio", "B/request", "smem wf", "mma", "barriers"
    );
    for (k, n, s) in &rows {
        let ratio = s.global_sectors as f64 / s.unique_sectors.max(1) as f64;
        let per_req = s.global_bytes as f64 / s.global_requests.max(1) as f64;
        let wf = if s.shared_ideal > 0 {
            format!("{:.2}x", s.shared_wavefronts as f64 / s.shared_ideal as f64)
        } else {
            "-".into()
        };
        println!(
            "{:<36} {:>5} {:>11} {:>11} {:>6.2}x {:>9.1} {:>9} {:>8} {:>8}",
            k.name(),
            n,
            s.global_sectors,
            s.unique_sectors,
            ratio,
            per_req,
            wf,
            s.mma,
            s.barriers
        );
    }
    println!(
        "sectors: 32-byte sectors the warps' global requests touched; fewest: distinct sectors read + written \
         (each once); B/request: bytes a warp asked for per request (512 = 16 bytes a lane); smem wf: shared \
         memory wavefronts per conflict-free wavefront (1.00x = no bank conflicts). {:.1} s on the emulator.",
        started.elapsed().as_secs_f64()
    );
    Ok(rows)
}

/// One call of every kernel at shapes like a small GPT-2's training step (d_model 256, 4 heads of
/// 64, 512 tokens, vocabulary 4096).
fn workload(cu: &Cuda) -> Result<()> {
    let (tokens, c, nh, t, v) = (512usize, 256usize, 4usize, 256usize, 4096usize);
    let b = tokens / t;
    // GEMM: every transpose pair through the shipped variant ([512, 768] = [512, 256] x [256, 768]),
    let (m, n, k) = (tokens, 3 * c, c);
    let a_mk = random_bf16(cu, m * k, 1)?;
    let b_kn = random_bf16(cu, k * n, 2)?;
    let mut out_mn = cu.alloc::<bf16>(m * n)?;
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        // Transposed operands are the same buffers read the other way: only the layout matters.
        gemm::matmul(
            &mut out_mn,
            &a_mk,
            &b_kn,
            &GemmDesc::new(m, n, k, Trans::from_bool(ta), Trans::from_bool(tb)),
            false,
        )?;
    }
    // The mma.sync kernels, which the shipped variant replaces with wgmma on the (sm_90) emulated
    // device: the large tile at the same shape, and the small tile.
    gemm::matmul_with(
        gemm::GemmVariant::MmaSyncLarge,
        &mut out_mn,
        None,
        &a_mk,
        &b_kn,
        None,
        &GemmDesc::nn(m, n, k),
        false,
    )?;
    let small_a = random_bf16(cu, 64 * c, 3)?;
    let small_b = random_bf16(cu, c * 64, 4)?;
    let mut small = cu.alloc::<f32>(64 * 64)?;
    gemm::matmul_with(
        gemm::GemmVariant::MmaSyncSmall,
        &mut small,
        None,
        &small_a,
        &small_b,
        None,
        &GemmDesc::nn(64, 64, c),
        false,
    )?;
    let dout = random_bf16(cu, tokens * c, 5)?;
    let mut dbias = cu.alloc::<f32>(c)?;
    gemm::bias_backward(&mut dbias, &dout, c)?;
    // Attention, both forwards and the backward.
    let qkv = random_bf16(cu, tokens * 3 * c, 6)?;
    let mut out = cu.alloc::<bf16>(tokens * c)?;
    let mut lse = cu.alloc::<f32>(b * nh * t)?;
    attention::attention_forward_with(
        attention::AttentionVariant::Simt,
        &mut out,
        &mut lse,
        &qkv,
        &AttnDims { b, t, c, nh },
    )?;
    attention::attention_forward_with(
        attention::AttentionVariant::Mma,
        &mut out,
        &mut lse,
        &qkv,
        &AttnDims { b, t, c, nh },
    )?;
    let mut dqkv = cu.alloc::<bf16>(tokens * 3 * c)?;
    attention::attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, &AttnDims { b, t, c, nh })?;
    // LayerNorm.
    let x = random_bf16(cu, tokens * c, 7)?;
    let (lw, lb) = (random_bf16(cu, c, 8)?, random_bf16(cu, c, 9)?);
    let (mut mean, mut rstd) = (cu.alloc::<f32>(tokens)?, cu.alloc::<f32>(tokens)?);
    let mut y = cu.alloc::<bf16>(tokens * c)?;
    layernorm::layernorm_forward(&mut y, &mut mean, &mut rstd, &x, &lw, &lb, c, 1e-5)?;
    let mut h = cu.alloc::<bf16>(tokens * c)?;
    layernorm::layernorm_residual_forward(&mut h, &mut y, &mut mean, &mut rstd, &x, &dout, &lw, &lb, c, 1e-5)?;
    let mut dx = cu.alloc::<bf16>(tokens * c)?;
    let (mut dw, mut db) = (cu.alloc::<f32>(c)?, cu.alloc::<f32>(c)?);
    layernorm::layernorm_backward(Some(&mut dx), Some(&mut dw), Some(&mut db), &dout, &x, &lw, &mean, &rstd, c)?;
    // RMSNorm (Llama's norm), plain, fused with the residual add, and backward.
    let mut rs = cu.alloc::<f32>(tokens)?;
    rmsnorm::rmsnorm_forward(&mut y, &mut rs, &x, &lw, c, 1e-5)?;
    rmsnorm::rmsnorm_residual_forward(&mut h, &mut y, &mut rs, &x, &dout, &lw, c, 1e-5)?;
    rmsnorm::rmsnorm_backward(Some(&mut dx), Some(&mut dw), &dout, &x, &lw, &rs, c)?;
    // RoPE fused with the qkv packing, at Llama's grouping (4 query heads over 2 KV heads).
    let heads = crate::backend::Heads { n_head: nh, n_kv_head: nh / 2 };
    let (rq, rkv) = (random_bf16(cu, tokens * c, 22)?, random_bf16(cu, tokens * c / 2, 23)?);
    let mut rqkv = cu.alloc::<bf16>(tokens * 2 * c)?;
    let table = rope::table(c / nh, 10_000.0, t)?;
    rope::rope_pack(&mut rqkv, &rq, &rkv, &rkv, &table, t, 0, heads)?;
    let (mut dq, mut dk, mut dv) =
        (cu.alloc::<bf16>(tokens * c)?, cu.alloc::<bf16>(tokens * c / 2)?, cu.alloc::<bf16>(tokens * c / 2)?);
    rope::rope_unpack(&mut dq, &mut dk, &mut dv, &rqkv, &table, t, 0, heads)?;
    // Elementwise.
    let n = tokens * 4 * c;
    let e = random_bf16(cu, n, 10)?;
    let e2 = random_bf16(cu, n, 11)?;
    let mut eo = cu.alloc::<bf16>(n)?;
    elementwise::gelu_forward(&mut eo, &e)?;
    elementwise::gelu_backward(&mut eo, &e, &e2)?;
    elementwise::swiglu_forward(&mut eo, &e, &e2)?;
    let (mut eo2, e3) = (cu.alloc::<bf16>(n)?, random_bf16(cu, n, 15)?);
    elementwise::swiglu_backward(&mut eo, &mut eo2, &e, &e2, &e3)?;
    elementwise::residual_forward(&mut eo, &e, &e2)?;
    elementwise::add_assign(&mut eo, &e)?;
    let f = random_f32(cu, n, 12)?;
    let mut fo = random_f32(cu, n, 13)?;
    elementwise::add_assign_f32(&mut fo, &f)?;
    elementwise::cast_f32_to_bf16(&mut eo, &f)?;
    elementwise::cast_bf16_to_f32(&mut fo, &e)?;
    let mut mask = cu.alloc::<u8>(n)?;
    elementwise::dropout_mask(&mut mask, 7, 0.1)?;
    elementwise::dropout_forward(&mut eo, &e, &mask, 1.0 / 0.9)?;
    elementwise::dropout(&mut eo, Some(&mut mask), &e, 7, 0.1, 1.0 / 0.9)?;
    // Embedding.
    let ids_h: Vec<i32> = (0..tokens as i32).map(|i| (i * 37) % v as i32).collect();
    let ids = cu.upload(&ids_h)?;
    let (wte, wpe) = (random_bf16(cu, v * c, 14)?, random_bf16(cu, t * c, 15)?);
    embedding::embedding_forward(&mut y, &ids, &wte, &wpe, t, c)?;
    embedding::token_embedding_forward(&mut y, &ids, &wte, c)?;
    let (mut dwte, mut dwpe) = (cu.zeros::<f32>(v * c)?, cu.zeros::<f32>(t * c)?);
    embedding::embedding_backward(Some(&mut dwte), Some(&mut dwpe), &dout, &ids_h, t, c)?;
    // Cross-entropy, bf16 and f32 logits.
    let targets = cu.upload(&(0..tokens as i32).map(|i| (i * 13) % v as i32).collect::<Vec<_>>())?;
    let logits = random_bf16(cu, tokens * v, 16)?;
    let (mut losses, mut lse2) = (cu.alloc::<f32>(tokens)?, cu.alloc::<f32>(tokens)?);
    xent::xent_forward(&mut losses, &mut lse2, &logits, &targets, v, v)?;
    let mut dl = logits.try_clone()?;
    xent::xent_backward(&mut dl, &lse2, &targets, v, v, 1.0 / tokens as f32)?;
    let logits32 = random_f32(cu, tokens * v, 17)?;
    xent::xent_forward(&mut losses, &mut lse2, &logits32, &targets, v, v)?;
    let mut dl32 = logits32.try_clone()?;
    xent::xent_backward(&mut dl32, &lse2, &targets, v, v, 1.0 / tokens as f32)?;
    // The optimizer and the gradient norm.
    let pn = 1 << 20;
    let (mut p, g) = (random_f32(cu, pn, 18)?, random_f32(cu, pn, 19)?);
    let (mut m, mut vv) = (cu.zeros::<f32>(pn)?, cu.zeros::<f32>(pn)?);
    super::adamw::adamw_step(&mut p, &mut m, &mut vv, &g, &super::adamw::typical_scalars())?;
    // 8-bit AdamW on the same sizes, from fresh state (codes 0, absmax 0).
    let nb = pn / crate::abi::KILN_ADAM8_BLOCK as usize;
    let (mut s1, mut s2) = (cu.zeros::<u8>(pn)?, cu.zeros::<u8>(pn)?);
    let (mut a1, mut a2) = (cu.zeros::<f32>(nb)?, cu.zeros::<f32>(nb)?);
    let moments =
        super::adamw8bit::Adam8Moments::Q8 { state1: &mut s1, absmax1: &mut a1, state2: &mut s2, absmax2: &mut a2 };
    let mut params = [super::adamw8bit::Adam8Param { p: &mut p, g: &g, moments, decay: true }];
    super::adamw8bit::adamw8bit_step_multi(&mut params, &super::adamw::typical_scalars())?;
    reduce::sum_squares(&g)?;
    reduce::scale(&mut p, 0.5)?;
    // NF4 quantization and dequantization of a [256, 768] weight (QLoRA's c_attn at this width).
    let wf = random_f32(cu, c * 3 * c, 20)?;
    super::nf4::nf4_quantize(&wf, 64)?;
    let w = crate::quant::nf4::Nf4Weight::quantize(&cu.download(&wf)?, [c, 3 * c], 64)?;
    let dw = super::nf4::DevNf4::upload(&w)?;
    let mut wd = cu.alloc::<f32>(w.numel())?;
    super::nf4::nf4_dequantize(&mut wd, &dw)?;
    let mut wd16 = cu.alloc::<bf16>(w.numel())?;
    super::nf4::nf4_dequantize(&mut wd16, &dw)?;
    // The fused NF4 GEMM with that weight: x [512, 256] @ W [256, 768].
    let xq = random_bf16(cu, tokens * c, 21)?;
    let mut yq = cu.alloc::<bf16>(tokens * 3 * c)?;
    gemm::matmul_nf4(&mut yq, None, &xq, &dw, None, &GemmDesc::nn(tokens, 3 * c, c))?;
    cu.sync()
}
