//! Coverage records (`type: "agent"`): one when the agent starts and one when it stops
//! cleanly, so a consumer can tell "this host moved nothing" from "the agent was not
//! running". Whether the previous run ended cleanly is told by a marker file in the
//! state directory that exists exactly while an agent runs.
use std::{io, io::Write as _, path::Path};

use serde::{Deserialize, Serialize};

use crate::event::{FORMAT_VERSION, Identity, SpoolRecord};
use crate::safedir::SafeDir;

/// How the previous run ended, as seen at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Previous {
    /// No earlier run in this state directory.
    None,
    /// It stopped cleanly (final poll written, spool fsynced).
    Clean,
    /// It was killed or crashed: records after its last fsync may be missing (the spool
    /// was recovered; gaps say what is known to be lost).
    Recovered,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentEvent {
    Start,
    Stop,
}

/// The coverage record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub v: u32,
    /// Always "agent".
    #[serde(rename = "type")]
    pub kind: String,
    pub agent: String,
    pub boot: String,
    pub seq: u64,
    pub event: AgentEvent,
    /// Unix ms.
    pub t: u64,
    pub version: String,
    pub kernel: String,
    /// `purpose=program` per hook purpose, as chosen on this kernel.
    pub hooks: Vec<String>,
    /// FNV-1a 64 of the effective configuration without its secrets, hex: equal digests,
    /// equal settings ([`config_digest`]).
    pub config_digest: String,
    /// `start` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Previous>,
    /// `start` only: the last seq the spool held when this run began (records after it
    /// are this run's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumes_after: Option<u64>,
    /// `stop` only: how long this run lasted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
}

impl SpoolRecord for AgentRecord {
    fn stamp(&mut self, id: &Identity, seq: u64) {
        self.agent.clone_from(&id.agent);
        self.boot.clone_from(&id.boot);
        self.seq = seq;
    }
}

/// What a start record says; the rest is filled in by [`AgentRecord::start`].
#[derive(Debug, Clone)]
pub struct RunFacts {
    pub kernel: String,
    pub hooks: Vec<String>,
    pub config_digest: String,
}

impl AgentRecord {
    fn new(event: AgentEvent, now_ms: u64, f: &RunFacts) -> AgentRecord {
        AgentRecord {
            v: FORMAT_VERSION,
            kind: "agent".into(),
            agent: String::new(),
            boot: String::new(),
            seq: 0,
            event,
            t: now_ms,
            version: env!("CARGO_PKG_VERSION").into(),
            kernel: f.kernel.clone(),
            hooks: f.hooks.clone(),
            config_digest: f.config_digest.clone(),
            previous: None,
            resumes_after: None,
            uptime_ms: None,
        }
    }

    pub fn start(
        now_ms: u64,
        f: &RunFacts,
        previous: Previous,
        resumes_after: Option<u64>,
    ) -> Self {
        let mut r = AgentRecord::new(AgentEvent::Start, now_ms, f);
        r.previous = Some(previous);
        r.resumes_after = resumes_after;
        r
    }

    pub fn stop(now_ms: u64, f: &RunFacts, uptime_ms: u64) -> Self {
        let mut r = AgentRecord::new(AgentEvent::Stop, now_ms, f);
        r.uptime_ms = Some(uptime_ms);
        r
    }
}

/// The `config_digest` of a configuration: [`digest`] over its settings with every secret
/// removed ([`Config::without_secrets`](crate::config::Config::without_secrets)). Records
/// leave the host; an unkeyed hash over a password would let whoever reads them test
/// guesses of it offline.
pub fn config_digest(c: &crate::config::Config) -> String {
    digest(format!("{:?}", c.without_secrets()).as_bytes())
}

