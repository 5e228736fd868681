//! Live views of a real agent with real traffic: `sockacct events` (the record stream),
//! a subscriber that stops reading, `sockacct top` in a real terminal (tmux) and
//! `sockacct top --once`.
use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use serde_json::{Value, json};
use sockacct_tests::{
    Daemon, Peer, TempDir, TestCgroup, agent_exe, rand_u32, require_root, wait_for,
};

/// A connected UDP socket sending 32 B every 50 ms from a process named `name`; returns
/// the peer and the receiver's port.
fn generator(cg: &TestCgroup, name: &str, sockets: usize, net: u8) -> (Peer, String) {
    let mut p = Peer::spawn(
        Some(cg),
        None,
        name,
        &["udp-churn", &sockets.to_string(), "50", &net.to_string()],
    );
    let port = p.value("port").to_string();
    p.value("sockets");
    (p, port)
}

fn stop(mut p: Peer) {
    p.send_line("stop");
    p.finish();
}

#[test]
fn events_follow_shows_the_generators_delta_and_flow_records() {
    if !require_root("events_follow") {
        return;
    }
    let cg = TestCgroup::new("events");
    let d = Daemon::start(&cg, &["--interval", "100"]);
    let mut ev = Command::new(agent_exe())
        .args(["events", "--follow", "--control-socket"])
        .arg(d.control_socket())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let out = ev.stdout.take().unwrap();
    thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let (gen_, port) = generator(&cg, "live-events", 1, 41);
    // A delta naming the generator, and a flow record of its connection (open after 1 s).
    let (mut delta, mut flow) = (None::<Value>, None::<Value>);
    wait_for(
        "a delta and a flow record of the generator",
        Duration::from_secs(30),
        || {
            while let Ok(l) = rx.try_recv() {
                let v: Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
                if v["type"] == "delta" && v["labels"]["live-events"]["tx"].as_u64() > Some(0) {
                    delta.get_or_insert(v);
                } else if v["type"] == "flow"
                    && v["label"] == "live-events"
                    && v["remote_port"].as_u64().map(|p| p.to_string()) == Some(port.clone())
                {
                    flow.get_or_insert(v);
                }
            }
            (delta.is_some() && flow.is_some()).then_some(())
        },
    );
    let delta = delta.unwrap();
    // 32 B payload + UDP 8 + IPv4 20 per datagram.
    assert_eq!(
        delta["labels"]["live-events"]["tx"].as_u64().unwrap() % 60,
        0,
        "{delta}"
    );
    assert_eq!(flow.unwrap()["proto"], "udp");
    let st = d.control(json!({"cmd": "status"}));
    assert_eq!(st["stream"]["subscribers"], 1, "{}", st["stream"]);
    let _ = ev.kill();
    let _ = ev.wait();
    stop(gen_);
    wait_for("the subscriber to be gone", Duration::from_secs(10), || {
        (d.control(json!({"cmd": "status"}))["stream"]["subscribers"] == 0).then_some(())
    });
    d.stop();
}

#[test]
fn a_subscriber_that_stops_reading_is_cut_off_and_the_ticks_go_on() {
    if !require_root("events_cut_off") {
        return;
    }
    let cg = TestCgroup::new("cutoff");
    let dir = TempDir::new("cutoff");
    let cfg = dir.0.join("config.toml");
    // 500 labels moving every tick: tens of KB of records per interval.
    std::fs::write(&cfg, "[[rule]]\nlabel = \"port-{local_port}\"\n").unwrap();
    let d = Daemon::start(
        &cg,
        &["--interval", "100", "--config", cfg.to_str().unwrap()],
    );
    let (gen_, _) = generator(&cg, "live-cut", 500, 42);
    let mut s = UnixStream::connect(d.control_socket()).unwrap();
    s.write_all(b"{\"cmd\":\"subscribe\",\"types\":[\"delta\"]}\n")
        .unwrap();
    let mut ack = String::new();
    let mut r = BufReader::new(s.try_clone().unwrap());
    r.read_line(&mut ack).unwrap();
    assert!(ack.contains("\"ok\":true"), "{ack}");
    let ticks = |d: &Daemon| {
        d.control(json!({"cmd": "status"}))["ticks"]
            .as_u64()
            .unwrap()
    };
    let t0 = ticks(&d);
    // Read nothing more: the socket buffer fills, the agent's write stalls, it cuts off.
    wait_for(
        "the stalled subscriber to be cut off",
        Duration::from_secs(60),
        || {
            let st = d.control(json!({"cmd": "status"}));
            (st["stream"]["cut_off"] == 1 && st["stream"]["subscribers"] == 0).then_some(())
        },
    );
    // The poll loop never waited for it: ticks went on at the interval meanwhile (the
    // stall alone is 2 s, 20 intervals).
    let moved = ticks(&d) - t0;
    assert!(
        moved >= 15,
        "only {moved} ticks while the subscriber stalled"
    );
    let st = d.control(json!({"cmd": "status"}));
    assert_eq!(st["control_refused"]["subscribe_refused"], 0);
    // What is left to read ends with the reason.
    let mut rest = String::new();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    r.read_to_string(&mut rest).unwrap();
    let last = rest.lines().rev().find(|l| !l.is_empty()).unwrap_or("");
    let v: Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{last:?}: {e}"));
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().contains("cut off"), "{v}");
    // Counted where an operator looks for drops.
    let m = sockacct_tests::prom::get(&d.metrics_addr(), "/metrics", None).unwrap();
    let samples = sockacct_tests::prom::parse(&m.body);
    assert_eq!(
        sockacct_tests::prom::value(
            &samples,
            "sockacct_drops_total",
            &[("stage", "control"), ("reason", "subscriber_cut_off")]
        ),
        Some(1.0)
    );
    stop(gen_);
    d.stop();
}

