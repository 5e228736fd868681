//! Bounded work after a mass close, and the ledger.
use super::*;

/// 100k connected sockets, all finished in one call: every call stays within
/// `max_records_per_tick`, every close comes out within a bounded number of calls with
/// exact counts, and per flow open < update < close.
#[test]
fn flows_mass_close_is_bounded_and_ordered() {
    const N: u64 = 100_000;
    let mut ft = table(FlowConfig::default());
    let cap = ft.config().max_records_per_tick;
    let view = |i: u64, c: Traffic| {
        let mut s = tcp(
            1 + i,
            &format!("10.{}.{}.{}:40000", i >> 16, (i >> 8) & 255, i & 255),
            "10.200.0.9:9000",
            c,
            T0,
        );
        s.proto = 17;
        s
    };
    // Per flow (by local address): the events seen, and the close's traffic.
    #[derive(Default)]
    struct Seen {
        events: HashMap<IpAddr, Vec<FlowEvent>>,
        closes: HashMap<IpAddr, Traffic>,
        /// Slowest call before the mass close, and from it on.
        worst: std::time::Duration,
        worst_close: std::time::Duration,
        /// Slowest call after the one given the 100k finished sockets.
        worst_after: std::time::Duration,
        calls_after_close: usize,
    }
    let mut seen = Seen::default();
    let call = |seen: &mut Seen, ft: &mut FlowTable, now: u64, socks: &[SocketView], closing| {
        let t = std::time::Instant::now();
        let r = ft.observe(now, socks, &[]);
        let w = if closing {
            &mut seen.worst_close
        } else {
            &mut seen.worst
        };
        *w = (*w).max(t.elapsed());
        if closing && seen.calls_after_close > 0 {
            seen.worst_after = seen.worst_after.max(t.elapsed());
        }
        assert!(r.len() <= cap, "{} records in one call", r.len());
        for x in &r {
            seen.events.entry(x.local).or_default().push(x.event);
            if x.event == FlowEvent::Close {
                seen.closes.insert(x.local, x.traffic());
            }
        }
        if closing {
            seen.calls_after_close += 1;
        }
    };
    let all: Vec<_> = (0..N).map(|i| view(i, tr(64, 0, 1, 0))).collect();
    call(&mut seen, &mut ft, T0, &all, false);
    let mut now = T0;
    while now < T0 + 15_000 {
        now += 100;
        if now == T0 + 5000 {
            let moved: Vec<_> = (0..N).map(|i| view(i, tr(128, 64, 2, 1))).collect();
            call(&mut seen, &mut ft, now, &moved, false);
        } else {
            call(&mut seen, &mut ft, now, &[], false);
        }
    }
    let fin_views: Vec<_> = (0..N)
        .map(|i| fin(view(i, tr(0, 0, 0, 0)), tr(1000 + i, 500, 10, 5), None))
        .collect();
    now += 100;
    call(&mut seen, &mut ft, now, &fin_views, true);
    while seen.closes.len() < N as usize && seen.calls_after_close < 1000 {
        now += 100;
        call(&mut seen, &mut ft, now, &[], true);
    }
    println!(
        "mass close: worst observe {:.1} ms (the calls after the one given the finished \
         sockets: {:.1} ms; before the close: {:.1} ms), {} calls until the last close",
        seen.worst_close.as_secs_f64() * 1e3,
        seen.worst_after.as_secs_f64() * 1e3,
        seen.worst.as_secs_f64() * 1e3,
        seen.calls_after_close
    );
    let calls_after_close = seen.calls_after_close;
    assert_eq!(seen.closes.len(), N as usize);
    // 1000 records per call: 100 calls for the closes, a few more for the opens and
    // updates still waiting when the sockets finished.
    assert!(calls_after_close <= 120, "{calls_after_close} calls");
    for i in 0..N {
        let local = view(i, Traffic::default()).local.ip();
        assert_eq!(seen.closes[&local], tr(1000 + i, 500, 10, 5));
        let ev = &seen.events[&local];
        assert_eq!(ev.last(), Some(&FlowEvent::Close));
        assert_eq!(ev.iter().filter(|e| **e == FlowEvent::Close).count(), 1);
        let rank = |e: &FlowEvent| match e {
            FlowEvent::Open => 0,
            FlowEvent::Update => 1,
            FlowEvent::Close => 2,
        };
        assert!(ev.windows(2).all(|w| rank(&w[0]) <= rank(&w[1])), "{ev:?}");
        assert!(ev.iter().filter(|e| **e == FlowEvent::Open).count() <= 1);
    }
    let st = ft.stats();
    assert_eq!((st.closes, st.tracked, st.queued), (N, 0, 0));
    assert_eq!((st.ledger.exact_sockets, st.ledger.inexact_sockets), (N, 0));
}

