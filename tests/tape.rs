//! The tape's own rules: what it records, what backward accepts, where gradients go.

use kiln::model::{Gpt2Config, Mode, Model};
use kiln::ops::{elementwise, gemm, xent};
use kiln::{Tape, Tensor};

fn t(v: &[f32], dims: &[usize]) -> Tensor {
    Tensor::from_f32(v.to_vec(), dims).unwrap()
}

#[test]
fn a_tensor_used_twice_accumulates_both_gradients() {
    let x = t(&[0.3, -0.2, 0.5, 0.1], &[1, 4]);
    let targets = Tensor::from_i32(vec![2], [1]).unwrap();
    let mut tape = Tape::new();
    tape.watch(&x);
    let y = elementwise::add(&mut tape, &x, &x).unwrap();
    let loss = xent::cross_entropy(&mut tape, &y, &targets).unwrap();
    let g = tape.backward(&loss).unwrap();

    let mut tape = Tape::new();
    tape.watch(&y);
    let loss = xent::cross_entropy(&mut tape, &y, &targets).unwrap();
    let gy = tape.backward(&loss).unwrap();
    let want: Vec<f32> = gy.get(&y).unwrap().f32s().unwrap().iter().map(|v| 2.0 * v).collect();
    assert_eq!(g.get(&x).unwrap().f32s().unwrap(), want.as_slice());
}

#[test]
fn only_watched_tensors_get_gradients() {
    let (a, b) = (t(&[1.0, 2.0, 3.0, 4.0], &[2, 2]), t(&[0.5, -1.0, 0.25, 2.0], &[2, 2]));
    let mut tape = Tape::new();
    tape.watch(&b);
    let y = gemm::matmul(&mut tape, &a, &b, gemm::Trans::No, gemm::Trans::No).unwrap();
    let loss = xent::cross_entropy(&mut tape, &y, &Tensor::from_i32(vec![0, 1], [2]).unwrap()).unwrap();
    let g = tape.backward(&loss).unwrap();
    assert!(g.get(&b).is_some());
    assert!(g.get(&a).is_none(), "an unwatched input must get no gradient");
    assert!(g.get(&y).is_none(), "intermediate gradients are not returned");
    assert_eq!(g.len(), 1);
}

#[test]
fn backward_rejects_a_non_scalar_or_unconnected_loss() {
    let x = t(&[1.0, 2.0], &[1, 2]);
    let mut tape = Tape::new();
    tape.watch(&x);
    let y = elementwise::gelu(&mut tape, &x).unwrap();
    assert!(tape.backward(&y).unwrap_err().to_string().contains("scalar"));
    let unrelated = Tensor::scalar(1.0);
    assert!(tape.backward(&unrelated).unwrap_err().to_string().contains("does not depend"));
}

#[test]
fn inference_records_nothing_and_training_records_each_op_once() {
    let cfg = Gpt2Config::preset("tiny").unwrap();
    let model = Model::new_random(cfg.clone(), 0).unwrap();
    let ids = kiln::bench::random_tokens(cfg.vocab_size, 1, 5, 0).unwrap();
    let mut tape = Tape::inference();
    model.forward(&mut tape, &ids, None, Mode::Eval).unwrap();
    assert!(tape.is_empty());

    let mut tape = Tape::new();
    model.forward(&mut tape, &ids, None, Mode::Eval).unwrap();
    let ops = tape.summary();
    // embedding, then per block: ln, matmul, attention, matmul, add, ln, matmul+gelu, matmul, add;
    // then ln_f and the tied lm_head matmul
    assert_eq!(ops.len(), 1 + 9 * cfg.n_layer + 2);
    assert_eq!(ops[0], "embedding");
    assert_eq!(
        &ops[1..10],
        &["layernorm", "matmul", "attention", "matmul", "add", "layernorm", "matmul+gelu", "matmul", "add"]
    );
    assert_eq!(ops[ops.len() - 1], "matmul");

    // dropout adds a node per site only when training
    let mut tape = Tape::new();
    model.forward(&mut tape, &ids, None, Mode::Train { seed: 1 }).unwrap();
    assert_eq!(tape.len(), ops.len() + 1 + 2 * cfg.n_layer);
}
