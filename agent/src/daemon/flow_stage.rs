//! The flow stage, on a thread of its own: the flow table turns each tick's socket and
//! peer views into flow records and writes them.
//!
//! Its work comes in bursts the poll loop must not wait for: after a mass close it
//! settles thousands of flows and writes `max_records_per_tick` records a call (~10 ms
//! here). The poll loop hands over the views and goes on; the views of one tick are never
//! dropped (a bounded channel: the poll loop waits only when the stage is several ticks
//! behind), and records keep their order (one thread writes them all).
use std::{
    sync::{
        Arc, Mutex,
        mpsc::{Receiver, SyncSender, sync_channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::{FLOW_RECORDS_PER_FRAME, Shared, Writer, lock};
use crate::{
    flows::{FlowTable, PeerView, SocketView},
    poller::TickTimes,
    stream::RecordKind,
};

/// Ticks of views that may wait for the stage before the poll loop waits for it.
const BACKLOG_TICKS: usize = 8;

/// The flow stage's work per call, for `status` (`flows.work`, `flows.work_cpu`).
#[derive(Debug, Default, Clone)]
pub(super) struct FlowWork {
    pub wall: TickTimes,
    pub cpu: TickTimes,
}

struct Views {
    socks: Vec<SocketView>,
    peers: Vec<PeerView>,
    /// The agent stops: every flow closes after these views.
    last: bool,
}

pub(super) struct FlowStage {
    tx: Option<SyncSender<Views>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl FlowStage {
    pub fn start(
        table: FlowTable,
        writer: Arc<Mutex<Writer>>,
        shared: Arc<Shared>,
    ) -> anyhow::Result<FlowStage> {
        let (tx, rx) = sync_channel(BACKLOG_TICKS);
        let thread = std::thread::Builder::new()
            .name("sockacct-flows".into())
            .spawn(move || run(table, rx, &writer, &shared))
            .context("starting the flow records thread")?;
        Ok(FlowStage {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands over one tick's views. An error is the stage's own (it stopped, e.g. its
    /// output closed): the agent stops too.
    pub fn send(&mut self, socks: Vec<SocketView>, peers: Vec<PeerView>) -> anyhow::Result<()> {
        self.hand_over(Views {
            socks,
            peers,
            last: false,
        })
    }

    /// The views after the final tick: every flow closes, the last records are written,
    /// and the thread ends.
    pub fn finish(mut self, socks: Vec<SocketView>, peers: Vec<PeerView>) -> anyhow::Result<()> {
        self.hand_over(Views {
            socks,
            peers,
            last: true,
        })?;
        self.join()
    }

    fn hand_over(&mut self, v: Views) -> anyhow::Result<()> {
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(v).is_ok());
        if sent {
            return Ok(());
        }
        // The thread ended early: its error says why.
        self.join()?;
        anyhow::bail!("the flow records thread stopped")
    }

    fn join(&mut self) -> anyhow::Result<()> {
        self.tx = None;
        match self.thread.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(r)) => r,
            Some(Err(_)) => anyhow::bail!("the flow records thread panicked"),
        }
    }
}

fn run(
    mut table: FlowTable,
    rx: Receiver<Views>,
    writer: &Mutex<Writer>,
    shared: &Shared,
) -> anyhow::Result<()> {
    for v in rx {
        let (t0, cpu0) = (Instant::now(), crate::process::thread_cpu_time());
        let now = crate::poller::unix_ms();
        let mut recs = table.observe(now, &v.socks, &v.peers);
        if v.last {
            recs.extend(table.finish_all(now));
        } else if shared.stream.wants(RecordKind::Conn) {
            let lines = table.conn_samples(now, &v.socks, &v.peers);
            shared.stream.publish(RecordKind::Conn, &lines);
        }
        *lock(&shared.flow_stats) = Some(table.stats());
        let observed = t0.elapsed();
        let nrecs = recs.len();
        // A frame's worth at a time: the poll loop writing its event waits for the
        // writer at most that long. (Called once even with none: a resume after a pause
        // writes the held records.)
        loop {
            let rest = recs.split_off(recs.len().min(FLOW_RECORDS_PER_FRAME));
            lock(writer).write_flows(recs)?;
            if rest.is_empty() {
                break;
            }
            recs = rest;
        }
        if v.last {
            return Ok(());
        }
        // After a mass close: the flows' freed heap goes back to the OS.
        if table.wants_trim() {
            crate::process::release_free_heap();
        }
        let (wall, cpu) = (
            t0.elapsed(),
            crate::process::thread_cpu_time().saturating_sub(cpu0),
        );
        {
            let mut w = lock(&shared.flow_work);
            w.wall.record(wall);
            w.cpu.record(cpu);
        }
        if wall > Duration::from_millis(15) {
            log::debug!(
                "slow flows: {:.1} ms ({:.1} ms CPU): observe {:.1} ({} sockets, {} peers), write {:.1} ({nrecs} records)",
                wall.as_secs_f64() * 1e3,
                cpu.as_secs_f64() * 1e3,
                observed.as_secs_f64() * 1e3,
                v.socks.len(),
                v.peers.len(),
                (wall - observed).as_secs_f64() * 1e3
            );
        }
    }
    Ok(())
}
