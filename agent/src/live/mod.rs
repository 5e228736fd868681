//! Live views of the running agent, from its record stream: `sockacct events` (the JSON
//! lines as they are written) and `sockacct top` (rates per label and per connection).
//!
//! - [`Model`]: what the view knows, fed one record line at a time (pure logic, tested).
//! - [`tui`]: the full-screen terminal view; [`once`]: one plain table for scripts.
use std::{
    collections::{HashMap, VecDeque},
    io::{BufRead, Write},
    path::Path,
};

use crate::{
    control,
    event::{DeltaEvent, Traffic},
    flows::{ConnSample, FlowRecord},
    stream::RecordKind,
};

pub mod tui;

/// Rates are over this much of the latest stream (a few intervals).
pub const WINDOW_MS: u64 = 2_000;
/// A closed connection stays in the connections view this long.
const CLOSED_KEPT_MS: u64 = 5_000;

/// Bytes and packets of one row: totals since the view started, and the latest ones.
#[derive(Debug, Clone, Default)]
struct Series {
    total: Traffic,
    /// (end of the interval, unix ms; what moved in it)
    recent: VecDeque<(u64, Traffic)>,
}

impl Series {
    fn add(&mut self, end: u64, t: &Traffic) {
        self.total.add(t);
        self.recent.push_back((end, *t));
    }

    fn trim(&mut self, since: u64) {
        while self.recent.front().is_some_and(|(end, _)| *end <= since) {
            self.recent.pop_front();
        }
    }

    fn in_window(&self, since: u64) -> Traffic {
        let mut t = Traffic::default();
        for (_, x) in self.recent.iter().filter(|(end, _)| *end > since) {
            t.add(x);
        }
        t
    }
}

/// One row as shown.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: String,
    pub tx_rate: f64,
    pub rx_rate: f64,
    pub pkt_rate: f64,
    pub total: Traffic,
}

/// What the label rows are sorted by (descending; the name ascending).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortBy {
    #[default]
    Rate,
    TxRate,
    RxRate,
    Packets,
    Total,
    Name,
}

impl SortBy {
    pub fn next(self) -> SortBy {
        use SortBy::*;
        match self {
            Rate => TxRate,
            TxRate => RxRate,
            RxRate => Packets,
            Packets => Total,
            Total => Name,
            Name => Rate,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SortBy::Rate => "rate",
            SortBy::TxRate => "tx/s",
            SortBy::RxRate => "rx/s",
            SortBy::Packets => "pkt/s",
            SortBy::Total => "total",
            SortBy::Name => "name",
        }
    }

    fn order(self, a: &Row, b: &Row) -> std::cmp::Ordering {
        let key = |r: &Row| match self {
            SortBy::Rate => r.tx_rate + r.rx_rate,
            SortBy::TxRate => r.tx_rate,
            SortBy::RxRate => r.rx_rate,
            SortBy::Packets => r.pkt_rate,
            SortBy::Total => (r.total.tx + r.total.rx) as f64,
            SortBy::Name => 0.0,
        };
        key(b).total_cmp(&key(a)).then_with(|| a.name.cmp(&b.name))
    }
}

/// A connection (or UDP peer, or session): live samples each tick it moves, flow
/// records at open, update and close.
#[derive(Debug, Clone, PartialEq)]
pub struct Conn {
    pub proto: String,
    pub process: String,
    pub pid: Option<u32>,
    pub label: String,
    pub local: String,
    pub remote: String,
    pub direction: String,
    /// Cumulative since the connection started (as the agent counts it).
    pub total: Traffic,
    /// The TCP state or end reason once closed.
    pub closed: Option<String>,
    /// (unix ms, cumulative counters) of the latest samples; the first is the baseline.
    samples: VecDeque<(u64, Traffic)>,
    closed_at: Option<u64>,
}

