//! Who is connecting: the local user owning the peer's socket, else the peer's address.
//!
//! Every local connection comes from 127.0.0.1 (or the host's own address), so a cap per
//! address would put every local user, the scraper included, in one bucket. For a peer
//! on this host the kernel knows the owner of the other end: one exact sock_diag lookup
//! (NETLINK_SOCK_DIAG, the interface `ss` uses) of the peer's socket by its 4-tuple gives
//! its uid. A remote peer is not found there and is keyed by address (IPv6 by /64, what one
//! host usually gets).
use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

/// The bucket a connection counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKey {
    /// A socket on this host, owned by this uid.
    Uid(u32),
    V4([u8; 4]),
    /// The /64 prefix.
    V6([u8; 8]),
    /// A loopback peer while sock_diag is unavailable: every local user would share one
    /// address, so no cap per peer applies (the total cap and eviction still do).
    UnknownLocal,
}

impl PeerKey {
    pub fn of_addr(ip: IpAddr) -> PeerKey {
        match ip.to_canonical() {
            IpAddr::V4(a) => PeerKey::V4(a.octets()),
            IpAddr::V6(a) => {
                let o = a.octets();
                PeerKey::V6(o[..8].try_into().expect("8 of 16"))
            }
        }
    }
}

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
/// struct inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// struct inet_diag_sockid: sport, dport (be16), src[4], dst[4] (be32), if, cookie[2].
const SOCKID_LEN: usize = 4 + 16 + 16 + 4 + 8;
/// Offset of idiag_uid in struct inet_diag_msg: family, state, timer, retrans, sockid,
/// expires, rqueue, wqueue, uid.
const MSG_UID_OFFSET: usize = 4 + SOCKID_LEN + 12;

/// Looks up the owner of TCP sockets on this host (one netlink socket, reused).
pub struct PeerLookup {
    fd: Option<OwnedFd>,
    seq: u32,
}

impl PeerLookup {
    pub fn new() -> PeerLookup {
        PeerLookup {
            fd: open().map_err(|e| log::warn!("metrics endpoint: sock_diag unavailable ({e}); peers are told apart by address only")).ok(),
            seq: 0,
        }
    }

    /// The key of the peer at `peer` connected to our `local`.
    pub fn key(&mut self, peer: SocketAddr, local: SocketAddr) -> PeerKey {
        match self.uid(peer, local) {
            Some(uid) => PeerKey::Uid(uid),
            None if self.fd.is_none() && peer.ip().to_canonical().is_loopback() => {
                PeerKey::UnknownLocal
            }
            None => PeerKey::of_addr(peer.ip()),
        }
    }

    fn uid(&mut self, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
        let fd = self.fd.as_ref()?;
        self.seq = self.seq.wrapping_add(1);
        let req = request(self.seq, peer, local)?;
        match exchange(fd, &req, self.seq) {
            Ok(uid) => uid,
            Err(e) => {
                log::debug!("metrics endpoint: sock_diag lookup of {peer}: {e}");
                None
            }
        }
    }
}

impl Default for PeerLookup {
    fn default() -> Self {
        PeerLookup::new()
    }
}

