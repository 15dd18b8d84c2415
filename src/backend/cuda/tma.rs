//! Tensor maps for Hopper's copy engine (TMA): what a `cp.async.bulk.tensor` load reads to find a
//! box of a tensor in device memory. On a GPU the driver encodes one (`cuTensorMapEncodeTiled`);
//! on the emulated device the emulator's twin of that call takes the same parameters, checks them
//! by the same documented rules and writes its own layout into the same 128 bytes. A kernel takes
//! the map by value (`const __grid_constant__ KilnTensorMap`, kernels/hopper.cuh).

use super::runtime::KernelScalar;
use super::Cuda;
use crate::{Error, Result};

/// A CUtensorMap: 128 opaque bytes, 64-byte aligned.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub struct TensorMap(pub [u64; 16]);

// SAFETY: a plain 128-byte struct, passed by value with the bytes the kernel's KilnTensorMap
// parameter holds.
unsafe impl KernelScalar for TensorMap {}

/// How the copy engine permutes a box's 16-byte chunks in shared memory (kernels/hopper.cuh).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Swizzle {
    None,
    B32,
    B64,
    B128,
}

impl Swizzle {
    /// The swizzle's span in bytes (0 for none), as kernels/hopper.cuh takes it.
    pub fn bytes(self) -> u32 {
        match self {
            Swizzle::None => 0,
            Swizzle::B32 => 32,
            Swizzle::B64 => 64,
            Swizzle::B128 => 128,
        }
    }
}

/// A row-major 2-D bf16 tensor in device memory, and the box a TMA load moves.
#[derive(Clone, Copy, Debug)]
pub struct Tiled2d {
    /// Device address of element (0, 0): 16-byte aligned.
    pub ptr: u64,
    pub rows: u64,
    pub cols: u64,
    /// Elements between the starts of consecutive rows (at least `cols`; 16 bytes' worth apart).
    pub pitch: u64,
    pub box_rows: u32,
    pub box_cols: u32,
    pub swizzle: Swizzle,
}

impl Tiled2d {
    /// The rules cuTensorMapEncodeTiled documents, checked here so that a bad map fails the same
    /// way, with a message that says what to change, on a GPU and on the emulated device.
    fn check(&self) -> Result<()> {
        let bad =
            |why: String| Err(Error::Cuda(format!("tensor map of a {} x {} bf16 tensor: {why}", self.rows, self.cols)));
        if self.ptr % 16 != 0 {
            return bad(format!("its address 0x{:x} is not 16-byte aligned", self.ptr));
        }
        if self.rows == 0 || self.cols == 0 || self.rows > 1 << 32 || self.cols > 1 << 32 {
            return bad("each dimension must be 1 to 2^32".into());
        }
        if self.pitch < self.cols || (self.pitch * 2) % 16 != 0 {
            return bad(format!(
                "a row pitch of {} elements must be at least the row and a multiple of 8 (16 bytes)",
                self.pitch
            ));
        }
        if !(1..=256).contains(&self.box_rows) || !(1..=256).contains(&self.box_cols) {
            return bad(format!("a {} x {} box: each side must be 1 to 256", self.box_rows, self.box_cols));
        }
        let row_bytes = self.box_cols * 2;
        if row_bytes % 16 != 0 {
            return bad(format!("a box row of {row_bytes} bytes: it must be a multiple of 16"));
        }
        if self.swizzle != Swizzle::None && row_bytes > self.swizzle.bytes() {
            return bad(format!(
                "a box row of {row_bytes} bytes is wider than the {}-byte swizzle",
                self.swizzle.bytes()
            ));
        }
        Ok(())
    }
}

impl Cuda {
    /// The tensor map of `t` for TMA loads of its box.
    pub fn tensor_map_2d(&self, t: &Tiled2d) -> Result<TensorMap> {
        t.check()?;
        let dims = [t.cols, t.rows];
        let strides = [t.pitch * 2];
        let boxes = [t.box_cols, t.box_rows];
        let estrides = [1u32, 1];
        let mut map = TensorMap([0; 16]);
        match self.driver() {
            None => super::emu::encode_tensor_map(
                &mut map.0,
                2,
                t.ptr,
                &dims,
                &strides,
                &boxes,
                &estrides,
                t.swizzle.bytes(),
            )?,
            Some(d) => d.encode_tensor_map(&mut map, t.ptr, &dims, &strides, &boxes, &estrides, t.swizzle)?,
        }
        Ok(map)
    }
}
