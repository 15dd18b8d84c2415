//! The memory bill: what training a model costs, by component, computed before it starts (from
//! a built model, or from a configuration alone for planning: `kiln memory`). After a run on the
//! device, `steps::run` prints the measured peak beside it (`DeviceMemory`).
//!
//! What each line counts:
//! - weights: as stored, 4 bytes per f32 parameter (the GPU keeps f32 masters too), NF4 layers at
//!   their packed size (about 0.52 bytes a weight at block size 64), the adapter in f32;
//! - bf16 copies (GPU only): the forward reads every f32 base weight as a bf16 copy made for the
//!   step, and one NF4 layer at a time dequantized to bf16;
//! - gradients: 4 bytes per trainable parameter;
//! - optimizer state: per trainable parameter, 8 bytes (AdamW) or 2 + 8/256 (8-bit AdamW; tensors
//!   under 4096 elements keep f32 moments, as bitsandbytes does);
//! - activations: what the ops keep for backward, per token and layer 8C + 2F values (ln_1 out,
//!   qkv 3C, attention out, c_proj out, residual, ln_2 out, c_fc pre-activation and GELU out 2F,
//!   mlp out, residual), plus the logits, in rows padded to a multiple of 128 that their gradient
//!   then overwrites (V' = `backend::padded_vocab(V)`; an adapter on lm_head keeps the two apart,
//!   2V, which the bill does not count), and the embeddings (C); 4 bytes each
//!   on the CPU, 2 (bf16) on the GPU. With gradient checkpointing each block keeps only its input
//!   and one block is recomputed at a time.

use crate::model::{Config, Model};
use crate::nn::lora::LoraConfig;
use crate::optim::adamw8bit::MIN_8BIT_SIZE;
use crate::Result;

/// The parameter counts a bill is made of.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    /// Every parameter, the adapter's and the NF4 layers' included.
    pub params: usize,
    pub trainable: usize,
    /// Base parameters kept in f32 (on the GPU: read through bf16 copies).
    pub f32_base: usize,
    /// Parameters of NF4 layers, their packed bytes, and the largest layer's size.
    pub nf4_params: usize,
    pub nf4_bytes: usize,
    pub nf4_largest: usize,
    /// Adapter parameters (f32).
    pub adapter: usize,
    /// Trainable parameters in tensors too small for 8-bit optimizer state (under
    /// `optim::adamw8bit::MIN_8BIT_SIZE` elements: biases, norms, small adapter matrices), which
    /// keep f32 moments under 8-bit AdamW too.
    pub trainable_small: usize,
}

impl Counts {
    /// The counts of a built model.
    pub fn of(model: &Model) -> Counts {
        let nf4: Vec<_> = model.nf4.iter().flat_map(|q| q.values()).collect();
        let adapter = model.lora.as_ref().map_or(0, |l| l.params.numel());
        let f32_base = model.params.numel();
        let nf4_params = nf4.iter().map(|w| w.numel()).sum();
        let trainable_small = model
            .stores()
            .iter()
            .flat_map(|s| s.iter())
            .filter(|p| p.trainable)
            .map(|p| p.tensor.numel())
            .filter(|&n| n < MIN_8BIT_SIZE)
            .sum();
        Counts {
            params: f32_base + nf4_params + adapter,
            trainable: model.stores().iter().map(|s| s.trainable_numel()).sum(),
            f32_base,
            nf4_params,
            nf4_bytes: nf4.iter().map(|w| w.storage_bytes()).sum(),
            nf4_largest: nf4.iter().map(|w| w.numel()).max().unwrap_or(0),
            adapter,
            trainable_small,
        }
    }

    /// The counts of a model of `config` fine-tuned by `method` ("full", "lora" or "qlora", with
    /// `lora`'s adapter for the last two; "qlora" stores every block's weight matrix in NF4 in
    /// blocks of 64), without building it.
    pub fn planned(config: &Config, method: &str, lora: &LoraConfig) -> Result<Counts> {
        let all: usize = config.param_shapes().iter().map(|(_, d)| d.iter().product::<usize>()).sum();
        // every trainable tensor's size: the base's for full fine-tuning, else the adapter's A and B
        let trainable_tensors: Vec<usize> = match method {
            "full" => config.param_shapes().iter().map(|(_, d)| d.iter().product()).collect(),
            _ => crate::model::lora::resolve(lora, config)?
                .iter()
                .flat_map(|m| [m.r * m.fan_in, m.fan_out * m.r])
                .collect(),
        };
        let adapter = if method == "full" { 0 } else { trainable_tensors.iter().sum() };
        let trainable_small = trainable_tensors.iter().filter(|&&n| n < MIN_8BIT_SIZE).sum();
        let conv: Vec<usize> = crate::model::lora::block_modules(config).iter().map(|(_, _, i, o)| i * o).collect();
        let quantized = method == "qlora";
        let nf4_params = if quantized { conv.iter().sum() } else { 0 };
        let nf4_bytes = if quantized {
            conv.iter().map(|&n| crate::quant::nf4::nf4_storage_bytes(n, crate::quant::nf4::NF4_BLOCKSIZE)).sum()
        } else {
            0
        };
        Ok(Counts {
            params: all + adapter,
            trainable: if method == "full" { all } else { adapter },
            f32_base: all - nf4_params,
            nf4_params,
            nf4_bytes,
            nf4_largest: if quantized { conv.iter().copied().max().unwrap_or(0) } else { 0 },
            adapter,
            trainable_small,
        })
    }
}

