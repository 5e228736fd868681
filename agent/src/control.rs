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
    io::{self, BufRead, BufReader, Write},
    os::{fd::AsRawFd, unix::fs::PermissionsExt, unix::net::UnixStream as StdUnixStream},
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

use crate::stream::{Ended, RecordKind, Subscription};
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
    #[error("bad reply from the agent: {0}")]
    BadReply(String),
    #[error("the agent refused: {0}")]
    Refused(String),
}

/// Who is on the other end, from SO_PEERCRED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl Peer {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

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
    /// ([`peer_owns_socket`]).
    fn label(&self, peer: Peer, cookie: u64, label: &str) -> Result<Labelled, String>;
    /// A place among the record stream's subscribers, for `kinds`.
    fn subscribe(&self, kinds: &[RecordKind]) -> Result<Subscription, String>;
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

/// Whether `peer` may name socket `cookie`: root may; anyone else must own it, by the
/// kernel's owner record (the process that created or accepted it) or by holding it now.
pub fn peer_owns_socket(owners: std::os::fd::BorrowedFd<'_>, peer: &Peer, cookie: u64) -> bool {
    if peer.is_root() {
        return true;
    }
    let owner = crate::bpfsys::lookup::<u64, agent_common::Owner>(owners, &cookie)
        .ok()
        .flatten();
    owner.is_some_and(|o| o.origin != 0 && o.tgid as i32 == peer.pid)
        || process_holds_socket(peer.pid, cookie)
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
}

fn group_id(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    let g = unsafe { libc::getgrnam(c.as_ptr()) };
    if g.is_null() {
        None
    } else {
        Some(unsafe { (*g).gr_gid })
    }
}

/// Supplementary groups of a process, from /proc/<pid>/status.
fn groups_of(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn peer_of(s: &UnixStream) -> io::Result<Peer> {
    let c = s.peer_cred()?;
    Ok(Peer {
        pid: c.pid().unwrap_or(0),
        uid: c.uid(),
        gid: c.gid(),
    })
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
        ])
    }
}

/// The listening control socket.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    group: Option<u32>,
    refusals: Arc<Refusals>,
}

