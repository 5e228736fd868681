//! What the flow table gets each tick: the sockets that moved, are new or finished,
//! and the per-peer counters of unconnected sockets.
//!
//! The per-peer map is read by a walk spread over the ticks (65k peers never cost a
//! whole-map read in one interval). Two rules keep every peer's flow recorded:
//! - a peer is offered only together with its socket's view; a peer whose socket is not
//!   known yet (its first datagram landed after the tick's harvest) is not marked as
//!   offered, so the next pass offers it again;
//! - a finished unconnected socket waits until one whole pass that started after its end
//!   has read all its peers (their counters are final by then), and is then given with
//!   all of them, moved or not, and their kernel entries are deleted.
//!
//! Peer entries of a socket that never shows up (one we do not track) are deleted after
//! two passes and counted in the flow ledger as `orphan_peer`.
use std::collections::VecDeque;

use super::*;
use crate::flows::{PeerView, SocketView};

/// Entries of the per-peer map read per walk step. Its two buffers (2048 x 32 B each)
/// stay below the allocator's mmap threshold: no new mapping per tick.
const PEER_WALK_PER_TICK: usize = 2048;
/// Walk steps per tick while finished sockets wait for their peers.
const PEER_WALK_STEPS_PENDING: usize = 2;

/// A finished unconnected socket waiting for a whole pass over the per-peer map.
#[derive(Debug)]
struct Pending {
    view: SocketView,
    /// The pass count at which its peers are all read.
    need: u64,
    peers: HashMap<PeerKey, Counters>,
}

/// The per-peer map's reader: what was offered, the walk, and the finished sockets
/// waiting for it.
#[derive(Debug, Default)]
pub(super) struct PeerReads {
    /// Packets (both ways, low 32 bits) last offered per peer, by a 64-bit fingerprint of
    /// the peer's key (16 B an entry where the key alone is 32): offered again once they
    /// change. A collision could only delay a peer's update until its socket ends, when
    /// every peer is given regardless.
    last: IntMap<u64, u32>,
    walk: bpfsys::WalkCursor,
    /// Whole passes completed.
    passes: u64,
    pending: IntMap<u64, Pending>,
    /// Sockets seen only through their peers: the pass and the tick they were first
    /// seen in.
    strays: IntMap<u64, (u64, u64)>,
    delete: VecDeque<PeerKey>,
    /// Entries queued for deletion, per socket: the walk may meet them meanwhile (they
    /// are neither strays nor news).
    doomed: IntMap<u64, u32>,
    /// Finished sockets without flow facts (counted in the ledger as a whole): their peer
    /// entries are deleted without a second count. Kept for a few passes.
    silent: IntMap<u64, u64>,
}

impl PeerReads {
    /// The pass count at which a pass that starts from now has completed.
    fn next_full_pass(&self) -> u64 {
        if self.walk.at_start() {
            self.passes + 1
        } else {
            self.passes + 2
        }
    }

    pub(super) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The reaper deleted these entries.
    pub(super) fn undoom(&mut self, keys: &[PeerKey]) {
        for k in keys {
            if let Some(n) = self.doomed.get_mut(&k.cookie) {
                *n -= 1;
                if *n == 0 {
                    self.doomed.remove(&k.cookie);
                }
            }
        }
    }

    fn doom(&mut self, k: PeerKey) {
        *self.doomed.entry(k.cookie).or_default() += 1;
        self.delete.push_back(k);
    }

    /// After a burst (a mass close, a churn of short-lived sockets) the maps keep their
    /// peak room unless told: back to twice what they hold once under a quarter.
    fn give_back_room(&mut self) {
        fn map<K: std::hash::Hash + Eq, V, S: std::hash::BuildHasher>(m: &mut HashMap<K, V, S>) {
            if m.capacity() > 1024 && m.len() < m.capacity() / 4 {
                m.shrink_to(m.len() * 2);
            }
        }
        map(&mut self.last);
        map(&mut self.pending);
        map(&mut self.strays);
        map(&mut self.doomed);
        map(&mut self.silent);
        if self.delete.capacity() > 4096 && self.delete.len() < self.delete.capacity() / 4 {
            self.delete.shrink_to(self.delete.len() * 2);
        }
    }
}

fn packets(c: &Counters) -> u32 {
    c.tx_packets.wrapping_add(c.rx_packets) as u32
}

fn fingerprint(k: &PeerKey) -> u64 {
    use std::hash::BuildHasher;
    // SipHash with fixed keys: spread well, and the same key gives the same print.
    std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
        .hash_one((k.cookie, k.addr, k.port, k.family))
}

fn peer_view(k: &PeerKey, c: &Counters) -> Option<PeerView> {
    let ip = wire_ip(k.family, &k.addr)?;
    Some(PeerView {
        cookie: k.cookie,
        remote: std::net::SocketAddr::new(ip, k.port as u16),
        counters: Traffic::from(*c),
    })
}

impl Poller {
    /// Turns flow records' per-socket views on (the daemon's flow table consumes them).
    pub fn enable_flow_views(&mut self, on: bool) {
        self.flow_views_on = on;
    }

