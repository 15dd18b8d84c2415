//! The large data a few tests need and the repository may not hold: GPT-2's tokenizer files,
//! WikiText-2 and the Alpaca demo set, in `../shared/data` beside the checkout (or the folder
//! named by KILN_SHARED_DATA). Those tests are `#[ignore]`d, so a fresh clone passes without the
//! data; `cargo test --release -- --ignored` runs them, and there a missing file fails the test,
//! naming the path, rather than passing without checking anything. Every property they check
//! is also checked on fixtures built in the tests themselves, which always run.

use std::path::{Path, PathBuf};

/// `rel` under the shared data folder; panics, naming the path, when it is absent.
pub fn shared_data(rel: &str) -> PathBuf {
    let root = match std::env::var_os("KILN_SHARED_DATA") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
    };
    let p = root.join(rel);
    assert!(
        p.exists(),
        "{} is absent: this test needs the shared data folder (GPT-2's tokenizer, WikiText-2, the Alpaca demo \
         set) at ../shared/data or at KILN_SHARED_DATA; without it, run the tests without --ignored",
        p.display()
    );
    p
}