fn ledger(ft: &FlowTable) -> FlowLedger {
    ft.stats().ledger
}

#[test]
fn flows_ledger_connected_is_exact() {
    let mut ft = table(FlowConfig::default());
    let s = tcp(1, "10.0.0.2:40000", "10.0.0.9:443", tr(10, 10, 1, 1), T0);
    ft.observe(T0, std::slice::from_ref(&s), &[]);
    let mut moved = s.clone();
    moved.counters = tr(500, 900, 5, 6);
    ft.observe(T0 + 2000, &[moved], &[]);
    ft.observe(T0 + 3000, &[fin(s, tr(600, 1000, 7, 8), Some(7))], &[]);
    // A UDP socket that reconnects: two flows, one socket.
    let mut u = tcp(2, "10.0.0.2:5000", "10.0.0.53:53", tr(60, 120, 1, 1), T0);
    u.proto = 17;
    ft.observe(T0 + 3000, std::slice::from_ref(&u), &[]);
    u.remote = Some(addr("10.0.0.54:53"));
    u.counters = tr(100, 200, 2, 2);
    ft.observe(T0 + 3100, std::slice::from_ref(&u), &[]);
    ft.observe(T0 + 3200, &[fin(u, tr(150, 300, 3, 3), None)], &[]);
    ft.observe(T0 + 9000, &[], &[]);
    let l = ledger(&ft);
    assert_eq!((l.exact_sockets, l.inexact_sockets), (2, 0), "{l:?}");
    assert!(
        l.unrecorded.is_empty() && l.filtered == Traffic::default(),
        "{l:?}"
    );
    assert_eq!(l.over_recorded, Traffic::default());

    // Live sockets are settled at shutdown, against their last counters.
    let live = tcp(3, "10.0.0.2:40001", "10.0.0.9:443", tr(5, 5, 1, 1), T0);
    ft.observe(T0 + 9000, &[live], &[]);
    ft.finish_all(T0 + 9500);
    assert_eq!(ledger(&ft).exact_sockets, 3);
}

/// The three peers of the unconnected-socket test: idle closes, a returning peer, and at
/// the end every peer given with its final (partly unchanged) counters.
#[test]
fn flows_ledger_unconnected_three_peers_is_exact() {
    let mut ft = table(FlowConfig::default());
    let mut sock = udp_unconnected(7, tr(210, 420, 3, 3), T0 - 10_000);
    let peers = [
        peer(7, "8.8.8.8:53", tr(60, 120, 1, 1)),
        peer(7, "1.1.1.1:53", tr(70, 140, 1, 1)),
        peer(7, "9.9.9.9:53", tr(80, 160, 1, 1)),
    ];
    ft.observe(T0, std::slice::from_ref(&sock), &peers);
    sock.counters = tr(270, 540, 4, 4);
    ft.observe(
        T0 + 10_000,
        std::slice::from_ref(&sock),
        &[peer(7, "8.8.8.8:53", tr(120, 240, 2, 2))],
    );
    ft.observe(T0 + 30_000, &[], &[]);
    ft.observe(T0 + 40_000, &[], &[]);
    assert_eq!(ft.stats().dormant_peers, 3);
    sock.counters = tr(300, 600, 5, 5);
    ft.observe(
        T0 + 50_000,
        std::slice::from_ref(&sock),
        &[peer(7, "1.1.1.1:53", tr(100, 200, 2, 2))],
    );
    assert_eq!(kinds(&ft.observe(T0 + 51_000, &[], &[])), [FlowEvent::Open]);
    let done = SocketView {
        finished: true,
        ..sock
    };
    let all = [
        peer(7, "8.8.8.8:53", tr(120, 240, 2, 2)),
        peer(7, "1.1.1.1:53", tr(100, 200, 2, 2)),
        peer(7, "9.9.9.9:53", tr(80, 160, 1, 1)),
    ];
    let r = ft.observe(T0 + 52_000, &[done], &all);
    // The live peer closes once with its counts; dormant unchanged peers give nothing.
    assert_eq!(kinds(&r), [FlowEvent::Close]);
    assert_eq!(r[0].traffic(), tr(30, 60, 1, 1));
    let st = ft.stats();
    assert_eq!((st.tracked, st.dormant_peers, st.closes), (0, 0, 4));
    let l = st.ledger;
    assert_eq!((l.exact_sockets, l.inexact_sockets), (1, 0), "{l:?}");
    assert!(l.unrecorded.is_empty(), "{l:?}");
}