    /// The sockets that moved or finished in the last tick, and the per-peer counters of
    /// unconnected UDP sockets that moved, for the flow table.
    pub fn take_flow_views(&mut self) -> (Vec<SocketView>, Vec<PeerView>) {
        (
            std::mem::take(&mut self.flow_socks),
            std::mem::take(&mut self.flow_peers),
        )
    }

    /// At shutdown (after the final tick): reads the whole per-peer map once, offers the
    /// peers that moved and gives every finished socket still waiting, so the flow
    /// table's last records carry the final counts. Then take the views as usual.
    pub fn finish_flow_views(&mut self) {
        if !self.flow_views_on {
            return;
        }
        let mut all: Vec<(PeerKey, Counters)> = vec![];
        if let Err(e) = bpfsys::lookup_batch(self.maps.peers.fd().as_fd(), 4096, &mut all) {
            warn!("reading the per-peer map at shutdown: {e}");
        }
        let mut extra = vec![];
        self.offer_peers(&all, &mut extra, false);
        let extra_views = self.socket_views(&[], &[], &HashMap::new(), &extra);
        self.route_views(extra_views);
        let all_pending: Vec<u64> = self.peer_reads.pending.keys().copied().collect();
        self.complete_pending(&all_pending);
    }

    /// Collects the flow table's view of the sockets that moved or finished this tick,
    /// and the next part of the walk over the per-peer map.
    pub(super) fn collect_flow_views(
        &mut self,
        moved: &[(u64, Counters)],
        finished: &[u64],
        end_states: &HashMap<u64, u64>,
    ) {
        let views = self.socket_views(moved, finished, end_states, &[]);
        self.route_views(views);
        let steps = if self.peer_reads.pending.is_empty() {
            1
        } else {
            PEER_WALK_STEPS_PENDING
        };
        let mut read: Vec<(PeerKey, Counters)> = vec![];
        let fd = self.maps.peers.fd().as_fd();
        for _ in 0..steps {
            match bpfsys::walk_step(fd, &mut self.peer_reads.walk, PEER_WALK_PER_TICK, &mut read) {
                Ok(true) => {
                    self.peer_reads.passes += 1;
                    let passes = self.peer_reads.passes;
                    // A stray's entries were all seen within two passes of its first.
                    self.peer_reads
                        .strays
                        .retain(|_, (first, _)| passes <= *first + 4);
                    self.peer_reads
                        .silent
                        .retain(|_, first| passes <= *first + 4);
                    if self.peer_reads.pending.values().all(|p| p.need > passes) {
                        break;
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    debug!("walking the per-peer map: {e}");
                    break;
                }
            }
        }
        let mut extra = vec![];
        self.offer_peers(&read, &mut extra, true);
        let extra_views = self.socket_views(&[], &[], end_states, &extra);
        self.route_views(extra_views);
        let passes = self.peer_reads.passes;
        let ready: Vec<u64> = self
            .peer_reads
            .pending
            .iter()
            .filter(|(_, p)| p.need <= passes)
            .map(|(c, _)| *c)
            .collect();
        self.complete_pending(&ready);
        self.delete_peer_entries();
        self.peer_reads.give_back_room();
        self.stats.flow_pending_sockets = self.peer_reads.pending();
    }

    /// Views to the flow table; a finished unconnected socket's view waits (pending) for
    /// the next whole pass over the per-peer map, which reads its peers' last counts.
    fn route_views(&mut self, views: Vec<SocketView>) {
        let need = self.peer_reads.next_full_pass();
        for v in views {
            if v.finished && v.proto == 17 && v.remote.is_none() {
                self.peer_reads.pending.insert(
                    v.cookie,
                    Pending {
                        view: v,
                        need,
                        peers: HashMap::new(),
                    },
                );
            } else {
                self.flow_socks.push(v);
            }
        }
    }

    /// Sorts peer entries read: those of finished sockets to their pending socket, those
    /// of known sockets offered when they moved (their socket's cookie into `extra`),
    /// the rest aged as strays (deleted once old, when `age`).
    fn offer_peers(&mut self, read: &[(PeerKey, Counters)], extra: &mut Vec<u64>, age: bool) {
        let passes = self.peer_reads.passes;
        for (k, c) in read {
            if !self.peer_reads.pending.contains_key(&k.cookie)
                && self.table.finals.contains_key(&k.cookie)
            {
                // Finished (its final counters are in) but not given yet, e.g. an entry
                // the kernel kept while the final ring was full: it waits for its peers
                // like any finished socket.
                let views = self.socket_views(&[], &[], &HashMap::new(), &[k.cookie]);
                self.route_views(views);
            }
            if let Some(p) = self.peer_reads.pending.get_mut(&k.cookie) {
                p.peers.insert(*k, *c);
                continue;
            }
            if self.peer_reads.doomed.contains_key(&k.cookie) {
                continue;
            }
            if self.peer_reads.silent.contains_key(&k.cookie) {
                self.peer_reads.last.remove(&fingerprint(k));
                self.peer_reads.doom(*k);
                continue;
            }
            match self.table.socks.get(&k.cookie) {
                Some(st) if st.flow.is_some() && !st.flow_closed => {
                    let n = packets(c);
                    let fp = fingerprint(k);
                    if self.peer_reads.last.get(&fp) == Some(&n) {
                        continue;
                    }
                    let Some(v) = peer_view(k, c) else { continue };
                    self.peer_reads.last.insert(fp, n);
                    self.flow_peers.push(v);
                    extra.push(k.cookie);
                }
                // Tracked, owner (and so flow facts) not known yet: wait for them.
                Some(_) => {}
                None if age => {
                    let tick = self.tick_no;
                    let (first, first_tick) = *self
                        .peer_reads
                        .strays
                        .entry(k.cookie)
                        .or_insert((passes, tick));
                    // A new socket is in the table within two polls of its first packet;
                    // a small map is walked several times in one poll.
                    if passes >= first + 2 && tick >= first_tick + 3 {
                        // Two whole passes and its socket never showed up: not one we
                        // track (or long gone). Its traffic is in no flow record.
                        debug!(
                            "orphan peer entry of socket {:#x} (first seen pass {first} tick {first_tick}, now pass {passes} tick {tick}, {} packets)",
                            k.cookie,
                            c.tx_packets + c.rx_packets
                        );
                        self.stats
                            .flow_unrecorded
                            .entry("orphan_peer")
                            .or_default()
                            .add(&Traffic::from(*c));
                        self.peer_reads.last.remove(&fingerprint(k));
                        self.peer_reads.doom(*k);
                    }
                }
                None => {}
            }
        }
        extra.sort_unstable();
        extra.dedup();
    }

    /// Gives finished sockets with all their peers' final counts; queues their entries
    /// for deletion.
    fn complete_pending(&mut self, cookies: &[u64]) {
        for cookie in cookies {
            let Some(p) = self.peer_reads.pending.remove(cookie) else {
                continue;
            };
            let mut peers: Vec<(PeerKey, Counters)> = p.peers.into_iter().collect();
            peers.sort_unstable_by_key(|(k, _)| (k.family, k.addr, k.port));
            for (k, c) in &peers {
                self.peer_reads.last.remove(&fingerprint(k));
                self.peer_reads.doom(*k);
                if let Some(v) = peer_view(k, c) {
                    self.flow_peers.push(v);
                }
            }
            self.flow_socks.push(p.view);
        }
    }

    /// Hands the entries queued for deletion to the reaper thread (see reaper.rs); they
    /// stay doomed until it says they are gone.
    fn delete_peer_entries(&mut self) {
        for k in self.peer_reads.delete.drain(..) {
            self.reaper.delete_peer(k);
        }
    }

    /// Views of the sockets in `moved`, `finished` and `extra` that have flow facts; a
    /// finished socket is given once, with its final counters. Finished sockets without
    /// flow facts (no owner, or none with addresses) are counted in the flow ledger.
    pub(super) fn socket_views(
        &mut self,
        moved: &[(u64, Counters)],
        finished: &[u64],
        end_states: &HashMap<u64, u64>,
        extra: &[u64],
    ) -> Vec<SocketView> {
        let cum = |c: &[Counters; SLOTS]| {
            let mut t = Counters::ZERO;
            for x in c {
                add(&mut t, x);
            }
            Traffic::from(t)
        };
        let mut cookies: Vec<u64> = moved
            .iter()
            .map(|(c, _)| *c)
            .chain(finished.iter().copied())
            .chain(extra.iter().copied())
            .collect();
        cookies.sort_unstable();
        cookies.dedup();
        let mut out = Vec::with_capacity(cookies.len());
        for cookie in cookies {
            let Some(st) = self.table.socks.get_mut(&cookie) else {
                continue;
            };
            if st.flow_closed {
                continue;
            }
            let (counters, done) = match self.table.finals.get(&cookie) {
                Some(fin) => (cum(fin), true),
                None => (cum(&st.last), false),
            };
            let Some(f) = st.flow.as_deref() else {
                if done {
                    st.flow_closed = true;
                    self.peer_reads
                        .silent
                        .insert(cookie, self.peer_reads.passes);
                    let reason = if st.label.is_some() {
                        "no_addresses"
                    } else {
                        "no_owner"
                    };
                    self.stats
                        .flow_unrecorded
                        .entry(reason)
                        .or_default()
                        .add(&counters);
                }
                continue;
            };
            st.flow_closed = done;
            let label = st
                .label
                .and_then(|l| self.labels.name(l).cloned())
                .unwrap_or_else(|| "".into());
            out.push(SocketView {
                cookie,
                proto: f.proto,
                local: f.local,
                remote: f.remote,
                direction: f.direction,
                owner: (*f.owner).clone(),
                label,
                counters,
                first_seen_ms: f.first_seen_ms,
                finished: done,
                tcp_state: end_states
                    .get(&cookie)
                    .filter(|&&s| s > 0)
                    .map(|&s| (s - 1) as u8),
            });
        }
        out
    }
}
