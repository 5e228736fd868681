//! Integration tests against the real kernel: the real agent binary attached to a cgroup
//! of the test's own, real traffic from peer processes placed in that cgroup, exact byte
//! counts with the header arithmetic written out.
//!
//! Header arithmetic used throughout (Linux defaults: TCP timestamps on):
//! - IPv4 TCP segment: 20 B IP + 20 B TCP + 12 B timestamp option = 52 B of headers.
//! - IPv6 TCP segment: 40 B IP + 32 B TCP = 72 B of headers.
//! - SYN and SYN-ACK carry 8 B more options (MSS 4 + SACK-permitted 2 + window scale 3
//!   + NOP padding, 20 B of options instead of 12): +8 B each, once per connection.
//! - Offloaded (GSO/GRO) packets are one skb with one set of headers, so the formula is
//!   per counted packet: bytes = payload + headers × packets (+ 8 per SYN).
//! - UDP datagram: payload + 8 B UDP + 20 B IPv4 (or 40 B IPv6).
//! - Retransmitted segments really cross the socket again and are counted: a TCP sender's
//!   payload is what TCP_INFO's bytes_sent says (retransmissions included), and its peer
//!   receives between the payload and the payload plus the retransmitted bytes.
use std::{os::fd::AsRawFd, process::Command, time::Duration};

use sockacct_tests::*;

const V4_TCP_HDR: u64 = 20 + 20 + 12;
const V6_TCP_HDR: u64 = 40 + 20 + 12;
const SYN_EXTRA: u64 = 8;

/// What a TCP sender says it put on the wire: payload bytes including retransmissions
/// (TCP_INFO bytes_sent), and how many of those were retransmissions.
#[derive(Debug, Clone, Copy)]
struct Wire {
    sent: u64,
    retrans: u64,
    /// Segments received out of order (the socket then sent SACK options).
    ooo: u64,
}

impl Wire {
    fn of(p: &mut Peer) -> Wire {
        Wire {
            sent: p.value("wire_sent"),
            retrans: p.value("wire_retrans"),
            ooo: p.value("wire_ooo"),
        }
    }

    /// Loss or reordering on either side: TCP options (SACK) vary, so only bounds hold.
    fn lossy(a: &Wire, b: &Wire) -> bool {
        a.retrans + b.retrans + a.ooo + b.ooo > 0
    }
}

/// Sizes of one SACK option with 1 to 4 blocks, padded (2 NOPs + kind + length + 8 each).
const D_SACK_OPTION: [u64; 4] = [12, 20, 28, 36];

/// One direction of one socket (or label): `got` bytes over `packets` packets must be
/// `payload + hdr × packets + extra`. When the connection saw loss or reordering (`lossy`),
/// packets may also carry SACK options (up to 40 B more per header) and the receiver may
/// see retransmitted copies (`dup_slack` bytes): then only bounds can be checked, and the
/// test says so.
fn tcp_dir_ok(
    got: u64,
    payload: u64,
    hdr: u64,
    packets: u64,
    extra: u64,
    lossy: bool,
    dup_slack: u64,
) -> bool {
    let base = payload + hdr * packets + extra;
    if lossy {
        got >= base && got <= base + dup_slack + 40 * packets
    } else if got == base {
        true
    } else if got > base && D_SACK_OPTION.contains(&(got - base)) {
        // One packet with one SACK option (2 NOPs + 2 + 8 per block): seen once in a
        // TCG guest with no retransmission or reordering in TCP_INFO. One option on one
        // packet, not a per-packet error: anything else still fails.
        eprintln!(
            "note: {} B more than the header arithmetic: one SACK option",
            got - base
        );
        true
    } else {
        false
    }
}

