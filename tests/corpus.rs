//! Corpora: input expansion, token files (ids equal the tokenizer's plus EOS per document, at
//! u16 and u32 widths, big documents cut into parallel pieces), every bad-input error, and the
//! window samplers (epoch blocks and random offsets): coverage, order and exact resume.

use kiln::data::corpus::*;
use kiln::data::tokenizer::{train_bpe, Tokenizer};
use std::path::{Path, PathBuf};

/// Deterministic text with the whitespace shapes that matter to GPT-2's split regex: runs of
/// spaces and newlines, indented lines, trailing spaces, CRLF, tabs, non-ASCII.
fn text(seed: u64, words: usize) -> String {
    const WORDS: &[&str] =
        &["the", "kiln", "fires", "clay", "at", "1200", "degrees", "naïve", "日本", "🦀", "it's", "--"];
    const SEPS: &[&str] = &[" ", " ", " ", ", ", ".\n", "\n\n", "\n ", "\n  ", "  \n", " \r\n", "\t", "\n", ". "];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as usize
    };
    let mut s = String::new();
    for _ in 0..words {
        s.push_str(WORDS[next() % WORDS.len()]);
        s.push_str(SEPS[next() % SEPS.len()]);
    }
    s
}

fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, contents).unwrap();
    p
}

fn small_tokenizer(dir: &Path) -> Tokenizer {
    let f = write(dir, "train/tok.txt", text(7, 20_000));
    train_bpe(&[f], 300, 2).unwrap()
}

/// What a token file built from `docs` must hold: each document's ids, then EOS.
fn expected(tok: &Tokenizer, docs: &[String]) -> Vec<u32> {
    let mut ids = Vec::new();
    for d in docs.iter().filter(|d| !d.is_empty()) {
        ids.extend(tok.encode(d).unwrap());
        ids.extend(tok.eos_id());
    }
    ids
}

fn err<T>(r: kiln::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn expand_inputs_files_globs_and_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let a = write(d, "a.txt", "a");
    write(d, "dir/z.txt", "z");
    write(d, "dir/sub/b.jsonl", "{}");
    write(d, "dir/c.txt", "c");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let got = expand_inputs(&[s(&d.join("dir")), s(&a), s(&d.join("*.txt")), s(&d.join("dir/*.txt"))]).unwrap();
    let want: Vec<PathBuf> = ["dir/c.txt", "dir/sub/b.jsonl", "dir/z.txt", "a.txt"].iter().map(|n| d.join(n)).collect();
    assert_eq!(got, want, "directories sorted and recursive, duplicates once");

    let pattern = s(&d.join("*.parquet"));
    let msg = err(expand_inputs(std::slice::from_ref(&pattern)));
    assert!(msg.contains(&pattern) && msg.contains("matches no files"), "{msg}");
    let msg = err(expand_inputs(&[s(&d.join("missing.txt"))]));
    assert!(msg.contains("missing.txt"), "{msg}");
}

#[test]
fn token_file_holds_the_tokenizer_ids_plus_eos() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let tok = small_tokenizer(d);
    // One document bigger than several pieces, so a single file is cut and tokenized in parallel.
    let docs = vec![text(1, 3_000), String::new(), text(2, 4 * CHUNK_BYTES / 5), "x".to_string()];
    let files: Vec<PathBuf> = docs.iter().enumerate().map(|(i, t)| write(d, &format!("c/{i}.txt"), t)).collect();
    let out = d.join("corpus.tok");
    let tf = build_token_file(&files, &tok, &out, false).unwrap();
    let want = expected(&tok, &docs);
    assert_eq!(tf.len(), want.len());
    assert_eq!(tf.vocab_size(), 300);
    assert!(!tf.is_empty());
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 32 + 2 * want.len() as u64, "u16 ids after a 32-byte header");
    assert_eq!(tf.tokens(0..tf.len()), want);
    assert_eq!(tf.tokens(5..9), want[5..9]);
    assert_eq!(TokenFile::open(&out).unwrap().tokens(0..tf.len()), want);
}

