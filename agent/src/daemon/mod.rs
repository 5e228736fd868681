//! The `run` command: load, poll every interval, spool events, serve the control socket,
//! upload on demand, detach on a signal.
//!
//! Threads: the poller runs on its own thread (its work is blocking syscalls and file
//! writes); with flow records on, the flow stage runs on another (flow_stage.rs), and the
//! poller's reaper deletes kernel entries on a third; the control socket and uploads run
//! on a small tokio runtime. They share [`Shared`]: the spool behind a mutex, the pause
//! flag, label overrides and a status snapshot the poller refreshes every tick; the
//! record writer is shared by the poll loop and the flow stage.
use std::{
    io::Write as _,
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use log::{info, warn};

use crate::{
    config::{Config, FsyncSetting},
    control::{
        self, BoxFuture, ControlConfig, ControlServer, Handler, Labelled, Paused, Peer, Refusals,
    },
    discover,
    event::{DeltaEvent, Identity, SeqAllocator},
    flows::{FlowRecord, FlowStats, FlowTable},
    lifecycle::{self, AgentRecord, Previous, RunFacts, RunMarker},
    loader,
    metrics::{self, LabelTotals, ProcessStats, Scrape, auth::Credentials},
    poller::{LabelOverrides, NamedSocket, PollStats, Poller},
    safedir::SafeDir,
    settings::Settings,
    spool::{FsyncPolicy, Now, Spool, SpoolConfig, SpoolRecord},
    stream::{RecordKind, RecordStream, Subscription},
    upload::{self, UploadConfig, Uploader, flush::FlushReceipt},
};

use crate::status::{self, FlowsStatus, Status, UploadStatus};

mod flow_stage;
mod metrics_endpoint;
mod signals;
use flow_stage::{FlowStage, FlowWork};
use metrics_endpoint::{MetricsEndpoint, bind_metrics};

/// Upload bookkeeping for `status`.
#[derive(Debug, Default)]
struct UploadState {
    flushes: u64,
    failures: u64,
    records_sent: u64,
    bytes_sent: u64,
    last_success_unix_ms: Option<u64>,
    last: Option<FlushReceipt>,
}

/// State shared by the poller thread, the control socket and uploads.
pub struct Shared {
    identity: Identity,
    spool: Option<Arc<Mutex<Spool>>>,
    uploader: Option<Uploader>,
    max_body: u64,
    paused: AtomicBool,
    /// Bytes counted while paused (they are written in one event at resume).
    paused_bytes: AtomicU64,
    /// Flow records dropped because too many were held during a pause.
    flows_dropped_paused: AtomicU64,
    /// Refreshed by the flow table each tick (None when flow records are off).
    flow_stats: Mutex<Option<FlowStats>>,
    /// The flow stage's work per call.
    flow_work: Mutex<FlowWork>,
    /// What does not change while running, and the poller's counters of the last tick:
    /// `status` builds its reply from them only when asked.
    fixed: status::Fixed,
    poll_stats: Mutex<PollStats>,
    started: Instant,
    overrides: LabelOverrides,
    owners: OwnedFd,
    max_labels_per_uid: usize,
    flush_lock: tokio::sync::Mutex<()>,
    upload_state: Mutex<UploadState>,
    refusals: Arc<Refusals>,
    /// Sums of the written delta events, for the metrics endpoint.
    totals: Mutex<LabelTotals>,
    metrics: Option<MetricsEndpoint>,
    /// Written records, live, for subscribers.
    stream: Arc<RecordStream>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not take the control socket down with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// The `status` reply (also what the metrics show).
    fn status_now(&self) -> Status {
        let mut st = Status::new(&self.fixed, &lock(&self.poll_stats));
        st.uptime_s = self.started.elapsed().as_secs();
        st.paused = self.paused.load(Ordering::Relaxed);
        st.paused_bytes = self.paused_bytes.load(Ordering::Relaxed);
        st.spool = self.spool.as_ref().map(|s| lock(s).stats());
        let up = lock(&self.upload_state);
        st.upload = UploadStatus {
            configured: self.uploader.is_some(),
            flushes: up.flushes,
            failures: up.failures,
            records_sent: up.records_sent,
            bytes_sent: up.bytes_sent,
            last_success_unix_ms: up.last_success_unix_ms,
            last: up.last.clone(),
        };
        drop(up);
        st.control_refused = self.refusals.snapshot();
        st.stream = self.stream.status();
        st.metrics = self.metrics.as_ref().map(MetricsEndpoint::status);
        st.labels_named = lock(&self.overrides).len();
        let poll = lock(&self.poll_stats);
        st.flows = lock(&self.flow_stats).clone().map(|mut table| {
            // One ledger: what the poller could not give the table joins what the table
            // could not record.
            for (reason, t) in &poll.flow_unrecorded {
                table.ledger.unrecorded.entry(reason).or_default().add(t);
            }
            let work = lock(&self.flow_work);
            FlowsStatus {
                table,
                work: work.wall.clone(),
                work_cpu: work.cpu.clone(),
                dropped_while_paused: self.flows_dropped_paused.load(Ordering::Relaxed),
                pending_sockets: poll.flow_pending_sockets as u64,
            }
        });
        drop(poll);
        st
    }

    /// Seals the spool and uploads every pending body, oldest first, stopping at the
    /// first failure. Returns the receipt.
    async fn flush_now(self: &Arc<Self>) -> FlushReceipt {
        let Some(up) = &self.uploader else {
            return FlushReceipt::failed(
                "no upload URL configured: set [upload] url in the config, or run with --upload-url",
            );
        };
        let Some(spool) = &self.spool else {
            return FlushReceipt::failed("the agent runs with --no-spool: nothing to upload");
        };
        let _one_at_a_time = self.flush_lock.lock().await;
        let receipt = upload::flush::flush(spool, up, self.max_body).await;
        let mut st = lock(&self.upload_state);
        st.flushes += 1;
        st.records_sent += receipt.sent.records;
        st.bytes_sent += receipt.sent.bytes;
        if receipt.ok {
            st.last_success_unix_ms = Some(crate::poller::unix_ms());
        } else {
            st.failures += 1;
        }
        st.last = Some(receipt.clone());
        receipt
    }
}

impl Handler for Arc<Shared> {
    type Status = Status;
    type Receipt = FlushReceipt;

    fn status(&self) -> Status {
        self.status_now()
    }

    fn subscribe(&self, uid: u32, kinds: &[RecordKind]) -> Result<Subscription, String> {
        self.stream.subscribe(uid, kinds)
    }

    fn flush(&self) -> BoxFuture<'_, FlushReceipt> {
        Box::pin(self.flush_now())
    }

    fn pause(&self) -> Paused {
        let was = self.paused.swap(true, Ordering::SeqCst);
        Paused {
            paused: true,
            was_paused: was,
            note: Some(
                "counting continues; what is counted while paused is written as one event at resume"
                    .into(),
            ),
        }
    }

    fn resume(&self) -> Paused {
        let was = self.paused.swap(false, Ordering::SeqCst);
        Paused {
            paused: false,
            was_paused: was,
            note: None,
        }
    }

    fn label(&self, peer: &Peer, cookie: u64, label: &str) -> Result<Labelled, String> {
        if label.is_empty()
            || label.len() > crate::config::MAX_LABEL_BYTES
            || label.chars().any(char::is_control)
        {
            return Err(format!(
                "bad label {label:?}: expected 1 to {} bytes without control characters",
                crate::config::MAX_LABEL_BYTES
            ));
        }
        control::owns_socket(self.owners.as_fd(), peer, cookie)?;
        let mut o = lock(&self.overrides);
        if !peer.is_root() && !o.contains_key(&cookie) {
            let mine = o.values().filter(|n| n.uid == peer.uid).count();
            if mine >= self.max_labels_per_uid {
                return Err(format!(
                    "uid {} already named {mine} sockets (limit {}; closed sockets free their place)",
                    peer.uid, self.max_labels_per_uid
                ));
            }
        }
        o.insert(
            cookie,
            NamedSocket {
                label: label.to_string(),
                uid: peer.uid,
            },
        );
        Ok(Labelled {
            cookie,
            label: label.to_string(),
        })
    }
}

