//! The metrics endpoint against a local attacker (issue 18, probe 4), read by its real
//! consumer: a Prometheus server scraping every second. A user (nobody) holding idle and
//! never-read connections must not stop the scrapes; with credentials configured,
//! Prometheus scrapes with `authorization` and over HTTPS with client certificates while
//! everyone else is refused, and every refusal is counted.
use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use sockacct_tests::{
    Daemon, TempDir, TestCgroup, agent_exe, prom::Prometheus, require_root, wait_for, world_exe,
};

const NOBODY: &str = "65534";

/// `sockacct-stall` run as nobody: idle and never-read connections to `addr`.
struct Stall {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Stall {
    fn start(addr: &str, idle: usize, writers: usize) -> Stall {
        let mut child = Command::new("setpriv")
            .args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
            ])
            .arg(world_exe("sockacct-stall"))
            .args([addr, &idle.to_string(), &writers.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run sockacct-stall as nobody (setpriv, util-linux)");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Stall {
            stdin: child.stdin.take(),
            child,
            lines,
        }
    }

    fn value(&mut self, key: &str) -> u64 {
        let l = self
            .lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("sockacct-stall said no {key}: {e}"));
        l.strip_prefix(&format!("{key} "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("expected {key} N, got {l:?}"))
    }

    /// How many of its connections the server has closed by now.
    fn closed(mut self) -> u64 {
        let mut stdin = self.stdin.take().unwrap();
        stdin.write_all(b"\n").unwrap();
        self.value("closed")
    }
}

