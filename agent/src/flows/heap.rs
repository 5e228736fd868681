//! Heap cost of the flow table, measured with a counting allocator (test builds only).
//!
//! The allocator counts per thread, so tests running in parallel do not disturb a
//! measurement: the table is built, fed and dropped on the measuring thread.
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use super::*;

struct Counting;

thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
}

fn count(d: i64) {
    // try_with: the thread's slot may be gone while the thread exits.
    let _ = LIVE.try_with(|c| c.set(c.get() + d));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l.size() as i64);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        count(-(l.size() as i64));
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        count(l.size() as i64);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        count(new as i64 - l.size() as i64);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> i64 {
    LIVE.with(|c| c.get())
}

const T0: u64 = 1_795_443_814_000;
const N: u64 = 100_000;

fn owner() -> OwnerView {
    OwnerView {
        pid: 4242,
        process: "bench".into(),
        uid: 1000,
        cgroup: Some("user.slice/bench.scope".into()),
        netns: 4026531840,
    }
}

/// Ticks of 100 ms with no input until nothing waits (opens all written).
fn settle(ft: &mut FlowTable, mut now: u64) -> u64 {
    for _ in 0..1000 {
        now += 100;
        drop(ft.observe(now, &[], &[]));
        let st = ft.stats();
        if st.queued == 0 && st.deferred == 0 && st.finishing == 0 && now > T0 + 2000 {
            break;
        }
    }
    now
}

/// Socket `i` of the measurements: a UDP socket with one 64 B datagram sent.
fn udp_view(i: u64, remote: Option<SocketAddr>, owner: &OwnerView, label: &Arc<str>) -> SocketView {
    SocketView {
        cookie: 1 + i,
        proto: 17,
        local: SocketAddr::new([10, 0, 0, 2].into(), 20000 + (i % 40000) as u16),
        remote,
        direction: Direction::Outbound,
        owner: owner.clone(),
        label: label.clone(),
        counters: Traffic {
            tx: 64,
            rx: 0,
            tx_packets: 1,
            rx_packets: 0,
        },
        first_seen_ms: T0,
        finished: false,
        tcp_state: None,
    }
}

/// Live heap bytes per flow: `N` connected UDP sockets, and `N` peers of one unconnected
/// socket (as the real agent's 100k-socket / 65k-peer measurement, scaled).
pub(super) fn bytes_per_flow() -> (f64, f64, f64) {
    let o = owner();
    let label: Arc<str> = "bench".into();
    let view = |i: u64, remote: Option<SocketAddr>| udp_view(i, remote, &o, &label);
    let recv: SocketAddr = "10.0.0.9:9000".parse().unwrap();

    let base = live();
    let mut ft = FlowTable::new(FlowConfig::default());
    let socks: Vec<SocketView> = (0..N).map(|i| view(i, Some(recv))).collect();
    drop(ft.observe(T0, &socks, &[]));
    drop(socks);
    settle(&mut ft, T0);
    let conn = (live() - base) as f64 / N as f64;
    assert_eq!(ft.stats().tracked, N);
    // A mass close gives the memory back once its records are out, also when the
    // survivors are the newest sockets (the last slots).
    const KEEP: u64 = 1000;
    let done = |r: std::ops::Range<u64>| -> Vec<SocketView> {
        r.map(|i| SocketView {
            finished: true,
            ..view(i, Some(recv))
        })
        .collect()
    };
    let now = T0 + 60_000;
    drop(ft.observe(now, &done(0..N - KEEP), &[]));
    let now = settle(&mut ft, now);
    let after = (live() - base) as f64;
    assert_eq!(ft.stats().closes, N - KEEP);
    assert_eq!(ft.stats().tracked, KEEP);
    // The survivors were moved: they still close, exactly.
    drop(ft.observe(now + 100, &done(N - KEEP..N), &[]));
    settle(&mut ft, now + 100);
    let st = ft.stats();
    assert_eq!((st.closes, st.tracked, st.ledger.exact_sockets), (N, 0, N));
    drop(ft);

    let base = live();
    let mut ft = FlowTable::new(FlowConfig::default());
    let sock = view(N, None);
    let peers: Vec<PeerView> = (0..N)
        .map(|i| PeerView {
            cookie: sock.cookie,
            remote: SocketAddr::new(
                [192, 168, (i >> 8) as u8, i as u8].into(),
                1024 + (i % 50000) as u16,
            ),
            counters: Traffic {
                tx: 64,
                rx: 64,
                tx_packets: 1,
                rx_packets: 1,
            },
        })
        .collect();
    drop(ft.observe(T0, std::slice::from_ref(&sock), &peers));
    drop(peers);
    drop(sock);
    settle(&mut ft, T0);
    let peer = (live() - base) as f64 / N as f64;
    assert_eq!(ft.stats().tracked, N);
    drop(ft);
    (conn, peer, after)
}