impl metrics::Source for Shared {
    fn scrape(&self) -> Scrape {
        // Clone the totals first and let go: the writer adds to them once per tick.
        let totals = lock(&self.totals).clone();
        Scrape {
            status: self.status_now(),
            totals,
            process: ProcessStats::read(),
            version: env!("CARGO_PKG_VERSION"),
        }
    }
}

fn spool_config(c: &Config) -> SpoolConfig {
    SpoolConfig {
        dir: c.spool.dir.clone(),
        segment_max_bytes: c.spool.segment_max_bytes,
        segment_max_age: Duration::from_secs(c.spool.segment_max_age_secs.max(1)),
        total_max_bytes: c.spool.max_bytes,
        fsync: match c.spool.fsync {
            FsyncSetting::Always => FsyncPolicy::Always,
            FsyncSetting::Never => FsyncPolicy::Never,
            FsyncSetting::IntervalMs(ms) => FsyncPolicy::Interval(Duration::from_millis(ms.max(1))),
        },
        memory_backlog_bytes: c.spool.memory_backlog_bytes,
    }
}

/// Writes one event: accumulated while paused, else spooled (which numbers it) and/or
/// printed.
struct Writer {
    shared: Arc<Shared>,
    stdout: bool,
    /// Numbers events when there is no spool.
    seq: Option<SeqAllocator>,
    held: Option<DeltaEvent>,
    held_flows: Vec<FlowRecord>,
    spool_failing: bool,
}

