//! Poller: every interval, turn the kernel's cumulative counters into one delta event.
//!
//! Exactness comes from two epoch slots. Packets count into slot `EPOCH & 1`. A tick:
//! 1. flips EPOCH, so new packets go to the other slot;
//! 2. waits for an RCU grace period (membarrier), so no program still writes the old slot;
//! 3. reads the socket map (one batched walk), then drains the ring buffer of finished
//!    sockets (the kernel submits a record before deleting the entry, so a socket is
//!    always in at least one of the two);
//! 4. subtracts what it read from that slot two ticks ago.
//!
//! The old slot is frozen while it is read, so the per-socket deltas, the unattributed
//! bytes and the kernel's global total describe exactly the same packets: every event
//! satisfies sum(labels) + unattributed == total.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use agent_common::*;
use aya::maps::{Array, HashMap as AyaHashMap, Map, MapData, PerCpuArray, RingBuf};
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

#[derive(Debug, Error)]
pub enum PollError {
    #[error("reading map {map}: {source}")]
    Map { map: &'static str, source: std::io::Error },
    #[error("map {map}: {source}")]
    Aya { map: &'static str, source: aya::maps::MapError },
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
    /// Slots harvested since the socket finished; state is dropped at SLOTS.
    harvested_after_finish: u8,
    /// The kernel kept the entry because the ring buffer was full: delete it when done.
    kernel_entry_left: bool,
    /// Label index into `Poller::label_names`; None = unattributed (no owner).
    label: Option<u32>,
    owner_source: Option<OwnerSource>,
    /// Ticks spent looking for an owner (bounded retries).
    owner_attempts: u16,
    last_seen_tick: u64,
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
        }
    }
}

/// Counters about the poller itself, for status and tests.
#[derive(Debug, Clone, Default)]
pub struct PollStats {
    pub ticks: u64,
    pub events: u64,
    pub sockets_tracked: usize,
    pub map_entries: usize,
    pub finals_received: u64,
    /// Kernel-side failure counters by name (cumulative).
    pub kernel_drops: BTreeMap<&'static str, u64>,
    /// Bytes of sockets whose owner could not be found (they went to `unattributed`).
    pub no_owner_bytes: u64,
    /// Wall time of the last tick's work, excluding the grace-period wait.
    pub last_tick_work: std::time::Duration,
    pub last_tick_wait: std::time::Duration,
    pub kernel_total: Traffic,
}

pub struct Maps {
    socks: MapData,
    owners: MapData,
    epoch: Array<MapData, u32>,
    totals: PerCpuArray<MapData, Counters>,
    unattr: PerCpuArray<MapData, Counters>,
    drops: PerCpuArray<MapData, u64>,
    ifaces: AyaHashMap<MapData, u32, SlotCounters>,
    finals: RingBuf<MapData>,
}

fn data(m: Map) -> MapData {
    match m {
        Map::HashMap(d) | Map::Array(d) | Map::PerCpuArray(d) | Map::RingBuf(d) | Map::LruHashMap(d) => d,
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
            ifaces: AyaHashMap::try_from(l.take_map(MAP_IFACES)?).map_err(aya(MAP_IFACES))?,
            finals: RingBuf::try_from(l.take_map(MAP_FINALS)?).map_err(aya(MAP_FINALS))?,
        })
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
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

fn percpu_sum(m: &PerCpuArray<MapData, Counters>, idx: u32, map: &'static str) -> Result<Counters, PollError> {
    let vals = m.get(&idx, 0).map_err(|source| PollError::Aya { map, source })?;
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

fn owner_remote(o: &Owner) -> Option<IpAddr> {
    match o.addr_family as i32 {
        libc::AF_INET => Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(o.remote_ip[0])))),
        libc::AF_INET6 => {
            let mut b = [0u8; 16];
            for (i, w) in o.remote_ip.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
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
    socks: HashMap<u64, SockState>,
    /// Finished sockets still waiting for a slot to be harvested.
    finishing: Vec<u64>,
}

/// What one harvest produced.
#[derive(Debug, Default)]
pub struct Harvested {
    /// Per-socket movement in the harvested slot.
    pub deltas: HashMap<u64, Counters>,
    /// Sockets done with (both slots harvested after they finished), and whether the
    /// kernel left their entry for us to delete (ring buffer was full).
    pub done: Vec<(u64, bool)>,
}

