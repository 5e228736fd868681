use super::*;
use crate::event::SpoolRecord;

const T0: u64 = 1_795_443_814_000;

fn ident() -> Identity {
    Identity {
        agent: "a".into(),
        boot: "b".into(),
    }
}
fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}
fn tr(tx: u64, rx: u64, tx_packets: u64, rx_packets: u64) -> Traffic {
    Traffic {
        tx,
        rx,
        tx_packets,
        rx_packets,
    }
}
fn owner(pid: u32) -> OwnerView {
    OwnerView {
        pid,
        process: "curl".into(),
        uid: 1000,
        cgroup: Some("user.slice/session-1.scope".into()),
        netns: 4026531840,
    }
}
fn tcp(
    cookie: u64,
    local: &str,
    remote: &str,
    counters: Traffic,
    first_seen_ms: u64,
) -> SocketView {
    SocketView {
        cookie,
        proto: 6,
        local: addr(local),
        remote: Some(addr(remote)),
        direction: Direction::Outbound,
        owner: owner(4242),
        label: "curl".into(),
        counters,
        first_seen_ms,
        finished: false,
        tcp_state: None,
    }
}
fn fin(mut s: SocketView, counters: Traffic, state: Option<u8>) -> SocketView {
    s.counters = counters;
    s.finished = true;
    s.tcp_state = state;
    s
}
fn udp_unconnected(cookie: u64, counters: Traffic, first_seen_ms: u64) -> SocketView {
    SocketView {
        cookie,
        proto: 17,
        local: addr("10.0.0.2:5300"),
        remote: None,
        direction: Direction::Outbound,
        owner: OwnerView {
            pid: 77,
            process: "resolver".into(),
            uid: 0,
            cgroup: None,
            netns: 1,
        },
        label: "resolver".into(),
        counters,
        first_seen_ms,
        finished: false,
        tcp_state: None,
    }
}
fn peer(cookie: u64, remote: &str, counters: Traffic) -> PeerView {
    PeerView {
        cookie,
        remote: addr(remote),
        counters,
    }
}
fn table(cfg: FlowConfig) -> FlowTable {
    FlowTable::new(cfg)
}
fn no_gap() -> FlowConfig {
    FlowConfig {
        consolidate_gap_ms: 0,
        ..FlowConfig::default()
    }
}
fn kinds(r: &[FlowRecord]) -> Vec<FlowEvent> {
    r.iter().map(|r| r.event).collect()
}
fn json(r: &FlowRecord) -> String {
    String::from_utf8(r.to_json_line()).unwrap()
}

#[test]
fn flows_lifecycle_open_update_close_exact_counts() {
    let mut ft = table(FlowConfig::default());
    let s = tcp(
        1,
        "10.0.0.2:40000",
        "93.184.216.34:443",
        tr(100, 50, 2, 1),
        T0,
    );
    assert!(ft.observe(T0, std::slice::from_ref(&s), &[]).is_empty());
    let mut s2 = s.clone();
    s2.counters = tr(200, 100, 3, 2);
    assert!(
        ft.observe(T0 + 500, &[s2], &[]).is_empty(),
        "no open before open_after"
    );

    // The open comes from the timer, although the socket did not move this interval.
    let r = ft.observe(T0 + 1000, &[], &[]);
    assert_eq!(kinds(&r), [FlowEvent::Open]);
    assert_eq!((r[0].start, r[0].end), (T0, T0 + 1000));
    assert_eq!(r[0].traffic(), tr(200, 100, 3, 2));
    assert_eq!((r[0].tcp_state.as_deref(), r[0].end_reason), (None, None));
    // The envelope is stamped where the record is written, not here.
    assert_eq!(
        (r[0].agent.as_str(), r[0].boot.as_str(), r[0].kind.as_str()),
        ("", "", "flow")
    );
    let mut stamped = r[0].clone();
    stamped.stamp(&ident(), 7);
    assert_eq!(
        (stamped.agent.as_str(), stamped.boot.as_str(), stamped.seq),
        ("a", "b", 7)
    );

    let mut s3 = s.clone();
    s3.counters = tr(1000, 5000, 10, 12);
    assert!(ft.observe(T0 + 5000, &[s3], &[]).is_empty());
    let r = ft.observe(T0 + 11_000, &[], &[]);
    assert_eq!(kinds(&r), [FlowEvent::Update]);
    assert_eq!(r[0].traffic(), tr(1000, 5000, 10, 12));
    assert_eq!(r[0].end, T0 + 11_000);
    // Nothing moved since: no update.
    assert!(ft.observe(T0 + 21_000, &[], &[]).is_empty());

    let r = ft.observe(T0 + 25_000, &[fin(s, tr(1200, 6000, 14, 15), Some(7))], &[]);
    assert_eq!(
        kinds(&r),
        [FlowEvent::Close],
        "an opened flow closes at once, unmerged"
    );
    let c = &r[0];
    assert_eq!(c.traffic(), tr(1200, 6000, 14, 15));
    assert_eq!((c.start, c.end), (T0, T0 + 25_000));
    assert_eq!(c.tcp_state.as_deref(), Some("CLOSE"));
    assert_eq!(c.end_reason, Some(EndReason::Closed));
    assert_eq!(
        (c.connections, c.local_port, c.remote_port),
        (None, Some(40000), Some(443))
    );
    let st = ft.stats();
    assert_eq!(
        (
            st.opens,
            st.updates,
            st.closes,
            st.tracked,
            st.pending_sessions
        ),
        (1, 1, 1, 0, 0)
    );
}

