//! Owners of accepted sockets when the accept hook cannot be loaded (fexit on
//! inet_csk_accept is refused on some kernels): the first process to send or receive on
//! the socket, taken on TCP's own send and receive paths. These check the receive path
//! runs in the reading process's context: on loopback the bytes arrive in the sender's
//! softirq, so a hook running there would name the sender instead.
use std::time::Duration;

use sockacct_tests::*;

/// A worker forked off the listener's process accepts and only reads, for about a
/// second (many intervals): its label gets the bytes from the first interval on, the
/// listener's owner only the handshake it handled, the sender nothing of the worker's.
#[test]
fn receive_only_server_socket_is_labelled_with_the_reading_process() {
    if !require_root("receive_only") {
        return;
    }
    let cg = TestCgroup::new("rcvonly");
    let d = Daemon::start(&cg, &["--interval", "100"]);
    let mut srv = Peer::spawn(
        Some(&cg),
        None,
        "rcv-parent",
        &["tcp-serve-fork", "127.0.0.1", "rcv-worker", "0", "0"],
    );
    let port = srv.value("port").to_string();
    let mut cli = Peer::spawn(
        Some(&cg),
        None,
        "rcv-blast",
        &["tcp-blast", "127.0.0.1", &port, "1.0"],
    );
    let sent = cli.value("sent");
    assert_eq!(srv.value("received"), sent);
    cli.finish();
    srv.finish();
    let events = d.stop();
    check_events(&events);
    assert!(
        events.len() >= 5,
        "the transfer should span several intervals, got {} events",
        events.len()
    );
    let s = sum(&events);
    eprintln!("receive only: {s:?}");
    let w = label(&s, "rcv-worker");
    assert!(w.rx >= sent, "worker rx {} < payload {sent}", w.rx);
    // The listener took the SYN and the handshake's last ACK, and sent the SYN-ACK
    // (a few more if a packet was lost and resent): never the transfer.
    let p = label(&s, "rcv-parent");
    assert!(
        p.rx_packets <= 4 && p.rx < 1000 && p.tx_packets <= 2,
        "listener label got {p:?}"
    );
    assert!(
        s.unattributed.is_zero(),
        "unattributed: {:?}",
        s.unattributed
    );
}

/// The worker sends a greeting first and then waits several intervals before anything
/// else happens on the connection: the greeting is labelled with the worker from its
/// first interval on, so the owner was taken at that very first send, before the
/// socket's first packet was counted.
#[test]
fn first_send_names_the_owner_before_any_packet() {
    if !require_root("first_send") {
        return;
    }
    let cg = TestCgroup::new("firstsend");
    let d = Daemon::start(&cg, &["--interval", "100"]);
    let greeting = 1000u64;
    let mut srv = Peer::spawn(
        Some(&cg),
        None,
        "snd-parent",
        &[
            "tcp-serve-fork",
            "127.0.0.1",
            "snd-worker",
            &greeting.to_string(),
            "0",
        ],
    );
    let port = srv.value("port").to_string();
    let mut cli = Peer::spawn(
        Some(&cg),
        None,
        "snd-client",
        &["hold-tcp", "127.0.0.1", &port, "0"],
    );
    cli.expect_line("connected");
    // The greeting is sent and sits in the client's receive queue; let intervals pass.
    wait_for(
        "the greeting in the events",
        Duration::from_secs(10),
        || (sum(&d.events()).total.tx >= greeting).then_some(()),
    );
    d.wait_ticks(3);
    let seen = sum(&d.events());
    eprintln!("after the greeting: {seen:?}");
    cli.send_line("go");
    assert_eq!(cli.value("received"), greeting);
    cli.finish();
    srv.finish();
    let events = d.stop();
    check_events(&events);
    let w = seen.labels.get("snd-worker").copied().unwrap_or_default();
    assert!(
        w.tx >= greeting,
        "the greeting is not the worker's: {seen:?}"
    );
    assert!(
        seen.unattributed.tx < greeting,
        "the greeting went unattributed: {seen:?}"
    );
}