impl Conn {
    /// Bytes/s each way over the latest samples (0 when it stopped moving).
    pub fn rates(&self, now: u64) -> (f64, f64) {
        match (self.samples.front(), self.samples.back()) {
            (Some((t0, a)), Some((_, b))) if self.closed.is_none() => {
                let secs = now.saturating_sub(*t0).max(100) as f64 / 1e3;
                (
                    b.tx.saturating_sub(a.tx) as f64 / secs,
                    b.rx.saturating_sub(a.rx) as f64 / secs,
                )
            }
            _ => (0.0, 0.0),
        }
    }
}

/// (proto, local, remote) as shown.
type ConnKey = (String, String, String);

/// What a socket's samples say about it, for its peers' samples that do not.
#[derive(Debug, Clone)]
struct SockInfo {
    local: String,
    direction: String,
    pid: Option<u32>,
    process: String,
    label: String,
}

/// Everything the view knows.
#[derive(Debug, Default)]
pub struct Model {
    labels: HashMap<String, Series>,
    unattributed: Series,
    kernel: Series,
    conns: HashMap<ConnKey, Conn>,
    socks: HashMap<u64, SockInfo>,
    /// Unix ms of the first record seen.
    started: Option<u64>,
    pub deltas: u64,
}

fn bracket(ip: &std::net::IpAddr, port: Option<u16>) -> String {
    match (ip, port) {
        (std::net::IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, Some(p)) => format!("{a}:{p}"),
        (a, None) => format!("{a}:*"),
    }
}

impl Model {
    /// Takes one line of the stream; other record types are ignored.
    pub fn feed(&mut self, line: &str, now: u64) -> Result<(), String> {
        if line.trim().is_empty() {
            return Ok(());
        }
        let bad = |e: serde_json::Error| format!("bad line from the agent: {e}");
        // Records name their type near the start: parse straight into the typed record
        // (a busy host sends thousands of labels and connections per second).
        let head = &line[..line.len().min(48)];
        if head.contains("\"type\":\"delta\"") {
            self.delta(&serde_json::from_str::<DeltaEvent>(line).map_err(bad)?);
        } else if head.contains("\"type\":\"conn\"") {
            self.conn(&serde_json::from_str::<ConnSample>(line).map_err(bad)?, now);
        } else if head.contains("\"type\":\"flow\"") {
            self.flow(&serde_json::from_str::<FlowRecord>(line).map_err(bad)?, now);
        } else {
            // Anything else: the end of the stream, or a record written in another order.
            let v: serde_json::Value = serde_json::from_str(line).map_err(bad)?;
            if v["ok"] == false {
                return Err(v["error"]
                    .as_str()
                    .unwrap_or("the agent ended the stream")
                    .into());
            }
            let e = |e: serde_json::Error| e.to_string();
            match v["type"].as_str() {
                Some("delta") => self.delta(&serde_json::from_value(v).map_err(e)?),
                Some("conn") => self.conn(&serde_json::from_value(v).map_err(e)?, now),
                Some("flow") => self.flow(&serde_json::from_value(v).map_err(e)?, now),
                _ => {}
            }
        }
        Ok(())
    }

    pub fn delta(&mut self, ev: &DeltaEvent) {
        let end = ev.t + ev.d;
        self.started.get_or_insert(ev.t);
        for (l, t) in &ev.labels {
            match self.labels.get_mut(l) {
                Some(s) => s.add(end, t),
                None => self.labels.entry(l.clone()).or_default().add(end, t),
            }
        }
        self.unattributed.add(end, &ev.unattributed);
        self.kernel.add(end, &ev.total);
        self.deltas += 1;
    }

    fn entry(&mut self, key: ConnKey, proto: &str, remote: &str) -> &mut Conn {
        self.conns.entry(key.clone()).or_insert_with(|| Conn {
            proto: proto.to_string(),
            process: String::new(),
            pid: None,
            label: String::new(),
            local: key.1,
            remote: remote.to_string(),
            direction: String::new(),
            total: Traffic::default(),
            closed: None,
            samples: VecDeque::new(),
            closed_at: None,
        })
    }

