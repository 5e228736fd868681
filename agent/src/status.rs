//! The `status` reply, typed: what does not change while the agent runs, the poller's
//! counters of the last tick, and the state of spool, upload, labels and flow records.
//! The control socket serves it as JSON; the metrics endpoint encodes it for Prometheus.
use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    event::Traffic,
    flows::FlowStats,
    loader::hooks::HookChoice,
    poller::{LabelSetStats, PollStats, TickTimes},
    spool::SpoolStats,
    stream::StreamStatus,
    upload::flush::FlushReceipt,
};

/// Facts fixed at start.
#[derive(Debug, Clone, Serialize)]
pub struct Fixed {
    pub agent: String,
    pub boot: String,
    pub cgroup: String,
    pub interval_ms: u64,
    /// The exact owner of accepted sockets is known (an accept hook is attached).
    pub accept_hook: bool,
    /// The hook chosen per purpose on this kernel.
    pub hooks: Vec<HookChoice>,
    pub kernel: String,
    pub map_capacity: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    #[serde(flatten)]
    pub fixed: Fixed,
    pub uptime_s: u64,
    pub sockets_tracked: usize,
    pub map_entries: usize,
    /// Kernel entries of sockets (and peers) done with, not deleted yet (a mass close
    /// leaves many; the reaper thread deletes them off the tick).
    pub kernel_deletes_waiting: usize,
    pub map_fill: f64,
    pub ticks: u64,
    pub events: u64,
    pub last_tick_work_ms: f64,
    pub last_tick_wait_ms: f64,
    /// Work of every poll cycle so far (tick, event and flow records written; histogram,
    /// max, max over the latest 100 ticks).
    pub tick_work: TickTimes,
    /// CPU time of the same cycles (the wall time above includes waiting for a CPU).
    pub tick_work_cpu: TickTimes,
    /// Grace-period wait of every tick so far.
    pub tick_wait: TickTimes,
    /// Ticks that failed and were retried by the next one.
    pub tick_failures: u64,
    pub last_tick_error: Option<String>,
    pub finished_sockets_folded_in: u64,
    pub kernel_total: Traffic,
    pub drops: Drops,
    /// A ring was full and the poller took the slower way; nothing was lost.
    pub kernel_fallbacks: BTreeMap<&'static str, u64>,
    pub paused: bool,
    /// Bytes counted while paused (written as one event at resume).
    pub paused_bytes: u64,
    /// None with --no-spool.
    pub spool: Option<SpoolStats>,
    pub upload: UploadStatus,
    /// Sockets named through the control socket.
    pub labels_named: usize,
    /// Distinct labels held, their cap, releases and sockets put in the overflow label.
    pub labels: LabelSetStats,
    /// None when flow records are off.
    pub flows: Option<FlowsStatus>,
    /// Control requests refused, by why.
    pub control_refused: BTreeMap<&'static str, u64>,
    /// The Prometheus endpoint; None when turned off.
    pub metrics: Option<MetricsStatus>,
    /// Subscribers of the record stream.
    pub stream: StreamStatus,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MetricsStatus {
    /// The address served (the real port when 0 was configured); None if binding failed.
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub scrapes: u64,
    pub connections_open: u64,
    pub connections_accepted: u64,
    /// Connections refused or closed before their client was done, by why (also
    /// `sockacct_drops_total{stage="metrics"}`).
    pub refused: BTreeMap<&'static str, u64>,
    /// Kept-alive connections closed at `max_connection_age_secs` (routine).
    pub closed_at_max_age: u64,
    /// "none" or "bearer".
    pub auth: &'static str,
    /// "off", "on", or "client_certificates" (clients must present one).
    pub tls: &'static str,
    pub limits: MetricsLimits,
}

/// `[metrics]` limits in force.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MetricsLimits {
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    pub read_timeout_secs: u64,
    pub write_timeout_secs: u64,
    pub max_connection_age_secs: u64,
    pub max_request_header_bytes: usize,
}

impl From<&crate::config::MetricsSection> for MetricsLimits {
    fn from(c: &crate::config::MetricsSection) -> Self {
        MetricsLimits {
            max_connections: c.max_connections,
            max_connections_per_peer: c.max_connections_per_peer,
            read_timeout_secs: c.read_timeout_secs,
            write_timeout_secs: c.write_timeout_secs,
            max_connection_age_secs: c.max_connection_age_secs,
            max_request_header_bytes: c.max_request_header_bytes,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Drops {
    /// Kernel-side failure counters by reason (cumulative).
    pub kernel: BTreeMap<&'static str, u64>,
    /// Bytes of sockets whose owner could not be found (they went to `unattributed`).
    pub no_owner_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct UploadStatus {
    pub configured: bool,
    pub flushes: u64,
    pub failures: u64,
    /// Records and body bytes the server acknowledged, since start.
    pub records_sent: u64,
    pub bytes_sent: u64,
    /// When the last flush that uploaded everything pending ended.
    pub last_success_unix_ms: Option<u64>,
    pub last: Option<FlushReceipt>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FlowsStatus {
    #[serde(flatten)]
    pub table: FlowStats,
    /// The flow stage's work per call (its own thread, off the poll cycle): wall and CPU.
    pub work: TickTimes,
    pub work_cpu: TickTimes,
    pub dropped_while_paused: u64,
    /// Finished unconnected sockets waiting for a whole pass over the per-peer map
    /// (their peers' last counts), given to the flow table then.
    pub pending_sockets: u64,
}

impl Status {
    pub fn new(fixed: &Fixed, st: &PollStats) -> Status {
        Status {
            map_fill: st.map_entries as f64 / f64::from(fixed.map_capacity.max(1)),
            fixed: fixed.clone(),
            uptime_s: 0,
            sockets_tracked: st.sockets_tracked,
            map_entries: st.map_entries,
            kernel_deletes_waiting: st.kernel_deletes_waiting,
            ticks: st.ticks,
            events: st.events,
            last_tick_work_ms: st.last_tick_work.as_secs_f64() * 1e3,
            last_tick_wait_ms: st.last_tick_wait.as_secs_f64() * 1e3,
            tick_work: st.work.clone(),
            tick_work_cpu: st.work_cpu.clone(),
            tick_wait: st.wait.clone(),
            tick_failures: st.tick_failures,
            last_tick_error: st.last_tick_error.clone(),
            finished_sockets_folded_in: st.finals_received,
            kernel_total: st.kernel_total,
            kernel_fallbacks: st.kernel_fallbacks.clone(),
            drops: Drops {
                kernel: st.kernel_drops.clone(),
                no_owner_bytes: st.no_owner_bytes,
            },
            paused: false,
            paused_bytes: 0,
            spool: None,
            upload: UploadStatus::default(),
            labels_named: 0,
            labels: st.labels.clone(),
            flows: None,
            control_refused: BTreeMap::new(),
            metrics: None,
            stream: StreamStatus::default(),
        }
    }
}