/// A token file built with `tok` from documents that span several parallel pieces and hold an
/// inline `<|endoftext|>` equals encode + EOS per document.
fn check_token_file_matches_encode(tok: &Tokenizer, vocab_size: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let docs = vec![text(3, 3 * CHUNK_BYTES / 4), text(4, 500) + "<|endoftext|> inline", text(5, 100)];
    let eos = tok.eos_id().unwrap();
    let inline = tok.encode(&docs[1]).unwrap();
    assert!(inline[..inline.len() - 1].contains(&eos), "an inline <|endoftext|> is the special token");
    let files: Vec<PathBuf> = docs.iter().enumerate().map(|(i, t)| write(tmp.path(), &format!("{i}.txt"), t)).collect();
    let tf = build_token_file(&files, tok, &tmp.path().join("g.tok"), false).unwrap();
    assert_eq!(tf.vocab_size(), vocab_size);
    assert_eq!(tf.tokens(0..tf.len()), expected(tok, &docs));
}

#[test]
fn trained_token_file_matches_encode() {
    // A BPE trained by kiln on its built-in corpus, loaded as GPT-2's pair is: vocab.json + merges.txt
    let tmp = tempfile::tempdir().unwrap();
    let corpus = write(tmp.path(), "world.txt", kiln::data::synthetic::default_corpus(60_000).1 + &text(11, 2_000));
    let tok = train_bpe(&[corpus], 800, 2).unwrap();
    tok.save(&tmp.path().join("tokenizer.json")).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("tokenizer.json")).unwrap()).unwrap();
    let merges: Vec<String> = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            m.as_str()
                .map(String::from)
                .unwrap_or_else(|| format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap()))
        })
        .collect();
    write(tmp.path(), "pair/vocab.json", json["model"]["vocab"].to_string());
    write(tmp.path(), "pair/merges.txt", format!("#version: 0.2\n{}\n", merges.join("\n")));
    let pair = Tokenizer::load(&tmp.path().join("pair")).unwrap();
    assert_eq!(pair.encode(&text(12, 300)).unwrap(), tok.encode(&text(12, 300)).unwrap());
    assert!(tok.vocab_size() > 600, "{} tokens", tok.vocab_size());
    assert_eq!(pair.vocab_size(), tok.vocab_size());
    check_token_file_matches_encode(&pair, tok.vocab_size());
}

#[path = "common/shared_data.rs"]
mod shared_data;

#[test]
#[ignore = "needs ../shared/data (GPT-2 tokenizer): cargo test --release -- --ignored"]
fn gpt2_token_file_matches_encode() {
    let tok = Tokenizer::load(&shared_data::shared_data("gpt2_tokenizer/tokenizer.json")).unwrap();
    check_token_file_matches_encode(&tok, 50257);
}

/// A byte-level tokenizer whose ids start at 70,000, so the token file needs u32 ids.
fn wide_tokenizer(dir: &Path) -> Tokenizer {
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet().into_iter().collect();
    alphabet.sort();
    let mut vocab: serde_json::Map<String, serde_json::Value> =
        alphabet.iter().enumerate().map(|(i, c)| (c.to_string(), (70_000 + i).into())).collect();
    vocab.insert("<|endoftext|>".into(), 80_000.into());
    write(dir, "wide/vocab.json", serde_json::to_string(&vocab).unwrap());
    write(dir, "wide/merges.txt", "#version: 0.2\n");
    Tokenizer::load(&dir.join("wide")).unwrap()
}

#[test]
fn wide_vocabulary_uses_u32_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = wide_tokenizer(tmp.path());
    assert_eq!(tok.eos_id(), Some(80_000));
    let docs = vec![text(6, 200), "ünïcode 🦀".to_string()];
    let files: Vec<PathBuf> = docs.iter().enumerate().map(|(i, t)| write(tmp.path(), &format!("{i}.txt"), t)).collect();
    let out = tmp.path().join("wide.tok");
    let tf = build_token_file(&files, &tok, &out, false).unwrap();
    let want = expected(&tok, &docs);
    assert_eq!(want.len(), docs.iter().map(|d| d.len() + 1).sum::<usize>(), "one id per byte, plus EOS");
    assert_eq!(tf.vocab_size(), 80_001);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 32 + 4 * want.len() as u64);
    assert_eq!(tf.tokens(0..tf.len()), want);
    let msg = err(check_vocab(&tf, 50257));
    assert!(msg.contains("tokenizer vocabulary 80001 does not fit the model's vocab_size 50257"), "{msg}");
    check_vocab(&tf, 80_001).unwrap();
}

