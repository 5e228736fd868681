//! The endpoint's connections: who holds how many, which one gives way when all are
//! taken, the write timeout, and the counters of every refusal.
//!
//! Limits, and what happens when each is reached:
//! - a peer (a local uid, else an address) with `max_connections_per_peer` open: the new
//!   connection is closed at once (`per_peer_limit`). One local user cannot take every slot.
//!   (Loopback peers that cannot be told apart, [`PeerKey::UnknownLocal`], have no cap of
//!   their own.)
//! - `max_connections` open in all: the connection idle longest (no request, no reply
//!   bytes written for at least [`EVICT_AFTER_IDLE`]) is closed to make room (`evicted`);
//!   if none has been idle that long, the new one is closed (`connection_limit`). Eviction
//!   rather than a reserved slot: a reserved slot can be taken like any other, while a
//!   stalled connection is by definition idle, so stalls never keep out a new scraper for
//!   more than a second; a scraper mid-reply is never evicted.
//! - no complete request head within `read_timeout` (hyper's header timer, which also runs
//!   between kept-alive requests): `request_timeout`; a reply write without progress for
//!   `write_timeout` (a client that does not read): `write_timeout`.
use std::{
    collections::BTreeMap,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::peer::PeerKey;
use crate::config::MetricsSection;

/// A connection this long without a request or reply progress may give way to a new one.
pub const EVICT_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Why a connection was refused or closed before its client was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    ConnectionLimit,
    PerPeerLimit,
    Evicted,
    RequestTimeout,
    WriteTimeout,
    HeaderTooLarge,
    Unauthorized,
    TlsHandshake,
}

impl Refusal {
    pub const ALL: [Refusal; 8] = [
        Refusal::ConnectionLimit,
        Refusal::PerPeerLimit,
        Refusal::Evicted,
        Refusal::RequestTimeout,
        Refusal::WriteTimeout,
        Refusal::HeaderTooLarge,
        Refusal::Unauthorized,
        Refusal::TlsHandshake,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Refusal::ConnectionLimit => "connection_limit",
            Refusal::PerPeerLimit => "per_peer_limit",
            Refusal::Evicted => "evicted",
            Refusal::RequestTimeout => "request_timeout",
            Refusal::WriteTimeout => "write_timeout",
            Refusal::HeaderTooLarge => "header_too_large",
            Refusal::Unauthorized => "unauthorized",
            Refusal::TlsHandshake => "tls_handshake",
        }
    }
}

/// Counters of the endpoint itself.
#[derive(Debug, Default)]
pub struct ServeStats {
    pub scrapes: AtomicU64,
    pub accepted: AtomicU64,
    pub open: AtomicU64,
    /// Kept-alive connections closed at their maximum age (routine, not a refusal).
    pub closed_at_max_age: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
}

impl ServeStats {
    pub fn count(&self, r: Refusal) {
        self.refused[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Every reason, zeros included (a series that exists before its first increase).
    pub fn refused(&self) -> BTreeMap<&'static str, u64> {
        Refusal::ALL
            .iter()
            .map(|r| (r.name(), self.refused[*r as usize].load(Ordering::Relaxed)))
            .collect()
    }
}

/// `[metrics]` limits as the server uses them.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_per_peer: usize,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub max_age: Duration,
    pub max_header_bytes: usize,
}

impl Limits {
    pub fn from_config(c: &MetricsSection) -> Limits {
        Limits {
            max_connections: c.max_connections,
            max_per_peer: c.max_connections_per_peer,
            read_timeout: Duration::from_secs(c.read_timeout_secs),
            write_timeout: Duration::from_secs(c.write_timeout_secs),
            max_age: Duration::from_secs(c.max_connection_age_secs),
            max_header_bytes: c.max_request_header_bytes,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::from_config(&MetricsSection::default())
    }
}

/// One open connection, shared by the registry and the connection's task.
#[derive(Debug)]
pub struct Conn {
    id: u64,
    peer: PeerKey,
    epoch: Instant,
    /// Milliseconds after `epoch` of the accept, the last request, or the last reply bytes
    /// written.
    last_activity: AtomicU64,
    /// Set by the registry to make room; the task closes the connection.
    pub evict: tokio::sync::Notify,
    /// The reply writer gave up (the client did not read).
    pub write_timed_out: AtomicBool,
}

impl Conn {
    pub fn touch(&self) {
        self.touch_at(Instant::now());
    }

    fn touch_at(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.last_activity.fetch_max(ms, Ordering::Relaxed);
    }

