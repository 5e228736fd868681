//! The flow table: slots, the per-call work (finished sockets, timers), shutdown, stats.
use super::compact::*;
use super::ledger::SockLedger;
use super::out::*;
use super::state::*;
use super::*;
use crate::poller::IntMap;

/// Timer and deferred-queue ids: a peer slot has this bit set, a socket slot not.
pub(super) const PEER: u32 = 1 << 31;

/// Finished sockets (counting each peer of an unconnected one) settled per call; the
/// rest wait, in order, for the next calls. Settling one is a close (a compact outbox
/// entry or a session merge) and freeing its slot, well under a microsecond, so a call
/// stays within a few ms; at 100 ms ticks 100k sockets that finish together are settled
/// within 2 s. Records still go out at `max_records_per_tick` per call: 5x that by
/// default, so settling is never what holds the closes back.
pub(super) const FINISH_PER_CALL: usize = 5000;

/// Turns per-interval socket observations into flow records.
#[derive(Debug)]
pub struct FlowTable {
    pub(super) socks: Slab<Sock>,
    pub(super) peers: Slab<Peer>,
    /// Socket cookie -> socket slot.
    pub(super) by_cookie: IdxTable,
    /// (socket slot, remote) -> peer slot.
    pub(super) by_peer: IdxTable,
    pub(super) adjs: Adjs,
    pub(super) names: Names,
    pub(super) wheel: Wheel,
    /// Flows whose open or update record waits for room in the outbox, oldest first.
    /// Served before the timers, and only while there is room, so a backlog costs nothing
    /// per tick for the flows still waiting.
    pub(super) deferred: VecDeque<u32>,
    /// Finished sockets waiting to be settled, oldest first.
    pub(super) finishing: VecDeque<u32>,
    /// Idle-closed peers, oldest first: (peer slot, its dormant number). May hold stale
    /// entries.
    pub(super) dormant_queue: VecDeque<(u32, u32)>,
    pub(super) dormant_seq: u32,
    /// Live connected flows (not counting finished sockets), live peers, dormant peers.
    pub(super) live_socks: usize,
    pub(super) live_peers: usize,
    pub(super) dormant: usize,
    /// Per socket slot, for sockets that had a flow end or traffic filtered.
    pub(super) ledgers: IntMap<u32, SockLedger>,
    pub(super) ledger: FlowLedger,
    pub(super) out: Out,
    /// Slots and sessions held at the last heap trim (or the most since).
    trim_mark: usize,
    /// Slots held at the last trim of the indexes (or the most since).
    room_mark: usize,
    /// Moving survivors of a mass close to the front of the slabs.
    packing_socks: bool,
    packing_peers: bool,
}

impl FlowTable {
    pub fn new(cfg: FlowConfig) -> FlowTable {
        FlowTable {
            socks: Slab::default(),
            peers: Slab::default(),
            by_cookie: IdxTable::default(),
            by_peer: IdxTable::default(),
            adjs: Adjs::default(),
            names: Names::default(),
            wheel: Wheel::default(),
            deferred: VecDeque::new(),
            finishing: VecDeque::new(),
            dormant_queue: VecDeque::new(),
            dormant_seq: 0,
            live_socks: 0,
            live_peers: 0,
            dormant: 0,
            ledgers: IntMap::default(),
            ledger: FlowLedger::default(),
            out: Out::new(cfg),
            trim_mark: 0,
            room_mark: 0,
            packing_socks: false,
            packing_peers: false,
        }
    }

    pub fn config(&self) -> &FlowConfig {
        &self.out.cfg
    }

    /// One poll interval ending at `now_ms` (Unix ms). Returns at most
    /// `max_records_per_tick` records, oldest first; the rest come with the next calls.
    /// The work is bounded too: finished sockets are settled [`FINISH_PER_CALL`] a call.
    pub fn observe(
        &mut self,
        now_ms: u64,
        sockets: &[SocketView],
        peers: &[PeerView],
    ) -> Vec<FlowRecord> {
        let now = now_ms;
        let mut unconnected: IntMap<u64, &SocketView> = IntMap::default();
        for s in sockets {
            match s.remote {
                Some(r) => self.view_connected(now, s, r),
                None => {
                    self.view_unconnected(now, s);
                    unconnected.insert(s.cookie, s);
                }
            }
        }
        for p in peers {
            self.observe_peer(now, p, unconnected.get(&p.cookie).copied());
        }
        self.settle_finished(now, FINISH_PER_CALL);
        self.run_timers(now);
        self.evict_dormant();
        self.out.expire_sessions(now);
        let recs = self
            .out
            .drain(&mut self.names, self.out.cfg.max_records_per_tick);
        self.give_back_room(now);
        recs
    }