impl ControlServer {
    /// Binds the socket: parent directory created (0755), a stale socket file replaced
    /// (but not one a live agent listens on), mode 0600 root-only, or 0660 with the
    /// configured group.
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
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        if path.exists() {
            if StdUnixStream::connect(&path).is_ok() {
                return Err(ControlError::InUse(path));
            }
            std::fs::remove_file(&path).map_err(io)?;
        }
        // Bind with a restrictive umask so there is no window with a wider mode.
        let old = unsafe { libc::umask(0o177) };
        let listener = UnixListener::bind(&path);
        unsafe { libc::umask(old) };
        let listener = listener.map_err(io)?;
        if let Some(gid) = group {
            let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
            if unsafe { libc::chown(c.as_ptr(), 0, gid) } != 0 {
                return Err(io(io::Error::last_os_error()));
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).map_err(io)?;
        }
        Ok(ControlServer {
            listener,
            path,
            group,
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
            .is_some_and(|g| peer.gid == g || groups_of(peer.pid).contains(&g));
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
                    log::warn!("control socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (me, handler) = (me.clone(), handler.clone());
            tokio::spawn(async move {
                if let Err(e) = me.session(stream, handler).await {
                    log::debug!("control session: {e}");
                }
            });
        }
    }

    async fn session<H: Handler>(&self, stream: UnixStream, handler: Arc<H>) -> io::Result<()> {
        let peer = peer_of(&stream)?;
        let (r, mut w) = stream.into_split();
        let mut r = TokioBufReader::new(r);
        let mut line = Vec::new();
        loop {
            line.clear();
            // Read at most MAX_REQUEST + 1 bytes of this line.
            let n = (&mut r)
                .take(MAX_REQUEST as u64 + 1)
                .read_until(b'\n', &mut line)
                .await?;
            if n == 0 {
                return Ok(());
            }
            if line.len() > MAX_REQUEST {
                self.refusals.too_large.fetch_add(1, Ordering::Relaxed);
                let e = json!({"ok": false, "error": format!("request too large (limit {MAX_REQUEST} bytes); connection closed")});
                w.write_all(format!("{e}\n").as_bytes()).await?;
                return Ok(());
            }
            let refused = |count: &AtomicU64, e: String| {
                count.fetch_add(1, Ordering::Relaxed);
                json!({"ok": false, "error": e})
            };
            let reply = match parse_request(line.trim_ascii()) {
                Err(e) => refused(&self.refusals.bad_request, e),
                Ok(req) => match self.allowed(&peer, &req) {
                    Err(e) => refused(&self.refusals.permission_denied, e),
                    Ok(()) => match &req {
                        Request::Status => reply_of(Ok(handler.status())),
                        Request::Flush => reply_of(Ok(handler.flush().await)),
                        Request::Pause => reply_of(Ok(handler.pause())),
                        Request::Resume => reply_of(Ok(handler.resume())),
                        Request::Label { cookie, label } => {
                            let r = handler.label(peer, *cookie, label);
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
                            match handler.subscribe(&kinds) {
                                Err(e) => refused(&self.refusals.subscribe_refused, e),
                                Ok(sub) => {
                                    let ok = json!({"ok": true, "subscribed": kinds});
                                    w.write_all(format!("{ok}\n").as_bytes()).await?;
                                    // The connection is the stream's from here on.
                                    return stream_records(r, w, sub, &kinds).await;
                                }
                            }
                        }
                    },
                },
            };
            w.write_all(format!("{reply}\n").as_bytes()).await?;
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

/// Whether process `pid` holds a socket whose cookie is `cookie`: each of its socket
/// descriptors is duplicated with pidfd_getfd (needs ptrace rights over it, which the
/// root daemon has) and asked for SO_COOKIE.
pub fn process_holds_socket(pid: i32, cookie: u64) -> bool {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if pidfd < 0 {
        return false;
    }
    let mut found = false;
    for e in dir.flatten() {
        let is_socket = std::fs::read_link(e.path())
            .map(|t| t.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false);
        let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if !is_socket {
            continue;
        }
        let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) } as i32;
        if dup < 0 {
            continue;
        }
        let mut v: u64 = 0;
        let mut len = 8 as libc::socklen_t;
        let r = unsafe {
            libc::getsockopt(
                dup,
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut v).cast(),
                &mut len,
            )
        };
        unsafe { libc::close(dup) };
        if r == 0 && v == cookie {
            found = true;
            break;
        }
    }
    unsafe { libc::close(pidfd) };
    found
}

/// Connects to the control socket, saying what to do when that is not allowed.
fn connect(path: &Path) -> Result<StdUnixStream, ControlError> {
    StdUnixStream::connect(path).map_err(|source| {
        if source.kind() == io::ErrorKind::PermissionDenied {
            ControlError::NotAllowed {
                path: path.to_owned(),
                source,
            }
        } else {
            ControlError::Connect {
                path: path.to_owned(),
                source,
            }
        }
    })
}

/// Sends one request and returns the reply object (blocking; used by the CLI).
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Value, ControlError> {
    let req = serde_json::to_string(req).expect("requests serialize");
    let s = connect(path)?;
    s.set_read_timeout(Some(timeout)).ok();
    let mut w = &s;
    w.write_all(format!("{req}\n").as_bytes())
        .map_err(|source| ControlError::Io {
            path: path.to_owned(),
            source,
        })?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|source| ControlError::Io {
            path: path.to_owned(),
            source,
        })?;
    let _ = s.as_raw_fd();
    serde_json::from_str(&line).map_err(|e| ControlError::BadReply(format!("{e}: {line:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_socket_this_process_holds() {
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut v: u64 = 0;
        let mut len = 8 as libc::socklen_t;
        unsafe {
            libc::getsockopt(
                l.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut v).cast(),
                &mut len,
            )
        };
        assert!(process_holds_socket(std::process::id() as i32, v));
        assert!(!process_holds_socket(
            std::process::id() as i32,
            v + 1_000_000
        ));
    }

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

/// Subscribes to the record stream (blocking; used by `events` and `top`): returns the
/// connection, positioned after the agent's acknowledgement, to read JSON lines from.
pub fn subscribe(
    path: &Path,
    types: &[RecordKind],
) -> Result<BufReader<StdUnixStream>, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let req = serde_json::to_string(&Request::Subscribe {
        types: types.to_vec(),
    })
    .expect("requests serialize");
    let s = connect(path)?;
    (&s).write_all(format!("{req}\n").as_bytes()).map_err(io)?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(io)?;
    let v: Value = serde_json::from_str(&line)
        .map_err(|e| ControlError::BadReply(format!("{e}: {line:?}")))?;
    if v["ok"] != true {
        return Err(ControlError::Refused(
            v["error"].as_str().unwrap_or("refused").to_string(),
        ));
    }
    Ok(r)
}