impl Drop for Stall {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent's `status` metrics section.
fn metrics_status(d: &Daemon) -> serde_json::Value {
    d.control(serde_json::json!({"cmd": "status"}))["metrics"].clone()
}

fn refused(d: &Daemon, reason: &str) -> u64 {
    metrics_status(d)["refused"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("no refused.{reason} in {}", metrics_status(d)))
}

/// Unix time in milliseconds (Prometheus stamps samples with the same clock).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Scrapes Prometheus stored from `since_ms` on in which `sockacct_metrics_connections_open`
/// was `open`: read as raw samples (a range selector), polled until `want` are there or
/// `deadline` passes. Each sample is one successful scrape.
fn scrapes_with_open(
    prom: &Prometheus,
    open: f64,
    since_ms: u64,
    want: usize,
    deadline: Duration,
) -> usize {
    let mut seen = BTreeSet::new();
    let end = Instant::now() + deadline;
    while Instant::now() < end && seen.len() < want {
        for series in prom.query("sockacct_metrics_connections_open[2m]") {
            for s in series["values"].as_array().into_iter().flatten() {
                let ts = (s[0].as_f64().unwrap() * 1000.0) as u64;
                let v: f64 = s[1].as_str().unwrap().parse().unwrap();
                if ts >= since_ms && v == open {
                    seen.insert(ts);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    seen.len()
}

fn config(dir: &Path, text: &str) -> PathBuf {
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, text).unwrap();
    cfg
}

#[test]
fn stalled_connections_do_not_blind_prometheus() {
    if !require_root("metrics_stall") {
        return;
    }
    let cg = TestCgroup::new("promstall");
    // The defaults: 4 connections per peer, 32 in all, 10 s read and write timeouts.
    let d = Daemon::start(&cg, &["--interval", "100"]);
    let addr = d.metrics_addr();
    let prom = Prometheus::start(&addr);
    wait_for("a first scrape", Duration::from_secs(30), || {
        (prom.scalar(r#"up{job="sockacct"}"#) == Some(1.0)).then_some(())
    });

    // nobody: 3 connections that pipeline 400 scrapes each and never read, then 64 idle.
    let since = now_ms();
    let mut stall = Stall::start(&addr, 64, 3);
    assert_eq!(stall.value("connected"), 67);
    let started = Instant::now();
    // nobody holds its 4 (the 3 writers and one idle); the other 63 were closed at once.
    wait_for("63 refusals of nobody", Duration::from_secs(10), || {
        (refused(&d, "per_peer_limit") == 63).then_some(())
    });
    assert_eq!(refused(&d, "request_timeout"), 0);
    assert_eq!(refused(&d, "write_timeout"), 0);

    // Prometheus scrapes on while nobody's 4 are open: 5 connections (its own included)
    // in the samples it stores, in 3 distinct scrapes before the first timeout (10 s).
    let n = scrapes_with_open(&prom, 5.0, since, 3, Duration::from_secs(9));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "too slow to tell: {:?}",
        started.elapsed()
    );
    assert_eq!(n, 3, "scrapes Prometheus stored during the stall");
    assert_eq!(prom.scalar(r#"up{job="sockacct"}"#), Some(1.0));
    assert_eq!(
        prom.scalar(r#"sockacct_drops_total{stage="metrics",reason="per_peer_limit"}"#),
        Some(63.0)
    );

    // The stalls end: the idle one at the read timeout, the writers at the write timeout.
    wait_for(
        "the stalled connections to be closed",
        Duration::from_secs(40),
        || {
            let m = metrics_status(&d);
            (m["refused"]["request_timeout"] == 1 && m["refused"]["write_timeout"] == 3)
                .then_some(())
        },
    );
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(10), "closed after {took:?}");
    assert_eq!(
        stall.closed(),
        67,
        "connections nobody holds, closed by the agent"
    );
    let m = metrics_status(&d);
    assert_eq!(m["limits"]["max_connections_per_peer"], 4, "{m}");
    assert_eq!(m["refused"]["connection_limit"], 0, "{m}");
    wait_for(
        "Prometheus to see the timeouts",
        Duration::from_secs(10),
        || {
            (prom.scalar(r#"sockacct_drops_total{stage="metrics",reason="write_timeout"}"#)
                == Some(3.0))
            .then_some(())
        },
    );
    assert_eq!(prom.scalar(r#"up{job="sockacct"}"#), Some(1.0));

    // A request head over max_request_header_bytes (8 KiB): 431, counted.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(9000)
    );
    s.write_all(big.as_bytes()).unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply:?}");
    wait_for("header_too_large counted", Duration::from_secs(5), || {
        (refused(&d, "header_too_large") == 1).then_some(())
    });
    d.stop();
}

#[test]
fn when_all_slots_are_taken_an_idle_one_gives_way() {
    if !require_root("metrics_evict") {
        return;
    }
    let cg = TestCgroup::new("promevict");
    let dir = TempDir::new("promevict");
    let cfg = config(
        &dir.0,
        // A long read timeout: nobody's connections stay until the end of the test.
        "[metrics]\nmax_connections = 4\nmax_connections_per_peer = 4\nread_timeout_secs = 120\n",
    );
    let d = Daemon::start(
        &cg,
        &["--interval", "100", "--config", cfg.to_str().unwrap()],
    );
    let addr = d.metrics_addr();
    // nobody takes every slot before Prometheus comes.
    let mut stall = Stall::start(&addr, 4, 0);
    assert_eq!(stall.value("connected"), 4);
    wait_for("nobody's 4 open", Duration::from_secs(10), || {
        (metrics_status(&d)["connections_open"] == 4).then_some(())
    });
    let (started, since) = (Instant::now(), now_ms());
    let prom = Prometheus::start(&addr);
    // Prometheus gets in (an idle connection of nobody's gives way) and scrapes while
    // nobody holds the 3 others: 4 open in its samples.
    let n = scrapes_with_open(&prom, 4.0, since, 3, Duration::from_secs(30));
    assert_eq!(n, 3, "scrapes stored while the endpoint was full");
    assert!(refused(&d, "evicted") >= 1);
    assert_eq!(refused(&d, "per_peer_limit"), 0);
    eprintln!(
        "first scrapes {:?} after the endpoint was full; status {}",
        started.elapsed(),
        metrics_status(&d)
    );
    drop(stall);
    d.stop();
}

/// A secret file as the operator would write it.
fn secret(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

/// Sends `req` and returns the whole reply (HTTP/1.0-style: the server closes).
fn raw(addr: &str, req: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply
}

#[test]
fn a_bearer_token_is_required_and_prometheus_sends_it() {
    if !require_root("metrics_token") {
        return;
    }
    let cg = TestCgroup::new("promtoken");
    let dir = TempDir::new("promtoken");
    let token = "s3cr3t-7f1c2a";
    let file = secret(&dir.0, "metrics.token", &format!("{token}\n"), 0o600);

    // A token file other users can read is refused at start, naming the key and the fix.
    let exposed = secret(&dir.0, "exposed.token", token, 0o644);
    let bad = config(
        &dir.0,
        &format!("[metrics]\nbearer_token_file = \"{}\"\n", exposed.display()),
    );
    let out = Command::new(agent_exe())
        .args(["run", "--stdout", "--no-spool", "--config"])
        .arg(&bad)
        .arg("--control-socket")
        .arg(dir.0.join("bad.sock"))
        .arg("--state-dir")
        .arg(dir.0.join("bad-state"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started with an exposed token: {err}"
    );
    assert!(
        err.contains("metrics.bearer_token_file")
            && err.contains("accessible to other users")
            && !err.contains(token),
        "{err}"
    );

    // Connections also age out quickly here: Prometheus reconnects, with its token.
    let cfg = config(
        &dir.0,
        &format!(
            "[metrics]\nbearer_token_file = \"{}\"\nmax_connection_age_secs = 2\n",
            file.display()
        ),
    );
    let d = Daemon::start(
        &cg,
        &["--interval", "100", "--config", cfg.to_str().unwrap()],
    );
    let addr = d.metrics_addr();
    assert_eq!(metrics_status(&d)["auth"], "bearer");

    // Without a token, or with a wrong one: 401 with a Bearer challenge, and closed.
    for auth in ["", "Authorization: Bearer wrong\r\n"] {
        let r = raw(
            &addr,
            &format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}\r\n"),
        );
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
        assert!(
            r.to_ascii_lowercase()
                .contains("www-authenticate: bearer realm=\"sockacct\""),
            "{r}"
        );
        assert!(!r.contains("sockacct_"), "metrics leaked: {r}");
    }
    // curl, as an operator would check it.
    let code = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{addr}/metrics"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&code.stdout), "401");
    let ok = Command::new("curl")
        .args(["-sf", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("http://{addr}/metrics"))
        .output()
        .unwrap();
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("sockacct_build_info"));
    assert_eq!(refused(&d, "unauthorized"), 3);

    let prom = Prometheus::start_with(
        &addr,
        &format!(
            "    authorization:\n      credentials_file: {}\n",
            file.display()
        ),
    );
    wait_for(
        "Prometheus to scrape with the token",
        Duration::from_secs(30),
        || {
            (prom.scalar(r#"sockacct_drops_total{stage="metrics",reason="unauthorized"}"#)
                == Some(3.0))
            .then_some(())
        },
    );
    assert_eq!(prom.scalar(r#"up{job="sockacct"}"#), Some(1.0));
    assert_eq!(prom.scalar("sockacct_build_info"), Some(1.0));
    wait_for(
        "Prometheus's connections to age out twice",
        Duration::from_secs(30),
        || (prom.scalar("sockacct_metrics_connections_aged_out_total") >= Some(2.0)).then_some(()),
    );
    assert_eq!(prom.scalar(r#"up{job="sockacct"}"#), Some(1.0));
    // Prometheus's own scrapes were never refused, on any of its connections.
    assert_eq!(refused(&d, "unauthorized"), 3);
    d.stop();
}

/// `openssl` with `args`, in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private CA, a server certificate for 127.0.0.1 and a client certificate, made by
/// openssl in `dir`: ca.pem, server.pem/server.key, client.pem/client.key (keys 0600).
fn make_certs(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=sockacct test CA",
        "-days",
        "2",
    ]);
    openssl(dir, &ca);
    for (who, ext) in [
        (
            "server",
            "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        (
            "client",
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        ),
    ] {
        std::fs::write(dir.join(format!("{who}.ext")), ext).unwrap();
        let (key, csr, pem, extf) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.pem"),
            format!("{who}.ext"),
        );
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend([
            "-keyout",
            key.as_str(),
            "-out",
            csr.as_str(),
            "-subj",
            "/CN=sockacct test",
        ]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &extf,
            ],
        );
        std::fs::set_permissions(dir.join(&key), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

#[test]
fn prometheus_scrapes_over_https_with_a_client_certificate() {
    if !require_root("metrics_tls") {
        return;
    }
    let cg = TestCgroup::new("promtls");
    let dir = TempDir::new("promtls");
    make_certs(&dir.0);
    let p = |f: &str| dir.0.join(f).display().to_string();
    let cfg = config(
        &dir.0,
        &format!(
            "[metrics]\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\ntls_client_ca_file = \"{}\"\n",
            p("server.pem"),
            p("server.key"),
            p("ca.pem")
        ),
    );
    let d = Daemon::start(
        &cg,
        &["--interval", "100", "--config", cfg.to_str().unwrap()],
    );
    let addr = d.metrics_addr();
    assert_eq!(metrics_status(&d)["tls"], "client_certificates");

    // Plain HTTP to the HTTPS port, and HTTPS without a client certificate: no reply.
    let plain = raw(&addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(!plain.contains("sockacct_"), "{plain}");
    let curl = |extra: &[&str]| {
        Command::new("curl")
            .args(["-sf", "--cacert", &p("ca.pem")])
            .args(extra)
            .arg(format!("https://{addr}/metrics"))
            .output()
            .unwrap()
    };
    assert!(!curl(&[]).status.success());
    wait_for("two refused handshakes", Duration::from_secs(5), || {
        (refused(&d, "tls_handshake") == 2).then_some(())
    });
    let ok = curl(&["--cert", &p("client.pem"), "--key", &p("client.key")]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("sockacct_build_info"));

    // Prometheus: scheme https, the private CA, its client certificate.
    let prom = Prometheus::start_with(
        &addr,
        &format!(
            "    scheme: https\n    tls_config:\n      ca_file: {}\n      cert_file: {}\n      key_file: {}\n",
            p("ca.pem"),
            p("client.pem"),
            p("client.key")
        ),
    );
    wait_for(
        "Prometheus to scrape over HTTPS",
        Duration::from_secs(30),
        || {
            (prom.scalar(r#"sockacct_drops_total{stage="metrics",reason="tls_handshake"}"#)
                == Some(2.0))
            .then_some(())
        },
    );
    assert_eq!(prom.scalar(r#"up{job="sockacct"}"#), Some(1.0));
    assert_eq!(refused(&d, "tls_handshake"), 2);
    d.stop();
}
