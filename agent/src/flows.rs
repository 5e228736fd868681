//! Per-connection flow records (`type: "flow"`, format in docs/flows.md).
//!
//! Pure logic, no I/O: every poll interval the daemon hands [`FlowTable::observe`] the
//! sockets that moved, are new or finished (and the per-peer counters of unconnected
//! sockets); the table answers with the flow records to append to the spool, next to the
//! delta events.
//!
//! - A connected socket is one flow; an unconnected socket is one flow per peer.
//! - `open` once a flow has lived `open_after_ms` (at once when it cannot be consolidated),
//!   `update` every `update_every_ms` while it moves, `close` with final counts when the
//!   socket is gone (or, for a peer of an unconnected socket, after `udp_idle_ms` without
//!   movement).
//! - Short flows (closed before their `open`) with the same source ip, destination ip,
//!   destination port, protocol, label and direction are merged into one session `close`
//!   record while each starts at most `consolidate_gap_ms` after the previous one ended.
//! - Counters are cumulative in the input, so a flow picked up late (after an overflow, or
//!   a restart of the agent) still reports exact counts; only its `open` may come late.
//! - Bounded: at most `max_flows` live flows plus pending sessions, at most `max_flows`
//!   remembered baselines of idle peers, at most `max_records_per_tick` records returned
//!   per call (the rest wait, none is dropped). Arithmetic saturates; nothing panics.
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use crate::config::flows::{
    DEFAULT_CONSOLIDATE_GAP_MS, DEFAULT_MAX_FLOWS, DEFAULT_MAX_RECORDS_PER_TICK,
    DEFAULT_OPEN_AFTER_MS, DEFAULT_UDP_IDLE_MS, DEFAULT_UPDATE_EVERY_MS, FlowEvent, FlowsSection,
};
use crate::config::{PortRange, Protocol, parse_cidr};
use crate::event::{FORMAT_VERSION, Identity, Traffic};

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

// ---------------------------------------------------------------------------------------
// Input
// ---------------------------------------------------------------------------------------

/// Who opened the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// This host connected.
    Outbound,
    /// This host accepted.
    Inbound,
    Unknown,
}

/// The owner of a socket as the labeler knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerView {
    pub pid: u32,
    pub process: String,
    pub uid: u32,
    /// cgroup path below the cgroup2 root, when known.
    pub cgroup: Option<String>,
    /// Network namespace cookie.
    pub netns: u64,
}

/// A socket that moved this interval, is new, or finished.
///
/// Contract: sockets not given did not move (their state is kept); a finished socket is
/// given once, with its final counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketView {
    pub cookie: u64,
    /// IPPROTO number: 6 tcp, 17 udp, anything else as is.
    pub proto: u8,
    pub local: SocketAddr,
    /// `None` for an unconnected socket (e.g. UDP talking to many peers): its flows come
    /// from [`PeerView`]s instead.
    pub remote: Option<SocketAddr>,
    pub direction: Direction,
    pub owner: OwnerView,
    pub label: String,
    /// Cumulative since the socket started.
    pub counters: Traffic,
    /// Unix ms; 0 = unknown (the time of the first observation is used).
    pub first_seen_ms: u64,
    /// The socket is gone; `counters` are final.
    pub finished: bool,
    /// Kernel TCP state number (1 ESTABLISHED … 12 NEW_SYN_RECV), last known.
    pub tcp_state: Option<u8>,
}

/// Counters of one peer of an unconnected socket.
///
/// Contract: the socket itself is given as a [`SocketView`] (with `remote: None`) in the
/// same call whenever one of its peers is new, and when it finishes; peers that moved in
/// the socket's last interval come in that same call. PeerViews of a connected socket are
/// ignored (its flow is counted from the socket's own counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerView {
    pub cookie: u64,
    pub remote: SocketAddr,
    /// Cumulative for this (socket, peer). If they go down, the kernel's entry was
    /// recreated and they are taken as counting from zero again.
    pub counters: Traffic,
}

// ---------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------

/// Why a `close` was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The socket is gone.
    Closed,
    /// A peer of an unconnected socket sent and received nothing for `udp_idle_ms`.
    Idle,
    /// The socket connected to another peer, or disconnected (UDP `connect()`).
    Reconnected,
    /// The agent stopped while the flow was alive.
    AgentStopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

/// One flow record; serialized with its fields in this order, absent options omitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    pub v: u32,
    /// Always "flow".
    #[serde(rename = "type")]
    pub kind: String,
    pub agent: String,
    pub boot: String,
    pub seq: u64,
    pub event: FlowEvent,
    /// "tcp", "udp" or the protocol number as a string.
    pub proto: String,
    pub family: Family,
    pub local: IpAddr,
    /// Omitted on a session whose connections had different source ports (outbound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_port: Option<u16>,
    pub remote: IpAddr,
    /// Omitted on a session whose connections had different source ports (inbound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_port: Option<u16>,
    pub direction: Direction,
    /// Owner fields are omitted on a session whose connections disagree on them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<u64>,
    pub label: String,
    /// Unix ms, first seen.
    pub start: u64,
    /// Unix ms: the end for `close`, the time of the record for `open`/`update`.
    pub end: u64,
    pub tx: u64,
    pub rx: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
    /// Last TCP state name (`close` of TCP flows only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_state: Option<String>,
    /// `close` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<EndReason>,
    /// Number of connections merged into this session; only present when ≥ 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
}

impl FlowRecord {
    pub fn traffic(&self) -> Traffic {
        Traffic {
            tx: self.tx,
            rx: self.rx,
            tx_packets: self.tx_packets,
            rx_packets: self.rx_packets,
        }
    }
}

impl crate::spool::SpoolRecord for FlowRecord {
    fn set_seq(&mut self, seq: u64) {
        self.seq = seq;
    }
    fn to_json_line(&self) -> Vec<u8> {
        // Plain fields only: serialization cannot fail; an empty line would be refused by
        // the spool (counted) rather than panicking here.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// "tcp", "udp", else the number.
pub fn proto_name(proto: u8) -> String {
    match proto {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        n => n.to_string(),
    }
}

/// Kernel TCP state names (include/net/tcp_states.h); unknown numbers as the number.
pub fn tcp_state_name(state: u8) -> String {
    let name = match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        13 => "BOUND_INACTIVE",
        n => return n.to_string(),
    };
    name.into()
}

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

/// Which record types are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventSet {
    pub open: bool,
    pub update: bool,
    pub close: bool,
}

impl EventSet {
    pub const ALL: EventSet = EventSet {
        open: true,
        update: true,
        close: true,
    };

    pub fn contains(&self, e: FlowEvent) -> bool {
        match e {
            FlowEvent::Open => self.open,
            FlowEvent::Update => self.update,
            FlowEvent::Close => self.close,
        }
    }
}

/// The validated flow configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowConfig {
    /// Read by the daemon; the table itself does not look at it.
    pub enabled: bool,
    pub open_after_ms: u64,
    /// 0 = no update records.
    pub update_every_ms: u64,
    pub udp_idle_ms: u64,
    /// 0 = no consolidation.
    pub consolidate_gap_ms: u64,
    /// Labels whose flows are never consolidated.
    pub raw_labels: BTreeSet<String>,
    pub events: EventSet,
    /// Empty = all.
    pub protocols: Vec<Protocol>,
    /// Exact label names; empty = all.
    pub labels: BTreeSet<String>,
    /// Local or remote port in any range; empty = all.
    pub ports: Vec<PortRange>,
    /// Remote address in any network; empty = all.
    pub cidrs: Vec<IpNet>,
    pub max_flows: usize,
    pub max_records_per_tick: usize,
}

impl Default for FlowConfig {
    fn default() -> Self {
        FlowConfig {
            enabled: true,
            open_after_ms: DEFAULT_OPEN_AFTER_MS,
            update_every_ms: DEFAULT_UPDATE_EVERY_MS,
            udp_idle_ms: DEFAULT_UDP_IDLE_MS,
            consolidate_gap_ms: DEFAULT_CONSOLIDATE_GAP_MS,
            raw_labels: BTreeSet::new(),
            events: EventSet::ALL,
            protocols: Vec::new(),
            labels: BTreeSet::new(),
            ports: Vec::new(),
            cidrs: Vec::new(),
            max_flows: DEFAULT_MAX_FLOWS,
            max_records_per_tick: DEFAULT_MAX_RECORDS_PER_TICK,
        }
    }
}

