//! Connection records (`type: "flow"`) from the real agent, with real traffic.
use std::{fs, time::Duration};

use serde_json::{Value, json};
use sockacct_tests::*;

fn flows(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["type"] == "flow")
        .collect()
}

fn deltas(lines: &[String]) -> Vec<DeltaEvent> {
    lines
        .iter()
        .filter_map(|l| {
            serde_json::from_str::<DeltaEvent>(l)
                .ok()
                .filter(|e| e.kind == "delta")
        })
        .collect()
}

/// Writes a config with a `[flows]` section and returns its path (inside `dir`).
fn config(dir: &TempDir, flows: &str) -> String {
    let p = dir.0.join("sockacct.toml");
    fs::write(&p, format!("[flows]\n{flows}\n")).unwrap();
    p.display().to_string()
}

fn tcp_conversation(tag: &str, addr: &str) {
    let cg = TestCgroup::new(tag);
    let dir = TempDir::new(tag);
    // No consolidation: every connection gets its own open and close.
    let cfg = config(&dir, "consolidate_gap_ms = 0\nopen_after_ms = 0");
    let d = Daemon::start(&cg, &["--interval", "50", "--config", &cfg]);
    let (up, down) = (30_000u64, 7_000u64);
    let mut srv = Peer::spawn(
        Some(&cg),
        None,
        "f-srv",
        &["tcp-serve", addr, "1", &down.to_string()],
    );
    let port = srv.value("port");
    let mut cli = Peer::spawn(
        Some(&cg),
        None,
        "f-cli",
        &["tcp-connect", addr, &port.to_string(), "1", &up.to_string()],
    );
    cli.value("received");
    cli.finish();
    srv.finish();
    let lines = d.stop_lines();
    let events = deltas(&lines);
    let s = sum(&events);
    let f = flows(&lines);
    eprintln!("{tag} flows: {f:#?}");
    let family = if addr.contains(':') { "ipv6" } else { "ipv4" };
    // The client's connection: outbound, to the server's port.
    let out: Vec<&Value> = f
        .iter()
        .filter(|r| r["label"] == "f-cli" && r["direction"] == "outbound")
        .collect();
    assert!(
        out.iter().any(|r| r["event"] == "open"),
        "no open record for the client: {out:?}"
    );
    let close = out
        .iter()
        .find(|r| r["event"] == "close")
        .expect("close record for the client");
    assert_eq!(close["proto"], "tcp");
    assert_eq!(close["family"], family);
    assert_eq!(close["remote"], addr);
    assert_eq!(close["local"], addr);
    assert_eq!(close["remote_port"], port);
    assert_eq!(close["process"], "f-cli");
    // The client label is exactly this one socket: the record's final counts are the
    // label's totals.
    let c = label(&s, "f-cli");
    assert_eq!(close["tx"], c.tx, "{close}");
    assert_eq!(close["rx"], c.rx);
    assert_eq!(close["tx_packets"], c.tx_packets);
    assert_eq!(close["rx_packets"], c.rx_packets);
    assert!(close["end"].as_u64() >= close["start"].as_u64());
    assert!(close["tcp_state"].is_string(), "{close}");
    // The server's accepted connection: inbound, from the client's port.
    let inbound = f
        .iter()
        .find(|r| r["label"] == "f-srv" && r["direction"] == "inbound" && r["event"] == "close")
        .expect("inbound close");
    assert_eq!(inbound["local_port"], port);
    assert_eq!(inbound["remote_port"], close["local_port"]);
    assert!(inbound["rx"].as_u64().unwrap() >= up && inbound["tx"].as_u64().unwrap() >= down);
}

#[test]
fn tcp_ipv4_conversation_gives_open_and_close_records() {
    if !require_root("flows_tcp4") {
        return;
    }
    tcp_conversation("ft4", "127.0.0.1");
}

#[test]
fn tcp_ipv6_conversation_gives_open_and_close_records() {
    if !require_root("flows_tcp6") {
        return;
    }
    tcp_conversation("ft6", "::1");
}