/// Consecutive failed ticks (10 s at the default interval) after which the agent stops:
/// it then detaches, polls a last time and fsyncs its spool like at SIGTERM.
const MAX_FAILING_TICKS: u32 = 100;

/// Flow records per spool frame (keeps frames, and so upload bodies, small).
const FLOW_RECORDS_PER_FRAME: usize = 512;
/// Flow records held in memory while paused; beyond it they are counted and dropped.
const MAX_HELD_FLOWS: usize = 200_000;

impl Writer {
    fn print(&self, bytes: &[u8]) -> anyhow::Result<()> {
        if !self.stdout || bytes.is_empty() {
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        match out.write_all(bytes).and_then(|_| out.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                anyhow::bail!("standard output closed")
            }
            Err(e) => {
                warn!("writing to standard output: {e}");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    fn write(&mut self, ev: Option<DeltaEvent>) -> anyhow::Result<()> {
        if self.shared.paused.load(Ordering::SeqCst) {
            if let Some(ev) = ev {
                self.shared
                    .paused_bytes
                    .fetch_add(ev.total.tx + ev.total.rx, Ordering::Relaxed);
                match &mut self.held {
                    Some(h) => h.absorb(&ev),
                    None => self.held = Some(ev),
                }
            }
            return self.tick_spool();
        }
        // After a pause, the held interval goes out first, as one event.
        let mut batch: Vec<DeltaEvent> = self.held.take().into_iter().chain(ev).collect();
        if !batch.is_empty() {
            self.shared.paused_bytes.store(0, Ordering::Relaxed);
        }
        if batch.is_empty() {
            return self.tick_spool();
        }
        // Only the metrics endpoint reads the label totals.
        if self.shared.metrics.is_some() {
            let mut totals = lock(&self.shared.totals);
            for ev in &batch {
                totals.add(ev);
            }
        }
        match &self.shared.spool {
            Some(sp) => {
                let out = lock(sp).append(&mut batch, Now::system());
                // Say it when the state changes, not every interval (the spool itself logs
                // its errors and "writing works again" once per change).
                if out.error.is_some() != self.spool_failing {
                    self.spool_failing = out.error.is_some();
                    if out.error.is_some() && out.backlogged > 0 {
                        warn!(
                            "spool: events are held in memory until writing works again (see `sockacct status`)"
                        );
                    }
                }
                self.emit(RecordKind::Delta, &out.lines)?;
                self.emit(RecordKind::Gap, &out.gaps)?;
            }
            None => self.stamp_and_emit(RecordKind::Delta, &mut batch)?,
        }
        self.tick_spool()
    }

    /// Writes flow records (held while paused, like events), in chunks so no spool frame
    /// grows without bound.
    fn write_flows(&mut self, mut recs: Vec<FlowRecord>) -> anyhow::Result<()> {
        if self.shared.paused.load(Ordering::SeqCst) {
            let room = MAX_HELD_FLOWS.saturating_sub(self.held_flows.len());
            if recs.len() > room {
                self.shared
                    .flows_dropped_paused
                    .fetch_add((recs.len() - room) as u64, Ordering::Relaxed);
                recs.truncate(room);
            }
            self.held_flows.append(&mut recs);
            return Ok(());
        }
        let mut all = std::mem::take(&mut self.held_flows);
        all.append(&mut recs);
        for chunk in all.chunks_mut(FLOW_RECORDS_PER_FRAME) {
            match &self.shared.spool {
                Some(sp) => {
                    let out = lock(sp).append(chunk, Now::system());
                    self.emit(RecordKind::Flow, &out.lines)?;
                    self.emit(RecordKind::Gap, &out.gaps)?;
                }
                None => self.stamp_and_emit(RecordKind::Flow, chunk)?,
            }
        }
        Ok(())
    }

    /// Coverage records are written at once, paused or not.
    fn write_agent(&mut self, rec: AgentRecord) -> anyhow::Result<()> {
        let mut one = [rec];
        match &self.shared.spool {
            Some(sp) => {
                let out = lock(sp).append(&mut one, Now::system());
                self.emit(RecordKind::Agent, &out.lines)?;
                self.emit(RecordKind::Gap, &out.gaps)
            }
            None => self.stamp_and_emit(RecordKind::Agent, &mut one),
        }
    }

    /// Without a spool: stamps the envelope (the sequence from the writer's own
    /// allocator), prints and publishes.
    fn stamp_and_emit<R: SpoolRecord>(
        &mut self,
        kind: RecordKind,
        recs: &mut [R],
    ) -> anyhow::Result<()> {
        let seq = self
            .seq
            .as_mut()
            .expect("no spool means a sequence allocator");
        let mut lines = Vec::new();
        for r in recs.iter_mut() {
            r.stamp(
                &self.shared.identity,
                seq.next().context("allocating a sequence number")?,
            );
            lines.extend_from_slice(&r.to_json_line());
            lines.push(b'\n');
        }
        self.emit(kind, &lines)
    }

    /// What was written goes to stdout (with --stdout) and to the stream's subscribers.
    fn emit(&self, kind: RecordKind, lines: &[u8]) -> anyhow::Result<()> {
        self.shared.stream.publish(kind, lines);
        self.print(lines)
    }

    fn tick_spool(&mut self) -> anyhow::Result<()> {
        if let Some(sp) = &self.shared.spool {
            let gaps = {
                let mut sp = lock(sp);
                sp.tick(Now::system());
                sp.take_gap_lines()
            };
            self.emit(RecordKind::Gap, &gaps)?;
        }
        Ok(())
    }
}

/// How to run, beyond the configuration: flags of `sockacct run` only.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Also write every record as a JSON line to stdout.
    pub stdout: bool,
    /// State that must survive restarts (the sequence-number reservation).
    pub state_dir: PathBuf,
    /// Keep records in the spool (false: stdout only).
    pub spool: bool,
}

pub fn run(s: Settings, o: RunOptions) -> anyhow::Result<()> {
    // Privileges, BTF and cgroup v2 first: say what is missing before touching any file.
    let cgroup = loader::preflight(s.config.cgroup.as_deref())?;
    // The endpoint's credentials next: a missing or exposed secret stops the start rather
    // than serving metrics without the protection the operator asked for.
    let metrics_creds = if s.config.metrics.enabled {
        Credentials::load(&s.config.metrics)?
    } else {
        Credentials::default()
    };
    let mut opts = s.load_options();
    opts.tc_record = Some(o.state_dir.join("tc-filters.json"));
    let labeler = s.labeler.clone();
    // Only root may be able to change what the agent writes as root: the state directory
    // and its parent are checked, and nothing in it is reached through a link.
    SafeDir::create(&o.state_dir, 0o700)
        .and_then(|d| d.check_trusted())
        .map_err(|e| anyhow::anyhow!("state directory: {e} (or set --state-dir)"))?;
    RunMarker::check(&o.state_dir).context("state directory")?;
    let seq_path = o.state_dir.join("seq");
    let had_state = std::fs::symlink_metadata(&seq_path).is_ok();
    let seq =
        SeqAllocator::open(&seq_path).with_context(|| format!("opening {}", seq_path.display()))?;
    // Checked before anything is attached: a bad CA or key file names its key now.
    let uploader = UploadConfig::from_section(&s.config.upload)?
        .map(Uploader::new)
        .transpose()?;

    // Handlers first: a SIGTERM (or any other terminating signal) at any point from
    // here on still detaches cleanly.
    let stop = signals::install()?;
    let identity = Identity::detect(s.config.agent_id.as_deref());
    let (spool, writer_seq, resumes_after) = if o.spool {
        let (sp, report) = Spool::open_dir(spool_config(&s.config), identity.clone(), seq)
            .with_context(|| {
                format!(
                    "opening the spool in {} (set --spool-dir, or --no-spool)",
                    s.config.spool.dir.display()
                )
            })?;
        info!("spool {}: {report:?}", s.config.spool.dir.display());
        let last = report.last_seq.or(report.acked_seq);
        (Some(Arc::new(Mutex::new(sp))), None, last)
    } else {
        (None, Some(seq), None)
    };

    crate::process::tune_allocator();
    let mut loaded = loader::load_checked(cgroup, &opts)?;
    // Sockets that existed before we attached: find their owners now. Anything created
    // from here on is seen by sock_create.
    let discovered = match discover::discover_existing() {
        // TIME_WAIT and other socket remnants have no owner and carry no counted bytes.
        Ok(d) => d.into_iter().filter(|s| s.inode != 0).collect(),
        Err(e) => {
            warn!("could not list existing sockets ({e}); their bytes will be unattributed");
            vec![]
        }
    };
    info!("{} existing sockets discovered", discovered.len());
    let mut poller = Poller::new(&mut loaded, labeler, discovered)?;
    poller.limit_labels(s.config.max_labels);
    // Loading parsed the kernel's BTF (megabytes of small allocations, all freed now):
    // hand the freed heap back instead of holding it for the agent's lifetime.
    crate::process::release_free_heap();

    let fixed = status::Fixed {
        agent: identity.agent.clone(),
        boot: identity.boot.clone(),
        cgroup: loaded.cgroup.display().to_string(),
        interval_ms: s.interval.as_millis() as u64,
        accept_hook: loaded.accept_hook,
        hooks: loaded.hooks.clone(),
        kernel: crate::procfs::kernel_release(),
        map_capacity: s.config.max_sockets,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = {
        let _g = rt.enter();
        let c = &s.config.control;
        ControlServer::bind(&ControlConfig {
            path: c.socket.clone(),
            group: c.group.clone(),
            limits: control::Limits {
                max_connections: c.max_connections,
                max_connections_per_uid: c.max_connections_per_uid,
                idle_timeout: Duration::from_millis(c.idle_timeout_ms),
                write_timeout: Duration::from_millis(c.write_timeout_ms),
            },
        })?
    };
    info!("control socket {}", server.path().display());
    let (metrics_server, metrics) = bind_metrics(&s.config.metrics, metrics_creds);
    let shared = Arc::new(Shared {
        identity,
        spool,
        uploader,
        max_body: s.config.upload.max_body_bytes,
        paused: AtomicBool::new(false),
        paused_bytes: AtomicU64::new(0),
        flows_dropped_paused: AtomicU64::new(0),
        flow_stats: Mutex::new(None),
        flow_work: Mutex::new(FlowWork::default()),
        fixed,
        poll_stats: Mutex::new(poller.stats.clone()),
        started: Instant::now(),
        overrides: poller.overrides(),
        owners: poller.owners_fd()?,
        max_labels_per_uid: s.config.control.max_labels_per_uid,
        flush_lock: tokio::sync::Mutex::new(()),
        upload_state: Mutex::new(UploadState::default()),
        refusals: server.refusals(),
        totals: Mutex::new(LabelTotals::new(s.config.metrics.max_label_series)),
        metrics,
        stream: Arc::new(RecordStream::new(
            crate::stream::RING_BATCHES,
            s.config.control.max_subscribers,
            s.config.control.max_subscribers_per_uid,
        )),
    });

    if let Some(m) = metrics_server {
        rt.spawn(m.serve(shared.clone()));
    }
    if s.config.upload.every_secs > 0 && shared.uploader.is_some() {
        let (sh, every) = (
            shared.clone(),
            Duration::from_secs(s.config.upload.every_secs),
        );
        rt.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let r = sh.flush_now().await;
                if !r.ok {
                    warn!("periodic upload: {}", r.error.unwrap_or_default());
                }
            }
        });
    }

