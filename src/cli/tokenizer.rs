//! `kiln tokenizer ...`: train a byte-level BPE tokenizer on a corpus.

use crate::data::corpus::expand_inputs;
use crate::data::tokenizer::{train_bpe, EOS};
use crate::Result;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum TokenizerCommand {
    /// Train a GPT-2 style byte-level BPE on text files and write it as tokenizer.json.
    Train {
        /// Text or .jsonl files, glob patterns (quoted) or directories (read recursively).
        #[arg(long, num_args = 1.., required = true)]
        data: Vec<String>,
        /// Vocabulary size, <|endoftext|> (id 0) and the 256 byte symbols included; at least 257.
        #[arg(long)]
        vocab_size: usize,
        /// Output tokenizer.json (written atomically).
        #[arg(long)]
        out: PathBuf,
        /// Only merge pairs seen at least this many times.
        #[arg(long, default_value_t = 2)]
        min_frequency: u64,
    },
}

pub fn run(cmd: TokenizerCommand) -> Result<()> {
    match cmd {
        TokenizerCommand::Train { data, vocab_size, out, min_frequency } => {
            let files = expand_inputs(&data)?;
            let bytes: u64 = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
            println!("training a byte-level BPE on {} file(s), {:.1} MB", files.len(), bytes as f64 / 1e6);
            let t0 = std::time::Instant::now();
            let tok = {
                let _ticker = crate::progress::Ticker::new(true, "training the tokenizer");
                train_bpe(&files, vocab_size, min_frequency)?
            };
            let secs = t0.elapsed().as_secs_f64();
            tok.save(&out)?;
            let eos = tok.eos_id().map_or("none".to_string(), |id| id.to_string());
            println!("vocab size {} ({EOS} = id {eos}) in {secs:.1} s; wrote {}", tok.vocab_size(), out.display());
            if tok.vocab_size() < vocab_size {
                println!(
                    "note: asked for {vocab_size}, but the corpus has no more pairs seen at least {min_frequency} times; \
                     add text or lower --min-frequency for a larger vocabulary"
                );
            }
            Ok(())
        }
    }
}
