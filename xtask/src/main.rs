//! Project tasks: `cargo xtask build-ebpf | run | test | bench`.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod package;
mod vm;

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
    /// Unit tests, then the integration tests against the running kernel and, in QEMU
    /// guests, against Debian's stock kernels 5.10, 6.1 and 6.12 (needs root).
    Test {
        /// Run only these kernels: `host` (the running kernel) or a guest series (5.10, 6.1,
        /// 6.12). Repeatable. Default: the host and every guest.
        #[arg(long = "kernel", value_name = "KERNEL")]
        kernels: Vec<String>,
        /// Skip the guests (the quick loop: unit tests and the host kernel only).
        #[arg(long)]
        no_vm: bool,
        /// Extra arguments for the host's integration test binaries (e.g. a name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the Debian package (target/debian/sockacct_<version>_amd64.deb).
    Package,
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
            .args(["+nightly", "build", "--release", "--target-dir"])
            .arg(r.join("target/bpf"))
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

/// Where the ClickHouse tests find chdb (ClickHouse's engine in-process, from PyPI): a
/// virtualenv outside the repository, so a reused machine skips the download.
const CHDB_VENV: &str = "/var/cache/sockacct-tools/chdb-venv";
const CHDB_VERSION: &str = "4.4.0";

/// Makes sure `CHDB_VENV` has chdb; returns its python.
fn ensure_chdb() -> anyhow::Result<PathBuf> {
    let venv = PathBuf::from(std::env::var("SOCKACCT_CHDB_VENV").unwrap_or(CHDB_VENV.into()));
    let py = venv.join("bin/python");
    let works = |py: &Path| {
        Command::new(py)
            .args(["-c", &format!("import chdb, importlib.metadata as m; assert m.version('chdb') == '{CHDB_VERSION}'")])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if works(&py) {
        return Ok(py);
    }
    ensure_debian_packages(&[("python3", "python3")])?;
    let venv_ok = |py3: &str| {
        Command::new(py3)
            .args(["-m", "venv", "--help"])
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !venv_ok("python3") {
        // Debian ships the venv module separately.
        ensure_debian_packages(&[("false", "python3-venv")])?;
    }
    eprintln!(
        "xtask: installing chdb {CHDB_VERSION} into {}",
        venv.display()
    );
    check(
        Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()?,
        "python3 -m venv",
    )?;
    check(
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q", &format!("chdb=={CHDB_VERSION}")])
            .status()?,
        "pip install chdb",
    )?;
    if !works(&py) {
        bail!(
            "chdb does not import from {} after installing it",
            py.display()
        );
    }
    Ok(py)
}

/// Installs the Debian packages providing `cmds` that are missing (as root, via apt).
fn ensure_debian_packages(cmds: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = cmds
        .iter()
        .filter(|(cmd, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {cmd}")])
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {} (apt-get install them)",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    let install = [&["install", "-y", "-qq"][..], &missing].concat();
    // The machine's package index may be stale: update once when the install fails.
    if !apt(&install)?.success() {
        check(apt(&["update", "-qq"])?, "apt-get update")?;
        check(apt(&install)?, "apt-get install")?;
    }
    Ok(())
}

fn test(kernels: Vec<String>, no_vm: bool, args: Vec<String>) -> anyhow::Result<()> {
    let host = kernels.is_empty() || kernels.iter().any(|k| k == "host");
    let mut guests = vec![];
    if !no_vm {
        for k in kernels.iter().filter(|k| *k != "host") {
            guests.push(vm::MATRIX.iter().find(|g| g.series == k).with_context(|| {
                format!(
                    "unknown kernel {k:?}: known are host, {}",
                    vm::MATRIX
                        .iter()
                        .map(|g| g.series)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?);
        }
        if kernels.is_empty() {
            guests.extend(vm::MATRIX.iter());
        }
    }
    build_ebpf()?;
    cargo(&["test", "--workspace", "--exclude", "sockacct-tests"])?;
    if !is_root() {
        bail!(
            "the integration tests load kernel programs: run `sudo -E cargo xtask test` (or as root)"
        );
    }
    ensure_debian_packages(&[
        ("ip", "iproute2"),
        ("zstd", "zstd"),
        ("jq", "jq"),
        ("sysctl", "procps"),
        ("setpriv", "util-linux"),
        // The metrics tests scrape the agent with a real Prometheus server.
        ("prometheus", "prometheus"),
        ("promtool", "prometheus"),
        // The metrics endpoint's TLS test makes its certificates; curl is a second client.
        ("openssl", "openssl"),
        ("curl", "curl"),
        // `sockacct top` runs in a real terminal.
        ("tmux", "tmux"),
    ])?;
    // The ClickHouse tests run the real engine (chdb).
    ensure_chdb()?;
    let mut failed = vec![];
    if host {
        let mut a = vec!["test", "--release", "-p", "sockacct-tests", "--"];
        a.extend(args.iter().map(String::as_str));
        if let Err(e) = cargo(&a) {
            eprintln!("xtask: host kernel: {e}");
            failed.push("host".to_string());
        }
    }
    if !guests.is_empty() {
        ensure_debian_packages(&[
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("debootstrap", "debootstrap"),
            ("mkfs.ext4", "e2fsprogs"),
            ("objdump", "binutils"),
            ("dpkg-deb", "dpkg"),
        ])?;
        let tests = vm::build_test_binaries()?;
        let deb = if guests.iter().any(|g| g.package) {
            Some(package::build()?)
        } else {
            None
        };
        let mut outcomes = vec![];
        for g in guests {
            match vm::run_guest(g, &tests, deb.as_deref()) {
                Ok(o) => outcomes.push(o),
                Err(e) => {
                    eprintln!("xtask: guest {}: {e:#}", g.series);
                    failed.push(g.series.to_string());
                }
            }
        }
        eprintln!("\nxtask: kernel matrix");
        for o in &outcomes {
            eprintln!(
                "  {:<5} {:<24} {:<6} {:>4}s  {}",
                o.series,
                o.kver,
                if o.ok { "ok" } else { "FAILED" },
                o.secs,
                o.summary
            );
            if !o.ok {
                failed.push(o.series.to_string());
            }
        }
    }
    if !failed.is_empty() {
        bail!("tests failed on: {}", failed.join(", "));
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    // Every build xtask runs embeds the real kernel programs (agent/build.rs).
    // SAFETY: single-threaded here, before any child process or thread exists.
    unsafe { std::env::set_var("SOCKACCT_BUILD_EBPF", "1") };
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
        Cmd::Test {
            kernels,
            no_vm,
            args,
        } => test(kernels, no_vm, args),
        Cmd::Package => package::build().map(|_| ()),
        Cmd::Bench { args } => {
            build_ebpf()?;
            if !is_root() {
                bail!("benchmarks load kernel programs: run as root");
            }
            // Build every helper binary first, then run the bench binary itself: a
            // `cargo run` whose program calls cargo again rebuilt half the dependency
            // tree each time (the two invocations fingerprint differently).
            cargo(&["build", "--release", "-p", "sockacct-tests", "--bins"])?;
            check(
                Command::new(root().join("target/release/sockacct-bench"))
                    .args(&args)
                    .status()
                    .context("running sockacct-bench")?,
                "sockacct-bench",
            )
        }
    }
}
