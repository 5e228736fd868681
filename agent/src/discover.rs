//! Discovery of inet sockets that existed before the agent started, and of their owners.
//!
//! The kernel programs only learn a socket's owner when it is created or first used
//! after they are attached; for older sockets the agent asks the kernel for every TCP
//! and UDP socket over `NETLINK_SOCK_DIAG` (the interface `ss` uses), which reports each
//! socket's cookie (the key the kernel programs use) and inode, and then finds the
//! process holding each inode by scanning `/proc/*/fd`.
//!
//! **Only the network namespace of the calling thread is covered**: a sock_diag netlink
//! socket reports the sockets of the namespace it was created in. Sockets of other
//! namespaces (containers) are not discovered.

use std::collections::HashMap;
use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::procfs;

/// `SOCK_DIAG_BY_FAMILY` from `<linux/sock_diag.h>`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// Ask for sockets in every TCP state (bit `1 << state` for each state).
const ALL_STATES: u32 = 0xffff_ffff;
/// Receive buffer: the kernel builds dump datagrams of at most 32 KiB.
const RECV_BUF: usize = 64 * 1024;

/// `struct nlmsghdr` from `<linux/netlink.h>`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct NlMsgHdr {
    nlmsg_len: u32,
    nlmsg_type: u16,
    nlmsg_flags: u16,
    nlmsg_seq: u32,
    nlmsg_pid: u32,
}

/// `struct inet_diag_sockid` from `<linux/inet_diag.h>`. Ports and addresses are in
/// network byte order; an IPv4 address is the first 4 bytes of `src`/`dst`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct InetDiagSockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    if_index: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct InetDiagReqV2 {
    sdiag_family: u8,
    sdiag_protocol: u8,
    idiag_ext: u8,
    pad: u8,
    idiag_states: u32,
    id: InetDiagSockId,
}

/// `struct inet_diag_msg`, the fixed head of every dump reply (attributes follow it).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct InetDiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: InetDiagSockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

/// The request as it goes on the wire.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct DumpRequest {
    hdr: NlMsgHdr,
    req: InetDiagReqV2,
}

const _: () = {
    assert!(size_of::<NlMsgHdr>() == 16);
    assert!(size_of::<InetDiagSockId>() == 48);
    assert!(size_of::<InetDiagReqV2>() == 56);
    assert!(size_of::<InetDiagMsg>() == 72);
    assert!(size_of::<DumpRequest>() == 72);
};

/// One inet socket found in the calling thread's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredSocket {
    /// Socket cookie, as `getsockopt(SO_COOKIE)` and `bpf_get_socket_cookie` report it.
    pub cookie: u64,
    /// Inode of the socket file; 0 for sockets without one (TIME_WAIT, SYN_RECV requests).
    pub inode: u64,
    /// `AF_INET` or `AF_INET6` (an IPv6 socket may carry IPv4-mapped addresses).
    pub family: u8,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub protocol: u8,
    /// Kernel TCP state number (`TCP_ESTABLISHED` = 1 ... `TCP_NEW_SYN_RECV` = 12); UDP
    /// sockets report 7 (`TCP_CLOSE`) when unconnected and 1 when connected.
    pub state: u8,
    pub local: SocketAddr,
    /// Unspecified address and port 0 for listening and unconnected sockets.
    pub remote: SocketAddr,
    /// The socket's uid (as seen from the agent's user namespace).
    pub uid: u32,
    /// The process holding the socket, if one was found; always `None` from
    /// [`list_inet_sockets`].
    pub owner: Option<procfs::ProcInfo>,
}

/// Why a sock_diag dump failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("cannot open a NETLINK_SOCK_DIAG socket: {error}")]
    Socket { error: io::Error },
    #[error("cannot send the sock_diag dump request for {what}: {error}")]
    Send {
        what: &'static str,
        error: io::Error,
    },
    #[error("cannot receive the sock_diag reply for {what}: {error}")]
    Recv {
        what: &'static str,
        error: io::Error,
    },
    #[error("the kernel refused the sock_diag dump of {what}: {error}")]
    Kernel {
        what: &'static str,
        error: io::Error,
    },
    #[error("malformed sock_diag reply for {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
}