    pub fn flow(&mut self, r: &FlowRecord, now: u64) {
        let (local, remote) = (
            bracket(&r.local, r.local_port),
            bracket(&r.remote, r.remote_port),
        );
        let c = self.entry((r.proto.clone(), local, remote.clone()), &r.proto, &remote);
        c.process = r.process.clone().unwrap_or_default();
        c.pid = r.pid;
        c.label.clone_from(&r.label);
        c.direction = name_of(&r.direction);
        let total = r.traffic();
        if total.tx + total.rx >= c.total.tx + c.total.rx {
            c.total = total;
        }
        if r.event == crate::config::flows::FlowEvent::Close {
            c.closed = Some(
                r.tcp_state
                    .clone()
                    .or_else(|| r.end_reason.map(|e| name_of(&e)))
                    .unwrap_or_else(|| "closed".into()),
            );
            c.closed_at = Some(now);
        }
    }

    pub fn conn(&mut self, s: &ConnSample, now: u64) {
        let info = match (&s.local, &s.process) {
            (Some(local), Some(process)) => {
                let i = SockInfo {
                    local: local.to_string(),
                    direction: s.direction.as_ref().map(name_of).unwrap_or_default(),
                    pid: s.pid,
                    process: process.clone(),
                    label: s.label.clone().unwrap_or_default(),
                };
                if s.finished {
                    self.socks.remove(&s.cookie);
                } else {
                    self.socks.insert(s.cookie, i.clone());
                }
                Some(i)
            }
            _ => self.socks.get(&s.cookie).cloned(),
        };
        let remote = s.remote.to_string();
        let local = info
            .as_ref()
            .map_or_else(|| "?".to_string(), |i| i.local.clone());
        let c = self.entry((s.proto.clone(), local, remote.clone()), &s.proto, &remote);
        if let Some(i) = info {
            c.process = i.process;
            c.pid = i.pid;
            c.label = i.label;
            c.direction = i.direction;
        }
        let t = Traffic {
            tx: s.tx,
            rx: s.rx,
            tx_packets: s.tx_packets,
            rx_packets: s.rx_packets,
        };
        c.total = t;
        c.samples.push_back((s.t, t));
        if s.finished {
            c.closed.get_or_insert_with(|| "closed".into());
            c.closed_at = Some(now);
        }
    }

    /// Drops what fell out of the window, and closed connections shown long enough.
    pub fn trim(&mut self, now: u64) {
        let since = now.saturating_sub(WINDOW_MS);
        for s in self.labels.values_mut() {
            s.trim(since);
        }
        self.unattributed.trim(since);
        self.kernel.trim(since);
        self.conns.retain(|_, c| {
            c.closed_at
                .is_none_or(|t| now.saturating_sub(t) < CLOSED_KEPT_MS)
        });
        for c in self.conns.values_mut() {
            // Keep the newest sample at or before the window's start as the baseline.
            while c.samples.len() >= 2 && c.samples[1].0 <= since {
                c.samples.pop_front();
            }
        }
    }

    fn row(&self, name: &str, s: &Series, now: u64) -> Row {
        let since = now.saturating_sub(WINDOW_MS);
        // Before a whole window has passed, rates are over what the view has seen.
        let span = match self.started {
            Some(t0) => now.saturating_sub(t0.max(since)).max(100),
            None => WINDOW_MS,
        } as f64
            / 1e3;
        let w = s.in_window(since);
        Row {
            name: name.to_string(),
            tx_rate: w.tx as f64 / span,
            rx_rate: w.rx as f64 / span,
            pkt_rate: (w.tx_packets + w.rx_packets) as f64 / span,
            total: s.total,
        }
    }