fn check_tcp(
    what: &str,
    got: u64,
    payload: u64,
    hdr: u64,
    packets: u64,
    extra: u64,
    lossy: bool,
    dup_slack: u64,
) {
    if lossy {
        eprintln!(
            "{what}: the connection saw loss or reordering; checking bounds, not exact bytes"
        );
    }
    assert!(
        tcp_dir_ok(got, payload, hdr, packets, extra, lossy, dup_slack),
        "{what}: counted {got} B in {packets} packets, expected {payload} + {hdr} × {packets} + {extra} = {}{}",
        payload + hdr * packets + extra,
        if lossy {
            " (or a little more: retransmissions)"
        } else {
            ""
        }
    );
}

fn tcp_exact(tag: &str, addr: &str, hdr: u64) {
    let cg = TestCgroup::new(tag);
    let d = Daemon::start(&cg, &["--interval", "100"]);
    let (up, down) = (1_000_000u64, 300_000u64);
    let mut srv = Peer::spawn(
        Some(&cg),
        None,
        "acct-server",
        &["tcp-serve", addr, "1", &down.to_string()],
    );
    let port = srv.value("port").to_string();
    let mut cli = Peer::spawn(
        Some(&cg),
        None,
        "acct-client",
        &["tcp-connect", addr, &port, "1", &up.to_string()],
    );
    assert_eq!(cli.value("sent"), up);
    assert_eq!(cli.value("received"), down);
    assert_eq!(srv.value("received"), up);
    let (cw, sw) = (Wire::of(&mut cli), Wire::of(&mut srv));
    cli.finish();
    srv.finish();
    let events = d.stop();
    check_events(&events);
    let s = sum(&events);
    eprintln!("{tag}: {:?} client wire {cw:?} server wire {sw:?}", s);
    let c = label(&s, "acct-client");
    let sv = label(&s, "acct-server");
    let lossy = Wire::lossy(&cw, &sw);
    // Client: sends the SYN, receives the SYN-ACK.
    check_tcp(
        "client tx",
        c.tx,
        cw.sent,
        hdr,
        c.tx_packets,
        SYN_EXTRA,
        lossy,
        0,
    );
    check_tcp(
        "client rx",
        c.rx,
        down,
        hdr,
        c.rx_packets,
        SYN_EXTRA,
        lossy,
        sw.retrans,
    );
    // Server side (listener + accepted socket, both owned by acct-server): receives the
    // SYN, sends the SYN-ACK.
    check_tcp(
        "server rx",
        sv.rx,
        up,
        hdr,
        sv.rx_packets,
        SYN_EXTRA,
        lossy,
        cw.retrans,
    );
    // Some kernels (seen on 6.1) never run the cgroup egress hook for an IPv6 SYN-ACK:
    // ip6_xmit sends it on the listener while skb->sk is the request socket, and the hook
    // runs only when the two match. The client still receives it, so then the client's rx
    // has exactly that packet (headers + SYN options, no payload) more than the server's
    // tx, and the kernel's total does not hold it either (conservation is unaffected).
    let synack_unseen = hdr == V6_TCP_HDR
        && !lossy
        && c.rx_packets == sv.tx_packets + 1
        && c.rx == sv.tx + hdr + SYN_EXTRA;
    if synack_unseen {
        eprintln!("{tag}: this kernel's egress hook does not see the IPv6 SYN-ACK");
    }
    check_tcp(
        "server tx",
        sv.tx,
        sw.sent,
        hdr,
        sv.tx_packets,
        if synack_unseen { 0 } else { SYN_EXTRA },
        lossy,
        0,
    );
    assert_eq!(
        s.labels.len(),
        2,
        "only the two peers moved bytes: {:?}",
        s.labels
    );
    assert!(
        s.unattributed.is_zero(),
        "unattributed: {:?}",
        s.unattributed
    );
}

#[test]
fn tcp_ipv4_counts_every_byte_per_direction() {
    if !require_root("tcp_ipv4") {
        return;
    }
    tcp_exact("tcp4", "127.0.0.1", V4_TCP_HDR);
}

