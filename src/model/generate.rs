//! Text generation for GPT-2 on the model's own forward pass with a key/value cache
//! (`Model::forward_with`), so that each new token costs one position's work instead of a pass
//! over the whole sequence, on whatever device the model is on; transformers' logits processors
//! (repetition penalty, no-repeat n-grams, then temperature, top-k, top-p when sampling); greedy
//! decoding or sampling from a seeded RNG. Greedy output equals transformers'
//! `generate(do_sample=False)` token for token on the oracle fixtures (tests/generate.rs).
//!
//! Several return sequences are rows of one batch: the prompt is run once, its cache copied to
//! every row, and rows leave the batch as they emit the end-of-text token.
//! A request that does not fit the context (prompt + max_new_tokens > n_positions) is refused,
//! not clamped: GPT-2 has no positions past n_positions, and a silently shorter output surprises.

use super::{Config, KvCache, Model};
use crate::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to generate; the defaults are greedy decoding of 50 tokens with every processor off.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateConfig {
    /// Tokens to add after the prompt (fewer when a sequence emits `eos_token_id`).
    pub max_new_tokens: usize,
    /// Sample from the processed distribution; false = greedy (argmax, ties to the lowest id).
    pub do_sample: bool,
    /// Logits are divided by this before sampling (> 0; ignored when greedy).
    pub temperature: f32,
    /// Sample only among the k highest logits (ties at the k-th kept); 0 = off.
    pub top_k: usize,
    /// Sample only among the most likely tokens whose probabilities sum to top_p; 1.0 = off.
    pub top_p: f32,
    /// Logits of tokens already in the sequence are divided by this when positive and
    /// multiplied when negative (transformers' rule); 1.0 = off.
    pub repetition_penalty: f32,
    /// Ban any token that would complete an n-gram already in the sequence; 0 = off.
    pub no_repeat_ngram_size: usize,
    /// A sequence stops after emitting this token, which is kept in its output.
    pub eos_token_id: Option<u32>,
    /// Seeds sampling; sequence i draws from its own stream, so it does not depend on how many
    /// sequences are generated alongside it.
    pub seed: u64,
    /// Independent samples of the same prompt (more than one needs `do_sample`).
    pub num_return_sequences: usize,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        GenerateConfig {
            max_new_tokens: 50,
            do_sample: false,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            eos_token_id: None,
            seed: 0,
            num_return_sequences: 1,
        }
    }
}

