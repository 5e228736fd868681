//! Who is on the other end of a control connection, pinned once at accept: a pid alone
//! can be reused by another process (of another user) while the connection stays open,
//! so the peer's process is held by a pidfd and every request checks it still runs.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    sync::Arc,
};

/// The connecting process, as the kernel recorded it at connect().
#[derive(Debug, Clone)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, read once while the pidfd proved the process was the peer.
    pub groups: Vec<u32>,
    /// The peer process; `None` for a peer already gone when its connection was taken.
    pidfd: Option<Arc<OwnedFd>>,
    /// The connecting process had exited before the connection was taken.
    gone: bool,
}

impl Peer {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// A peer whose process exited before its connection was taken: it is kept (so its
    /// requests are refused with the reason, rather than the connection dropped), and
    /// never alive.
    pub fn gone(pid: i32, uid: u32, gid: u32) -> Peer {
        Peer {
            pid,
            uid,
            gid,
            groups: vec![],
            pidfd: None,
            gone: true,
        }
    }

    /// Whether the process that connected still runs (so `pid` still names it). A pidfd
    /// becomes readable when its process exits.
    pub fn alive(&self) -> bool {
        if self.gone {
            return false;
        }
        let Some(fd) = &self.pidfd else {
            return true;
        };
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n == 0
    }

    pub fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.pidfd.as_deref().map(AsFd::as_fd)
    }
}

/// Why a peer could not be pinned.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("reading the peer's credentials: {0}")]
    Cred(io::Error),
    #[error("the connecting process (pid {}) is gone", .0.pid)]
    Gone(Peer),
}

/// Takes the peer of `s`: SO_PEERCRED, and its process as a pidfd: SO_PEERPIDFD where
/// the kernel has it (6.5+, exact), else pidfd_open of the pid with a check that the
/// process started before now (a process that took over the pid after connect() would
/// have started later... or in the same clock tick, which this cannot tell).
pub fn pin(s: BorrowedFd<'_>) -> Result<Peer, PinError> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    getsockopt(s, libc::SO_PEERCRED, &mut cred).map_err(PinError::Cred)?;
    let gone = || PinError::Gone(Peer::gone(cred.pid, cred.uid, cred.gid));
    let pidfd = match getsockopt::<libc::c_int>(s, libc::SO_PEERPIDFD, &mut -1) {
        Ok(fd) => fd,
        Err(_) => open_checked(cred.pid).ok_or_else(gone)?,
    };
    // SAFETY: a new descriptor the kernel just gave us; no one else owns it.
    let pidfd = Arc::new(unsafe { OwnedFd::from_raw_fd(pidfd) });
    let mut peer = Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
        groups: vec![],
        pidfd: Some(pidfd),
        gone: false,
    };
    peer.groups = groups_of(peer.pid);
    // Read while the process ran: the groups are the peer's, not a successor's.
    if !peer.alive() {
        return Err(gone());
    }
    Ok(peer)
}

