//! A local user stalling an HTTP endpoint (the metrics endpoint's trust-boundary test):
//!
//!   stall ADDR:PORT IDLE WRITERS
//!
//! Opens WRITERS connections that each send 400 pipelined `GET /metrics` and never read a
//! byte of the replies, then IDLE connections that send nothing; prints "connected N" (all
//! connects done), then waits for a line on stdin and prints "closed N": how many of them
//! the server has closed by then (TCP state CLOSE_WAIT or CLOSE).
use std::{
    io::{BufRead, Write},
    net::TcpStream,
    os::fd::AsRawFd,
};

fn out(line: String) {
    let mut o = std::io::stdout().lock();
    writeln!(o, "{line}").unwrap();
    o.flush().unwrap();
}

/// The socket's TCP state (struct tcp_info's first byte).
fn tcp_state(s: &TcpStream) -> u8 {
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info[0]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, idle, writers] = args.as_slice() else {
        eprintln!("usage: stall ADDR:PORT IDLE WRITERS");
        std::process::exit(2);
    };
    let (idle, writers): (usize, usize) = (idle.parse().unwrap(), writers.parse().unwrap());
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").repeat(400);
    let mut conns = vec![];
    for _ in 0..writers {
        let mut s = TcpStream::connect(addr.as_str()).unwrap();
        // A refused connection may already be closed: that is the server's answer.
        let _ = s.write_all(request.as_bytes());
        conns.push(s);
    }
    for _ in 0..idle {
        conns.push(TcpStream::connect(addr.as_str()).unwrap());
    }
    out(format!("connected {}", conns.len()));
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    const TCP_CLOSE: u8 = 7;
    const TCP_CLOSE_WAIT: u8 = 8;
    let closed = conns
        .iter()
        .filter(|s| matches!(tcp_state(s), TCP_CLOSE | TCP_CLOSE_WAIT))
        .count();
    out(format!("closed {closed}"));
}
