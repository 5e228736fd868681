//! The one step from the configuration file and the command line to what the agent runs
//! with: flags override the file, the result is validated, and the rules and the flow
//! settings are compiled, once, before anything is attached. Every error names the file,
//! line, rule and key where it can ([`Config::locate`]).
//!
//! Layering: [`crate::cli`] fills in [`Overrides`] from its flags; the daemon and `check`
//! take [`Settings`]. Neither this module nor the daemon knows about clap.
use std::{path::PathBuf, sync::Arc, time::Duration};

use crate::{
    config::{Config, ConfigError},
    flows::FlowConfig,
    labels::Labeler,
    loader::LoadOptions,
};

/// Values given on the command line; `None` (or empty) leaves the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
    pub interval_ms: Option<u64>,
    pub interfaces: Vec<String>,
    pub max_sockets: Option<u32>,
    pub agent_id: Option<String>,
    pub spool_dir: Option<PathBuf>,
    pub upload_url: Option<String>,
    pub control_socket: Option<PathBuf>,
    pub control_group: Option<String>,
    pub metrics_listen: Option<String>,
    pub no_metrics: bool,
}

/// The configuration after flags, checked and compiled.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    pub interval: Duration,
    /// The compiled rules (globs, templates) of `config`.
    pub labeler: Arc<Labeler>,
    /// The flow table's settings; None when flow records are off.
    pub flows: Option<FlowConfig>,
}

impl Settings {
    /// Reads the file named in `o` (or the defaults), applies the flags, checks and compiles.
    pub fn build(o: &Overrides) -> Result<Settings, ConfigError> {
        let mut config = match &o.config {
            Some(p) => Config::load(p)?,
            None => Config::parse("", "<defaults>")?,
        };
        // The file was checked as it was parsed; flags go through the same checks
        // (ranges, URL scheme, ...) once they are applied.
        if apply(&mut config, o) {
            config
                .validate()
                .map_err(|e| e.noted("after applying the command-line flags"))?;
        }
        Settings::compile(config)
    }

    /// Compiles a validated configuration.
    pub fn compile(config: Config) -> Result<Settings, ConfigError> {
        let labeler = Labeler::new(&config, crate::procfs::netns_cookie_of_self())
            .map_err(|e| config.locate(e))?;
        let flows = if config.flows.enabled {
            Some(FlowConfig::from_section(&config.flows).map_err(ConfigError::message)?)
        } else {
            // Checked all the same: a section that is wrong stays wrong when turned on.
            config.flows.check().map_err(ConfigError::message)?;
            None
        };
        Ok(Settings {
            interval: Duration::from_millis(config.interval_ms),
            labeler: Arc::new(labeler),
            flows,
            config,
        })
    }

    /// What to load and attach (`run` and `check` load the same).
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            cgroup: self.config.cgroup.clone(),
            interfaces: self.config.interfaces.clone(),
            max_sockets: self.config.max_sockets,
            per_peer: self.config.flows.enabled,
            tc_record: None,
        }
    }
}

/// Applies the flags; true if any was given.
fn apply(c: &mut Config, o: &Overrides) -> bool {
    let mut any = false;
    let mut set = |given: bool| any |= given;
    if let Some(v) = &o.cgroup {
        c.cgroup = Some(v.clone());
        set(true);
    }
    if let Some(v) = o.interval_ms {
        c.interval_ms = v;
        set(true);
    }
    if !o.interfaces.is_empty() {
        c.interfaces = o.interfaces.clone();
        set(true);
    }
    if let Some(v) = o.max_sockets {
        c.max_sockets = v;
        set(true);
    }
    if let Some(v) = &o.agent_id {
        c.agent_id = Some(v.clone());
        set(true);
    }
    if let Some(v) = &o.spool_dir {
        c.spool.dir = v.clone();
        set(true);
    }
    if let Some(v) = &o.upload_url {
        c.upload.url = Some(v.clone());
        set(true);
    }
    if let Some(v) = &o.control_socket {
        c.control.socket = v.clone();
        set(true);
    }
    if let Some(v) = &o.control_group {
        c.control.group = Some(v.clone());
        set(true);
    }
    if let Some(v) = &o.metrics_listen {
        c.metrics.listen = v.clone();
        c.metrics.enabled = true;
        set(true);
    }
    if o.no_metrics {
        c.metrics.enabled = false;
        set(true);
    }
    any
}

