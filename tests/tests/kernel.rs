//! What this kernel gives: `sockacct check` loads the real programs and names the hook
//! chosen per purpose; the running agent's status names the same ones; `--iface lo` works
//! with and without tcx and leaves no qdisc behind. The kernel matrix (guests booted with
//! Debian's stock kernels) sets SOCKACCT_EXPECT_HOOKS to what each kernel must choose,
//! e.g. `tcp_close=sockacct_tcp_state_compat accept_owner=sockacct_accept4_compat`.
use std::process::Command;

use sockacct_tests::*;

fn expected_hooks() -> Vec<(String, String)> {
    std::env::var("SOCKACCT_EXPECT_HOOKS")
        .unwrap_or_default()
        .split_whitespace()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("SOCKACCT_EXPECT_HOOKS: {kv:?} is not purpose=program"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn qdiscs(dev: &str) -> String {
    let o = Command::new("tc")
        .args(["qdisc", "show", "dev", dev])
        .output()
        .expect("run tc (iproute2)");
    String::from_utf8_lossy(&o.stdout).into()
}

#[test]
fn check_names_the_hooks_this_kernel_gives_and_leaves_nothing_behind() {
    if !require_root("check") {
        return;
    }
    let cg = TestCgroup::new("check");
    let lo_before = qdiscs("lo");
    let o = Command::new(agent_exe())
        .args(["check", "--iface", "lo", "--cgroup"])
        .arg(&cg.path)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    eprintln!("{out}{err}");
    assert!(o.status.success(), "check failed: {out}{err}");
    assert!(out.contains("every required program loads"), "{out}");
    assert!(out.contains("tcp_close "), "{out}");
    assert!(out.contains("accept_owner "), "{out}");
    for (purpose, program) in expected_hooks() {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{purpose} ")))
            .unwrap_or_else(|| panic!("check names no {purpose}: {out}"));
        assert!(
            line.split_whitespace().nth(1) == Some(program.as_str()),
            "{purpose}: expected {program}, check says {line:?}"
        );
    }
    assert_eq!(qdiscs("lo"), lo_before, "check left a qdisc on lo");
}

#[test]
fn status_names_the_hooks_and_iface_lo_counts_then_detaches() {
    if !require_root("status_hooks") {
        return;
    }
    let cg = TestCgroup::new("hooks");
    let lo_before = qdiscs("lo");
    // A second agent counting lo as well: tc programs only count, so each must let the
    // packet on to the next program (whichever of the two runs first).
    let other_cg = TestCgroup::new("hooks2");
    let other = Daemon::start(&other_cg, &["--interval", "100", "--iface", "lo"]);
    let d = Daemon::start(&cg, &["--interval", "100", "--iface", "lo"]);
    let st = d.control(serde_json::json!({"cmd": "status"}));
    let hooks = st["hooks"]
        .as_array()
        .unwrap_or_else(|| panic!("status has no hooks: {st}"));
    let chosen = |purpose: &str| -> Option<String> {
        hooks
            .iter()
            .find(|h| h["purpose"] == purpose)
            .unwrap_or_else(|| panic!("status names no {purpose}: {st}"))["program"]
            .as_str()
            .map(String::from)
    };
    assert!(chosen("tcp_close").is_some(), "{st}");
    assert_eq!(
        st["accept_hook"].as_bool(),
        Some(chosen("accept_owner").is_some())
    );
    for (purpose, program) in expected_hooks() {
        assert_eq!(chosen(&purpose).as_deref(), Some(program.as_str()), "{st}");
    }
    // 100 datagrams of 300 B over lo: tc on lo sees each twice (egress and ingress), with
    // a 14 B (all-zero) Ethernet header: (300 + 8 + 20 + 14) B each way.
    let mut rcv = Peer::spawn(None, None, "lo-recv", &["udp-recv", "127.0.0.1"]);
    let port = rcv.value("port").to_string();
    let mut snd = Peer::spawn(
        Some(&cg),
        None,
        "lo-sender",
        &["udp-send", "127.0.0.1", &port, "100", "300"],
    );
    assert_eq!(snd.value("sent"), 100);
    snd.finish();
    Peer::spawn(None, None, "lo-stop", &["udp-stop", "127.0.0.1", &port]).finish();
    rcv.value("datagrams");
    rcv.finish();
    let events = d.stop();
    let other_events = other.stop();
    check_events(&events);
    check_events(&other_events);
    let lo_of = |evs: &[DeltaEvent]| -> Traffic {
        let s = sum(evs);
        *s.ifaces
            .get("lo")
            .unwrap_or_else(|| panic!("no iface lo in {:?}", s.ifaces))
    };
    let o = lo_of(&other_events);
    assert!(
        o.tx >= 100 * (300 + 8 + 20 + 14) && o.rx >= 100 * (300 + 8 + 20 + 14),
        "the other agent's tc on lo saw the traffic too: {o:?}"
    );
    let s = sum(&events);
    let c = label(&s, "lo-sender");
    assert_eq!(c.tx, 100 * (300 + 8 + 20), "UDP over lo, socket side");
    let i = s
        .ifaces
        .get("lo")
        .unwrap_or_else(|| panic!("no iface lo in {:?}", s.ifaces));
    // Other traffic on lo (there is little in a guest, maybe some on the host) only adds.
    assert!(i.tx >= 100 * (300 + 8 + 20 + 14), "tc lo egress {i:?}");
    assert!(i.rx >= 100 * (300 + 8 + 20 + 14), "tc lo ingress {i:?}");
    assert_eq!(qdiscs("lo"), lo_before, "the agent left a qdisc on lo");
}
