//! Where a tensor lives. The CPU backend is always present; the CUDA backend comes with the `cuda`
//! feature. Every request for a CUDA device that cannot be served is a clear error, never a panic.

use crate::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// A compute device: the CPU, or the CUDA backend (a GPU by ordinal, or the emulated device, which
/// the process chooses once: `--device emu` is `Cuda(0)` on the emulator).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl Device {
    /// Checks that this device can be used by this build of kiln.
    pub fn ensure_available(self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(ordinal) => crate::backend::cuda::ensure_available(ordinal),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(_) if crate::backend::cuda::is_emulated() => write!(f, "emu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;
    /// Parses `cpu`, `cuda` (ordinal 0), `cuda:N`, `emu` (the emulated GPU: kiln's CUDA kernels
    /// on the CPU, every memory access checked) or `auto` (the GPU when kiln is built with CUDA
    /// and one is present, else the CPU; it says which on stderr). `cuda` and `emu` choose the
    /// runtime of this process's CUDA backend.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(crate::backend::cuda::auto()),
            "emu" => crate::backend::cuda::emu(),
            _ => {
                let d = match s {
                    "cuda" => Some(Device::Cuda(0)),
                    _ => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Device::Cuda),
                }
                .ok_or_else(|| Error::unknown("device", s, "auto, cpu, cuda, cuda:N or emu"))?;
                crate::backend::cuda::select_driver()?;
                Ok(d)
            }
        }
    }
}
