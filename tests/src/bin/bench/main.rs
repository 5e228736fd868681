//! sockacct-bench: what the agent costs, measured on the real kernel (run as root through
//! `cargo xtask bench [-- --quick] [--only tcp|veth|udp|ticks|progs|spool|flows|memory]…`).
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
    time::{Duration, Instant, SystemTime},
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

// ---- bpf(2) -------------------------------------------------------------------------------

mod floor;
mod memory;
mod throughput;

mod bpf {
    use super::*;

    const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    const BPF_STATS_RUN_TIME: u32 = 0;

    /// Prefix of `struct bpf_prog_info` (include/uapi/linux/bpf.h). The kernel fills
    /// min(info_len, its own size) bytes, so a prefix is enough.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct ProgInfoPrefix {
        pub prog_type: u32,
        pub id: u32,
        pub tag: [u8; 8],
        pub jited_prog_len: u32,
        pub xlated_prog_len: u32,
        pub jited_prog_insns: u64,
        pub xlated_prog_insns: u64,
        pub load_time: u64,
        pub created_by_uid: u32,
        pub nr_map_ids: u32,
        pub map_ids: u64,
        pub name: [u8; 16],
        pub ifindex: u32,
        pub gpl_compatible: u32, // bit field :1, then 31 bits of padding
        pub netns_dev: u64,
        pub netns_ino: u64,
        pub nr_jited_ksyms: u32,
        pub nr_jited_func_lens: u32,
        pub jited_ksyms: u64,
        pub jited_func_lens: u64,
        pub btf_id: u32,
        pub func_info_rec_size: u32,
        pub func_info: u64,
        pub nr_func_info: u32,
        pub nr_line_info: u32,
        pub line_info: u64,
        pub jited_line_info: u64,
        pub nr_jited_line_info: u32,
        pub line_info_rec_size: u32,
        pub jited_line_info_rec_size: u32,
        pub nr_prog_tags: u32,
        pub prog_tags: u64,
        pub run_time_ns: u64,
        pub run_cnt: u64,
    }
    // The documented layout (checked against linux/bpf.h with offsetof).
    const _: () = {
        assert!(offset_of!(ProgInfoPrefix, id) == 4);
        assert!(offset_of!(ProgInfoPrefix, load_time) == 40);
        assert!(offset_of!(ProgInfoPrefix, name) == 64);
        assert!(offset_of!(ProgInfoPrefix, netns_dev) == 88);
        assert!(offset_of!(ProgInfoPrefix, btf_id) == 128);
        assert!(offset_of!(ProgInfoPrefix, prog_tags) == 184);
        assert!(offset_of!(ProgInfoPrefix, run_time_ns) == 192);
        assert!(offset_of!(ProgInfoPrefix, run_cnt) == 200);
        assert!(size_of::<ProgInfoPrefix>() == 208);
    };

    /// Prefix of `struct bpf_map_info`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct MapInfoPrefix {
        pub map_type: u32,
        pub id: u32,
        pub key_size: u32,
        pub value_size: u32,
        pub max_entries: u32,
        pub map_flags: u32,
        pub name: [u8; 16],
    }
    const _: () = assert!(offset_of!(MapInfoPrefix, name) == 24);

    #[repr(C)]
    struct GetIdAttr {
        start_or_id: u32,
        next_id: u32,
        open_flags: u32,
    }

    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }

    #[repr(C)]
    struct EnableStatsAttr {
        stats_type: u32,
    }

    fn sys<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
        let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>() as u32) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// Kernel-wide run-time stats, on while the returned fd stays open.
    pub fn enable_stats() -> io::Result<OwnedFd> {
        let fd = sys(
            BPF_ENABLE_STATS,
            &mut EnableStatsAttr {
                stats_type: BPF_STATS_RUN_TIME,
            },
        )?;
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    fn next_id(cmd: libc::c_long, start: u32) -> io::Result<Option<u32>> {
        let mut a = GetIdAttr {
            start_or_id: start,
            next_id: 0,
            open_flags: 0,
        };
        match sys(cmd, &mut a) {
            Ok(_) => Ok(Some(a.next_id)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn fd_by_id(cmd: libc::c_long, id: u32) -> io::Result<OwnedFd> {
        let mut a = GetIdAttr {
            start_or_id: id,
            next_id: 0,
            open_flags: 0,
        };
        let fd = sys(cmd, &mut a)?;
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    fn info_into<T: Copy>(fd: &OwnedFd, v: &mut T) -> io::Result<()> {
        let mut a = InfoAttr {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: size_of::<T>() as u32,
            info: v as *mut T as u64,
        };
        sys(BPF_OBJ_GET_INFO_BY_FD, &mut a)?;
        Ok(())
    }

    fn info<T: Copy>(fd: &OwnedFd) -> io::Result<T> {
        let mut v: T = unsafe { std::mem::zeroed() };
        info_into(fd, &mut v)?;
        Ok(v)
    }

    /// A program's info plus the address of its JITed main function (0 if not given).
    pub struct Prog {
        pub info: ProgInfoPrefix,
        pub addr: u64,
    }

    pub fn name_of(raw: &[u8; 16]) -> String {
        let n = raw.iter().position(|&b| b == 0).unwrap_or(16);
        String::from_utf8_lossy(&raw[..n]).into_owned()
    }

    /// Every loaded program (ids that vanish during the walk are skipped).
    pub fn all_programs() -> io::Result<Vec<Prog>> {
        let mut out = vec![];
        let mut id = 0;
        while let Some(next) = next_id(BPF_PROG_GET_NEXT_ID, id)? {
            id = next;
            let Ok(fd) = fd_by_id(BPF_PROG_GET_FD_BY_ID, id) else {
                continue;
            };
            // Ask for the first JITed symbol address too (one slot: the main function).
            let mut addr = 0u64;
            let mut i: ProgInfoPrefix = unsafe { std::mem::zeroed() };
            i.nr_jited_ksyms = 1;
            i.jited_ksyms = &mut addr as *mut u64 as u64;
            if info_into(&fd, &mut i).is_ok() {
                if i.jited_ksyms == 0 {
                    addr = 0;
                }
                out.push(Prog { info: i, addr });
            }
        }
        Ok(out)
    }

    /// An fd for the map with this id, with its info.
    pub fn map_by_id(id: u32) -> io::Result<(OwnedFd, MapInfoPrefix)> {
        let fd = fd_by_id(BPF_MAP_GET_FD_BY_ID, id)?;
        let i = info::<MapInfoPrefix>(&fd)?;
        Ok((fd, i))
    }
}

/// `key: value` numbers from every /proc/PID/fdinfo entry that has `key`, e.g. the
/// program and map ids a process holds.
fn fdinfo_values(pid: i32, key: &str) -> Vec<(u64, BTreeMap<String, u64>)> {
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
const PROGRAMS: [&str; 19] = [
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
fn kallsyms_names() -> BTreeMap<u64, String> {
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
fn prog_target(name: &str) -> Option<f64> {
    if name.starts_with("sockacct_floor") {
        None
    } else if name.starts_with("sockacct_ingress") || name.starts_with("sockacct_egress") {
        Some(60.0)
    } else {
        Some(100.0)
    }
}

fn full_name(kernel: &str, addr: u64, syms: &BTreeMap<u64, String>) -> String {
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
struct ProgSnap {
    /// Full name -> (id, run_time_ns, run_cnt) for the programs the given processes hold.
    ours: BTreeMap<String, (u32, u64, u64)>,
    /// sockacct programs loaded by anyone else (another agent or test on this machine).
    foreign: usize,
}

fn prog_snapshot(owners: &[i32]) -> ProgSnap {
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
type ProgDelta = BTreeMap<String, (u64, u64)>;

fn prog_delta(a: &ProgSnap, b: &ProgSnap) -> ProgDelta {
    b.ours
        .iter()
        .map(|(n, &(_, t, c))| {
            let (t0, c0) = a.ours.get(n).map(|&(_, t, c)| (t, c)).unwrap_or((0, 0));
            (n.clone(), (t.saturating_sub(t0), c.saturating_sub(c0)))
        })
        .collect()
}

fn fdinfo_run_cnt(pid: i32) -> BTreeMap<u64, u64> {
    fdinfo_values(pid, "run_cnt")
        .into_iter()
        .filter_map(|(cnt, f)| Some((*f.get("prog_id")?, cnt)))
        .collect()
}

/// Snapshot of `pid`'s programs, with a cross-check of the struct offsets: run_cnt read
/// through BPF_OBJ_GET_INFO_BY_FD must lie between the run_cnt the kernel prints in
/// /proc/PID/fdinfo just before and just after (global hooks may run meanwhile).
/// Returns the snapshot and (programs that agree, programs checked).
fn checked_snapshot(pid: i32) -> (ProgSnap, (usize, usize)) {
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
fn wait_quiet(budget: &mut Duration) -> (f64, usize) {
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
}

#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    only: BTreeSet<Section>,
    rounds: usize,
    secs: f64,
    ticks: usize,
    sizes: Vec<usize>,
}

const USAGE: &str = "usage: sockacct-bench [--quick] [--only tcp|veth|udp|ticks|progs|spool|flows|memory]… [--rounds N] [--seconds S] [--ticks N]";

fn parse_args() -> anyhow::Result<Opts> {
    let mut quick = false;
    let mut only = BTreeSet::new();
    let (mut rounds, mut secs, mut ticks) = (None, None, None);
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
                        other => bail!("--only {other}: expected tcp, veth, udp, ticks, progs, spool, flows or memory\n{USAGE}"),
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
        ]
        .into();
    }
    Ok(Opts {
        quick,
        only,
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

// ---- poll ticks ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct TickResult {
    sockets: u64,
    setup_s: f64,
    map_entries: usize,
    tracked: usize,
    first_work_ms: f64,
    first_wait_ms: f64,
    work_ms: Vec<f64>,
    wait_ms: Vec<f64>,
    batch_read_ms: Vec<f64>,
    events: usize,
    setup_progs: Option<ProgDelta>,
}

/// Connections per helper process (two sockets each).
const HELPER_PAIRS: usize = 9000;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Times a bare BPF_MAP_LOOKUP_BATCH walk of the socket map (what a tick reads), to tell
/// the kernel copy apart from the poller's own work.
fn time_batch_reads(n: usize) -> Vec<f64> {
    let ids: BTreeSet<u64> = fdinfo_values(std::process::id() as i32, "map_id")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    for id in ids {
        let Ok((fd, info)) = bpf::map_by_id(id as u32) else {
            continue;
        };
        if bpf::name_of(&info.name) != agent_common::MAP_SOCKS {
            continue;
        }
        use std::os::fd::AsFd;
        let mut out: Vec<(u64, agent_common::SockCounters)> = Vec::new();
        let mut times = vec![];
        for _ in 0..n {
            out.clear();
            let t = Instant::now();
            if sockacct::bpfsys::lookup_batch(fd.as_fd(), 8192, &mut out).is_err() {
                break;
            }
            times.push(ms(t.elapsed()));
        }
        return times;
    }
    vec![]
}

/// With `stats`, bpf_stats are on while the sockets are opened and closed (not during the
/// ticks): the per-socket programs (sock_create, sock_release, tcp_state) get enough runs
/// there to give a stable average.
fn tick_size(n: usize, ticks: usize, stats: bool) -> anyhow::Result<TickResult> {
    let cg = TestCgroup::new(&format!("ticks{n}"));
    let mut loaded = loader::load(&LoadOptions {
        cgroup: Some(cg.path.clone()),
        ..Default::default()
    })?;
    let labeler = Arc::new(Labeler::new(&Config::parse("", "bench")?, 0)?);
    let mut poller = Poller::new(&mut loaded, labeler, vec![])?;

    let me = std::process::id() as i32;
    let stats_fd = if stats {
        Some(bpf::enable_stats()?)
    } else {
        None
    };
    let before = prog_snapshot(&[me]);
    let setup = Instant::now();
    // Several helper processes when one cannot hold them all (without CAP_SYS_RESOURCE the
    // hard RLIMIT_NOFILE cannot be raised; 9000 pairs fit under the common 20000).
    let pairs = (n / 2).max(1);
    let procs = pairs.div_ceil(HELPER_PAIRS);
    let mut helpers: Vec<Peer> = (0..procs)
        .map(|i| {
            let mine = pairs / procs + usize::from(i < pairs % procs);
            let active = if i == 0 { "32" } else { "0" };
            Peer::spawn(
                Some(&cg),
                None,
                "bench-socks",
                &["hold-many", &mine.to_string(), active, &(2 + i).to_string()],
            )
        })
        .collect();
    let sockets: u64 = helpers.iter_mut().map(|h| h.value("sockets")).sum();
    let setup_s = setup.elapsed().as_secs_f64();
    let setup_progs = stats_fd.map(|fd| {
        let d = prog_delta(&before, &prog_snapshot(&[me]));
        drop(fd);
        d
    });
    progress(format!(
        "ticks {n}: {sockets} sockets open in {setup_s:.1} s ({procs} helper processes)"
    ));

    let interval = Duration::from_millis(100);
    let mut events = 0;
    let mut next = Instant::now();
    let mut tick = |poller: &mut Poller| -> anyhow::Result<(f64, f64)> {
        let now = Instant::now();
        if now < next {
            thread::sleep(next - now);
        }
        next = Instant::now() + interval;
        if poller.tick()?.is_some() {
            events += 1;
        }
        Ok((
            ms(poller.stats.last_tick_work),
            ms(poller.stats.last_tick_wait),
        ))
    };
    // Tick 1 harvests everything counted while the sockets were opened and labels every
    // socket; tick 2 harvests the other slot. Steady state from tick 3.
    let (first_work_ms, first_wait_ms) = tick(&mut poller)?;
    tick(&mut poller)?;
    let (mut work_ms, mut wait_ms) = (vec![], vec![]);
    for _ in 0..ticks {
        let (w, g) = tick(&mut poller)?;
        work_ms.push(w);
        wait_ms.push(g);
    }
    let map_entries = poller.stats.map_entries;
    let tracked = poller.stats.sockets_tracked;
    let batch_read_ms = time_batch_reads(10);
    // Close every socket with the programs still attached (sock_release, tcp_state).
    let stats_fd = if stats {
        Some(bpf::enable_stats()?)
    } else {
        None
    };
    let before = prog_snapshot(&[me]);
    for h in &mut helpers {
        h.send_line("stop");
    }
    for mut h in helpers {
        h.expect_line("closing");
        h.finish();
    }
    let setup_progs = match (setup_progs, stats_fd) {
        (Some(mut d), Some(fd)) => {
            for (n, (t, c)) in prog_delta(&before, &prog_snapshot(&[me])) {
                let e = d.entry(n).or_default();
                e.0 += t;
                e.1 += c;
            }
            drop(fd);
            Some(d)
        }
        (d, _) => d,
    };
    drop(poller);
    drop(loaded);
    Ok(TickResult {
        sockets,
        setup_s,
        map_entries,
        tracked,
        first_work_ms,
        first_wait_ms,
        work_ms,
        wait_ms,
        batch_read_ms,
        events,
        setup_progs,
    })
}

// ---- spool --------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct SpoolResult {
    batch: usize,
    secs: f64,
    appends: u64,
    events: u64,
    frames: u64,
    json_bytes: u64,
    frame_bytes: u64,
    bytes_on_disk: u64,
    segments: usize,
    fsyncs: u64,
    /// Records the spool did not write at once (backlogged or dropped), and errors seen.
    not_written: u64,
    errors: u64,
}

const SPOOL_AGENT: &str = "3f9c2a7e51d84b0c9e6a1f2d7b8c4e05";
const SPOOL_BOOT: &str = "7d41e0b2-9c3a-4f58-a6e1-2b8d90c4f713";

/// Delta events as a busy host writes them: five labels, unattributed traffic, one
/// interface, every number different (xorshift), one second apart.
fn spool_events(n: usize) -> Vec<DeltaEvent> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move |lo: u64, hi: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        lo + x % (hi - lo + 1)
    };
    let labels = ["nginx", "postgres", "node", "curl", "sshd"];
    let t0 = 1_767_225_600_000u64;
    (0..n)
        .map(|i| {
            let mut total = Traffic::default();
            let mut lm = BTreeMap::new();
            for l in labels {
                let (txp, rxp) = (rnd(1, 6000), rnd(1, 6000));
                let tr = Traffic {
                    tx: txp * rnd(54, 1448),
                    rx: rxp * rnd(54, 1448),
                    tx_packets: txp,
                    rx_packets: rxp,
                };
                total.add(&tr);
                lm.insert(l.to_string(), tr);
            }
            let (utp, urp) = (rnd(0, 40), rnd(0, 60));
            let un = Traffic {
                tx: utp * rnd(54, 600),
                rx: urp * rnd(54, 600),
                tx_packets: utp,
                rx_packets: urp,
            };
            total.add(&un);
            // The interface also sees traffic of processes outside the cgroup.
            let (itp, irp) = (rnd(0, 500), rnd(0, 800));
            let mut ifc = total;
            ifc.add(&Traffic {
                tx: itp * rnd(54, 1448),
                rx: irp * rnd(54, 1448),
                tx_packets: itp,
                rx_packets: irp,
            });
            DeltaEvent {
                v: FORMAT_VERSION,
                kind: "delta".into(),
                agent: SPOOL_AGENT.into(),
                boot: SPOOL_BOOT.into(),
                seq: 0,
                t: t0 + i as u64 * 1000 + rnd(0, 3),
                d: 1000 + rnd(0, 2),
                labels: lm,
                unattributed: un,
                total,
                ifaces: [("eth0".to_string(), ifc)].into(),
            }
        })
        .collect()
}

/// Appends for `secs` to a fresh spool in a temp directory (default config), `batch`
/// events per append call.
fn spool_run(batch: usize, secs: f64) -> anyhow::Result<SpoolResult> {
    let dir = TempDir::new("benchspool");
    let cfg = SpoolConfig::new(dir.0.join("spool"));
    let identity = Identity {
        agent: SPOOL_AGENT.into(),
        boot: SPOOL_BOOT.into(),
    };
    let (mut sp, _) = Spool::open_dir(cfg, identity, SeqAllocator::ephemeral())?;
    let mut pool = spool_events(4000);
    let dur = Duration::from_secs_f64(secs);
    let (mut appends, mut events, mut not_written, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let mut i = 0;
    let start = Instant::now();
    while start.elapsed() < dur {
        if i + batch > pool.len() {
            i = 0;
        }
        let out = sp.append(&mut pool[i..i + batch], SystemTime::now());
        i += batch;
        appends += 1;
        events += batch as u64;
        not_written += (out.backlogged + out.dropped) as u64;
        errors += u64::from(out.error.is_some());
    }
    let secs = start.elapsed().as_secs_f64();
    let st = sp.stats();
    drop(sp);
    drop(dir);
    Ok(SpoolResult {
        batch,
        secs,
        appends,
        events,
        frames: st.frames_written,
        json_bytes: st.json_bytes_written,
        frame_bytes: st.bytes_written,
        bytes_on_disk: st.bytes_on_disk,
        segments: st.segments,
        fsyncs: st.fsyncs,
        not_written,
        errors,
    })
}

// ---- flow records -------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum FlowCond {
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
struct FlowRun {
    cond: FlowCond,
    values: Vec<f64>,
    events: usize,
    flow_records: usize,
    busy_before: f64,
    foreign: usize,
}

#[derive(Debug, Clone, Default)]
struct FlowsResult {
    secs: f64,
    rounds: usize,
    /// (scenario, runs in the order they ran)
    runs: Vec<(Scenario, Vec<FlowRun>)>,
    /// Stats runs of the UDP scenario: (condition, per-program deltas, throughput, flow records).
    progs: Vec<(FlowCond, ProgDelta, Vec<f64>, usize)>,
}

/// One run under `cond`; with `stats`, bpf_stats are on and the agent's program deltas are
/// returned. Returns (metrics, delta events, flow records, program deltas).
fn flows_once(
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
fn flows_section(opts: &Opts, budget: &mut Duration) -> FlowsResult {
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

fn report_spool(out: &mut String, js: &mut serde_json::Map<String, Value>, rs: &[SpoolResult]) {
    let mut push = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    push(String::new());
    push("== Spool append (in-process, temp dir, default config: fsync at most 1 s after a write, 8 MiB segments; delta events with 5 labels + 1 iface) ==".into());
    push(format!(
        "{:>12} {:>11} {:>10} {:>12} {:>12} {:>11} {:>7} {:>8} {:>9}",
        "events/call",
        "events/s",
        "calls/s",
        "JSON B/ev",
        "disk B/ev",
        "compression",
        "fsyncs",
        "segments",
        "seconds"
    ));
    let mut jv = vec![];
    for r in rs {
        let n = r.events.max(1) as f64;
        let (eps, cps) = (r.events as f64 / r.secs, r.appends as f64 / r.secs);
        let (jb, db) = (r.json_bytes as f64 / n, r.frame_bytes as f64 / n);
        let ratio = r.json_bytes as f64 / r.frame_bytes.max(1) as f64;
        push(format!(
            "{:>12} {:>11.0} {:>10.0} {:>12.1} {:>12.1} {:>10.2}x {:>7} {:>8} {:>9.2}",
            r.batch, eps, cps, jb, db, ratio, r.fsyncs, r.segments, r.secs
        ));
        jv.push(json!({"events_per_append": r.batch, "seconds": r.secs, "appends": r.appends, "events": r.events,
            "frames_written": r.frames, "events_per_s": eps, "appends_per_s": cps, "json_bytes_per_event": jb,
            "disk_bytes_per_event": db, "compression_ratio": ratio, "json_bytes": r.json_bytes, "frame_bytes": r.frame_bytes,
            "bytes_on_disk_at_end": r.bytes_on_disk, "segments": r.segments, "fsyncs": r.fsyncs,
            "records_not_written_at_once": r.not_written, "append_errors": r.errors}));
        if r.not_written > 0 || r.errors > 0 {
            push(format!(
                "note: batch {}: {} records backlogged or dropped, {} append errors",
                r.batch, r.not_written, r.errors
            ));
        }
    }
    push("JSON B/ev = serialized line (+ newline); disk B/ev = zstd frame bytes written per event (one frame per call); compression = JSON / disk".into());
    js.insert("spool".into(), Value::Array(jv));
}

fn report_flows(out: &mut String, js: &mut serde_json::Map<String, Value>, f: &FlowsResult) {
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
        for r in memory::section() {
            match r {
                Ok(r) => mem_runs.push(r),
                Err(e) => failures.push(format!("memory: {e}")),
            }
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
