//! Launch wrappers for kernels/nf4.cu: NF4 quantization of a tensor and dequantization of a
//! double-quantized weight (`quant::nf4::Nf4Weight`) on the device, each equal to the CPU's bit
//! for bit; plus the host twins (`twin`).

use super::{bf16, cuda, DevBuf, DeviceElem, Kernel};
use crate::abi::KILN_NF4_THREADS;
use crate::quant::blockwise::dynamic_map;
use crate::quant::nf4::{check_nf4_size, nf4_midpoints, Nf4, Nf4Weight, NF4_CODE};
use crate::{Error, Result};

/// The tables the kernel reads: the signed dynamic map (256), then the NF4 values (16).
pub fn tables() -> Vec<f32> {
    let mut t = dynamic_map(true);
    t.extend_from_slice(&NF4_CODE);
    t
}

/// An NF4 weight in device memory, as `Nf4Weight` holds it on the host: packed codes, the 8-bit
/// absmax codes, their nested scales and offset, and the tables. Without absmax codes (single
/// quantization, `Nf4`), `nested_absmax` holds the f32 absmax of every block.
pub struct DevNf4 {
    pub packed: DevBuf<u8>,
    pub absmax_codes: Option<DevBuf<u8>>,
    pub nested_absmax: DevBuf<f32>,
    pub tables: DevBuf<f32>,
    pub offset: f32,
    pub blocksize: usize,
    pub numel: usize,
}

impl DevNf4 {
    /// Copies `w` to the device (its 4-bit form: about a quarter of the bytes of bf16).
    pub fn upload(w: &Nf4Weight) -> Result<DevNf4> {
        let cu = cuda()?;
        let numel = w.numel();
        let blocks = numel.div_ceil(w.blocksize.max(1));
        if w.blocksize == 0 || w.blocksize % 8 != 0 || numel % 2 != 0 || w.packed.len() * 2 != numel {
            return Err(Error::Shape {
                op: "cuda::nf4",
                msg: format!(
                    "an NF4 weight of {numel} elements needs a block size that is a multiple of 8 (bitsandbytes' are) \
                     and {} packed bytes; got block size {} and {} bytes",
                    numel / 2,
                    w.blocksize,
                    w.packed.len()
                ),
            });
        }
        if w.absmax.codes.len() != blocks || w.absmax.nested_absmax.len() != blocks.div_ceil(256) {
            return Err(Error::Shape {
                op: "cuda::nf4",
                msg: format!(
                    "{blocks} blocks need {blocks} absmax codes and {} nested scales; got {} and {}",
                    blocks.div_ceil(256),
                    w.absmax.codes.len(),
                    w.absmax.nested_absmax.len()
                ),
            });
        }
        Ok(DevNf4 {
            packed: cu.upload(&w.packed)?,
            absmax_codes: Some(cu.upload(&w.absmax.codes)?),
            nested_absmax: cu.upload(&w.absmax.nested_absmax)?,
            tables: cu.upload(&tables())?,
            offset: w.absmax.offset,
            blocksize: w.blocksize,
            numel,
        })
    }
}

impl DevNf4 {
    /// Copies a singly quantized tensor (f32 absmax, bitsandbytes' compress_statistics=False) to
    /// the device.
    pub fn upload_single(q: &crate::quant::nf4::Nf4) -> Result<DevNf4> {
        let cu = cuda()?;
        let blocks = q.numel.div_ceil(q.blocksize.max(1));
        if q.blocksize == 0 || q.blocksize % 8 != 0 || q.packed.len() * 2 != q.numel || q.absmax.len() != blocks {
            return Err(Error::Shape {
                op: "cuda::nf4",
                msg: format!(
                    "an NF4 tensor of {} elements in blocks of {} needs {} packed bytes and {blocks} absmax; got {} and {}",
                    q.numel,
                    q.blocksize,
                    q.numel / 2,
                    q.packed.len(),
                    q.absmax.len()
                ),
            });
        }
        Ok(DevNf4 {
            packed: cu.upload(&q.packed)?,
            absmax_codes: None,
            nested_absmax: cu.upload(&q.absmax)?,
            tables: cu.upload(&tables())?,
            offset: 0.0,
            blocksize: q.blocksize,
            numel: q.numel,
        })
    }
}

