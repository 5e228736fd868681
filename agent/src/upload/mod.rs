//! Acknowledged HTTP upload of spooled bodies.
//!
//! The spool hands over [`Body`]s: whole zstd frames of JSON lines, already compressed,
//! with the range of sequence numbers they hold. [`Uploader::send`] POSTs one body and
//! returns only when the server answered 2xx (a [`SendReceipt`]), or with an
//! [`UploadError`] that says why not. The caller deletes spooled data only after a receipt.
//!
//! # Requests
//! Every attempt is a `POST` to the configured URL exactly as given (a query string such as
//! ClickHouse's `?query=INSERT%20INTO%20t%20FORMAT%20JSONEachRow` is kept byte for byte) with
//! `Content-Type: application/x-ndjson`, `Content-Encoding: zstd`, `Content-Length`,
//! `User-Agent: sockacct/<version>`, `X-Sockacct-Agent`, `X-Sockacct-Boot`,
//! `X-Sockacct-Seq-First`, `X-Sockacct-Seq-Last`, `X-Sockacct-Records`, and
//! `Idempotency-Key: <agent>:<boot>:<first_seq>-<last_seq>`, which is the same on every
//! retry of a body, so a server can drop the duplicate that follows a lost reply.
//! With a bearer token file, `Authorization: Bearer <token>`; with a user (and a password
//! file), HTTP basic auth ([`auth`]). The secret is read from its file at every
//! [`Uploader::send`], so a rotated one is picked up without a restart.
//!
//! # Retry policy
//! - Retried: connection errors (refused, reset, closed before the reply), no response
//!   within [`UploadConfig::timeout`], and HTTP 408, 429 and every 5xx.
//! - Not retried: every other status. Only 2xx is success; 1xx/3xx/4xx end the send with
//!   [`UploadError::Rejected`]. Redirects are not followed (a redirected POST would turn into
//!   a GET and lose the body): point the URL at the final location.
//! - Wait before retry *n* (n = 1, 2, …): `b = min(initial_backoff · 2^(n-1), max_backoff)`,
//!   then a random wait in `[b/2, b]` ("equal jitter"), so agents that failed together do not
//!   retry together. A `Retry-After` header (delay-seconds or HTTP-date, on any retried
//!   status) raises the wait to at least what the server asked for.
//! - Every attempt is given `min(timeout, time left before the deadline)`. When the next wait
//!   would reach the deadline (e.g. `Retry-After: 120` with 30 s left), the send stops at once
//!   with [`UploadError::DeadlineExceeded`] instead of sleeping into a certain failure.
//!
//! # Client
//! rustls with the webpki roots (no OpenSSL on the host), or only the operator's CA
//! (`ca_file`), optionally with a client certificate ([`tls`]); HTTP/1.1, connection reuse.
//! A certificate the client refuses, or a server that refuses ours, ends the send at once
//! with [`UploadError::Tls`] (retrying cannot fix it) and a hint of what to set.
//! Proxies: environment variables (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`) are
//! **ignored**. A root daemon that inherits a stray proxy variable from a shell or a unit
//! drop-in would otherwise send accounting data (and the bearer token) somewhere other than
//! the configured URL; the upload goes exactly where the URL says.
//! A URL that carries a credential (`user:password@`, `?password=`, ...) is refused
//! ([`crate::secrets`]); URLs in errors and logs are shown through
//! [`crate::secrets::redact_url`] all the same, and whatever the server says back has the
//! secrets of the request replaced by `***`.

