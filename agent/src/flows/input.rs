//! Input: socket and peer views into slots (new flows, moves, reconnects, finishes).
use super::compact::*;
use super::state::*;
use super::table::*;
use super::*;

impl FlowTable {
    pub(super) fn find_sock(&self, cookie: u64) -> Option<u32> {
        let socks = &self.socks;
        self.by_cookie
            .find(mix(cookie), |i| socks[i].cookie == cookie)
    }

    fn find_peer(&self, sock: u32, a: Addr) -> Option<u32> {
        let peers = &self.peers;
        self.by_peer.find(peer_hash(sock, a), |i| {
            let p = &peers[i];
            p.sock == sock && p.t.remote == a
        })
    }

    fn new_sock(&mut self, s: &SocketView, unconn: bool) -> u32 {
        let mut t = Track {
            proto: s.proto,
            direction: s.direction,
            sflags: S_USED,
            ..Track::default()
        };
        if unconn {
            t.sflags |= S_UNCONN | S_WAS_UNCONN;
            t.cum = s.counters;
        }
        let sock = Sock {
            t,
            cookie: s.cookie,
            local: self.names.addr(s.local),
            owner: self.names.owners.intern(&s.owner),
            label: self.names.labels.intern(&s.label),
        };
        let i = self.socks.alloc(sock);
        let socks = &self.socks;
        self.by_cookie
            .insert(mix(s.cookie), i, |j| mix(socks[j].cookie));
        i
    }

    /// Owner and label may be refined later (accepted sockets, the `label` command).
    fn refresh(&mut self, i: u32, s: &SocketView) {
        let sock = &mut self.socks[i];
        if *self.names.owners.get(sock.owner) != s.owner {
            let id = self.names.owners.intern(&s.owner);
            self.names.owners.release(sock.owner);
            sock.owner = id;
        }
        if *self.names.labels.get(sock.label) != s.label {
            let id = self.names.labels.intern(&s.label);
            self.names.labels.release(sock.label);
            sock.label = id;
        }
    }

    /// Lets go of a socket slot and everything it holds.
    pub(super) fn free_sock(&mut self, i: u32) {
        let mut s = self.socks[i];
        if s.has(S_UNCONN) {
            while self.socks[i].t.adj != NONE {
                self.free_peer(self.socks[i].t.adj);
            }
        } else {
            if s.t.has(F_LIVE) && !s.has(S_FINISHING) {
                self.live_socks -= 1;
            }
            self.adjs.free(&mut s.t.adj);
            self.names.drop_addr(s.t.remote);
        }
        self.names.owners.release(s.owner);
        self.names.labels.release(s.label);
        self.names.drop_addr(s.local);
        self.ledgers.remove(&i);
        let socks = &self.socks;
        self.by_cookie
            .remove(mix(s.cookie), i, |j| mix(socks[j].cookie));
        self.socks.release(i);
    }

    pub(super) fn free_peer(&mut self, pi: u32) {
        let mut p = self.peers[pi];
        if p.t.has(F_LIVE) {
            self.live_peers -= 1;
        } else {
            self.dormant -= 1;
        }
        // Unlink: `prev` of the head is the tail; `next` of the tail is NONE.
        let head = &mut self.socks[p.sock].t.adj;
        if *head == pi {
            *head = p.next;
            if p.next != NONE {
                self.peers[p.next].prev = p.prev;
            }
        } else {
            let h = *head;
            self.peers[p.prev].next = p.next;
            if p.next != NONE {
                self.peers[p.next].prev = p.prev;
            } else {
                self.peers[h].prev = p.prev;
            }
        }
        self.adjs.free(&mut p.t.adj);
        self.names.drop_addr(p.t.remote);
        let peers = &self.peers;
        self.by_peer.remove(peer_hash(p.sock, p.t.remote), pi, |j| {
            let q = &peers[j];
            peer_hash(q.sock, q.t.remote)
        });
        self.peers.release(pi);
    }

    /// A new peer flow of socket `sock`, at the tail of its list.
    fn add_peer(&mut self, sock: u32, t: Track) -> u32 {
        let pi = self.peers.alloc(Peer {
            t,
            sock,
            prev: NONE,
            next: NONE,
        });
        let head = self.socks[sock].t.adj;
        if head == NONE {
            self.socks[sock].t.adj = pi;
            self.peers[pi].prev = pi;
        } else {
            let tail = self.peers[head].prev;
            self.peers[tail].next = pi;
            self.peers[pi].prev = tail;
            self.peers[head].prev = pi;
        }
        let peers = &self.peers;
        self.by_peer.insert(peer_hash(sock, t.remote), pi, |j| {
            let q = &peers[j];
            peer_hash(q.sock, q.t.remote)
        });
        pi
    }

