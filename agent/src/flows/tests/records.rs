//! Records: lifecycle, peers, sessions, filters.
use super::*;

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