#[test]
fn flows_ledger_peer_unknown_when_peers_fall_short() {
    let mut ft = table(no_gap());
    let sock = udp_unconnected(7, tr(1000, 2000, 10, 20), T0);
    let done = SocketView {
        finished: true,
        ..sock.clone()
    };
    ft.observe(
        T0,
        std::slice::from_ref(&sock),
        &[peer(7, "8.8.8.8:53", tr(100, 200, 1, 2))],
    );
    // The kernel keyed only part of the socket's datagrams to peers.
    let r = ft.observe(
        T0 + 100,
        &[done],
        &[
            peer(7, "8.8.8.8:53", tr(300, 400, 3, 4)),
            peer(7, "1.1.1.1:53", tr(200, 100, 2, 1)),
        ],
    );
    assert_eq!(r.iter().filter(|r| r.event == FlowEvent::Close).count(), 2);
    let l = ledger(&ft);
    assert_eq!((l.exact_sockets, l.inexact_sockets), (0, 1));
    assert_eq!(
        l.unrecorded.get("peer_unknown"),
        Some(&tr(500, 1500, 5, 15)),
        "{l:?}"
    );
    assert_eq!(l.over_recorded, Traffic::default());
}

#[test]
fn flows_ledger_filtered_is_counted_as_filtered() {
    let cfg = FlowConfig {
        cidrs: vec![parse_cidr("10.0.0.0/8").unwrap()],
        ..no_gap()
    };
    let mut ft = table(cfg);
    // A connection to a remote the filters leave out: no record, all of it filtered.
    let out = tcp(1, "10.0.0.2:40000", "192.0.2.1:443", tr(10, 10, 1, 1), T0);
    ft.observe(T0, std::slice::from_ref(&out), &[]);
    let r = ft.observe(T0 + 100, &[fin(out, tr(50, 70, 2, 3), None)], &[]);
    assert!(r.is_empty());
    // An unconnected socket with one peer in, one out.
    let sock = udp_unconnected(2, tr(30, 30, 2, 2), T0);
    let peers = [
        peer(2, "10.9.9.9:53", tr(10, 20, 1, 1)),
        peer(2, "192.0.2.53:53", tr(20, 10, 1, 1)),
    ];
    ft.observe(T0, std::slice::from_ref(&sock), &peers);
    let done = SocketView {
        finished: true,
        ..sock
    };
    let r = ft.observe(T0 + 200, &[done], &peers);
    assert_eq!(kinds(&r), [FlowEvent::Close]);
    assert_eq!(r[0].traffic(), tr(10, 20, 1, 1));
    let l = ledger(&ft);
    assert_eq!((l.exact_sockets, l.inexact_sockets), (2, 0), "{l:?}");
    assert_eq!(l.filtered, tr(70, 80, 3, 4));
    assert!(l.unrecorded.is_empty());
}