fn getsockopt<T: Copy>(s: BorrowedFd<'_>, opt: libc::c_int, v: &mut T) -> io::Result<T> {
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `v` is a valid, writable T of `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (v as *mut T).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(*v)
}

/// pidfd_open(pid), refused when the process started after this call began (so it
/// cannot be the one that connected).
fn open_checked(pid: i32) -> Option<libc::c_int> {
    let now = boot_ticks();
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
    if fd < 0 {
        return None;
    }
    let started = start_ticks(pid);
    if started.is_none_or(|s| now.is_some_and(|n| s > n)) {
        // SAFETY: we own fd and close it once.
        unsafe { libc::close(fd) };
        return None;
    }
    Some(fd)
}

/// Clock ticks since boot, in the unit of /proc/<pid>/stat's start time.
fn boot_ticks() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return None;
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ts.tv_sec as u64 * hz + ts.tv_nsec as u64 * hz / 1_000_000_000)
}

/// Field 22 of /proc/<pid>/stat (after the parenthesised name, which may hold spaces).
fn start_ticks(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
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

/// A socket the peer process holds now: the uid that created it (the socket inode's
/// owner), if one of its descriptors is socket `cookie`. Each socket descriptor is
/// duplicated with pidfd_getfd (needs ptrace rights over it, which the root daemon has)
/// and asked for SO_COOKIE. Blocking: it walks the process's descriptors.
pub fn held_socket_uid(peer: &Peer, cookie: u64) -> Option<u32> {
    let pidfd = peer.pidfd()?;
    let dir = std::fs::read_dir(format!("/proc/{}/fd", peer.pid)).ok()?;
    let mut found = None;
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
        // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags; it returns a
        // new descriptor of ours or -1.
        let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        if dup < 0 {
            continue;
        }
        // SAFETY: the new descriptor is ours alone; OwnedFd closes it.
        let dup = unsafe { OwnedFd::from_raw_fd(dup as i32) };
        if getsockopt::<u64>(dup.as_fd(), libc::SO_COOKIE, &mut 0).ok() == Some(cookie) {
            // SAFETY: fstat into a zeroed stat buffer.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            if unsafe { libc::fstat(dup.as_raw_fd(), &mut st) } == 0 {
                found = Some(st.st_uid);
            }
            break;
        }
    }
    // The walk read /proc/<pid>: only trust it if the pid still named our peer after it.
    found.filter(|_| peer.alive())
}

/// Whether `peer` may name socket `cookie`: root may; anyone else must be the socket's
/// owner by uid, and its process must have created (or accepted) it by the kernel's
/// owner record, or hold it now. A peer whose process has exited may not.
pub fn owns_socket(owners: BorrowedFd<'_>, peer: &Peer, cookie: u64) -> Result<(), String> {
    if peer.is_root() {
        return Ok(());
    }
    if !peer.alive() {
        return Err(gone(peer));
    }
    let not_yours = || {
        format!(
            "socket {cookie} is not yours: process {} (uid {}) neither created it nor holds it, or it belongs to another user (get your socket's cookie with getsockopt SO_COOKIE)",
            peer.pid, peer.uid
        )
    };
    let owner = crate::bpfsys::lookup::<u64, agent_common::Owner>(owners, &cookie)
        .ok()
        .flatten()
        .filter(|o| o.origin != 0);
    if let Some(o) = &owner
        && o.uid != peer.uid
    {
        return Err(not_yours());
    }
    let created = owner.is_some_and(|o| o.tgid as i32 == peer.pid);
    let ok = if created {
        true
    } else {
        held_socket_uid(peer, cookie).is_some_and(|uid| uid == peer.uid)
    };
    if !peer.alive() {
        return Err(gone(peer));
    }
    if ok { Ok(()) } else { Err(not_yours()) }
}

pub fn gone(peer: &Peer) -> String {
    format!(
        "the process that opened this connection (pid {}) has exited: requests on it are refused; connect again",
        peer.pid
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cookie_of(fd: BorrowedFd<'_>) -> u64 {
        getsockopt::<u64>(fd, libc::SO_COOKIE, &mut 0).unwrap()
    }

    #[test]
    fn pins_itself_and_finds_a_socket_it_holds() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let me = pin(a.as_fd()).unwrap();
        assert_eq!(me.pid, std::process::id() as i32);
        assert!(me.alive());
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = cookie_of(l.as_fd());
        // SAFETY: geteuid has no preconditions.
        assert_eq!(held_socket_uid(&me, c), Some(unsafe { libc::geteuid() }));
        assert_eq!(held_socket_uid(&me, c + 1_000_000), None);
    }

    #[test]
    fn a_peer_whose_process_exited_is_not_alive() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        // SAFETY: the child only calls async-signal-safe functions before _exit.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // The child connects nothing; it only has to exist. Exit at once.
            unsafe { libc::_exit(0) };
        }
        let mut p = pin(a.as_fd()).unwrap();
        // Point the pidfd at the child instead, as if it had connected.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child, 0) } as i32;
        assert!(fd >= 0);
        p.pidfd = Some(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }));
        let mut st = 0;
        unsafe { libc::waitpid(child, &mut st, 0) };
        assert!(!p.alive());
        drop(b);
    }

    #[test]
    fn start_time_parses_names_with_spaces_and_parens() {
        let me = std::process::id() as i32;
        let s = start_ticks(me).unwrap();
        assert!(s <= boot_ticks().unwrap());
    }
}
