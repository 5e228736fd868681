//! Per-socket bookkeeping of the harvest (pure logic, checked against a model in
//! model.rs) and the plan of what to read each tick.
use super::*;

/// Per-socket bookkeeping: what was last read from each slot, and which sockets are
/// finished. Pure logic (no kernel access), so it can be checked against a model.
#[derive(Debug, Default)]
pub struct SockTable {
    pub(super) socks: IntMap<u64, SockState>,
    /// Final counters of the finished sockets still tracked (few at a time).
    pub(super) finals: IntMap<u64, [Counters; SLOTS]>,
    /// Finished sockets still waiting for a slot to be harvested.
    pub(super) finishing: Vec<u64>,
    /// Done with, but their kernel entry (left because the final ring was full) is not
    /// deleted yet: reads may still return it, and must not count it again.
    pub(super) gone: IntMap<u64, ()>,
}

/// What one harvest produced.
#[derive(Debug, Default)]
pub struct Harvested {
    /// Per-socket movement in the harvested slot, sorted by cookie, one entry per socket.
    pub deltas: Vec<(u64, Counters)>,
    /// Sockets done with (both slots harvested after they finished), and whether the
    /// kernel left their entry for us to delete (ring buffer was full).
    pub done: Vec<(u64, bool)>,
}

/// Which entries of the socket map a harvest was given.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// The whole map (one batched walk): a tracked socket missing from it and from the
    /// final records is gone.
    All,
    /// Only the sockets noted as moved. `missing` were looked up and had no entry (they
    /// finished meanwhile: their record is among the final records, or they are gone).
    Moved { missing: &'a [u64] },
}

