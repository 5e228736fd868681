//! `flow-stress TAG DELAY_US HOLD`: the socket patterns that flow records must survive,
//! once in IPv4 and once in IPv6 (tests/tests/flows.rs, the flow ledger test).
//!
//! Every socket is made under its own thread name, so its owner (and default label) is
//! `{TAG}{4|6}{role}`:
//! - `r1`, `r2`, `r3`: unconnected UDP receivers; `r1` answers every datagram;
//! - `s`: an unconnected sender with three peers (20 datagrams of 100..119 B to each),
//!   reading `r1`'s 20 answers (50 B each) before it closes;
//! - `q`: opens, sends 2 datagrams of 64 B to `r2` and closes at once (inside one interval);
//! - `c`: a connected UDP socket, 3 datagrams of 80 B to `r3`;
//! - `t`: a TCP client sending 1000 B and reading 500 B back; `a`: its listener and the
//!   accepted socket (the same name, as an accepted socket's owner may come from either).
//!
//! DELAY_US first (so runs start at different points of the agent's interval); with HOLD
//! = 1 the receivers stay open until a line on stdin (the agent stops meanwhile).
use std::{
    io::{BufRead, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use super::{out, set_name};

pub const SENDS: usize = 20;
pub const ANSWER: usize = 50;

fn recv_n(s: &UdpSocket, n: usize) -> Vec<SocketAddr> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 2048];
    (0..n)
        .map(|i| {
            s.recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {i} of {n}: {e}"))
                .1
        })
        .collect()
}

fn family(tag: &str, v: char, ip: IpAddr) -> Vec<UdpSocket> {
    let p = format!("{tag}{v}");
    let recv: Vec<UdpSocket> = (1..=3)
        .map(|i| {
            set_name(&format!("{p}r{i}"));
            UdpSocket::bind((ip, 0)).unwrap()
        })
        .collect();
    let to: Vec<SocketAddr> = recv.iter().map(|r| r.local_addr().unwrap()).collect();

    set_name(&format!("{p}s"));
    let s = UdpSocket::bind((ip, 0)).unwrap();
    for t in &to {
        for i in 0..SENDS {
            s.send_to(&vec![0x11u8; 100 + i], t).unwrap();
        }
    }
    set_name(&format!("{p}q"));
    let q = UdpSocket::bind((ip, 0)).unwrap();
    for _ in 0..2 {
        q.send_to(&[0x22u8; 64], to[1]).unwrap();
    }
    drop(q);
    set_name(&format!("{p}c"));
    let c = UdpSocket::bind((ip, 0)).unwrap();
    c.connect(to[2]).unwrap();
    for _ in 0..3 {
        c.send(&[0x33u8; 80]).unwrap();
    }
    drop(c);

    for from in recv_n(&recv[0], SENDS) {
        recv[0].send_to(&[0x44u8; ANSWER], from).unwrap();
    }
    recv_n(&recv[1], SENDS + 2);
    recv_n(&recv[2], SENDS + 3);
    recv_n(&s, SENDS);
    drop(s);

    set_name(&format!("{p}a"));
    let l = TcpListener::bind((ip, 0)).unwrap();
    set_name(&format!("{p}t"));
    let mut t = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    t.write_all(&[0x55u8; 1000]).unwrap();
    set_name(&format!("{p}a"));
    let (mut a, _) = l.accept().unwrap();
    let mut buf = [0u8; 1000];
    a.read_exact(&mut buf).unwrap();
    a.write_all(&[0x66u8; 500]).unwrap();
    t.read_exact(&mut buf[..500]).unwrap();
    drop(t);
    drop(a);
    recv
}

pub fn flow_stress(tag: &str, delay_us: &str, hold: &str) {
    std::thread::sleep(Duration::from_micros(delay_us.parse().unwrap()));
    let v4 = family(tag, '4', "127.0.0.1".parse().unwrap());
    let v6 = family(tag, '6', "::1".parse().unwrap());
    out("done 1".into());
    if hold == "1" {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
    }
    drop((v4, v6));
}
