//! The operator's TOML configuration (`sockacct run --config F`).
//!
//! Parsing has two stages: serde turns the text into [`Config`] (type errors, unknown keys,
//! bad ports/CIDRs/protocols/netns values are caught here, since those are plain value
//! types), then [`Config::validate`] checks ranges. Globs and label templates are compiled
//! (and so checked) once by [`crate::settings`], before the agent attaches anything, with
//! errors located in the file through [`Config::locate`]. This module is a leaf: plain
//! types, imported by everything that reads the configuration, importing none of them.
//!
//! Every error is a [`ConfigError`] that names the file, the line, the rule (1-based) and the
//! field, and says what would be valid. Lines come from the spans toml keeps for each key and
//! value; see [`SourceMap`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};

pub mod flows;
pub mod metrics;
pub mod upload;
pub use flows::FlowsSection;
pub use metrics::MetricsSection;
#[cfg(test)]
use upload::is_table_name;
pub use upload::{UploadFormat, UploadSection};

pub const DEFAULT_INTERVAL_MS: u64 = 100;
pub const INTERVAL_MS_RANGE: RangeInclusive<u64> = 10..=60_000;
pub const DEFAULT_MAX_SOCKETS: u32 = agent_common::DEFAULT_MAX_SOCKETS;
/// State that must survive restarts (sequence numbers); the spool is below it by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sockacct";
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/sockacct/spool";
pub const MIN_MAX_SOCKETS: u32 = 1024;
/// Distinct labels held at once; beyond it sockets share the overflow label.
pub const DEFAULT_MAX_LABELS: usize = 10_000;
/// Longest label kept, in bytes; longer ones are cut at a char boundary.
pub const MAX_LABEL_BYTES: usize = 128;

/// The whole configuration file. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Length of one accounting interval (one delta event per label per interval).
    pub interval_ms: u64,
    /// cgroup v2 directory to attach to; `None` = root of the cgroup2 mount.
    pub cgroup: Option<PathBuf>,
    /// Interfaces counted per interface with tc.
    pub interfaces: Vec<String>,
    /// Capacity of the per-socket kernel map.
    pub max_sockets: u32,
    /// Distinct labels in use at once (any local user can make new ones: every process
    /// name is one); beyond it sockets get the label `_overflow`, counted in `status`.
    pub max_labels: usize,
    pub agent_id: Option<String>,
    /// How a socket that no rule matches is labelled.
    pub default_label: DefaultLabel,
    /// `[[rule]]` tables, tried in order; the first that matches gives the label.
    #[serde(rename = "rule", deserialize_with = "de_rules")]
    pub rules: Vec<Rule>,
    /// `[spool]`: where events are kept until uploaded.
    pub spool: SpoolSection,
    /// `[upload]`: where `sockacct flush` sends them.
    pub upload: UploadSection,
    /// `[control]`: the admin socket.
    pub control: ControlSection,
    /// `[flows]`: per-connection records (docs/flows.md).
    pub flows: FlowsSection,
    /// `[metrics]`: the Prometheus endpoint (docs/operations.md).
    pub metrics: MetricsSection,
    /// Where the text came from, so errors found later (when the rules are compiled) can
    /// still name the file and line.
    #[serde(skip)]
    pub source: Source,
}

/// The origin and key positions of a parsed file. Not part of the configuration's value:
/// two configs with the same settings are equal wherever they came from.
#[derive(Debug, Clone, Default)]
pub struct Source {
    origin: Option<String>,
    map: Option<std::sync::Arc<SourceMap>>,
}

impl PartialEq for Source {
    fn eq(&self, _: &Source) -> bool {
        true
    }
}

/// `[spool]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolSection {
    pub dir: PathBuf,
    /// A segment is sealed when it reaches this size...
    pub segment_max_bytes: u64,
    /// ...or this age.
    pub segment_max_age_secs: u64,
    /// Total size cap; the oldest unsent data is dropped beyond it (and a gap recorded).
    pub max_bytes: u64,
    /// "always", "never", or a duration in milliseconds: at most that much of the most
    /// recent events is at risk in a power loss.
    pub fsync: FsyncSetting,
    /// Compressed bytes of records kept in memory while the disk is full or read-only, or
    /// the spool directory is gone; beyond it records are dropped (and a gap record says so).
    pub memory_backlog_bytes: u64,
    /// Deprecated (the backlog was capped in records): accepted, ignored, warned about.
    pub memory_backlog: Option<u64>,
}

