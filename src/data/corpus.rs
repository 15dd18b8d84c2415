//! Pre-training corpora: text files (or `.jsonl` with a "text" field, or `.parquet` with a
//! "text" column, or a Hub dataset id) expanded from files, globs and directories, tokenized in parallel into one flat token file, then read back through a
//! memory map as training windows (shuffled blocks per epoch, or random offsets) and fixed
//! validation windows.
//!
//! Token file layout (little-endian), 32-byte header then the ids:
//!   0..8   magic b"KILNTOK1"
//!   8..12  u32 version (1)
//!   12..16 u32 bytes per token: 2 when the vocabulary fits in u16, else 4
//!   16..24 u64 number of tokens
//!   24..32 u64 vocabulary size (one past the largest id)
//!   32..   the ids, u16 or u32 each; every document is followed by the tokenizer's EOS id.

use crate::data::tokenizer::Tokenizer;
use crate::{Error, Result, Tensor};
use rayon::prelude::*;
use std::io::{Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"KILNTOK1";
const VERSION: u32 = 1;
const HEADER: usize = 32;
/// Documents longer than this are cut into pieces of about this many bytes, tokenized in parallel.
pub const CHUNK_BYTES: usize = 1 << 18;
/// Files are read and tokenized in groups of about this many bytes, which bounds memory.
const GROUP_BYTES: u64 = 64 << 20;

/// The files' names for a message: "a.txt", or "a.txt, b.txt and 3 more".
pub fn name_files(files: &[PathBuf]) -> String {
    let shown: Vec<String> = files.iter().take(2).map(|p| p.display().to_string()).collect();
    match files.len() {
        0 => "no file".into(),
        1 | 2 => shown.join(" and "),
        n => format!("{} and {} more", shown.join(", "), n - 2),
    }
}

/// The files named by `inputs`: files as given, directories walked recursively (sorted, every
/// regular file), glob patterns expanded (sorted), and Hugging Face Hub dataset ids
/// ("Salesforce/wikitext:wikitext-2-raw-v1/train", `io::hub::dataset_input`) fetched into the
/// cache as their Parquet files. Duplicates are kept once, in first-seen order.
pub fn expand_inputs(inputs: &[String]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        let path = Path::new(input);
        if let Some(files) = crate::io::hub::dataset_input(input)? {
            out.extend(files);
        } else if path.is_dir() {
            walk_dir(path, &mut out)?;
        } else if path.is_file() {
            out.push(path.to_path_buf());
        } else if input.contains(['*', '?', '[']) {
            let paths = glob::glob(input).map_err(|e| {
                Error::Input(format!("{input:?} is not a valid glob pattern ({e}); quote it or fix the pattern"))
            })?;
            let mut matched = 0;
            for entry in paths {
                let p = entry.map_err(|e| Error::read(e.path(), std::io::Error::other(e.to_string())))?;
                if p.is_dir() {
                    walk_dir(&p, &mut out)?;
                } else if p.is_file() {
                    out.push(p);
                } else {
                    continue;
                }
                matched += 1;
            }
            if matched == 0 {
                return Err(Error::Input(format!(
                    "the pattern {input:?} matches no files; check the path (relative to {}) and the pattern",
                    std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_else(|_| ".".into())
                )));
            }
        } else {
            return Err(Error::read(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    Ok(out)
}

/// Appends every regular file under `dir` (recursively, sorted by path) to `out`. Symbolic links to
/// files are followed; links to directories are not, so a link cycle cannot loop.
fn walk_dir(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(|e| Error::read(dir, e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::read(dir, e))?;
    entries.sort();
    for p in entries {
        let meta = std::fs::symlink_metadata(&p).map_err(|e| Error::read(&p, e))?;
        if meta.is_dir() {
            walk_dir(&p, out)?;
        } else if p.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

/// The documents of one file: a plain text file is one document; a `.jsonl` / `.json` file holds
/// one JSON object a line (or one JSON array of objects) whose "text" field is a document; a
/// `.parquet` file (the Hub's dataset format) a "text" column, a document a row.
pub fn read_documents(path: &Path) -> Result<Vec<String>> {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet")) {
        return crate::data::parquet::read_text_column(path, crate::data::parquet::TEXT_COLUMN);
    }
    let bytes = std::fs::read(path).map_err(|e| Error::read(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        Error::Malformed {
            path: path.to_path_buf(),
            kind: "text",
            msg: format!(
                "not UTF-8 text: invalid byte 0x{:02x} at byte offset {at} (line {line}). kiln reads UTF-8 \
             only; convert the file (e.g. `iconv -f latin1 -t utf-8`) or leave it out of the inputs",
                bytes[at]
            ),
        }
    })?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "jsonl" | "json" if ext == "json" && text.trim_start().starts_with('[') => json_array_documents(path, &text),
        "jsonl" | "json" => jsonl_documents(path, &text),
        _ => Ok(vec![text.strip_prefix('\u{feff}').map(str::to_owned).unwrap_or(text)]),
    }
}

/// The "text" field of a JSON object, or what is wrong with it.
fn text_field(value: serde_json::Value) -> std::result::Result<String, &'static str> {
    match value {
        serde_json::Value::Object(mut map) => match map.remove("text") {
            Some(serde_json::Value::String(s)) => Ok(s),
            Some(_) => Err("its \"text\" field is not a string"),
            None => Err("the object has no \"text\" field"),
        },
        _ => Err("it is not a JSON object"),
    }
}

fn jsonl_documents(path: &Path, text: &str) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: String| {
            let msg = format!(
                "line {}: {what}; every line of a JSON-lines corpus must be an object with a string \"text\" \
                 field, e.g. {{\"text\": \"...\"}}",
                i + 1
            );
            Error::malformed(path, "JSON-lines corpus", msg)
        };
        let value = serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON ({e})")))?;
        docs.push(text_field(value).map_err(|w| bad(w.to_string()))?);
    }
    Ok(docs)
}

fn json_array_documents(path: &Path, text: &str) -> Result<Vec<String>> {
    let values: Vec<serde_json::Value> = serde_json::from_str(text).map_err(|e| {
        Error::malformed(
            path,
            "JSON corpus",
            format!("not a JSON array of objects ({e}); fix the file or use JSON lines"),
        )
    })?;
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            text_field(v).map_err(|w| {
                let msg = format!("element {i}: {w}; every element must be an object with a string \"text\" field");
                Error::malformed(path, "JSON corpus", msg)
            })
        })
        .collect()
}

