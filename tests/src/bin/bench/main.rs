//! sockacct-bench: what the agent costs, measured on the real kernel (run as root through
//! `cargo xtask bench [-- --quick] [--only tcp|veth|udp|ticks|progs|spool|flows|memory|metrics]…`).
//!
//! Figures, printed as one table on stdout and written to target/bench/last.json:
//! - per-program average run time (kernel bpf_stats: run_time_ns / run_cnt), taken in one
//!   extra agent run per traffic scenario with stats switched on (BPF_ENABLE_STATS; the
//!   throughput rounds run with stats off, since stats add two clock reads per run), and
//!   while the sockets of the largest tick size are opened and closed (so the per-socket
//!   programs get enough runs). Only programs held by the agent process under test (or by
//!   the bench itself) count; names come from /proc/kallsyms by JIT address;
//! - TCP bulk throughput on loopback and over a veth pair, and 64-byte UDP packets per
//!   second over the veth pair: no programs (B), empty programs at the agent's attach
//!   points (F, the floor: agent-ebpf/src/floor.rs), and the agent (A), in rounds of
//!   B F A rotated, medians, ratios against both and paired per round;
//! - a ladder of egress programs during the UDP run, each alone with bpf_stats on, that do
//!   one more step of the agent's per-packet work each (totals, cookie, hash lookup,
//!   count; and socket storage instead of cookie + lookup): the cost of each step;
//! - memory (`--only memory`): the agent's RSS idle and at 10k and 100k tracked UDP
//!   sockets, flows on and off, the kernel maps' memlock, and a mass close of the 100k
//!   sockets (cycle work wall and CPU, kernel drops and fallbacks meanwhile);
//! - Poller::tick work time and grace-period wait (p50 / p99) with 1k, 10k, 100k sockets,
//!   using the library in-process.
//! - spool append throughput (`--only spool`, in-process, temp directory, default config):
//!   events/s with one event per append call and with 10, JSON and on-disk bytes per event;
//! - the cost of flow records (`--only flows`): the agent with `[flows] enabled = false` vs
//!   `true` (and no agent), rotated order, on 64-byte UDP from an unconnected socket over
//!   veth (the kernel's per-peer path) and TCP on loopback, plus bpf_stats per program
//!   during the UDP run with flows off and on.
//!
//! This is a reporting tool: nothing here asserts on timings. Targets are printed next to
//! the figures for reference.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    mem::{offset_of, size_of},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    panic::{AssertUnwindSafe, catch_unwind},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use sockacct::{
    config::Config,
    event::{DeltaEvent, FORMAT_VERSION, Identity, SeqAllocator, Traffic},
    labels::Labeler,
    loader::{self, LoadOptions},
    poller::Poller,
    spool::{Spool, SpoolConfig},
};
use sockacct_tests::*;

mod bpf;
mod floor;
mod flows;
mod memory;
mod progs;
mod scrape;
mod spool;
mod throughput;
mod ticks;

use flows::*;
use progs::*;
use spool::*;
use ticks::*;

/// `key: value` numbers from every /proc/PID/fdinfo entry that has `key`, e.g. the
/// program and map ids a process holds.
// ---- options ------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Section {
    Tcp,
    Veth,
    Udp,
    Ticks,
    Progs,
    Spool,
    Flows,
    Memory,
    Metrics,
}

#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    only: BTreeSet<Section>,
    rounds: usize,
    secs: f64,
    ticks: usize,
    sizes: Vec<usize>,
    /// Tracked sockets at the memory section's top stage.
    mem_sockets: usize,
}

const USAGE: &str = "usage: sockacct-bench [--quick] [--only tcp|veth|udp|ticks|progs|spool|flows|memory]… [--rounds N] [--seconds S] [--ticks N] [--sockets N (memory: top stage, a multiple of 10000)]";