/// The four dumps: (family, protocol, name for messages).
const DUMPS: [(u8, u8, &str); 4] = [
    (libc::AF_INET as u8, libc::IPPROTO_TCP as u8, "TCP/IPv4"),
    (libc::AF_INET6 as u8, libc::IPPROTO_TCP as u8, "TCP/IPv6"),
    (libc::AF_INET as u8, libc::IPPROTO_UDP as u8, "UDP/IPv4"),
    (libc::AF_INET6 as u8, libc::IPPROTO_UDP as u8, "UDP/IPv6"),
];

/// Every TCP and UDP socket, IPv4 and IPv6, in every state, of the calling thread's
/// network namespace, as sock_diag reports them (`owner` is `None`).
///
/// A family or protocol the kernel has no sock_diag handler for (IPv6 not built, the
/// `udp_diag` module unavailable) is skipped with a warning rather than failing the whole.
pub fn list_inet_sockets() -> Result<Vec<DiscoveredSocket>, DiscoverError> {
    let sock = DiagSocket::open()?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; RECV_BUF];
    for (seq, &(family, protocol, what)) in (1u32..).zip(DUMPS.iter()) {
        match sock.dump(family, protocol, what, seq, &mut buf, &mut out) {
            Ok(()) => {}
            Err(DiscoverError::Kernel { what, error })
                if matches!(
                    error.raw_os_error(),
                    Some(libc::ENOENT | libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT)
                ) =>
            {
                log::warn!("sock_diag: no {what} sockets discovered: {error}");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// [`list_inet_sockets`], with `owner` filled from a scan of `/proc/*/fd`.
///
/// Sockets without an inode (TIME_WAIT, pending connection requests), held by no process
/// (kernel sockets, fds in flight) or by a process we may not inspect (when not root), get
/// `owner: None`. When several processes share a socket, the one with the lowest pid is
/// named. Covers only the calling thread's network namespace.
pub fn discover_existing() -> Result<Vec<DiscoveredSocket>, DiscoverError> {
    // Dump first, then scan: any socket in the dump that is still open during the scan is
    // found in some fd table.
    let mut sockets = list_inet_sockets()?;
    let owners = procfs::socket_inodes_by_pid();
    let mut infos: HashMap<u32, Option<procfs::ProcInfo>> = HashMap::new();
    for s in &mut sockets {
        if s.inode == 0 {
            continue;
        }
        let Some(&tgid) = owners.get(&s.inode) else {
            continue;
        };
        s.owner = infos
            .entry(tgid)
            .or_insert_with(|| procfs::proc_info(tgid))
            .clone();
    }
    Ok(sockets)
}

/// A `NETLINK_SOCK_DIAG` socket.
struct DiagSocket {
    fd: OwnedFd,
}

impl DiagSocket {
    fn open() -> Result<Self, DiscoverError> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(DiscoverError::Socket {
                error: io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Dump all sockets of one family and protocol into `out`.
    fn dump(
        &self,
        family: u8,
        protocol: u8,
        what: &'static str,
        seq: u32,
        buf: &mut [u8],
        out: &mut Vec<DiscoveredSocket>,
    ) -> Result<(), DiscoverError> {
        self.send_request(family, protocol, what, seq, None)?;
        loop {
            let n = self.recv(buf, what)?;
            if self.parse_datagram(&buf[..n], protocol, what, seq, out)? {
                return Ok(());
            }
        }
    }

    /// A dump of every socket of `family`/`protocol`, or (with `exact`) one lookup of the
    /// socket with that id.
    fn send_request(
        &self,
        family: u8,
        protocol: u8,
        what: &'static str,
        seq: u32,
        exact: Option<InetDiagSockId>,
    ) -> Result<(), DiscoverError> {
        let flags = match exact {
            Some(_) => libc::NLM_F_REQUEST,
            None => libc::NLM_F_REQUEST | libc::NLM_F_DUMP,
        };
        let req = DumpRequest {
            hdr: NlMsgHdr {
                nlmsg_len: size_of::<DumpRequest>() as u32,
                nlmsg_type: SOCK_DIAG_BY_FAMILY,
                nlmsg_flags: flags as u16,
                nlmsg_seq: seq,
                nlmsg_pid: 0,
            },
            req: InetDiagReqV2 {
                sdiag_family: family,
                sdiag_protocol: protocol,
                idiag_states: ALL_STATES,
                id: exact.unwrap_or_default(),
                ..Default::default()
            },
        };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: `req` and `kernel` are valid for the lengths given.
            let rc = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    (&raw const req).cast(),
                    size_of::<DumpRequest>(),
                    0,
                    (&raw const kernel).cast(),
                    size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if rc >= 0 {
                return if rc as usize == size_of::<DumpRequest>() {
                    Ok(())
                } else {
                    Err(DiscoverError::Send {
                        what,
                        error: io::Error::new(io::ErrorKind::WriteZero, "short send"),
                    })
                };
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(DiscoverError::Send { what, error });
            }
        }
    }

    /// Receive one datagram; an over-long (truncated) one is an error.
    fn recv(&self, buf: &mut [u8], what: &'static str) -> Result<usize, DiscoverError> {
        loop {
            // SAFETY: `buf` is valid and writable for its length. MSG_TRUNC makes netlink
            // return the datagram's real length, so truncation can be told.
            let rc = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if rc < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(DiscoverError::Recv { what, error });
            }
            let n = rc as usize;
            if n > buf.len() {
                return Err(DiscoverError::Malformed {
                    what,
                    detail: format!(
                        "datagram of {n} bytes exceeds the {} byte buffer",
                        buf.len()
                    ),
                });
            }
            if n == 0 {
                return Err(DiscoverError::Malformed {
                    what,
                    detail: "empty datagram before NLMSG_DONE".into(),
                });
            }
            return Ok(n);
        }
    }

    /// Parse the netlink messages of one datagram. Returns true once the dump is complete.
    fn parse_datagram(
        &self,
        mut data: &[u8],
        protocol: u8,
        what: &'static str,
        seq: u32,
        out: &mut Vec<DiscoveredSocket>,
    ) -> Result<bool, DiscoverError> {
        let malformed = |detail: String| DiscoverError::Malformed { what, detail };
        while !data.is_empty() {
            if data.len() < size_of::<NlMsgHdr>() {
                return Err(malformed(format!("{} trailing bytes", data.len())));
            }
            // SAFETY: at least size_of::<NlMsgHdr>() bytes; read_unaligned has no alignment needs.
            let hdr: NlMsgHdr = unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
            let len = hdr.nlmsg_len as usize;
            if len < size_of::<NlMsgHdr>() || len > data.len() {
                return Err(malformed(format!(
                    "message length {len} with {} bytes left",
                    data.len()
                )));
            }
            let payload = &data[size_of::<NlMsgHdr>()..len];
            // Messages are padded to 4 bytes (NLMSG_ALIGN).
            data = &data[len.next_multiple_of(4).min(data.len())..];

            if hdr.nlmsg_seq != seq {
                // A stale reply from an earlier, abandoned request: not ours.
                continue;
            }
            match i32::from(hdr.nlmsg_type) {
                libc::NLMSG_DONE => {
                    // The dump's final status; negative errno if it failed midway.
                    if let Some(b) = payload.get(..4) {
                        let status = i32::from_ne_bytes(b.try_into().unwrap());
                        if status < 0 {
                            return Err(DiscoverError::Kernel {
                                what,
                                error: io::Error::from_raw_os_error(-status),
                            });
                        }
                    }
                    return Ok(true);
                }
                libc::NLMSG_ERROR => {
                    let Some(b) = payload.get(..4) else {
                        return Err(malformed("short NLMSG_ERROR".into()));
                    };
                    let errno = i32::from_ne_bytes(b.try_into().unwrap());
                    if errno == 0 {
                        return Ok(true); // an ACK: nothing more will come
                    }
                    return Err(DiscoverError::Kernel {
                        what,
                        error: io::Error::from_raw_os_error(errno.saturating_neg()),
                    });
                }
                t if t == i32::from(SOCK_DIAG_BY_FAMILY) => {
                    if payload.len() < size_of::<InetDiagMsg>() {
                        return Err(malformed(format!(
                            "inet_diag_msg of {} bytes",
                            payload.len()
                        )));
                    }
                    // SAFETY: at least size_of::<InetDiagMsg>() bytes, read unaligned.
                    let msg: InetDiagMsg =
                        unsafe { std::ptr::read_unaligned(payload.as_ptr().cast()) };
                    out.push(socket_from_msg(&msg, protocol).ok_or_else(|| {
                        malformed(format!("unexpected address family {}", msg.family))
                    })?);
                }
                // NLMSG_NOOP, NLMSG_OVERRUN and anything new: nothing to take.
                _ => {}
            }
        }
        Ok(false)
    }
}

/// A sock_diag socket kept open for exact lookups of one TCP socket by its addresses (the
/// metrics endpoint asks who owns the other end of each connection it accepts).
pub struct SocketLookup {
    sock: DiagSocket,
    seq: u32,
    buf: Vec<u8>,
}

impl SocketLookup {
    /// Opens the socket; each reply is waited for at most `timeout` (the kernel answers at
    /// once: the bound keeps a surprise from stalling the caller).
    pub fn open(timeout: std::time::Duration) -> Result<SocketLookup, DiscoverError> {
        let sock = DiagSocket::open()?;
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: `tv` is valid for the length given.
        let r = unsafe {
            libc::setsockopt(
                sock.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(DiscoverError::Socket {
                error: io::Error::last_os_error(),
            });
        }
        Ok(SocketLookup {
            sock,
            seq: 0,
            buf: vec![0u8; 4096],
        })
    }

    /// The TCP socket of this network namespace whose own end is `local` and whose other
    /// end is `remote`; `None` when there is none (e.g. `local` is on another host).
    pub fn tcp(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Result<Option<DiscoveredSocket>, DiscoverError> {
        const WHAT: &str = "one TCP socket";
        let (family, src, dst) = match (local.ip().to_canonical(), remote.ip().to_canonical()) {
            (std::net::IpAddr::V4(l), std::net::IpAddr::V4(r)) => {
                let pad = |o: [u8; 4]| {
                    let mut a = [0u8; 16];
                    a[..4].copy_from_slice(&o);
                    a
                };
                (libc::AF_INET, pad(l.octets()), pad(r.octets()))
            }
            (std::net::IpAddr::V6(l), std::net::IpAddr::V6(r)) => {
                (libc::AF_INET6, l.octets(), r.octets())
            }
            _ => return Ok(None),
        };
        let id = InetDiagSockId {
            sport: local.port().to_be_bytes(),
            dport: remote.port().to_be_bytes(),
            src,
            dst,
            if_index: 0,
            cookie: [u32::MAX; 2], // INET_DIAG_NOCOOKIE
        };
        self.seq = self.seq.wrapping_add(1);
        let tcp = libc::IPPROTO_TCP as u8;
        self.sock
            .send_request(family as u8, tcp, WHAT, self.seq, Some(id))?;
        let mut out = vec![];
        // Replies to earlier lookups that timed out may still be queued: they carry
        // another sequence number and are skipped.
        for _ in 0..8 {
            let n = self.sock.recv(&mut self.buf, WHAT)?;
            match self
                .sock
                .parse_datagram(&self.buf[..n], tcp, WHAT, self.seq, &mut out)
            {
                Ok(_) if !out.is_empty() => return Ok(out.pop()),
                Ok(true) => return Ok(None),
                Ok(false) => {}
                Err(DiscoverError::Kernel { error, .. })
                    if error.raw_os_error() == Some(libc::ENOENT) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        Err(DiscoverError::Malformed {
            what: WHAT,
            detail: "no reply to the lookup".into(),
        })
    }
}

/// A [`DiscoveredSocket`] (without owner) from one reply; `None` for a family that is
/// neither AF_INET nor AF_INET6.
fn socket_from_msg(msg: &InetDiagMsg, protocol: u8) -> Option<DiscoveredSocket> {
    let id = &msg.id;
    let sport = u16::from_be_bytes(id.sport);
    let dport = u16::from_be_bytes(id.dport);
    let (local, remote) = match i32::from(msg.family) {
        libc::AF_INET => {
            let src = Ipv4Addr::new(id.src[0], id.src[1], id.src[2], id.src[3]);
            let dst = Ipv4Addr::new(id.dst[0], id.dst[1], id.dst[2], id.dst[3]);
            (
                SocketAddr::V4(SocketAddrV4::new(src, sport)),
                SocketAddr::V4(SocketAddrV4::new(dst, dport)),
            )
        }
        libc::AF_INET6 => {
            let src = Ipv6Addr::from(id.src);
            let dst = Ipv6Addr::from(id.dst);
            (
                SocketAddr::V6(SocketAddrV6::new(
                    src,
                    sport,
                    0,
                    scope_for(src, id.if_index),
                )),
                SocketAddr::V6(SocketAddrV6::new(
                    dst,
                    dport,
                    0,
                    scope_for(dst, id.if_index),
                )),
            )
        }
        _ => return None,
    };
    Some(DiscoveredSocket {
        cookie: (u64::from(id.cookie[1]) << 32) | u64::from(id.cookie[0]),
        inode: u64::from(msg.inode),
        family: msg.family,
        protocol,
        state: msg.state,
        local,
        remote,
        uid: msg.uid,
        owner: None,
    })
}

/// The bound interface is the scope of a link-local (unicast, or interface- or link-scope
/// multicast) IPv6 address; other addresses get none.
fn scope_for(addr: Ipv6Addr, if_index: u32) -> u32 {
    let local_multicast = addr.is_multicast() && (addr.segments()[0] & 0x000f) <= 2;
    if addr.is_unicast_link_local() || local_multicast {
        if_index
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::fd::AsRawFd;
    use std::time::Instant;

    const SO_COOKIE: libc::c_int = 57;

    fn so_cookie(fd: &impl AsRawFd) -> u64 {
        let mut cookie = 0u64;
        let mut len = size_of::<u64>() as libc::socklen_t;
        // SAFETY: `cookie` is a writable u64 and `len` its size.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "SO_COOKIE: {}", io::Error::last_os_error());
        cookie
    }

    fn fd_inode(fd: &impl AsRawFd) -> u64 {
        let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        let s = target.to_str().unwrap();
        s.strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
            .unwrap()
            .parse()
            .unwrap()
    }

    struct Expect {
        name: &'static str,
        cookie: u64,
        inode: u64,
        family: i32,
        protocol: i32,
        state: u8,
        local: SocketAddr,
        remote: SocketAddr,
    }

    fn tcp_trio(
        ip: &str,
        name: &'static str,
        family: i32,
        keep: &mut Vec<Box<dyn AsRawFd>>,
    ) -> Vec<Expect> {
        let unspec: SocketAddr = if family == libc::AF_INET {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let laddr = listener.local_addr().unwrap();
        let client = TcpStream::connect(laddr).unwrap();
        let (server, _) = listener.accept().unwrap();
        let caddr = client.local_addr().unwrap();
        let v = vec![
            Expect {
                name,
                cookie: so_cookie(&listener),
                inode: fd_inode(&listener),
                family,
                protocol: libc::IPPROTO_TCP,
                state: 10, // TCP_LISTEN
                local: laddr,
                remote: unspec,
            },
            Expect {
                name,
                cookie: so_cookie(&client),
                inode: fd_inode(&client),
                family,
                protocol: libc::IPPROTO_TCP,
                state: 1, // TCP_ESTABLISHED
                local: caddr,
                remote: laddr,
            },
            Expect {
                name,
                cookie: so_cookie(&server),
                inode: fd_inode(&server),
                family,
                protocol: libc::IPPROTO_TCP,
                state: 1,
                local: laddr,
                remote: caddr,
            },
        ];
        keep.push(Box::new(listener));
        keep.push(Box::new(client));
        keep.push(Box::new(server));
        v
    }

    #[test]
    fn finds_own_sockets_with_cookies_and_owner() {
        let mut keep: Vec<Box<dyn AsRawFd>> = Vec::new();
        let mut expect = tcp_trio("127.0.0.1", "tcp4", libc::AF_INET, &mut keep);
        expect.extend(tcp_trio("::1", "tcp6", libc::AF_INET6, &mut keep));
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        expect.push(Expect {
            name: "udp4",
            cookie: so_cookie(&udp),
            inode: fd_inode(&udp),
            family: libc::AF_INET,
            protocol: libc::IPPROTO_UDP,
            state: 7, // TCP_CLOSE: unconnected
            local: udp.local_addr().unwrap(),
            remote: "0.0.0.0:0".parse().unwrap(),
        });

        let start = Instant::now();
        let found = discover_existing().expect("discover_existing");
        let took = start.elapsed();
        eprintln!("discover_existing: {} sockets in {took:?}", found.len());

        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        let comm = comm.trim_end_matches('\n');
        let by_cookie: HashMap<u64, &DiscoveredSocket> =
            found.iter().map(|s| (s.cookie, s)).collect();
        for e in &expect {
            let s = by_cookie.get(&e.cookie).unwrap_or_else(|| {
                panic!(
                    "{} socket {} (cookie {}) not found",
                    e.name, e.local, e.cookie
                )
            });
            assert_eq!(s.inode, e.inode, "{}", e.name);
            assert_eq!(i32::from(s.family), e.family, "{}", e.name);
            assert_eq!(i32::from(s.protocol), e.protocol, "{}", e.name);
            assert_eq!(s.state, e.state, "{} {}", e.name, e.local);
            assert_eq!(s.local, e.local, "{}", e.name);
            assert_eq!(s.remote, e.remote, "{}", e.name);
            // SAFETY: getuid cannot fail.
            assert_eq!(s.uid, unsafe { libc::getuid() }, "{}", e.name);
            let owner = s
                .owner
                .as_ref()
                .unwrap_or_else(|| panic!("{} has no owner", e.name));
            assert_eq!(owner.tgid, std::process::id(), "{}", e.name);
            assert_eq!(owner.comm, comm, "{}", e.name);
        }
        // Cookies are unique.
        assert_eq!(by_cookie.len(), found.len());
        drop(keep);
    }

    #[test]
    fn list_has_no_owners_and_matches_so_cookie() {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.connect("127.0.0.1:9").unwrap();
        let cookie = so_cookie(&udp);
        let list = list_inet_sockets().unwrap();
        assert!(list.iter().all(|s| s.owner.is_none()));
        let s = list
            .iter()
            .find(|s| s.cookie == cookie)
            .expect("connected UDP socket");
        assert_eq!(s.state, 1);
        assert_eq!(s.remote, "127.0.0.1:9".parse::<SocketAddr>().unwrap());
        assert_eq!(s.local, udp.local_addr().unwrap());
    }

    #[test]
    fn parses_a_reply_by_hand() {
        let mut msg = InetDiagMsg {
            family: libc::AF_INET6 as u8,
            state: 1,
            uid: 1000,
            inode: 4242,
            ..Default::default()
        };
        msg.id.sport = 8080u16.to_be_bytes();
        msg.id.dport = 443u16.to_be_bytes();
        msg.id.src = "fe80::1".parse::<Ipv6Addr>().unwrap().octets();
        msg.id.dst = "::ffff:10.0.0.1".parse::<Ipv6Addr>().unwrap().octets();
        msg.id.if_index = 3;
        msg.id.cookie = [0x1122_3344, 0x5566_7788];
        let s = socket_from_msg(&msg, libc::IPPROTO_TCP as u8).unwrap();
        assert_eq!(s.cookie, 0x5566_7788_1122_3344);
        assert_eq!(s.local, "[fe80::1%3]:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(
            s.remote,
            "[::ffff:10.0.0.1]:443".parse::<SocketAddr>().unwrap()
        );
        assert_eq!((s.inode, s.uid, s.state), (4242, 1000, 1));
        msg.family = 99;
        assert!(socket_from_msg(&msg, libc::IPPROTO_TCP as u8).is_none());
    }

    #[test]
    fn error_messages_name_the_step_and_errno() {
        let e = DiscoverError::Kernel {
            what: "UDP/IPv6",
            error: io::Error::from_raw_os_error(libc::EPERM),
        };
        let text = e.to_string();
        assert!(
            text.contains("UDP/IPv6") && text.contains("os error 1"),
            "{text}"
        );
    }
}
