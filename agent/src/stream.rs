//! The live record stream: every record the agent writes (delta, flow, gap), as the JSON
//! lines it wrote, fanned out to control-socket subscribers (`sockacct events`, `top`).
//!
//! Publishing never waits: lines go into a bounded broadcast ring, and costs nothing
//! while nobody listens. A subscriber that falls a whole ring behind, or whose socket
//! takes no bytes for a while, is cut off with the reason, and counted.
use std::sync::{
    Arc,
    atomic::{AtomicU64, AtomicUsize, Ordering},
};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::quota::{Place, Quota};

/// Batches the ring holds (one to three per tick: a few seconds at 100 ms). What the
/// ring holds stays in memory until overwritten, so it is kept small.
pub const RING_BATCHES: usize = 64;
/// Subscribers at once (besides the places kept for root), and per uid.
pub const MAX_SUBSCRIBERS: usize = 16;
pub const MAX_SUBSCRIBERS_PER_UID: usize = 4;
/// Places only root may take, so no other user can lock `top` and `events` out.
pub const ROOT_SUBSCRIBERS: usize = 2;

/// What a record is (its `type` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordKind {
    Delta,
    Flow,
    Gap,
    /// Coverage: the agent started or stopped.
    Agent,
    /// Not a written record: the connections that moved this tick, with their cumulative
    /// counters (for live views). Built only while a subscriber asks for it.
    Conn,
}

impl RecordKind {
    /// What a subscription without types gets: the records the agent writes.
    pub const ALL: [RecordKind; 4] = [
        RecordKind::Delta,
        RecordKind::Flow,
        RecordKind::Gap,
        RecordKind::Agent,
    ];
}

/// One write's lines of one kind (each ending in `\n`).
#[derive(Debug, Clone)]
pub struct Batch {
    pub kind: RecordKind,
    pub lines: Arc<[u8]>,
}

/// The publishing side, shared by the writer and the control socket.
#[derive(Debug)]
pub struct RecordStream {
    tx: broadcast::Sender<Batch>,
    places: Arc<Quota>,
    /// Subscribers that asked for [`RecordKind::Conn`].
    conn_subscribers: AtomicUsize,
    counts: StreamCounts,
}

/// Counters for `status` and the metrics.
#[derive(Debug, Default)]
pub struct StreamCounts {
    pub subscriptions: AtomicU64,
    /// Refused: every place open to the caller, or its uid's share, was taken.
    pub refused: AtomicU64,
    /// Cut off: fell behind the ring, or did not read.
    pub cut_off: AtomicU64,
}

/// A snapshot of the stream's state.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamStatus {
    pub subscribers: usize,
    pub subscriptions: u64,
    pub refused: u64,
    pub cut_off: u64,
}

impl Default for RecordStream {
    fn default() -> Self {
        RecordStream::new(RING_BATCHES, MAX_SUBSCRIBERS, MAX_SUBSCRIBERS_PER_UID)
    }
}

impl RecordStream {
    pub fn new(ring: usize, max: usize, per_uid: usize) -> RecordStream {
        RecordStream {
            tx: broadcast::channel(ring.max(1)).0,
            places: Quota::new(max, per_uid, ROOT_SUBSCRIBERS),
            conn_subscribers: AtomicUsize::new(0),
            counts: StreamCounts::default(),
        }
    }

    /// Hands `lines` to every subscriber; never blocks.
    pub fn publish(&self, kind: RecordKind, lines: &[u8]) {
        if lines.is_empty() || self.tx.receiver_count() == 0 {
            return;
        }
        let _ = self.tx.send(Batch {
            kind,
            lines: Arc::from(lines),
        });
    }

    /// Whether anyone would receive `kind` (so the caller can skip building it).
    pub fn wants(&self, kind: RecordKind) -> bool {
        match kind {
            RecordKind::Conn => self.conn_subscribers.load(Ordering::Relaxed) > 0,
            _ => self.tx.receiver_count() > 0,
        }
    }

