//! Tokenizers through the `tokenizers` crate (built without network code): a Hugging Face
//! `tokenizer.json`, or GPT-2's `vocab.json` + `merges.txt` pair. kiln's own interface is this
//! small wrapper, so the rest of the code never touches the crate directly.

use crate::{Error, Result};
use std::path::Path;

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
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            Error::config(path, format!("not a tokenizer.json that the tokenizers library reads ({e})"))
        })?;
        Ok(Tokenizer { inner })
    }

    /// Wraps a tokenizer built elsewhere (a trainer's output).
    pub fn from_inner(inner: tokenizers::Tokenizer) -> Self {
        Tokenizer { inner }
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Input(format!("cannot tokenize text: {e}")))?;
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

    /// The id of a token string, if the vocabulary has it (e.g. "<|endoftext|>").
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The end-of-text id: GPT-2's "<|endoftext|>" where present.
    pub fn eos_id(&self) -> Option<u32> {
        self.token_id("<|endoftext|>")
    }

    /// Writes `tokenizer.json` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json =
            self.inner.to_string(true).map_err(|e| Error::Input(format!("cannot serialise the tokenizer: {e}")))?;
        crate::io::write_atomic(path, |w| std::io::Write::write_all(w, json.as_bytes()))
    }
}
