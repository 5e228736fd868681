//! Peer modes that act as a local attacker would (tests/tests/trust.rs).
use std::{
    io::{BufRead, Read, Write},
    net::{SocketAddr, UdpSocket},
    os::{fd::AsRawFd, unix::net::UnixStream},
    time::Duration,
};

use super::{out, set_name};

fn cookie(fd: &impl AsRawFd) -> u64 {
    let mut v: u64 = 0;
    let mut len = 8 as libc::socklen_t;
    unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut v).cast(),
            &mut len,
        )
    };
    v
}

fn wait_stdin() {
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
}

/// `names-churn ADDR PORT N SIZE`: N sockets in turn, each under a new thread name (so a
/// new process-name label), one datagram each, closed at once.
pub fn names_churn(addr: &str, port: &str, n: &str, size: &str) {
    let to = SocketAddr::new(addr.parse().unwrap(), port.parse().unwrap());
    let (n, size): (u64, usize) = (n.parse().unwrap(), size.parse().unwrap());
    let buf = vec![0x5au8; size];
    for i in 0..n {
        set_name(&format!("n{i:x}"));
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.send_to(&buf, to).unwrap();
        if i % 256 == 255 {
            // Pace so the receiver's buffer keeps up on loopback.
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    set_name("names-done");
    out(format!("sent {n}"));
}

/// `names-hold ADDR PORT N SIZE`: like names-churn, but every socket stays open until a
/// line on stdin.
pub fn names_hold(addr: &str, port: &str, n: &str, size: &str) {
    let to = SocketAddr::new(addr.parse().unwrap(), port.parse().unwrap());
    let (n, size): (u64, usize) = (n.parse().unwrap(), size.parse().unwrap());
    let buf = vec![0x5au8; size];
    let mut held = vec![];
    for i in 0..n {
        set_name(&format!("h{i:x}"));
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.send_to(&buf, to).unwrap();
        held.push(s);
    }
    set_name("names-done");
    out(format!("sent {n}"));
    wait_stdin();
    drop(held);
    out("closed".into());
}

/// `control-hold PATH N`: N connections to the control socket, held without a word;
/// prints "connected N". At a line on stdin, prints "closed C" (connections the agent
/// has closed: refused at once, or cut off idle) and "refused R" (those told "too many").
pub fn control_hold(path: &str, n: &str) {
    let n: usize = n.parse().unwrap();
    // Room for the descriptors (the soft limit is often 1024).
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
    let conns: Vec<UnixStream> = (0..n)
        .map(|_| UnixStream::connect(path).expect("connect"))
        .collect();
    out(format!("connected {}", conns.len()));
    wait_stdin();
    let (mut closed, mut refused) = (0, 0);
    for mut c in conns {
        c.set_nonblocking(true).unwrap();
        let mut got = vec![];
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(k) => got.extend_from_slice(&buf[..k]),
                Err(_) => break,
            }
        }
        if String::from_utf8_lossy(&got).contains("too many control connections") {
            refused += 1;
        }
    }
    out(format!("closed {closed}"));
    out(format!("refused {refused}"));
}

/// `control-subscribe PATH N`: N record-stream subscriptions on the control socket;
/// prints "subscribed S" and "refused R" (the first reply of each), keeps them until a
/// line on stdin.
pub fn control_subscribe(path: &str, n: &str) {
    let n: usize = n.parse().unwrap();
    let (mut held, mut refused) = (vec![], 0);
    for _ in 0..n {
        let c = UnixStream::connect(path).expect("connect");
        let mut w = &c;
        writeln!(w, r#"{{"cmd":"subscribe"}}"#).unwrap();
        let mut r = std::io::BufReader::new(c);
        let mut reply = String::new();
        r.read_line(&mut reply).unwrap();
        if reply.contains(r#""ok":true"#) {
            held.push(r);
        } else {
            refused += 1;
        }
    }
    out(format!("subscribed {}", held.len()));
    out(format!("refused {refused}"));
    wait_stdin();
}

/// `orphan-label PATH`: connects to the control socket, hands the connection to a child,
/// prints "orphaned PID" (its own pid) and exits. The child waits for a cookie on stdin,
/// asks to label that socket "stolen" on the inherited connection, prints "reply R".
pub fn orphan_label(path: &str) {
    let c = UnixStream::connect(path).expect("connect");
    let me = std::process::id();
    // SAFETY: the child runs only this mode's own code; the parent exits at once.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // Wait until the connecting process is gone (our parent changes).
        while unsafe { libc::getppid() } == me as i32 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).unwrap();
        let cookie: u64 = line.trim().parse().unwrap();
        let mut w = &c;
        writeln!(w, r#"{{"cmd":"label","cookie":{cookie},"label":"stolen"}}"#).unwrap();
        let mut reply = String::new();
        std::io::BufReader::new(&c).read_line(&mut reply).unwrap();
        out(format!("reply {}", reply.trim()));
        std::process::exit(0);
    }
    out(format!("orphaned {me}"));
}

/// `udp-cookie ADDR PORT SIZE`: one datagram from a new socket; prints "pid P" and
/// "cookie C"; keeps the socket until a line on stdin, then sends another datagram and
/// prints "sent 2".
pub fn udp_cookie(addr: &str, port: &str, size: &str) {
    let to = SocketAddr::new(addr.parse().unwrap(), port.parse().unwrap());
    let buf = vec![0x33u8; size.parse().unwrap()];
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.send_to(&buf, to).unwrap();
    out(format!("pid {}", std::process::id()));
    out(format!("cookie {}", cookie(&s)));
    wait_stdin();
    s.send_to(&buf, to).unwrap();
    out("sent 2".into());
}

/// `setuid-label PATH ADDR PORT`: as root, makes a socket and sends one datagram, then
/// becomes nobody (keeping the socket) and asks to label it "mine" on the control
/// socket; prints "reply R".
pub fn setuid_label(path: &str, addr: &str, port: &str) {
    let to = SocketAddr::new(addr.parse().unwrap(), port.parse().unwrap());
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.send_to(&[1u8; 100], to).unwrap();
    let c = cookie(&s);
    unsafe {
        assert_eq!(libc::setgroups(0, std::ptr::null()), 0);
        assert_eq!(libc::setgid(65534), 0);
        assert_eq!(libc::setuid(65534), 0);
    }
    let conn = UnixStream::connect(path).expect("connect as nobody");
    let mut w = &conn;
    writeln!(w, r#"{{"cmd":"label","cookie":{c},"label":"mine"}}"#).unwrap();
    let mut reply = String::new();
    std::io::BufReader::new(&conn)
        .read_line(&mut reply)
        .unwrap();
    out(format!("reply {}", reply.trim()));
    drop(s);
}
