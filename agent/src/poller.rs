//! Poller: every interval, turn the kernel's cumulative counters into one delta event.
//!
//! Exactness comes from two epoch slots. Packets count into slot `EPOCH & 1`. A tick:
//! 1. flips EPOCH, so new packets go to the other slot;
//! 2. waits for an RCU grace period (membarrier), so no program still writes the old slot;
//! 3. reads the sockets that moved in that slot, then drains the ring buffer of finished
//!    sockets (the kernel submits a record before deleting the entry, so a socket is
//!    always in at least one of the two);
//! 4. subtracts what it read from that slot two ticks ago.
//!
//! The old slot is frozen while it is read, so the per-socket deltas, the unattributed
//! bytes and the kernel's global total describe exactly the same packets: every event
//! satisfies sum(labels) + unattributed == total.
//!
//! Which sockets moved: the first packet of a socket in an epoch (per direction) notes its
//! cookie in that slot's active ring buffer. Once the slot is frozen its ring holds every
//! socket that counted into it, so the poller looks up only those (one lookup each), and
//! the cost of a tick grows with the sockets that moved, not with all sockets open. It
//! reads the whole map in one batched walk instead ([`ActiveReads::plan`]) on the first
//! tick, when a note was lost because the ring was full (the kernel counts that per
//! slot), and when so many sockets moved that the walk is cheaper. A socket not looked up
//! did not count into the slot, so what was last read for it is still its value.
use std::{
    collections::{BTreeMap, HashMap},
    hash::{BuildHasherDefault, Hasher},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use agent_common::*;
use aya::maps::{Array, Map, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use log::{debug, warn};
use thiserror::Error;

use crate::{
    bpfsys,
    discover::DiscoveredSocket,
    event::{DeltaEvent, FORMAT_VERSION, Identity, SeqAllocator, Traffic},
    labels::{Labeler, SocketFacts},
    loader::{LoadError, Loaded},
    procfs::{self, CgroupPaths, UserNames},
};

/// Hasher for the integer-keyed tables (socket cookies, label ids, ifindexes): one
/// 64x64->128 multiply folded to 64 bits. SipHash, the std default, guards against
/// chosen keys; cookies are handed out by the kernel, and the per-socket tables are
/// touched for every socket that moved, every tick.
#[derive(Default, Clone, Copy)]
pub struct IntHasher(u64);

impl Hasher for IntHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    #[inline]
    fn write_u64(&mut self, x: u64) {
        let m = ((self.0 ^ x) as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }
    #[inline]
    fn write_u32(&mut self, x: u32) {
        self.write_u64(x as u64)
    }
    #[inline]
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64)
    }
}

/// A HashMap with [`IntHasher`].
pub type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

#[derive(Debug, Error)]
pub enum PollError {
    #[error("reading map {map}: {source}")]
    Map {
        map: &'static str,
        source: std::io::Error,
    },
    #[error("map {map}: {source}")]
    Aya {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("waiting for running programs (membarrier): {0}")]
    Barrier(std::io::Error),
    #[error("allocating a sequence number: {0}")]
    Seq(std::io::Error),
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// Where a socket's owner came from, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnerSource {
    Kernel,
    Discovered,
    /// Provisional: a server-side socket not yet accept()ed takes its listener's owner.
    Listener,
}

#[derive(Debug, Clone)]
struct SockState {
    /// Last value read per slot.
    last: [Counters; SLOTS],
    /// Final counters once the socket is finished.
    finished: Option<[Counters; SLOTS]>,
    /// Bit per slot harvested since the socket finished; state is dropped once both are
    /// (by slot, not by count: a failed tick skips a slot and repeats the other).
    harvested_after_finish: u8,
    /// The kernel kept the entry because the ring buffer was full: delete it when done.
    kernel_entry_left: bool,
    /// Label index into `Poller::label_names`; None = unattributed (no owner).
    label: Option<u32>,
    owner_source: Option<OwnerSource>,
    /// Ticks spent looking for an owner (bounded retries).
    owner_attempts: u16,
    /// Last tick whose read found the socket's entry (or its final record).
    last_seen_tick: u64,
    /// What flow records need (only when flow records are on and the owner is known).
    flow: Option<Box<FlowFacts>>,
    /// The flow table was told the socket finished.
    flow_closed: bool,
}

/// A socket's connection facts for flow records.
#[derive(Debug, Clone)]
pub struct FlowFacts {
    proto: u8,
    local: std::net::SocketAddr,
    remote: Option<std::net::SocketAddr>,
    direction: crate::flows::Direction,
    owner: crate::flows::OwnerView,
    first_seen_ms: u64,
}

impl SockState {
    fn new(tick: u64) -> Self {
        SockState {
            last: [Counters::ZERO; SLOTS],
            finished: None,
            harvested_after_finish: 0,
            kernel_entry_left: false,
            label: None,
            owner_source: None,
            owner_attempts: 0,
            last_seen_tick: tick,
            flow: None,
            flow_closed: false,
        }
    }
}