impl SockTable {
    /// Harvests `slot` (frozen: no program writes it any more) from the socket map's
    /// `entries`, read first, and the final `records` drained after them.
    pub fn harvest(&mut self, slot: usize, tick: u64, entries: &[(u64, SockCounters)], records: &[FinalRecord]) -> Harvested {
        let mut out = Harvested::default();
        for (cookie, sc) in entries {
            let st = self.socks.entry(*cookie).or_insert_with(|| SockState::new(tick));
            st.last_seen_tick = tick;
            let mut cur = sc.slot[slot];
            if let Some(f) = &st.finished {
                cur = max(&cur, &f[slot]);
            }
            let d = sub(&cur, &st.last[slot]);
            st.last[slot] = max(&cur, &st.last[slot]);
            if !d.is_zero() {
                add(out.deltas.entry(*cookie).or_default(), &d);
            }
            if sc.final_pending != 0 && st.finished.is_none() {
                st.finished = Some(sc.slot);
                st.kernel_entry_left = true;
                self.finishing.push(*cookie);
            }
        }
        for r in records {
            let st = self.socks.entry(r.cookie).or_insert_with(|| SockState::new(tick));
            st.last_seen_tick = tick;
            let fin = match st.finished {
                Some(f) => [max(&f[0], &r.counters.slot[0]), max(&f[1], &r.counters.slot[1])],
                None => r.counters.slot,
            };
            if st.finished.is_none() {
                self.finishing.push(r.cookie);
            }
            st.finished = Some(fin);
        }
        // Every finished socket contributes what its final counters hold beyond what
        // was already taken from this slot; after both slots, it is forgotten.
        for cookie in std::mem::take(&mut self.finishing) {
            let Some(st) = self.socks.get_mut(&cookie) else { continue };
            let Some(fin) = st.finished else { continue };
            let d = sub(&fin[slot], &st.last[slot]);
            st.last[slot] = max(&fin[slot], &st.last[slot]);
            if !d.is_zero() {
                add(out.deltas.entry(cookie).or_default(), &d);
            }
            st.harvested_after_finish += 1;
            if st.harvested_after_finish as usize >= SLOTS {
                let left = st.kernel_entry_left;
                out.done.push((cookie, left));
            } else {
                self.finishing.push(cookie);
            }
        }
        out
    }

    /// Forgets sockets reported in [`Harvested::done`] (after their deltas were labelled).
    pub fn forget(&mut self, done: &[(u64, bool)]) {
        for (cookie, _) in done {
            self.socks.remove(cookie);
        }
    }

    /// Drops state of sockets that left the map without a final record.
    pub fn forget_vanished(&mut self, tick: u64) {
        self.socks.retain(|_, st| st.finished.is_some() || st.last_seen_tick + 2 >= tick);
    }

    pub fn len(&self) -> usize {
        self.socks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.socks.is_empty()
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
    last_ifaces: HashMap<u32, [Counters; SLOTS]>,
    iface_names: HashMap<u32, String>,
    label_names: Vec<String>,
    label_index: HashMap<String, u32>,
    discovered: HashMap<u64, DiscoveredSocket>,
    /// TCP listening port -> owner, for server-side sockets not yet accept()ed.
    listeners: HashMap<u16, Owner>,
    users: UserNames,
    cgroups: Option<CgroupPaths>,
    batch: Vec<(u64, SockCounters)>,
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
            last_ifaces: HashMap::new(),
            iface_names,
            label_names: vec![],
            label_index: HashMap::new(),
            discovered: discovered.into_iter().map(|d| (d.cookie, d)).collect(),
            listeners: HashMap::new(),
            users: UserNames::new(),
            cgroups: CgroupPaths::from_mount(),
            batch: Vec::with_capacity(4096),
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
        bpfsys::lookup::<u64, Owner>(self.maps.owners.fd().as_fd(), &cookie).ok().flatten()
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
            std::fs::read_link(format!("/proc/{}/exe", o.tgid)).ok().map(|p| p.display().to_string())
        } else {
            None
        };
        let cgroup = if self.labeler.needs_cgroup() {
            self.cgroups.as_mut().and_then(|c| c.get(o.cgroup_id).map(str::to_owned))
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
        let user = if self.labeler.needs_user() { self.users.get(f.uid).map(str::to_owned) } else { None };
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
    fn resolve(&mut self, cookie: u64, rec: Option<&Owner>) -> Option<(u32, OwnerSource)> {
        let kernel = match rec {
            Some(o) => Some(*o),
            None => bpfsys::lookup::<u64, Owner>(self.maps.owners.fd().as_fd(), &cookie).ok().flatten(),
        };
        if let Some(o) = kernel.filter(|o| o.origin != 0) {
            self.note_listener(&o);
            let f = self.facts_from_owner(&o);
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
                return Some((self.label_facts(&f), OwnerSource::Listener));
            }
        }
        None
    }

