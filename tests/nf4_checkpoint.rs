//! Pre-quantized checkpoints, through the binary: `kiln quantize --out DIR` writes a checkpoint
//! directory whose NF4 weights `kiln eval` and `generate` read dequantized (the loss and the
//! tokens equal those of the model holding the dequantized values) and `finetune --method qlora`
//! takes as its NF4 base (the same codes as quantizing the f32 model on the fly, so the same
//! losses); broken NF4 parts are refused by name.

mod common;

use common::cli::kiln;

use common::sft::{base_model, losses};
use kiln::data::batch::Batch;
use kiln::io::checkpoint::{load_all, load_model, load_nf4_base, save_model};
use kiln::model::{Mode, Model};
use kiln::quant::nf4::{quantize_nf4, NF4_BLOCKSIZE};
use kiln::{DType, Tape, Tensor};
use std::path::{Path, PathBuf};

/// Runs kiln, asserts success and returns stdout.
fn ok(args: &[&str]) -> String {
    let o = kiln(args);
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "kiln {args:?} failed:\n{out}\n{err}");
    out.into_owned()
}

/// Runs kiln, asserts exit code 1 and one `error:` line holding every needle; returns stderr.
fn fails(args: &[&str], needles: &[&str]) -> String {
    let o = kiln(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "kiln {args:?} should fail: {err}");
    assert!(err.starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "'{err}' should mention '{n}'");
    }
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The model with every 2-D weight replaced by its NF4 round trip (block size 64, absmax
/// double-quantized or not), as `kiln quantize` computes it.
fn dequantized_twin(model: &Model, double_quant: bool, only: impl Fn(&str) -> bool) -> Model {
    let mut twin = model.clone();
    for p in twin.params.iter_mut().filter(|p| p.tensor.dims().len() == 2 && only(&p.name)) {
        let q = quantize_nf4(p.tensor.f32s().unwrap(), NF4_BLOCKSIZE).unwrap();
        let v = if double_quant {
            q.dequantize_with(&q.double_quant()).unwrap()
        } else {
            kiln::quant::nf4::dequantize_nf4(&q)
        };
        p.tensor = Tensor::from_f32(v, p.tensor.dims()).unwrap();
    }
    twin
}

fn batch_file(dir: &Path, vocab: usize) -> PathBuf {
    let ids: Vec<i32> = (0..2 * 24).map(|i| (i * 37 + 11) % vocab as i32).collect();
    let p = dir.join("batch.safetensors");
    kiln::io::safetensors::save(&p, &[("input_ids".into(), Tensor::from_i32(ids, [2, 24]).unwrap())], &[]).unwrap();
    p
}

fn loss_line(stdout: &str) -> String {
    stdout.split_whitespace().nth(1).unwrap_or_else(|| panic!("no loss in {stdout:?}")).to_string()
}

#[test]
fn eval_and_generate_read_a_quantized_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let (f32_dir, q_dir) = (tmp.path().join("f32"), tmp.path().join("nf4"));
    ok(&["init", "--preset", "tiny", "--out", s(&f32_dir), "--seed", "3"]);
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, kiln::data::synthetic::default_corpus(30_000).1).unwrap();
    kiln::data::tokenizer::train_bpe(&[corpus], 300, 2).unwrap().save(&f32_dir.join("tokenizer.json")).unwrap();
    let said = ok(&["quantize", "--in", s(&f32_dir), "--out", s(&q_dir), "--double-quant"]);
    assert!(said.contains("quantized 18 matrices"), "{said}");
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(q_dir.join(f).is_file(), "{f} is missing from the quantized checkpoint");
    }
    assert_eq!(std::fs::read(q_dir.join("config.json")).unwrap(), std::fs::read(f32_dir.join("config.json")).unwrap());

    // the loaded weights are the dequantized values, bit for bit (embeddings included)
    let f32_model = load_model(&f32_dir).unwrap();
    let twin = dequantized_twin(&f32_model, true, |_| true);
    let loaded = load_model(&q_dir).unwrap();
    assert!(loaded.nf4.is_none(), "eval and generate get plain f32 weights");
    for p in twin.params.iter() {
        let got = loaded.params.get(&p.name).unwrap();
        assert_eq!(got.f32s().unwrap(), p.tensor.f32s().unwrap(), "{} differs from its NF4 round trip", p.name);
    }

    // kiln eval prints the loss of the dequantized model, not the f32 one
    let batch = batch_file(tmp.path(), 512);
    let b = Batch::load(&batch).unwrap();
    let loss = |m: &Model| {
        let out = m.forward(&mut Tape::inference(), &b.input_ids, Some(&b.targets().unwrap()), Mode::Eval).unwrap();
        format!("{:.6}", out.loss.unwrap().item().unwrap())
    };
    let q_loss = loss_line(&ok(&["eval", "--model", s(&q_dir), "--batch", s(&batch)]));
    let f_loss = loss_line(&ok(&["eval", "--model", s(&f32_dir), "--batch", s(&batch)]));
    println!("eval: f32 {f_loss}, NF4 {q_loss}");
    assert_eq!(q_loss, loss(&twin));
    assert_eq!(f_loss, loss(&f32_model));
    assert_ne!(q_loss, f_loss, "the check must tell the quantized model from the f32 one");

    // kiln generate (sampled, so every probability matters): the same tokens as from a plain
    // checkpoint holding the dequantized weights
    let twin_dir = tmp.path().join("twin");
    save_model(&twin, &twin_dir, DType::F32).unwrap();
    let sample = |m: &Path| {
        let ids = "5,17,230";
        ok(&[
            "generate",
            "--model",
            s(m),
            "--prompt-ids",
            ids,
            "--max-new-tokens",
            "40",
            "--ignore-eos",
            "--do-sample",
            "--seed",
            "7",
        ])
    };
    let (from_q, from_twin, from_f32) = (sample(&q_dir), sample(&twin_dir), sample(&f32_dir));
    println!("generate: NF4 {}\n          f32 {}", from_q.trim(), from_f32.trim());
    assert_eq!(from_q, from_twin);
    assert_ne!(from_q, from_f32, "the check must tell the quantized model from the f32 one");
    // a text prompt goes through the tokenizer copied beside the weights
    ok(&["generate", "--model", s(&q_dir), "--prompt", "Where does", "--max-new-tokens", "4"]);
}

