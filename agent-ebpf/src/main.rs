//! sockacct kernel programs.
//!
//! Per packet (cgroup_skb): one array read for the epoch, one hash lookup by socket
//! cookie, two atomic adds to the socket's counters, two (uncontended) atomic adds to this
//! CPU's global total, and one compare: the first packet of a socket in an epoch (per
//! direction) notes its cookie in the slot's active ring buffer, so the poller reads only
//! the sockets that moved. Nothing else.
//! Owners are recorded once per socket in the owning task's context (sock_create, or the
//! accept path). Finished sockets send their final counters through a ring buffer before
//! their entries go, so nothing that closes between two polls is lost.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::{ffi::c_void, intrinsics::AtomicOrdering};

use agent_common::*;
use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_RB_NO_WAKEUP, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        TC_ACT_UNSPEC,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns,
        bpf_probe_read_kernel,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_fullsock,
        },
    },
    macros::{btf_tracepoint, cgroup_skb, cgroup_sock, classifier, fexit, map, sock_ops},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        BtfTracePointContext, FExitContext, SkBuffContext, SockContext, SockOpsContext, TcContext,
    },
};

const TCP: u32 = 6;
const UDP: u32 = 17;
const TCP_CLOSE: i32 = 7;

#[map]
static SOCKS: HashMap<u64, SockCounters> =
    HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, BPF_F_NO_PREALLOC);

#[map]
static OWNERS: HashMap<u64, Owner> =
    HashMap::with_max_entries(DEFAULT_MAX_SOCKETS, BPF_F_NO_PREALLOC);

/// Written by the daemon only; `EPOCH[0] & 1` is the slot packets count into.
#[map]
static EPOCH: Array<u32> = Array::with_max_entries(1, 0);

/// Everything cgroup_skb saw, per slot: the kernel's total that events must conserve.
#[map]
static TOTALS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(SLOTS as u32, 0);

/// Bytes that could not be given to a socket entry, per slot.
#[map]
static UNATTR: PerCpuArray<Counters> = PerCpuArray::with_max_entries(SLOTS as u32, 0);

#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_COUNT, 0);

/// ifindex -> counters, per CPU (plain adds, no atomics); entries are created by the
/// daemon when it attaches tc.
#[map]
static IFACES: PerCpuHashMap<u32, SlotCounters> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_IFACES, 0);

/// Per-peer counters of unconnected UDP sockets (flow records). Not part of the exact
/// per-interval ledger: the delta events never depend on it.
#[map]
static PEERS: HashMap<PeerKey, Counters> =
    HashMap::with_max_entries(DEFAULT_MAX_PEERS, BPF_F_NO_PREALLOC);

/// Written by the daemon before it attaches anything (SETTINGS_* indices).
#[map]
static SETTINGS: Array<u32> = Array::with_max_entries(SETTINGS_COUNT, 0);

#[map]
static FINALS: RingBuf = RingBuf::with_byte_size(FINALS_RINGBUF_BYTES, 0);

/// Cookies of the sockets that counted in the current epoch, one ring per slot: the poller
/// drains the frozen slot's ring after the grace period and reads only those sockets.
#[map]
static ACTIVE0: RingBuf = RingBuf::with_byte_size(ACTIVE_RINGBUF_BYTES, 0);
#[map]
static ACTIVE1: RingBuf = RingBuf::with_byte_size(ACTIVE_RINGBUF_BYTES, 0);

