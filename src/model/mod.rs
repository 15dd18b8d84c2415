//! Models written directly on the ops.

pub mod generate;
pub mod gpt2;
pub mod lora;
