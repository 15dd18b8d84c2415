//! Reads ptxas' resource report that build.rs kept (feature `cuda`; no GPU needed): every kernel
//! of kernels/*.cu was compiled for every architecture of the build, none spills registers, and
//! none keeps a stack frame in local memory unless it is named below with the reason.
#![cfg(feature = "cuda")]

use kiln::backend::cuda::{Kernel, ARCHS, PTXAS_REPORT};
use std::collections::HashMap;

/// Kernels allowed a local-memory stack frame, each with why it is acceptable.
const STACK_FRAME_ALLOWED: &[(&str, &str)] = &[];

/// What ptxas reported for one kernel on one architecture.
#[derive(Debug, Default, Clone)]
struct Entry {
    registers: Option<u32>,
    stack: Option<u32>,
    spill_stores: Option<u32>,
    spill_loads: Option<u32>,
}

/// The number just before `unit` in `line` ("24 bytes stack frame" -> 24).
fn number_before(line: &str, unit: &str) -> Option<u32> {
    let i = line.find(unit)?;
    line[..i].split(|c: char| !c.is_ascii_digit()).rfind(|s| !s.is_empty())?.parse().ok()
}

/// (kernel, arch) -> entry. ptxas prints, per entry function: "Compiling entry function 'K' for
/// 'sm_A'", then "Function properties for K" with the stack and spill line, then "Used N registers".
fn parse(report: &str) -> HashMap<(String, String), Entry> {
    let mut out: HashMap<(String, String), Entry> = HashMap::new();
    let mut current: Option<(String, String)> = None;
    let mut in_props_of_current = false;
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            let arch = rest.split("for '").nth(1).and_then(|a| a.split('\'').next()).unwrap_or("").to_string();
            out.entry((name.clone(), arch.clone())).or_default();
            current = Some((name, arch));
            in_props_of_current = false;
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            // Properties of non-inlined device functions appear too; only the entry's count.
            in_props_of_current = current.as_ref().is_some_and(|(n, _)| n == rest.trim());
        } else if line.contains("bytes stack frame") {
            if let (true, Some(key)) = (in_props_of_current, &current) {
                let e = out.get_mut(key).unwrap();
                e.stack = number_before(line, "bytes stack frame");
                e.spill_stores = number_before(line, "bytes spill stores");
                e.spill_loads = number_before(line, "bytes spill loads");
            }
        } else if line.contains("Used ") && line.contains(" registers") {
            if let Some(key) = &current {
                out.get_mut(key).unwrap().registers = number_before(line, " registers");
            }
        }
    }
    out
}

#[test]
fn parser_reads_a_ptxas_report() {
    let sample = "ptxas info    : Compiling entry function 'gemm_x' for 'sm_90a'\n\
                  ptxas info    : Function properties for helper\n    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
                  ptxas info    : Function properties for gemm_x\n    16 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads\n\
                  ptxas info    : Used 128 registers, used 1 barriers, 400 bytes cmem[0]\n";
    let p = parse(sample);
    let e = &p[&("gemm_x".to_string(), "sm_90a".to_string())];
    assert_eq!((e.registers, e.stack, e.spill_stores, e.spill_loads), (Some(128), Some(16), Some(4), Some(8)));
}

#[test]
fn every_kernel_compiled_for_every_arch_without_spills() {
    assert!(!Kernel::ALL.is_empty(), "no kernels were compiled: kernels/*.cu defines no extern \"C\" __global__");
    let report = parse(PTXAS_REPORT);
    let archs: Vec<String> = ARCHS.split(',').map(|a| format!("sm_{}", a.trim())).collect();
    let mut problems = Vec::new();
    println!("{:<40} {}", "kernel", archs.iter().map(|a| format!("{a:>14}")).collect::<String>());
    for k in Kernel::ALL {
        let mut row = format!("{:<40}", k.name());
        for arch in &archs {
            let Some(e) = report.get(&(k.name().to_string(), arch.clone())) else {
                problems.push(format!("{} was not compiled for {arch}", k.name()));
                row.push_str(&format!("{:>14}", "missing"));
                continue;
            };
            row.push_str(&format!("{:>9} regs", e.registers.map_or("?".into(), |r| r.to_string())));
            if e.registers.is_none() || e.stack.is_none() {
                problems.push(format!("{} on {arch}: no register or stack line in the report", k.name()));
            }
            if e.spill_stores.unwrap_or(0) > 0 || e.spill_loads.unwrap_or(0) > 0 {
                problems.push(format!(
                    "{} on {arch} spills: {:?} bytes stored, {:?} loaded",
                    k.name(),
                    e.spill_stores,
                    e.spill_loads
                ));
            }
            let allowed = STACK_FRAME_ALLOWED.iter().any(|(n, _)| *n == k.name());
            if e.stack.unwrap_or(0) > 0 && !allowed {
                problems.push(format!("{} on {arch} has a {:?}-byte stack frame in local memory", k.name(), e.stack));
            }
        }
        println!("{row}");
    }
    assert!(problems.is_empty(), "ptxas report problems:\n{}", problems.join("\n"));
}

#[test]
fn exceptions_name_real_kernels() {
    for (name, why) in STACK_FRAME_ALLOWED {
        assert!(Kernel::ALL.iter().any(|k| k.name() == *name), "{name} is excused but is not a kernel");
        assert!(why.len() > 20, "{name}: say why its stack frame is acceptable");
    }
}

/// ptxas keeps wgmma asynchronous: where it cannot (an accumulator touched while a wgmma is in
/// flight, a call between issue and wait) it says "wgmma.mma_async instructions are serialized"
/// and the Hopper kernels lose their overlap of math and copies without failing a test.
#[test]
fn no_wgmma_is_serialized() {
    let serialized: Vec<&str> =
        PTXAS_REPORT.lines().filter(|l| l.contains("wgmma") && l.contains("serialized")).collect();
    assert!(serialized.is_empty(), "ptxas serialized wgmma:\n{}", serialized.join("\n"));
    if ARCHS.split(',').any(|a| a.trim() == "90a") {
        let report = parse(PTXAS_REPORT);
        assert!(
            report.contains_key(&("gemm_wgmma_nn".to_string(), "sm_90a".to_string())),
            "gemm_wgmma_nn not built for sm_90a"
        );
    }
}