#[inline(always)]
fn xadd(p: *mut u64, v: u64) {
    // bpfel has no CAS, so AtomicU64::fetch_add is unavailable; this lowers to BPF atomic add.
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

#[inline(always)]
fn current_epoch() -> u32 {
    match EPOCH.get(0) {
        Some(e) => *e,
        None => 0,
    }
}

#[inline(always)]
fn slot_of(epoch: u32) -> usize {
    // Explicit branch keeps the index a constant for the verifier.
    if epoch & 1 == 1 { 1 } else { 0 }
}

#[inline(always)]
fn current_slot() -> usize {
    slot_of(current_epoch())
}

/// Notes `cookie` as moved in `slot`'s current epoch. A full ring is counted per slot: the
/// poller then reads the whole map for that slot, so nothing is missed.
#[inline(always)]
fn note_active(cookie: u64, slot: usize) {
    let r = if slot == 1 {
        ACTIVE1.output::<u64>(&cookie, BPF_RB_NO_WAKEUP as u64)
    } else {
        ACTIVE0.output::<u64>(&cookie, BPF_RB_NO_WAKEUP as u64)
    };
    if r.is_err() {
        drop_count(if slot == 1 {
            DROP_ACTIVE_LOST + 1
        } else {
            DROP_ACTIVE_LOST
        });
    }
}

#[inline(always)]
fn drop_count(reason: u32) {
    if let Some(p) = DROPS.get_ptr_mut(reason) {
        xadd(p, 1); // see percpu_add: programs nest on one CPU
    }
}

#[inline(always)]
fn slot_ptr<T>(c: *mut T, slot: usize) -> *mut T {
    // Explicit branch keeps the index provably in bounds for the verifier.
    if slot == 1 { unsafe { c.add(1) } } else { c }
}

/// Per-CPU counters, added with atomic adds all the same: a program does not run alone
/// on its CPU. Egress in process context runs with softirqs enabled, and a softirq that
/// sends (a TCP ACK, a timer) runs the egress program again on the same CPU in the
/// middle of it; a plain load-add-store would then lose one of the two updates and the
/// total would no longer equal what the sockets counted. The line is this CPU's own, so
/// the atomic add is never contended. (Plain adds on ingress, where nothing nests, and
/// one packed add instead of two were measured: no difference within the noise, so not
/// worth the argument they need.)
#[inline(always)]
fn percpu_add(map: &PerCpuArray<Counters>, slot: usize, len: u64, egress: bool) {
    if let Some(c) = map.get_ptr_mut(slot as u32) {
        unsafe {
            if egress {
                xadd(&raw mut (*c).tx_bytes, len);
                xadd(&raw mut (*c).tx_packets, 1);
            } else {
                xadd(&raw mut (*c).rx_bytes, len);
                xadd(&raw mut (*c).rx_packets, 1);
            }
        }
    }
}

/// IPv6 BIG TCP: an skb above 64 KiB carries an 8 B jumbo hop-by-hop header that the
/// kernel adds for itself and strips again at segmentation. It never reaches a wire or a
/// peer, so it is not counted.
#[inline(always)]
fn wire_len(ctx: &SkBuffContext) -> u64 {
    let len = ctx.len() as u64;
    const IPV6_BE: u32 = 0xdd86; // ETH_P_IPV6 as skb->protocol holds it (big endian)
    if len > 65535 + 40 && unsafe { (*ctx.skb.skb).protocol } == IPV6_BE {
        if let Ok(0u8) = ctx.load::<u8>(6) {
            return len - 8;
        }
    }
    len
}

#[inline(always)]
fn count_skb(ctx: &SkBuffContext, egress: bool) {
    let epoch = current_epoch();
    let slot = slot_of(epoch);
    let len = wire_len(ctx);
    percpu_add(&TOTALS, slot, len, egress);

    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if cookie == 0 {
        drop_count(DROP_NO_COOKIE);
        percpu_add(&UNATTR, slot, len, egress);
        return;
    }
    let entry = match SOCKS.get_ptr_mut(cookie) {
        Some(e) => e,
        None => {
            // Only full sockets get an entry: request sockets (SYN-ACKs) never see
            // sock_release, so an entry for them would never be cleaned up.
            let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
            if sk.is_null() {
                drop_count(DROP_NOT_FULL_SOCK);
                percpu_add(&UNATTR, slot, len, egress);
                return;
            }
            let full = unsafe { bpf_sk_fullsock(sk) };
            if full.is_null() {
                drop_count(DROP_NOT_FULL_SOCK);
                percpu_add(&UNATTR, slot, len, egress);
                return;
            }
            let _ = SOCKS.insert(cookie, SockCounters::default(), BPF_NOEXIST as u64);
            record_addresses(ctx, cookie, full);
            match SOCKS.get_ptr_mut(cookie) {
                Some(e) => {
                    // An unconnected UDP socket talks to many peers: count it per peer too.
                    // The socket alone cannot name the peer; the packet headers can.
                    unsafe {
                        let per_peer = SETTINGS
                            .get(SETTINGS_FLAGS)
                            .is_some_and(|v| *v & SETTING_PER_PEER != 0);
                        if per_peer && (*full).protocol == UDP && (*ctx.skb.skb).remote_port == 0 {
                            (*e).per_peer = 1;
                        }
                    }
                    e
                }
                None => {
                    drop_count(DROP_SOCK_INSERT);
                    percpu_add(&UNATTR, slot, len, egress);
                    return;
                }
            }
        }
    };
    let (dir, seen) = unsafe {
        if egress {
            (&raw mut (*entry).tx as *mut Dir, &raw mut (*entry).tx_seen)
        } else {
            (&raw mut (*entry).rx as *mut Dir, &raw mut (*entry).rx_seen)
        }
    };
    let d = slot_ptr(dir, slot);
    unsafe {
        xadd(&raw mut (*d).bytes, len);
        xadd(&raw mut (*d).packets, 1);
    }
    if unsafe { core::ptr::read_volatile(&raw const (*entry).per_peer) } != 0 {
        count_peer(ctx, cookie, len, egress);
    }
    // First packet this way in this epoch: note the socket for the poller. Two CPUs may
    // both note it (harmless: the poller deduplicates); the one that skips saw the mark
    // of one that notes it, and both finish before the grace period ends.
    let cur = epoch as u64 + 1;
    unsafe {
        if core::ptr::read_volatile(seen) != cur {
            core::ptr::write_volatile(seen, cur);
            note_active(cookie, slot);
        }
    }
}

/// Counts one datagram of an unconnected UDP socket under its peer: the destination when
/// sending, the source when receiving, read from the IP and UDP headers. Only these
/// sockets pay for the parsing.
#[inline(always)]
fn count_peer(ctx: &SkBuffContext, cookie: u64, len: u64, egress: bool) {
    const IPV4_BE: u32 = 0x0008;
    const IPV6_BE: u32 = 0xdd86;
    let proto = unsafe { (*ctx.skb.skb).protocol };
    let mut key = PeerKey {
        cookie,
        ..PeerKey::default()
    };
    if proto == IPV4_BE {
        let Ok(vihl) = ctx.load::<u8>(0) else { return };
        let Ok(l4) = ctx.load::<u8>(9) else { return };
        if l4 != UDP as u8 {
            return;
        }
        let ihl = ((vihl & 0x0f) as usize) * 4;
        let Ok(addr) = ctx.load::<u32>(if egress { 16 } else { 12 }) else {
            return;
        };
        let Ok(port) = ctx.load::<u16>(ihl + if egress { 2 } else { 0 }) else {
            return;
        };
        key.addr = [addr, 0, 0, 0];
        key.port = u16::from_be(port) as u32;
        key.family = 2;
    } else if proto == IPV6_BE {
        // Extension headers before UDP are rare on datagram sockets: skip those packets.
        let Ok(next) = ctx.load::<u8>(6) else { return };
        if next != UDP as u8 {
            return;
        }
        let Ok(addr) = ctx.load::<[u32; 4]>(if egress { 24 } else { 8 }) else {
            return;
        };
        let Ok(port) = ctx.load::<u16>(40 + if egress { 2 } else { 0 }) else {
            return;
        };
        key.addr = addr;
        key.port = u16::from_be(port) as u32;
        key.family = 10;
    } else {
        return;
    }
    let c = match PEERS.get_ptr_mut(&key) {
        Some(c) => c,
        None => {
            let _ = PEERS.insert(&key, &Counters::ZERO, BPF_NOEXIST as u64);
            match PEERS.get_ptr_mut(&key) {
                Some(c) => c,
                None => {
                    drop_count(DROP_PEER_INSERT);
                    return;
                }
            }
        }
    };
    unsafe {
        if egress {
            xadd(&raw mut (*c).tx_bytes, len);
            xadd(&raw mut (*c).tx_packets, 1);
        } else {
            xadd(&raw mut (*c).rx_bytes, len);
            xadd(&raw mut (*c).rx_packets, 1);
        }
    }
}

/// First packet of a socket: remember its addresses (from the socket, not the packet)
/// next to its owner, so rules can match ports and peers. Runs once per socket.
#[inline(always)]
fn record_addresses(ctx: &SkBuffContext, cookie: u64, sk: *mut aya_ebpf::bindings::bpf_sock) {
    let skb = ctx.skb.skb;
    let owner = match OWNERS.get_ptr_mut(cookie) {
        Some(o) => o,
        None => {
            // No owner yet (accepted or pre-existing socket): keep the addresses; the
            // accept hook or the daemon fills in the rest.
            // Losing the race to an accept hook inserting the same entry is fine: it is
            // filled in below either way.
            let _ = OWNERS.insert(cookie, Owner::default(), BPF_NOEXIST as u64);
            match OWNERS.get_ptr_mut(cookie) {
                Some(o) => o,
                None => {
                    drop_count(DROP_OWNER_INSERT);
                    return;
                }
            }
        }
    };
    unsafe {
        if (*owner).origin == 0 && !sk.is_null() {
            (*owner).family = (*sk).family;
            (*owner).sock_type = (*sk).type_;
            (*owner).protocol = (*sk).protocol;
        }
        let family = (*skb).family;
        (*owner).addr_family = family;
        if family == 2 {
            (*owner).local_ip = [(*skb).local_ip4, 0, 0, 0];
            (*owner).remote_ip = [(*skb).remote_ip4, 0, 0, 0];
        } else {
            // Word by word: the verifier rejects a memcpy from the context.
            let l = &raw const (*skb).local_ip6;
            let r = &raw const (*skb).remote_ip6;
            (*owner).local_ip = [
                core::ptr::read_volatile(&raw const (*l)[0]),
                core::ptr::read_volatile(&raw const (*l)[1]),
                core::ptr::read_volatile(&raw const (*l)[2]),
                core::ptr::read_volatile(&raw const (*l)[3]),
            ];
            (*owner).remote_ip = [
                core::ptr::read_volatile(&raw const (*r)[0]),
                core::ptr::read_volatile(&raw const (*r)[1]),
                core::ptr::read_volatile(&raw const (*r)[2]),
                core::ptr::read_volatile(&raw const (*r)[3]),
            ];
        }
        (*owner).local_port = (*skb).local_port;
        // On little-endian hosts the kernel loads the socket's big-endian port and shifts
        // it into the upper 16 bits of remote_port.
        (*owner).remote_port = u16::from_be(((*skb).remote_port >> 16) as u16) as u32;
    }
}

#[cgroup_skb(ingress)]
pub fn sockacct_ingress(ctx: SkBuffContext) -> i32 {
    count_skb(&ctx, false);
    1 // always allow: we count, never filter
}

#[cgroup_skb(egress)]
pub fn sockacct_egress(ctx: SkBuffContext) -> i32 {
    count_skb(&ctx, true);
    1
}

// ------------------------------------------------------------------ cookies in tracing programs

/// How a tracing program (tp_btf, fexit) learns a socket's cookie. Kernels from 5.12 on
/// let it call bpf_get_socket_cookie; older ones refuse the helper there, so their
/// `_compat` programs read `sk->sk_cookie` at the offset the daemon found in BTF. That
/// reads 0 for a socket whose cookie was never handed out, which is harmless: every socket
/// we account has had one since sock_create, its first counted packet, or (accepted
/// sockets) the end of its handshake (sockacct_passive).
type CookieOf = fn(*mut c_void) -> u64;

#[inline(always)]
fn cookie_by_helper(sk: *mut c_void) -> u64 {
    unsafe { bpf_get_socket_cookie(sk) }
}

#[inline(always)]
fn cookie_by_read(sk: *mut c_void) -> u64 {
    let off = match SETTINGS.get(SETTINGS_COOKIE_OFFSET) {
        Some(o) if *o != 0 => *o as usize,
        _ => return 0,
    };
    unsafe { bpf_probe_read_kernel((sk as *const u8).add(off) as *const u64) }.unwrap_or(0)
}

// ------------------------------------------------------------------ owners

#[inline(always)]
fn current_owner(origin: u32) -> Owner {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    Owner {
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        netns_cookie: 0,
        created_ns: unsafe { bpf_ktime_get_ns() },
        family: 0,
        sock_type: 0,
        protocol: 0,
        origin,
        ..Owner::default()
    }
}

#[cgroup_sock(sock_create)]
pub fn sockacct_sock_create(ctx: SockContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let sk = unsafe { &*ctx.sock };
    let mut owner = current_owner(ORIGIN_SOCK_CREATE);
    owner.netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    owner.family = sk.family;
    owner.sock_type = sk.type_;
    owner.protocol = sk.protocol;
    if OWNERS.insert(cookie, owner, 0).is_err() {
        drop_count(DROP_OWNER_INSERT);
    }
    1 // allow the socket
}

/// Server-side sockets never pass sock_create: take their owner from the task that
/// accept()s them. The listener's owner supplies netns and socket kind. fexit's context
/// holds the arguments and then the return value, so where the new socket is depends on
/// the kernel's signature: `inet_csk_accept(sk, arg)` from 6.10, `(sk, flags, err, kern)`
/// before; the daemon picks the program from the function's BTF.
#[fexit(function = "inet_csk_accept")]
pub fn sockacct_accept(ctx: FExitContext) -> i32 {
    accepted(ctx.arg(0), ctx.arg(2), cookie_by_helper)
}

#[fexit(function = "inet_csk_accept")]
pub fn sockacct_accept4(ctx: FExitContext) -> i32 {
    accepted(ctx.arg(0), ctx.arg(4), cookie_by_helper)
}

#[fexit(function = "inet_csk_accept")]
pub fn sockacct_accept4_compat(ctx: FExitContext) -> i32 {
    accepted(ctx.arg(0), ctx.arg(4), cookie_by_read)
}

#[inline(always)]
fn accepted(listener: *mut c_void, newsk: *mut c_void, cookie_of: CookieOf) -> i32 {
    if newsk.is_null() {
        return 0;
    }
    let cookie = cookie_of(newsk);
    if cookie == 0 {
        return 0;
    }
    let lcookie = cookie_of(listener);
    let mut owner = current_owner(ORIGIN_ACCEPT);
    if let Some(l) = unsafe { OWNERS.get(lcookie) } {
        owner.netns_cookie = l.netns_cookie;
        owner.family = l.family;
        owner.sock_type = l.sock_type;
        owner.protocol = l.protocol;
    } else {
        owner.sock_type = 1; // SOCK_STREAM: inet_csk_accept serves connection sockets
        owner.protocol = TCP;
    }
    // Data may arrive before accept() returns, and its first packet records the socket's
    // addresses in this same entry (record_addresses, in softirq, maybe on another CPU).
    // Never overwrite a whole entry: insert only when there is none, else fill in the
    // owner's fields in place, so addresses written meanwhile are kept.
    if OWNERS.insert(cookie, owner, BPF_NOEXIST as u64).is_ok() {
        return 0;
    }
    match OWNERS.get_ptr_mut(cookie) {
        Some(o) => unsafe {
            adopt_current_task(o, ORIGIN_ACCEPT);
            (*o).netns_cookie = owner.netns_cookie;
            (*o).family = owner.family;
            (*o).sock_type = owner.sock_type;
            (*o).protocol = owner.protocol;
        },
        None => drop_count(DROP_OWNER_INSERT),
    }
    0
}

/// Fallback owner for server-side sockets where the accept hook cannot be loaded: the
/// first process to send or receive on the socket. Hooked on TCP's own send and receive
/// paths (tcp_sendmsg_locked, tcp_rcv_space_adjust from tcp_recvmsg: process context),
/// so other protocols never pay for it; attached only when needed, one lookup per call.
/// The owner entry exists from the handshake on (sockacct_passive), so the very first
/// send, before any packet was counted, already finds it.
/// Makes the running task the owner of an entry that had addresses only (origin 0),
/// keeping the addresses and socket kind already recorded.
#[inline(always)]
fn adopt_current_task(o: *mut Owner, origin: u32) {
    let cur = current_owner(origin);
    unsafe {
        (*o).tgid = cur.tgid;
        (*o).pid = cur.pid;
        (*o).uid = cur.uid;
        (*o).gid = cur.gid;
        (*o).comm = cur.comm;
        (*o).cgroup_id = cur.cgroup_id;
        (*o).created_ns = cur.created_ns;
        (*o).origin = origin;
    }
}

#[inline(always)]
fn first_io(ctx: &BtfTracePointContext, cookie_of: CookieOf) -> i32 {
    let sk: *mut c_void = ctx.arg(0);
    if sk.is_null() {
        return 0;
    }
    let cookie = cookie_of(sk);
    if let Some(o) = OWNERS.get_ptr_mut(cookie) {
        if unsafe { (*o).origin } == 0 {
            adopt_current_task(o, ORIGIN_FIRST_IO);
        }
    }
    0
}

#[btf_tracepoint(function = "tcp_rcv_space_adjust")]
pub fn sockacct_first_recv(ctx: BtfTracePointContext) -> i32 {
    first_io(&ctx, cookie_by_helper)
}

#[btf_tracepoint(function = "tcp_rcv_space_adjust")]
pub fn sockacct_first_recv_compat(ctx: BtfTracePointContext) -> i32 {
    first_io(&ctx, cookie_by_read)
}

/// tcp_sendmsg_locked(sk, msg, skb, size_goal) fires once per chunk a send queues, with
/// `skb` the tail of the write queue. A socket's first send finds its queue empty; a bulk
/// sender's queue is rarely empty: only look at sends into an empty queue.
#[btf_tracepoint(function = "tcp_sendmsg_locked")]
pub fn sockacct_first_send(ctx: BtfTracePointContext) -> i32 {
    let tail: *const c_void = ctx.arg(2);
    if !tail.is_null() {
        return 0;
    }
    first_io(&ctx, cookie_by_helper)
}

/// Kernels without the TCP tracepoints: every send and receive of every socket.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn sockacct_first_recv_any(ctx: BtfTracePointContext) -> i32 {
    first_io(&ctx, cookie_by_helper)
}

