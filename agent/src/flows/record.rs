//! The flow record (`type: "flow"`) and its field values.
use super::*;

/// Why a `close` was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The socket is gone.
    Closed,
    /// A peer of an unconnected socket sent and received nothing for `udp_idle_ms`.
    Idle,
    /// The socket connected to another peer, or disconnected (UDP `connect()`).
    Reconnected,
    /// The agent stopped while the flow was alive.
    AgentStopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

/// One flow record; serialized with its fields in this order, absent options omitted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    pub v: u32,
    /// Always "flow".
    #[serde(rename = "type")]
    pub kind: String,
    pub agent: String,
    pub boot: String,
    pub seq: u64,
    pub event: FlowEvent,
    /// "tcp", "udp" or the protocol number as a string.
    pub proto: String,
    pub family: Family,
    pub local: IpAddr,
    /// Omitted on a session whose connections had different source ports (outbound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_port: Option<u16>,
    pub remote: IpAddr,
    /// Omitted on a session whose connections had different source ports (inbound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_port: Option<u16>,
    pub direction: Direction,
    /// Owner fields are omitted on a session whose connections disagree on them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<u64>,
    pub label: String,
    /// Unix ms, first seen.
    pub start: u64,
    /// Unix ms: the end for `close`, the time of the record for `open`/`update`.
    pub end: u64,
    pub tx: u64,
    pub rx: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
    /// Last TCP state name (`close` of TCP flows only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_state: Option<String>,
    /// `close` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<EndReason>,
    /// Number of connections merged into this session; only present when ≥ 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
}

impl FlowRecord {
    pub fn traffic(&self) -> Traffic {
        Traffic {
            tx: self.tx,
            rx: self.rx,
            tx_packets: self.tx_packets,
            rx_packets: self.rx_packets,
        }
    }
}

impl crate::event::SpoolRecord for FlowRecord {
    fn stamp(&mut self, id: &Identity, seq: u64) {
        self.agent.clone_from(&id.agent);
        self.boot.clone_from(&id.boot);
        self.seq = seq;
    }
}

/// "tcp", "udp", else the number.
pub fn proto_name(proto: u8) -> String {
    match proto {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        n => n.to_string(),
    }
}

/// Kernel TCP state names (include/net/tcp_states.h); unknown numbers as the number.
pub fn tcp_state_name(state: u8) -> String {
    let name = match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        13 => "BOUND_INACTIVE",
        n => return n.to_string(),
    };
    name.into()
}

/// A live sample of one connection (`type: "conn"`): its cumulative counters as of this
/// tick. Only on the record stream (for `sockacct top`), never written to the spool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnSample {
    /// Always "conn".
    #[serde(rename = "type")]
    pub kind: String,
    /// Unix ms of the tick.
    pub t: u64,
    pub cookie: u64,
    pub proto: String,
    /// Unknown for a peer whose socket was not described in the same tick.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<SocketAddr>,
    pub remote: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direction: Option<Direction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub tx: u64,
    pub rx: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
    /// The socket is gone (these are its final counters).
    pub finished: bool,
}

/// The owner facts a sample carries, from a socket view or the flow table.
pub(super) struct SampleOwner<'a> {
    pub(super) proto: u8,
    pub(super) local: SocketAddr,
    pub(super) direction: Direction,
    pub(super) owner: &'a OwnerView,
    pub(super) label: &'a str,
}

impl<'a> From<&'a SocketView> for SampleOwner<'a> {
    fn from(s: &'a SocketView) -> Self {
        SampleOwner {
            proto: s.proto,
            local: s.local,
            direction: s.direction,
            owner: &s.owner,
            label: &s.label,
        }
    }
}

/// One JSON line per connection that moved in this tick's views: connected sockets, and
/// the peers of unconnected ones (`owner_of` finds a peer's socket when the views do not
/// describe it this tick).
pub(super) fn conn_sample_lines<'a>(
    now: u64,
    socks: &'a [SocketView],
    peers: &[PeerView],
    owner_of: impl Fn(u64) -> Option<SampleOwner<'a>>,
) -> Vec<u8> {
    let by_cookie: HashMap<u64, &SocketView> = socks.iter().map(|s| (s.cookie, s)).collect();
    let mut out = Vec::new();
    let mut push = |o: Option<SampleOwner>, cookie: u64, remote: SocketAddr, t: Traffic, done| {
        let c = ConnSample {
            kind: "conn".into(),
            t: now,
            cookie,
            proto: o
                .as_ref()
                .map_or_else(|| proto_name(IPPROTO_UDP), |o| proto_name(o.proto)),
            local: o.as_ref().map(|o| canon(o.local)),
            remote: canon(remote),
            direction: o.as_ref().map(|o| o.direction),
            pid: o.as_ref().map(|o| o.owner.pid),
            process: o.as_ref().map(|o| o.owner.process.to_string()),
            label: o.as_ref().map(|o| o.label.to_string()),
            tx: t.tx,
            rx: t.rx,
            tx_packets: t.tx_packets,
            rx_packets: t.rx_packets,
            finished: done,
        };
        if let Ok(mut l) = serde_json::to_vec(&c) {
            out.append(&mut l);
            out.push(b'\n');
        }
    };
    for s in socks {
        if let Some(r) = s.remote {
            push(Some(s.into()), s.cookie, r, s.counters, s.finished);
        }
    }
    for p in peers {
        let s = by_cookie.get(&p.cookie).copied();
        if s.is_some_and(|s| s.remote.is_some()) {
            continue; // a connected socket's flow is its own counters
        }
        let done = s.is_some_and(|s| s.finished);
        let o = s.map(SampleOwner::from).or_else(|| owner_of(p.cookie));
        push(o, p.cookie, p.remote, p.counters, done);
    }
    out
}
