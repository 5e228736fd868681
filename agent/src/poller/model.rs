//! Replays random operation sequences against a fake kernel (two slots, a socket map,
//! a bounded ring of final records, a bounded active ring per slot with its lost-note
//! counter) and checks the harvest against the truth: every interval's per-socket
//! deltas equal what was counted into the harvested slot, whether the poller looked up
//! the sockets noted as moved or walked the whole map.
use std::collections::HashSet;

use super::*;

/// Small deterministic PRNG (xorshift) so failures replay.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Default)]
struct FakeKernel {
    epoch: u32,
    map: HashMap<u64, SockCounters>,
    ring: Vec<FinalRecord>,
    ring_cap: usize,
    /// Per slot: cookies noted as moved, and notes lost to a full ring.
    active: [Vec<u64>; SLOTS],
    active_cap: usize,
    lost: [u64; SLOTS],
    finished: HashSet<u64>,
}

impl FakeKernel {
    fn note(&mut self, cookie: u64, slot: usize) {
        if self.active[slot].len() < self.active_cap {
            self.active[slot].push(cookie);
        } else {
            self.lost[slot] += 1;
        }
    }

    /// What sockacct_ingress / sockacct_egress do.
    fn packet(&mut self, cookie: u64, len: u64, egress: bool) -> bool {
        if self.finished.contains(&cookie) {
            return false; // no packets after the end (TCP_CLOSE / release)
        }
        let slot = (self.epoch & 1) as usize;
        let cur = self.epoch as u64 + 1;
        let e = self.map.entry(cookie).or_default();
        let (d, seen) = if egress {
            (&mut e.tx[slot], &mut e.tx_seen)
        } else {
            (&mut e.rx[slot], &mut e.rx_seen)
        };
        d.bytes += len;
        d.packets += 1;
        if *seen != cur {
            *seen = cur;
            self.note(cookie, slot);
        }
        true
    }

    fn finish(&mut self, cookie: u64) {
        if self.finished.contains(&cookie) {
            return;
        }
        let Some(e) = self.map.get_mut(&cookie) else {
            return;
        };
        self.finished.insert(cookie);
        if self.ring.len() < self.ring_cap {
            // Submit, then delete: the order the kernel program uses.
            self.ring.push(FinalRecord {
                cookie,
                counters: *e,
                ..Default::default()
            });
            self.map.remove(&cookie);
        } else {
            // Kept, marked, not noted: the poller's walk finds it.
            e.final_pending = 1;
        }
    }
}

struct World {
    rng: Rng,
    k: FakeKernel,
    live: Vec<u64>,
    next_cookie: u64,
    /// Interval the kernel currently counts into.
    interval: u64,
    /// Truth: per (interval, cookie) what was counted.
    truth: HashMap<(u64, u64), Counters>,
    counted: HashMap<u64, Counters>,
}

impl World {
    fn kernel_op(&mut self) {
        match self.rng.below(10) {
            0 => {
                self.live.push(self.next_cookie);
                self.next_cookie += 1;
            }
            1..=6 if !self.live.is_empty() => {
                let c = self.live[self.rng.below(self.live.len() as u64) as usize];
                let len = 40 + self.rng.below(1500);
                let eg = self.rng.below(2) == 0;
                if self.k.packet(c, len, eg) {
                    let d = Counters {
                        tx_bytes: if eg { len } else { 0 },
                        rx_bytes: if eg { 0 } else { len },
                        tx_packets: eg as u64,
                        rx_packets: (!eg) as u64,
                    };
                    add(self.truth.entry((self.interval, c)).or_default(), &d);
                    add(self.counted.entry(c).or_default(), &d);
                }
            }
            7 if !self.live.is_empty() => {
                let i = self.rng.below(self.live.len() as u64) as usize;
                let c = self.live.swap_remove(i);
                self.k.finish(c);
            }
            _ => {}
        }
    }

