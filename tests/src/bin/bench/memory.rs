//! `--only memory`: what the running agent holds, idle and with 10k and 100k tracked
//! sockets (connected UDP on loopback, one datagram each, from 10 processes), flows on
//! (the default) and off; the kernel maps' memory; and what a mass close costs: the 100k
//! sockets closed at once, the ticks' work while the agent folds them in, and what the
//! kernel reported meanwhile.
use std::{collections::BTreeMap, fs, time::Duration};

use serde_json::{Value, json};
use sockacct_tests::*;

use super::{mark, progress};

/// Sockets per helper process (the top stage has `--sockets` / this many helpers).
const PER_HELPER: usize = 10_000;
const PAYLOAD: usize = 32;

/// VmRSS / VmHWM and the RSS split (anonymous, file, shared) of `pid`, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rss {
    rss: u64,
    hwm: u64,
    anon: u64,
    file: u64,
    shmem: u64,
}

fn rss(pid: i32) -> Rss {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let f = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Rss {
        rss: f("VmRSS:"),
        hwm: f("VmHWM:"),
        anon: f("RssAnon:"),
        file: f("RssFile:"),
        shmem: f("RssShmem:"),
    }
}

/// The agent's BPF maps: name -> (memlock bytes, max_entries), from /proc/PID/fdinfo and
/// the kernel's map info.
fn kernel_maps(pid: i32) -> BTreeMap<String, (u64, u64)> {
    let names: BTreeMap<u32, String> = aya::maps::loaded_maps()
        .filter_map(Result::ok)
        .filter_map(|m| Some((m.id(), m.name_as_str()?.to_string())))
        .collect();
    let mut out = BTreeMap::new();
    for (id, f) in super::fdinfo_values(pid, "map_id") {
        let name = names
            .get(&(id as u32))
            .cloned()
            .unwrap_or_else(|| format!("map{id}"));
        let memlock = f.get("memlock").copied().unwrap_or(0);
        let max = f.get("max_entries").copied().unwrap_or(0);
        out.insert(name, (memlock, max));
    }
    out
}

fn status_u64(st: &Value, ptr: &str) -> u64 {
    st.pointer(ptr).and_then(Value::as_u64).unwrap_or(0)
}

#[derive(Debug, Clone, Default)]
pub struct Stage {
    tracked: u64,
    rss: Rss,
}

#[derive(Debug, Clone, Default)]
pub struct MemRun {
    flows: bool,
    /// Tracked sockets at the top stage.
    sockets: usize,
    stages: Vec<(String, Stage)>,
    maps: BTreeMap<String, (u64, u64)>,
    flow_overflow: u64,
    flows_tracked: u64,
    close: Close,
}

#[derive(Debug, Clone, Default)]
pub struct Close {
    ticks: u64,
    secs: f64,
    max_work_ms: f64,
    max_cpu_ms: f64,
    over_15ms: u64,
    /// The flow stage's calls (its own thread): worst wall and CPU, calls over 15 ms.
    flows_max_work_ms: f64,
    flows_max_cpu_ms: f64,
    flows_over_15ms: u64,
    /// Kernel counters that moved meanwhile (name -> delta).
    kernel: BTreeMap<String, u64>,
    rss_after: Rss,
}

fn wait_tracked(d: &Daemon, at_least: u64, what: &str) -> Value {
    wait_for(what, Duration::from_secs(120 + at_least / 2000), || {
        let st = d.control(json!({"cmd": "status"}));
        (status_u64(&st, "/sockets_tracked") >= at_least).then_some(st)
    })
}

