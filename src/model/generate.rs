//! Text generation for GPT-2: a key/value cache, so that each new token costs one position's work
//! instead of a forward pass over the whole sequence; transformers' logits processors
//! (repetition penalty, no-repeat n-grams, then temperature, top-k, top-p when sampling); greedy
//! decoding or sampling from a seeded RNG. Greedy output equals transformers'
//! `generate(do_sample=False)` token for token on the oracle fixtures (tests/generate.rs).
//!
//! Several return sequences are rows of one batch: the prompt is run once, its cache copied to
//! every row, and rows leave the batch as they emit the end-of-text token.
//! A request that does not fit the context (prompt + max_new_tokens > n_positions) is refused,
//! not clamped: GPT-2 has no positions past n_positions, and a silently shorter output surprises.

use super::gpt2::{Conv1dWeight, Gpt2, Gpt2Config};
use crate::backend::cpu::attention::attention_decode;
use crate::ops::gemm::{self, WeightLayout};
use crate::ops::{elementwise, layernorm, lora, nf4};
use crate::{Error, Result, Tape, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Keys and values of every layer at the positions seen so far, for a batch of sequences that
/// advance together.
pub struct KvCache {
    k: Vec<Vec<f32>>, // per layer [B, cap, C]
    v: Vec<Vec<f32>>, // per layer [B, cap, C]
    batch: usize,
    cap: usize,
    c: usize,
    len: usize,
}

impl KvCache {
    /// An empty cache for `batch` sequences of up to `capacity` tokens (at most n_positions).
    pub fn new(config: &Gpt2Config, batch: usize, capacity: usize) -> Result<Self> {
        if capacity > config.n_positions {
            return Err(Error::SeqTooLong { t: capacity, n_positions: config.n_positions });
        }
        if batch == 0 {
            return Err(Error::Input("a KV cache needs at least one sequence".into()));
        }
        let n = batch * capacity * config.n_embd;
        Ok(KvCache {
            k: (0..config.n_layer).map(|_| vec![0.0; n]).collect(),
            v: (0..config.n_layer).map(|_| vec![0.0; n]).collect(),
            batch,
            cap: capacity,
            c: config.n_embd,
            len: 0,
        })
    }

    /// Positions cached so far (the same for every sequence).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of sequences (batch rows).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The most positions this cache holds.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// A cache whose row i is a copy of row `rows[i]` of this one (rows may repeat): fans a
    /// prefilled prompt out to several sequences, or drops finished ones.
    pub fn select_rows(&self, rows: &[usize]) -> Result<Self> {
        if let Some(&r) = rows.iter().find(|&&r| r >= self.batch) {
            return Err(Error::Input(format!("row {r} is not in a cache of {} sequences", self.batch)));
        }
        let (row, used) = (self.cap * self.c, self.len * self.c);
        let pick = |layer: &Vec<f32>| {
            let mut out = vec![0.0; rows.len() * row];
            for (dst, &r) in out.chunks_mut(row).zip(rows) {
                dst[..used].copy_from_slice(&layer[r * row..r * row + used]);
            }
            out
        };
        Ok(KvCache {
            k: self.k.iter().map(pick).collect(),
            v: self.v.iter().map(pick).collect(),
            batch: rows.len(),
            ..*self
        })
    }

    /// Writes the k and v thirds of `qkv` ([B, n, 3C]) at positions len..len + n of layer `l`
    /// and returns the q third, [B, n, C].
    fn append(&mut self, l: usize, qkv: &[f32], n: usize) -> Vec<f32> {
        let c = self.c;
        let mut q = vec![0f32; self.batch * n * c];
        for (r, (src, qr)) in qkv.chunks(3 * c).zip(q.chunks_mut(c)).enumerate() {
            let dst = (r / n * self.cap + self.len + r % n) * c;
            qr.copy_from_slice(&src[..c]);
            self.k[l][dst..dst + c].copy_from_slice(&src[c..2 * c]);
            self.v[l][dst..dst + c].copy_from_slice(&src[2 * c..]);
        }
        q
    }
}

impl Gpt2 {
    /// Feeds the next `n` tokens of each of the cache's B sequences (`ids`: [B, n], row-major),
    /// appends their keys and values to `cache`, and returns the logits at each sequence's last
    /// new position, [B, V]. Inference only: nothing is recorded for backward.
    pub fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, c, past) = (cache.batch, cfg.n_embd, cache.len);
        if cache.c != c || cache.k.len() != cfg.n_layer {
            return Err(Error::Input("this KV cache was made for a model of another size".into()));
        }
        if ids.is_empty() || ids.len() % b != 0 {
            return Err(Error::Input(format!("{} token ids do not split into {b} sequences of n >= 1", ids.len())));
        }
        let n = ids.len() / b;
        if past + n > cache.cap {
            return Err(Error::Input(format!(
                "{past} cached + {n} new positions exceed the cache's capacity of {}",
                cache.cap
            )));
        }
        if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= cfg.vocab_size) {
            return Err(Error::TokenOutOfRange { id: id as i64, row: i / n, pos: past + i % n, vocab: cfg.vocab_size });
        }
        let p = |name: &str| self.params.get(name);
        let wte = p("transformer.wte.weight")?; // [V, C]
        let (wte_d, wpe_d) = (wte.f32s()?, p("transformer.wpe.weight")?.f32s()?); // wpe [P, C]

        let mut x = vec![0f32; b * n * c];
        for (r, (row, &id)) in x.chunks_mut(c).zip(ids).enumerate() {
            let (tok, pos) = (id as usize * c, (past + r % n) * c);
            for ((o, t), w) in row.iter_mut().zip(&wte_d[tok..tok + c]).zip(&wpe_d[pos..pos + c]) {
                *o = t + w;
            }
        }
        let mut x = Tensor::from_f32(x, [b, n, c])?; // [B, n, C]
        if self.lora.is_some() {
            let ids = Tensor::from_i32(ids.iter().map(|&id| id as i32).collect(), [b, n])?;
            x = self.wte_lora(&mut Tape::inference(), &ids, x)?;
        }
        for l in 0..cfg.n_layer {
            let h = format!("transformer.h.{l}");
            let a = ln(self, &format!("{h}.ln_1"), &x)?;
            let qkv = conv1d(self, &format!("{h}.attn.c_attn"), &a, false)?; // [B, n, 3C]
            let q = cache.append(l, qkv.f32s()?, n); // [B, n, C]
            let mut a = vec![0f32; b * n * c];
            attention_decode(&mut a, &q, &cache.k[l], &cache.v[l], b, n, past, cache.cap, c, cfg.n_head);
            let a = conv1d(self, &format!("{h}.attn.c_proj"), &Tensor::from_f32(a, [b, n, c])?, false)?;
            x = elementwise::add(&mut Tape::inference(), &x, &a)?;
            let f = conv1d(self, &format!("{h}.mlp.c_fc"), &ln(self, &format!("{h}.ln_2"), &x)?, true)?; // [B, n, F]
            let m = conv1d(self, &format!("{h}.mlp.c_proj"), &f, false)?;
            x = elementwise::add(&mut Tape::inference(), &x, &m)?;
        }
        cache.len += n;
        // Only the last position of each sequence needs logits: the lm_head is the widest GEMM.
        let xd = x.f32s()?;
        let last: Vec<f32> = (0..b).flat_map(|r| &xd[((r + 1) * n - 1) * c..(r + 1) * n * c]).copied().collect();
        // ln_f of the last positions, [B, C]; lm_head is tied to wte: logits [B, V] = h @ wte^T
        // (plus its LoRA update, when the adapter has one).
        let h = ln(self, "transformer.ln_f", &Tensor::from_f32(last, [b, c])?)?;
        self.lm_head(&mut Tape::inference(), &h, wte, false, 0)
    }
}