#[test]
fn tcp_ipv6_counts_every_byte_per_direction() {
    if !require_root("tcp_ipv6") {
        return;
    }
    tcp_exact("tcp6", "::1", V6_TCP_HDR);
}

fn udp_exact(tag: &str, addr: &str, ip_hdr: u64) {
    let cg = TestCgroup::new(tag);
    let d = Daemon::start(&cg, &["--interval", "100"]);
    let (count, size) = (1000u64, 100u64);
    let mut rcv = Peer::spawn(Some(&cg), None, "udp-recv", &["udp-recv", addr]);
    let port = rcv.value("port").to_string();
    let mut snd = Peer::spawn(
        Some(&cg),
        None,
        "udp-send",
        &[
            "udp-send",
            addr,
            &port,
            &count.to_string(),
            &size.to_string(),
        ],
    );
    assert_eq!(snd.value("sent"), count);
    snd.finish();
    // A 1-byte datagram from a differently named process tells the receiver to stop.
    Peer::spawn(Some(&cg), None, "udp-stop", &["udp-stop", addr, &port]).finish();
    let got = rcv.value("datagrams");
    assert_eq!(rcv.value("bytes"), got * size);
    let drops = rcv.value("drops");
    rcv.finish();
    let events = d.stop();
    check_events(&events);
    let s = sum(&events);
    eprintln!("{tag}: {:?}", s);
    let per = size + 8 + ip_hdr;
    let tx = label(&s, "udp-send");
    assert_eq!(
        tx.tx,
        count * per,
        "sender bytes = datagrams × (payload + UDP 8 + IP {ip_hdr})"
    );
    assert_eq!(tx.tx_packets, count);
    assert_eq!((tx.rx, tx.rx_packets), (0, 0));
    let rx = label(&s, "udp-recv");
    // What reached the receiving socket: what the application read, what the kernel
    // dropped for a full buffer, and the stop datagram (1 B payload).
    assert_eq!(rx.rx, (got + drops) * per + (1 + 8 + ip_hdr));
    assert_eq!(rx.rx_packets, got + drops + 1);
    assert_eq!(
        got + drops,
        count,
        "loopback loses nothing before the socket"
    );
    let stop = label(&s, "udp-stop");
    assert_eq!((stop.tx, stop.tx_packets), (1 + 8 + ip_hdr, 1));
    assert!(s.unattributed.is_zero());
}

#[test]
fn udp_ipv4_counts_datagrams_exactly() {
    if !require_root("udp_ipv4") {
        return;
    }
    udp_exact("udp4", "127.0.0.1", 20);
}

#[test]
fn udp_ipv6_counts_datagrams_exactly() {
    if !require_root("udp_ipv6") {
        return;
    }
    udp_exact("udp6", "::1", 40);
}