/// Cuts `doc` into pieces of about `target` bytes where tokenizing the pieces separately gives the
/// same ids as tokenizing the whole. GPT-2's split regex puts a boundary after a '\n' that follows
/// a non-space character and precedes either a non-space character or one ' ' and a non-space
/// character; anywhere else in a whitespace run, cutting would regroup the run (" \n" becomes one
/// token at the end of a piece). With no such place left, the rest stays one piece.
fn pieces(doc: &str, target: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = doc;
    while rest.len() > target {
        match safe_cut(rest, target) {
            Some(cut) => {
                out.push(&rest[..cut]);
                rest = &rest[cut..];
            }
            None => break,
        }
    }
    out.push(rest);
    out
}

fn safe_cut(s: &str, from: usize) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut i = from;
    while let Some(off) = bytes[i..].iter().position(|&b| b == b'\n') {
        let nl = i + off;
        let cut = nl + 1;
        let before = s[..nl].chars().next_back();
        let mut after = s[cut..].chars();
        let safe = match (before, after.next()) {
            (Some(b), Some(' ')) => !b.is_whitespace() && after.next().is_some_and(|c| !c.is_whitespace()),
            (Some(b), Some(a)) => !b.is_whitespace() && !a.is_whitespace(),
            _ => false,
        };
        if safe {
            return Some(cut);
        }
        i = cut;
    }
    None
}

