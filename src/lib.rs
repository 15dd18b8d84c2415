//! kiln: a from-scratch tensor engine for training GPT-2-style language models, with an autograd
//! tape over coarse fused ops, a CPU backend that is the reference for every kernel, and GPT-2
//! reading and writing Hugging Face checkpoints.

pub mod backend;
pub mod bench;
pub mod cli;
pub mod data;
pub mod device;
pub mod error;
pub mod io;
pub mod model;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod profile;
pub mod quant;
pub mod tape;
pub mod tensor;
pub mod train;

pub use device::Device;
pub use error::{Error, Result};
pub use model::gpt2::{Gpt2, Gpt2Config};
pub use tape::{Gradients, Tape};
pub use tensor::{DType, Shape, Tensor, TensorId};
