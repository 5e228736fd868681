//! Random runs against the input contract: sockets connect, reconnect, talk to peers,
//! go idle and finish, with a small record cap; every flow's records stay in order and
//! every socket's ledger is exact.
use super::*;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone)]
struct Sim {
    view: SocketView,
    /// Per peer (unconnected sockets): cumulative counters as the kernel keeps them.
    peers: Vec<(SocketAddr, Traffic)>,
    moved: Vec<usize>,
}

fn bump(t: &mut Traffic, n: u64) {
    t.tx += 10 * n;
    t.rx += 7 * n;
    t.tx_packets += n;
    t.rx_packets += n;
}

/// `strict`: no sessions and room for all, so every flow has its own records and every
/// socket's ledger is exact.
fn run(seed: u64, cfg: FlowConfig, ticks: u64, strict: bool) {
    let mut rng = Rng(seed);
    let mut ft = table(cfg);
    let cap = ft.config().max_records_per_tick;
    let mut live: Vec<Sim> = Vec::new();
    let mut next_cookie = 1u64;
    let mut finished = 0u64;
    // Per flow (local, remote, start): the events in the order they came.
    let mut flows: HashMap<(SocketAddr, SocketAddr, u64), Vec<FlowEvent>> = HashMap::new();
    let mut check = |r: Vec<FlowRecord>, capped: bool| {
        assert!(!capped || r.len() <= cap);
        if !strict {
            return;
        }
        for x in r {
            let key = (
                SocketAddr::new(x.local, x.local_port.unwrap_or(0)),
                SocketAddr::new(x.remote, x.remote_port.unwrap_or(0)),
                x.start,
            );
            let ev = flows.entry(key).or_default();
            assert!(
                !ev.contains(&FlowEvent::Close),
                "{x:?} after a close: {ev:?}"
            );
            if x.event == FlowEvent::Open {
                assert!(ev.is_empty(), "{x:?} after {ev:?}");
            }
            ev.push(x.event);
        }
    };
    for tick in 0..ticks {
        let now = T0 + tick * 100;
        let mut socks: Vec<SocketView> = Vec::new();
        let mut peers: Vec<PeerView> = Vec::new();
        // New sockets: connected TCP/UDP, or unconnected UDP with peers.
        for _ in 0..rng.below(4) {
            let cookie = next_cookie;
            next_cookie += 1;
            let unconn = rng.below(3) == 0;
            // Every third socket on IPv6 (every sixth v4-mapped): interned addresses.
            let v6 = cookie.is_multiple_of(3);
            let (local, remote) = if !v6 {
                (
                    format!(
                        "10.0.{}.{}:{}",
                        (cookie >> 8) & 255,
                        cookie & 255,
                        1000 + cookie
                    ),
                    format!("10.9.0.{}:443", rng.below(4)),
                )
            } else if cookie.is_multiple_of(2) {
                (
                    format!(
                        "[::ffff:10.1.{}.{}]:{}",
                        (cookie >> 8) & 255,
                        cookie & 255,
                        1000
                    ),
                    format!("[::ffff:10.9.2.{}]:443", rng.below(4)),
                )
            } else {
                (
                    format!("[2001:db8::{cookie:x}]:1000"),
                    format!("[2001:db8:9::{}]:443", rng.below(4)),
                )
            };
            let mut v = tcp(cookie, &local, &remote, tr(0, 0, 0, 0), now);
            if unconn {
                v.remote = None;
                v.proto = 17;
            } else if rng.below(2) == 0 {
                v.proto = 17;
            }
            let npeers = if unconn { 1 + rng.below(6) as usize } else { 0 };
            let peers = (0..npeers)
                .map(|k| {
                    let a = if v6 {
                        format!("[2001:db8:8::{:x}:{k}]:53", cookie & 255)
                    } else {
                        format!("10.8.{}.{k}:53", cookie & 255)
                    };
                    (addr(&a), tr(0, 0, 0, 0))
                })
                .collect();
            live.push(Sim {
                view: v,
                peers,
                moved: vec![],
            });
        }
        let mut keep = Vec::new();
        for mut s in std::mem::take(&mut live) {
            let roll = rng.below(100);
            s.moved.clear();
            if s.view.remote.is_some() {
                if roll < 30 {
                    bump(&mut s.view.counters, 1 + rng.below(5));
                }
                if s.view.proto == 17 && roll == 99 {
                    s.view.remote = Some(addr(&format!("10.9.1.{}:53", rng.below(9))));
                }
            } else {
                for k in 0..s.peers.len() {
                    if rng.below(100) < 15 {
                        let n = 1 + rng.below(3);
                        // The kernel's entry was recreated: its counters restart (seen as
                        // such only when they come back lower, so only then here).
                        if rng.below(50) == 0 && s.peers[k].1.tx > 10 * n {
                            s.peers[k].1 = tr(0, 0, 0, 0);
                        }
                        bump(&mut s.peers[k].1, n);
                        bump(&mut s.view.counters, n);
                        s.moved.push(k);
                    }
                }
            }
            let finish = roll >= 97;
            if finish {
                s.view.finished = true;
                finished += 1;
            }
            let unconn = s.view.remote.is_none();
            let new = s.view.first_seen_ms == now;
            if finish || new || (unconn && !s.moved.is_empty()) || (!unconn && roll < 30) {
                socks.push(s.view.clone());
            }
            if unconn {
                // On its finish all its peers come; else those that moved.
                let given: Vec<usize> = if finish {
                    (0..s.peers.len()).collect()
                } else {
                    s.moved.clone()
                };
                for k in given {
                    peers.push(PeerView {
                        cookie: s.view.cookie,
                        remote: s.peers[k].0,
                        counters: s.peers[k].1,
                    });
                }
            }
            if !finish {
                keep.push(s);
            }
        }
        live = keep;
        check(ft.observe(now, &socks, &peers), true);
        ft.check_refs();
    }
    let now = T0 + ticks * 100;
    for _ in 0..200 {
        check(ft.observe(now, &[], &[]), true);
    }
    ft.check_refs();
    check(ft.finish_all(now + 100), false);
    let st = ft.stats();
    assert_eq!((st.tracked, st.queued, st.finishing), (0, 0, 0));
    let l = st.ledger;
    assert!(
        l.exact_sockets + l.inexact_sockets >= finished,
        "seed {seed}"
    );
    if !strict {
        return;
    }
    assert_eq!(l.inexact_sockets, 0, "seed {seed}: {l:?}");
    // Finished ones, and the live ones the table knew (an unconnected socket whose peers
    // never moved was never tracked).
    assert!(l.exact_sockets >= finished, "seed {seed}: {l:?}");
    assert!(
        l.exact_sockets <= finished + live.len() as u64,
        "seed {seed}"
    );
    for (k, ev) in &flows {
        assert_eq!(ev.last(), Some(&FlowEvent::Close), "{k:?}: {ev:?}");
    }
}