fn run(flows: bool, sockets: usize) -> anyhow::Result<MemRun> {
    let cg = TestCgroup::new(if flows { "memflows" } else { "memnoflows" });
    let dir = TempDir::new("mem");
    let cfg = dir.0.join("config.toml");
    // Beyond the defaults (262,144 sockets and flows), room for the top stage.
    let room = (sockets * 5 / 4).next_power_of_two().max(262_144);
    fs::write(
        &cfg,
        format!(
            "max_sockets = {room}\n[flows]\nenabled = {flows}\nmax_flows = {}\n",
            2 * room
        ),
    )?;
    let d = Daemon::start_quiet(&cg, &["--config", cfg.to_str().unwrap()]);
    let pid = d.pid();
    let mut r = MemRun {
        flows,
        sockets,
        ..MemRun::default()
    };
    d.wait_ticks(10);
    r.stages.push((
        "idle".into(),
        Stage {
            tracked: 0,
            rss: rss(pid),
        },
    ));
    let mut helpers: Vec<Peer> = vec![];
    let top = format!("{}k", sockets / 1000);
    for (label, upto) in [("10k", 1), (top.as_str(), sockets / PER_HELPER)] {
        while helpers.len() < upto {
            let i = helpers.len();
            helpers.push(Peer::spawn(
                Some(&cg),
                None,
                "bench-umany",
                &[
                    "udp-many",
                    &PER_HELPER.to_string(),
                    &PAYLOAD.to_string(),
                    &(10 + i).to_string(),
                ],
            ));
        }
        for h in &mut helpers {
            h.value("sockets");
        }
        let want = (helpers.len() * PER_HELPER) as u64;
        progress(format!(
            "memory (flows {}): {want} sockets open, waiting for the agent to track them",
            if flows { "on" } else { "off" }
        ));
        let st = wait_tracked(&d, want, &format!("{want} sockets tracked"));
        // Steady state: the arrival's transient buffers are gone.
        d.wait_ticks(30);
        r.stages.push((
            label.into(),
            Stage {
                tracked: status_u64(&st, "/sockets_tracked"),
                rss: rss(pid),
            },
        ));
    }
    r.maps = kernel_maps(pid);
    let st = d.control(json!({"cmd": "status"}));
    r.flow_overflow = status_u64(&st, "/flows/overflow");
    r.flows_tracked = status_u64(&st, "/flows/tracked");

    // Mass close: every helper at once. First let 100 ticks pass, so the status's
    // "worst of the latest 100 ticks" covers the close and idle ticks only.
    d.wait_ticks(100);
    let before = d.control(json!({"cmd": "status"}));
    let t0 = std::time::Instant::now();
    let mut worst = [
        ("/tick_work/recent_max_ms", 0.0f64),
        ("/tick_work_cpu/recent_max_ms", 0.0),
        ("/flows/work/recent_max_ms", 0.0),
        ("/flows/work_cpu/recent_max_ms", 0.0),
    ];
    for h in &mut helpers {
        h.send_line("stop");
    }
    for h in &mut helpers {
        h.expect_line("closing");
    }
    for h in helpers {
        h.finish();
    }
    let after = wait_for(
        "the closed sockets to be folded in",
        Duration::from_secs(120 + sockets as u64 / 2000),
        || {
            let st = d.control(json!({"cmd": "status"}));
            // The status keeps the worst of the latest 100 ticks: a close longer than that
            // is followed here.
            for (ptr, m) in worst.iter_mut() {
                *m = m.max(st.pointer(ptr).and_then(Value::as_f64).unwrap_or(0.0));
            }
            // With flow records: until the last close record is written, too.
            let flows_done = [
                "/flows/queued",
                "/flows/finishing",
                "/flows/pending_sockets",
            ]
            .iter()
            .all(|p| status_u64(&st, p) == 0);
            (status_u64(&st, "/sockets_tracked") < 100 && flows_done).then_some(st)
        },
    );
    let secs = t0.elapsed().as_secs_f64();
    d.wait_ticks(3);
    let after_ticks = d.control(json!({"cmd": "status"}));
    let counts = |s: &Value| -> Vec<u64> {
        s.pointer("/tick_work/counts")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default()
    };
    let (c0, c1) = (counts(&before), counts(&after_ticks));
    let flow_counts = |s: &Value| -> Vec<u64> {
        s.pointer("/flows/work/counts")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default()
    };
    let (f0, f1) = (flow_counts(&before), flow_counts(&after_ticks));
    let over = sockacct::poller::TICK_BUCKETS_MS
        .iter()
        .position(|&le| le >= 15.0)
        .unwrap_or(0)
        + 1;
    let worst_of = |i: usize| {
        let (ptr, m) = worst[i];
        m.max(
            after_ticks
                .pointer(ptr)
                .and_then(Value::as_f64)
                .unwrap_or(0.0),
        )
    };
    r.close = Close {
        ticks: status_u64(&after_ticks, "/ticks") - status_u64(&before, "/ticks"),
        secs,
        max_work_ms: worst_of(0),
        max_cpu_ms: worst_of(1),
        over_15ms: (over..c1.len())
            .map(|i| c1[i] - c0.get(i).copied().unwrap_or(0))
            .sum(),
        flows_max_work_ms: worst_of(2),
        flows_max_cpu_ms: worst_of(3),
        flows_over_15ms: (over..f1.len())
            .map(|i| f1[i] - f0.get(i).copied().unwrap_or(0))
            .sum(),
        kernel: ["/drops/kernel", "/kernel_fallbacks"]
            .iter()
            .flat_map(|ptr| {
                let b = before.pointer(ptr).cloned().unwrap_or_default();
                after
                    .pointer(ptr)
                    .and_then(Value::as_object)
                    .cloned()
                    .into_iter()
                    .flatten()
                    .filter_map(move |(k, v)| {
                        let d = v.as_u64()? - b[&k].as_u64().unwrap_or(0);
                        (d > 0).then_some((k, d))
                    })
            })
            .collect(),
        rss_after: rss(pid),
    };
    d.stop();
    Ok(r)
}