    /// Whether the heap should be handed back to the OS now (the daemon calls
    /// `crate::process::release_free_heap()` then, after writing the tick's records):
    /// once the table fell to half of what it held at the last trim.
    pub fn wants_trim(&mut self) -> bool {
        let n =
            self.socks.used() + self.peers.used() + self.out.outbox.len() + self.out.sessions.len();
        self.trim_mark = self.trim_mark.max(n);
        if n < self.trim_mark / 2 {
            self.trim_mark = n;
            return true;
        }
        false
    }

    /// After a burst (a mass close, or any local user opening and closing many sockets)
    /// the tables keep their peak capacity unless told: shrink each one that holds less
    /// than a quarter of it, so the memory goes back (keeping 2x headroom).
    fn give_back_room(&mut self, now: u64) {
        // Worth a reallocation from 64 KiB on (outbox entries are 88 bytes each).
        const BIG: usize = 64 * 1024;
        fn map<K: std::hash::Hash + Eq, V, S: std::hash::BuildHasher>(m: &mut HashMap<K, V, S>) {
            let big = m.capacity() * std::mem::size_of::<(K, V)>() > BIG;
            if big && m.len() < m.capacity() / 4 {
                m.shrink_to(m.len() * 2);
            }
        }
        fn deque<T>(q: &mut VecDeque<T>) {
            let big = q.capacity() * std::mem::size_of::<T>() > BIG;
            if big && q.len() < q.capacity() / 4 {
                q.shrink_to(q.len() * 2);
            }
        }
        // Stale timer entries (flows closed before their wake) go when their bucket comes;
        // rebuild if they ever dominate.
        if self.wheel.len() > 2 * (self.live_socks + self.live_peers) + 4096 {
            self.rebuild_wheel(now);
        }
        self.pack(now);
        // The indexes and names: each time the table fell to a quarter of its mark (their
        // trims scan what they keep, so not every call).
        // Records waiting in the outbox and sessions hold names too: a mass close's names
        // are free only once its records are out.
        let n =
            self.socks.used() + self.peers.used() + self.out.outbox.len() + self.out.sessions.len();
        self.room_mark = self.room_mark.max(n);
        if n < self.room_mark / 4 {
            self.room_mark = n;
            let (socks, peers) = (&self.socks, &self.peers);
            self.by_cookie.shrink(|i| mix(socks[i].cookie));
            self.by_peer.shrink(|i| {
                let p = &peers[i];
                peer_hash(p.sock, p.t.remote)
            });
            self.adjs.trim();
            self.names.shrink();
        }
        map(&mut self.ledgers);
        map(&mut self.out.sessions);
        map(&mut self.out.session_index);
        deque(&mut self.dormant_queue);
        deque(&mut self.deferred);
        deque(&mut self.finishing);
        deque(&mut self.out.outbox);
        let t = &mut self.out.session_timers;
        if t.capacity() * 16 > BIG && t.len() < t.capacity() / 4 {
            t.shrink_to(t.len() * 2);
        }
    }

