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
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use crate::config::flows::{
    DEFAULT_CONSOLIDATE_GAP_MS, DEFAULT_MAX_FLOWS, DEFAULT_MAX_RECORDS_PER_TICK,
    DEFAULT_OPEN_AFTER_MS, DEFAULT_UDP_IDLE_MS, DEFAULT_UPDATE_EVERY_MS, FlowEvent, FlowsSection,
};
use crate::config::{PortRange, Protocol, parse_cidr};
use crate::event::{FORMAT_VERSION, Identity, Traffic};

mod config;
#[cfg(test)]
mod heap;
mod record;
mod state;
#[cfg(test)]
mod tests;

pub use config::{EventSet, FlowConfig};
pub use record::{ConnSample, EndReason, Family, FlowRecord, proto_name, tcp_state_name};
use state::*;

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

/// The owner of a socket as the labeler knows it. Names are shared (`Arc<str>`): 100k
/// flows of one process hold one copy of its name, its cgroup path and its label.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerView {
    pub pid: u32,
    pub process: Arc<str>,
    pub uid: u32,
    /// cgroup path below the cgroup2 root, when known.
    pub cgroup: Option<Arc<str>>,
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
    pub label: Arc<str>,
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
    /// Flows whose due open/update record waits for room (written as `queued` drains).
    pub deferred: u64,
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

