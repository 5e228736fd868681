//! Traffic generator for the integration tests and benchmarks. Every mode prints what it
//! did ("key value" lines) so a test can compare the agent's counts with the generator's.
//!
//!   peer [--name N] tcp-serve LISTEN_ADDR COUNT REPLY_BYTES   (prints "port P", then "received B")
//!   peer [--name N] tcp-connect ADDR PORT COUNT SEND_BYTES    (prints "sent B", "received B")
//!   peer [--name N] udp-recv LISTEN_ADDR                      (prints "port P"; stops on a 1-byte datagram)
//!   peer [--name N] udp-send ADDR PORT COUNT SIZE             (prints "sent N")
//!   peer [--name N] hold-tcp ADDR PORT SEND_BYTES             (connects, prints "connected",
//!                                                              waits for a line on stdin, sends, closes)
//!   peer [--name N] short-tcp ADDR PORT SEND_BYTES            (connect, send, close at once)
use std::{
    io::{BufRead, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

fn set_name(n: &str) {
    let c = std::ffi::CString::new(n).unwrap();
    unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

fn out(line: String) {
    let mut o = std::io::stdout().lock();
    writeln!(o, "{line}").unwrap();
    o.flush().unwrap();
}

fn exchange(mut s: TcpStream, send: u64) -> (u64, u64) {
    let chunk = vec![0x5au8; 64 * 1024];
    let mut left = send;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    (send, got)
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--name") {
        set_name(&args[1]);
        args.drain(..2);
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["tcp-serve", listen, count, reply] => {
            let l = TcpListener::bind((listen.parse::<IpAddr>().unwrap(), 0)).unwrap();
            out(format!("port {}", l.local_addr().unwrap().port()));
            let (count, reply): (u64, u64) = (count.parse().unwrap(), reply.parse().unwrap());
            let mut total = 0;
            for _ in 0..count {
                let (mut s, _) = l.accept().unwrap();
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = s.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let chunk = vec![0xa5u8; 64 * 1024];
                let mut left = reply;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    s.write_all(&chunk[..n]).unwrap();
                    left -= n as u64;
                }
                drop(s);
            }
            out(format!("received {total}"));
        }
        ["tcp-connect", addr, port, count, send] => {
            let to = SocketAddr::new(addr.parse().unwrap(), port.parse().unwrap());
            let (count, send): (u64, u64) = (count.parse().unwrap(), send.parse().unwrap());
            let (mut st, mut rt) = (0, 0);
            for _ in 0..count {
                let (s, r) = exchange(TcpStream::connect(to).unwrap(), send);
                st += s;
                rt += r;
            }
            out(format!("sent {st}"));
            out(format!("received {rt}"));
        }
        ["udp-recv", listen] => {
            let s = UdpSocket::bind((listen.parse::<IpAddr>().unwrap(), 0)).unwrap();
            out(format!("port {}", s.local_addr().unwrap().port()));
            let mut buf = vec![0u8; 65536];
            let (mut n, mut bytes) = (0u64, 0u64);
            loop {
                let (len, _) = s.recv_from(&mut buf).unwrap();
                if len == 1 {
                    break;
                }
                n += 1;
                bytes += len as u64;
            }
            out(format!("datagrams {n}"));
            out(format!("bytes {bytes}"));
        }
        ["udp-send", addr, port, count, size] => {
            let to = SocketAddr::new(addr.parse().unwrap(), port.parse().unwrap());
            let bind: IpAddr = if to.is_ipv4() { "127.0.0.1".parse().unwrap() } else { "::1".parse().unwrap() };
            let s = UdpSocket::bind((bind, 0)).unwrap();
            let (count, size): (u64, usize) = (count.parse().unwrap(), size.parse().unwrap());
            let buf = vec![0x11u8; size];
            for i in 0..count {
                s.send_to(&buf, to).unwrap();
                if i % 64 == 63 {
                    // Pace so the receiver's buffer never overflows on loopback.
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            out(format!("sent {count}"));
        }
        ["udp-stop", addr, port] => {
            let to = SocketAddr::new(addr.parse().unwrap(), port.parse().unwrap());
            let bind: IpAddr = if to.is_ipv4() { "127.0.0.1".parse().unwrap() } else { "::1".parse().unwrap() };
            UdpSocket::bind((bind, 0)).unwrap().send_to(&[0], to).unwrap();
        }
        ["hold-tcp", addr, port, send] => {
            let to = SocketAddr::new(addr.parse().unwrap(), port.parse().unwrap());
            let s = TcpStream::connect(to).unwrap();
            out("connected".into());
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).unwrap();
            let (s, r) = exchange(s, send.parse().unwrap());
            out(format!("sent {s}"));
            out(format!("received {r}"));
        }
        ["short-tcp", addr, port, send] => {
            let to = SocketAddr::new(addr.parse().unwrap(), port.parse().unwrap());
            let (s, r) = exchange(TcpStream::connect(to).unwrap(), send.parse().unwrap());
            out(format!("sent {s}"));
            out(format!("received {r}"));
        }
        _ => {
            eprintln!("peer: bad arguments {a:?}");
            std::process::exit(2);
        }
    }
}
