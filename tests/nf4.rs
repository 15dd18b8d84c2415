//! NF4 against bitsandbytes (oracle fixture nf4.safetensors: a 64x256 N(0,1) matrix quantized
//! by bitsandbytes' CPU quantize_4bit, block size 64): packed codes, absmax and dequantized
//! values must be equal bit for bit. Also the tie rule, the refusal of sizes that do not fill
//! whole blocks, the double-quantization error bound, and the safetensors layout `kiln
//! quantize` writes (tested through `kiln::io::nf4::quantize_file_nf4`, the function behind the
//! command, since the subcommand is wired into the CLI separately).

mod common;

use kiln::io::checkpoint::load_all;
use kiln::io::nf4::{py_float_repr, quantize_file_nf4, Nf4FileOptions};
use kiln::io::safetensors::{save, SafeFile};
use kiln::quant::blockwise::dynamic_map;
use kiln::quant::nf4::{dequantize_nf4, quantize_nf4, unpack_nf4, NF4_CODE};
use kiln::{DType, Tensor};
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;

fn fixture() -> BTreeMap<String, Tensor> {
    load_all(&common::repo_file("tests/fixtures/oracle/dev-set/nf4.safetensors")).unwrap()
}

fn bit_mismatches(a: &[f32], b: &[f32]) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count()
}

#[test]
fn code_table_equals_bitsandbytes() {
    let f = fixture();
    assert_eq!(bit_mismatches(&NF4_CODE, f["code_table"].f32s().unwrap()), 0);
}

#[test]
fn packed_absmax_and_dequant_equal_bitsandbytes() {
    let f = fixture();
    let w = f["W"].f32s().unwrap();
    let q = quantize_nf4(w, 64).unwrap();
    let packed_mismatches = q.packed.iter().zip(f["packed"].u8s().unwrap()).filter(|(a, b)| a != b).count();
    println!("packed: {packed_mismatches} mismatching bytes of {}", q.packed.len());
    assert_eq!(q.packed.len(), f["packed"].numel());
    assert_eq!(packed_mismatches, 0, "packed NF4 codes differ from bitsandbytes'");
    assert_eq!(unpack_nf4(&q.packed), f["codes"].u8s().unwrap(), "unpacked codes (high nibble first) differ");
    assert_eq!(bit_mismatches(&q.absmax, f["absmax"].f32s().unwrap()), 0, "absmax differs");
    let deq = dequantize_nf4(&q);
    assert_eq!(bit_mismatches(&deq, f["dequant"].f32s().unwrap()), 0, "dequant differs");
}

#[test]
fn midpoint_ties_go_to_the_lower_code_and_zero_blocks_to_zero() {
    // block 0 has absmax exactly 1, so x * (1/absmax) is x itself: element 1 + k sits exactly on
    // the midpoint between codes k and k+1, element 17 + k one ulp above it
    let mut w = vec![0f32; 128];
    w[0] = 1.0;
    for k in 0..15 {
        let mid = (NF4_CODE[k] + NF4_CODE[k + 1]) / 2.0;
        w[1 + k] = mid;
        w[17 + k] = f32::from_bits(if mid > 0.0 { mid.to_bits() + 1 } else { mid.to_bits() - 1 });
    }
    let q = quantize_nf4(&w, 64).unwrap();
    let codes = unpack_nf4(&q.packed);
    for k in 0..15 {
        assert_eq!(codes[1 + k] as usize, k, "the midpoint of codes {k} and {} goes to the lower one", k + 1);
        assert_eq!(codes[17 + k] as usize, k + 1, "just above the midpoint of {k} and {} goes up", k + 1);
    }
    assert_eq!(codes[0], 15);
    // block 1 is all zeros: absmax 0, every code the exact zero (index 7), dequantized to 0
    assert_eq!(q.absmax[1], 0.0);
    assert!(codes[64..].iter().all(|&c| c == 7));
    assert!(dequantize_nf4(&q)[64..].iter().all(|&v| v == 0.0));
}

