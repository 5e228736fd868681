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
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agent_common::*;
use aya::maps::{Array, Map, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use log::{debug, warn};
use thiserror::Error;

use crate::{
    bpfsys,
    discover::DiscoveredSocket,
    event::{DeltaEvent, FORMAT_VERSION, Traffic},
    labels::{Labeler, SocketFacts},
    loader::{LoadError, Loaded},
    procfs::{self, CgroupPaths, UserNames},
};

mod label_set;
#[cfg(test)]
mod model;
mod owners;
mod reaper;
mod stats;
mod table;
mod views;

use label_set::LabelSet;
pub use label_set::{LabelSetStats, OVERFLOW_LABEL};
pub use stats::{PollStats, TICK_BUCKETS_MS, TickTimes};
pub use table::{ActiveReads, Entry, Harvested, Read, Scope, SockTable, WhyAll};

/// A bound on the clean-up work after a mass close, per tick: socket-map entries read
/// looking for sockets whose final record did not fit the ring. (Deleting the entries
/// of sockets done with is the reaper thread's, see reaper.rs.)
const WALK_PER_TICK: usize = 1024;

/// Ticks whose work takes longer are logged (at debug) with the time of each phase.
const SLOW_TICK: std::time::Duration = std::time::Duration::from_millis(25);

/// From this many sockets to label in one tick on, the owner map is walked instead of
/// looked up once per socket.
const OWNER_WALK_MIN: usize = 512;
/// Entries read per part of a whole-map walk of the owner map and of the socket map:
/// the part's key and value buffers stay below the allocator's mmap threshold (128 KiB,
/// process::tune_allocator), so a part costs no mapping of its own.
const OWNER_WALK_PART: usize = 128 * 1024 / size_of::<Owner>() - 1;
const SOCK_WALK_PART: usize = 128 * 1024 / size_of::<SockCounters>() - 1;

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

/// One tracked socket, kept small: there is one per socket that carried bytes (100k on
/// a busy host). A finished socket's final counters live in [`SockTable`]'s side map.
#[derive(Debug, Clone)]
struct SockState {
    /// Last value read per slot.
    last: [Counters; SLOTS],
    /// Label index into `Poller::label_names`; None = unattributed (no owner).
    label: Option<u32>,
    /// What flow records need (only when flow records are on and the owner is known).
    flow: Option<Box<FlowFacts>>,
    /// Last tick whose read found the socket's entry (or its final record); compared
    /// for equality only, so wrapping is harmless.
    last_seen_tick: u32,
    owner_source: Option<OwnerSource>,
    /// Ticks spent looking for an owner (bounded retries).
    owner_attempts: u8,
    /// Bit per slot harvested since the socket finished; state is dropped once both are
    /// (by slot, not by count: a failed tick skips a slot and repeats the other).
    harvested_after_finish: u8,
    /// The kernel kept the entry because the ring buffer was full: delete it when done.
    kernel_entry_left: bool,
    /// The flow table was told the socket finished.
    flow_closed: bool,
}

const _: () = assert!(size_of::<SockState>() <= 96);

/// A socket's connection facts for flow records.
#[derive(Debug, Clone)]
pub struct FlowFacts {
    proto: u8,
    local: std::net::SocketAddr,
    remote: Option<std::net::SocketAddr>,
    direction: crate::flows::Direction,
    /// Shared by every socket of the same owner (interned in `Poller::owners`).
    owner: Arc<crate::flows::OwnerView>,
    first_seen_ms: u64,
}

impl SockState {
    fn new(tick: u64) -> Self {
        SockState {
            last: [Counters::ZERO; SLOTS],
            label: None,
            flow: None,
            last_seen_tick: tick as u32,
            owner_source: None,
            owner_attempts: 0,
            harvested_after_finish: 0,
            kernel_entry_left: false,
            flow_closed: false,
        }
    }
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
    /// The per-peer map's reader (views.rs).
    peer_reads: views::PeerReads,
    /// Flow facts of the last successful resolve().
    resolved_flow: Option<Box<FlowFacts>>,
    overrides: LabelOverrides,
    maps: Maps,
    labeler: Arc<Labeler>,
    epoch: u32,
    tick_no: u64,
    interval_start_ms: u64,
    table: SockTable,
    last_totals: [Counters; SLOTS],
    last_unattr: [Counters; SLOTS],
    last_ifaces: IntMap<u32, [Counters; SLOTS]>,
    iface_names: IntMap<u32, String>,
    /// Labels in use, bounded (a sweep releases those no tracked socket holds).
    labels: LabelSet,
    /// Process names and cgroup paths, one shared copy each (flow facts hold many);
    /// swept with the labels, or when it doubled since the last sweep.
    names: HashMap<String, Arc<str>>,
    /// Flow facts' owners, one shared copy each; swept with the names.
    owners: HashMap<crate::flows::OwnerView, Arc<crate::flows::OwnerView>>,
    names_after_sweep: usize,
    discovered: IntMap<u64, DiscoveredSocket>,
    /// TCP listening port -> owner, for server-side sockets not yet accept()ed.
    listeners: HashMap<u16, Owner>,
    users: UserNames,
    cgroups: Option<CgroupPaths>,
    reads: ActiveReads,
    batch: Vec<(u64, Entry)>,
    missing: Vec<u64>,
    /// Final records drained after this tick's own drain, to find the owner of a socket
    /// that closed between the harvest and its owner lookup (the kernel submits the
    /// record before it removes the owner entry). The next tick processes them first,
    /// as if they had arrived then.
    late_finals: Vec<FinalRecord>,
    /// Sockets tracked at the last heap trim (or the most since).
    trim_mark: usize,
    /// The walk looking for entries the kernel kept because the final ring was full
    /// (None: no walk under way), and the kernel's count of those at the walk's start.
    deferred_walk: Option<bpfsys::WalkCursor>,
    deferred_walked: u64,
    /// Deletes kernel entries of sockets (and peers) done with, off the tick.
    reaper: reaper::Reaper,
    pub stats: PollStats,
}

impl Poller {
    pub fn new(
        loaded: &mut Loaded,
        labeler: Arc<Labeler>,
        discovered: Vec<DiscoveredSocket>,
    ) -> Result<Poller, PollError> {
        let maps = Maps::take(loaded)?;
        let dup = |m: &MapData, name: &'static str| {
            m.fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| PollError::Map { map: name, source })
        };
        let reaper = reaper::Reaper::start(reaper::ReaperMaps {
            socks: dup(&maps.socks, MAP_SOCKS)?,
            owners: dup(&maps.owners, MAP_OWNERS)?,
            peers: dup(&maps.peers, MAP_PEERS)?,
        })
        .map_err(|source| PollError::Map {
            map: "(reaper thread)",
            source,
        })?;
        let iface_names = loaded.interfaces.iter().cloned().collect();
        let mut p = Poller {
            flow_views_on: false,
            flow_socks: vec![],
            flow_peers: vec![],
            peer_reads: Default::default(),
            resolved_flow: None,
            overrides: LabelOverrides::default(),
            maps,
            labeler,
            epoch: 0,
            tick_no: 0,
            interval_start_ms: unix_ms(),
            table: SockTable::default(),
            last_totals: [Counters::ZERO; SLOTS],
            last_unattr: [Counters::ZERO; SLOTS],
            last_ifaces: IntMap::default(),
            iface_names,
            labels: LabelSet::new(crate::config::DEFAULT_MAX_LABELS),
            names: HashMap::new(),
            owners: HashMap::new(),
            names_after_sweep: 0,
            discovered: discovered.into_iter().map(|d| (d.cookie, d)).collect(),
            listeners: HashMap::new(),
            users: UserNames::new(),
            cgroups: CgroupPaths::from_mount(),
            reads: ActiveReads::default(),
            batch: Vec::with_capacity(4096),
            missing: vec![],
            late_finals: Vec::new(),
            trim_mark: 0,
            deferred_walk: None,
            deferred_walked: 0,
            reaper,
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

    /// At most `max` distinct labels at once (the rest share the overflow label).
    pub fn limit_labels(&mut self, max: usize) {
        self.labels = LabelSet::new(max);
    }

    /// Releases labels and names no tracked socket (or flow) holds any more: any local
    /// user can make new ones (every process name is one), so none is kept for good.
    fn sweep_names(&mut self) {
        if self.labels.sweep_due() {
            self.labels
                .sweep(self.table.socks.values().filter_map(|s| s.label));
        }
        // When the names doubled since the last sweep, or (every 50 ticks) when they
        // outnumber the sockets that could hold them twice over: a sweep in the middle of
        // a burst keeps what was still held then, and nothing doubles after it.
        let n = self.names.len();
        let outgrown = self.tick_no.is_multiple_of(50) && n > 2 * self.table.socks.len();
        if n >= 256 && (n >= 2 * self.names_after_sweep.max(1) || outgrown) {
            self.sweep_names_now();
        }
        self.stats.labels = self.labels.stats();
    }

    fn sweep_names_now(&mut self) {
        // Held elsewhere (flow facts, flow records) means in use. Owners first: they hold
        // names.
        self.owners.retain(|_, a| Arc::strong_count(a) > 1);
        self.owners.shrink_to_fit();
        self.names.retain(|_, a| Arc::strong_count(a) > 1);
        self.names.shrink_to_fit();
        self.names_after_sweep = self.names.len();
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
        let full = self.read_slot(slot, tick)?;
        if !full {
            self.walk_deferred(slot)?;
        }
        let t_read = work.elapsed();
        let entries_read = self.batch.len();
        self.stats.last_entries_read = entries_read;
        let mut records: Vec<FinalRecord> = std::mem::take(&mut self.late_finals);
        self.read_finals(&mut records);
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
        let t_harvest = work.elapsed();

        // 3. Kernel totals and unattributed for the slot.
        let total = sub(&totals_now, &self.last_totals[slot]);
        self.last_totals[slot] = totals_now;
        let mut unattributed: Traffic = sub(&unattr_now, &self.last_unattr[slot]).into();
        self.last_unattr[slot] = unattr_now;

        // 4. Labels, 5. interfaces, 6. housekeeping.
        let labels = self.label_deltas(&deltas, &record_owner, &mut unattributed);
        let t_labels = work.elapsed();
        let ifaces = self.iface_deltas(slot);
        let ndone = done.len();
        let hk = self.housekeeping(&records, &deltas, done);
        self.stats.sockets_tracked = self.table.socks.len();
        self.return_memory();
        self.stats.ticks += 1;
        let total_t: Traffic = total.into();
        self.stats.kernel_total.add(&total_t);

        let start = self.interval_start_ms;
        self.interval_start_ms = end_ms;
        self.stats.last_tick_work = work.elapsed();
        // `work` is recorded by the caller, over the whole cycle (event and flow records
        // written too).
        self.stats.wait.record(self.stats.last_tick_wait);
        if self.stats.last_tick_work > SLOW_TICK {
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            debug!(
                "slow tick {tick}: {:.1} ms: read {:.1} ({} entries{}), harvest {:.1} ({} finals), labels {:.1} ({} sockets moved), housekeeping {:.1} ({} done: flow views {:.1}, forget {:.1}, handing over deletes {:.1})",
                ms(self.stats.last_tick_work),
                ms(t_read),
                entries_read,
                if full { ", whole map" } else { "" },
                ms(t_harvest - t_read),
                records.len(),
                ms(t_labels - t_harvest),
                deltas.len(),
                ms(self.stats.last_tick_work - t_labels),
                ndone,
                ms(hk[0]),
                ms(hk[1]),
                ms(hk[2]),
            );
        }
        if total_t.is_zero() && ifaces.is_empty() {
            return Ok(None);
        }
        let ev = DeltaEvent {
            v: FORMAT_VERSION,
            kind: "delta".into(),
            // The envelope (agent, boot, seq) is stamped where the event is written.
            agent: String::new(),
            boot: String::new(),
            seq: 0,
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
                "event at {} does not conserve: attributed {:?} vs total {:?}",
                ev.t,
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

    /// After a busy interval or a mass close, memory goes back. The batch buffer shrinks
    /// once a tick reads far less than it holds (large buffers are mapped on their own,
    /// see process::tune_allocator, so freeing one returns it; shrinking only when the
    /// busy phase is over keeps a steadily busy host from mapping it anew every tick).
    /// When the table fell to half of what it held at the last trim, the small blocks its
    /// sockets' flow facts and names used are handed back too.
    fn return_memory(&mut self) {
        if self.batch.capacity() > 16 * 1024 && self.batch.len() < self.batch.capacity() / 4 {
            self.batch = Vec::with_capacity(4096);
        }
        let n = self.table.socks.len();
        self.trim_mark = self.trim_mark.max(n);
        if n < self.trim_mark / 2 {
            self.trim_mark = n;
            // The names the gone sockets held go first, so their memory goes back too.
            self.sweep_names_now();
            crate::process::release_free_heap();
        }
    }

    /// Hands the kernel entries of sockets done with to the reaper thread, and takes note
    /// of what it deleted since the last tick.
    fn reap(&mut self, left: impl IntoIterator<Item = u64>) {
        self.reaper.delete_sockets(left);
        for d in self.reaper.turn() {
            match d {
                reaper::Done::Sockets { keys, .. } => self.table.deleted(&keys),
                reaper::Done::Peers { keys } => self.peer_reads.undoom(&keys),
            }
        }
        self.stats.kernel_deletes_waiting = self.reaper.backlog();
    }

    /// Reads the next part of the socket map looking for entries the kernel kept because
    /// the final ring was full (their counters are frozen: the socket ends), into
    /// `self.batch`. Starts a walk when the kernel kept more since the last walk started;
    /// each tick reads at most [`WALK_PER_TICK`] entries.
    fn walk_deferred(&mut self, slot: usize) -> Result<(), PollError> {
        let kept = self
            .stats
            .kernel_fallbacks
            .get("final_ring_full")
            .copied()
            .unwrap_or(0);
        if self.deferred_walk.is_none() && kept > self.deferred_walked {
            self.deferred_walked = kept;
            self.deferred_walk = Some(bpfsys::WalkCursor::default());
        }
        let Some(cursor) = self.deferred_walk.as_mut() else {
            return Ok(());
        };
        let mut part: Vec<(u64, SockCounters)> = Vec::with_capacity(WALK_PER_TICK);
        let done = bpfsys::walk_step(
            self.maps.socks.fd().as_fd(),
            cursor,
            WALK_PER_TICK,
            &mut part,
        )
        .map_err(|source| PollError::Map {
            map: MAP_SOCKS,
            source,
        })?;
        if done {
            self.deferred_walk = None;
        }
        self.batch.extend(
            part.iter()
                .filter(|(_, v)| v.final_pending != 0)
                .map(|(c, v)| (*c, Entry::read(v, slot))),
        );
        Ok(())
    }

    /// Phase 1: reads the entries of the sockets noted as moved in `slot` (or the whole
    /// map, when the plan says so) into `self.batch`, the vanished ones into
    /// `self.missing`. True when the whole map was read.
    fn read_slot(&mut self, slot: usize, tick: u64) -> Result<bool, PollError> {
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
        Ok(match read {
            Read::All(why) => {
                // In parts, each converted as it comes: the whole map is never held in
                // the kernel's (larger) layout.
                self.batch
                    .reserve(self.table.live() + self.table.live() / 4);
                let mut cursor = bpfsys::WalkCursor::default();
                let mut part: Vec<(u64, SockCounters)> = Vec::with_capacity(SOCK_WALK_PART);
                loop {
                    part.clear();
                    let done = bpfsys::walk_step(socks, &mut cursor, SOCK_WALK_PART, &mut part)
                        .map_err(|source| PollError::Map {
                            map: MAP_SOCKS,
                            source,
                        })?;
                    self.batch
                        .extend(part.iter().map(|(c, v)| (*c, Entry::read(v, slot))));
                    if done {
                        break;
                    }
                }
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
                        Some(v) => self.batch.push((cookie, Entry::read(&v, slot))),
                        None => self.missing.push(cookie),
                    }
                }
                false
            }
        })
    }

    /// Phase 2: appends the final records in the ring to `into`.
    fn read_finals(&mut self, into: &mut Vec<FinalRecord>) {
        while let Some(item) = self.maps.finals.next() {
            if item.len() >= size_of::<FinalRecord>() {
                into.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FinalRecord) });
            }
        }
    }

    /// Phase 4: sums the sockets' deltas per label; what has no owner goes to
    /// `unattributed`. Many sockets to resolve at once (the first tick, a burst of new
    /// connections): one walk of the owner map instead of a lookup each.
    fn label_deltas(
        &mut self,
        deltas: &[(u64, Counters)],
        record_owner: &IntMap<u64, Owner>,
        unattributed: &mut Traffic,
    ) -> BTreeMap<String, Traffic> {
        let unresolved = deltas
            .iter()
            .filter(|(c, _)| {
                self.table
                    .socks
                    .get(c)
                    .is_some_and(|st| matches!(st.owner_source, None | Some(OwnerSource::Listener)))
            })
            .count();
        if unresolved >= OWNER_WALK_MIN {
            self.resolve_by_walk(record_owner);
        }
        let mut labels: BTreeMap<String, Traffic> = BTreeMap::new();
        let mut by_label: IntMap<u32, Traffic> = IntMap::default();
        // Two passes: sockets with a kernel owner first, so listeners seen in this very
        // interval can lend their owner to server-side sockets in the second pass.
        let mut second = vec![];
        for &(cookie, d) in deltas {
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
                        "no owner for socket {cookie:#x} (record: {:?}, state: {:?}, owner map: {:?})",
                        record_owner.get(&cookie),
                        self.table.socks.get(&cookie),
                        bpfsys::lookup::<u64, Owner>(self.maps.owners.fd().as_fd(), &cookie),
                    );
                    self.stats.no_owner_bytes += d.tx + d.rx;
                    unattributed.add(&d);
                }
            }
        }
        // Sockets finishing without having moved still deserve their owner noted
        // (listeners are learned from them).
        for (cookie, o) in record_owner {
            if deltas.binary_search_by_key(cookie, |(c, _)| *c).is_err() {
                self.note_listener(o);
            }
        }
        for (l, t) in by_label {
            labels
                .entry(
                    self.labels
                        .name(l)
                        .map_or_else(String::new, |n| n.to_string()),
                )
                .or_default()
                .add(&t);
        }
        labels
    }

    /// Phase 5: per-interface deltas of `slot` (tc).
    fn iface_deltas(&mut self, slot: usize) -> BTreeMap<String, Traffic> {
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
        ifaces
    }

    /// Phase 6: flow views, then forget finished sockets, delete entries the kernel left
    /// us, forget sockets gone from the map without a record, read the drop counters.
    /// Returns how long its parts took (flow views, forgetting, kernel deletes), for the
    /// slow-tick log.
    fn housekeeping(
        &mut self,
        records: &[FinalRecord],
        deltas: &[(u64, Counters)],
        done: Vec<(u64, bool)>,
    ) -> [Duration; 3] {
        let t0 = Instant::now();
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
            self.collect_flow_views(deltas, &finished, &end_states);
        }
        let t_views = t0.elapsed();
        self.table.forget(&done);
        self.sweep_names();
        if !done.is_empty()
            && let Ok(mut o) = self.overrides.lock()
            && !o.is_empty()
        {
            for (cookie, _) in &done {
                o.remove(cookie);
            }
        }
        let t_forget = t0.elapsed();
        self.reap(done.iter().filter(|(_, left)| *left).map(|(c, _)| *c));
        let t_deletes = t0.elapsed();
        self.read_drops();
        [t_views, t_forget - t_views, t_deletes - t_forget]
    }

    fn read_drops(&mut self) {
        let sum = |m: &PerCpuArray<MapData, u64>, i: u32| {
            m.get(&i, 0).ok().map(|v| v.iter().sum::<u64>())
        };
        for (i, name) in DROP_NAMES {
            if let Some(v) = sum(&self.maps.drops, i) {
                self.stats.kernel_drops.insert(name, v);
            }
        }
        if let Some(v) = sum(&self.maps.drops, DROP_PEER_INSERT) {
            self.stats.kernel_drops.insert("peer_map_full", v);
        }
        // Fallbacks: nothing lost, the poller took the slower way.
        if let Some(v) = sum(&self.maps.drops, DROP_RINGBUF_FULL) {
            self.stats.kernel_fallbacks.insert("final_ring_full", v);
        }
        let lost: u64 = (0..SLOTS as u32)
            .filter_map(|s| sum(&self.maps.drops, DROP_ACTIVE_LOST + s))
            .sum();
        self.stats.kernel_fallbacks.insert("active_ring_full", lost);
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
