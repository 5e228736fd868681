//! Embeds the kernel programs (agent-ebpf) into the agent. They are built only when asked,
//! with `SOCKACCT_BUILD_EBPF=1` (every `cargo xtask` command sets it): then this script
//! builds agent-ebpf with the pinned nightly and bpf-linker (incrementally, into
//! target/bpf) and embeds the object. Without it the agent embeds an empty object, so
//! `cargo check`, clippy and the unit tests need nothing but stable Rust; such a binary
//! refuses to load, saying how to build it for real. Sources and the switch are tracked,
//! so the embedded object is never stale.
use std::{env, fs, path::PathBuf, process::Command};

fn main() {
    println!("cargo:rerun-if-env-changed=SOCKACCT_BUILD_EBPF");
    println!("cargo:rerun-if-env-changed=SOCKACCT_TOOLS_DIR");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("sockacct.bpf.o");
    println!("cargo:rustc-env=SOCKACCT_BPF_OBJ={}", out.display());
    if env::var("SOCKACCT_BUILD_EBPF").as_deref() != Ok("1") {
        fs::write(&out, []).unwrap();
        return;
    }

    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let ebpf = root.join("agent-ebpf");
    for p in [
        "agent-ebpf/src",
        "agent-ebpf/Cargo.toml",
        "agent-ebpf/Cargo.lock",
        "agent-ebpf/.cargo",
        "agent-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    let tools =
        env::var("SOCKACCT_TOOLS_DIR").unwrap_or_else(|_| "/var/cache/sockacct-tools".into());
    let path = format!("{}/bin:{}", tools, env::var("PATH").unwrap_or_default());
    // One target directory for every profile of the host build: the eBPF build is
    // incremental (about 2 s) instead of a fresh 25 s per profile.
    let target = root.join("target/bpf");

    let mut cmd = Command::new("cargo");
    cmd.current_dir(&ebpf)
        .args(["+nightly", "build", "--release", "--target-dir"])
        .arg(&target)
        .env("PATH", &path);
    // Do not leak the host build's settings into the bpfel build.
    for v in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTDOC",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        cmd.env_remove(v);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("could not run cargo +nightly: {e}"));
    if !status.success() {
        panic!(
            "building the kernel programs in {} failed.\n\
             Run `cargo xtask build-ebpf` once: it installs rust-src and bpf-linker (see docs/toolchain.md).",
            ebpf.display()
        );
    }
    fs::copy(target.join("bpfel-unknown-none/release/sockacct"), &out)
        .expect("copying the kernel object");
}
