//! Optimizers. AdamW with fp32 states; the 8-bit variant and schedules follow with fine-tuning
//! and pre-training.

pub mod adamw;
pub use adamw::{AdamW, AdamWConfig, AdamWScalars};
