//! Per-flow state: connected sockets, peers of unconnected ones, pending sessions, and
//! the records a tick produces.
use super::*;

pub(super) fn canon(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

pub(super) fn sub(a: Traffic, b: Traffic) -> Traffic {
    Traffic {
        tx: a.tx.saturating_sub(b.tx),
        rx: a.rx.saturating_sub(b.rx),
        tx_packets: a.tx_packets.saturating_sub(b.tx_packets),
        rx_packets: a.rx_packets.saturating_sub(b.rx_packets),
    }
}

pub(super) fn add(a: &mut Traffic, b: Traffic) {
    a.tx = a.tx.saturating_add(b.tx);
    a.rx = a.rx.saturating_add(b.rx);
    a.tx_packets = a.tx_packets.saturating_add(b.tx_packets);
    a.rx_packets = a.rx_packets.saturating_add(b.rx_packets);
}

pub(super) fn at_least(a: Traffic, b: Traffic) -> bool {
    a.tx >= b.tx && a.rx >= b.rx && a.tx_packets >= b.tx_packets && a.rx_packets >= b.rx_packets
}

/// What is the same for every flow of a socket.
#[derive(Debug, Clone)]
pub(super) struct Meta {
    pub(super) proto: u8,
    pub(super) local: SocketAddr,
    pub(super) direction: Direction,
    pub(super) owner: OwnerView,
    pub(super) label: Arc<str>,
}

impl Meta {
    pub(super) fn from_view(s: &SocketView) -> Meta {
        Meta {
            proto: s.proto,
            local: canon(s.local),
            direction: s.direction,
            owner: s.owner.clone(),
            label: s.label.clone(),
        }
    }

    /// Owner and label may be refined later (accepted sockets, the `label` command).
    pub(super) fn refresh(&mut self, s: &SocketView) {
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
pub(super) struct Track {
    pub(super) serial: u64,
    pub(super) remote: SocketAddr,
    pub(super) start_ms: u64,
    /// Subtracted from the cumulative counters (reconnects, reused peers).
    pub(super) base: Traffic,
    /// Added: what the flow had before its counters restarted from zero.
    pub(super) carry: Traffic,
    /// Last cumulative counters seen.
    pub(super) cum: Traffic,
    /// Flow counts in the last open/update record.
    pub(super) reported: Traffic,
    pub(super) last_move_ms: u64,
    /// The `open` point passed (record written, or not wanted).
    pub(super) opened: bool,
    pub(super) next_update_ms: u64,
    pub(super) wake_ms: Option<u64>,
    pub(super) tcp_state: Option<u8>,
}

impl Track {
    pub(super) fn new(
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

    pub(super) fn counts(&self) -> Traffic {
        let mut c = sub(self.cum, self.base);
        add(&mut c, self.carry);
        c
    }

    pub(super) fn note(&mut self, cum: Traffic, now: u64) {
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
pub(super) struct Conn {
    pub(super) meta: Meta,
    pub(super) t: Track,
}

#[derive(Debug)]
pub(super) enum PeerState {
    Live(Track),
    /// Idle-closed: the cumulative counters at the close, the baseline of the next flow.
    Dormant {
        last: Traffic,
        serial: u64,
    },
}

#[derive(Debug)]
pub(super) struct Unconn {
    pub(super) meta: Meta,
    /// The socket's own cumulative counters (baseline if it connects later).
    pub(super) sock_cum: Traffic,
    pub(super) peers: HashMap<SocketAddr, PeerState>,
}

/// (wake ms, serial, cookie, peer)
pub(super) type Timer = (u64, u64, u64, Option<SocketAddr>);

#[derive(Debug, Default)]
pub(super) struct Flows {
    pub(super) conns: HashMap<u64, Conn>,
    pub(super) unconns: HashMap<u64, Unconn>,
    pub(super) live_peers: usize,
    pub(super) dormant: usize,
    /// Idle-closed peers, oldest first: (cookie, peer, serial). May hold stale entries.
    pub(super) dormant_queue: VecDeque<(u64, SocketAddr, u64)>,
    /// One live entry per flow with a wake time; stale ones are skipped.
    pub(super) timers: BinaryHeap<Reverse<Timer>>,
    /// Flows whose open or update record waits for room in the outbox, oldest first:
    /// (serial, cookie, peer). Served before the timers, and only while there is room, so
    /// a backlog costs nothing per tick for the flows still waiting.
    pub(super) deferred: VecDeque<(u64, u64, Option<SocketAddr>)>,
}

impl Flows {
    pub(super) fn live(&self) -> usize {
        self.conns.len() + self.live_peers
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct SessionKey {
    pub(super) proto: u8,
    pub(super) label: Arc<str>,
    pub(super) direction: Direction,
    pub(super) src: IpAddr,
    pub(super) dst: IpAddr,
    pub(super) dst_port: u16,
}

impl SessionKey {
    /// Source is the local end unless the flow was accepted.
    pub(super) fn new(meta: &Meta, remote: SocketAddr) -> SessionKey {
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
pub(super) struct Session {
    pub(super) key: SessionKey,
    pub(super) rec: FlowRecord,
    pub(super) connections: u64,
    pub(super) last_join_ms: u64,
}

pub(super) fn keep_if_equal<T: PartialEq>(a: &mut Option<T>, b: Option<T>) {
    if *a != b {
        *a = None;
    }
}

impl Session {
    pub(super) fn merge(&mut self, r: FlowRecord, now: u64) {
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

pub(super) fn build(meta: &Meta, t: &Track, event: FlowEvent, end: u64) -> FlowRecord {
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
        process: Some(meta.owner.process.to_string()),
        uid: Some(meta.owner.uid),
        cgroup: meta.owner.cgroup.as_deref().map(str::to_owned),
        netns: Some(meta.owner.netns),
        label: meta.label.to_string(),
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

pub(super) enum Wake {
    At(Option<u64>),
    Idle,
    /// A record is due but the outbox already holds a tick's worth: wait in the deferred
    /// queue, which is served (oldest first) as the outbox drains.
    Deferred,
}

/// `Track::wake_ms` of a flow waiting in the deferred queue.
pub(super) const WAKE_DEFERRED: u64 = 0;

/// Output side: filters, records waiting to be returned, pending sessions.
#[derive(Debug)]
pub(super) struct Out {
    pub(super) cfg: FlowConfig,
    pub(super) outbox: VecDeque<FlowRecord>,
    pub(super) sessions: HashMap<u64, Session>,
    pub(super) session_index: HashMap<SessionKey, u64>,
    /// (deadline, session id); re-pushed lazily when a session was joined since.
    pub(super) session_timers: BinaryHeap<Reverse<(u64, u64)>>,
    pub(super) next_session: u64,
    pub(super) c: RecordTotals,
}

impl Out {
    pub(super) fn room(&self, live: usize) -> bool {
        live.saturating_add(self.sessions.len()) < self.cfg.max_flows
    }

    /// A new flow: filtered out, closed at once (a socket new and finished in the same
    /// interval), refused (table full), or returned to be tracked with its wake time set.
    pub(super) fn begin(
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

    pub(super) fn next_wake(&self, meta: &Meta, t: &Track, peer: bool) -> Option<u64> {
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
    pub(super) fn due(&mut self, meta: &Meta, t: &mut Track, now: u64, peer: bool) -> Wake {
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
        if deferred {
            return Wake::Deferred;
        }
        let next = self.next_wake(meta, t, peer);
        Wake::At(next.map(|w| w.max(now.saturating_add(1))))
    }

    /// A flow ended: its `close` goes out now, or into a pending session.
    pub(super) fn close(
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

    pub(super) fn emit_session(&mut self, mut s: Session) {
        if s.connections >= 2 {
            s.rec.connections = Some(s.connections);
            self.c.sessions += 1;
            self.c.merged_connections += s.connections;
        }
        self.outbox.push_back(s.rec);
    }

    /// Sessions nobody joined for `consolidate_gap_ms`.
    pub(super) fn expire_sessions(&mut self, now: u64) {
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

    pub(super) fn flush_sessions(&mut self) {
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
