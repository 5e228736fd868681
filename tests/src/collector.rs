//! The upload's counterpart in tests: a minimal HTTP/1.1 collector on 127.0.0.1, plain or
//! over TLS (rustls, with a certificate of the test's own CA and optionally requiring a
//! client certificate, see [`crate::tls`]), that records every request and answers as a
//! script says.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

/// How the test collector answers one request.
#[derive(Debug, Clone)]
pub enum Answer {
    Status(u16, Vec<(String, String)>),
    /// Read the request, then close without a reply (a lost reply).
    Close,
    /// Read the request, then say nothing for this long.
    Hang(Duration),
}

/// One request as the collector received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    pub answered: u16,
}

impl Received {
    /// The zstd body decoded into its JSON lines.
    pub fn lines(&self) -> Vec<String> {
        let raw = zstd::stream::decode_all(&self.body[..]).expect("body is zstd");
        String::from_utf8(raw)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

type Script = Arc<dyn Fn(usize) -> Answer + Send + Sync>;

/// A collector on 127.0.0.1 that records every request and answers according to
/// `script` (called with the request number, from 0).
pub struct Collector {
    pub port: u16,
    pub received: Arc<Mutex<Vec<Received>>>,
    /// TLS handshakes that failed, as the server saw them (rustls's error).
    pub tls_errors: Arc<Mutex<Vec<String>>>,
    scheme: &'static str,
}

impl Collector {
    /// Plain HTTP.
    pub fn start(script: impl Fn(usize) -> Answer + Send + Sync + 'static) -> Collector {
        Collector::serve(None, Arc::new(script))
    }

    /// HTTPS with this server config ([`crate::tls::TestPki::server_config`]).
    pub fn start_tls(
        tls: Arc<rustls::ServerConfig>,
        script: impl Fn(usize) -> Answer + Send + Sync + 'static,
    ) -> Collector {
        Collector::serve(Some(tls), Arc::new(script))
    }

    fn serve(tls: Option<Arc<rustls::ServerConfig>>, script: Script) -> Collector {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let tls_errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let (rec, errs) = (received.clone(), tls_errors.clone());
        let n = Arc::new(Mutex::new(0usize));
        thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(c) = conn else { continue };
                let (rec, script, n, errs, tls) = (
                    rec.clone(),
                    script.clone(),
                    n.clone(),
                    errs.clone(),
                    tls.clone(),
                );
                thread::spawn(move || match tls {
                    None => answer_all(c, &rec, &script, &n),
                    Some(cfg) => {
                        let mut s = rustls::StreamOwned::new(
                            rustls::ServerConnection::new(cfg).unwrap(),
                            c,
                        );
                        // Handshake first, so that its failure is recorded as such.
                        while s.conn.is_handshaking() {
                            if let Err(e) = s.conn.complete_io(&mut s.sock) {
                                errs.lock().unwrap().push(e.to_string());
                                return;
                            }
                        }
                        answer_all(s, &rec, &script, &n)
                    }
                });
            }
        });
        Collector {
            port,
            received,
            tls_errors,
            scheme,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}{path}", self.scheme, self.port)
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn tls_errors(&self) -> Vec<String> {
        self.tls_errors.lock().unwrap().clone()
    }
}

/// Answers the requests of one connection until it ends or the script says otherwise.
fn answer_all(
    mut c: impl Read + Write,
    rec: &Mutex<Vec<Received>>,
    script: &Script,
    n: &Mutex<usize>,
) {
    loop {
        let Some((path, headers, body)) = read_request(&mut c) else {
            return;
        };
        let i = {
            let mut n = n.lock().unwrap();
            *n += 1;
            *n - 1
        };
        let answer = script(i);
        let answered = match &answer {
            Answer::Status(s, _) => *s,
            _ => 0,
        };
        rec.lock().unwrap().push(Received {
            path,
            headers,
            body,
            answered,
        });
        match answer {
            Answer::Status(code, extra) => {
                let mut h = format!("HTTP/1.1 {code} X\r\nContent-Length: 2\r\n");
                for (k, v) in extra {
                    h.push_str(&format!("{k}: {v}\r\n"));
                }
                h.push_str("\r\nok");
                if c.write_all(h.as_bytes()).and_then(|_| c.flush()).is_err() {
                    return;
                }
            }
            Answer::Close => return,
            Answer::Hang(d) => {
                thread::sleep(d);
                return;
            }
        }
    }
}

fn read_request(c: &mut impl Read) -> Option<(String, BTreeMap<String, String>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if c.read(&mut byte).ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let mut lines = head.split("\r\n");
    let path = lines.next()?.split_whitespace().nth(1)?.to_string();
    let mut headers = BTreeMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    c.read_exact(&mut body).ok()?;
    Some((path, headers, body))
}
