//! Quantized formats of bitsandbytes, reimplemented bit for bit: 8-bit blockwise with the
//! dynamic map (AdamW8bit's moments, NF4's nested absmax) and NF4 with double quantization
//! (QLoRA's base weights). How NF4 weights are stored in safetensors files is io/nf4.rs.

pub mod blockwise;
pub mod nf4;