/// How to read a frozen slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// Walk the whole map.
    All(WhyAll),
    /// Look up these cookies (sorted, no duplicates).
    Keys(Vec<u64>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhyAll {
    /// Nothing is known about what happened before the poller started.
    FirstTick,
    /// The slot's active ring was full at some point: some notes are missing.
    NotesLost,
    /// So many sockets moved that one walk costs less than a lookup each.
    Cheaper,
    /// The last read of the slot failed after its notes were drained.
    Incomplete,
}

/// Decides, per tick, between looking up the sockets that moved and walking the map.
#[derive(Debug, Default)]
pub struct ActiveReads {
    /// Per slot: the kernel's cumulative count of lost notes at the last read of the slot.
    pub(super) lost_seen: [u64; SLOTS],
    pub(super) started: bool,
    /// Per slot: a read was planned and not completed (the tick failed half way).
    pub(super) pending: [bool; SLOTS],
}

/// One batched walk costs about this many entries' worth per single lookup: a lookup is a
/// syscall of its own (~0.6 µs here), the walk copies entries at ~0.3 µs each. Lookups
/// win while fewer than half the sockets moved.
const WALK_PER_LOOKUP: usize = 2;

impl ActiveReads {
    /// `active`: the cookies drained from the frozen slot's ring (any order, duplicates
    /// allowed). `lost`: the kernel's cumulative count of notes lost for that slot, read
    /// after the grace period. `tracked`: how many sockets the map holds, about.
    pub fn plan(&mut self, slot: usize, mut active: Vec<u64>, lost: u64, tracked: usize) -> Read {
        let lost_changed = lost != self.lost_seen[slot];
        self.lost_seen[slot] = lost;
        let incomplete = std::mem::replace(&mut self.pending[slot], true);
        if !self.started {
            self.started = true;
            return Read::All(WhyAll::FirstTick);
        }
        if incomplete {
            return Read::All(WhyAll::Incomplete);
        }
        if lost_changed {
            return Read::All(WhyAll::NotesLost);
        }
        active.sort_unstable();
        active.dedup();
        if active.len() * WALK_PER_LOOKUP > tracked.max(1024) {
            return Read::All(WhyAll::Cheaper);
        }
        Read::Keys(active)
    }

    /// The read planned for `slot` was harvested.
    pub fn completed(&mut self, slot: usize) {
        self.pending[slot] = false;
    }
}

/// What the harvest needs of a socket-map entry: the harvested slot's counters (48 B with
/// its cookie, not the 144 of the kernel's value: a whole-map read of 100k sockets holds
/// them all at once), and both slots of an entry the kernel kept for a socket that ended
/// (its final record did not fit the ring; few, so boxed).
#[derive(Debug, Clone)]
pub struct Entry {
    pub cur: Counters,
    pub final_slots: Option<Box<[Counters; SLOTS]>>,
}

impl Entry {
    pub fn read(sc: &SockCounters, slot: usize) -> Entry {
        let slots = sc.slots();
        Entry {
            cur: slots[slot],
            final_slots: (sc.final_pending != 0).then(|| Box::new(slots)),
        }
    }
}

impl SockTable {
    /// Harvests `slot` (frozen: no program writes it any more) from the socket map's
    /// `entries`, read first (the whole map or the sockets that moved, as `scope` says),
    /// and the final `records` drained after them.
    pub fn harvest(
        &mut self,
        slot: usize,
        tick: u64,
        entries: &[(u64, Entry)],
        records: &[FinalRecord],
        scope: Scope<'_>,
    ) -> Harvested {
        let mut out = Harvested::default();
        let (socks, finals) = (&mut self.socks, &mut self.finals);
        let now = tick as u32;
        for (cookie, sc) in entries {
            if self.gone.contains_key(cookie) {
                continue;
            }
            let st = socks.entry(*cookie).or_insert_with(|| SockState::new(tick));
            st.last_seen_tick = now;
            let mut cur = sc.cur;
            if let Some(f) = finals.get(cookie) {
                cur = max(&cur, &f[slot]);
            }
            let d = sub(&cur, &st.last[slot]);
            st.last[slot] = max(&cur, &st.last[slot]);
            if !d.is_zero() {
                out.deltas.push((*cookie, d));
            }
            if let Some(fs) = &sc.final_slots
                && !finals.contains_key(cookie)
            {
                finals.insert(*cookie, **fs);
                st.kernel_entry_left = true;
                self.finishing.push(*cookie);
            }
        }
        for r in records {
            let st = socks
                .entry(r.cookie)
                .or_insert_with(|| SockState::new(tick));
            st.last_seen_tick = now;
            let rc = r.counters.slots();
            let fin = match finals.get(&r.cookie) {
                Some(f) => [max(&f[0], &rc[0]), max(&f[1], &rc[1])],
                None => {
                    self.finishing.push(r.cookie);
                    rc
                }
            };
            finals.insert(r.cookie, fin);
        }
        // Every finished socket contributes what its final counters hold beyond what
        // was already taken from this slot; after both slots, it is forgotten.
        for cookie in std::mem::take(&mut self.finishing) {
            let Some(st) = socks.get_mut(&cookie) else {
                continue;
            };
            let Some(fin) = finals.get(&cookie) else {
                continue;
            };
            let d = sub(&fin[slot], &st.last[slot]);
            st.last[slot] = max(&fin[slot], &st.last[slot]);
            if !d.is_zero() {
                out.deltas.push((cookie, d));
            }
            st.harvested_after_finish |= 1 << slot;
            if st.harvested_after_finish == (1 << SLOTS) - 1 {
                let left = st.kernel_entry_left;
                out.done.push((cookie, left));
            } else {
                self.finishing.push(cookie);
            }
        }
        // Sockets whose entry left the map without a final record (not something the
        // kernel programs do; e.g. an entry deleted by hand): forget them.
        match scope {
            Scope::All => socks.retain(|c, st| finals.contains_key(c) || st.last_seen_tick == now),
            Scope::Moved { missing } => {
                for cookie in missing {
                    if !finals.contains_key(cookie)
                        && socks.get(cookie).is_some_and(|st| st.last_seen_tick != now)
                    {
                        socks.remove(cookie);
                    }
                }
            }
        }
        // One delta per socket, in cookie order (a socket may appear twice: read from
        // the map and finished in the same harvest).
        out.deltas.sort_unstable_by_key(|(c, _)| *c);
        out.deltas.dedup_by(|later, first| {
            if later.0 == first.0 {
                add(&mut first.1, &later.1);
                true
            } else {
                false
            }
        });
        out
    }

    /// Forgets sockets reported in [`Harvested::done`] (after their deltas were labelled).
    /// Those whose kernel entry was left to us stay known as gone until the caller deleted
    /// the entry and said so ([`SockTable::deleted`]).
    pub fn forget(&mut self, done: &[(u64, bool)]) {
        for (cookie, left) in done {
            self.socks.remove(cookie);
            self.finals.remove(cookie);
            if *left {
                self.gone.insert(*cookie, ());
            }
        }
        // A mass close leaves the tables far larger than what they hold: give it back.
        for_shrink(&mut self.socks);
        for_shrink(&mut self.finals);
    }

    /// Kernel entries of sockets done with were deleted (see [`SockTable::forget`]).
    pub fn deleted(&mut self, cookies: &[u64]) {
        for c in cookies {
            self.gone.remove(c);
        }
        for_shrink(&mut self.gone);
    }

    pub fn len(&self) -> usize {
        self.socks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.socks.is_empty()
    }

    /// Sockets tracked that are not finished: about the socket map's size.
    pub fn live(&self) -> usize {
        self.socks.len().saturating_sub(self.finishing.len())
    }
}

/// Shrinks a map that holds less than a quarter of its capacity (after a mass close), so
/// its memory goes back; the 2x headroom left keeps growth cheap.
fn for_shrink<V>(m: &mut IntMap<u64, V>) {
    if m.capacity() > 4096 && m.len() < m.capacity() / 4 {
        m.shrink_to(m.len() * 2);
    }
}
