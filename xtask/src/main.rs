//! Project tasks: `cargo xtask build-ebpf | run | test | bench`.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "sockacct project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (rust-src, bpf-linker, cached outside the repo) and build the kernel object.
    BuildEbpf,
    /// Build everything and run the agent as root. Without arguments: `run --stdout` with a
    /// local state directory. Arguments after `--` go to `sockacct`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Unit tests, then the integration tests against the real kernel (needs root).
    Test {
        /// Extra arguments for the integration test binary (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks: program run time, throughput ratios, poll tick times.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn check(st: ExitStatus, what: &str) -> anyhow::Result<()> {
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    unsafe { geteuid() == 0 }
}

fn build_ebpf() -> anyhow::Result<()> {
    let r = root();
    check(
        Command::new("bash")
            .arg(r.join("scripts/setup-toolchain.sh"))
            .status()
            .context("running scripts/setup-toolchain.sh")?,
        "toolchain setup",
    )?;
    let tools =
        std::env::var("SOCKACCT_TOOLS_DIR").unwrap_or_else(|_| "/var/cache/sockacct-tools".into());
    let path = format!("{tools}/bin:{}", std::env::var("PATH").unwrap_or_default());
    check(
        Command::new("cargo")
            .current_dir(r.join("agent-ebpf"))
            .args(["+nightly", "build", "--release"])
            .env("PATH", path)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO")
            .env_remove("CARGO_TARGET_DIR")
            .status()?,
        "building agent-ebpf",
    )
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    check(
        Command::new("cargo")
            .current_dir(root())
            .args(args)
            .status()?,
        &format!("cargo {}", args.join(" ")),
    )
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Run { args } => {
            build_ebpf()?;
            cargo(&["build", "--release", "-p", "sockacct"])?;
            let bin = root().join("target/release/sockacct");
            let mut args = args;
            if args.is_empty() {
                let state = root().join("target/sockacct-state");
                let st = state.display().to_string();
                args = vec![
                    "run".into(),
                    "--stdout".into(),
                    "--state-dir".into(),
                    st.clone(),
                    "--spool-dir".into(),
                    format!("{st}/spool"),
                    "--control-socket".into(),
                    format!("{st}/control.sock"),
                ];
                eprintln!(
                    "xtask: state, spool and control socket in {st}; e.g. `target/release/sockacct status --control-socket {st}/control.sock`"
                );
            }
            let st = if is_root() {
                Command::new(&bin).args(&args).status()?
            } else {
                eprintln!("xtask: not root, running through sudo");
                Command::new("sudo")
                    .arg("-E")
                    .arg(&bin)
                    .args(&args)
                    .status()?
            };
            check(st, "sockacct")
        }
        Cmd::Test { args } => {
            build_ebpf()?;
            cargo(&["test", "--workspace", "--exclude", "sockacct-tests"])?;
            if !is_root() {
                bail!(
                    "the integration tests load kernel programs: run `sudo -E cargo xtask test` (or as root)"
                );
            }
            let mut a = vec!["test", "--release", "-p", "sockacct-tests", "--"];
            let extra: Vec<&str> = args.iter().map(String::as_str).collect();
            a.extend(extra);
            cargo(&a)
        }
        Cmd::Bench { args } => {
            build_ebpf()?;
            if !is_root() {
                bail!("benchmarks load kernel programs: run as root");
            }
            let mut a = vec![
                "run",
                "--release",
                "-p",
                "sockacct-tests",
                "--bin",
                "sockacct-bench",
                "--",
            ];
            a.extend(args.iter().map(String::as_str));
            cargo(&a)
        }
    }
}
