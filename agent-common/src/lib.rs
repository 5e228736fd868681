#![no_std]
//! Types shared by the kernel programs (agent-ebpf) and the daemon (agent).
//!
//! Every struct is `#[repr(C)]`, made of naturally aligned u64/u32 fields with no
//! implicit padding, so the byte layout is the same on both sides.

/// Counting happens into one of two slots; the daemon flips [`EPOCH`] each interval and
/// harvests the slot that just went quiet. This is what makes every interval exact.
pub const SLOTS: usize = 2;

/// Bytes and packets each way. Bytes are IP packet lengths (IP header + L4 header +
/// payload) as cgroup_skb sees them; on tc the L2 header is included.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
}

impl Counters {
    pub const ZERO: Counters = Counters {
        tx_bytes: 0,
        rx_bytes: 0,
        tx_packets: 0,
        rx_packets: 0,
    };

    pub fn is_zero(&self) -> bool {
        self.tx_bytes == 0 && self.rx_bytes == 0 && self.tx_packets == 0 && self.rx_packets == 0
    }
}

/// Bytes and packets one way, in one epoch slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dir {
    pub bytes: u64,
    pub packets: u64,
}

/// Value of the per-socket map, keyed by socket cookie.
///
/// Sent and received counters sit 96 bytes apart, so they never share a cache line
/// (whatever the 8-byte alignment of the entry): egress and ingress of one socket often
/// run on different CPUs, and atomic adds on a shared line would make them wait for each
/// other.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockCounters {
    /// Cumulative sent counters per epoch slot.
    pub tx: [Dir; SLOTS],
    /// `epoch + 1` of the last epoch in which a sent packet was counted. The first packet
    /// of an epoch (per direction) notes the socket in that slot's active ring buffer.
    pub tx_seen: u64,
    /// Non-zero once cgroup/sock_release ran for the socket.
    pub released: u64,
    /// Non-zero once a TCP socket reached TCP_CLOSE (no more packets after that).
    pub tcp_closed: u64,
    /// Non-zero when the socket is finished but its final record could not be sent
    /// (ring buffer full): the daemon collects it from the map instead, then deletes it.
    pub final_pending: u64,
    /// 1 for an unconnected UDP socket at its first packet: its packets are also counted
    /// per peer (PEERS) for flow records.
    pub per_peer: u64,
    /// TCP state the socket left when it reached TCP_CLOSE, plus one (0 = not known).
    pub end_state: u64,
    pub _pad: [u64; 2],
    /// Cumulative received counters per epoch slot.
    pub rx: [Dir; SLOTS],
    /// Like `tx_seen`, for received packets.
    pub rx_seen: u64,
}

impl SockCounters {
    /// The four counters of one slot.
    pub fn slot(&self, s: usize) -> Counters {
        Counters {
            tx_bytes: self.tx[s].bytes,
            rx_bytes: self.rx[s].bytes,
            tx_packets: self.tx[s].packets,
            rx_packets: self.rx[s].packets,
        }
    }

    /// Both slots.
    pub fn slots(&self) -> [Counters; SLOTS] {
        [self.slot(0), self.slot(1)]
    }
}

const _: () = {
    assert!(
        core::mem::offset_of!(SockCounters, rx) - core::mem::offset_of!(SockCounters, tx) >= 96
    );
    assert!(core::mem::size_of::<SockCounters>() == 136);
};

/// Per-interface counters (tc), per epoch slot. The interface map is per-CPU: userspace
/// adds up the CPUs' values.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SlotCounters {
    pub slot: [Counters; SLOTS],
}

/// Where an owner record came from.
pub const ORIGIN_SOCK_CREATE: u32 = 1;
pub const ORIGIN_ACCEPT: u32 = 2;
pub const ORIGIN_DISCOVERED: u32 = 3;
/// Filled at sock_release from the closing task, for sockets with no owner until then
/// (accepted sockets on kernels where the accept hook cannot be loaded).
pub const ORIGIN_RELEASE: u32 = 4;
/// Filled by the first TCP send or receive call on the socket (process context:
/// tcp_sendmsg_locked, tcp_rcv_space_adjust), for accepted sockets with no owner until
/// then, when the accept hook is not available.
pub const ORIGIN_FIRST_IO: u32 = 5;

/// Who owns a socket: taken in the owning process's context (sock_create, or the accept
/// path for server-side sockets), never per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    /// Process id (the kernel's tgid).
    pub tgid: u32,
    /// Thread id (the kernel's pid).
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Thread name at creation time, NUL padded.
    pub comm: [u8; 16],
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    /// CLOCK_MONOTONIC (bpf_ktime_get_ns) at creation.
    pub created_ns: u64,
    pub family: u32,
    pub sock_type: u32,
    pub protocol: u32,
    /// One of the ORIGIN_* constants; 0 when only the addresses are known so far.
    pub origin: u32,
    /// Addresses as the socket had them at its first packet (IPv4 in `[0]`, network
    /// byte order as in the kernel). Zero when the socket never carried a packet.
    pub local_ip: [u32; 4],
    pub remote_ip: [u32; 4],
    /// Host byte order.
    pub local_port: u32,
    /// Host byte order.
    pub remote_port: u32,
    /// Address family seen on the first packet (AF_INET 2 / AF_INET6 10); 0 if none yet.
    pub addr_family: u32,
    pub _pad: u32,
}