impl Default for SpoolSection {
    fn default() -> Self {
        SpoolSection {
            dir: PathBuf::from(DEFAULT_SPOOL_DIR),
            segment_max_bytes: 8 << 20,
            segment_max_age_secs: 600,
            max_bytes: 1 << 30,
            fsync: FsyncSetting::IntervalMs(1000),
            memory_backlog_bytes: crate::spool::DEFAULT_MEMORY_BACKLOG_BYTES,
            memory_backlog: None,
        }
    }
}

/// `fsync = "always" | "never" | <milliseconds>`
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncSetting {
    Always,
    Never,
    IntervalMs(u64),
}

impl<'de> Deserialize<'de> for FsyncSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const EXPECTED: &str = r#""always", "never" or milliseconds such as 1000"#;
        struct V;
        impl Visitor<'_> for V {
            type Value = FsyncSetting;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_u64<E: de::Error>(self, ms: u64) -> Result<FsyncSetting, E> {
                Ok(FsyncSetting::IntervalMs(ms))
            }
            fn visit_i64<E: de::Error>(self, ms: i64) -> Result<FsyncSetting, E> {
                u64::try_from(ms)
                    .map(FsyncSetting::IntervalMs)
                    .map_err(|_| {
                        E::custom(format!("{ms} is not an fsync policy (expected {EXPECTED})"))
                    })
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<FsyncSetting, E> {
                match s {
                    "always" => Ok(FsyncSetting::Always),
                    "never" => Ok(FsyncSetting::Never),
                    _ => Err(E::custom(format!(
                        "{s:?} is not an fsync policy (expected {EXPECTED})"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `[control]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSection {
    pub socket: PathBuf,
    /// Members of this group may connect and use `status` and `label`.
    pub group: Option<String>,
    /// Most sockets one uid may name with `label`.
    pub max_labels_per_uid: usize,
    /// Connections open at once from everyone but root (root always has a few more).
    pub max_connections: usize,
    /// Connections open at once from one uid (root excepted).
    pub max_connections_per_uid: usize,
    /// A connection that sends no complete request for this long is closed.
    pub idle_timeout_ms: u64,
    /// A reply the peer does not take within this long closes the connection.
    pub write_timeout_ms: u64,
    /// Record-stream subscribers at once (`events`, `top`); two more are kept for root.
    pub max_subscribers: usize,
    /// Subscribers at once from one uid (root excepted).
    pub max_subscribers_per_uid: usize,
}

impl Default for ControlSection {
    fn default() -> Self {
        ControlSection {
            socket: PathBuf::from("/run/sockacct/control.sock"),
            group: None,
            max_labels_per_uid: 1024,
            max_connections: 64,
            max_connections_per_uid: 8,
            idle_timeout_ms: 60_000,
            write_timeout_ms: 5_000,
            max_subscribers: 16,
            max_subscribers_per_uid: 4,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            interval_ms: DEFAULT_INTERVAL_MS,
            cgroup: None,
            interfaces: Vec::new(),
            max_sockets: DEFAULT_MAX_SOCKETS,
            max_labels: DEFAULT_MAX_LABELS,
            agent_id: None,
            default_label: DefaultLabel::Process,
            rules: Vec::new(),
            spool: SpoolSection::default(),
            upload: UploadSection::default(),
            control: ControlSection::default(),
            flows: FlowsSection::default(),
            metrics: MetricsSection::default(),
            source: Source::default(),
        }
    }
}

/// Source of the label for a socket that no rule matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultLabel {
    /// The process name (comm).
    #[default]
    Process,
    /// The file name of the executable.
    Exe,
    /// The cgroup path relative to the cgroup2 root ("/" for the root itself).
    Cgroup,
    /// The user name, or the numeric uid when the name is unknown.
    User,
}

/// One `[[rule]]` table. Every match field is optional; a rule without any matches every
/// socket. A socket matches when every present field matches.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Label template; may contain `{process}`, `{exe}`, `{cgroup}`, `{uid}`, `{user}`,
    /// `{local_port}`, `{remote_port}`; `{{`/`}}` are literal braces.
    pub label: String,
    /// Glob on the process name (`*` also crosses '/', as in "kworker/0:1").
    pub process: Option<String>,
    /// Glob on the full executable path (`*` stays within one path component, `**` crosses).
    pub exe: Option<String>,
    /// Glob on the cgroup path relative to the cgroup2 root, without a leading '/'
    /// (`*` stays within one component, `**` crosses).
    pub cgroup: Option<String>,
    pub uid: Option<u32>,
    pub user: Option<String>,
    pub local_port: Option<PortRange>,
    pub remote_port: Option<PortRange>,
    /// Any of these networks; written as one string or a list.
    #[serde(default, deserialize_with = "de_cidrs")]
    pub remote_cidr: Option<Vec<IpNet>>,
    pub protocol: Option<Protocol>,
    pub netns: Option<Netns>,
}

impl Rule {
    /// True when the rule has no match field, so it matches every socket.
    pub fn is_catch_all(&self) -> bool {
        let Rule {
            label: _,
            process,
            exe,
            cgroup,
            uid,
            user,
            local_port,
            remote_port,
            remote_cidr,
            protocol,
            netns,
        } = self;
        process.is_none()
            && exe.is_none()
            && cgroup.is_none()
            && uid.is_none()
            && user.is_none()
            && local_port.is_none()
            && remote_port.is_none()
            && remote_cidr.is_none()
            && protocol.is_none()
            && netns.is_none()
    }
}

/// An inclusive port range; a single port is `start == end`. Written as an integer (`443`)
/// or a string (`"443"`, `"8000-8100"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    /// Port 0 means "unknown" and never matches.
    pub fn contains(&self, port: u16) -> bool {
        port != 0 && self.start <= port && port <= self.end
    }

    /// Parses "443" or "8000-8100"; the error says what was wrong and what is valid.
    pub fn parse(text: &str) -> Result<PortRange, String> {
        const EXPECTED: &str = r#"expected a port 1-65535 or a range like "8000-8100""#;
        let bad = |why: &str| format!("{text:?} is not a valid port range: {why} ({EXPECTED})");
        let number = |part: &str| -> Result<u32, String> {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(&format!("{part:?} is not a number")));
            }
            match part.parse::<u32>() {
                Ok(n) if n <= 65535 => Ok(n),
                _ => Err(bad(&format!("{part} is greater than 65535"))),
            }
        };
        let (start, end) = match text.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let p = number(text)?;
                (p, p)
            }
        };
        if start > end {
            return Err(bad("start is greater than end"));
        }
        if end == 0 {
            return Err(bad("port 0 means unknown and never matches"));
        }
        Ok(PortRange {
            start: start as u16,
            end: end as u16,
        })
    }

    fn from_number(n: i64) -> Result<PortRange, String> {
        match u16::try_from(n) {
            Ok(p) if p != 0 => Ok(PortRange { start: p, end: p }),
            Ok(_) => Err(
                r#"0 is not a valid port: port 0 means unknown and never matches (expected 1-65535 or a range like "8000-8100")"#
                    .to_string(),
            ),
            Err(_) => Err(format!(
                r#"{n} is not a valid port (expected 1-65535 or a range like "8000-8100")"#
            )),
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PortRange;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a port number 1-65535 or a range string like "8000-8100""#)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortRange, E> {
                PortRange::from_number(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortRange, E> {
                PortRange::from_number(i64::try_from(v).unwrap_or(i64::MAX)).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortRange, E> {
                PortRange::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// IP protocol of a socket. "icmp" matches both ICMP (1) and ICMPv6 (58); a number matches
/// exactly that IPPROTO value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Number(u8),
}

impl Protocol {
    pub fn matches(&self, proto: u8) -> bool {
        match self {
            Protocol::Tcp => proto == libc::IPPROTO_TCP as u8,
            Protocol::Udp => proto == libc::IPPROTO_UDP as u8,
            Protocol::Icmp => {
                proto == libc::IPPROTO_ICMP as u8 || proto == libc::IPPROTO_ICMPV6 as u8
            }
            Protocol::Number(n) => proto == *n,
        }
    }

    fn from_name(name: &str) -> Result<Protocol, String> {
        match name.trim().to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "icmp" => Ok(Protocol::Icmp),
            other => match other.parse::<u8>() {
                Ok(n) => Ok(Protocol::Number(n)),
                Err(_) => Err(format!(
                    r#"unknown protocol {name:?} (expected "tcp", "udp", "icmp" or a protocol number 0-255)"#
                )),
            },
        }
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Protocol;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#""tcp", "udp", "icmp" or a protocol number 0-255"#)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Protocol, E> {
                u8::try_from(v).map(Protocol::Number).map_err(|_| {
                    E::custom(format!(
                        r#"{v} is not a protocol number (expected "tcp", "udp", "icmp" or a protocol number 0-255)"#
                    ))
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Protocol, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Protocol, E> {
                Protocol::from_name(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Network namespace condition: the agent's own ("host"), any other, or one netns by cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Netns {
    Host,
    Other,
    Cookie(u64),
}

impl<'de> Deserialize<'de> for Netns {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const EXPECTED: &str = r#"expected "host", "other" or a netns cookie number"#;
        struct V;
        impl Visitor<'_> for V {
            type Value = Netns;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#""host", "other" or a netns cookie number"#)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Netns, E> {
                u64::try_from(v)
                    .map(Netns::Cookie)
                    .map_err(|_| E::custom(format!("{v} is not a netns cookie ({EXPECTED})")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Netns, E> {
                Ok(Netns::Cookie(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Netns, E> {
                match v {
                    "host" => Ok(Netns::Host),
                    "other" => Ok(Netns::Other),
                    // Cookies above i64::MAX cannot be TOML integers; allow them as strings.
                    _ => v
                        .parse::<u64>()
                        .map(Netns::Cookie)
                        .map_err(|_| E::custom(format!("unknown netns {v:?} ({EXPECTED})"))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses "10.0.0.0/8", "fd00::/8" or a bare address (a /32 or /128 network).
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let t = text.trim();
    t.parse::<IpNet>()
        .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            format!(r#"{text:?} is not a valid CIDR (expected e.g. "10.0.0.0/8" or "fd00::/8")"#)
        })
}

/// One CIDR inside `remote_cidr`, parsed while toml still knows its span (so a bad entry in
/// a multi-line list is reported on its own line).
struct CidrItem(IpNet);

impl<'de> Deserialize<'de> for CidrItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Parse inside the visitor: errors raised there get the element's own span.
        struct V;
        impl Visitor<'_> for V {
            type Value = CidrItem;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a CIDR string like "10.0.0.0/8""#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CidrItem, E> {
                parse_cidr(v).map(CidrItem).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

fn de_cidrs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<IpNet>>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<IpNet>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(r#"a CIDR string like "10.0.0.0/8" or a list of them"#)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<IpNet>, E> {
            parse_cidr(v).map(|n| vec![n]).map_err(E::custom)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<IpNet>, A::Error> {
            let mut out = Vec::new();
            while let Some(CidrItem(n)) = seq.next_element()? {
                out.push(n);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V).map(Some)
}

/// Like the derived Vec<Rule>, but a `[rule]` table (instead of `[[rule]]`) gets a hint.
fn de_rules<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Rule>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<Rule>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("rules written as [[rule]] tables (double brackets)")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Rule>, A::Error> {
            let mut out = Vec::new();
            while let Some(r) = seq.next_element()? {
                out.push(r);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V)
}

/// A configuration that cannot be used. `Display` gives one line such as
/// `config /etc/sockacct.toml:14: rule #2 field remote_cidr: "10.0.0.0/33" is not a valid
/// CIDR (expected e.g. "10.0.0.0/8" or "fd00::/8")`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    Read {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    Invalid {
        /// File name (or other origin); `None` for a `Config` built in code.
        origin: Option<String>,
        /// 1-based line in the file, when known.
        line: Option<usize>,
        /// 1-based rule index (`rule #3`), when the problem is inside a `[[rule]]`.
        rule: Option<usize>,
        field: Option<String>,
        message: String,
    },
}

impl ConfigError {
    /// A problem with a top-level field.
    pub fn field(field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: None,
            line: None,
            rule: None,
            field: Some(field.to_string()),
            message: message.into(),
        }
    }

    /// A problem whose message names the key itself (`flows.udp_idle_ms: ...`).
    pub fn message(message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: None,
            line: None,
            rule: None,
            field: None,
            message: message.into(),
        }
    }

    /// The same error with `note` appended to its message.
    pub fn noted(self, note: &str) -> ConfigError {
        match self {
            ConfigError::Invalid {
                origin,
                line,
                rule,
                field,
                message,
            } => ConfigError::Invalid {
                origin,
                line,
                rule,
                field,
                message: format!("{message} ({note})"),
            },
            read => read,
        }
    }

    /// A problem with `field` of the rule at 0-based `index` (shown 1-based).
    pub fn rule_field(index: usize, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: None,
            line: None,
            rule: Some(index + 1),
            field: Some(field.to_string()),
            message: message.into(),
        }
    }

    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid { line, .. } => *line,
            ConfigError::Read { .. } => None,
        }
    }

    /// 1-based rule index.
    pub fn rule(&self) -> Option<usize> {
        match self {
            ConfigError::Invalid { rule, .. } => *rule,
            ConfigError::Read { .. } => None,
        }
    }

    pub fn field_name(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => field.as_deref(),
            ConfigError::Read { .. } => None,
        }
    }

    /// Fills in the file name and, from the source map, the line.
    fn located(self, origin: &str, map: Option<&SourceMap>) -> ConfigError {
        match self {
            ConfigError::Invalid {
                origin: _,
                line,
                rule,
                field,
                message,
            } => {
                let line = line.or_else(|| map.and_then(|m| m.line_of(rule, field.as_deref())));
                ConfigError::Invalid {
                    origin: Some(origin.to_string()),
                    line,
                    rule,
                    field,
                    message,
                }
            }
            read => read,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            ConfigError::Read { origin, source } => {
                write!(f, "config {origin}: cannot read: {source}")
            }
            ConfigError::Invalid {
                origin,
                line,
                rule,
                field,
                message,
            } => {
                f.write_str("config")?;
                if let Some(o) = origin {
                    write!(f, " {o}")?;
                }
                if let Some(l) = line {
                    write!(f, ":{l}")?;
                }
                f.write_str(":")?;
                if let Some(r) = rule {
                    write!(f, " rule #{r}")?;
                }
                if let Some(fd) = field {
                    write!(f, " field {fd}")?;
                }
                if rule.is_some() || field.is_some() {
                    f.write_str(":")?;
                }
                write!(f, " {message}")
            }
        }
    }
}

impl Config {
    /// Reads and parses `path`; errors name the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            origin: origin.clone(),
            source,
        })?;
        Config::parse(&text, &origin)
    }

    /// Parses and validates `text`; `origin` (usually the file name) is used in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let map = SourceMap::build(text);
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, rule, field) = match e.span() {
                Some(span) => {
                    let (rule, field) = map
                        .as_ref()
                        .map(|m| m.owner_of(span.start))
                        .unwrap_or_default();
                    (Some(line_at(text, span.start)), rule, field)
                }
                None => (None, None, None),
            };
            // toml messages may span lines ("invalid array\nexpected `]`"); keep ours on one.
            let message = e.message().trim().replace('\n', "; ");
            // Values the schema-free parse could not read either (an integer beyond i64)
            // leave no map: the key is then the one on the error's line.
            let field = field.or_else(|| key_on_line(text, e.span()?.start));
            // "unknown field `x`" already names the key; don't repeat it as the field.
            let field = field.filter(|_| !message.starts_with("unknown field"));
            ConfigError::Invalid {
                origin: Some(origin.to_string()),
                line,
                rule,
                field,
                message,
            }
        })?;
        let mut cfg = cfg;
        cfg.source = Source {
            origin: Some(origin.to_string()),
            map: map.map(std::sync::Arc::new),
        };
        cfg.validate().map_err(|e| cfg.locate(e))?;
        Ok(cfg)
    }

    /// Puts the file and line into an error about this config (for errors found after
    /// parsing, e.g. by compiling its rules).
    pub fn locate(&self, e: ConfigError) -> ConfigError {
        match &self.source.origin {
            Some(origin) => e.located(origin, self.source.map.as_deref()),
            None => e,
        }
    }

    /// The config as a published digest sees it: secrets removed (a URL's password and
    /// secret query values; file paths are kept), and where it came from left out, so that
    /// moving a comment or the file does not change the digest.
    pub fn without_secrets(&self) -> Config {
        Config {
            upload: self.upload.without_secrets(),
            source: Source::default(),
            ..self.clone()
        }
    }

    /// Checks ranges and compiles the rules once. `parse` calls this; call it yourself on a
    /// `Config` built in code.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Err(e) = self.flows.check().and_then(|_| self.metrics.check()) {
            // The message starts with the key already ("flows.udp_idle_ms: ...").
            return Err(ConfigError::Invalid {
                origin: None,
                line: None,
                rule: None,
                field: None,
                message: e,
            });
        }
        self.upload.check()?;
        if self.spool.segment_max_bytes < 4096
            || self.spool.max_bytes < 2 * self.spool.segment_max_bytes
        {
            return Err(ConfigError::field(
                "spool",
                format!(
                    "segment_max_bytes {} must be at least 4096 and max_bytes {} at least twice that",
                    self.spool.segment_max_bytes, self.spool.max_bytes
                ),
            ));
        }
        if self.spool.memory_backlog_bytes < crate::spool::MIN_MEMORY_BACKLOG_BYTES {
            return Err(ConfigError::field(
                "spool",
                format!(
                    "memory_backlog_bytes {} is too small (at least {})",
                    self.spool.memory_backlog_bytes,
                    crate::spool::MIN_MEMORY_BACKLOG_BYTES
                ),
            ));
        }
        if let Some(n) = self.spool.memory_backlog {
            log::warn!(
                "config: [spool] memory_backlog = {n} is deprecated and ignored: the backlog is \
                 bounded in bytes now, [spool] memory_backlog_bytes = {} (remove memory_backlog)",
                self.spool.memory_backlog_bytes
            );
        }
        if !INTERVAL_MS_RANGE.contains(&self.interval_ms) {
            return Err(ConfigError::field(
                "interval_ms",
                format!(
                    "{} is out of range (expected {}..={} milliseconds)",
                    self.interval_ms,
                    INTERVAL_MS_RANGE.start(),
                    INTERVAL_MS_RANGE.end()
                ),
            ));
        }
        if self.max_sockets < MIN_MAX_SOCKETS {
            return Err(ConfigError::field(
                "max_sockets",
                format!(
                    "{} is too small (expected at least {MIN_MAX_SOCKETS}; default {DEFAULT_MAX_SOCKETS})",
                    self.max_sockets
                ),
            ));
        }
        if self.max_labels < 16 {
            return Err(ConfigError::field(
                "max_labels",
                format!(
                    "{} is too small (expected at least 16; default {DEFAULT_MAX_LABELS})",
                    self.max_labels
                ),
            ));
        }
        let c = &self.control;
        for (key, v, min) in [
            ("control.max_connections", c.max_connections as u64, 1),
            (
                "control.max_connections_per_uid",
                c.max_connections_per_uid as u64,
                1,
            ),
            ("control.idle_timeout_ms", c.idle_timeout_ms, 100),
            ("control.write_timeout_ms", c.write_timeout_ms, 100),
            ("control.max_subscribers", c.max_subscribers as u64, 1),
            (
                "control.max_subscribers_per_uid",
                c.max_subscribers_per_uid as u64,
                1,
            ),
        ] {
            if v < min {
                return Err(ConfigError::field(
                    key,
                    format!("{v} is too small (expected at least {min})"),
                ));
            }
        }
        if let Some(dir) = &self.cgroup {
            // A relative path would depend on the daemon's working directory.
            if !dir.is_absolute() {
                return Err(ConfigError::field(
                    "cgroup",
                    format!(
                        r#"{:?} is not an absolute path (expected a cgroup v2 directory such as "/sys/fs/cgroup/system.slice")"#,
                        dir.display().to_string()
                    ),
                ));
            }
        }
        let mut seen = BTreeSet::new();
        for name in &self.interfaces {
            if !valid_ifname(name) {
                return Err(ConfigError::field(
                    "interfaces",
                    format!(
                        r#"{name:?} is not a valid interface name (expected 1-15 bytes without '/', ':' or whitespace, e.g. "eth0")"#
                    ),
                ));
            }
            if !seen.insert(name.as_str()) {
                return Err(ConfigError::field(
                    "interfaces",
                    format!("{name:?} is listed twice"),
                ));
            }
        }
        if self
            .agent_id
            .as_ref()
            .is_some_and(|id| id.trim().is_empty())
        {
            return Err(ConfigError::field(
                "agent_id",
                "is empty (expected a non-empty id, or leave agent_id out for the default)",
            ));
        }
        let catch_all = self.rules.iter().position(Rule::is_catch_all);
        if let Some(pos) = catch_all.filter(|&p| p + 1 < self.rules.len()) {
            log::warn!(
                "config: rule #{} has no match fields and matches every socket; rules #{}.. can never match",
                pos + 1,
                pos + 2
            );
        }
        // Globs and label templates are checked where they are compiled, exactly as the
        // agent uses them: crate::settings.
        Ok(())
    }
}

/// The kernel's rule for interface names (dev_valid_name): shorter than IFNAMSIZ (16), not
/// "." or "..", and no '/', ':' or whitespace.
fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// 1-based line of a byte offset.
/// The key of a `key = value` line containing `offset`.
fn key_on_line(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)))
    .then(|| key.to_string())
}