#[test]
fn flows_random_runs_keep_order_and_exact_ledgers() {
    for seed in 1..=6u64 {
        let cfg = FlowConfig {
            max_records_per_tick: 7,
            udp_idle_ms: 1000,
            open_after_ms: if seed % 2 == 0 { 0 } else { 300 },
            update_every_ms: 1000,
            ..no_gap()
        };
        run(seed * 0x9e37_79b9, cfg, 600, true);
    }
    // Sessions, a small table (overflow, forgotten baselines): no order to check per flow,
    // but nothing may stick or break.
    for seed in 1..=4u64 {
        let cfg = FlowConfig {
            max_records_per_tick: 5,
            max_flows: 12,
            udp_idle_ms: 1000,
            open_after_ms: 300,
            consolidate_gap_ms: 500,
            ..FlowConfig::default()
        };
        run(seed * 0x85eb_ca6b, cfg, 600, false);
    }
}

/// Slots packed while survivors keep running: after most of 6000 sockets (and of 8000
/// peers of two unconnected sockets) finish, the rest move to the front of the slabs
/// while they move, get updates and deferred records; all still end exactly.
#[test]
fn flows_random_packing_keeps_flows_whole() {
    let mut rng = Rng(77);
    let mut ft = table(FlowConfig {
        max_records_per_tick: 50,
        update_every_ms: 1000,
        udp_idle_ms: 3000,
        ..no_gap()
    });
    let conn = |i: u64, c: Traffic| {
        let mut s = tcp(
            i,
            &format!("10.0.{}.{}:4000", i >> 8, i & 255),
            "10.9.0.1:443",
            c,
            T0,
        );
        s.proto = 17;
        s
    };
    let mut socks: Vec<SocketView> = (1..=6000).map(|i| conn(i, tr(1, 1, 1, 1))).collect();
    let mut uncs: Vec<(SocketView, Vec<PeerView>)> = (0..2u64)
        .map(|k| {
            let mut s = udp_unconnected(10_000 + k, tr(0, 0, 0, 0), T0);
            s.local = addr(&format!("10.0.0.2:{}", 5300 + k));
            // The first socket's peers take the first slots, the second's the last.
            let n = if k == 0 { 7000u64 } else { 1000 };
            let p = (0..n)
                .map(|i| {
                    peer(
                        10_000 + k,
                        &format!("10.7.{}.{}:53", i >> 8, i & 255),
                        tr(1, 1, 1, 1),
                    )
                })
                .collect::<Vec<_>>();
            s.counters = tr(n, n, n, n);
            (s, p)
        })
        .collect();
    let mut closes: HashMap<SocketAddr, u64> = HashMap::new();
    let mut count = |r: Vec<FlowRecord>| {
        for x in r.iter().filter(|x| x.event == FlowEvent::Close) {
            *closes
                .entry(SocketAddr::new(x.local, x.local_port.unwrap_or(0)))
                .or_default() += x.tx;
        }
    };
    let all_unc: Vec<SocketView> = uncs.iter().map(|u| u.0.clone()).collect();
    let all_peers: Vec<PeerView> = uncs.iter().flat_map(|u| u.1.clone()).collect();
    count(ft.observe(T0, &socks, &all_peers));
    count(ft.observe(T0, &all_unc, &all_peers));
    let mut now = T0;
    for tick in 1..400u64 {
        now += 100;
        let mut views = Vec::new();
        let mut pv = Vec::new();
        if tick == 20 {
            // 90% of the connected sockets finish (survivors scattered), and the first
            // unconnected socket with all its peers.
            let mut keep = Vec::new();
            for s in socks.drain(..) {
                if rng.below(10) == 0 {
                    keep.push(s);
                } else {
                    views.push(fin(s.clone(), s.counters, None));
                }
            }
            socks = keep;
            let (s, p) = uncs.remove(0);
            views.push(SocketView {
                finished: true,
                ..s
            });
            pv.extend(p);
        }
        for s in socks.iter_mut() {
            if rng.below(4) == 0 {
                s.counters.tx += 1;
                views.push(s.clone());
            }
        }
        for (s, p) in uncs.iter_mut() {
            let mut moved = false;
            for q in p.iter_mut() {
                if rng.below(8) == 0 {
                    q.counters.tx += 1;
                    s.counters.tx += 1;
                    pv.push(*q);
                    moved = true;
                }
            }
            if moved {
                views.push(s.clone());
            }
        }
        count(ft.observe(now, &views, &pv));
        ft.check_refs();
        if tick == 30 {
            // Packed (4096 moves a call at most) and the tails cut off.
            assert!(ft.socks.len() < 1700, "{}", ft.socks.len());
            assert!(ft.peers.len() < 2100, "{}", ft.peers.len());
        }
    }
    let mut views: Vec<SocketView> = socks
        .iter()
        .map(|s| fin(s.clone(), s.counters, None))
        .collect();
    let (s, p) = uncs.remove(0);
    let tx = s.counters.tx;
    views.push(SocketView {
        finished: true,
        ..s
    });
    count(ft.observe(now + 100, &views, &p));
    for k in 0..1000 {
        count(ft.observe(now + 200 + k * 100, &[], &[]));
        let st = ft.stats();
        if st.queued + st.finishing + st.tracked == 0 {
            break;
        }
    }
    let st = ft.stats();
    assert_eq!((st.tracked, st.queued, st.finishing), (0, 0, 0));
    assert_eq!(st.ledger.inexact_sockets, 0, "{:?}", st.ledger);
    assert_eq!(st.ledger.exact_sockets, 6002);
    for s in &socks {
        assert_eq!(closes[&s.local], s.counters.tx, "{}", s.local);
    }
    assert_eq!(closes[&addr("10.0.0.2:5301")], tx);
}
