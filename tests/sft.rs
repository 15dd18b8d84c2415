//! Supervised fine-tuning data: formats, loss masks, EOS, truncation, packing, batching, errors.

use kiln::data::sft::{batch, load_examples, tokenize, ChatTemplate, Format};
use kiln::data::tokenizer::{train_bpe, Tokenizer};
use kiln::ops::xent::IGNORE;
use std::path::{Path, PathBuf};

/// A small byte-level BPE trained on text this test writes (so ids are stable within a run).
fn tokenizer(dir: &Path) -> Tokenizer {
    let p = dir.join("corpus.txt");
    std::fs::write(&p, "the cat sat on the mat. what is two plus two? four. hello there, how are you?\n".repeat(50))
        .unwrap();
    train_bpe(&[p], 300, 2).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn each_format_masks_the_prompt_and_trains_the_completion_and_eos() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let eos = tok.eos_id();
    let chat = ChatTemplate::default();
    let cases = [
        (
            "pc.jsonl",
            r#"{"prompt": "what is two plus two? ", "completion": "four."}"#,
            "what is two plus two? ",
            "four.",
        ),
        (
            "alpaca.json",
            r#"[{"instruction": "what is two plus two?", "input": "", "output": "four."}]"#,
            "### Instruction:\nwhat is two plus two?\n\n### Response:\n",
            "four.",
        ),
        (
            "chat.jsonl",
            r#"{"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "how are you?"}]}"#,
            "<|user|>\nhello there\n<|assistant|>\n",
            "how are you?\n",
        ),
    ];
    for (name, text, prompt, completion) in cases {
        let ex = load_examples(&write(dir.path(), name, text), Format::Auto, &chat).unwrap();
        let d = tokenize(&ex, &tok, 256, eos, false).unwrap();
        let (ids, labels) = &d.rows[0];
        let (p, c) = (tok.encode(prompt).unwrap(), tok.encode(completion).unwrap());
        // prompt tokens may merge differently at the boundary when encoded apart, so compare as
        // the loader encodes: segment by segment
        assert_eq!(ids.len(), p.len() + c.len() + 1, "{name}");
        assert!(labels[..p.len()].iter().all(|&l| l == IGNORE), "{name}: the prompt must be masked");
        assert_eq!(
            &labels[p.len()..p.len() + c.len()],
            c.iter().map(|&x| x as i32).collect::<Vec<_>>().as_slice(),
            "{name}"
        );
        assert_eq!(*ids.last().unwrap(), eos.unwrap(), "{name}: EOS appended");
        assert_eq!(*labels.last().unwrap(), eos.unwrap() as i32, "{name}: EOS trained");
        assert_eq!(d.trained_tokens, c.len() + 1);
    }
}

#[test]
fn alpaca_input_field_and_multi_turn_chat() {
    let dir = tempfile::tempdir().unwrap();
    let chat = ChatTemplate::default();
    let ex = load_examples(
        &write(dir.path(), "a.jsonl", r#"{"instruction": "add", "input": "two and two", "output": "four"}"#),
        Format::Alpaca,
        &chat,
    )
    .unwrap();
    assert_eq!(ex[0][0].text, "### Instruction:\nadd\n\n### Input:\ntwo and two\n\n### Response:\n");
    let ex = load_examples(
        &write(
            dir.path(),
            "c.jsonl",
            r#"{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}, {"role": "assistant", "content": "bye"}]}"#,
        ),
        Format::Chat,
        &chat,
    )
    .unwrap();
    let trained: Vec<&str> = ex[0].iter().filter(|s| s.trained).map(|s| s.text.as_str()).collect();
    assert_eq!(trained, ["hello\n", "bye\n"], "every assistant turn, and only those, is trained");
}

#[test]
fn truncation_is_counted_and_a_prompt_that_fills_the_context_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let chat = ChatTemplate::default();
    let long = "the cat sat on the mat. ".repeat(30);
    let p = write(dir.path(), "t.jsonl", &format!("{{\"prompt\": \"hello \", \"completion\": \"{long}\"}}\n{{\"prompt\": \"hi\", \"completion\": \"four.\"}}\n"));
    let ex = load_examples(&p, Format::Auto, &chat).unwrap();
    let d = tokenize(&ex, &tok, 16, tok.eos_id(), false).unwrap();
    assert_eq!(d.rows[0].0.len(), 16);
    assert_eq!(d.truncated_examples, 1);
    assert!(d.truncated_tokens > 0);
    let p = write(dir.path(), "long.jsonl", &format!("{{\"prompt\": \"{long}\", \"completion\": \"four.\"}}\n"));
    let ex = load_examples(&p, Format::Auto, &chat).unwrap();
    let e = tokenize(&ex, &tok, 16, tok.eos_id(), false).unwrap_err().to_string();
    assert!(e.contains("example 1") && e.contains("prompt alone"), "{e}");
}