/// A connection that opens and closes well inside one 1 s interval is reported in full by
/// the regular ticks (through the final records of sock_release), not only at shutdown.
#[test]
fn short_lived_socket_is_counted_in_full() {
    if !require_root("short_lived") {
        return;
    }
    let cg = TestCgroup::new("short");
    let d = Daemon::start(&cg, &["--interval", "1000"]);
    let (up, down) = (50_000u64, 7_000u64);
    let mut srv = Peer::spawn(
        Some(&cg),
        None,
        "short-srv",
        &["tcp-serve", "127.0.0.1", "1", &down.to_string()],
    );
    let port = srv.value("port").to_string();
    let mut cli = Peer::spawn(
        Some(&cg),
        None,
        "short-cli",
        &["short-tcp", "127.0.0.1", &port, &up.to_string()],
    );
    assert_eq!(cli.value("received"), down);
    let (cw, sw) = (Wire::of(&mut cli), Wire::of(&mut srv));
    cli.finish();
    srv.finish();
    // Wait (while the agent runs) until the regular events hold the whole connection.
    let full = wait_for(
        "the short connection in the regular events",
        // Generous: a TCG guest on a busy machine may poll slowly.
        Duration::from_secs(30),
        || {
            let s = sum(&d.events());
            let c = s.labels.get("short-cli").copied()?;
            let sv = s.labels.get("short-srv").copied()?;
            let lossy = Wire::lossy(&cw, &sw);
            let h = V4_TCP_HDR;
            let complete = tcp_dir_ok(c.tx, cw.sent, h, c.tx_packets, SYN_EXTRA, lossy, 0)
                && tcp_dir_ok(c.rx, down, h, c.rx_packets, SYN_EXTRA, lossy, sw.retrans)
                && tcp_dir_ok(sv.rx, up, h, sv.rx_packets, SYN_EXTRA, lossy, cw.retrans)
                && tcp_dir_ok(sv.tx, sw.sent, h, sv.tx_packets, SYN_EXTRA, lossy, 0);
            complete.then_some(s)
        },
    );
    let events = d.stop();
    check_events(&events);
    // Nothing more arrived for it at shutdown.
    let all = sum(&events);
    assert_eq!(label(&all, "short-cli"), label(&full, "short-cli"));
    assert_eq!(label(&all, "short-srv"), label(&full, "short-srv"));
}

/// A pre-fork server: the listener belongs to one process, the connection is accepted
/// and served by a forked worker with another name. The worker's label gets the
/// connection's bytes; the listener's owner gets only the handshake the listener handled.
#[test]
fn server_side_socket_is_labelled_with_the_accepting_process() {
    if !require_root("accepting_process") {
        return;
    }
    let cg = TestCgroup::new("fork");
    let d = Daemon::start(&cg, &["--interval", "100"]);
    let (greeting, up, down) = (1_000u64, 80_000u64, 20_000u64);
    let mut srv = Peer::spawn(
        Some(&cg),
        None,
        "acct-parent",
        &[
            "tcp-serve-fork",
            "127.0.0.1",
            "acct-worker",
            &greeting.to_string(),
            &down.to_string(),
        ],
    );
    let port = srv.value("port").to_string();
    let mut cli = Peer::spawn(
        Some(&cg),
        None,
        "acct-client",
        &[
            "tcp-greeted",
            "127.0.0.1",
            &port,
            &greeting.to_string(),
            &up.to_string(),
        ],
    );
    assert_eq!(cli.value("received"), greeting + down);
    assert_eq!(srv.value("received"), up);
    let (cw, sw) = (Wire::of(&mut cli), Wire::of(&mut srv));
    cli.finish();
    srv.finish();
    let events = d.stop();
    check_events(&events);
    let s = sum(&events);
    eprintln!("fork: {:?}", s);
    let lossy = Wire::lossy(&cw, &sw);
    let h = V4_TCP_HDR;
    let w = label(&s, "acct-worker");
    check_tcp("worker tx", w.tx, sw.sent, h, w.tx_packets, 0, lossy, 0);
    check_tcp("worker rx", w.rx, up, h, w.rx_packets, 0, lossy, cw.retrans);
    // The listener took the SYN (60 B) and the handshake's final ACK (52 B), and sent
    // the SYN-ACK (60 B), on behalf of its owner.
    let p = label(&s, "acct-parent");
    if !lossy {
        assert_eq!((p.rx, p.rx_packets), (60 + 52, 2), "listener rx");
        assert_eq!((p.tx, p.tx_packets), (60, 1), "listener tx");
    }
    let c = label(&s, "acct-client");
    check_tcp(
        "client tx",
        c.tx,
        cw.sent,
        h,
        c.tx_packets,
        SYN_EXTRA,
        lossy,
        0,
    );
    assert!(s.unattributed.is_zero());
}