use std::{
    fmt::Write as _,
    hash::{BuildHasher, Hasher},
    path::PathBuf,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use reqwest::{
    StatusCode, Url,
    header::{
        AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue,
        RETRY_AFTER,
    },
};

use crate::config::{UploadFormat, UploadSection};
use crate::secrets::{redact_url, redact_url_text, scrub, url_credential};

pub mod auth;
pub mod clickhouse;
pub mod flush;
pub mod tls;
pub use auth::Auth;
pub use tls::TlsFiles;
pub use tokio::time::Instant;

/// `User-Agent` of every request.
pub const USER_AGENT: &str = concat!("sockacct/", env!("CARGO_PKG_VERSION"));
/// Default per-request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time budget of a whole flush.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(60);
/// Default largest body the caller should build (4 MiB).
pub const DEFAULT_MAX_BODY_BYTES: u64 = 4 << 20;
/// Default wait before the first retry.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(250);
/// Default longest wait between retries (a server's `Retry-After` may ask for more).
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(10);

/// How many bytes of a response body are kept for receipts and errors.
const SERVER_SAID_MAX: usize = 512;

/// What is uploaded: one body the spool hands out (whole zstd frames of JSON lines, with
/// their seq range and envelope).
pub use crate::spool::Body;

/// Where and how to upload.
#[derive(Debug, Clone)]
pub struct UploadConfig {
    /// Target, `http` or `https`, used exactly as given, query string included.
    pub url: Url,
    /// The Authorization header: a bearer token or basic auth, the secret read from its
    /// file at every send. Never take a secret from the command line: argv is
    /// world-readable in /proc.
    pub auth: Auth,
    /// Private CA and client certificate.
    pub tls: TlsFiles,
    /// Limit of one request, from connecting to the end of the reply (default 10 s).
    pub timeout: Duration,
    /// Budget of a whole flush, retries included (default 60 s); see [`Uploader::flush_deadline`].
    pub deadline: Duration,
    /// Largest body the caller should build (default 4 MiB). Not enforced by [`Uploader::send`].
    pub max_body_bytes: u64,
    /// Wait before the first retry (default 250 ms), doubled for every further one.
    pub initial_backoff: Duration,
    /// Cap of the doubled wait (default 10 s).
    pub max_backoff: Duration,
    /// Insert into this ClickHouse table: the query is built per body, with the body's
    /// idempotency key as `insert_deduplication_token` ([`clickhouse`]).
    pub clickhouse_table: Option<String>,
}

impl UploadConfig {
    /// A config for `url` with every other setting at its default.
    pub fn new(url: Url) -> UploadConfig {
        UploadConfig {
            url,
            auth: Auth::None,
            tls: TlsFiles::default(),
            timeout: DEFAULT_TIMEOUT,
            deadline: DEFAULT_DEADLINE,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            clickhouse_table: None,
        }
    }
}

impl UploadConfig {
    /// The config of an `[upload]` section with a URL (None without one). The section was
    /// validated; the URL is parsed again here, and any error shows it redacted.
    pub fn from_section(s: &UploadSection) -> Result<Option<UploadConfig>, UploadError> {
        let Some(text) = &s.url else {
            return Ok(None);
        };
        let url = Url::parse(text).map_err(|e| {
            UploadError::InvalidConfig(format!(
                "upload URL {} is not a valid URL: {e}",
                redact_url_text(text)
            ))
        })?;
        let mut cfg = UploadConfig::new(url);
        cfg.auth = match (&s.token_file, &s.user) {
            (Some(token_file), _) => Auth::Bearer {
                token_file: token_file.clone(),
            },
            (None, Some(user)) => Auth::Basic {
                user: user.clone(),
                password_file: s.password_file.clone(),
            },
            (None, None) => Auth::None,
        };
        cfg.tls = TlsFiles {
            ca_file: s.ca_file.clone(),
            client_cert_file: s.client_cert_file.clone(),
            client_key_file: s.client_key_file.clone(),
        };
        cfg.timeout = Duration::from_millis(s.timeout_ms);
        cfg.deadline = Duration::from_millis(s.deadline_ms);
        cfg.max_body_bytes = s.max_body_bytes;
        if s.format == UploadFormat::Clickhouse {
            cfg.clickhouse_table = Some(s.table.clone());
        }
        Ok(Some(cfg))
    }
}

/// What the server answered to a successful upload.
#[derive(Debug, Clone)]
pub struct SendReceipt {
    /// The 2xx status.
    pub status: u16,
    /// Requests made, this one included (1 when the first one succeeded).
    pub attempts: u32,
    /// First 512 bytes of the response body, lossy UTF-8.
    pub server_said: String,
    /// From the start of [`Uploader::send`] to the acknowledgement.
    pub elapsed: Duration,
}

/// Why an upload did not happen. URLs are shown with secrets replaced by `***`.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("upload URL {url}: scheme {scheme:?} is not supported; use http:// or https://")]
    BadScheme { url: String, scheme: String },
    #[error("upload config: {0}")]
    InvalidConfig(String),
    #[error("HTTP client for {url}: {detail}")]
    Client { url: String, detail: String },
    #[error("cannot read {what} {path}: {source}")]
    SecretFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} is empty")]
    SecretEmpty { what: &'static str, path: PathBuf },
    #[error("{what} {path} holds characters that cannot go into an HTTP header")]
    SecretInvalid { what: &'static str, path: PathBuf },
    #[error("{key} {path}: {problem}")]
    TlsFile {
        key: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("upload to {url} failed in the TLS handshake, not retried: {detail} ({hint})")]
    Tls {
        url: String,
        attempts: u32,
        detail: String,
        hint: &'static str,
    },
    #[error("cannot send {field} {value:?} as an HTTP header: only visible ASCII is allowed")]
    BadHeader { field: &'static str, value: String },
    #[error(
        "upload to {url} was rejected with HTTP {status}{} after {attempts} attempt(s), not retried; server said: {}",
        status_hint(*status),
        quote_said(server_said)
    )]
    Rejected {
        url: String,
        status: u16,
        attempts: u32,
        server_said: String,
    },
    #[error(
        "upload to {url}: deadline exceeded after {attempts} attempt(s) (last error: {last_error})"
    )]
    DeadlineExceeded {
        url: String,
        attempts: u32,
        last_error: String,
    },
}

