//! DType, Shape and Tensor. A tensor is a contiguous, row-major buffer with a shape, held through an
//! `Arc` so that the tape can keep an activation alive without copying it. Writing through
//! `f32_mut` copies the buffer only when someone else still holds it (copy on write).
//!
//! On the CPU, bf16 and f16 are storage formats: they are converted to f32 (with `half`) before any
//! op runs, and back when a checkpoint is written in that dtype.

pub use crate::backend::cuda::CudaStorage;
use crate::{Device, Error, Result};
use half::{bf16, f16};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    /// Raw bytes: packed NF4 nibbles and 8-bit optimizer codes.
    U8,
    /// Token ids and labels.
    I32,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::U8 => 1,
        }
    }

    /// Parses the names used on the command line and in configs (`f32`, `float32`, `bf16`, ...).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "float16" => Ok(DType::F16),
            "u8" | "uint8" => Ok(DType::U8),
            "i32" | "int32" => Ok(DType::I32),
            _ => Err(Error::unknown("dtype", s, "f32, bf16 or f16")),
        }
    }
}

/// The dimensions of a tensor, outermost first.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Shape(Vec<usize>);

impl Shape {
    pub fn new(dims: &[usize]) -> Self {
        Shape(dims.to_vec())
    }
    pub fn dims(&self) -> &[usize] {
        &self.0
    }
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }
    /// The last dimension (1 for a scalar).
    pub fn last(&self) -> usize {
        self.0.last().copied().unwrap_or(1)
    }
    /// The product of every dimension but the last: the number of rows of a row-wise op.
    pub fn rows(&self) -> usize {
        self.numel() / self.last().max(1)
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape(d.to_vec())
    }
}
impl From<Vec<usize>> for Shape {
    fn from(d: Vec<usize>) -> Self {
        Shape(d)
    }
}
impl<const N: usize> From<[usize; N]> for Shape {
    fn from(d: [usize; N]) -> Self {
        Shape(d.to_vec())
    }
}

/// A CPU buffer of one dtype.
#[derive(Clone)]
pub enum CpuStorage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    U8(Vec<u8>),
    I32(Vec<i32>),
}

impl CpuStorage {
    fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::U8(_) => DType::U8,
            CpuStorage::I32(_) => DType::I32,
        }
    }
    fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::U8(v) => v.len(),
            CpuStorage::I32(v) => v.len(),
        }
    }
}

impl Drop for CpuStorage {
    fn drop(&mut self) {
        if let CpuStorage::F32(v) = self {
            crate::backend::cpu::pool::give(std::mem::take(v));
        }
    }
}

/// The buffer behind a tensor. This enum is the one place that knows which device holds the data.
#[derive(Clone)]
pub enum Storage {
    Cpu(CpuStorage),
    /// A buffer of the CUDA backend (which cannot exist in a build without it).
    Cuda(CudaStorage),
}

/// Identifies a tensor for the tape: clones share an id, every new buffer gets a fresh one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn fresh() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// A contiguous tensor with shared storage.
#[derive(Clone)]
pub struct Tensor {
    id: TensorId,
    shape: Shape,
    storage: Arc<Storage>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({:?}, {:?}, {})", self.shape, self.dtype(), self.device())
    }
}

impl Tensor {
    fn from_cpu(storage: CpuStorage, shape: Shape) -> Result<Self> {
        if storage.len() != shape.numel() {
            return Err(Error::shape(
                "tensor",
                format!("{} elements do not fill shape {:?} ({} elements)", storage.len(), shape, shape.numel()),
            ));
        }
        Ok(Tensor { id: TensorId::fresh(), shape, storage: Arc::new(Storage::Cpu(storage)) })
    }

