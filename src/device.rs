//! Where a tensor lives. The CPU backend is always present; the CUDA backend comes with the `cuda`
//! feature. Every request for a CUDA device that cannot be served is a clear error, never a panic.

use crate::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// A compute device: the CPU, or a CUDA GPU by ordinal.
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
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;
    /// Parses `cpu`, `cuda` (ordinal 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| Error::Input(format!("unknown device '{s}': use cpu, cuda or cuda:N"))),
        }
    }
}
