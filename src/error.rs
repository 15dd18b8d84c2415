//! kiln's one error type. Every variant renders as a sentence that says what went wrong and what
//! to do about it, because these messages are what a user sees when a command fails.

use std::path::{Path, PathBuf};

/// Everything that can go wrong in kiln, each with the context a user needs to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}: {source}. Check that the path exists and that you may read it.", path.display())]
    Read { path: PathBuf, source: std::io::Error },

    #[error("cannot write {}: {source}. Check that the directory exists, is writable and has free space.", path.display())]
    Write { path: PathBuf, source: std::io::Error },

    #[error("{}: malformed config: {msg}", path.display())]
    Config { path: PathBuf, msg: String },

    /// A file kiln reads that is not config: a data file, a tokenizer, a run's own records.
    #[error("{}: malformed {kind}: {msg}", path.display())]
    Malformed { path: PathBuf, kind: &'static str, msg: String },

    #[error("{}: not a readable safetensors file: {msg}. The file may be truncated or corrupt; re-download or re-export it.", path.display())]
    Safetensors { path: PathBuf, msg: String },

    #[error("{}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },

    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },

    #[error("{op}: expected dtype {expected:?}, got {got:?}")]
    DType { op: &'static str, expected: crate::DType, got: crate::DType },

    #[error("{op}: one input is on {a} and another on {b}. Move them to one device with Tensor::to_device (a model: Model::to_device).")]
    DeviceMismatch { op: &'static str, a: crate::Device, b: crate::Device },

    #[error("device cuda:{0} requested, but this kiln was built without CUDA. Rebuild with `cargo build --release --features cuda` (tools/install-cuda.sh installs the nvcc it needs), or use --device cpu.")]
    CudaNotBuilt(usize),

    /// A CUDA failure: no driver or device, out of memory, a failed launch.
    #[error("{0}")]
    Cuda(String),

    #[error("token id {id} at batch row {row}, position {pos} is outside the vocabulary (vocab_size = {vocab}). The batch was made with a different tokenizer than this model's.")]
    TokenOutOfRange { id: i64, row: usize, pos: usize, vocab: usize },

    #[error("the batch has {t} tokens per row but the model's context is n_positions = {n_positions}. Cut the rows to at most {n_positions} tokens.")]
    SeqTooLong { t: usize, n_positions: usize },

    /// A named choice (a preset, a method, a dtype, a device) that is not one kiln knows.
    #[error("unknown {what} '{value}': use {choices}")]
    Unknown { what: &'static str, value: String, choices: String },

    /// A number outside the range its meaning allows.
    #[error("{what} {value} must be {allowed}")]
    OutOfRange { what: String, value: String, allowed: String },

    /// Saved state (optimizer moments, an adapter, a cache, a tokenizer) that does not belong to
    /// the model it is used with; the message says which and what to use instead.
    #[error("{0}")]
    Mismatch(String),

    #[error("no parameter named '{0}'")]
    NoParam(String),

    #[error("{} already holds a run: pass --resume to continue it, --overwrite to replace it, or choose another --out", .0.display())]
    RunExists(PathBuf),

    #[error("{} holds no run to resume (no run.toml); start one without --resume", .0.display())]
    NoRun(PathBuf),

    #[error("backward: the loss does not depend on any watched parameter (was the forward pass run on this tape?)")]
    NotTracked,

    /// Any other bad input, with a message that says what is wrong and what to do.
    #[error("{0}")]
    Input(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn read(path: &Path, source: std::io::Error) -> Self {
        Error::Read { path: path.to_path_buf(), source }
    }
    pub(crate) fn write(path: &Path, source: std::io::Error) -> Self {
        Error::Write { path: path.to_path_buf(), source }
    }
    pub(crate) fn config(path: &Path, msg: impl Into<String>) -> Self {
        Error::Config { path: path.to_path_buf(), msg: msg.into() }
    }
    pub(crate) fn malformed(path: &Path, kind: &'static str, msg: impl Into<String>) -> Self {
        Error::Malformed { path: path.to_path_buf(), kind, msg: msg.into() }
    }
    pub(crate) fn safetensors(path: &Path, msg: impl Into<String>) -> Self {
        Error::Safetensors { path: path.to_path_buf(), msg: msg.into() }
    }
    pub(crate) fn checkpoint(path: &Path, msg: impl Into<String>) -> Self {
        Error::Checkpoint { path: path.to_path_buf(), msg: msg.into() }
    }
    pub(crate) fn unknown(what: &'static str, value: impl Into<String>, choices: impl Into<String>) -> Self {
        Error::Unknown { what, value: value.into(), choices: choices.into() }
    }
    pub(crate) fn dropout(what: &str, p: f32) -> Self {
        Error::OutOfRange {
            what: format!("{what}dropout probability"),
            value: p.to_string(),
            allowed: "in [0, 1)".into(),
        }
    }
    pub(crate) fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape { op, msg: msg.into() }
    }
}