/// (step, loss) of a short QLoRA run from `model` through the binary.
fn qlora_losses(model: &Path, data: &Path, out: &Path) -> Vec<(usize, f64)> {
    let said = ok(&[
        "finetune",
        "--model",
        s(model),
        "--data",
        s(data),
        "--method",
        "qlora",
        "--max-steps",
        "4",
        "--out",
        s(out),
        "--set",
        "train.batch_size=8",
        "--set",
        "train.log_every=1",
        "--set",
        "train.eval_every=0",
    ]);
    assert!(said.contains("qlora: 8 base layers in NF4"), "{said}");
    let l = losses(out);
    assert_eq!(l.len(), 4, "{said}");
    l
}

#[test]
fn qlora_from_a_quantized_checkpoint_trains_as_from_the_f32_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, base) = base_model(tmp.path(), 64);
    let data = tmp.path().join("task.jsonl");

    // Conv1D weights stored in NF4 (single and double-quantized absmax) load as the same codes
    // that QLoRA's on-the-fly quantization of the f32 base gives
    let mut fly = load_model(&base).unwrap();
    fly.quantize_nf4(NF4_BLOCKSIZE).unwrap();
    for dq in [false, true] {
        let q = tmp.path().join(format!("keep-{dq}"));
        let mut args = vec!["quantize", "--in", s(&base), "--out", s(&q), "--keep-embeddings"];
        if dq {
            args.push("--double-quant");
        }
        let said = ok(&args);
        assert!(said.contains("quantized 8 matrices"), "{said}");
        let mut pre = load_nf4_base(&q).unwrap();
        assert_eq!(pre.nf4.as_ref().map(|m| m.len()), Some(8), "the Conv1D weights stay NF4");
        assert!(pre.params.iter().all(|p| !p.trainable));
        pre.quantize_nf4(NF4_BLOCKSIZE).unwrap();
        assert_eq!(pre.nf4, fly.nf4, "double_quant {dq}: NF4 codes or absmax differ from on-the-fly QLoRA");
        for p in fly.params.iter() {
            assert_eq!(pre.params.get(&p.name).unwrap().f32s().unwrap(), p.tensor.f32s().unwrap(), "{}", p.name);
        }
    }

    // and so the runs agree loss for loss
    let from_f32 = qlora_losses(&base, &data, &tmp.path().join("run-f32"));
    let from_q = qlora_losses(&tmp.path().join("keep-true"), &data, &tmp.path().join("run-q"));
    println!("qlora losses from f32: {from_f32:?}\nfrom NF4 (embeddings kept): {from_q:?}");
    assert_eq!(from_q, from_f32);

    // With the embeddings quantized too, QLoRA trains on their dequantized values (frozen, f32):
    // the run equals one from the f32 base whose wte and wpe hold those values.
    let all = tmp.path().join("all");
    ok(&["quantize", "--in", s(&base), "--out", s(&all)]);
    let twin_dir = tmp.path().join("twin");
    let twin = dequantized_twin(&load_model(&base).unwrap(), false, |n| n.contains(".wte.") || n.contains(".wpe."));
    save_model(&twin, &twin_dir, DType::F32).unwrap();
    std::fs::copy(base.join("tokenizer.json"), twin_dir.join("tokenizer.json")).unwrap();
    let from_all = qlora_losses(&all, &data, &tmp.path().join("run-all"));
    let from_twin = qlora_losses(&twin_dir, &data, &tmp.path().join("run-twin"));
    println!("from NF4 (embeddings quantized): {from_all:?}");
    assert_eq!(from_all, from_twin);
    assert_ne!(from_all, from_f32, "quantized embeddings change the base");
}