#[test]
fn a_long_lived_connection_gets_update_records() {
    if !require_root("flows_update") {
        return;
    }
    let cg = TestCgroup::new("fupd");
    let dir = TempDir::new("fupd");
    let cfg = config(&dir, "update_every_ms = 1000\nopen_after_ms = 200");
    let d = Daemon::start(&cg, &["--interval", "50", "--config", &cfg]);
    let mut srv = Peer::spawn(
        Some(&cg),
        None,
        "u-srv",
        &["tcp-serve", "127.0.0.1", "1", "10"],
    );
    let port = srv.value("port").to_string();
    let mut cli = Peer::spawn(
        Some(&cg),
        None,
        "u-cli",
        &["tcp-trickle", "127.0.0.1", &port, "2600"],
    );
    cli.value("received");
    cli.finish();
    srv.finish();
    // Everything, including what the final poll at shutdown writes.
    let lines = d.stop_lines();
    let f: Vec<Value> = flows(&lines)
        .into_iter()
        .filter(|r| r["label"] == "u-cli")
        .collect();
    let updates: Vec<&Value> = f.iter().filter(|r| r["event"] == "update").collect();
    assert!(
        updates.len() >= 2,
        "a 2.6 s connection with 1 s updates: {f:#?}"
    );
    // Updates carry the counts so far: they grow.
    assert!(
        updates
            .windows(2)
            .all(|w| w[1]["tx"].as_u64() > w[0]["tx"].as_u64()),
        "{updates:?}"
    );
    assert_eq!(f.iter().filter(|r| r["event"] == "open").count(), 1);
}

#[test]
fn a_udp_client_talking_to_three_peers_gives_three_records() {
    if !require_root("flows_udp") {
        return;
    }
    let cg = TestCgroup::new("fudp");
    let dir = TempDir::new("fudp");
    let cfg = config(&dir, "open_after_ms = 0\nconsolidate_gap_ms = 0");
    let d = Daemon::start(&cg, &["--interval", "50", "--config", &cfg]);
    let mut rx: Vec<Peer> = (0..3)
        .map(|_| Peer::spawn(Some(&cg), None, "u-recv", &["udp-recv", "127.0.0.1"]))
        .collect();
    let ports: Vec<String> = rx.iter_mut().map(|p| p.value("port").to_string()).collect();
    let (count, size) = (20u64, 50u64);
    let mut tx = Peer::spawn(
        Some(&cg),
        None,
        "u-multi",
        &[
            "udp-multi",
            "127.0.0.1",
            &ports.join(","),
            &count.to_string(),
            &size.to_string(),
        ],
    );
    tx.value("sent");
    tx.finish();
    for (p, port) in rx.iter().zip(&ports) {
        let _ = p;
        Peer::spawn(Some(&cg), None, "u-stop", &["udp-stop", "127.0.0.1", port]).finish();
    }
    for p in rx {
        p.finish();
    }
    // Everything, including what the final poll at shutdown writes.
    let lines = d.stop_lines();
    let closes: Vec<Value> = flows(&lines)
        .into_iter()
        .filter(|r| r["label"] == "u-multi" && r["event"] == "close")
        .collect();
    assert_eq!(closes.len(), 3, "one record per peer: {closes:#?}");
    let mut seen: Vec<u64> = closes
        .iter()
        .map(|r| r["remote_port"].as_u64().unwrap())
        .collect();
    seen.sort();
    let mut want: Vec<u64> = ports.iter().map(|p| p.parse().unwrap()).collect();
    want.sort();
    assert_eq!(seen, want);
    for r in &closes {
        assert_eq!(r["proto"], "udp");
        // count datagrams × (payload + 8 UDP + 20 IPv4)
        assert_eq!(r["tx"], count * (size + 8 + 20), "{r}");
        assert_eq!(r["tx_packets"], count);
    }
}

