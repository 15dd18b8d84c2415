//! Supervised fine-tuning data: examples in the formats people use, turned into token rows whose
//! labels mask everything but the completion (-100, PyTorch's ignore index).
//!
//! Formats (JSON lines, or one JSON array of objects):
//! - prompt/completion: `{"prompt": ..., "completion": ...}`
//! - Alpaca: `{"instruction": ..., "input": ..., "output": ...}`, laid out by `ALPACA_*` below
//! - chat: `{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}`, laid
//!   out by a `ChatTemplate` (stored in the run config); every assistant turn is trained on.
//!
//! Each example ends with the end-of-text token (trained on, so the model learns to stop). Rows
//! longer than the context are cut at the end and counted; an example whose prompt alone fills the
//! context is an error naming it. Packing concatenates examples into full rows (no attention
//! reset between them: the usual cheap packing, documented as such).

use super::IGNORE;
use crate::data::tokenizer::Tokenizer;
use crate::{Error, Result, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// Which fields an example has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Decide from the first example's fields.
    Auto,
    PromptCompletion,
    Alpaca,
    Chat,
}

/// kiln's Alpaca layout: section headers only (the instruction, an optional input, the response).
pub const ALPACA_INSTRUCTION: &str = "### Instruction:\n";
pub const ALPACA_INPUT: &str = "\n\n### Input:\n";
pub const ALPACA_RESPONSE: &str = "\n\n### Response:\n";

/// How chat messages become text: each turn is `prefix(role) + content + turn_end`; the
/// assistant's content and turn end are trained on, everything else is prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChatTemplate {
    pub system: String,
    pub user: String,
    pub assistant: String,
    pub turn_end: String,
}

/// The chat templates `ChatTemplate::named` knows.
pub const CHAT_TEMPLATES: &[&str] = &["kiln", "chatml"];

impl ChatTemplate {
    /// A named template: `kiln` (the default: `<|user|>` headers, a newline ends a turn) or
    /// `chatml` (SmolLM2-Instruct's and Qwen's: `<|im_start|>role` ... `<|im_end|>`).
    pub fn named(name: &str) -> crate::Result<Self> {
        match name {
            "kiln" => Ok(Self::default()),
            "chatml" => Ok(ChatTemplate {
                system: "<|im_start|>system\n".into(),
                user: "<|im_start|>user\n".into(),
                assistant: "<|im_start|>assistant\n".into(),
                turn_end: "<|im_end|>\n".into(),
            }),
            other => Err(crate::Error::unknown("chat template", other, CHAT_TEMPLATES.join(", "))),
        }
    }
}

impl Default for ChatTemplate {
    fn default() -> Self {
        ChatTemplate {
            system: "<|system|>\n".into(),
            user: "<|user|>\n".into(),
            assistant: "<|assistant|>\n".into(),
            turn_end: "\n".into(),
        }
    }
}

/// A piece of an example's text and whether the loss is taken on it.
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub text: String,
    pub trained: bool,
}

/// One example: segments in order.
pub type Example = Vec<Segment>;

fn seg(text: impl Into<String>, trained: bool) -> Segment {
    Segment { text: text.into(), trained }
}

/// Reads examples from a .json (array) or JSON-lines file.
pub fn load_examples(path: &Path, format: Format, chat: &ChatTemplate) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::read(path, e))?;
    let records: Vec<(usize, Value)> = if text.trim_start().starts_with('[') {
        let v: Vec<Value> = serde_json::from_str(&text)
            .map_err(|e| Error::malformed(path, "data file", format!("not a JSON array of examples ({e})")))?;
        v.into_iter().enumerate().map(|(i, v)| (i + 1, v)).collect()
    } else {
        let mut out = vec![];
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v = serde_json::from_str(line)
                .map_err(|e| Error::malformed(path, "data file", format!("line {}: not valid JSON ({e})", i + 1)))?;
            out.push((i + 1, v));
        }
        out
    };
    if records.is_empty() {
        return Err(Error::malformed(path, "data file", "holds no examples"));
    }
    let unit = if text.trim_start().starts_with('[') { "example" } else { "line" };
    let format = match format {
        Format::Auto => detect(&records[0].1).ok_or_else(|| {
            Error::malformed(path, "data file", format!("{unit} {}: cannot tell the format: expected \"prompt\"/\"completion\", \"instruction\"/\"output\" or \"messages\"", records[0].0))
        })?,
        f => f,
    };
    records
        .iter()
        .map(|(n, v)| {
            example(v, format, chat).map_err(|msg| Error::malformed(path, "data file", format!("{unit} {n}: {msg}")))
        })
        .collect()
}

fn detect(v: &Value) -> Option<Format> {
    let o = v.as_object()?;
    if o.contains_key("messages") {
        Some(Format::Chat)
    } else if o.contains_key("instruction") {
        Some(Format::Alpaca)
    } else if o.contains_key("prompt") {
        Some(Format::PromptCompletion)
    } else {
        None
    }
}

fn field<'a>(o: &'a serde_json::Map<String, Value>, key: &str, required: bool) -> std::result::Result<&'a str, String> {
    match o.get(key) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) if !required => Ok(""),
        None => Err(format!("lacks the \"{key}\" field")),
        Some(other) => Err(format!("\"{key}\" must be a string, got {other}")),
    }
}