#[test]
fn sizes_that_do_not_fill_whole_blocks_are_refused() {
    let err = quantize_nf4(&vec![0.5f32; 100], 64).unwrap_err().to_string();
    assert!(err.contains("100") && err.contains("64") && err.contains("refuses rather than pads"), "{err}");
    let err = quantize_nf4(&vec![0.5f32; 96], 48).unwrap_err().to_string();
    assert!(err.contains("48") && err.contains("not supported"), "{err}");
    assert!(quantize_nf4(&[], 64).is_err());
}

/// Double quantization changes each block's absmax A into A' = map[c] * A2 + offset, where A2 is
/// the nested block's max |A - offset| and c the 8-bit code of (A - offset) / A2. The code is
/// the nearest map entry except within one table step (2/65535) of a midpoint, so
///   |A' - A| <= (g/2 + 2/65535) * A2 + rounding,
/// g = the widest gap of the signed dynamic map (0.9/64, its top decade; its lowest entry
/// -0.99297 is also within g/2 of -1). Rounding: the product and the offset add, one half-ulp
/// each, under 2 * 2^-24 * max(A) together. Since every NF4 value has |code| <= 1, each
/// dequantized element moves by at most |A' - A| plus a half-ulp of itself.
#[test]
fn double_quant_round_trip_is_bounded() {
    let map = dynamic_map(true);
    let g = map.windows(2).map(|w| (w[1] - w[0]) as f64).fold(0f64, f64::max);
    assert!((g - 0.9 / 64.0).abs() < 1e-6 && (1.0 + map[0] as f64) <= g / 2.0 + 1e-7);
    let table_step = 2.0 / 65535.0;
    let mut rng = rand::rngs::StdRng::seed_from_u64(41);
    // the fixture (256 absmax, one nested block) and 650 rows of 64 with row scales over three
    // decades (650 absmax: two full nested blocks and a partial one of 138)
    let fixture_w = fixture()["W"].f32s().unwrap().to_vec();
    let scaled_w: Vec<f32> = (0..650 * 64)
        .map(|i| {
            let scale = 10f32.powf(((i / 64) % 13) as f32 / 4.0 - 1.5);
            (rng.random::<f32>() * 2.0 - 1.0) * scale
        })
        .collect();
    for w in [fixture_w, scaled_w] {
        let q = quantize_nf4(&w, 64).unwrap();
        let dq = q.double_quant();
        assert_eq!(dq.codes.len(), q.absmax.len());
        assert_eq!(dq.nested_absmax.len(), q.absmax.len().div_ceil(256));
        let a2 = dq.dequantize();
        let max_a = q.absmax.iter().fold(0f64, |m, &a| m.max(a as f64));
        let round = 2.0 * f32::EPSILON as f64 / 2.0 * max_a;
        let mut worst = 0f64;
        for (j, (&a, &a_dq)) in q.absmax.iter().zip(&a2).enumerate() {
            let nested = dq.nested_absmax[j / 256] as f64;
            let bound = (g / 2.0 + table_step) * nested + round;
            let err = (a_dq as f64 - a as f64).abs();
            worst = worst.max(err / nested);
            assert!(err <= bound, "absmax {j}: {a} became {a_dq} (error {err:e}, bound {bound:e})");
        }
        let single = dequantize_nf4(&q);
        let double = q.dequantize_with(&dq).unwrap();
        for (i, (&s, &d)) in single.iter().zip(&double).enumerate() {
            let j = i / 64;
            let bound = (a2[j] as f64 - q.absmax[j] as f64).abs() + (d.abs() as f64) * f32::EPSILON as f64;
            assert!(((s - d) as f64).abs() <= bound, "element {i}: {s} vs {d}");
        }
        println!(
            "{} absmax: worst error {worst:.5} of the nested absmax (bound {:.5}), offset {}",
            q.absmax.len(),
            g / 2.0 + table_step,
            dq.offset
        );
    }
}

#[test]
fn python_float_repr() {
    for (x, s) in [
        (0.1, "0.1"),
        (1.0, "1.0"),
        (0.0001, "0.0001"),
        (1e-5, "1e-05"),
        (2.5e-7, "2.5e-07"),
        (1e16, "1e+16"),
        (123456.789, "123456.789"),
        (-0.75, "-0.75"),
        (0.7928085327148438, "0.7928085327148438"),
    ] {
        assert_eq!(py_float_repr(x), s);
    }
}

