//! Fuzzing of every file kiln reads: valid files written by kiln's own writers, mutated (cut short,
//! bytes flipped, huge lengths and offsets written into headers, dtypes and shapes swapped,
//! NaN and infinities written into data and configs, non-UTF-8 inserted, emptied) and handed to
//! the loader. Whatever the input, the loader must return (no panic), an error must name the file,
//! the heap must not grow by more than a small multiple of the input (a header's sizes are checked
//! against the file before anything is allocated), and what loads must work downstream (a forward
//! pass, an encode, a batch) without panicking. A few cases run through the `kiln` binary too: exit
//! code 1 and one `error:` line naming the file.
//!
//! Each target runs a fixed number of cases from a fixed seed, so `cargo test` is bounded and
//! repeatable. KILN_FUZZ_CASES=N runs N cases per target (the binary targets N/8) and
//! KILN_FUZZ_SEED=S draws other cases; a failure prints the smallest mutation list that fails.

#[global_allocator]
static ALLOC: kiln::memory::CountingAlloc = kiln::memory::CountingAlloc;

use kiln::data::batch::Batch;
use kiln::data::corpus::{build_token_file, check_vocab, TokenFile};
use kiln::data::sft::{self, ChatTemplate, Format};
use kiln::data::tokenizer::{train_bpe, Tokenizer};
use kiln::io::{checkpoint, peft, safetensors as kst};
use kiln::model::lora;
use kiln::model::Mode;
use kiln::nn::lora::LoraConfig;
use kiln::train::config::RunConfig;
use kiln::{DType, Gpt2Config, Model, Tape, Tensor};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::Value;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

mod binary;
mod mutate;
mod readers;
mod regressions;
mod seeds;

use mutate::*;
use seeds::*;

/// Cases per target: KILN_FUZZ_CASES, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("KILN_FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// A runner with a fixed seed per target (varied by KILN_FUZZ_SEED), no persistence files.
fn runner(target: &str, n: u32) -> TestRunner {
    let salt: u64 = std::env::var("KILN_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut seed = [0u8; 32];
    for (i, b) in target.bytes().chain(salt.to_le_bytes()).enumerate() {
        seed[i % 32] = seed[i % 32].wrapping_mul(31).wrapping_add(b);
    }
    let config = Config { cases: n, failure_persistence: None, max_shrink_iters: 256, ..Config::default() };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed))
}

/// The heap is measured per case, in-process, so every test of this file runs alone: each takes
/// this lock first.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Heap a loader may take beyond its input: the tiny models here hold ~100 kB of weights.
const HEAP_SLACK: usize = 32 << 20;

/// Runs `load` on a mutated input of `input_len` bytes: no panic, no heap beyond a small multiple
/// of the input, and an error that names `file`. Returns what loaded.
fn check<T>(file: &Path, input_len: usize, load: impl FnOnce() -> kiln::Result<T>) -> Result<Option<T>, TestCaseError> {
    ALLOC.install();
    kiln::memory::reset_peak();
    let before = kiln::memory::peak_live_bytes().unwrap_or(0);
    let out = catch_unwind(AssertUnwindSafe(load));
    let grew = kiln::memory::peak_live_bytes().unwrap_or(0).saturating_sub(before);
    let limit = HEAP_SLACK + 16 * input_len;
    prop_assert!(grew <= limit, "loading {} took {grew} bytes of heap (limit {limit})", file.display());
    let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    match out {
        Err(p) => Err(TestCaseError::fail(format!("loading {} panicked: {}", file.display(), panic_text(&p)))),
        Ok(Err(e)) => {
            let msg = e.to_string();
            prop_assert!(msg.contains(name), "the error does not name {name}: {msg}");
            Ok(None)
        }
        Ok(Ok(v)) => Ok(Some(v)),
    }
}

/// Runs a step after a successful load: errors are fine, panics are not.
fn downstream<T>(what: &str, f: impl FnOnce() -> kiln::Result<T>) -> Result<(), TestCaseError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Err(p) => Err(TestCaseError::fail(format!("{what} panicked on a file that loaded: {}", panic_text(&p)))),
        Ok(_) => Ok(()),
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// Runs `target` over the strategy; a failure panics with proptest's minimal failing input.
fn fuzz<S: Strategy>(target: &str, n: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let t0 = std::time::Instant::now();
    if let Err(e) = runner(target, n).run(&strategy, test) {
        panic!("fuzz target {target}: {e}");
    }
    eprintln!("fuzz {target}: {n} cases in {:.2} s", t0.elapsed().as_secs_f64());
}
