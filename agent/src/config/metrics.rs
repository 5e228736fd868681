//! `[metrics]` in the config file: the Prometheus endpoint.
use std::net::SocketAddr;

use serde::Deserialize;

/// Loopback only by default: exposing the host's traffic by label to the network is the
/// operator's explicit choice. 9474 is not taken in Prometheus's list of exporter ports.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9474";
pub const DEFAULT_MAX_LABEL_SERIES: usize = 1000;

/// `[metrics]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    pub enabled: bool,
    /// ADDR:PORT to serve `GET /metrics` on (port 0: any free port, shown by `status`).
    pub listen: String,
    /// Labels with their own series; the rest are summed under `label="_other"`.
    pub max_label_series: usize,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            enabled: true,
            listen: DEFAULT_METRICS_LISTEN.into(),
            max_label_series: DEFAULT_MAX_LABEL_SERIES,
        }
    }
}

impl MetricsSection {
    /// The listen address, parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.listen.parse().map_err(|_| {
            format!(
                "metrics.listen: {:?} is not ADDR:PORT (expected e.g. \"{DEFAULT_METRICS_LISTEN}\" or \"[::1]:9474\")",
                self.listen
            )
        })
    }

    pub fn check(&self) -> Result<(), String> {
        self.listen_addr()?;
        if !(1..=100_000).contains(&self.max_label_series) {
            return Err(format!(
                "metrics.max_label_series: {} is out of range (expected 1..=100000; default {DEFAULT_MAX_LABEL_SERIES})",
                self.max_label_series
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn bad_values_name_the_key() {
        for (text, needle) in [
            ("[metrics]\nlisten = \"localhost\"\n", "metrics.listen"),
            (
                "[metrics]\nmax_label_series = 0\n",
                "metrics.max_label_series",
            ),
        ] {
            let e = Config::parse(text, "t.toml").expect_err(text).to_string();
            assert!(e.contains(needle), "{e}");
        }
        let c = Config::parse("[metrics]\nlisten = \"[::1]:0\"\n", "t.toml").unwrap();
        assert!(c.metrics.enabled);
        assert!(c.metrics.listen_addr().unwrap().ip().is_loopback());
    }
}
