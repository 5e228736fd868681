//! The flow table's settings, compiled from the config file's `[flows]`.
use super::*;

/// Which record types are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventSet {
    pub open: bool,
    pub update: bool,
    pub close: bool,
}

impl EventSet {
    pub const ALL: EventSet = EventSet {
        open: true,
        update: true,
        close: true,
    };

    pub fn contains(&self, e: FlowEvent) -> bool {
        match e {
            FlowEvent::Open => self.open,
            FlowEvent::Update => self.update,
            FlowEvent::Close => self.close,
        }
    }
}

/// The validated flow configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowConfig {
    /// Read by the daemon; the table itself does not look at it.
    pub enabled: bool,
    pub open_after_ms: u64,
    /// 0 = no update records.
    pub update_every_ms: u64,
    pub udp_idle_ms: u64,
    /// 0 = no consolidation.
    pub consolidate_gap_ms: u64,
    /// Labels whose flows are never consolidated.
    pub raw_labels: BTreeSet<String>,
    pub events: EventSet,
    /// Empty = all.
    pub protocols: Vec<Protocol>,
    /// Exact label names; empty = all.
    pub labels: BTreeSet<String>,
    /// Local or remote port in any range; empty = all.
    pub ports: Vec<PortRange>,
    /// Remote address in any network; empty = all.
    pub cidrs: Vec<IpNet>,
    pub max_flows: usize,
    pub max_records_per_tick: usize,
}

impl Default for FlowConfig {
    fn default() -> Self {
        FlowConfig {
            enabled: true,
            open_after_ms: DEFAULT_OPEN_AFTER_MS,
            update_every_ms: DEFAULT_UPDATE_EVERY_MS,
            udp_idle_ms: DEFAULT_UDP_IDLE_MS,
            consolidate_gap_ms: DEFAULT_CONSOLIDATE_GAP_MS,
            raw_labels: BTreeSet::new(),
            events: EventSet::ALL,
            protocols: Vec::new(),
            labels: BTreeSet::new(),
            ports: Vec::new(),
            cidrs: Vec::new(),
            max_flows: DEFAULT_MAX_FLOWS,
            max_records_per_tick: DEFAULT_MAX_RECORDS_PER_TICK,
        }
    }
}

impl FlowConfig {
    /// Compiles a section (checked here too: errors as [`FlowsSection::check`] gives them).
    pub fn from_section(s: &FlowsSection) -> Result<FlowConfig, String> {
        s.check()?;
        let mut events = EventSet {
            open: false,
            update: false,
            close: false,
        };
        for e in &s.events {
            match e {
                FlowEvent::Open => events.open = true,
                FlowEvent::Update => events.update = true,
                FlowEvent::Close => events.close = true,
            }
        }
        let raw_labels: BTreeSet<String> = s.raw_labels.iter().cloned().collect();
        let labels: BTreeSet<String> = s.labels.iter().cloned().collect();
        let cidrs = s
            .cidrs
            .iter()
            .map(|c| parse_cidr(c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("flows.cidrs: {e}"))?;
        Ok(FlowConfig {
            enabled: s.enabled,
            open_after_ms: s.open_after_ms,
            update_every_ms: s.update_every_ms,
            udp_idle_ms: s.udp_idle_ms,
            consolidate_gap_ms: s.consolidate_gap_ms,
            raw_labels,
            events,
            protocols: s.protocols.clone(),
            labels,
            ports: s.ports.clone(),
            cidrs,
            max_flows: s.max_flows,
            max_records_per_tick: s.max_records_per_tick,
        })
    }

    /// Does a flow with this label take part in consolidation?
    pub fn consolidates(&self, label: &str) -> bool {
        self.consolidate_gap_ms > 0 && self.events.close && !self.raw_labels.contains(label)
    }

    /// How long after its start a flow with this label gets its `open`.
    pub fn open_delay_ms(&self, label: &str) -> u64 {
        if self.consolidates(label) {
            self.open_after_ms
        } else {
            0
        }
    }

    pub(super) fn updates(&self) -> bool {
        self.update_every_ms > 0 && self.events.update
    }

    /// The protocol/label/port/cidr filters (the `events` filter is applied per record).
    pub fn passes(&self, proto: u8, label: &str, local: SocketAddr, remote: SocketAddr) -> bool {
        let remote = canon(remote);
        (self.protocols.is_empty() || self.protocols.iter().any(|p| p.matches(proto)))
            && (self.labels.is_empty() || self.labels.contains(label))
            && (self.ports.is_empty()
                || self
                    .ports
                    .iter()
                    .any(|r| r.contains(local.port()) || r.contains(remote.port())))
            && (self.cidrs.is_empty() || self.cidrs.iter().any(|n| n.contains(&remote.ip())))
    }
}