#[test]
fn top_once_prints_rows_that_add_up_to_the_kernel_total() {
    if !require_root("top_once") {
        return;
    }
    let cg = TestCgroup::new("toponce");
    let d = Daemon::start(&cg, &["--interval", "100"]);
    let (gen_, _) = generator(&cg, "live-once", 4, 43);
    d.wait_ticks(5);
    let (code, out, err) = d.cli(&["top", "--once", "--seconds", "1.5"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    // Columns from the right: TX_BYTES RX_BYTES TX_PKTS RX_PKTS.
    let col = |r: &Vec<&str>, from_end: usize| r[r.len() - from_end].parse::<u64>().unwrap();
    let (total, rest) = rows.split_last().expect("rows");
    assert_eq!(&total[..2], &["total", "(kernel)"], "{out}");
    for c in 1..=4 {
        let sum: u64 = rest.iter().map(|r| col(r, c)).sum();
        assert_eq!(sum, col(total, c), "column {c} from the right:\n{out}");
    }
    let gen_row = rest.iter().find(|r| r[0] == "live-once").expect(&out);
    // Four sockets, 20 datagrams/s each, 60 B on the wire each, for ~1.5 s.
    assert!(col(gen_row, 4) > 0 && col(gen_row, 4) % 60 == 0, "{out}");
    stop(gen_);
    d.stop();
}

#[test]
fn top_and_events_say_what_to_do_when_no_agent_runs() {
    let dir = TempDir::new("noagent");
    let sock = dir.0.join("none.sock");
    for args in [&["top", "--once"][..], &["events"][..]] {
        let o = Command::new(agent_exe())
            .args(args)
            .arg("--control-socket")
            .arg(&sock)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("is `sockacct run` running?"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn top_says_what_to_do_when_the_caller_may_not_use_the_control_socket() {
    if !require_root("top_not_allowed") {
        return;
    }
    let dir = TempDir::new("notallowed");
    let sock = dir.0.join("control.sock");
    // A root-owned socket nobody else may write to (as the agent's, mode 0600 or 0660).
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let o = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(sockacct_tests::world_exe("sockacct-agent"))
        .args(["top", "--once", "--control-socket"])
        .arg(&sock)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("you may not use the agent's control socket"),
        "{err}"
    );
    assert!(err.contains("run as root"), "{err}");
}

/// A tmux server of the test's own, killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        let t = Tmux {
            socket: format!("sockacct-test-{}", rand_u32()),
        };
        let ok = t
            .cmd(&[
                "new-session",
                "-d",
                "-s",
                "top",
                "-x",
                "160",
                "-y",
                "40",
                "env",
                "PS1=READY$ ",
                "bash",
                "--norc",
                "--noprofile",
            ])
            .status
            .success();
        assert!(
            ok,
            "tmux new-session failed (is tmux installed? apt-get install tmux)"
        );
        t
    }

    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux (apt-get install tmux)")
    }

    fn keys(&self, keys: &[&str]) {
        let mut a = vec!["send-keys", "-t", "top"];
        a.extend(keys);
        assert!(self.cmd(&a).status.success());
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.cmd(&["capture-pane", "-p", "-t", "top"]).stdout).into()
    }

    fn wait_screen(&self, what: &str, mut ok: impl FnMut(&str) -> bool) -> String {
        let mut last = String::new();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for(what, Duration::from_secs(30), || {
                last = self.screen();
                ok(&last).then(|| last.clone())
            })
        }));
        r.unwrap_or_else(|_| panic!("{what}; the screen was:\n{last}"))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

#[test]
fn top_in_a_terminal_shows_the_generator_and_its_connection() {
    if !require_root("top_tmux") {
        return;
    }
    let cg = TestCgroup::new("toptmux");
    let d = Daemon::start(&cg, &["--interval", "100"]);
    let (gen_, port) = generator(&cg, "live-top", 1, 44);
    let t = Tmux::new();
    t.wait_screen("the shell prompt", |s| s.contains("READY$"));
    let cmd = format!(
        "{} top --control-socket {}",
        agent_exe(),
        d.control_socket().display()
    );
    t.keys(&[&cmd, "Enter"]);
    // The generator's row, with a rate that is not zero.
    let screen = t.wait_screen("the generator's label with a rate", |s| {
        s.lines().any(|l| {
            let cols: Vec<&str> = l
                .split(|c: char| c.is_whitespace() || c == '│')
                .filter(|c| !c.is_empty())
                .collect();
            // LABEL, TX rate (number, unit), ...
            cols.first() == Some(&"live-top") && cols.get(1).is_some_and(|v| *v != "0")
        })
    });
    assert!(screen.contains("total (kernel)"), "{screen}");
    assert!(screen.contains("unattributed"), "{screen}");
    // The connections view shows its remote port.
    t.keys(&["c"]);
    t.wait_screen("the generator's connection", |s| {
        s.contains("connections") && s.contains(&format!(":{port}")) && s.contains("live-top")
    });
    // q leaves, exit code 0, and the shell is back in a restored terminal.
    t.keys(&["q"]);
    t.wait_screen("the shell again", |s| {
        !s.contains("sockacct top ·") && s.contains("READY$")
    });
    t.keys(&["echo rc=$?", "Enter"]);
    t.wait_screen("top's exit code", |s| s.contains("rc=0"));
    stop(gen_);
    d.stop();
}
