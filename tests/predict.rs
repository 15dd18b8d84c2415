//! `kiln bench train-step --device emu --predict`: the sampled counts it prices against the same
//! step counted whole, and the emulator's checks back on afterwards. Sampling is process-wide, so
//! these tests live in their own binary and take turns.
#![cfg(feature = "cuda")]

use kiln::backend::cuda::{self, bench::count_launches, RuntimeKind};
use kiln::model::{Config, Model};
use kiln::predict::{Launch, Prediction, H200};
use kiln::Device;
use std::collections::BTreeMap;
use std::sync::Mutex;

static TURN: Mutex<()> = Mutex::new(());

fn emu_model(preset: &str) -> Model {
    cuda::select(RuntimeKind::Emulator).unwrap();
    let mut m = Model::new_random(Config::preset(preset).unwrap(), 0).unwrap();
    m.to_device(Device::Cuda(0)).unwrap();
    m
}

/// One training step's launches, every block run (`blocks` 0) or a sample of each launch.
fn step(m: &mut Model, b: usize, t: usize, blocks: u32) -> Vec<Launch> {
    count_launches(blocks, || kiln::bench::train_step(m, b, t, 0, 1, |_, _| {}).map(|_| ())).unwrap()
}

/// Per kernel: (fewest bytes, tensor FLOPs, CUDA-core FLOPs, launches).
fn per_kernel(ls: &[Launch]) -> BTreeMap<&'static str, (f64, f64, f64, usize)> {
    let mut m = BTreeMap::new();
    for l in ls {
        let e = m.entry(l.kernel).or_insert((0.0, 0.0, 0.0, 0));
        e.0 += l.fewest_bytes;
        e.1 += l.tensor_flops;
        e.2 += l.core_flops;
        e.3 += 1;
    }
    m
}

/// A sample of 8 blocks per launch prices the step as running every block does: the same
/// launches, the tensor-core and CUDA-core math within 3% per kernel (a sample of evenly spaced
/// blocks misses only the ragged edge tiles' share), the fewest bytes within 25% per kernel and
/// the step's floor within 10%.
#[test]
fn a_sampled_step_prices_like_the_whole_step() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let mut m = emu_model("tiny");
    let (b, t) = (8, 256);
    let whole = step(&mut m, b, t, 0);
    let sampled = step(&mut m, b, t, 8);
    assert_eq!(whole.len(), sampled.len(), "the same launches");
    assert!(whole.iter().all(|l| l.run_blocks == l.blocks), "every block ran");
    let skipped: u64 = sampled.iter().map(|l| l.blocks - l.run_blocks).sum();
    assert!(skipped > 0, "the sampled step skipped no block: the shape is too small to test sampling");
    let (w, s) = (per_kernel(&whole), per_kernel(&sampled));
    assert_eq!(w.keys().collect::<Vec<_>>(), s.keys().collect::<Vec<_>>());
    let close = |a: f64, b: f64, rel: f64| (a - b).abs() <= rel * a.abs().max(b.abs()) + 1e-9;
    for (k, wv) in &w {
        let sv = s[k];
        eprintln!(
            "{k:<34} fewest {:>10.0} / {:>10.0}  mma {:>12.0} / {:>12.0}  fp32 {:>10.0} / {:>10.0}",
            wv.0, sv.0, wv.1, sv.1, wv.2, sv.2
        );
        assert_eq!(wv.3, sv.3, "{k}: launches");
        assert!(close(wv.1, sv.1, 0.03), "{k}: tensor FLOPs {} whole, {} sampled", wv.1, sv.1);
        assert!(close(wv.2, sv.2, 0.03), "{k}: fp32 FLOPs {} whole, {} sampled", wv.2, sv.2);
        assert!(close(wv.0, sv.0, 0.25), "{k}: fewest bytes {} whole, {} sampled", wv.0, sv.0);
    }
    let flops = kiln::bench::train_step_flops(&m.config, b, t);
    let (pw, ps) = (Prediction::new(&whole, H200, b * t, flops), Prediction::new(&sampled, H200, b * t, flops));
    eprintln!("floor: {:.4} ms whole, {:.4} ms sampled", pw.floor() * 1e3, ps.floor() * 1e3);
    assert!(close(pw.floor(), ps.floor(), 0.10));
    // At the tiny preset's head dim (32) the attention runs on CUDA cores and declares its math;
    // the GEMMs use tensor cores.
    assert!(w["attention_backward_dkdv"].2 > 0.0 && w["attention_backward_dq"].2 > 0.0);
    let gemms: Vec<_> = w.iter().filter(|(k, _)| k.starts_with("gemm_mma") || k.starts_with("gemm_wgmma")).collect();
    assert!(!gemms.is_empty() && gemms.iter().all(|(_, v)| v.1 > 0.0), "GEMM rows: {gemms:?}");
}

/// After a prediction the emulator runs every block again, with its uninitialised-read check: a
/// kernel reading memory nothing wrote is a fault again.
#[test]
fn the_checks_are_back_on_after_a_prediction() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let mut m = emu_model("tiny");
    let ls = step(&mut m, 2, 64, 2);
    assert!(ls.iter().any(|l| l.run_blocks < l.blocks));
    let cu = cuda::cuda().unwrap();
    let x = cu.alloc::<f32>(1 << 16).unwrap();
    let mut y = cu.alloc::<cuda::bf16>(1 << 16).unwrap();
    let err = cuda::elementwise::cast_f32_to_bf16(&mut y, &x).unwrap_err().to_string();
    assert!(err.contains("uninitialised global load"), "{err}");
}
