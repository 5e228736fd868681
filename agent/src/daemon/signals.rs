//! Signals: every catchable signal whose default would end the process ends the agent
//! cleanly instead (final poll, fsync, detach, run marker removed); SIGHUP is logged and
//! ignored until reload exists; SIGPIPE and SIGXFSZ are ignored, so a closed pipe or a
//! file-size limit becomes an error the writer handles.
use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering},
};

static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();
/// The signal that asked the agent to stop (0: none yet).
static STOPPED_BY: AtomicI32 = AtomicI32::new(0);
static HANGUPS: AtomicU64 = AtomicU64::new(0);

/// Signals whose default action terminates the process (with or without a core dump),
/// that a handler can catch, and that the kernel does not send for a fault in our own
/// code (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGSYS, SIGTRAP keep their default).
const STOPPING: [libc::c_int; 12] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGIO,
    libc::SIGPWR,
    libc::SIGSTKFLT,
    libc::SIGXCPU,
];

extern "C" fn on_stop(sig: libc::c_int) {
    // Only atomic stores: async-signal-safe.
    let _ = STOPPED_BY.compare_exchange(0, sig, Ordering::Relaxed, Ordering::Relaxed);
    if let Some(f) = STOP.get() {
        f.store(true, Ordering::Relaxed);
    }
}

extern "C" fn on_hangup(_: libc::c_int) {
    HANGUPS.fetch_add(1, Ordering::Relaxed);
}

fn set(sig: libc::c_int, action: libc::sighandler_t) -> anyhow::Result<()> {
    // SAFETY: a zeroed sigaction with an empty mask and a handler that only touches
    // atomics (or SIG_IGN) is valid to install.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = action;
    sa.sa_flags = libc::SA_RESTART;
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    if unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) } != 0 {
        anyhow::bail!(
            "installing a handler for signal {}: {}",
            name(sig),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Installs the handlers; the returned flag turns true when the agent should stop.
pub fn install() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = STOP
        .get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone();
    let realtime = libc::SIGRTMIN()..=libc::SIGRTMAX();
    for sig in STOPPING.into_iter().chain(realtime) {
        set(sig, on_stop as *const () as libc::sighandler_t)?;
    }
    set(libc::SIGHUP, on_hangup as *const () as libc::sighandler_t)?;
    set(libc::SIGPIPE, libc::SIG_IGN)?;
    set(libc::SIGXFSZ, libc::SIG_IGN)?;
    Ok(stop)
}

/// Logs hangups received since the last call (from the poll loop, not the handler).
pub fn note_hangups() {
    let n = HANGUPS.swap(0, Ordering::Relaxed);
    if n > 0 {
        log::warn!(
            "SIGHUP received{}: the agent keeps running with its configuration unchanged (reload is not supported yet; restart the agent to apply a new configuration)",
            if n > 1 {
                format!(" ({n} times)")
            } else {
                String::new()
            }
        );
    }
}

/// The signal that stopped the agent, by name.
pub fn stopped_by() -> Option<String> {
    match STOPPED_BY.load(Ordering::Relaxed) {
        0 => None,
        s => Some(name(s)),
    }
}

fn name(sig: libc::c_int) -> String {
    let known = [
        (libc::SIGINT, "SIGINT"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGQUIT, "SIGQUIT"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGUSR2, "SIGUSR2"),
        (libc::SIGALRM, "SIGALRM"),
        (libc::SIGVTALRM, "SIGVTALRM"),
        (libc::SIGPROF, "SIGPROF"),
        (libc::SIGIO, "SIGIO"),
        (libc::SIGPWR, "SIGPWR"),
        (libc::SIGSTKFLT, "SIGSTKFLT"),
        (libc::SIGXCPU, "SIGXCPU"),
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGPIPE, "SIGPIPE"),
        (libc::SIGXFSZ, "SIGXFSZ"),
    ];
    match known.iter().find(|(s, _)| *s == sig) {
        Some((_, n)) => n.to_string(),
        None if (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&sig) => {
            format!("SIGRTMIN+{}", sig - libc::SIGRTMIN())
        }
        None => format!("signal {sig}"),
    }
}