    /// Shutdown: every finished socket and pending session, then a `close`
    /// (`end_reason: "agent_stopped"`, `end` = `now_ms`) for every live flow, then nothing
    /// is tracked any more. Returns everything still waiting, not capped (there is no next
    /// call); the caller may append it in chunks.
    pub fn finish_all(&mut self, now_ms: u64) -> Vec<FlowRecord> {
        let now = now_ms;
        self.settle_finished(now, usize::MAX);
        self.out.flush_sessions();
        // Oldest first.
        let mut live: Vec<(u64, u32)> = Vec::with_capacity(self.live_socks + self.live_peers);
        for (i, s) in self.socks.iter() {
            if s.has(S_USED) && !s.has(S_UNCONN) && s.t.has(F_LIVE) {
                live.push((s.t.start_ms, i));
            }
        }
        for (i, p) in self.peers.iter() {
            if p.t.sflags & S_USED != 0 && p.t.has(F_LIVE) {
                live.push((p.t.start_ms, PEER | i));
            }
        }
        live.sort_unstable();
        for (_, id) in live {
            let (sock, t) = if id & PEER != 0 {
                let p = &self.peers[id & !PEER];
                (p.sock, p.t)
            } else {
                (id, self.socks[id].t)
            };
            self.end_flow(sock, &t, EndReason::AgentStopped, now, now);
        }
        // The ledger of the sockets still alive: their last counters against their records.
        for i in 0..self.socks.len() as u32 {
            if self.socks.get(i).is_some() {
                self.settle_ledger(i);
            }
        }
        let recs = self.out.drain(&mut self.names, usize::MAX);
        let cfg = self.out.cfg.clone();
        let out = std::mem::replace(&mut self.out, Out::new(cfg));
        let ledger = std::mem::take(&mut self.ledger);
        *self = FlowTable {
            ledger,
            out: Out {
                c: out.c,
                next_session: out.next_session,
                ..out
            },
            ..FlowTable::new(FlowConfig::default())
        };
        recs
    }

    /// Live samples (`type: "conn"`) of the connections in this tick's views, for the
    /// record stream; call after [`FlowTable::observe`] with the same views.
    pub fn conn_samples(&self, now: u64, socks: &[SocketView], peers: &[PeerView]) -> Vec<u8> {
        record::conn_sample_lines(now, socks, peers, |cookie| {
            let s = self.socks.get(self.find_sock(cookie)?)?;
            s.has(S_UNCONN).then(|| record::SampleOwner {
                proto: s.t.proto,
                local: self.names.sock_addr(s.local),
                direction: s.t.direction,
                owner: self.names.owners.get(s.owner),
                label: self.names.labels.get(s.label),
            })
        })
    }

    pub fn stats(&self) -> FlowStats {
        let c = &self.out.c;
        FlowStats {
            tracked: (self.live_socks + self.live_peers) as u64,
            pending_sessions: self.out.sessions.len() as u64,
            dormant_peers: self.dormant as u64,
            queued: self.out.outbox.len() as u64,
            deferred: self.deferred.len() as u64,
            finishing: self.finishing.len() as u64,
            opens: c.opens,
            updates: c.updates,
            closes: c.closes,
            sessions: c.sessions,
            merged_connections: c.merged_connections,
            filtered: c.filtered,
            overflow: c.overflow,
            evicted_peer_bases: c.evicted_peer_bases,
            orphan_peers: c.orphan_peers,
            ledger: self.ledger.clone(),
        }
    }

    pub(super) fn live(&self) -> usize {
        self.live_socks + self.live_peers
    }

    /// A flow of socket slot `sock` ended: its close, and the socket's ledger.
    pub(super) fn end_flow(&mut self, sock: u32, t: &Track, reason: EndReason, end: u64, now: u64) {
        let meta = self.socks[sock].meta();
        let live = self.live();
        let carried = self.out.close(
            &mut self.names,
            &self.adjs,
            &meta,
            t,
            reason,
            end,
            now,
            live,
        );
        let l = self.ledgers.entry(sock).or_default();
        let c = t.counts(&self.adjs);
        if carried {
            add(&mut l.recorded, c);
        } else {
            add(&mut l.filtered, c);
        }
    }

    /// Compares a socket's counters with its records (it finished, or the agent stops).
    fn settle_ledger(&mut self, i: u32) {
        let s = self.socks[i];
        let l = self.ledgers.remove(&i).unwrap_or_default();
        if s.has(S_UNCONN) && s.t.proto == IPPROTO_TCP {
            // A listening socket: the handshake packets it receives (SYN, the last ACK)
            // are counted on it, and no connection is its own. Reported, not lost.
            self.ledger.listening(l, s.t.cum);
            return;
        }
        let rest_filtered = !s.has(S_UNCONN) && !s.t.has(F_LIVE) && s.t.has(F_FILTERED);
        let reason = if s.has(S_OVERFLOW) {
            "overflow"
        } else if s.has(S_WAS_UNCONN) {
            "peer_unknown"
        } else {
            "untracked"
        };
        self.ledger.settle(l, s.t.cum, rest_filtered, reason);
    }

