//! The Prometheus endpoint: what it shows and how it is served.
//!
//! - [`LabelTotals`]: byte and packet counters since start, summed from the delta events
//!   as they are written (so they equal the events' sums), with bounded cardinality.
//! - [`exposition`]: a [`Scrape`] (a snapshot: status, totals, the process) encoded as
//!   OpenMetrics or the classic text format.
//! - [`serve`]: `GET /metrics` over HTTP/1, off the poll loop: the loop only adds to the
//!   totals; each scrape takes a snapshot under short locks and encodes it on its own task.
//!   [`conns`] bounds what any client can hold (caps per peer and in total, timeouts),
//!   [`peer`] tells local users apart, [`auth`] checks the optional token and serves TLS.
use std::{collections::BTreeMap, collections::HashMap, sync::Arc};

use crate::{event::DeltaEvent, event::Traffic, status::Status};

pub mod auth;
pub mod conns;
pub mod exposition;
pub mod peer;
pub mod serve;

pub use serve::{MetricsError, MetricsServer, Source};

/// The label under which the labels beyond `max_label_series` are summed.
pub const OTHER_LABEL: &str = "_other";

/// Counters since start, from the written delta events.
#[derive(Debug, Clone, Default)]
pub struct LabelTotals {
    max_series: usize,
    /// At most `max_series` entries; `Arc<str>` keys make a snapshot cheap to clone.
    labels: HashMap<Arc<str>, Traffic>,
    other: Traffic,
    /// Label entries of delta events summed under `_other` (one per label per event).
    folded: u64,
    unattributed: Traffic,
    /// The kernel's total (sum of the events' `total`).
    kernel: Traffic,
    ifaces: BTreeMap<String, Traffic>,
    events: u64,
}

impl LabelTotals {
    pub fn new(max_series: usize) -> LabelTotals {
        LabelTotals {
            max_series,
            ..LabelTotals::default()
        }
    }

    /// Adds one written event.
    pub fn add(&mut self, ev: &DeltaEvent) {
        for (label, t) in &ev.labels {
            if let Some(sum) = self.labels.get_mut(label.as_str()) {
                sum.add(t);
            } else if self.labels.len() < self.max_series && label != OTHER_LABEL {
                self.labels.insert(Arc::from(label.as_str()), *t);
            } else {
                self.other.add(t);
                self.folded += 1;
            }
        }
        for (iface, t) in &ev.ifaces {
            match self.ifaces.get_mut(iface) {
                Some(sum) => sum.add(t),
                None => {
                    self.ifaces.insert(iface.clone(), *t);
                }
            }
        }
        self.unattributed.add(&ev.unattributed);
        self.kernel.add(&ev.total);
        self.events += 1;
    }

    /// Per-label series, `_other` last when anything was folded into it.
    pub fn labels(&self) -> impl Iterator<Item = (&str, &Traffic)> {
        self.labels
            .iter()
            .map(|(l, t)| (&**l, t))
            .chain((self.folded > 0).then_some((OTHER_LABEL, &self.other)))
    }

    pub fn folded(&self) -> u64 {
        self.folded
    }
    pub fn series(&self) -> usize {
        self.labels.len()
    }
    pub fn max_series(&self) -> usize {
        self.max_series
    }
    pub fn unattributed(&self) -> &Traffic {
        &self.unattributed
    }
    pub fn kernel(&self) -> &Traffic {
        &self.kernel
    }
    pub fn ifaces(&self) -> &BTreeMap<String, Traffic> {
        &self.ifaces
    }
    pub fn events(&self) -> u64 {
        self.events
    }
}

/// The agent process's own use of the machine.
#[derive(Debug, Clone, Default)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub threads: u64,
    pub start_time_seconds: f64,
}

impl ProcessStats {
    /// Reads /proc/self; what cannot be read stays 0.
    pub fn read() -> ProcessStats {
        let mut p = ProcessStats::default();
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            p.cpu_seconds = tv(ru.ru_utime) + tv(ru.ru_stime);
        }
        if let Ok(s) = std::fs::read_to_string("/proc/self/status") {
            for line in s.lines() {
                let kb = |rest: &str| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .unwrap_or(0)
                        * 1024
                };
                if let Some(r) = line.strip_prefix("VmRSS:") {
                    p.resident_bytes = kb(r);
                } else if let Some(r) = line.strip_prefix("VmSize:") {
                    p.virtual_bytes = kb(r);
                } else if let Some(r) = line.strip_prefix("Threads:") {
                    p.threads = r.trim().parse().unwrap_or(0);
                }
            }
        }
        p.open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            p.max_fds = lim.rlim_cur;
        }
        p.start_time_seconds = start_time().unwrap_or(0.0);
        p
    }
}

/// The process's start as Unix time: boot time (btime) plus the start tick in
/// /proc/self/stat.
fn start_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let ticks: f64 = rest.split(' ').nth(19)?.parse().ok()?;
    let btime: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(btime + ticks / hz.max(1) as f64)
}

/// Everything one scrape shows, taken at once.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub status: Status,
    pub totals: LabelTotals,
    pub process: ProcessStats,
    pub version: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(labels: &[(&str, u64)], unattributed: u64) -> DeltaEvent {
        let t = |b| Traffic {
            tx: b,
            rx: 2 * b,
            tx_packets: 1,
            rx_packets: 1,
        };
        let mut total = t(unattributed);
        let mut ls = BTreeMap::new();
        for (l, b) in labels {
            ls.insert(l.to_string(), t(*b));
            total.add(&t(*b));
        }
        DeltaEvent {
            v: 1,
            kind: "delta".into(),
            agent: "a".into(),
            boot: "b".into(),
            seq: 0,
            t: 0,
            d: 100,
            labels: ls,
            unattributed: t(unattributed),
            total,
            ifaces: [("lo".to_string(), total)].into_iter().collect(),
        }
    }

    #[test]
    fn cap_folds_the_rest_into_other_and_conserves() {
        let mut t = LabelTotals::new(2);
        t.add(&ev(&[("a", 10), ("b", 20), ("c", 30)], 5));
        t.add(&ev(&[("d", 40), ("a", 1)], 0));
        let got: BTreeMap<&str, u64> = t.labels().map(|(l, t)| (l, t.tx)).collect();
        assert_eq!(got, [("a", 11), ("b", 20), ("_other", 70)].into());
        assert_eq!(t.folded(), 2);
        let sum: u64 = t.labels().map(|(_, t)| t.tx).sum();
        assert_eq!(sum, t.kernel().tx - t.unattributed().tx);
        let rx: u64 = t.labels().map(|(_, t)| t.rx).sum();
        assert_eq!(rx, t.kernel().rx - t.unattributed().rx);
        assert_eq!(t.ifaces()["lo"], *t.kernel());
        assert_eq!(t.events(), 2);
    }

    #[test]
    fn a_label_named_other_is_summed_with_the_overflow() {
        let mut t = LabelTotals::new(10);
        t.add(&ev(&[("_other", 7), ("x", 1)], 0));
        let got: BTreeMap<&str, u64> = t.labels().map(|(l, t)| (l, t.tx)).collect();
        assert_eq!(got, [("x", 1), ("_other", 7)].into());
    }

    #[test]
    fn process_stats_read_something() {
        let p = ProcessStats::read();
        assert!(p.resident_bytes > 0 && p.open_fds > 0 && p.threads >= 1);
        assert!(p.start_time_seconds > 1.0e9, "{p:?}");
    }
}
