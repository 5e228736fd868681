//! Control socket: line-delimited JSON requests from the admin CLI (and from applications
//! naming their own sockets) over a Unix socket, with peer credentials checked.
//!
//! Request: one JSON object per line, at most [`MAX_REQUEST`] bytes, e.g.
//! `{"cmd":"status"}`, `{"cmd":"flush"}`, `{"cmd":"pause"}`, `{"cmd":"resume"}`,
//! `{"cmd":"label","cookie":1234,"label":"checkout"}`.
//! Reply: one JSON object per line, `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
use std::{
    collections::BTreeMap,
    ffi::CString,
    io,
    os::{
        fd::AsFd,
        unix::fs::{FileTypeExt, PermissionsExt},
        unix::net::UnixStream as StdUnixStream,
    },
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use thiserror::Error;

use crate::{
    quota::Quota,
    stream::{Ended, RecordKind, Subscription},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader},
    net::{UnixListener, UnixStream},
};

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;
pub const DEFAULT_SOCKET: &str = "/run/sockacct/control.sock";

#[derive(Debug, Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "another sockacct is already listening on {0} (stop it, or give this one another --control-socket)"
    )]
    InUse(PathBuf),
    #[error("group {0:?} does not exist (--control-group)")]
    NoGroup(String),
    #[error("cannot reach the agent at {path}: {source} (is `sockacct run` running? as root?)")]
    Connect { path: PathBuf, source: io::Error },
    #[error(
        "you may not use the agent's control socket {path} ({source}): run as root, or as a member of the group set with [control] group / --control-group"
    )]
    NotAllowed { path: PathBuf, source: io::Error },
    #[error(
        "{path} exists and is not a socket: refusing to replace it (move it away if it is not needed, or set another [control] socket / --control-socket)"
    )]
    NotASocket { path: PathBuf },
    #[error(
        "the control socket's directory: {0} (or set another [control] socket / --control-socket)"
    )]
    UnsafeDir(#[from] crate::safedir::PathError),
    #[error("bad reply from the agent: {0}")]
    BadReply(String),
    #[error("the agent refused: {0}")]
    Refused(String),
}

mod client;
mod peer;

pub use client::{request, subscribe};
pub use peer::{Peer, owns_socket};

/// A request, as the CLI sends it and the server parses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Status,
    Flush,
    Pause,
    Resume,
    Label {
        cookie: u64,
        label: String,
    },
    /// Stream the records the agent writes, one JSON line each, from now on (all kinds
    /// when `types` is empty).
    Subscribe {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        types: Vec<RecordKind>,
    },
}

impl Request {
    fn needs_root(&self) -> bool {
        matches!(self, Request::Flush | Request::Pause | Request::Resume)
    }
}

/// Parses one request line; the error text is what the peer gets back.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let v: Value = serde_json::from_slice(line)
        .map_err(|e| format!("malformed request (expected one JSON object per line): {e}"))?;
    let cmd = v
        .get("cmd")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            "request has no \"cmd\" string; valid: status, flush, pause, resume, label, subscribe"
                .to_string()
        })?
        .to_string();
    if !["status", "flush", "pause", "resume", "label", "subscribe"].contains(&cmd.as_str()) {
        return Err(format!(
            "unknown command {cmd:?}; valid: status, flush, pause, resume, label, subscribe"
        ));
    }
    if cmd != "label"
        && cmd != "subscribe"
        && let Some(extra) = v.as_object().and_then(|o| o.keys().find(|k| *k != "cmd"))
    {
        return Err(format!(
            "bad {cmd} request: unexpected field {extra:?} ({cmd} takes no arguments)"
        ));
    }
    serde_json::from_value(v).map_err(|e| format!("bad {cmd} request: {e}"))
}

/// Boxed future, so the handler trait needs no proc-macro crate.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// What the daemon does for each request, with typed replies. The server adds `"ok"`
/// (true unless the reply says otherwise, as a failed flush receipt does) and turns an
/// `Err` into `{"ok":false,"error":...}`.
pub trait Handler: Send + Sync + 'static {
    type Status: Serialize;
    type Receipt: Serialize;
    fn status(&self) -> Self::Status;
    fn flush(&self) -> BoxFuture<'_, Self::Receipt>;
    fn pause(&self) -> Paused;
    fn resume(&self) -> Paused;
    /// `peer` asks to label socket `cookie`; the handler checks ownership
    /// ([`owns_socket`]). Runs on a blocking thread: the check may walk the peer's
    /// descriptors.
    fn label(&self, peer: &Peer, cookie: u64, label: &str) -> Result<Labelled, String>;
    /// A place among the record stream's subscribers, for `kinds`, for `uid`.
    fn subscribe(&self, uid: u32, kinds: &[RecordKind]) -> Result<Subscription, String>;
}