impl UploadError {
    /// The HTTP status of a rejection (e.g. 413: the caller should send smaller bodies).
    pub fn status(&self) -> Option<u16> {
        match self {
            UploadError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }
}

fn status_hint(status: u16) -> String {
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .map(|r| format!(" {r}"))
        .unwrap_or_default();
    let hint = if (300..400).contains(&status) {
        " (redirects are not followed; configure the final URL)"
    } else {
        ""
    };
    format!("{reason}{hint}")
}

fn quote_said(said: &str) -> String {
    let said = said.trim();
    if said.is_empty() {
        "(empty body)".to_string()
    } else {
        format!("{said:?}")
    }
}

/// Uploads bodies to one URL.
#[derive(Debug, Clone)]
pub struct Uploader {
    client: reqwest::Client,
    cfg: UploadConfig,
    /// `cfg.url` with secrets replaced, for errors and logs.
    shown_url: String,
}

impl Uploader {
    /// Checks the config and builds the HTTP client (rustls, HTTP/1.1, no environment
    /// proxies, no redirects, `User-Agent: sockacct/<version>`). The token file is not read
    /// here but at every [`send`](Self::send).
    pub fn new(cfg: UploadConfig) -> Result<Uploader, UploadError> {
        let shown_url = redact_url(&cfg.url);
        match cfg.url.scheme() {
            "http" | "https" => {}
            other => {
                return Err(UploadError::BadScheme {
                    url: shown_url,
                    scheme: other.to_string(),
                });
            }
        }
        if let Some(c) = url_credential(&cfg.url) {
            return Err(UploadError::InvalidConfig(format!(
                "upload URL {shown_url} is refused: {}",
                c.advice()
            )));
        }
        if cfg.url.host().is_none() {
            return Err(UploadError::InvalidConfig(format!(
                "upload URL {shown_url} has no host"
            )));
        }
        if cfg.timeout.is_zero() {
            return Err(UploadError::InvalidConfig(
                "the upload timeout must be above zero".into(),
            ));
        }
        if cfg.deadline.is_zero() {
            return Err(UploadError::InvalidConfig(
                "the upload deadline must be above zero".into(),
            ));
        }
        if cfg.initial_backoff.is_zero() || cfg.max_backoff.is_zero() {
            return Err(UploadError::InvalidConfig(
                "upload backoffs must be above zero".into(),
            ));
        }
        if cfg.url.scheme() == "http" && !cfg.tls.is_default() {
            return Err(UploadError::InvalidConfig(format!(
                "upload URL {shown_url} is plain http, but [upload] ca_file or a client \
                 certificate is set: use https:// (or remove them)"
            )));
        }
        for (key, path) in cfg.auth.secret_files() {
            auth::warn_if_readable(key, path);
        }
        if let Some(key) = &cfg.tls.client_key_file {
            auth::warn_if_readable("upload.client_key_file", key);
        }
        let builder = tls::configure(reqwest::Client::builder().use_rustls_tls(), &cfg.tls)?;
        let client = builder
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(USER_AGENT)
            .connect_timeout(cfg.timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| UploadError::Client {
                url: shown_url.clone(),
                detail: describe(e),
            })?;
        Ok(Uploader {
            client,
            cfg,
            shown_url,
        })
    }

