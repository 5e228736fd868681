//! Which programs ran how long: bpf_stats snapshots of the agent's (or the bench's)
//! programs, named from /proc/kallsyms; and waiting for a quiet machine.
use super::*;

pub(super) fn fdinfo_values(pid: i32, key: &str) -> Vec<(u64, BTreeMap<String, u64>)> {
    let mut out = vec![];
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(text) = fs::read_to_string(e.path()) else {
            continue;
        };
        let fields: BTreeMap<String, u64> = text
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.trim().to_string(), v.trim().parse().ok()?))
            })
            .collect();
        if let Some(&v) = fields.get(key) {
            out.push((v, fields));
        }
    }
    out
}

/// Known programs, in display order (the kernel keeps only 15 characters of a name).
pub(super) const PROGRAMS: [&str; 19] = [
    "sockacct_ingress",
    "sockacct_egress",
    "sockacct_sock_create",
    "sockacct_sock_release",
    "sockacct_tcp_state",
    "sockacct_accept",
    "sockacct_first_recv",
    "sockacct_first_send",
    "sockacct_tc_ingress",
    "sockacct_tc_egress",
    "sockacct_floor_ingress",
    "sockacct_floor_egress",
    "sockacct_floor_tc_ingress",
    "sockacct_floor_tc_egress",
    "sockacct_ladder1_totals",
    "sockacct_ladder2_cookie",
    "sockacct_ladder3_lookup",
    "sockacct_ladder4_count",
    "sockacct_ladder5_sk_storage",
];

/// Full names of JITed sockacct programs by address: /proc/kallsyms lists each one as
/// `bpf_prog_<tag>_<function name from BTF>`, not truncated. (Programs with identical code
/// share a tag, so the address is what tells them apart.)
pub(super) fn kallsyms_names() -> BTreeMap<u64, String> {
    let mut m = BTreeMap::new();
    for l in fs::read_to_string("/proc/kallsyms")
        .unwrap_or_default()
        .lines()
    {
        let mut f = l.split_whitespace();
        let (Some(addr), Some(sym)) = (f.next(), f.nth(1)) else {
            continue;
        };
        let Some(rest) = sym.strip_prefix("bpf_prog_") else {
            continue;
        };
        if rest.len() <= 17 || rest.as_bytes()[16] != b'_' || !rest[17..].starts_with("sockacct_") {
            continue;
        }
        let Ok(a) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        m.insert(a, rest[17..].to_string());
    }
    m
}

/// Target ns per run: the per-packet programs have the 60 ns, per-socket ones
/// 100 ns; the floor has none.
pub(super) fn prog_target(name: &str) -> Option<f64> {
    if name.starts_with("sockacct_floor") {
        None
    } else if name.starts_with("sockacct_ingress") || name.starts_with("sockacct_egress") {
        Some(60.0)
    } else {
        Some(100.0)
    }
}

pub(super) fn full_name(kernel: &str, addr: u64, syms: &BTreeMap<u64, String>) -> String {
    if let Some(n) = syms.get(&addr).filter(|n| n.starts_with(kernel)) {
        return n.clone();
    }
    let fit: Vec<&&str> = PROGRAMS.iter().filter(|p| p.starts_with(kernel)).collect();
    if fit.len() == 1 {
        fit[0].to_string()
    } else {
        kernel.to_string()
    }
}

#[derive(Debug, Clone, Default)]
pub(super) struct ProgSnap {
    /// Full name -> (id, run_time_ns, run_cnt) for the programs the given processes hold.
    pub(super) ours: BTreeMap<String, (u32, u64, u64)>,
    /// sockacct programs loaded by anyone else (another agent or test on this machine).
    pub(super) foreign: usize,
}