#[test]
fn flows_heap_slot_sizes() {
    use super::out::Entry;
    use super::state::{Peer, Sock};
    use std::mem::size_of;
    // The per-flow budget rests on these.
    assert_eq!((size_of::<Sock>(), size_of::<Peer>()), (96, 88));
    assert!(size_of::<Entry>() <= 88, "{}", size_of::<Entry>());
}

#[test]
fn flows_heap_bytes_per_flow() {
    let (conn, peer, after) = bytes_per_flow();
    println!(
        "flow table heap: {conn:.1} B per connected flow, {peer:.1} B per peer flow, \
         {after:.0} B after closing all but 1000 connected ones"
    );
    // The budget: 100k flows in about 12 MB, all in.
    assert!(
        conn <= 115.0 && peer <= 115.0,
        "{conn:.1} / {peer:.1} B per flow"
    );
    assert!(
        after < 256.0 * 1024.0,
        "{after} B held after the mass close"
    );
}

/// Peers too: one socket's 99k peers go, another's 1k newer ones (the last slots) are
/// packed to the front and keep working.
#[test]
fn flows_heap_peers_packed_after_a_mass_close() {
    const KEEP: u64 = 1000;
    // Counters: the sum of its peers' (64 B each way per peer).
    let sock = |cookie: u64, finished: bool, n: u64| SocketView {
        cookie,
        proto: 17,
        local: SocketAddr::new([10, 0, 0, 2].into(), 5000 + cookie as u16),
        remote: None,
        direction: Direction::Outbound,
        owner: owner(),
        label: "bench".into(),
        counters: Traffic {
            tx: 64 * n,
            rx: 64 * n,
            tx_packets: n,
            rx_packets: n,
        },
        first_seen_ms: T0,
        finished,
        tcp_state: None,
    };
    let peers = |cookie: u64, r: std::ops::Range<u64>| -> Vec<PeerView> {
        r.map(|i| PeerView {
            cookie,
            remote: SocketAddr::new(
                [192, 168, (i >> 8) as u8, i as u8].into(),
                1024 + (i >> 16) as u16,
            ),
            counters: Traffic {
                tx: 64,
                rx: 64,
                tx_packets: 1,
                rx_packets: 1,
            },
        })
        .collect()
    };
    let base = live();
    let mut ft = FlowTable::new(FlowConfig::default());
    drop(ft.observe(T0, &[sock(1, false, N - KEEP)], &peers(1, 0..N - KEEP)));
    drop(ft.observe(T0 + 100, &[sock(2, false, KEEP)], &peers(2, 0..KEEP)));
    let now = settle(&mut ft, T0 + 100);
    // Socket 1 goes with all its peers (its closes take a few calls).
    drop(ft.observe(now, &[sock(1, true, N - KEEP)], &peers(1, 0..N - KEEP)));
    let now = settle(&mut ft, now);
    let after = (live() - base) as f64;
    assert_eq!(ft.stats().tracked, KEEP);
    drop(ft.observe(now + 100, &[sock(2, true, KEEP)], &peers(2, 0..KEEP)));
    settle(&mut ft, now + 100);
    let st = ft.stats();
    assert_eq!((st.closes, st.tracked), (N, 0));
    assert_eq!(st.ledger.exact_sockets, 2, "{:?}", st.ledger);
    drop(ft);
    println!("flow table heap: {after:.0} B after closing all but 1000 peers");
    assert!(
        after < 512.0 * 1024.0,
        "{after} B held after the mass close"
    );
}

/// Sockets that each have an owner and a label of their own (any local user can make
/// new process names): once they are gone, their names go too.
#[test]
fn distinct_names_are_given_back_after_their_sockets_close() {
    let recv: SocketAddr = "10.0.0.9:9000".parse().unwrap();
    let view = |i: u64, finished: bool| {
        let owner = OwnerView {
            pid: i as u32,
            process: format!("n{i:x}").into(),
            ..owner()
        };
        SocketView {
            finished,
            ..udp_view(i, Some(recv), &owner, &format!("n{i:x}").into())
        }
    };
    let base = live();
    let mut ft = FlowTable::new(FlowConfig::default());
    let socks: Vec<SocketView> = (0..N).map(|i| view(i, false)).collect();
    drop(ft.observe(T0, &socks, &[]));
    drop(socks);
    let now = settle(&mut ft, T0);
    let held = live() - base;
    let done: Vec<SocketView> = (0..N).map(|i| view(i, true)).collect();
    drop(ft.observe(now + 100, &done, &[]));
    drop(done);
    settle(&mut ft, now + 100);
    let after = live() - base;
    eprintln!("distinct names: {held} B held at {N} sockets, {after} B after they closed");
    assert_eq!(ft.stats().tracked, 0);
    assert!(after < 512 * 1024, "{after} B still held");
}
