//! Per-flow state, stored by slot in dense vectors: one [`Sock`] per tracked socket (with
//! its connected flow inline), one [`Peer`] per peer of an unconnected socket.
use std::collections::BinaryHeap;

use super::compact::*;
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

// Track::flags
/// The flow is live (a peer without it is dormant: `cum` is its baseline).
pub(super) const F_LIVE: u8 = 1;
/// The `open` point passed (record written, or not wanted).
pub(super) const F_OPENED: u8 = 2;
/// The counts changed since the last open/update record.
pub(super) const F_DIRTY: u8 = 4;
/// `adj` is added to the counters (they restarted), not subtracted (a baseline).
pub(super) const F_CARRY: u8 = 8;
/// `wake` is set and the flow has an entry in the timer queue.
pub(super) const F_TIMER: u8 = 16;
/// Waits in the deferred queue for room in the outbox.
pub(super) const F_DEFERRED: u8 = 32;
/// Not live because the filters leave the flow out (else: no room).
pub(super) const F_FILTERED: u8 = 64;

// Track::sflags
pub(super) const S_USED: u8 = 1;
/// An unconnected socket: its flows are its peers; `cum` is the socket's own counters and
/// `adj` the head of its peer list.
pub(super) const S_UNCONN: u8 = 2;
/// Finished: the final counters are in, its closes wait in the finishing queue.
pub(super) const S_FINISHING: u8 = 4;
/// A flow of this socket was refused for lack of room (the ledger's reason).
pub(super) const S_OVERFLOW: u8 = 8;
/// The socket was unconnected at some point (the ledger's reason).
pub(super) const S_WAS_UNCONN: u8 = 16;

/// One flow's moving parts (72 bytes). Times other than the start are kept as their low
/// 32 bits: they are never more than a day from now.
#[derive(Debug, Clone, Copy)]
pub(super) struct Track {
    /// Last cumulative counters seen.
    pub(super) cum: Traffic,
    pub(super) start_ms: u64,
    pub(super) remote: Addr,
    /// Index in [`Adjs`] of the flow's baseline (or carry, with `F_CARRY`); `NONE` = zero.
    pub(super) adj: u32,
    pub(super) next_update: u32,
    pub(super) wake: u32,
    /// When the counters last moved; for a finishing socket: when it finished.
    pub(super) last_move: u32,
    pub(super) flags: u8,
    pub(super) tcp_state: Option<u8>,
    // The socket's own facts (unused in peer slots; they fill what would be padding).
    pub(super) proto: u8,
    pub(super) direction: Direction,
    pub(super) sflags: u8,
}

impl Default for Track {
    fn default() -> Self {
        Track {
            cum: Traffic::default(),
            start_ms: 0,
            remote: Addr::default(),
            adj: NONE,
            next_update: 0,
            wake: 0,
            last_move: 0,
            flags: 0,
            tcp_state: None,
            proto: 0,
            direction: Direction::Unknown,
            sflags: 0,
        }
    }
}

impl Track {
    pub(super) fn new(start_ms: u64, remote: Addr, cum: Traffic, now: u64) -> Track {
        Track {
            cum,
            start_ms,
            remote,
            last_move: wrap(now),
            ..Track::default()
        }
    }

    pub(super) fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }

    pub(super) fn set(&mut self, f: u8, on: bool) {
        if on {
            self.flags |= f;
        } else {
            self.flags &= !f;
        }
    }

    pub(super) fn counts(&self, adjs: &Adjs) -> Traffic {
        if self.adj == NONE {
            self.cum
        } else if self.has(F_CARRY) {
            let mut c = self.cum;
            add(&mut c, adjs.get(self.adj));
            c
        } else {
            sub(self.cum, adjs.get(self.adj))
        }
    }

    pub(super) fn note(&mut self, cum: Traffic, now: u64, adjs: &mut Adjs) {
        if cum == self.cum {
            return;
        }
        let before = self.counts(adjs);
        if !at_least(cum, self.cum) {
            // The counters restarted (the kernel's entry was recreated): keep what the
            // flow had and count on from zero.
            adjs.set(&mut self.adj, before);
            self.set(F_CARRY, true);
        }
        self.cum = cum;
        self.last_move = wrap(now);
        if self.counts(adjs) != before {
            self.flags |= F_DIRTY;
        }
    }

    /// Starts counting from `base` (a baseline subtracted from the cumulative counters).
    pub(super) fn with_base(mut self, base: Traffic, adjs: &mut Adjs) -> Track {
        if base != Traffic::default() {
            adjs.set(&mut self.adj, base);
        }
        self
    }

    pub(super) fn last_move_ms(&self, now: u64) -> u64 {
        unwrap_near(now, self.last_move)
    }
}

/// A tracked socket (96 bytes): its owner facts, and its connected flow inline.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Sock {
    pub(super) t: Track,
    pub(super) cookie: u64,
    pub(super) local: Addr,
    pub(super) owner: u32,
    pub(super) label: u32,
}

impl Sock {
    pub(super) fn has(&self, f: u8) -> bool {
        self.t.sflags & f != 0
    }

    pub(super) fn meta(&self) -> Meta {
        Meta {
            proto: self.t.proto,
            direction: self.t.direction,
            local: self.local,
            owner: self.owner,
            label: self.label,
        }
    }
}

/// A peer of an unconnected socket (88 bytes), live or dormant, in its socket's list.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Peer {
    pub(super) t: Track,
    pub(super) sock: u32,
    pub(super) prev: u32,
    pub(super) next: u32,
}

/// What every record of a socket shares (ids into [`Names`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Meta {
    pub(super) proto: u8,
    pub(super) direction: Direction,
    pub(super) local: Addr,
    pub(super) owner: u32,
    pub(super) label: u32,
}