/// A training run's memory, in bytes, by component.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bill {
    pub counts: Counts,
    pub weights: f64,
    /// bf16 copies the GPU forward reads (0 on the CPU).
    pub bf16_copies: f64,
    pub gradients: f64,
    pub optimizer: f64,
    pub activations: f64,
    pub activations_checkpointed: f64,
    pub checkpointing: bool,
    pub gpu: bool,
}

impl Bill {
    /// The bill for `counts` at `batch` rows of `seq` tokens under `optimizer` ("adamw" or
    /// "adamw8bit"), on the GPU (bf16 activations, bf16 weight copies) or the CPU.
    pub fn new(
        config: &Config,
        counts: Counts,
        tokens: (usize, usize),
        optimizer: &str,
        gpu: bool,
        checkpointing: bool,
    ) -> Bill {
        let (batch, seq) = tokens;
        let value = if gpu { 2.0 } else { 4.0 };
        // values a block keeps per token for backward: GPT-2's layernorm inputs and outputs, qkv,
        // attention output, MLP pre-activation and GELU output; a Llama's RMSNorm inputs and
        // outputs, q, k, v and their packed rotation, attention output, gate, up and SwiGLU output
        let block = match config {
            Config::Gpt2(c) => 8 * c.n_embd + 2 * c.ffn_dim(),
            Config::Llama(c) => 4 * c.hidden_size + 3 * c.q_width() + 2 * c.kv_width() + 3 * c.intermediate_size,
        };
        let (l, c) = (config.n_layer(), config.n_embd());
        let v = crate::backend::padded_vocab(config.vocab_size());
        let per_token = (l * block + v + c) as f64;
        let per_token_ckpt = (l * c + block + v + c) as f64;
        let tokens = (batch * seq) as f64;
        Bill {
            counts,
            weights: 4.0 * (counts.f32_base + counts.adapter) as f64 + counts.nf4_bytes as f64,
            bf16_copies: if gpu { 2.0 * (counts.f32_base + counts.nf4_largest) as f64 } else { 0.0 },
            gradients: 4.0 * counts.trainable as f64,
            optimizer: optimizer_state(optimizer, &counts),
            activations: value * per_token * tokens,
            activations_checkpointed: value * per_token_ckpt * tokens,
            checkpointing,
            gpu,
        }
    }

    /// Activations as the run keeps them (checkpointed or not).
    pub fn kept_activations(&self) -> f64 {
        if self.checkpointing {
            self.activations_checkpointed
        } else {
            self.activations
        }
    }

    /// The sum of every line.
    pub fn total(&self) -> f64 {
        self.weights + self.bf16_copies + self.gradients + self.optimizer + self.kept_activations()
    }

    /// The bill as lines a person reads before training starts.
    pub fn table(&self, batch: usize, seq: usize) -> String {
        let c = &self.counts;
        let mb = |b: f64| format!("{:9.1} MB", b / 1e6);
        let weights = if c.nf4_params > 0 {
            format!(
                "{} ({} parameters in NF4; {} if all f32)",
                mb(self.weights),
                c.nf4_params,
                mb(4.0 * c.params as f64).trim()
            )
        } else {
            mb(self.weights)
        };
        let on = if self.gpu { "bf16" } else { "f32" };
        let ckpt = |on: bool| if on { " (used)" } else { "" };
        let mut rows = vec![
            ("parameters", format!("{:>12}", c.params)),
            ("trainable", format!("{:>12} ({:.2}%)", c.trainable, 100.0 * c.trainable as f64 / c.params.max(1) as f64)),
            ("weights", weights),
        ];
        if self.gpu {
            rows.push(("bf16 weight copies", mb(self.bf16_copies)));
        }
        rows.extend([
            ("gradients", mb(self.gradients)),
            ("optimizer state", mb(self.optimizer)),
            (
                "activations (est.)",
                format!(
                    "{} at most ({batch} rows of up to {seq} tokens, {on}){}",
                    mb(self.activations),
                    ckpt(!self.checkpointing)
                ),
            ),
            ("  with checkpointing", format!("{}{}", mb(self.activations_checkpointed), ckpt(self.checkpointing))),
            ("total (est.)", mb(self.total())),
        ]);
        rows.iter().map(|(k, v)| format!("  {k:<20} {v}\n")).collect()
    }
}

/// Optimizer state bytes for `counts`' trainable parameters: AdamW's two f32 moments (8 bytes a
/// parameter), or 8-bit AdamW's two codes plus one f32 absmax per block of 256 and moment
/// (2 + 8/256), except in tensors under MIN_8BIT_SIZE, which keep f32 moments (bitsandbytes'
/// min_8bit_size).
pub fn optimizer_state(optimizer: &str, counts: &Counts) -> f64 {
    match optimizer {
        "adamw8bit" => {
            let large = counts.trainable.saturating_sub(counts.trainable_small);
            (2.0 + 8.0 / 256.0) * large as f64 + 8.0 * counts.trainable_small as f64
        }
        _ => 8.0 * counts.trainable as f64,
    }
}
