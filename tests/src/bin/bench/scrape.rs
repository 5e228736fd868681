//! `--only metrics`: the real agent's poll-cycle work with a scraper reading /metrics
//! every 100 ms against none, interleaved, while 1000 labels move every tick (1000
//! connected UDP sockets labelled by local port, one datagram each per 50 ms).
use std::{
    fs,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use sockacct_tests::*;

use super::{median, progress};

const SOCKETS: usize = 1000;
const PHASE: Duration = Duration::from_secs(8);
const SCRAPE_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Default)]
pub struct Phase {
    scraper: bool,
    ticks: u64,
    mean_work_ms: f64,
    mean_cpu_ms: f64,
    /// The agent process's CPU (all threads) per second of the phase.
    agent_cpu: f64,
    scrape_ms: Vec<f64>,
    body_bytes: usize,
}

#[derive(Debug, Clone, Default)]
pub struct ScrapeRun {
    phases: Vec<Phase>,
    /// Phases with a record-stream subscriber that never reads (issue: it is cut off and
    /// the loop does not wait for it), and the subscribers cut off meanwhile.
    stalled: Vec<Phase>,
    cut_off: u64,
    series: f64,
}

/// A subscriber to the delta records that reads nothing (the written records cost the
/// loop nothing extra to publish; `conn` samples would add their building).
fn stalled_subscriber(d: &Daemon) -> std::os::unix::net::UnixStream {
    use std::io::{BufRead, Write};
    let s = std::os::unix::net::UnixStream::connect(d.control_socket()).expect("control socket");
    (&s).write_all(b"{\"cmd\":\"subscribe\",\"types\":[\"delta\"]}\n")
        .unwrap();
    let mut ack = String::new();
    std::io::BufReader::new(&s).read_line(&mut ack).unwrap();
    assert!(ack.contains("\"ok\":true"), "{ack}");
    s
}

/// utime + stime of `pid`, seconds.
fn cpu_seconds(pid: i32) -> f64 {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rfind(')').map_or("", |i| &s[i + 2..]);
    let f: Vec<f64> = rest
        .split(' ')
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    f.iter().sum::<f64>() / hz
}

/// (cycles, work ms summed, CPU ms summed) from `status`.
fn work(st: &Value) -> (u64, f64, f64) {
    let count = |p: &str| {
        st.pointer(p)
            .and_then(Value::as_array)
            .map_or(0, |a| a.iter().filter_map(Value::as_u64).sum())
    };
    let f = |p: &str| st.pointer(p).and_then(Value::as_f64).unwrap_or(0.0);
    (
        count("/tick_work/counts"),
        f("/tick_work/sum_ms"),
        f("/tick_work_cpu/sum_ms"),
    )
}

fn phase(d: &Daemon, addr: &str, scraper: bool) -> Phase {
    let pid = d.pid();
    let st0 = d.control(json!({"cmd": "status"}));
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    let stop = Arc::new(AtomicBool::new(false));
    let handle = scraper.then(|| {
        let (stop, addr) = (stop.clone(), addr.to_string());
        thread::spawn(move || {
            let (mut times, mut bytes) = (vec![], 0);
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                // What Prometheus asks for.
                let r = prom::get(
                    &addr,
                    "/metrics",
                    Some("application/openmetrics-text;version=1.0.0"),
                )
                .expect("scrape");
                assert_eq!(r.status, 200);
                times.push(t.elapsed().as_secs_f64() * 1e3);
                bytes = r.body.len();
                next += SCRAPE_EVERY;
                if let Some(w) = next.checked_duration_since(Instant::now()) {
                    thread::sleep(w);
                }
            }
            (times, bytes)
        })
    });
    thread::sleep(PHASE);
    stop.store(true, Ordering::Relaxed);
    let (scrape_ms, body_bytes) = handle
        .map(|h| h.join().expect("scraper"))
        .unwrap_or_default();
    let st1 = d.control(json!({"cmd": "status"}));
    let secs = t0.elapsed().as_secs_f64();
    let ((c0, w0, p0), (c1, w1, p1)) = (work(&st0), work(&st1));
    let n = (c1 - c0).max(1) as f64;
    Phase {
        scraper,
        ticks: c1 - c0,
        mean_work_ms: (w1 - w0) / n,
        mean_cpu_ms: (p1 - p0) / n,
        agent_cpu: (cpu_seconds(pid) - cpu0) / secs,
        scrape_ms,
        body_bytes,
    }
}

pub fn run(rounds: usize) -> anyhow::Result<ScrapeRun> {
    let cg = TestCgroup::new("scrape");
    let dir = TempDir::new("scrape");
    let cfg = dir.0.join("config.toml");
    fs::write(&cfg, "[[rule]]\nlabel = \"port-{local_port}\"\n")?;
    let d = Daemon::start(&cg, &["--config", cfg.to_str().unwrap()]);
    let addr = d.metrics_addr();
    let mut churn = Peer::spawn(
        Some(&cg),
        None,
        "bench-churn",
        &["udp-churn", &SOCKETS.to_string(), "50", "30"],
    );
    churn.value("sockets");
    d.wait_ticks(30);
    let mut r = ScrapeRun::default();
    for round in 0..rounds {
        // Alternate which goes first, so drift does not favour one.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for scraper in order {
            progress(format!(
                "metrics: round {}/{rounds}, scraper {}",
                round + 1,
                if scraper { "on" } else { "off" }
            ));
            r.phases.push(phase(&d, &addr, scraper));
        }
        progress(format!(
            "metrics: round {}/{rounds}, a stalled stream subscriber",
            round + 1
        ));
        let cut = |d: &Daemon| {
            d.control(json!({"cmd": "status"}))["stream"]["cut_off"]
                .as_u64()
                .unwrap_or(0)
        };
        let before = cut(&d);
        let sub = stalled_subscriber(&d);
        r.stalled.push(phase(&d, &addr, false));
        r.cut_off += cut(&d) - before;
        drop(sub);
    }
    let body = prom::get(&addr, "/metrics", None)?.body;
    r.series =
        prom::value(&prom::parse(&body), "sockacct_metrics_label_series", &[]).unwrap_or(0.0);
    churn.send_line("stop");
    churn.finish();
    d.stop();
    Ok(r)
}