#[test]
fn flows_short_connection_gives_only_a_close() {
    let mut ft = table(FlowConfig::default());
    let s = tcp(1, "10.0.0.2:40000", "10.0.0.9:443", tr(60, 0, 1, 0), T0);
    assert!(ft.observe(T0, std::slice::from_ref(&s), &[]).is_empty());
    assert!(
        ft.observe(T0 + 300, &[fin(s, tr(500, 900, 5, 4), Some(6))], &[])
            .is_empty()
    );
    assert_eq!(ft.stats().pending_sessions, 1);
    assert!(
        ft.observe(T0 + 5200, &[], &[]).is_empty(),
        "waits consolidate_gap for company"
    );
    let r = ft.observe(T0 + 5300, &[], &[]);
    assert_eq!(kinds(&r), [FlowEvent::Close]);
    assert_eq!(r[0].traffic(), tr(500, 900, 5, 4));
    assert_eq!(
        (r[0].start, r[0].end, r[0].connections),
        (T0, T0 + 300, None)
    );
    assert_eq!(
        (r[0].local_port, r[0].tcp_state.as_deref()),
        (Some(40000), Some("TIME_WAIT"))
    );
    assert_eq!(ft.stats().opens, 0);

    // Without consolidation: open at once, close at once.
    let mut ft = table(no_gap());
    let s = tcp(2, "10.0.0.2:40001", "10.0.0.9:443", tr(60, 0, 1, 0), T0);
    assert_eq!(
        kinds(&ft.observe(T0, std::slice::from_ref(&s), &[])),
        [FlowEvent::Open]
    );
    let r = ft.observe(T0 + 100, &[fin(s, tr(70, 80, 2, 1), None)], &[]);
    assert_eq!(kinds(&r), [FlowEvent::Close]);
    assert_eq!(r[0].traffic(), tr(70, 80, 2, 1));
    // First seen already finished, opens wanted at once: the open as it began, the close.
    let s = tcp(
        3,
        "10.0.0.2:40002",
        "10.0.0.9:443",
        tr(0, 0, 0, 0),
        T0 + 150,
    );
    let r = ft.observe(T0 + 200, &[fin(s, tr(1, 2, 1, 1), None)], &[]);
    assert_eq!(kinds(&r), [FlowEvent::Open, FlowEvent::Close]);
    assert_eq!((r[0].start, r[0].end, r[0].tx), (T0 + 150, T0 + 150, 0));
    assert_eq!(r[1].start, T0 + 150);
}