    /// The config this uploader was built with.
    pub fn config(&self) -> &UploadConfig {
        &self.cfg
    }

    /// Now + [`UploadConfig::deadline`]: the deadline to pass to every `send` of one flush.
    pub fn flush_deadline(&self) -> Instant {
        Instant::now() + self.cfg.deadline
    }

    /// POSTs one body and waits for a 2xx. Retries connection errors, timeouts, 408, 429 and
    /// 5xx with exponential backoff and jitter, honouring `Retry-After` (seconds or
    /// HTTP-date) as long as it fits before `deadline`; any other status fails at once.
    /// `deadline` may be a `tokio::time::Instant` or a `std::time::Instant`.
    pub async fn send(
        &self,
        body: &Body,
        deadline: impl Into<Instant>,
    ) -> Result<SendReceipt, UploadError> {
        let deadline: Instant = deadline.into();
        let started = Instant::now();
        let (template, secrets) = self.build_request(body)?;
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let mut attempts: u32 = 0;
        let mut last_error = String::from("none: the deadline had passed before the first attempt");
        loop {
            let now = Instant::now();
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Err(self.deadline_exceeded(attempts, last_error));
            }
            attempts += 1;
            let limit = self.cfg.timeout.min(left);
            let request = template
                .try_clone()
                .expect("a request with an in-memory body can always be cloned");
            log::debug!(
                "upload {} to {}: attempt {attempts} ({} bytes, limit {limit:?})",
                body.idempotency_key(),
                self.shown_url,
                body.data.len()
            );
            let mut retry_after = None;
            match self.attempt(request, limit).await {
                Attempt::Answered {
                    status,
                    said,
                    retry_after: ra,
                } => {
                    // A server may echo the request's headers back.
                    let said = scrub(&said, &secrets);
                    if status.is_success() {
                        return Ok(SendReceipt {
                            status: status.as_u16(),
                            attempts,
                            server_said: said,
                            elapsed: started.elapsed(),
                        });
                    }
                    if !is_retryable(status) {
                        return Err(UploadError::Rejected {
                            url: self.shown_url.clone(),
                            status: status.as_u16(),
                            attempts,
                            server_said: said,
                        });
                    }
                    last_error = format!(
                        "HTTP {}{}; server said: {}",
                        status.as_u16(),
                        status_hint(status.as_u16()),
                        quote_said(&said)
                    );
                    retry_after = ra;
                }
                Attempt::Failed(e) => last_error = e,
                Attempt::Refused { detail, hint } => {
                    return Err(UploadError::Tls {
                        url: self.shown_url.clone(),
                        attempts,
                        detail,
                        hint,
                    });
                }
            }

            let mut wait = jittered(backoff(
                attempts,
                self.cfg.initial_backoff,
                self.cfg.max_backoff,
            ));
            if let Some(ra) = retry_after {
                wait = wait.max(ra);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if wait >= left {
                if let Some(ra) = retry_after.filter(|ra| *ra >= left) {
                    let _ = write!(
                        last_error,
                        "; the server asked to retry after {ra:?}, past the deadline"
                    );
                }
                return Err(self.deadline_exceeded(attempts, last_error));
            }
            log::warn!(
                "upload {} to {}: attempt {attempts} failed ({last_error}); retrying in {wait:?}",
                body.idempotency_key(),
                self.shown_url
            );
            tokio::time::sleep(wait).await;
        }
    }

    fn deadline_exceeded(&self, attempts: u32, last_error: String) -> UploadError {
        UploadError::DeadlineExceeded {
            url: self.shown_url.clone(),
            attempts,
            last_error,
        }
    }