/// Issue 19's setup, run after run: an unconnected sender talks to three receivers and
/// closes, flow settings at their defaults. Every peer of the sender, and the sender as
/// every receiver's peer, gets its close record with its exact bytes, and no peer is
/// orphaned. (Issue 19 saw records missing in 2 of 4 such runs on a busy machine; not
/// reproduced here yet: this guards the fix.)
#[test]
fn udp_flows_are_complete_run_after_run() {
    if !require_root("flows_udp_runs") {
        return;
    }
    let (count, size) = (50u64, 300u64);
    for run in 0..5 {
        let cg = TestCgroup::new("fudp-runs");
        let dir = TempDir::new("fudp-runs");
        let cfg = config(&dir, "enabled = true");
        let d = Daemon::start(&cg, &["--config", &cfg]);
        let mut rx: Vec<Peer> = (0..3)
            .map(|_| Peer::spawn(Some(&cg), None, "ur-recv", &["udp-recv", "127.0.0.1"]))
            .collect();
        let ports: Vec<String> = rx.iter_mut().map(|p| p.value("port").to_string()).collect();
        let mut tx = Peer::spawn(
            Some(&cg),
            None,
            "ur-send",
            &[
                "udp-multi",
                "127.0.0.1",
                &ports.join(","),
                &count.to_string(),
                &size.to_string(),
            ],
        );
        tx.value("sent");
        tx.finish();
        for port in &ports {
            // The stop datagram (1 B) comes from outside the cgroup: the receiver's rx only.
            Peer::spawn(None, None, "ur-stop", &["udp-stop", "127.0.0.1", port]).finish();
        }
        for p in rx {
            p.finish();
        }
        d.wait_ticks(3);
        let orphans = d.control(json!({"cmd": "status"}))["flows"]["orphan_peers"].clone();
        let lines = d.stop_lines();
        let recs = flows(&lines);
        let sum = |label: &str, dir: &str| -> u64 {
            recs.iter()
                .filter(|r| r["label"] == label && r["event"] == "close")
                .map(|r| r[dir].as_u64().unwrap())
                .sum()
        };
        let per_peer = count * (size + 8 + 20);
        let sender: Vec<&Value> = recs
            .iter()
            .filter(|r| r["label"] == "ur-send" && r["event"] == "close")
            .collect();
        assert_eq!(
            sender.len(),
            3,
            "run {run}: one record per peer: {sender:#?}"
        );
        assert_eq!(sum("ur-send", "tx"), 3 * per_peer, "run {run}");
        assert_eq!(
            sum("ur-recv", "rx"),
            3 * per_peer + 3 * (1 + 8 + 20),
            "run {run}: {recs:#?}"
        );
        assert_eq!(orphans, 0, "run {run}: orphaned peers");
    }
}

#[test]
fn short_connections_within_the_gap_become_one_session() {
    if !require_root("flows_session") {
        return;
    }
    let cg = TestCgroup::new("fses");
    // Defaults: consolidation on, 5 s gap.
    let d = Daemon::start(&cg, &["--interval", "50"]);
    let n = 100u64;
    let mut srv = Peer::spawn(
        Some(&cg),
        None,
        "s-srv",
        &["tcp-serve", "127.0.0.1", &n.to_string(), "100"],
    );
    let port = srv.value("port");
    let mut cli = Peer::spawn(
        Some(&cg),
        None,
        "s-cli",
        &[
            "tcp-connect",
            "127.0.0.1",
            &port.to_string(),
            &n.to_string(),
            "300",
        ],
    );
    cli.value("received");
    cli.finish();
    srv.finish();
    // A pending session is written when the gap has passed or at shutdown.
    let lines = d.stop_lines();
    let events = deltas(&lines);
    let s = sum(&events);
    let f = flows(&lines);
    let cli_recs: Vec<&Value> = f.iter().filter(|r| r["label"] == "s-cli").collect();
    assert_eq!(
        cli_recs.len(),
        1,
        "100 short connections within the gap: one record: {cli_recs:#?}"
    );
    let r = cli_recs[0];
    assert_eq!(r["event"], "close");
    assert_eq!(r["connections"], n);
    assert!(
        r.get("local_port").is_none(),
        "several source ports merged: the source port is left out: {r}"
    );
    assert_eq!(r["remote_port"], port);
    let c = label(&s, "s-cli");
    assert_eq!(r["tx"], c.tx, "summed bytes");
    assert_eq!(r["rx"], c.rx);
    let srv_recs: Vec<&Value> = f
        .iter()
        .filter(|r| r["label"] == "s-srv" && r["direction"] == "inbound")
        .collect();
    assert_eq!(srv_recs.len(), 1, "{srv_recs:#?}");
    assert_eq!(srv_recs[0]["connections"], n);
}

