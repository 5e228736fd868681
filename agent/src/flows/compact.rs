//! Compact building blocks of the flow table: addresses in 8 bytes, refcounted interners
//! (owners, labels, IPv6 addresses held once however many flows use them), an index table
//! of `u32` slots, wrapped millisecond times, and a bucketed timer queue.
use std::collections::BTreeMap;
use std::hash::Hash;

use super::*;

/// "No slot" in `u32` links and indexes.
pub(super) const NONE: u32 = u32::MAX;

/// One 64x64->128 multiply folded to 64 bits (as the poller's `IntHasher`): keys are kernel
/// cookies and slot numbers, not chosen by others.
pub(super) fn mix(x: u64) -> u64 {
    let m = (x as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
    (m as u64) ^ ((m >> 64) as u64)
}

// ---------------------------------------------------------------------------------------
// Times
// ---------------------------------------------------------------------------------------

/// A Unix ms time kept as its low 32 bits. Only for times within ±24 days of the `now`
/// it is read back with (wake-ups, updates and idle deadlines are at most a day away).
pub(super) fn wrap(ms: u64) -> u32 {
    ms as u32
}

pub(super) fn unwrap_near(now: u64, w: u32) -> u64 {
    let d = w.wrapping_sub(now as u32) as i32;
    now.wrapping_add_signed(d as i64)
}

// ---------------------------------------------------------------------------------------
// Interner
// ---------------------------------------------------------------------------------------

/// Values held once, by refcounted `u32` id; an id is freed when its last holder lets go.
#[derive(Debug)]
pub(super) struct Interner<T> {
    items: Vec<(T, u32)>,
    free: Vec<u32>,
    index: HashMap<T, u32>,
    /// The id interned last: sockets come in runs of one owner and label, and comparing
    /// shared names is a pointer compare where hashing them reads the strings.
    last: u32,
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Interner {
            items: Vec::new(),
            free: Vec::new(),
            index: HashMap::new(),
            last: NONE,
        }
    }
}

impl<T: Hash + Eq + Clone + Default> Interner<T> {
    /// The id of `v`, with one more reference.
    pub(super) fn intern(&mut self, v: &T) -> u32 {
        if let Some(e) = self.items.get_mut(self.last as usize)
            && e.1 > 0
            && e.0 == *v
        {
            e.1 += 1;
            return self.last;
        }
        if let Some(&id) = self.index.get(v) {
            self.items[id as usize].1 += 1;
            self.last = id;
            return id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.items[id as usize] = (v.clone(), 1);
                id
            }
            None => {
                self.items.push((v.clone(), 1));
                (self.items.len() - 1) as u32
            }
        };
        self.index.insert(v.clone(), id);
        self.last = id;
        id
    }

    pub(super) fn acquire(&mut self, id: u32) {
        self.items[id as usize].1 += 1;
    }

    pub(super) fn release(&mut self, id: u32) {
        let e = &mut self.items[id as usize];
        e.1 -= 1;
        if e.1 == 0 {
            let v = std::mem::take(&mut e.0);
            self.index.remove(&v);
            self.free.push(id);
        }
    }

    pub(super) fn get(&self, id: u32) -> &T {
        &self.items[id as usize].0
    }

    pub(super) fn shrink(&mut self) {
        let before = self.items.len();
        while self.items.last().is_some_and(|e| e.1 == 0) {
            self.items.pop();
        }
        if self.items.len() < before {
            let n = self.items.len() as u32;
            self.free.retain(|&i| i < n);
        }
        if self.items.len() < self.items.capacity() / 4 {
            self.items.shrink_to(self.items.len() * 2);
            self.free.shrink_to_fit();
            self.index.shrink_to(self.index.len() * 2);
        }
    }
}

#[cfg(test)]
impl<T> Interner<T> {
    /// References held, by id (0 for a free id).
    pub(super) fn ref_counts(&self) -> Vec<u32> {
        self.items.iter().map(|e| e.1).collect()
    }
}

// ---------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------

/// An IP address and port in 8 bytes: IPv4 inline, IPv6 as an id of [`Names::v6`].
/// IPv4-mapped IPv6 addresses are stored as IPv4 (they are written so).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub(super) struct Addr {
    pub(super) ip: u32,
    pub(super) port: u16,
    pub(super) v6: bool,
}

impl Addr {
    pub(super) fn key(self) -> u64 {
        ((self.ip as u64) << 24) | ((self.port as u64) << 1) | self.v6 as u64
    }
}

/// The shared names of the table: owners, labels and IPv6 addresses, each held once.
#[derive(Debug, Default)]
pub(super) struct Names {
    pub(super) owners: Interner<OwnerView>,
    pub(super) labels: Interner<Arc<str>>,
    pub(super) v6: Interner<[u8; 16]>,
}

impl Names {
    /// The compact form of `a`, holding a reference for an IPv6 address.
    pub(super) fn addr(&mut self, a: SocketAddr) -> Addr {
        match a.ip().to_canonical() {
            IpAddr::V4(ip) => Addr {
                ip: u32::from(ip),
                port: a.port(),
                v6: false,
            },
            IpAddr::V6(ip) => Addr {
                ip: self.v6.intern(&ip.octets()),
                port: a.port(),
                v6: true,
            },
        }
    }

