//! Files: safetensors through a memory map, Hugging Face checkpoint directories, atomic writes.

pub mod checkpoint;
pub mod hub;
pub mod nf4;
pub mod peft;
pub mod safetensors;

use crate::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary name a file is written under before it is renamed into place.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Writes `path` atomically: into a temporary file beside it, flushed to disk, then renamed, so
/// a crash leaves either the old file or the new one, never half of one.
pub fn write_atomic(
    path: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        fill(&mut w)?;
        crash_point();
        w.flush()?;
        w.get_ref().sync_all()?;
        drop(w);
        crash_point();
        std::fs::rename(&tmp, path)?;
        crash_point();
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::write(path, e));
    }
    Ok(())
}

/// Deletes a file if it exists (a crash point follows, so tests stop kiln right after it).
pub(crate) fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            crash_point();
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::write(path, e)),
    }
}

/// A place where a write can be cut short, for the crash tests (tests/crash.rs): with
/// `KILN_CRASH_AT=N` in the environment, the N-th crash point this process reaches kills it with
/// SIGKILL, so a test can stop kiln at every step of every write and check what it left. Without
/// the variable it is one relaxed load.
pub fn crash_point() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    static REACHED: AtomicU64 = AtomicU64::new(0);
    let Some(at) = *AT.get_or_init(|| std::env::var("KILN_CRASH_AT").ok().and_then(|v| v.parse().ok())) else {
        return;
    };
    if REACHED.fetch_add(1, Ordering::SeqCst) + 1 == at {
        let me = std::process::id().to_string();
        let _ = std::process::Command::new("kill").args(["-KILL", &me]).status();
        std::process::abort();
    }
}
