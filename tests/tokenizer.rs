//! Tokenizer loading (tokenizer.json and GPT-2's vocab + merges pair agree id for id, on a BPE
//! trained here and, with ../shared/data, on GPT-2's own files) and byte-level BPE training
//! (vocabulary size as asked, exact round trips).

use kiln::data::tokenizer::{train_bpe, Tokenizer};
use std::path::{Path, PathBuf};

#[path = "common/shared_data.rs"]
mod shared_data;

/// GPT-2's tokenizer files (tokenizer.json, encoder.json, vocab.bpe) from the shared data.
fn gpt2_dir() -> PathBuf {
    for f in ["tokenizer.json", "encoder.json", "vocab.bpe"] {
        shared_data::shared_data(&format!("gpt2_tokenizer/{f}"));
    }
    shared_data::shared_data("gpt2_tokenizer")
}

const SAMPLES: &[&str] = &[
    "Hello world",
    "héllo wörld, naïve café: 日本語のテキスト 🦀🦀 Ω≈ç√",
    "a  b\t\tc\n\n\n   d    \r\n e\u{a0}f  ",
    "<|endoftext|>",
    "first document<|endoftext|>second one",
    "I'll say they've done it, don't you think? 1234567 + 89 = 1234656",
    "    def f(x):\n        return x  # comment\n",
];

/// A byte-level BPE trained here by kiln on its built-in corpus and this file's pseudo-text,
/// written in each layout GPT-2's tokenizer comes in: tokenizer.json, Hugging Face's vocab.json +
/// merges.txt and OpenAI's encoder.json + vocab.bpe. The pair is taken from tokenizer.json's
/// model section as text, so the pair loader is checked against an independent reading.
fn trained_gpt2_layout(dir: &Path, vocab_size: usize) -> PathBuf {
    let corpus = dir.join("corpus.txt");
    let (_, world) = kiln::data::synthetic::default_corpus(80_000);
    std::fs::write(&corpus, world + &generated_text(4, 4_000)).unwrap();
    let tok = train_bpe(&[corpus], vocab_size, 2).unwrap();
    let out = dir.join("trained");
    std::fs::create_dir_all(&out).unwrap();
    tok.save(&out.join("tokenizer.json")).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer.json")).unwrap()).unwrap();
    let vocab = json["model"]["vocab"].to_string();
    // merges are "a b" strings or ["a", "b"] pairs, depending on the tokenizers version
    let merges: Vec<String> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => s.clone(),
            pair => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
        })
        .collect();
    assert!(merges.len() > 500, "the fixture learned {} merges", merges.len());
    let merges = format!("#version: 0.2\n{}\n", merges.join("\n"));
    for (v, m) in [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")] {
        std::fs::write(out.join(v), &vocab).unwrap();
        std::fs::write(out.join(m), &merges).unwrap();
    }
    out
}

/// The tokenizer.json in `dir` and the encoder.json + vocab.bpe pair beside it give the same ids
/// on every sample and decode them back; returns the tokenizer.json one.
fn check_pair_matches_tokenizer_json(dir: &Path, vocab_size: usize, eos: u32) -> Tokenizer {
    let json = Tokenizer::load(dir).unwrap();
    let by_vocab = Tokenizer::load(&dir.join("encoder.json")).unwrap();
    let by_merges = Tokenizer::load(&dir.join("vocab.bpe")).unwrap();
    assert_eq!(json.vocab_size(), vocab_size);
    assert_eq!(by_vocab.vocab_size(), vocab_size);
    assert_eq!(json.eos_id(), Some(eos));
    assert_eq!(by_vocab.eos_id(), Some(eos));
    for s in SAMPLES {
        let want = json.encode(s).unwrap();
        assert_eq!(by_vocab.encode(s).unwrap(), want, "ids differ on {s:?}");
        assert_eq!(by_merges.encode(s).unwrap(), want, "ids differ on {s:?}");
        assert_eq!(by_vocab.decode(&want).unwrap(), *s);
        assert_eq!(json.decode(&want).unwrap(), *s);
    }
    assert_eq!(by_vocab.encode("<|endoftext|>").unwrap(), vec![eos]);
    json
}

/// vocab.json + merges.txt (Hugging Face's names) copied from `dir`'s OpenAI-named pair load as a
/// directory and, saved as tokenizer.json, reload to the same ids; returns the pair.
fn check_pair_under_hugging_face_names(dir: &Path) -> Tokenizer {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("encoder.json"), tmp.path().join("vocab.json")).unwrap();
    std::fs::copy(dir.join("vocab.bpe"), tmp.path().join("merges.txt")).unwrap();
    let pair = Tokenizer::load(tmp.path()).unwrap();
    pair.save(&tmp.path().join("tokenizer.json")).unwrap();
    let saved = Tokenizer::load(&tmp.path().join("tokenizer.json")).unwrap();
    for s in SAMPLES {
        assert_eq!(saved.encode(s).unwrap(), pair.encode(s).unwrap());
    }
    pair
}

#[test]
fn trained_pair_matches_tokenizer_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = trained_gpt2_layout(tmp.path(), 1000);
    let json = check_pair_matches_tokenizer_json(&dir, 1000, 0);
    // the merges are in use: the corpus's text takes far fewer tokens than bytes
    let text = kiln::data::synthetic::default_corpus(5_000).1;
    let ids = json.encode(&text).unwrap();
    assert!(ids.len() * 3 < text.len(), "{} tokens for {} bytes", ids.len(), text.len());
    assert_eq!(Tokenizer::load(&dir.join("vocab.bpe")).unwrap().encode(&text).unwrap(), ids);
}