pub(super) fn prog_snapshot(owners: &[i32]) -> ProgSnap {
    let owned: BTreeSet<u64> = owners
        .iter()
        .flat_map(|&p| fdinfo_values(p, "prog_id"))
        .map(|(id, _)| id)
        .collect();
    let syms = if owners.is_empty() {
        BTreeMap::new()
    } else {
        kallsyms_names()
    };
    let mut s = ProgSnap::default();
    let mut progs = bpf::all_programs().unwrap_or_default();
    progs.sort_by_key(|p| p.info.id);
    for bpf::Prog { info: p, addr } in progs {
        let name = bpf::name_of(&p.name);
        if !name.starts_with("sockacct_") {
            continue;
        }
        if owned.contains(&(p.id as u64)) {
            let mut full = full_name(&name, addr, &syms);
            // Two programs whose names cannot be told apart: keep both, numbered.
            let mut k = 2;
            while s.ours.contains_key(&full) {
                full = format!("{}#{k}", full.split('#').next().unwrap());
                k += 1;
            }
            s.ours.insert(full, (p.id, p.run_time_ns, p.run_cnt));
        } else {
            s.foreign += 1;
        }
    }
    s
}

/// (run_time_ns, run_cnt) per program between two snapshots.
pub(super) type ProgDelta = BTreeMap<String, (u64, u64)>;

pub(super) fn prog_delta(a: &ProgSnap, b: &ProgSnap) -> ProgDelta {
    b.ours
        .iter()
        .map(|(n, &(_, t, c))| {
            let (t0, c0) = a.ours.get(n).map(|&(_, t, c)| (t, c)).unwrap_or((0, 0));
            (n.clone(), (t.saturating_sub(t0), c.saturating_sub(c0)))
        })
        .collect()
}

pub(super) fn fdinfo_run_cnt(pid: i32) -> BTreeMap<u64, u64> {
    fdinfo_values(pid, "run_cnt")
        .into_iter()
        .filter_map(|(cnt, f)| Some((*f.get("prog_id")?, cnt)))
        .collect()
}

/// Snapshot of `pid`'s programs, with a cross-check of the struct offsets: run_cnt read
/// through BPF_OBJ_GET_INFO_BY_FD must lie between the run_cnt the kernel prints in
/// /proc/PID/fdinfo just before and just after (global hooks may run meanwhile).
/// Returns the snapshot and (programs that agree, programs checked).
pub(super) fn checked_snapshot(pid: i32) -> (ProgSnap, (usize, usize)) {
    let before = fdinfo_run_cnt(pid);
    let snap = prog_snapshot(&[pid]);
    let after = fdinfo_run_cnt(pid);
    let (mut agree, mut checked) = (0, 0);
    for &(id, _, cnt) in snap.ours.values() {
        if let (Some(&lo), Some(&hi)) = (before.get(&(id as u64)), after.get(&(id as u64))) {
            checked += 1;
            if lo <= cnt && cnt <= hi {
                agree += 1;
            }
        }
    }
    (snap, (agree, checked))
}

/// Waits (at most `budget`, shared by all calls) until the machine is quiet: CPU busy
/// below 15 % over 300 ms and no other sockacct programs loaded. Returns the last busy
/// fraction seen and the number of foreign programs.
pub(super) fn wait_quiet(budget: &mut Duration) -> (f64, usize) {
    fn cpu() -> (u64, u64) {
        let s = fs::read_to_string("/proc/stat").unwrap_or_default();
        let v: Vec<u64> = s
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        (total, idle)
    }
    loop {
        let t = Instant::now();
        let (t0, i0) = cpu();
        thread::sleep(Duration::from_millis(300));
        let (t1, i1) = cpu();
        let busy = if t1 > t0 {
            1.0 - (i1 - i0) as f64 / (t1 - t0) as f64
        } else {
            0.0
        };
        let foreign = prog_snapshot(&[]).foreign;
        let spent = t.elapsed();
        if (busy < 0.15 && foreign == 0) || *budget <= spent {
            *budget = budget.saturating_sub(spent);
            return (busy, foreign);
        }
        *budget = budget.saturating_sub(spent);
    }
}