    fn idle_for(&self, now: Instant) -> Duration {
        let at = self.epoch + Duration::from_millis(self.last_activity.load(Ordering::Relaxed));
        now.saturating_duration_since(at)
    }
}

/// Open connections by peer; decides admissions.
#[derive(Debug)]
pub struct Registry {
    limits: Limits,
    stats: Arc<ServeStats>,
    epoch: Instant,
    inner: Mutex<(u64, Vec<Arc<Conn>>)>,
}

impl Registry {
    pub fn new(limits: Limits, stats: Arc<ServeStats>) -> Registry {
        Registry {
            limits,
            stats,
            epoch: Instant::now(),
            inner: Mutex::new((0, Vec::new())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Vec<Arc<Conn>>)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection of `peer` (evicting an idle one if all slots are taken), or
    /// says why not. Counts the refusal or eviction.
    pub fn admit(self: &Arc<Self>, peer: PeerKey, now: Instant) -> Result<Slot, Refusal> {
        let mut g = self.lock();
        let (next, conns) = &mut *g;
        let refuse = |r| {
            self.stats.count(r);
            Err(r)
        };
        if peer != PeerKey::UnknownLocal
            && conns.iter().filter(|c| c.peer == peer).count() >= self.limits.max_per_peer
        {
            return refuse(Refusal::PerPeerLimit);
        }
        if conns.len() >= self.limits.max_connections {
            let victim = conns
                .iter()
                .enumerate()
                .map(|(i, c)| (i, c.idle_for(now)))
                .filter(|(_, idle)| *idle >= EVICT_AFTER_IDLE)
                .max_by_key(|(_, idle)| *idle)
                .map(|(i, _)| i);
            let Some(i) = victim else {
                return refuse(Refusal::ConnectionLimit);
            };
            let v = conns.swap_remove(i);
            v.evict.notify_one();
            self.stats.count(Refusal::Evicted);
        }
        *next += 1;
        let conn = Arc::new(Conn {
            id: *next,
            peer,
            epoch: self.epoch,
            last_activity: AtomicU64::new(0),
            evict: tokio::sync::Notify::new(),
            write_timed_out: AtomicBool::new(false),
        });
        conn.touch_at(now);
        conns.push(conn.clone());
        self.stats.open.store(conns.len() as u64, Ordering::Relaxed);
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            registry: self.clone(),
            conn,
        })
    }

    fn remove(&self, id: u64) {
        let mut g = self.lock();
        g.1.retain(|c| c.id != id);
        self.stats.open.store(g.1.len() as u64, Ordering::Relaxed);
    }
}

/// A place in the registry, freed on drop (an evicted connection has already lost it).
#[derive(Debug)]
pub struct Slot {
    registry: Arc<Registry>,
    pub conn: Arc<Conn>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.registry.remove(self.conn.id);
    }
}