/// Connected, disconnected (one flow per peer), connected again: every flow closes once,
/// and the ledger adds the phases up.
#[test]
fn flows_ledger_across_connect_and_disconnect() {
    let mut ft = table(no_gap());
    let mut s = tcp(5, "10.0.0.2:5000", "10.0.0.53:53", tr(10, 20, 1, 1), T0);
    s.proto = 17;
    ft.observe(T0, std::slice::from_ref(&s), &[]);
    // connect(AF_UNSPEC): the connected flow ends; peers count from here.
    let mut u = SocketView {
        remote: None,
        counters: tr(30, 60, 2, 2),
        ..s.clone()
    };
    let r = ft.observe(T0 + 100, std::slice::from_ref(&u), &[]);
    assert_eq!(kinds(&r), [FlowEvent::Close]);
    assert_eq!(
        (r[0].traffic(), r[0].end_reason),
        (tr(10, 20, 1, 1), Some(EndReason::Reconnected))
    );
    u.counters = tr(60, 100, 4, 4);
    let r = ft.observe(
        T0 + 200,
        std::slice::from_ref(&u),
        &[peer(5, "10.0.0.7:53", tr(30, 40, 2, 2))],
    );
    assert_eq!(kinds(&r), [FlowEvent::Open]);
    // connect() again: the peer flow ends, the new flow counts from the socket's counters.
    s.remote = Some(addr("10.0.0.8:53"));
    s.counters = tr(70, 110, 5, 5);
    let r = ft.observe(T0 + 300, std::slice::from_ref(&s), &[]);
    assert_eq!(kinds(&r), [FlowEvent::Close, FlowEvent::Open]);
    assert_eq!(r[0].traffic(), tr(30, 40, 2, 2));
    assert_eq!(r[1].traffic(), tr(10, 10, 1, 1));
    let r = ft.observe(T0 + 400, &[fin(s, tr(80, 120, 6, 6), None)], &[]);
    assert_eq!(kinds(&r), [FlowEvent::Close]);
    assert_eq!(r[0].traffic(), tr(20, 20, 2, 2));
    let l = ledger(&ft);
    // 10..30 of the first phase moved between two looks: no peer carries it.
    assert_eq!((l.exact_sockets, l.inexact_sockets), (0, 1), "{l:?}");
    assert_eq!(l.unrecorded.get("peer_unknown"), Some(&tr(20, 40, 1, 1)));
    assert_eq!(ft.stats().tracked, 0);
}

/// A forgotten idle-peer baseline makes the peer's next flow count from zero: the ledger
/// says so as over-recorded traffic. Restarted peer counters carry on.
#[test]
fn flows_ledger_over_recorded_and_restarted_counters() {
    let mut ft = table(FlowConfig {
        max_flows: 1,
        ..no_gap()
    });
    let sock = udp_unconnected(7, tr(0, 0, 0, 0), T0);
    ft.observe(
        T0,
        std::slice::from_ref(&sock),
        &[peer(7, "8.8.8.8:53", tr(10, 10, 1, 1))],
    );
    ft.observe(T0 + 30_000, &[], &[]); // idle: dormant
    ft.observe(
        T0 + 30_100,
        std::slice::from_ref(&sock),
        &[peer(7, "1.1.1.1:53", tr(5, 5, 1, 1))],
    );
    ft.observe(T0 + 60_100, &[], &[]); // idle too: two dormant, one forgotten
    assert_eq!(ft.stats().evicted_peer_bases, 1);
    // The kernel's entry for 1.1.1.1 was recreated: counters from zero again.
    ft.observe(
        T0 + 60_200,
        std::slice::from_ref(&sock),
        &[peer(7, "1.1.1.1:53", tr(2, 2, 1, 1))],
    );
    let done = SocketView {
        finished: true,
        counters: tr(17, 17, 3, 3),
        ..sock
    };
    let r = ft.observe(
        T0 + 60_300,
        &[done],
        &[
            peer(7, "8.8.8.8:53", tr(10, 10, 1, 1)),
            peer(7, "1.1.1.1:53", tr(4, 4, 2, 2)),
        ],
    );
    let closes: Vec<_> = r
        .iter()
        .filter(|r| r.event == FlowEvent::Close)
        .map(|r| (r.remote.to_string(), r.traffic()))
        .collect();
    assert_eq!(
        closes,
        [
            ("1.1.1.1".to_string(), tr(4, 4, 2, 2)),
            ("8.8.8.8".to_string(), tr(10, 10, 1, 1))
        ]
    );
    let l = ledger(&ft);
    // Records: 10 + 5 + 4 + 10 (8.8.8.8 again, from zero) = 29 bytes for a socket of 17.
    assert_eq!(l.inexact_sockets, 1, "{l:?}");
    assert_eq!(l.over_recorded.tx, 12);
}
