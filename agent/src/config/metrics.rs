//! `[metrics]` in the config file: the Prometheus endpoint, its connection limits and its
//! optional credentials.
//!
//! Credentials are keys of this file (TOML) rather than an exporter-toolkit web-config
//! YAML: one file and one parser for the whole agent, errors that name the key, no YAML
//! crate (serde_yaml is unmaintained) and no bcrypt (a basic-auth check at the toolkit's
//! cost costs tens of ms of CPU per request). The names follow the toolkit's
//! `tls_server_config` (cert_file, key_file, client_ca_file), and a bearer token is what
//! Prometheus sends with `authorization: {credentials_file: ...}`.
use std::{net::SocketAddr, ops::RangeInclusive, path::PathBuf};

use serde::Deserialize;

/// Loopback only by default: exposing the host's traffic by label to the network is the
/// operator's explicit choice. 9474 is not taken in Prometheus's list of exporter ports.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9474";
pub const DEFAULT_MAX_LABEL_SERIES: usize = 1000;
/// Connections served at once, over all peers.
pub const DEFAULT_MAX_CONNECTIONS: usize = 32;
pub const MAX_CONNECTIONS_RANGE: RangeInclusive<usize> = 1..=4096;
/// Connections of one peer (a local user, or a remote address): a scraper needs one or two.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 4;
/// From connect (or the previous reply) to a complete request head; also the TLS handshake.
pub const DEFAULT_READ_TIMEOUT_SECS: u64 = 10;
/// A reply write that makes no progress for this long closes the connection.
pub const DEFAULT_WRITE_TIMEOUT_SECS: u64 = 10;
pub const TIMEOUT_SECS_RANGE: RangeInclusive<u64> = 1..=3600;
/// A kept-alive connection is closed (after its current reply) at this age.
pub const DEFAULT_MAX_CONNECTION_AGE_SECS: u64 = 300;
pub const MAX_CONNECTION_AGE_RANGE: RangeInclusive<u64> = 1..=86_400;
/// Request line and headers; a scrape request is a few hundred bytes.
pub const DEFAULT_MAX_REQUEST_HEADER_BYTES: usize = 8192;
pub const MAX_REQUEST_HEADER_BYTES_RANGE: RangeInclusive<usize> = 1024..=65_536;

/// `[metrics]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    pub enabled: bool,
    /// ADDR:PORT to serve `GET /metrics` on (port 0: any free port, shown by `status`).
    pub listen: String,
    /// Labels with their own series; the rest are summed under `label="_other"`.
    pub max_label_series: usize,
    pub max_connections: usize,
    /// A peer is the local user owning the connecting socket, else its address (IPv6: /64).
    pub max_connections_per_peer: usize,
    pub read_timeout_secs: u64,
    pub write_timeout_secs: u64,
    pub max_connection_age_secs: u64,
    pub max_request_header_bytes: usize,
    /// A file holding the token scrapers must send as `Authorization: Bearer TOKEN`.
    pub bearer_token_file: Option<PathBuf>,
    /// PEM certificate chain and private key: serve HTTPS instead of HTTP.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA certificates: scrapers must present a client certificate signed by one.
    pub tls_client_ca_file: Option<PathBuf>,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            enabled: true,
            listen: DEFAULT_METRICS_LISTEN.into(),
            max_label_series: DEFAULT_MAX_LABEL_SERIES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            read_timeout_secs: DEFAULT_READ_TIMEOUT_SECS,
            write_timeout_secs: DEFAULT_WRITE_TIMEOUT_SECS,
            max_connection_age_secs: DEFAULT_MAX_CONNECTION_AGE_SECS,
            max_request_header_bytes: DEFAULT_MAX_REQUEST_HEADER_BYTES,
            bearer_token_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
        }
    }
}