/// One record to segments, or a message saying what is wrong with it.
fn example(v: &Value, format: Format, chat: &ChatTemplate) -> std::result::Result<Example, String> {
    let o = v.as_object().ok_or_else(|| format!("is not a JSON object (got {})", kind(v)))?;
    Ok(match format {
        Format::PromptCompletion => {
            vec![seg(field(o, "prompt", true)?, false), seg(field(o, "completion", true)?, true)]
        }
        Format::Alpaca => {
            let (instruction, input, output) =
                (field(o, "instruction", true)?, field(o, "input", false)?, field(o, "output", true)?);
            let mut prompt = format!("{ALPACA_INSTRUCTION}{instruction}");
            if !input.is_empty() {
                prompt.push_str(ALPACA_INPUT);
                prompt.push_str(input);
            }
            prompt.push_str(ALPACA_RESPONSE);
            vec![seg(prompt, false), seg(output, true)]
        }
        Format::Chat => {
            let msgs = o.get("messages").and_then(|m| m.as_array()).ok_or("lacks a \"messages\" array")?;
            let mut out = vec![];
            for (i, m) in msgs.iter().enumerate() {
                let m = m.as_object().ok_or(format!("message {} is not an object", i + 1))?;
                let (role, content) = (field(m, "role", true)?, field(m, "content", true)?);
                let prefix = match role {
                    "system" => &chat.system,
                    "user" => &chat.user,
                    "assistant" => &chat.assistant,
                    other => {
                        return Err(format!(
                            "message {}: unknown role \"{other}\" (use system, user or assistant)",
                            i + 1
                        ))
                    }
                };
                out.push(seg(prefix.clone(), false));
                let trained = role == "assistant";
                out.push(seg(format!("{content}{}", chat.turn_end), trained));
            }
            if !out.iter().any(|s| s.trained) {
                return Err("has no assistant message to learn from".into());
            }
            out
        }
        Format::Auto => unreachable!("resolved before"),
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Array(_) => "an array",
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
        Value::Null => "null",
        Value::Object(_) => "an object",
    }
}

/// Tokenized examples, ready to batch.
#[derive(Clone, Debug, Default)]
pub struct SftData {
    /// Each row: token ids and labels of the same length (labels -100 where no loss is taken).
    pub rows: Vec<(Vec<u32>, Vec<i32>)>,
    pub examples: usize,
    /// Examples cut to fit the context, and the tokens cut from them.
    pub truncated_examples: usize,
    pub truncated_tokens: usize,
    /// Tokens with a label (what the loss is averaged over).
    pub trained_tokens: usize,
}

/// Tokenizes `examples` into rows of at most `ctx` tokens, appending `eos` (trained) to each.
/// With `pack`, examples are concatenated into rows of exactly `ctx` tokens (the last may be
/// shorter) instead of one row each.
pub fn tokenize(examples: &[Example], tok: &Tokenizer, ctx: usize, eos: Option<u32>, pack: bool) -> Result<SftData> {
    let mut data = SftData { examples: examples.len(), ..Default::default() };
    let (mut cur_ids, mut cur_labels) = (Vec::new(), Vec::new());
    for (n, ex) in examples.iter().enumerate() {
        let (mut ids, mut labels) = (Vec::new(), Vec::new());
        for s in ex {
            let t = tok.encode(&s.text)?;
            labels.extend(t.iter().map(|&id| if s.trained { id as i32 } else { IGNORE }));
            ids.extend(t);
        }
        if let Some(e) = eos {
            ids.push(e);
            labels.push(e as i32);
        }
        let prompt_len = labels.iter().take_while(|&&l| l == IGNORE).count();
        if prompt_len >= ctx {
            return Err(Error::Input(format!(
                "example {}: its prompt alone is {prompt_len} tokens, which fills the context of {ctx}; shorten it, raise the context, or drop the example",
                n + 1
            )));
        }
        if ids.len() > ctx {
            data.truncated_examples += 1;
            data.truncated_tokens += ids.len() - ctx;
            ids.truncate(ctx);
            labels.truncate(ctx);
        }
        data.trained_tokens += labels.iter().filter(|&&l| l != IGNORE).count();
        if !pack {
            data.rows.push((ids, labels));
            continue;
        }
        if cur_ids.len() + ids.len() > ctx && !cur_ids.is_empty() {
            data.rows.push((std::mem::take(&mut cur_ids), std::mem::take(&mut cur_labels)));
        }
        cur_ids.extend(ids);
        cur_labels.extend(labels);
    }
    if !cur_ids.is_empty() {
        data.rows.push((cur_ids, cur_labels));
    }
    Ok(data)
}

/// A batch of rows, right-padded with `pad` to the longest: input ids [B, T] and next-token
/// targets [B, T] (targets[t] = labels[t + 1]; -100 on padding and the last position). Right
/// padding needs no attention mask under causal attention: real positions never see it.
pub fn batch(rows: &[&(Vec<u32>, Vec<i32>)], pad: u32) -> Result<(Tensor, Tensor)> {
    let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(0).max(1);
    let (mut ids, mut tgt) = (vec![pad as i32; rows.len() * t], vec![IGNORE; rows.len() * t]);
    for (b, (rid, rlab)) in rows.iter().map(|r| (&r.0, &r.1)).enumerate() {
        for (i, &id) in rid.iter().enumerate() {
            ids[b * t + i] = id as i32;
        }
        for i in 0..rlab.len().saturating_sub(1) {
            tgt[b * t + i] = rlab[i + 1];
        }
    }
    Ok((Tensor::from_i32(ids, [rows.len(), t])?, Tensor::from_i32(tgt, [rows.len(), t])?))
}