    /// A new subscriber to `kinds` for `uid`, unless its places are taken.
    pub fn subscribe(
        self: &Arc<Self>,
        uid: u32,
        kinds: &[RecordKind],
    ) -> Result<Subscription, String> {
        let place = self.places.acquire(uid).map_err(|why| {
            self.counts.refused.fetch_add(1, Ordering::Relaxed);
            format!("too many subscribers ({why}); try again when one has left")
        })?;
        self.counts.subscriptions.fetch_add(1, Ordering::Relaxed);
        let conn = kinds.contains(&RecordKind::Conn);
        if conn {
            self.conn_subscribers.fetch_add(1, Ordering::SeqCst);
        }
        Ok(Subscription {
            rx: self.tx.subscribe(),
            stream: self.clone(),
            conn,
            _place: place,
        })
    }

    pub fn status(&self) -> StreamStatus {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StreamStatus {
            subscribers: self.places.held(),
            subscriptions: g(&self.counts.subscriptions),
            refused: g(&self.counts.refused),
            cut_off: g(&self.counts.cut_off),
        }
    }
}

/// Why a subscriber stops receiving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The agent is stopping.
    Closed,
    /// It fell behind by this many batches.
    Lagged(u64),
}

/// The receiving side of one subscriber; leaving frees its place.
#[derive(Debug)]
pub struct Subscription {
    rx: broadcast::Receiver<Batch>,
    stream: Arc<RecordStream>,
    conn: bool,
    _place: Place,
}

impl Subscription {
    pub async fn next(&mut self) -> Result<Batch, Ended> {
        match self.rx.recv().await {
            Ok(b) => Ok(b),
            Err(broadcast::error::RecvError::Closed) => Err(Ended::Closed),
            Err(broadcast::error::RecvError::Lagged(n)) => Err(Ended::Lagged(n)),
        }
    }

    /// Counts this subscriber as cut off.
    pub fn cut_off(&self) {
        self.stream.counts.cut_off.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.conn {
            self.stream.conn_subscribers.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reader_that_falls_behind_the_ring_is_told_so() {
        let s = Arc::new(RecordStream::new(4, 2, 1));
        s.publish(RecordKind::Delta, b"nobody listens\n");
        let mut sub = s.subscribe(0, &RecordKind::ALL).unwrap();
        assert!(s.wants(RecordKind::Delta) && !s.wants(RecordKind::Conn));
        s.publish(RecordKind::Flow, b"a\n");
        let b = sub.next().await.unwrap();
        assert_eq!((b.kind, &*b.lines), (RecordKind::Flow, &b"a\n"[..]));
        for _ in 0..10 {
            s.publish(RecordKind::Delta, b"x\n");
        }
        assert_eq!(sub.next().await.unwrap_err(), Ended::Lagged(6));
        assert_eq!(s.status().subscribers, 1);
        drop(sub);
        assert_eq!(s.status().subscribers, 0);
    }

    #[test]
    fn subscribers_are_bounded() {
        let s = Arc::new(RecordStream::default());
        // A group member (uid 1000) takes its share; other uids fill the rest.
        let mut subs: Vec<_> = (0..MAX_SUBSCRIBERS_PER_UID)
            .map(|_| s.subscribe(1000, &[RecordKind::Conn]).unwrap())
            .collect();
        assert!(s.subscribe(1000, &[]).unwrap_err().contains("uid 1000"));
        for uid in 1001.. {
            match s.subscribe(uid, &[]) {
                Ok(sub) => subs.push(sub),
                Err(e) => {
                    assert!(e.contains("too many"), "{e}");
                    break;
                }
            }
        }
        assert_eq!(subs.len(), MAX_SUBSCRIBERS);
        assert_eq!(s.status().refused, 2);
        // Root is never locked out by the others.
        let root: Vec<_> = (0..ROOT_SUBSCRIBERS)
            .map(|_| s.subscribe(0, &[]).unwrap())
            .collect();
        assert!(s.wants(RecordKind::Conn));
        drop(subs);
        drop(root);
        assert!(!s.wants(RecordKind::Conn));
        assert!(s.subscribe(1000, &[]).is_ok());
    }
}