#[test]
fn jsonl_and_json_documents() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let tok = small_tokenizer(d);
    let docs = vec![text(8, 50), "second\nwith \"quotes\"".to_string(), text(9, 30)];
    let lines: Vec<String> = docs.iter().map(|t| serde_json::json!({ "text": t, "id": 1 }).to_string()).collect();
    let jsonl = write(d, "a.jsonl", format!("{}\n\n{}\n{}\n", lines[0], lines[1], lines[2]));
    let array = write(d, "b.json", serde_json::json!([{ "text": docs[2] }, { "text": docs[0] }]).to_string());
    assert_eq!(read_documents(&jsonl).unwrap(), docs);
    let tf = build_token_file(&[jsonl, array], &tok, &d.join("j.tok"), false).unwrap();
    let all = [docs.clone(), vec![docs[2].clone(), docs[0].clone()]].concat();
    assert_eq!(tf.tokens(0..tf.len()), expected(&tok, &all));
}

#[test]
fn bad_inputs_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let tok = small_tokenizer(d);
    let out = d.join("out.tok");

    let empty = write(d, "empty.txt", "");
    let msg = err(build_token_file(&[empty], &tok, &out, false));
    assert!(msg.contains("empty"), "{msg}");
    assert!(!out.exists(), "no token file is left behind by a failed build");

    let latin1 = write(d, "latin1.txt", b"line one\ncaf\xe9 au lait");
    let msg = err(build_token_file(&[latin1], &tok, &out, false));
    assert!(msg.contains("latin1.txt") && msg.contains("byte offset 12") && msg.contains("UTF-8"), "{msg}");

    let no_text = write(d, "bad.jsonl", "{\"text\": \"fine\"}\n{\"body\": \"no text\"}\n");
    let msg = err(build_token_file(&[no_text], &tok, &out, false));
    assert!(msg.contains("bad.jsonl") && msg.contains("line 2") && msg.contains("\"text\""), "{msg}");
    let not_object = write(d, "list.jsonl", "[1, 2]\n");
    let msg = err(read_documents(&not_object));
    assert!(msg.contains("line 1") && msg.contains("not a JSON object"), "{msg}");
    let not_string = write(d, "num.jsonl", "{\"text\": 3}\n");
    assert!(err(read_documents(&not_string)).contains("not a string"));

    let msg = err(build_token_file(&[], &tok, &out, false));
    assert!(msg.contains("no input files"), "{msg}");
}

#[test]
fn damaged_token_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let tok = small_tokenizer(d);
    let src = write(d, "a.txt", text(10, 100));
    let good = d.join("good.tok");
    build_token_file(&[src], &tok, &good, false).unwrap();
    let bytes = std::fs::read(&good).unwrap();

    let cut = write(d, "cut.tok", &bytes[..bytes.len() - 1]);
    let msg = err(TokenFile::open(&cut));
    assert!(msg.contains("cut.tok") && msg.contains("truncated"), "{msg}");
    let stub = write(d, "stub.tok", &bytes[..20]);
    assert!(err(TokenFile::open(&stub)).contains("truncated"));
    let mut wrong = bytes.clone();
    wrong[..8].copy_from_slice(b"NOTKILN!");
    let wrong = write(d, "wrong.tok", wrong);
    assert!(err(TokenFile::open(&wrong)).contains("not a kiln token file"));
    let msg = err(TokenFile::open(&d.join("absent.tok")));
    assert!(msg.contains("absent.tok"), "{msg}");
}

/// A token file of ids 0..n (written by hand from the documented layout), so a window's ids
/// are its own offsets.
fn counting_file(dir: &Path, n: u32) -> TokenFile {
    let mut bytes = b"KILNTOK1".to_vec();
    bytes.extend(1u32.to_le_bytes());
    bytes.extend(4u32.to_le_bytes());
    bytes.extend((n as u64).to_le_bytes());
    bytes.extend((n as u64).to_le_bytes());
    bytes.extend((0..n).flat_map(|i| i.to_le_bytes()));
    TokenFile::open(&write(dir, "count.tok", bytes)).unwrap()
}