    /// Settles finished sockets, oldest first, up to `budget` (a socket, or a peer of one).
    fn settle_finished(&mut self, now: u64, mut budget: usize) {
        while budget > 0 {
            let Some(&i) = self.finishing.front() else {
                break;
            };
            let s = self.socks[i];
            let end = s.t.last_move_ms(now);
            if s.has(S_UNCONN) {
                // Its peers close in the order they were first seen; a socket with more
                // peers than the budget is settled over several calls.
                let mut head = s.t.adj;
                while head != NONE && budget > 0 {
                    let p = self.peers[head];
                    if p.t.has(F_LIVE) {
                        self.end_flow(i, &p.t, EndReason::Closed, end, now);
                    }
                    self.free_peer(head);
                    head = self.socks[i].t.adj;
                    budget -= 1;
                }
                if head != NONE {
                    break;
                }
                // The socket itself counts too (one with no peers is not free).
                budget = budget.saturating_sub(1);
            } else {
                budget -= 1;
                if s.t.has(F_LIVE) {
                    self.end_flow(i, &s.t, EndReason::Closed, end, now);
                }
            }
            self.finishing.pop_front();
            self.settle_ledger(i);
            self.free_sock(i);
        }
    }

    fn rebuild_wheel(&mut self, now: u64) {
        self.wheel.clear();
        // Flows of finished sockets only close now: no timer.
        for (i, s) in self.socks.iter() {
            if !s.has(S_FINISHING) && s.t.has(F_TIMER) && !s.t.has(F_DEFERRED) {
                self.wheel.push(unwrap_near(now, s.t.wake), i);
            }
        }
        for (i, p) in self.peers.iter() {
            let finishing = self.socks[p.sock].has(S_FINISHING);
            if !finishing && p.t.has(F_TIMER) && !p.t.has(F_DEFERRED) {
                self.wheel.push(unwrap_near(now, p.t.wake), PEER | i);
            }
        }
    }

    pub(super) fn schedule(&mut self, id: u32, wake: Option<u64>) {
        let t = self.track_mut(id);
        t.set(F_TIMER, wake.is_some());
        if let Some(w) = wake {
            t.wake = wrap(w);
            self.wheel.push(w, id);
        }
    }

    fn track_mut(&mut self, id: u32) -> &mut Track {
        if id & PEER != 0 {
            &mut self.peers[id & !PEER].t
        } else {
            &mut self.socks[id].t
        }
    }

    /// The flow behind a timer or deferred id, if it still runs: (its socket slot, track).
    fn running(&self, id: u32) -> Option<(u32, Track)> {
        let (sock, t) = if id & PEER != 0 {
            let p = self.peers.get(id & !PEER)?;
            (p.sock, p.t)
        } else {
            let s = self.socks.get(id)?;
            if s.has(S_UNCONN) {
                return None;
            }
            (id, s.t)
        };
        // A finished socket's flows only close now.
        let finishing = self.socks[sock].has(S_FINISHING);
        (t.has(F_LIVE) && !finishing).then_some((sock, t))
    }

    /// Runs a flow's due timer (or its deferred record). Returns false when its record had
    /// to be deferred.
    fn fire(&mut self, id: u32, now: u64) -> bool {
        let Some((sock, mut t)) = self.running(id) else {
            return true;
        };
        let peer = id & PEER != 0;
        let meta = self.socks[sock].meta();
        let wake = self
            .out
            .due(&mut self.names, &self.adjs, &meta, &mut t, now, peer);
        match wake {
            Wake::At(w) => {
                *self.track_mut(id) = t;
                self.schedule(id, w);
            }
            Wake::Deferred => {
                t.flags |= F_DEFERRED;
                t.set(F_TIMER, false);
                *self.track_mut(id) = t;
                self.deferred.push_back(id);
                return false;
            }
            Wake::Idle => {
                // Dormant: `cum` stays as the baseline of the peer's next flow.
                let pi = id & !PEER;
                self.live_peers = self.live_peers.saturating_sub(1);
                self.end_flow(sock, &t, EndReason::Idle, t.last_move_ms(now), now);
                self.dormant += 1;
                self.dormant_seq = self.dormant_seq.wrapping_add(1);
                self.dormant_queue.push_back((pi, self.dormant_seq));
                let p = &mut self.peers[pi];
                self.adjs.free(&mut p.t.adj);
                p.t.flags = 0;
                p.t.next_update = self.dormant_seq;
            }
        }
        true
    }