    /// An f32 tensor on the CPU from a vector (its length must equal the shape's element count).
    pub fn from_f32(data: Vec<f32>, shape: impl Into<Shape>) -> Result<Self> {
        Self::from_cpu(CpuStorage::F32(data), shape.into())
    }
    pub fn from_bf16(data: Vec<bf16>, shape: impl Into<Shape>) -> Result<Self> {
        Self::from_cpu(CpuStorage::BF16(data), shape.into())
    }
    pub fn from_f16(data: Vec<f16>, shape: impl Into<Shape>) -> Result<Self> {
        Self::from_cpu(CpuStorage::F16(data), shape.into())
    }
    pub fn from_u8(data: Vec<u8>, shape: impl Into<Shape>) -> Result<Self> {
        Self::from_cpu(CpuStorage::U8(data), shape.into())
    }
    pub fn from_i32(data: Vec<i32>, shape: impl Into<Shape>) -> Result<Self> {
        Self::from_cpu(CpuStorage::I32(data), shape.into())
    }
    /// An f32 tensor of zeros on the CPU.
    pub fn zeros(shape: impl Into<Shape>) -> Self {
        let shape = shape.into();
        let n = shape.numel();
        Tensor { id: TensorId::fresh(), shape, storage: Arc::new(Storage::Cpu(CpuStorage::F32(vec![0.0; n]))) }
    }
    /// An f32 scalar, stored with shape [1].
    pub fn scalar(v: f32) -> Self {
        Tensor {
            id: TensorId::fresh(),
            shape: Shape::new(&[1]),
            storage: Arc::new(Storage::Cpu(CpuStorage::F32(vec![v]))),
        }
    }

