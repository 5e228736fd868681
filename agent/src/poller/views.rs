//! What the flow table gets each tick: the sockets that moved, are new or finished,
//! and the per-peer counters of unconnected sockets.
use super::*;

/// Entries of the per-peer map read per tick (a walk spread over ticks). Its two buffers
/// (2048 x 32 B each) stay below the allocator's mmap threshold: no new mapping per tick.
const PEER_WALK_PER_TICK: usize = 2048;

impl Poller {
    /// Finds an owner for `cookie`, best source first. `rec` is the owner carried by a
    /// final record, if any.
    /// Turns flow records' per-socket views on (the daemon's flow table consumes them).
    pub fn enable_flow_views(&mut self, on: bool) {
        self.flow_views_on = on;
    }

    /// The sockets that moved or finished in the last tick, and the per-peer counters of
    /// unconnected UDP sockets that moved, for the flow table.
    pub fn take_flow_views(
        &mut self,
    ) -> (Vec<crate::flows::SocketView>, Vec<crate::flows::PeerView>) {
        (
            std::mem::take(&mut self.flow_socks),
            std::mem::take(&mut self.flow_peers),
        )
    }

    /// Collects the flow table's view of the sockets that moved or finished this tick.
    pub(super) fn collect_flow_views(
        &mut self,
        moved: &[(u64, Counters)],
        finished: &[u64],
        end_states: &HashMap<u64, u64>,
        done: &[(u64, bool)],
    ) {
        // Per-peer counters of unconnected sockets: those that moved, and their sockets.
        // The whole map when such a socket finishes (its last counts go with its end, its
        // peers' entries are deleted); otherwise the next part of a walk spread over the
        // ticks, so 65k peers do not cost a whole-map read every interval.
        let ends_peer_socket = finished
            .iter()
            .chain(done.iter().map(|(c, _)| c))
            .any(|c| self.peer_socks.contains_key(c));
        let mut peers: Vec<(PeerKey, Counters)> = vec![];
        let fd = self.maps.peers.fd().as_fd();
        if ends_peer_socket {
            let _ = bpfsys::lookup_batch(fd, 4096, &mut peers);
            self.peer_walk = bpfsys::WalkCursor::default();
        } else {
            let _ = bpfsys::walk_step(fd, &mut self.peer_walk, PEER_WALK_PER_TICK, &mut peers);
        }
        let mut peer_socks: Vec<u64> = vec![];
        for (k, _) in &peers {
            self.peer_socks.insert(k.cookie, ());
        }
        for (k, c) in &peers {
            if self.peer_last.get(k) == Some(c) {
                continue;
            }
            self.peer_last.insert(*k, *c);
            let Some(ip) = wire_ip(k.family, &k.addr) else {
                continue;
            };
            self.flow_peers.push(crate::flows::PeerView {
                cookie: k.cookie,
                remote: std::net::SocketAddr::new(ip, k.port as u16),
                counters: Traffic::from(*c),
            });
            peer_socks.push(k.cookie);
        }
        // Sockets we are done with: their peers go too.
        if !done.is_empty() {
            let gone: std::collections::HashSet<u64> = done.iter().map(|(c, _)| *c).collect();
            let keys: Vec<PeerKey> = peers
                .iter()
                .filter(|(k, _)| gone.contains(&k.cookie))
                .map(|(k, _)| *k)
                .collect();
            let _ = bpfsys::delete_batch(self.maps.peers.fd().as_fd(), &keys);
            for k in &keys {
                self.peer_last.remove(k);
            }
            for c in &gone {
                self.peer_socks.remove(c);
            }
        }
        self.collect_socket_views(moved, finished, end_states, &peer_socks);
    }

    pub(super) fn collect_socket_views(
        &mut self,
        moved: &[(u64, Counters)],
        finished: &[u64],
        end_states: &HashMap<u64, u64>,
        extra: &[u64],
    ) {
        use crate::flows::SocketView;
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
        for cookie in cookies {
            let Some(st) = self.table.socks.get_mut(&cookie) else {
                continue;
            };
            if st.flow_closed {
                continue;
            }
            let Some(f) = st.flow.as_deref() else {
                continue;
            };
            let (counters, done) = match self.table.finals.get(&cookie) {
                Some(fin) => (cum(fin), true),
                None => (cum(&st.last), false),
            };
            st.flow_closed = done;
            let label = st
                .label
                .and_then(|l| self.labels.name(l).cloned())
                .unwrap_or_else(|| "".into());
            self.flow_socks.push(SocketView {
                cookie,
                proto: f.proto,
                local: f.local,
                remote: f.remote,
                direction: f.direction,
                owner: f.owner.clone(),
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
    }
}
