//! What the poller reports about itself (status, and later metrics).
use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;

use crate::event::Traffic;

/// Upper bounds (ms) of the tick-time histogram buckets; one more bucket holds the rest.
pub const TICK_BUCKETS_MS: [f64; 11] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 25.0, 50.0, 100.0, 250.0, 1000.0,
];

/// How many of the latest ticks `recent_max_ms` covers (10 s at the default interval).
const RECENT: usize = 100;

/// Tick times: a cumulative histogram (for rates and percentiles over any window) and the
/// maximum over the latest ticks (for "the worst tick just now"). Fixed size: it is
/// copied to the status snapshot every tick.
#[derive(Debug, Clone, Serialize)]
pub struct TickTimes {
    /// Ticks per bucket of [`TICK_BUCKETS_MS`] (not cumulative); the last is above 1 s.
    pub counts: [u64; TICK_BUCKETS_MS.len() + 1],
    pub sum_ms: f64,
    pub max_ms: f64,
    /// Maximum over the latest 100 ticks.
    pub recent_max_ms: f64,
    #[serde(skip)]
    recent: [f32; RECENT],
    #[serde(skip)]
    next: usize,
}

impl Default for TickTimes {
    fn default() -> Self {
        TickTimes {
            counts: [0; TICK_BUCKETS_MS.len() + 1],
            sum_ms: 0.0,
            max_ms: 0.0,
            recent_max_ms: 0.0,
            recent: [0.0; RECENT],
            next: 0,
        }
    }
}

impl TickTimes {
    pub fn record(&mut self, d: Duration) {
        let ms = d.as_secs_f64() * 1e3;
        let b = TICK_BUCKETS_MS
            .iter()
            .position(|&le| ms <= le)
            .unwrap_or(TICK_BUCKETS_MS.len());
        self.counts[b] += 1;
        self.sum_ms += ms;
        self.max_ms = self.max_ms.max(ms);
        self.recent[self.next] = ms as f32;
        self.next = (self.next + 1) % RECENT;
        self.recent_max_ms = self.recent.iter().fold(0.0f32, |a, &b| a.max(b)) as f64;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Counters about the poller itself, for status and tests.
#[derive(Debug, Clone, Default)]
pub struct PollStats {
    pub ticks: u64,
    /// The poller's side of the flow ledger: traffic of finished sockets no flow record
    /// can carry, by reason ("no_owner", "no_addresses", "orphan_peer").
    pub flow_unrecorded: BTreeMap<&'static str, Traffic>,
    /// Finished unconnected sockets waiting for a whole pass over the per-peer map.
    pub flow_pending_sockets: usize,
    /// The label set: size, cap, releases, overflow.
    pub labels: super::LabelSetStats,
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
    /// Kernel-side fallbacks by name (cumulative): a ring was full and the poller took the
    /// slower way (finals from the map, a whole-map walk); nothing was lost.
    pub kernel_fallbacks: BTreeMap<&'static str, u64>,
    /// Bytes of sockets whose owner could not be found (they went to `unattributed`).
    pub no_owner_bytes: u64,
    /// Kernel entries of sockets and peers done with, waiting for the reaper thread.
    pub kernel_deletes_waiting: usize,
    /// Wall time of the last tick's work, excluding the grace-period wait.
    pub last_tick_work: std::time::Duration,
    pub last_tick_wait: std::time::Duration,
    /// Every poll cycle's work (recorded by the daemon: the tick, writing its event, flow
    /// records; not the grace-period wait), and every tick's grace-period wait.
    pub work: TickTimes,
    /// The same cycles' CPU time (the loop's thread): work without waiting for a CPU.
    pub work_cpu: TickTimes,
    pub wait: TickTimes,
    pub kernel_total: Traffic,
    /// Ticks that failed (a map read, the barrier); the next tick covers their interval.
    pub tick_failures: u64,
    pub last_tick_error: Option<String>,
}