#[test]
fn flows_udp_unconnected_three_peers_open_idle_close_reuse() {
    let mut ft = table(FlowConfig::default());
    let sock = udp_unconnected(7, tr(210, 420, 3, 3), T0 - 10_000);
    let peers = [
        peer(7, "8.8.8.8:53", tr(60, 120, 1, 1)),
        peer(7, "1.1.1.1:53", tr(70, 140, 1, 1)),
        peer(7, "9.9.9.9:53", tr(80, 160, 1, 1)),
    ];
    assert!(
        ft.observe(T0, std::slice::from_ref(&sock), &peers)
            .is_empty()
    );
    assert_eq!(ft.stats().tracked, 3);
    let r = ft.observe(T0 + 1000, &[], &[]);
    assert_eq!(kinds(&r), [FlowEvent::Open; 3]);
    let by = |r: &[FlowRecord], ip: &str| {
        r.iter()
            .find(|x| x.remote.to_string() == ip)
            .cloned()
            .unwrap()
    };
    assert_eq!(by(&r, "8.8.8.8").traffic(), tr(60, 120, 1, 1));
    assert_eq!(by(&r, "9.9.9.9").traffic(), tr(80, 160, 1, 1));
    assert_eq!(
        (r[0].proto.as_str(), r[0].remote_port, r[0].local_port),
        ("udp", Some(53), Some(5300))
    );
    assert_eq!(r[0].label, "resolver");

    // Only 8.8.8.8 moves again.
    assert!(
        ft.observe(
            T0 + 10_000,
            std::slice::from_ref(&sock),
            &[peer(7, "8.8.8.8:53", tr(120, 240, 2, 2))]
        )
        .is_empty()
    );
    let r = ft.observe(T0 + 30_000, &[], &[]);
    let closes: Vec<_> = r.iter().filter(|x| x.event == FlowEvent::Close).collect();
    assert_eq!(closes.len(), 2);
    for c in &closes {
        assert_eq!(c.end_reason, Some(EndReason::Idle));
        assert_eq!(c.end, T0, "an idle flow ends when it last moved");
    }
    assert_eq!(by(&r, "1.1.1.1").traffic(), tr(70, 140, 1, 1));
    let u = by(&r, "8.8.8.8");
    assert_eq!(
        (u.event, u.traffic()),
        (FlowEvent::Update, tr(120, 240, 2, 2))
    );
    let r = ft.observe(T0 + 40_000, &[], &[]);
    assert_eq!(kinds(&r), [FlowEvent::Close]);
    assert_eq!(
        (r[0].traffic(), r[0].end),
        (tr(120, 240, 2, 2), T0 + 10_000)
    );
    let st = ft.stats();
    assert_eq!((st.tracked, st.dormant_peers), (0, 3));

    // 1.1.1.1 talks again: the new flow counts from where the old one closed.
    assert!(
        ft.observe(
            T0 + 50_000,
            std::slice::from_ref(&sock),
            &[peer(7, "1.1.1.1:53", tr(100, 200, 2, 2))]
        )
        .is_empty()
    );
    let r = ft.observe(T0 + 51_000, &[], &[]);
    assert_eq!(kinds(&r), [FlowEvent::Open]);
    assert_eq!(r[0].traffic(), tr(30, 60, 1, 1));
    let done = SocketView {
        finished: true,
        ..sock
    };
    let r = ft.observe(T0 + 52_000, &[done], &[]);
    assert_eq!(kinds(&r), [FlowEvent::Close]);
    assert_eq!(
        (r[0].traffic(), r[0].end_reason),
        (tr(30, 60, 1, 1), Some(EndReason::Closed))
    );
    let st = ft.stats();
    assert_eq!(
        (st.tracked, st.dormant_peers, st.pending_sessions),
        (0, 0, 0)
    );
}

/// Drives ticks of 100 ms; `conns[i]` = (first_seen offset, end offset, socket).
fn run_short(ft: &mut FlowTable, conns: &[(u64, u64, SocketView)], until: u64) -> Vec<FlowRecord> {
    let mut out = Vec::new();
    let mut now = 0;
    while now <= until {
        let views: Vec<SocketView> = conns
            .iter()
            .filter(|(_, end, _)| *end <= now && *end + 100 > now)
            .map(|(_, _, s)| s.clone())
            .collect();
        out.extend(ft.observe(T0 + now, &views, &[]));
        now += 100;
    }
    out
}

