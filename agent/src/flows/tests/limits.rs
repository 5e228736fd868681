//! Limits, formatting, shutdown, reconnects, configuration.
use super::*;

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
