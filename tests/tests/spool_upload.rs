//! Keeping and shipping events: the real agent spools to disk, `sockacct flush` uploads to
//! a collector the test runs on 127.0.0.1, the control socket refuses what it must, and
//! SIGKILL at random points loses nothing that was written.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use serde_json::{Value, json};
use sockacct_tests::*;

fn seq_of(line: &str) -> u64 {
    let v: Value = serde_json::from_str(line).unwrap();
    v["seq"].as_u64().unwrap()
}

/// Starts a server and a client in `cg` that keep making connections until dropped.
fn steady_traffic(cg: &TestCgroup) -> (Peer, Peer) {
    let mut srv = Peer::spawn(
        Some(cg),
        None,
        "load-srv",
        &["tcp-serve", "127.0.0.1", "1000000", "200"],
    );
    let port = srv.value("port").to_string();
    let cli = Peer::spawn(
        Some(cg),
        None,
        "load-cli",
        &["tcp-connect", "127.0.0.1", &port, "1000000", "500"],
    );
    (srv, cli)
}

/// Every line the collector accepted (2xx), in arrival order, de-duplicated by
/// idempotency key (a retried body must be identical).
fn uploaded(c: &Collector) -> Vec<String> {
    let mut by_key: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut accepted: BTreeSet<String> = BTreeSet::new();
    let mut out = vec![];
    for r in c.requests() {
        let key = r
            .headers
            .get("idempotency-key")
            .cloned()
            .expect("idempotency-key header");
        let prev = by_key.entry(key.clone()).or_insert_with(|| r.body.clone());
        assert_eq!(
            prev, &r.body,
            "a retry under key {key} carried a different body"
        );
        // Only the first accepted copy counts (the server would drop the rest).
        if (200..300).contains(&r.answered) && accepted.insert(key) {
            out.extend(r.lines());
        }
    }
    out
}

#[test]
fn flush_uploads_every_event_once_in_order() {
    if !require_root("flush_uploads") {
        return;
    }
    let col = Collector::start(|_| Answer::Status(200, vec![]));
    let cg = TestCgroup::new("flush");
    let url = col.url("/ingest?query=INSERT%20INTO%20t%20FORMAT%20JSONEachRow");
    let d = Daemon::start(&cg, &["--interval", "50", "--upload-url", &url]);
    let (_s, _c) = steady_traffic(&cg);
    wait_for("some events", Duration::from_secs(10), || {
        (d.lines().len() >= 5).then_some(())
    });
    let (code, out, err) = d.cli(&["flush"]);
    assert_eq!(code, 0, "flush failed: {out} {err}");
    let r1: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r1["ok"], true, "{r1}");
    let first_last = r1["sent"]["last_seq"].as_u64().unwrap();
    wait_for("more events", Duration::from_secs(10), || {
        d.lines()
            .iter()
            .any(|l| seq_of(l) > first_last + 3)
            .then_some(())
    });
    let (code, out, _) = d.cli(&["flush"]);
    assert_eq!(code, 0, "{out}");
    let r2: Value = serde_json::from_str(&out).unwrap();
    let last = r2["sent"]["last_seq"].as_u64().unwrap();
    assert_eq!(
        r2["sent"]["first_seq"].as_u64().unwrap(),
        first_last + 1,
        "the second flush starts where the first ended"
    );
    let printed = d.lines();
    drop((_s, _c));
    d.stop();

    let reqs = col.requests();
    assert!(reqs.len() >= 2);
    for r in &reqs {
        assert_eq!(
            r.path, "/ingest?query=INSERT%20INTO%20t%20FORMAT%20JSONEachRow",
            "query string kept as given"
        );
        assert_eq!(r.headers["content-encoding"], "zstd");
        assert_eq!(r.headers["content-type"], "application/x-ndjson");
        let lines = r.lines();
        let (f, l) = (seq_of(&lines[0]), seq_of(lines.last().unwrap()));
        assert_eq!(r.headers["x-sockacct-seq-first"], f.to_string());
        assert_eq!(r.headers["x-sockacct-seq-last"], l.to_string());
        assert!(
            r.headers["idempotency-key"].ends_with(&format!(":{f}-{l}")),
            "{:?}",
            r.headers
        );
        assert_eq!(r.headers["x-sockacct-records"], lines.len().to_string());
        for line in &lines {
            let v: Value = serde_json::from_str(line).unwrap();
            assert!(v.is_object(), "JSONEachRow takes one object per line");
        }
    }
    assert_eq!(
        reqs.len(),
        reqs.iter()
            .map(|r| &r.headers["idempotency-key"])
            .collect::<BTreeSet<_>>()
            .len(),
        "no duplicate on a clean run"
    );
    let up = uploaded(&col);
    let seqs: Vec<u64> = up.iter().map(|l| seq_of(l)).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "uploaded in order, each once: {seqs:?}"
    );
    // Every event printed up to the second flush was uploaded, byte for byte.
    let printed: BTreeMap<u64, &String> = printed.iter().map(|l| (seq_of(l), l)).collect();
    for (seq, line) in printed.range(..=last) {
        assert!(
            up.contains(line),
            "event seq {seq} printed but not uploaded"
        );
    }
    assert_eq!(up.len() as u64, printed.range(..=last).count() as u64);
}