    pub fn id(&self) -> TensorId {
        self.id
    }
    /// Gives this tensor another tensor's tape identity (a dtype change of a gradient in place).
    pub(crate) fn set_id(&mut self, id: TensorId) {
        self.id = id;
    }
    pub fn shape(&self) -> &Shape {
        &self.shape
    }
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }
    pub fn dtype(&self) -> DType {
        match &*self.storage {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(s) => s.dtype(),
        }
    }
    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(_) => Device::Cuda(0),
        }
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The same buffer under a new shape with the same element count (a new tape identity).
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.numel() != self.numel() {
            return Err(Error::shape("reshape", format!("cannot view {:?} as {:?}", self.shape, shape)));
        }
        Ok(Tensor { id: TensorId::fresh(), shape, storage: self.storage.clone() })
    }

    /// Copies this tensor to `device` (the same tensor when it is already there).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        let storage = match (&*self.storage, device) {
            (Storage::Cpu(c), Device::Cuda(ordinal)) => {
                crate::backend::cuda::ensure_available(ordinal)?;
                Storage::Cuda(crate::backend::cuda::upload(c)?)
            }
            (Storage::Cuda(c), Device::Cpu) => Storage::Cpu(crate::backend::cuda::download(c)?),
            _ => return Err(Error::Input(format!("cannot copy a tensor from {} to {device}", self.device()))),
        };
        Ok(Tensor { id: TensorId::fresh(), shape: self.shape.clone(), storage: Arc::new(storage) })
    }

    /// A tensor over a CUDA buffer; its length must equal the shape's element count.
    pub fn from_cuda(storage: CudaStorage, shape: impl Into<Shape>) -> Result<Self> {
        let shape = shape.into();
        let len = storage.len();
        // Device buffers of zero elements are allocated with one, so only check the lower bound.
        if len < shape.numel() || (shape.numel() > 0 && len != shape.numel()) {
            return Err(Error::shape("tensor", format!("{len} device elements do not fill shape {shape:?}")));
        }
        Ok(Tensor { id: TensorId::fresh(), shape, storage: Arc::new(Storage::Cuda(storage)) })
    }

    /// The CUDA buffer of a CUDA tensor, or None.
    pub fn cuda_storage(&self) -> Option<&CudaStorage> {
        match &*self.storage {
            Storage::Cuda(c) => Some(c),
            _ => None,
        }
    }

    /// Mutable CUDA buffer; copies it first (on the device) if another tensor shares it.
    pub fn cuda_storage_mut(&mut self) -> Option<&mut CudaStorage> {
        match Arc::make_mut(&mut self.storage) {
            Storage::Cuda(c) => Some(c),
            _ => None,
        }
    }

    /// The f32 data of a CPU tensor, or an error naming `op` when the tensor is another dtype.
    pub fn f32s(&self) -> Result<&[f32]> {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(v),
            _ => Err(host_access_error("f32 access", DType::F32, self.dtype(), self.device())),
        }
    }
    pub fn i32s(&self) -> Result<&[i32]> {
        match &*self.storage {
            Storage::Cpu(CpuStorage::I32(v)) => Ok(v),
            _ => Err(host_access_error("i32 access", DType::I32, self.dtype(), self.device())),
        }
    }
    pub fn u8s(&self) -> Result<&[u8]> {
        match &*self.storage {
            Storage::Cpu(CpuStorage::U8(v)) => Ok(v),
            _ => Err(host_access_error("u8 access", DType::U8, self.dtype(), self.device())),
        }
    }

    /// Mutable f32 data; copies the buffer first if another tensor shares it.
    pub fn f32s_mut(&mut self) -> Result<&mut [f32]> {
        let (dtype, device) = (self.dtype(), self.device());
        match Arc::make_mut(&mut self.storage) {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(v),
            _ => Err(host_access_error("f32 write", DType::F32, dtype, device)),
        }
    }

    /// Mutable u8 data; copies the buffer first if another tensor shares it.
    pub fn u8s_mut(&mut self) -> Result<&mut [u8]> {
        let (dtype, device) = (self.dtype(), self.device());
        match Arc::make_mut(&mut self.storage) {
            Storage::Cpu(CpuStorage::U8(v)) => Ok(v),
            _ => Err(host_access_error("u8 write", DType::U8, dtype, device)),
        }
    }

    /// The data converted to f32 (a copy for bf16/f16/i32/u8, a clone of the Vec for f32). A CUDA
    /// tensor is copied to the host first, which can fail.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(match &*self.storage {
            Storage::Cuda(_) => return self.to_device(Device::Cpu)?.to_f32_vec(),
            Storage::Cpu(CpuStorage::F32(v)) => v.clone(),
            Storage::Cpu(CpuStorage::BF16(v)) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::Cpu(CpuStorage::F16(v)) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::Cpu(CpuStorage::U8(v)) => v.iter().map(|&x| x as f32).collect(),
            Storage::Cpu(CpuStorage::I32(v)) => v.iter().map(|&x| x as f32).collect(),
        })
    }

    /// Converts to another float dtype (f32, bf16, f16), rounding to nearest even. The result is
    /// on the CPU: a GPU tensor of another dtype is copied to the host first (what checkpoint
    /// writing wants); the GPU's own casts are `ops::elementwise::to_compute_dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let f = self.to_f32_vec()?;
        let storage = match dtype {
            DType::F32 => CpuStorage::F32(f),
            DType::BF16 => CpuStorage::BF16(f.iter().map(|&x| bf16::from_f32(x)).collect()),
            DType::F16 => CpuStorage::F16(f.iter().map(|&x| f16::from_f32(x)).collect()),
            _ => {
                return Err(Error::Input(format!("cannot convert a {:?} tensor to {dtype:?}", self.dtype())));
            }
        };
        Self::from_cpu(storage, self.shape.clone())
    }

    /// The raw little-endian bytes of the buffer (what a safetensors file stores); an error for a
    /// CUDA tensor, whose bytes are on the device (`to_device(Device::Cpu)` first).
    pub fn raw_bytes(&self) -> Result<&[u8]> {
        Ok(match &*self.storage {
            Storage::Cuda(_) => {
                return Err(Error::Cuda(
                    "raw_bytes of a CUDA tensor: its bytes are on the GPU; copy it with to_device(Device::Cpu) first"
                        .into(),
                ))
            }
            Storage::Cpu(CpuStorage::F32(v)) => bytemuck::cast_slice(v),
            Storage::Cpu(CpuStorage::BF16(v)) => bytemuck::cast_slice(v),
            Storage::Cpu(CpuStorage::F16(v)) => bytemuck::cast_slice(v),
            Storage::Cpu(CpuStorage::U8(v)) => v,
            Storage::Cpu(CpuStorage::I32(v)) => bytemuck::cast_slice(v),
        })
    }

    /// The first element as f32 (for scalars such as a loss).
    pub fn item(&self) -> Result<f32> {
        self.f32s()?.first().copied().ok_or_else(|| Error::shape("item", "the tensor is empty"))
    }

    /// Checks the dtype, naming `op` in the error.
    pub fn expect_dtype(&self, op: &'static str, dtype: DType) -> Result<()> {
        if self.dtype() != dtype {
            return Err(Error::DType { op, expected: dtype, got: self.dtype() });
        }
        Ok(())
    }
}

/// Why host data cannot be read: the tensor lives on a device (move it with `to_device`), or it
/// holds another dtype.
fn host_access_error(op: &'static str, expected: DType, got: DType, device: Device) -> Error {
    if device != Device::Cpu {
        return Error::DeviceMismatch { op, a: device, b: Device::Cpu };
    }
    Error::DType { op, expected, got }
}