    /// The request every attempt clones (method, URL, headers and body), and the secrets
    /// its Authorization header holds.
    fn build_request(&self, body: &Body) -> Result<(reqwest::Request, Vec<String>), UploadError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        );
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("zstd"));
        let text = |field: &'static str, value: &str| {
            HeaderValue::from_str(value).map_err(|_| UploadError::BadHeader {
                field,
                value: value.to_string(),
            })
        };
        let number = |n: u64| HeaderValue::from(n);
        headers.insert(
            HeaderName::from_static("x-sockacct-agent"),
            text("agent id", &body.agent)?,
        );
        headers.insert(
            HeaderName::from_static("x-sockacct-boot"),
            text("boot id", &body.boot)?,
        );
        headers.insert(
            HeaderName::from_static("x-sockacct-seq-first"),
            number(body.first_seq),
        );
        headers.insert(
            HeaderName::from_static("x-sockacct-seq-last"),
            number(body.last_seq),
        );
        headers.insert(
            HeaderName::from_static("x-sockacct-records"),
            number(body.records),
        );
        headers.insert(
            HeaderName::from_static("idempotency-key"),
            text("idempotency key", &body.idempotency_key())?,
        );

        let mut request = self
            .client
            .post(match &self.cfg.clickhouse_table {
                Some(t) => clickhouse::insert_url(&self.cfg.url, t, &body.idempotency_key()),
                None => self.cfg.url.clone(),
            })
            .body(body.data.clone())
            .build()
            .map_err(|e| UploadError::Client {
                url: self.shown_url.clone(),
                detail: describe(e),
            })?;
        let mut secrets = vec![];
        if let Some(c) = self.cfg.auth.credentials()? {
            headers.insert(AUTHORIZATION, c.header);
            secrets = c.secrets;
        }
        for (name, value) in headers {
            if let Some(name) = name {
                request.headers_mut().insert(name, value);
            }
        }
        Ok((request, secrets))
    }

    /// One request, within `limit`: the status, what the server said, and its Retry-After.
    async fn attempt(&self, request: reqwest::Request, limit: Duration) -> Attempt {
        let started = Instant::now();
        let mut response = match tokio::time::timeout(limit, self.client.execute(request)).await {
            Err(_) => return Attempt::Failed(format!("no response within {limit:?}")),
            Ok(Err(e)) => {
                let detail = describe(e);
                return match tls::certificate_hint(&detail) {
                    Some(hint) => Attempt::Refused { detail, hint },
                    None => Attempt::Failed(detail),
                };
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after_delay(v, SystemTime::now()));
        // The status is the answer; a body that fails or stalls only shortens what we report.
        let mut said = Vec::new();
        let rest = limit.saturating_sub(started.elapsed());
        let note = match tokio::time::timeout(rest, read_prefix(&mut response, &mut said)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!(" [reading the reply failed: {}]", describe(e))),
            Err(_) => Some(" [reply body timed out]".to_string()),
        };
        let mut said = String::from_utf8_lossy(&said).into_owned();
        if let Some(note) = note {
            said.push_str(&note);
        }
        Attempt::Answered {
            status,
            said,
            retry_after,
        }
    }
}

enum Attempt {
    /// The server answered with a status.
    Answered {
        status: StatusCode,
        said: String,
        retry_after: Option<Duration>,
    },
    /// No status: connection error or timeout, described.
    Failed(String),
    /// A certificate was refused in the handshake (ours or the server's): not retried.
    Refused { detail: String, hint: &'static str },
}

fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// Reads the first [`SERVER_SAID_MAX`] bytes of the response body into `out`.
async fn read_prefix(response: &mut reqwest::Response, out: &mut Vec<u8>) -> reqwest::Result<()> {
    while out.len() < SERVER_SAID_MAX {
        match response.chunk().await? {
            Some(chunk) => {
                let take = chunk.len().min(SERVER_SAID_MAX - out.len());
                out.extend_from_slice(&chunk[..take]);
            }
            None => break,
        }
    }
    Ok(())
}

/// An error and its causes on one line, without the URL (errors carry the redacted one).
fn describe(e: reqwest::Error) -> String {
    let timed_out = e.is_timeout();
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    if timed_out && !text.contains("timed out") {
        text.push_str(" (timed out)");
    }
    text
}

/// Wait before retry number `attempt` (1-based), before jitter:
/// `min(initial · 2^(attempt-1), max)`.
fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let doublings = attempt.saturating_sub(1).min(31);
    initial.saturating_mul(1u32 << doublings).min(max)
}

