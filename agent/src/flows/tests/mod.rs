//! The flow table's tests: helpers here, the tests by theme in the submodules.
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

mod ledger;
mod limits;
mod random;
mod records;