    /// One poller tick against the fake kernel, the way `Poller::tick` reads it.
    /// Returns the harvest and the interval it covers.
    /// With `fail`, the tick stops after reading the map (as a failed lookup would):
    /// nothing is harvested, and the slot's next tick must cover both intervals.
    fn tick(
        &mut self,
        table: &mut SockTable,
        reads: &mut ActiveReads,
        tick: u64,
        busy: bool,
        fail: bool,
    ) -> Option<(Harvested, u64, bool)> {
        // Flip; after the grace period nothing writes the old slot.
        let slot = (self.k.epoch & 1) as usize;
        self.k.epoch += 1;
        let harvested = self.interval;
        self.interval += 1;
        let active = std::mem::take(&mut self.k.active[slot]);
        let mut read = reads.plan(slot, active, self.k.lost[slot], table.live());
        // Also walk now and then when lookups would do (as when many sockets moved).
        if busy && matches!(read, Read::Keys(_)) && self.rng.below(5) == 0 {
            read = Read::All(WhyAll::Cheaper);
        }
        let mut entries: Vec<(u64, SockCounters)> = vec![];
        let entries_of = |v: &[(u64, SockCounters)]| -> Vec<(u64, Entry)> {
            v.iter()
                .map(|(c, sc)| (*c, Entry::read(sc, slot)))
                .collect()
        };
        let mut missing = vec![];
        let full = match read {
            Read::All(_) => {
                entries = self.k.map.iter().map(|(a, b)| (*a, *b)).collect();
                true
            }
            Read::Keys(keys) => {
                // The kernel keeps running between single lookups.
                for cookie in keys {
                    if busy && self.rng.below(4) == 0 {
                        self.kernel_op();
                    }
                    match self.k.map.get(&cookie) {
                        Some(v) => entries.push((cookie, *v)),
                        None => missing.push(cookie),
                    }
                }
                false
            }
        };
        if !full {
            // The walk for kept entries: some of them each tick (all once quiet).
            let mut kept: Vec<(u64, SockCounters)> = self
                .k
                .map
                .iter()
                .filter(|(_, v)| v.final_pending != 0)
                .map(|(a, b)| (*a, *b))
                .collect();
            kept.sort_unstable_by_key(|(c, _)| *c);
            if busy {
                kept.retain(|_| self.rng.below(3) == 0);
            }
            entries.extend(kept);
        }
        if fail {
            return None;
        }
        // Between reading the map and draining the ring, the kernel keeps running:
        // packets into the new slot, sockets finishing.
        if busy {
            for _ in 0..self.rng.below(8) {
                self.kernel_op();
            }
        }
        let records = std::mem::take(&mut self.k.ring);
        let scope = if full {
            Scope::All
        } else {
            Scope::Moved { missing: &missing }
        };
        let h = table.harvest(slot, tick, &entries_of(&entries), &records, scope);
        reads.completed(slot);
        Some((h, harvested, full))
    }
}

fn run(seed: u64, ring_cap: usize, active_cap: usize) -> (u64, u64) {
    let mut w = World {
        rng: Rng(seed | 1),
        k: FakeKernel {
            ring_cap,
            active_cap,
            ..Default::default()
        },
        live: vec![],
        next_cookie: 1,
        interval: 1,
        truth: HashMap::new(),
        counted: HashMap::new(),
    };
    let mut table = SockTable::default();
    let mut reads = ActiveReads::default();
    let mut reported: HashMap<u64, Counters> = HashMap::new();
    let (mut walks, mut ticks) = (0u64, 0u64);
    // Per slot: intervals whose tick failed, reported with the slot's next harvest.
    let mut unharvested: [Vec<u64>; SLOTS] = Default::default();
    let mut to_delete: Vec<u64> = vec![];

    for tick in 1..=306u64 {
        let busy = tick <= 300;
        if busy {
            for _ in 0..w.rng.below(40) {
                w.kernel_op();
            }
        } else if tick == 301 {
            // Close everything and drain: nothing counted may be missing.
            for c in std::mem::take(&mut w.live) {
                w.k.finish(c);
            }
        }
        let slot = (w.k.epoch & 1) as usize;
        let fail = busy && tick > 1 && w.rng.below(13) == 0;
        let Some((h, iv, full)) = w.tick(&mut table, &mut reads, tick, busy, fail) else {
            // This interval's movement is reported with the slot's next harvest.
            unharvested[slot].push(w.interval - 1);
            continue;
        };
        ticks += 1;
        walks += full as u64;
        let mut intervals = std::mem::take(&mut unharvested[slot]);
        intervals.push(iv);
        let want_of = |cookie: u64| {
            let mut t = Counters::ZERO;
            for i in &intervals {
                if let Some(c) = w.truth.get(&(*i, cookie)) {
                    add(&mut t, c);
                }
            }
            t
        };
        let mut seen = HashSet::new();
        for (cookie, d) in &h.deltas {
            assert!(
                seen.insert(*cookie),
                "seed {seed}: tick {tick} socket {cookie} reported twice"
            );
            assert_eq!(
                *d,
                want_of(*cookie),
                "seed {seed}: tick {tick} socket {cookie} (intervals {intervals:?})"
            );
            add(reported.entry(*cookie).or_default(), d);
        }
        for ((i, cookie), want) in &w.truth {
            if intervals.contains(i) && !want.is_zero() {
                assert!(
                    seen.contains(cookie),
                    "seed {seed}: tick {tick} socket {cookie} missing {want:?}"
                );
            }
        }
        table.forget(&h.done);
        // Kept entries are deleted later, a few per tick (all once quiet).
        to_delete.extend(h.done.iter().filter(|(_, left)| *left).map(|(c, _)| *c));
        let n = if busy {
            (w.rng.below(3) as usize).min(to_delete.len())
        } else {
            to_delete.len()
        };
        let keys: Vec<u64> = to_delete.drain(..n).collect();
        for c in &keys {
            w.k.map.remove(c);
        }
        table.deleted(&keys);
    }
    let counted: HashMap<u64, Counters> = w
        .counted
        .into_iter()
        .filter(|(_, c)| !c.is_zero())
        .collect();
    assert_eq!(reported, counted, "seed {seed}");
    assert!(
        table.is_empty(),
        "seed {seed}: {} sockets still tracked",
        table.len()
    );
    assert!(
        w.k.map.is_empty(),
        "seed {seed}: kernel entries left behind"
    );
    (walks, ticks)
}

