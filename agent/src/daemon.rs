//! The `run` command: load, poll every interval, write events, detach on a signal.
use std::{
    io::Write as _,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use log::{info, warn};

use crate::{
    cli::RunArgs,
    config::Config,
    discover,
    event::{DeltaEvent, Identity, SeqAllocator},
    labels::Labeler,
    loader::{self, LoadOptions},
    poller::Poller,
    procfs,
};

/// Settings after merging the config file and flags.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    pub interval: Duration,
    pub stdout: bool,
    pub state_dir: PathBuf,
}

pub fn settings(args: &RunArgs) -> anyhow::Result<Settings> {
    let mut config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::parse("", "<defaults>")?,
    };
    if let Some(c) = &args.cgroup {
        config.cgroup = Some(c.clone());
    }
    if let Some(i) = args.interval {
        anyhow::ensure!((10..=60_000).contains(&i), "--interval {i}: must be between 10 and 60000 ms");
        config.interval_ms = i;
    }
    if !args.ifaces.is_empty() {
        config.interfaces = args.ifaces.clone();
    }
    if let Some(m) = args.max_sockets {
        anyhow::ensure!(m >= 1024, "--max-sockets {m}: must be at least 1024");
        config.max_sockets = m;
    }
    if let Some(a) = &args.agent_id {
        config.agent_id = Some(a.clone());
    }
    Ok(Settings {
        interval: Duration::from_millis(config.interval_ms),
        config,
        stdout: args.stdout,
        state_dir: args.state_dir.clone(),
    })
}

/// Where events go until the spool lands: stdout, or a periodic summary in the log.
pub trait EventSink: Send {
    fn write(&mut self, ev: &DeltaEvent) -> std::io::Result<()>;
}

pub struct StdoutSink;
impl EventSink for StdoutSink {
    fn write(&mut self, ev: &DeltaEvent) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, ev)?;
        out.write_all(b"\n")?;
        out.flush()
    }
}

/// Logs a one-line summary every 10 s (used when --stdout is not given).
pub struct SummarySink {
    last: Instant,
    events: u64,
    bytes: u64,
}
impl SummarySink {
    pub fn new() -> Self {
        SummarySink { last: Instant::now(), events: 0, bytes: 0 }
    }
}
impl Default for SummarySink {
    fn default() -> Self {
        Self::new()
    }
}
impl EventSink for SummarySink {
    fn write(&mut self, ev: &DeltaEvent) -> std::io::Result<()> {
        self.events += 1;
        self.bytes += ev.total.tx + ev.total.rx;
        if self.last.elapsed() >= Duration::from_secs(10) {
            info!("{} events, {} bytes counted in the last {:?} (use --stdout to see the events)", self.events, self.bytes, self.last.elapsed());
            self.last = Instant::now();
            self.events = 0;
            self.bytes = 0;
        }
        Ok(())
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let s = settings(&args)?;
    let opts = LoadOptions {
        cgroup: s.config.cgroup.clone(),
        interfaces: s.config.interfaces.clone(),
        max_sockets: s.config.max_sockets,
    };
    let labeler = Arc::new(Labeler::new(&s.config, procfs::netns_cookie_of_self())?);
    std::fs::create_dir_all(&s.state_dir)
        .with_context(|| format!("creating state directory {} (set --state-dir)", s.state_dir.display()))?;
    let seq = SeqAllocator::open(&s.state_dir.join("seq"))
        .with_context(|| format!("opening {}", s.state_dir.join("seq").display()))?;

    // Handlers first: a SIGTERM at any point from here on still detaches cleanly.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGINT, libc::SIGTERM] {
        install_flag(sig, &stop)?;
    }
    let mut loaded = loader::load(&opts)?;
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
    let identity = Identity::detect(s.config.agent_id.as_deref());
    let mut poller = Poller::new(&mut loaded, identity, seq, labeler, discovered)?;
    let mut sink: Box<dyn EventSink> = if s.stdout { Box::new(StdoutSink) } else { Box::new(SummarySink::new()) };

    info!("running: one event per {:?} with movement", s.interval);
    let mut next = Instant::now() + s.interval;
    while !stop.load(Ordering::Relaxed) {
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
        emit(&mut poller, sink.as_mut())?;
    }
    info!("stopping: detaching programs, final poll");
    loaded.detach();
    emit(&mut poller, sink.as_mut())?;
    let st = &poller.stats;
    info!(
        "totals: {} events, kernel counted {} B out / {} B in; {} finished sockets folded in; \
         {} B without an owner; kernel counters {:?}",
        st.events, st.kernel_total.tx, st.kernel_total.rx, st.finals_received, st.no_owner_bytes, st.kernel_drops
    );
    drop(poller);
    drop(loaded);
    info!("detached; bye");
    Ok(())
}

fn emit(poller: &mut Poller, sink: &mut dyn EventSink) -> anyhow::Result<()> {
    if let Some(ev) = poller.tick()? {
        if let Err(e) = sink.write(&ev) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                anyhow::bail!("standard output closed");
            }
            warn!("writing event seq {}: {e}", ev.seq);
        }
    }
    Ok(())
}

static STOP_FLAGS: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

extern "C" fn on_signal(_: libc::c_int) {
    if let Some(f) = STOP_FLAGS.get() {
        f.store(true, Ordering::Relaxed);
    }
}

/// Sets `flag` on `sig`. The handler only stores to an atomic (async-signal-safe).
fn install_flag(sig: libc::c_int, flag: &Arc<AtomicBool>) -> anyhow::Result<()> {
    let _ = STOP_FLAGS.set(flag.clone());
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_signal as *const () as usize;
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    if unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) } != 0 {
        anyhow::bail!("installing handler for signal {sig}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