pub fn section(sockets: usize) -> Vec<Result<MemRun, String>> {
    [true, false]
        .into_iter()
        .map(|flows| {
            progress(format!(
                "== memory, flows {}",
                if flows { "on" } else { "off" }
            ));
            std::panic::catch_unwind(|| run(flows, sockets))
                .map_err(|e| super::panic_text(&*e))
                .and_then(|r| r.map_err(|e| format!("{e:#}")))
        })
        .collect()
}

fn mb(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

pub fn report(out: &mut String, js: &mut serde_json::Map<String, Value>, runs: &[MemRun]) {
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(String::new());
    let sockets = runs.first().map_or(100_000, |r| r.sockets);
    line(format!(
        "== Memory: the agent with its defaults (room for the sockets); {} processes x {PER_HELPER} connected UDP sockets on loopback, one {PAYLOAD} B datagram each ==",
        sockets / PER_HELPER
    ));
    line(format!(
        "{:<10} {:<6} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>14}  {}",
        "flows",
        "stage",
        "tracked",
        "RSS MB",
        "HWM MB",
        "anon MB",
        "file MB",
        "shmem MB",
        "B/socket (RSS)",
        "target"
    ));
    let mut jr = vec![];
    for r in runs {
        let flows = if r.flows { "on" } else { "off" };
        let idle = r.stages.first().map(|s| s.1.rss.rss).unwrap_or(0);
        for (name, st) in &r.stages {
            let per = if st.tracked > 0 {
                format!(
                    "{:.0}",
                    (st.rss.rss.saturating_sub(idle) * 1024) as f64 / st.tracked as f64
                )
            } else {
                "-".into()
            };
            // Issue 19's targets: RSS and high-water mark.
            let (rss_mb, hwm_mb) = (st.rss.rss / 1024, st.rss.hwm / 1024);
            let target = match (name.as_str(), r.flows) {
                ("idle", _) => format!("RSS <= 15 MB {}", mark(st.rss.rss <= 15 * 1024)),
                ("100k", true) => format!(
                    "RSS <= 45 MB {}, HWM <= 60 MB {}",
                    mark(rss_mb < 45),
                    mark(hwm_mb < 60)
                ),
                ("100k", false) => format!(
                    "RSS <= 30 MB {}, HWM <= 40 MB {}",
                    mark(rss_mb < 30),
                    mark(hwm_mb < 40)
                ),
                ("1000k", true) => format!("RSS <= 250 MB {}", mark(rss_mb < 250)),
                _ => String::new(),
            };
            line(format!(
                "{:<10} {:<6} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>14}  {}",
                flows,
                name,
                st.tracked,
                mb(st.rss.rss),
                mb(st.rss.hwm),
                mb(st.rss.anon),
                mb(st.rss.file),
                mb(st.rss.shmem),
                per,
                target
            ));
        }
        let c = &r.close;
        line(format!(
            "{:<10} {:<6} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
            flows,
            "closed",
            "",
            mb(c.rss_after.rss),
            mb(c.rss_after.hwm),
            mb(c.rss_after.anon),
            mb(c.rss_after.file),
            mb(c.rss_after.shmem),
        ));
        if r.flows {
            line(format!(
                "flow table at {}k sockets: {} flows tracked, {} observations refused (overflow); target none refused {}",
                r.sockets / 1000,
                r.flows_tracked,
                r.flow_overflow,
                mark(r.flow_overflow == 0)
            ));
        }
        line(format!(
            "mass close (flows {flows}): {}k sockets closed at once, folded in{} within {:.1} s over {} ticks; worst tick {:.1} ms work ({:.1} ms CPU), {} ticks over 15 ms (target every tick <= 15 ms {}){}; kernel drops and fallbacks meanwhile: {}",
            r.sockets / 1000,
            if r.flows {
                ", last close record written,"
            } else {
                ""
            },
            c.secs,
            c.ticks,
            c.max_work_ms,
            c.max_cpu_ms,
            c.over_15ms,
            mark(c.max_work_ms <= 15.0 && (!r.flows || c.flows_max_work_ms <= 15.0)),
            if r.flows {
                format!(
                    "; flow stage (own thread): worst call {:.1} ms ({:.1} ms CPU), {} calls over 15 ms",
                    c.flows_max_work_ms, c.flows_max_cpu_ms, c.flows_over_15ms
                )
            } else {
                String::new()
            },
            if c.kernel.is_empty() {
                "none".to_string()
            } else {
                c.kernel
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        ));
        jr.push(json!({
            "flows": r.flows,
            "stages": r.stages.iter().map(|(n, s)| json!({"stage": n, "tracked": s.tracked,
                "vm_rss_kib": s.rss.rss, "vm_hwm_kib": s.rss.hwm, "rss_anon_kib": s.rss.anon,
                "rss_file_kib": s.rss.file, "rss_shmem_kib": s.rss.shmem})).collect::<Vec<_>>(),
            "kernel_maps": r.maps.iter().map(|(n, (m, e))| (n.clone(), json!({"memlock": m, "max_entries": e}))).collect::<serde_json::Map<_, _>>(),
            "flow_overflow": r.flow_overflow, "flows_tracked": r.flows_tracked,
            "close": {"ticks": c.ticks, "secs": c.secs, "max_work_ms": c.max_work_ms, "max_cpu_ms": c.max_cpu_ms, "ticks_over_15ms": c.over_15ms,
                      "flows_max_work_ms": c.flows_max_work_ms, "flows_max_cpu_ms": c.flows_max_cpu_ms, "flows_calls_over_15ms": c.flows_over_15ms,
                      "kernel_counters": c.kernel, "vm_rss_kib_after": c.rss_after.rss},
        }));
    }
    if let Some(r) = runs.first() {
        let total: u64 = r.maps.values().map(|m| m.0).sum();
        line(format!(
            "kernel maps (memlock, at {}k sockets): {:.1} MB in all: {}",
            r.sockets / 1000,
            total as f64 / 1048576.0,
            r.maps
                .iter()
                .map(|(n, (m, _))| format!("{n} {:.1}", *m as f64 / 1048576.0))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    js.insert("memory".into(), Value::Array(jr));
}