    /// Current label of a socket, resolving (or improving) its owner when needed.
    fn label_of(&mut self, cookie: u64, rec: Option<&Owner>) -> Option<u32> {
        // A label the owning application asked for (control socket) wins.
        let named = self.overrides.lock().ok().and_then(|o| o.get(&cookie).map(|n| n.label.clone()));
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
            }
        }
        self.table.socks.get(&cookie)?.label
    }

    /// Flips the epoch, harvests the quiet slot, and returns the interval's event (None
    /// when nothing moved).
    pub fn tick(&mut self) -> Result<Option<DeltaEvent>, PollError> {
        let slot = (self.epoch & 1) as usize;
        self.epoch = self.epoch.wrapping_add(1);
        self.maps
            .epoch
            .set(0, self.epoch, 0)
            .map_err(|source| PollError::Aya { map: MAP_EPOCH, source })?;
        let end_ms = unix_ms();
        let waited = Instant::now();
        bpfsys::wait_for_running_programs().map_err(PollError::Barrier)?;
        let work = Instant::now();
        self.stats.last_tick_wait = work - waited;
        self.tick_no += 1;
        let tick = self.tick_no;

        // 1. The socket map, then 2. the finished sockets (their entries are gone).
        self.batch.clear();
        bpfsys::lookup_batch(self.maps.socks.fd().as_fd(), 8192, &mut self.batch)
            .map_err(|source| PollError::Map { map: MAP_SOCKS, source })?;
        self.stats.map_entries = self.batch.len();
        let mut records: Vec<FinalRecord> = vec![];
        while let Some(item) = self.maps.finals.next() {
            if item.len() >= size_of::<FinalRecord>() {
                records.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FinalRecord) });
            }
        }
        self.stats.finals_received += records.len() as u64;
        let batch = std::mem::take(&mut self.batch);
        let Harvested { deltas, done } = self.table.harvest(slot, tick, &batch, &records);
        self.batch = batch;
        let mut record_owner: HashMap<u64, Owner> = HashMap::new();
        for r in records.iter().filter(|r| r.has_owner != 0) {
            record_owner.insert(r.cookie, r.owner);
        }
        // The owner travels with the record and is gone from the kernel afterwards: label
        // now, even if this slot did not move (the other slot may, next tick).
        for (cookie, o) in &record_owner {
            self.label_of(*cookie, Some(o));
        }

        // 3. Kernel totals and unattributed for the slot.
        let totals_now = percpu_sum(&self.maps.totals, slot as u32, MAP_TOTALS)?;
        let total = sub(&totals_now, &self.last_totals[slot]);
        self.last_totals[slot] = totals_now;
        let unattr_now = percpu_sum(&self.maps.unattr, slot as u32, MAP_UNATTR)?;
        let mut unattributed: Traffic = sub(&unattr_now, &self.last_unattr[slot]).into();
        self.last_unattr[slot] = unattr_now;

        // 4. Labels.
        let mut labels: BTreeMap<String, Traffic> = BTreeMap::new();
        let mut by_label: HashMap<u32, Traffic> = HashMap::new();
        let mut cookies: Vec<u64> = deltas.keys().copied().collect();
        cookies.sort_unstable();
        // Two passes: sockets with a kernel owner first, so listeners seen in this very
        // interval can lend their owner to server-side sockets in the second pass.
        let mut second = vec![];
        for cookie in cookies {
            let d: Traffic = deltas[&cookie].into();
            match self.label_of(cookie, record_owner.get(&cookie)) {
                Some(l) => by_label.entry(l).or_default().add(&d),
                None => second.push((cookie, d)),
            }
        }
        for (cookie, d) in second {
            if let Some(st) = self.table.socks.get_mut(&cookie) {
                st.owner_attempts = st.owner_attempts.saturating_sub(1);
            }
            match self.label_of(cookie, record_owner.get(&cookie)) {
                Some(l) => by_label.entry(l).or_default().add(&d),
                None => {
                    debug!("no owner for socket {cookie:#x} (record: {:?}, state: {:?})", record_owner.get(&cookie), self.table.socks.get(&cookie));
                    self.stats.no_owner_bytes += d.tx + d.rx;
                    unattributed.add(&d);
                }
            }
        }
        // Sockets finishing without having moved still deserve their owner noted
        // (listeners are learned from them).
        for (cookie, o) in &record_owner {
            if !deltas.contains_key(cookie) {
                self.note_listener(o);
            }
        }
        for (l, t) in by_label {
            labels.entry(self.label_names[l as usize].clone()).or_default().add(&t);
        }

        // 5. Interfaces.
        let mut ifaces = BTreeMap::new();
        let iface_entries: Vec<(u32, SlotCounters)> = self.maps.ifaces.iter().filter_map(Result::ok).collect();
        for (idx, sc) in iface_entries {
            let last = self.last_ifaces.entry(idx).or_insert([Counters::ZERO; SLOTS]);
            let d = sub(&sc.slot[slot], &last[slot]);
            last[slot] = sc.slot[slot];
            if !d.is_zero() {
                let name = self.iface_names.get(&idx).cloned().unwrap_or_else(|| format!("if{idx}"));
                ifaces.insert(name, Traffic::from(d));
            }
        }

        // 6. Housekeeping: forget finished sockets, delete entries the kernel left us,
        // forget sockets gone from the map without a record.
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
        if tick % 16 == 0 {
            self.table.forget_vanished(tick);
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
            warn!("event seq {} does not conserve: attributed {:?} vs total {:?}", ev.seq, ev.attributed_sum(), ev.total);
        }
        self.stats.events += 1;
        debug!("tick {tick}: {} sockets, {} finals", self.batch.len(), records.len());
        Ok(Some(ev))
    }

    fn read_drops(&mut self) {
        for (i, name) in DROP_NAMES.iter().enumerate() {
            if let Ok(v) = self.maps.drops.get(&(i as u32), 0) {
                self.stats.kernel_drops.insert(name, v.iter().sum());
            }
        }
    }
}

