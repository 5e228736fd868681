//! Uploading into ClickHouse's own engine (chdb behind a thin HTTP front that passes the
//! query string and the decoded body through unchanged): the schema from `sockacct schema
//! clickhouse`, three agents into one table, a lost reply and its retry, coverage records
//! after a SIGKILL, and the docs' cookbook queries.
use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use serde_json::Value;
use sockacct_tests::{Daemon, Peer, TempDir, TestCgroup, agent_exe, prom, require_root};

/// payload + UDP 8 + IPv4 20
const UDP4_OVERHEAD: u64 = 28;

fn chdb_python() -> PathBuf {
    let venv = std::env::var("SOCKACCT_CHDB_VENV")
        .unwrap_or_else(|_| "/var/cache/sockacct-tools/chdb-venv".into());
    let py = PathBuf::from(venv).join("bin/python");
    assert!(
        py.exists(),
        "no chdb at {} (cargo xtask test installs it; or set SOCKACCT_CHDB_VENV)",
        py.display()
    );
    py
}

/// The engine behind its HTTP front; killed on drop.
struct Front {
    child: Child,
    addr: String,
    _dir: TempDir,
}

impl Front {
    fn start(lose_reply: Option<u32>) -> Front {
        let dir = TempDir::new("chdb");
        let mut cmd = Command::new(chdb_python());
        cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/clickhouse/front.py"))
            .arg(dir.0.join("data"));
        if let Some(n) = lose_reply {
            cmd.args(["--lose-reply", &n.to_string()]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the chdb front");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("port ")
            .unwrap_or_else(|| panic!("front said {line:?}"));
        Front {
            child,
            addr: format!("127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    /// Runs one statement; its TabSeparated result.
    fn sql(&self, q: &str) -> String {
        let r = prom::get(&self.addr, &format!("/?query={}", prom::encode(q)), None).unwrap();
        assert_eq!(r.status, 200, "{q}\n{}", r.body);
        r.body
    }

    fn rows(&self, q: &str) -> Vec<Vec<String>> {
        self.sql(q)
            .lines()
            .map(|l| l.split('\t').map(String::from).collect())
            .collect()
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Host {
    cg: TestCgroup,
    dir: TempDir,
    cfg: PathBuf,
    id: String,
}

impl Host {
    fn new(i: usize, front: &Front) -> Host {
        Host::with(i, front, "")
    }

    /// With `extra` appended to its config.
    fn with(i: usize, front: &Front, extra: &str) -> Host {
        let cg = TestCgroup::new(&format!("ch{i}"));
        let dir = TempDir::new(&format!("ch{i}"));
        let cfg = dir.0.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "[upload]\nformat = \"clickhouse\"\nurl = \"http://{}/\"\n\n[flows]\nconsolidate_gap_ms = 0\n{extra}",
                front.addr
            ),
        )
        .unwrap();
        Host {
            cg,
            dir,
            cfg,
            id: format!("ch-agent-{i}"),
        }
    }

    fn start(&self) -> Daemon {
        Daemon::start_in(
            &self.cg,
            &self.dir.0,
            &[
                "--interval",
                "100",
                "--agent-id",
                &self.id,
                "--config",
                self.cfg.to_str().unwrap(),
            ],
        )
    }

    /// `count` datagrams of `size` B from "ch-send"; returns the receiver's port.
    fn traffic(&self, count: u64, size: u64) -> String {
        let mut rcv = Peer::spawn(Some(&self.cg), None, "ch-recv", &["udp-recv", "127.0.0.1"]);
        let port = rcv.value("port").to_string();
        let mut snd = Peer::spawn(
            Some(&self.cg),
            None,
            "ch-send",
            &[
                "udp-send",
                "127.0.0.1",
                &port,
                &count.to_string(),
                &size.to_string(),
            ],
        );
        assert_eq!(snd.value("sent"), count);
        snd.finish();
        Peer::spawn(
            Some(&self.cg),
            None,
            "ch-stop",
            &["udp-stop", "127.0.0.1", &port],
        )
        .finish();
        rcv.value("datagrams");
        rcv.finish();
        port
    }
}

/// `sockacct flush` through the agent; the receipt.
fn flush(d: &Daemon) -> Value {
    let (code, out, err) = d.cli(&["flush"]);
    assert_eq!(code, 0, "flush failed: {out}{err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn the_schema_in_the_docs_is_what_the_command_prints() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/clickhouse.md"
    ))
    .unwrap();
    let printed = Command::new(agent_exe())
        .args(["schema", "clickhouse"])
        .output()
        .unwrap();
    let printed = String::from_utf8(printed.stdout).unwrap();
    let in_doc = doc
        .split("## The schema (one server)")
        .nth(1)
        .and_then(|s| s.split("```sql\n").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("the schema block in docs/clickhouse.md");
    assert_eq!(
        in_doc, printed,
        "docs/clickhouse.md: paste `sockacct schema clickhouse` again"
    );
}

#[test]
fn three_agents_into_clickhouse_exactly_once_with_coverage() {
    if !require_root("clickhouse_ingest") {
        return;
    }
    // The reply to the 2nd INSERT is lost: the engine has the body, the agent retries it.
    let front = Front::start(Some(2));
    let ddl = Command::new(agent_exe())
        .args(["schema", "clickhouse"])
        .output()
        .unwrap();
    for st in sockacct::schema::statements(&String::from_utf8(ddl.stdout).unwrap()) {
        front.sql(&st);
    }

    let hosts: Vec<Host> = (0..3).map(|i| Host::new(i, &front)).collect();
    let mut agents: Vec<Daemon> = hosts.iter().map(Host::start).collect();
    let size = 100u64;
    let counts = [100u64, 200, 300];
    let mut ports = vec![];
    for (h, n) in hosts.iter().zip(counts) {
        ports.push(h.traffic(n, size));
    }
    for d in &agents {
        // The sender's interval and its flow's close are written.
        d.wait_ticks(5);
    }
    let mut retried = false;
    for d in &agents {
        let r = flush(d);
        retried |= r["server"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["attempts"].as_u64() > Some(1));
    }
    assert!(retried, "one reply was lost, so one body was sent twice");

    // Exactly one copy of every record, though one body arrived twice.
    let dup = front.rows("SELECT count(), uniqExact(agent, boot, seq) FROM sockacct.records");
    assert_eq!(dup[0][0], dup[0][1], "duplicate records: {dup:?}");
    // Per agent and label, the view's sums are the generators' exact bytes.
    for (h, n) in hosts.iter().zip(counts) {
        let tx = front.rows(&format!(
            "SELECT sum(tx), sum(tx_packets) FROM sockacct.label_minutes WHERE agent = '{}' AND label = 'ch-send'",
            h.id
        ));
        assert_eq!(
            tx[0],
            [(n * (size + UDP4_OVERHEAD)).to_string(), n.to_string()],
            "{}",
            h.id
        );
        let rx = front.rows(&format!(
            "SELECT sum(rx) FROM sockacct.label_minutes WHERE agent = '{}' AND label = 'ch-recv'",
            h.id
        ));
        // Every datagram, and the 1-byte stop datagram.
        assert_eq!(
            rx[0][0],
            ((n * (size + UDP4_OVERHEAD)) + 1 + UDP4_OVERHEAD).to_string()
        );
    }
    // The sender's connection as a finished flow.
    let f = front.rows(&format!(
        "SELECT count(), sum(tx) FROM sockacct.flows WHERE agent = 'ch-agent-0' AND label = 'ch-send' AND remote_port = {}",
        ports[0]
    ));
    assert_eq!(
        f[0],
        [
            "1".to_string(),
            (counts[0] * (size + UDP4_OVERHEAD)).to_string()
        ]
    );
    // Each agent said it started.
    let starts = front.rows(
        "SELECT agent, previous FROM sockacct.agent_lifecycle WHERE event = 'start' ORDER BY agent",
    );
    assert_eq!(starts.len(), 3, "{starts:?}");
    assert!(starts.iter().all(|r| r[1] == "none"), "{starts:?}");

    // A host whose spool is far too small: it drops the oldest records and says so in a
    // gap record, which lands in the gaps view.
    let tiny = Host::with(
        3,
        &front,
        "\n[spool]\nsegment_max_bytes = 4096\nmax_bytes = 8192\n\n[[rule]]\nlabel = \"port-{local_port}\"\n",
    );
    let dt = tiny.start();
    let mut churn = Peer::spawn(
        Some(&tiny.cg),
        None,
        "ch-churn",
        &["udp-churn", "200", "20", "48"],
    );
    churn.value("sockets");
    sockacct_tests::wait_for(
        "the small spool to drop records",
        std::time::Duration::from_secs(30),
        || {
            let st = dt.control(serde_json::json!({"cmd": "status"}));
            (st["spool"]["gap_records"].as_u64() > Some(0)).then_some(())
        },
    );
    churn.send_line("stop");
    churn.finish();
    flush(&dt);
    let gaps = front.rows(
        "SELECT reason, sum(lost_records) > 0, min(lost_first_seq) <= max(lost_last_seq) FROM sockacct.gaps WHERE agent = 'ch-agent-3' GROUP BY reason",
    );
    assert_eq!(gaps, [["spool_full", "1", "1"]], "{gaps:?}");
    dt.stop();

    // SIGKILL agent 0 and start it again on the same state: a recovered start. Stop
    // agent 1 cleanly and start it again: a stop, then a start after a clean stop.
    let d0 = agents.remove(0);
    d0.kill9();
    let d0 = hosts[0].start();
    flush(&d0);
    let d1 = agents.remove(0);
    d1.stop();
    let d1 = hosts[1].start();
    flush(&d1);
    let clean = front.rows(
        "SELECT event, previous, uptime_ms > 0 FROM sockacct.agent_lifecycle WHERE agent = 'ch-agent-1' ORDER BY at, seq",
    );
    assert_eq!(
        clean,
        [
            ["start", "none", "\\N"],
            ["stop", "\\N", "1"],
            ["start", "clean", "\\N"]
        ],
        "{clean:?}"
    );
    let rec = front.rows(
        "SELECT previous, resumes_after IS NOT NULL FROM sockacct.agent_lifecycle WHERE agent = 'ch-agent-0' AND event = 'start' ORDER BY at, seq",
    );
    assert_eq!(rec.len(), 2, "{rec:?}");
    assert_eq!(rec[1], ["recovered", "1"]);

    // The cookbook's queries run and find what happened here.
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/clickhouse.md"
    ))
    .unwrap();
    let cookbook = doc
        .split("## Cookbook")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .unwrap();
    let queries: Vec<&str> = cookbook
        .split("```sql\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    assert_eq!(queries.len(), 4);
    let top = front.rows(queries[0]);
    assert!(
        top.iter().any(|r| r[0] == "ch-agent-2"
            && r[1] == "ch-send"
            && r[2] == (counts[2] * (size + UDP4_OVERHEAD)).to_string()),
        "top labels: {top:?}"
    );
    let dest = front.rows(queries[1]);
    assert!(
        dest.iter().any(|r| r[1] == ports[1]),
        "destinations: {dest:?}"
    );
    let gappy = front.rows(queries[2]);
    assert!(
        gappy.iter().any(|r| r[0] == "ch-agent-3" && r[1] != "0"),
        "hosts with gaps: {gappy:?}"
    );
    let down = front.rows(queries[3]);
    assert!(
        down.iter()
            .any(|r| r[0] == "ch-agent-0" && r[1] == "start" && r[3] == "recovered"),
        "hosts that were down: {down:?}"
    );
    assert!(
        down.iter()
            .any(|r| r[0] == "ch-agent-1" && r[1] == "stop" && !r[4].starts_with("1970")),
        "hosts that were down: {down:?}"
    );
    d0.stop();
    d1.stop();
    for d in agents {
        d.stop();
    }
}