fn in_range<T: PartialOrd + std::fmt::Display>(
    key: &str,
    v: T,
    range: &RangeInclusive<T>,
    default: T,
) -> Result<(), String> {
    if range.contains(&v) {
        return Ok(());
    }
    Err(format!(
        "metrics.{key}: {v} is out of range (expected {}..={}; default {default})",
        range.start(),
        range.end()
    ))
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

    /// Ranges and combinations; the files themselves are read at start
    /// ([`crate::metrics::auth::Credentials::load`]).
    pub fn check(&self) -> Result<(), String> {
        self.listen_addr()?;
        in_range(
            "max_label_series",
            self.max_label_series,
            &(1..=100_000),
            DEFAULT_MAX_LABEL_SERIES,
        )?;
        in_range(
            "max_connections",
            self.max_connections,
            &MAX_CONNECTIONS_RANGE,
            DEFAULT_MAX_CONNECTIONS,
        )?;
        in_range(
            "max_connections_per_peer",
            self.max_connections_per_peer,
            &(1..=self.max_connections),
            DEFAULT_MAX_CONNECTIONS_PER_PEER.min(self.max_connections),
        )
        .map_err(|e| format!("{e}: at most max_connections"))?;
        in_range(
            "read_timeout_secs",
            self.read_timeout_secs,
            &TIMEOUT_SECS_RANGE,
            DEFAULT_READ_TIMEOUT_SECS,
        )?;
        in_range(
            "write_timeout_secs",
            self.write_timeout_secs,
            &TIMEOUT_SECS_RANGE,
            DEFAULT_WRITE_TIMEOUT_SECS,
        )?;
        in_range(
            "max_connection_age_secs",
            self.max_connection_age_secs,
            &MAX_CONNECTION_AGE_RANGE,
            DEFAULT_MAX_CONNECTION_AGE_SECS,
        )?;
        in_range(
            "max_request_header_bytes",
            self.max_request_header_bytes,
            &MAX_REQUEST_HEADER_BYTES_RANGE,
            DEFAULT_MAX_REQUEST_HEADER_BYTES,
        )?;
        for (key, path) in [
            ("bearer_token_file", &self.bearer_token_file),
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
            ("tls_client_ca_file", &self.tls_client_ca_file),
        ] {
            if let Some(p) = path
                && !p.is_absolute()
            {
                // A relative path would depend on the daemon's working directory.
                return Err(format!(
                    "metrics.{key}: {:?} is not an absolute path",
                    p.display()
                ));
            }
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => {
                return Err(
                    "metrics.tls_key_file: missing (tls_cert_file is set; HTTPS needs both)".into(),
                );
            }
            (None, Some(_)) => {
                return Err(
                    "metrics.tls_cert_file: missing (tls_key_file is set; HTTPS needs both)".into(),
                );
            }
            _ => {}
        }
        if self.tls_client_ca_file.is_some() && self.tls_cert_file.is_none() {
            return Err(
                "metrics.tls_client_ca_file: client certificates need HTTPS (set tls_cert_file and tls_key_file too)"
                    .into(),
            );
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
            (
                "[metrics]\nmax_connections = 0\n",
                "metrics.max_connections",
            ),
            (
                "[metrics]\nmax_connections = 8\nmax_connections_per_peer = 9\n",
                "metrics.max_connections_per_peer: 9 is out of range (expected 1..=8; default 4): at most max_connections",
            ),
            (
                "[metrics]\nread_timeout_secs = 0\n",
                "metrics.read_timeout_secs: 0 is out of range (expected 1..=3600; default 10)",
            ),
            (
                "[metrics]\nwrite_timeout_secs = 4000\n",
                "metrics.write_timeout_secs",
            ),
            (
                "[metrics]\nmax_connection_age_secs = 0\n",
                "metrics.max_connection_age_secs",
            ),
            (
                "[metrics]\nmax_request_header_bytes = 100\n",
                "metrics.max_request_header_bytes: 100 is out of range (expected 1024..=65536",
            ),
            (
                "[metrics]\nbearer_token_file = \"token\"\n",
                "metrics.bearer_token_file: \"token\" is not an absolute path",
            ),
            (
                "[metrics]\ntls_cert_file = \"/c.pem\"\n",
                "metrics.tls_key_file: missing",
            ),
            (
                "[metrics]\ntls_key_file = \"/k.pem\"\n",
                "metrics.tls_cert_file: missing",
            ),
            (
                "[metrics]\ntls_client_ca_file = \"/ca.pem\"\n",
                "metrics.tls_client_ca_file: client certificates need HTTPS",
            ),
            ("[metrics]\nbearer_token = \"x\"\n", "bearer_token"),
        ] {
            let e = Config::parse(text, "t.toml").expect_err(text).to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
        let c = Config::parse("[metrics]\nlisten = \"[::1]:0\"\n", "t.toml").unwrap();
        assert!(c.metrics.enabled);
        assert!(c.metrics.listen_addr().unwrap().ip().is_loopback());
    }

    #[test]
    fn limits_and_credentials_parse() {
        let c = Config::parse(
            "[metrics]\nmax_connections = 8\nmax_connections_per_peer = 2\nread_timeout_secs = 3\n\
             write_timeout_secs = 4\nmax_connection_age_secs = 60\nmax_request_header_bytes = 4096\n\
             bearer_token_file = \"/etc/sockacct/metrics.token\"\n\
             tls_cert_file = \"/etc/sockacct/c.pem\"\ntls_key_file = \"/etc/sockacct/k.pem\"\n\
             tls_client_ca_file = \"/etc/sockacct/ca.pem\"\n",
            "t.toml",
        )
        .unwrap();
        let m = &c.metrics;
        assert_eq!(
            (m.max_connections, m.max_connections_per_peer),
            (8, 2),
            "{m:?}"
        );
        assert_eq!(
            (
                m.read_timeout_secs,
                m.write_timeout_secs,
                m.max_connection_age_secs
            ),
            (3, 4, 60)
        );
        assert_eq!(m.max_request_header_bytes, 4096);
        assert_eq!(
            m.bearer_token_file.as_deref(),
            Some(std::path::Path::new("/etc/sockacct/metrics.token"))
        );
        assert!(m.tls_client_ca_file.is_some());
        let d = Config::parse("", "t.toml").unwrap().metrics;
        assert_eq!((d.max_connections, d.max_connections_per_peer), (32, 4));
        assert_eq!((d.read_timeout_secs, d.write_timeout_secs), (10, 10));
        assert!(d.bearer_token_file.is_none() && d.tls_cert_file.is_none());
    }
}