    /// Label rows, sorted.
    pub fn label_rows(&self, now: u64, sort: SortBy) -> Vec<Row> {
        let mut rows: Vec<Row> = self
            .labels
            .iter()
            .map(|(l, s)| self.row(l, s, now))
            .collect();
        rows.sort_by(|a, b| sort.order(a, b));
        rows
    }

    /// The `unattributed` and kernel-total rows (labels + unattributed add up to it).
    pub fn summary_rows(&self, now: u64) -> (Row, Row) {
        (
            self.row("unattributed", &self.unattributed, now),
            self.row("total (kernel)", &self.kernel, now),
        )
    }

    /// Connections with their rates: live ones by rate first, closed ones last.
    pub fn conn_rows(&self, now: u64) -> Vec<(&Conn, (f64, f64))> {
        let mut v: Vec<(&Conn, (f64, f64))> =
            self.conns.values().map(|c| (c, c.rates(now))).collect();
        v.sort_by(|(a, ra), (b, rb)| {
            a.closed
                .is_some()
                .cmp(&b.closed.is_some())
                .then((rb.0 + rb.1).total_cmp(&(ra.0 + ra.1)))
                .then((b.total.tx + b.total.rx).cmp(&(a.total.tx + a.total.rx)))
                .then(a.remote.cmp(&b.remote))
        });
        v
    }
}

/// A serde enum's name as it is written ("outbound", "agent_stopped").
fn name_of<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// Bytes (or bytes/s) in human units: 1023 B, 1.5 KiB, 12.0 MiB.
pub fn human(v: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = v;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[0])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn unix_ms() -> u64 {
    crate::poller::unix_ms()
}

/// `sockacct events`: prints the stream's lines as they come. Without `follow`, stops
/// after the first record of the first kind asked for (delta by default).
pub fn events(socket: &Path, types: &[RecordKind], follow: bool) -> anyhow::Result<()> {
    let mut r = control::subscribe(socket, types)?;
    let first = types.first().copied().unwrap_or(RecordKind::Delta);
    let want = match first {
        RecordKind::Delta => "\"type\":\"delta\"",
        RecordKind::Flow => "\"type\":\"flow\"",
        RecordKind::Gap => "\"type\":\"gap\"",
        RecordKind::Conn => "\"type\":\"conn\"",
        RecordKind::Agent => "\"type\":\"agent\"",
    };
    let out = std::io::stdout();
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            anyhow::bail!("the agent closed the stream (it stopped?)");
        }
        if line.trim().is_empty() {
            continue;
        }
        if line.starts_with("{\"ok\":false") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            anyhow::bail!("{}", v["error"].as_str().unwrap_or(line.trim()));
        }
        let mut o = out.lock();
        if let Err(e) = o.write_all(line.as_bytes()).and_then(|_| o.flush()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(()); // `| head` is done
            }
            return Err(e.into());
        }
        if !follow && line.contains(want) {
            return Ok(());
        }
    }
}

/// `sockacct top --once`: the next `secs` of the stream as one plain table with exact
/// byte counts, labels then `unattributed` and the kernel's total (the rows above it add
/// up to it).
pub fn once(socket: &Path, secs: f64) -> anyhow::Result<()> {
    let mut r = control::subscribe(socket, &[RecordKind::Delta])?;
    let mut m = Model::default();
    let end = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
    r.get_ref()
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))?;
    let mut line = String::new();
    while std::time::Instant::now() < end {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => anyhow::bail!("the agent closed the stream (it stopped?)"),
            Ok(_) => m
                .feed(&line, unix_ms())
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    print!("{}", once_table(&m, secs));
    Ok(())
}