/// The connection's byte stream with a write timeout: a write (or flush) that makes no
/// progress for `timeout` fails with `TimedOut`, which ends the connection. Writes that
/// move also mark the connection active (it is not idle while a reply drains).
pub struct TimedIo<T> {
    inner: T,
    conn: Arc<Conn>,
    timeout: Duration,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> TimedIo<T> {
    pub fn new(inner: T, conn: Arc<Conn>, timeout: Duration) -> TimedIo<T> {
        TimedIo {
            inner,
            conn,
            timeout,
            stall: None,
        }
    }

    /// After the inner writer said Pending: Pending, or the timeout's error.
    fn stalled<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let timeout = self.timeout;
        let sleep = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(sleep.as_mut().poll(cx));
        self.conn.write_timed_out.store(true, Ordering::Relaxed);
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "metrics reply not read in time",
        )))
    }

    fn moved<R>(&mut self, r: Poll<io::Result<R>>, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        match r {
            Poll::Pending => self.stalled(cx),
            ready => {
                self.stall = None;
                self.conn.touch();
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.moved(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.moved(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.moved(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.moved(r, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(max: usize, per_peer: usize) -> (Arc<Registry>, Arc<ServeStats>) {
        let stats = Arc::new(ServeStats::default());
        let limits = Limits {
            max_connections: max,
            max_per_peer: per_peer,
            ..Limits::default()
        };
        (Arc::new(Registry::new(limits, stats.clone())), stats)
    }

    #[test]
    fn per_peer_cap_refuses_only_that_peer() {
        let (r, stats) = registry(8, 2);
        let now = Instant::now();
        let (a, b) = (PeerKey::Uid(65534), PeerKey::Uid(0));
        let _s: Vec<Slot> = (0..2).map(|_| r.admit(a, now).unwrap()).collect();
        assert_eq!(r.admit(a, now).unwrap_err(), Refusal::PerPeerLimit);
        // Later, too: a peer's own stalls never make room for more of its own.
        let later = now + Duration::from_secs(60);
        assert_eq!(r.admit(a, later).unwrap_err(), Refusal::PerPeerLimit);
        let _other = r.admit(b, now).unwrap();
        assert_eq!(stats.refused()["per_peer_limit"], 2);
        assert_eq!(stats.open.load(Ordering::Relaxed), 3);
        assert_eq!(stats.accepted.load(Ordering::Relaxed), 3);
        // Local peers that cannot be told apart: only the total applies.
        let unknown: Vec<Slot> = (0..5)
            .map(|_| r.admit(PeerKey::UnknownLocal, now).unwrap())
            .collect();
        assert_eq!(
            r.admit(PeerKey::UnknownLocal, now).unwrap_err(),
            Refusal::ConnectionLimit
        );
        assert_eq!(unknown.len(), 5);
    }

    #[test]
    fn when_full_the_longest_idle_gives_way_after_a_second() {
        let (r, stats) = registry(3, 3);
        let t0 = Instant::now();
        let idle: Vec<Slot> = (0..3)
            .map(|i| {
                r.admit(
                    PeerKey::V4([10, 0, 0, i]),
                    t0 + Duration::from_millis(u64::from(i)),
                )
                .unwrap()
            })
            .collect();
        let scraper = PeerKey::Uid(0);
        // All taken less than a second ago: the newcomer is refused.
        let soon = t0 + Duration::from_millis(500);
        assert_eq!(
            r.admit(scraper, soon).unwrap_err(),
            Refusal::ConnectionLimit
        );
        // A second later the oldest gives way, and its task is told to close.
        let later = t0 + Duration::from_millis(1500);
        idle[1].conn.touch_at(t0 + Duration::from_millis(1000));
        let s = r.admit(scraper, later).unwrap();
        assert!(told_to_close(&idle[0]), "the oldest was told to close");
        assert_eq!(stats.refused()["evicted"], 1);
        assert_eq!(stats.refused()["connection_limit"], 1);
        // idle[1] was active at 1000 ms: not idle long enough at 1500; idle[2] is.
        let s2 = r.admit(PeerKey::Uid(1), later).unwrap();
        assert!(told_to_close(&idle[2]));
        assert!(!told_to_close(&idle[1]));
        assert_eq!(
            r.admit(PeerKey::Uid(2), later).unwrap_err(),
            Refusal::ConnectionLimit
        );
        assert_eq!(stats.open.load(Ordering::Relaxed), 3);
        // Dropping an evicted slot does not free a second place; dropping a live one does.
        drop(idle);
        assert_eq!(stats.open.load(Ordering::Relaxed), 2);
        drop((s, s2));
        assert_eq!(stats.open.load(Ordering::Relaxed), 0);
    }

    /// Whether the slot's task has been told to close (the notification is kept until
    /// the task waits for it).
    fn told_to_close(s: &Slot) -> bool {
        let f = std::pin::pin!(s.conn.evict.notified());
        f.poll(&mut Context::from_waker(std::task::Waker::noop()))
            .is_ready()
    }

    #[test]
    fn every_reason_is_listed_once() {
        let s = ServeStats::default();
        s.count(Refusal::TlsHandshake);
        let m = s.refused();
        assert_eq!(m.len(), Refusal::ALL.len());
        assert_eq!(m["tls_handshake"], 1);
        assert_eq!(m.values().sum::<u64>(), 1);
    }

    #[tokio::test]
    async fn a_write_nobody_reads_times_out() {
        let (r, _) = registry(4, 4);
        let slot = r.admit(PeerKey::Uid(0), Instant::now()).unwrap();
        // A pipe whose reader never reads: writes fill it, then stall.
        let (client, server) = tokio::io::duplex(1024);
        let timeout = Duration::from_millis(200);
        let mut io = TimedIo::new(server, slot.conn.clone(), timeout);
        let started = Instant::now();
        let e = tokio::io::AsyncWriteExt::write_all(&mut io, &[0u8; 4096])
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= timeout && started.elapsed() < 10 * timeout);
        assert!(slot.conn.write_timed_out.load(Ordering::Relaxed));
        drop(client);
    }
}