#[test]
fn a_filter_that_excludes_udp_leaves_no_udp_record() {
    if !require_root("flows_filter") {
        return;
    }
    let cg = TestCgroup::new("ffil");
    let dir = TempDir::new("ffil");
    let cfg = config(
        &dir,
        "protocols = [\"tcp\"]\nopen_after_ms = 0\nconsolidate_gap_ms = 0",
    );
    let d = Daemon::start(&cg, &["--interval", "50", "--config", &cfg]);
    let mut rcv = Peer::spawn(Some(&cg), None, "x-recv", &["udp-recv", "127.0.0.1"]);
    let port = rcv.value("port").to_string();
    Peer::spawn(
        Some(&cg),
        None,
        "x-udp",
        &["udp-send", "127.0.0.1", &port, "10", "40"],
    )
    .finish();
    Peer::spawn(Some(&cg), None, "x-udp", &["udp-stop", "127.0.0.1", &port]).finish();
    rcv.finish();
    let mut srv = Peer::spawn(
        Some(&cg),
        None,
        "x-tcp",
        &["tcp-serve", "127.0.0.1", "1", "10"],
    );
    let tport = srv.value("port").to_string();
    Peer::spawn(
        Some(&cg),
        None,
        "x-tcpc",
        &["tcp-connect", "127.0.0.1", &tport, "1", "10"],
    )
    .finish();
    srv.finish();
    let lines = d.stop_lines();
    let f = flows(&lines);
    assert!(
        f.iter().any(|r| r["proto"] == "tcp"),
        "TCP records still written: {f:#?}"
    );
    assert!(
        !f.iter().any(|r| r["proto"] == "udp"),
        "no UDP record: {f:#?}"
    );
    // The bytes still reach the delta events.
    let events = deltas(&lines);
    assert!(sum(&events).labels.contains_key("x-udp"));
}

#[test]
fn the_flow_table_cap_overflows_visibly() {
    if !require_root("flows_cap") {
        return;
    }
    let cg = TestCgroup::new("fcap");
    let dir = TempDir::new("fcap");
    let cfg = config(
        &dir,
        "max_flows = 4\nconsolidate_gap_ms = 0\nopen_after_ms = 0",
    );
    let d = Daemon::start(&cg, &["--interval", "50", "--config", &cfg]);
    // Ten connections held open at once: more than the table takes.
    let mut srv = Peer::spawn(
        Some(&cg),
        None,
        "c-srv",
        &["tcp-serve", "127.0.0.1", "10", "10"],
    );
    let port = srv.value("port").to_string();
    let mut holders: Vec<Peer> = (0..10)
        .map(|_| {
            Peer::spawn(
                Some(&cg),
                None,
                "c-hold",
                &["hold-tcp", "127.0.0.1", &port, "10"],
            )
        })
        .collect();
    for h in &mut holders {
        h.expect_line("connected");
    }
    // Let the first packets be seen; then release them all (the server serves them in
    // whatever order they connected).
    d.wait_ticks(3);
    for h in &mut holders {
        h.send_line("go");
    }
    for mut h in holders {
        h.value("received");
        h.finish();
    }
    srv.finish();
    let st = wait_for("the overflow in status", Duration::from_secs(10), || {
        let st = d.control(json!({"cmd": "status"}));
        (st["flows"]["overflow"].as_u64().unwrap_or(0) > 0).then_some(st)
    });
    eprintln!("flows status: {}", st["flows"]);
    let events = d.stop();
    // Bytes of untracked flows still reach the delta events.
    assert!(label(&sum(&events), "c-hold").tx > 0);
}