/// Sockets opened before the agent started are attributed to their processes (found
/// through sock_diag and /proc), not dumped as unattributed.
#[test]
fn sockets_opened_before_the_agent_are_attributed() {
    if !require_root("preexisting") {
        return;
    }
    let cg = TestCgroup::new("pre");
    let (up, down) = (200_000u64, 30_000u64);
    let mut srv = Peer::spawn(
        Some(&cg),
        None,
        "pre-server",
        &["tcp-serve", "127.0.0.1", "1", &down.to_string()],
    );
    let port = srv.value("port").to_string();
    let mut cli = Peer::spawn(
        Some(&cg),
        None,
        "pre-client",
        &["hold-tcp", "127.0.0.1", &port, &up.to_string()],
    );
    cli.expect_line("connected");
    let d = Daemon::start(&cg, &["--interval", "100"]);
    cli.send_line("go");
    assert_eq!(cli.value("received"), down);
    let (cw, sw) = (Wire::of(&mut cli), Wire::of(&mut srv));
    cli.finish();
    srv.finish();
    let events = d.stop();
    check_events(&events);
    let s = sum(&events);
    eprintln!("preexisting: {:?}", s);
    // The handshake happened before the agent: no SYN in these counts.
    let lossy = Wire::lossy(&cw, &sw);
    let c = label(&s, "pre-client");
    check_tcp(
        "client tx",
        c.tx,
        cw.sent,
        V4_TCP_HDR,
        c.tx_packets,
        0,
        lossy,
        0,
    );
    check_tcp(
        "client rx",
        c.rx,
        down,
        V4_TCP_HDR,
        c.rx_packets,
        0,
        lossy,
        sw.retrans,
    );
    let sv = label(&s, "pre-server");
    check_tcp(
        "server rx",
        sv.rx,
        up,
        V4_TCP_HDR,
        sv.rx_packets,
        0,
        lossy,
        cw.retrans,
    );
    check_tcp(
        "server tx",
        sv.tx,
        sw.sent,
        V4_TCP_HDR,
        sv.tx_packets,
        0,
        lossy,
        0,
    );
    assert!(
        s.unattributed.is_zero(),
        "unattributed: {:?}",
        s.unattributed
    );
}

const BPF_PROG_QUERY: libc::c_long = 16;

/// Number of programs attached to `cgroup` for `attach_type` (BPF_PROG_QUERY).
fn attached_programs(cgroup: &std::path::Path, attach_type: u32) -> u32 {
    #[repr(C)]
    #[derive(Default)]
    struct QueryAttr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    let f = std::fs::File::open(cgroup).unwrap();
    let mut ids = [0u32; 64];
    let mut a = QueryAttr {
        target_fd: f.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut a as *mut QueryAttr,
            std::mem::size_of::<QueryAttr>() as u32,
        )
    };
    assert!(
        r == 0,
        "BPF_PROG_QUERY: {}",
        std::io::Error::last_os_error()
    );
    a.prog_cnt
}

/// `--cgroup` scopes counting: a peer outside the cgroup is not counted at all, and after
/// SIGTERM no program is left attached.
#[test]
fn scoped_cgroup_counts_nothing_outside_and_detaches() {
    if !require_root("scoped") {
        return;
    }
    let inside = TestCgroup::new("in");
    let outside = TestCgroup::new("out");
    let d = Daemon::start(&inside, &["--interval", "100"]);
    // ingress, egress, sock_create, sock_release
    for t in [0, 1, 2, 34] {
        assert_eq!(
            attached_programs(&inside.path, t),
            1,
            "attach type {t} while running"
        );
    }
    let up = 123_456u64;
    let mut srv = Peer::spawn(
        Some(&outside),
        None,
        "out-server",
        &["tcp-serve", "127.0.0.1", "1", "0"],
    );
    let port = srv.value("port").to_string();
    let mut cli = Peer::spawn(
        Some(&inside),
        None,
        "in-client",
        &["tcp-connect", "127.0.0.1", &port, "1", &up.to_string()],
    );
    cli.value("sent");
    let cw = Wire::of(&mut cli);
    cli.finish();
    srv.finish();
    let events = d.stop();
    // ... and sock_ops (3), attached on kernels without a (cookie-creating) accept hook.
    for t in [0, 1, 2, 3, 34] {
        assert_eq!(
            attached_programs(&inside.path, t),
            0,
            "attach type {t} after stop"
        );
    }
    check_events(&events);
    let s = sum(&events);
    assert_eq!(
        s.labels.keys().collect::<Vec<_>>(),
        vec!["in-client"],
        "only the inside peer is counted"
    );
    let c = label(&s, "in-client");
    assert!(up <= cw.sent);
    // The peer outside may have SACKed our data: bounds only then.
    check_tcp(
        "client tx",
        c.tx,
        cw.sent,
        V4_TCP_HDR,
        c.tx_packets,
        SYN_EXTRA,
        cw.retrans + cw.ooo > 0,
        0,
    );
    assert_eq!(s.total, *c);
}

