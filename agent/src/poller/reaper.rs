//! Deletes the kernel entries of sockets (and per-peer entries) the poller is done with,
//! on a thread of its own.
//!
//! After a mass close every socket leaves an entry in the socket map and one in the
//! owner map (and an unconnected one, one per peer): the kernel frees each through the
//! BPF allocator, ~2-3 µs an entry here. That is clean-up, not accounting: the tick
//! already has what it needs (the table keeps a deleted-pending socket as gone, so a
//! whole-map read meanwhile never counts it twice), so no tick waits for it. The poller
//! hands over batches and collects what was done at its next tick.
use std::{
    collections::VecDeque,
    io,
    os::fd::{AsFd, OwnedFd},
    sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel},
    thread::JoinHandle,
};

use agent_common::PeerKey;
use log::debug;

use crate::bpfsys;

/// Keys per batch: one `BPF_MAP_DELETE_BATCH` call per map.
pub(super) const BATCH: usize = 2048;
/// Batches handed over and not yet done: enough that the thread never waits for a tick
/// during a mass close (16 x 2048 sockets a tick), few enough that the queue stays ours.
const IN_FLIGHT: usize = 16;

enum Job {
    Sockets(Vec<u64>),
    Peers(Vec<PeerKey>),
}

/// A batch done; `error` when the kernel refused part of it (the keys go back to the
/// queue and are tried again).
pub(super) enum Done {
    Sockets {
        keys: Vec<u64>,
        error: Option<io::Error>,
    },
    Peers {
        keys: Vec<PeerKey>,
    },
}

pub(super) struct Reaper {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    in_flight: usize,
    /// Socket cookies and peer keys waiting to be handed over.
    sockets: VecDeque<u64>,
    peers: VecDeque<PeerKey>,
}

/// The maps' file descriptors, duplicated for the thread.
pub(super) struct ReaperMaps {
    pub socks: OwnedFd,
    pub owners: OwnedFd,
    pub peers: OwnedFd,
}

impl Reaper {
    pub fn start(maps: ReaperMaps) -> io::Result<Reaper> {
        let (jobs, rx) = sync_channel::<Job>(IN_FLIGHT);
        let (tx, done) = sync_channel::<Done>(IN_FLIGHT);
        let thread = std::thread::Builder::new()
            .name("sockacct-reaper".into())
            .spawn(move || {
                for job in rx {
                    let d = match job {
                        Job::Sockets(keys) => {
                            let socks = bpfsys::delete_batch(maps.socks.as_fd(), &keys);
                            let owners = bpfsys::delete_batch(maps.owners.as_fd(), &keys);
                            Done::Sockets {
                                keys,
                                error: socks.and(owners).err(),
                            }
                        }
                        Job::Peers(keys) => {
                            if let Err(e) = bpfsys::delete_batch(maps.peers.as_fd(), &keys) {
                                // Entries gone already are fine; others are found again
                                // by the per-peer walk.
                                debug!("deleting {} per-peer entries: {e}", keys.len());
                            }
                            Done::Peers { keys }
                        }
                    };
                    if tx.send(d).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Reaper {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
            in_flight: 0,
            sockets: VecDeque::new(),
            peers: VecDeque::new(),
        })
    }

    pub fn delete_sockets(&mut self, cookies: impl IntoIterator<Item = u64>) {
        self.sockets.extend(cookies);
    }

    pub fn delete_peer(&mut self, k: PeerKey) {
        self.peers.push_back(k);
    }

    /// Entries waiting or under way.
    pub fn backlog(&self) -> usize {
        self.sockets.len() + self.peers.len() + self.in_flight * BATCH
    }

    /// Collects what was done since the last call (failed socket batches go back to the
    /// queue), then hands over what waits, as far as there is room.
    pub fn turn(&mut self) -> Vec<Done> {
        let mut out = vec![];
        loop {
            match self.done.try_recv() {
                Ok(d) => {
                    self.in_flight -= 1;
                    if let Done::Sockets {
                        keys,
                        error: Some(e),
                    } = &d
                    {
                        // Kept as gone (never counted twice); tried again.
                        debug!("deleting {} finished entries: {e}", keys.len());
                        self.sockets.extend(keys.iter().copied());
                        continue;
                    }
                    out.push(d);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => break,
            }
        }
        let Some(jobs) = &self.jobs else { return out };
        while self.in_flight < IN_FLIGHT && !(self.sockets.is_empty() && self.peers.is_empty()) {
            let job = if !self.sockets.is_empty() {
                let n = self.sockets.len().min(BATCH);
                Job::Sockets(self.sockets.drain(..n).collect())
            } else {
                let n = self.peers.len().min(BATCH);
                Job::Peers(self.peers.drain(..n).collect())
            };
            match jobs.try_send(job) {
                Ok(()) => self.in_flight += 1,
                // Cannot be full (in_flight bounds it) nor gone while we hold the sender;
                // should it happen, the keys go back and wait for the next turn.
                Err(TrySendError::Full(j) | TrySendError::Disconnected(j)) => {
                    match j {
                        Job::Sockets(k) => {
                            k.into_iter().rev().for_each(|c| self.sockets.push_front(c))
                        }
                        Job::Peers(k) => k.into_iter().rev().for_each(|p| self.peers.push_front(p)),
                    }
                    break;
                }
            }
        }
        if self.sockets.capacity() > 4 * BATCH && self.sockets.len() < self.sockets.capacity() / 4 {
            self.sockets.shrink_to(self.sockets.len() * 2);
        }
        if self.peers.capacity() > 4 * BATCH && self.peers.len() < self.peers.capacity() / 4 {
            self.peers.shrink_to(self.peers.len() * 2);
        }
        out
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        // The thread ends with the channel; what it has not deleted goes with the maps.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
