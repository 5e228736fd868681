//! The kernel matrix: the integration tests inside QEMU guests booted with Debian's stock
//! kernels. Images come from scripts/guest-image.sh (cached outside the repository); the
//! payload (test binaries, agent, peer, scripts) goes in as a tar on a second disk and
//! the results come back as a tar on a third. Guests run under TCG: /dev/kvm here is a
//! nested mode that cannot boot an unmodified kernel (see ../shared/notes/kernels.md).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{check, root};

/// One guest kernel: its series (scripts/guest-image.sh), what the agent must choose there,
/// and extra kernel command line.
pub struct GuestKernel {
    pub series: &'static str,
    /// `purpose=program` pairs the kernel test checks (`none` = no program).
    pub expect_hooks: &'static str,
    pub cmdline: &'static str,
    /// Also run the Debian package under systemd in this guest.
    pub package: bool,
}

pub const MATRIX: &[GuestKernel] = &[
    // Debian 11: tracing programs may not call bpf_get_socket_cookie (from 5.12), so the
    // close and accept hooks read the cookie at its BTF offset; no tcx.
    GuestKernel {
        series: "5.10",
        expect_hooks: "tcp_close=sockacct_tcp_state_compat accept_owner=sockacct_accept4_compat \
                       passive_open=sockacct_passive",
        cmdline: "",
        package: false,
    },
    // Debian 12, booted as a Secure Boot host is (lockdown=integrity): 4-argument
    // inet_csk_accept, no tcx, none of the generic send/receive tracepoints.
    GuestKernel {
        series: "6.1",
        expect_hooks: "tcp_close=sockacct_tcp_state accept_owner=sockacct_accept4",
        cmdline: "lockdown=integrity",
        package: true,
    },
    // Debian 13: 2-argument inet_csk_accept, tcx.
    GuestKernel {
        series: "6.12",
        expect_hooks: "tcp_close=sockacct_tcp_state accept_owner=sockacct_accept",
        cmdline: "",
        package: false,
    },
];

/// Tests run in every guest (test binary, name filters; none = all of it): every hook
/// path and fallback, exact UDP, TCP v4/v6 within the header bounds, conservation (every
/// test checks it), server-side owners, --iface, detaching.
const GUEST_TESTS: &[(&str, &[&str])] = &[
    ("kernel", &[]),
    (
        "accounting",
        &[
            "tcp_ipv4",
            "tcp_ipv6",
            "udp_ipv4",
            "udp_ipv6",
            "short_lived",
            "server_side",
            "opened_before",
            "scoped_cgroup",
            "veth_traffic",
        ],
    ),
    ("owner_fallback", &[]),
    ("flows", &["tcp_ipv4_conversation", "the_flow_ledger"]),
];

/// Wall-clock limit of one guest, boot to power-off.
const GUEST_TIMEOUT: Duration = Duration::from_secs(20 * 60);

pub struct Outcome {
    pub series: &'static str,
    pub kver: String,
    pub ok: bool,
    pub secs: u64,
    pub summary: String,
}

/// Test executables of sockacct-tests, by test name (built with the release profile).
pub fn build_test_binaries() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let out = Command::new("cargo")
        .current_dir(root())
        .args([
            "test",
            "--release",
            "-p",
            "sockacct-tests",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the integration tests failed");
    }
    let mut exes = vec![];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = v["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|x| x == "test"));
        if let (true, Some(exe)) = (is_test, v["executable"].as_str()) {
            let name = v["target"]["name"].as_str().unwrap_or("").to_string();
            exes.push((name, PathBuf::from(exe)));
        }
    }
    Ok(exes)
}

fn image(series: &str) -> anyhow::Result<(String, String, String, String)> {
    let out = Command::new("bash")
        .arg(root().join("scripts/guest-image.sh"))
        .arg(series)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running scripts/guest-image.sh")?;
    if !out.status.success() {
        bail!("preparing the guest for {series} failed (scripts/guest-image.sh {series})");
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let get = |k: &str| -> anyhow::Result<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(String::from)
            .with_context(|| format!("guest-image.sh printed no {k}"))
    };
    Ok((get("KERNEL")?, get("INITRD")?, get("IMAGE")?, get("KVER")?))
}

