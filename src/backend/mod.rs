//! Backends: plain functions over buffers, with no knowledge of the tape. The CPU backend is the
//! readable reference every CUDA kernel is checked against.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