/// The `--once` table: rates per second over the period, totals in bytes.
pub fn once_table(m: &Model, secs: f64) -> String {
    // Everything seen, as rates over the whole period.
    let fixed = |name: &str, s: &Series| Row {
        name: name.into(),
        tx_rate: s.total.tx as f64 / secs,
        rx_rate: s.total.rx as f64 / secs,
        pkt_rate: (s.total.tx_packets + s.total.rx_packets) as f64 / secs,
        total: s.total,
    };
    let mut rows: Vec<Row> = m.labels.iter().map(|(l, s)| fixed(l, s)).collect();
    rows.sort_by(|a, b| SortBy::Total.order(a, b));
    for r in &mut rows {
        r.name = printable(&r.name);
    }
    let width = rows
        .iter()
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(0)
        .max("total (kernel)".len());
    let mut out = format!(
        "{:<width$} {:>12} {:>12} {:>10} {:>14} {:>14} {:>10} {:>10}\n",
        "LABEL", "TX_B/S", "RX_B/S", "PKT/S", "TX_BYTES", "RX_BYTES", "TX_PKTS", "RX_PKTS"
    );
    let line = |r: &Row| {
        format!(
            "{:<width$} {:>12.0} {:>12.0} {:>10.0} {:>14} {:>14} {:>10} {:>10}\n",
            r.name,
            r.tx_rate,
            r.rx_rate,
            r.pkt_rate,
            r.total.tx,
            r.total.rx,
            r.total.tx_packets,
            r.total.rx_packets
        )
    };
    for r in &rows {
        out.push_str(&line(r));
    }
    out.push_str(&line(&fixed("unattributed", &m.unattributed)));
    out.push_str(&line(&fixed("total (kernel)", &m.kernel)));
    out
}