    fn mark_finishing(&mut self, i: u32, now: u64) {
        let s = &mut self.socks[i];
        if s.has(S_FINISHING) {
            return;
        }
        s.t.sflags |= S_FINISHING;
        if !s.has(S_UNCONN) && s.t.has(F_LIVE) {
            self.live_socks -= 1;
        }
        // The end of its flows: settling may come a few calls later.
        s.t.last_move = wrap(now);
        self.finishing.push_back(i);
    }

    /// A socket's connected flow ends without it finishing (reconnect, disconnect): a
    /// close if it was tracked, filtered traffic if the filters left it out.
    fn end_connected(&mut self, i: u32, now: u64) {
        let mut t = self.socks[i].t;
        if t.has(F_LIVE) {
            self.live_socks -= 1;
            self.end_flow(i, &t, EndReason::Reconnected, now, now);
        } else if t.has(F_FILTERED) {
            let c = t.counts(&self.adjs);
            add(&mut self.ledgers.entry(i).or_default().filtered, c);
        }
        self.adjs.free(&mut t.adj);
        self.names.drop_addr(t.remote);
        let s = &mut self.socks[i].t;
        s.adj = NONE;
        s.remote = Addr::default();
        s.flags = 0;
    }

    /// An unconnected socket connect()ed: its peer flows end here.
    fn retire_peers(&mut self, i: u32, now: u64) {
        loop {
            let head = self.socks[i].t.adj;
            if head == NONE {
                break;
            }
            let t = self.peers[head].t;
            if t.has(F_LIVE) {
                self.end_flow(i, &t, EndReason::Reconnected, now, now);
            }
            self.free_peer(head);
        }
    }

    pub(super) fn view_connected(&mut self, now: u64, s: &SocketView, r: SocketAddr) {
        let remote = canon(r);
        let mut base = Traffic::default();
        let mut reconnected = false;
        let slot = self.find_sock(s.cookie);
        if let Some(i) = slot {
            let sk = self.socks[i];
            if sk.has(S_FINISHING) {
                return; // given once; a repeat changes nothing
            }
            self.refresh(i, s);
            if sk.has(S_UNCONN) {
                base = sk.t.cum;
                reconnected = true;
                self.retire_peers(i, now);
                let t = &mut self.socks[i].t;
                t.sflags &= !S_UNCONN;
                t.adj = NONE;
                t.flags = 0;
            } else if self.names.find_addr(remote) == Some(sk.t.remote) {
                let t = &mut self.socks[i].t;
                t.tcp_state = s.tcp_state.or(t.tcp_state);
                t.note(s.counters, now, &mut self.adjs);
                if t.has(F_LIVE) {
                    if s.finished {
                        self.mark_finishing(i, now);
                    }
                } else {
                    // Left out so far (filters, or no room): try again.
                    self.start_connected(i, now, s.finished);
                }
                return;
            } else {
                // Connected to another peer (UDP): the old flow ends with what it had.
                base = sk.t.cum;
                reconnected = true;
                self.end_connected(i, now);
            }
        }
        let start = if reconnected || s.first_seen_ms == 0 {
            now
        } else {
            s.first_seen_ms.min(now)
        };
        let i = match slot {
            Some(i) => i,
            None => {
                // Checked before taking a slot: a filtered or refused socket costs nothing.
                if !self.out.cfg.passes(s.proto, &s.label, s.local, remote) {
                    self.out.c.filtered += 1;
                    if s.finished {
                        let nothing = ledger::SockLedger::default();
                        self.ledger.settle(nothing, s.counters, true, "untracked");
                    }
                    return;
                }
                if !s.finished && !self.out.room(self.live()) {
                    self.out.c.overflow += 1;
                    return;
                }
                self.new_sock(s, false)
            }
        };
        let remote = self.names.addr(remote);
        let sk = &mut self.socks[i];
        let mut t = Track::new(start, remote, s.counters, now).with_base(base, &mut self.adjs);
        t.proto = sk.t.proto;
        t.direction = sk.t.direction;
        t.sflags = sk.t.sflags;
        t.tcp_state = s.tcp_state;
        t.set(F_DIRTY, t.counts(&self.adjs) != Traffic::default());
        sk.t = t;
        self.start_connected(i, now, s.finished);
    }

