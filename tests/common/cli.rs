//! Running the kiln binary from tests: one copy of the runner and of the bad-input check that
//! tests/cli.rs, generate.rs, lora.rs, nf4_checkpoint.rs, pretrain_cli.rs and crash.rs share.

use std::process::{Command, Output};

/// The kiln binary this test crate was built with, as a command to add arguments to; KILN_BIN
/// names another one (tools/gpu/run.sh runs the test binaries on a machine where the build
/// machine's target directory does not exist).
pub fn kiln_command() -> Command {
    match std::env::var_os("KILN_BIN") {
        Some(bin) => Command::new(bin),
        None => Command::new(env!("CARGO_BIN_EXE_kiln")),
    }
}

/// Runs kiln with `args` to completion.
pub fn kiln(args: &[&str]) -> Output {
    kiln_command().args(args).output().expect("the kiln binary runs")
}

/// stdout then stderr, as one string.
pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Runs kiln and expects a refusal before it does anything: exit code 1, no panic, nothing printed
/// but an error that starts with "error: " and mentions every `needle`. Returns the output.
pub fn fails_with(args: &[&str], needles: &[&str]) -> String {
    let t = refused(&kiln(args), args, needles);
    assert!(t.starts_with("error: "), "the output should be only the error, starting with 'error: ':\n{t}");
    t
}

/// Runs a command that may report progress before it fails: exit code 1, no panic, stderr ending
/// in an "error: " line, and every `needle` mentioned. Returns the output.
pub fn fails_after_output(args: &[&str], needles: &[&str]) -> String {
    let o = kiln(args);
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    assert!(last.starts_with("error: "), "stderr should end with an 'error: ' line:\n{err}");
    refused(&o, args, needles)
}

/// Exit code 1, no panic, every `needle` mentioned; the output.
fn refused(o: &Output, args: &[&str], needles: &[&str]) -> String {
    let t = text(o);
    assert_eq!(o.status.code(), Some(1), "expected exit code 1 for {args:?}, got {:?}:\n{t}", o.status.code());
    assert!(!t.contains("panicked"), "kiln panicked on bad input {args:?}:\n{t}");
    for n in needles {
        assert!(t.contains(n), "error for {args:?} should mention '{n}':\n{t}");
    }
    t
}
