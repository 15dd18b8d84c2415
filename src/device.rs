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
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(ordinal) => Err(Error::CudaNotBuilt(ordinal)),
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => {
                if ordinal != 0 {
                    return Err(Error::Input(format!(
                        "cuda:{ordinal}: kiln drives one GPU, cuda:0. Select another with \
                         CUDA_VISIBLE_DEVICES={ordinal} and --device cuda"
                    )));
                }
                crate::backend::cuda::cuda().map(|_| ())
            }
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            #[cfg(feature = "cuda")]
            Device::Cuda(_)
                if crate::backend::cuda::selected() == Some(crate::backend::cuda::RuntimeKind::Emulator) =>
            {
                write!(f, "emu")
            }
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
            "auto" => Ok(auto()),
            "emu" => emu(),
            _ => {
                let d = match s {
                    "cuda" => Some(Device::Cuda(0)),
                    _ => s.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Device::Cuda),
                }
                .ok_or_else(|| Error::Input(format!("unknown device '{s}': use auto, cpu, cuda, cuda:N or emu")))?;
                #[cfg(feature = "cuda")]
                crate::backend::cuda::select(crate::backend::cuda::RuntimeKind::Driver)?;
                Ok(d)
            }
        }
    }
}

#[cfg(feature = "cuda")]
fn auto() -> Device {
    use crate::backend::cuda;
    if cuda::gpu_present() && cuda::select(cuda::RuntimeKind::Driver).is_ok() {
        if let Ok(cu) = cuda::cuda() {
            eprintln!("device: the GPU ({}); --device cpu to run on the CPU", cu.name());
            return Device::Cuda(0);
        }
    }
    // Said to a person at a terminal; in scripts and logs the CPU is what `auto` always meant.
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        eprintln!("device: the CPU (no NVIDIA GPU found); --device emu runs kiln's CUDA kernels emulated");
    }
    Device::Cpu
}

#[cfg(not(feature = "cuda"))]
fn auto() -> Device {
    // A build without CUDA has only the CPU: nothing to say.
    Device::Cpu
}

#[cfg(feature = "cuda")]
fn emu() -> Result<Device> {
    crate::backend::cuda::select(crate::backend::cuda::RuntimeKind::Emulator)?;
    Ok(Device::Cuda(0))
}

#[cfg(not(feature = "cuda"))]
fn emu() -> Result<Device> {
    Err(Error::Input(
        "--device emu needs kiln built with its CUDA kernels: run tools/install-cuda.sh (nvcc and the CUDA \
         headers, no GPU needed), then cargo build --release --features cuda"
            .into(),
    ))
}