fn parse_args() -> anyhow::Result<Opts> {
    let mut quick = false;
    let mut only = BTreeSet::new();
    let (mut rounds, mut secs, mut ticks) = (None, None, None);
    let mut mem_sockets = 100_000usize;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--only" => {
                let v = it.next().context(USAGE)?;
                for part in v.split(',') {
                    only.insert(match part {
                        "tcp" => Section::Tcp,
                        "veth" => Section::Veth,
                        "udp" => Section::Udp,
                        "ticks" => Section::Ticks,
                        "progs" => Section::Progs,
                        "spool" => Section::Spool,
                        "flows" => Section::Flows,
                        "memory" => Section::Memory,
                        "metrics" => Section::Metrics,
                        other => bail!("--only {other}: expected tcp, veth, udp, ticks, progs, spool, flows, memory or metrics\n{USAGE}"),
                    });
                }
            }
            "--rounds" => {
                rounds = Some(
                    it.next()
                        .context(USAGE)?
                        .parse::<usize>()
                        .context("--rounds")?
                        .max(1),
                )
            }
            "--seconds" => {
                secs = Some(
                    it.next()
                        .context(USAGE)?
                        .parse::<f64>()
                        .context("--seconds")?
                        .max(0.2),
                )
            }
            "--ticks" => {
                ticks = Some(
                    it.next()
                        .context(USAGE)?
                        .parse::<usize>()
                        .context("--ticks")?
                        .max(2),
                )
            }
            "--sockets" => {
                mem_sockets = it
                    .next()
                    .context(USAGE)?
                    .parse::<usize>()
                    .context("--sockets")?;
                if mem_sockets < 20_000 || mem_sockets % 10_000 != 0 {
                    bail!("--sockets {mem_sockets}: a multiple of 10000, at least 20000");
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if only.is_empty() {
        only = [
            Section::Tcp,
            Section::Veth,
            Section::Udp,
            Section::Ticks,
            Section::Progs,
            Section::Spool,
            Section::Flows,
            Section::Memory,
            Section::Metrics,
        ]
        .into();
    }
    Ok(Opts {
        quick,
        only,
        mem_sockets,
        rounds: rounds.unwrap_or(if quick { 1 } else { 3 }),
        secs: secs.unwrap_or(if quick { 1.0 } else { 3.0 }),
        ticks: ticks.unwrap_or(if quick { 15 } else { 50 }),
        sizes: if quick {
            vec![1_000, 10_000]
        } else {
            vec![1_000, 10_000, 100_000]
        },
    })
}

// ---- small helpers ------------------------------------------------------------------------

fn progress(msg: impl AsRef<str>) {
    eprintln!("[bench] {}", msg.as_ref());
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Nearest-rank percentile.
fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

fn read_trim(p: &str) -> String {
    fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn loadavg() -> String {
    read_trim("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

// ---- traffic runs -------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scenario {
    TcpLo,
    TcpVeth,
    UdpVeth,
    /// UdpVeth from an unconnected socket (send_to): the kernel counts it per peer.
    UdpVethTo,
}

impl Scenario {
    fn key(self) -> &'static str {
        match self {
            Scenario::TcpLo => "tcp_loopback",
            Scenario::TcpVeth => "tcp_veth",
            Scenario::UdpVeth => "udp64_veth",
            Scenario::UdpVethTo => "udp64_sendto_veth",
        }
    }
    fn short(self) -> &'static str {
        match self {
            Scenario::TcpLo => "TCP lo",
            Scenario::TcpVeth => "TCP veth",
            Scenario::UdpVeth => "UDP64 veth",
            Scenario::UdpVethTo => "UDP64 sendto veth",
        }
    }
    /// Names of the figures one run yields; the first is the one the ratio target is for.
    fn metrics(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Scenario::TcpLo | Scenario::TcpVeth => &[("gbit_s", "Gbit/s")],
            Scenario::UdpVeth | Scenario::UdpVethTo => {
                &[("rx_kpps", "kpps received"), ("tx_kpps", "kpps sent")]
            }
        }
    }
}

struct Env<'a> {
    cg: &'a TestCgroup,
    net: Option<&'a VethNs>,
    secs: f64,
}

