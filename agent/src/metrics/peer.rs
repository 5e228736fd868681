//! Who is connecting: the local user owning the peer's socket, else the peer's address.
//!
//! Every local connection comes from 127.0.0.1 (or the host's own address), so a cap per
//! address would put every local user, the scraper included, in one bucket. For a peer
//! on this host the kernel knows the owner of the other end: one exact sock_diag lookup
//! (NETLINK_SOCK_DIAG, the interface `ss` uses) of the peer's socket by its 4-tuple gives
//! its uid. A remote peer is not found there and is keyed by address (IPv6 by /64, what one
//! host usually gets).
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use crate::discover::SocketLookup;

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

/// Looks up the owner of TCP sockets on this host (one netlink socket, reused).
pub struct PeerLookup {
    lookup: Option<SocketLookup>,
}

impl PeerLookup {
    pub fn new() -> PeerLookup {
        PeerLookup {
            lookup: SocketLookup::open(Duration::from_millis(200)).map_err(|e| log::warn!("metrics endpoint: sock_diag unavailable ({e}); peers are told apart by address only")).ok(),
        }
    }

    /// The key of the peer at `peer` connected to our `local`.
    pub fn key(&mut self, peer: SocketAddr, local: SocketAddr) -> PeerKey {
        match self.uid(peer, local) {
            Some(uid) => PeerKey::Uid(uid),
            None if self.lookup.is_none() && peer.ip().to_canonical().is_loopback() => {
                PeerKey::UnknownLocal
            }
            None => PeerKey::of_addr(peer.ip()),
        }
    }

    /// The uid owning the peer's socket: the one whose own end is `peer` and whose
    /// other end is our `local`, if it lives on this host.
    fn uid(&mut self, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
        match self.lookup.as_mut()?.tcp(peer, local) {
            Ok(found) => found.map(|s| s.uid),
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
        let mut blind = PeerLookup { lookup: None };
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
