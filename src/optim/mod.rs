//! Optimizers. AdamW with fp32 states; the 8-bit variant and schedules follow with fine-tuning
//! and pre-training.

pub mod adamw;
pub use adamw::{AdamW, AdamWConfig, AdamWScalars};
pub mod adamw8bit;
pub use adamw8bit::AdamW8bit;