/// One traffic run; returns the scenario's metrics.
fn run_once(sc: Scenario, env: &Env) -> Vec<f64> {
    let secs = format!("{:.3}", env.secs);
    match sc {
        Scenario::TcpLo | Scenario::TcpVeth => {
            let (ns, addr) = match sc {
                Scenario::TcpLo => (None, "127.0.0.1".to_string()),
                _ => {
                    let n = env.net.expect("veth pair");
                    (Some(n.ns.as_str()), n.peer_ip.clone())
                }
            };
            // Loopback: both ends in the cgroup. veth: server in the namespace.
            let sink_cg = if ns.is_none() { Some(env.cg) } else { None };
            let mut sink = Peer::spawn(sink_cg, ns, "bench-sink", &["tcp-sink", &addr]);
            let port = sink.value("port").to_string();
            let mut blast = Peer::spawn(
                Some(env.cg),
                None,
                "bench-blast",
                &["tcp-blast", &addr, &port, &secs],
            );
            let _sent = blast.value("sent");
            let got = sink.value("received");
            let nanos = sink.value("nanos");
            blast.finish();
            sink.finish();
            vec![got as f64 * 8.0 / nanos.max(1) as f64]
        }
        Scenario::UdpVeth | Scenario::UdpVethTo => {
            let n = env.net.expect("veth pair");
            let mode = if sc == Scenario::UdpVethTo {
                "udp-blast-to"
            } else {
                "udp-blast"
            };
            let mut rcv = Peer::spawn(
                None,
                Some(&n.ns),
                "bench-ucount",
                &["udp-count", &n.peer_ip, &secs],
            );
            let port = rcv.value("port").to_string();
            // The sender outlasts the receiver's window (which opens at the first datagram).
            let send_secs = format!("{:.3}", env.secs + 0.5);
            let mut snd = Peer::spawn(
                Some(env.cg),
                None,
                "bench-ublast",
                &[mode, &n.peer_ip, &port, &send_secs, "64"],
            );
            let got = rcv.value("datagrams");
            let rns = rcv.value("nanos");
            let sent = snd.value("sent");
            let sns = snd.value("nanos");
            rcv.finish();
            snd.finish();
            vec![
                got as f64 * 1e6 / rns.max(1) as f64,
                sent as f64 * 1e6 / sns.max(1) as f64,
            ]
        }
    }
}

/// What runs while traffic flows: nothing, the empty hooks (the floor), or the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cond {
    Baseline,
    Floor,
    Agent,
}

impl Cond {
    const ALL: [Cond; 3] = [Cond::Baseline, Cond::Floor, Cond::Agent];

    /// `rounds` rounds of all three conditions, rotated each round (B F A, F A B, A B F, …),
    /// so no condition always runs first or last.
    fn order(rounds: usize) -> Vec<Cond> {
        (0..rounds)
            .flat_map(|r| (0..3).map(move |i| Cond::ALL[(r + i) % 3]))
            .collect()
    }

    fn name(self) -> &'static str {
        match self {
            Cond::Baseline => "baseline",
            Cond::Floor => "empty hooks",
            Cond::Agent => "agent",
        }
    }
}

#[derive(Debug, Clone)]
struct RunRec {
    cond: Cond,
    values: Vec<f64>,
    events: usize,
    /// Other sockacct programs loaded (max of before and after the run).
    foreign_progs: usize,
    /// CPU busy fraction just before the run, while the bench itself was idle.
    busy_before: f64,
}

#[derive(Debug, Clone, Default)]
struct ScenarioResult {
    runs: Vec<RunRec>,
    /// The stats run: throughput with bpf_stats on, and the per-program deltas.
    stats_values: Option<Vec<f64>>,
    progs: Option<ProgDelta>,
    /// The empty hooks' run times, in a run of their own with bpf_stats on.
    floor_progs: Option<ProgDelta>,
    /// The ladder (UDP only): (program, run_time_ns, run_cnt), each step alone.
    ladder: Vec<(String, u64, u64)>,
    offsets_check: Option<(usize, usize)>,
}

fn agent_args(sc: Scenario, env: &Env) -> Vec<String> {
    let mut a = vec!["--interval".to_string(), "100".to_string()];
    if sc != Scenario::TcpLo {
        a.push("--iface".into());
        a.push(env.net.expect("veth pair").host_if.clone());
    }
    a
}