/// Sent through the ring buffer when a socket is finished: its final cumulative counters
/// and owner, so a socket that lives less than one interval is still counted in full.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FinalRecord {
    pub cookie: u64,
    pub counters: SockCounters,
    pub owner: Owner,
    /// 1 when `owner` is valid.
    pub has_owner: u64,
}

/// Indices into the DROPS per-CPU array: every way the kernel side can fail.
pub const DROP_SOCK_INSERT: u32 = 0; // per-socket map full: bytes went to UNATTR
pub const DROP_RINGBUF_FULL: u32 = 1; // final record kept in the map for the poller
pub const DROP_OWNER_INSERT: u32 = 2; // owner map full: the socket's bytes become unattributed
pub const DROP_IFACE_MISS: u32 = 3; // tc saw an interface the daemon did not register
pub const DROP_NO_COOKIE: u32 = 4; // packet without a socket cookie (counted as unattributed)
pub const DROP_NOT_FULL_SOCK: u32 = 5; // request/timewait socket (e.g. SYN-ACK): unattributed
/// Active ring buffer of slot 0 / slot 1 full: the poller reads the whole socket map for
/// that slot instead (indices DROP_ACTIVE_LOST + slot).
pub const DROP_ACTIVE_LOST: u32 = 6;
pub const DROP_PEER_INSERT: u32 = 8; // per-peer (unconnected UDP) map full: flow records miss it
pub const DROP_COUNT: u32 = 10;

/// Names of the DROPS indices below DROP_ACTIVE_LOST that lose or misattribute something.
/// DROP_RINGBUF_FULL is not among them: a final record that did not fit the ring stays in
/// the map for the poller, and nothing is lost (a fallback, reported as such).
pub const DROP_NAMES: [(u32, &str); 5] = [
    (DROP_SOCK_INSERT, "sock_map_full"),
    (DROP_OWNER_INSERT, "owner_map_full"),
    (DROP_IFACE_MISS, "iface_unregistered"),
    (DROP_NO_COOKIE, "no_socket_cookie"),
    (DROP_NOT_FULL_SOCK, "not_full_socket"),
];

/// Map names, shared so the loader and the kernel side cannot drift apart.
pub const MAP_SOCKS: &str = "SOCKS";
pub const MAP_OWNERS: &str = "OWNERS";
pub const MAP_EPOCH: &str = "EPOCH";
pub const MAP_TOTALS: &str = "TOTALS";
pub const MAP_UNATTR: &str = "UNATTR";
pub const MAP_DROPS: &str = "DROPS";
pub const MAP_IFACES: &str = "IFACES";
pub const MAP_FINALS: &str = "FINALS";
pub const MAP_PEERS: &str = "PEERS";
/// Settings the daemon writes before attaching: SETTINGS_FLAGS holds SETTING_* bits,
/// SETTINGS_COOKIE_OFFSET the byte offset of `sk_cookie` in `struct sock` (from the
/// kernel's BTF) for tracing programs on kernels whose tracing programs may not call
/// bpf_get_socket_cookie (before 5.12).
pub const MAP_SETTINGS: &str = "SETTINGS";
pub const SETTINGS_FLAGS: u32 = 0;
pub const SETTINGS_COOKIE_OFFSET: u32 = 1;
pub const SETTINGS_COUNT: u32 = 4;
/// Count unconnected UDP sockets per peer (flow records are on).
pub const SETTING_PER_PEER: u32 = 1;
pub const DEFAULT_MAX_PEERS: u32 = 65_536;

/// Key of the per-peer counters of an unconnected UDP socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub cookie: u64,
    /// Peer address as on the wire (IPv4 in `[0]`), network byte order.
    pub addr: [u32; 4],
    /// Peer port, host byte order.
    pub port: u32,
    /// AF_INET or AF_INET6.
    pub family: u32,
}
/// Per slot: cookies of the sockets that counted in the slot's current epoch.
pub const MAP_ACTIVE: [&str; SLOTS] = ["ACTIVE0", "ACTIVE1"];

pub const DEFAULT_MAX_SOCKETS: u32 = 262_144;
pub const DEFAULT_MAX_IFACES: u32 = 256;
/// Ring sizes are memory the agent holds twice over (the kernel maps a ring's data pages
/// twice into the reader, all at mmap time): 1 MiB + 2 x 512 KiB = 4 MiB of RSS. A full
/// ring is a fallback, not a loss: finals stay in the map for the poller, lost notes make
/// the poller walk the whole map.
/// About 3,700 final records (280 B + the ring's 8 B header) per interval.
pub const FINALS_RINGBUF_BYTES: u32 = 1024 * 1024;
/// Each note is a u64 cookie plus the ring's 8 B header: 32,768 sockets per interval and
/// slot before the poller falls back to reading the whole map (with that many moving it
/// would about as soon walk it anyway).
pub const ACTIVE_RINGBUF_BYTES: u32 = 512 * 1024;

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for SockCounters {}
    unsafe impl aya::Pod for Owner {}
    unsafe impl aya::Pod for FinalRecord {}
    unsafe impl aya::Pod for SlotCounters {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for Dir {}
}