    let writer = Arc::new(Mutex::new(Writer {
        shared: shared.clone(),
        stdout: o.stdout,
        seq: writer_seq,
        held: None,
        held_flows: vec![],
        spool_failing: false,
    }));
    let mut flow_stage = match s.flows.clone() {
        Some(cfg) => {
            poller.enable_flow_views(true);
            Some(FlowStage::start(
                FlowTable::new(cfg),
                writer.clone(),
                shared.clone(),
            )?)
        }
        None => None,
    };
    // Coverage: this run starts (and says how the previous one ended).
    let facts = RunFacts {
        kernel: crate::procfs::kernel_release(),
        hooks: loaded
            .hooks
            .iter()
            .map(crate::loader::hooks::HookChoice::short)
            .collect(),
        config_digest: lifecycle::config_digest(&s.config),
    };
    let (marker, previous) = RunMarker::create(&o.state_dir, had_state).with_context(|| {
        format!(
            "writing the run marker in {} (set --state-dir)",
            o.state_dir.display()
        )
    })?;
    if previous == Previous::Recovered {
        warn!("the previous run did not stop cleanly (killed or crashed); its spool was recovered");
    }
    lock(&writer).write_agent(AgentRecord::start(
        crate::poller::unix_ms(),
        &facts,
        previous,
        resumes_after,
    ))?;
    // Served only now: a client that gets an answer finds the start record written.
    rt.spawn(server.serve(Arc::new(shared.clone())));
    info!("running: one event per {:?} with movement", s.interval);
    let mut next = Instant::now() + s.interval;
    let mut result = Ok(());
    let mut failing = 0u32;
    while !stop.load(Ordering::Relaxed) {
        signals::note_hangups();
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(20)));
            continue;
        }
        next += s.interval;
        if next < Instant::now() {
            // Fell behind (suspended?): do not burst, realign.
            next = Instant::now() + s.interval;
        }
        let cycle = Instant::now();
        let cycle_cpu = crate::process::thread_cpu_time();
        let ev = match poller.tick() {
            Ok(ev) => {
                failing = 0;
                ev
            }
            Err(e) => {
                // Nothing of the interval is lost: the tick changed no state before it
                // failed, so the next one reads the slot again and covers both intervals.
                failing += 1;
                poller.stats.tick_failures += 1;
                let msg = e.to_string();
                if failing == 1 || poller.stats.last_tick_error.as_deref() != Some(&msg) {
                    warn!("tick failed, retrying at the next one: {msg}");
                }
                poller.stats.last_tick_error = Some(msg);
                lock(&shared.poll_stats).clone_from(&poller.stats);
                if failing >= MAX_FAILING_TICKS {
                    result = Err(anyhow::anyhow!(
                        "{failing} ticks in a row failed, giving up: {e}"
                    ));
                    break;
                }
                continue;
            }
        };
        if let Err(e) = lock(&writer).write(ev) {
            result = Err(e);
            break;
        }
        if let Some(stage) = &mut flow_stage {
            let (socks, peers) = poller.take_flow_views();
            if let Err(e) = stage.send(socks, peers) {
                // The stage ended (its error is this one): nothing left to finish.
                result = Err(e);
                flow_stage = None;
                break;
            }
        }
        // The whole cycle's work: the tick and writing its event (everything but the
        // grace-period wait; the flow stage's work is its own, `flows.work`).
        let work = cycle.elapsed().saturating_sub(poller.stats.last_tick_wait);
        poller.stats.work.record(work);
        // Wall time includes waiting for a CPU; this is what the loop itself used.
        let cpu = crate::process::thread_cpu_time().saturating_sub(cycle_cpu);
        poller.stats.work_cpu.record(cpu);
        if work > Duration::from_millis(15) {
            log::debug!(
                "slow cycle {}: {:.1} ms ({:.1} ms CPU)",
                poller.stats.ticks,
                work.as_secs_f64() * 1e3,
                cpu.as_secs_f64() * 1e3
            );
        }
        lock(&shared.poll_stats).clone_from(&poller.stats);
    }
    info!(
        "stopping{}: detaching programs, final poll",
        signals::stopped_by().map_or(String::new(), |s| format!(" on {s}"))
    );
    loaded.detach();
    // Whatever was held during a pause is written now: nothing counted is dropped.
    shared.paused.store(false, Ordering::SeqCst);
    // Whatever fails here, the spool is still fsynced below.
    let last = poller
        .tick()
        .map_err(anyhow::Error::from)
        .and_then(|ev| lock(&writer).write(ev));
    if let Err(e) = last {
        warn!("final poll: {e:#}");
        result = result.and(Err(e));
    }
    if let Some(stage) = flow_stage.take() {
        poller.finish_flow_views();
        let (socks, peers) = poller.take_flow_views();
        if let Err(e) = stage.finish(socks, peers) {
            warn!("final flow records: {e:#}");
            result = result.and(Err(e));
        }
    }
    let stop = AgentRecord::stop(
        crate::poller::unix_ms(),
        &facts,
        shared.started.elapsed().as_millis() as u64,
    );
    if let Err(e) = lock(&writer).write_agent(stop) {
        warn!("final coverage record: {e:#}");
        result = result.and(Err(e));
    }
    let mut durable = true;
    if let Some(sp) = &shared.spool
        && let Err(e) = lock(sp).flush()
    {
        warn!("spool: final fsync: {e}");
        durable = false;
    }
    // Only a run whose last records are durable counts as a clean stop.
    if durable && let Err(e) = marker.remove() {
        warn!("removing the run marker: {e}");
    }
    let st = &poller.stats;
    info!(
        "totals: {} events, kernel counted {} B out / {} B in; {} finished sockets folded in; \
         {} B without an owner; kernel drops {:?}, fallbacks (nothing lost) {:?}",
        st.events,
        st.kernel_total.tx,
        st.kernel_total.rx,
        st.finals_received,
        st.no_owner_bytes,
        st.kernel_drops,
        st.kernel_fallbacks
    );
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(poller);
    drop(loaded);
    info!("detached; bye");
    result
}