/// Tokenizes every document of `inputs` (in parallel, order kept), appends the tokenizer's EOS id
/// after each non-empty document, and writes the token file `out` atomically.
pub fn build_token_file(inputs: &[PathBuf], tok: &Tokenizer, out: &Path, progress: bool) -> Result<TokenFile> {
    if inputs.is_empty() {
        return Err(Error::Input("no input files to tokenize; pass text or .jsonl files".into()));
    }
    let sizes = inputs
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).map_err(|e| Error::read(p, e)))
        .collect::<Result<Vec<u64>>>()?;
    let vocab = tok.id_bound();
    let width: usize = if vocab <= 1 << 16 { 2 } else { 4 };
    let eos = tok.eos_id();
    let bar = crate::progress::Progress::new(
        progress,
        "tokenizing",
        "bytes",
        sizes.iter().sum(),
        "tokenizing {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    );

    let mut failure: Option<Error> = None;
    let mut n_tokens: u64 = 0;
    let mut text_bytes: u64 = 0;
    let written = crate::io::write_atomic(out, |w| {
        w.write_all(&[0u8; HEADER])?;
        let body = (|| -> Result<()> {
            let mut start = 0;
            while start < inputs.len() {
                let mut end = start;
                let mut group_bytes = 0;
                while end < inputs.len() && (end == start || group_bytes < GROUP_BYTES) {
                    group_bytes += sizes[end];
                    end += 1;
                }
                let docs = inputs[start..end].par_iter().map(|p| read_documents(p)).collect::<Result<Vec<_>>>()?;
                // (piece, ends its document) in corpus order; empty documents get no EOS.
                let work: Vec<(&str, bool)> = docs
                    .iter()
                    .flatten()
                    .filter(|d| !d.is_empty())
                    .flat_map(|d| {
                        let p = pieces(d, CHUNK_BYTES);
                        let last = p.len() - 1;
                        p.into_iter().enumerate().map(move |(i, s)| (s, i == last))
                    })
                    .collect();
                let ids = work
                    .par_iter()
                    .map(|&(text, last)| {
                        let mut ids = tok.encode(text)?;
                        ids.extend(eos.filter(|_| last));
                        bar.inc(text.len() as u64);
                        Ok(ids)
                    })
                    .collect::<Result<Vec<Vec<u32>>>>()?;
                let group_text: u64 = work.iter().map(|(s, _)| s.len() as u64).sum();
                bar.inc(group_bytes.saturating_sub(group_text));
                text_bytes += group_text;
                let mut buf = Vec::new();
                for piece in &ids {
                    buf.clear();
                    for &id in piece {
                        if id as usize >= vocab {
                            return Err(Error::Input(format!(
                                "the tokenizer emitted id {id}, outside its own vocabulary of {vocab}; \
                                 the tokenizer file is inconsistent, re-save or re-train it"
                            )));
                        }
                        if width == 2 {
                            buf.extend_from_slice(&(id as u16).to_le_bytes());
                        } else {
                            buf.extend_from_slice(&id.to_le_bytes());
                        }
                    }
                    w.write_all(&buf).map_err(|e| Error::write(out, e))?;
                    n_tokens += piece.len() as u64;
                }
                start = end;
            }
            if text_bytes == 0 {
                return Err(Error::Input(format!(
                    "the corpus is empty: {} hold(s) no text; check the --data paths",
                    name_files(inputs)
                )));
            }
            Ok(())
        })();
        if let Err(e) = body {
            failure = Some(e);
            return Err(std::io::Error::other("tokenizing the corpus failed"));
        }
        let mut header = Vec::with_capacity(HEADER);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&(width as u32).to_le_bytes());
        header.extend_from_slice(&n_tokens.to_le_bytes());
        header.extend_from_slice(&(vocab as u64).to_le_bytes());
        w.seek(SeekFrom::Start(0))?;
        w.write_all(&header)
    });
    bar.finish();
    if let Some(e) = failure {
        return Err(e);
    }
    written?;
    TokenFile::open(out)
}

/// A token file, memory-mapped.
pub struct TokenFile {
    path: PathBuf,
    map: memmap2::Mmap,
    len: usize,
    vocab: usize,
    width: usize,
}