/// The element types `nf4_dequantize` writes: f32 (the CPU's bits) or bf16 (those rounded to
/// nearest even, what the bf16 GEMMs read).
pub trait Nf4Out: DeviceElem + sealed::Sealed {
    const KERNEL: Kernel;
    /// Packed bytes a thread takes per step (16 bytes of output).
    const BYTES_PER_THREAD: usize;
}
impl Nf4Out for f32 {
    const KERNEL: Kernel = Kernel::Nf4Dequantize;
    const BYTES_PER_THREAD: usize = 2;
}
impl Nf4Out for bf16 {
    const KERNEL: Kernel = Kernel::Nf4DequantizeBf16;
    const BYTES_PER_THREAD: usize = 4;
}
mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

/// out = the weight `w` stands for (numel elements): in f32 the bits of
/// `Nf4Weight::dequantize_into`, in bf16 those rounded to nearest even.
pub fn nf4_dequantize<O: Nf4Out>(out: &mut DevBuf<O>, w: &DevNf4) -> Result<()> {
    if out.len() != w.numel {
        return Err(Error::Shape {
            op: "cuda::nf4_dequantize",
            msg: format!("out has {} elements, the weight {}", out.len(), w.numel),
        });
    }
    // whole blocks of a multiple of 8 elements (upload checked): whole units of 2 or 4 bytes
    let n_units = w.packed.len() / O::BYTES_PER_THREAD;
    if n_units == 0 {
        return Ok(());
    }
    let cu = cuda()?;
    let threads = KILN_NF4_THREADS as usize;
    let cfg = super::grid_stride(cu, n_units, threads, threads as u32, 8);
    let (blocksize, n) = (w.blocksize as i32, n_units as i64);
    let mut l = cu.launch_builder(O::KERNEL);
    // A null pointer for the codes selects single quantization (f32 absmax in nested_absmax).
    let null: u64 = 0;
    l.arg_mut(out).arg(&w.packed);
    match &w.absmax_codes {
        Some(codes) => l.arg(codes),
        None => l.arg(&null),
    };
    l.arg(&w.nested_absmax).arg(&w.tables).arg(&w.offset);
    l.arg(&blocksize).arg(&n);
    // SAFETY: the arguments are the kernel's (either kernel: the same parameters), in its parameter order; DevNf4::upload checked that the packed bytes (BYTES_PER_THREAD * n_units), the absmax codes and the nested scales cover every block the units index, and out holds 2 * BYTES_PER_THREAD * n_units elements (checked above).
    unsafe { l.launch(cfg) }?;
    Ok(())
}

/// NF4 codes (packed two a byte, high nibble first) and the absmax of every block of `blocksize`
/// elements of `x`: `quant::nf4::quantize_nf4` on the device, the same bits. The size must be a
/// positive multiple of a block size bitsandbytes supports (the error says which).
pub fn nf4_quantize(x: &DevBuf<f32>, blocksize: usize) -> Result<(DevBuf<u8>, DevBuf<f32>)> {
    check_nf4_size(x.len(), blocksize)?;
    let cu = cuda()?;
    let n_blocks = x.len() / blocksize;
    let (mut packed, mut absmax) = (cu.alloc::<u8>(x.len() / 2)?, cu.alloc::<f32>(n_blocks)?);
    let mids = cu.upload(&nf4_midpoints())?;
    // one warp per quantization block
    let cfg = super::grid_stride(cu, n_blocks, KILN_NF4_THREADS as usize / 32, KILN_NF4_THREADS as u32, 8);
    let (bs, nb) = (blocksize as i32, n_blocks as i64);
    let mut l = cu.launch_builder(Kernel::Nf4Quantize);
    l.arg_mut(&mut packed).arg_mut(&mut absmax).arg(x).arg(&mids).arg(&bs).arg(&nb);
    // SAFETY: the arguments are the kernel's, in order; x holds n_blocks * blocksize elements (checked), packed half that, absmax n_blocks, mids 15.
    unsafe { l.launch(cfg) }?;
    Ok((packed, absmax))
}

/// The host twins of kernels/nf4.cuh (kernels/host/nf4.cu).
pub mod twin {
    use crate::quant::nf4::{check_nf4_size, nf4_midpoints, Nf4, Nf4Weight};

    extern "C" {
        fn kiln_host_nf4_quantize(
            packed: *mut u8,
            absmax: *mut f32,
            x: *const f32,
            mids: *const f32,
            blocksize: i32,
            n_blocks: i64,
        );
        fn kiln_host_nf4_dequantize(
            out: *mut f32,
            packed: *const u8,
            absmax_codes: *const u8,
            nested_absmax: *const f32,
            tables: *const f32,
            offset: f32,
            blocksize: i32,
            n_units: i64,
        );
    }

