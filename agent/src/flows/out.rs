//! Output side: records waiting to be returned (compact, built into [`FlowRecord`]s only
//! when returned), pending sessions, and the open/update/close decisions.
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::compact::*;
use super::state::*;
use super::*;

/// A record waiting in the outbox: everything it says, with names as held ids.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    pub(super) counts: Traffic,
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) meta: Meta,
    pub(super) remote: Addr,
    pub(super) event: FlowEvent,
    pub(super) reason: Option<EndReason>,
    pub(super) tcp_state: Option<u8>,
}

impl Pending {
    /// Takes references on the names it carries.
    pub(super) fn new(
        names: &mut Names,
        meta: &Meta,
        t: &Track,
        counts: Traffic,
        event: FlowEvent,
        end: u64,
    ) -> Pending {
        names.owners.acquire(meta.owner);
        names.labels.acquire(meta.label);
        names.hold_addr(meta.local);
        names.hold_addr(t.remote);
        Pending {
            counts,
            start: t.start_ms,
            end: end.max(t.start_ms),
            meta: *meta,
            remote: t.remote,
            event,
            reason: None,
            tcp_state: None,
        }
    }

    pub(super) fn release(&self, names: &mut Names) {
        names.owners.release(self.meta.owner);
        names.labels.release(self.meta.label);
        names.drop_addr(self.meta.local);
        names.drop_addr(self.remote);
    }
}