#[test]
fn broken_or_misplaced_quantized_checkpoints_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (f32_dir, q_dir) = (tmp.path().join("f32"), tmp.path().join("nf4"));
    ok(&["init", "--preset", "tiny", "--out", s(&f32_dir)]);
    let batch = batch_file(tmp.path(), 512);

    // a directory --out needs a checkpoint directory --in; a refused run leaves nothing behind
    let file_in = f32_dir.join("model.safetensors");
    fails(&["quantize", "--in", s(&file_in), "--out", s(&q_dir)], &["config.json", "--out FILE.safetensors"]);
    fails(&["quantize", "--in", s(&f32_dir), "--out", s(&q_dir), "--blocksize", "48"], &["block size 48"]);
    assert!(!q_dir.exists(), "a failed quantize leaves no directory");
    ok(&["quantize", "--in", s(&f32_dir), "--out", s(&q_dir)]);
    fails(&["quantize", "--in", s(&f32_dir), "--out", s(&q_dir)], &["already holds a checkpoint", "--overwrite"]);
    ok(&["quantize", "--in", s(&f32_dir), "--out", s(&q_dir), "--overwrite", "--double-quant"]);
    fails(&["quantize", "--in", s(&q_dir), "--out", s(&tmp.path().join("again"))], &["already quantized"]);
    // a file --out still writes one file, which is not a checkpoint directory
    let one = tmp.path().join("one.safetensors");
    ok(&["quantize", "--in", s(&f32_dir), "--out", s(&one)]);
    assert!(one.is_file());

    // each broken part is refused, naming the tensor and the problem
    let name = "transformer.h.1.mlp.c_fc.weight";
    let good = load_all(&q_dir.join("model.safetensors")).unwrap();
    let cases: Vec<(&str, Edit, &[&str])> = vec![
        (
            "quant map",
            Box::new(|t| set(t, &format!("{name}.quant_map"), Tensor::from_f32(vec![0.5; 16], [16]).unwrap())),
            &["quant_map is not the NF4 table"],
        ),
        (
            "absmax gone",
            Box::new(|t| t.retain(|(n, _)| *n != format!("{name}.absmax"))),
            &["'transformer.h.1.mlp.c_fc.weight.absmax' is missing"],
        ),
        (
            "short codes",
            Box::new(|t| set(t, name, Tensor::from_u8(vec![0; 64], [64, 1]).unwrap())),
            &["expected U8 with 32768 elements"],
        ),
        ("fp4", Box::new(|t| state(t, name, |s| s.replace("\"nf4\"", "\"fp4\""))), &["quant_type", "fp4"]),
        (
            "shape",
            Box::new(|t| state(t, name, |s| s.replace("[128, 512]", "[512, 128]"))),
            &["[512, 128]", "config.json implies [128, 512]"],
        ),
        (
            "offset",
            Box::new(|t| state(t, name, |s| s.split(", \"nested_offset\"").next().unwrap().to_string() + "}")),
            &["nested_offset"],
        ),
        (
            "not json",
            Box::new(|t| {
                set(t, &format!("{name}.quant_state.bitsandbytes__nf4"), Tensor::from_u8(vec![0xff; 4], [4]).unwrap())
            }),
            &["quant state is not a JSON object"],
        ),
        (
            "nan",
            Box::new(|t| set(t, &format!("{name}.nested_absmax"), Tensor::from_f32(vec![f32::NAN; 4], [4]).unwrap())),
            &["non-finite"],
        ),
    ];
    for (what, edit, needles) in cases {
        let mut t: Vec<(String, Tensor)> = good.iter().map(|(n, t)| (n.clone(), t.clone())).collect();
        edit(&mut t);
        let dir = tmp.path().join(what.replace(' ', "-"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(q_dir.join("config.json"), dir.join("config.json")).unwrap();
        kiln::io::safetensors::save(&dir.join("model.safetensors"), &t, &[]).unwrap();
        let err = fails(&["eval", "--model", s(&dir), "--batch", s(&batch)], needles);
        assert!(err.contains(name), "{what}: {err}");
        assert!(load_nf4_base(&dir).is_err(), "{what}");
    }
}

/// A change to a checkpoint's tensors.
type Edit<'a> = Box<dyn Fn(&mut Vec<(String, Tensor)>) + 'a>;

fn set(t: &mut [(String, Tensor)], name: &str, v: Tensor) {
    t.iter_mut().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1 = v;
}

fn state(t: &mut [(String, Tensor)], name: &str, f: impl Fn(&str) -> String) {
    let key = format!("{name}.quant_state.bitsandbytes__nf4");
    let (_, v) = t.iter_mut().find(|(n, _)| *n == key).unwrap();
    let text = f(std::str::from_utf8(v.u8s().unwrap()).unwrap());
    let len = text.len();
    *v = Tensor::from_u8(text.into_bytes(), [len]).unwrap();
}