/// Reply to `pause` and `resume`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paused {
    pub paused: bool,
    pub was_paused: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Reply to `label`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Labelled {
    pub cookie: u64,
    pub label: String,
}

fn reply_of<T: Serialize>(r: Result<T, String>) -> Value {
    match r.map(|t| serde_json::to_value(t).map_err(|e| e.to_string())) {
        Ok(Ok(mut v)) => {
            if let Some(o) = v.as_object_mut() {
                o.entry("ok").or_insert(Value::Bool(true));
                v
            } else {
                json!({"ok": true, "result": v})
            }
        }
        Ok(Err(e)) | Err(e) => json!({"ok": false, "error": e}),
    }
}

/// Access settings for the socket file and the peers.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    pub path: PathBuf,
    /// A group whose members may connect (mode 0660) and use `status` and `label`.
    pub group: Option<String>,
    pub limits: Limits,
}

/// What one connection, one uid and everyone together may hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections from everyone but root; root has [`ROOT_CONNECTIONS`] more.
    pub max_connections: usize,
    pub max_connections_per_uid: usize,
    /// No complete request within this long closes the connection.
    pub idle_timeout: Duration,
    /// A reply not taken within this long closes the connection.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 64,
            max_connections_per_uid: 8,
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(5),
        }
    }
}

/// Connections only root may open, so no other user can lock the administrator out.
pub const ROOT_CONNECTIONS: usize = 4;

fn group_id(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: a valid C string; the result is read before any other getgr* call.
    let g = unsafe { libc::getgrnam(c.as_ptr()) };
    if g.is_null() {
        None
    } else {
        // SAFETY: non-null, points to libc's static group entry.
        Some(unsafe { (*g).gr_gid })
    }
}

/// Requests refused, by why (for `status` and the metrics).
#[derive(Debug, Default)]
pub struct Refusals {
    pub too_large: AtomicU64,
    pub bad_request: AtomicU64,
    pub permission_denied: AtomicU64,
    /// `label` requests the handler refused (not the caller's socket, over the limit, bad label).
    pub label_refused: AtomicU64,
    /// `subscribe` requests refused (too many subscribers).
    pub subscribe_refused: AtomicU64,
    /// Connections closed at once: every place open to the caller, or its uid's share,
    /// was taken.
    pub too_many_connections: AtomicU64,
    /// Connections closed after sending no complete request for the idle timeout.
    pub idle_timeout: AtomicU64,
    /// Connections closed because the peer did not take a reply.
    pub write_timeout: AtomicU64,
    /// Requests refused because the process that connected had exited.
    pub peer_gone: AtomicU64,
}

impl Refusals {
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BTreeMap::from([
            ("too_large", g(&self.too_large)),
            ("bad_request", g(&self.bad_request)),
            ("permission_denied", g(&self.permission_denied)),
            ("label_refused", g(&self.label_refused)),
            ("subscribe_refused", g(&self.subscribe_refused)),
            ("too_many_connections", g(&self.too_many_connections)),
            ("idle_timeout", g(&self.idle_timeout)),
            ("write_timeout", g(&self.write_timeout)),
            ("peer_gone", g(&self.peer_gone)),
        ])
    }
}

/// The listening control socket.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    group: Option<u32>,
    limits: Limits,
    places: Arc<Quota>,
    refusals: Arc<Refusals>,
}

impl ControlServer {
    /// Binds the socket: parent directory created (0755) or checked (root's, not
    /// writable by others), a stale socket file replaced (but not one a live agent
    /// listens on, and never a file that is not a socket), mode 0600 root-only, or 0660
    /// with the configured group.
    pub fn bind(cfg: &ControlConfig) -> Result<ControlServer, ControlError> {
        let path = cfg.path.clone();
        let io = |source| ControlError::Io {
            path: path.clone(),
            source,
        };
        let group = match &cfg.group {
            Some(g) => Some(group_id(g).ok_or_else(|| ControlError::NoGroup(g.clone()))?),
            None => None,
        };
        // A directory another user could swap the socket out of is refused (the same
        // check as the state and spool directories).
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::safedir::SafeDir::create(dir, 0o755)?.check_trusted()?;
        }
        match std::fs::symlink_metadata(&path) {
            Ok(md) if !md.file_type().is_socket() => {
                return Err(ControlError::NotASocket { path });
            }
            Ok(_) => {
                if StdUnixStream::connect(&path).is_ok() {
                    return Err(ControlError::InUse(path));
                }
                std::fs::remove_file(&path).map_err(io)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        // Bind with a restrictive umask so there is no window with a wider mode.
        // SAFETY: umask only swaps the process's mask.
        let old = unsafe { libc::umask(0o177) };
        let listener = UnixListener::bind(&path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = listener.map_err(io)?;
        if let Some(gid) = group {
            let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
                io(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "NUL in the path",
                ))
            })?;
            // SAFETY: a valid C string; lchown does not follow a link planted there.
            if unsafe { libc::lchown(c.as_ptr(), 0, gid) } != 0 {
                let e = io::Error::last_os_error();
                return Err(io(io::Error::new(
                    e.kind(),
                    format!(
                        "giving it to group {gid}: {e} (the agent needs CAP_CHOWN for [control] group)"
                    ),
                )));
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
        }
        let l = &cfg.limits;
        Ok(ControlServer {
            listener,
            path,
            group,
            places: Quota::new(
                l.max_connections,
                l.max_connections_per_uid,
                ROOT_CONNECTIONS,
            ),
            limits: cfg.limits.clone(),
            refusals: Arc::default(),
        })
    }