/// Traffic over a veth pair into a namespace shows up per interface (tc), with the 14 B
/// Ethernet header on every packet the socket counted.
#[test]
fn veth_traffic_shows_up_per_interface() {
    if !require_root("veth") {
        return;
    }
    let net = VethNs::new("v", 7);
    let cg = TestCgroup::new("veth");
    let d = Daemon::start(&cg, &["--interval", "100", "--iface", &net.host_if]);
    let (up, down) = (400_000u64, 100_000u64);
    // The server runs inside the namespace (and outside the cgroup): only the client's
    // socket is counted by the cgroup programs; tc sees the link.
    let mut srv = Peer::spawn(
        None,
        Some(&net.ns),
        "ns-server",
        &["tcp-serve", &net.peer_ip, "1", &down.to_string()],
    );
    let port = srv.value("port").to_string();
    let mut cli = Peer::spawn(
        Some(&cg),
        None,
        "veth-client",
        &["tcp-connect", &net.peer_ip, &port, "1", &up.to_string()],
    );
    assert_eq!(cli.value("received"), down);
    let (cw, sw) = (Wire::of(&mut cli), Wire::of(&mut srv));
    cli.finish();
    srv.finish();
    let events = d.stop();
    // Below 6.6 (no tcx) the agent added a clsact qdisc for its filters: gone again.
    let o = Command::new("tc")
        .args(["qdisc", "show", "dev", &net.host_if])
        .output()
        .unwrap();
    let q = String::from_utf8_lossy(&o.stdout);
    assert!(!q.contains("clsact"), "qdisc left on {}: {q}", net.host_if);
    check_events(&events);
    let s = sum(&events);
    eprintln!("veth: {:?}", s);
    let c = label(&s, "veth-client");
    let lossy = Wire::lossy(&cw, &sw);
    check_tcp(
        "client tx",
        c.tx,
        cw.sent,
        V4_TCP_HDR,
        c.tx_packets,
        SYN_EXTRA,
        lossy,
        0,
    );
    check_tcp(
        "client rx",
        c.rx,
        down,
        V4_TCP_HDR,
        c.rx_packets,
        SYN_EXTRA,
        lossy,
        sw.retrans,
    );
    let i = s
        .ifaces
        .get(&net.host_if)
        .unwrap_or_else(|| panic!("no iface {} in {:?}", net.host_if, s.ifaces));
    const ETH: u64 = 14;
    // The link carries the client's packets and nothing else (IPv6 off, static
    // neighbours), except the server's final ACK to our FIN, which the client socket no
    // longer sees (it is in TIME_WAIT or gone): allow for exactly that in rx.
    assert_eq!(i.tx_packets, c.tx_packets, "tc egress packets");
    assert_eq!(
        i.tx,
        c.tx + ETH * c.tx_packets,
        "tc egress bytes = IP bytes + 14 B per packet"
    );
    assert!(
        i.rx_packets >= c.rx_packets && i.rx_packets <= c.rx_packets + 1,
        "tc ingress packets {} vs socket {}",
        i.rx_packets,
        c.rx_packets
    );
    assert_eq!(
        i.rx,
        c.rx + ETH * c.rx_packets + (i.rx_packets - c.rx_packets) * (V4_TCP_HDR + ETH)
    );
}

