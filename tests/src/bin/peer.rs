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
//!
//!   peer [--name N] flow-stress TAG DELAY_US HOLD            (socket patterns for the flow ledger:
//!                                                              tests/src/peer_modes/flows.rs)
//!
//! Trust-boundary modes (a local attacker's moves): names-churn, names-hold, control-hold,
//! control-subscribe, orphan-label, udp-cookie, setuid-label; see tests/src/peer_modes/trust.rs.
//!
//! Benchmark modes (sockacct-bench):
//!   peer [--name N] tcp-sink LISTEN_ADDR                      (prints "port P"; one connection read to
//!                                                              EOF; prints "received B", "nanos T")
//!   peer [--name N] tcp-blast ADDR PORT SECONDS               (bulk send for SECONDS; "sent B", "nanos T")
//!   peer [--name N] udp-count LISTEN_ADDR SECONDS             (prints "port P"; counts datagrams for
//!                                                              SECONDS from the first; "datagrams N", "nanos T")
//!   peer [--name N] udp-blast ADDR PORT SECONDS SIZE          (unpaced; "sent N", "errors E", "nanos T")
//!   peer [--name N] udp-blast-to ADDR PORT SECONDS SIZE       (the same from an unconnected socket, send_to)
//!   peer [--name N] hold-many PAIRS ACTIVE [FIRST]            (PAIRS established loopback TCP connections to
//!                                                              listeners on 127.0.0.FIRST…, both ends here;
//!                                                              prints "sockets S"; keeps light traffic on
//!                                                              ACTIVE pairs until a line on stdin)
#[path = "../peer_modes/flows.rs"]
mod flows;
#[path = "../peer_modes/trust.rs"]
mod trust;

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
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert!(
        r == 0 && len >= 216,
        "TCP_INFO: {}",
        std::io::Error::last_os_error()
    );
    let rd = |o: usize| u64::from_ne_bytes(buf[o..o + 8].try_into().unwrap());
    let rd32 = |o: usize| u32::from_ne_bytes(buf[o..o + 4].try_into().unwrap()) as u64;
    // tcpi_rcv_ooopack (224): segments this socket received out of order; it then sent
    // SACK options, which make its ACKs longer than the plain header.
    OOO.fetch_add(
        if len >= 228 { rd32(224) } else { 0 },
        std::sync::atomic::Ordering::Relaxed,
    );
    (rd(200), rd(208))
}

static OOO: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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
        unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
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
    out(format!("wire_ooo {}", OOO.load(Relaxed)));
}