impl FlowConfig {
    /// Compiles a section (checked here too: errors as [`FlowsSection::check`] gives them).
    pub fn from_section(s: &FlowsSection) -> Result<FlowConfig, String> {
        s.check()?;
        let mut events = EventSet {
            open: false,
            update: false,
            close: false,
        };
        for e in &s.events {
            match e {
                FlowEvent::Open => events.open = true,
                FlowEvent::Update => events.update = true,
                FlowEvent::Close => events.close = true,
            }
        }
        let raw_labels: BTreeSet<String> = s.raw_labels.iter().cloned().collect();
        let labels: BTreeSet<String> = s.labels.iter().cloned().collect();
        let cidrs = s
            .cidrs
            .iter()
            .map(|c| parse_cidr(c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("flows.cidrs: {e}"))?;
        Ok(FlowConfig {
            enabled: s.enabled,
            open_after_ms: s.open_after_ms,
            update_every_ms: s.update_every_ms,
            udp_idle_ms: s.udp_idle_ms,
            consolidate_gap_ms: s.consolidate_gap_ms,
            raw_labels,
            events,
            protocols: s.protocols.clone(),
            labels,
            ports: s.ports.clone(),
            cidrs,
            max_flows: s.max_flows,
            max_records_per_tick: s.max_records_per_tick,
        })
    }

    /// Does a flow with this label take part in consolidation?
    pub fn consolidates(&self, label: &str) -> bool {
        self.consolidate_gap_ms > 0 && self.events.close && !self.raw_labels.contains(label)
    }

    /// How long after its start a flow with this label gets its `open`.
    pub fn open_delay_ms(&self, label: &str) -> u64 {
        if self.consolidates(label) {
            self.open_after_ms
        } else {
            0
        }
    }

    fn updates(&self) -> bool {
        self.update_every_ms > 0 && self.events.update
    }

    /// The protocol/label/port/cidr filters (the `events` filter is applied per record).
    pub fn passes(&self, proto: u8, label: &str, local: SocketAddr, remote: SocketAddr) -> bool {
        let remote = canon(remote);
        (self.protocols.is_empty() || self.protocols.iter().any(|p| p.matches(proto)))
            && (self.labels.is_empty() || self.labels.contains(label))
            && (self.ports.is_empty()
                || self
                    .ports
                    .iter()
                    .any(|r| r.contains(local.port()) || r.contains(remote.port())))
            && (self.cidrs.is_empty() || self.cidrs.iter().any(|n| n.contains(&remote.ip())))
    }
}

// ---------------------------------------------------------------------------------------
// Stats
// ---------------------------------------------------------------------------------------

/// Counters for `status` and the final log line. Gauges first, then totals since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FlowStats {
    /// Live flows (connected sockets + live peers of unconnected sockets).
    pub tracked: u64,
    /// Sessions waiting for more connections to join.
    pub pending_sessions: u64,
    /// Idle-closed peers whose counter baseline is remembered.
    pub dormant_peers: u64,
    /// Records waiting for the next call (over `max_records_per_tick`).
    pub queued: u64,
    /// Records returned, by event.
    pub opens: u64,
    pub updates: u64,
    pub closes: u64,
    /// Session records returned with `connections` ≥ 2, and the connections in them.
    pub sessions: u64,
    pub merged_connections: u64,
    /// Observations (a socket or a peer, per call) left out by the filters.
    pub filtered: u64,
    /// Observations of new flows not tracked because the table was full, plus short
    /// flows written unmerged because no session could be started. A flow that finishes
    /// while untracked still gets its `close`.
    pub overflow: u64,
    /// Baselines of idle peers forgotten to stay within `max_flows`: if such a peer talks
    /// again, its next flow counts from the socket's start for that peer (over-reports).
    pub evicted_peer_bases: u64,
    /// PeerViews for an unconnected socket that was neither tracked nor given this call.
    pub orphan_peers: u64,
}

#[derive(Debug, Default)]
struct Counters {
    opens: u64,
    updates: u64,
    closes: u64,
    sessions: u64,
    merged_connections: u64,
    filtered: u64,
    overflow: u64,
    evicted_peer_bases: u64,
    orphan_peers: u64,
}

// ---------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------

