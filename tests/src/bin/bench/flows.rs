//! The cost of flow records: the agent with them off and on.
use super::*;

// ---- flow records -------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum FlowCond {
    NoAgent,
    Off,
    On,
}

impl FlowCond {
    fn key(self) -> &'static str {
        match self {
            FlowCond::NoAgent => "no_agent",
            FlowCond::Off => "flows_off",
            FlowCond::On => "flows_on",
        }
    }
    fn label(self) -> &'static str {
        match self {
            FlowCond::NoAgent => "no agent",
            FlowCond::Off => "flows off",
            FlowCond::On => "flows on",
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct FlowRun {
    pub(super) cond: FlowCond,
    pub(super) values: Vec<f64>,
    pub(super) events: usize,
    pub(super) flow_records: usize,
    pub(super) busy_before: f64,
    pub(super) foreign: usize,
}

#[derive(Debug, Clone, Default)]
pub(super) struct FlowsResult {
    pub(super) secs: f64,
    pub(super) rounds: usize,
    /// (scenario, runs in the order they ran)
    pub(super) runs: Vec<(Scenario, Vec<FlowRun>)>,
    /// Stats runs of the UDP scenario: (condition, per-program deltas, throughput, flow records).
    pub(super) progs: Vec<(FlowCond, ProgDelta, Vec<f64>, usize)>,
}

/// One run under `cond`; with `stats`, bpf_stats are on and the agent's program deltas are
/// returned. Returns (metrics, delta events, flow records, program deltas).
pub(super) fn flows_once(
    sc: Scenario,
    env: &Env,
    cond: FlowCond,
    cfg_dir: &std::path::Path,
    stats: bool,
) -> (Vec<f64>, usize, usize, Option<ProgDelta>) {
    if cond == FlowCond::NoAgent {
        return (run_once(sc, env), 0, 0, None);
    }
    let cfg = cfg_dir.join(format!("{}.toml", cond.key()));
    let mut args = agent_args(sc, env);
    args.push("--config".into());
    args.push(cfg.to_string_lossy().into_owned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stats_fd = stats.then(|| bpf::enable_stats().expect("BPF_ENABLE_STATS"));
    let d = Daemon::start(env.cg, &args);
    let before = stats.then(|| prog_snapshot(&[d.pid()]));
    let v = run_once(sc, env);
    let progs = before.map(|b| prog_delta(&b, &prog_snapshot(&[d.pid()])));
    let lines = d.stop_lines();
    drop(stats_fd);
    let count = |kind: &str| {
        lines
            .iter()
            .filter(|l| l.contains(&format!("\"type\":\"{kind}\"")))
            .count()
    };
    (v, count("delta"), count("flow"), progs)
}

/// Flow records on vs off (and no agent): UDP 64 B from an unconnected socket over veth,
/// TCP on loopback; rounds rotate the order of the three conditions (a Latin square).
pub(super) fn flows_section(opts: &Opts, budget: &mut Duration) -> FlowsResult {
    let cg = TestCgroup::new("benchflows");
    let net = VethNs::new("bf", 2 + (std::process::id() % 90) as u8);
    let cfg_dir = TempDir::new("benchflowscfg");
    fs::write(
        cfg_dir.0.join("flows_off.toml"),
        "[flows]\nenabled = false\n",
    )
    .unwrap();
    fs::write(cfg_dir.0.join("flows_on.toml"), "[flows]\nenabled = true\n").unwrap();
    let secs = opts.secs.min(2.0);
    let rounds = opts.rounds.max(3);
    let env = Env {
        cg: &cg,
        net: Some(&net),
        secs,
    };
    let conds = [FlowCond::NoAgent, FlowCond::Off, FlowCond::On];
    let mut res = FlowsResult {
        secs,
        rounds,
        ..Default::default()
    };
    for sc in [Scenario::UdpVethTo, Scenario::TcpLo] {
        progress(format!(
            "== flows: {} ({rounds} rounds, {secs:.1} s per run)",
            sc.short()
        ));
        let mut runs = vec![];
        for r in 0..rounds {
            for k in 0..conds.len() {
                let cond = conds[(r + k) % conds.len()];
                let (busy_before, foreign) = wait_quiet(budget);
                let (values, events, flow_records, _) =
                    flows_once(sc, &env, cond, &cfg_dir.0, false);
                let foreign = foreign.max(prog_snapshot(&[]).foreign);
                progress(format!(
                    "flows {} round {}/{rounds} {:<9}: {} ({events} events, {flow_records} flow records)",
                    sc.short(),
                    r + 1,
                    cond.label(),
                    values
                        .iter()
                        .zip(sc.metrics())
                        .map(|(v, m)| format!("{v:.2} {}", m.1))
                        .collect::<Vec<_>>()
                        .join(", "),
                ));
                runs.push(FlowRun {
                    cond,
                    values,
                    events,
                    flow_records,
                    busy_before,
                    foreign,
                });
            }
        }
        res.runs.push((sc, runs));
    }
    for cond in [FlowCond::Off, FlowCond::On] {
        progress(format!(
            "flows: {} stats run, {} (bpf_stats on)",
            Scenario::UdpVethTo.short(),
            cond.label()
        ));
        wait_quiet(budget);
        let (v, _, flow_records, progs) =
            flows_once(Scenario::UdpVethTo, &env, cond, &cfg_dir.0, true);
        res.progs
            .push((cond, progs.unwrap_or_default(), v, flow_records));
    }
    res
}

pub(super) fn report_flows(
    out: &mut String,
    js: &mut serde_json::Map<String, Value>,
    f: &FlowsResult,
) {
    let mut push = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    let conds = [FlowCond::NoAgent, FlowCond::Off, FlowCond::On];
    push(String::new());
    push(format!(
        "== Flow records: cost (agent with [flows] enabled = false vs true, and no agent; {} rounds, order rotated, {:.1} s per run, medians; bpf_stats off) ==",
        f.rounds, f.secs
    ));
    push(format!(
        "{:<34} {:>9} {:>9} {:>9} {:>7} {:>8}  {}",
        "scenario",
        "no agent",
        "flows off",
        "flows on",
        "on/off",
        "off/none",
        "runs no agent | off | on"
    ));
    let mut jt = serde_json::Map::new();
    for (sc, runs) in &f.runs {
        let mut jm = serde_json::Map::new();
        for (i, (key, unit)) in sc.metrics().iter().enumerate() {
            let vals = |c: FlowCond| {
                runs.iter()
                    .filter(|r| r.cond == c)
                    .map(|r| r.values[i])
                    .collect::<Vec<f64>>()
            };
            let v: Vec<Vec<f64>> = conds.iter().map(|&c| vals(c)).collect();
            let m: Vec<f64> = v.iter().map(|x| median(x)).collect();
            let list = |v: &[f64]| {
                v.iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            push(format!(
                "{:<34} {:>9.2} {:>9.2} {:>9.2} {:>7.3} {:>8.3}  {} | {} | {}",
                format!("{} ({unit})", sc.short()),
                m[0],
                m[1],
                m[2],
                m[2] / m[1],
                m[1] / m[0],
                list(&v[0]),
                list(&v[1]),
                list(&v[2])
            ));
            let mut jc = serde_json::Map::new();
            for (k, &c) in conds.iter().enumerate() {
                jc.insert(c.key().into(), json!({"runs": v[k], "median": m[k]}));
            }
            jc.insert("unit".into(), json!(unit));
            jc.insert("ratio_on_off".into(), json!(m[2] / m[1]));
            jc.insert("ratio_off_no_agent".into(), json!(m[1] / m[0]));
            jc.insert("ratio_on_no_agent".into(), json!(m[2] / m[0]));
            jm.insert(key.to_string(), Value::Object(jc));
        }
        jm.insert(
            "order".into(),
            json!(runs.iter().map(|r| r.cond.key()).collect::<Vec<_>>()),
        );
        jm.insert(
            "events_per_run".into(),
            json!(runs.iter().map(|r| r.events).collect::<Vec<_>>()),
        );
        jm.insert(
            "flow_records_per_run".into(),
            json!(runs.iter().map(|r| r.flow_records).collect::<Vec<_>>()),
        );
        jm.insert(
            "cpu_busy_before_run".into(),
            json!(
                runs.iter()
                    .map(|r| (r.busy_before * 1000.0).round() / 1000.0)
                    .collect::<Vec<_>>()
            ),
        );
        jm.insert(
            "foreign_sockacct_programs_per_run".into(),
            json!(runs.iter().map(|r| r.foreign).collect::<Vec<_>>()),
        );
        jt.insert(sc.key().into(), Value::Object(jm));
        let fr = |c: FlowCond| {
            runs.iter()
                .filter(|r| r.cond == c)
                .map(|r| r.flow_records.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        push(format!(
            "  {}: flow records per agent run: off {} | on {}",
            sc.short(),
            fr(FlowCond::Off),
            fr(FlowCond::On)
        ));
        let noisy = runs
            .iter()
            .filter(|r| r.foreign > 0 || r.busy_before >= 0.15)
            .count();
        if noisy > 0 {
            push(format!(
                "  note: {noisy} of {} runs started on a busy machine or overlapped another sockacct instance",
                runs.len()
            ));
        }
    }
    push("UDP: 64 B payload from an UNCONNECTED socket (send_to) in the cgroup to a receiver in the namespace (per-peer kernel path); ratios on medians".into());
    // Program run times during the UDP stats runs.
    if !f.progs.is_empty() {
        push(String::new());
        push(format!(
            "== Program run time during {} (kernel bpf_stats, one agent run each; ns per run (runs)) ==",
            Scenario::UdpVethTo.short()
        ));
        let get = |c: FlowCond| f.progs.iter().find(|p| p.0 == c);
        let (off, on) = (get(FlowCond::Off), get(FlowCond::On));
        push(format!(
            "{:<22} {:>19} {:>19} {:>7}",
            "program", "flows off", "flows on", "on/off"
        ));
        let mut names: BTreeSet<String> = BTreeSet::new();
        for p in &f.progs {
            names.extend(p.1.iter().filter(|(_, v)| v.1 > 0).map(|(n, _)| n.clone()));
        }
        let mut names: Vec<String> = names.into_iter().collect();
        names.sort_by_key(|n| {
            (
                PROGRAMS.iter().position(|p| n.starts_with(p)).unwrap_or(99),
                n.clone(),
            )
        });
        let mut jp = serde_json::Map::new();
        for n in &names {
            let ns = |p: Option<&(FlowCond, ProgDelta, Vec<f64>, usize)>| {
                let (t, c) = p.and_then(|p| p.1.get(n).copied()).unwrap_or((0, 0));
                (
                    t,
                    c,
                    if c == 0 {
                        f64::NAN
                    } else {
                        t as f64 / c as f64
                    },
                )
            };
            let (a, b) = (ns(off), ns(on));
            let cell = |x: (u64, u64, f64)| {
                if x.1 == 0 {
                    "-".to_string()
                } else {
                    format!("{:.1} ({})", x.2, fmt_count(x.1))
                }
            };
            push(format!(
                "{:<22} {:>19} {:>19} {:>7.3}",
                n,
                cell(a),
                cell(b),
                b.2 / a.2
            ));
            jp.insert(
                n.clone(),
                json!({"flows_off": {"run_time_ns": a.0, "run_cnt": a.1}, "flows_on": {"run_time_ns": b.0, "run_cnt": b.1},
                       "ratio_on_off": if a.1 > 0 && b.1 > 0 { json!(b.2 / a.2) } else { Value::Null }}),
            );
        }
        let thr = |p: Option<&(FlowCond, ProgDelta, Vec<f64>, usize)>| {
            p.and_then(|p| {
                p.2.first()
                    .map(|v| format!("{v:.2} kpps received, {} flow records", p.3))
            })
            .unwrap_or("-".into())
        };
        push(format!(
            "during these runs: flows off {}; flows on {}",
            thr(off),
            thr(on)
        ));
        js.insert(
            "flows_programs".into(),
            json!({"per_program": jp, "throughput_kpps": {"flows_off": off.map(|p| p.2.clone()), "flows_on": on.map(|p| p.2.clone())}}),
        );
    }
    js.insert(
        "flows".into(),
        json!({"rounds": f.rounds, "seconds_per_run": f.secs, "scenarios": jt}),
    );
}