fn run_scenario(
    sc: Scenario,
    env: &Env,
    rounds: usize,
    ratio: bool,
    stats: bool,
    budget: &mut Duration,
) -> ScenarioResult {
    let args = agent_args(sc, env);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut res = ScenarioResult::default();
    if ratio {
        let order = Cond::order(rounds);
        let total = order.len();
        for (k, &cond) in order.iter().enumerate() {
            let (busy_before, foreign) = wait_quiet(budget);
            let (values, events) = match cond {
                Cond::Agent => {
                    let d = Daemon::start(env.cg, &args);
                    let v = run_once(sc, env);
                    let ev = d.stop();
                    (v, ev.len())
                }
                Cond::Floor => {
                    let iface = env.net.filter(|_| sc != Scenario::TcpLo);
                    let f = floor::Floor::attach(env.cg, iface.map(|n| n.host_if.as_str()))
                        .expect("attaching the empty hooks");
                    let v = run_once(sc, env);
                    drop(f);
                    (v, 0)
                }
                Cond::Baseline => (run_once(sc, env), 0),
            };
            let foreign = foreign.max(prog_snapshot(&[]).foreign);
            progress(format!(
                "{} run {}/{} {}: {}{}",
                sc.short(),
                k + 1,
                total,
                cond.name(),
                values
                    .iter()
                    .zip(sc.metrics())
                    .map(|(v, m)| format!("{v:.2} {}", m.1))
                    .collect::<Vec<_>>()
                    .join(", "),
                if foreign > 0 || busy_before >= 0.15 {
                    format!(
                        "  (machine busy: {:.0} % CPU before, {foreign} other sockacct programs)",
                        busy_before * 100.0
                    )
                } else {
                    String::new()
                }
            ));
            res.runs.push(RunRec {
                cond,
                values,
                events,
                foreign_progs: foreign,
                busy_before,
            });
        }
    }
    if stats {
        progress(format!("{}: stats run (agent, bpf_stats on)", sc.short()));
        wait_quiet(budget);
        let stats_fd = bpf::enable_stats().expect("BPF_ENABLE_STATS");
        let d = Daemon::start(env.cg, &args);
        let (before, c1) = checked_snapshot(d.pid());
        let v = run_once(sc, env);
        let (after, c2) = checked_snapshot(d.pid());
        res.offsets_check = Some((c1.0 + c2.0, c1.1 + c2.1));
        d.stop();
        drop(stats_fd);
        res.progs = Some(prog_delta(&before, &after));
        res.stats_values = Some(v);

        progress(format!(
            "{}: stats run (empty hooks, bpf_stats on)",
            sc.short()
        ));
        wait_quiet(budget);
        let stats_fd = bpf::enable_stats().expect("BPF_ENABLE_STATS");
        let me = std::process::id() as i32;
        let iface = env.net.filter(|_| sc != Scenario::TcpLo);
        let f = floor::Floor::attach(env.cg, iface.map(|n| n.host_if.as_str()))
            .expect("attaching the empty hooks");
        let before = prog_snapshot(&[me]);
        run_once(sc, env);
        let after = prog_snapshot(&[me]);
        drop(f);
        drop(stats_fd);
        res.floor_progs = Some(prog_delta(&before, &after));

        if sc == Scenario::UdpVeth {
            for step in floor::LADDER {
                progress(format!("{}: ladder step {step} (bpf_stats on)", sc.short()));
                let stats_fd = bpf::enable_stats().expect("BPF_ENABLE_STATS");
                let f = floor::Floor::attach_egress(env.cg, step).expect("attaching a ladder step");
                let before = prog_snapshot(&[me]);
                run_once(sc, env);
                let after = prog_snapshot(&[me]);
                drop(f);
                drop(stats_fd);
                let (t, c) = prog_delta(&before, &after)
                    .into_iter()
                    .find(|(n, _)| n.starts_with(step))
                    .map(|(_, v)| v)
                    .unwrap_or((0, 0));
                res.ladder.push((step.to_string(), t, c));
            }
        }
    }
    res
}

// ---- report -------------------------------------------------------------------------------

fn mark(ok: bool) -> &'static str {
    if ok { "meets" } else { "MISSES" }
}

fn fmt_count(c: u64) -> String {
    match c {
        c if c >= 10_000_000 => format!("{:.0}M", c as f64 / 1e6),
        c if c >= 1_000_000 => format!("{:.1}M", c as f64 / 1e6),
        c if c >= 10_000 => format!("{:.0}k", c as f64 / 1e3),
        c => c.to_string(),
    }
}