impl TokenFile {
    /// Opens and checks a token file written by `build_token_file`.
    pub fn open(path: &Path) -> Result<TokenFile> {
        let file = std::fs::File::open(path).map_err(|e| Error::read(path, e))?;
        let size = file.metadata().map_err(|e| Error::read(path, e))?.len();
        let bad = |msg: String| Error::checkpoint(path, format!("{msg}; rebuild the token file from the corpus"));
        if size < HEADER as u64 {
            return Err(bad(format!("is {size} bytes, shorter than the {HEADER}-byte token file header (truncated)")));
        }
        // SAFETY: the map is read-only; kiln writes token files by rename, never in place.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::read(path, e))?;
        if &map[..8] != MAGIC {
            return Err(bad(format!(
                "is not a kiln token file (its first bytes are {:?}, not \"KILNTOK1\")",
                &map[..8]
            )));
        }
        let u32_at = |i: usize| u32::from_le_bytes([map[i], map[i + 1], map[i + 2], map[i + 3]]);
        let u64_at = |i: usize| u64::from_le_bytes(std::array::from_fn(|k| map[i + k]));
        let (version, width, len, vocab) = (u32_at(8), u32_at(12) as usize, u64_at(16), u64_at(24));
        if version != VERSION {
            return Err(bad(format!("is token file version {version}; this kiln reads version {VERSION}")));
        }
        if width != 2 && width != 4 {
            return Err(bad(format!("declares {width} bytes per token; only 2 and 4 exist (corrupt header)")));
        }
        let want = len.checked_mul(width as u64).and_then(|b| b.checked_add(HEADER as u64));
        if want != Some(size) {
            return Err(bad(format!(
                "is {size} bytes but its header promises {len} tokens of {width} bytes ({} bytes in all): the file \
                 is truncated or corrupt",
                want.map_or("more than 2^64".into(), |w| w.to_string())
            )));
        }
        // Ids become i32 token ids; every one must be inside the vocabulary the header declares, or
        // a corrupt id would surface far from here as a model's out-of-range token.
        if vocab == 0 || vocab > i32::MAX as u64 {
            return Err(bad(format!("declares a vocabulary of {vocab} tokens (corrupt header)")));
        }
        let tf = TokenFile { path: path.to_path_buf(), map, len: len as usize, vocab: vocab as usize, width };
        let chunk = 1 << 20;
        let outside = (0..tf.len.div_ceil(chunk)).into_par_iter().find_map_first(|k| {
            let start = k * chunk;
            let ids = tf.tokens(start..(start + chunk).min(tf.len));
            ids.iter().position(|&id| id as u64 >= vocab).map(|i| (start + i, ids[i]))
        });
        if let Some((at, id)) = outside {
            return Err(bad(format!(
                "holds token id {id} at position {at}, outside the vocabulary of {vocab} its header declares (corrupt data)"
            )));
        }
        Ok(tf)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// One past the largest id the tokenizer could emit.
    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// The ids in `range`. Panics when the range runs past `len()` (a caller's bug).
    pub fn tokens(&self, range: Range<usize>) -> Vec<u32> {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "token range {range:?} outside the token file's {} tokens",
            self.len
        );
        let bytes = &self.map[HEADER + range.start * self.width..HEADER + range.end * self.width];
        if self.width == 2 {
            bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32).collect()
        } else {
            bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        }
    }
}

/// Errors when the token file's ids may not fit a model with `model_vocab` embeddings.
pub fn check_vocab(file: &TokenFile, model_vocab: usize) -> Result<()> {
    if file.vocab_size() > model_vocab {
        return Err(Error::Mismatch(format!(
            "{}: tokenizer vocabulary {} does not fit the model's vocab_size {model_vocab}; use a model with \
             vocab_size >= {} or re-tokenize the corpus with the model's tokenizer",
            file.path().display(),
            file.vocab_size(),
            file.vocab_size()
        )));
    }
    Ok(())
}

