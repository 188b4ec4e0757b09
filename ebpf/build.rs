//! Compiles the tc programs in `bpf/` with clang (see DESIGN.md: why C).
use std::path::PathBuf;
use std::process::Command;

/// Programs under `bpf/`, each compiled to `$OUT_DIR/<name>.o`.
const PROGRAMS: &[&str] = &["lb", "policy", "sock"];

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    for src in PROGRAMS {
        let c = format!("bpf/{src}.c");
        println!("cargo:rerun-if-changed={c}");
        let obj = out.join(format!("{src}.o"));
        let status = Command::new(&clang)
            .args([
                "-O2",
                "-g",
                "-Wall",
                "-Werror",
                "-target",
                "bpf",
                "-I/usr/include/x86_64-linux-gnu",
                "-c",
            ])
            .arg(&c)
            .arg("-o")
            .arg(&obj)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {clang} (install clang and libbpf-dev): {e}"));
        assert!(status.success(), "{clang} failed to compile {c}");
    }
    println!("cargo:rerun-if-changed=bpf/lb.h");
    println!("cargo:rerun-if-changed=bpf/lb_maps.h");
    println!("cargo:rerun-if-changed=bpf/policy.h");
    println!("cargo:rerun-if-env-changed=CLANG");
}