/// Counters about the poller itself, for status and tests.
#[derive(Debug, Clone, Default)]
pub struct PollStats {
    pub ticks: u64,
    pub events: u64,
    pub sockets_tracked: usize,
    /// Entries in the socket map: counted exactly by whole-map reads, estimated in
    /// between from the sockets tracked that are not finished.
    pub map_entries: usize,
    /// Ticks that read the whole socket map (first tick, lost notes, many sockets moved).
    pub full_reads: u64,
    /// Of those, the ones forced by a full active ring (notes lost).
    pub full_reads_lost: u64,
    /// Socket entries read by the last tick (looked up, or walked).
    pub last_entries_read: usize,
    pub finals_received: u64,
    /// Kernel-side failure counters by name (cumulative).
    pub kernel_drops: BTreeMap<&'static str, u64>,
    /// Bytes of sockets whose owner could not be found (they went to `unattributed`).
    pub no_owner_bytes: u64,
    /// Wall time of the last tick's work, excluding the grace-period wait.
    pub last_tick_work: std::time::Duration,
    pub last_tick_wait: std::time::Duration,
    pub kernel_total: Traffic,
    /// Ticks that failed (a map read, the barrier); the next tick covers their interval.
    pub tick_failures: u64,
    pub last_tick_error: Option<String>,
}

pub struct Maps {
    socks: MapData,
    owners: MapData,
    epoch: Array<MapData, u32>,
    totals: PerCpuArray<MapData, Counters>,
    unattr: PerCpuArray<MapData, Counters>,
    drops: PerCpuArray<MapData, u64>,
    ifaces: PerCpuHashMap<MapData, u32, SlotCounters>,
    finals: RingBuf<MapData>,
    active: [RingBuf<MapData>; SLOTS],
    peers: MapData,
}

fn data(m: Map) -> MapData {
    match m {
        Map::HashMap(d)
        | Map::Array(d)
        | Map::PerCpuArray(d)
        | Map::RingBuf(d)
        | Map::LruHashMap(d) => d,
        other => panic!("unexpected map type {other:?}"),
    }
}