#[derive(Debug)]
pub(super) enum Entry {
    Flow(Pending),
    Session(Box<Session>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct SessionKey {
    proto: u8,
    label: u32,
    direction: Direction,
    /// Ports zeroed: the source is matched by address only.
    src: Addr,
    dst: Addr,
}

impl SessionKey {
    /// Source is the local end unless the flow was accepted.
    fn new(p: &Pending) -> SessionKey {
        let ip = |a: Addr| Addr { port: 0, ..a };
        let (src, dst) = match p.meta.direction {
            Direction::Inbound => (ip(p.remote), p.meta.local),
            Direction::Outbound | Direction::Unknown => (ip(p.meta.local), p.remote),
        };
        SessionKey {
            proto: p.meta.proto,
            label: p.meta.label,
            direction: p.meta.direction,
            src,
            dst,
        }
    }
}

// Session::dropped: fields the merged connections disagree on (left out of the record).
const D_LOCAL_PORT: u16 = 1;
const D_REMOTE_PORT: u16 = 2;
const D_PID: u16 = 4;
const D_PROCESS: u16 = 8;
const D_UID: u16 = 16;
const D_CGROUP: u16 = 32;
const D_NETNS: u16 = 64;
const D_TCP_STATE: u16 = 128;
const D_REASON: u16 = 256;

#[derive(Debug)]
pub(super) struct Session {
    key: SessionKey,
    /// The first connection's record, with start, end and counts of them all.
    rec: Pending,
    dropped: u16,
    connections: u64,
    last_join_ms: u64,
}

impl Session {
    fn merge(&mut self, names: &mut Names, r: Pending, now: u64) {
        let s = &mut self.rec;
        s.start = s.start.min(r.start);
        s.end = s.end.max(r.end);
        add(&mut s.counts, r.counts);
        let mut d = 0;
        match s.meta.direction {
            Direction::Inbound if s.remote.port != r.remote.port => d |= D_REMOTE_PORT,
            Direction::Outbound | Direction::Unknown if s.meta.local.port != r.meta.local.port => {
                d |= D_LOCAL_PORT
            }
            _ => {}
        }
        if s.meta.owner != r.meta.owner {
            let (a, b) = (
                names.owners.get(s.meta.owner),
                names.owners.get(r.meta.owner),
            );
            for (differ, flag) in [
                (a.pid != b.pid, D_PID),
                (a.process != b.process, D_PROCESS),
                (a.uid != b.uid, D_UID),
                (a.cgroup != b.cgroup, D_CGROUP),
                (a.netns != b.netns, D_NETNS),
            ] {
                if differ {
                    d |= flag;
                }
            }
        }
        if s.tcp_state != r.tcp_state {
            d |= D_TCP_STATE;
        }
        if s.reason != r.reason {
            d |= D_REASON;
        }
        self.dropped |= d;
        self.connections += 1;
        self.last_join_ms = now;
        r.release(names);
    }
}

pub(super) enum Wake {
    At(Option<u64>),
    Idle,
    /// A record is due but the outbox already holds a tick's worth: wait in the deferred
    /// queue, which is served (oldest first) as the outbox drains.
    Deferred,
}

/// Records written and observations refused, since start (the totals of [`FlowStats`]).
#[derive(Debug, Default)]
pub(super) struct RecordTotals {
    pub(super) opens: u64,
    pub(super) updates: u64,
    pub(super) closes: u64,
    pub(super) sessions: u64,
    pub(super) merged_connections: u64,
    pub(super) filtered: u64,
    pub(super) overflow: u64,
    pub(super) evicted_peer_bases: u64,
    pub(super) orphan_peers: u64,
}

#[derive(Debug)]
pub(super) struct Out {
    pub(super) cfg: FlowConfig,
    pub(super) outbox: VecDeque<Entry>,
    pub(super) sessions: HashMap<u64, Session>,
    pub(super) session_index: HashMap<SessionKey, u64>,
    /// (deadline, session id); re-pushed lazily when a session was joined since.
    pub(super) session_timers: BinaryHeap<Reverse<(u64, u64)>>,
    pub(super) next_session: u64,
    pub(super) c: RecordTotals,
}

impl Out {
    pub(super) fn new(cfg: FlowConfig) -> Out {
        Out {
            cfg,
            outbox: VecDeque::new(),
            sessions: HashMap::new(),
            session_index: HashMap::new(),
            session_timers: BinaryHeap::new(),
            next_session: 0,
            c: RecordTotals::default(),
        }
    }

    pub(super) fn room(&self, live: usize) -> bool {
        live.saturating_add(self.sessions.len()) < self.cfg.max_flows
    }

    pub(super) fn backlog(&self) -> bool {
        self.outbox.len() >= self.cfg.max_records_per_tick
    }

    pub(super) fn next_wake(&self, label: &str, t: &Track, peer: bool, now: u64) -> Option<u64> {
        let mut w: Option<u64> = None;
        let mut at = |x: u64| w = Some(w.map_or(x, |y| y.min(x)));
        if !t.has(F_OPENED) {
            at(t.start_ms.saturating_add(self.cfg.open_delay_ms(label)));
        } else if self.cfg.updates() {
            at(unwrap_near(now, t.next_update));
        }
        if peer {
            at(t.last_move_ms(now).saturating_add(self.cfg.udp_idle_ms));
        }
        w
    }

    /// A flow's timer fired: idle, open, update; returns its next wake.
    pub(super) fn due(
        &mut self,
        names: &mut Names,
        adjs: &Adjs,
        meta: &Meta,
        t: &mut Track,
        now: u64,
        peer: bool,
    ) -> Wake {
        if peer && now >= t.last_move_ms(now).saturating_add(self.cfg.udp_idle_ms) {
            return Wake::Idle;
        }
        let backlog = self.backlog();
        let label = names.labels.get(meta.label).clone();
        let mut deferred = false;
        if !t.has(F_OPENED) {
            if now >= t.start_ms.saturating_add(self.cfg.open_delay_ms(&label)) {
                if self.cfg.events.open {
                    if backlog {
                        deferred = true;
                    } else {
                        let p = Pending::new(names, meta, t, t.counts(adjs), FlowEvent::Open, now);
                        self.outbox.push_back(Entry::Flow(p));
                        t.set(F_DIRTY, false);
                    }
                }
                if !deferred {
                    t.set(F_OPENED, true);
                    t.next_update = wrap(now.saturating_add(self.cfg.update_every_ms));
                }
            }
        } else if self.cfg.updates() && now >= unwrap_near(now, t.next_update) {
            if t.has(F_DIRTY) {
                if backlog {
                    deferred = true;
                } else {
                    let c = t.counts(adjs);
                    let p = Pending::new(names, meta, t, c, FlowEvent::Update, now);
                    self.outbox.push_back(Entry::Flow(p));
                    t.set(F_DIRTY, false);
                }
            }
            if !deferred {
                t.next_update = wrap(now.saturating_add(self.cfg.update_every_ms));
            }
        }
        if deferred {
            return Wake::Deferred;
        }
        let next = self.next_wake(&label, t, peer, now);
        Wake::At(next.map(|w| w.max(now.saturating_add(1))))
    }

    /// A flow ended: its `close` goes out now, or into a pending session. Returns whether
    /// a record carries its traffic (false: `close` is not in `events`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn close(
        &mut self,
        names: &mut Names,
        adjs: &Adjs,
        meta: &Meta,
        t: &Track,
        reason: EndReason,
        end: u64,
        now: u64,
        live: usize,
    ) -> bool {
        if !self.cfg.events.close {
            return false;
        }
        let mut rec = Pending::new(names, meta, t, t.counts(adjs), FlowEvent::Close, end);
        rec.reason = Some(reason);
        if meta.proto == IPPROTO_TCP {
            rec.tcp_state = t.tcp_state;
        }
        let label = names.labels.get(meta.label);
        let opened = t.has(F_OPENED);
        let merge = self.cfg.consolidates(label)
            && !opened
            && matches!(reason, EndReason::Closed | EndReason::Idle);
        if !merge {
            // A flow that began and ended between two polls never had its open written;
            // when opens are wanted at once (open_after_ms = 0), write it now, as it was at
            // the start: nothing counted yet.
            if !opened && self.cfg.events.open && self.cfg.open_delay_ms(label) == 0 {
                let open = Pending::new(
                    names,
                    meta,
                    t,
                    Traffic::default(),
                    FlowEvent::Open,
                    t.start_ms,
                );
                self.outbox.push_back(Entry::Flow(open));
            }
            self.outbox.push_back(Entry::Flow(rec));
            return true;
        }
        let key = SessionKey::new(&rec);
        let gap = self.cfg.consolidate_gap_ms;
        if let Some(&id) = self.session_index.get(&key) {
            if let Some(s) = self
                .sessions
                .get_mut(&id)
                .filter(|s| rec.start <= s.rec.end.saturating_add(gap))
            {
                s.merge(names, rec, now);
                return true;
            }
            // Too far apart: that session is complete; this flow starts the next one in
            // its place (no new room needed).
            self.session_index.remove(&key);
            if let Some(s) = self.sessions.remove(&id) {
                self.emit_session(s);
            }
        } else if !self.room(live) {
            self.c.overflow += 1;
            self.outbox.push_back(Entry::Flow(rec));
            return true;
        }
        let id = self.next_session;
        self.next_session += 1;
        self.session_index.insert(key, id);
        self.sessions.insert(
            id,
            Session {
                key,
                rec,
                dropped: 0,
                connections: 1,
                last_join_ms: now,
            },
        );
        self.session_timers
            .push(Reverse((now.saturating_add(gap), id)));
        true
    }

    fn emit_session(&mut self, s: Session) {
        if s.connections >= 2 {
            self.c.sessions += 1;
            self.c.merged_connections += s.connections;
            self.outbox.push_back(Entry::Session(Box::new(s)));
        } else {
            // A session of one connection is an ordinary close.
            self.outbox.push_back(Entry::Flow(s.rec));
        }
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

    /// Up to `limit` records, oldest first, built now and their names let go.
    pub(super) fn drain(&mut self, names: &mut Names, limit: usize) -> Vec<FlowRecord> {
        let n = limit.min(self.outbox.len());
        let mut v = Vec::with_capacity(n);
        for e in self.outbox.drain(..n) {
            let r = match e {
                Entry::Flow(p) => {
                    let r = build(names, &p, 0, None);
                    p.release(names);
                    r
                }
                Entry::Session(s) => {
                    let r = build(names, &s.rec, s.dropped, Some(s.connections));
                    s.rec.release(names);
                    r
                }
            };
            match r.event {
                FlowEvent::Open => self.c.opens += 1,
                FlowEvent::Update => self.c.updates += 1,
                FlowEvent::Close => self.c.closes += 1,
            }
            v.push(r);
        }
        v
    }
}

fn build(names: &Names, p: &Pending, dropped: u16, connections: Option<u64>) -> FlowRecord {
    let keep = |flag: u16| dropped & flag == 0;
    let owner = names.owners.get(p.meta.owner);
    let remote = names.ip(p.remote);
    FlowRecord {
        v: FORMAT_VERSION,
        kind: "flow".into(),
        agent: String::new(),
        boot: String::new(),
        seq: 0,
        event: p.event,
        proto: proto_name(p.meta.proto),
        family: if remote.is_ipv4() {
            Family::Ipv4
        } else {
            Family::Ipv6
        },
        local: names.ip(p.meta.local),
        local_port: keep(D_LOCAL_PORT).then_some(p.meta.local.port),
        remote,
        remote_port: keep(D_REMOTE_PORT).then_some(p.remote.port),
        direction: p.meta.direction,
        pid: keep(D_PID).then_some(owner.pid),
        process: keep(D_PROCESS).then(|| owner.process.to_string()),
        uid: keep(D_UID).then_some(owner.uid),
        cgroup: owner
            .cgroup
            .as_deref()
            .filter(|_| keep(D_CGROUP))
            .map(str::to_owned),
        netns: keep(D_NETNS).then_some(owner.netns),
        label: names.labels.get(p.meta.label).to_string(),
        start: p.start,
        end: p.end,
        tx: p.counts.tx,
        rx: p.counts.rx,
        tx_packets: p.counts.tx_packets,
        rx_packets: p.counts.rx_packets,
        tcp_state: p
            .tcp_state
            .filter(|_| keep(D_TCP_STATE))
            .map(tcp_state_name),
        end_reason: p.reason.filter(|_| keep(D_REASON)),
        connections,
    }
}

#[cfg(test)]
impl Out {
    /// Every record waiting (outbox and sessions): what holds names besides the slots.
    pub(super) fn pendings(&self) -> Vec<Pending> {
        let outbox = self.outbox.iter().map(|e| match e {
            Entry::Flow(p) => *p,
            Entry::Session(s) => s.rec,
        });
        outbox
            .chain(self.sessions.values().map(|s| s.rec))
            .collect()
    }
}
