//! Models written directly on the ops.

pub mod gpt2;