#[cfg(test)]
mod tests {
    //! Errors only compiling finds (globs, label templates, rule CIDRs), located in the
    //! file like the parser's own.
    use super::*;
    use crate::config::tests::check_err;

    #[track_caller]
    fn assert_err(
        text: &str,
        line: usize,
        rule: Option<usize>,
        field: Option<&str>,
        needles: &[&str],
    ) {
        let e = Config::parse(text, "test.toml")
            .and_then(Settings::compile)
            .expect_err("config should be rejected");
        check_err(e, line, rule, field, needles)
    }

    #[test]
    fn bad_cidr() {
        let text =
            "[[rule]]\nlabel = \"a\"\n\n[[rule]]\nlabel = \"b\"\nremote_cidr = \"10.0.0.0/33\"\n";
        assert_err(
            text,
            6,
            Some(2),
            Some("remote_cidr"),
            &[r#""10.0.0.0/33" is not a valid CIDR (expected e.g. "10.0.0.0/8" or "fd00::/8")"#],
        );
        // A bad entry in a multi-line list is reported on its own line.
        assert_err(
            "[[rule]]\nlabel = \"a\"\nremote_cidr = [\n  \"10.0.0.0/8\",\n  \"fd00::/129\",\n]\n",
            5,
            Some(1),
            Some("remote_cidr"),
            &["\"fd00::/129\" is not a valid CIDR"],
        );
        assert_err(
            "[[rule]]\nlabel = \"a\"\nremote_cidr = 10\n",
            3,
            Some(1),
            Some("remote_cidr"),
            &["expected a CIDR string"],
        );
        assert_err(
            "[[rule]]\nlabel = \"a\"\nremote_cidr = []\n",
            3,
            Some(1),
            Some("remote_cidr"),
            &["empty list"],
        );
    }

    #[test]
    fn bad_globs() {
        for field in ["process", "exe", "cgroup"] {
            let text = format!(
                "[[rule]]\nlabel = \"a\"\n\n[[rule]]\nlabel = \"b\"\n{field} = \"/x/[a\"\n"
            );
            assert_err(
                &text,
                6,
                Some(2),
                Some(field),
                &[
                    "\"/x/[a\" is not a valid glob",
                    "unclosed character class",
                    "expected e.g.",
                ],
            );
        }
        assert_err(
            "[[rule]]\nlabel = \"a\"\nexe = \"nginx\"\n",
            3,
            Some(1),
            Some("exe"),
            &["cannot match a full executable path", "*/nginx"],
        );
    }

    #[test]
    fn bad_labels() {
        assert_err(
            "[[rule]]\nprocess = \"x\"\nlabel = \"\"\n",
            3,
            Some(1),
            Some("label"),
            &["label is empty", "expected"],
        );
        assert_err(
            "[[rule]]\nlabel = \"   \"\n",
            2,
            Some(1),
            Some("label"),
            &["label is empty"],
        );
        assert_err(
            "[[rule]]\nlabel = \"a\"\n[[rule]]\nlabel = \"x-{pid}\"\n",
            4,
            Some(2),
            Some("label"),
            &["unknown placeholder {pid}", "{process}", "{remote_port}"],
        );
        assert_err(
            "[[rule]]\nlabel = \"x-{process\"\n",
            2,
            Some(1),
            Some("label"),
            &["unclosed"],
        );
        assert_err(
            "[[rule]]\nlabel = \"x}\"\n",
            2,
            Some(1),
            Some("label"),
            &["'}}'"],
        );
        let long = "x".repeat(200);
        assert_err(
            &format!("[[rule]]\nlabel = \"{long}\"\n"),
            2,
            Some(1),
            Some("label"),
            &["at most 128"],
        );
    }

    #[test]
    fn flags_are_checked_like_the_file() {
        let e = Settings::build(&Overrides {
            interval_ms: Some(5),
            ..Overrides::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("interval_ms"), "{e}");
        assert!(e.contains("after applying the command-line flags"), "{e}");
        let s = Settings::build(&Overrides {
            interval_ms: Some(250),
            interfaces: vec!["eth0".into()],
            ..Overrides::default()
        })
        .unwrap();
        assert_eq!(s.interval, Duration::from_millis(250));
        assert_eq!(s.load_options().interfaces, vec!["eth0".to_string()]);
        assert!(s.flows.is_some(), "flow records are on by default");
    }
}