    /// `quantize_nf4` through the kernel's own math, on the host.
    pub fn nf4_quantize(x: &[f32], blocksize: usize) -> crate::Result<Nf4> {
        check_nf4_size(x.len(), blocksize)?;
        let (mut packed, mut absmax) = (vec![0u8; x.len() / 2], vec![0f32; x.len() / blocksize]);
        let mids = nf4_midpoints();
        // SAFETY: x holds absmax.len() blocks of blocksize elements, packed half as many bytes, mids 15 values.
        unsafe {
            kiln_host_nf4_quantize(
                packed.as_mut_ptr(),
                absmax.as_mut_ptr(),
                x.as_ptr(),
                mids.as_ptr(),
                blocksize as i32,
                absmax.len() as i64,
            )
        };
        Ok(Nf4 { packed, absmax, blocksize, numel: x.len() })
    }

    /// `Nf4Weight::dequantize` through the kernel's own math, on the host. Panics if `w` is not
    /// self-consistent (a test helper: `DevNf4::upload` says why a weight is refused).
    pub fn nf4_dequantize(w: &Nf4Weight) -> Vec<f32> {
        let blocks = w.numel().div_ceil(w.blocksize);
        assert!(w.blocksize % 8 == 0 && w.packed.len() * 2 == w.numel(), "an inconsistent NF4 weight");
        assert!(w.absmax.codes.len() == blocks && w.absmax.nested_absmax.len() == blocks.div_ceil(256));
        let tables = super::tables();
        let mut out = vec![0f32; w.numel()];
        // SAFETY: out holds 2 * packed.len() elements, packed.len() / 2 whole 2-byte units (blocks of a multiple of 8); the asserts above bound every absmax and nested index.
        unsafe {
            kiln_host_nf4_dequantize(
                out.as_mut_ptr(),
                w.packed.as_ptr(),
                w.absmax.codes.as_ptr(),
                w.absmax.nested_absmax.as_ptr(),
                tables.as_ptr(),
                w.absmax.offset,
                w.blocksize as i32,
                (w.packed.len() / 2) as i64,
            )
        };
        out
    }
}

/// `w`'s packed form on the device: uploaded on first use and kept with the weight (its
/// `DeviceCopy`), so a QLoRA model's base stays in device memory in 4 bits.
pub fn resident(w: &Nf4Weight) -> Result<std::sync::Arc<DevNf4>> {
    w.device.get_or_make(|| DevNf4::upload(w))
}

impl crate::backend::Nf4 for super::Cuda {
    /// bf16 [k, n] from the resident packed weight, one launch of nf4_dequantize_bf16.
    fn nf4_dequantize(&self, w: &Nf4Weight) -> Result<crate::Tensor> {
        let d = resident(w)?;
        let mut out = self.alloc::<bf16>(w.numel())?;
        nf4_dequantize(&mut out, &d)?;
        super::tensor::wrap_bf16(out, &w.dims)
    }
    /// The fused NF4 GEMM (kernels/gemm.cu, gemm_mma_nf4_*) on the resident weight: W is decoded
    /// tile by tile into shared memory, never written out.
    fn nf4_matmul(
        &self,
        x: &crate::Tensor,
        w: &Nf4Weight,
        bias: Option<&crate::Tensor>,
        trans: bool,
    ) -> Result<crate::Tensor> {
        use super::tensor::{bf16_in, new_bf16};
        const OP: &str = "nf4_matmul";
        let [rows, cols] = w.dims;
        let (k, n) = if trans { (cols, rows) } else { (rows, cols) };
        let m = x.numel() / k.max(1);
        let d = resident(w)?;
        let xd = bf16_in(OP, x)?;
        let biasd = bias.map(|b| bf16_in(OP, b)).transpose()?;
        let desc =
            crate::backend::GemmDesc::new(m, n, k, crate::backend::Trans::No, crate::backend::Trans::from_bool(trans));
        new_bf16(&[m, n], |o| super::gemm::matmul_nf4(o, None, xd, &d, biasd, &desc))
    }
    fn nf4_to_device(&self, w: &Nf4Weight) -> Result<()> {
        resident(w).map(|_| ())
    }
    fn nf4_quantize(&self, x: &crate::Tensor, blocksize: usize) -> Result<Nf4> {
        let xd = super::tensor::f32_in("nf4_quantize", x)?;
        let (packed, absmax) = nf4_quantize(xd, blocksize)?;
        let cu = cuda()?;
        Ok(Nf4 { packed: cu.download(&packed)?, absmax: cu.download(&absmax)?, blocksize, numel: x.numel() })
    }
}
