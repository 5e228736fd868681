//! The throughput table: every figure against the baseline (no programs) and the floor
//! (empty hooks at the same attach points), from the same rotated rounds.
use serde_json::{Value, json};

use super::{Cond, Opts, RunRec, Scenario, ScenarioResult, mark, median};

/// How close to the floor the agent must come (agent/baseline vs empty-hooks/baseline).
const FLOOR_GAP: f64 = 0.01;

fn values(runs: &[RunRec], cond: Cond, i: usize) -> Vec<f64> {
    runs.iter()
        .filter(|x| x.cond == cond)
        .map(|x| x.values[i])
        .collect()
}

/// Ratios of `num` to `den` within each round (runs of one round are neighbours in time).
fn paired(b: &[f64], x: &[f64]) -> Vec<f64> {
    b.iter().zip(x).map(|(b, x)| x / b).collect()
}

fn range(v: &[f64]) -> String {
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    format!("[{lo:.3}–{hi:.3}]")
}

pub fn report(
    out: &mut String,
    js: &mut serde_json::Map<String, Value>,
    results: &[&(Scenario, ScenarioResult)],
    opts: &Opts,
) {
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(String::new());
    line(format!(
        "== Throughput: baseline (B), empty hooks (F, the floor), agent (A); {} rounds of B F A rotated, {:.1} s per run, bpf_stats off ==",
        opts.rounds, opts.secs
    ));
    line(format!(
        "{:<24} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7}  {:<27} {:<27} {}",
        "scenario",
        "B",
        "F",
        "A",
        "F/B",
        "A/B",
        "A/F",
        "paired A/B median [range]",
        "paired F/B median [range]",
        "target A/B >= F/B - 0.01"
    ));
    for (sc, r) in results {
        let mut jm = serde_json::Map::new();
        for (i, (key, unit)) in sc.metrics().iter().enumerate() {
            let b = values(&r.runs, Cond::Baseline, i);
            let f = values(&r.runs, Cond::Floor, i);
            let a = values(&r.runs, Cond::Agent, i);
            let (mb, mf, ma) = (median(&b), median(&f), median(&a));
            let (pa, pf) = (paired(&b, &a), paired(&b, &f));
            let (ra, rf) = (ma / mb, mf / mb);
            let target = if i == 0 {
                mark(ra >= rf - FLOOR_GAP).to_string()
            } else {
                "(info)".into()
            };
            line(format!(
                "{:<24} {:>9.2} {:>9.2} {:>9.2} {:>7.3} {:>7.3} {:>7.3}  {:<27} {:<27} {}",
                format!("{} ({unit})", sc.short()),
                mb,
                mf,
                ma,
                rf,
                ra,
                ma / mf,
                format!("{:.3} {}", median(&pa), range(&pa)),
                format!("{:.3} {}", median(&pf), range(&pf)),
                target
            ));
            jm.insert(
                key.to_string(),
                json!({"unit": unit, "baseline_runs": b, "floor_runs": f, "agent_runs": a,
                       "baseline_median": mb, "floor_median": mf, "agent_median": ma,
                       "agent_over_baseline": ra, "floor_over_baseline": rf, "agent_over_floor": ma / mf,
                       "paired_agent_over_baseline": pa, "paired_floor_over_baseline": pf}),
            );
        }
        jm.insert(
            "order".into(),
            json!(r.runs.iter().map(|x| x.cond.name()).collect::<Vec<_>>()),
        );
        jm.insert(
            "agent_events_per_run".into(),
            json!(
                r.runs
                    .iter()
                    .filter(|x| x.cond == Cond::Agent)
                    .map(|x| x.events)
                    .collect::<Vec<_>>()
            ),
        );
        jm.insert(
            "foreign_sockacct_programs_per_run".into(),
            json!(r.runs.iter().map(|x| x.foreign_progs).collect::<Vec<_>>()),
        );
        jm.insert(
            "cpu_busy_before_run".into(),
            json!(
                r.runs
                    .iter()
                    .map(|x| (x.busy_before * 1000.0).round() / 1000.0)
                    .collect::<Vec<_>>()
            ),
        );
        if let Some(v) = &r.stats_values {
            jm.insert("with_bpf_stats_on".into(), json!(v));
        }
        js.insert(sc.key().into(), Value::Object(jm));
    }
    let all: Vec<&RunRec> = results.iter().flat_map(|(_, r)| r.runs.iter()).collect();
    let foreign = all.iter().filter(|x| x.foreign_progs > 0).count();
    let busy = all.iter().filter(|x| x.busy_before >= 0.15).count();
    if foreign + busy > 0 {
        line(format!(
            "note: of {} runs, {foreign} overlapped with another sockacct instance and {busy} started with the CPU >= 15 % busy from other work: expect noise",
            all.len()
        ));
    }
    if results.iter().any(|(sc, _)| *sc == Scenario::UdpVeth) {
        line("UDP: 64 B payload, unpaced sender in the cgroup, receiver in the namespace; ratio on datagrams received/s".into());
    }
}