pub(super) trait Slot: Default {
    fn used(&self) -> bool;
}

impl Slot for Sock {
    fn used(&self) -> bool {
        self.t.sflags & S_USED != 0
    }
}

impl Slot for Peer {
    fn used(&self) -> bool {
        self.t.sflags & S_USED != 0
    }
}

/// Slots per chunk of a [`Slab`]: a chunk is allocated whole, so the slack is at most one
/// chunk (a `Vec` that doubles would leave up to half its room unused).
const CHUNK: usize = 1024;

/// Slots in fixed-size chunks; freed ones are reused lowest first, and after a mass close
/// the survivors are packed to the front, so the tail can be cut off.
#[derive(Debug, Default)]
pub(super) struct Slab<T> {
    chunks: Vec<Box<[T]>>,
    len: usize,
    free: BinaryHeap<std::cmp::Reverse<u32>>,
    used: usize,
}

impl<T: Slot + Copy> Slab<T> {
    pub(super) fn alloc(&mut self, x: T) -> u32 {
        self.used += 1;
        // Numbers at or past the end were cut off with the tail: skip them.
        while let Some(std::cmp::Reverse(i)) = self.free.pop() {
            if (i as usize) < self.len {
                self[i] = x;
                return i;
            }
        }
        if self.len == self.chunks.len() * CHUNK {
            self.chunks
                .push(vec![T::default(); CHUNK].into_boxed_slice());
        }
        self.len += 1;
        let i = (self.len - 1) as u32;
        self[i] = x;
        i
    }

    pub(super) fn release(&mut self, i: u32) {
        self[i] = T::default();
        self.free.push(std::cmp::Reverse(i));
        self.used -= 1;
    }

    pub(super) fn get(&self, i: u32) -> Option<&T> {
        ((i as usize) < self.len)
            .then(|| &self[i])
            .filter(|x| x.used())
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn used(&self) -> usize {
        self.used
    }

    /// Free slots below the end.
    pub(super) fn holes(&self) -> usize {
        self.len - self.used
    }

    /// Slots in use, with their numbers.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        (0..self.len as u32)
            .map(|i| (i, &self[i]))
            .filter(|(_, x)| x.used())
    }

    fn cut_tail(&mut self) {
        while self.len > 0 && !self[(self.len - 1) as u32].used() {
            self.len -= 1;
        }
    }

    /// Moves the last slot in use into the lowest free one: returns (from, to); the caller
    /// renumbers what refers to it.
    pub(super) fn pack_one(&mut self) -> Option<(u32, u32)> {
        self.cut_tail();
        let from = self.len.checked_sub(1)? as u32;
        while let Some(std::cmp::Reverse(to)) = self.free.pop() {
            if to >= from {
                continue; // cut off with the tail
            }
            self[to] = self[from];
            self[from] = T::default();
            self.cut_tail();
            return Some((from, to));
        }
        None
    }

    /// Cuts free slots off the end and gives their chunks back.
    pub(super) fn trim(&mut self) {
        self.cut_tail();
        let chunks = self.len.div_ceil(CHUNK);
        if chunks < self.chunks.len() {
            self.chunks.truncate(chunks);
            self.chunks.shrink_to_fit();
        }
        if self.free.len() > 2 * self.holes() + 1024 {
            let n = self.len as u32;
            let free: Vec<_> = std::mem::take(&mut self.free)
                .into_iter()
                .filter(|r| r.0 < n)
                .collect();
            self.free = BinaryHeap::from(free);
            // Collected in place: the old room came along.
            self.free.shrink_to_fit();
        }
    }
}

impl<T> std::ops::Index<u32> for Slab<T> {
    type Output = T;
    fn index(&self, i: u32) -> &T {
        &self.chunks[i as usize / CHUNK][i as usize % CHUNK]
    }
}

impl<T> std::ops::IndexMut<u32> for Slab<T> {
    fn index_mut(&mut self, i: u32) -> &mut T {
        &mut self.chunks[i as usize / CHUNK][i as usize % CHUNK]
    }
}

/// Baselines and carries of the few flows that have one (a reconnect, a returning peer,
/// restarted counters), out of line: most flows count from zero.
#[derive(Debug, Default)]
pub(super) struct Adjs {
    v: Vec<Traffic>,
    free: Vec<u32>,
}

impl Adjs {
    pub(super) fn get(&self, i: u32) -> Traffic {
        self.v[i as usize]
    }

    /// Stores `t` at `*slot`, taking an entry if it has none.
    pub(super) fn set(&mut self, slot: &mut u32, t: Traffic) {
        if *slot == NONE {
            *slot = match self.free.pop() {
                Some(i) => i,
                None => {
                    self.v.push(Traffic::default());
                    (self.v.len() - 1) as u32
                }
            };
        }
        self.v[*slot as usize] = t;
    }

    pub(super) fn free(&mut self, slot: &mut u32) {
        if *slot != NONE {
            self.free.push(*slot);
            *slot = NONE;
        }
    }

    pub(super) fn trim(&mut self) {
        if self.v.capacity() > 1024 && self.v.len() - self.free.len() < self.v.capacity() / 4 {
            // Entries are referenced by index: only a free tail can go.
            let mut free: Vec<u32> = std::mem::take(&mut self.free);
            free.sort_unstable();
            while free.last().is_some_and(|&i| i as usize + 1 == self.v.len()) {
                free.pop();
                self.v.pop();
            }
            self.free = free;
            self.v.shrink_to(self.v.len() * 2);
            self.free.shrink_to_fit();
        }
    }
}