fn rows(t: &kiln::Tensor) -> Vec<Vec<i32>> {
    let seq = t.dims()[1];
    t.i32s().unwrap().chunks(seq).map(|r| r.to_vec()).collect()
}

#[test]
fn sampler_windows_are_in_range_and_shifted() {
    let tmp = tempfile::tempdir().unwrap();
    let file = counting_file(tmp.path(), 1000);
    let (train, val) = split(file.len(), 0.1);
    assert_eq!((train.clone(), val), (0..900, 900..1000));
    assert_eq!(split(1000, 0.0).1, 1000..1000);
    let mut s = WindowSampler::new(3, 100..900, Sampling::Random);
    let (seq, mut starts) = (16, std::collections::HashSet::new());
    for _ in 0..50 {
        let (x, y) = s.next_batch(&file, 4, seq).unwrap();
        assert_eq!(x.dims(), &[4, seq]);
        assert_eq!(x.dtype(), kiln::DType::I32);
        for (xr, yr) in rows(&x).iter().zip(rows(&y)) {
            let start = xr[0];
            assert!((100..=900 - (seq as i32 + 1)).contains(&start), "window at {start}");
            assert_eq!(*xr, (start..start + seq as i32).collect::<Vec<_>>());
            assert_eq!(yr, (start + 1..start + 1 + seq as i32).collect::<Vec<_>>());
            starts.insert(start);
        }
    }
    assert_eq!(s.drawn, 200);
    assert!(starts.len() > 150, "starts are spread: {} distinct of 200", starts.len());

    let mut exact = WindowSampler::new(0, 10..27, Sampling::Random);
    let (x, _) = exact.next_batch(&file, 3, 16).unwrap();
    assert!(rows(&x).iter().all(|r| r[0] == 10), "only one window fits");
    let msg = err(WindowSampler::new(0, 10..26, Sampling::Random).next_batch(&file, 1, 16));
    assert!(msg.contains("16 tokens, fewer than one window of seq+1 = 17") && msg.contains("train.seq_len"), "{msg}");
    assert!(err(WindowSampler::new(0, 0..2000, Sampling::Random).next_batch(&file, 1, 16))
        .contains("outside the token file"));
}

#[test]
fn sampler_resumes_exactly_from_its_state() {
    let tmp = tempfile::tempdir().unwrap();
    let file = counting_file(tmp.path(), 5000);
    let draw = |s: &mut WindowSampler, k: usize| -> Vec<Vec<Vec<i32>>> {
        (0..k).map(|_| rows(&s.next_batch(&file, 3, 32).unwrap().0)).collect()
    };
    let mut whole = WindowSampler::new(42, 0..5000, Sampling::Random);
    let mut twin = WindowSampler::new(42, 0..5000, Sampling::Random);
    let all = draw(&mut whole, 8);
    assert_eq!(draw(&mut twin, 8), all, "same seed, same batches");
    assert_ne!(draw(&mut WindowSampler::new(43, 0..5000, Sampling::Random), 8), all, "another seed, other batches");

    let mut first = WindowSampler::new(42, 0..5000, Sampling::Random);
    let head = draw(&mut first, 3);
    let saved = serde_json::to_string(&first).unwrap();
    // `first` is not used past here: the resumed sampler must not depend on it.
    let mut resumed: WindowSampler = serde_json::from_str(&saved).unwrap();
    assert_eq!(resumed.drawn, 9);
    let tail = draw(&mut resumed, 5);
    assert_eq!([head, tail].concat(), all);
}

/// The starts of the next `n` windows, drawn through `next_batch` in batches of `batch` (the
/// last one possibly smaller), checking that every row is a window of the counting file.
fn starts(s: &mut WindowSampler, file: &TokenFile, n: usize, batch: usize, seq: usize) -> Vec<usize> {
    let mut out = vec![];
    while out.len() < n {
        let (x, y) = s.next_batch(file, batch.min(n - out.len()), seq).unwrap();
        for (xr, yr) in rows(&x).iter().zip(rows(&y)) {
            let start = xr[0];
            assert_eq!(*xr, (start..start + seq as i32).collect::<Vec<_>>());
            assert_eq!(yr, (start + 1..start + 1 + seq as i32).collect::<Vec<_>>());
            out.push(start as usize);
        }
    }
    out
}

