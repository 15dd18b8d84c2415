//! safetensors files: read through memmap2 (tensors are copied out of the map only when
//! converted), written atomically. Integer token files (I64 from PyTorch) are narrowed to I32
//! with a range check.

use crate::{DType, Error, Result, Tensor};
use half::{bf16, f16};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// An open, validated safetensors file.
pub struct SafeFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
}

impl SafeFile {
    /// Maps `path` and checks its header, so a truncated or corrupt file fails here, by name.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::read(path, e))?;
        // SAFETY: the map is read-only; a file changed underneath us could only garble values,
        // and checkpoints are replaced by rename, never rewritten in place.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::read(path, e))?;
        let f = SafeFile { path: path.to_path_buf(), mmap };
        f.parse()?;
        Ok(f)
    }

    fn parse(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap).map_err(|e| Error::safetensors(&self.path, e.to_string()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's size in bytes.
    pub fn len(&self) -> usize {
        self.mmap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mmap.is_empty()
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> =
            self.parse().map(|st| st.names().into_iter().map(String::from).collect()).unwrap_or_default();
        v.sort();
        v
    }

    /// The `__metadata__` map of the header.
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, meta) =
            SafeTensors::read_metadata(&self.mmap).map_err(|e| Error::safetensors(&self.path, e.to_string()))?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.parse().map(|st| st.tensor(name).is_ok()).unwrap_or(false)
    }

    /// The stored dtype name (e.g. "F32", "I64") and shape of `name`.
    pub fn info(&self, name: &str) -> Result<(String, Vec<usize>)> {
        let st = self.parse()?;
        let v = st.tensor(name).map_err(|_| self.missing(name))?;
        Ok((format!("{:?}", v.dtype()), v.shape().to_vec()))
    }

    fn missing(&self, name: &str) -> Error {
        Error::checkpoint(&self.path, format!("has no tensor named '{name}'"))
    }

    /// Reads `name` in its own dtype: F32, BF16, F16 and U8 as they are, I32 as is, I64 narrowed
    /// to I32 (an error if a value does not fit).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let st = self.parse()?;
        let v = st.tensor(name).map_err(|_| self.missing(name))?;
        let (bytes, shape) = (v.data(), v.shape());
        let bad = |what: &str| Error::safetensors(&self.path, format!("tensor '{name}': {what}"));
        match v.dtype() {
            StDtype::F32 => Tensor::from_f32(cast(bytes), shape),
            StDtype::BF16 => Tensor::from_bf16(cast::<u16>(bytes).into_iter().map(bf16::from_bits).collect(), shape),
            StDtype::F16 => Tensor::from_f16(cast::<u16>(bytes).into_iter().map(f16::from_bits).collect(), shape),
            StDtype::U8 => Tensor::from_u8(bytes.to_vec(), shape),
            StDtype::I32 => Tensor::from_i32(cast(bytes), shape),
            StDtype::I64 => {
                let wide: Vec<i64> = cast(bytes);
                let narrow = wide.iter().map(|&x| i32::try_from(x)).collect::<std::result::Result<Vec<i32>, _>>();
                Tensor::from_i32(narrow.map_err(|_| bad("an I64 value does not fit in 32 bits"))?, shape)
            }
            other => Err(bad(&format!("dtype {other:?} is not supported (use F32, BF16, F16, I64, I32 or U8)"))),
        }
    }

    /// Reads `name` as f32, converting from BF16/F16. Integer tensors are an error.
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let t = self.tensor(name)?;
        match t.dtype() {
            DType::F32 | DType::BF16 | DType::F16 => t.to_dtype(DType::F32),
            other => Err(Error::checkpoint(
                &self.path,
                format!("tensor '{name}' has dtype {other:?}; expected a float tensor (F32, BF16 or F16)"),
            )),
        }
    }
}

/// Errors when float weights read from `path` hold a NaN or an infinity: a model that loads them
/// computes NaN everywhere, far from the file that caused it.
pub fn check_finite(path: &Path, name: &str, t: &Tensor) -> Result<()> {
    let Ok(v) = t.f32s() else { return Ok(()) };
    match v.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::checkpoint(
            path,
            format!(
                "tensor '{name}' holds {} at flat index {i}: the file is corrupt, or the run that wrote it \
                 diverged; use an earlier checkpoint",
                v[i]
            ),
        )),
    }
}

/// Little-endian bytes to a vector of `T` (a copy: the map has no alignment promise for us).
fn cast<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    let n = bytes.len() / std::mem::size_of::<T>();
    let mut out = vec![T::zeroed(); n];
    bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&bytes[..n * std::mem::size_of::<T>()]);
    out
}

/// A host tensor and its bytes, as safetensors' serialiser reads them.
struct TensorView<'a>(&'a Tensor, &'a [u8]);

impl View for TensorView<'_> {
    fn dtype(&self) -> StDtype {
        match self.0.dtype() {
            DType::F32 => StDtype::F32,
            DType::BF16 => StDtype::BF16,
            DType::F16 => StDtype::F16,
            DType::U8 => StDtype::U8,
            DType::I32 => StDtype::I32,
        }
    }
    fn shape(&self) -> &[usize] {
        self.0.dims()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.1)
    }
    fn data_len(&self) -> usize {
        self.1.len()
    }
}

/// Writes `tensors` to `path` atomically, with header metadata {"format": "pt"} (what
/// transformers expects) plus `extra`.
pub fn save(path: &Path, tensors: &[(String, Tensor)], extra: &[(&str, &str)]) -> Result<()> {
    let mut meta: HashMap<String, String> = HashMap::from([("format".to_string(), "pt".to_string())]);
    for (k, v) in extra {
        meta.insert(k.to_string(), v.to_string());
    }
    // A GPU tensor is written from a host copy.
    let host: Vec<Tensor> = tensors.iter().map(|(_, t)| t.to_device(crate::Device::Cpu)).collect::<Result<_>>()?;
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .zip(&host)
        .map(|((n, _), t)| Ok((n.as_str(), TensorView(t, t.raw_bytes()?))))
        .collect::<Result<_>>()?;
    let bytes = safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| Error::Input(format!("cannot serialise {}: {e}", path.display())))?;
    super::write_atomic(path, |w| std::io::Write::write_all(w, &bytes))
}