/// FNV-1a 64, hex (stable across builds, unlike the std hasher).
pub fn digest(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Name of the marker in the state directory.
pub const MARKER: &str = "running";

/// The marker that exists while an agent runs with this state directory. It is reached
/// through the directory's descriptor and never through a link: a link at `running` (which
/// the agent never makes) is refused with an error naming it, and what it points to is left
/// untouched.
pub struct RunMarker {
    dir: SafeDir,
}

impl RunMarker {
    /// Err, naming the path and the fix, if something other than a plain file is at the
    /// marker's name (checked at start, before anything is loaded).
    pub fn check(state_dir: &Path) -> io::Result<()> {
        SafeDir::open(state_dir)?.refuse_non_file(MARKER)
    }

    /// Creates the marker; returns how the previous run ended. `had_state`: the state
    /// directory held an earlier run's sequence file.
    pub fn create(state_dir: &Path, had_state: bool) -> io::Result<(RunMarker, Previous)> {
        let dir = SafeDir::open(state_dir)?;
        dir.refuse_non_file(MARKER)?;
        let previous = if dir.stat_at(MARKER)?.is_some() {
            Previous::Recovered
        } else if had_state {
            Previous::Clean
        } else {
            Previous::None
        };
        let mut f = dir.open_file(
            MARKER,
            libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC,
            0o600,
        )?;
        writeln!(f, "{}", std::process::id())?;
        Ok((RunMarker { dir }, previous))
    }

    /// The run ended cleanly: its last records are durable.
    pub fn remove(self) -> io::Result<()> {
        self.dir.remove(MARKER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn a_link_at_the_marker_is_refused_and_its_target_untouched() {
        let base = std::env::temp_dir().join(format!("sockacct-markerlink-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("state")).unwrap();
        let target = base.join("root-only");
        fs::write(&target, "precious\n").unwrap();
        std::os::unix::fs::symlink(&target, base.join("state/running")).unwrap();
        let e = RunMarker::check(&base.join("state"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("state/running") && e.contains("symbolic link"),
            "{e}"
        );
        let e = RunMarker::create(&base.join("state"), true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(fs::read_to_string(&target).unwrap(), "precious\n");
        // A dangling link too (the probe's case: a file root may create).
        fs::remove_file(&target).unwrap();
        assert!(RunMarker::create(&base.join("state"), true).is_err());
        assert!(!target.exists());
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn the_marker_tells_a_crash_from_a_clean_stop() {
        let dir = std::env::temp_dir().join(format!("sockacct-marker-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let (m, p) = RunMarker::create(&dir, false).unwrap();
        assert_eq!(p, Previous::None);
        m.remove().unwrap();
        let (m, p) = RunMarker::create(&dir, true).unwrap();
        assert_eq!(p, Previous::Clean);
        drop(m); // a crash: the marker stays
        let (_m, p) = RunMarker::create(&dir, true).unwrap();
        assert_eq!(p, Previous::Recovered);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn records_serialize_with_their_fields() {
        let f = RunFacts {
            kernel: "6.1.0".into(),
            hooks: vec!["tcp_close=tp_btf".into()],
            config_digest: digest(b"x"),
        };
        let r = AgentRecord::start(5, &f, Previous::Recovered, Some(41));
        let v: serde_json::Value = serde_json::from_slice(&r.to_json_line()).unwrap();
        assert_eq!(v["type"], "agent");
        assert_eq!(v["event"], "start");
        assert_eq!(v["previous"], "recovered");
        assert_eq!(v["resumes_after"], 41);
        assert!(v.get("uptime_ms").is_none());
        assert_eq!(digest(b"x"), digest(b"x"));
        assert_ne!(digest(b"x"), digest(b"y"));
    }

    #[test]
    fn the_config_digest_ignores_secrets_and_nothing_else() {
        use crate::config::Config;
        // Built in code: validation would refuse a URL with a password, but the digest
        // must not depend on one even where a config bypassed it.
        let with = |url: &str, token: &str| {
            let mut c = Config::default();
            c.upload.url = Some(url.into());
            c.upload.token_file = Some(token.into());
            c
        };
        let base = config_digest(&with("https://u:one@h/i?password=a&db=x", "/etc/t"));
        assert_eq!(
            base,
            config_digest(&with("https://u:two@h/i?password=b&db=x", "/etc/t")),
            "a different password, the same digest"
        );
        assert_eq!(
            base,
            config_digest(&with("https://u@h/i?password=&db=x", "/etc/t"))
        );
        for (url, token) in [
            ("https://u:one@h/i?password=a&db=y", "/etc/t"),
            ("https://u:one@g/i?password=a&db=x", "/etc/t"),
            ("https://v:one@h/i?password=a&db=x", "/etc/t"),
            ("https://u:one@h/i?password=a&db=x", "/etc/t2"),
        ] {
            assert_ne!(base, config_digest(&with(url, token)), "{url} {token}");
        }
        let mut other = with("https://u:one@h/i?password=a&db=x", "/etc/t");
        other.upload.timeout_ms += 1;
        assert_ne!(base, config_digest(&other));
        let parsed = |origin: &str, text: &str| Config::parse(text, origin).unwrap();
        assert_eq!(
            config_digest(&parsed("a.toml", "interval_ms = 200\n")),
            config_digest(&parsed("b.toml", "# moved\n\ninterval_ms = 200 # same\n")),
            "where the settings came from is not part of the digest"
        );
        let shown = format!(
            "{:?}",
            with("https://u:s3cr3tA@h/i?password=s3cr3tB", "/t").without_secrets()
        );
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }
}
