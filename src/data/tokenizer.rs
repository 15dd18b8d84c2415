//! Tokenizers through the `tokenizers` crate (built without network code): a Hugging Face
//! `tokenizer.json`, or GPT-2's `vocab.json` + `merges.txt` pair (OpenAI's original names
//! `encoder.json` + `vocab.bpe` too), and byte-level BPE training. kiln's own interface is this
//! small wrapper, so the rest of the code never touches the crate directly.
//!
//! A vocab + merges pair is assembled exactly as GPT-2's `tokenizer.json` is: a BPE model with
//! no unknown token, the ByteLevel pre-tokenizer (GPT-2's split regex, no prefix space), the
//! ByteLevel post-processor and decoder, and `<|endoftext|>` as a special added token when the
//! vocabulary has it. A test holds the two forms to identical ids.

use crate::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tokenizers::models::bpe::{BpeTrainerBuilder, Merges, Vocab, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

/// GPT-2's end-of-text token, appended after every document of a corpus.
pub const EOS: &str = "<|endoftext|>";

/// The file pairs a GPT-2 style BPE may be stored as: (vocabulary, merges).
const PAIRS: [(&str, &str); 2] = [("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")];

/// A loaded tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::read(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file")));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::read(path, e))?;
        // The tokenizers crate panics on some syntax errors (inside "decoder"), so the JSON is
        // checked here first; only well-formed JSON reaches it.
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            Error::malformed(path, "tokenizer file", format!("not UTF-8 text ({e}); a tokenizer.json is JSON"))
        })?;
        serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map_err(|e| Error::malformed(path, "tokenizer file", format!("not valid JSON ({e})")))?;
        let inner = guarded(path, || text.parse::<tokenizers::Tokenizer>())?.map_err(|e| {
            Error::malformed(
                path,
                "tokenizer file",
                format!("not a tokenizer.json that the tokenizers library reads ({e})"),
            )
        })?;
        Ok(Tokenizer { inner })
    }

    /// Loads a tokenizer from a `tokenizer.json` file, a directory holding one, or a GPT-2 pair
    /// (`vocab.json` + `merges.txt`, or `encoder.json` + `vocab.bpe`) named by either file or by
    /// the directory holding both.
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let json = path.join("tokenizer.json");
            if json.is_file() {
                return Self::from_file(&json);
            }
            for (vocab, merges) in PAIRS {
                if path.join(vocab).is_file() && path.join(merges).is_file() {
                    return Self::from_vocab_merges(&path.join(vocab), &path.join(merges));
                }
            }
            return Err(Error::malformed(
                path,
                "tokenizer file",
                "holds no tokenizer: expected tokenizer.json, vocab.json + merges.txt, or encoder.json + \
                 vocab.bpe; pass the tokenizer file itself or train one with `kiln tokenizer train`",
            ));
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let dir = path.parent().unwrap_or(Path::new(""));
        for (vocab, merges) in PAIRS {
            let partner = if name == vocab {
                (path.to_path_buf(), dir.join(merges))
            } else if name == merges {
                (dir.join(vocab), path.to_path_buf())
            } else {
                continue;
            };
            if !partner.0.is_file() || !partner.1.is_file() {
                let missing = if partner.0.is_file() { &partner.1 } else { &partner.0 };
                return Err(Error::malformed(
                    path,
                    "tokenizer file",
                    format!(
                        "is half of a GPT-2 vocabulary pair but {} is missing; put {vocab} and {merges} in \
                         one directory",
                        missing.display()
                    ),
                ));
            }
            return Self::from_vocab_merges(&partner.0, &partner.1);
        }
        Self::from_file(path)
    }

    /// Builds GPT-2's byte-level BPE from a vocabulary (JSON object token -> id) and a merges file
    /// (one "left right" pair a line, an optional `#version` first line).
    pub fn from_vocab_merges(vocab_path: &Path, merges_path: &Path) -> Result<Self> {
        let bytes = std::fs::read(vocab_path).map_err(|e| Error::read(vocab_path, e))?;
        let map: HashMap<String, u32> = serde_json::from_slice(&bytes).map_err(|e| {
            Error::malformed(
                vocab_path,
                "tokenizer file",
                format!("not a JSON object mapping token strings to integer ids ({e})"),
            )
        })?;
        let vocab: Vocab = map.into_iter().collect();
        let merges = read_merges(merges_path)?;
        // The crate assumes what it then checks: a merge whose result the vocabulary lacks
        // overruns a buffer (a panic) when the result is longer than every token.
        for (i, (a, b)) in merges.iter().enumerate() {
            if let Some(t) = [a.clone(), b.clone(), format!("{a}{b}")].into_iter().find(|t| !vocab.contains_key(t)) {
                return Err(Error::malformed(
                    merges_path,
                    "tokenizer file",
                    format!(
                        "does not fit the vocabulary {} (merge {} '{a} {b}' needs the token '{t}', which it lacks); \
                         the two files must come from the same tokenizer",
                        vocab_path.display(),
                        i + 1
                    ),
                ));
            }
        }
        let has_eos = vocab.contains_key(EOS);
        let bpe = guarded(merges_path, || BPE::builder().vocab_and_merges(vocab, merges).build())?.map_err(|e| {
            Error::malformed(
                merges_path,
                "tokenizer file",
                format!(
                    "does not fit the vocabulary {} ({e}); the two files must come from the same tokenizer",
                    vocab_path.display()
                ),
            )
        })?;
        let mut inner = byte_level_tokenizer(bpe);
        if has_eos {
            inner.add_special_tokens([AddedToken::from(EOS, true)]).map_err(|e| {
                Error::malformed(
                    vocab_path,
                    "tokenizer file",
                    format!("cannot register {EOS} as a special token ({e})"),
                )
            })?;
        }
        Ok(Tokenizer { inner })
    }

    /// Wraps a tokenizer built elsewhere (a trainer's output).
    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Tokenizer { inner }
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text` (no special tokens added; offsets are not computed, which is 3x faster).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc =
            self.inner.encode_fast(text, false).map_err(|e| Error::Input(format!("cannot tokenize text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Input(format!("cannot decode token ids: {e}")))
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// One past the largest id the tokenizer can emit: `vocab_size()` unless the ids have gaps.
    pub fn id_bound(&self) -> usize {
        let max = self.inner.get_vocab(true).values().copied().max().map_or(0, |m| m as usize + 1);
        max.max(self.vocab_size())
    }

    /// The id of a token string, if the vocabulary has it (e.g. "<|endoftext|>").
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The end-of-text id: GPT-2's "<|endoftext|>" where present.
    pub fn eos_id(&self) -> Option<u32> {
        self.token_id(EOS)
    }

    /// Writes `tokenizer.json` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json =
            self.inner.to_string(true).map_err(|e| Error::Input(format!("cannot serialise the tokenizer: {e}")))?;
        crate::io::write_atomic(path, |w| std::io::Write::write_all(w, json.as_bytes()))
    }
}

/// Runs the tokenizers crate on a file's contents, turning a panic inside it into an error naming
/// the file: it panics on some inconsistent inputs (a continuing_subword_prefix longer than a
/// merge's token underflows a length) instead of returning an error.
fn guarded<T>(path: &Path, f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T> {
    // The panic becomes kiln's one error line; the default hook would print it first. A hook that
    // stays quiet on this thread while `f` runs, and defers to the previous hook otherwise.
    thread_local!(static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(|g| g.get()) {
                previous(info)
            }
        }));
    });
    GUARDED.with(|g| g.set(true));
    let result = std::panic::catch_unwind(f);
    GUARDED.with(|g| g.set(false));
    result.map_err(|p| {
        let why = p.downcast_ref::<String>().map(String::as_str).or_else(|| p.downcast_ref::<&str>().copied());
        Error::malformed(
            path,
            "tokenizer file",
            format!(
                "the tokenizers library fails on it ({}); the file is corrupt or inconsistent",
                why.unwrap_or("a panic")
            ),
        )
    })
}

/// A tokenizer around `bpe` with GPT-2's byte-level pre-tokenizer, post-processor and decoder,
/// configured as in GPT-2's own `tokenizer.json`.
fn byte_level_tokenizer(bpe: BPE) -> tokenizers::Tokenizer {
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    inner.with_post_processor(Some(ByteLevel::new(true, false, true)));
    inner.with_decoder(Some(ByteLevel::new(true, true, true)));
    inner
}

/// Reads a merges file: "left right" a line; a `#version` line and blank lines are skipped.
fn read_merges(path: &Path) -> Result<Merges> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::read(path, e))?;
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || (i == 0 && line.starts_with("#version")) {
            continue;
        }
        match line.split(' ').collect::<Vec<_>>()[..] {
            [a, b] if !a.is_empty() && !b.is_empty() => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(Error::malformed(
                    path,
                    "tokenizer file",
                    format!("line {}: expected a merge 'left right' (two tokens, one space), got {line:?}", i + 1),
                ))
            }
        }
    }
    Ok(merges)
}