#[btf_tracepoint(function = "sock_send_length")]
pub fn sockacct_first_send_any(ctx: BtfTracePointContext) -> i32 {
    first_io(&ctx, cookie_by_helper)
}

/// With the first-I/O fallback only: an accepted socket of the cgroup gets its (empty)
/// owner entry when its handshake completes, so first_io can fill it in before the
/// socket's first packet. Runs a few times per TCP connection, never per packet.
#[sock_ops]
pub fn sockacct_passive(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops as *mut c_void) };
        let owner = Owner {
            family: ctx.family(),
            sock_type: 1,
            protocol: TCP,
            ..Owner::default()
        };
        if OWNERS.insert(cookie, owner, BPF_NOEXIST as u64).is_err()
            && OWNERS.get_ptr(cookie).is_none()
        {
            drop_count(DROP_OWNER_INSERT);
        }
    }
    1
}

// ------------------------------------------------------------------ end of a socket

/// Sends the socket's final counters and owner, then removes its entries. When the ring
/// buffer is full the entry stays, marked, for the poller to collect: nothing is lost.
#[inline(always)]
fn finish(cookie: u64, entry: *mut SockCounters) {
    match FINALS.reserve::<FinalRecord>(0) {
        Some(mut rec) => {
            let r = rec.as_mut_ptr();
            unsafe {
                (*r).cookie = cookie;
                (*r).counters = *entry;
                match OWNERS.get(cookie) {
                    Some(o) => {
                        (*r).owner = *o;
                        (*r).has_owner = 1;
                    }
                    None => {
                        (*r).owner = Owner::default();
                        (*r).has_owner = 0;
                    }
                }
            }
            // Submit before removing: a poller reading the map and then the ring buffer
            // sees the socket in at least one of them, never in neither.
            // No wakeup: the poller reads on its own schedule, nobody waits on the ring.
            rec.submit(BPF_RB_NO_WAKEUP as u64);
            let _ = SOCKS.remove(cookie);
            let _ = OWNERS.remove(cookie);
        }
        None => {
            // The entry stays, marked, with its counters frozen (no packets after the
            // end). No note in the active ring: a socket that counted in this epoch is
            // noted already, and one that did not has nothing left to harvest; the
            // poller finds marked entries by a walk spread over its ticks, which this
            // counter starts. (Noting each of 100k closing sockets overflowed the
            // active ring and cost whole-map walks.)
            unsafe { (*entry).final_pending = 1 };
            drop_count(DROP_RINGBUF_FULL);
        }
    }
}