#[test]
fn harvest_matches_the_truth_with_roomy_rings() {
    let (mut walks, mut ticks) = (0, 0);
    for seed in 1..200 {
        let (w, t) = run(seed * 7919, 1 << 20, 1 << 20);
        walks += w;
        ticks += t;
    }
    // Mostly lookups of the sockets that moved: walks only on the first tick and
    // when the model asks for one.
    assert!(walks * 3 < ticks, "{walks} walks in {ticks} ticks");
}

#[test]
fn harvest_matches_the_truth_when_the_final_ring_is_often_full() {
    for seed in 1..200 {
        run(seed * 104729, 1, 1 << 20);
    }
}

#[test]
fn harvest_matches_the_truth_when_active_notes_are_lost() {
    let (mut walks, mut ticks) = (0, 0);
    for seed in 1..200 {
        // Active rings of 1..4 notes: many ticks lose notes and must walk the map.
        let (w, t) = run(
            seed * 15485863,
            1 + (seed as usize % 3),
            1 + (seed as usize % 4),
        );
        walks += w;
        ticks += t;
    }
    assert!(
        walks * 4 > ticks,
        "lost notes should force walks: {walks} in {ticks} ticks"
    );
}

#[test]
fn plan_reads_moved_sockets_and_walks_when_it_must() {
    let mut r = ActiveReads::default();
    let plan = |r: &mut ActiveReads, slot, active, lost| {
        let p = r.plan(slot, active, lost, 10_000);
        r.completed(slot);
        p
    };
    assert_eq!(plan(&mut r, 0, vec![3, 1], 0), Read::All(WhyAll::FirstTick));
    assert_eq!(plan(&mut r, 1, vec![5, 2, 5], 0), Read::Keys(vec![2, 5]));
    assert_eq!(plan(&mut r, 0, vec![7], 3), Read::All(WhyAll::NotesLost));
    // The lost count is remembered per slot: the next read of slot 0 is back to keys.
    assert_eq!(plan(&mut r, 1, vec![], 0), Read::Keys(vec![]));
    assert_eq!(plan(&mut r, 0, vec![7], 3), Read::Keys(vec![7]));
    let many: Vec<u64> = (0..6000).collect();
    assert_eq!(plan(&mut r, 1, many, 0), Read::All(WhyAll::Cheaper));
    // A read that was planned but never harvested (the tick failed): the slot's
    // drained notes are gone, so its next read walks the whole map.
    assert_eq!(r.plan(0, vec![9], 3, 10_000), Read::Keys(vec![9]));
    assert_eq!(plan(&mut r, 1, vec![], 0), Read::Keys(vec![]));
    assert_eq!(plan(&mut r, 0, vec![4], 3), Read::All(WhyAll::Incomplete));
    assert_eq!(plan(&mut r, 0, vec![4], 3), Read::Keys(vec![4]));
}

#[test]
fn int_hasher_spreads_sequential_cookies() {
    use std::hash::BuildHasher;
    let b = BuildHasherDefault::<IntHasher>::default();
    // hashbrown takes the bucket from the low bits and a tag from the top 7 bits.
    let mut low = HashSet::new();
    let mut top = HashSet::new();
    for c in 1..=4096u64 {
        let h = b.hash_one(c);
        low.insert(h & 4095);
        top.insert(h >> 57);
    }
    assert!(low.len() > 2500, "{} distinct low-bit buckets", low.len());
    assert_eq!(top.len(), 128);
}