fn main() -> anyhow::Result<()> {
    let opts = parse_args()?;
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmarks load kernel programs: run as root (cargo xtask bench)");
    }
    let started = Instant::now();
    // `cargo xtask bench` builds the helper binaries. Fail early, with a clear message, if a helper binary is missing.
    let _ = (sibling_exe("sockacct-peer"), agent_exe());

    let mut out = String::new();
    let mut js = serde_json::Map::new();
    let mut failures: Vec<String> = vec![];
    let line = |o: &mut String, s: String| {
        o.push_str(&s);
        o.push('\n');
    };

    // Machine context.
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|s| s.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or("?".into());
    let cpus = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_kb: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let kernel = read_trim("/proc/sys/kernel/osrelease");
    let jit = read_trim("/proc/sys/net/core/bpf_jit_enable");
    let foreign_at_start = prog_snapshot(&[]).foreign;
    line(
        &mut out,
        format!(
            "sockacct bench{}",
            if opts.quick { " (--quick)" } else { "" }
        ),
    );
    line(
        &mut out,
        format!(
            "machine: Linux {kernel}, {cpus} CPUs ({model}), {:.1} GiB RAM, bpf_jit_enable={jit}",
            mem_kb as f64 / 1048576.0
        ),
    );
    line(
        &mut out,
        format!(
            "load average at start: {}; sockacct programs of other processes loaded: {foreign_at_start}",
            loadavg()
        ),
    );
    js.insert(
        "machine".into(),
        json!({"kernel": kernel, "version": read_trim("/proc/version"), "cpus": cpus, "cpu_model": model,
               "mem_kib": mem_kb, "bpf_jit_enable": jit, "loadavg_start": loadavg(),
               "foreign_sockacct_programs_at_start": foreign_at_start}),
    );
    js.insert(
        "options".into(),
        json!({"quick": opts.quick, "only": opts.only.iter().map(|s| format!("{s:?}").to_lowercase()).collect::<Vec<_>>(),
               "rounds_per_condition": opts.rounds, "seconds_per_run": opts.secs, "ticks_per_size": opts.ticks,
               "tick_sizes": opts.sizes}),
    );

    // Traffic scenarios.
    let has = |s: Section| opts.only.contains(&s);
    let stats_wanted = has(Section::Progs);
    let plan: Vec<(Scenario, bool)> = [
        (Scenario::TcpLo, Section::Tcp),
        (Scenario::TcpVeth, Section::Veth),
        (Scenario::UdpVeth, Section::Udp),
    ]
    .into_iter()
    .filter(|&(_, s)| has(s) || stats_wanted)
    .map(|(sc, s)| (sc, has(s)))
    .collect();
    let mut results: Vec<(Scenario, ScenarioResult)> = vec![];
    // Time the bench may spend waiting for other work on the machine to calm down.
    let mut budget = Duration::from_secs(if opts.quick { 15 } else { 45 });
    if !plan.is_empty() {
        let cg = TestCgroup::new("bench");
        let need_veth = plan.iter().any(|(sc, _)| *sc != Scenario::TcpLo);
        let net = need_veth.then(|| VethNs::new("bn", 100 + (std::process::id() % 150) as u8));
        for &(sc, ratio) in &plan {
            let env = Env {
                cg: &cg,
                net: net.as_ref(),
                secs: opts.secs,
            };
            progress(format!(
                "== {} ({} rounds per condition, {:.1} s per run{})",
                sc.short(),
                if ratio { opts.rounds } else { 0 },
                opts.secs,
                if stats_wanted {
                    ", plus a stats run"
                } else {
                    ""
                }
            ));
            match catch_unwind(AssertUnwindSafe(|| {
                run_scenario(sc, &env, opts.rounds, ratio, stats_wanted, &mut budget)
            })) {
                Ok(r) => results.push((sc, r)),
                Err(e) => {
                    let msg = format!("{}: failed: {}", sc.short(), panic_text(&*e));
                    progress(&msg);
                    failures.push(msg);
                }
            }
        }
    }

    // Poll ticks (measured here, reported below).
    let mut rows: Vec<(usize, TickResult)> = vec![];
    if has(Section::Ticks) {
        for &n in &opts.sizes {
            progress(format!(
                "== poll ticks with {n} sockets ({} ticks)",
                opts.ticks
            ));
            wait_quiet(&mut budget);
            match catch_unwind(AssertUnwindSafe(|| tick_size(n, opts.ticks, stats_wanted))) {
                Ok(Ok(r)) => rows.push((n, r)),
                Ok(Err(e)) => failures.push(format!("ticks {n}: {e:#}")),
                Err(e) => failures.push(format!("ticks {n}: failed: {}", panic_text(&*e))),
            }
        }
    }

    // Spool throughput (in-process).
    let mut spool_rows: Vec<SpoolResult> = vec![];
    if has(Section::Spool) {
        let secs = if opts.quick { 1.0 } else { 3.0 };
        for batch in [1, 10] {
            progress(format!(
                "== spool: {batch} event(s) per append, {secs:.1} s"
            ));
            match catch_unwind(AssertUnwindSafe(|| spool_run(batch, secs))) {
                Ok(Ok(r)) => spool_rows.push(r),
                Ok(Err(e)) => failures.push(format!("spool {batch}: {e:#}")),
                Err(e) => failures.push(format!("spool {batch}: failed: {}", panic_text(&*e))),
            }
        }
    }

    // Flow records on vs off.
    let mut flows_res: Option<FlowsResult> = None;
    if has(Section::Flows) {
        match catch_unwind(AssertUnwindSafe(|| flows_section(&opts, &mut budget))) {
            Ok(r) => flows_res = Some(r),
            Err(e) => {
                let msg = format!("flows: failed: {}", panic_text(&*e));
                progress(&msg);
                failures.push(msg);
            }
        }
    }

    // Memory, idle to 100k sockets, and the mass close (the real agent process).
    let mut mem_runs = vec![];
    if has(Section::Memory) {
        wait_quiet(&mut budget);
        for r in memory::section(opts.mem_sockets) {
            match r {
                Ok(r) => mem_runs.push(r),
                Err(e) => failures.push(format!("memory: {e}")),
            }
        }
    }

    // The metrics endpoint: tick work with and without a scraper.
    let mut scrape_run = None;
    if has(Section::Metrics) {
        wait_quiet(&mut budget);
        match scrape::section(opts.rounds) {
            Ok(r) => scrape_run = Some(r),
            Err(e) => failures.push(format!("metrics: {e}")),
        }
    }

    let ratio_results: Vec<&(Scenario, ScenarioResult)> =
        results.iter().filter(|(_, r)| !r.runs.is_empty()).collect();
    let mut js_traffic = serde_json::Map::new();
    if !ratio_results.is_empty() {
        throughput::report(&mut out, &mut js_traffic, &ratio_results, &opts);
    }
    js.insert("throughput".into(), Value::Object(js_traffic));
    if !mem_runs.is_empty() {
        memory::report(&mut out, &mut js, &mem_runs);
    }
    if let Some(r) = &scrape_run {
        scrape::report(&mut out, &mut js, r);
    }

    // Program run times: one column per stats run, plus opening and closing the sockets of
    // the largest tick size (the per-socket programs get enough runs there).
    let mut columns: Vec<(String, String, &ProgDelta)> = results
        .iter()
        .filter_map(|(sc, r)| {
            Some((
                sc.short().to_string(),
                sc.key().to_string(),
                r.progs.as_ref()?,
            ))
        })
        .collect();
    columns.extend(results.iter().filter_map(|(sc, r)| {
        Some((
            format!("{} floor", sc.short()),
            format!("{}_empty_hooks", sc.key()),
            r.floor_progs.as_ref()?,
        ))
    }));
    if let Some((n, d)) = rows
        .iter()
        .rev()
        .find_map(|(n, r)| Some((n, r.setup_progs.as_ref()?)))
    {
        columns.push((
            format!("open+close {}k", n / 1000),
            format!("open_close_{n}_sockets"),
            d,
        ));
    }
    let stat_results: Vec<(Scenario, &ProgDelta, Option<&Vec<f64>>)> = results
        .iter()
        .filter_map(|(sc, r)| Some((*sc, r.progs.as_ref()?, r.stats_values.as_ref())))
        .collect();
    if !columns.is_empty() {
        line(&mut out, String::new());
        line(&mut out, "== Program run time (kernel bpf_stats: run_time_ns / run_cnt = ns per run (runs); one agent run and one empty-hooks run per scenario; target: ingress/egress <= 60 ns, others <= 100 ns) ==".into());
        let mut header = format!("{:<22}", "program");
        for (label, _, _) in &columns {
            header.push_str(&format!(" {:>19}", label));
        }
        header.push_str(&format!(" {:>19}  target", "all"));
        line(&mut out, header);
        let mut names: BTreeSet<String> = BTreeSet::new();
        for (_, _, d) in &columns {
            names.extend(d.keys().cloned());
        }
        let mut names: Vec<String> = names.into_iter().collect();
        names.sort_by_key(|n| {
            (
                PROGRAMS.iter().position(|p| n.starts_with(p)).unwrap_or(99),
                n.clone(),
            )
        });
        let mut jp = serde_json::Map::new();
        for name in &names {
            let mut row = format!("{:<22}", name);
            let (mut tt, mut tc) = (0u64, 0u64);
            let mut jn = serde_json::Map::new();
            for (_, key, d) in &columns {
                let (t, c) = d.get(name).copied().unwrap_or((0, 0));
                tt += t;
                tc += c;
                row.push_str(&format!(
                    " {:>19}",
                    if c == 0 {
                        "-".into()
                    } else {
                        format!("{:.1} ({})", t as f64 / c as f64, fmt_count(c))
                    }
                ));
                jn.insert(key.clone(), json!({"run_time_ns": t, "run_cnt": c, "ns_per_run": if c == 0 { Value::Null } else { json!(t as f64 / c as f64) }}));
            }
            let avg = tt as f64 / tc.max(1) as f64;
            row.push_str(&format!(
                " {:>19}  {}",
                if tc == 0 {
                    "-".into()
                } else {
                    format!("{avg:.1} ({})", fmt_count(tc))
                },
                match (tc, prog_target(name)) {
                    (0, _) | (_, None) => "",
                    (_, Some(t)) => mark(avg <= t),
                }
            ));
            line(&mut out, row);
            jn.insert("all".into(), json!({"run_time_ns": tt, "run_cnt": tc, "ns_per_run": if tc == 0 { Value::Null } else { json!(avg) }}));
            jp.insert(name.clone(), Value::Object(jn));
        }
        line(&mut out, "tcp_state, accept, first_recv, first_send are global hooks (every socket on the machine, not just the cgroup's): their counts include other processes".into());
        for (sc, r) in &results {
            if r.ladder.is_empty() {
                continue;
            }
            line(
                &mut out,
                format!(
                    "ladder, {} egress, each step alone (ns per run; what the step adds):",
                    sc.short()
                ),
            );
            let mut prev: Option<f64> = None;
            let (mut totals_ns, mut count_ns) = (None, None);
            let mut jl = vec![];
            for (name, t, c) in &r.ladder {
                let ns = *t as f64 / (*c).max(1) as f64;
                // The socket-storage step replaces cookie + lookup + count: compare it
                // with the totals step.
                let (base, what) = if name.contains("sk_storage") {
                    (
                        totals_ns,
                        "  (vs totals: instead of cookie + hash lookup + count)",
                    )
                } else {
                    (prev, "")
                };
                line(
                    &mut out,
                    format!(
                        "  {:<28} {:>7.1} ns ({}){}{what}",
                        name,
                        ns,
                        fmt_count(*c),
                        base.map(|p: f64| format!("  +{:.1}", ns - p))
                            .unwrap_or_default()
                    ),
                );
                if name.contains("totals") {
                    totals_ns = Some(ns);
                }
                if name.contains("count") {
                    count_ns = Some(ns);
                }
                prev = Some(ns);
                jl.push(json!({"program": name, "run_time_ns": t, "run_cnt": c, "ns_per_run": ns}));
            }
            if let Some(a) = r.progs.as_ref().and_then(|p| p.get("sockacct_egress")) {
                let ns = a.0 as f64 / a.1.max(1) as f64;
                line(
                    &mut out,
                    format!(
                        "  {:<28} {:>7.1} ns (the agent){}  (vs count: + seen mark, per-peer check, active note)",
                        "sockacct_egress",
                        ns,
                        count_ns
                            .map(|p| format!("  +{:.1}", ns - p))
                            .unwrap_or_default()
                    ),
                );
            }
            js.insert(format!("ladder_{}", sc.key()), Value::Array(jl));
        }
        // Throughput during the stats runs, for scale (not part of the ratios).
        let mut thr = String::from("throughput during these runs:");
        for (sc, _, v) in &stat_results {
            if let Some(v) = v.filter(|v| !v.is_empty()) {
                thr.push_str(&format!(
                    " {} {:.2} {};",
                    sc.short(),
                    v[0],
                    sc.metrics()[0].1
                ));
            }
        }
        if !stat_results.is_empty() {
            line(&mut out, thr.trim_end_matches(';').to_string());
        }
        // Offsets sanity: run_cnt grew with traffic, and agrees with /proc fdinfo.
        let grew = if stat_results.is_empty() {
            columns.iter().all(|(_, _, d)| d.values().any(|x| x.1 > 0))
        } else {
            stat_results
                .iter()
                .all(|(_, d, _)| d.get("sockacct_egress").map(|x| x.1 > 0).unwrap_or(false))
        };
        let (agree, checked) = results
            .iter()
            .filter_map(|(_, r)| r.offsets_check)
            .fold((0, 0), |(a, c), (x, y)| (a + x, c + y));
        line(
            &mut out,
            format!(
                "bpf_prog_info check (run_time_ns @192, run_cnt @200): run_cnt grew with traffic: {}; within /proc fdinfo run_cnt read before/after: {agree}/{checked}",
                if grew {
                    "yes"
                } else {
                    "NO (offsets or stats wrong?)"
                }
            ),
        );
        js.insert("programs".into(), json!({"per_program": jp, "run_cnt_grew": grew, "fdinfo_agree": agree, "fdinfo_checked": checked}));
    }

    // Poll ticks.
    if has(Section::Ticks) {
        let mut jt = vec![];
        if !rows.is_empty() {
            line(&mut out, String::new());
            line(
                &mut out,
                format!(
                    "== Poll tick (Poller::tick in-process, 100 ms apart, {} ticks per size after 2 warm-up ticks; 32 connections moving) ==",
                    opts.ticks
                ),
            );
            line(
                &mut out,
                format!(
                    "{:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11} {:>10}  {}",
                    "sockets",
                    "map ent",
                    "work p50",
                    "work p99",
                    "wait p50",
                    "wait p99",
                    "batch rd",
                    "first tick",
                    "setup",
                    "target (work p99)"
                ),
            );
            for (n, r) in &rows {
                let (w50, w99) = (percentile(&r.work_ms, 50.0), percentile(&r.work_ms, 99.0));
                let (g50, g99) = (percentile(&r.wait_ms, 50.0), percentile(&r.wait_ms, 99.0));
                let br = median(&r.batch_read_ms);
                let target = match n {
                    10_000 => Some(5.0),
                    100_000 => Some(25.0),
                    _ => None,
                };
                line(
                    &mut out,
                    format!(
                        "{:>8} {:>8} {:>6.2} ms {:>6.2} ms {:>6.2} ms {:>6.2} ms {:>6.2} ms {:>8.1} ms {:>8.1} s  {}",
                        r.sockets,
                        r.map_entries,
                        w50,
                        w99,
                        g50,
                        g99,
                        br,
                        r.first_work_ms,
                        r.setup_s,
                        target
                            .map(|t| format!("<= {t} ms {}", mark(w99 <= t)))
                            .unwrap_or("-".into())
                    ),
                );
                jt.push(json!({"sockets": r.sockets, "requested": n, "map_entries": r.map_entries, "sockets_tracked": r.tracked,
                    "work_ms": {"p50": w50, "p99": w99, "max": percentile(&r.work_ms, 100.0), "all": r.work_ms},
                    "wait_ms": {"p50": g50, "p99": g99, "max": percentile(&r.wait_ms, 100.0), "all": r.wait_ms},
                    "batch_read_ms_median": br, "first_tick_work_ms": r.first_work_ms, "first_tick_wait_ms": r.first_wait_ms,
                    "setup_s": r.setup_s, "events": r.events, "target_work_p99_ms": target}));
            }
            line(&mut out, "work = PollStats::last_tick_work (excludes the wait); wait = grace-period wait (membarrier) after the epoch flip;".into());
            line(&mut out, "batch rd = one bare BPF_MAP_LOOKUP_BATCH walk of the socket map; first tick = the tick that labels every socket".into());
        }
        js.insert("ticks".into(), Value::Array(jt));
    }

    if !spool_rows.is_empty() {
        report_spool(&mut out, &mut js, &spool_rows);
    }
    if let Some(f) = &flows_res {
        report_flows(&mut out, &mut js, f);
    }

    let elapsed = started.elapsed().as_secs_f64();
    line(&mut out, String::new());
    line(
        &mut out,
        format!(
            "load average at end: {}; total bench time {:.0} s",
            loadavg(),
            elapsed
        ),
    );
    for f in &failures {
        line(&mut out, format!("FAILED: {f}"));
    }
    js.insert("failures".into(), json!(failures));
    js.insert("elapsed_s".into(), json!(elapsed));
    js.insert(
        "unix_time".into(),
        json!(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        ),
    );

    print!("{out}");
    // target/<profile>/sockacct-bench -> target/bench/last.json
    let exe = std::env::current_exe()?;
    let target = exe
        .parent()
        .and_then(|p| p.parent())
        .context("locating the target directory")?;
    let dir = target.join("bench");
    fs::create_dir_all(&dir)?;
    let path = dir.join("last.json");
    fs::write(
        &path,
        serde_json::to_string_pretty(&Value::Object(js))? + "\n",
    )?;
    println!("JSON summary: {}", path.display());
    if !failures.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