#[test]
fn packing_fills_rows_and_batches_pad_on_the_right() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path());
    let lines: String =
        (0..20).map(|_| "{\"prompt\": \"what is two plus two? \", \"completion\": \"four.\"}\n").collect();
    let ex = load_examples(&write(dir.path(), "p.jsonl", &lines), Format::Auto, &ChatTemplate::default()).unwrap();
    let plain = tokenize(&ex, &tok, 128, tok.eos_id(), false).unwrap();
    let packed = tokenize(&ex, &tok, 64, tok.eos_id(), true).unwrap();
    assert_eq!(plain.rows.len(), 20);
    assert!(packed.rows.len() < 20 && packed.rows.iter().all(|r| r.0.len() <= 64));
    let total = |d: &kiln::data::sft::SftData| d.rows.iter().map(|r| r.0.len()).sum::<usize>();
    assert_eq!(total(&plain), total(&packed), "packing keeps every token");
    assert_eq!(plain.trained_tokens, packed.trained_tokens);

    let rows: Vec<_> = plain.rows.iter().take(2).collect();
    let mut short = plain.rows[2].clone();
    short.0.truncate(3);
    short.1.truncate(3);
    let rows = [rows[0], rows[1], &short];
    let (ids, tgt) = batch(&rows, 0).unwrap();
    let t = ids.dims()[1];
    let (ids, tgt) = (ids.i32s().unwrap(), tgt.i32s().unwrap());
    assert_eq!(&ids[2 * t + 3..3 * t], vec![0; t - 3].as_slice(), "right padding");
    assert!(tgt[2 * t + 2..3 * t].iter().all(|&x| x == IGNORE), "no loss on padding or past the last token");
    assert_eq!(tgt[..t - 1], plain.rows[0].1[1..], "targets are the labels shifted by one");
}

#[test]
fn malformed_examples_name_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let chat = ChatTemplate::default();
    let cases: &[(&str, &[&str])] = &[
        ("{\"prompt\": \"a\", \"completion\": \"b\"}\n[1, 2]\n", &["line 2", "not a JSON object", "an array"]),
        ("{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\"}\n", &["line 2", "\"completion\""]),
        ("{\"prompt\": \"a\", \"completion\": \"b\"}\nnot json\n", &["line 2", "not valid JSON"]),
        ("{\"text\": \"a\"}\n", &["line 1", "cannot tell the format"]),
        ("{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\n", &["line 1", "unknown role \"robot\""]),
        ("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n", &["line 1", "no assistant message"]),
        ("{\"instruction\": 3, \"output\": \"b\"}\n", &["line 1", "\"instruction\" must be a string"]),
        ("", &["holds no examples"]),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let p = write(dir.path(), &format!("bad{i}.jsonl"), text);
        let e = load_examples(&p, Format::Auto, &chat).unwrap_err().to_string();
        for n in needles.iter() {
            assert!(e.contains(n), "case {i}: '{e}' should mention '{n}'");
        }
        assert!(e.contains(&format!("bad{i}.jsonl")), "the error names the file: {e}");
        assert!(e.contains("malformed data file") && !e.contains("config"), "a data file is not a config: {e}");
    }
}

/// An Alpaca file laid out as alpaca_en_demo.json is (a pretty-printed JSON array of
/// instruction / input / output records), written here from the built-in world: questions with
/// and without an input field, and long answers that a short context cuts.
fn alpaca_fixture(dir: &Path) -> (PathBuf, usize) {
    let world = kiln::data::synthetic::default_corpus(0).0;
    let records: Vec<serde_json::Value> = world
        .task()
        .iter()
        .take(30)
        .enumerate()
        .map(|(i, (q, a))| {
            let q = q.trim_start_matches("Q: ").trim_end_matches("\nA:");
            match i % 3 {
                0 => serde_json::json!({ "instruction": "Answer the question about the world.", "input": q, "output": a.trim() }),
                1 => serde_json::json!({ "instruction": q, "input": "", "output": a.trim() }),
                _ => serde_json::json!({ "instruction": q, "input": "", "output": world.corpus(i as u64, 1_000) }),
            }
        })
        .collect();
    let p = dir.join("alpaca.json");
    std::fs::write(&p, serde_json::to_string_pretty(&records).unwrap()).unwrap();
    (p, records.len())
}