#[test]
fn trained_pair_under_hugging_face_names() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = trained_gpt2_layout(tmp.path(), 1000);
    let pair = check_pair_under_hugging_face_names(&dir);
    let json = Tokenizer::load(&dir.join("tokenizer.json")).unwrap();
    assert_eq!(Tokenizer::load(&dir.join("vocab.json")).unwrap().vocab_size(), 1000);
    for s in SAMPLES {
        assert_eq!(pair.encode(s).unwrap(), json.encode(s).unwrap(), "ids differ on {s:?}");
    }
}

#[test]
#[ignore = "needs ../shared/data (GPT-2 tokenizer): cargo test --release -- --ignored"]
fn gpt2_pair_matches_tokenizer_json() {
    let json = check_pair_matches_tokenizer_json(&gpt2_dir(), 50257, 50256);
    assert_eq!(json.encode("Hello world").unwrap(), vec![15496, 995]);
}

#[test]
#[ignore = "needs ../shared/data (GPT-2 tokenizer): cargo test --release -- --ignored"]
fn gpt2_pair_under_hugging_face_names() {
    let pair = check_pair_under_hugging_face_names(&gpt2_dir());
    assert_eq!(pair.encode("Hello world").unwrap(), vec![15496, 995]);
}

#[test]
fn load_errors_say_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = Tokenizer::load(tmp.path()).err().unwrap().to_string();
    assert!(empty.contains("tokenizer.json") && empty.contains("merges.txt"), "{empty}");

    std::fs::write(tmp.path().join("vocab.json"), r#"{"a": 0, "b": 1, "ab": 2}"#).unwrap();
    let half = Tokenizer::load(&tmp.path().join("vocab.json")).err().unwrap().to_string();
    assert!(half.contains("merges.txt") && half.contains("missing"), "{half}");

    std::fs::write(tmp.path().join("merges.txt"), "#version: 0.2\na b\nthree tokens here\n").unwrap();
    let bad = Tokenizer::load(tmp.path()).err().unwrap().to_string();
    assert!(bad.contains("line 3"), "{bad}");

    std::fs::write(tmp.path().join("merges.txt"), "a b\na c\n").unwrap();
    let unknown = Tokenizer::load(tmp.path()).err().unwrap().to_string();
    assert!(unknown.contains("does not fit the vocabulary"), "{unknown}");

    let missing = Tokenizer::load(&tmp.path().join("nope.json")).err().unwrap().to_string();
    assert!(missing.contains("nope.json"), "{missing}");
}

/// Deterministic pseudo-text: words from syllables, some punctuation, numbers and non-ASCII.
fn generated_text(seed: u64, words: usize) -> String {
    const SYL: &[&str] = &["ka", "lo", "mi", "ten", "ra", "su", "vo", "pel", "an", "dri", "qu", "é", "ß", "ño"];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut s = String::new();
    for i in 0..words {
        let n = 1 + next() % 3;
        for _ in 0..n {
            s.push_str(SYL[(next() % SYL.len() as u64) as usize]);
        }
        s.push_str(match next() % 12 {
            0 => ". ",
            1 => ", ",
            2 => "\n",
            3 => "  ",
            4 => "\n\n",
            _ => " ",
        });
        if i % 97 == 0 {
            s.push_str(&format!("{} ", next() % 10_000));
        }
    }
    s
}

#[test]
fn trained_bpe_has_the_asked_size_and_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.txt");
    let b = tmp.path().join("b.jsonl");
    std::fs::write(&a, generated_text(1, 20_000)).unwrap();
    let doc = serde_json::json!({ "text": generated_text(2, 5_000) });
    std::fs::write(&b, format!("{doc}\n{doc}\n")).unwrap();
    let tok = train_bpe(&[a, b], 600, 2).unwrap();
    assert_eq!(tok.vocab_size(), 600);
    assert_eq!(tok.eos_id(), Some(0));

    let mut probes = vec![generated_text(3, 2_000)];
    probes.extend(SAMPLES.iter().map(|s| s.to_string()));
    probes.push("\u{0}\u{1f}\u{7f} bytes never seen in training: Ж ✓ 🦀".into());
    for s in &probes {
        let ids = tok.encode(s).unwrap();
        assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
        assert_eq!(&tok.decode(&ids).unwrap(), s);
    }
    // Merges were learned: common text takes fewer tokens than bytes.
    let text = generated_text(3, 2_000);
    assert!(tok.encode(&text).unwrap().len() * 2 < text.len());

    let path = tmp.path().join("tokenizer.json");
    tok.save(&path).unwrap();
    let back = Tokenizer::load(&path).unwrap();
    for s in &probes {
        assert_eq!(back.encode(s).unwrap(), tok.encode(s).unwrap());
    }
}

#[test]
fn train_rejects_small_vocab_and_empty_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("a.txt");
    std::fs::write(&f, "some text").unwrap();
    let small = train_bpe(std::slice::from_ref(&f), 256, 2).err().unwrap().to_string();
    assert!(small.contains("257"), "{small}");

    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let msg = train_bpe(&[empty], 300, 2).err().unwrap().to_string();
    assert!(msg.contains("no text"), "{msg}");

    let latin1 = tmp.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9").unwrap();
    let msg = train_bpe(&[f, latin1], 300, 2).err().unwrap().to_string();
    assert!(msg.contains("latin1.txt") && msg.contains("byte offset 3"), "{msg}");
}