fn write_model(dir: &Path) -> std::path::PathBuf {
    let f = fixture();
    let w = f["W"].clone();
    let bf: Vec<half::bf16> = (0..128 * 64).map(|i| half::bf16::from_f32(((i as f32) * 0.37).sin())).collect();
    let tensors = vec![
        ("h.0.attn.c_attn.weight".to_string(), w),
        ("h.0.attn.c_attn.bias".to_string(), Tensor::from_f32(vec![0.5; 256], [256]).unwrap()),
        ("h.0.mlp.c_fc.weight".to_string(), Tensor::from_bf16(bf, [128, 64]).unwrap()),
    ];
    let path = dir.join("model.safetensors");
    save(&path, &tensors, &[]).unwrap();
    path
}

#[test]
fn quantize_file_writes_the_bitsandbytes_layout() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path());
    let f = fixture();
    let name = "h.0.attn.c_attn.weight";

    // single quantization, from the checkpoint directory
    let out = dir.path().join("nf4.safetensors");
    let opts = Nf4FileOptions { blocksize: 64, double_quant: false, dequant: true, ..Default::default() };
    let report = quantize_file_nf4(dir.path(), &out, &opts).unwrap();
    assert_eq!(report.quantized.len(), 2);
    assert_eq!(report.copied, vec!["h.0.attn.c_attn.bias".to_string()]);
    let sf = SafeFile::open(&out).unwrap();
    assert_eq!(sf.info(name).unwrap(), ("U8".to_string(), vec![8192, 1]), "bitsandbytes stores [numel/2, 1]");
    let t = load_all(&out).unwrap();
    assert_eq!(t[name].u8s().unwrap(), f["packed"].u8s().unwrap());
    assert_eq!(bit_mismatches(t[&format!("{name}.absmax")].f32s().unwrap(), f["absmax"].f32s().unwrap()), 0);
    assert_eq!(bit_mismatches(t[&format!("{name}.quant_map")].f32s().unwrap(), &NF4_CODE), 0);
    assert_eq!(t[&format!("{name}.dequant")].dims(), &[64, 256]);
    assert_eq!(bit_mismatches(t[&format!("{name}.dequant")].f32s().unwrap(), f["dequant"].f32s().unwrap()), 0);
    let state = String::from_utf8(t[&format!("{name}.quant_state.bitsandbytes__nf4")].u8s().unwrap().to_vec()).unwrap();
    assert_eq!(state, r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 256]}"#);
    assert_eq!(t["h.0.attn.c_attn.bias"].f32s().unwrap(), &[0.5; 256][..], "1-D tensors are copied unchanged");
    // a bf16 matrix: its quant state names bfloat16 and its dequant comes back as bf16
    let bf_state = t["h.0.mlp.c_fc.weight.quant_state.bitsandbytes__nf4"].u8s().unwrap();
    assert!(String::from_utf8_lossy(bf_state).contains(r#""dtype": "bfloat16", "shape": [128, 64]"#));
    assert_eq!(t["h.0.mlp.c_fc.weight.dequant"].dtype(), DType::BF16);

    // double quantization, from the file itself
    let out2 = dir.path().join("nf4-dq.safetensors");
    let opts = Nf4FileOptions { blocksize: 64, double_quant: true, dequant: true, ..Default::default() };
    quantize_file_nf4(&dir.path().join("model.safetensors"), &out2, &opts).unwrap();
    let t = load_all(&out2).unwrap();
    let q = quantize_nf4(f["W"].f32s().unwrap(), 64).unwrap();
    let dq = q.double_quant();
    assert_eq!(t[&format!("{name}.absmax")].u8s().unwrap(), &dq.codes[..], "double-quantized absmax is U8 codes");
    assert_eq!(bit_mismatches(t[&format!("{name}.nested_absmax")].f32s().unwrap(), &dq.nested_absmax), 0);
    assert_eq!(bit_mismatches(t[&format!("{name}.nested_quant_map")].f32s().unwrap(), &dynamic_map(true)), 0);
    let state = String::from_utf8(t[&format!("{name}.quant_state.bitsandbytes__nf4")].u8s().unwrap().to_vec()).unwrap();
    let want_prefix = r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 256], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": "#;
    assert!(state.starts_with(want_prefix), "{state}");
    let json: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(json["nested_offset"].as_f64().unwrap() as f32, dq.offset);
    let deq = q.dequantize_with(&dq).unwrap();
    assert_eq!(bit_mismatches(t[&format!("{name}.dequant")].f32s().unwrap(), &deq), 0);
}