    /// The compact form of `a` if it is held already (lookups must not intern).
    pub(super) fn find_addr(&self, a: SocketAddr) -> Option<Addr> {
        match a.ip().to_canonical() {
            IpAddr::V4(ip) => Some(Addr {
                ip: u32::from(ip),
                port: a.port(),
                v6: false,
            }),
            IpAddr::V6(ip) => self.v6.index.get(&ip.octets()).map(|&id| Addr {
                ip: id,
                port: a.port(),
                v6: true,
            }),
        }
    }

    pub(super) fn hold_addr(&mut self, a: Addr) {
        if a.v6 {
            self.v6.acquire(a.ip);
        }
    }

    pub(super) fn drop_addr(&mut self, a: Addr) {
        if a.v6 {
            self.v6.release(a.ip);
        }
    }

    pub(super) fn ip(&self, a: Addr) -> IpAddr {
        if a.v6 {
            IpAddr::from(*self.v6.get(a.ip))
        } else {
            IpAddr::from(std::net::Ipv4Addr::from(a.ip))
        }
    }

    pub(super) fn sock_addr(&self, a: Addr) -> SocketAddr {
        SocketAddr::new(self.ip(a), a.port)
    }

    pub(super) fn shrink(&mut self) {
        self.owners.shrink();
        self.labels.shrink();
        self.v6.shrink();
    }
}

// ---------------------------------------------------------------------------------------
// Index table
// ---------------------------------------------------------------------------------------

/// A hash set of `u32` slot numbers whose keys live in the slots themselves (the caller
/// hashes and compares): 4 bytes a bucket where a `HashMap<u64, u32>` takes 16, and no
/// copy of the key. Linear probing, deletion by backward shift (no tombstones).
#[derive(Debug, Default)]
pub(super) struct IdxTable {
    slots: Vec<u32>,
    len: usize,
}

impl IdxTable {
    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    pub(super) fn find(&self, h: u64, mut eq: impl FnMut(u32) -> bool) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut i = h as usize & mask;
        loop {
            let v = self.slots[i];
            if v == NONE {
                return None;
            }
            if eq(v) {
                return Some(v);
            }
            i = (i + 1) & mask;
        }
    }

    pub(super) fn insert(&mut self, h: u64, v: u32, hash_of: impl Fn(u32) -> u64) {
        // At most 4/5 full: probes stay short.
        if (self.len + 1) * 5 > self.slots.len() * 4 {
            self.resize((self.slots.len() * 2).max(16), &hash_of);
        }
        self.place(h, v);
        self.len += 1;
    }

    fn place(&mut self, h: u64, v: u32) {
        let mask = self.mask();
        let mut i = h as usize & mask;
        while self.slots[i] != NONE {
            i = (i + 1) & mask;
        }
        self.slots[i] = v;
    }

    fn resize(&mut self, cap: usize, hash_of: &impl Fn(u32) -> u64) {
        let old = std::mem::replace(&mut self.slots, vec![NONE; cap]);
        for v in old.into_iter().filter(|&v| v != NONE) {
            self.place(hash_of(v), v);
        }
    }

    /// Removes `v` (found from its hash `h`); `hash_of` gives the hash of other entries.
    pub(super) fn remove(&mut self, h: u64, v: u32, hash_of: impl Fn(u32) -> u64) -> bool {
        if self.slots.is_empty() {
            return false;
        }
        let mask = self.mask();
        let mut i = h as usize & mask;
        loop {
            match self.slots[i] {
                NONE => return false,
                x if x == v => break,
                _ => i = (i + 1) & mask,
            }
        }
        // Backward shift: pull later entries of the run into the hole when their home
        // slot allows it, so lookups never stop at a gap before them.
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let e = self.slots[j];
            if e == NONE {
                break;
            }
            let home = hash_of(e) as usize & mask;
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = e;
                hole = j;
            }
        }
        self.slots[hole] = NONE;
        self.len -= 1;
        true
    }

    /// After a mass close: back to at most twice the room needed.
    pub(super) fn shrink(&mut self, hash_of: impl Fn(u32) -> u64) {
        if self.slots.len() > 1024 && self.len < self.slots.len() / 4 {
            let cap = (self.len * 2).next_power_of_two().max(16);
            self.resize(cap, &hash_of);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Timer queue
// ---------------------------------------------------------------------------------------

/// Width of a timer bucket. Entries only say "look at this flow around then"; the flow's
/// own state says whether something is due, so the width costs no precision.
const BUCKET_MS: u64 = 64;

/// Flows to look at, by time bucket: `u32` ids (a flow slot and its kind), no times.
/// An id may be stale (its flow closed or rescheduled); the reader checks the slot.
#[derive(Debug, Default)]
pub(super) struct Wheel {
    buckets: BTreeMap<u64, Vec<u32>>,
    len: usize,
}

impl Wheel {
    pub(super) fn bucket(ms: u64) -> u64 {
        ms / BUCKET_MS
    }

    pub(super) fn push(&mut self, wake_ms: u64, id: u32) {
        self.buckets
            .entry(Self::bucket(wake_ms))
            .or_default()
            .push(id);
        self.len += 1;
    }

    /// Takes every bucket that may hold something due at `now`, earliest first.
    pub(super) fn take_due(&mut self, now: u64) -> BTreeMap<u64, Vec<u32>> {
        let later = self.buckets.split_off(&(Self::bucket(now) + 1));
        let due = std::mem::replace(&mut self.buckets, later);
        self.len -= due.values().map(Vec::len).sum::<usize>();
        due
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn clear(&mut self) {
        self.buckets.clear();
        self.len = 0;
    }
}
