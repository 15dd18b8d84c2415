//! fp32 AdamW against torch.optim.AdamW: the oracle fixture (adam8bit.safetensors) holds a
//! parameter, three gradients and torch's parameter and moments after each step (lr 1e-3,
//! betas 0.9/0.999, eps 1e-8, weight decay 0.01). Both sides run the same f32 formula; the
//! only difference is operation order inside one update, worth a few ulp of a value ~1, so the
//! bound is 1e-6 relative to the largest magnitude.

use kiln::io::checkpoint::load_all;
use kiln::optim::adamw::{adamw_step, AdamWConfig};
use std::path::Path;

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    d / (b.iter().map(|y| y.abs()).fold(0f32, f32::max) + 1e-12)
}

#[test]
fn three_steps_match_torch_adamw() {
    let f = load_all(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oracle/dev-set/adam8bit.safetensors"))
        .unwrap();
    let n = f["adam.p0"].numel();
    let mut p = f["adam.p0"].f32s().unwrap().to_vec();
    let grads = f["adam.grads"].f32s().unwrap();
    let (want_p, want_m, want_v) = (
        f["adam.torch_fp32.params"].f32s().unwrap(),
        f["adam.torch_fp32.exp_avg"].f32s().unwrap(),
        f["adam.torch_fp32.exp_avg_sq"].f32s().unwrap(),
    );
    let cfg = AdamWConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    for s in 0..3 {
        adamw_step(&mut p, &mut m, &mut v, &grads[s * n..(s + 1) * n], &cfg, cfg.lr, s as u64 + 1, true);
        let r = s * n..(s + 1) * n;
        println!(
            "step {}: rel err params {:.1e}, m {:.1e}, v {:.1e}",
            s + 1,
            rel(&p, &want_p[r.clone()]),
            rel(&m, &want_m[r.clone()]),
            rel(&v, &want_v[r.clone()])
        );
        assert!(rel(&p, &want_p[r.clone()]) < 1e-6, "step {}: params rel err {}", s + 1, rel(&p, &want_p[r.clone()]));
        assert!(rel(&m, &want_m[r.clone()]) < 1e-6, "step {}: exp_avg rel err {}", s + 1, rel(&m, &want_m[r.clone()]));
        assert!(rel(&v, &want_v[r.clone()]) < 1e-6, "step {}: exp_avg_sq rel err {}", s + 1, rel(&v, &want_v[r]));
    }
    // the update moved the parameters by a visible amount (so the check has teeth)
    assert!(rel(&p, f["adam.p0"].f32s().unwrap()) > 1e-4);
}

#[test]
fn model_step_skips_decay_on_vectors_and_frozen_parameters() {
    use kiln::model::gpt2::{Gpt2, Gpt2Config, Mode};
    let mut model = Gpt2::new_random(Gpt2Config::preset("tiny").unwrap(), 3).unwrap();
    model.params.get_mut("transformer.wpe.weight").unwrap().trainable = false;
    let before = model.clone();
    let ids = kiln::bench::random_tokens(model.config.vocab_size, 2, 8, 0).unwrap();
    let targets = kiln::data::batch::Batch { input_ids: ids.clone(), labels: None }.targets().unwrap();
    let mut tape = kiln::Tape::new();
    let loss = model.forward(&mut tape, &ids, Some(&targets), Mode::Eval).unwrap().loss.unwrap();
    let grads = tape.backward(&loss).unwrap();
    let mut opt = kiln::optim::AdamW::new(AdamWConfig { weight_decay: 0.5, ..Default::default() });
    opt.step(&mut model.params, &grads, 1e-3).unwrap();
    let changed = |name: &str| {
        before.params.get(name).unwrap().f32s().unwrap() != model.params.get(name).unwrap().f32s().unwrap()
    };
    assert!(!changed("transformer.wpe.weight"), "a frozen parameter moved");
    assert!(changed("transformer.wte.weight"));
    assert!(changed("transformer.h.0.attn.c_attn.bias"));
    // two moments for every trainable scalar, none for the frozen one
    let trainable = model.params.trainable_numel();
    assert_eq!(opt.state_bytes(), 8 * trainable);
}