/// Records written and observations refused, since start (the totals of [`FlowStats`]).
#[derive(Debug, Default)]
struct RecordTotals {
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
// The table
// ---------------------------------------------------------------------------------------

/// Turns per-interval socket observations into flow records.
#[derive(Debug)]
pub struct FlowTable {
    flows: Flows,
    out: Out,
    next_serial: u64,
    /// Entries held at the last heap trim (or the most since): see `give_back_room`.
    trim_mark: usize,
}

impl FlowTable {
    pub fn new(cfg: FlowConfig) -> FlowTable {
        FlowTable {
            flows: Flows::default(),
            out: Out {
                cfg,
                outbox: VecDeque::new(),
                sessions: HashMap::new(),
                session_index: HashMap::new(),
                session_timers: BinaryHeap::new(),
                next_session: 0,
                c: RecordTotals::default(),
            },
            next_serial: 0,
            trim_mark: 0,
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
        let recs = self.drain(self.out.cfg.max_records_per_tick);
        self.give_back_room();
        recs
    }

    /// After a burst (a mass close, or any local user opening and closing many sockets)
    /// the tables keep their peak capacity unless told: shrink each one that holds less
    /// than a quarter of it, so the memory goes back (keeping 2x headroom).
    fn give_back_room(&mut self) {
        fn map<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V>) {
            if m.capacity() > 4096 && m.len() < m.capacity() / 4 {
                m.shrink_to(m.len() * 2);
            }
        }
        fn deque<T>(q: &mut VecDeque<T>) {
            if q.capacity() > 4096 && q.len() < q.capacity() / 4 {
                q.shrink_to(q.len() * 2);
            }
        }
        map(&mut self.flows.conns);
        map(&mut self.flows.unconns);
        map(&mut self.out.sessions);
        map(&mut self.out.session_index);
        deque(&mut self.flows.dormant_queue);
        deque(&mut self.flows.deferred);
        deque(&mut self.out.outbox);
        let t = &mut self.flows.timers;
        if t.capacity() > 4096 && t.len() < t.capacity() / 4 {
            t.shrink_to(t.len() * 2);
        }
        let t = &mut self.out.session_timers;
        if t.capacity() > 4096 && t.len() < t.capacity() / 4 {
            t.shrink_to(t.len() * 2);
        }
        // The flows' own small blocks go back once the table fell to half its mark.
        let n = self.flows.conns.len() + self.flows.unconns.len() + self.out.sessions.len();
        self.trim_mark = self.trim_mark.max(n);
        if n < self.trim_mark / 2 {
            self.trim_mark = n;
            crate::process::release_free_heap();
        }
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

    /// Live samples (`type: "conn"`) of the connections in this tick's views, for the
    /// record stream; call after [`FlowTable::observe`] with the same views.
    pub fn conn_samples(&self, now: u64, socks: &[SocketView], peers: &[PeerView]) -> Vec<u8> {
        record::conn_sample_lines(now, socks, peers, |cookie| {
            self.flows.unconns.get(&cookie).map(|u| (&u.meta).into())
        })
    }

    pub fn stats(&self) -> FlowStats {
        let c = &self.out.c;
        FlowStats {
            tracked: self.flows.live() as u64,
            pending_sessions: self.out.sessions.len() as u64,
            dormant_peers: self.flows.dormant as u64,
            queued: self.out.outbox.len() as u64,
            deferred: self.flows.deferred.len() as u64,
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

    /// Fires the timer of one flow (if it is still the flow's current one: `wake`).
    /// Returns false when its record had to be deferred.
    fn fire(
        &mut self,
        serial: u64,
        cookie: u64,
        peer: Option<SocketAddr>,
        wake: u64,
        now: u64,
    ) -> bool {
        match peer {
            None => {
                let Some(c) = self.flows.conns.get_mut(&cookie) else {
                    return true;
                };
                if c.t.serial != serial || c.t.wake_ms != Some(wake) {
                    return true;
                }
                match self.out.due(&c.meta, &mut c.t, now, false) {
                    Wake::At(w) => {
                        c.t.wake_ms = w;
                        if let Some(w) = w {
                            self.flows.timers.push(Reverse((w, serial, cookie, None)));
                        }
                    }
                    Wake::Deferred => {
                        c.t.wake_ms = Some(WAKE_DEFERRED);
                        self.flows.deferred.push_back((serial, cookie, None));
                        return false;
                    }
                    Wake::Idle => {}
                }
            }
            Some(addr) => {
                let Some(u) = self.flows.unconns.get_mut(&cookie) else {
                    return true;
                };
                let Some(PeerState::Live(t)) = u.peers.get_mut(&addr) else {
                    return true;
                };
                if t.serial != serial || t.wake_ms != Some(wake) {
                    return true;
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
                    Wake::Deferred => {
                        t.wake_ms = Some(WAKE_DEFERRED);
                        self.flows.deferred.push_back((serial, cookie, Some(addr)));
                        return false;
                    }
                    Wake::Idle => {
                        let dormant = PeerState::Dormant {
                            last: t.cum,
                            serial,
                        };
                        let Some(PeerState::Live(t)) = u.peers.insert(addr, dormant) else {
                            return true;
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
        true
    }

    fn run_timers(&mut self, now: u64) {
        // Deferred records first, oldest first, while the outbox has room.
        while self.out.outbox.len() < self.out.cfg.max_records_per_tick {
            let Some((serial, cookie, peer)) = self.flows.deferred.pop_front() else {
                break;
            };
            if !self.fire(serial, cookie, peer, WAKE_DEFERRED, now) {
                // Deferred again: back to the front, it is still the oldest. The outbox
                // is full: stop here.
                if let Some(x) = self.flows.deferred.pop_back() {
                    self.flows.deferred.push_front(x);
                }
                break;
            }
        }
        while let Some(&Reverse(top)) = self.flows.timers.peek() {
            let (wake, serial, cookie, peer) = top;
            if wake > now {
                break;
            }
            self.flows.timers.pop();
            self.fire(serial, cookie, peer, wake, now);
        }
        // Stale entries (flows closed before their wake) are bounded by the churn of one
        // open_after/update period; rebuild if they ever dominate.
        if self.flows.timers.len() > 2 * self.flows.live() + 1024 {
            let mut v: Vec<Reverse<Timer>> = Vec::with_capacity(self.flows.live());
            for (&cookie, c) in &self.flows.conns {
                // Flows in the deferred queue have no timer.
                if let Some(w) = c.t.wake_ms.filter(|&w| w != WAKE_DEFERRED) {
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
                        && *w != WAKE_DEFERRED
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
        for r in self.out.outbox.drain(..n) {
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