    pub fn refusals(&self) -> Arc<Refusals> {
        self.refusals.clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn allowed(&self, peer: &Peer, req: &Request) -> Result<(), String> {
        if peer.is_root() {
            return Ok(());
        }
        let in_group = self
            .group
            .is_some_and(|g| peer.gid == g || peer.groups.contains(&g));
        if !in_group {
            return Err(format!(
                "permission denied: uid {} is not root and not in the control group",
                peer.uid
            ));
        }
        if req.needs_root() {
            return Err("permission denied: flush, pause and resume need root".into());
        }
        Ok(())
    }

    /// Serves until the task is dropped. Each connection may send several requests.
    pub async fn serve<H: Handler>(self, handler: Arc<H>) {
        let me = Arc::new(self);
        loop {
            let (stream, _) = match me.listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors, most likely: back off instead of spinning.
                    log::warn!("control socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let peer = match peer::pin(stream.as_fd()) {
                Ok(p) => p,
                // Served, so each request hears why it is refused.
                Err(peer::PinError::Gone(p)) => p,
                Err(e) => {
                    log::debug!("control connection: {e}");
                    continue;
                }
            };
            let place = match me.places.acquire(peer.uid) {
                Ok(p) => p,
                Err(why) => {
                    me.refusals
                        .too_many_connections
                        .fetch_add(1, Ordering::Relaxed);
                    // Tell it without waiting for it: a full socket buffer drops the line.
                    let e = json!({"ok": false, "error": format!("too many control connections ({why}); close some and try again")});
                    let _ = stream.try_write(format!("{e}\n").as_bytes());
                    continue;
                }
            };
            let (me, handler) = (me.clone(), handler.clone());
            tokio::spawn(async move {
                if let Err(e) = me.session(stream, peer, handler).await {
                    log::debug!("control session: {e}");
                }
                drop(place);
            });
        }
    }

    /// Writes one reply line, giving up (and closing) when the peer does not take it.
    async fn send(&self, w: &mut tokio::net::unix::OwnedWriteHalf, v: Value) -> io::Result<()> {
        let bytes = format!("{v}\n").into_bytes();
        match tokio::time::timeout(self.limits.write_timeout, w.write_all(&bytes)).await {
            Ok(r) => r,
            Err(_) => {
                self.refusals.write_timeout.fetch_add(1, Ordering::Relaxed);
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer did not take its reply",
                ))
            }
        }
    }

    async fn session<H: Handler>(
        &self,
        stream: UnixStream,
        peer: Peer,
        handler: Arc<H>,
    ) -> io::Result<()> {
        let (r, mut w) = stream.into_split();
        let mut r = TokioBufReader::new(r);
        let mut line = Vec::new();
        loop {
            line.clear();
            // Read at most MAX_REQUEST + 1 bytes of this line, within the idle timeout
            // (a line trickled in byte by byte gets no more time than a silent one).
            let mut limited = (&mut r).take(MAX_REQUEST as u64 + 1);
            let read = limited.read_until(b'\n', &mut line);
            let n = match tokio::time::timeout(self.limits.idle_timeout, read).await {
                Ok(n) => n?,
                Err(_) => {
                    self.refusals.idle_timeout.fetch_add(1, Ordering::Relaxed);
                    let e = json!({"ok": false, "error": format!("no complete request for {} s; connection closed", self.limits.idle_timeout.as_secs())});
                    let _ = self.send(&mut w, e).await;
                    return Ok(());
                }
            };
            if n == 0 {
                return Ok(());
            }
            if line.len() > MAX_REQUEST {
                self.refusals.too_large.fetch_add(1, Ordering::Relaxed);
                let e = json!({"ok": false, "error": format!("request too large (limit {MAX_REQUEST} bytes); connection closed")});
                return self.send(&mut w, e).await;
            }
            let refused = |count: &AtomicU64, e: String| {
                count.fetch_add(1, Ordering::Relaxed);
                json!({"ok": false, "error": e})
            };
            let reply = match parse_request(line.trim_ascii()) {
                Err(e) => refused(&self.refusals.bad_request, e),
                Ok(_) if !peer.alive() => refused(&self.refusals.peer_gone, peer::gone(&peer)),
                Ok(req) => match self.allowed(&peer, &req) {
                    Err(e) => refused(&self.refusals.permission_denied, e),
                    Ok(()) => match &req {
                        Request::Status => reply_of(Ok(handler.status())),
                        Request::Flush => reply_of(Ok(handler.flush().await)),
                        Request::Pause => reply_of(Ok(handler.pause())),
                        Request::Resume => reply_of(Ok(handler.resume())),
                        Request::Label { cookie, label } => {
                            // The ownership check walks the peer's descriptors: not on
                            // a runtime worker, which other connections share.
                            let (h, p, c, l) =
                                (handler.clone(), peer.clone(), *cookie, label.clone());
                            let r = tokio::task::spawn_blocking(move || h.label(&p, c, &l))
                                .await
                                .unwrap_or_else(|e| Err(format!("label failed: {e}")));
                            if r.is_err() {
                                self.refusals.label_refused.fetch_add(1, Ordering::Relaxed);
                            }
                            reply_of(r)
                        }
                        Request::Subscribe { types } => {
                            let kinds = if types.is_empty() {
                                RecordKind::ALL.to_vec()
                            } else {
                                types.clone()
                            };
                            match handler.subscribe(peer.uid, &kinds) {
                                Err(e) => refused(&self.refusals.subscribe_refused, e),
                                Ok(sub) => {
                                    let ok = json!({"ok": true, "subscribed": kinds});
                                    self.send(&mut w, ok).await?;
                                    // The connection is the stream's from here on.
                                    return stream_records(r, w, sub, &kinds).await;
                                }
                            }
                        }
                    },
                },
            };
            self.send(&mut w, reply).await?;
        }
    }
}

