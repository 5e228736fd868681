//! Per-connection flow records (`type: "flow"`, format in docs/flows.md).
//!
//! Pure logic, no I/O: every poll interval the daemon hands [`FlowTable::observe`] the
//! sockets that moved, are new or finished (and the per-peer counters of unconnected
//! sockets); the table answers with the flow records to append to the spool, next to the
//! delta events.
//!
//! - A connected socket is one flow; an unconnected socket is one flow per peer.
//! - `open` once a flow has lived `open_after_ms` (at once when it cannot be consolidated),
//!   `update` every `update_every_ms` while it moves, `close` with final counts when the
//!   socket is gone (or, for a peer of an unconnected socket, after `udp_idle_ms` without
//!   movement).
//! - Short flows (closed before their `open`) with the same source ip, destination ip,
//!   destination port, protocol, label and direction are merged into one session `close`
//!   record while each starts at most `consolidate_gap_ms` after the previous one ended.
//! - Counters are cumulative in the input, so a flow picked up late (after an overflow, or
//!   a restart of the agent) still reports exact counts; only its `open` may come late.
//! - Bounded: at most `max_flows` live flows plus pending sessions, at most `max_flows`
//!   remembered baselines of idle peers, at most `max_records_per_tick` records returned
//!   per call (the rest wait, none is dropped), and besides reading its input a call
//!   settles a bounded number of finished sockets (a mass close spreads over calls, in
//!   order). Arithmetic saturates; nothing panics.
//! - Compact: flows live in slots (about 100 bytes a flow with its indexes and timer),
//!   names are held once, records are built only when returned.
//! - The ledger ([`FlowLedger`]) checks each finished socket's counters against the
//!   traffic its records carried.
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use crate::config::flows::{
    DEFAULT_CONSOLIDATE_GAP_MS, DEFAULT_MAX_FLOWS, DEFAULT_MAX_RECORDS_PER_TICK,
    DEFAULT_OPEN_AFTER_MS, DEFAULT_UDP_IDLE_MS, DEFAULT_UPDATE_EVERY_MS, FlowEvent, FlowsSection,
};
use crate::config::{PortRange, Protocol, parse_cidr};
use crate::event::{FORMAT_VERSION, Identity, Traffic};

mod compact;
mod config;
#[cfg(test)]
mod heap;
mod input;
mod ledger;
mod out;
mod record;
mod state;
mod table;
#[cfg(test)]
mod tests;

pub use config::{EventSet, FlowConfig};
pub use ledger::FlowLedger;
pub use record::{ConnSample, EndReason, Family, FlowRecord, proto_name, tcp_state_name};
use state::canon;
pub use table::FlowTable;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

// ---------------------------------------------------------------------------------------
// Input
// ---------------------------------------------------------------------------------------

/// Who opened the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// This host connected.
    Outbound,
    /// This host accepted.
    Inbound,
    Unknown,
}

/// The owner of a socket as the labeler knows it. Names are shared (`Arc<str>`): 100k
/// flows of one process hold one copy of its name, its cgroup path and its label.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct OwnerView {
    pub pid: u32,
    pub process: Arc<str>,
    pub uid: u32,
    /// cgroup path below the cgroup2 root, when known.
    pub cgroup: Option<Arc<str>>,
    /// Network namespace cookie.
    pub netns: u64,
}

/// A socket that moved this interval, is new, or finished.
///
/// Contract: sockets not given did not move (their state is kept); a finished socket is
/// given once, with its final counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketView {
    pub cookie: u64,
    /// IPPROTO number: 6 tcp, 17 udp, anything else as is.
    pub proto: u8,
    pub local: SocketAddr,
    /// `None` for an unconnected socket (e.g. UDP talking to many peers): its flows come
    /// from [`PeerView`]s instead.
    pub remote: Option<SocketAddr>,
    pub direction: Direction,
    pub owner: OwnerView,
    pub label: Arc<str>,
    /// Cumulative since the socket started.
    pub counters: Traffic,
    /// Unix ms; 0 = unknown (the time of the first observation is used).
    pub first_seen_ms: u64,
    /// The socket is gone; `counters` are final.
    pub finished: bool,
    /// Kernel TCP state number (1 ESTABLISHED … 12 NEW_SYN_RECV), last known.
    pub tcp_state: Option<u8>,
}

/// Counters of one peer of an unconnected socket.
///
/// Contract: the socket itself is given as a [`SocketView`] (with `remote: None`) in the
/// same call whenever one of its peers is new, and when it finishes; peers that moved in
/// the socket's last interval come in that same call, and when it finishes all its peers
/// come with their final counters (moved or not). PeerViews of a connected socket are
/// ignored (its flow is counted from the socket's own counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerView {
    pub cookie: u64,
    pub remote: SocketAddr,
    /// Cumulative for this (socket, peer). If they go down, the kernel's entry was
    /// recreated and they are taken as counting from zero again.
    pub counters: Traffic,
}

// ---------------------------------------------------------------------------------------
// Stats
// ---------------------------------------------------------------------------------------

/// Counters for `status` and the final log line. Gauges first, then totals since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FlowStats {
    /// Live flows (connected sockets + live peers of unconnected sockets); a finished
    /// socket's connected flow no longer counts while it waits in `finishing`.
    pub tracked: u64,
    /// Sessions waiting for more connections to join.
    pub pending_sessions: u64,
    /// Idle-closed peers whose counter baseline is remembered.
    pub dormant_peers: u64,
    /// Records waiting for the next call (over `max_records_per_tick`).
    pub queued: u64,
    /// Flows whose due open/update record waits for room (written as `queued` drains).
    pub deferred: u64,
    /// Finished sockets whose closes wait for the per-call work budget.
    pub finishing: u64,
    /// Records returned, by event.
    pub opens: u64,
    pub updates: u64,
    pub closes: u64,
    /// Session records returned with `connections` ≥ 2, and the connections in them.
    pub sessions: u64,
    pub merged_connections: u64,
    /// Observations (a socket or a peer, per call) left out by the filters.
    pub filtered: u64,
    /// Observations of new flows not tracked because the table was full, plus short
    /// flows written unmerged because no session could be started. A flow that finishes
    /// while untracked still gets its `close`.
    pub overflow: u64,
    /// Baselines of idle peers forgotten to stay within `max_flows`: if such a peer talks
    /// again, its next flow counts from the socket's start for that peer (over-reports).
    pub evicted_peer_bases: u64,
    /// PeerViews for an unconnected socket that was neither tracked nor given this call.
    pub orphan_peers: u64,
    /// Finished sockets' traffic against their records' traffic.
    pub ledger: FlowLedger,
}