/// The LayerNorm `prefix` of `model` (weight and bias [C]) over x's last dimension.
fn ln(model: &Gpt2, prefix: &str, x: &Tensor) -> Result<Tensor> {
    let p = |s: &str| model.params.get(&format!("{prefix}.{s}"));
    layernorm::layernorm(&mut Tape::inference(), x, p("weight")?, p("bias")?, model.config.layer_norm_epsilon)
}

/// The Conv1D `prefix` of `model` (weight [in, out], bias [out]): x @ W + b, GELU'd when `gelu`,
/// plus the LoRA update when the model's adapter targets the layer (unmerged: the base weights
/// stay as loaded).
fn conv1d(model: &Gpt2, prefix: &str, x: &Tensor, gelu: bool) -> Result<Tensor> {
    let (b, tape) = (model.params.get(&format!("{prefix}.bias"))?, &mut Tape::inference());
    let ad = model.lora.as_ref().and_then(|l| l.adapter(prefix));
    let y = match (model.conv1d_weight(&format!("{prefix}.weight"))?, ad) {
        (Conv1dWeight::F32(w), None) => return gemm::linear(tape, x, &w, Some(b), WeightLayout::InOut, gelu),
        (Conv1dWeight::F32(w), Some(ad)) => {
            lora::lora_linear(tape, x, &w, Some(b), ad.a, ad.b, ad.scaling, 0.0, false, 0)?
        }
        (Conv1dWeight::Nf4(w), ad) => {
            let ad = ad.map(|ad| nf4::Nf4Lora {
                a: ad.a,
                b: ad.b,
                scaling: ad.scaling,
                dropout_p: 0.0,
                train: false,
                seed: 0,
            });
            nf4::nf4_linear(tape, x, &w, Some(b), ad)?
        }
    };
    if gelu {
        elementwise::gelu(tape, &y)
    } else {
        Ok(y)
    }
}

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
    pub fn validate(&self, config: &Gpt2Config, prompt: &[u32]) -> Result<()> {
        let bad = |msg: String| Err(Error::Input(msg));
        let (v, np, len) = (config.vocab_size, config.n_positions, prompt.len());
        if prompt.is_empty() {
            let hint = config.eos_token_id.map(|e| format!(" (GPT-2 starts texts with <|endoftext|>, id {e})"));
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
    model: &Gpt2,
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
    let v = model.config.vocab_size;
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
