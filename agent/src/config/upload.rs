//! `[upload]` in the config file: where `sockacct flush` sends the spool, how it
//! authenticates, and which TLS roots and client certificate it uses.
//!
//! Secrets never go in here as values: a URL with a password, a user name or a
//! credential-carrying query parameter is refused ([`crate::secrets`] says why), and the
//! token or password is named by a file only root reads.
use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;
use crate::secrets::{redact_url_text, strip_url, url_credential};

/// `[upload]`
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploadSection {
    /// http(s) URL; a query string is kept as it is (e.g. ClickHouse's
    /// `?query=INSERT INTO t FORMAT JSONEachRow`). Never with credentials.
    pub url: Option<String>,
    /// File holding a bearer token (never on the command line).
    pub token_file: Option<PathBuf>,
    /// HTTP basic auth user (not a secret; e.g. ClickHouse's user).
    pub user: Option<String>,
    /// File holding the basic auth password of `user`, read at every send.
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA certificate(s) that sign the server's certificate. When set,
    /// only these are trusted (the built-in public roots are not).
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (and its chain) for servers that require one.
    pub client_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key (PKCS#8, PKCS#1 or SEC1, not
    /// encrypted).
    pub client_key_file: Option<PathBuf>,
    pub max_body_bytes: u64,
    pub timeout_ms: u64,
    /// How long one flush may take, retries included.
    pub deadline_ms: u64,
    /// Upload on its own every this many seconds; 0 = only when an admin asks (default).
    pub every_secs: u64,
    /// `body` (default): POST the bodies to `url` as they are. `clickhouse`: `url` is a
    /// ClickHouse HTTP endpoint; the agent builds each INSERT into `table` itself, with
    /// the body's idempotency key as `insert_deduplication_token` (docs/clickhouse.md).
    pub format: UploadFormat,
    /// The table of `format = "clickhouse"`.
    pub table: String,
}

/// How bodies are uploaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UploadFormat {
    #[default]
    Body,
    Clickhouse,
}

impl Default for UploadSection {
    fn default() -> Self {
        UploadSection {
            url: None,
            token_file: None,
            user: None,
            password_file: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            max_body_bytes: 4 << 20,
            timeout_ms: 10_000,
            deadline_ms: 60_000,
            every_secs: 0,
            format: UploadFormat::Body,
            table: "sockacct.records".into(),
        }
    }
}