/// The socket's drop counter from /proc/net/udp{,6} (last column), found by inode.
fn udp_drops(s: &UdpSocket) -> u64 {
    use std::os::fd::AsRawFd;
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    unsafe { libc::fstat(s.as_raw_fd(), &mut st) };
    let ino = st.st_ino.to_string();
    // /proc/net/udp is produced a page at a time and resumes by position: sockets closing
    // meanwhile (other tests) shift the rest, and a line can be skipped. Read it again.
    for _ in 0..20 {
        for f in ["/proc/net/udp", "/proc/net/udp6"] {
            for line in std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .skip(1)
            {
                let cols: Vec<&str> = line.split_whitespace().collect();
                if cols.len() > 12 && cols[9] == ino {
                    return cols[12].parse().unwrap();
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("socket inode {ino} not in /proc/net/udp*");
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
            {
                use std::os::fd::AsRawFd;
                // Root may exceed rmem_max: a big buffer keeps loopback bursts from dropping.
                let v: libc::c_int = 16 << 20;
                unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_RCVBUFFORCE,
                        (&v as *const libc::c_int).cast(),
                        4,
                    )
                };
            }
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
            // Datagrams that reached the socket but found its buffer full: the agent
            // counts them (they crossed into the socket), the application never saw them.
            out(format!("drops {}", udp_drops(&s)));
        }
        ["udp-send", addr, port, count, size] => {
            let to = SocketAddr::new(addr.parse().unwrap(), port.parse().unwrap());
            let bind: IpAddr = if to.is_ipv4() {
                "127.0.0.1".parse().unwrap()
            } else {
                "::1".parse().unwrap()
            };
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
            let bind: IpAddr = if to.is_ipv4() {
                "127.0.0.1".parse().unwrap()
            } else {
                "::1".parse().unwrap()
            };
            UdpSocket::bind((bind, 0))
                .unwrap()
                .send_to(&[0], to)
                .unwrap();
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
        // Benchmark modes (sockacct-bench); the functions are at the end of this file.
        ["tcp-sink", listen] => bench_tcp_sink(listen),
        ["tcp-blast", addr, port, secs] => bench_tcp_blast(addr, port, secs),
        ["udp-count", listen, secs] => bench_udp_count(listen, secs),
        ["udp-blast", addr, port, secs, size] => bench_udp_blast(addr, port, secs, size),
        ["udp-blast-to", addr, port, secs, size] => bench_udp_blast_to(addr, port, secs, size),
        ["udp-many", n, size, net] => bench_udp_many(n, size, net),
        ["udp-churn", n, every_ms, net] => bench_udp_churn(n, every_ms, net),
        ["hold-many", pairs, active] => bench_hold_many(pairs, active, "2"),
        ["hold-many", pairs, active, first_ip] => bench_hold_many(pairs, active, first_ip),
        ["tcp-serve-fork", listen, worker_name, greeting, reply] => {
            // Pre-fork server: this process listens, a forked worker with another name
            // accepts and talks, so the listener's owner differs from the accepter.
            let l = TcpListener::bind((listen.parse::<IpAddr>().unwrap(), 0)).unwrap();
            out(format!("port {}", l.local_addr().unwrap().port()));
            let (greeting, reply): (u64, u64) = (greeting.parse().unwrap(), reply.parse().unwrap());
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork");
            if pid == 0 {
                set_name(worker_name);
                let (mut s, _) = l.accept().unwrap();
                s.write_all(&vec![0x77u8; greeting as usize]).unwrap();
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    let n = s.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                s.write_all(&vec![0x78u8; reply as usize]).unwrap();
                s.shutdown(Shutdown::Write).unwrap();
                note_sent(&s);
                out(format!("received {total}"));
                report_wire();
                unsafe { libc::_exit(0) };
            }
            let mut st = 0;
            unsafe { libc::waitpid(pid, &mut st, 0) };
            assert!(
                libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
                "worker failed"
            );
        }
        ["tcp-greeted", addr, port, greeting, send] => {
            let to = SocketAddr::new(addr.parse().unwrap(), port.parse().unwrap());
            let mut s = TcpStream::connect(to).unwrap();
            let mut g = vec![0u8; greeting.parse().unwrap()];
            s.read_exact(&mut g).unwrap();
            let (s, r) = exchange(s, send.parse().unwrap());
            out(format!("sent {s}"));
            out(format!("received {}", r + g.len() as u64));
            report_wire();
        }
        ["self-label", addr, port, control, label, send] => {
            // An application naming its own socket: SO_COOKIE, then a label request on the
            // control socket, then traffic.
            use std::os::fd::AsRawFd;
            let to = SocketAddr::new(addr.parse().unwrap(), port.parse().unwrap());
            let s = TcpStream::connect(to).unwrap();
            let mut cookie: u64 = 0;
            let mut len = 8 as libc::socklen_t;
            unsafe {
                libc::getsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_COOKIE,
                    (&raw mut cookie).cast(),
                    &mut len,
                )
            };
            out(format!("cookie {cookie}"));
            let mut c = std::os::unix::net::UnixStream::connect(control).unwrap();
            writeln!(
                c,
                "{{\"cmd\":\"label\",\"cookie\":{cookie},\"label\":\"{label}\"}}"
            )
            .unwrap();
            let mut reply = String::new();
            std::io::BufReader::new(&c).read_line(&mut reply).unwrap();
            out(format!("reply {}", reply.trim()));
            let (s, r) = exchange(s, send.parse().unwrap());
            out(format!("sent {s}"));
            out(format!("received {r}"));
            report_wire();
        }
        ["tcp-trickle", addr, port, millis] => {
            // A long-lived connection that keeps moving: 100 B every 50 ms.
            let to = SocketAddr::new(addr.parse().unwrap(), port.parse().unwrap());
            let mut s = TcpStream::connect(to).unwrap();
            let end = std::time::Instant::now() + Duration::from_millis(millis.parse().unwrap());
            let mut sent = 0u64;
            while std::time::Instant::now() < end {
                s.write_all(&[1u8; 100]).unwrap();
                sent += 100;
                std::thread::sleep(Duration::from_millis(50));
            }
            let (_, r) = exchange(s, 0);
            out(format!("sent {sent}"));
            out(format!("received {r}"));
        }
        ["udp-multi", addr, ports, count, size] => {
            // One unconnected socket talking to several peers.
            let bind: IpAddr = if addr.contains(':') {
                "::1".parse().unwrap()
            } else {
                "127.0.0.1".parse().unwrap()
            };
            let s = UdpSocket::bind((bind, 0)).unwrap();
            out(format!("local_port {}", s.local_addr().unwrap().port()));
            let buf = vec![0x33u8; size.parse().unwrap()];
            let n: u64 = count.parse().unwrap();
            for p in ports.split(',') {
                let to = SocketAddr::new(addr.parse().unwrap(), p.parse().unwrap());
                for _ in 0..n {
                    s.send_to(&buf, to).unwrap();
                }
            }
            out(format!("sent {}", n * ports.split(',').count() as u64));
        }
        ["flow-stress", tag, delay_us, hold] => flows::flow_stress(tag, delay_us, hold),
        // Trust-boundary modes (tests/tests/trust.rs).
        ["names-churn", addr, port, n, size] => trust::names_churn(addr, port, n, size),
        ["names-hold", addr, port, n, size] => trust::names_hold(addr, port, n, size),
        ["control-hold", path, n] => trust::control_hold(path, n),
        ["control-subscribe", path, n] => trust::control_subscribe(path, n),
        ["orphan-label", path] => trust::orphan_label(path),
        ["udp-cookie", addr, port, size] => trust::udp_cookie(addr, port, size),
        ["setuid-label", path, addr, port] => trust::setuid_label(path, addr, port),
        _ => {
            eprintln!("peer: bad arguments {a:?}");
            std::process::exit(2);
        }
    }
}

