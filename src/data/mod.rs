//! Data: batch files of token ids (tokenizers and corpora arrive with the pre-training issue).

pub mod batch;
pub mod corpus;
pub mod sft;
pub mod synthetic;
pub mod tokenizer;
