//! kernels/kiln_kernels.h has two Rust readings: build.rs's own generator (src/abi.rs includes it;
//! every build uses it, since the default CPU build must need nothing but cargo) and bindgen's
//! (feature `cuda`, with libclang). They must agree: every constant with the same value, every
//! struct with the same fields of the same types in the same order, so the same `repr(C)` layout,
//! which bindgen's compile-time assertions check against clang's.
#![cfg(feature = "cuda")]

use std::collections::BTreeMap;

/// `pub const NAME: T = V;` lines: name -> value.
fn consts(src: &str) -> BTreeMap<String, f64> {
    src.lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .map(|l| {
            let (name, rest) = l.split_once(':').unwrap();
            let value = rest.split_once('=').unwrap().1.trim().trim_end_matches(';').trim();
            (name.trim().to_string(), value.parse::<f64>().unwrap_or_else(|_| panic!("{name} = {value}")))
        })
        .collect()
}

/// `pub struct Name { pub field: T, ... }`: name -> [(field, type)].
fn structs(src: &str) -> BTreeMap<String, Vec<(String, String)>> {
    let mut out = BTreeMap::new();
    let mut current: Option<(String, Vec<(String, String)>)> = None;
    for line in src.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("pub struct ") {
            current = Some((rest.trim_end_matches('{').trim().to_string(), Vec::new()));
        } else if line == "}" {
            if let Some((name, fields)) = current.take() {
                out.insert(name, fields);
            }
        } else if let (Some((_, fields)), Some(f)) = (current.as_mut(), line.strip_prefix("pub ")) {
            let (field, ty) = f.trim_end_matches(',').split_once(':').unwrap();
            fields.push((field.trim().to_string(), ty.trim().to_string()));
        }
    }
    out
}

#[test]
fn generator_and_bindgen_agree_on_kiln_kernels_h() {
    let (ours, theirs) = kiln::abi::SOURCES;
    let (c_ours, c_theirs) = (consts(ours), consts(theirs));
    assert!(c_theirs.len() >= 10, "bindgen produced only {} constants:\n{theirs}", c_theirs.len());
    assert_eq!(c_ours, c_theirs, "the constants differ");
    let (s_ours, s_theirs) = (structs(ours), structs(theirs));
    assert!(!s_theirs.is_empty(), "bindgen produced no structs:\n{theirs}");
    assert_eq!(s_ours, s_theirs, "the structs differ");
    eprintln!("{} constants and {} structs agree: {:?}", c_ours.len(), s_ours.len(), s_ours.keys().collect::<Vec<_>>());
}

#[test]
fn the_readings_have_one_layout() {
    use kiln::abi::{self, bindgen};
    use std::mem::{align_of, size_of};
    assert_eq!(size_of::<abi::AdamWScalars>(), size_of::<bindgen::AdamWScalars>());
    assert_eq!(size_of::<abi::AdamWTensor>(), size_of::<bindgen::AdamWTensor>());
    assert_eq!(align_of::<abi::AdamWTensor>(), align_of::<bindgen::AdamWTensor>());
}
