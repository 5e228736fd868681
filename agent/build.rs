//! Builds the kernel programs (agent-ebpf) with the pinned nightly and bpf-linker, so a
//! plain `cargo build` produces a complete agent. `cargo xtask build-ebpf` installs the
//! toolchain pieces this needs (see docs/toolchain.md).
use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let ebpf = root.join("agent-ebpf");
    for p in [
        "agent-ebpf/src",
        "agent-ebpf/Cargo.toml",
        "agent-ebpf/.cargo",
        "agent-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=SOCKACCT_TOOLS_DIR");

    let tools =
        env::var("SOCKACCT_TOOLS_DIR").unwrap_or_else(|_| "/var/cache/sockacct-tools".into());
    let path = format!("{}/bin:{}", tools, env::var("PATH").unwrap_or_default());

    let mut cmd = Command::new("cargo");
    cmd.current_dir(&ebpf)
        .args(["+nightly", "build", "--release"])
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
    let obj = ebpf.join("target/bpfel-unknown-none/release/sockacct");
    println!("cargo:rustc-env=SOCKACCT_BPF_OBJ={}", obj.display());
}