#[test]
fn flows_hundred_short_connections_make_one_session() {
    let mut ft = table(FlowConfig::default());
    let conns: Vec<_> = (0..100u64)
        .map(|i| {
            let s = tcp(
                1000 + i,
                &format!("10.0.0.2:{}", 40000 + i),
                "10.0.0.9:443",
                tr(0, 0, 0, 0),
                T0 + i * 40,
            );
            (
                i * 40,
                i * 40 + 30,
                fin(s, tr(100 + i, 1000, 2, 3), Some(7)),
            )
        })
        .collect();
    let r = run_short(&mut ft, &conns, 8900);
    assert!(r.is_empty(), "{r:?}");
    let r = ft.observe(T0 + 9000, &[], &[]);
    assert_eq!(r.len(), 1);
    let s = &r[0];
    assert_eq!(s.connections, Some(100));
    assert_eq!(s.traffic(), tr(14_950, 100_000, 200, 300));
    assert_eq!((s.start, s.end), (T0, T0 + 4000));
    assert_eq!(
        (s.local_port, s.remote_port),
        (None, Some(443)),
        "source ports differ"
    );
    assert_eq!(
        (s.pid, s.tcp_state.as_deref(), s.end_reason),
        (Some(4242), Some("CLOSE"), Some(EndReason::Closed))
    );
    let j = json(s);
    assert!(
        !j.contains("local_port")
            && j.contains(r#""remote_port":443"#)
            && j.ends_with(r#""connections":100}"#),
        "{j}"
    );
    let st = ft.stats();
    assert_eq!(
        (st.sessions, st.merged_connections, st.closes, st.opens),
        (1, 100, 1, 0)
    );
}

#[test]
fn flows_gap_exceeded_gives_two_sessions() {
    let mut ft = table(FlowConfig::default());
    let c = |cookie, port, first: u64, end: u64| {
        let s = tcp(
            cookie,
            &format!("10.0.0.2:{port}"),
            "10.0.0.9:443",
            tr(0, 0, 0, 0),
            T0 + first,
        );
        (first, end, fin(s, tr(10, 20, 1, 1), None))
    };
    // A ends at 100; B starts 5100 ms later (> gap); C follows B closely.
    let conns = [
        c(1, 40001, 0, 100),
        c(2, 40002, 5200, 5300),
        c(3, 40003, 5400, 5500),
    ];
    let r = run_short(&mut ft, &conns, 10_500);
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(
        (r[0].connections, r[0].local_port, r[0].end),
        (None, Some(40001), T0 + 100)
    );
    assert_eq!((r[1].connections, r[1].local_port), (Some(2), None));
    assert_eq!((r[1].start, r[1].end, r[1].tx), (T0 + 5200, T0 + 5500, 20));

    // Inbound: the source is the remote end; a shared source port is kept.
    let mut ft = table(FlowConfig::default());
    let inb = |cookie, first: u64, end: u64| {
        let mut s = tcp(
            cookie,
            "10.0.0.2:8080",
            "192.0.2.7:5555",
            tr(0, 0, 0, 0),
            T0 + first,
        );
        s.direction = Direction::Inbound;
        (first, end, fin(s, tr(1, 1, 1, 1), None))
    };
    let r = run_short(&mut ft, &[inb(1, 0, 100), inb(2, 200, 300)], 5300);
    assert_eq!(r.len(), 1);
    assert_eq!(
        (r[0].connections, r[0].remote_port, r[0].local_port),
        (Some(2), Some(5555), Some(8080))
    );
}

#[test]
fn flows_raw_labels_are_never_merged() {
    let cfg = FlowConfig {
        raw_labels: ["curl".to_string()].into(),
        ..FlowConfig::default()
    };
    let mut ft = table(cfg);
    let views: Vec<_> = (0..3u64)
        .map(|i| {
            fin(
                tcp(
                    i + 1,
                    &format!("10.0.0.2:{}", 40000 + i),
                    "10.0.0.9:443",
                    tr(0, 0, 0, 0),
                    T0,
                ),
                tr(5, 5, 1, 1),
                None,
            )
        })
        .collect();
    let r = ft.observe(T0 + 100, &views, &[]);
    // Raw labels get their opens at once: an open (as it started) and a close each.
    use FlowEvent::{Close, Open};
    assert_eq!(
        kinds(&r),
        [Open, Close, Open, Close, Open, Close],
        "written at once, one per connection"
    );
    assert!(
        r.iter()
            .all(|r| r.connections.is_none() && r.local_port.is_some())
    );
    assert_eq!(ft.stats().pending_sessions, 0);
    // ... and a live one opens at once.
    let r = ft.observe(
        T0 + 200,
        &[tcp(
            9,
            "10.0.0.2:41000",
            "10.0.0.9:443",
            tr(1, 0, 1, 0),
            T0 + 150,
        )],
        &[],
    );
    assert_eq!(kinds(&r), [FlowEvent::Open]);
}

#[test]
fn flows_filters_exclude_udp_and_are_counted() {
    let cfg = FlowConfig {
        protocols: vec![Protocol::Tcp],
        ..no_gap()
    };
    let mut ft = table(cfg);
    let mut udp_conn = tcp(1, "10.0.0.2:40000", "10.0.0.9:53", tr(60, 0, 1, 0), T0);
    udp_conn.proto = 17;
    let unconn = udp_unconnected(2, tr(60, 0, 1, 0), T0);
    let tcp_conn = tcp(3, "10.0.0.2:40001", "10.0.0.9:443", tr(60, 0, 1, 0), T0);
    let all = [udp_conn.clone(), unconn.clone(), tcp_conn.clone()];
    let r = ft.observe(T0, &all, &[peer(2, "8.8.8.8:53", tr(60, 0, 1, 0))]);
    assert_eq!(kinds(&r), [FlowEvent::Open]);
    assert_eq!(r[0].proto, "tcp");
    let done = [
        fin(udp_conn, tr(70, 10, 2, 1), None),
        SocketView {
            finished: true,
            ..unconn
        },
        fin(tcp_conn, tr(70, 10, 2, 1), None),
    ];
    let r = ft.observe(T0 + 100, &done, &[peer(2, "8.8.8.8:53", tr(70, 10, 2, 1))]);
    r.iter()
        .chain(ft.finish_all(T0 + 200).iter())
        .for_each(|r| assert_eq!(r.proto, "tcp", "{r:?}"));
    let st = ft.stats();
    assert_eq!(st.tracked, 0);
    assert_eq!(st.filtered, 4, "udp socket and udp peer, each in two calls");

    let cfg = FlowConfig {
        labels: ["web".to_string()].into(),
        ports: vec![PortRange {
            start: 443,
            end: 443,
        }],
        cidrs: vec![parse_cidr("10.0.0.0/8").unwrap()],
        ..FlowConfig::default()
    };
    let (l, r) = (addr("10.0.0.2:40000"), addr("10.1.2.3:443"));
    assert!(cfg.passes(6, "web", l, r));
    assert!(
        cfg.passes(6, "web", addr("10.0.0.2:443"), addr("10.1.2.3:999")),
        "local port matches too"
    );
    assert!(
        cfg.passes(6, "web", l, addr("[::ffff:10.1.2.3]:443")),
        "v4-mapped remote matches a v4 network"
    );
    assert!(!cfg.passes(6, "curl", l, r));
    assert!(!cfg.passes(6, "web", l, addr("10.1.2.3:80")));
    assert!(!cfg.passes(6, "web", l, addr("192.0.2.1:443")));
}

#[test]
fn flows_overflow_is_counted_and_closes_still_written() {
    let cfg = FlowConfig {
        max_flows: 2,
        ..no_gap()
    };
    let mut ft = table(cfg);
    let s: Vec<_> = (0..3u64)
        .map(|i| {
            tcp(
                i + 1,
                &format!("10.0.0.2:{}", 40000 + i),
                "10.0.0.9:443",
                tr(10 * (i + 1), 0, 1, 0),
                T0,
            )
        })
        .collect();
    let r = ft.observe(T0, &s, &[]);
    assert_eq!(kinds(&r), [FlowEvent::Open; 2]);
    let st = ft.stats();
    assert_eq!((st.tracked, st.overflow), (2, 1));
    let mut third = s[2].clone();
    third.counters = tr(35, 5, 2, 1);
    assert!(ft.observe(T0 + 100, &[third.clone()], &[]).is_empty());
    assert_eq!(ft.stats().overflow, 2, "every refused observation counts");

    // New and finished while full: no room needed, the close is written.
    let late = fin(
        tcp(
            9,
            "10.0.0.2:41000",
            "10.0.0.9:443",
            tr(0, 0, 0, 0),
            T0 + 150,
        ),
        tr(1, 1, 1, 1),
        None,
    );
    let r = ft.observe(T0 + 200, &[late], &[]);
    assert_eq!(kinds(&r), [FlowEvent::Open, FlowEvent::Close]);

    // Room again: the refused flow is picked up with exact cumulative counts.
    third.counters = tr(40, 6, 3, 2);
    let r = ft.observe(
        T0 + 300,
        &[fin(s[0].clone(), tr(10, 1, 1, 1), None), third.clone()],
        &[],
    );
    assert_eq!(kinds(&r), [FlowEvent::Close, FlowEvent::Open]);
    assert_eq!((r[1].start, r[1].traffic()), (T0, tr(40, 6, 3, 2)));
    let r = ft.observe(T0 + 400, &[fin(third, tr(50, 6, 4, 2), None)], &[]);
    assert_eq!(r[0].traffic(), tr(50, 6, 4, 2));

    // Pending sessions take room too; beyond it a short flow is written unmerged.
    let mut ft = table(FlowConfig {
        max_flows: 2,
        ..FlowConfig::default()
    });
    let short = |c: u64, dst: &str| {
        fin(
            tcp(c, "10.0.0.2:40000", dst, tr(0, 0, 0, 0), T0),
            tr(1, 1, 1, 1),
            None,
        )
    };
    let r = ft.observe(
        T0 + 100,
        &[
            short(1, "10.0.0.7:443"),
            short(2, "10.0.0.8:443"),
            short(3, "10.0.0.9:443"),
        ],
        &[],
    );
    assert_eq!(kinds(&r), [FlowEvent::Close]);
    assert_eq!(r[0].remote.to_string(), "10.0.0.9");
    let st = ft.stats();
    assert_eq!((st.pending_sessions, st.overflow), (2, 1));
}

#[test]
fn flows_ipv6_and_v4_mapped_formatting() {
    let mut ft = table(no_gap());
    let mapped = tcp(
        1,
        "[::ffff:10.0.0.2]:40000",
        "[::ffff:93.184.216.34]:443",
        tr(1, 0, 1, 0),
        T0,
    );
    let v6 = tcp(
        2,
        "[2001:db8::2]:40001",
        "[2001:db8::1]:443",
        tr(1, 0, 1, 0),
        T0,
    );
    let r = ft.observe(T0, &[mapped, v6], &[]);
    let j0 = json(&r[0]);
    assert!(j0.contains(r#""family":"ipv4","local":"10.0.0.2","local_port":40000,"remote":"93.184.216.34","remote_port":443"#), "{j0}");
    let j1 = json(&r[1]);
    assert!(j1.contains(r#""family":"ipv6","local":"2001:db8::2","local_port":40001,"remote":"2001:db8::1","remote_port":443"#), "{j1}");
    // A v4-mapped and a plain v4 connection to the same place are one session.
    let mut ft = table(FlowConfig::default());
    let a = fin(
        tcp(
            1,
            "[::ffff:10.0.0.2]:40000",
            "[::ffff:10.0.0.9]:443",
            tr(0, 0, 0, 0),
            T0,
        ),
        tr(1, 1, 1, 1),
        None,
    );
    let b = fin(
        tcp(2, "10.0.0.2:40001", "10.0.0.9:443", tr(0, 0, 0, 0), T0),
        tr(1, 1, 1, 1),
        None,
    );
    ft.observe(T0 + 100, &[a, b], &[]);
    let r = ft.observe(T0 + 5100, &[], &[]);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].connections, Some(2));
}

#[test]
fn flows_json_field_names_and_order() {
    let mut ft = table(no_gap());
    let s = tcp(1, "10.0.0.2:40000", "93.184.216.34:443", tr(0, 0, 0, 0), T0);
    let mut r = ft.observe(T0 + 300, &[fin(s, tr(1180, 5300, 9, 8), Some(7))], &[]);
    // Begun and ended between two polls, opens wanted at once: open (as it started), close.
    assert_eq!(kinds(&r), [FlowEvent::Open, FlowEvent::Close]);
    assert_eq!((r[0].tx, r[0].end), (0, T0));
    let mut r = [r.pop().unwrap()];
    r[0].stamp(&ident(), 42);
    let j = json(&r[0]);
    assert_eq!(
        j,
        r#"{"v":1,"type":"flow","agent":"a","boot":"b","seq":42,"event":"close","proto":"tcp","family":"ipv4","local":"10.0.0.2","local_port":40000,"remote":"93.184.216.34","remote_port":443,"direction":"outbound","pid":4242,"process":"curl","uid":1000,"cgroup":"user.slice/session-1.scope","netns":4026531840,"label":"curl","start":1795443814000,"end":1795443814300,"tx":1180,"rx":5300,"tx_packets":9,"rx_packets":8,"tcp_state":"CLOSE","end_reason":"closed"}"#
    );
    let back: FlowRecord = serde_json::from_str(&j).unwrap();
    assert_eq!(back, r[0]);

    // An open of an unconnected UDP peer: other protocol names, no close fields.
    let mut ft = table(no_gap());
    let mut sock = udp_unconnected(5, tr(0, 0, 0, 0), T0);
    sock.proto = 132;
    sock.direction = Direction::Unknown;
    let mut r = ft.observe(
        T0,
        &[sock],
        &[peer(5, "[2001:db8::53]:53", tr(80, 0, 1, 0))],
    );
    r[0].stamp(&ident(), 43);
    assert_eq!(
        json(&r[0]),
        r#"{"v":1,"type":"flow","agent":"a","boot":"b","seq":43,"event":"open","proto":"132","family":"ipv6","local":"10.0.0.2","local_port":5300,"remote":"2001:db8::53","remote_port":53,"direction":"unknown","pid":77,"process":"resolver","uid":0,"netns":1,"label":"resolver","start":1795443814000,"end":1795443814000,"tx":80,"rx":0,"tx_packets":1,"rx_packets":0}"#
    );
}

#[test]
fn flows_finish_all_flushes_everything() {
    let mut ft = table(FlowConfig::default());
    let short = tcp(1, "10.0.0.2:40000", "10.0.0.9:443", tr(0, 0, 0, 0), T0);
    let long = tcp(2, "10.0.0.2:40001", "10.0.0.9:8443", tr(10, 10, 1, 1), T0);
    ft.observe(T0, std::slice::from_ref(&long), &[]);
    let r = ft.observe(T0 + 1000, &[fin(short, tr(3, 3, 1, 1), None)], &[]);
    assert_eq!(kinds(&r), [FlowEvent::Open]);
    let young = tcp(
        3,
        "10.0.0.2:40002",
        "10.0.0.9:22",
        tr(5, 5, 1, 1),
        T0 + 1000,
    );
    ft.observe(
        T0 + 1100,
        &[young],
        &[peer(4, "8.8.8.8:53", tr(1, 1, 1, 1))],
    );
    ft.observe(
        T0 + 1200,
        &[udp_unconnected(4, tr(9, 9, 1, 1), T0)],
        &[peer(4, "8.8.8.8:53", tr(9, 9, 1, 1))],
    );
    let st = ft.stats();
    assert_eq!(
        (st.tracked, st.pending_sessions, st.orphan_peers),
        (3, 1, 1)
    );

    let r = ft.finish_all(T0 + 1500);
    assert_eq!(kinds(&r), [FlowEvent::Close; 4]);
    assert_eq!(
        (r[0].remote_port, r[0].end_reason, r[0].end),
        (Some(443), Some(EndReason::Closed), T0 + 1000)
    );
    let stopped: Vec<_> = r[1..]
        .iter()
        .map(|r| (r.remote_port, r.end_reason, r.end))
        .collect();
    let stop = Some(EndReason::AgentStopped);
    assert_eq!(
        stopped,
        [
            (Some(8443), stop, T0 + 1500),
            (Some(22), stop, T0 + 1500),
            (Some(53), stop, T0 + 1500)
        ]
    );
    assert_eq!(r[3].traffic(), tr(9, 9, 1, 1));
    let st = ft.stats();
    assert_eq!(
        (st.tracked, st.pending_sessions, st.queued, st.closes),
        (0, 0, 0, 4)
    );
    assert!(ft.observe(T0 + 20_000, &[], &[]).is_empty());
}

#[test]
fn flows_records_per_tick_capped_none_lost() {
    let cfg = FlowConfig {
        max_records_per_tick: 10,
        ..no_gap()
    };
    let mut ft = table(cfg);
    let views: Vec<_> = (0..25u64)
        .map(|i| {
            fin(
                tcp(
                    i + 1,
                    &format!("10.0.0.2:{}", 40000 + i),
                    "10.0.0.9:443",
                    tr(0, 0, 0, 0),
                    T0,
                ),
                tr(1, 1, 1, 1),
                None,
            )
        })
        .collect();
    // 25 connections begun and ended between polls: an open and a close each.
    let sizes: Vec<usize> = (0..7)
        .map(|k| {
            ft.observe(T0 + k * 100, if k == 0 { &views } else { &[] }, &[])
                .len()
        })
        .collect();
    assert_eq!(sizes, [10, 10, 10, 10, 10, 0, 0]);

    // Opens are held back while records wait, so the backlog stays within a tick's worth.
    let live: Vec<_> = (0..25u64)
        .map(|i| {
            tcp(
                100 + i,
                &format!("10.0.0.2:{}", 41000 + i),
                "10.0.0.9:443",
                tr(1, 1, 1, 1),
                T0,
            )
        })
        .collect();
    let mut opens = 0;
    for k in 0..4 {
        let r = ft.observe(T0 + 1000 + k * 100, if k == 0 { &live } else { &[] }, &[]);
        assert!(r.len() <= 10);
        assert!(ft.stats().queued <= 10);
        opens += r.len();
    }
    assert_eq!(opens, 25);
    assert_eq!(
        ft.stats().opens,
        50,
        "25 opens written with the closes above, 25 here"
    );
}

#[test]
fn flows_reconnect_and_orphans() {
    let mut ft = table(no_gap());
    let mut s = tcp(9, "10.0.0.2:40000", "10.0.0.53:53", tr(60, 120, 1, 1), T0);
    s.proto = 17;
    assert_eq!(
        kinds(&ft.observe(T0, std::slice::from_ref(&s), &[])),
        [FlowEvent::Open]
    );
    s.remote = Some(addr("10.0.0.54:53"));
    s.counters = tr(100, 200, 2, 2);
    let r = ft.observe(
        T0 + 100,
        std::slice::from_ref(&s),
        &[peer(9, "10.0.0.54:53", tr(40, 80, 1, 1))],
    );
    assert_eq!(kinds(&r), [FlowEvent::Close, FlowEvent::Open]);
    assert_eq!(
        (r[0].traffic(), r[0].end_reason),
        (tr(60, 120, 1, 1), Some(EndReason::Reconnected))
    );
    assert_eq!(
        (r[1].traffic(), r[1].remote.to_string().as_str()),
        (tr(40, 80, 1, 1), "10.0.0.54")
    );
    assert_eq!(
        ft.stats().orphan_peers,
        0,
        "peers of a connected socket are ignored"
    );
    ft.observe(T0 + 200, &[], &[peer(77, "10.0.0.1:1", tr(1, 1, 1, 1))]);
    assert_eq!(ft.stats().orphan_peers, 1);
}

#[test]
fn flows_config_section() {
    assert_eq!(
        FlowConfig::from_section(&FlowsSection::default()).unwrap(),
        FlowConfig::default()
    );
    let s: FlowsSection = toml::from_str(
        r#"
        enabled = true
        open_after_ms = 2000
        update_every_ms = 0
        udp_idle_ms = 60000
        consolidate_gap_ms = 0
        raw_labels = ["dns"]
        events = ["close"]
        protocols = ["tcp", 132]
        labels = ["nginx"]
        ports = [443, "8000-8100"]
        cidrs = ["10.0.0.0/8", "fd00::/8", "192.0.2.1"]
        max_flows = 1000
        max_records_per_tick = 500
        "#,
    )
    .unwrap();
    let c = FlowConfig::from_section(&s).unwrap();
    assert_eq!(
        c.events,
        EventSet {
            open: false,
            update: false,
            close: true
        }
    );
    assert_eq!(c.protocols, [Protocol::Tcp, Protocol::Number(132)]);
    assert_eq!(
        c.ports,
        [
            PortRange {
                start: 443,
                end: 443
            },
            PortRange {
                start: 8000,
                end: 8100
            }
        ]
    );
    assert_eq!(c.cidrs.len(), 3);
    assert_eq!(
        (c.max_flows, c.max_records_per_tick, c.update_every_ms),
        (1000, 500, 0)
    );

    let de = |t: &str| toml::from_str::<FlowsSection>(t).unwrap_err().to_string();
    assert!(de("colour = 1").contains("unknown field"));
    assert!(de(r#"events = ["opn"]"#).contains("unknown variant"));
    assert!(de(r#"protocols = ["sctp"]"#).contains("unknown protocol"));
    let bad = |f: fn(&mut FlowsSection)| {
        let mut s = FlowsSection::default();
        f(&mut s);
        FlowConfig::from_section(&s).unwrap_err()
    };
    assert_eq!(
        bad(|s| s.udp_idle_ms = 0),
        "flows.udp_idle_ms: 0 is out of range (1000..=86400000 ms)"
    );
    assert!(bad(|s| s.events.clear()).starts_with("flows.events: is empty"));
    assert!(
        bad(|s| s.cidrs = vec!["10.0.0.0/33".into()])
            .starts_with(r#"flows.cidrs: "10.0.0.0/33" is not a valid CIDR"#)
    );
    assert!(bad(|s| s.max_flows = 0).starts_with("flows.max_flows: 0 is out of range"));
    assert!(
        bad(|s| s.update_every_ms = 10).starts_with("flows.update_every_ms: 10 is out of range")
    );
    assert!(bad(|s| s.labels = vec![String::new()]).starts_with("flows.labels: entry 1"));
    assert!(bad(|s| s.consolidate_gap_ms = 3_600_000).starts_with("flows.consolidate_gap_ms"));
}

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
        "mass close: worst observe {:.1} ms (before the close: {:.1} ms), {} calls until the last close",
        seen.worst_close.as_secs_f64() * 1e3,
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
}