/// A table name ClickHouse takes as is: `db.table` or `table`, letters, digits, `_`.
pub(super) fn is_table_name(t: &str) -> bool {
    let parts: Vec<&str> = t.split('.').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with(|c: char| c.is_ascii_digit())
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

impl UploadSection {
    /// Checks the section. Every message shows the URL redacted; the files are checked
    /// when the agent starts (they may not exist on the machine where `check` runs).
    pub fn check(&self) -> Result<(), ConfigError> {
        if let Some(text) = &self.url {
            let shown = redact_url_text(text);
            let bad = |why: String| Err(ConfigError::field("upload.url", why));
            if !(text.starts_with("http://") || text.starts_with("https://")) {
                return bad(format!(
                    r#""{shown}" is not an http(s) URL (expected e.g. "https://collector.example/ingest")"#
                ));
            }
            let url = match reqwest::Url::parse(text) {
                Ok(u) => u,
                Err(e) => return bad(format!(r#""{shown}" is not a valid URL: {e}"#)),
            };
            if url.host().is_none() {
                return bad(format!(r#""{shown}" has no host"#));
            }
            if let Some(c) = url_credential(&url) {
                return bad(format!(r#""{shown}" is refused: {}"#, c.advice()));
            }
            if self.format == UploadFormat::Clickhouse
                && url.query_pairs().any(|(k, _)| k == "query")
            {
                return bad(format!(
                    "\"{shown}\" has a query= parameter; with format = \"clickhouse\" the agent builds the INSERT itself: give the server's address only (e.g. \"https://ch.example:8443/\")"
                ));
            }
        }
        if self.format == UploadFormat::Clickhouse && !is_table_name(&self.table) {
            return Err(ConfigError::field(
                "upload.table",
                format!(
                    "{:?} is not a table name (expected db.table or table: letters, digits, _)",
                    self.table
                ),
            ));
        }
        if self.password_file.is_some() && self.user.is_none() {
            return Err(ConfigError::field(
                "upload.password_file",
                "needs [upload] user: the password is sent as HTTP basic auth for that user",
            ));
        }
        if self.token_file.is_some() && (self.user.is_some() || self.password_file.is_some()) {
            return Err(ConfigError::field(
                "upload.token_file",
                "cannot be combined with [upload] user / password_file: a request carries one \
                 Authorization header, a bearer token or basic auth; keep one",
            ));
        }
        if let Some(user) = &self.user
            && (user.is_empty() || user.contains(':') || user.chars().any(char::is_control))
        {
            return Err(ConfigError::field(
                "upload.user",
                format!(
                    "{user:?} is not a basic auth user name (not empty, no ':', no control characters)"
                ),
            ));
        }
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(_), None) => {
                return Err(ConfigError::field(
                    "upload.client_cert_file",
                    "needs [upload] client_key_file (the certificate's private key)",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::field(
                    "upload.client_key_file",
                    "needs [upload] client_cert_file (the certificate the key belongs to)",
                ));
            }
            _ => {}
        }
        if self.max_body_bytes < 4096 {
            return Err(ConfigError::field(
                "upload.max_body_bytes",
                format!("{} is too small (at least 4096)", self.max_body_bytes),
            ));
        }
        Ok(())
    }

    /// The section as the config digest sees it: the URL with any secret removed (file
    /// paths are kept: they are settings, not secrets).
    pub fn without_secrets(&self) -> UploadSection {
        UploadSection {
            url: self.url.as_deref().map(strip_url),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn err(text: &str) -> String {
        Config::parse(text, "t.toml").expect_err(text).to_string()
    }

    #[test]
    fn credentials_in_the_url_are_refused_without_being_shown() {
        for (url, says) in [
            ("https://u:hunter2@h/", "user:password@"),
            ("https://h/?password=hunter2", "password="),
            ("https://h/?access_token=hunter2", "access_token="),
            ("https://u@h/", "user name"),
        ] {
            let e = err(&format!("[upload]\nurl = \"{url}\"\n"));
            assert!(e.contains("upload.url") && e.contains("t.toml"), "{e}");
            assert!(e.contains(says) && e.contains("password_file"), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        // Not a URL at all: still nothing shown between :// and @.
        let e = err("[upload]\nurl = \"https://u:hunter2@[::1/\"\n");
        assert!(
            e.contains("not a valid URL") && !e.contains("hunter2"),
            "{e}"
        );
        let e = err("[upload]\nurl = \"ftp://u:hunter2@h/\"\n");
        assert!(
            e.contains("not an http(s) URL") && !e.contains("hunter2"),
            "{e}"
        );
    }

    #[test]
    fn authentication_and_tls_keys_go_together() {
        for (text, needle) in [
            ("password_file = \"/p\"\n", "upload.password_file"),
            ("token_file = \"/t\"\nuser = \"u\"\n", "cannot be combined"),
            ("user = \"a:b\"\n", "upload.user"),
            (
                "client_cert_file = \"/c\"\n",
                "needs [upload] client_key_file",
            ),
            (
                "client_key_file = \"/k\"\n",
                "needs [upload] client_cert_file",
            ),
        ] {
            let e = err(&format!("[upload]\nurl = \"https://h/\"\n{text}"));
            assert!(e.contains(needle), "{text}: {e}");
        }
        let c = Config::parse(
            "[upload]\nurl = \"https://h/?database=d\"\nuser = \"default\"\npassword_file = \"/p\"\nca_file = \"/ca.pem\"\nclient_cert_file = \"/c\"\nclient_key_file = \"/k\"\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.upload.user.as_deref(), Some("default"));
        assert_eq!(
            c.upload.ca_file.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
    }
}