#[test]
fn a_lost_reply_is_retried_with_the_same_idempotency_key() {
    if !require_root("lost_reply") {
        return;
    }
    // The first request is read and then the connection closes: the server may have
    // stored it, the agent cannot know, so it sends the same body with the same key.
    let col = Collector::start(|i| {
        if i == 0 {
            Answer::Close
        } else {
            Answer::Status(200, vec![])
        }
    });
    let cg = TestCgroup::new("lost");
    let d = Daemon::start(&cg, &["--interval", "50", "--upload-url", &col.url("/")]);
    let (_s, _c) = steady_traffic(&cg);
    wait_for("some events", Duration::from_secs(10), || {
        (d.lines().len() >= 3).then_some(())
    });
    let (code, out, _) = d.cli(&["flush"]);
    assert_eq!(code, 0, "{out}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["server"][0]["attempts"], 2, "{r}");
    let reqs = col.requests();
    assert_eq!(
        reqs[0].headers["idempotency-key"],
        reqs[1].headers["idempotency-key"]
    );
    assert_eq!(reqs[0].body, reqs[1].body);
    drop((_s, _c));
    d.stop();
}

#[test]
fn a_failing_server_keeps_the_data_and_flush_says_so() {
    if !require_root("failing_server") {
        return;
    }
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let col = Collector::start(move |_| {
        if h.load(Ordering::SeqCst) {
            Answer::Status(200, vec![])
        } else {
            Answer::Status(500, vec![])
        }
    });
    let cg = TestCgroup::new("fail");
    let state = TempDir::new("fail");
    let cfg = state.0.join("sockacct.toml");
    fs::write(
        &cfg,
        format!(
            // The deadline bounds the failing flush's retries; the healthy flush must fit
            // in it too, with the machine busy running the other tests (1.5 s was not
            // always enough on 2 cores).
            "[upload]\nurl = \"{}\"\ntimeout_ms = 500\ndeadline_ms = 4000\n",
            col.url("/x")
        ),
    )
    .unwrap();
    let d = Daemon::start(
        &cg,
        &["--interval", "50", "--config", cfg.to_str().unwrap()],
    );
    let (_s, _c) = steady_traffic(&cg);
    wait_for("some events", Duration::from_secs(10), || {
        (d.lines().len() >= 3).then_some(())
    });
    let (code, out, err) = d.cli(&["flush"]);
    assert_eq!(code, 1, "a failed upload must exit non-zero: {out}");
    assert!(err.contains("500"), "the error names the status: {err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["sent"]["records"], 0);
    assert!(col.requests().len() >= 2, "500 is retried");
    let st = d.control(json!({"cmd": "status"}));
    assert!(
        st["spool"]["pending_segments"].as_u64().unwrap() >= 1,
        "{st}"
    );
    assert_eq!(st["upload"]["failures"], 1);

    healthy.store(true, Ordering::SeqCst);
    let (code, out, _) = d.cli(&["flush"]);
    assert_eq!(code, 0, "{out}");
    let printed = d.lines();
    let last = serde_json::from_str::<Value>(&out).unwrap()["sent"]["last_seq"]
        .as_u64()
        .unwrap();
    drop((_s, _c));
    d.stop();
    let up = uploaded(&col);
    for l in printed.iter().filter(|l| seq_of(l) <= last) {
        assert!(
            up.contains(l),
            "event {} lost after the failed flush",
            seq_of(l)
        );
    }
}

/// SIGKILL at random points while writing and uploading, then restart on the same spool:
/// every event the agent printed (it prints after writing, with fsync = always) reaches
/// the collector, none is corrupt, and no seq is uploaded with two different contents.
#[test]
fn sigkill_at_random_points_loses_nothing_written() {
    if !require_root("sigkill") {
        return;
    }
    let col = Collector::start(|_| Answer::Status(200, vec![]));
    let cg = TestCgroup::new("kill");
    let state = TempDir::new("kill");
    let cfg = state.0.join("sockacct.toml");
    fs::write(&cfg, format!("[spool]\nfsync = \"always\"\nsegment_max_bytes = 4096\nmax_bytes = 1048576\n[upload]\nurl = \"{}\"\n", col.url("/k"))).unwrap();
    let cfg = cfg.to_str().unwrap().to_string();
    let (_s, _c) = steady_traffic(&cg);
    let mut printed: Vec<String> = vec![];
    for round in 0..8u32 {
        let d = Daemon::start_in(&cg, &state.0, &["--interval", "20", "--config", &cfg]);
        thread::sleep(Duration::from_millis(150 + (rand_u32() % 400) as u64));
        let flusher = if round % 2 == 0 {
            let sock = d.control_socket();
            Some(thread::spawn(move || {
                let _ = Command::new(agent_exe())
                    .args(["flush", "--control-socket"])
                    .arg(sock)
                    .output();
            }))
        } else {
            None
        };
        thread::sleep(Duration::from_millis((rand_u32() % 120) as u64));
        printed.extend(d.kill9());
        if let Some(f) = flusher {
            let _ = f.join();
        }
    }
    drop((_s, _c));
    let d = Daemon::start_in(&cg, &state.0, &["--interval", "20", "--config", &cfg]);
    let (code, out, _) = d.cli(&["flush"]);
    assert_eq!(code, 0, "{out}");
    printed.extend(d.lines());
    d.stop();

    let up = uploaded(&col);
    let mut by_seq: BTreeMap<u64, &String> = BTreeMap::new();
    for l in &up {
        let v: Value = serde_json::from_str(l)
            .unwrap_or_else(|e| panic!("corrupt record uploaded: {l:?}: {e}"));
        assert!(
            ["delta", "gap", "flow", "agent"].contains(&v["type"].as_str().unwrap_or("")),
            "{l}"
        );
        if let Some(prev) = by_seq.insert(seq_of(l), l) {
            assert_eq!(prev, l, "seq {} uploaded with two contents", seq_of(l));
        }
    }
    let up_set: BTreeSet<&String> = up.iter().collect();
    let last_flushed = by_seq.keys().next_back().copied().unwrap_or(0);
    let mut missing = vec![];
    for l in printed.iter().filter(|l| seq_of(l) <= last_flushed) {
        if !up_set.contains(l) {
            missing.push(seq_of(l));
        }
    }
    assert!(
        missing.is_empty(),
        "printed (so written) but never uploaded: {missing:?}"
    );
    assert!(printed.len() > 20, "the rounds should have written events");
    // Every start after a SIGKILL says so; the first found a fresh state directory.
    let starts: Vec<Value> = up
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["type"] == "agent" && v["event"] == "start")
        .collect();
    assert!(starts.len() >= 2, "{starts:?}");
    assert_eq!(starts[0]["previous"], "none", "{starts:?}");
    assert!(
        starts[1..].iter().all(|s| s["previous"] == "recovered"),
        "{starts:?}"
    );
    assert!(
        !up.iter().any(|l| l.contains("\"type\":\"gap\"")),
        "nothing should have been dropped"
    );
}

#[test]
fn the_control_socket_refuses_what_it_must() {
    if !require_root("control") {
        return;
    }
    let cg = TestCgroup::new("ctl");
    let d = Daemon::start(&cg, &["--interval", "100", "--control-group", "nogroup"]);
    let r: Value = serde_json::from_str(&d.control_raw(b"not json")).unwrap();
    assert_eq!(r["ok"], false);
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .starts_with("malformed request"),
        "{r}"
    );
    let r = d.control(json!({"cmd": "reboot"}));
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("unknown command \"reboot\""),
        "{r}"
    );
    let big = vec![b'x'; 70 * 1024];
    let r: Value = serde_json::from_str(&d.control_raw(&big)).unwrap();
    assert!(
        r["error"].as_str().unwrap().contains("request too large"),
        "{r}"
    );
    let r = d.control(json!({"cmd": "flush"}));
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("no upload URL configured"),
        "{r}"
    );
    // Still serving after all that.
    let st = d.control(json!({"cmd": "status"}));
    assert_eq!(st["ok"], true, "{st}");
    assert!(st["map_capacity"].as_u64().unwrap() > 0);

    // nobody (65534) in group nogroup (65534): may connect (mode 0660, group nogroup) and
    // ask for status, but not flush/pause, and may only label its own sockets.
    let sock = d.control_socket();
    let as_nobody = |args: &[&str]| {
        let o = Command::new("setpriv")
            .args([
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                "--",
            ])
            .arg(world_exe("sockacct-agent"))
            .args(args)
            .arg("--control-socket")
            .arg(&sock)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (code, _, _) = as_nobody(&["status"]);
    assert_eq!(code, Some(0));
    let (code, _, err) = as_nobody(&["pause"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("need root"), "{err}");
    // A socket this test process (root) owns: not nobody's.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cookie = {
        use std::os::fd::AsRawFd;
        let mut v: u64 = 0;
        let mut len = 8 as libc::socklen_t;
        unsafe {
            libc::getsockopt(
                l.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut v).cast(),
                &mut len,
            )
        };
        v
    };
    let (code, _, err) = as_nobody(&["label", "--cookie", &cookie.to_string(), "stolen"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is not yours"), "{err}");

    // An unprivileged application in the cgroup names its own connection.
    let mut srv = Peer::spawn(
        Some(&cg),
        None,
        "lbl-srv",
        &["tcp-serve", "127.0.0.1", "1", "1000"],
    );
    let port = srv.value("port").to_string();
    let mut app = Peer::spawn_as(
        Some(&cg),
        None,
        "lbl-app",
        &[
            "self-label",
            "127.0.0.1",
            &port,
            sock.to_str().unwrap(),
            "checkout",
            "5000",
        ],
        Some((65534, 65534)),
    );
    let reply: Value = serde_json::from_str(&app.text("reply")).unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    app.value("received");
    app.finish();
    srv.finish();
    let events = d.stop();
    check_events(&events);
    let s = sum(&events);
    let named = label(&s, "checkout");
    assert!(named.tx >= 5000 && named.rx >= 1000, "{named:?}");
    assert!(
        !s.labels.contains_key("lbl-app") || s.labels["lbl-app"].tx < 100,
        "the app's bytes went to its label: {:?}",
        s.labels
    );
    drop(l);

    // Without the group, an unprivileged user cannot even connect.
    let d = Daemon::start(&cg, &["--interval", "100"]);
    let sock = d.control_socket();
    let o = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .arg(agent_exe())
        .args(["status", "--control-socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Permission denied")
            && String::from_utf8_lossy(&o.stderr).contains("run as root, or as a member"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    d.stop();
}

/// While paused nothing is written; at resume one event holds everything counted
/// meanwhile (spanning from the first to the last interval that moved).
#[test]
fn pause_holds_and_resume_writes_one_event_for_the_paused_time() {
    if !require_root("pause") {
        return;
    }
    let cg = TestCgroup::new("pause");
    let d = Daemon::start(&cg, &["--interval", "50"]);
    let r = d.control(json!({"cmd": "pause"}));
    assert_eq!(r["paused"], true);
    let before = d.lines().len();
    let mut srv = Peer::spawn(
        Some(&cg),
        None,
        "p-srv",
        &["tcp-serve", "127.0.0.1", "1", "3000"],
    );
    let port = srv.value("port").to_string();
    let mut cli = Peer::spawn(
        Some(&cg),
        None,
        "p-cli",
        &["tcp-connect", "127.0.0.1", &port, "1", "9000"],
    );
    cli.value("received");
    cli.finish();
    srv.finish();
    d.wait_ticks(4); // several intervals pass while paused
    assert_eq!(d.lines().len(), before, "nothing written while paused");
    let st = d.control(json!({"cmd": "status"}));
    assert!(st["paused_bytes"].as_u64().unwrap() > 12_000, "{st}");
    d.control(json!({"cmd": "resume"}));
    wait_for("the held event", Duration::from_secs(5), || {
        (d.lines().len() > before).then_some(())
    });
    let events = d.stop();
    check_events(&events);
    // Exactly one event holds the connection: what was counted while paused, merged.
    let held: Vec<&DeltaEvent> = events
        .iter()
        .filter(|e| e.labels.contains_key("p-cli"))
        .collect();
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(held[0].labels["p-cli"].tx >= 9000);
    assert!(held[0].labels["p-srv"].rx >= 9000);
    assert!(held[0].d >= 50);
}

/// A spool on a tiny tmpfs: when it is full the agent keeps counting, holds events in
/// memory and says so; when space returns it writes them, and a flush uploads them all.
#[test]
fn a_full_disk_holds_events_in_memory_until_space_returns() {
    if !require_root("full_disk") {
        return;
    }
    struct Mount(std::path::PathBuf);
    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let col = Collector::start(|_| Answer::Status(200, vec![]));
    let cg = TestCgroup::new("full");
    let state = TempDir::new("full");
    let spool = state.0.join("spool");
    fs::create_dir_all(&spool).unwrap();
    assert!(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=24k,mode=0700", "tmpfs"])
            .arg(&spool)
            .status()
            .unwrap()
            .success()
    );
    let _m = Mount(spool.clone());
    let cfg = state.0.join("sockacct.toml");
    fs::write(
        &cfg,
        format!(
            "[spool]\nsegment_max_bytes = 4096\nmax_bytes = 10485760\n[upload]\nurl = \"{}\"\n",
            col.url("/f")
        ),
    )
    .unwrap();
    let d = Daemon::start_in(
        &cg,
        &state.0,
        &["--interval", "10", "--config", cfg.to_str().unwrap()],
    );
    let (_s, _c) = steady_traffic(&cg);
    let st = wait_for(
        "the spool to report a full disk",
        Duration::from_secs(60),
        || {
            let st = d.control(json!({"cmd": "status"}));
            (st["spool"]["backlog_records"].as_u64().unwrap_or(0) > 5).then_some(st)
        },
    );
    assert_eq!(st["spool"]["healthy"], false, "{st}");
    assert!(
        st["spool"]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("space"),
        "{st}"
    );
    // Space returns.
    assert!(
        Command::new("mount")
            .args(["-o", "remount,size=16m"])
            .arg(&spool)
            .status()
            .unwrap()
            .success()
    );
    wait_for("the backlog to be written", Duration::from_secs(20), || {
        let st = d.control(json!({"cmd": "status"}));
        (st["spool"]["backlog_records"] == 0 && st["spool"]["healthy"] == true).then_some(())
    });
    drop((_s, _c));
    let (code, out, _) = d.cli(&["flush"]);
    assert_eq!(code, 0, "{out}");
    let last = serde_json::from_str::<Value>(&out).unwrap()["sent"]["last_seq"]
        .as_u64()
        .unwrap();
    let printed = d.lines();
    d.stop();
    let up = uploaded(&col);
    let up_set: BTreeSet<&String> = up.iter().collect();
    let missing: Vec<u64> = printed
        .iter()
        .filter(|l| seq_of(l) <= last && !up_set.contains(l))
        .map(|l| seq_of(l))
        .collect();
    assert!(
        missing.is_empty(),
        "events lost across the full disk: {missing:?}"
    );
}
