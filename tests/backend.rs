//! The backend interface from the outside: an op defined outside kiln records on the tape and
//! back-propagates like kiln's own (ops are values the tape does not know); ops whose fused
//! kernel a backend lacks still run there, through the CPU implementation on host copies (LoRA
//! and NF4 on the CUDA backend); and inputs on two devices are refused with an error that names
//! the op and both devices.

mod common;

use common::{rand_tensor, rng};
use kiln::tape::Op;
use kiln::{Result, Tape, Tensor};

/// y = 3 x, computed on the host: a user's op, in one type, without touching kiln.
struct Triple;

impl Op for Triple {
    fn name(&self) -> &'static str {
        "triple"
    }
    fn backward(&self, dout: &Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let g: Vec<f32> = dout.f32s()?.iter().map(|g| 3.0 * g).collect();
        Ok(vec![Some(Tensor::from_f32(g, dout.dims())?)])
    }
}

fn triple(tape: &mut Tape, x: &Tensor) -> Result<Tensor> {
    let y = Tensor::from_f32(x.f32s()?.iter().map(|v| 3.0 * v).collect(), x.dims())?;
    if tape.wants(&[x]) {
        tape.record(Triple, &[x], &y);
    }
    Ok(y)
}

#[test]
fn an_op_defined_outside_kiln_records_and_back_propagates() {
    let mut r = rng(1);
    let x = rand_tensor(&mut r, &[2, 5], 1.0);
    let mut tape = Tape::new();
    tape.watch(&x);
    let y = triple(&mut tape, &x).unwrap();
    // a kiln op after it, so the gradient flows through both kinds of node
    let z = kiln::ops::elementwise::gelu(&mut tape, &y).unwrap();
    assert_eq!(tape.summary(), vec!["triple", "gelu"]);
    let dout = rand_tensor(&mut r, &[2, 5], 1.0);
    let grads = tape.backward_from(&z, dout.clone()).unwrap();
    let dx = grads.get(&x).expect("x is watched").f32s().unwrap().to_vec();
    // d/dx gelu(3x) = 3 gelu'(3x)
    let (yv, dv) = (y.f32s().unwrap(), dout.f32s().unwrap());
    for i in 0..dx.len() {
        let want = 3.0 * kiln::backend::cpu::elementwise::gelu_grad(yv[i]) * dv[i];
        assert!((dx[i] - want).abs() <= 1e-6 * (1.0 + want.abs()), "dx[{i}] = {} vs {want}", dx[i]);
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::common::{self, rand_tensor, rng};
    use kiln::ops::gemm::WeightLayout;
    use kiln::ops::{elementwise, lora, nf4};
    use kiln::quant::nf4::Nf4Weight;
    use kiln::{Device, Tape, Tensor};
    use std::sync::Arc;

    const GPU: Device = Device::Cuda(0);

    #[test]
    fn inputs_on_two_devices_are_refused_naming_the_op_and_both() {
        let Some(_) = common::gpu("inputs_on_two_devices_are_refused_naming_the_op_and_both") else { return };
        let a = rand_tensor(&mut rng(2), &[4], 1.0);
        let b = a.to_device(GPU).unwrap();
        let err = elementwise::add(&mut Tape::inference(), &a, &b).unwrap_err().to_string();
        assert!(err.starts_with("add: one input is on cpu and another on "), "{err}");
        assert!(err.contains("to_device"), "the error names the fix: {err}");
    }

    /// ‖a − b‖ / ‖b‖.
    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
        let num: f64 = a.iter().zip(&b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
        (num / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().max(1e-30)).sqrt()
    }

    /// bf16 operands (u = 2^-8 relative each), f32 accumulation: each output passes through 2 to
    /// 4 roundings, about 1e-2 of its norm at worst; a wrong mask, operand or missing term moves it
    /// by O(1).
    const BF16_TOL: f64 = 2e-2;

    /// lora_linear has no CUDA kernel: on the CUDA backend the trait's default composes it from
    /// the backend's own GEMM, cast, dropout and add kernels (f32 inputs are cast to bf16). The
    /// output and every gradient match the CPU's within bf16's error, with the same dropout mask,
    /// and stay on the device (parameter gradients in f32).
    #[test]
    fn lora_linear_without_a_cuda_kernel_runs_on_the_cuda_backend() {
        let Some(_) = common::gpu("lora_linear_without_a_cuda_kernel_runs_on_the_cuda_backend") else { return };
        let mut r = rng(3);
        for (m, k, n, rank, layout) in [(6, 8, 5, 2, WeightLayout::InOut), (40, 72, 24, 8, WeightLayout::OutIn)] {
            let w_dims = if layout == WeightLayout::InOut { [k, n] } else { [n, k] };
            let host = [
                rand_tensor(&mut r, &[2, m / 2, k], 1.0),
                rand_tensor(&mut r, &w_dims, 0.5),
                rand_tensor(&mut r, &[n], 0.5),
                rand_tensor(&mut r, &[rank, k], 0.5),
                rand_tensor(&mut r, &[n, rank], 0.5),
            ];
            let dout = rand_tensor(&mut r, &[2, m / 2, n], 1.0);
            let run = |xs: &[Tensor], dout: &Tensor| {
                let mut tape = Tape::new();
                xs.iter().for_each(|t| tape.watch(t));
                let ad =
                    lora::LoraAdapter { a: &xs[3], b: &xs[4], scaling: 2.0, dropout_p: 0.25, train: true, seed: 9 };
                let y = lora::lora_linear(&mut tape, &xs[0], &xs[1], layout, Some(&xs[2]), &ad).unwrap();
                let g = tape.backward_from(&y, dout.clone()).unwrap();
                let grads: Vec<Tensor> = xs.iter().map(|t| g.get(t).expect("every input is watched").clone()).collect();
                (y, grads)
            };
            let (want_y, want_g) = run(&host, &dout);
            let dev: Vec<Tensor> = host.iter().map(|t| t.to_device(GPU).unwrap()).collect();
            let (y, g) = run(&dev, &dout.to_device(GPU).unwrap());
            assert_eq!((y.device(), y.dims()), (GPU, want_y.dims()));
            assert!(rel(&y, &want_y) < BF16_TOL, "{m}x{k}x{n}: output off by {:.2e}", rel(&y, &want_y));
            for (i, (g, w)) in g.iter().zip(&want_g).enumerate() {
                assert_eq!(g.device(), GPU, "gradient {i} comes back on the device");
                assert_eq!(g.dims(), w.dims(), "gradient {i}");
                let e = rel(g, w);
                println!("lora_linear {m}x{k}x{n} r={rank}: gradient {i} off by {e:.2e}");
                assert!(e < BF16_TOL, "{m}x{k}x{n}: gradient of input {i} off by {e:.2e}");
            }
            for i in [1, 3, 4] {
                assert_eq!(g[i].dtype(), kiln::DType::F32, "parameter gradient {i} in f32");
            }
        }
    }

    /// The same for nf4_linear with and without an adapter: the base product in the fused NF4 GEMM
    /// (the weight decoded into the GEMM's tiles), the adapter composed.
    #[test]
    fn nf4_linear_runs_on_the_cuda_backend_in_the_fused_gemm() {
        let Some(cu) = common::gpu("nf4_linear_runs_on_the_cuda_backend_in_the_fused_gemm") else { return };
        let mut r = rng(4);
        let (m, k, n, rank) = (24, 64, 40, 4);
        let w = rand_tensor(&mut r, &[k, n], 0.5);
        let q = Arc::new(Nf4Weight::quantize(w.f32s().unwrap(), [k, n], 64).unwrap());
        let host = [
            rand_tensor(&mut r, &[m, k], 1.0),
            rand_tensor(&mut r, &[rank, k], 0.5),
            rand_tensor(&mut r, &[n, rank], 0.5),
            rand_tensor(&mut r, &[n], 0.5),
        ];
        let dout = rand_tensor(&mut r, &[m, n], 1.0);
        assert!(!q.device.is_made());
        let emu = cu.emulator();
        if let Some(e) = emu {
            e.take_stats();
        }
        for with_adapter in [true, false] {
            let run = |xs: &[Tensor], dout: &Tensor| {
                let mut tape = Tape::new();
                xs.iter().for_each(|t| tape.watch(t));
                let l = nf4::Nf4Lora { a: &xs[1], b: &xs[2], scaling: 0.5, dropout_p: 0.1, train: true, seed: 5 };
                let y = nf4::nf4_linear(&mut tape, &xs[0], &q, Some(&xs[3]), with_adapter.then_some(l)).unwrap();
                let g = tape.backward_from(&y, dout.clone()).unwrap();
                let used = if with_adapter { vec![0, 1, 2, 3] } else { vec![0, 3] };
                (y, used.iter().map(|&i| g.get(&xs[i]).expect("watched").clone()).collect::<Vec<_>>())
            };
            let (want_y, want_g) = run(&host, &dout);
            let dev: Vec<Tensor> = host.iter().map(|t| t.to_device(GPU).unwrap()).collect();
            let (y, g) = run(&dev, &dout.to_device(GPU).unwrap());
            assert!(rel(&y, &want_y) < BF16_TOL, "adapter {with_adapter}: output off by {:.2e}", rel(&y, &want_y));
            for (i, (g, w)) in g.iter().zip(&want_g).enumerate() {
                assert_eq!(g.device(), GPU);
                let e = rel(g, w);
                println!("nf4_linear (adapter {with_adapter}): gradient {i} off by {e:.2e}");
                assert!(e < BF16_TOL, "adapter {with_adapter}: gradient {i} off by {e:.2e}");
            }
        }
        assert!(q.device.is_made(), "the packed weight stays in device memory after the first use");
        // the base product ran in the fused NF4 GEMM, forward (nn) and input gradient (nt); no
        // kernel wrote the dequantized weight out
        if let Some(e) = emu {
            let ran: Vec<&str> = e.take_stats().iter().map(|(k, _, _)| k.name()).collect();
            for k in ["gemm_mma_small_nf4_nn", "gemm_mma_small_nf4_nt"] {
                assert!(ran.contains(&k), "{k} did not run: {ran:?}");
            }
            assert!(!ran.iter().any(|k| k.starts_with("nf4_dequantize")), "{ran:?}");
        }
    }

    /// The bench rows for the NF4 and LoRA linear layers run end to end (here at a small shape)
    /// and report against the plain GEMM timed in the same run.
    #[test]
    fn linear_bench_rows_run() {
        let Some(cu) = common::gpu("linear_bench_rows_run") else { return };
        let rows = kiln::backend::cuda::bench::linear_rows_at(cu, &[("small", 64, 96, 64)], 4).unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r.kernel.as_str()).collect();
        assert_eq!(names, ["nf4 linear (small)", "lora r=4 linear (small)"]);
        for r in &rows {
            assert!(r.ms > 0.0 && r.achieved > 0.0 && r.ceiling > 0.0, "{}: {} ms", r.kernel, r.ms);
            assert_eq!(r.ceiling_name, "kiln bf16 gemm");
        }
    }
}