#[test]
fn quantize_file_names_a_matrix_that_does_not_fill_whole_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.safetensors");
    let tensors = vec![
        ("ok.weight".to_string(), Tensor::from_f32(vec![0.25; 128], [2, 64]).unwrap()),
        ("odd.weight".to_string(), Tensor::from_f32(vec![0.25; 30], [5, 6]).unwrap()),
    ];
    save(&path, &tensors, &[]).unwrap();
    let out = dir.path().join("out.safetensors");
    let err = quantize_file_nf4(&path, &out, &Nf4FileOptions::default()).unwrap_err().to_string();
    assert!(err.contains("odd.weight") && err.contains("[5, 6]") && err.contains("30"), "{err}");
    assert!(!out.exists(), "nothing is written when a tensor is refused");
    let err = quantize_file_nf4(&path, &path, &Nf4FileOptions { blocksize: 2, ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(err.contains("block size 2"), "{err}");
    let err = quantize_file_nf4(&path, &path, &Nf4FileOptions::default()).unwrap_err().to_string();
    assert!(err.contains("is the input file"), "{err}");
}

/// The NF4 dequantization kernel (kernels/nf4.cu): its host twin and the kernel on the device
/// (the GPU, else the emulated device) reproduce the CPU's dequantization bit for bit, for the
/// double-quantized weights QLoRA keeps (the fixture's matrix, one nested block, and 650 blocks
/// with scales over three decades, three nested blocks), and bitsandbytes' own dequantized
/// fixture for single quantization.
#[cfg(feature = "cuda")]
mod cuda {
    use super::{bit_mismatches, common, fixture};
    use kiln::backend::cuda::nf4::{nf4_dequantize, nf4_quantize, twin, DevNf4};
    use kiln::quant::nf4::{quantize_nf4, Nf4Weight};
    use rand::{Rng, SeedableRng};

    fn weights() -> Vec<Nf4Weight> {
        let fixture_w = fixture()["W"].f32s().unwrap().to_vec();
        let mut rng = rand::rngs::StdRng::seed_from_u64(43);
        let scaled_w: Vec<f32> = (0..650 * 64)
            .map(|i| {
                let scale = 10f32.powf(((i / 64) % 13) as f32 / 4.0 - 1.5);
                (rng.random::<f32>() * 2.0 - 1.0) * scale
            })
            .collect();
        vec![
            Nf4Weight::quantize(&fixture_w, [64, 256], 64).unwrap(),
            Nf4Weight::quantize(&scaled_w, [650, 64], 64).unwrap(),
        ]
    }

    #[test]
    fn host_twin_dequantizes_like_the_cpu() {
        for w in weights() {
            let want = w.dequantize().unwrap();
            assert_eq!(bit_mismatches(&twin::nf4_dequantize(&w), &want), 0, "{:?}", w.dims);
        }
    }

    #[test]
    fn kernel_dequantizes_like_the_cpu_and_bitsandbytes() {
        let Some(cu) = common::gpu("kernel_dequantizes_like_the_cpu_and_bitsandbytes") else { return };
        for w in weights() {
            let want = w.dequantize().unwrap();
            let d = DevNf4::upload(&w).unwrap();
            let mut out = cu.alloc::<f32>(w.numel()).unwrap();
            nf4_dequantize(&mut out, &d).unwrap();
            let got = cu.download(&out).unwrap();
            assert_eq!(bit_mismatches(&got, &want), 0, "double-quantized {:?}", w.dims);
            // bf16: the f32 values rounded to nearest even
            let mut out16 = cu.alloc::<half::bf16>(w.numel()).unwrap();
            nf4_dequantize(&mut out16, &d).unwrap();
            let got16 = cu.download(&out16).unwrap();
            let want16: Vec<half::bf16> = want.iter().map(|&x| half::bf16::from_f32(x)).collect();
            let off = got16.iter().zip(&want16).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(off, 0, "bf16 output of {:?}", w.dims);
        }
        // single quantization against bitsandbytes' dequantized fixture
        let f = fixture();
        let q = quantize_nf4(f["W"].f32s().unwrap(), 64).unwrap();
        let d = DevNf4::upload_single(&q).unwrap();
        let mut out = cu.alloc::<f32>(q.numel).unwrap();
        nf4_dequantize(&mut out, &d).unwrap();
        let got = cu.download(&out).unwrap();
        assert_eq!(bit_mismatches(&got, f["dequant"].f32s().unwrap()), 0, "bitsandbytes' dequant");
        // a weight whose parts do not agree is refused, not read out of bounds
        let mut bad = weights().remove(0);
        bad.absmax.codes.pop();
        assert!(DevNf4::upload(&bad).is_err());
    }

    /// Inputs for quantization: the fixture's weight, and blocks of widely varying scale with an
    /// all-zero block, a block of one repeated value, exact +-absmax pairs, denormals and exact
    /// NF4 midpoints (times a power of two, so the scaled value lands on the midpoint exactly).
    fn quantize_inputs() -> Vec<Vec<f32>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(44);
        let mut x: Vec<f32> = (0..4096 * 4)
            .map(|i| {
                let scale = 10f32.powf(((i / 64) % 13) as f32 / 4.0 - 1.5);
                (rng.random::<f32>() * 2.0 - 1.0) * scale
            })
            .collect();
        x[64..128].fill(0.0);
        x[128..192].fill(-0.3);
        x[192] = 2.0;
        x[193] = -2.0;
        x[256..320].iter_mut().enumerate().for_each(|(i, v)| *v = f32::from_bits(1 + i as u32)); // denormals
        let mids = kiln::quant::nf4::nf4_midpoints();
        x[320] = 1.0;
        for (i, m) in mids.iter().enumerate() {
            x[321 + i] = *m; // block absmax 1: each scales to its midpoint exactly
        }
        vec![fixture()["W"].f32s().unwrap().to_vec(), x]
    }

    #[test]
    fn host_twin_quantizes_like_the_cpu() {
        for x in quantize_inputs() {
            for bs in [32, 64, 256, 4096] {
                let want = quantize_nf4(&x, bs).unwrap();
                let got = twin::nf4_quantize(&x, bs).unwrap();
                assert_eq!(got.packed, want.packed, "codes, block size {bs}");
                assert_eq!(bit_mismatches(&got.absmax, &want.absmax), 0, "absmax, block size {bs}");
            }
        }
    }

    #[test]
    fn kernel_quantizes_like_the_cpu_and_bitsandbytes() {
        let Some(cu) = common::gpu("kernel_quantizes_like_the_cpu_and_bitsandbytes") else { return };
        for x in quantize_inputs() {
            for bs in [32, 64, 256, 4096] {
                let want = quantize_nf4(&x, bs).unwrap();
                let (packed, absmax) = nf4_quantize(&cu.upload(&x).unwrap(), bs).unwrap();
                assert_eq!(cu.download(&packed).unwrap(), want.packed, "codes, block size {bs}");
                assert_eq!(bit_mismatches(&cu.download(&absmax).unwrap(), &want.absmax), 0, "absmax, block size {bs}");
            }
        }
        // bitsandbytes' own codes for the fixture's weight
        let f = fixture();
        let (packed, _) = nf4_quantize(&cu.upload(f["W"].f32s().unwrap()).unwrap(), 64).unwrap();
        assert_eq!(cu.download(&packed).unwrap(), f["packed"].u8s().unwrap(), "bitsandbytes' packed codes");
        // a size that is not whole blocks is refused before any launch
        assert!(nf4_quantize(&cu.upload(&[1.0f32; 96]).unwrap(), 64).is_err());
    }

    /// `kiln quantize --device emu` writes the same file as on the CPU, byte for byte.
    #[test]
    fn kiln_quantize_on_the_device_writes_the_cpus_bytes() {
        let Some(cu) = common::gpu("kiln_quantize_on_the_device_writes_the_cpus_bytes") else { return };
        let dir = tempfile::tempdir().unwrap();
        let model = kiln::Model::new_random(kiln::Gpt2Config::preset("tiny").unwrap(), 3).unwrap();
        kiln::io::checkpoint::save_model(&model, &dir.path().join("base"), kiln::DType::F32).unwrap();
        let device = if cu.is_emulated() { "emu" } else { "cuda" };
        let run = |dev: &str| {
            let out = dir.path().join(format!("q-{dev}"));
            let base = dir.path().join("base");
            let o = common::cli::kiln_command()
                .args(["quantize", "--in", base.to_str().unwrap(), "--out", out.to_str().unwrap(), "--device", dev])
                .arg("--double-quant")
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            std::fs::read(out.join("model.safetensors")).unwrap()
        };
        let (on_cpu, on_device) = (run("cpu"), run(device));
        assert!(on_cpu.len() > 100_000);
        assert!(on_cpu == on_device, "kiln quantize --device {device} differs from --device cpu");
    }

    /// The fused NF4 GEMM (the weight decoded into the GEMM's shared tiles) equals dequantizing
    /// to bf16 and then the bf16 GEMM, bit for bit: forward x @ W and input gradient dY @ W^T,
    /// both tiles, bias and GELU, f32 and bf16 outputs, a width that is no multiple of 8 (the
    /// element-by-element decode) and edges that cut tiles.
    #[test]
    fn fused_nf4_gemm_equals_dequantize_then_gemm() {
        use kiln::backend::cuda::gemm::{matmul_forward, matmul_nf4_with, GemmVariant};
        use kiln::backend::GemmDesc;
        let Some(cu) = common::gpu("fused_nf4_gemm_equals_dequantize_then_gemm") else { return };
        let mut rng = rand::rngs::StdRng::seed_from_u64(45);
        let mut uniform =
            |n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * s).collect() };
        for (m, k, n) in [(37, 64, 96), (130, 192, 100), (9, 128, 256)] {
            let w = Nf4Weight::quantize(&uniform(k * n, 0.5), [k, n], 64).unwrap();
            let d = DevNf4::upload(&w).unwrap();
            let mut wd = cu.alloc::<half::bf16>(k * n).unwrap();
            nf4_dequantize(&mut wd, &d).unwrap();
            let bf = |v: Vec<f32>| cu.upload(&v.iter().map(|&x| half::bf16::from_f32(x)).collect::<Vec<_>>()).unwrap();
            let x = bf(uniform(m * k, 1.0));
            let g = bf(uniform(m * n, 1.0));
            let bias = bf(uniform(n, 0.5));
            for variant in [GemmVariant::MmaSyncSmall, GemmVariant::MmaSyncLarge] {
                // forward with bias and GELU, bf16 out
                let (mut want, mut want_pre) =
                    (cu.alloc::<half::bf16>(m * n).unwrap(), cu.alloc::<half::bf16>(m * n).unwrap());
                let desc = GemmDesc::nn(m, n, k);
                matmul_forward(&mut want, Some(&mut want_pre), &x, &wd, Some(&bias), &desc).unwrap();
                let (mut got, mut got_pre) =
                    (cu.alloc::<half::bf16>(m * n).unwrap(), cu.alloc::<half::bf16>(m * n).unwrap());
                matmul_nf4_with(variant, &mut got, Some(&mut got_pre), &x, &d, Some(&bias), &desc).unwrap();
                let bits = |b: &kiln::backend::cuda::DevBuf<half::bf16>| {
                    cu.download(b).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                assert_eq!(bits(&got), bits(&want), "{variant:?} forward {m}x{k}x{n}");
                assert_eq!(bits(&got_pre), bits(&want_pre), "{variant:?} pre-activation {m}x{k}x{n}");
                // input gradient dY [m, n] @ W^T into f32
                let desc = GemmDesc::nt(m, k, n);
                let mut want = cu.alloc::<f32>(m * k).unwrap();
                matmul_forward(&mut want, None, &g, &wd, None, &desc).unwrap();
                let mut got = cu.alloc::<f32>(m * k).unwrap();
                matmul_nf4_with(variant, &mut got, None, &g, &d, None, &desc).unwrap();
                assert_eq!(
                    bit_mismatches(&cu.download(&got).unwrap(), &cu.download(&want).unwrap()),
                    0,
                    "{variant:?} dY W^T {m}x{k}x{n}"
                );
            }
        }
    }
}