impl GenerateConfig {
    /// Checks this request against the model and prompt, saying what to change when it cannot run.
    pub fn validate(&self, config: &Config, prompt: &[u32]) -> Result<()> {
        let bad = |msg: String| Err(Error::Input(msg));
        let (v, np, len) = (config.vocab_size(), config.n_positions(), prompt.len());
        if prompt.is_empty() {
            let hint = config.bos_token_id().map(|e| format!(" (this model's texts start with token {e})"));
            return bad(format!("the prompt is empty: give at least one token{}", hint.unwrap_or_default()));
        }
        if let Some((pos, &id)) = prompt.iter().enumerate().find(|(_, &id)| id as usize >= v) {
            return bad(format!(
                "prompt token {id} at position {pos} is outside the vocabulary (vocab_size = {v}): \
                 the ids come from another tokenizer than this model's"
            ));
        }
        if len >= np {
            return bad(format!(
                "the prompt has {len} tokens but the model's context is n_positions = {np}: \
                 shorten the prompt to at most {} tokens",
                np - 1
            ));
        }
        if len + self.max_new_tokens > np {
            return bad(format!(
                "a {len}-token prompt plus max_new_tokens = {} makes {} tokens, past the model's context \
                 of n_positions = {np}: set max_new_tokens to at most {} or shorten the prompt",
                self.max_new_tokens,
                len + self.max_new_tokens,
                np - len
            ));
        }
        if self.num_return_sequences == 0 {
            return bad("num_return_sequences must be at least 1".into());
        }
        if !self.do_sample && self.num_return_sequences > 1 {
            return bad(format!(
                "greedy decoding gives the same sequence every time: enable sampling (--do-sample) to get \
                 {} different sequences, or ask for one",
                self.num_return_sequences
            ));
        }
        if self.do_sample && !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "temperature = {} must be positive when sampling (small values approach greedy decoding)",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p = {} must be in (0, 1]; 1.0 turns it off", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!(
                "repetition_penalty = {} must be positive; 1.0 turns it off, values above 1 discourage repeats",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// Generates from `prompt` and returns prompt + new tokens for each of `cfg.num_return_sequences`
/// sequences; `on_token(sequence, id)` sees every token as it is produced (for streaming).
pub fn generate(
    model: &Model,
    prompt: &[u32],
    cfg: &GenerateConfig,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Vec<u32>>> {
    cfg.validate(&model.config, prompt)?;
    let nseq = cfg.num_return_sequences;
    let mut seqs = vec![prompt.to_vec(); nseq];
    if cfg.max_new_tokens == 0 {
        return Ok(seqs);
    }
    let v = model.config.vocab_size();
    // On the GPU: the bf16 weights once, not a cast per token.
    let model = &model.inference_copy()?;
    let mut cache = KvCache::new(&model.config, 1, prompt.len() + cfg.max_new_tokens)?;
    let first = model.forward_cached(prompt, &mut cache)?; // [1, V]
    let mut cache = if nseq > 1 { cache.select_rows(&vec![0; nseq])? } else { cache };
    let mut logits = first.f32s()?.repeat(nseq); // [B, V]; row r belongs to sequence active[r]
    let mut active: Vec<usize> = (0..nseq).collect();
    let mut rngs: Vec<StdRng> = (0..nseq).map(|i| StdRng::seed_from_u64(sequence_seed(cfg.seed, i))).collect();
    for step in 0..cfg.max_new_tokens {
        let mut next = Vec::with_capacity(active.len());
        for (r, &s) in active.iter().enumerate() {
            let tok = next_token(&mut logits[r * v..(r + 1) * v], &seqs[s], cfg, &mut rngs[s])?;
            seqs[s].push(tok);
            on_token(s, tok);
            next.push(tok);
        }
        let keep: Vec<usize> = (0..active.len()).filter(|&r| Some(next[r]) != cfg.eos_token_id).collect();
        if keep.is_empty() || step + 1 == cfg.max_new_tokens {
            break;
        }
        if keep.len() < active.len() {
            // Finished sequences leave the batch, so no more work is spent on them.
            cache = cache.select_rows(&keep)?;
            active = keep.iter().map(|&r| active[r]).collect();
            next = keep.iter().map(|&r| next[r]).collect();
        }
        logits = model.forward_cached(&next, &mut cache)?.f32s()?.to_vec();
    }
    Ok(seqs)
}

/// The RNG seed of sequence `i`: `seed` itself for the first, so one sequence reproduces the
/// first of several.
fn sequence_seed(seed: u64, i: usize) -> u64 {
    seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Picks the next token of `seq` from its logits [V] (processed in place) in transformers' order:
/// repetition penalty, no-repeat n-grams, then when sampling temperature, top-k, top-p.
pub fn next_token(logits: &mut [f32], seq: &[u32], cfg: &GenerateConfig, rng: &mut StdRng) -> Result<u32> {
    apply_repetition_penalty(logits, seq, cfg.repetition_penalty);
    apply_no_repeat_ngram(logits, seq, cfg.no_repeat_ngram_size);
    if !cfg.do_sample {
        return Ok(argmax(logits));
    }
    apply_temperature(logits, cfg.temperature);
    apply_top_k(logits, cfg.top_k);
    apply_top_p(logits, cfg.top_p);
    sample(logits, rng.random::<f64>()).ok_or_else(|| {
        Error::Input(format!(
            "no token is left to sample after {} tokens: no_repeat_ngram_size = {} bans every token of the \
             vocabulary; use a larger size or 0",
            seq.len(),
            cfg.no_repeat_ngram_size
        ))
    })
}

/// Divides the logit of every token present in `seq` by `penalty` when positive and multiplies it
/// when negative (once per distinct token, as transformers does).
pub fn apply_repetition_penalty(logits: &mut [f32], seq: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &t in seq {
        if let Some(s) = seen.get_mut(t as usize).filter(|s| !**s) {
            *s = true;
            let l = &mut logits[t as usize];
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// Sets to -inf every token that would complete an `n`-gram already present in `seq` (after the
/// sequence's last n - 1 tokens); n = 1 bans every token seen.
pub fn apply_no_repeat_ngram(logits: &mut [f32], seq: &[u32], n: usize) {
    if n == 0 || seq.len() + 1 < n {
        return;
    }
    let prefix = &seq[seq.len() + 1 - n..];
    for w in seq.windows(n).filter(|w| &w[..n - 1] == prefix) {
        if let Some(l) = logits.get_mut(w[n - 1] as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Divides every logit by `temperature` (below 1 sharpens the distribution, above 1 flattens it).
pub fn apply_temperature(logits: &mut [f32], temperature: f32) {
    if temperature != 1.0 {
        logits.iter_mut().for_each(|l| *l /= temperature);
    }
}

/// Keeps the `k` highest logits (and any tied with the k-th), setting the rest to -inf; 0 = off.
pub fn apply_top_k(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let mut sorted = logits.to_vec();
    let kth = *sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1;
    logits.iter_mut().filter(|l| **l < kth).for_each(|l| *l = f32::NEG_INFINITY);
}

/// Nucleus filtering as transformers does it: going up from the least likely token, removes
/// tokens while the probability mass removed so far stays <= 1 - top_p; the most likely token
/// always stays.
pub fn apply_top_p(logits: &mut [f32], top_p: f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if top_p >= 1.0 || max == f32::NEG_INFINITY {
        return;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
    let total: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let (limit, mut cum) = (1.0 - top_p as f64, 0.0);
    for &i in &order[..order.len() - 1] {
        cum += ((logits[i] - max) as f64).exp() / total;
        if cum > limit {
            break;
        }
        logits[i] = f32::NEG_INFINITY;
    }
}

/// The index of the largest logit, the lowest one among ties (as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws from softmax(logits) by inverting its CDF at `u` in [0, 1); None when no logit is finite.
pub fn sample(logits: &[f32], u: f64) -> Option<u32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return None;
    }
    let total: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let target = u * total;
    let (mut cum, mut last) = (0.0, None);
    for (i, &l) in logits.iter().enumerate() {
        let p = ((l - max) as f64).exp();
        if p > 0.0 {
            cum += p;
            last = Some(i as u32);
            if cum > target {
                return last;
            }
        }
    }
    last // rounding left the target just past the last token with mass
}