/// What was one catch-all `Error::Input(String)` is now variants a caller can match, each still
/// a sentence naming the problem and the fix.
#[test]
fn bad_input_errors_are_typed_and_say_the_fix() {
    use kiln::{DType, Error, Gpt2Config};
    let e = Gpt2Config::preset("gpt5").unwrap_err();
    assert!(matches!(&e, Error::Unknown { what: "preset", value, .. } if value == "gpt5"), "{e:?}");
    assert!(e.to_string().starts_with("unknown preset 'gpt5': use ") && e.to_string().contains("gpt2-medium"), "{e}");
    let e = DType::parse("q7").unwrap_err();
    assert!(matches!(e, Error::Unknown { what: "dtype", .. }), "{e:?}");
    assert!("cuda:x".parse::<kiln::Device>().is_err_and(|e| matches!(e, Error::Unknown { what: "device", .. })));
    let x = Tensor::zeros([3]);
    let e = kiln::ops::elementwise::dropout(&mut Tape::new(), &x, 1.5, true, 0).unwrap_err();
    assert!(matches!(e, Error::OutOfRange { .. }), "{e:?}");
    assert_eq!(e.to_string(), "dropout probability 1.5 must be in [0, 1)");
    // a loss that no watched tensor reaches
    let e = Tape::new().backward(&Tensor::scalar(1.0)).unwrap_err();
    assert!(matches!(e, Error::NotTracked), "{e:?}");
    assert!(e.to_string().contains("was the forward pass run on this tape?"), "{e}");
}