/// Splits `len` tokens into train = the head and val = the tail, `val_fraction` of them (rounded;
/// clamped to [0, 1]; val is empty at 0).
pub fn split(len: usize, val_fraction: f64) -> (Range<usize>, Range<usize>) {
    let f = if val_fraction.is_nan() { 0.0 } else { val_fraction.clamp(0.0, 1.0) };
    let val = ((len as f64 * f).round() as usize).min(len);
    (0..len - val, len - val..len)
}

/// SplitMix64's output mix.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How training windows are drawn (`data.sampling`).
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Sampling {
    /// Blocks of seq + 1 tokens, shuffled afresh every epoch and drawn without replacement, so
    /// every token is trained on once per epoch (as transformers' Trainer feeds `group_texts`
    /// blocks); the block grid shifts between epochs. The default.
    Epoch,
    /// Windows at uniformly random offsets, drawn with replacement (what kiln did before epochs).
    Random,
}

impl Sampling {
    /// The values `data.sampling` accepts.
    pub const NAMES: &'static str = "\"epoch\" or \"random\"";

    /// The mode as `data.sampling` names it.
    pub fn name(self) -> &'static str {
        match self {
            Sampling::Epoch => "epoch",
            Sampling::Random => "random",
        }
    }

    /// A trainer_state.json written before the mode was recorded came from random offsets.
    fn legacy() -> Sampling {
        Sampling::Random
    }
}

impl std::str::FromStr for Sampling {
    type Err = Error;
    fn from_str(s: &str) -> Result<Sampling> {
        match s {
            "epoch" => Ok(Sampling::Epoch),
            "random" => Ok(Sampling::Random),
            other => Err(Error::Input(format!("data.sampling = {other:?}: use {}", Sampling::NAMES))),
        }
    }
}

/// Training windows of seq + 1 tokens from a token range. (seed, drawn, range, mode) is the whole
/// state and the order is recomputed from it, so a sampler restored from its serialised state
/// continues exactly where it stopped, mid-epoch included.
///
/// `Epoch`: each epoch cuts the range into blocks of seq + 1 tokens at a stride of seq, so that
/// neighbouring blocks share one boundary token (the last target of one is the first input of
/// the next): in an epoch every token is an input once and a target once, and every next-token
/// pair is trained once, except fewer than 2 * seq tokens at the ends of the range. Epoch e
/// visits its blocks in the order of a pseudo-random permutation keyed by (seed, e), computed
/// per window (`permute`), never stored, and shifts its grid by a phase below seq drawn from the
/// same key: with fixed block edges a model sees the same contexts every epoch and overfits them
/// (on the built-in corpus over 10 epochs, validation loss 1.33 against 1.26 with the phase).
///
/// `Random`: window k starts at a value drawn from SplitMix64's k-th output for the seed.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct WindowSampler {
    pub seed: u64,
    /// Windows drawn so far (batch rows, not batches), over all epochs.
    pub drawn: u64,
    /// Token range windows are drawn from (e.g. the train split).
    pub range: Range<usize>,
    #[serde(default = "Sampling::legacy")]
    pub mode: Sampling,
}

/// Rounds of the Feistel network behind `permute`; four make a pseudo-random permutation from
/// pseudo-random round functions (Luby-Rackoff), two more are margin for SplitMix's mix.
const FEISTEL_ROUNDS: u64 = 6;

