//! Embeds the guard's eBPF object (built by `cargo xtask build-ebpf`) when it exists.
//! Without it dbproxy still builds; a config with `[guard] enabled = true` then refuses to
//! start and says how to build the object.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let object = std::env::var_os("DBPROXY_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            manifest.join("../proxy-ebpf/target/bpfel-unknown-none/release/proxy-ebpf")
        });
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default()).join("proxy-ebpf.o");
    println!("cargo:rerun-if-changed={}", object.display());
    println!("cargo:rerun-if-env-changed=DBPROXY_EBPF_OBJECT");
    let bytes = std::fs::read(&object).unwrap_or_default();
    if bytes.is_empty() {
        println!("cargo:warning=no eBPF object at {}: the kernel guard is not built in (run `cargo xtask build-ebpf`)", object.display());
    }
    if let Err(e) = std::fs::write(&out, bytes) {
        panic!("cannot write {}: {e}", out.display());
    }
}