#[cfg(test)]
mod model {
    //! Replays random operation sequences against a fake kernel (two slots, a socket map,
    //! a bounded ring of final records) and checks the harvest against the truth: every
    //! interval's per-socket deltas equal what was counted into the harvested slot.
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
        finished: std::collections::HashSet<u64>,
    }

    impl FakeKernel {
        fn packet(&mut self, cookie: u64, len: u64, egress: bool) -> bool {
            if self.finished.contains(&cookie) {
                return false; // no packets after the end (TCP_CLOSE / release)
            }
            let slot = (self.epoch & 1) as usize;
            let e = self.map.entry(cookie).or_default();
            let c = &mut e.slot[slot];
            if egress {
                c.tx_bytes += len;
                c.tx_packets += 1;
            } else {
                c.rx_bytes += len;
                c.rx_packets += 1;
            }
            true
        }

        fn finish(&mut self, cookie: u64) {
            if self.finished.contains(&cookie) {
                return;
            }
            let Some(e) = self.map.get_mut(&cookie) else { return };
            self.finished.insert(cookie);
            if self.ring.len() < self.ring_cap {
                // Submit, then delete: the order the kernel program uses.
                self.ring.push(FinalRecord { cookie, counters: *e, ..Default::default() });
                self.map.remove(&cookie);
            } else {
                e.final_pending = 1;
            }
        }
    }

    fn run(seed: u64, ring_cap: usize) {
        let mut rng = Rng(seed | 1);
        let mut k = FakeKernel { ring_cap, ..Default::default() };
        let mut table = SockTable::default();
        // Truth: per (interval, cookie) what was counted.
        let mut truth: HashMap<(u64, u64), Counters> = HashMap::new();
        let mut interval = 1u64;
        let mut next_cookie = 1u64;
        let mut live: Vec<u64> = vec![];
        let mut reported: HashMap<u64, Counters> = HashMap::new();
        let mut counted: HashMap<u64, Counters> = HashMap::new();

        let mut kernel_op = |k: &mut FakeKernel, rng: &mut Rng, live: &mut Vec<u64>, interval: u64, truth: &mut HashMap<(u64, u64), Counters>, counted: &mut HashMap<u64, Counters>| {
            match rng.below(10) {
                0 => {
                    live.push(next_cookie);
                    next_cookie += 1;
                }
                1..=6 if !live.is_empty() => {
                    let c = live[rng.below(live.len() as u64) as usize];
                    let len = 40 + rng.below(1500);
                    let eg = rng.below(2) == 0;
                    if k.packet(c, len, eg) {
                        let d = Counters {
                            tx_bytes: if eg { len } else { 0 },
                            rx_bytes: if eg { 0 } else { len },
                            tx_packets: eg as u64,
                            rx_packets: (!eg) as u64,
                        };
                        add(truth.entry((interval, c)).or_default(), &d);
                        add(counted.entry(c).or_default(), &d);
                    }
                }
                7 if !live.is_empty() => {
                    let i = rng.below(live.len() as u64) as usize;
                    let c = live.swap_remove(i);
                    k.finish(c);
                }
                _ => {}
            }
        };

        for tick in 1..=300u64 {
            for _ in 0..rng.below(40) {
                kernel_op(&mut k, &mut rng, &mut live, interval, &mut truth, &mut counted);
            }
            // Tick: flip; after the grace period nothing writes the old slot.
            let slot = (k.epoch & 1) as usize;
            k.epoch += 1;
            let harvested_interval = interval;
            interval += 1;
            let entries: Vec<(u64, SockCounters)> = k.map.iter().map(|(a, b)| (*a, *b)).collect();
            // Between reading the map and draining the ring, the kernel keeps running:
            // packets into the new slot, sockets finishing.
            for _ in 0..rng.below(8) {
                kernel_op(&mut k, &mut rng, &mut live, interval, &mut truth, &mut counted);
            }
            let records = std::mem::take(&mut k.ring);
            let h = table.harvest(slot, tick, &entries, &records);
            for (cookie, d) in &h.deltas {
                let want = truth.get(&(harvested_interval, *cookie)).copied().unwrap_or_default();
                assert_eq!(*d, want, "seed {seed}: tick {tick} socket {cookie}");
                add(reported.entry(*cookie).or_default(), d);
            }
            for ((iv, cookie), want) in &truth {
                if *iv == harvested_interval && !want.is_zero() {
                    assert!(h.deltas.contains_key(cookie), "seed {seed}: tick {tick} socket {cookie} missing {want:?}");
                }
            }
            table.forget(&h.done);
            for (cookie, left) in &h.done {
                if *left {
                    k.map.remove(cookie);
                }
            }
            if tick % 16 == 0 {
                table.forget_vanished(tick);
            }
        }
        // Close everything and drain: nothing counted may be missing.
        for c in live.drain(..) {
            k.finish(c);
        }
        for tick in 301..=304 {
            let slot = (k.epoch & 1) as usize;
            k.epoch += 1;
            let entries: Vec<(u64, SockCounters)> = k.map.iter().map(|(a, b)| (*a, *b)).collect();
            let records = std::mem::take(&mut k.ring);
            let h = table.harvest(slot, tick, &entries, &records);
            for (cookie, d) in &h.deltas {
                add(reported.entry(*cookie).or_default(), d);
            }
            table.forget(&h.done);
            for (cookie, left) in &h.done {
                if *left {
                    k.map.remove(cookie);
                }
            }
        }
        assert_eq!(reported, counted.into_iter().filter(|(_, c)| !c.is_zero()).collect::<HashMap<_, _>>(), "seed {seed}");
        assert!(table.is_empty(), "seed {seed}: {} sockets still tracked", table.len());
        assert!(k.map.is_empty(), "seed {seed}: kernel entries left behind");
    }

    #[test]
    fn harvest_matches_the_truth_with_a_roomy_ring() {
        for seed in 1..200 {
            run(seed * 7919, 1 << 20);
        }
    }

    #[test]
    fn harvest_matches_the_truth_when_the_ring_is_often_full() {
        for seed in 1..200 {
            run(seed * 104729, 1);
        }
    }
}