/// `s` safe to print on a terminal: control characters (C0, DEL, C1) and the Unicode
/// controls that reorder text are shown as `\u{..}` escapes. Names come from any local
/// user (a process names itself), so none reaches a terminal as it is.
pub fn printable(s: &str) -> String {
    let unsafe_char =
        |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !s.chars().any(unsafe_char) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    #[test]
    fn printable_escapes_terminal_controls_only() {
        assert_eq!(super::printable("nginx é"), "nginx é");
        assert_eq!(
            super::printable("a\u{1b}]0;pwn\u{7}b\u{9b}c\u{202e}"),
            "a\\u{1b}]0;pwn\\u{7}b\\u{9b}c\\u{202e}"
        );
    }

    use super::*;

    fn t(tx: u64, rx: u64) -> Traffic {
        Traffic {
            tx,
            rx,
            tx_packets: 1,
            rx_packets: 1,
        }
    }

    fn ev(t0: u64, labels: &[(&str, Traffic)], un: Traffic) -> DeltaEvent {
        let mut total = un;
        let mut ls = BTreeMap::new();
        for (l, x) in labels {
            ls.insert(l.to_string(), *x);
            total.add(x);
        }
        DeltaEvent {
            v: 1,
            kind: "delta".into(),
            agent: "a".into(),
            boot: "b".into(),
            seq: 1,
            t: t0,
            d: 100,
            labels: ls,
            unattributed: un,
            total,
            ifaces: BTreeMap::new(),
        }
    }

    #[test]
    fn rates_over_the_window_and_totals_since_start() {
        let mut m = Model::default();
        // 20 intervals of 100 ms: 1000 B out per interval for "web", 10 B for "dns".
        for i in 0..20 {
            let e = ev(
                10_000 + i * 100,
                &[("web", t(1000, 0)), ("dns", t(10, 10))],
                t(1, 0),
            );
            m.feed(&serde_json::to_string(&e).unwrap(), 0).unwrap();
        }
        let now = 12_000;
        m.trim(now);
        let rows = m.label_rows(now, SortBy::Rate);
        assert_eq!(rows[0].name, "web");
        assert_eq!(rows[0].tx_rate, 10_000.0);
        assert_eq!(rows[0].total.tx, 20_000);
        assert_eq!(rows[1].rx_rate, 100.0);
        let by_name = m.label_rows(now, SortBy::Name);
        assert_eq!(by_name[0].name, "dns");
        // The rows add up to the kernel total.
        let (un, total) = m.summary_rows(now);
        let sum: u64 = rows.iter().map(|r| r.total.tx).sum::<u64>() + un.total.tx;
        assert_eq!(sum, total.total.tx);
        // Nothing moves for a window: rates fall to zero, totals stay.
        m.trim(now + WINDOW_MS);
        let rows = m.label_rows(now + WINDOW_MS, SortBy::Rate);
        let web = rows.iter().find(|r| r.name == "web").unwrap();
        assert_eq!((web.tx_rate, web.total.tx), (0.0, 20_000));
    }

    #[test]
    fn the_once_table_adds_up() {
        let mut m = Model::default();
        m.delta(&ev(0, &[("a", t(5, 7)), ("b", t(11, 13))], t(2, 3)));
        let s = once_table(&m, 1.0);
        let rows: Vec<Vec<&str>> = s
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect())
            .collect();
        let tx = |r: &Vec<&str>| r[r.len() - 4].parse::<u64>().unwrap();
        let total = rows.last().unwrap();
        assert_eq!(total[0], "total");
        assert_eq!(
            rows[..rows.len() - 1].iter().map(tx).sum::<u64>(),
            tx(total)
        );
        assert_eq!(tx(total), 18);
    }

    #[test]
    fn the_end_of_the_stream_is_an_error_with_its_reason() {
        let mut m = Model::default();
        let e = m
            .feed(r#"{"ok":false,"error":"cut off: too slow"}"#, 0)
            .unwrap_err();
        assert!(e.contains("too slow"));
    }

    #[test]
    fn connection_rates_from_live_samples() {
        let mut m = Model::default();
        let line = |t: u64, tx: u64, with_owner: bool, finished: bool| {
            let mut v = serde_json::json!({"type": "conn", "t": t, "cookie": 7, "proto": "udp",
                "remote": "127.0.0.1:9000", "tx": tx, "rx": 0, "tx_packets": tx / 60,
                "rx_packets": 0, "finished": finished});
            if with_owner {
                v["local"] = "127.0.0.1:5000".into();
                v["process"] = "gen".into();
                v["pid"] = 42.into();
                v["label"] = "gen".into();
                v["direction"] = "outbound".into();
            }
            v.to_string()
        };
        // 600 B per 100 ms for 3 s; the owner only in the first sample (a peer's later
        // samples may come without their socket).
        for i in 0..30u64 {
            m.feed(&line(10_000 + i * 100, i * 600, i == 0, false), 0)
                .unwrap();
        }
        let now = 12_900;
        m.trim(now);
        let rows = m.conn_rows(now);
        assert_eq!(rows.len(), 1);
        let (c, (tx, _)) = &rows[0];
        assert_eq!(
            (c.process.as_str(), c.local.as_str()),
            ("gen", "127.0.0.1:5000")
        );
        assert_eq!(c.total.tx, 29 * 600);
        assert!((tx - 6000.0).abs() < 1.0, "{tx}");
        // It stops moving: the rate falls to zero; it finishes: shown as closed.
        m.trim(now + 5_000);
        assert_eq!(m.conn_rows(now + 5_000)[0].1, (0.0, 0.0));
        m.feed(&line(18_000, 29 * 600, false, true), 18_000)
            .unwrap();
        assert_eq!(m.conn_rows(18_000)[0].0.closed.as_deref(), Some("closed"));
        m.trim(18_000 + CLOSED_KEPT_MS);
        assert!(m.conn_rows(18_000 + CLOSED_KEPT_MS).is_empty());
    }

    #[test]
    fn human_units() {
        assert_eq!(human(1023.0), "1023 B");
        assert_eq!(human(1536.0), "1.5 KiB");
        assert_eq!(human(12.0 * 1024.0 * 1024.0), "12.0 MiB");
    }
}