/// A random duration in `[base/2, base]`.
fn jittered(base: Duration) -> Duration {
    let half = base / 2;
    let span = (base - half).as_nanos() as u64;
    half + Duration::from_nanos(if span == 0 {
        0
    } else {
        random_u64() % (span + 1)
    })
}

/// Randomness enough for jitter, without a dependency: std's per-process random hash keys
/// mixed with a counter and the clock.
fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

/// Longest `Retry-After` we take literally; anything beyond is past every deadline anyway.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(7 * 24 * 3600);

/// The delay a `Retry-After` value asks for: delay-seconds or an HTTP-date (a date in the
/// past means now). `None` for a value that is neither.
fn retry_after_delay(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        let secs = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(RETRY_AFTER_MAX));
    }
    let at = parse_http_date(value)?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(RETRY_AFTER_MAX),
    )
}

/// Parses an HTTP-date (RFC 9110 §5.6.7) in any of its three forms:
/// IMF-fixdate `Sun, 06 Nov 1994 08:49:37 GMT`, obsolete RFC 850
/// `Sunday, 06-Nov-94 08:49:37 GMT` (two-digit years 00–69 are 20xx, 70–99 are 19xx) and
/// asctime `Sun Nov  6 08:49:37 1994`. The weekday is not checked.
fn parse_http_date(s: &str) -> Option<SystemTime> {
    fn num(s: &str, min_len: usize, max_len: usize) -> Option<u32> {
        let ok = (min_len..=max_len).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
        if ok { s.parse().ok() } else { None }
    }
    fn month(s: &str) -> Option<u32> {
        const MONTHS: [&str; 12] = [
            "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
        ];
        let lower = s.to_ascii_lowercase();
        MONTHS
            .iter()
            .position(|m| *m == lower)
            .map(|i| i as u32 + 1)
    }
    fn year(s: &str) -> Option<i64> {
        let y = i64::from(num(s, 2, 4)?);
        Some(match s.len() {
            2 if y < 70 => 2000 + y,
            2 => 1900 + y,
            4 => y,
            _ => return None,
        })
    }
    fn clock(s: &str) -> Option<u64> {
        let mut parts = s.split(':');
        let h = num(parts.next()?, 2, 2)?;
        let m = num(parts.next()?, 2, 2)?;
        let sec = num(parts.next()?, 2, 2)?;
        if parts.next().is_some() || h > 23 || m > 59 || sec > 60 {
            return None;
        }
        Some(u64::from(h) * 3600 + u64::from(m) * 60 + u64::from(sec))
    }

    let s = s.trim();
    let (day, mon, yr, time) = match s.split_once(',') {
        Some((_weekday, rest)) => {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            match fields.as_slice() {
                [d, m, y, t, "GMT"] if y.len() == 4 => {
                    (num(d, 2, 2)?, month(m)?, year(y)?, clock(t)?)
                }
                [dmy, t, "GMT"] => {
                    let mut p = dmy.split('-');
                    let (d, m, y) = (p.next()?, p.next()?, p.next()?);
                    if p.next().is_some() {
                        return None;
                    }
                    (num(d, 2, 2)?, month(m)?, year(y)?, clock(t)?)
                }
                _ => return None,
            }
        }
        None => {
            let fields: Vec<&str> = s.split_whitespace().collect();
            match fields.as_slice() {
                [_weekday, m, d, t, y] if y.len() == 4 => {
                    (num(d, 1, 2)?, month(m)?, year(y)?, clock(t)?)
                }
                _ => return None,
            }
        }
    };
    let days_in_month = match mon {
        2 if yr % 4 == 0 && (yr % 100 != 0 || yr % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if day == 0 || day > days_in_month {
        return None;
    }
    let days = days_from_civil(yr, mon, day);
    let secs = days.checked_mul(86_400)?.checked_add(time as i64)?;
    if secs < 0 {
        return Some(UNIX_EPOCH);
    }
    UNIX_EPOCH.checked_add(Duration::from_secs(secs as u64))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let (m, d) = (i64::from(m), i64::from(d));
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests;