fn open() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // The kernel answers at once; a bound keeps a surprise from stalling accept.
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: Duration::from_millis(200).as_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` is valid for the length given.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// An exact lookup (no NLM_F_DUMP) of the socket whose own end is `peer` and whose
/// remote end is `local`: that is the peer's socket, if it lives on this host.
fn request(seq: u32, peer: SocketAddr, local: SocketAddr) -> Option<Vec<u8>> {
    let (family, src, dst) = match (peer.ip().to_canonical(), local.ip().to_canonical()) {
        (IpAddr::V4(p), IpAddr::V4(l)) => {
            let pad = |o: [u8; 4]| {
                let mut a = [0u8; 16];
                a[..4].copy_from_slice(&o);
                a
            };
            (libc::AF_INET, pad(p.octets()), pad(l.octets()))
        }
        (IpAddr::V6(p), IpAddr::V6(l)) => (libc::AF_INET6, p.octets(), l.octets()),
        _ => return None,
    };
    let len = NLMSG_HDRLEN + REQ_LEN;
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.push(family as u8);
    b.push(libc::IPPROTO_TCP as u8);
    b.push(0); // no extensions
    b.push(0);
    b.extend_from_slice(&u32::MAX.to_ne_bytes()); // any state
    b.extend_from_slice(&peer.port().to_be_bytes());
    b.extend_from_slice(&local.port().to_be_bytes());
    b.extend_from_slice(&src);
    b.extend_from_slice(&dst);
    b.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    b.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    debug_assert_eq!(b.len(), len);
    Some(b)
}

/// Sends `req` and reads the reply to `seq`: Some(uid), or None when the kernel has no
/// such socket (a remote peer).
fn exchange(fd: &OwnedFd, req: &[u8], seq: u32) -> io::Result<Option<u32>> {
    // SAFETY: `req` and `buf` are valid for the lengths given. Without an address, a
    // netlink socket sends to the kernel.
    let n = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 1024];
    // Replies to earlier lookups that timed out may still be queued: skip them.
    for _ in 0..8 {
        // SAFETY: as above.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(r) = parse_reply(&buf[..n as usize], seq)? {
            return Ok(r);
        }
    }
    Err(io::Error::other("no reply to the lookup"))
}

/// Ok(None): a reply to another lookup (read again); Ok(Some(None)): no such socket.
fn parse_reply(b: &[u8], seq: u32) -> io::Result<Option<Option<u32>>> {
    let u32_at = |o: usize| -> io::Result<u32> {
        b.get(o..o + 4)
            .map(|s| u32::from_ne_bytes(s.try_into().expect("4 bytes")))
            .ok_or_else(|| io::Error::other("short sock_diag reply"))
    };
    let ty = b
        .get(4..6)
        .map(|s| u16::from_ne_bytes(s.try_into().expect("2 bytes")))
        .ok_or_else(|| io::Error::other("short sock_diag reply"))?;
    if u32_at(8)? != seq {
        return Ok(None);
    }
    if ty == NLMSG_ERROR {
        let errno = u32_at(NLMSG_HDRLEN)? as i32;
        return match -errno {
            0 | libc::ENOENT => Ok(Some(None)),
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
    if ty != SOCK_DIAG_BY_FAMILY {
        return Err(io::Error::other(format!(
            "unexpected sock_diag reply type {ty}"
        )));
    }
    Ok(Some(Some(u32_at(NLMSG_HDRLEN + MSG_UID_OFFSET)?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn keys_of_remote_addresses() {
        let v6a: IpAddr = "2001:db8:1:2::5".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let v6c: IpAddr = "2001:db8:1:3::5".parse().unwrap();
        assert_eq!(PeerKey::of_addr(v6a), PeerKey::of_addr(v6b));
        assert_ne!(PeerKey::of_addr(v6a), PeerKey::of_addr(v6c));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(PeerKey::of_addr(mapped), PeerKey::V4([10, 1, 2, 3]));
    }

    /// The real kernel: a loopback connection's other end is found with our own uid.
    #[test]
    fn finds_the_owner_of_a_local_peer() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let mut lookup = PeerLookup::new();
        let me = unsafe { libc::geteuid() };
        assert_eq!(lookup.key(peer, s.local_addr().unwrap()), PeerKey::Uid(me));
        // Twice on one netlink socket.
        assert_eq!(lookup.key(peer, s.local_addr().unwrap()), PeerKey::Uid(me));
        // A 4-tuple nobody has: keyed by address.
        let nobody: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            lookup.key(nobody, s.local_addr().unwrap()),
            PeerKey::V4([127, 0, 0, 1])
        );
        // Without sock_diag, local peers cannot be told apart.
        let mut blind = PeerLookup { fd: None, seq: 0 };
        assert_eq!(
            blind.key(peer, s.local_addr().unwrap()),
            PeerKey::UnknownLocal
        );
        let remote: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        assert_eq!(
            blind.key(remote, s.local_addr().unwrap()),
            PeerKey::V4([192, 0, 2, 7])
        );
        drop(c);
    }
}