/// Trains a byte-level BPE on the documents of `files` (plain text, or `.jsonl` with a "text"
/// field; see `corpus::read_documents`). The initial alphabet is all 256 byte-level symbols, so any
/// text encodes and `decode(encode(s)) == s`. `<|endoftext|>` is registered first and gets id 0;
/// the 256 byte symbols follow, then the merges. The vocabulary has `vocab_size` entries unless
/// the corpus runs out of pairs seen `min_frequency` times, in which case it is smaller.
pub fn train_bpe(files: &[PathBuf], vocab_size: usize, min_frequency: u64) -> Result<Tokenizer> {
    let floor = ByteLevel::alphabet().len() + 1;
    if vocab_size < floor {
        return Err(Error::Input(format!(
            "vocab size {vocab_size} is too small: a byte-level BPE needs the {} byte symbols plus {EOS}, \
             so use --vocab-size {floor} or more (GPT-2 uses 50257)",
            floor - 1
        )));
    }
    if files.is_empty() {
        return Err(Error::Input("no input files to train a tokenizer on; pass text files with --data".into()));
    }
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(min_frequency)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from(EOS, true)])
        .build()
        .into();
    let mut inner = byte_level_tokenizer(BPE::default());

    // Files are read one at a time and fed line by line (lines keep their '\n', as the crate's
    // own train_from_files does), so memory holds one file, and the trainer can spread lines
    // over threads. A bad file stops the feed; its error is returned once training unwinds.
    let failure: Mutex<Option<Error>> = Mutex::new(None);
    let text_bytes = std::sync::atomic::AtomicU64::new(0);
    let lines = files
        .iter()
        .map_while(|f| match crate::data::corpus::read_documents(f) {
            Ok(docs) => Some(docs),
            Err(e) => {
                *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                None
            }
        })
        .flatten()
        .flat_map(|doc| {
            text_bytes.fetch_add(doc.len() as u64, std::sync::atomic::Ordering::Relaxed);
            doc.split_inclusive('\n').map(str::to_owned).collect::<Vec<_>>()
        });
    inner.train(&mut trainer, lines).map_err(|e| Error::Input(format!("tokenizer training failed: {e}")))?;
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    if text_bytes.into_inner() == 0 {
        return Err(Error::Input(format!(
            "{} hold(s) no text; a tokenizer needs a non-empty corpus",
            crate::data::corpus::name_files(files)
        )));
    }
    Ok(Tokenizer { inner })
}