fn canon(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn sub(a: Traffic, b: Traffic) -> Traffic {
    Traffic {
        tx: a.tx.saturating_sub(b.tx),
        rx: a.rx.saturating_sub(b.rx),
        tx_packets: a.tx_packets.saturating_sub(b.tx_packets),
        rx_packets: a.rx_packets.saturating_sub(b.rx_packets),
    }
}

fn add(a: &mut Traffic, b: Traffic) {
    a.tx = a.tx.saturating_add(b.tx);
    a.rx = a.rx.saturating_add(b.rx);
    a.tx_packets = a.tx_packets.saturating_add(b.tx_packets);
    a.rx_packets = a.rx_packets.saturating_add(b.rx_packets);
}

fn at_least(a: Traffic, b: Traffic) -> bool {
    a.tx >= b.tx && a.rx >= b.rx && a.tx_packets >= b.tx_packets && a.rx_packets >= b.rx_packets
}

/// What is the same for every flow of a socket.
#[derive(Debug, Clone)]
struct Meta {
    proto: u8,
    local: SocketAddr,
    direction: Direction,
    owner: OwnerView,
    label: String,
}

impl Meta {
    fn from_view(s: &SocketView) -> Meta {
        Meta {
            proto: s.proto,
            local: canon(s.local),
            direction: s.direction,
            owner: s.owner.clone(),
            label: s.label.clone(),
        }
    }

    /// Owner and label may be refined later (accepted sockets, the `label` command).
    fn refresh(&mut self, s: &SocketView) {
        if self.owner != s.owner {
            self.owner = s.owner.clone();
        }
        if self.label != s.label {
            self.label = s.label.clone();
        }
    }
}

/// One flow's moving parts.
#[derive(Debug, Clone)]
struct Track {
    serial: u64,
    remote: SocketAddr,
    start_ms: u64,
    /// Subtracted from the cumulative counters (reconnects, reused peers).
    base: Traffic,
    /// Added: what the flow had before its counters restarted from zero.
    carry: Traffic,
    /// Last cumulative counters seen.
    cum: Traffic,
    /// Flow counts in the last open/update record.
    reported: Traffic,
    last_move_ms: u64,
    /// The `open` point passed (record written, or not wanted).
    opened: bool,
    next_update_ms: u64,
    wake_ms: Option<u64>,
    tcp_state: Option<u8>,
}

impl Track {
    fn new(
        serial: u64,
        remote: SocketAddr,
        start_ms: u64,
        base: Traffic,
        cum: Traffic,
        now: u64,
    ) -> Track {
        Track {
            serial,
            remote,
            start_ms,
            base,
            carry: Traffic::default(),
            cum,
            reported: Traffic::default(),
            last_move_ms: now,
            opened: false,
            next_update_ms: 0,
            wake_ms: None,
            tcp_state: None,
        }
    }

    fn counts(&self) -> Traffic {
        let mut c = sub(self.cum, self.base);
        add(&mut c, self.carry);
        c
    }

    fn note(&mut self, cum: Traffic, now: u64) {
        if !at_least(cum, self.cum) {
            // The counters restarted (the kernel's entry was recreated): keep what the
            // flow had and count on from zero.
            self.carry = self.counts();
            self.base = Traffic::default();
        }
        if cum != self.cum {
            self.cum = cum;
            self.last_move_ms = now;
        }
    }
}

#[derive(Debug)]
struct Conn {
    meta: Meta,
    t: Track,
}

#[derive(Debug)]
enum PeerState {
    Live(Track),
    /// Idle-closed: the cumulative counters at the close, the baseline of the next flow.
    Dormant {
        last: Traffic,
        serial: u64,
    },
}

#[derive(Debug)]
struct Unconn {
    meta: Meta,
    /// The socket's own cumulative counters (baseline if it connects later).
    sock_cum: Traffic,
    peers: HashMap<SocketAddr, PeerState>,
}

/// (wake ms, serial, cookie, peer)
type Timer = (u64, u64, u64, Option<SocketAddr>);

#[derive(Debug, Default)]
struct Flows {
    conns: HashMap<u64, Conn>,
    unconns: HashMap<u64, Unconn>,
    live_peers: usize,
    dormant: usize,
    /// Idle-closed peers, oldest first: (cookie, peer, serial). May hold stale entries.
    dormant_queue: VecDeque<(u64, SocketAddr, u64)>,
    /// One live entry per flow with a wake time; stale ones are skipped.
    timers: BinaryHeap<Reverse<Timer>>,
}

impl Flows {
    fn live(&self) -> usize {
        self.conns.len() + self.live_peers
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SessionKey {
    proto: u8,
    label: String,
    direction: Direction,
    src: IpAddr,
    dst: IpAddr,
    dst_port: u16,
}

impl SessionKey {
    /// Source is the local end unless the flow was accepted.
    fn new(meta: &Meta, remote: SocketAddr) -> SessionKey {
        let (src, dst, dst_port) = match meta.direction {
            Direction::Inbound => (remote.ip(), meta.local.ip(), meta.local.port()),
            Direction::Outbound | Direction::Unknown => {
                (meta.local.ip(), remote.ip(), remote.port())
            }
        };
        SessionKey {
            proto: meta.proto,
            label: meta.label.clone(),
            direction: meta.direction,
            src,
            dst,
            dst_port,
        }
    }
}

#[derive(Debug)]
struct Session {
    key: SessionKey,
    rec: FlowRecord,
    connections: u64,
    last_join_ms: u64,
}

fn keep_if_equal<T: PartialEq>(a: &mut Option<T>, b: Option<T>) {
    if *a != b {
        *a = None;
    }
}

impl Session {
    fn merge(&mut self, r: FlowRecord, now: u64) {
        let s = &mut self.rec;
        s.start = s.start.min(r.start);
        s.end = s.end.max(r.end);
        s.tx = s.tx.saturating_add(r.tx);
        s.rx = s.rx.saturating_add(r.rx);
        s.tx_packets = s.tx_packets.saturating_add(r.tx_packets);
        s.rx_packets = s.rx_packets.saturating_add(r.rx_packets);
        match s.direction {
            Direction::Inbound => keep_if_equal(&mut s.remote_port, r.remote_port),
            Direction::Outbound | Direction::Unknown => {
                keep_if_equal(&mut s.local_port, r.local_port)
            }
        }
        keep_if_equal(&mut s.pid, r.pid);
        keep_if_equal(&mut s.process, r.process);
        keep_if_equal(&mut s.uid, r.uid);
        keep_if_equal(&mut s.cgroup, r.cgroup);
        keep_if_equal(&mut s.netns, r.netns);
        keep_if_equal(&mut s.tcp_state, r.tcp_state);
        keep_if_equal(&mut s.end_reason, r.end_reason);
        self.connections += 1;
        self.last_join_ms = now;
    }
}

fn build(meta: &Meta, t: &Track, event: FlowEvent, end: u64) -> FlowRecord {
    let c = t.counts();
    let remote = t.remote;
    FlowRecord {
        v: FORMAT_VERSION,
        kind: "flow".into(),
        agent: String::new(),
        boot: String::new(),
        seq: 0,
        event,
        proto: proto_name(meta.proto),
        family: if remote.is_ipv4() {
            Family::Ipv4
        } else {
            Family::Ipv6
        },
        local: meta.local.ip(),
        local_port: Some(meta.local.port()),
        remote: remote.ip(),
        remote_port: Some(remote.port()),
        direction: meta.direction,
        pid: Some(meta.owner.pid),
        process: Some(meta.owner.process.clone()),
        uid: Some(meta.owner.uid),
        cgroup: meta.owner.cgroup.clone(),
        netns: Some(meta.owner.netns),
        label: meta.label.clone(),
        start: t.start_ms,
        end: end.max(t.start_ms),
        tx: c.tx,
        rx: c.rx,
        tx_packets: c.tx_packets,
        rx_packets: c.rx_packets,
        tcp_state: None,
        end_reason: None,
        connections: None,
    }
}

enum Wake {
    At(Option<u64>),
    Idle,
}

/// Output side: filters, records waiting to be returned, pending sessions.
#[derive(Debug)]
struct Out {
    cfg: FlowConfig,
    outbox: VecDeque<FlowRecord>,
    sessions: HashMap<u64, Session>,
    session_index: HashMap<SessionKey, u64>,
    /// (deadline, session id); re-pushed lazily when a session was joined since.
    session_timers: BinaryHeap<Reverse<(u64, u64)>>,
    next_session: u64,
    c: Counters,
}

impl Out {
    fn room(&self, live: usize) -> bool {
        live.saturating_add(self.sessions.len()) < self.cfg.max_flows
    }

    /// A new flow: filtered out, closed at once (a socket new and finished in the same
    /// interval), refused (table full), or returned to be tracked with its wake time set.
    fn begin(
        &mut self,
        meta: &Meta,
        mut t: Track,
        finishing: bool,
        live: usize,
        now: u64,
        peer: bool,
    ) -> Option<Track> {
        if !self
            .cfg
            .passes(meta.proto, &meta.label, meta.local, t.remote)
        {
            self.c.filtered += 1;
            return None;
        }
        if finishing {
            self.close(meta, &t, EndReason::Closed, now, now, live);
            return None;
        }
        if !self.room(live) {
            self.c.overflow += 1;
            return None;
        }
        t.wake_ms = self.next_wake(meta, &t, peer);
        Some(t)
    }

    fn next_wake(&self, meta: &Meta, t: &Track, peer: bool) -> Option<u64> {
        let mut w: Option<u64> = None;
        let mut at = |x: u64| w = Some(w.map_or(x, |y| y.min(x)));
        if !t.opened {
            at(t.start_ms
                .saturating_add(self.cfg.open_delay_ms(&meta.label)));
        } else if self.cfg.updates() {
            at(t.next_update_ms);
        }
        if peer {
            at(t.last_move_ms.saturating_add(self.cfg.udp_idle_ms));
        }
        w
    }

    /// A flow's timer fired: idle, open, update; returns its next wake.
    fn due(&mut self, meta: &Meta, t: &mut Track, now: u64, peer: bool) -> Wake {
        if peer && now >= t.last_move_ms.saturating_add(self.cfg.udp_idle_ms) {
            return Wake::Idle;
        }
        let backlog = self.outbox.len() >= self.cfg.max_records_per_tick;
        let mut deferred = false;
        if !t.opened {
            if now
                >= t.start_ms
                    .saturating_add(self.cfg.open_delay_ms(&meta.label))
            {
                if self.cfg.events.open {
                    if backlog {
                        deferred = true;
                    } else {
                        self.outbox.push_back(build(meta, t, FlowEvent::Open, now));
                        t.reported = t.counts();
                    }
                }
                if !deferred {
                    t.opened = true;
                    t.next_update_ms = now.saturating_add(self.cfg.update_every_ms);
                }
            }
        } else if self.cfg.updates() && now >= t.next_update_ms {
            if t.counts() != t.reported {
                if backlog {
                    deferred = true;
                } else {
                    self.outbox
                        .push_back(build(meta, t, FlowEvent::Update, now));
                    t.reported = t.counts();
                }
            }
            if !deferred {
                t.next_update_ms = now.saturating_add(self.cfg.update_every_ms);
            }
        }
        let next = if deferred {
            Some(now.saturating_add(1))
        } else {
            self.next_wake(meta, t, peer)
        };
        Wake::At(next.map(|w| w.max(now.saturating_add(1))))
    }

    /// A flow ended: its `close` goes out now, or into a pending session.
    fn close(
        &mut self,
        meta: &Meta,
        t: &Track,
        reason: EndReason,
        end: u64,
        now: u64,
        live: usize,
    ) {
        if !self.cfg.events.close {
            return;
        }
        let mut rec = build(meta, t, FlowEvent::Close, end);
        rec.end_reason = Some(reason);
        if meta.proto == IPPROTO_TCP {
            rec.tcp_state = t.tcp_state.map(tcp_state_name);
        }
        let merge = self.cfg.consolidates(&meta.label)
            && !t.opened
            && matches!(reason, EndReason::Closed | EndReason::Idle);
        if !merge {
            // A flow that began and ended between two polls never had its open written;
            // when opens are wanted at once (open_after_ms = 0), write it now, as it was at
            // the start: nothing counted yet.
            if !t.opened && self.cfg.events.open && self.cfg.open_delay_ms(&meta.label) == 0 {
                let mut open = build(meta, t, FlowEvent::Open, t.start_ms);
                open.tx = 0;
                open.rx = 0;
                open.tx_packets = 0;
                open.rx_packets = 0;
                self.outbox.push_back(open);
            }
            self.outbox.push_back(rec);
            return;
        }
        let key = SessionKey::new(meta, t.remote);
        let gap = self.cfg.consolidate_gap_ms;
        if let Some(&id) = self.session_index.get(&key) {
            if let Some(s) = self
                .sessions
                .get_mut(&id)
                .filter(|s| rec.start <= s.rec.end.saturating_add(gap))
            {
                s.merge(rec, now);
                return;
            }
            // Too far apart: that session is complete; this flow starts the next one in
            // its place (no new room needed).
            self.session_index.remove(&key);
            if let Some(s) = self.sessions.remove(&id) {
                self.emit_session(s);
            }
        } else if !self.room(live) {
            self.c.overflow += 1;
            self.outbox.push_back(rec);
            return;
        }
        let id = self.next_session;
        self.next_session += 1;
        self.session_index.insert(key.clone(), id);
        self.sessions.insert(
            id,
            Session {
                key,
                rec,
                connections: 1,
                last_join_ms: now,
            },
        );
        self.session_timers
            .push(Reverse((now.saturating_add(gap), id)));
    }

    fn emit_session(&mut self, mut s: Session) {
        if s.connections >= 2 {
            s.rec.connections = Some(s.connections);
            self.c.sessions += 1;
            self.c.merged_connections += s.connections;
        }
        self.outbox.push_back(s.rec);
    }

    /// Sessions nobody joined for `consolidate_gap_ms`.
    fn expire_sessions(&mut self, now: u64) {
        let gap = self.cfg.consolidate_gap_ms;
        while let Some(&Reverse((deadline, id))) = self.session_timers.peek() {
            if deadline > now {
                break;
            }
            self.session_timers.pop();
            let Some(s) = self.sessions.get(&id) else {
                continue;
            };
            let due = s.last_join_ms.saturating_add(gap);
            if due > now {
                self.session_timers.push(Reverse((due, id)));
                continue;
            }
            if let Some(s) = self.sessions.remove(&id) {
                self.session_index.remove(&s.key);
                self.emit_session(s);
            }
        }
    }

    fn flush_sessions(&mut self) {
        let mut ids: Vec<u64> = self.sessions.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            if let Some(s) = self.sessions.remove(&id) {
                self.emit_session(s);
            }
        }
        self.session_index.clear();
        self.session_timers.clear();
    }
}

// ---------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------

/// Turns per-interval socket observations into flow records.
#[derive(Debug)]
pub struct FlowTable {
    agent: String,
    boot: String,
    flows: Flows,
    out: Out,
    next_serial: u64,
}

impl FlowTable {
    pub fn new(cfg: FlowConfig, identity: &Identity) -> FlowTable {
        FlowTable {
            agent: identity.agent.clone(),
            boot: identity.boot.clone(),
            flows: Flows::default(),
            out: Out {
                cfg,
                outbox: VecDeque::new(),
                sessions: HashMap::new(),
                session_index: HashMap::new(),
                session_timers: BinaryHeap::new(),
                next_session: 0,
                c: Counters::default(),
            },
            next_serial: 0,
        }
    }

    pub fn config(&self) -> &FlowConfig {
        &self.out.cfg
    }

    /// One poll interval ending at `now_ms` (Unix ms). Returns at most
    /// `max_records_per_tick` records, oldest first; the rest come with the next calls.
    pub fn observe(
        &mut self,
        now_ms: u64,
        sockets: &[SocketView],
        peers: &[PeerView],
    ) -> Vec<FlowRecord> {
        let now = now_ms;
        let mut unconnected: HashMap<u64, &SocketView> = HashMap::new();
        for s in sockets {
            match s.remote {
                Some(r) => self.observe_connected(now, s, r),
                None => {
                    if let Some(mut c) = self.flows.conns.remove(&s.cookie) {
                        // Disconnected (UDP connect(AF_UNSPEC)), or gone.
                        let reason = if s.finished {
                            c.t.note(s.counters, now);
                            c.t.tcp_state = s.tcp_state.or(c.t.tcp_state);
                            EndReason::Closed
                        } else {
                            EndReason::Reconnected
                        };
                        let live = self.flows.live();
                        self.out.close(&c.meta, &c.t, reason, now, now, live);
                    }
                    if let Some(u) = self.flows.unconns.get_mut(&s.cookie) {
                        u.meta.refresh(s);
                        u.sock_cum = s.counters;
                    }
                    unconnected.insert(s.cookie, s);
                }
            }
        }
        for p in peers {
            self.observe_peer(now, p, unconnected.get(&p.cookie).copied());
        }
        for s in sockets.iter().filter(|s| s.remote.is_none() && s.finished) {
            if let Some(u) = self.flows.unconns.remove(&s.cookie) {
                self.retire_unconn(u, EndReason::Closed, now);
            }
        }
        self.run_timers(now);
        self.evict_dormant();
        self.out.expire_sessions(now);
        self.drain(self.out.cfg.max_records_per_tick)
    }

    /// Shutdown: every pending session, then a `close` (`end_reason: "agent_stopped"`,
    /// `end` = `now_ms`) for every live flow, then nothing is tracked any more. Returns
    /// everything still waiting, not capped (there is no next call); the caller may append
    /// it in chunks.
    pub fn finish_all(&mut self, now_ms: u64) -> Vec<FlowRecord> {
        self.out.flush_sessions();
        let flows = std::mem::take(&mut self.flows);
        let mut live: Vec<(&Meta, &Track)> = Vec::with_capacity(flows.live());
        for c in flows.conns.values() {
            live.push((&c.meta, &c.t));
        }
        for u in flows.unconns.values() {
            for p in u.peers.values() {
                if let PeerState::Live(t) = p {
                    live.push((&u.meta, t));
                }
            }
        }
        live.sort_by_key(|(_, t)| t.serial);
        for (meta, t) in live {
            self.out
                .close(meta, t, EndReason::AgentStopped, now_ms, now_ms, 0);
        }
        self.drain(usize::MAX)
    }

    pub fn stats(&self) -> FlowStats {
        let c = &self.out.c;
        FlowStats {
            tracked: self.flows.live() as u64,
            pending_sessions: self.out.sessions.len() as u64,
            dormant_peers: self.flows.dormant as u64,
            queued: self.out.outbox.len() as u64,
            opens: c.opens,
            updates: c.updates,
            closes: c.closes,
            sessions: c.sessions,
            merged_connections: c.merged_connections,
            filtered: c.filtered,
            overflow: c.overflow,
            evicted_peer_bases: c.evicted_peer_bases,
            orphan_peers: c.orphan_peers,
        }
    }

    fn serial(&mut self) -> u64 {
        self.next_serial += 1;
        self.next_serial
    }

    fn start_of(&self, first_seen_ms: u64, now: u64) -> u64 {
        if first_seen_ms == 0 {
            now
        } else {
            first_seen_ms.min(now)
        }
    }

    fn observe_connected(&mut self, now: u64, s: &SocketView, remote: SocketAddr) {
        let remote = canon(remote);
        let mut base = Traffic::default();
        let mut reconnected = false;
        if let Some(u) = self.flows.unconns.remove(&s.cookie) {
            // An unconnected socket connect()ed: its peer flows end here.
            base = u.sock_cum;
            reconnected = true;
            self.retire_unconn(u, EndReason::Reconnected, now);
        }
        if let Some(c) = self.flows.conns.get_mut(&s.cookie) {
            if c.t.remote == remote {
                c.meta.refresh(s);
                c.t.tcp_state = s.tcp_state.or(c.t.tcp_state);
                c.t.note(s.counters, now);
                if !s.finished {
                    return;
                }
                if let Some(c) = self.flows.conns.remove(&s.cookie) {
                    let live = self.flows.live();
                    self.out
                        .close(&c.meta, &c.t, EndReason::Closed, now, now, live);
                }
                return;
            }
            // Connected to another peer (UDP): the old flow ends with what it had.
            if let Some(old) = self.flows.conns.remove(&s.cookie) {
                base = old.t.cum;
                reconnected = true;
                let live = self.flows.live();
                self.out
                    .close(&old.meta, &old.t, EndReason::Reconnected, now, now, live);
            }
        }
        let meta = Meta::from_view(s);
        let start = if reconnected {
            now
        } else {
            self.start_of(s.first_seen_ms, now)
        };
        let mut t = Track::new(self.serial(), remote, start, base, s.counters, now);
        t.tcp_state = s.tcp_state;
        let live = self.flows.live();
        if let Some(t) = self.out.begin(&meta, t, s.finished, live, now, false) {
            if let Some(w) = t.wake_ms {
                self.flows
                    .timers
                    .push(Reverse((w, t.serial, s.cookie, None)));
            }
            self.flows.conns.insert(s.cookie, Conn { meta, t });
        }
    }

    fn observe_peer(&mut self, now: u64, p: &PeerView, view: Option<&SocketView>) {
        let remote = canon(p.remote);
        let mut base = Traffic::default();
        if let Some(u) = self.flows.unconns.get_mut(&p.cookie) {
            match u.peers.get_mut(&remote) {
                Some(PeerState::Live(t)) => {
                    t.note(p.counters, now);
                    return;
                }
                Some(PeerState::Dormant { last, .. }) => {
                    if p.counters == *last {
                        return;
                    }
                    if at_least(p.counters, *last) {
                        base = *last;
                    }
                }
                None => {}
            }
        } else if self.flows.conns.contains_key(&p.cookie) {
            return;
        }
        let finishing = view.is_some_and(|v| v.finished);
        let serial = self.serial();
        let live = self.flows.live();
        let track = match self.flows.unconns.get(&p.cookie) {
            Some(u) => {
                let t = Track::new(serial, remote, now, base, p.counters, now);
                if t.counts() == Traffic::default() {
                    return;
                }
                self.out.begin(&u.meta, t, finishing, live, now, true)
            }
            None => {
                let Some(v) = view else {
                    self.out.c.orphan_peers += 1;
                    return;
                };
                let meta = Meta::from_view(v);
                let t = Track::new(serial, remote, now, base, p.counters, now);
                if t.counts() == Traffic::default() {
                    return;
                }
                let t = self.out.begin(&meta, t, finishing, live, now, true);
                if t.is_some() {
                    self.flows.unconns.insert(
                        p.cookie,
                        Unconn {
                            meta,
                            sock_cum: v.counters,
                            peers: HashMap::new(),
                        },
                    );
                }
                t
            }
        };
        let Some(t) = track else { return };
        let Some(u) = self.flows.unconns.get_mut(&p.cookie) else {
            return;
        };
        if let Some(w) = t.wake_ms {
            self.flows
                .timers
                .push(Reverse((w, t.serial, p.cookie, Some(remote))));
        }
        if let Some(PeerState::Dormant { .. }) = u.peers.insert(remote, PeerState::Live(t)) {
            self.flows.dormant = self.flows.dormant.saturating_sub(1);
        }
        self.flows.live_peers += 1;
    }

    /// An unconnected socket is gone or connected: close its live peer flows.
    fn retire_unconn(&mut self, u: Unconn, reason: EndReason, now: u64) {
        let mut live: Vec<Track> = Vec::new();
        for (_, p) in u.peers {
            match p {
                PeerState::Live(t) => live.push(t),
                PeerState::Dormant { .. } => {
                    self.flows.dormant = self.flows.dormant.saturating_sub(1)
                }
            }
        }
        self.flows.live_peers = self.flows.live_peers.saturating_sub(live.len());
        live.sort_by_key(|t| t.remote);
        for t in live {
            let l = self.flows.live();
            self.out.close(&u.meta, &t, reason, now, now, l);
        }
    }

    fn run_timers(&mut self, now: u64) {
        while let Some(&Reverse(top)) = self.flows.timers.peek() {
            let (wake, serial, cookie, peer) = top;
            if wake > now {
                break;
            }
            self.flows.timers.pop();
            match peer {
                None => {
                    let Some(c) = self.flows.conns.get_mut(&cookie) else {
                        continue;
                    };
                    if c.t.serial != serial || c.t.wake_ms != Some(wake) {
                        continue;
                    }
                    if let Wake::At(w) = self.out.due(&c.meta, &mut c.t, now, false) {
                        c.t.wake_ms = w;
                        if let Some(w) = w {
                            self.flows.timers.push(Reverse((w, serial, cookie, None)));
                        }
                    }
                }
                Some(addr) => {
                    let Some(u) = self.flows.unconns.get_mut(&cookie) else {
                        continue;
                    };
                    let Some(PeerState::Live(t)) = u.peers.get_mut(&addr) else {
                        continue;
                    };
                    if t.serial != serial || t.wake_ms != Some(wake) {
                        continue;
                    }
                    match self.out.due(&u.meta, t, now, true) {
                        Wake::At(w) => {
                            t.wake_ms = w;
                            if let Some(w) = w {
                                self.flows
                                    .timers
                                    .push(Reverse((w, serial, cookie, Some(addr))));
                            }
                        }
                        Wake::Idle => {
                            let dormant = PeerState::Dormant {
                                last: t.cum,
                                serial,
                            };
                            let Some(PeerState::Live(t)) = u.peers.insert(addr, dormant) else {
                                continue;
                            };
                            self.flows.live_peers = self.flows.live_peers.saturating_sub(1);
                            self.flows.dormant += 1;
                            self.flows.dormant_queue.push_back((cookie, addr, serial));
                            let live = self.flows.conns.len() + self.flows.live_peers;
                            self.out
                                .close(&u.meta, &t, EndReason::Idle, t.last_move_ms, now, live);
                        }
                    }
                }
            }
        }
        // Stale entries (flows closed before their wake) are bounded by the churn of one
        // open_after/update period; rebuild if they ever dominate.
        if self.flows.timers.len() > 2 * self.flows.live() + 1024 {
            let mut v: Vec<Reverse<Timer>> = Vec::with_capacity(self.flows.live());
            for (&cookie, c) in &self.flows.conns {
                if let Some(w) = c.t.wake_ms {
                    v.push(Reverse((w, c.t.serial, cookie, None)));
                }
            }
            for (&cookie, u) in &self.flows.unconns {
                for (&addr, p) in &u.peers {
                    if let PeerState::Live(Track {
                        wake_ms: Some(w),
                        serial,
                        ..
                    }) = p
                    {
                        v.push(Reverse((*w, *serial, cookie, Some(addr))));
                    }
                }
            }
            self.flows.timers = BinaryHeap::from(v);
        }
    }

    /// Keeps remembered baselines of idle peers within `max_flows`, oldest forgotten first.
    fn evict_dormant(&mut self) {
        let max = self.out.cfg.max_flows;
        while self.flows.dormant > max {
            let Some((cookie, addr, serial)) = self.flows.dormant_queue.pop_front() else {
                break;
            };
            let Some(u) = self.flows.unconns.get_mut(&cookie) else {
                continue;
            };
            if matches!(u.peers.get(&addr), Some(PeerState::Dormant { serial: s, .. }) if *s == serial)
            {
                u.peers.remove(&addr);
                self.flows.dormant -= 1;
                self.out.c.evicted_peer_bases += 1;
                if u.peers.is_empty() {
                    self.flows.unconns.remove(&cookie);
                }
            }
        }
        if self.flows.dormant_queue.len() > 2 * self.flows.dormant + 1024 {
            let unconns = &self.flows.unconns;
            self.flows.dormant_queue.retain(|(cookie, addr, serial)| {
                unconns.get(cookie).is_some_and(|u| {
                    matches!(u.peers.get(addr), Some(PeerState::Dormant { serial: s, .. }) if s == serial)
                })
            });
        }
    }

    fn drain(&mut self, limit: usize) -> Vec<FlowRecord> {
        let n = limit.min(self.out.outbox.len());
        let mut v = Vec::with_capacity(n);
        for mut r in self.out.outbox.drain(..n) {
            r.agent.clone_from(&self.agent);
            r.boot.clone_from(&self.boot);
            match r.event {
                FlowEvent::Open => self.out.c.opens += 1,
                FlowEvent::Update => self.out.c.updates += 1,
                FlowEvent::Close => self.out.c.closes += 1,
            }
            v.push(r);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::SpoolRecord;

    const T0: u64 = 1_795_443_814_000;

    fn ident() -> Identity {
        Identity {
            agent: "a".into(),
            boot: "b".into(),
        }
    }
    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }
    fn tr(tx: u64, rx: u64, tx_packets: u64, rx_packets: u64) -> Traffic {
        Traffic {
            tx,
            rx,
            tx_packets,
            rx_packets,
        }
    }
    fn owner(pid: u32) -> OwnerView {
        OwnerView {
            pid,
            process: "curl".into(),
            uid: 1000,
            cgroup: Some("user.slice/session-1.scope".into()),
            netns: 4026531840,
        }
    }
    fn tcp(
        cookie: u64,
        local: &str,
        remote: &str,
        counters: Traffic,
        first_seen_ms: u64,
    ) -> SocketView {
        SocketView {
            cookie,
            proto: 6,
            local: addr(local),
            remote: Some(addr(remote)),
            direction: Direction::Outbound,
            owner: owner(4242),
            label: "curl".into(),
            counters,
            first_seen_ms,
            finished: false,
            tcp_state: None,
        }
    }
    fn fin(mut s: SocketView, counters: Traffic, state: Option<u8>) -> SocketView {
        s.counters = counters;
        s.finished = true;
        s.tcp_state = state;
        s
    }
    fn udp_unconnected(cookie: u64, counters: Traffic, first_seen_ms: u64) -> SocketView {
        SocketView {
            cookie,
            proto: 17,
            local: addr("10.0.0.2:5300"),
            remote: None,
            direction: Direction::Outbound,
            owner: OwnerView {
                pid: 77,
                process: "resolver".into(),
                uid: 0,
                cgroup: None,
                netns: 1,
            },
            label: "resolver".into(),
            counters,
            first_seen_ms,
            finished: false,
            tcp_state: None,
        }
    }
    fn peer(cookie: u64, remote: &str, counters: Traffic) -> PeerView {
        PeerView {
            cookie,
            remote: addr(remote),
            counters,
        }
    }
    fn table(cfg: FlowConfig) -> FlowTable {
        FlowTable::new(cfg, &ident())
    }
    fn no_gap() -> FlowConfig {
        FlowConfig {
            consolidate_gap_ms: 0,
            ..FlowConfig::default()
        }
    }
    fn kinds(r: &[FlowRecord]) -> Vec<FlowEvent> {
        r.iter().map(|r| r.event).collect()
    }
    fn json(r: &FlowRecord) -> String {
        String::from_utf8(r.to_json_line()).unwrap()
    }

    #[test]
    fn flows_lifecycle_open_update_close_exact_counts() {
        let mut ft = table(FlowConfig::default());
        let s = tcp(
            1,
            "10.0.0.2:40000",
            "93.184.216.34:443",
            tr(100, 50, 2, 1),
            T0,
        );
        assert!(ft.observe(T0, std::slice::from_ref(&s), &[]).is_empty());
        let mut s2 = s.clone();
        s2.counters = tr(200, 100, 3, 2);
        assert!(
            ft.observe(T0 + 500, &[s2], &[]).is_empty(),
            "no open before open_after"
        );

        // The open comes from the timer, although the socket did not move this interval.
        let r = ft.observe(T0 + 1000, &[], &[]);
        assert_eq!(kinds(&r), [FlowEvent::Open]);
        assert_eq!((r[0].start, r[0].end), (T0, T0 + 1000));
        assert_eq!(r[0].traffic(), tr(200, 100, 3, 2));
        assert_eq!((r[0].tcp_state.as_deref(), r[0].end_reason), (None, None));
        assert_eq!(
            (r[0].agent.as_str(), r[0].boot.as_str(), r[0].kind.as_str()),
            ("a", "b", "flow")
        );

        let mut s3 = s.clone();
        s3.counters = tr(1000, 5000, 10, 12);
        assert!(ft.observe(T0 + 5000, &[s3], &[]).is_empty());
        let r = ft.observe(T0 + 11_000, &[], &[]);
        assert_eq!(kinds(&r), [FlowEvent::Update]);
        assert_eq!(r[0].traffic(), tr(1000, 5000, 10, 12));
        assert_eq!(r[0].end, T0 + 11_000);
        // Nothing moved since: no update.
        assert!(ft.observe(T0 + 21_000, &[], &[]).is_empty());

        let r = ft.observe(T0 + 25_000, &[fin(s, tr(1200, 6000, 14, 15), Some(7))], &[]);
        assert_eq!(
            kinds(&r),
            [FlowEvent::Close],
            "an opened flow closes at once, unmerged"
        );
        let c = &r[0];
        assert_eq!(c.traffic(), tr(1200, 6000, 14, 15));
        assert_eq!((c.start, c.end), (T0, T0 + 25_000));
        assert_eq!(c.tcp_state.as_deref(), Some("CLOSE"));
        assert_eq!(c.end_reason, Some(EndReason::Closed));
        assert_eq!(
            (c.connections, c.local_port, c.remote_port),
            (None, Some(40000), Some(443))
        );
        let st = ft.stats();
        assert_eq!(
            (
                st.opens,
                st.updates,
                st.closes,
                st.tracked,
                st.pending_sessions
            ),
            (1, 1, 1, 0, 0)
        );
    }

    #[test]
    fn flows_short_connection_gives_only_a_close() {
        let mut ft = table(FlowConfig::default());
        let s = tcp(1, "10.0.0.2:40000", "10.0.0.9:443", tr(60, 0, 1, 0), T0);
        assert!(ft.observe(T0, std::slice::from_ref(&s), &[]).is_empty());
        assert!(
            ft.observe(T0 + 300, &[fin(s, tr(500, 900, 5, 4), Some(6))], &[])
                .is_empty()
        );
        assert_eq!(ft.stats().pending_sessions, 1);
        assert!(
            ft.observe(T0 + 5200, &[], &[]).is_empty(),
            "waits consolidate_gap for company"
        );
        let r = ft.observe(T0 + 5300, &[], &[]);
        assert_eq!(kinds(&r), [FlowEvent::Close]);
        assert_eq!(r[0].traffic(), tr(500, 900, 5, 4));
        assert_eq!(
            (r[0].start, r[0].end, r[0].connections),
            (T0, T0 + 300, None)
        );
        assert_eq!(
            (r[0].local_port, r[0].tcp_state.as_deref()),
            (Some(40000), Some("TIME_WAIT"))
        );
        assert_eq!(ft.stats().opens, 0);

        // Without consolidation: open at once, close at once.
        let mut ft = table(no_gap());
        let s = tcp(2, "10.0.0.2:40001", "10.0.0.9:443", tr(60, 0, 1, 0), T0);
        assert_eq!(
            kinds(&ft.observe(T0, std::slice::from_ref(&s), &[])),
            [FlowEvent::Open]
        );
        let r = ft.observe(T0 + 100, &[fin(s, tr(70, 80, 2, 1), None)], &[]);
        assert_eq!(kinds(&r), [FlowEvent::Close]);
        assert_eq!(r[0].traffic(), tr(70, 80, 2, 1));
        // First seen already finished, opens wanted at once: the open as it began, the close.
        let s = tcp(
            3,
            "10.0.0.2:40002",
            "10.0.0.9:443",
            tr(0, 0, 0, 0),
            T0 + 150,
        );
        let r = ft.observe(T0 + 200, &[fin(s, tr(1, 2, 1, 1), None)], &[]);
        assert_eq!(kinds(&r), [FlowEvent::Open, FlowEvent::Close]);
        assert_eq!((r[0].start, r[0].end, r[0].tx), (T0 + 150, T0 + 150, 0));
        assert_eq!(r[1].start, T0 + 150);
    }

    #[test]
    fn flows_udp_unconnected_three_peers_open_idle_close_reuse() {
        let mut ft = table(FlowConfig::default());
        let sock = udp_unconnected(7, tr(210, 420, 3, 3), T0 - 10_000);
        let peers = [
            peer(7, "8.8.8.8:53", tr(60, 120, 1, 1)),
            peer(7, "1.1.1.1:53", tr(70, 140, 1, 1)),
            peer(7, "9.9.9.9:53", tr(80, 160, 1, 1)),
        ];
        assert!(
            ft.observe(T0, std::slice::from_ref(&sock), &peers)
                .is_empty()
        );
        assert_eq!(ft.stats().tracked, 3);
        let r = ft.observe(T0 + 1000, &[], &[]);
        assert_eq!(kinds(&r), [FlowEvent::Open; 3]);
        let by = |r: &[FlowRecord], ip: &str| {
            r.iter()
                .find(|x| x.remote.to_string() == ip)
                .cloned()
                .unwrap()
        };
        assert_eq!(by(&r, "8.8.8.8").traffic(), tr(60, 120, 1, 1));
        assert_eq!(by(&r, "9.9.9.9").traffic(), tr(80, 160, 1, 1));
        assert_eq!(
            (r[0].proto.as_str(), r[0].remote_port, r[0].local_port),
            ("udp", Some(53), Some(5300))
        );
        assert_eq!(r[0].label, "resolver");

        // Only 8.8.8.8 moves again.
        assert!(
            ft.observe(
                T0 + 10_000,
                std::slice::from_ref(&sock),
                &[peer(7, "8.8.8.8:53", tr(120, 240, 2, 2))]
            )
            .is_empty()
        );
        let r = ft.observe(T0 + 30_000, &[], &[]);
        let closes: Vec<_> = r.iter().filter(|x| x.event == FlowEvent::Close).collect();
        assert_eq!(closes.len(), 2);
        for c in &closes {
            assert_eq!(c.end_reason, Some(EndReason::Idle));
            assert_eq!(c.end, T0, "an idle flow ends when it last moved");
        }
        assert_eq!(by(&r, "1.1.1.1").traffic(), tr(70, 140, 1, 1));
        let u = by(&r, "8.8.8.8");
        assert_eq!(
            (u.event, u.traffic()),
            (FlowEvent::Update, tr(120, 240, 2, 2))
        );
        let r = ft.observe(T0 + 40_000, &[], &[]);
        assert_eq!(kinds(&r), [FlowEvent::Close]);
        assert_eq!(
            (r[0].traffic(), r[0].end),
            (tr(120, 240, 2, 2), T0 + 10_000)
        );
        let st = ft.stats();
        assert_eq!((st.tracked, st.dormant_peers), (0, 3));

        // 1.1.1.1 talks again: the new flow counts from where the old one closed.
        assert!(
            ft.observe(
                T0 + 50_000,
                std::slice::from_ref(&sock),
                &[peer(7, "1.1.1.1:53", tr(100, 200, 2, 2))]
            )
            .is_empty()
        );
        let r = ft.observe(T0 + 51_000, &[], &[]);
        assert_eq!(kinds(&r), [FlowEvent::Open]);
        assert_eq!(r[0].traffic(), tr(30, 60, 1, 1));
        let done = SocketView {
            finished: true,
            ..sock
        };
        let r = ft.observe(T0 + 52_000, &[done], &[]);
        assert_eq!(kinds(&r), [FlowEvent::Close]);
        assert_eq!(
            (r[0].traffic(), r[0].end_reason),
            (tr(30, 60, 1, 1), Some(EndReason::Closed))
        );
        let st = ft.stats();
        assert_eq!(
            (st.tracked, st.dormant_peers, st.pending_sessions),
            (0, 0, 0)
        );
    }

    /// Drives ticks of 100 ms; `conns[i]` = (first_seen offset, end offset, socket).
    fn run_short(
        ft: &mut FlowTable,
        conns: &[(u64, u64, SocketView)],
        until: u64,
    ) -> Vec<FlowRecord> {
        let mut out = Vec::new();
        let mut now = 0;
        while now <= until {
            let views: Vec<SocketView> = conns
                .iter()
                .filter(|(_, end, _)| *end <= now && *end + 100 > now)
                .map(|(_, _, s)| s.clone())
                .collect();
            out.extend(ft.observe(T0 + now, &views, &[]));
            now += 100;
        }
        out
    }

    #[test]
    fn flows_hundred_short_connections_make_one_session() {
        let mut ft = table(FlowConfig::default());
        let conns: Vec<_> = (0..100u64)
            .map(|i| {
                let s = tcp(
                    1000 + i,
                    &format!("10.0.0.2:{}", 40000 + i),
                    "10.0.0.9:443",
                    tr(0, 0, 0, 0),
                    T0 + i * 40,
                );
                (
                    i * 40,
                    i * 40 + 30,
                    fin(s, tr(100 + i, 1000, 2, 3), Some(7)),
                )
            })
            .collect();
        let r = run_short(&mut ft, &conns, 8900);
        assert!(r.is_empty(), "{r:?}");
        let r = ft.observe(T0 + 9000, &[], &[]);
        assert_eq!(r.len(), 1);
        let s = &r[0];
        assert_eq!(s.connections, Some(100));
        assert_eq!(s.traffic(), tr(14_950, 100_000, 200, 300));
        assert_eq!((s.start, s.end), (T0, T0 + 4000));
        assert_eq!(
            (s.local_port, s.remote_port),
            (None, Some(443)),
            "source ports differ"
        );
        assert_eq!(
            (s.pid, s.tcp_state.as_deref(), s.end_reason),
            (Some(4242), Some("CLOSE"), Some(EndReason::Closed))
        );
        let j = json(s);
        assert!(
            !j.contains("local_port")
                && j.contains(r#""remote_port":443"#)
                && j.ends_with(r#""connections":100}"#),
            "{j}"
        );
        let st = ft.stats();
        assert_eq!(
            (st.sessions, st.merged_connections, st.closes, st.opens),
            (1, 100, 1, 0)
        );
    }

    #[test]
    fn flows_gap_exceeded_gives_two_sessions() {
        let mut ft = table(FlowConfig::default());
        let c = |cookie, port, first: u64, end: u64| {
            let s = tcp(
                cookie,
                &format!("10.0.0.2:{port}"),
                "10.0.0.9:443",
                tr(0, 0, 0, 0),
                T0 + first,
            );
            (first, end, fin(s, tr(10, 20, 1, 1), None))
        };
        // A ends at 100; B starts 5100 ms later (> gap); C follows B closely.
        let conns = [
            c(1, 40001, 0, 100),
            c(2, 40002, 5200, 5300),
            c(3, 40003, 5400, 5500),
        ];
        let r = run_short(&mut ft, &conns, 10_500);
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(
            (r[0].connections, r[0].local_port, r[0].end),
            (None, Some(40001), T0 + 100)
        );
        assert_eq!((r[1].connections, r[1].local_port), (Some(2), None));
        assert_eq!((r[1].start, r[1].end, r[1].tx), (T0 + 5200, T0 + 5500, 20));

        // Inbound: the source is the remote end; a shared source port is kept.
        let mut ft = table(FlowConfig::default());
        let inb = |cookie, first: u64, end: u64| {
            let mut s = tcp(
                cookie,
                "10.0.0.2:8080",
                "192.0.2.7:5555",
                tr(0, 0, 0, 0),
                T0 + first,
            );
            s.direction = Direction::Inbound;
            (first, end, fin(s, tr(1, 1, 1, 1), None))
        };
        let r = run_short(&mut ft, &[inb(1, 0, 100), inb(2, 200, 300)], 5300);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].connections, r[0].remote_port, r[0].local_port),
            (Some(2), Some(5555), Some(8080))
        );
    }

    #[test]
    fn flows_raw_labels_are_never_merged() {
        let cfg = FlowConfig {
            raw_labels: ["curl".to_string()].into(),
            ..FlowConfig::default()
        };
        let mut ft = table(cfg);
        let views: Vec<_> = (0..3u64)
            .map(|i| {
                fin(
                    tcp(
                        i + 1,
                        &format!("10.0.0.2:{}", 40000 + i),
                        "10.0.0.9:443",
                        tr(0, 0, 0, 0),
                        T0,
                    ),
                    tr(5, 5, 1, 1),
                    None,
                )
            })
            .collect();
        let r = ft.observe(T0 + 100, &views, &[]);
        // Raw labels get their opens at once: an open (as it started) and a close each.
        use FlowEvent::{Close, Open};
        assert_eq!(
            kinds(&r),
            [Open, Close, Open, Close, Open, Close],
            "written at once, one per connection"
        );
        assert!(
            r.iter()
                .all(|r| r.connections.is_none() && r.local_port.is_some())
        );
        assert_eq!(ft.stats().pending_sessions, 0);
        // ... and a live one opens at once.
        let r = ft.observe(
            T0 + 200,
            &[tcp(
                9,
                "10.0.0.2:41000",
                "10.0.0.9:443",
                tr(1, 0, 1, 0),
                T0 + 150,
            )],
            &[],
        );
        assert_eq!(kinds(&r), [FlowEvent::Open]);
    }

    #[test]
    fn flows_filters_exclude_udp_and_are_counted() {
        let cfg = FlowConfig {
            protocols: vec![Protocol::Tcp],
            ..no_gap()
        };
        let mut ft = table(cfg);
        let mut udp_conn = tcp(1, "10.0.0.2:40000", "10.0.0.9:53", tr(60, 0, 1, 0), T0);
        udp_conn.proto = 17;
        let unconn = udp_unconnected(2, tr(60, 0, 1, 0), T0);
        let tcp_conn = tcp(3, "10.0.0.2:40001", "10.0.0.9:443", tr(60, 0, 1, 0), T0);
        let all = [udp_conn.clone(), unconn.clone(), tcp_conn.clone()];
        let r = ft.observe(T0, &all, &[peer(2, "8.8.8.8:53", tr(60, 0, 1, 0))]);
        assert_eq!(kinds(&r), [FlowEvent::Open]);
        assert_eq!(r[0].proto, "tcp");
        let done = [
            fin(udp_conn, tr(70, 10, 2, 1), None),
            SocketView {
                finished: true,
                ..unconn
            },
            fin(tcp_conn, tr(70, 10, 2, 1), None),
        ];
        let r = ft.observe(T0 + 100, &done, &[peer(2, "8.8.8.8:53", tr(70, 10, 2, 1))]);
        r.iter()
            .chain(ft.finish_all(T0 + 200).iter())
            .for_each(|r| assert_eq!(r.proto, "tcp", "{r:?}"));
        let st = ft.stats();
        assert_eq!(st.tracked, 0);
        assert_eq!(st.filtered, 4, "udp socket and udp peer, each in two calls");

        let cfg = FlowConfig {
            labels: ["web".to_string()].into(),
            ports: vec![PortRange {
                start: 443,
                end: 443,
            }],
            cidrs: vec![parse_cidr("10.0.0.0/8").unwrap()],
            ..FlowConfig::default()
        };
        let (l, r) = (addr("10.0.0.2:40000"), addr("10.1.2.3:443"));
        assert!(cfg.passes(6, "web", l, r));
        assert!(
            cfg.passes(6, "web", addr("10.0.0.2:443"), addr("10.1.2.3:999")),
            "local port matches too"
        );
        assert!(
            cfg.passes(6, "web", l, addr("[::ffff:10.1.2.3]:443")),
            "v4-mapped remote matches a v4 network"
        );
        assert!(!cfg.passes(6, "curl", l, r));
        assert!(!cfg.passes(6, "web", l, addr("10.1.2.3:80")));
        assert!(!cfg.passes(6, "web", l, addr("192.0.2.1:443")));
    }

    #[test]
    fn flows_overflow_is_counted_and_closes_still_written() {
        let cfg = FlowConfig {
            max_flows: 2,
            ..no_gap()
        };
        let mut ft = table(cfg);
        let s: Vec<_> = (0..3u64)
            .map(|i| {
                tcp(
                    i + 1,
                    &format!("10.0.0.2:{}", 40000 + i),
                    "10.0.0.9:443",
                    tr(10 * (i + 1), 0, 1, 0),
                    T0,
                )
            })
            .collect();
        let r = ft.observe(T0, &s, &[]);
        assert_eq!(kinds(&r), [FlowEvent::Open; 2]);
        let st = ft.stats();
        assert_eq!((st.tracked, st.overflow), (2, 1));
        let mut third = s[2].clone();
        third.counters = tr(35, 5, 2, 1);
        assert!(ft.observe(T0 + 100, &[third.clone()], &[]).is_empty());
        assert_eq!(ft.stats().overflow, 2, "every refused observation counts");

        // New and finished while full: no room needed, the close is written.
        let late = fin(
            tcp(
                9,
                "10.0.0.2:41000",
                "10.0.0.9:443",
                tr(0, 0, 0, 0),
                T0 + 150,
            ),
            tr(1, 1, 1, 1),
            None,
        );
        let r = ft.observe(T0 + 200, &[late], &[]);
        assert_eq!(kinds(&r), [FlowEvent::Open, FlowEvent::Close]);

        // Room again: the refused flow is picked up with exact cumulative counts.
        third.counters = tr(40, 6, 3, 2);
        let r = ft.observe(
            T0 + 300,
            &[fin(s[0].clone(), tr(10, 1, 1, 1), None), third.clone()],
            &[],
        );
        assert_eq!(kinds(&r), [FlowEvent::Close, FlowEvent::Open]);
        assert_eq!((r[1].start, r[1].traffic()), (T0, tr(40, 6, 3, 2)));
        let r = ft.observe(T0 + 400, &[fin(third, tr(50, 6, 4, 2), None)], &[]);
        assert_eq!(r[0].traffic(), tr(50, 6, 4, 2));

        // Pending sessions take room too; beyond it a short flow is written unmerged.
        let mut ft = table(FlowConfig {
            max_flows: 2,
            ..FlowConfig::default()
        });
        let short = |c: u64, dst: &str| {
            fin(
                tcp(c, "10.0.0.2:40000", dst, tr(0, 0, 0, 0), T0),
                tr(1, 1, 1, 1),
                None,
            )
        };
        let r = ft.observe(
            T0 + 100,
            &[
                short(1, "10.0.0.7:443"),
                short(2, "10.0.0.8:443"),
                short(3, "10.0.0.9:443"),
            ],
            &[],
        );
        assert_eq!(kinds(&r), [FlowEvent::Close]);
        assert_eq!(r[0].remote.to_string(), "10.0.0.9");
        let st = ft.stats();
        assert_eq!((st.pending_sessions, st.overflow), (2, 1));
    }

    #[test]
    fn flows_ipv6_and_v4_mapped_formatting() {
        let mut ft = table(no_gap());
        let mapped = tcp(
            1,
            "[::ffff:10.0.0.2]:40000",
            "[::ffff:93.184.216.34]:443",
            tr(1, 0, 1, 0),
            T0,
        );
        let v6 = tcp(
            2,
            "[2001:db8::2]:40001",
            "[2001:db8::1]:443",
            tr(1, 0, 1, 0),
            T0,
        );
        let r = ft.observe(T0, &[mapped, v6], &[]);
        let j0 = json(&r[0]);
        assert!(j0.contains(r#""family":"ipv4","local":"10.0.0.2","local_port":40000,"remote":"93.184.216.34","remote_port":443"#), "{j0}");
        let j1 = json(&r[1]);
        assert!(j1.contains(r#""family":"ipv6","local":"2001:db8::2","local_port":40001,"remote":"2001:db8::1","remote_port":443"#), "{j1}");
        // A v4-mapped and a plain v4 connection to the same place are one session.
        let mut ft = table(FlowConfig::default());
        let a = fin(
            tcp(
                1,
                "[::ffff:10.0.0.2]:40000",
                "[::ffff:10.0.0.9]:443",
                tr(0, 0, 0, 0),
                T0,
            ),
            tr(1, 1, 1, 1),
            None,
        );
        let b = fin(
            tcp(2, "10.0.0.2:40001", "10.0.0.9:443", tr(0, 0, 0, 0), T0),
            tr(1, 1, 1, 1),
            None,
        );
        ft.observe(T0 + 100, &[a, b], &[]);
        let r = ft.observe(T0 + 5100, &[], &[]);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].connections, Some(2));
    }

    #[test]
    fn flows_json_field_names_and_order() {
        let mut ft = table(no_gap());
        let s = tcp(1, "10.0.0.2:40000", "93.184.216.34:443", tr(0, 0, 0, 0), T0);
        let mut r = ft.observe(T0 + 300, &[fin(s, tr(1180, 5300, 9, 8), Some(7))], &[]);
        // Begun and ended between two polls, opens wanted at once: open (as it started), close.
        assert_eq!(kinds(&r), [FlowEvent::Open, FlowEvent::Close]);
        assert_eq!((r[0].tx, r[0].end), (0, T0));
        let mut r = vec![r.pop().unwrap()];
        r[0].set_seq(42);
        let j = json(&r[0]);
        assert_eq!(
            j,
            r#"{"v":1,"type":"flow","agent":"a","boot":"b","seq":42,"event":"close","proto":"tcp","family":"ipv4","local":"10.0.0.2","local_port":40000,"remote":"93.184.216.34","remote_port":443,"direction":"outbound","pid":4242,"process":"curl","uid":1000,"cgroup":"user.slice/session-1.scope","netns":4026531840,"label":"curl","start":1795443814000,"end":1795443814300,"tx":1180,"rx":5300,"tx_packets":9,"rx_packets":8,"tcp_state":"CLOSE","end_reason":"closed"}"#
        );
        let back: FlowRecord = serde_json::from_str(&j).unwrap();
        assert_eq!(back, r[0]);

        // An open of an unconnected UDP peer: other protocol names, no close fields.
        let mut ft = table(no_gap());
        let mut sock = udp_unconnected(5, tr(0, 0, 0, 0), T0);
        sock.proto = 132;
        sock.direction = Direction::Unknown;
        let mut r = ft.observe(
            T0,
            &[sock],
            &[peer(5, "[2001:db8::53]:53", tr(80, 0, 1, 0))],
        );
        r[0].set_seq(43);
        assert_eq!(
            json(&r[0]),
            r#"{"v":1,"type":"flow","agent":"a","boot":"b","seq":43,"event":"open","proto":"132","family":"ipv6","local":"10.0.0.2","local_port":5300,"remote":"2001:db8::53","remote_port":53,"direction":"unknown","pid":77,"process":"resolver","uid":0,"netns":1,"label":"resolver","start":1795443814000,"end":1795443814000,"tx":80,"rx":0,"tx_packets":1,"rx_packets":0}"#
        );
    }

    #[test]
    fn flows_finish_all_flushes_everything() {
        let mut ft = table(FlowConfig::default());
        let short = tcp(1, "10.0.0.2:40000", "10.0.0.9:443", tr(0, 0, 0, 0), T0);
        let long = tcp(2, "10.0.0.2:40001", "10.0.0.9:8443", tr(10, 10, 1, 1), T0);
        ft.observe(T0, std::slice::from_ref(&long), &[]);
        let r = ft.observe(T0 + 1000, &[fin(short, tr(3, 3, 1, 1), None)], &[]);
        assert_eq!(kinds(&r), [FlowEvent::Open]);
        let young = tcp(
            3,
            "10.0.0.2:40002",
            "10.0.0.9:22",
            tr(5, 5, 1, 1),
            T0 + 1000,
        );
        ft.observe(
            T0 + 1100,
            &[young],
            &[peer(4, "8.8.8.8:53", tr(1, 1, 1, 1))],
        );
        ft.observe(
            T0 + 1200,
            &[udp_unconnected(4, tr(9, 9, 1, 1), T0)],
            &[peer(4, "8.8.8.8:53", tr(9, 9, 1, 1))],
        );
        let st = ft.stats();
        assert_eq!(
            (st.tracked, st.pending_sessions, st.orphan_peers),
            (3, 1, 1)
        );

        let r = ft.finish_all(T0 + 1500);
        assert_eq!(kinds(&r), [FlowEvent::Close; 4]);
        assert_eq!(
            (r[0].remote_port, r[0].end_reason, r[0].end),
            (Some(443), Some(EndReason::Closed), T0 + 1000)
        );
        let stopped: Vec<_> = r[1..]
            .iter()
            .map(|r| (r.remote_port, r.end_reason, r.end))
            .collect();
        let stop = Some(EndReason::AgentStopped);
        assert_eq!(
            stopped,
            [
                (Some(8443), stop, T0 + 1500),
                (Some(22), stop, T0 + 1500),
                (Some(53), stop, T0 + 1500)
            ]
        );
        assert_eq!(r[3].traffic(), tr(9, 9, 1, 1));
        let st = ft.stats();
        assert_eq!(
            (st.tracked, st.pending_sessions, st.queued, st.closes),
            (0, 0, 0, 4)
        );
        assert!(ft.observe(T0 + 20_000, &[], &[]).is_empty());
    }

    #[test]
    fn flows_records_per_tick_capped_none_lost() {
        let cfg = FlowConfig {
            max_records_per_tick: 10,
            ..no_gap()
        };
        let mut ft = table(cfg);
        let views: Vec<_> = (0..25u64)
            .map(|i| {
                fin(
                    tcp(
                        i + 1,
                        &format!("10.0.0.2:{}", 40000 + i),
                        "10.0.0.9:443",
                        tr(0, 0, 0, 0),
                        T0,
                    ),
                    tr(1, 1, 1, 1),
                    None,
                )
            })
            .collect();
        // 25 connections begun and ended between polls: an open and a close each.
        let sizes: Vec<usize> = (0..7)
            .map(|k| {
                ft.observe(T0 + k * 100, if k == 0 { &views } else { &[] }, &[])
                    .len()
            })
            .collect();
        assert_eq!(sizes, [10, 10, 10, 10, 10, 0, 0]);

        // Opens are held back while records wait, so the backlog stays within a tick's worth.
        let live: Vec<_> = (0..25u64)
            .map(|i| {
                tcp(
                    100 + i,
                    &format!("10.0.0.2:{}", 41000 + i),
                    "10.0.0.9:443",
                    tr(1, 1, 1, 1),
                    T0,
                )
            })
            .collect();
        let mut opens = 0;
        for k in 0..4 {
            let r = ft.observe(T0 + 1000 + k * 100, if k == 0 { &live } else { &[] }, &[]);
            assert!(r.len() <= 10);
            assert!(ft.stats().queued <= 10);
            opens += r.len();
        }
        assert_eq!(opens, 25);
        assert_eq!(
            ft.stats().opens,
            50,
            "25 opens written with the closes above, 25 here"
        );
    }

    #[test]
    fn flows_reconnect_and_orphans() {
        let mut ft = table(no_gap());
        let mut s = tcp(9, "10.0.0.2:40000", "10.0.0.53:53", tr(60, 120, 1, 1), T0);
        s.proto = 17;
        assert_eq!(
            kinds(&ft.observe(T0, std::slice::from_ref(&s), &[])),
            [FlowEvent::Open]
        );
        s.remote = Some(addr("10.0.0.54:53"));
        s.counters = tr(100, 200, 2, 2);
        let r = ft.observe(
            T0 + 100,
            std::slice::from_ref(&s),
            &[peer(9, "10.0.0.54:53", tr(40, 80, 1, 1))],
        );
        assert_eq!(kinds(&r), [FlowEvent::Close, FlowEvent::Open]);
        assert_eq!(
            (r[0].traffic(), r[0].end_reason),
            (tr(60, 120, 1, 1), Some(EndReason::Reconnected))
        );
        assert_eq!(
            (r[1].traffic(), r[1].remote.to_string().as_str()),
            (tr(40, 80, 1, 1), "10.0.0.54")
        );
        assert_eq!(
            ft.stats().orphan_peers,
            0,
            "peers of a connected socket are ignored"
        );
        ft.observe(T0 + 200, &[], &[peer(77, "10.0.0.1:1", tr(1, 1, 1, 1))]);
        assert_eq!(ft.stats().orphan_peers, 1);
    }

    #[test]
    fn flows_config_section() {
        assert_eq!(
            FlowConfig::from_section(&FlowsSection::default()).unwrap(),
            FlowConfig::default()
        );
        let s: FlowsSection = toml::from_str(
            r#"
            enabled = true
            open_after_ms = 2000
            update_every_ms = 0
            udp_idle_ms = 60000
            consolidate_gap_ms = 0
            raw_labels = ["dns"]
            events = ["close"]
            protocols = ["tcp", 132]
            labels = ["nginx"]
            ports = [443, "8000-8100"]
            cidrs = ["10.0.0.0/8", "fd00::/8", "192.0.2.1"]
            max_flows = 1000
            max_records_per_tick = 500
            "#,
        )
        .unwrap();
        let c = FlowConfig::from_section(&s).unwrap();
        assert_eq!(
            c.events,
            EventSet {
                open: false,
                update: false,
                close: true
            }
        );
        assert_eq!(c.protocols, [Protocol::Tcp, Protocol::Number(132)]);
        assert_eq!(
            c.ports,
            [
                PortRange {
                    start: 443,
                    end: 443
                },
                PortRange {
                    start: 8000,
                    end: 8100
                }
            ]
        );
        assert_eq!(c.cidrs.len(), 3);
        assert_eq!(
            (c.max_flows, c.max_records_per_tick, c.update_every_ms),
            (1000, 500, 0)
        );

        let de = |t: &str| toml::from_str::<FlowsSection>(t).unwrap_err().to_string();
        assert!(de("colour = 1").contains("unknown field"));
        assert!(de(r#"events = ["opn"]"#).contains("unknown variant"));
        assert!(de(r#"protocols = ["sctp"]"#).contains("unknown protocol"));
        let bad = |f: fn(&mut FlowsSection)| {
            let mut s = FlowsSection::default();
            f(&mut s);
            FlowConfig::from_section(&s).unwrap_err()
        };
        assert_eq!(
            bad(|s| s.udp_idle_ms = 0),
            "flows.udp_idle_ms: 0 is out of range (1000..=86400000 ms)"
        );
        assert!(bad(|s| s.events.clear()).starts_with("flows.events: is empty"));
        assert!(
            bad(|s| s.cidrs = vec!["10.0.0.0/33".into()])
                .starts_with(r#"flows.cidrs: "10.0.0.0/33" is not a valid CIDR"#)
        );
        assert!(bad(|s| s.max_flows = 0).starts_with("flows.max_flows: 0 is out of range"));
        assert!(
            bad(|s| s.update_every_ms = 10)
                .starts_with("flows.update_every_ms: 10 is out of range")
        );
        assert!(bad(|s| s.labels = vec![String::new()]).starts_with("flows.labels: entry 1"));
        assert!(bad(|s| s.consolidate_gap_ms = 3_600_000).starts_with("flows.consolidate_gap_ms"));
    }
}