// ---- Benchmark modes -------------------------------------------------------------------

fn bench_duration(secs: &str) -> Duration {
    Duration::from_secs_f64(secs.parse::<f64>().expect("SECONDS must be a number"))
}

/// Accepts one connection and reads it to EOF; the time runs from accept to EOF.
fn bench_tcp_sink(listen: &str) {
    let l = TcpListener::bind((listen.parse::<IpAddr>().unwrap(), 0)).unwrap();
    out(format!("port {}", l.local_addr().unwrap().port()));
    let (mut s, _) = l.accept().unwrap();
    let start = std::time::Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let nanos = start.elapsed().as_nanos();
    out(format!("received {got}"));
    out(format!("nanos {nanos}"));
}

/// Writes as fast as the connection takes it for `secs`, then closes its side and waits
/// for the sink to finish.
fn bench_tcp_blast(addr: &str, port: &str, secs: &str) {
    let to = SocketAddr::new(addr.parse().unwrap(), port.parse().unwrap());
    let dur = bench_duration(secs);
    let mut s = TcpStream::connect(to).unwrap();
    let chunk = vec![0x5au8; 128 * 1024];
    let start = std::time::Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < dur {
        s.write_all(&chunk).unwrap();
        sent += chunk.len() as u64;
    }
    s.shutdown(Shutdown::Write).unwrap();
    let nanos = start.elapsed().as_nanos();
    // The sink closes once it has read everything.
    let mut rest = [0u8; 64];
    while s.read(&mut rest).map(|n| n > 0).unwrap_or(false) {}
    out(format!("sent {sent}"));
    out(format!("nanos {nanos}"));
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Counts datagrams for `secs`, starting at the first one received.
fn bench_udp_count(listen: &str, secs: &str) {
    let s = UdpSocket::bind((listen.parse::<IpAddr>().unwrap(), 0)).unwrap();
    out(format!("port {}", s.local_addr().unwrap().port()));
    let dur = bench_duration(secs);
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = [0u8; 2048];
    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match s.recv(&mut buf) {
            Ok(_) => break,
            Err(e) if is_timeout(&e) => {
                if std::time::Instant::now() > give_up {
                    out("datagrams 0".into());
                    out("nanos 0".into());
                    return;
                }
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
    let start = std::time::Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        match s.recv(&mut buf) {
            Ok(_) => n += 1,
            Err(e) if is_timeout(&e) => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
    let nanos = start.elapsed().as_nanos();
    out(format!("datagrams {n}"));
    out(format!("nanos {nanos}"));
}

/// Sends `size`-byte datagrams without pacing for `secs` (failed sends are counted, not fatal).
fn bench_udp_blast(addr: &str, port: &str, secs: &str, size: &str) {
    let to = SocketAddr::new(addr.parse().unwrap(), port.parse().unwrap());
    let bind: IpAddr = if to.is_ipv4() {
        "0.0.0.0".parse().unwrap()
    } else {
        "::".parse().unwrap()
    };
    let s = UdpSocket::bind((bind, 0)).unwrap();
    s.connect(to).unwrap();
    let dur = bench_duration(secs);
    let buf = vec![0x11u8; size.parse().unwrap()];
    let start = std::time::Instant::now();
    let (mut sent, mut errors) = (0u64, 0u64);
    while start.elapsed() < dur {
        for _ in 0..256 {
            match s.send(&buf) {
                Ok(_) => sent += 1,
                Err(_) => errors += 1,
            }
        }
    }
    let nanos = start.elapsed().as_nanos();
    out(format!("sent {sent}"));
    out(format!("errors {errors}"));
    out(format!("nanos {nanos}"));
}

fn bench_linger0(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// Opens `pairs` loopback TCP connections (both ends in this process, so every socket is
/// created in this process's cgroup), each carrying one byte so it has a map entry. The
/// destinations are spread over several 127.0.0.x listeners so ephemeral ports never run
/// out. Sockets close with RST (linger 0): no TIME_WAIT left behind.
/// Raises RLIMIT_NOFILE to `want` (the soft limit never needs a capability; the hard one
/// needs CAP_SYS_RESOURCE).
fn raise_nofile(want: libc::rlim_t) {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    if rl.rlim_cur < want {
        // Raising the hard limit needs CAP_SYS_RESOURCE; the soft one never does.
        let new = libc::rlimit {
            rlim_cur: want,
            rlim_max: want.max(rl.rlim_max),
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
            panic!(
                "raising RLIMIT_NOFILE to {want} (hard limit {}): {} (use fewer pairs per process)",
                rl.rlim_max,
                std::io::Error::last_os_error()
            );
        }
    }
}

/// `n` connected UDP sockets, one datagram of `size` bytes each to a receiver of this
/// process on loopback (which never reads: the sender's counts are what the bench wants),
/// held until a line on stdin, then closed at once. Bound to 127.0.NET.1, so processes
/// with different NETs do not share one address's ephemeral ports.
fn bench_udp_many(n: &str, size: &str, net: &str) {
    let (n, size, net): (usize, usize, u8) = (
        n.parse().unwrap(),
        size.parse().unwrap(),
        net.parse().unwrap(),
    );
    raise_nofile((n + 512) as libc::rlim_t);
    let ip = std::net::Ipv4Addr::new(127, 0, net, 1);
    let rcv = UdpSocket::bind((ip, 0)).unwrap();
    let to = rcv.local_addr().unwrap();
    let buf = vec![0x5au8; size];
    let socks: Vec<UdpSocket> = (0..n)
        .map(|i| {
            let s = UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("socket {i}: {e}"));
            s.connect(to).unwrap();
            s.send(&buf).unwrap();
            s
        })
        .collect();
    out(format!("sockets {}", socks.len()));
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    out("closing".into());
    drop(socks);
    drop(rcv);
    std::process::exit(0);
}

/// `n` connected UDP sockets (each its own local port), each sending one 32 B datagram
/// every `every_ms`, until a line arrives on stdin.
fn bench_udp_churn(n: &str, every_ms: &str, net: &str) {
    let (n, every, net): (usize, u64, u8) = (
        n.parse().unwrap(),
        every_ms.parse().unwrap(),
        net.parse().unwrap(),
    );
    raise_nofile((n + 512) as libc::rlim_t);
    let ip = std::net::Ipv4Addr::new(127, 0, net, 1);
    let rcv = UdpSocket::bind((ip, 0)).unwrap();
    let to = rcv.local_addr().unwrap();
    let socks: Vec<UdpSocket> = (0..n)
        .map(|_| {
            let s = UdpSocket::bind((ip, 0)).unwrap();
            s.connect(to).unwrap();
            s
        })
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        st.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    // Drain the receiver so its buffer never fills.
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while rcv.recv(&mut buf).is_ok() {}
    });
    out(format!("port {}", to.port()));
    out(format!("sockets {}", socks.len()));
    let buf = [0x5au8; 32];
    let mut next = std::time::Instant::now();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        for s in &socks {
            let _ = s.send(&buf);
        }
        next += Duration::from_millis(every);
        if let Some(d) = next.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(d);
        }
    }
    out("closing".into());
    std::process::exit(0);
}

