//! Data: batch files of token ids (tokenizers and corpora arrive with the pre-training issue).

/// The target of a position that has none (padding, a prompt token in fine-tuning, the last
/// position): PyTorch's ignore_index, which kiln_kernels.h shares with the kernels.
pub const IGNORE: i32 = crate::abi::KILN_XENT_IGNORE as i32;

pub mod batch;
pub mod corpus;
pub mod parquet;
pub mod sft;
pub mod synthetic;
pub mod tokenizer;
