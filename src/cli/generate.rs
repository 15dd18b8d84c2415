//! `kiln generate`: continues a prompt with a GPT-2 or Llama checkpoint, printing tokens as they come.
//! Text prompts go through the model's tokenizer; `--prompt-ids` takes and prints token ids, for
//! models without one. Timing goes to stderr, so stdout holds only the generated sequences.

use crate::data::tokenizer::Tokenizer;
use crate::io::checkpoint;
use crate::model::generate::{generate, GenerateConfig};
use crate::{Device, Error, Result};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Hugging Face checkpoint directory (config.json + model.safetensors), or a Hub id (fetched into the
    /// Hugging Face cache unless already there).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory made for --model, applied without merging it.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Prompt text, tokenized with <model>/tokenizer.json or --tokenizer.
    #[arg(long, required_unless_present = "prompt_ids", conflicts_with = "prompt_ids")]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids (e.g. 1,2,3); the output is printed as ids too.
    #[arg(long)]
    pub prompt_ids: Option<String>,
    /// Tokens to generate after the prompt (prompt + these must fit in n_positions).
    #[arg(long, default_value_t = 50)]
    pub max_new_tokens: usize,
    /// Sample from the distribution instead of taking the most likely token (greedy).
    #[arg(long)]
    pub do_sample: bool,
    /// Sampling temperature (> 0): lower is more conservative.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    /// Sample only among the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample only among the most likely tokens holding this much probability (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Penalise tokens already in the text (1.0 = off; 1.2 is a common choice).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Never repeat an n-gram of this many tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub no_repeat_ngram_size: usize,
    /// Sequences to sample from the same prompt (more than 1 needs --do-sample).
    #[arg(long, default_value_t = 1)]
    pub num_return_sequences: usize,
    /// Seed of the sampler: the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// tokenizer.json to use instead of <model>/tokenizer.json.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Do not stop at the end-of-text token: always generate --max-new-tokens tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// auto (the GPU if there is one, else the CPU), cpu, cuda or emu (cuda and emu need a kiln built
    /// with the cuda feature).
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn run(mut args: GenerateArgs) -> Result<()> {
    let device = args.device.parse::<Device>()?;
    device.ensure_available()?;
    args.model = crate::io::hub::local_model(&args.model)?;
    let mut model = checkpoint::load_model(&args.model)?;
    if let Some(dir) = &args.adapter {
        crate::io::peft::load_adapter(&mut model, dir)?;
    }
    if device != Device::Cpu {
        model.to_device(device)?;
    }
    let tokenizer = if args.prompt.is_some() || args.tokenizer.is_some() { Some(load_tokenizer(&args)?) } else { None };
    let prompt = match (&args.prompt, &args.prompt_ids, &tokenizer) {
        (Some(text), _, Some(tok)) => tok.encode(text)?,
        (None, Some(ids), _) => parse_ids(ids)?,
        _ => return Err(Error::Input("give a prompt: --prompt TEXT or --prompt-ids 1,2,3".into())),
    };
    let eos = model.config.eos_token_id().or_else(|| tokenizer.as_ref().and_then(|t| t.eos_id()));
    let cfg = GenerateConfig {
        max_new_tokens: args.max_new_tokens,
        do_sample: args.do_sample,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        no_repeat_ngram_size: args.no_repeat_ngram_size,
        eos_token_id: if args.ignore_eos { None } else { eos },
        seed: args.seed,
        num_return_sequences: args.num_return_sequences,
    };
    // Ids are printed only with --prompt-ids; a text prompt prints text.
    let text = if args.prompt.is_some() { tokenizer.as_ref() } else { None };
    let several = cfg.num_return_sequences > 1;
    let mut out = std::io::stdout().lock();

    // The first sequence streams as it grows; the others (generated alongside it) follow in turn.
    let mut first = Echo::new(text, prompt.clone());
    let mut failed: Option<Error> = None;
    let start = std::time::Instant::now();
    let seqs = generate(&model, &prompt, &cfg, |s, tok| {
        if s == 0 && failed.is_none() {
            if several && first.seq.len() == prompt.len() {
                eprintln!("[sequence 1 of {}]", cfg.num_return_sequences);
            }
            first.seq.push(tok);
            failed = first.show(&mut out, false).err();
        }
    })?;
    let secs = start.elapsed().as_secs_f64();
    if let Some(e) = failed {
        return Err(e);
    }
    let generated: usize = seqs.iter().map(|s| s.len() - prompt.len()).sum();
    let mut first = Some(first);
    for (i, seq) in seqs.into_iter().enumerate() {
        let mut echo = first.take().unwrap_or_else(|| Echo::new(text, seq));
        if several && (i > 0 || echo.seq.len() == prompt.len()) {
            eprintln!("[sequence {} of {}]", i + 1, cfg.num_return_sequences);
        }
        echo.show(&mut out, true)?;
    }
    if generated > 0 {
        eprintln!("{generated} tokens in {secs:.2} s ({:.1} tokens/s)", generated as f64 / secs);
    }
    Ok(())
}

/// Writes one growing sequence to stdout: the ids not yet shown, or the new suffix of its text.
struct Echo<'a> {
    tokenizer: Option<&'a Tokenizer>,
    seq: Vec<u32>,
    /// Ids, or bytes of decoded text, already written.
    shown: usize,
}

impl<'a> Echo<'a> {
    fn new(tokenizer: Option<&'a Tokenizer>, seq: Vec<u32>) -> Self {
        Echo { tokenizer, seq, shown: 0 }
    }

    /// Prints what is new; `last` ends the line.
    fn show(&mut self, out: &mut impl Write, last: bool) -> Result<()> {
        let io = |e: std::io::Error| Error::Input(format!("cannot write to stdout: {e}"));
        match self.tokenizer {
            None => {
                for (i, id) in self.seq.iter().enumerate().skip(self.shown) {
                    write!(out, "{}{id}", if i > 0 { "," } else { "" }).map_err(io)?;
                }
                self.shown = self.seq.len();
            }
            Some(tok) => {
                let text = tok.decode(&self.seq)?;
                // A token can end inside a multi-byte character: wait for the rest of it.
                let partial = text.ends_with('\u{FFFD}') && !last;
                if let Some(new) = text.get(self.shown..).filter(|_| !partial) {
                    out.write_all(new.as_bytes()).map_err(io)?;
                    self.shown = text.len();
                }
            }
        }
        if last {
            writeln!(out).map_err(io)?;
        }
        out.flush().map_err(io)
    }
}

fn load_tokenizer(args: &GenerateArgs) -> Result<Tokenizer> {
    let path = args.tokenizer.clone().unwrap_or_else(|| args.model.join("tokenizer.json"));
    if args.tokenizer.is_none() && !path.exists() {
        return Err(Error::Input(format!(
            "--prompt needs a tokenizer, and {} has no tokenizer.json: pass one with --tokenizer FILE, \
             or give the prompt as token ids with --prompt-ids 1,2,3",
            args.model.display()
        )));
    }
    Tokenizer::from_file(&path)
}

/// Parses "1,2,3" (spaces allowed) into token ids.
fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u32>().map_err(|e| {
                let what = match e.kind() {
                    std::num::IntErrorKind::PosOverflow => "is larger than any token id",
                    _ => "is not a token id",
                };
                Error::Input(format!(
                    "--prompt-ids: '{p}' {what}; give non-negative integers separated by commas, like 1,2,3"
                ))
            })
        })
        .collect()
}