    /// Makes a socket's connected flow live if the filters and the room allow.
    fn start_connected(&mut self, i: u32, now: u64, finishing: bool) {
        let s = self.socks[i];
        let label = self.names.labels.get(s.label);
        let (local, remote) = (
            self.names.sock_addr(s.local),
            self.names.sock_addr(s.t.remote),
        );
        let passes = self.out.cfg.passes(s.t.proto, label, local, remote);
        let room = finishing || self.out.room(self.live());
        let t = &mut self.socks[i].t;
        if !passes {
            self.out.c.filtered += 1;
            t.flags |= F_FILTERED;
            if finishing {
                self.mark_finishing(i, now);
            }
            return;
        }
        t.flags &= !F_FILTERED;
        if !room {
            self.out.c.overflow += 1;
            t.sflags |= S_OVERFLOW;
            return;
        }
        t.flags |= F_LIVE;
        self.live_socks += 1;
        if finishing {
            self.mark_finishing(i, now);
            return;
        }
        let t = self.socks[i].t;
        let w = self
            .out
            .next_wake(self.names.labels.get(s.label), &t, false, now);
        self.schedule(i, w);
    }

    pub(super) fn view_unconnected(&mut self, now: u64, s: &SocketView) {
        let Some(i) = self.find_sock(s.cookie) else {
            if s.finished {
                // Its peers come in this call: they need the socket's slot and ledger.
                let i = self.new_sock(s, true);
                self.mark_finishing(i, now);
            }
            return;
        };
        let sk = self.socks[i];
        if sk.has(S_FINISHING) {
            return;
        }
        self.refresh(i, s);
        if !sk.has(S_UNCONN) {
            if s.finished {
                // Gone: the connected flow closes with its final counts.
                let t = &mut self.socks[i].t;
                t.note(s.counters, now, &mut self.adjs);
                t.tcp_state = s.tcp_state.or(t.tcp_state);
                self.mark_finishing(i, now);
                return;
            }
            // Disconnected (UDP connect(AF_UNSPEC)): from now on one flow per peer.
            self.end_connected(i, now);
            self.socks[i].t.sflags |= S_UNCONN | S_WAS_UNCONN;
        }
        self.socks[i].t.cum = s.counters;
        if s.finished {
            self.mark_finishing(i, now);
        }
    }

    pub(super) fn observe_peer(&mut self, now: u64, p: &PeerView, view: Option<&SocketView>) {
        let slot = self.find_sock(p.cookie);
        let view = match slot {
            Some(i) if !self.socks[i].has(S_UNCONN) => return,
            Some(_) => None,
            None => match view {
                Some(v) => Some(v),
                None => {
                    self.out.c.orphan_peers += 1;
                    self.ledger.orphan(p.counters);
                    return;
                }
            },
        };
        let mut base = Traffic::default();
        let mut dormant = None;
        if let Some(i) = slot
            && let Some(a) = self.names.find_addr(p.remote)
            && let Some(pi) = self.find_peer(i, a)
        {
            let t = &mut self.peers[pi].t;
            if t.has(F_LIVE) {
                t.note(p.counters, now, &mut self.adjs);
                return;
            }
            if p.counters == t.cum {
                return;
            }
            if at_least(p.counters, t.cum) {
                base = t.cum;
            }
            dormant = Some(pi);
        }
        let counts = sub(p.counters, base);
        if counts == Traffic::default() {
            return;
        }
        let (finishing, passes) = match (slot, view) {
            (Some(i), _) => {
                let s = &self.socks[i];
                let local = self.names.sock_addr(s.local);
                let label = self.names.labels.get(s.label);
                let passes = self.out.cfg.passes(s.t.proto, label, local, p.remote);
                (s.has(S_FINISHING), passes)
            }
            (None, Some(v)) => (
                v.finished,
                self.out.cfg.passes(v.proto, &v.label, v.local, p.remote),
            ),
            (None, None) => return,
        };
        if !passes {
            self.out.c.filtered += 1;
            if finishing && let Some(i) = slot {
                add(&mut self.ledgers.entry(i).or_default().filtered, counts);
            }
            return;
        }
        // A finishing socket's flows close this call or soon: no room needed.
        if !finishing && !self.out.room(self.live()) {
            self.out.c.overflow += 1;
            if let Some(i) = slot {
                self.socks[i].t.sflags |= S_OVERFLOW;
            }
            return;
        }
        let i = match (slot, view) {
            (Some(i), _) => i,
            (None, Some(v)) => self.new_sock(v, true),
            (None, None) => return,
        };
        let remote = self.names.addr(p.remote);
        let mut t = Track::new(now, remote, p.counters, now).with_base(base, &mut self.adjs);
        t.flags |= F_LIVE | F_DIRTY;
        t.sflags = S_USED;
        let pi = match dormant {
            Some(pi) => {
                // The dormant slot already holds the address.
                self.names.drop_addr(remote);
                self.dormant -= 1;
                self.peers[pi].t = t;
                pi
            }
            None => self.add_peer(i, t),
        };
        self.live_peers += 1;
        if !finishing {
            let label = self.names.labels.get(self.socks[i].label);
            let w = self.out.next_wake(label, &t, true, now);
            self.schedule(PEER | pi, w);
        }
    }
}