/// A subscriber whose socket takes no bytes for this long is cut off.
const SUBSCRIBER_STALL: Duration = Duration::from_secs(2);

/// Writes the subscribed records until the peer leaves, falls behind or stops reading;
/// the last two end with one `{"ok":false,"error":...}` line saying so, written if the
/// reader takes it within 10 s (the line before it may be cut short).
async fn stream_records(
    mut r: TokioBufReader<tokio::net::unix::OwnedReadHalf>,
    mut w: tokio::net::unix::OwnedWriteHalf,
    mut sub: Subscription,
    kinds: &[RecordKind],
) -> io::Result<()> {
    let mut scratch = [0u8; 256];
    let why = loop {
        tokio::select! {
            got = sub.next() => match got {
                Ok(b) if kinds.contains(&b.kind) => {
                    match tokio::time::timeout(SUBSCRIBER_STALL, w.write_all(&b.lines)).await {
                        Ok(r) => r?,
                        Err(_) => break format!(
                            "cut off: the subscriber read nothing for {} s (read faster, or filter with types)",
                            SUBSCRIBER_STALL.as_secs()
                        ),
                    }
                }
                Ok(_) => {}
                Err(Ended::Lagged(n)) => break format!(
                    "cut off: the subscriber fell {n} batches behind (read faster, or filter with types)"
                ),
                Err(Ended::Closed) => return Ok(()),
            },
            // Anything the peer sends after subscribing is ignored; EOF means it left.
            n = r.read(&mut scratch) => if n? == 0 {
                return Ok(());
            },
        }
    };
    sub.cut_off();
    // Free the place (and the ring) now; the reason waits for the reader a while longer.
    drop(sub);
    log::info!("record stream: {why}");
    let e = json!({"ok": false, "error": why});
    // A write cut short by the stall may have left half a line: the reason starts a new one.
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        w.write_all(format!("\n{e}\n").as_bytes()),
    )
    .await;
    Ok(())
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_the_commands_and_explains_the_rest() {
        assert_eq!(parse_request(br#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(
            parse_request(br#"{"cmd":"label","cookie":5,"label":"x"}"#),
            Ok(Request::Label {
                cookie: 5,
                label: "x".into()
            })
        );
        let e = parse_request(b"not json").unwrap_err();
        assert!(e.starts_with("malformed request"), "{e}");
        let e = parse_request(br#"{"cmd":"reboot"}"#).unwrap_err();
        assert!(e.contains("unknown command \"reboot\""), "{e}");
        let e = parse_request(br#"{"op":"status"}"#).unwrap_err();
        assert!(e.contains("no \"cmd\""), "{e}");
        let e = parse_request(br#"{"cmd":"label","cookie":"x","label":"y"}"#).unwrap_err();
        assert!(e.starts_with("bad label request"), "{e}");
        let e = parse_request(br#"{"cmd":"status","extra":1}"#).unwrap_err();
        assert!(e.contains("extra"), "{e}");
    }
}