#[test]
fn an_alpaca_file_loads() {
    let dir = tempfile::tempdir().unwrap();
    let (p, n) = alpaca_fixture(dir.path());
    let corpus = write(dir.path(), "world.txt", &kiln::data::synthetic::default_corpus(60_000).1);
    let tok = train_bpe(&[corpus], 400, 2).unwrap();
    let ex = load_examples(&p, Format::Auto, &ChatTemplate::default()).unwrap();
    assert_eq!(ex.len(), n);
    assert!(
        ex[0][0].text.starts_with("### Instruction:\nAnswer the question") && ex[0][0].text.contains("### Input:\n")
    );
    assert!(
        ex[1][0].text.starts_with("### Instruction:\nWhat is the job of ") && !ex[1][0].text.contains("### Input:")
    );
    let d = tokenize(&ex, &tok, 128, tok.eos_id(), false).unwrap();
    println!(
        "alpaca fixture: {} examples, {} trained tokens, {} cut to 128 tokens ({} tokens cut)",
        d.examples, d.trained_tokens, d.truncated_examples, d.truncated_tokens
    );
    assert_eq!(d.rows.len(), n);
    assert_eq!(d.truncated_examples, n / 3, "the long answers, and only they, are cut");
    assert!(d.rows.iter().all(|r| r.0.len() <= 128 && r.1.iter().any(|&l| l != IGNORE)));
}

#[path = "common/shared_data.rs"]
mod shared_data;

#[test]
#[ignore = "needs ../shared/data (Alpaca demo set, GPT-2 tokenizer): cargo test --release -- --ignored"]
fn the_shared_alpaca_set_loads() {
    let p = shared_data::shared_data("sft/alpaca_en_demo.json");
    let t = shared_data::shared_data("gpt2_tokenizer/tokenizer.json");
    let ex = load_examples(&p, Format::Auto, &ChatTemplate::default()).unwrap();
    assert_eq!(ex.len(), 999);
    let tok = Tokenizer::load(&t).unwrap();
    let d = tokenize(&ex, &tok, 512, tok.eos_id(), false).unwrap();
    println!(
        "alpaca: {} examples, {} trained tokens, {} cut to 512 tokens ({} tokens cut)",
        d.examples, d.trained_tokens, d.truncated_examples, d.truncated_tokens
    );
    assert_eq!(d.rows.len(), 999);
    assert!(d.rows.iter().all(|r| r.0.len() <= 512 && r.1.iter().any(|&l| l != IGNORE)));
}

/// The chatml template lays a conversation out as SmolLM2-Instruct's chat template does
/// (`<|im_start|>role\n` ... `<|im_end|>\n` per turn; that template also inserts a default system
/// message when a conversation has none, which kiln leaves to the data), training on each
/// assistant turn with its `<|im_end|>`; unknown names are refused with the list.
#[test]
fn chatml_template_lays_out_turns_as_smollm2_instruct() {
    let dir = tempfile::tempdir().unwrap();
    let chat = ChatTemplate::named("chatml").unwrap();
    let ex = load_examples(
        &write(
            dir.path(),
            "c.jsonl",
            r#"{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#,
        ),
        Format::Chat,
        &chat,
    )
    .unwrap();
    let text: String = ex[0].iter().map(|s| s.text.as_str()).collect();
    assert_eq!(
        text,
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    );
    let trained: Vec<&str> = ex[0].iter().filter(|s| s.trained).map(|s| s.text.as_str()).collect();
    assert_eq!(trained, ["hello<|im_end|>\n"]);
    assert_eq!(ChatTemplate::named("kiln").unwrap(), ChatTemplate::default());
    let e = ChatTemplate::named("llama3").unwrap_err().to_string();
    assert!(e.contains("llama3") && e.contains("chatml"), "{e}");
}