/// Thousands of short connections: every event conserves bytes, and the totals match
/// what the generators say they sent and received, to the byte.
#[test]
fn churn_conserves_every_byte() {
    if !require_root("churn") {
        return;
    }
    let cg = TestCgroup::new("churn");
    let d = Daemon::start(&cg, &["--interval", "50"]);
    let (n, up, down) = (5000u64, 700u64, 300u64);
    let mut srv = Peer::spawn(
        Some(&cg),
        None,
        "churn-srv",
        &["tcp-serve", "127.0.0.1", &n.to_string(), &down.to_string()],
    );
    let port = srv.value("port").to_string();
    let mut cli = Peer::spawn(
        Some(&cg),
        None,
        "churn-cli",
        &[
            "tcp-connect",
            "127.0.0.1",
            &port,
            &n.to_string(),
            &up.to_string(),
        ],
    );
    let (sent, received) = (cli.value("sent"), cli.value("received"));
    assert_eq!((sent, received), (n * up, n * down));
    assert_eq!(srv.value("received"), n * up);
    let (cw, sw) = (Wire::of(&mut cli), Wire::of(&mut srv));
    cli.finish();
    srv.finish();
    let events = d.stop();
    check_events(&events);
    assert!(
        events.len() >= 2,
        "the churn should span several intervals, got {}",
        events.len()
    );
    let s = sum(&events);
    eprintln!("churn over {} events: {:?}", events.len(), s);
    let c = label(&s, "churn-cli");
    let sv = label(&s, "churn-srv");
    let lossy = Wire::lossy(&cw, &sw);
    let h = V4_TCP_HDR;
    check_tcp(
        "client tx",
        c.tx,
        cw.sent,
        h,
        c.tx_packets,
        SYN_EXTRA * n,
        lossy,
        0,
    );
    check_tcp(
        "client rx",
        c.rx,
        received,
        h,
        c.rx_packets,
        SYN_EXTRA * n,
        lossy,
        sw.retrans,
    );
    check_tcp(
        "server rx",
        sv.rx,
        sent,
        h,
        sv.rx_packets,
        SYN_EXTRA * n,
        lossy,
        cw.retrans,
    );
    check_tcp(
        "server tx",
        sv.tx,
        sw.sent,
        h,
        sv.tx_packets,
        SYN_EXTRA * n,
        lossy,
        0,
    );
    assert!(
        s.unattributed.is_zero(),
        "unattributed: {:?}",
        s.unattributed
    );
}

/// Without privileges the agent fails fast, exit status 1, naming what is missing.
#[test]
fn unprivileged_run_fails_fast_with_a_clear_message() {
    if !require_root("unprivileged") {
        return;
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .arg(agent_exe())
        .args(["run", "--stdout", "--state-dir", "/tmp"])
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(
        err.contains("needs root or the capabilities CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"),
        "stderr: {err}"
    );
    assert!(out.stdout.is_empty());

    // A cgroup path that does not exist.
    let out = Command::new(agent_exe())
        .args([
            "run",
            "--stdout",
            "--state-dir",
            "/tmp",
            "--cgroup",
            "/sys/fs/cgroup/unified/no-such-cgroup-xyz",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(
        err.contains("no-such-cgroup-xyz does not exist"),
        "stderr: {err}"
    );

    // A directory that is not on cgroup v2.
    let out = Command::new(agent_exe())
        .args(["run", "--stdout", "--state-dir", "/tmp", "--cgroup", "/tmp"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(
        err.contains("is not a cgroup v2 directory"),
        "stderr: {err}"
    );
}
