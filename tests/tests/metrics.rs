//! The Prometheus endpoint, read by the real consumers: a Prometheus server scraping the
//! agent every second, and promtool checking the exposition.
use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use sockacct_tests::{
    Daemon, Peer, TempDir, TestCgroup, label,
    prom::{self, Prometheus},
    require_root, sum,
};

/// UDP over IPv4: payload + UDP header 8 + IPv4 header 20.
const UDP4_OVERHEAD: u64 = 8 + 20;

/// Polls `read` until it returns `want`, up to `deadline`; fails with the last value.
fn wait_value(what: &str, deadline: Duration, want: f64, mut read: impl FnMut() -> Option<f64>) {
    let end = Instant::now() + deadline;
    let mut last = None;
    while Instant::now() < end {
        last = read();
        if last == Some(want) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{what}: wanted {want}, last seen {last:?} after {deadline:?}");
}

/// Sends `count` datagrams of `size` bytes from a process named `name` to `port`.
fn send(cg: &TestCgroup, name: &str, port: &str, count: u64, size: u64) {
    let mut s = Peer::spawn(
        Some(cg),
        None,
        name,
        &[
            "udp-send",
            "127.0.0.1",
            port,
            &count.to_string(),
            &size.to_string(),
        ],
    );
    assert_eq!(s.value("sent"), count);
    s.finish();
}

#[test]
fn prometheus_scrapes_exact_label_bytes() {
    if !require_root("prometheus_scrape") {
        return;
    }
    let cg = TestCgroup::new("prom");
    let d = Daemon::start(&cg, &["--interval", "100"]);
    let addr = d.metrics_addr();
    let prom = Prometheus::start(&addr);

    let (count, size) = (500u64, 100u64);
    let mut rcv = Peer::spawn(Some(&cg), None, "prom-recv", &["udp-recv", "127.0.0.1"]);
    let port = rcv.value("port").to_string();
    send(&cg, "prom-sender", &port, count, size);
    Peer::spawn(
        Some(&cg),
        None,
        "prom-stop",
        &["udp-stop", "127.0.0.1", &port],
    )
    .finish();
    let (got, drops) = (rcv.value("datagrams"), rcv.value("drops"));
    rcv.finish();

    // What Prometheus stored, from its own scrapes: datagrams × (payload + 28).
    let want = count * (size + UDP4_OVERHEAD);
    wait_value(
        "Prometheus's sockacct_label_bytes_total for the sender",
        Duration::from_secs(60),
        want as f64,
        || prom.scalar(r#"sockacct_label_bytes_total{label="prom-sender",direction="tx"}"#),
    );
    assert_eq!(
        prom.scalar(r#"sockacct_label_packets_total{label="prom-sender",direction="tx"}"#),
        Some(count as f64)
    );
    // The receiver: every datagram that reached its socket, and the 1-byte stop datagram.
    wait_value(
        "Prometheus's rx bytes for the receiver",
        Duration::from_secs(30),
        ((got + drops) * (size + UDP4_OVERHEAD) + 1 + UDP4_OVERHEAD) as f64,
        || prom.scalar(r#"sockacct_label_bytes_total{label="prom-recv",direction="rx"}"#),
    );
    assert_eq!(prom.scalar(r#"up{job="sockacct"}"#), Some(1.0));
    assert_eq!(
        prom.scalar(r#"sum(sockacct_drops_total)"#),
        Some(0.0),
        "nothing dropped: {:?}",
        prom.query("sockacct_drops_total > 0")
    );
    assert_eq!(prom.scalar("sockacct_spool_healthy"), Some(1.0));
    assert!(
        prom.scalar("histogram_quantile(0.5, sockacct_tick_work_seconds_bucket)")
            .is_some_and(|v| v > 0.0 && v < 1.0)
    );
    let info = prom.query("sockacct_build_info");
    assert_eq!(info.len(), 1, "{info:?}");
    assert!(
        info[0]["metric"]["hooks"]
            .as_str()
            .unwrap()
            .contains("tcp_close=")
    );

    // The classic text format, as curl or promtool get it, accepted by promtool.
    let classic = prom::get(&addr, "/metrics", None).unwrap();
    assert_eq!(classic.status, 200);
    assert_eq!(
        classic.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert!(!classic.body.contains("# EOF"));
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (Debian package prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(classic.body.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // OpenMetrics when asked, with the same samples.
    let om = prom::get(
        &addr,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
    )
    .unwrap();
    assert_eq!(
        om.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(om.body.ends_with("# EOF\n"));
    let (a, b) = (prom::parse(&classic.body), prom::parse(&om.body));
    let sender = |s: &[prom::Sample]| {
        prom::value(
            s,
            "sockacct_label_bytes_total",
            &[("label", "prom-sender"), ("direction", "tx")],
        )
    };
    assert_eq!(sender(&a), Some(want as f64));
    assert_eq!(sender(&b), Some(want as f64));
    assert_eq!(prom::get(&addr, "/nope", None).unwrap().status, 404);

    // The agent's own events say the same.
    let events = d.stop();
    assert_eq!(label(&sum(&events), "prom-sender").tx, want);
}

#[test]
fn label_series_are_capped_under_other() {
    if !require_root("metrics_label_cap") {
        return;
    }
    let cg = TestCgroup::new("promcap");
    let dir = TempDir::new("promcap");
    let cfg = dir.0.join("config.toml");
    std::fs::write(&cfg, "[metrics]\nmax_label_series = 2\n").unwrap();
    let d = Daemon::start(
        &cg,
        &["--interval", "100", "--config", cfg.to_str().unwrap()],
    );
    let addr = d.metrics_addr();

    let (count, size) = (50u64, 100u64);
    let mut rcv = Peer::spawn(Some(&cg), None, "cap-recv", &["udp-recv", "127.0.0.1"]);
    let port = rcv.value("port").to_string();
    let senders = ["cap-send-1", "cap-send-2", "cap-send-3", "cap-send-4"];
    for name in senders {
        send(&cg, name, &port, count, size);
    }
    Peer::spawn(
        Some(&cg),
        None,
        "cap-stop",
        &["udp-stop", "127.0.0.1", &port],
    )
    .finish();
    rcv.value("datagrams");
    rcv.finish();

    // Everything sent in the cgroup: four senders and the stop datagram.
    let tx = senders.len() as u64 * count * (size + UDP4_OVERHEAD) + 1 + UDP4_OVERHEAD;
    let scrape = || prom::parse(&prom::get(&addr, "/metrics", None).unwrap().body);
    wait_value(
        "sockacct_kernel_bytes_total tx",
        Duration::from_secs(30),
        tx as f64,
        || {
            prom::value(
                &scrape(),
                "sockacct_kernel_bytes_total",
                &[("direction", "tx")],
            )
        },
    );
    let s = scrape();
    let series: Vec<&prom::Sample> = s
        .iter()
        .filter(|x| x.name == "sockacct_label_bytes_total" && x.label("direction") == Some("tx"))
        .collect();
    let own: Vec<&str> = series
        .iter()
        .filter_map(|x| x.label("label"))
        .filter(|l| *l != "_other")
        .collect();
    assert_eq!(own.len(), 2, "labels with their own series: {own:?}");
    assert!(
        series.iter().any(|x| x.label("label") == Some("_other")),
        "{series:?}"
    );
    assert_eq!(
        prom::value(&s, "sockacct_metrics_label_series", &[]),
        Some(2.0)
    );
    assert!(prom::value(&s, "sockacct_metrics_label_overflow_total", &[]).unwrap() > 0.0);
    // Nothing is lost to the cap: all series add up to the kernel's total minus
    // unattributed, both ways, bytes and packets.
    for unit in ["bytes", "packets"] {
        for dir in ["tx", "rx"] {
            let all: f64 = s
                .iter()
                .filter(|x| {
                    x.name == format!("sockacct_label_{unit}_total")
                        && x.label("direction") == Some(dir)
                })
                .map(|x| x.value)
                .sum();
            let kernel = prom::value(
                &s,
                &format!("sockacct_kernel_{unit}_total"),
                &[("direction", dir)],
            )
            .unwrap();
            let unattributed = prom::value(
                &s,
                &format!("sockacct_unattributed_{unit}_total"),
                &[("direction", dir)],
            )
            .unwrap();
            assert_eq!(all, kernel - unattributed, "{unit} {dir}");
            assert!(all > 0.0, "{unit} {dir}");
        }
    }
    d.stop();
}

/// The scrape config and alert rules in docs/operations.md are what promtool accepts.
#[test]
fn documented_scrape_config_and_alert_rules_are_valid() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/operations.md"
    ))
    .unwrap();
    let section = doc
        .split("## Prometheus metrics")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Prometheus section in docs/operations.md");
    let blocks: Vec<&str> = section
        .split("```yaml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    assert_eq!(blocks.len(), 2, "a scrape config and the alert rules");
    let dir = TempDir::new("promdocs");
    let (cfg, rules) = (dir.0.join("prometheus.yml"), dir.0.join("rules.yml"));
    // promtool checks that the credential files the secured job names exist.
    assert!(blocks[0].contains("credentials_file: /etc/prometheus/sockacct.token"));
    let prefix = format!("{}/", dir.0.display());
    for f in ["sockacct.token", "sockacct-ca.pem"] {
        std::fs::write(dir.0.join(f), "x\n").unwrap();
    }
    std::fs::write(&cfg, blocks[0].replace("/etc/prometheus/", &prefix)).unwrap();
    std::fs::write(&rules, blocks[1]).unwrap();
    prom::prometheus_exe();
    for (what, file) in [("config", &cfg), ("rules", &rules)] {
        let out = Command::new("promtool")
            .args(["check", what])
            .arg(file)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool check {what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        blocks[1].contains("sockacct_drops_total") && blocks[1].contains("sockacct_spool_healthy")
    );
}
