//! Oracle parity: kiln's GPT-2 against PyTorch + transformers on the dev-set fixture (a tiny
//! random GPT-2, batch 3 x 16). Logits, loss, hidden states and every parameter gradient must
//! match with max |a - b| / (max |b| + 1e-6) < 1e-4 per tensor, in f32. Both sides compute in
//! f32 with different summation orders; the observed worst case is ~1e-6, so 1e-4 leaves room
//! for BLAS differences while still catching any real error (a wrong op is off by O(1)).

mod common;

use common::max_rel_err_t;

use kiln::data::batch::Batch;
use kiln::io::checkpoint::{load_all, load_model};
use kiln::model::Mode;
use kiln::{Tape, Tensor};
use std::path::{Path, PathBuf};

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oracle/dev-set").join(name)
}

#[test]
fn logits_loss_and_every_gradient_match_transformers() {
    let model = load_model(&fixture("model")).unwrap();
    let batch = Batch::load(&fixture("batch.safetensors")).unwrap();
    let forward = load_all(&fixture("forward.safetensors")).unwrap();
    let grads = load_all(&fixture("grads.safetensors")).unwrap();

    let mut tape = Tape::new();
    let out = model.forward(&mut tape, &batch.input_ids, Some(&batch.targets().unwrap()), Mode::Eval).unwrap();
    let loss = out.loss.unwrap();
    let want_loss = forward["loss"].item().unwrap();
    let got_loss = loss.item().unwrap();
    assert!((got_loss - want_loss).abs() / want_loss < TOL, "loss {got_loss} vs transformers {want_loss}");
    let e = max_rel_err_t(out.logits.as_ref().unwrap(), &forward["logits"]);
    assert!(e < TOL, "logits rel err {e}");

    let g = tape.backward(&loss).unwrap();
    // The fixture holds every parameter's gradient; kiln must produce each one.
    assert_eq!(grads.len(), model.params.len(), "fixture and model disagree on the parameter count");
    let worst = common::assert_grads_match("gpt2", model.params.iter(), &g, &grads, TOL);
    println!("worst gradient rel err {:.2e} ({})", worst.0, worst.1);
}

#[test]
fn hidden_states_match_transformers() {
    // Hidden state 0 is the embedding output; checking it pins down wte/wpe handling on its own.
    let model = load_model(&fixture("model")).unwrap();
    let batch = Batch::load(&fixture("batch.safetensors")).unwrap();
    let forward = load_all(&fixture("forward.safetensors")).unwrap();
    let mut tape = Tape::inference();
    let wte = model.params.get("transformer.wte.weight").unwrap();
    let wpe = model.params.get("transformer.wpe.weight").unwrap();
    let h0 = kiln::ops::embedding::embedding(&mut tape, &batch.input_ids, wte, wpe).unwrap();
    let e = max_rel_err_t(&h0, &forward["hidden_states.0"]);
    assert!(e < TOL, "hidden_states.0 rel err {e}");
}

#[test]
fn tied_embedding_gradient_is_the_sum_of_its_two_uses() {
    // The fixture splits wte's gradient into its lm_head and embedding parts; their sum must be
    // the total (a check on the fixture itself) ...
    let split = load_all(&fixture("grads_tied_split.safetensors")).unwrap();
    let grads = load_all(&fixture("grads.safetensors")).unwrap();
    let a = split["wte_grad_from_lm_head"].f32s().unwrap();
    let b = split["wte_grad_from_embedding"].f32s().unwrap();
    let sum: Vec<f32> = a.iter().zip(b).map(|(x, y)| x + y).collect();
    let sum = Tensor::from_f32(sum, split["wte_grad_from_lm_head"].dims()).unwrap();
    assert!(max_rel_err_t(&sum, &grads["transformer.wte.weight"]) < 1e-6);

    // and kiln's dlogits equal transformers' (the cross-entropy backward on its own)
    let model = load_model(&fixture("model")).unwrap();
    let batch = Batch::load(&fixture("batch.safetensors")).unwrap();
    let mut tape = Tape::new();
    let out = model.forward(&mut tape, &batch.input_ids, None, Mode::Eval).unwrap();
    let logits = out.logits.unwrap();
    let mut tape2 = Tape::new();
    tape2.watch(&logits);
    let loss = kiln::ops::xent::cross_entropy(&mut tape2, &logits, &batch.targets().unwrap()).unwrap();
    let g = tape2.backward(&loss).unwrap();
    let e = max_rel_err_t(g.get(&logits).unwrap(), &split["dlogits"]);
    assert!(e < TOL, "dlogits rel err {e}");
}

#[test]
fn frozen_parameters_get_no_gradient() {
    let mut model = load_model(&fixture("model")).unwrap();
    model.params.set_trainable(false);
    model.params.get_mut("transformer.ln_f.bias").unwrap().trainable = true;
    let batch = Batch::load(&fixture("batch.safetensors")).unwrap();
    let mut tape = Tape::new();
    let loss =
        model.forward(&mut tape, &batch.input_ids, Some(&batch.targets().unwrap()), Mode::Eval).unwrap().loss.unwrap();
    let g = tape.backward(&loss).unwrap();
    assert_eq!(g.len(), 1, "only the one trainable parameter may get a gradient buffer");
    let want = &load_all(&fixture("grads.safetensors")).unwrap()["transformer.ln_f.bias"];
    assert!(max_rel_err_t(g.get(model.params.get("transformer.ln_f.bias").unwrap()).unwrap(), want) < TOL);
}