pub fn section(rounds: usize) -> Result<ScrapeRun, String> {
    progress("== metrics endpoint");
    std::panic::catch_unwind(|| run(rounds))
        .map_err(|e| super::panic_text(&*e))
        .and_then(|r| r.map_err(|e| format!("{e:#}")))
}

pub fn report(out: &mut String, js: &mut serde_json::Map<String, Value>, r: &ScrapeRun) {
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(String::new());
    line(format!(
        "== Metrics endpoint: poll-cycle work with a scraper on /metrics every {} ms vs none ({SOCKETS} sockets moving every tick, {} label series; {} s phases, interleaved) ==",
        SCRAPE_EVERY.as_millis(),
        r.series,
        PHASE.as_secs()
    ));
    line(format!(
        "{:<8} {:>6} {:>13} {:>12} {:>14} {:>8} {:>12} {:>12} {:>10}",
        "scraper",
        "ticks",
        "work ms/tick",
        "CPU ms/tick",
        "agent CPU %",
        "scrapes",
        "scrape p50",
        "scrape max",
        "body KB"
    ));
    for p in &r.phases {
        let max = p.scrape_ms.iter().copied().fold(0.0, f64::max);
        line(format!(
            "{:<8} {:>6} {:>13.3} {:>12.3} {:>14.1} {:>8} {:>12} {:>12} {:>10}",
            if p.scraper { "on" } else { "off" },
            p.ticks,
            p.mean_work_ms,
            p.mean_cpu_ms,
            p.agent_cpu * 100.0,
            p.scrape_ms.len(),
            if p.scraper {
                format!("{:.2} ms", median(&p.scrape_ms))
            } else {
                "-".into()
            },
            if p.scraper {
                format!("{max:.2} ms")
            } else {
                "-".into()
            },
            if p.scraper {
                format!("{:.1}", p.body_bytes as f64 / 1024.0)
            } else {
                "-".into()
            },
        ));
    }
    let of = |on: bool, f: fn(&Phase) -> f64| -> f64 {
        median(
            &r.phases
                .iter()
                .filter(|p| p.scraper == on)
                .map(f)
                .collect::<Vec<_>>(),
        )
    };
    let work = of(true, |p| p.mean_work_ms) / of(false, |p| p.mean_work_ms);
    let cpu = of(true, |p| p.mean_cpu_ms) / of(false, |p| p.mean_cpu_ms);
    let scrapes: f64 = r
        .phases
        .iter()
        .filter(|p| p.scraper)
        .map(|p| p.scrape_ms.len() as f64)
        .sum::<f64>()
        .max(1.0);
    let secs_on = PHASE.as_secs_f64() * r.phases.iter().filter(|p| p.scraper).count() as f64;
    let cpu_per_scrape_ms =
        (of(true, |p| p.agent_cpu) - of(false, |p| p.agent_cpu)) * secs_on / scrapes * 1e3;
    line(format!(
        "tick work with scraper / without: {work:.3} (wall), {cpu:.3} (CPU) [medians of the phases; target: the same]; the agent's CPU per scrape ~{cpu_per_scrape_ms:.2} ms"
    ));
    let stalled = |f: fn(&Phase) -> f64| median(&r.stalled.iter().map(f).collect::<Vec<_>>());
    let s_work = stalled(|p| p.mean_work_ms) / of(false, |p| p.mean_work_ms);
    let s_cpu = stalled(|p| p.mean_cpu_ms) / of(false, |p| p.mean_cpu_ms);
    line(format!(
        "tick work with a record-stream subscriber that reads nothing / none: {s_work:.3} (wall), {s_cpu:.3} (CPU) over {} phases; subscribers cut off: {} of {} (target: the same, each cut off)",
        r.stalled.len(),
        r.cut_off,
        r.stalled.len()
    ));
    js.insert(
        "metrics".into(),
        json!({
            "series": r.series,
            "work_ratio": work, "cpu_ratio": cpu, "agent_cpu_ms_per_scrape": cpu_per_scrape_ms,
            "stalled_subscriber_work_ratio": s_work, "stalled_subscriber_cpu_ratio": s_cpu, "subscribers_cut_off": r.cut_off,
            "phases": r.phases.iter().map(|p| json!({"scraper": p.scraper, "ticks": p.ticks,
                "mean_work_ms": p.mean_work_ms, "mean_cpu_ms": p.mean_cpu_ms, "agent_cpu": p.agent_cpu,
                "scrapes": p.scrape_ms.len(), "scrape_p50_ms": median(&p.scrape_ms), "body_bytes": p.body_bytes})).collect::<Vec<_>>(),
        }),
    );
}