fn line_at(text: &str, offset: usize) -> usize {
    let mut end = offset.min(text.len());
    // "unexpected end of file" points past the final newline; report the last line instead.
    if end == text.len() && text.ends_with('\n') {
        end -= 1;
    }
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Where each top-level key and each rule's keys sit in the text, so that errors found after
/// deserialization (and serde errors, which only carry a byte span) can name a line, a rule
/// and a field. Built from a second, schema-free parse of the same text.
#[derive(Debug, Default)]
struct SourceMap {
    line_starts: Vec<usize>,
    top: BTreeMap<String, KeySpans>,
    rules: Vec<RuleSpans>,
}

#[derive(Debug, Clone)]
struct KeySpans {
    key: Range<usize>,
    value: Range<usize>,
}

#[derive(Debug)]
struct RuleSpans {
    table: Range<usize>,
    keys: BTreeMap<String, KeySpans>,
}

type SpannedTable = BTreeMap<toml::Spanned<String>, toml::Spanned<toml::Value>>;

#[derive(Deserialize)]
struct RulesOnly {
    #[serde(default)]
    rule: Vec<toml::Spanned<SpannedTable>>,
}

impl SourceMap {
    /// `None` when the text is not TOML at all (then serde's own span is all there is).
    fn build(text: &str) -> Option<SourceMap> {
        let keys = |t: &SpannedTable| -> BTreeMap<String, KeySpans> {
            t.iter()
                .map(|(k, v)| {
                    (
                        k.get_ref().clone(),
                        KeySpans {
                            key: k.span(),
                            value: v.span(),
                        },
                    )
                })
                .collect()
        };
        let top: SpannedTable = toml::from_str(text).ok()?;
        // `rule` may be mistyped (e.g. `[rule]`); then only top-level keys are located.
        let rules = toml::from_str::<RulesOnly>(text)
            .map(|r| r.rule)
            .unwrap_or_default()
            .iter()
            .map(|t| RuleSpans {
                table: t.span(),
                keys: keys(t.get_ref()),
            })
            .collect();
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Some(SourceMap {
            line_starts,
            top: keys(&top),
            rules,
        })
    }

    fn line_of_offset(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&s| s <= offset).max(1)
    }

    /// Line of `field` (of 1-based `rule`, or top-level); the rule's `[[rule]]` header when
    /// the field is not written in the file.
    fn line_of(&self, rule: Option<usize>, field: Option<&str>) -> Option<usize> {
        let offset = match rule {
            Some(n) => {
                let r = self.rules.get(n.checked_sub(1)?)?;
                field
                    .and_then(|f| r.keys.get(f))
                    .map_or(r.table.start, |k| k.key.start)
            }
            None => self.top.get(field?)?.key.start,
        };
        Some(self.line_of_offset(offset))
    }

    /// The rule (1-based) and field whose text contains `offset`.
    fn owner_of(&self, offset: usize) -> (Option<usize>, Option<String>) {
        let inside = |k: &KeySpans| k.key.contains(&offset) || k.value.contains(&offset);
        let field_in = |keys: &BTreeMap<String, KeySpans>| {
            keys.iter()
                .find(|(_, k)| inside(k))
                .map(|(name, _)| name.clone())
        };
        if let Some((i, r)) = self
            .rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.table.contains(&offset))
        {
            return (Some(i + 1), field_in(&r.keys));
        }
        (None, field_in(&self.top))
    }
}

#[cfg(test)]
pub(crate) mod tests;
