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

/// (bytes_sent, bytes_retrans) from TCP_INFO: payload bytes that left the socket,
/// retransmissions included (struct tcp_info offsets 200 and 208, Linux >= 4.19).
fn tcp_sent(s: &TcpStream) -> (u64, u64) {
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 256];
    let mut len = buf.len() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, buf.as_mut_ptr().cast(), &mut len)
    };
    assert!(r == 0 && len >= 216, "TCP_INFO: {}", std::io::Error::last_os_error());
    let rd = |o: usize| u64::from_ne_bytes(buf[o..o + 8].try_into().unwrap());
    (rd(200), rd(208))
}

static SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static RETRANS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Waits until every byte written is sent and acknowledged (so no retransmission can
/// follow), then adds the socket's wire counts to the totals.
fn note_sent(s: &TcpStream) {
    use std::{os::fd::AsRawFd, sync::atomic::Ordering::Relaxed};
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut buf = [0u8; 256];
        let mut len = buf.len() as libc::socklen_t;
        unsafe { libc::getsockopt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, buf.as_mut_ptr().cast(), &mut len) };
        let rd32 = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().unwrap());
        // tcpi_unacked at 24, tcpi_notsent_bytes at 144
        if (rd32(24) == 0 && rd32(144) == 0) || std::time::Instant::now() > end {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let (sent, re) = tcp_sent(s);
    SENT.fetch_add(sent, Relaxed);
    RETRANS.fetch_add(re, Relaxed);
}

/// Prints what TCP says it put on the wire (retransmissions included).
fn report_wire() {
    use std::sync::atomic::Ordering::Relaxed;
    out(format!("wire_sent {}", SENT.load(Relaxed)));
    out(format!("wire_retrans {}", RETRANS.load(Relaxed)));
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
    note_sent(&s);
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
                s.shutdown(Shutdown::Write).unwrap();
                note_sent(&s);
                drop(s);
            }
            out(format!("received {total}"));
            report_wire();
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
            report_wire();
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
            report_wire();
        }
        ["short-tcp", addr, port, send] => {
            let to = SocketAddr::new(addr.parse().unwrap(), port.parse().unwrap());
            let (s, r) = exchange(TcpStream::connect(to).unwrap(), send.parse().unwrap());
            out(format!("sent {s}"));
            out(format!("received {r}"));
            report_wire();
        }
        _ => {
            eprintln!("peer: bad arguments {a:?}");
            std::process::exit(2);
        }
    }
}