impl Maps {
    pub fn take(l: &mut Loaded) -> Result<Maps, PollError> {
        let aya = |map: &'static str| move |source| PollError::Aya { map, source };
        Ok(Maps {
            socks: data(l.take_map(MAP_SOCKS)?),
            owners: data(l.take_map(MAP_OWNERS)?),
            epoch: Array::try_from(l.take_map(MAP_EPOCH)?).map_err(aya(MAP_EPOCH))?,
            totals: PerCpuArray::try_from(l.take_map(MAP_TOTALS)?).map_err(aya(MAP_TOTALS))?,
            unattr: PerCpuArray::try_from(l.take_map(MAP_UNATTR)?).map_err(aya(MAP_UNATTR))?,
            drops: PerCpuArray::try_from(l.take_map(MAP_DROPS)?).map_err(aya(MAP_DROPS))?,
            ifaces: PerCpuHashMap::try_from(l.take_map(MAP_IFACES)?).map_err(aya(MAP_IFACES))?,
            finals: RingBuf::try_from(l.take_map(MAP_FINALS)?).map_err(aya(MAP_FINALS))?,
            active: [
                RingBuf::try_from(l.take_map(MAP_ACTIVE[0])?).map_err(aya(MAP_ACTIVE[0]))?,
                RingBuf::try_from(l.take_map(MAP_ACTIVE[1])?).map_err(aya(MAP_ACTIVE[1]))?,
            ],
            peers: data(l.take_map(MAP_PEERS)?),
        })
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn sub(a: &Counters, b: &Counters) -> Counters {
    // Counters only grow; saturate rather than wrap if a socket entry was recreated.
    Counters {
        tx_bytes: a.tx_bytes.saturating_sub(b.tx_bytes),
        rx_bytes: a.rx_bytes.saturating_sub(b.rx_bytes),
        tx_packets: a.tx_packets.saturating_sub(b.tx_packets),
        rx_packets: a.rx_packets.saturating_sub(b.rx_packets),
    }
}

fn max(a: &Counters, b: &Counters) -> Counters {
    Counters {
        tx_bytes: a.tx_bytes.max(b.tx_bytes),
        rx_bytes: a.rx_bytes.max(b.rx_bytes),
        tx_packets: a.tx_packets.max(b.tx_packets),
        rx_packets: a.rx_packets.max(b.rx_packets),
    }
}

fn add(t: &mut Counters, d: &Counters) {
    t.tx_bytes += d.tx_bytes;
    t.rx_bytes += d.rx_bytes;
    t.tx_packets += d.tx_packets;
    t.rx_packets += d.rx_packets;
}

fn percpu_sum(
    m: &PerCpuArray<MapData, Counters>,
    idx: u32,
    map: &'static str,
) -> Result<Counters, PollError> {
    let vals = m
        .get(&idx, 0)
        .map_err(|source| PollError::Aya { map, source })?;
    let mut s = Counters::ZERO;
    for v in vals.iter() {
        add(&mut s, v);
    }
    Ok(s)
}

pub fn comm_str(c: &[u8; 16]) -> String {
    let n = c.iter().position(|&b| b == 0).unwrap_or(16);
    String::from_utf8_lossy(&c[..n]).into_owned()
}

/// An address as the kernel keeps it (network byte order words, IPv4 in `[0]`).
fn wire_ip(family: u32, words: &[u32; 4]) -> Option<IpAddr> {
    match family as i32 {
        libc::AF_INET => Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(words[0])))),
        libc::AF_INET6 => {
            let mut b = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

fn owner_remote(o: &Owner) -> Option<IpAddr> {
    wire_ip(o.addr_family, &o.remote_ip)
}

/// Everything the labeller may need about an owner.
struct OwnerFacts {
    process: String,
    exe: Option<String>,
    cgroup: Option<String>,
    uid: u32,
    protocol: u8,
    local_port: u16,
    remote_port: u16,
    remote: Option<IpAddr>,
    netns: u64,
}

/// Per-socket bookkeeping: what was last read from each slot, and which sockets are
/// finished. Pure logic (no kernel access), so it can be checked against a model.
#[derive(Debug, Default)]
pub struct SockTable {
    socks: IntMap<u64, SockState>,
    /// Finished sockets still waiting for a slot to be harvested.
    finishing: Vec<u64>,
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
    lost_seen: [u64; SLOTS],
    started: bool,
    /// Per slot: a read was planned and not completed (the tick failed half way).
    pending: [bool; SLOTS],
}

/// From this many sockets to label in one tick on, the owner map is read in one walk.
const OWNER_PREFETCH_MIN: usize = 512;

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

impl SockTable {
    /// Harvests `slot` (frozen: no program writes it any more) from the socket map's
    /// `entries`, read first (the whole map or the sockets that moved, as `scope` says),
    /// and the final `records` drained after them.
    pub fn harvest(
        &mut self,
        slot: usize,
        tick: u64,
        entries: &[(u64, SockCounters)],
        records: &[FinalRecord],
        scope: Scope<'_>,
    ) -> Harvested {
        let mut out = Harvested::default();
        for (cookie, sc) in entries {
            let st = self
                .socks
                .entry(*cookie)
                .or_insert_with(|| SockState::new(tick));
            st.last_seen_tick = tick;
            let mut cur = sc.slot(slot);
            if let Some(f) = &st.finished {
                cur = max(&cur, &f[slot]);
            }
            let d = sub(&cur, &st.last[slot]);
            st.last[slot] = max(&cur, &st.last[slot]);
            if !d.is_zero() {
                out.deltas.push((*cookie, d));
            }
            if sc.final_pending != 0 && st.finished.is_none() {
                st.finished = Some(sc.slots());
                st.kernel_entry_left = true;
                self.finishing.push(*cookie);
            }
        }
        for r in records {
            let st = self
                .socks
                .entry(r.cookie)
                .or_insert_with(|| SockState::new(tick));
            st.last_seen_tick = tick;
            let rc = r.counters.slots();
            let fin = match st.finished {
                Some(f) => [max(&f[0], &rc[0]), max(&f[1], &rc[1])],
                None => rc,
            };
            if st.finished.is_none() {
                self.finishing.push(r.cookie);
            }
            st.finished = Some(fin);
        }
        // Every finished socket contributes what its final counters hold beyond what
        // was already taken from this slot; after both slots, it is forgotten.
        for cookie in std::mem::take(&mut self.finishing) {
            let Some(st) = self.socks.get_mut(&cookie) else {
                continue;
            };
            let Some(fin) = st.finished else { continue };
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
            Scope::All => self
                .socks
                .retain(|_, st| st.finished.is_some() || st.last_seen_tick == tick),
            Scope::Moved { missing } => {
                for cookie in missing {
                    if self
                        .socks
                        .get(cookie)
                        .is_some_and(|st| st.finished.is_none() && st.last_seen_tick != tick)
                    {
                        self.socks.remove(cookie);
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
    pub fn forget(&mut self, done: &[(u64, bool)]) {
        for (cookie, _) in done {
            self.socks.remove(cookie);
        }
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

/// A label an application gave its own socket through the control socket.
#[derive(Debug, Clone)]
pub struct NamedSocket {
    pub label: String,
    /// Who asked (for the per-uid cap).
    pub uid: u32,
}

/// Shared between the poller and the control socket.
pub type LabelOverrides = Arc<std::sync::Mutex<HashMap<u64, NamedSocket>>>;

pub struct Poller {
    /// Flow views are collected each tick (flow records on).
    flow_views_on: bool,
    flow_socks: Vec<crate::flows::SocketView>,
    flow_peers: Vec<crate::flows::PeerView>,
    /// Last counters seen per peer (to tell which moved).
    peer_last: HashMap<PeerKey, Counters>,
    /// Flow facts of the last successful resolve().
    resolved_flow: Option<Box<FlowFacts>>,
    overrides: LabelOverrides,
    maps: Maps,
    identity: Identity,
    seq: SeqAllocator,
    labeler: Arc<Labeler>,
    epoch: u32,
    tick_no: u64,
    interval_start_ms: u64,
    table: SockTable,
    last_totals: [Counters; SLOTS],
    last_unattr: [Counters; SLOTS],
    last_ifaces: IntMap<u32, [Counters; SLOTS]>,
    iface_names: IntMap<u32, String>,
    label_names: Vec<String>,
    label_index: HashMap<String, u32>,
    discovered: IntMap<u64, DiscoveredSocket>,
    /// TCP listening port -> owner, for server-side sockets not yet accept()ed.
    listeners: HashMap<u16, Owner>,
    users: UserNames,
    cgroups: Option<CgroupPaths>,
    reads: ActiveReads,
    batch: Vec<(u64, SockCounters)>,
    missing: Vec<u64>,
    /// The owner map read in one walk, while a tick labels many sockets at once.
    owner_prefetch: Option<IntMap<u64, Owner>>,
    /// Final records drained after this tick's own drain, to find the owner of a socket
    /// that closed between the harvest and its owner lookup (the kernel submits the
    /// record before it removes the owner entry). The next tick processes them first,
    /// as if they had arrived then.
    late_finals: Vec<FinalRecord>,
    pub stats: PollStats,
}

impl Poller {
    pub fn new(
        loaded: &mut Loaded,
        identity: Identity,
        seq: SeqAllocator,
        labeler: Arc<Labeler>,
        discovered: Vec<DiscoveredSocket>,
    ) -> Result<Poller, PollError> {
        let maps = Maps::take(loaded)?;
        let iface_names = loaded.interfaces.iter().cloned().collect();
        let mut p = Poller {
            flow_views_on: false,
            flow_socks: vec![],
            flow_peers: vec![],
            peer_last: HashMap::new(),
            resolved_flow: None,
            overrides: LabelOverrides::default(),
            maps,
            identity,
            seq,
            labeler,
            epoch: 0,
            tick_no: 0,
            interval_start_ms: unix_ms(),
            table: SockTable::default(),
            last_totals: [Counters::ZERO; SLOTS],
            last_unattr: [Counters::ZERO; SLOTS],
            last_ifaces: IntMap::default(),
            iface_names,
            label_names: vec![],
            label_index: HashMap::new(),
            discovered: discovered.into_iter().map(|d| (d.cookie, d)).collect(),
            listeners: HashMap::new(),
            users: UserNames::new(),
            cgroups: CgroupPaths::from_mount(),
            reads: ActiveReads::default(),
            batch: Vec::with_capacity(4096),
            missing: vec![],
            owner_prefetch: None,
            late_finals: Vec::new(),
            stats: PollStats::default(),
        };
        // Programs may have counted since attach: treat everything so far as this
        // first interval (the epoch starts at 0, both slots start at zero).
        p.epoch = p.maps.epoch.get(&0, 0).unwrap_or(0);
        // Listeners that predate us lend their owner to the connections they accept.
        let pre: Vec<Owner> = p
            .discovered
            .values()
            .filter(|d| d.protocol == 6 && d.state == 10)
            .filter_map(|d| {
                let o = d.owner.as_ref()?;
                let mut comm = [0u8; 16];
                let n = o.comm.len().min(15);
                comm[..n].copy_from_slice(&o.comm.as_bytes()[..n]);
                Some(Owner {
                    tgid: o.tgid,
                    pid: o.tgid,
                    uid: o.uid,
                    gid: o.gid,
                    comm,
                    protocol: 6,
                    origin: ORIGIN_DISCOVERED,
                    local_port: d.local.port() as u32,
                    addr_family: d.family as u32,
                    ..Owner::default()
                })
            })
            .collect();
        for o in pre {
            p.note_listener(&o);
        }
        Ok(p)
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Labels applications asked for; entries are removed when their socket is gone.
    pub fn overrides(&self) -> LabelOverrides {
        self.overrides.clone()
    }

    /// A second handle on the owner map, for ownership checks outside the poller.
    pub fn owners_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        self.maps.owners.fd().as_fd().try_clone_to_owned()
    }

    /// Whether the kernel still tracks `cookie` (as a socket that carried bytes, or as
    /// an owner record).
    pub fn owner_of(&self, cookie: u64) -> Option<Owner> {
        bpfsys::lookup::<u64, Owner>(self.maps.owners.fd().as_fd(), &cookie)
            .ok()
            .flatten()
    }

    fn label_id(&mut self, label: String) -> u32 {
        if let Some(&i) = self.label_index.get(&label) {
            return i;
        }
        let i = self.label_names.len() as u32;
        self.label_names.push(label.clone());
        self.label_index.insert(label, i);
        i
    }

    fn facts_from_owner(&mut self, o: &Owner) -> OwnerFacts {
        let exe = if self.labeler.needs_exe() && o.tgid != 0 {
            std::fs::read_link(format!("/proc/{}/exe", o.tgid))
                .ok()
                .map(|p| p.display().to_string())
        } else {
            None
        };
        let cgroup = if self.labeler.needs_cgroup() {
            self.cgroups
                .as_mut()
                .and_then(|c| c.get(o.cgroup_id).map(str::to_owned))
        } else {
            None
        };
        OwnerFacts {
            process: comm_str(&o.comm),
            exe,
            cgroup,
            uid: o.uid,
            protocol: o.protocol as u8,
            local_port: o.local_port as u16,
            remote_port: o.remote_port as u16,
            remote: owner_remote(o),
            netns: o.netns_cookie,
        }
    }

    fn label_facts(&mut self, f: &OwnerFacts) -> u32 {
        let user = if self.labeler.needs_user() {
            self.users.get(f.uid).map(str::to_owned)
        } else {
            None
        };
        let label = self.labeler.label(&SocketFacts {
            process: &f.process,
            exe: f.exe.as_deref(),
            cgroup: f.cgroup.as_deref(),
            uid: f.uid,
            user: user.as_deref(),
            protocol: f.protocol,
            local_port: f.local_port,
            remote_port: f.remote_port,
            remote_addr: f.remote,
            netns_cookie: f.netns,
        });
        self.label_id(label)
    }

    fn note_listener(&mut self, o: &Owner) {
        if o.origin != 0 && o.protocol == 6 && o.remote_port == 0 && o.local_port != 0 {
            self.listeners.insert(o.local_port as u16, *o);
        }
    }

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

    fn owner_flow_facts(
        &self,
        o: &Owner,
        source: OwnerSource,
        process: String,
    ) -> Option<Box<FlowFacts>> {
        use crate::flows::{Direction, OwnerView};
        use std::net::SocketAddr;
        if !self.flow_views_on || o.addr_family == 0 {
            return None;
        }
        let local_ip = wire_ip(o.addr_family, &o.local_ip)?;
        let remote = owner_remote(o)
            .filter(|_| o.remote_port != 0)
            .map(|ip| SocketAddr::new(ip, o.remote_port as u16));
        let direction = match (source, o.origin) {
            (OwnerSource::Listener, _) | (_, ORIGIN_ACCEPT) | (_, ORIGIN_FIRST_IO) => {
                Direction::Inbound
            }
            (_, ORIGIN_SOCK_CREATE) if remote.is_some() => Direction::Outbound,
            _ if self.listeners.contains_key(&(o.local_port as u16))
                && o.protocol == 6
                && remote.is_some() =>
            {
                Direction::Inbound
            }
            _ if remote.is_some() => Direction::Outbound,
            _ => Direction::Unknown,
        };
        Some(Box::new(FlowFacts {
            proto: o.protocol as u8,
            local: SocketAddr::new(local_ip, o.local_port as u16),
            remote,
            direction,
            owner: OwnerView {
                pid: o.tgid,
                process,
                uid: o.uid,
                cgroup: None,
                netns: o.netns_cookie,
            },
            first_seen_ms: unix_ms(),
        }))
    }

    fn resolve(&mut self, cookie: u64, rec: Option<&Owner>) -> Option<(u32, OwnerSource)> {
        let r = self.resolve_inner(cookie, rec);
        if r.is_none() {
            self.resolved_flow = None;
        }
        r
    }

    fn resolve_inner(&mut self, cookie: u64, rec: Option<&Owner>) -> Option<(u32, OwnerSource)> {
        let kernel = match rec {
            Some(o) => Some(*o),
            None => match self.owner_prefetch.as_ref().and_then(|m| m.get(&cookie)) {
                Some(o) => Some(*o),
                None => bpfsys::lookup::<u64, Owner>(self.maps.owners.fd().as_fd(), &cookie)
                    .ok()
                    .flatten(),
            },
        };
        if let Some(o) = kernel.filter(|o| o.origin != 0) {
            self.note_listener(&o);
            let f = self.facts_from_owner(&o);
            self.resolved_flow = self.owner_flow_facts(&o, OwnerSource::Kernel, f.process.clone());
            return Some((self.label_facts(&f), OwnerSource::Kernel));
        }
        if let Some(d) = self.discovered.get(&cookie) {
            if let Some(p) = &d.owner {
                let f = OwnerFacts {
                    process: p.comm.clone(),
                    exe: p.exe.clone(),
                    cgroup: p.cgroup.clone(),
                    uid: p.uid,
                    protocol: d.protocol,
                    local_port: d.local.port(),
                    remote_port: d.remote.port(),
                    remote: Some(d.remote.ip()).filter(|ip| !ip.is_unspecified()),
                    netns: procfs::netns_cookie_of_self(),
                };
                self.resolved_flow = if self.flow_views_on {
                    let inbound = d.protocol == 6 && self.listeners.contains_key(&d.local.port());
                    Some(Box::new(FlowFacts {
                        proto: d.protocol,
                        local: d.local,
                        remote: Some(d.remote).filter(|r| r.port() != 0),
                        direction: if inbound {
                            crate::flows::Direction::Inbound
                        } else {
                            crate::flows::Direction::Outbound
                        },
                        owner: crate::flows::OwnerView {
                            pid: p.tgid,
                            process: p.comm.clone(),
                            uid: p.uid,
                            cgroup: p.cgroup.clone(),
                            netns: f.netns,
                        },
                        first_seen_ms: unix_ms(),
                    }))
                } else {
                    None
                };
                return Some((self.label_facts(&f), OwnerSource::Discovered));
            }
        }
        // Addresses only (the kernel saw packets, no owner yet): a TCP socket on a port
        // we know a listener for is a server-side socket awaiting accept().
        if let Some(o) = kernel.filter(|o| o.addr_family != 0 && o.remote_port != 0) {
            if let Some(l) = self.listeners.get(&(o.local_port as u16)).copied() {
                let mut merged = l;
                merged.local_port = o.local_port;
                merged.remote_port = o.remote_port;
                merged.remote_ip = o.remote_ip;
                merged.local_ip = o.local_ip;
                merged.addr_family = o.addr_family;
                let f = self.facts_from_owner(&merged);
                self.resolved_flow =
                    self.owner_flow_facts(&merged, OwnerSource::Listener, f.process.clone());
                return Some((self.label_facts(&f), OwnerSource::Listener));
            }
        }
        None
    }

    /// Current label of a socket, resolving (or improving) its owner when needed.
    fn label_of(&mut self, cookie: u64, rec: Option<&Owner>) -> Option<u32> {
        // A label the owning application asked for (control socket) wins.
        let named = self
            .overrides
            .lock()
            .ok()
            .and_then(|o| o.get(&cookie).map(|n| n.label.clone()));
        if let Some(label) = named {
            let id = self.label_id(label);
            let st = self.table.socks.get_mut(&cookie)?;
            st.label = Some(id);
            return Some(id);
        }
        let st = self.table.socks.get(&cookie)?;
        let retry = match st.owner_source {
            None => st.owner_attempts < 100 || rec.is_some(),
            Some(OwnerSource::Listener) => st.owner_attempts < 100 || rec.is_some(),
            _ => false,
        };
        if retry {
            let found = self.resolve(cookie, rec);
            let st = self.table.socks.get_mut(&cookie)?;
            st.owner_attempts = st.owner_attempts.saturating_add(1);
            if let Some((label, src)) = found {
                st.label = Some(label);
                st.owner_source = Some(src);
                if let Some(mut f) = self.resolved_flow.take() {
                    // Keep when the flow was first seen across owner improvements.
                    if let Some(old) = &st.flow {
                        f.first_seen_ms = old.first_seen_ms;
                    }
                    st.flow = Some(f);
                }
            }
        }
        self.table.socks.get(&cookie)?.label
    }

    /// The owner in a final record the kernel submitted since this tick drained the ring:
    /// drains it again into `late_finals` (processed next tick) and looks there.
    fn late_final_owner(&mut self, cookie: u64) -> Option<Owner> {
        while let Some(item) = self.maps.finals.next() {
            if item.len() >= size_of::<FinalRecord>() {
                self.late_finals
                    .push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FinalRecord) });
            }
        }
        self.late_finals
            .iter()
            .find(|r| r.cookie == cookie && r.has_owner != 0)
            .map(|r| r.owner)
    }

    /// Collects the flow table's view of the sockets that moved or finished this tick.
    fn collect_flow_views(
        &mut self,
        moved: &[(u64, Counters)],
        finished: &[u64],
        end_states: &HashMap<u64, u64>,
        done: &[(u64, bool)],
    ) {
        // Per-peer counters of unconnected sockets: those that moved, and their sockets.
        let mut peers: Vec<(PeerKey, Counters)> = vec![];
        let _ = bpfsys::lookup_batch(self.maps.peers.fd().as_fd(), 4096, &mut peers);
        let mut peer_socks: Vec<u64> = vec![];
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
            for (k, _) in peers.iter().filter(|(k, _)| gone.contains(&k.cookie)) {
                let _ = bpfsys::delete(self.maps.peers.fd().as_fd(), k);
                self.peer_last.remove(k);
            }
        }
        self.collect_socket_views(moved, finished, end_states, &peer_socks);
    }

    fn collect_socket_views(
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
            let (counters, done) = match &st.finished {
                Some(fin) => (cum(fin), true),
                None => (cum(&st.last), false),
            };
            st.flow_closed = done;
            let label = st
                .label
                .and_then(|l| self.label_names.get(l as usize))
                .cloned()
                .unwrap_or_default();
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

    /// Flips the epoch, harvests the quiet slot, and returns the interval's event (None
    /// when nothing moved).
    pub fn tick(&mut self) -> Result<Option<DeltaEvent>, PollError> {
        let slot = (self.epoch & 1) as usize;
        self.epoch = self.epoch.wrapping_add(1);
        self.maps
            .epoch
            .set(0, self.epoch, 0)
            .map_err(|source| PollError::Aya {
                map: MAP_EPOCH,
                source,
            })?;
        let end_ms = unix_ms();
        let waited = Instant::now();
        bpfsys::wait_for_running_programs().map_err(PollError::Barrier)?;
        let work = Instant::now();
        self.stats.last_tick_wait = work - waited;
        self.tick_no += 1;
        let tick = self.tick_no;

        // Everything fallible comes before the first change of state: a tick that fails
        // leaves the slot to the next tick that reads it, which then covers both epochs
        // (and walks the whole map, as the cookies drained here are gone).
        let totals_now = percpu_sum(&self.maps.totals, slot as u32, MAP_TOTALS)?;
        let unattr_now = percpu_sum(&self.maps.unattr, slot as u32, MAP_UNATTR)?;

        // 1. The sockets that moved in the slot (or the whole map), then 2. the finished
        // sockets (their entries are gone).
        let mut active: Vec<u64> = Vec::new();
        while let Some(item) = self.maps.active[slot].next() {
            if item.len() >= 8 {
                active.push(u64::from_ne_bytes(item[..8].try_into().unwrap()));
            }
        }
        let lost = self.lost_notes(slot)?;
        let read = self.reads.plan(slot, active, lost, self.table.live());
        self.batch.clear();
        self.missing.clear();
        let socks = self.maps.socks.fd().as_fd();
        let full = match read {
            Read::All(why) => {
                bpfsys::lookup_batch(socks, 8192, &mut self.batch).map_err(|source| {
                    PollError::Map {
                        map: MAP_SOCKS,
                        source,
                    }
                })?;
                self.stats.full_reads += 1;
                if why == WhyAll::NotesLost {
                    self.stats.full_reads_lost += 1;
                    debug!(
                        "tick {tick}: active ring of slot {slot} overflowed, reading the whole socket map"
                    );
                }
                true
            }
            Read::Keys(keys) => {
                for cookie in keys {
                    match bpfsys::lookup::<u64, SockCounters>(socks, &cookie).map_err(|source| {
                        PollError::Map {
                            map: MAP_SOCKS,
                            source,
                        }
                    })? {
                        Some(v) => self.batch.push((cookie, v)),
                        None => self.missing.push(cookie),
                    }
                }
                false
            }
        };
        self.stats.last_entries_read = self.batch.len();
        let mut records: Vec<FinalRecord> = std::mem::take(&mut self.late_finals);
        while let Some(item) = self.maps.finals.next() {
            if item.len() >= size_of::<FinalRecord>() {
                records
                    .push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FinalRecord) });
            }
        }
        self.stats.finals_received += records.len() as u64;
        let batch = std::mem::take(&mut self.batch);
        let missing = std::mem::take(&mut self.missing);
        let scope = if full {
            Scope::All
        } else {
            Scope::Moved { missing: &missing }
        };
        let Harvested { deltas, done } = self.table.harvest(slot, tick, &batch, &records, scope);
        self.stats.map_entries = if full { batch.len() } else { self.table.live() };
        self.batch = batch;
        self.missing = missing;
        let mut record_owner: IntMap<u64, Owner> = IntMap::default();
        for r in records.iter().filter(|r| r.has_owner != 0) {
            record_owner.insert(r.cookie, r.owner);
        }
        // The owner travels with the record and is gone from the kernel afterwards: label
        // now, even if this slot did not move (the other slot may, next tick).
        for (cookie, o) in &record_owner {
            self.label_of(*cookie, Some(o));
        }

        self.reads.completed(slot);

        // 3. Kernel totals and unattributed for the slot.
        let total = sub(&totals_now, &self.last_totals[slot]);
        self.last_totals[slot] = totals_now;
        let mut unattributed: Traffic = sub(&unattr_now, &self.last_unattr[slot]).into();
        self.last_unattr[slot] = unattr_now;

        // 4. Labels. Many sockets to resolve at once (the first tick, a burst of new
        // connections): one walk of the owner map instead of a lookup each.
        let unresolved = deltas
            .iter()
            .filter(|(c, _)| {
                self.table
                    .socks
                    .get(c)
                    .is_some_and(|st| matches!(st.owner_source, None | Some(OwnerSource::Listener)))
            })
            .count();
        if unresolved >= OWNER_PREFETCH_MIN {
            let mut owners: Vec<(u64, Owner)> = Vec::with_capacity(unresolved);
            if bpfsys::lookup_batch(self.maps.owners.fd().as_fd(), 8192, &mut owners).is_ok() {
                self.owner_prefetch = Some(owners.into_iter().collect());
            }
        }
        let mut labels: BTreeMap<String, Traffic> = BTreeMap::new();
        let mut by_label: IntMap<u32, Traffic> = IntMap::default();
        // Two passes: sockets with a kernel owner first, so listeners seen in this very
        // interval can lend their owner to server-side sockets in the second pass.
        let mut second = vec![];
        for &(cookie, d) in &deltas {
            let d: Traffic = d.into();
            match self.label_of(cookie, record_owner.get(&cookie)) {
                Some(l) => by_label.entry(l).or_default().add(&d),
                None => second.push((cookie, d)),
            }
        }
        for (cookie, d) in second {
            if let Some(st) = self.table.socks.get_mut(&cookie) {
                st.owner_attempts = st.owner_attempts.saturating_sub(1);
            }
            let label = self
                .label_of(cookie, record_owner.get(&cookie))
                .or_else(|| {
                    let o = self.late_final_owner(cookie)?;
                    self.label_of(cookie, Some(&o))
                });
            match label {
                Some(l) => by_label.entry(l).or_default().add(&d),
                None => {
                    debug!(
                        "no owner for socket {cookie:#x} (record: {:?}, state: {:?}, owner map: {:?}, prefetch: {:?})",
                        record_owner.get(&cookie),
                        self.table.socks.get(&cookie),
                        bpfsys::lookup::<u64, Owner>(self.maps.owners.fd().as_fd(), &cookie),
                        self.owner_prefetch.as_ref().map(|m| m.get(&cookie))
                    );
                    self.stats.no_owner_bytes += d.tx + d.rx;
                    unattributed.add(&d);
                }
            }
        }
        // Sockets finishing without having moved still deserve their owner noted
        // (listeners are learned from them).
        for (cookie, o) in &record_owner {
            if deltas.binary_search_by_key(cookie, |(c, _)| *c).is_err() {
                self.note_listener(o);
            }
        }
        self.owner_prefetch = None;
        for (l, t) in by_label {
            labels
                .entry(self.label_names[l as usize].clone())
                .or_default()
                .add(&t);
        }

        // 5. Interfaces.
        let mut ifaces = BTreeMap::new();
        let iface_entries: Vec<(u32, Counters)> = self
            .maps
            .ifaces
            .iter()
            .filter_map(Result::ok)
            .map(|(idx, per_cpu)| {
                let mut c = Counters::ZERO;
                for v in per_cpu.iter() {
                    add(&mut c, &v.slot[slot]);
                }
                (idx, c)
            })
            .collect();
        for (idx, now) in iface_entries {
            let last = self
                .last_ifaces
                .entry(idx)
                .or_insert([Counters::ZERO; SLOTS]);
            let d = sub(&now, &last[slot]);
            last[slot] = now;
            if !d.is_zero() {
                let name = self
                    .iface_names
                    .get(&idx)
                    .cloned()
                    .unwrap_or_else(|| format!("if{idx}"));
                ifaces.insert(name, Traffic::from(d));
            }
        }

        // 6. Housekeeping: forget finished sockets, delete entries the kernel left us,
        // forget sockets gone from the map without a record.
        if self.flow_views_on {
            let finished: Vec<u64> = records
                .iter()
                .map(|r| r.cookie)
                .chain(done.iter().map(|(c, _)| *c))
                .collect();
            let end_states: HashMap<u64, u64> = records
                .iter()
                .map(|r| (r.cookie, r.counters.end_state))
                .collect();
            self.collect_flow_views(&deltas, &finished, &end_states, &done);
        }
        self.table.forget(&done);
        if !done.is_empty() {
            if let Ok(mut o) = self.overrides.lock() {
                if !o.is_empty() {
                    for (cookie, _) in &done {
                        o.remove(cookie);
                    }
                }
            }
        }
        for (cookie, kernel_entry_left) in done {
            if kernel_entry_left {
                let _ = bpfsys::delete(self.maps.socks.fd().as_fd(), &cookie);
                let _ = bpfsys::delete(self.maps.owners.fd().as_fd(), &cookie);
            }
        }
        self.read_drops();
        self.stats.sockets_tracked = self.table.socks.len();
        self.stats.ticks += 1;
        let total_t: Traffic = total.into();
        self.stats.kernel_total.add(&total_t);

        let start = self.interval_start_ms;
        self.interval_start_ms = end_ms;
        self.stats.last_tick_work = work.elapsed();
        if total_t.is_zero() && ifaces.is_empty() {
            return Ok(None);
        }
        let ev = DeltaEvent {
            v: FORMAT_VERSION,
            kind: "delta".into(),
            agent: self.identity.agent.clone(),
            boot: self.identity.boot.clone(),
            seq: self.seq.next().map_err(PollError::Seq)?,
            t: start,
            d: end_ms.saturating_sub(start),
            labels,
            unattributed,
            total: total_t,
            ifaces,
        };
        if !ev.conserves() {
            // Would mean a bug in the harvest; say so loudly rather than hide it.
            warn!(
                "event seq {} does not conserve: attributed {:?} vs total {:?}",
                ev.seq,
                ev.attributed_sum(),
                ev.total
            );
        }
        self.stats.events += 1;
        debug!(
            "tick {tick}: {} entries read{}, {} finals",
            self.batch.len(),
            if full { " (whole map)" } else { "" },
            records.len()
        );
        Ok(Some(ev))
    }

    fn read_drops(&mut self) {
        for (i, name) in DROP_NAMES.iter().enumerate() {
            if let Ok(v) = self.maps.drops.get(&(i as u32), 0) {
                self.stats.kernel_drops.insert(name, v.iter().sum());
            }
        }
        let lost: u64 = (0..SLOTS as u32)
            .filter_map(|s| self.maps.drops.get(&(DROP_ACTIVE_LOST + s), 0).ok())
            .map(|v| v.iter().sum::<u64>())
            .sum();
        self.stats.kernel_drops.insert("active_ring_full", lost);
        if let Ok(v) = self.maps.drops.get(&DROP_PEER_INSERT, 0) {
            self.stats
                .kernel_drops
                .insert("peer_map_full", v.iter().sum());
        }
    }

    /// The kernel's cumulative count of active-ring notes lost for `slot` (all CPUs).
    fn lost_notes(&self, slot: usize) -> Result<u64, PollError> {
        let v = self
            .maps
            .drops
            .get(&(DROP_ACTIVE_LOST + slot as u32), 0)
            .map_err(|source| PollError::Aya {
                map: MAP_DROPS,
                source,
            })?;
        Ok(v.iter().sum())
    }
}

#[cfg(test)]
mod model {
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
                e.final_pending = 1;
                let slot = (self.epoch & 1) as usize;
                self.note(cookie, slot);
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
            let h = table.harvest(slot, tick, &entries, &records, scope);
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

        for tick in 1..=304u64 {
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
            for (cookie, left) in &h.done {
                if *left {
                    w.k.map.remove(cookie);
                }
            }
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
}