/// Position `i` of a pseudo-random permutation of 0..n chosen by `key`: a Feistel network over
/// the smallest even number of bits that holds n, walked until it lands inside 0..n (cycle
/// walking keeps it a bijection of 0..n; the domain is under 4n, so under 4 walks on average).
pub fn permute(i: u64, n: u64, key: u64) -> u64 {
    assert!(i < n, "permute: position {i} outside 0..{n}");
    let bits = 64 - (n - 1).leading_zeros() as u64;
    let half = bits.div_ceil(2).max(1);
    let mask = (1u64 << half) - 1;
    let round_keys: [u64; FEISTEL_ROUNDS as usize] =
        std::array::from_fn(|r| mix(key ^ (r as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let mut x = i;
    loop {
        let (mut left, mut right) = (x >> half, x & mask);
        for k in &round_keys {
            (left, right) = (right, left ^ (mix(k ^ right) & mask));
        }
        x = (left << half) | right;
        if x < n {
            return x;
        }
    }
}

impl WindowSampler {
    pub fn new(seed: u64, range: Range<usize>, mode: Sampling) -> Self {
        WindowSampler { seed, drawn: 0, range, mode }
    }

    /// The start of random window `k`: uniform over the `count` possible starts (multiply-shift;
    /// the bias is below count / 2^64).
    fn random_start(&self, k: u64, count: usize) -> usize {
        let x = mix(mix(self.seed).wrapping_add(k.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        self.range.start + ((x as u128 * count as u128) >> 64) as usize
    }

    /// The start of epoch window `k`: block `permute(i)` of epoch `k / blocks`, on that epoch's
    /// grid of `blocks` blocks at a stride of `seq` shifted by a phase below `phases`.
    fn epoch_start(&self, k: u64, blocks: u64, phases: usize, seq: usize) -> usize {
        let (epoch, i) = (k / blocks, k % blocks);
        let key = mix(mix(self.seed ^ 0x6570_6f63_685f_6b65).wrapping_add(epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        let phase = ((mix(key) as u128 * phases as u128) >> 64) as usize;
        self.range.start + phase + permute(i, blocks, key) as usize * seq
    }

    /// The start of window `k` for windows of seq + 1 tokens (the range holds at least one).
    pub fn start(&self, k: u64, seq: usize) -> usize {
        let len = self.range.len();
        match self.mode {
            Sampling::Random => self.random_start(k, len - seq),
            Sampling::Epoch => {
                // as many blocks as fit after any phase below seq (one when only one fits at all)
                let blocks = ((len - seq) / seq).max(1);
                self.epoch_start(k, blocks as u64, (len - blocks * seq).min(seq), seq)
            }
        }
    }

    /// Input ids and next-token targets, both I32 [batch, seq], from the next `batch` windows of
    /// seq + 1 tokens.
    pub fn next_batch(&mut self, file: &TokenFile, batch: usize, seq: usize) -> Result<(Tensor, Tensor)> {
        if batch == 0 || seq == 0 {
            return Err(Error::Input(format!("batch size ({batch}) and sequence length ({seq}) must be at least 1")));
        }
        let r = &self.range;
        if r.start > r.end || r.end > file.len() {
            return Err(Error::Mismatch(format!(
                "{}: the sampler's range {r:?} is outside the token file's {} tokens; the token file changed \
                 since this state was saved, so rebuild it or start a fresh run",
                file.path().display(),
                file.len()
            )));
        }
        if r.len() < seq + 1 {
            return Err(Error::Input(format!(
                "the corpus has {} tokens, fewer than one window of seq+1 = {}; use a shorter train.seq_len (--set train.seq_len=N) or more data",
                r.len(),
                seq + 1
            )));
        }
        let mut inputs = Vec::with_capacity(batch * seq);
        let mut targets = Vec::with_capacity(batch * seq);
        for _ in 0..batch {
            let s = self.start(self.drawn, seq);
            self.drawn += 1;
            let window = file
                .tokens(s..s + seq + 1)
                .into_iter()
                .map(|t| {
                    i32::try_from(t).map_err(|_| {
                        Error::malformed(file.path(), "token file", format!("token id {t} does not fit in i32"))
                    })
                })
                .collect::<Result<Vec<i32>>>()?;
            inputs.extend_from_slice(&window[..seq]);
            targets.extend_from_slice(&window[1..]);
        }
        Ok((Tensor::from_i32(inputs, [batch, seq])?, Tensor::from_i32(targets, [batch, seq])?))
    }
}

/// Start offsets of non-overlapping windows of seq + 1 tokens inside `range`, at most
/// `max_windows`, spread evenly over the range when more would fit; the same every call.
pub fn eval_windows(range: Range<usize>, seq: usize, max_windows: usize) -> Vec<usize> {
    let w = seq + 1;
    let n = range.end.saturating_sub(range.start) / w;
    let take = n.min(max_windows);
    (0..take).map(|j| range.start + (j * n / take) * w).collect()
}
