//! Gradient checkpointing: a block recorded as one node and recomputed in backward must give the
//! same loss and gradients as the plain tape, bit for bit (the same ops run in the same order),
//! with and without dropout and with a LoRA adapter; and the tape must hold one node per block.

use kiln::data::batch::Batch;
use kiln::io::checkpoint::load_model;
use kiln::model::{Mode, Model};
use kiln::Tape;
use std::path::Path;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oracle/dev-set").join(name)
}

/// Gradients by parameter name.
type Grads = Vec<(String, Vec<f32>)>;

/// Loss and every gradient (by parameter name) of one forward/backward, and the tape's op summary.
fn run(model: &Model, mode: Mode) -> (f32, Grads, Vec<&'static str>) {
    let batch = Batch::load(&fixture("batch.safetensors")).unwrap();
    let mut tape = Tape::new();
    let loss = model.forward(&mut tape, &batch.input_ids, Some(&batch.targets().unwrap()), mode).unwrap().loss.unwrap();
    let ops = tape.summary();
    let g = tape.backward(&loss).unwrap();
    let mut grads = vec![];
    for s in model.stores() {
        for p in s.iter().filter(|p| p.trainable) {
            grads.push((p.name.clone(), g.get(&p.tensor).unwrap().f32s().unwrap().to_vec()));
        }
    }
    (loss.item().unwrap(), grads, ops)
}

fn same_with_and_without(mut model: Model, mode: Mode) {
    let plain = run(&model, mode);
    model.gradient_checkpointing = true;
    let ckpt = run(&model, mode);
    assert_eq!(plain.0, ckpt.0, "loss");
    assert_eq!(plain.1.len(), ckpt.1.len());
    for ((n, a), (_, b)) in plain.1.iter().zip(&ckpt.1) {
        assert_eq!(a, b, "{n}: checkpointed gradient differs");
    }
    let blocks = model.config.n_layer();
    assert_eq!(ckpt.2.iter().filter(|&&o| o == "checkpoint").count(), blocks);
    assert!(ckpt.2.len() < plain.2.len(), "checkpointing must record fewer nodes");
}

#[test]
fn checkpointed_gradients_equal_plain_ones() {
    same_with_and_without(load_model(&fixture("model")).unwrap(), Mode::Eval);
}

#[test]
fn checkpointed_gradients_equal_plain_ones_with_dropout() {
    let mut m = load_model(&fixture("model")).unwrap();
    let kiln::Config::Gpt2(c) = &mut m.config else { panic!("a GPT-2") };
    (c.resid_pdrop, c.embd_pdrop) = (0.2, 0.1);
    same_with_and_without(m, Mode::Train { seed: 9 });
}

#[test]
fn checkpointed_gradients_equal_plain_ones_with_lora() {
    let mut m = load_model(&fixture("model")).unwrap();
    kiln::io::peft::load_adapter(&mut m, &fixture("lora")).unwrap();
    same_with_and_without(m, Mode::Train { seed: 3 });
}