    fn run_timers(&mut self, now: u64) {
        // Deferred records first, oldest first, while the outbox has room.
        while !self.out.backlog() {
            let Some(id) = self.deferred.pop_front() else {
                break;
            };
            if self.running(id).is_none_or(|(_, t)| !t.has(F_DEFERRED)) {
                continue;
            }
            self.track_mut(id).set(F_DEFERRED, false);
            if !self.fire(id, now) {
                // Deferred again: back to the front, it is still the oldest. The outbox
                // is full: stop here.
                if let Some(x) = self.deferred.pop_back() {
                    self.deferred.push_front(x);
                }
                break;
            }
        }
        for (bucket, ids) in self.wheel.take_due(now) {
            for id in ids {
                let Some((_, t)) = self.running(id) else {
                    continue;
                };
                if !t.has(F_TIMER) || t.has(F_DEFERRED) {
                    continue;
                }
                let wake = unwrap_near(now, t.wake);
                if Wheel::bucket(wake) != bucket {
                    continue; // stale: the flow was rescheduled since
                }
                if wake > now {
                    self.wheel.push(wake, id);
                    continue;
                }
                self.track_mut(id).set(F_TIMER, false);
                self.fire(id, now);
            }
        }
    }

    /// Keeps remembered baselines of idle peers within `max_flows`, oldest forgotten first.
    fn evict_dormant(&mut self) {
        let max = self.out.cfg.max_flows;
        while self.dormant > max {
            let Some((pi, seq)) = self.dormant_queue.pop_front() else {
                break;
            };
            if self.is_dormant(pi, seq) {
                self.free_peer(pi);
                self.out.c.evicted_peer_bases += 1;
            }
        }
        if self.dormant_queue.len() > 2 * self.dormant + 1024 {
            let q = std::mem::take(&mut self.dormant_queue);
            self.dormant_queue = q
                .into_iter()
                .filter(|&(pi, seq)| self.is_dormant(pi, seq))
                .collect();
        }
    }

    fn is_dormant(&self, pi: u32, seq: u32) -> bool {
        self.peers
            .get(pi)
            .is_some_and(|p| !p.t.has(F_LIVE) && p.t.next_update == seq)
    }
}

/// Slots moved per call when packing a slab (each a few index updates).
const PACK_PER_CALL: usize = 4096;

/// Packing stops this close to dense: a chunk's worth of holes is left to be reused.
const PACK_SLACK: usize = 1024;

impl FlowTable {
    /// After a mass close the survivors may sit anywhere in the slabs: once fewer than a
    /// quarter of the slots are used, move the last ones into the lowest holes (a bounded
    /// number a call) so the tail chunks go back.
    fn pack(&mut self, now: u64) {
        let sparse = |used: usize, len: usize| len > PACK_SLACK && used < len / 4;
        // Socket slots are not moved while finished ones wait: the queue holds their numbers.
        if self.finishing.is_empty()
            && (self.packing_socks || sparse(self.socks.used(), self.socks.len()))
        {
            self.packing_socks = true;
            for _ in 0..PACK_PER_CALL {
                if self.socks.holes() <= PACK_SLACK {
                    self.packing_socks = false;
                    break;
                }
                let Some((from, to)) = self.socks.pack_one() else {
                    self.packing_socks = false;
                    break;
                };
                self.moved_sock(from, to, now);
            }
            self.socks.trim();
        }
        if self.packing_peers || sparse(self.peers.used(), self.peers.len()) {
            self.packing_peers = true;
            for _ in 0..PACK_PER_CALL {
                if self.peers.holes() <= PACK_SLACK {
                    self.packing_peers = false;
                    break;
                }
                let Some((from, to)) = self.peers.pack_one() else {
                    self.packing_peers = false;
                    break;
                };
                self.moved_peer(from, to, now);
            }
            self.peers.trim();
        }
    }

    /// A flow moved to another slot: it is due again under its new id.
    fn renumbered(&mut self, t: &Track, id: u32, now: u64) {
        if t.has(F_DEFERRED) {
            self.deferred.push_back(id);
        } else if t.has(F_TIMER) {
            self.wheel.push(unwrap_near(now, t.wake), id);
        }
    }