fn bench_hold_many(pairs: &str, active: &str, first_ip: &str) {
    let (pairs, active, first): (usize, usize, usize) = (
        pairs.parse().unwrap(),
        active.parse().unwrap(),
        first_ip.parse().unwrap(),
    );
    let per_listener = 10_000;
    let nl = pairs.div_ceil(per_listener).max(1);
    assert!(
        first >= 1 && first + nl < 255,
        "listener addresses beyond 127.0.0.254"
    );
    raise_nofile((2 * pairs + nl + 512) as libc::rlim_t);
    let listeners: Vec<TcpListener> = (0..nl)
        .map(|i| {
            TcpListener::bind((std::net::Ipv4Addr::new(127, 0, 0, (first + i) as u8), 0)).unwrap()
        })
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let mut conns = Vec::with_capacity(pairs);
    for i in 0..pairs {
        let l = i % nl;
        let c = TcpStream::connect(addrs[l])
            .unwrap_or_else(|e| panic!("connection {i} to {}: {e}", addrs[l]));
        let (s, _) = listeners[l].accept().unwrap();
        bench_linger0(&c);
        bench_linger0(&s);
        (&c).write_all(&[1]).unwrap();
        conns.push((c, s));
    }
    let mut act: Vec<(TcpStream, TcpStream)> = conns
        .iter()
        .take(active)
        .map(|(c, s)| (c.try_clone().unwrap(), s.try_clone().unwrap()))
        .collect();
    for (_, s) in &mut act {
        let mut one = [0u8; 1];
        s.read_exact(&mut one).unwrap();
    }
    out(format!("sockets {}", 2 * pairs + nl));
    std::thread::spawn(move || {
        let msg = [7u8; 100];
        let mut buf = [0u8; 100];
        loop {
            for (c, s) in &mut act {
                c.write_all(&msg).unwrap();
                s.read_exact(&mut buf).unwrap();
                s.write_all(&buf).unwrap();
                c.read_exact(&mut buf).unwrap();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    out("closing".into());
    drop(conns);
    std::process::exit(0);
}

/// Like `bench_udp_blast`, but the socket stays unconnected and every datagram goes out with
/// send_to: the kernel counts such a socket per peer (the path flow records read).
fn bench_udp_blast_to(addr: &str, port: &str, secs: &str, size: &str) {
    let to = SocketAddr::new(addr.parse().unwrap(), port.parse().unwrap());
    let bind: IpAddr = if to.is_ipv4() {
        "0.0.0.0".parse().unwrap()
    } else {
        "::".parse().unwrap()
    };
    let s = UdpSocket::bind((bind, 0)).unwrap();
    let dur = bench_duration(secs);
    let buf = vec![0x11u8; size.parse().unwrap()];
    let start = std::time::Instant::now();
    let (mut sent, mut errors) = (0u64, 0u64);
    while start.elapsed() < dur {
        for _ in 0..256 {
            match s.send_to(&buf, to) {
                Ok(_) => sent += 1,
                Err(_) => errors += 1,
            }
        }
    }
    let nanos = start.elapsed().as_nanos();
    out(format!("sent {sent}"));
    out(format!("errors {errors}"));
    out(format!("nanos {nanos}"));
}
