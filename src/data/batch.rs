//! Batch files: safetensors with `input_ids` [B, T] (I64 or I32) and optional `labels` [B, T]
//! with -100 masking. Labels follow Hugging Face's convention: they are aligned with input_ids,
//! and the model shifts them, so position t is trained to predict labels[t + 1].

use super::IGNORE;
use crate::io::safetensors::SafeFile;
use crate::{DType, Error, Result, Tensor};
use std::path::Path;

/// Token ids and optional labels, both I32 [B, T].
#[derive(Clone, Debug)]
pub struct Batch {
    pub input_ids: Tensor,
    pub labels: Option<Tensor>,
}

impl Batch {
    /// Reads a batch file, checking names, ranks, dtypes and that labels match input_ids.
    pub fn load(path: &Path) -> Result<Batch> {
        let f = SafeFile::open(path)?;
        if !f.contains("input_ids") {
            return Err(Error::checkpoint(
                path,
                format!(
                    "has no 'input_ids' tensor (it holds: {}); a batch file needs input_ids [B, T]",
                    f.names().join(", ")
                ),
            ));
        }
        let read = |name: &str| -> Result<Tensor> {
            let t = f.tensor(name)?;
            if t.dtype() != DType::I32 {
                return Err(Error::checkpoint(
                    path,
                    format!("'{name}' has dtype {:?}; token ids must be I64 or I32", t.dtype()),
                ));
            }
            if t.dims().len() != 2 || t.numel() == 0 {
                return Err(Error::checkpoint(
                    path,
                    format!("'{name}' has shape {:?}; expected a non-empty [batch, seq]", t.dims()),
                ));
            }
            // No model accepts a negative id, so it is the file's fault, named here.
            let v = t.i32s()?;
            let ok = |x: i32| x >= 0 || (name == "labels" && x == IGNORE);
            if let Some(i) = v.iter().position(|&x| !ok(x)) {
                let seq = t.dims()[1];
                return Err(Error::checkpoint(
                    path,
                    format!(
                        "'{name}' holds {} at row {}, position {}; token ids are non-negative{}",
                        v[i],
                        i / seq,
                        i % seq,
                        if name == "labels" { " (or -100 to mask a position)" } else { "" }
                    ),
                ));
            }
            Ok(t)
        };
        let input_ids = read("input_ids")?;
        let labels = if f.contains("labels") { Some(read("labels")?) } else { None };
        if let Some(l) = &labels {
            if l.dims() != input_ids.dims() {
                return Err(Error::checkpoint(
                    path,
                    format!("labels {:?} and input_ids {:?} differ in shape", l.dims(), input_ids.dims()),
                ));
            }
        }
        Ok(Batch { input_ids, labels })
    }

    /// [B, T]
    pub fn dims(&self) -> (usize, usize) {
        (self.input_ids.dims()[0], self.input_ids.dims()[1])
    }

    /// Checks the batch against a model with `vocab_size` tokens and a context of `n_positions`:
    /// every id in the vocabulary, T within the context.
    pub fn validate(&self, vocab_size: usize, n_positions: usize) -> Result<()> {
        let (_, t) = self.dims();
        if t > n_positions {
            return Err(Error::SeqTooLong { t, n_positions });
        }
        let ids = self.input_ids.i32s()?;
        if let Some(i) = ids.iter().position(|&id| id < 0 || id as usize >= vocab_size) {
            return Err(Error::TokenOutOfRange { id: ids[i] as i64, row: i / t, pos: i % t, vocab: vocab_size });
        }
        if let Some(l) = &self.labels {
            let lv = l.i32s()?;
            if let Some(i) = lv.iter().position(|&x| x != IGNORE && (x < 0 || x as usize >= vocab_size)) {
                return Err(Error::Input(format!(
                    "label {} at batch row {}, position {} is outside the vocabulary (vocab_size = {}); use -100 to mask a position",
                    lv[i],
                    i / t,
                    i % t,
                    vocab_size
                )));
            }
        }
        Ok(())
    }

    /// Next-token targets [B, T]: targets[b, t] = labels[b, t + 1] (labels default to input_ids),
    /// and -100 at the last position, which has nothing to predict.
    pub fn targets(&self) -> Result<Tensor> {
        let (b, t) = self.dims();
        let labels = self.labels.as_ref().unwrap_or(&self.input_ids).i32s()?;
        let mut out = vec![IGNORE; b * t];
        for r in 0..b {
            out[r * t..r * t + t - 1].copy_from_slice(&labels[r * t + 1..(r + 1) * t]);
        }
        Tensor::from_i32(out, [b, t])
    }
}