    fn moved_sock(&mut self, from: u32, to: u32, now: u64) {
        let s = self.socks[to];
        let socks = &self.socks;
        let h = mix(s.cookie);
        self.by_cookie.remove(h, from, |j| mix(socks[j].cookie));
        self.by_cookie.insert(h, to, |j| mix(socks[j].cookie));
        if let Some(l) = self.ledgers.remove(&from) {
            self.ledgers.insert(to, l);
        }
        if !s.has(S_UNCONN) {
            self.renumbered(&s.t, to, now);
            return;
        }
        // Its peers' keys name the socket slot.
        let mut pi = s.t.adj;
        while pi != NONE {
            let remote = self.peers[pi].t.remote;
            let peers = &self.peers;
            let hash_of = |j: u32| peer_hash(peers[j].sock, peers[j].t.remote);
            self.by_peer.remove(peer_hash(from, remote), pi, hash_of);
            self.peers[pi].sock = to;
            let peers = &self.peers;
            let hash_of = |j: u32| peer_hash(peers[j].sock, peers[j].t.remote);
            self.by_peer.insert(peer_hash(to, remote), pi, hash_of);
            pi = self.peers[pi].next;
        }
    }

    fn moved_peer(&mut self, from: u32, to: u32, now: u64) {
        let p = self.peers[to];
        // Relink: the head (or the previous peer) and the next (or the head's tail link).
        let head = self.socks[p.sock].t.adj;
        if head == from {
            self.socks[p.sock].t.adj = to;
        } else {
            self.peers[p.prev].next = to;
        }
        if p.next != NONE {
            self.peers[p.next].prev = to;
        } else {
            let head = self.socks[p.sock].t.adj;
            self.peers[head].prev = to;
        }
        if p.prev == from {
            self.peers[to].prev = to; // alone in its list
        }
        let h = peer_hash(p.sock, p.t.remote);
        let peers = &self.peers;
        let hash_of = |j: u32| peer_hash(peers[j].sock, peers[j].t.remote);
        self.by_peer.remove(h, from, hash_of);
        self.by_peer.insert(h, to, hash_of);
        if p.t.has(F_LIVE) {
            self.renumbered(&p.t, PEER | to, now);
        } else {
            self.dormant_queue.push_back((to, p.t.next_update));
        }
    }
}

pub(super) fn peer_hash(sock: u32, a: Addr) -> u64 {
    mix(mix(sock as u64) ^ a.key())
}

#[cfg(test)]
impl FlowTable {
    /// The interners' reference counts are exactly what slots and waiting records hold.
    pub(super) fn check_refs(&self) {
        let n = &self.names;
        let mut owners = vec![0u32; n.owners.ref_counts().len()];
        let mut labels = vec![0u32; n.labels.ref_counts().len()];
        let mut v6 = vec![0u32; n.v6.ref_counts().len()];
        let mut addr = |a: Addr| {
            if a.v6 {
                v6[a.ip as usize] += 1;
            }
        };
        for (_, s) in self.socks.iter() {
            owners[s.owner as usize] += 1;
            labels[s.label as usize] += 1;
            addr(s.local);
            if !s.has(S_UNCONN) {
                addr(s.t.remote);
            }
        }
        for (_, p) in self.peers.iter() {
            addr(p.t.remote);
        }
        for p in self.out.pendings() {
            owners[p.meta.owner as usize] += 1;
            labels[p.meta.label as usize] += 1;
            addr(p.meta.local);
            addr(p.remote);
        }
        assert_eq!(owners, n.owners.ref_counts(), "owners");
        assert_eq!(labels, n.labels.ref_counts(), "labels");
        assert_eq!(v6, n.v6.ref_counts(), "v6");
        let live = self
            .socks
            .iter()
            .filter(|(_, s)| !s.has(S_UNCONN) && !s.has(S_FINISHING) && s.t.has(F_LIVE));
        assert_eq!(live.count(), self.live_socks, "live sockets");
        let peers = self.peers.iter();
        let (lp, dp) = peers.fold((0, 0), |(l, d), (_, p)| {
            if p.t.has(F_LIVE) {
                (l + 1, d)
            } else {
                (l, d + 1)
            }
        });
        assert_eq!((lp, dp), (self.live_peers, self.dormant), "peers");
    }
}