/// Runs the guest tests in one kernel; `deb` is the package to test there, if any.
pub fn run_guest(
    k: &GuestKernel,
    tests: &[(String, PathBuf)],
    deb: Option<&Path>,
) -> anyhow::Result<Outcome> {
    let (kernel, initrd, img, kver) = image(k.series)?;
    let work = root().join("target/vm").join(k.series);
    let _ = fs::remove_dir_all(&work);
    let payload = work.join("payload");
    fs::create_dir_all(payload.join("bin/deps"))?;
    let release = root().join("target/release");
    for b in ["sockacct-agent", "sockacct-peer"] {
        fs::copy(release.join(b), payload.join("bin").join(b))
            .with_context(|| format!("copying {b}"))?;
    }
    let mut list = String::new();
    for (name, filters) in GUEST_TESTS {
        let (_, exe) = tests
            .iter()
            .find(|(n, _)| n == name)
            .with_context(|| format!("no test binary {name}"))?;
        fs::copy(exe, payload.join("bin/deps").join(name))?;
        list.push_str(&format!("{name} {}\n", filters.join(" ")));
    }
    fs::write(payload.join("tests.list"), list)?;
    fs::write(payload.join("expect-hooks"), k.expect_hooks)?;
    for s in ["run.sh", "package.sh"] {
        fs::copy(root().join("tests/guest").join(s), payload.join(s))?;
    }
    if let (true, Some(deb)) = (k.package, deb) {
        fs::copy(deb, payload.join("sockacct.deb"))?;
    }
    let tar = work.join("payload.tar");
    check(
        Command::new("tar")
            .arg("cf")
            .arg(&tar)
            .arg("-C")
            .arg(&payload)
            .arg(".")
            .status()?,
        "tar payload",
    )?;
    let results = work.join("results.img");
    fs::write(&results, [])?;
    check(
        Command::new("truncate")
            .args(["-s", "256M"])
            .arg(&results)
            .status()?,
        "truncate",
    )?;
    let console = work.join("console.log");
    eprintln!("xtask: guest {} ({kver}): booting", k.series);
    let started = Instant::now();
    let st = Command::new("timeout")
        .arg(GUEST_TIMEOUT.as_secs().to_string())
        .arg("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048"])
        .args(["-kernel", &kernel, "-initrd", &initrd])
        .arg("-append")
        .arg(format!(
            "root=/dev/vda rw console=ttyS0 quiet panic=-1 {}",
            k.cmdline
        ))
        .arg("-drive")
        .arg(format!("file={img},format=raw,if=virtio,snapshot=on"))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,readonly=on",
            tar.display()
        ))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", results.display()))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args(["-no-reboot", "-display", "none", "-nic", "none"])
        .status()
        .context("running qemu-system-x86_64 (Debian package qemu-system-x86)")?;
    let secs = started.elapsed().as_secs();
    let out = work.join("results");
    fs::create_dir_all(&out)?;
    let _ = Command::new("tar")
        .arg("xf")
        .arg(&results)
        .arg("-C")
        .arg(&out)
        .stderr(std::process::Stdio::null())
        .status();
    let rc = fs::read_to_string(out.join("rc")).ok();
    let ok = st.success() && rc.as_deref().map(str::trim) == Some("0");
    let mut summary = String::new();
    for f in [
        "kernel.log",
        "accounting.log",
        "owner_fallback.log",
        "flows.log",
    ] {
        if let Ok(t) = fs::read_to_string(out.join(f)) {
            // "test result: ok. 9 passed; 0 failed; ..." -> "accounting 9/9"
            if let Some(l) = t.lines().rev().find(|l| l.starts_with("test result:")) {
                let num = |what: &str| -> u64 {
                    l.split(';')
                        .find_map(|p| p.trim().strip_suffix(what))
                        .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
                        .unwrap_or(0)
                };
                let (pass, fail) = (num(" passed"), num(" failed"));
                summary.push_str(&format!(
                    "{} {pass}/{}  ",
                    f.trim_end_matches(".log"),
                    pass + fail
                ));
            }
        }
    }
    if let Ok(t) = fs::read_to_string(out.join("package.log")) {
        summary.push_str(if t.contains("package: ok") {
            "package: ok"
        } else {
            "package: FAILED"
        });
    }
    if !ok {
        let why = match (&rc, st.code()) {
            (None, Some(124)) => format!("timed out after {}s", GUEST_TIMEOUT.as_secs()),
            (None, _) => "the guest wrote no results (see its console log)".to_string(),
            (Some(rc), _) => format!("payload status {}", rc.trim()),
        };
        eprintln!(
            "xtask: guest {} FAILED: {why}; console: {}, results: {}",
            k.series,
            console.display(),
            out.display()
        );
        if let Ok(t) = fs::read_to_string(&console) {
            let lines: Vec<&str> = t.lines().collect();
            for l in &lines[lines.len().saturating_sub(80)..] {
                eprintln!("  | {l}");
            }
        }
    }
    Ok(Outcome {
        series: k.series,
        kver,
        ok,
        secs,
        summary,
    })
}