#[test]
fn epoch_sampler_trains_every_token_once_per_epoch_in_a_fresh_order() {
    let tmp = tempfile::tempdir().unwrap();
    let file = counting_file(tmp.path(), 1000);
    // 800 tokens at a stride of 16: (800 - 16) / 16 = 49 blocks fit after any phase below 16
    let (seq, blocks) = (16, 49);
    let mut s = WindowSampler::new(7, 100..900, Sampling::Epoch);
    // batches of 5 straddle the epoch boundaries (49 is no multiple of 5)
    let drawn = starts(&mut s, &file, 4 * blocks + 11, 5, seq);
    assert_eq!(s.drawn, 4 * blocks as u64 + 11);
    let epochs: Vec<&[usize]> = drawn.chunks(blocks).collect();
    let mut phases = vec![];
    for (e, order) in epochs.iter().take(4).enumerate() {
        let mut sorted = order.to_vec();
        sorted.sort();
        let phase = sorted[0] - 100;
        assert!(phase < seq, "epoch {e} starts its grid at {}", sorted[0]);
        let grid: Vec<usize> = (0..blocks).map(|b| 100 + phase + b * seq).collect();
        assert_eq!(sorted, grid, "epoch {e} visits each block of its grid once");
        // inputs and targets each cover 784 consecutive tokens exactly once
        let (mut inputs, mut targets) = (vec![0; 1000], vec![0; 1000]);
        for &b in order.iter() {
            (b..b + seq).for_each(|t| inputs[t] += 1);
            (b + 1..b + seq + 1).for_each(|t| targets[t] += 1);
        }
        let first = 100 + phase;
        assert!((first..first + 784).all(|t| inputs[t] == 1) && inputs.iter().sum::<i32>() == 784, "epoch {e}");
        assert!((first + 1..first + 785).all(|t| targets[t] == 1) && targets.iter().sum::<i32>() == 784, "epoch {e}");
        assert_ne!(order.to_vec(), grid, "epoch {e} is shuffled");
        // shuffled, not nearly sorted: consecutive windows are neighbouring blocks only by chance
        let adjacent = order.windows(2).filter(|w| w[0].abs_diff(w[1]) == seq).count();
        assert!(adjacent < 8, "{adjacent} of 48 consecutive windows are neighbouring blocks: {order:?}");
        phases.push(phase);
    }
    // each epoch a fresh order, and a fresh phase, so windows do not repeat their exact contexts
    assert!(epochs[..4].windows(2).all(|w| w[0] != w[1]), "each epoch a fresh order");
    assert!(phases.iter().any(|&p| p != phases[0]), "the grid moves between epochs: {phases:?}");
    let other = starts(&mut WindowSampler::new(8, 100..900, Sampling::Epoch), &file, blocks, 7, seq);
    assert_ne!(other, epochs[0], "another seed, another order");

    // a range holding exactly one block, and the errors shared with random offsets
    let mut one = WindowSampler::new(0, 10..27, Sampling::Epoch);
    assert_eq!(starts(&mut one, &file, 3, 3, 16), [10, 10, 10]);
    // one block with room to move: its phase varies over the 4 starts that fit
    let moved = starts(&mut WindowSampler::new(0, 10..30, Sampling::Epoch), &file, 40, 8, 16);
    assert!(moved.iter().all(|s| (10..14).contains(s)) && moved.iter().any(|&s| s != moved[0]), "{moved:?}");
    let msg = err(WindowSampler::new(0, 10..26, Sampling::Epoch).next_batch(&file, 1, 16));
    assert!(msg.contains("fewer than one window of seq+1 = 17") && msg.contains("train.seq_len"), "{msg}");
    assert!(err(WindowSampler::new(0, 0..2000, Sampling::Epoch).next_batch(&file, 1, 16))
        .contains("outside the token file"));
}