#[cgroup_sock(sock_release)]
pub fn sockacct_sock_release(ctx: SockContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let sk = unsafe { &*ctx.sock };
    // A socket with no owner yet (accepted, with no accept hook) is closed by the process
    // holding it: that is its owner, and the final record should say so.
    if let Some(o) = OWNERS.get_ptr_mut(cookie) {
        if unsafe { (*o).origin } == 0 {
            adopt_current_task(o, ORIGIN_RELEASE);
            unsafe {
                (*o).netns_cookie = bpf_get_netns_cookie(ctx.as_ptr());
                (*o).family = sk.family;
                (*o).sock_type = sk.type_;
                (*o).protocol = sk.protocol;
            }
        }
    }
    match SOCKS.get_ptr_mut(cookie) {
        Some(entry) => {
            xadd(unsafe { &raw mut (*entry).released }, 1);
            // A TCP socket still sends after close() (queued data, FIN): it is finished
            // only once it has also reached TCP_CLOSE. Both flags are set with atomic adds
            // (full barriers), so of the two racing hooks at least one sees the other's.
            let done = sk.protocol != TCP
                || sk.state == TCP_CLOSE as u32
                || unsafe { core::ptr::read_volatile(&raw const (*entry).tcp_closed) } != 0;
            if done {
                finish(cookie, entry);
            }
        }
        None => {
            // Never carried a byte: only the owner record to drop.
            let _ = OWNERS.remove(cookie);
        }
    }
    1
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn sockacct_tcp_state(ctx: BtfTracePointContext) -> i32 {
    tcp_state(&ctx, cookie_by_helper)
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn sockacct_tcp_state_compat(ctx: BtfTracePointContext) -> i32 {
    tcp_state(&ctx, cookie_by_read)
}

#[inline(always)]
fn tcp_state(ctx: &BtfTracePointContext, cookie_of: CookieOf) -> i32 {
    let newstate: i32 = ctx.arg(2);
    if newstate != TCP_CLOSE {
        return 0;
    }
    let sk: *mut c_void = ctx.arg(0);
    let oldstate: i32 = ctx.arg(1);
    let cookie = cookie_of(sk);
    if cookie == 0 {
        return 0;
    }
    match SOCKS.get_ptr_mut(cookie) {
        Some(entry) => {
            // Written before the flag: the final record copies the entry after seeing it.
            unsafe { core::ptr::write_volatile(&raw mut (*entry).end_state, oldstate as u64 + 1) };
            xadd(unsafe { &raw mut (*entry).tcp_closed }, 1);
            if unsafe { core::ptr::read_volatile(&raw const (*entry).released) } != 0 {
                finish(cookie, entry);
            }
        }
        None => {
            // Never carried a byte: an owner entry nobody filled in (an accepted socket
            // closed before any process touched it) would never see sock_release.
            if let Some(o) = OWNERS.get_ptr(cookie) {
                if unsafe { (*o).origin } == 0 {
                    let _ = OWNERS.remove(cookie);
                }
            }
        }
    }
    0
}

// ------------------------------------------------------------------ interfaces (tc)

#[inline(always)]
fn count_iface(ctx: &TcContext, egress: bool) {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match IFACES.get_ptr_mut(ifindex) {
        Some(e) => {
            // This CPU's copy, with plain adds: unlike cgroup_skb egress, tc never nests on
            // a CPU (egress runs in __dev_queue_xmit with softirqs off, ingress in
            // softirq), and the two directions add to different words.
            let c = slot_ptr(
                unsafe { &raw mut (*e).slot } as *mut Counters,
                current_slot(),
            );
            let len = ctx.len() as u64;
            unsafe {
                if egress {
                    (*c).tx_bytes += len;
                    (*c).tx_packets += 1;
                } else {
                    (*c).rx_bytes += len;
                    (*c).rx_packets += 1;
                }
            }
        }
        None => drop_count(DROP_IFACE_MISS),
    }
}

// TC_ACT_UNSPEC (TCX_NEXT): we only count, so the next program or filter on the
// interface still runs. TC_ACT_OK would be a verdict that ends the chain: a program
// attached after ours (another agent, a second sockacct) would never see the packet.
#[classifier]
pub fn sockacct_tc_ingress(ctx: TcContext) -> i32 {
    count_iface(&ctx, false);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn sockacct_tc_egress(ctx: TcContext) -> i32 {
    count_iface(&ctx, true);
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
