//! `[flows]` in the config file: plain values and their checks. The flow table's compiled
//! form ([`crate::flows::FlowConfig`]) is built from this after [`FlowsSection::check`].
use serde::{Deserialize, Serialize};

use super::{PortRange, Protocol, parse_cidr};

pub const DEFAULT_OPEN_AFTER_MS: u64 = 1_000;
pub const DEFAULT_UPDATE_EVERY_MS: u64 = 10_000;
pub const DEFAULT_UDP_IDLE_MS: u64 = 30_000;
pub const DEFAULT_CONSOLIDATE_GAP_MS: u64 = 5_000;
/// As many as the kernel tracks sockets by default (`max_sockets`): every flow of a busy
/// host is recorded, and the cap still holds (counted as `overflow`) beyond that.
pub const DEFAULT_MAX_FLOWS: usize = 262_144;
/// Bounds the per-tick work of serializing and writing flow records (5 to 8 µs each):
/// after a mass close the rest follow in the next ticks.
pub const DEFAULT_MAX_RECORDS_PER_TICK: usize = 1_000;

/// Kinds of flow records (also the `event` field of a record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowEvent {
    Open,
    Update,
    Close,
}

/// `[flows]` in the config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowsSection {
    pub enabled: bool,
    pub open_after_ms: u64,
    pub update_every_ms: u64,
    pub udp_idle_ms: u64,
    pub consolidate_gap_ms: u64,
    pub raw_labels: Vec<String>,
    pub events: Vec<FlowEvent>,
    pub protocols: Vec<Protocol>,
    pub labels: Vec<String>,
    pub ports: Vec<PortRange>,
    pub cidrs: Vec<String>,
    pub max_flows: usize,
    pub max_records_per_tick: usize,
}

impl Default for FlowsSection {
    fn default() -> Self {
        FlowsSection {
            enabled: true,
            open_after_ms: DEFAULT_OPEN_AFTER_MS,
            update_every_ms: DEFAULT_UPDATE_EVERY_MS,
            udp_idle_ms: DEFAULT_UDP_IDLE_MS,
            consolidate_gap_ms: DEFAULT_CONSOLIDATE_GAP_MS,
            raw_labels: Vec::new(),
            events: vec![FlowEvent::Open, FlowEvent::Update, FlowEvent::Close],
            protocols: Vec::new(),
            labels: Vec::new(),
            ports: Vec::new(),
            cidrs: Vec::new(),
            max_flows: DEFAULT_MAX_FLOWS,
            max_records_per_tick: DEFAULT_MAX_RECORDS_PER_TICK,
        }
    }
}

pub const DAY_MS: u64 = 86_400_000;
pub const MAX_OPEN_AFTER_MS: u64 = 600_000;
pub const MAX_CONSOLIDATE_GAP_MS: u64 = 600_000;
pub const MIN_UPDATE_EVERY_MS: u64 = 1_000;
pub const MIN_UDP_IDLE_MS: u64 = 1_000;
pub const MAX_MAX_FLOWS: usize = 1 << 24;
pub const MAX_RECORDS_PER_TICK: usize = 1_000_000;

impl FlowsSection {
    /// Checks the section. Each error is one line starting with the key, e.g.
    /// `flows.udp_idle_ms: 0 is too small (at least 1000 ms)`.
    pub fn check(&self) -> Result<(), String> {
        let s = self;
        let field = |name: &str, msg: String| Err(format!("flows.{name}: {msg}"));
        if s.open_after_ms > MAX_OPEN_AFTER_MS {
            return field(
                "open_after_ms",
                format!(
                    "{} is too large (at most {MAX_OPEN_AFTER_MS} ms)",
                    s.open_after_ms
                ),
            );
        }
        if s.update_every_ms != 0 && !(MIN_UPDATE_EVERY_MS..=DAY_MS).contains(&s.update_every_ms) {
            return field(
                "update_every_ms",
                format!(
                    "{} is out of range (0 for no update records, else {MIN_UPDATE_EVERY_MS}..={DAY_MS} ms)",
                    s.update_every_ms
                ),
            );
        }
        if !(MIN_UDP_IDLE_MS..=DAY_MS).contains(&s.udp_idle_ms) {
            return field(
                "udp_idle_ms",
                format!(
                    "{} is out of range ({MIN_UDP_IDLE_MS}..={DAY_MS} ms)",
                    s.udp_idle_ms
                ),
            );
        }
        if s.consolidate_gap_ms > MAX_CONSOLIDATE_GAP_MS {
            return field(
                "consolidate_gap_ms",
                format!(
                    "{} is too large (at most {MAX_CONSOLIDATE_GAP_MS} ms; 0 turns consolidation off)",
                    s.consolidate_gap_ms
                ),
            );
        }
        if s.events.is_empty() {
            return field(
                "events",
                r#"is empty, so no flow record would be written (use any of "open", "update", "close", or enabled = false)"#.into(),
            );
        }
        for (name, list) in [("raw_labels", &s.raw_labels), ("labels", &s.labels)] {
            if let Some(i) = list.iter().position(String::is_empty) {
                return Err(format!(
                    "flows.{name}: entry {} is an empty label (labels are never empty)",
                    i + 1
                ));
            }
        }
        for c in &s.cidrs {
            parse_cidr(c).map_err(|e| format!("flows.cidrs: {e}"))?;
        }
        if !(1..=MAX_MAX_FLOWS).contains(&s.max_flows) {
            return field(
                "max_flows",
                format!("{} is out of range (1..={MAX_MAX_FLOWS})", s.max_flows),
            );
        }
        if !(1..=MAX_RECORDS_PER_TICK).contains(&s.max_records_per_tick) {
            return field(
                "max_records_per_tick",
                format!(
                    "{} is out of range (1..={MAX_RECORDS_PER_TICK})",
                    s.max_records_per_tick
                ),
            );
        }
        Ok(())
    }
}