#[test]
fn epoch_sampler_resumes_mid_epoch_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let file = counting_file(tmp.path(), 5000);
    let draw = |s: &mut WindowSampler, k: usize| -> Vec<Vec<Vec<i32>>> {
        (0..k).map(|_| rows(&s.next_batch(&file, 3, 32).unwrap().0)).collect()
    };
    // (5000 - 1) / 32 = 156 blocks: 60 batches of 3 cross into the second epoch
    let all = draw(&mut WindowSampler::new(42, 0..5000, Sampling::Epoch), 60);
    assert_eq!(draw(&mut WindowSampler::new(42, 0..5000, Sampling::Epoch), 60), all, "same seed, same batches");
    for stop in [1, 17, 52, 53] {
        let mut first = WindowSampler::new(42, 0..5000, Sampling::Epoch);
        let head = draw(&mut first, stop);
        let saved = serde_json::to_string(&first).unwrap();
        assert!(saved.contains("\"mode\":\"epoch\""), "{saved}");
        let mut resumed: WindowSampler = serde_json::from_str(&saved).unwrap();
        assert_eq!((resumed.drawn, resumed.mode), (3 * stop as u64, Sampling::Epoch));
        let tail = draw(&mut resumed, 60 - stop);
        assert_eq!([head, tail].concat(), all, "resumed after {stop} batches");
    }
}

#[test]
fn a_sampler_state_saved_before_modes_existed_continues_with_random_offsets() {
    let tmp = tempfile::tempdir().unwrap();
    let file = counting_file(tmp.path(), 5000);
    // what trainer_state.json held as "data" before data.sampling: seed, drawn and range only
    let old = r#"{"seed":42,"drawn":9,"range":{"start":0,"end":5000}}"#;
    let mut s: WindowSampler = serde_json::from_str(old).unwrap();
    assert_eq!(s.mode, Sampling::Random);
    // the windows the old sampler drew next (its SplitMix64 formula, evaluated by hand)
    assert_eq!(starts(&mut s, &file, 6, 3, 32), [1211, 3797, 4402, 4471, 399, 188]);
}

#[test]
fn permute_is_a_bijection_chosen_by_its_key() {
    for n in (1..=130).chain([255, 256, 257, 1000, 1023, 1024, 1025, 4097]) {
        for key in [0, 1, 0xdead_beef] {
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let p = permute(i, n, key);
                assert!(p < n && !seen[p as usize], "n {n} key {key}: {i} -> {p}");
                seen[p as usize] = true;
            }
        }
    }
    let order = |key| (0..1000).map(|i| permute(i, 1000, key)).collect::<Vec<_>>();
    assert_ne!(order(1), order(2));
    // a shuffle, not a near-identity: few fixed points, displacement near the uniform n/3
    let p = order(3);
    let fixed = p.iter().enumerate().filter(|&(i, &x)| i as u64 == x).count();
    let mean_shift = p.iter().enumerate().map(|(i, &x)| (i as f64 - x as f64).abs()).sum::<f64>() / 1000.0;
    assert!(fixed < 8 && (280.0..390.0).contains(&mean_shift), "fixed points {fixed}, mean shift {mean_shift}");
}

#[test]
fn eval_windows_tile_without_overlap() {
    for (range, seq, max) in [(0..1000, 15, 10), (0..1000, 15, 1000), (37..1000, 9, 7), (5..20, 15, 4), (0..16, 15, 0)]
    {
        let w = eval_windows(range.clone(), seq, max);
        let fit = (range.end - range.start) / (seq + 1);
        assert_eq!(w.len(), fit.min(max), "{range:?} seq {seq} max {max}");
        for pair in w.windows(2) {
            assert!(pair[0] + seq < pair[1], "overlap in {w:?}");
        }
        assert!(w.iter().all(|&s| s >= range.start && s + seq < range.end), "{w:?} outside {range:?}");
        assert_eq!(w, eval_windows(range.clone(), seq, max));
    }
    let spread = eval_windows(0..1000, 15, 10);
    assert!(*spread.last().unwrap() > 800, "evenly spread: {spread:?}");
}
