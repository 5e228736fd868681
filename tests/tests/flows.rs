//! Connection records (`type: "flow"`) from the real agent, with real traffic.
use std::{collections::BTreeMap, fs, time::Duration};

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

/// Sum of the traffic of every `close` record (sessions included) per label.
fn closed_per_label(recs: &[Value]) -> BTreeMap<String, Traffic> {
    let mut m: BTreeMap<String, Traffic> = BTreeMap::new();
    for r in recs.iter().filter(|r| r["event"] == "close") {
        let n = |k: &str| r[k].as_u64().unwrap();
        m.entry(r["label"].as_str().unwrap().to_string())
            .or_default()
            .add(&Traffic {
                tx: n("tx"),
                rx: n("rx"),
                tx_packets: n("tx_packets"),
                rx_packets: n("rx_packets"),
            });
    }
    m
}

/// The flow ledger, under stress: the patterns that lost flow records (issue 19: an
/// unconnected sender with several peers closing soon after, receivers, sockets that
/// open, send and close inside one interval), mixed with connected UDP and TCP, IPv4 and
/// IPv6, 50 runs over 5 agents, each run starting at a different point of the interval;
/// the last run of each agent keeps its receivers open while the agent stops. For every
/// socket (every socket has its own label), its flow records' closes add up exactly to its
/// bytes and packets in the delta events, and nothing is counted as unrecordable.
#[test]
fn the_flow_ledger_holds_run_after_run() {
    if !require_root("flows_ledger") {
        return;
    }
    const AGENTS: usize = 5;
    const RUNS: usize = 10;
    for agent in 0..AGENTS {
        let cg = TestCgroup::new("fledger");
        let dir = TempDir::new("fledger");
        let cfg = config(&dir, "enabled = true");
        let d = Daemon::start(&cg, &["--config", &cfg]);
        let mut tags = vec![];
        let mut held = vec![];
        for run in 0..RUNS {
            let tag = format!("{agent}{run}");
            let delay = (rand_u32() % 100_000).to_string();
            let hold = if run == RUNS - 1 { "1" } else { "0" };
            let mut p = Peer::spawn(
                Some(&cg),
                None,
                "fl-stress",
                &["flow-stress", &tag, &delay, hold],
            );
            p.value("done");
            if hold == "1" {
                held.push(p);
            } else {
                p.finish();
            }
            tags.push(tag);
        }
        // Every finished socket waits for a whole pass over the per-peer map: no socket
        // may still be waiting, and nothing may have been unrecordable.
        // Every socket that ended (9 per family and run: r1-r3, s, q, c, t, the accepted
        // one and its listener; the held run's receivers are still open) is settled in the
        // ledger, and nothing waits.
        let ended = (RUNS * 2 * 9 - 2 * 3) as u64;
        let st = wait_for(
            "every ended socket settled",
            Duration::from_secs(30),
            || {
                let st = d.control(json!({"cmd": "status"}));
                let f = &st["flows"];
                let settled = f["ledger"]["exact_sockets"].as_u64().unwrap_or(0)
                    + f["ledger"]["inexact_sockets"].as_u64().unwrap_or(0);
                (settled >= ended && f["pending_sockets"] == 0 && f["finishing"] == 0).then_some(st)
            },
        );
        let ledger = &st["flows"]["ledger"];
        assert_eq!(st["flows"]["orphan_peers"], 0, "agent {agent}: {st:#}");
        assert_eq!(ledger["unrecorded"], json!({}), "agent {agent}: {ledger:#}");
        assert_eq!(ledger["inexact_sockets"], 0, "agent {agent}: {ledger:#}");
        assert_eq!(ledger["exact_sockets"], ended, "agent {agent}: {ledger:#}");
        assert_eq!(
            ledger["over_recorded"],
            json!(Traffic::default()),
            "{ledger:#}"
        );
        let listening: Traffic = serde_json::from_value(ledger["listening"].clone()).unwrap();
        let lines = d.stop_lines();
        drop(held);
        let events = deltas(&lines);
        check_events(&events);
        let s = sum(&events);
        let recs = flows(&lines);
        let closed = closed_per_label(&recs);
        let zero = Traffic::default();
        let mut accepted_flows = Traffic::default();
        let mut accepted_deltas = Traffic::default();
        for tag in &tags {
            for (v, ip_hdr) in [('4', 20u64), ('6', 40u64)] {
                let name = |role: &str| format!("{tag}{v}{role}");
                // The sender's bytes with the header arithmetic: 3 peers x 20 datagrams of
                // 100..119 B, each + 8 (UDP) + the IP header; r1's 20 answers of 50 B back.
                let sent: u64 = (0..20u64).map(|i| 100 + i + 8 + ip_hdr).sum::<u64>() * 3;
                let got = 20 * (50 + 8 + ip_hdr);
                let sender = label(&s, &name("s"));
                assert_eq!((sender.tx, sender.rx), (sent, got), "{}", name("s"));
                assert_eq!((sender.tx_packets, sender.rx_packets), (60, 20));
                for role in ["r1", "r2", "r3", "s", "q", "c", "t"] {
                    let n = name(role);
                    let want = label(&s, &n);
                    let have = closed.get(&n).unwrap_or(&zero);
                    assert_eq!(
                        have,
                        want,
                        "agent {agent}: socket {n}: its flow records (left) against its \
                         delta events (right): {:#?}",
                        recs.iter()
                            .filter(|r| r["label"] == n.as_str())
                            .collect::<Vec<_>>()
                    );
                }
                // An accepted socket's first bytes may come before its owner is known
                // (unattributed): the accepted sockets together, with what is unattributed.
                let n = name("a");
                accepted_flows.add(closed.get(&n).unwrap_or(&zero));
                if let Some(t) = s.labels.get(&n) {
                    accepted_deltas.add(t);
                }
            }
        }
        accepted_deltas.add(&s.unattributed);
        // The handshake packets (SYN, the last ACK) are counted on the listening socket,
        // which shares the accepted socket's name: the ledger reports them as listening.
        accepted_flows.add(&listening);
        assert_eq!(
            accepted_flows, accepted_deltas,
            "agent {agent}: accepted sockets' flows and listeners' handshakes (left) against their deltas and what was unattributed (right)"
        );
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
