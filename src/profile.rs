//! Per-op wall-time accounting, off by default. `kiln bench train-step` turns it on to show where
//! a step goes (forward and backward of each op family), the figure people studying training
//! internals ask for first.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
/// (op, phase) -> (total time, calls).
type Table = BTreeMap<(&'static str, Phase), (Duration, u64)>;
static TABLE: Mutex<Table> = Mutex::new(BTreeMap::new());

/// Which pass a timed scope belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Forward,
    Backward,
    Optimizer,
}

/// Starts or stops recording.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Clears what was recorded.
pub fn reset() {
    TABLE.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// (op, phase, total time, calls) for everything recorded, slowest first.
pub fn report() -> Vec<(&'static str, Phase, Duration, u64)> {
    let table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<_> = table.iter().map(|((k, p), (d, n))| (*k, *p, *d, *n)).collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.2));
    v
}

/// Times a scope under `name` while profiling is on.
pub struct Scope {
    key: (&'static str, Phase),
    start: Option<Instant>,
}

/// Opens a timed scope for `op` in `phase`; the time is recorded when the guard drops.
pub fn scope(op: &'static str, phase: Phase) -> Scope {
    Scope { key: (op, phase), start: ENABLED.load(Ordering::Relaxed).then(Instant::now) }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(t) = self.start {
            let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
            let e = table.entry(self.key).or_default();
            e.0 += t.elapsed();
            e.1 += 1;
        }
    }
}
